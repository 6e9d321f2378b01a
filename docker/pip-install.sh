#!/bin/sh
# pip install against the stack's pins. When the build was given an extra CA bundle (a
# BuildKit secret, for TLS-inspecting proxies), pip trusts it for this one call only: the
# bundle is read from the secret mount and a combined copy lives in a temp dir removed on
# exit, so no layer ever holds it. (No `exec` below: it would skip the removal.)
set -eu
extra=/run/secrets/ca_bundle
if [ -s "$extra" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # Keep the public roots too: the extra bundle may hold only the proxy's own CA.
  cat /etc/ssl/certs/ca-certificates.crt "$extra" >"$tmp/ca.pem"
  export PIP_CERT="$tmp/ca.pem"
fi
pip install --disable-pip-version-check --no-input -c /opt/requirements/constraints.txt "$@"

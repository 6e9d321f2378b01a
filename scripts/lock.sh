#!/usr/bin/env bash
# Re-resolves every direct requirement in docker/requirements/*.txt into a fresh venv and
# writes the complete pin list to docker/requirements/constraints.txt, then resolves the
# tracking server's single sign-on plugin on top of it and writes what it adds or changes
# to docker/oidc/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
req=docker/requirements
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check -r $req/test.txt
{
  sed -n '1,/^# Regenerate/p' $req/constraints.txt
  "$tmp/venv/bin/pip" freeze --exclude-editable | sort -f
} >"$tmp/constraints.txt"
mv "$tmp/constraints.txt" $req/constraints.txt

# The plugin pins gunicorn below serving's version: that one pin is left to it.
python3 -m venv "$tmp/oidc"
grep -v '^gunicorn==' $req/constraints.txt >"$tmp/base.txt"
"$tmp/oidc/bin/pip" install -q --disable-pip-version-check -c "$tmp/base.txt" \
  -r $req/mlflow.txt -r $req/server.txt -r docker/oidc/requirements.txt
{
  sed -n '1,/^# older one/p' docker/oidc/constraints.txt
  "$tmp/oidc/bin/pip" freeze --exclude-editable | sort -f | grep -vxF -f $req/constraints.txt
} >"$tmp/oidc-constraints.txt"
mv "$tmp/oidc-constraints.txt" docker/oidc/constraints.txt
echo "docker/requirements/constraints.txt and docker/oidc/constraints.txt updated; rebuild with 'make build'."

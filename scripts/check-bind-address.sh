#!/usr/bin/env bash
# `make up` runs this before anything starts. Publishing the stack beyond this machine
# without the TLS proxy (compose.tls.yaml) would send every MLflow and model-endpoint
# password across the network in clear text, so that takes an explicit
# ALLOW_PLAINTEXT_SHARING=yes. With the proxy, an open model endpoint gets a warning.
#   usage: scripts/check-bind-address.sh [ENV_FILE]      (exit 1: refused)
set -euo pipefail
ENV_FILE=${1:-.env}
# Same precedence as compose: the environment first, then .env.
# shellcheck source=dotenv.sh
. "$(dirname "$0")/dotenv.sh"

bind=${BIND_ADDRESS:-127.0.0.1}
files=${COMPOSE_FILE:-compose.yaml}
override=${ALLOW_PLAINTEXT_SHARING:-no}

is_loopback() {
  local address=${1#[}
  address=${address%]}
  address=${address,,}
  [[ $address == localhost ]] && return 0
  [[ $address =~ ^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] && return 0
  # ::1 however it is spelled: ::1, 0::1, 0:0:0:0:0:0:0:1, 0000::0001.
  [[ $address =~ ^(0{0,4}:){2,7}0{0,3}1$ ]]
}

case $override in
  yes | no) ;;
  *) echo "make up: ALLOW_PLAINTEXT_SHARING must be yes or no, not '$override'" >&2; exit 1 ;;
esac

is_loopback "$bind" && exit 0
if [[ $files == *compose.tls.yaml* ]]; then
  [ "${SERVING_AUTH:-basic}" != none ] \
    || echo "make up: warning: SERVING_AUTH=none: the model endpoint on $bind is open to anyone who reaches it; SERVING_AUTH=basic asks for SERVING_CLIENT_PASSWORD" >&2
  exit 0
fi
if [ "$override" = yes ]; then
  echo "make up: warning: BIND_ADDRESS=$bind without TLS (ALLOW_PLAINTEXT_SHARING=yes): passwords cross the network in clear text" >&2
  exit 0
fi
echo "make up: refusing BIND_ADDRESS=$bind without TLS, which would send passwords in clear text: add compose.tls.yaml to COMPOSE_FILE in $ENV_FILE (README: Sharing with a team), or set ALLOW_PLAINTEXT_SHARING=yes there to share over plain http anyway" >&2
exit 1

#!/usr/bin/env bash
# Installs what scripts/k8s-check.sh needs, without a container registry: kustomize from
# Debian trixie (fetched through a private apt state, as .ci/install-engine.sh fetches the
# Compose plugin), and kubernetes-validate plus checkov in a venv of their own (.k8s-venv/),
# pinned, so they never touch the project's environment.
# Idempotent: each step is skipped when what it provides is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[k8s-tools] %s\n' "$*"; }
. scripts/trixie-fetch.sh

KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
VENV=.k8s-venv

if ! command -v kustomize >/dev/null 2>&1; then
  log "fetching kustomize from Debian trixie"
  install_from_trixie kustomize kustomize
fi
log "kustomize at $(command -v kustomize)"

want="kubernetes-validate==$KUBERNETES_VALIDATE_VERSION checkov==$CHECKOV_VERSION"
if [ "$(cat "$VENV/.pinned" 2>/dev/null)" != "$want" ]; then
  log "installing $want into $VENV/"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "checkov==$CHECKOV_VERSION"
  echo "$want" >"$VENV/.pinned"
fi
log "$("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -n1) / checkov $("$VENV/bin/checkov" --version)"

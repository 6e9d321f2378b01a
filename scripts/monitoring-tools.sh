#!/usr/bin/env bash
# Installs promtool (Prometheus 2.53 from Debian trixie, scripts/trixie-fetch.sh) so that
# `make monitoring-check` can test the alert rules without a container registry.
# Idempotent: skipped when promtool is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/trixie-fetch.sh

if ! command -v promtool >/dev/null 2>&1; then
  echo "[monitoring-tools] fetching promtool from Debian trixie"
  install_from_trixie promtool promtool
fi
echo "[monitoring-tools] $(promtool --version 2>&1 | head -n1)"

#!/usr/bin/env bash
# Installs promtool (Prometheus 2.53 from Debian trixie, fetched through a private apt state as
# scripts/k8s-tools.sh fetches kustomize) so that `make monitoring-check` can test the alert
# rules without a container registry. Idempotent: skipped when promtool is already there.
set -euo pipefail

log() { printf '[monitoring-tools] %s\n' "$*"; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! command -v promtool >/dev/null 2>&1; then
  log "fetching promtool from Debian trixie"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/sources" "$work/lists/partial" "$work/debs"
  echo "deb http://deb.debian.org/debian trixie main" >"$work/sources/trixie.list"
  aptopts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/sources"
           -o "Dir::State::Lists=$work/lists" -o Debug::NoLocking=1
           -o APT::Sandbox::User=root)
  apt-get "${aptopts[@]}" update -qq
  (cd "$work/debs" && apt-get "${aptopts[@]}" download promtool >/dev/null)
  deb=$(echo "$work"/debs/promtool_*.deb)
  # Needs only glibc >= 2.34, so trixie's build runs on bookworm too.
  dpkg -x "$deb" "$work/root"
  $SUDO install -m 0755 "$work/root/usr/bin/promtool" /usr/local/bin/promtool
fi
log "$(promtool --version 2>&1 | head -n1)"

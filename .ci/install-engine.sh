#!/usr/bin/env bash
# Makes sure a Docker engine and Compose v2 are available on a Debian 12 machine that has
# no container registry: Debian's engine, plus trixie's static compose/buildx plugins.
# Idempotent: each step is skipped when what it provides is already there.
set -euo pipefail

log() { printf '[engine] %s\n' "$*"; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_updated=""
apt_update_once() {
  [ -n "$apt_updated" ] || { $SUDO apt-get update -qq; apt_updated=1; }
}

if ! command -v dockerd >/dev/null 2>&1; then
  log "installing Debian's docker.io engine"
  apt_update_once
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    docker.io >/dev/null
fi

plugins=/usr/libexec/docker/cli-plugins
if ! docker compose version >/dev/null 2>&1 || ! docker buildx version >/dev/null 2>&1; then
  # bookworm's docker-compose is the Python v1; trixie's v2 binaries are static Go builds
  # that only need glibc >= 2.34, so they run here.
  log "fetching Compose v2 and buildx plugins from Debian trixie"
  work=$(mktemp -d)
  mkdir -p "$work/sources" "$work/lists/partial" "$work/debs"
  echo "deb http://deb.debian.org/debian trixie main" >"$work/sources/trixie.list"
  aptopts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/sources"
           -o "Dir::State::Lists=$work/lists" -o Debug::NoLocking=1)
  $SUDO apt-get "${aptopts[@]}" update -qq
  (cd "$work/debs" && $SUDO apt-get "${aptopts[@]}" download docker-compose docker-buildx >/dev/null)
  for deb in "$work"/debs/*.deb; do $SUDO dpkg -x "$deb" "$work/root"; done
  $SUDO mkdir -p "$plugins"
  $SUDO install -m 0755 "$work/root/usr/libexec/docker/cli-plugins/docker-compose" "$plugins/"
  $SUDO install -m 0755 "$work/root/usr/libexec/docker/cli-plugins/docker-buildx" "$plugins/"
  rm -rf "$work"
fi

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  $SUDO sh -c 'setsid dockerd >/var/log/dockerd.log 2>&1 < /dev/null &'
  deadline=$((SECONDS + 60))
  until docker info >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "dockerd did not answer within 60 s; last lines of /var/log/dockerd.log:"
      tail -n 20 /var/log/dockerd.log >&2 || true
      exit 1
    fi
    sleep 1
  done
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap (builds the offline base image)"
  apt_update_once
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    debootstrap >/dev/null
fi

log "$(docker version --format 'engine {{.Server.Version}}') / $(docker compose version --short | sed 's/^/compose /')"

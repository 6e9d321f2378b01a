#!/usr/bin/env bash
# Builds local stand-ins for every image the stack would otherwise pull, from Debian packages
# and the npm registry only, so that `docker compose` works where no container registry can be
# reached. An image that already exists is kept; --force rebuilds it without the build cache.
#
#   docker/offline/build-images.sh [--force] [base|postgres|s3|prometheus ...]
#
# Settings (environment):
#   OFFLINE_BASE_IMAGE      base of every image here and of our Python images
#                           (default mlops-local/debian:trixie)
#   OFFLINE_POSTGRES_IMAGE  PostgreSQL 17 stand-in (default mlops-local/postgres:17)
#   OFFLINE_S3_IMAGE        S3 server standing in for MinIO (default mlops-local/s3:s3rver-3.7.1-sigv4)
#   OFFLINE_PROMETHEUS_IMAGE  Prometheus for the monitoring profile (default mlops-local/prometheus:2.53)
#   DEBIAN_MIRROR           plain-http Debian mirror for debootstrap and for apt inside images
#                           (default http://deb.debian.org/debian)
#   DEBIAN_SECURITY_MIRROR  (default http://deb.debian.org/debian-security)
#   DEBIAN_KEYRING          keys the archive's signature is checked against
#                           (default /usr/share/keyrings/debian-archive-keyring.gpg)
#   BUILD_CA_BUNDLE         extra CA bundle (PEM) trusted by downloads inside builds, for
#                           TLS-inspecting proxies; passed as a BuildKit secret, never stored
set -Eeuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OFFLINE_BASE_IMAGE=${OFFLINE_BASE_IMAGE:-mlops-local/debian:trixie}
OFFLINE_POSTGRES_IMAGE=${OFFLINE_POSTGRES_IMAGE:-mlops-local/postgres:17}
OFFLINE_S3_IMAGE=${OFFLINE_S3_IMAGE:-mlops-local/s3:s3rver-3.7.1-sigv4}
OFFLINE_PROMETHEUS_IMAGE=${OFFLINE_PROMETHEUS_IMAGE:-mlops-local/prometheus:2.53}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BUILD_CA_BUNDLE=${BUILD_CA_BUNDLE:-}
suite=trixie
export DOCKER_BUILDKIT=1

log() { printf '%s offline: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() { sed -n '2,/^set -E/{/^set -E/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

force=false
targets=()
for arg in "$@"; do
  case $arg in
    --force) force=true ;;
    -h|--help) usage; exit 0 ;;
    base|postgres|s3|prometheus) targets+=("$arg") ;;
    *) usage >&2; die "unknown argument: $arg" ;;
  esac
done
((${#targets[@]})) || targets=(base postgres s3 prometheus)

# The base image's root filesystem is about 200 MB; never leave it behind, even on failure.
base_work=
remove_base_work() {
  [[ -n $base_work && -d $base_work ]] || return 0
  # A failed debootstrap can leave proc and sys mounted inside; deleting through them is unsafe.
  umount -R "$base_work/rootfs/proc" "$base_work/rootfs/sys" 2>/dev/null || true
  rm -rf --one-file-system "$base_work"
}
trap remove_base_work EXIT

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# Skipping needs no root and no debootstrap, so check tools only when something gets built.
needs_build() { $force || ! have_image "$1"; }

build_base() {
  command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
  if ((EUID != 0)); then
    # debootstrap creates device nodes and root-owned files: only this step needs root.
    command -v sudo >/dev/null || die "building the base image needs root (debootstrap)"
    log "debootstrap needs root; asking sudo"
    sudo --preserve-env=OFFLINE_BASE_IMAGE,DEBIAN_MIRROR,DEBIAN_SECURITY_MIRROR,DEBIAN_KEYRING,TMPDIR \
      "${BASH_SOURCE[0]}" --force base
    return
  fi
  case $DEBIAN_MIRROR in
    http://*) ;;
    *) die "DEBIAN_MIRROR must be plain http:// (apt checks signatures; images have no CA store yet)" ;;
  esac

  local rootfs
  base_work=$(mktemp -d "${TMPDIR:-/tmp}/offline-base.XXXXXX")
  rootfs=$base_work/rootfs

  # The mirror is plain http: every package is trusted only through the Release file's
  # signature, so checking it is enforced and the key ring is named, never left to defaults.
  local keyring=${DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
  [[ -r $keyring ]] || die "$keyring is missing: apt-get install debian-archive-keyring (or set DEBIAN_KEYRING)"
  command -v gpgv >/dev/null || die "gpgv is missing (apt-get install gpgv): it checks the archive's signature"
  log "debootstrap $suite from $DEBIAN_MIRROR (signatures checked against $keyring)"
  debootstrap --variant=minbase --force-check-gpg --keyring="$keyring" "$suite" "$rootfs" "$DEBIAN_MIRROR" \
    >"$base_work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$base_work/debootstrap.log" >&2; die "debootstrap failed"; }
  grep -q "Valid Release signature" "$base_work/debootstrap.log" \
    || die "debootstrap did not report a valid Release signature; refusing the image"

  # The same apt and dpkg settings as Debian's slim images, plus no recommends (see files).
  cp -R "$here/base/rootfs/." "$rootfs/"
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY_MIRROR
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES

  # Slim images carry no docs, man pages or translations; the dpkg excludes above keep it so
  # for later installs, this removes what debootstrap already unpacked.
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{man,info,groff,lintian,linda}/* "$rootfs"/usr/share/locale/*
  # Caches, logs and host-specific files would only make the image bigger or wrong.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* \
    "$rootfs"/etc/hostname "$rootfs"/etc/resolv.conf "$rootfs"/etc/machine-id \
    "$rootfs"/run/* "$rootfs"/tmp/* "$rootfs"/dev/*

  log "importing $OFFLINE_BASE_IMAGE"
  tar --numeric-owner --xattrs --acls -C "$rootfs" -c . \
    | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --change "LABEL org.opencontainers.image.description=\"Debian $suite minbase from $DEBIAN_MIRROR (docker/offline/build-images.sh)\"" \
        --message "debootstrap --variant=minbase $suite" \
        - "$OFFLINE_BASE_IMAGE" >/dev/null
}

build_dockerfile() { # image context
  local image=$1 context=$2
  have_image "$OFFLINE_BASE_IMAGE" || die "$OFFLINE_BASE_IMAGE is missing; build 'base' first"
  local args=(--tag "$image" --build-arg "BASE_IMAGE=$OFFLINE_BASE_IMAGE" --progress plain)
  # A forced rebuild should fetch today's packages, not replay cached layers.
  ! $force || args+=(--no-cache)
  if [[ -n $BUILD_CA_BUNDLE ]]; then
    [[ -r $BUILD_CA_BUNDLE ]] || die "BUILD_CA_BUNDLE=$BUILD_CA_BUNDLE is not a readable file"
    args+=(--secret "id=ca_bundle,src=$BUILD_CA_BUNDLE")
  fi
  log "building $image"
  # Build output only matters when it fails; keep it for that case.
  local out
  out=$(mktemp "${TMPDIR:-/tmp}/offline-build.XXXXXX")
  if ! docker build "${args[@]}" "$context" >"$out" 2>&1; then
    tail -n 40 "$out" >&2
    if grep -qiE 'certificate|CERT_' "$out"; then
      log "hint: behind a TLS-inspecting proxy? Set BUILD_CA_BUNDLE to a PEM file with its CA."
    fi
    rm -f "$out"
    die "building $image failed"
  fi
  rm -f "$out"
}

for target in base postgres s3 prometheus; do
  [[ " ${targets[*]} " == *" $target "* ]] || continue
  case $target in
    base) image=$OFFLINE_BASE_IMAGE ;;
    postgres) image=$OFFLINE_POSTGRES_IMAGE ;;
    s3) image=$OFFLINE_S3_IMAGE ;;
    prometheus) image=$OFFLINE_PROMETHEUS_IMAGE ;;
  esac
  if ! needs_build "$image"; then
    log "$image exists, kept (--force rebuilds)"
    continue
  fi
  start=$SECONDS
  case $target in
    base) build_base ;;
    postgres) build_dockerfile "$image" "$here/postgres" ;;
    s3) build_dockerfile "$image" "$here/s3" ;;
    prometheus) build_dockerfile "$image" "$here/prometheus" ;;
  esac
  log "$image built in $((SECONDS - start)) s"
done

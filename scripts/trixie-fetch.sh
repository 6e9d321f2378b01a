# Sourced by scripts/k8s-tools.sh and scripts/monitoring-tools.sh: install one binary from a
# Debian trixie package without adding trixie to this machine's apt sources (a private apt
# state, as .ci/install-engine.sh fetches the Compose plugin). trixie's Go builds need only
# glibc, so they run on bookworm too.
#   install_from_trixie PACKAGE BINARY   -> /usr/local/bin/BINARY
install_from_trixie() {
  local package=$1 binary=$2 work sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  work=$(mktemp -d)
  mkdir -p "$work/sources" "$work/lists/partial" "$work/debs"
  echo "deb http://deb.debian.org/debian trixie main" >"$work/sources/trixie.list"
  local aptopts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/sources"
                 -o "Dir::State::Lists=$work/lists" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  apt-get "${aptopts[@]}" update -qq
  (cd "$work/debs" && apt-get "${aptopts[@]}" download "$package" >/dev/null)
  dpkg -x "$(echo "$work"/debs/"${package}"_*.deb)" "$work/root"
  $sudo install -m 0755 "$work/root/usr/bin/$binary" "/usr/local/bin/$binary"
  rm -rf "$work"
}

#!/bin/sh
# Node refuses to switch users while libuv may use io_uring (its CVE-2024-22017 guard, which
# always trips with Debian's libuv), so root hands the data directory over first and setpriv
# then starts the server as the s3 user, with no way back to root.
set -eu
if [ "$(id -u)" = 0 ]; then
  s3-server own-data "$@"
  exec setpriv --reuid=s3 --regid=s3 --init-groups --inh-caps=-all s3-server "$@"
fi
exec s3-server "$@"

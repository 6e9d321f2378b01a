#!/usr/bin/env bash
# Waits until mlflow-init has made the accounts, grants and experiments: `up --wait` returns
# once every long-running service is healthy, while this one-shot may still be working, and
# until it is done the trainer's and serving's logins do not exist yet. Exits non-zero, with
# its last log lines, if it failed or took longer than the deadline.
#   usage: scripts/wait-for-accounts.sh <the docker compose command, e.g. docker compose>
set -euo pipefail

[ $# -gt 0 ] || { echo "usage: $0 <docker compose command>" >&2; exit 2; }
compose=("$@")
deadline=$((SECONDS + ${ACCOUNTS_WAIT_SECONDS:-300}))
while :; do
  state=$("${compose[@]}" ps --all --format '{{.State}} {{.ExitCode}}' mlflow-init 2>/dev/null | head -n1)
  case "$state" in
    "exited 0") exit 0 ;;
    exited*)
      "${compose[@]}" logs --tail 20 mlflow-init >&2 || true
      echo "mlflow-init failed (${state#exited }): the service accounts were not made; its log is above" >&2
      exit 1 ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "mlflow-init did not finish within ${ACCOUNTS_WAIT_SECONDS:-300} s (${state:-not started})" >&2
    exit 1
  fi
  sleep 0.5
done

#!/usr/bin/env bash
# Replaces the stack's data with an archive written by scripts/backup.sh, or only checks one.
# Nothing changes until the archive is authenticated (BACKUP_KEY in .env) and both of its
# databases have loaded; tracking/restore.py says how. Asks first, unless CONFIRM=yes.
#   usage: scripts/restore.sh FILE             restore into the stack of ENV_FILE (default .env)
#          scripts/restore.sh --verify FILE    only check the archive
# BACKUP_DIR: where the safety backup of the stack as it was goes (default backups/).
# The host's python3 runs the tracking package from this checkout (standard library only).
root=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m tracking.restore "$@"

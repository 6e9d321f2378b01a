#!/usr/bin/env bash
# Writes one archive of the running stack's data; tracking/backup.py says what is in it.
#   usage: scripts/backup.sh [FILE]   -> FILE, or backups/<project>-<UTC time>.tar.gz
# BACKUP_DIR picks the directory. Which stack: ENV_FILE (default .env), where compose's own
# variables (COMPOSE_PROJECT_NAME, COMPOSE_FILE) win, as they do for docker compose.
# The host's python3 runs the tracking package from this checkout (standard library only).
root=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m tracking.backup "$@"

#!/usr/bin/env bash
# Stops the stack and deletes its volumes: every run, model, artifact and dataset. Asks
# first, unless CONFIRM=yes (for scripts).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/dotenv.sh
project=${COMPOSE_PROJECT_NAME:-}
echo "This deletes ALL data of the stack '${project:-mlops}': runs, models, artifacts, datasets."
if [ "${CONFIRM:-}" != yes ]; then
  if [ ! -t 0 ]; then echo "Refusing without a terminal; run with CONFIRM=yes." >&2; exit 2; fi
  read -r -p "Type the project name to confirm: " answer
  [ "$answer" = "${project:-mlops}" ] || { echo "Not confirmed; nothing deleted."; exit 1; }
fi
docker compose --profile train down --volumes --remove-orphans
echo "Deleted. .env is kept (its secrets match nothing now; they will be reused by the next 'make up')."

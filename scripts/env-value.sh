#!/usr/bin/env bash
# Prints one setting as compose would see it (the environment, then ENV_FILE), or DEFAULT.
#   usage: scripts/env-value.sh NAME [DEFAULT]          (make's env_value uses it)
. "$(dirname "$0")/dotenv.sh"
printf '%s' "${!1:-${2:-}}"

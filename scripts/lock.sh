#!/usr/bin/env bash
# Re-resolves every direct requirement in docker/requirements/*.txt into a fresh venv and
# writes the complete pin list to docker/requirements/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check -r docker/requirements/test.txt
{
  sed -n '1,/^# Regenerate/p' docker/requirements/constraints.txt
  "$tmp/venv/bin/pip" freeze --exclude-editable | sort -f
} >"$tmp/constraints.txt"
mv "$tmp/constraints.txt" docker/requirements/constraints.txt
echo "docker/requirements/constraints.txt updated; rebuild with 'make build'."

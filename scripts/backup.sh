#!/usr/bin/env bash
# Writes one archive of the running stack's data: both Postgres databases (pg_dump) and every
# object of the artifact bucket, with a manifest of counts and sha256 checksums. Secrets stay
# out of it: restoring needs only the target stack's own .env.
#   usage: scripts/backup.sh        -> backups/<project>-<UTC time>.tar.gz
# BACKUP_DIR picks the directory. Which stack: ENV_FILE (default .env), where compose's own
# variables (COMPOSE_PROJECT_NAME, COMPOSE_FILE) win, as they do for docker compose.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# Paths the caller gave are relative to where they called from, not to the repo.
absolute() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
env_file=$(absolute "${ENV_FILE:-$root/.env}")
backup_dir=$(absolute "${BACKUP_DIR:-$root/backups}")
cd "$root"
[ -f "$env_file" ] || { echo "No $env_file: run 'make up' first." >&2; exit 2; }
compose=(docker compose --env-file "$env_file")

setting() { # NAME DEFAULT: the environment first, then the env file, as compose reads them
  local value=${!1:-}
  [ -n "$value" ] || value=$(grep -E "^$1=" "$env_file" | tail -n1 | cut -d= -f2-)
  printf '%s' "${value:-$2}"
}
project=$(setting COMPOSE_PROJECT_NAME mlops)

running=$("${compose[@]}" ps --status running --services)
for service in postgres minio; do
  grep -qx "$service" <<<"$running" || {
    echo "The stack '$project' is not running ($service is down): 'make up' first; a backup reads from it." >&2
    exit 1
  }
done

# The archive holds password hashes and everything the team logged: readable by its owner only.
umask 077
mkdir -p "$backup_dir"
read -r created stamp < <(date -u '+%Y-%m-%dT%H:%M:%SZ %Y%m%dT%H%M%SZ')
archive="$backup_dir/$project-$stamp.tar.gz"
work=$(mktemp -d "$backup_dir/.backup-XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/archive"

# Local socket connections need no password, in the official image and in the stand-in.
in_postgres() { "${compose[@]}" exec -T postgres sh -c "$1" sh "${@:2}"; }
dump() { # DATABASE (empty: the tracking one) -> stdout
  # Uncompressed: the archive is gzipped as a whole, and stays searchable once unzipped.
  in_postgres 'pg_dump --format=custom --compress=0 -U "$POSTGRES_USER" -d "${1:-$POSTGRES_DB}"' "$1"
}
row_counts() { # DUMP -> "table rows" per table, counted in the dump itself, not the live database
  in_postgres 'pg_restore --data-only --file=-' <"$1" \
    | awk '/^COPY /{table=$2; rows=0; next} table!="" && $0=="\\."{print table, rows; table=""; next} table!=""{rows++}'
}

# Databases first, then objects: every artifact a dumped row can point at is in S3 by then.
echo "Backing up the stack '$project': databases..."
dump "" >"$work/archive/tracking.dump"
dump mlflow_auth >"$work/archive/auth.dump"
{ row_counts "$work/archive/tracking.dump"; row_counts "$work/archive/auth.dump"; } >"$work/rows"
# S3 is on the internal network only: a one-shot container of the mlflow image streams it out.
echo "...artifacts..."
"${compose[@]}" run --rm --no-deps -T --entrypoint python s3-init /opt/mlflow/bucket_archive.py export \
  >"$work/archive/bucket.tar"

python3 - "$work" "$project" "$created" <<'PY'
import hashlib, json, sys, tarfile
from pathlib import Path

work, project, created = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = dict(line.rsplit(" ", 1) for line in (work / "rows").read_text().splitlines())
with tarfile.open(work / "archive/bucket.tar") as bucket:
    index = json.load(bucket.extractfile("bucket.json"))

def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

tables = {"experiments": "experiments", "runs": "runs", "metric_rows": "metrics", "params": "params",
          "registered_models": "registered_models", "model_versions": "model_versions",
          "aliases": "registered_model_aliases", "users": "users"}
manifest = {
    "format": 1,
    "project": project,
    "created": created,
    "counts": {**{name: int(rows[f"public.{table}"]) for name, table in tables.items()},
               "objects": len(index["objects"])},
    "files": {p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
              for p in sorted((work / "archive").iterdir())},
    "bucket": index["bucket"],
    "objects": index["objects"],
}
(work / "archive/manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
PY

# Written under a temporary name, so an archive with the final name is always complete.
tar -C "$work/archive" -czf "$work/archive.tar.gz" manifest.json tracking.dump auth.dump bucket.tar
# The same check restore makes before it touches anything.
scripts/restore.sh --verify "$work/archive.tar.gz" >/dev/null
mv "$work/archive.tar.gz" "$archive"
python3 - "$archive" "$work/archive/manifest.json" <<'PY'
import json, os, sys

archive, manifest = sys.argv[1], json.load(open(sys.argv[2]))
print(f"Wrote {archive} ({os.path.getsize(archive) / 1e6:.1f} MB)")
print("  " + ", ".join(f"{name.replace('_', ' ')}: {count}" for name, count in manifest["counts"].items()))
PY

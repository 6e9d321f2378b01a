#!/usr/bin/env bash
# Writes one archive of the running stack's data: both Postgres databases (pg_dump) and every
# object of the artifact bucket, with a manifest of counts, versions and sha256 checksums,
# authenticated with BACKUP_KEY (HMAC-SHA256). Secrets stay out of it: restoring needs only
# the target stack's own .env, with the same BACKUP_KEY.
#   usage: scripts/backup.sh [FILE]   -> FILE, or backups/<project>-<UTC time>.tar.gz
# BACKUP_DIR picks the directory. Which stack: ENV_FILE (default .env), where compose's own
# variables (COMPOSE_PROJECT_NAME, COMPOSE_FILE) win, as they do for docker compose.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# Paths the caller gave are relative to where they called from, not to the repo.
absolute() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
[ $# -le 1 ] || { echo "usage: $0 [FILE]" >&2; exit 2; }
env_file=$(absolute "${ENV_FILE:-$root/.env}")
backup_dir=$(absolute "${BACKUP_DIR:-$root/backups}")
[ $# -eq 0 ] || { archive=$(absolute "$1"); backup_dir=$(dirname "$archive"); }
cd "$root"
[ -f "$env_file" ] || { echo "No $env_file: run 'make up' first." >&2; exit 2; }
compose=(docker compose --env-file "$env_file")

# The environment first, then the env file, as compose reads them. Only the manifest module
# and the check at the end read BACKUP_KEY, through their environment.
ENV_FILE=$env_file . scripts/dotenv.sh
project=${COMPOSE_PROJECT_NAME:-mlops}
[ -n "${BACKUP_KEY:-}" ] || { echo "BACKUP_KEY is not set in $env_file: run 'make env' to add it." >&2; exit 2; }

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
archive=${archive:-$backup_dir/$project-$stamp.tar.gz}
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
"${compose[@]}" run --rm --no-deps -T --entrypoint python s3-init -m tracking.bucket_archive export \
  >"$work/archive/bucket.tar"

# What wrote the data, so that a restore can tell whether its image can read it.
in_postgres 'psql -At -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c "SHOW server_version"' \
  >"$work/postgres_version"
in_postgres 'psql -At -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c "SELECT version_num FROM alembic_version"' \
  >"$work/tracking_schema"
in_postgres 'psql -At -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d mlflow_auth -c "SELECT version_num FROM alembic_version_auth"' \
  >"$work/auth_schema"
# In a one-off container of the tracking server: importing its code needs a writable /tmp.
"${compose[@]}" run --rm --no-deps -T --entrypoint python mlflow -m tracking.schema_info >"$work/image.json"
python3 -m tracking.backup_manifest write "$work" "$project" "$created"

# Written under a temporary name, so an archive with the final name is always complete.
tar -C "$work/archive" -czf "$work/archive.tar.gz" manifest.json manifest.json.hmac tracking.dump auth.dump bucket.tar
# The same check restore makes before it touches anything.
scripts/restore.sh --verify "$work/archive.tar.gz" >/dev/null
mv "$work/archive.tar.gz" "$archive"
python3 -m tracking.backup_manifest summary "$archive" "$work/archive/manifest.json"

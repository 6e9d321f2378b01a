#!/usr/bin/env bash
# Replaces the stack's data with an archive written by scripts/backup.sh: both databases and
# every object of the bucket. Every checksum is checked before anything is touched, and a
# damaged archive is refused. Asks first, unless CONFIRM=yes (for scripts).
#   usage: scripts/restore.sh FILE             restore into the stack of ENV_FILE (default .env)
#          scripts/restore.sh --verify FILE    only check the archive
# The stack may be fresh or hold data; afterwards this stack's .env is what logs in, not the
# passwords of the stack the backup came from.
set -euo pipefail
mode=restore
if [ "${1:-}" = --verify ]; then mode=verify; shift; fi
[ $# -eq 1 ] || { echo "usage: $0 [--verify] FILE" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
# Paths the caller gave are relative to where they called from, not to the repo.
absolute() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
file=$(absolute "$1")
env_file=$(absolute "${ENV_FILE:-$root/.env}")
cd "$root"
[ -f "$file" ] || { echo "No such file: $file" >&2; exit 2; }

# One streaming pass over the archive: every file against the manifest's sha256, and every
# object inside bucket.tar against its own. Prints four lines: the backup's project, its time,
# its counts for people, and the database counts as the check after restoring spells them.
info=$(python3 - "$file" <<'PY'
import hashlib, json, sys, tarfile, zlib

path = sys.argv[1]


def refuse(why):
    sys.exit(f"Refusing {path}: {why}. Nothing was changed.")


class Hashing:
    def __init__(self, stream):
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def read(self, size=-1):
        data = self.stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self):
        while self.read(1 << 20):
            pass
        return {"size": self.size, "sha256": self.digest.hexdigest()}


manifest = index = None
files, objects = {}, {}
try:
    with tarfile.open(path, "r|gz") as archive:
        for member in archive:
            if not member.isfile():
                refuse(f"unexpected entry {member.name!r}")
            stream = Hashing(archive.extractfile(member))
            if member.name == "manifest.json":
                manifest = json.loads(stream.read())
                continue
            if member.name == "bucket.tar":
                with tarfile.open(fileobj=stream, mode="r|") as bucket:
                    for item in bucket:
                        if item.name == "bucket.json":
                            index = json.load(bucket.extractfile(item))
                        else:
                            objects[item.name.removeprefix("objects/")] = Hashing(bucket.extractfile(item)).drain()
            files[member.name] = stream.drain()
except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as error:
    refuse(f"it is not a readable backup archive ({error})")

if manifest is None:
    refuse("it holds no manifest.json, so it was not written by scripts/backup.sh")
try:
    if manifest["format"] != 1:
        refuse(f"its format {manifest['format']!r} is not one this version reads")
    for name in sorted(files.keys() | manifest["files"].keys()):
        if name not in files:
            refuse(f"{name} is missing")
        if files[name] != manifest["files"].get(name):
            refuse(f"{name} does not match its checksum in manifest.json: the archive is damaged")
    expected = {o["key"]: {"size": o["size"], "sha256": o["sha256"]} for o in manifest["objects"]}
    damaged = sorted(k for k in expected.keys() | objects.keys() if expected.get(k) != objects.get(k))
    if damaged:
        refuse(f"{len(damaged)} objects in bucket.tar do not match their checksums, e.g. {damaged[0]}")
    if index is None or index["objects"] != manifest["objects"]:
        refuse("bucket.tar's own index does not match manifest.json")
    counts = manifest["counts"]
    print(manifest["project"], manifest["created"], sep="\n")
    print(", ".join(f"{name.replace('_', ' ')}: {count}" for name, count in counts.items()))
    print(" ".join(f"{name}={counts[name]}" for name in ("experiments", "runs", "metric_rows", "params",
          "registered_models", "model_versions", "aliases", "users")))
except (KeyError, TypeError, AttributeError) as error:
    refuse(f"its manifest.json is malformed ({error!r})")
PY
)
{ read -r backup_project; read -r backup_created; read -r backup_counts; read -r database_counts; } <<<"$info"
if [ $mode = verify ]; then
  printf '%s is intact: the stack %s as of %s\n  %s\n' "$file" "$backup_project" "$backup_created" "$backup_counts"
  exit 0
fi

[ -f "$env_file" ] || { echo "No $env_file: run 'make env' (or 'make up') first." >&2; exit 2; }
compose=(docker compose --env-file "$env_file")
project=${COMPOSE_PROJECT_NAME:-$(grep -E '^COMPOSE_PROJECT_NAME=' "$env_file" | tail -n1 | cut -d= -f2-)}
project=${project:-mlops}

echo "The archive is intact: the stack '$backup_project' as of $backup_created"
echo "  $backup_counts"
echo "Restoring it REPLACES ALL data of the stack '$project': runs, models, artifacts, users."
if [ "${CONFIRM:-}" != yes ]; then
  if [ ! -t 0 ]; then echo "Refusing without a terminal; run with CONFIRM=yes." >&2; exit 2; fi
  read -r -p "Type the project name to confirm: " answer
  [ "$answer" = "$project" ] || { echo "Not confirmed; nothing changed."; exit 1; }
fi

trap 'status=$?; [ $status -eq 0 ] || echo "The restore stopped before it finished; the stack is not serving.
Fix what the lines above name, then run the restore again: it starts over from the archive." >&2' EXIT

# Nothing may write while the data is replaced: every service except the two stores stops.
started=$(date +%s)
apps=()
while read -r service; do
  [[ $service =~ ^(postgres|minio)$ ]] || apps+=("$service")
done < <("${compose[@]}" config --services)
echo "Stopping ${apps[*]}..."
"${compose[@]}" stop "${apps[@]}"
"${compose[@]}" up -d --wait --wait-timeout 300 postgres minio

# Local socket connections need no password, in the official image and in the stand-in.
in_postgres() { "${compose[@]}" exec -T postgres sh -c "$1" sh "${@:2}"; }
# Drops the database $1 (empty: the tracking one) and recreates it from the dump on stdin,
# owned by this stack's user whoever owned it in the backup.
replace_database='set -eu
db=${1:-$POSTGRES_DB}
psql -q -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d template1 -v db="$db" <<SQL
SET client_min_messages = warning;
DROP DATABASE IF EXISTS :"db" WITH (FORCE);
CREATE DATABASE :"db";
SQL
pg_restore --exit-on-error --no-owner --no-privileges -U "$POSTGRES_USER" -d "$db"'
echo "Restoring the databases..."
tar -xzOf "$file" tracking.dump | in_postgres "$replace_database" ""
tar -xzOf "$file" auth.dump | in_postgres "$replace_database" mlflow_auth

# The restored rows must be exactly the ones the backup counted.
restored=$(in_postgres 'psql -At -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB"' <<'SQL'
SELECT concat_ws(' ',
  'experiments=' || (SELECT count(*) FROM experiments),
  'runs=' || (SELECT count(*) FROM runs),
  'metric_rows=' || (SELECT count(*) FROM metrics),
  'params=' || (SELECT count(*) FROM params),
  'registered_models=' || (SELECT count(*) FROM registered_models),
  'model_versions=' || (SELECT count(*) FROM model_versions),
  'aliases=' || (SELECT count(*) FROM registered_model_aliases))
SQL
)
restored+=" users=$(in_postgres 'psql -At -U "$POSTGRES_USER" -d mlflow_auth -c "SELECT count(*) FROM users"')"
if [ "$restored" != "$database_counts" ]; then
  echo "The restored databases hold $restored; the backup counted $database_counts." >&2
  exit 1
fi

# S3 is on the internal network only: a one-shot container of the mlflow image streams it in,
# then reads every object back against its checksum.
echo "Restoring the artifacts..."
tar -xzOf "$file" bucket.tar \
  | "${compose[@]}" run --rm --no-deps -T --entrypoint python s3-init /opt/mlflow/bucket_archive.py import
# The backup's admin password hash came with the auth database; this stack's .env wins. In a
# one-off container of the tracking server: MLflow's server code needs its writable /tmp.
"${compose[@]}" run --rm --no-deps -T --entrypoint python mlflow /opt/mlflow/reset_admin.py

# The tracking server upgrades the restored schema before it serves; mlflow-init re-applies
# the trainer's and serving's passwords from .env.
echo "Starting the stack..."
"${compose[@]}" up -d --wait --wait-timeout 600 || { "${compose[@]}" ps -a; "${compose[@]}" logs --tail 40; exit 1; }
echo "Restored the stack '$backup_project' as of $backup_created into '$project' in $(( $(date +%s) - started )) s."

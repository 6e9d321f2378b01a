#!/usr/bin/env bash
# Runs PostgreSQL with the official postgres image's contract: POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB (each also as *_FILE), POSTGRES_INITDB_ARGS, POSTGRES_INITDB_WALDIR,
# POSTGRES_HOST_AUTH_METHOD, PGDATA, and /docker-entrypoint-initdb.d on first start only.
set -Eeuo pipefail

log() { printf '%s entrypoint: %s\n' "$(date -u +'%Y-%m-%d %H:%M:%S UTC')" "$*" >&2; }

# VAR or VAR_FILE (a Docker secret), never both; the result lands in VAR.
read_setting() { # name default
  local name=$1 default=${2:-} file_name="${1}_FILE"
  if [[ -n ${!name:-} && -n ${!file_name:-} ]]; then
    log "error: set $name or $file_name, not both"
    exit 1
  fi
  local value=$default
  if [[ -n ${!name:-} ]]; then
    value=${!name}
  elif [[ -n ${!file_name:-} ]]; then
    value=$(<"${!file_name}")
  fi
  export "$name=$value"
  unset "$file_name"
}

run_init_scripts() {
  local f
  shopt -s nullglob
  for f in /docker-entrypoint-initdb.d/*; do
    case $f in
      *.sh)
        # Executable scripts run on their own; others are sourced, so they can use our variables.
        if [[ -x $f ]]; then log "running $f"; "$f"; else log "sourcing $f"; . "$f"; fi ;;
      *.sql) log "running $f"; psql_init -f "$f" ;;
      *.sql.gz) log "running $f"; gzip -dc "$f" | psql_init ;;
      *) log "ignoring $f (only *.sh, *.sql and *.sql.gz run)" ;;
    esac
  done
  shopt -u nullglob
}

psql_init() { psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" "$@"; }

initialise() {
  read_setting POSTGRES_USER postgres
  read_setting POSTGRES_PASSWORD
  read_setting POSTGRES_DB "$POSTGRES_USER"
  read_setting POSTGRES_INITDB_ARGS
  local auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}

  if [[ -z $POSTGRES_PASSWORD && $auth != trust ]]; then
    cat >&2 <<'MSG'
error: PGDATA holds no database yet, and no password is set for its superuser.
  Set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) to a non-empty value; network clients
  log in with it. POSTGRES_HOST_AUTH_METHOD=trust lets any network client in without a
  password instead; keep that for throwaway databases.
MSG
    exit 1
  fi
  [[ $auth != trust ]] || log "warning: POSTGRES_HOST_AUTH_METHOD=trust, network clients need no password"

  log "initialising a new database in $PGDATA"
  local args=(--username="$POSTGRES_USER") pwfile=
  if [[ -n $POSTGRES_PASSWORD ]]; then
    # A file readable by postgres only, so the password never shows in a process list.
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    args+=(--pwfile="$pwfile")
  fi
  [[ -z ${POSTGRES_INITDB_WALDIR:-} ]] || args+=(--waldir="$POSTGRES_INITDB_WALDIR")
  # Shell words, so that quoted values in POSTGRES_INITDB_ARGS keep their spaces.
  eval 'initdb "${args[@]}" '"$POSTGRES_INITDB_ARGS"
  [[ -z $pwfile ]] || rm -f "$pwfile"

  # Inside the container (socket, localhost) initdb's trust stays; everyone else needs a password.
  printf '\n# network clients (docker-entrypoint.sh)\nhost all all all %s\n' "$auth" >>"$PGDATA/pg_hba.conf"

  # A server on the socket only: nothing can connect before the init scripts have run.
  export PGPASSWORD=${PGPASSWORD:-$POSTGRES_PASSWORD}
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
  if [[ $POSTGRES_DB != postgres ]]; then
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres \
      --set db="$POSTGRES_DB" <<'SQL'
SELECT format('CREATE DATABASE %I', :'db') WHERE NOT EXISTS
  (SELECT FROM pg_database WHERE datname = :'db')\gexec
SQL
  fi
  run_init_scripts
  pg_ctl -D "$PGDATA" -m fast -w stop
  unset PGPASSWORD
  log "initialisation done"
}

# `docker run image -c shared_buffers=1GB` means options for the server.
if [[ ${1:-} == -* ]]; then set -- postgres "$@"; fi

# Anything else (bash, psql, pg_dump ...) runs as given.
[[ ${1:-} == postgres ]] || exec "$@"

export PGDATA=${PGDATA:-/var/lib/postgresql/data}

if ((EUID == 0)); then
  # Fresh volumes (and bind mounts) arrive owned by root: hand them over, then drop to postgres.
  mkdir -p "$PGDATA"
  find "$PGDATA" \! -user postgres -exec chown postgres:postgres {} +
  chmod 0700 "$PGDATA"
  install -d -o postgres -g postgres -m 3777 /var/run/postgresql
  exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

# PG_VERSION is the last file a complete initdb writes; without it the directory holds no cluster.
if [[ ! -s $PGDATA/PG_VERSION ]]; then
  initialise
else
  log "$PGDATA already holds a database, starting it as is"
fi

exec "$@"

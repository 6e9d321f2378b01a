#!/usr/bin/env bash
# Writes .env from .env.example, or completes an existing one. Every empty secret gets a
# fresh random value; nothing already set is ever changed, so re-running is safe and an
# upgrade that adds settings only appends them.
#   usage: scripts/env.sh [ENV_FILE]      (OFFLINE=1 forces the no-registry files)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-.env}
example=.env.example
secrets_re='^(POSTGRES_PASSWORD|MLFLOW_DB_PASSWORD|OPTUNA_DB_PASSWORD|S3_ACCESS_KEY|S3_SECRET_KEY|S3_APP_ACCESS_KEY|S3_APP_SECRET_KEY|MLFLOW_ADMIN_PASSWORD|MLFLOW_FLASK_SERVER_SECRET_KEY|TRAINER_PASSWORD|SERVING_PASSWORD|SERVING_CLIENT_PASSWORD|SERVING_METRICS_TOKEN|MONITORING_PASSWORD|PREDICTION_LOG_PASSWORD|BACKUP_KEY)$'

random_secret() {
  # 32 url-safe characters: strong, and safe inside URLs and .env without quoting.
  python3 -c 'import secrets; print(secrets.token_urlsafe(24))'
}

signing_pair() {
  # An ECDSA P-256 key pair for model signing, each PEM as one base64 line so that .env
  # stays KEY=VALUE. Prints "PRIVATE PUBLIC".
  local private
  private=$(openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 2>/dev/null) \
    || { echo "make env: openssl could not generate the model signing key" >&2; exit 1; }
  printf '%s %s\n' "$(printf '%s\n' "$private" | base64 -w0)" \
    "$(printf '%s\n' "$private" | openssl pkey -pubout 2>/dev/null | base64 -w0)"
}

created=""
if [ ! -f "$target" ]; then
  # Start from the example as a whole, so .env keeps its comments.
  (umask 077 && cp "$example" "$target")
  created=1
fi
chmod 600 "$target"

added=()
generated=()
while IFS= read -r line; do
  [[ "$line" =~ ^([A-Z0-9_]+)=(.*)$ ]] || continue
  name=${BASH_REMATCH[1]}
  value=${BASH_REMATCH[2]}
  if grep -q "^${name}=" "$target"; then
    current=$(grep "^${name}=" "$target" | tail -n1 | cut -d= -f2-)
    if [ -z "$current" ] && [[ "$name" =~ $secrets_re ]]; then
      sed -i "s|^${name}=.*|${name}=$(random_secret)|" "$target"
      generated+=("$name")
    fi
    continue
  fi
  if [[ "$name" =~ $secrets_re ]] && [ -z "$value" ]; then
    value=$(random_secret)
    generated+=("$name")
  fi
  printf '%s=%s\n' "$name" "$value" >>"$target"
  added+=("$name")
done <"$example"

# Defaults that a release replaced: a .env written by an older release still holds them, and
# keeping one would keep what the new release fixed (the S3 stand-in without SigV4 checks).
retired_defaults=("OFFLINE_S3_IMAGE=mlops-local/s3:s3rver-3.7.1")
for retired in "${retired_defaults[@]}"; do
  name=${retired%%=*}
  if grep -qxF "$retired" "$target"; then
    current=$(grep "^${name}=" "$example" | tail -n1 | cut -d= -f2-)
    sed -i "s|^${name}=.*|${name}=${current}|" "$target"
    echo "Updated $name in $target to this release's default: $current"
  fi
done

# The model signing pair: both halves are made together, and only when the private key is
# missing; a public key alone is never replaced, since serving trusts whatever it holds.
current_key=$(grep '^MODEL_SIGNING_KEY=' "$target" | tail -n1 | cut -d= -f2-)
current_pub=$(grep '^MODEL_SIGNING_PUBLIC_KEY=' "$target" | tail -n1 | cut -d= -f2-)
if grep -q '^MODEL_SIGNING_KEY=' "$target" && [ -z "$current_key" ] && [ -z "$current_pub" ]; then
  read -r private public < <(signing_pair)
  sed -i "s|^MODEL_SIGNING_KEY=.*|MODEL_SIGNING_KEY=${private}|" "$target"
  sed -i "s|^MODEL_SIGNING_PUBLIC_KEY=.*|MODEL_SIGNING_PUBLIC_KEY=${public}|" "$target"
  generated+=(MODEL_SIGNING_KEY MODEL_SIGNING_PUBLIC_KEY)
fi

registry_reachable() {
  # A registry that answers lets compose pull the upstream images; behind an air gap it
  # hangs or fails, and the local stand-ins are the way to run.
  command -v docker >/dev/null 2>&1 || return 1
  local image
  image=$(grep '^POSTGRES_IMAGE=' "$target" | cut -d= -f2-)
  docker image inspect "$image" >/dev/null 2>&1 && return 0
  timeout 20 docker pull -q "$image" >/dev/null 2>&1
}

if [ -n "$created" ]; then
  if [ "${OFFLINE:-}" = 1 ] || { [ "${OFFLINE:-}" != 0 ] && ! registry_reachable; }; then
    sed -i 's|^COMPOSE_FILE=.*|COMPOSE_FILE=compose.yaml:compose.offline.yaml|' "$target"
    # Every image we build (the optional TLS proxy too) starts from the local Debian base.
    offline_base=$(grep '^OFFLINE_BASE_IMAGE=' "$target" | cut -d= -f2-)
    sed -i "s|^BASE_IMAGE=.*|BASE_IMAGE=${offline_base}|" "$target"
    echo "No container registry reachable (or OFFLINE=1): .env uses local stand-in images (compose.offline.yaml)."
  fi
  echo "Wrote $target from $example with fresh random secrets (mode 600): ${generated[*]}"
  echo "The MLflow admin login is MLFLOW_ADMIN_USERNAME / MLFLOW_ADMIN_PASSWORD in $target."
elif [ ${#added[@]} -gt 0 ] || [ ${#generated[@]} -gt 0 ]; then
  [ ${#added[@]} -gt 0 ] && echo "Added to $target: ${added[*]}"
  [ ${#generated[@]} -gt 0 ] && echo "Generated secrets in $target: ${generated[*]}"
fi
exit 0

#!/usr/bin/env bash
# Creates the stack's Secrets in NAMESPACE from the settings of ENV_FILE (default .env, made
# by `make env`): the same values the compose stack uses. Nothing is written to disk.
#   usage: deploy/kubernetes/create-secrets.sh NAMESPACE [--with-stores]
# --with-stores: also the S3 root key, which only a dev cluster's MinIO and s3-init read
# (prod: create mlops-s3-root from your provider's admin key, README.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
ns=${1:?usage: $0 NAMESPACE [--with-stores]}
v() { "$root/scripts/env-value.sh" "$1"; }

for name in POSTGRES_PASSWORD MLFLOW_DB_PASSWORD OPTUNA_DB_PASSWORD S3_APP_ACCESS_KEY S3_APP_SECRET_KEY MLFLOW_ADMIN_PASSWORD \
            MLFLOW_FLASK_SERVER_SECRET_KEY TRAINER_PASSWORD SERVING_PASSWORD MONITORING_PASSWORD PREDICTION_LOG_PASSWORD \
            SERVING_METRICS_TOKEN MODEL_SIGNING_KEY MODEL_SIGNING_PUBLIC_KEY; do
  [ -n "$(v "$name")" ] || { echo "create-secrets: $name is empty in ${ENV_FILE:-.env}; run 'make env'" >&2; exit 1; }
done

secret() {  # NAME KEY=SETTING...: one generic Secret, replaced if it exists
  local name=$1; shift
  local args=()
  for pair in "$@"; do args+=("--from-literal=${pair%%=*}=$(v "${pair#*=}")"); done
  kubectl --namespace "$ns" create secret generic "$name" "${args[@]}" --dry-run=client -o yaml \
    | kubectl --namespace "$ns" apply -f - >/dev/null
  echo "create-secrets: $ns/$name"
}

secret mlops-postgres-superuser POSTGRES_PASSWORD=POSTGRES_PASSWORD
secret mlops-db-app MLFLOW_DB_PASSWORD=MLFLOW_DB_PASSWORD
secret mlops-db-optuna OPTUNA_DB_PASSWORD=OPTUNA_DB_PASSWORD
secret mlops-s3-app S3_APP_ACCESS_KEY=S3_APP_ACCESS_KEY S3_APP_SECRET_KEY=S3_APP_SECRET_KEY
secret mlops-mlflow-admin MLFLOW_ADMIN_PASSWORD=MLFLOW_ADMIN_PASSWORD
secret mlops-mlflow-server MLFLOW_FLASK_SERVER_SECRET_KEY=MLFLOW_FLASK_SERVER_SECRET_KEY
secret mlops-trainer-account TRAINER_PASSWORD=TRAINER_PASSWORD
secret mlops-serving-account SERVING_PASSWORD=SERVING_PASSWORD
secret mlops-monitoring-account MONITORING_PASSWORD=MONITORING_PASSWORD
secret mlops-prediction-log-account PREDICTION_LOG_PASSWORD=PREDICTION_LOG_PASSWORD
secret mlops-serving-metrics SERVING_METRICS_TOKEN=SERVING_METRICS_TOKEN
secret mlops-model-signing MODEL_SIGNING_KEY=MODEL_SIGNING_KEY
secret mlops-model-signing-public MODEL_SIGNING_PUBLIC_KEY=MODEL_SIGNING_PUBLIC_KEY
if [ "${2:-}" = "--with-stores" ]; then
  secret mlops-s3-root S3_ACCESS_KEY=S3_ACCESS_KEY S3_SECRET_KEY=S3_SECRET_KEY
fi

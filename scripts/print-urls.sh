#!/usr/bin/env bash
# What `make up` prints once every service is healthy.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/dotenv.sh
value() { printf '%s' "${!1:-}"; }
bind=$(value BIND_ADDRESS); bind=${bind:-127.0.0.1}
host=$bind; [ "$host" = 0.0.0.0 ] && host=$(hostname -f 2>/dev/null || hostname)
cat <<MSG

The stack is up.
  Tracking UI and API : http://$host:$(value MLFLOW_PORT)   (log in as $(value MLFLOW_ADMIN_USERNAME); password: MLFLOW_ADMIN_PASSWORD in .env)
  Model endpoint      : http://$host:$(value SERVING_PORT)/invocations   (serves models:/$(value MODEL_NAME)@$(value MODEL_ALIAS))
  Credentials         : .env (mode 600): admin, trainer and serving users, Postgres and S3 keys
$(if [[ "$(value COMPOSE_FILE)" == *compose.tls.yaml* ]]; then
  echo "  Over TLS (team)     : https://$(value TLS_HOSTNAME):$(value MLFLOW_TLS_PORT)   and   https://$(value TLS_HOSTNAME):$(value SERVING_TLS_PORT)/invocations"
fi)
$(if [[ ",${COMPOSE_PROFILES:-}," == *,monitoring,* ]]; then
  echo "  Prometheus          : http://$host:$(value PROMETHEUS_PORT)/alerts   (MONITORING=1; monitoring/README.md)"
fi)

Next: docker compose run trainer      (or: make train ARGS="--epochs 5")
      make predict                    (sends real test images once a model holds @$(value MODEL_ALIAS))
MSG

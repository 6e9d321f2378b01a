#!/bin/sh
# Check the Prometheus configuration and alert rules, and run the alerts' unit tests.
#   monitoring/promtool-test.sh [PATH_TO_PROMTOOL]      (default: promtool on PATH)
# The configuration is checked for syntax only: its credentials files exist only inside
# the Prometheus container.
set -eu
promtool=${1:-promtool}
here=$(dirname "$0")
if ! command -v "$promtool" >/dev/null 2>&1; then
  echo "promtool-test.sh: no promtool at '$promtool'; give its path (Prometheus 2.53's promtool)" >&2
  exit 2
fi
"$promtool" check config --syntax-only "$here/prometheus.yml"
"$promtool" check rules "$here"/rules/*.yml
"$promtool" test rules "$here"/tests/*.yml

#!/bin/sh
# Healthy when TLS is served on both ports and the tracking server answers through it.
# -k: this checks that the proxy works, not whether clients trust its certificate.
set -eu
curl -fsSk --max-time 5 -o /dev/null https://127.0.0.1:8443/health
# Any HTTP answer will do here (401 with serving auth on, 503 before a model exists);
# curl fails only when the TLS listener itself is down.
curl -sSk --max-time 5 -o /dev/null https://127.0.0.1:8444/ping

#!/usr/bin/env bash
# End to end on a throwaway kind cluster: the stack's images loaded into it, the kind overlay
# (dev with the offline stand-in stores) deployed with deploy/kubernetes/deploy.sh, one
# training Job on generated data, then a prediction from the model endpoint.
# Needs docker, kind, kubectl, kustomize, the images of `make build` and `make offline-images`
# and a .env (`make env`). Where kind or its node image cannot be had (no container registry),
# it stops at once with one line and exit status 2, having started nothing.
# KEEP_CLUSTER=1 leaves the cluster running for a look around.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER_NAME:-mlops-e2e}
# kind 0.27 (Debian trixie) defaults to this node image.
NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.32.2}
OVERLAY=deploy/kubernetes/overlays/kind
NS=mlops
IMAGES=(mlops/mlflow:dev mlops/serving:dev mlops/trainer:dev mlops-local/postgres:17 mlops-local/s3:s3rver-3.7.1-sigv4)
cannot() { echo "k8s-e2e: not run: $*" >&2; exit 2; }
fail() { echo "k8s-e2e: FAILED: $*" >&2; exit 1; }

for tool in docker kind kubectl kustomize; do
  command -v "$tool" >/dev/null 2>&1 || cannot "$tool is not installed (kind: Debian's 'kind' package; kustomize: scripts/k8s-tools.sh)"
done
docker info >/dev/null 2>&1 || cannot "no Docker engine answers"
if ! docker image inspect "$NODE_IMAGE" >/dev/null 2>&1 \
   && ! timeout 30 docker pull -q "$NODE_IMAGE" >/dev/null 2>&1; then
  cannot "kind's node image $NODE_IMAGE is not on this machine and cannot be pulled (no container registry); set KIND_NODE_IMAGE to one you have"
fi
for image in "${IMAGES[@]}"; do
  docker image inspect "$image" >/dev/null 2>&1 || cannot "image $image is missing; run 'make build' and 'make offline-images'"
done
[ -f "${ENV_FILE:-.env}" ] || cannot "${ENV_FILE:-.env} is missing; run 'make env'"

kind create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --wait 180s
if [ "${KEEP_CLUSTER:-}" != 1 ]; then trap 'kind delete cluster --name "$CLUSTER" >/dev/null 2>&1' EXIT; fi
kubectl config use-context "kind-$CLUSTER" >/dev/null
for image in "${IMAGES[@]}"; do kind load docker-image --name "$CLUSTER" "$image"; done

kubectl get namespace "$NS" >/dev/null 2>&1 || kubectl create namespace "$NS"
deploy/kubernetes/create-secrets.sh "$NS" --with-stores
deploy/kubernetes/deploy.sh "$OVERLAY"
deploy/kubernetes/deploy.sh "$OVERLAY" train

# Serving is Ready only once it serves the model the trainer just promoted.
kubectl -n "$NS" rollout status deployment/serving --timeout=600s || fail "serving never became ready"
kubectl -n "$NS" port-forward service/serving 18080:8080 >/dev/null 2>&1 &
forward=$!
trap 'kill "$forward" 2>/dev/null; [ "${KEEP_CLUSTER:-}" = 1 ] || kind delete cluster --name "$CLUSTER" >/dev/null 2>&1' EXIT
body=$(python3 -c 'import json; print(json.dumps({"inputs": [[[[0.0] * 28] * 28]]}))')
deadline=$((SECONDS + 60))
until answer=$(curl -fsS -H 'Content-Type: application/json' -d "$body" http://127.0.0.1:18080/invocations 2>/dev/null); do
  [ $SECONDS -lt $deadline ] || fail "the model endpoint did not answer through port-forward within 60 s"
  sleep 1
done
python3 -c 'import json, sys; p = json.loads(sys.argv[1])["predictions"]; assert len(p) == 1 and len(p[0]) == 10, p' "$answer" \
  || fail "unexpected answer from /invocations: $answer"
echo "k8s-e2e: kind cluster $CLUSTER trained a model and served a prediction: ${answer:0:120}"

#!/usr/bin/env bash
# Applies an overlay in the order compose's depends_on gives: the stores and the one-shot jobs
# (db-init, s3-init, the schema upgrade) to completion first, then the tracking server, serving
# and mlflow-init; the trainer only when asked.
#   usage: deploy/kubernetes/deploy.sh OVERLAY_DIR          deploy or upgrade the stack
#          deploy/kubernetes/deploy.sh OVERLAY_DIR train    run one training Job to its end
# Needs kustomize and kubectl pointed at the cluster; the Secrets must exist (README.md).
set -euo pipefail

die() { echo "deploy: $*" >&2; exit 1; }
[ $# -ge 1 ] && [ -d "$1" ] || die "usage: $0 OVERLAY_DIR [train]"
overlay=$1 action=${2:-deploy}
command -v kustomize >/dev/null || die "kustomize not found; scripts/k8s-tools.sh installs it"
command -v kubectl >/dev/null || die "kubectl not found"
WAIT=${DEPLOY_WAIT:-600s}

rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
kustomize build "$overlay" >"$rendered"
ns=$(awk '/^kind: Namespace/{f=1} f && /^  name:/{print $2; exit}' "$rendered")
ns=${ns:-mlops}
k() { kubectl --namespace "$ns" "$@"; }

# Waits for a Job; on failure its logs say why, not a bare timeout.
wait_job() {
  if ! k wait --for=condition=complete "job/$1" --timeout="$WAIT"; then
    k logs "job/$1" --all-containers --tail=50 >&2 || true
    die "job $1 did not complete"
  fi
}

case $action in
  deploy)
    # A Job's pod template cannot change; the one-shot jobs are made anew for each version.
    k delete job db-init s3-init schema-upgrade mlflow-init --ignore-not-found --wait=true
    kubectl apply -l mlops.stack/phase=prepare -f "$rendered"
    for sts in postgres minio; do
      if k get statefulset "$sts" >/dev/null 2>&1; then k rollout status "statefulset/$sts" --timeout="$WAIT"; fi
    done
    for job in db-init s3-init schema-upgrade; do wait_job "$job"; done
    kubectl apply -l 'mlops.stack/phase notin (train,train-multinode)' -f "$rendered"
    k rollout status deployment/mlflow --timeout="$WAIT"
    wait_job mlflow-init
    echo "deploy: the stack runs in namespace $ns; train with: $0 $overlay train"
    ;;
  train)
    k delete job trainer --ignore-not-found --wait=true
    kubectl apply -l mlops.stack/phase=train -f "$rendered"
    wait_job trainer
    k logs job/trainer --tail=20
    ;;
  *) die "unknown action '$action' (deploy or train)" ;;
esac

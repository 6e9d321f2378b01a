#!/usr/bin/env bash
# Static checks of deploy/kubernetes: every overlay renders with kustomize, every rendered
# resource validates against the schema of a current Kubernetes minor (kubernetes-validate,
# strict), and checkov passes every check but the ones deploy/kubernetes/checkov.yaml skips
# with a reason. The rendered YAML stays in build/k8s/ (the unit tests read it too).
# Tools: scripts/k8s-tools.sh. Exits non-zero with one line saying what failed.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=${KUBERNETES_VERSION:-1.37.0}
VENV=.k8s-venv
OUT=build/k8s
fail() { echo "k8s-check: $*" >&2; exit 1; }

command -v kustomize >/dev/null || fail "kustomize is not installed; run scripts/k8s-tools.sh"
[ -x "$VENV/bin/kubernetes-validate" ] && [ -x "$VENV/bin/checkov" ] \
  || fail "kubernetes-validate/checkov are not in $VENV; run scripts/k8s-tools.sh"

rm -rf "$OUT"
mkdir -p "$OUT"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

overlays=()
for dir in deploy/kubernetes/overlays/*/; do
  name=$(basename "$dir")
  kustomize build "$dir" >"$OUT/$name.yaml" 2>"$log" \
    || fail "overlay $name does not render: $(tail -n1 "$log")"
  overlays+=("$name")
done
[ ${#overlays[@]} -gt 0 ] || fail "no overlay found under deploy/kubernetes/overlays"

for name in "${overlays[@]}"; do
  "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn -k "$KUBERNETES_VERSION" "$OUT/$name.yaml" >"$log" 2>&1 \
    || fail "overlay $name does not validate against Kubernetes $KUBERNETES_VERSION: $(grep -m1 ERROR "$log" || tail -n1 "$log")"
done

if ! "$VENV/bin/checkov" -d "$OUT" --config-file deploy/kubernetes/checkov.yaml >"$log" 2>&1; then
  cat "$log" >&2
  fail "checkov: $(grep -m1 -o 'Failed checks: [0-9]*' "$log" || echo 'did not finish') (above; fix, or skip with a reason in deploy/kubernetes/checkov.yaml)"
fi

echo "k8s-check: ${#overlays[@]} overlays (${overlays[*]}) render, validate against Kubernetes $KUBERNETES_VERSION and pass checkov"

#!/usr/bin/env bash
# Checks what the stack needs from this machine and says how to fix what is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
failures=0
ok()   { printf '  ok    %s\n' "$*"; }
bad()  { printf '  FAIL  %s\n' "$*"; failures=$((failures + 1)); }
warn() { printf '  warn  %s\n' "$*"; }
. scripts/dotenv.sh
value() { printf '%s' "${!1:-}"; }

echo "Checking this machine for the stack:"
if ! command -v docker >/dev/null; then
  bad "docker CLI not found (install Docker Engine, or run .ci/install-engine.sh on Debian)"
elif ! docker info >/dev/null 2>&1; then
  bad "Docker engine not reachable (is dockerd running? are you in the docker group?)"
else
  ok "Docker engine $(docker version --format '{{.Server.Version}}')"
fi

compose=$(docker compose version --short 2>/dev/null | sed 's/^v//')
if [ -z "$compose" ]; then
  bad "Compose v2 plugin missing ('docker compose'); the old docker-compose v1 does not work"
elif [ "$(printf '%s\n2.24.0\n' "$compose" | sort -V | head -n1)" != 2.24.0 ]; then
  bad "Compose $compose is too old; 2.24 or newer is needed"
else
  ok "Compose $compose"
fi
docker buildx version >/dev/null 2>&1 && ok "buildx $(docker buildx version | awk '{print $2}')" \
  || bad "buildx plugin missing (BuildKit builds with secrets need it)"

root=$(docker info --format '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)
[ -d "$root" ] || root=/
free_gb=$(df -Pk "$root" | awk 'NR==2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt 20 ]; then
  bad "only ${free_gb} GB free under $root; images and caches need about 20 GB"
else
  ok "${free_gb} GB free under $root"
fi

for name in MLFLOW_PORT SERVING_PORT; do
  port=$(value "$name"); port=${port:-$([ $name = MLFLOW_PORT ] && echo 5000 || echo 5001)}
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    owner=$(docker ps --filter "publish=$port" --format '{{.Names}}' 2>/dev/null | head -n1)
    if [ -n "$owner" ]; then ok "port $port ($name) is used by container $owner"
    else bad "port $port ($name) is in use by another program; set $name in .env"; fi
  else
    ok "port $port ($name) is free"
  fi
done

if [ "${GPU:-0}" = 1 ]; then
  if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
    ok "NVIDIA container runtime registered with Docker"
  else
    bad "no NVIDIA runtime in 'docker info' (install nvidia-container-toolkit, then 'nvidia-ctk runtime configure')"
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi -L | sed 's/^/  ok    /' || bad "nvidia-smi not found: no NVIDIA driver on this machine"
fi

[ -f .env ] && ok ".env present (mode $(stat -c %a .env))" || warn ".env missing: 'make env' or 'make up' writes it"
if [ "$failures" -gt 0 ]; then echo "$failures problem(s) found."; exit 1; fi
echo "All good."

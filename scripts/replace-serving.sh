#!/usr/bin/env bash
# Replaces the running serving container with one of the current image and settings without
# failing a request, when either changed (an upgrade, a new .env value). `make up` runs it
# before bringing the rest of the stack up; compose alone would stop the old container
# before starting the new one.
#   usage: scripts/replace-serving.sh <the docker compose command, e.g. docker compose>
# How: a second serving container starts beside the old one, and the gateway (which asks
# Docker's DNS every second) sends requests to both; once the new one serves the model, the
# old one stops gracefully (requests in flight finish) and is removed.
set -euo pipefail

[ $# -gt 0 ] || { echo "usage: $0 <docker compose command>" >&2; exit 2; }
compose=("$@")
log() { echo "replace-serving: $*" >&2; }

running=$("${compose[@]}" ps --quiet --status running serving)
[ -n "$running" ] || exit 0  # nothing to replace: `up` starts it
if [ "$(wc -l <<<"$running")" -ne 1 ]; then
  log "more than one serving container runs; leaving them to compose"
  exit 0
fi
old=$running

# Compose recreates a container when its configuration hash or its image differs.
wanted_hash=$("${compose[@]}" config --hash serving | awk '{print $2}')
image=$("${compose[@]}" config --images | grep -m1 '/serving:' || true)
wanted_image=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
if [ "$(docker inspect --format '{{index .Config.Labels "com.docker.compose.config-hash"}}' "$old")" = "$wanted_hash" ] \
   && { [ -z "$wanted_image" ] || [ "$(docker inspect --format '{{.Image}}' "$old")" = "$wanted_image" ]; }; then
  exit 0
fi

was_serving=no
docker exec "$old" python -m serving.healthcheck --serving >/dev/null 2>&1 && was_serving=yes
log "starting a new serving container beside $(docker inspect --format '{{.Name}}' "$old" | tr -d /)"
# Not --no-deps: compose hashes a service without its dependencies then, and the next `up`
# would recreate the new container. --no-recreate leaves every running container as it is.
"${compose[@]}" up --detach --no-recreate --scale serving=2 --wait --wait-timeout 300 serving
new=$("${compose[@]}" ps --quiet --status running serving | grep -v "^$old" | head -n1)
[ -n "$new" ] || { log "the new serving container did not start; the old one keeps serving"; exit 1; }

# Traffic moves only once the new container serves what the old one served.
if [ "$was_serving" = yes ]; then
  deadline=$((SECONDS + 300))
  until docker exec "$new" python -m serving.healthcheck --serving >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "the new serving container serves no model after 300 s; removing it, the old one keeps serving"
      docker rm --force "$new" >/dev/null
      exit 1
    fi
    sleep 1
  done
fi
# Longer than gunicorn's graceful timeout: requests in flight finish before the old one goes.
docker stop --time 60 "$old" >/dev/null
docker rm "$old" >/dev/null
log "serving replaced; $(docker inspect --format '{{.Name}}' "$new" | tr -d /) answers every request"

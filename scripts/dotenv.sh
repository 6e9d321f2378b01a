# Sourced, not run: exports each KEY=VALUE of .env that the environment does not already
# set. Same precedence as compose, so `BUILD_CA_BUNDLE=... make build` beats .env.
while IFS= read -r _line || [ -n "$_line" ]; do
  case "$_line" in ''|'#'*) continue ;; esac
  _key=${_line%%=*}
  case "$_key" in *[!A-Za-z0-9_]*|'') continue ;; esac
  if [ -z "${!_key+set}" ]; then export "$_key=${_line#*=}"; fi
done < "${ENV_FILE:-.env}"
unset _line _key

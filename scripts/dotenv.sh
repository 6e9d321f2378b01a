# Sourced (bash), not run: the one way make and the scripts read .env. Exports each
# KEY=VALUE of ENV_FILE (default .env) that the environment does not already set: the same
# precedence as compose, so `BUILD_CA_BUNDLE=... make build` beats .env. No file, no values.
if [ -f "${ENV_FILE:-.env}" ]; then
  while IFS= read -r _line || [ -n "$_line" ]; do
    case "$_line" in ''|'#'*) continue ;; esac
    _key=${_line%%=*}
    case "$_key" in *[!A-Za-z0-9_]*|'') continue ;; esac
    if [ -z "${!_key+set}" ]; then export "$_key=${_line#*=}"; fi
  done < "${ENV_FILE:-.env}"
  unset _line _key
fi

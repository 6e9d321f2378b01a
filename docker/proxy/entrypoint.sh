#!/bin/sh
# Prepares what nginx needs at every start, then becomes nginx:
#   - the certificate: the one brought in through TLS_CERT_FILE / TLS_KEY_FILE (compose
#     mounts them at /run/secrets/tls_cert and /run/secrets/tls_key), or else a self-signed
#     one for TLS_HOSTNAME kept in the /certs volume;
#   - the model endpoint's basic-auth file (SERVING_AUTH=basic), written into tmpfs from the
#     environment so the password never lands in the image or a volume;
#   - nginx.conf, rendered from the template with values checked here.
set -eu

die() { echo "proxy: error: $*" >&2; exit 1; }
log() { echo "proxy: $*" >&2; }

runtime=/tmp/proxy
umask 077
mkdir -p "$runtime" /tmp/nginx

TLS_HOSTNAME=${TLS_HOSTNAME:-localhost}
SERVING_AUTH=${SERVING_AUTH:-basic}
SERVING_MAX_BODY_BYTES=${SERVING_MAX_BODY_BYTES:-8388608}
MLFLOW_MAX_BODY_SIZE=${MLFLOW_MAX_BODY_SIZE:-1g}
PROXY_FAILED_LOGINS_PER_MINUTE=${PROXY_FAILED_LOGINS_PER_MINUTE:-10}
PROXY_FAILED_LOGIN_BURST=${PROXY_FAILED_LOGIN_BURST:-10}
PROXY_CONNECTIONS_PER_CLIENT=${PROXY_CONNECTIONS_PER_CLIENT:-64}
PROXY_HSTS_MAX_AGE=${PROXY_HSTS_MAX_AGE:-31536000}
brought_cert=/run/secrets/tls_cert
brought_key=/run/secrets/tls_key

case $SERVING_MAX_BODY_BYTES in
  '' | *[!0-9]*) die "SERVING_MAX_BODY_BYTES must be a number of bytes, not '$SERVING_MAX_BODY_BYTES'" ;;
esac
# The proxy's limits: whole numbers, at least 1 where 0 would let nothing through.
whole_number() {  # NAME VALUE MINIMUM
  case $2 in '' | *[!0-9]* | ??????????*) die "$1 must be a whole number (at most 9 digits), not '$2'" ;; esac
  [ "$2" -ge "$3" ] || die "$1 must be at least $3, not '$2'"
}
whole_number PROXY_FAILED_LOGINS_PER_MINUTE "$PROXY_FAILED_LOGINS_PER_MINUTE" 1
whole_number PROXY_FAILED_LOGIN_BURST "$PROXY_FAILED_LOGIN_BURST" 0
whole_number PROXY_CONNECTIONS_PER_CLIENT "$PROXY_CONNECTIONS_PER_CLIENT" 1
whole_number PROXY_HSTS_MAX_AGE "$PROXY_HSTS_MAX_AGE" 0
echo "$MLFLOW_MAX_BODY_SIZE" | grep -Eq '^[0-9]+[kKmMgG]?$' \
  || die "MLFLOW_MAX_BODY_SIZE must look like 500m or 2g, not '$MLFLOW_MAX_BODY_SIZE'"
echo "$TLS_HOSTNAME" | grep -Eq '^[A-Za-z0-9.:-]+$' \
  || die "TLS_HOSTNAME must be a host name or an IP address, not '$TLS_HOSTNAME'"

is_ip() { echo "$1" | grep -Eq '^[0-9.]+$|:'; }

# --- serving auth ---------------------------------------------------------------------
htpasswd=$runtime/serving.htpasswd
: >"$htpasswd"
case $SERVING_AUTH in
  basic)
    user=${SERVING_CLIENT_USERNAME:-}
    [ -n "$user" ] || die "SERVING_AUTH=basic needs SERVING_CLIENT_USERNAME in .env"
    [ -n "${SERVING_CLIENT_PASSWORD:-}" ] || die "SERVING_AUTH=basic needs SERVING_CLIENT_PASSWORD in .env (make env generates one)"
    case $user in *:*) die "SERVING_CLIENT_USERNAME must not contain ':'" ;; esac
    # The password goes to openssl on stdin, never on a command line that ps could show.
    hash=$(printf '%s\n' "$SERVING_CLIENT_PASSWORD" | openssl passwd -6 -stdin) \
      || die "could not hash SERVING_CLIENT_PASSWORD"
    printf '%s:%s\n' "$user" "$hash" >"$htpasswd"
    realm='"model endpoint"'
    log "the model endpoint requires basic auth (user $user)"
    ;;
  none)
    realm=off
    log "the model endpoint is open to anyone who reaches the proxy (SERVING_AUTH=none)"
    ;;
  *) die "SERVING_AUTH must be basic or none, not '$SERVING_AUTH'" ;;
esac
unset SERVING_CLIENT_PASSWORD

# --- certificate ----------------------------------------------------------------------
if [ -s "$brought_cert" ] || [ -s "$brought_key" ]; then
  [ -s "$brought_cert" ] && [ -s "$brought_key" ] \
    || die "set both TLS_CERT_FILE and TLS_KEY_FILE in .env, or neither"
  [ -r "$brought_key" ] \
    || die "TLS_KEY_FILE is not readable by uid $(id -u) inside the container; on the host: chown $(id -u) <key file> (and keep it mode 600)"
  openssl x509 -in "$brought_cert" -noout 2>/dev/null || die "TLS_CERT_FILE is not a PEM certificate"
  # A key that does not belong to the certificate would only show up as failed handshakes.
  [ "$(openssl x509 -in "$brought_cert" -noout -pubkey | openssl sha256)" = \
    "$(openssl pkey -in "$brought_key" -pubout | openssl sha256)" ] \
    || die "TLS_KEY_FILE is not the private key of TLS_CERT_FILE"
  openssl x509 -in "$brought_cert" -noout -checkend 0 >/dev/null || log "warning: TLS_CERT_FILE has expired"
  cert=$brought_cert key=$brought_key
  log "using the certificate from TLS_CERT_FILE: $(openssl x509 -in "$cert" -noout -subject)"
else
  cert=/certs/self-signed.crt key=/certs/self-signed.key
  [ -w /certs ] || die "/certs (the proxy-certs volume) is not writable by uid $(id -u)"
  if is_ip "$TLS_HOSTNAME"; then check="-checkip $TLS_HOSTNAME"; else check="-checkhost $TLS_HOSTNAME"; fi
  # Made once and kept; made again only when TLS_HOSTNAME changed or it is about to expire.
  # shellcheck disable=SC2086
  if [ -s "$cert" ] && [ -s "$key" ] \
     && openssl x509 -in "$cert" -noout $check | grep -q ' does match' \
     && openssl x509 -in "$cert" -noout -checkend 2592000 >/dev/null; then
    log "using the self-signed certificate in /certs for $TLS_HOSTNAME"
  else
    if is_ip "$TLS_HOSTNAME"; then san="IP:$TLS_HOSTNAME"; else san="DNS:$TLS_HOSTNAME"; fi
    [ "$TLS_HOSTNAME" = localhost ] || san="$san,DNS:localhost"
    [ "$TLS_HOSTNAME" = 127.0.0.1 ] || san="$san,IP:127.0.0.1"
    log "generating a self-signed certificate for $san (a real one: TLS_CERT_FILE/TLS_KEY_FILE)"
    # Written beside the old pair and renamed, so a failed run never leaves half a pair.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
      -days 825 -subj "/CN=$TLS_HOSTNAME" \
      -addext "subjectAltName=$san" \
      -addext "basicConstraints=critical,CA:FALSE" \
      -addext "keyUsage=critical,digitalSignature" \
      -addext "extendedKeyUsage=serverAuth" \
      -keyout "$key.new" -out "$cert.new" 2>/dev/null \
      || die "openssl could not generate a certificate"
    chmod 644 "$cert.new"
    mv "$key.new" "$key"
    mv "$cert.new" "$cert"
  fi
  log "self-signed certificate, SHA-256 fingerprint $(openssl x509 -in "$cert" -noout -fingerprint -sha256 | cut -d= -f2)"
fi

# --- nginx.conf -----------------------------------------------------------------------
sed -e "s|@TLS_CERT@|$cert|g" \
    -e "s|@TLS_KEY@|$key|g" \
    -e "s|@MLFLOW_MAX_BODY_SIZE@|$MLFLOW_MAX_BODY_SIZE|g" \
    -e "s|@SERVING_MAX_BODY_BYTES@|$SERVING_MAX_BODY_BYTES|g" \
    -e "s|@SERVING_AUTH_REALM@|$realm|g" \
    -e "s|@PROXY_FAILED_LOGINS_PER_MINUTE@|$PROXY_FAILED_LOGINS_PER_MINUTE|g" \
    -e "s|@PROXY_FAILED_LOGIN_BURST@|$PROXY_FAILED_LOGIN_BURST|g" \
    -e "s|@PROXY_CONNECTIONS_PER_CLIENT@|$PROXY_CONNECTIONS_PER_CLIENT|g" \
    -e "s|@PROXY_HSTS_MAX_AGE@|$PROXY_HSTS_MAX_AGE|g" \
    /etc/nginx/proxy.conf.template >"$runtime/nginx.conf"
nginx -e stderr -t -q -c "$runtime/nginx.conf" || die "the rendered nginx configuration is invalid"

log "listening on 8443 (tracking server) and 8444 (model endpoint)"
exec nginx -e stderr -c "$runtime/nginx.conf" -g 'daemon off;'

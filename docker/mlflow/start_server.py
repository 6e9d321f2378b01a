"""Start the tracking server: databases first, then MLflow's own server with basic auth, or
with single sign-on through the mlflow-oidc-auth plugin when AUTH_MODE=oidc.

Order matters: the tracking schema is upgraded before any request is served, so a newer
image keeps the data an older one wrote; the auth database must exist before the auth app
runs its own migrations at start.
"""

from __future__ import annotations

import os
import tempfile
import time

import psycopg2
from psycopg2 import sql

import settings


def wait_for_postgres(deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    delay = 0.5
    while True:
        try:
            psycopg2.connect(**settings.postgres_params(settings.tracking_db()), connect_timeout=5).close()
            return
        except psycopg2.OperationalError as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"Postgres did not accept connections within {deadline_s:.0f} s: {error}")
            time.sleep(delay)
            delay = min(delay * 2, 5)


def ensure_database(name: str) -> None:
    """Create a database when missing; also covers data volumes made by older versions."""
    conn = psycopg2.connect(**settings.postgres_params(settings.tracking_db()))
    # CREATE DATABASE refuses to run inside a transaction; psycopg2's `with conn` opens one.
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                settings.log(f"creating database {name}")
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()


def write_auth_config() -> str:
    """The auth app reads its database URI from an ini file; it holds a password, so it
    lives in the container's tmpfs with mode 600 and never in the image."""
    fd, path = tempfile.mkstemp(prefix="mlflow-auth-", suffix=".ini")
    with os.fdopen(fd, "w") as ini:
        ini.write(
            "[mlflow]\n"
            f"default_permission = {settings.optional('MLFLOW_DEFAULT_PERMISSION', 'READ')}\n"
            f"database_uri = {settings.postgres_uri(settings.auth_db())}\n"
            # Every API call checks a password hash, which costs tens of milliseconds of CPU;
            # remembering a successful check briefly makes polling clients (serving) cheap.
            # A password changed through the API is seen at once by the worker that took the
            # change and by the others within this many seconds.
            f"auth_cache_ttl_seconds = {settings.optional('MLFLOW_AUTH_CACHE_SECONDS', '30')}\n"
            # MLflow's basic auth behind a guard that answers malformed requests with a 4xx
            # where MLflow's permission checks would fail with a 500 (auth_guard.py).
            "authorization_function = auth_guard:authenticate_request\n"
        )
    return path


def prepare_oidc() -> None:
    """The plugin reads its settings from the environment (OIDC_* from compose.oidc.yaml).
    Its database is migrated here, once, before the server's workers start."""
    for name in ("OIDC_DISCOVERY_URL", "OIDC_CLIENT_ID", "OIDC_CLIENT_SECRET", "OIDC_REDIRECT_URI"):
        if not os.environ.get(name):
            raise settings.ConfigError(f"{name} is not set; AUTH_MODE=oidc needs compose.oidc.yaml "
                                       "in COMPOSE_FILE and the OIDC_* settings in .env (README: Single sign-on)")
    ensure_database(settings.oidc_db())
    uri = settings.postgres_uri(settings.oidc_db())
    os.environ["OIDC_USERS_DB_URI"] = uri
    # The plugin signs its session cookies with this key; the stack already keeps one secret
    # for exactly that purpose.
    os.environ["SECRET_KEY"] = os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    import sqlalchemy
    from mlflow_oidc_auth.db import utils as oidc_db

    settings.log("upgrading the single sign-on schema (no-op when current)")
    engine = sqlalchemy.create_engine(uri)
    try:
        oidc_db.migrate_if_needed(engine, "head")
    finally:
        engine.dispose()


def allowed_hosts(port: str) -> str:
    # Service-name access from the other containers, loopback from the host, plus every
    # public name the team uses. Private address ranges are deliberately not allowed by
    # default: DNS rebinding protection should not depend on the network layout.
    hosts = ["mlflow", f"mlflow:{port}", "localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[[]::1]:*"]
    for host in filter(None, (h.strip() for h in settings.optional("MLFLOW_PUBLIC_HOSTS", "").split(","))):
        hosts += [host, f"{host}:*"]
    return ",".join(hosts)


def main() -> None:
    settings.required("MLFLOW_FLASK_SERVER_SECRET_KEY")
    mode = settings.auth_mode()
    if mode == "basic":
        os.environ["MLFLOW_AUTH_ADMIN_USERNAME"] = settings.required("MLFLOW_ADMIN_USERNAME")
        os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"] = settings.required("MLFLOW_ADMIN_PASSWORD")
    settings.required("AWS_ACCESS_KEY_ID")
    settings.required("AWS_SECRET_ACCESS_KEY")
    port = settings.optional("MLFLOW_CONTAINER_PORT", "5000")

    wait_for_postgres()
    if mode == "basic":
        ensure_database(settings.auth_db())
    else:
        prepare_oidc()
    settings.log("upgrading the tracking schema (no-op when current)")
    tracking_uri = settings.postgres_uri(settings.tracking_db())
    # The URI holds a password, so it never goes on a command line (ps, logs): the upgrade
    # runs in this process through the CLI command's own function, the server reads the
    # URI from its environment variable.
    import mlflow.db

    mlflow.db.upgrade.callback(tracking_uri)
    os.environ["MLFLOW_BACKEND_STORE_URI"] = tracking_uri
    if mode == "basic":
        os.environ["MLFLOW_AUTH_CONFIG_PATH"] = write_auth_config()

    # MLflow's background job runner serves GenAI features (scorers, trace rollups) that
    # this stack does not use; it costs two processes polling the database.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    origins = settings.optional("MLFLOW_CORS_ORIGINS", "")
    args = [
        "mlflow", "server",
        "--app-name", "basic-auth" if mode == "basic" else "oidc-auth",
        "--serve-artifacts",
        "--artifacts-destination", f"s3://{settings.bucket()}/artifacts",
        "--host", "0.0.0.0",
        "--port", port,
        "--workers", settings.optional("MLFLOW_WORKERS", "2"),
        "--allowed-hosts", allowed_hosts(port),
    ]
    if origins:
        args += ["--cors-allowed-origins", origins]
    # The server's worker processes import auth_guard from beside this script.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    settings.log(f"starting the tracking server on port {port} ({mode} auth)")
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()

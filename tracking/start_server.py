"""Start the tracking server: the schema first, then MLflow's own server with basic auth, or
with single sign-on through the mlflow-oidc-auth plugin when AUTH_MODE=oidc.

Order matters: the tracking schema is upgraded before any request is served, so a newer
image keeps the data an older one wrote. Both databases exist already: db-init creates them,
owned by the role this server logs in as (MLFLOW_DB_USER), which cannot create others.
Either way the app runs behind the request body limit (body_limit.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from tracking import reset_admin, settings, upgrade_schema
from tracking.settings import MONITORING_USERNAME


def write_auth_config(conf: settings.Server) -> str:
    """The auth app reads its database URI from an ini file; it holds a password, so it
    lives in the container's tmpfs with mode 600 and never in the image."""
    fd, path = tempfile.mkstemp(prefix="mlflow-auth-", suffix=".ini")
    with os.fdopen(fd, "w") as ini:
        ini.write(auth_config_text(conf.uri(conf.auth_db), conf.auth_cache_seconds))
    return path


def auth_config_text(database_uri: str, cache_seconds: int) -> str:
    """The auth config's text: also what bench/auth_profile.py runs its local server with."""
    return (
        "[mlflow]\n"
        # Nobody reads what they were not granted: mlflow-init grants each service account
        # its own experiment and model, and the admin grants teammates theirs.
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {database_uri}\n"
        # Every API call checks a password hash, which costs tens of milliseconds of CPU;
        # remembering a successful check briefly makes polling clients (serving) cheap.
        # A password changed through the API is seen at once by the worker that took the
        # change and by the others within this many seconds; so is a user's admin flag or
        # deletion (auth_lookups.py keeps the user row as long). Grants are kept for
        # MLFLOW_AUTH_GRANT_CACHE_SECONDS.
        f"auth_cache_ttl_seconds = {cache_seconds}\n"
        # MLflow's basic auth behind a guard that answers malformed requests with a 4xx
        # where MLflow's permission checks would fail with a 500 (auth_guard.py).
        "authorization_function = tracking.auth_guard:authenticate_request\n"
    )


def prepare_single_sign_on(conf: settings.Server) -> None:
    """The plugin reads its settings from the environment (OIDC_* from compose.oidc.yaml);
    its schema is migrated here, once, before the server's workers start."""
    settings.load(settings.SingleSignOn)
    uri = conf.uri(conf.oidc_db)
    os.environ["OIDC_USERS_DB_URI"] = uri
    # The plugin signs its session cookies with this key; the stack keeps one secret for
    # exactly that purpose already.
    os.environ["SECRET_KEY"] = conf.flask_secret.get_secret_value()
    import sqlalchemy
    from mlflow_oidc_auth.db import utils as plugin_db

    settings.log("upgrading the single sign-on schema (no-op when current)")
    engine = sqlalchemy.create_engine(uri)
    try:
        plugin_db.migrate_if_needed(engine, "head")
    finally:
        engine.dispose()


def fresh_metrics_dir() -> str:
    """Where the workers' Prometheus counters live (MLflow's --expose-prometheus): emptied at
    every start, so counts from a previous container's workers never add into these."""
    path = os.path.join(tempfile.gettempdir(), "prometheus-metrics")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)
    return path


def allowed_hosts(port: int, public_hosts: str) -> str:
    # Service-name access from the other containers, loopback from the host, plus every
    # public name the team uses. Private address ranges are deliberately not allowed by
    # default: DNS rebinding protection should not depend on the network layout.
    hosts = ["mlflow", f"mlflow:{port}", "localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[[]::1]:*"]
    for host in filter(None, (h.strip() for h in public_hosts.split(","))):
        hosts += [host, f"{host}:*"]
    return ",".join(hosts)


def main() -> None:
    conf = settings.load(settings.Server)
    os.environ["MLFLOW_AUTH_ADMIN_USERNAME"] = conf.admin_username
    os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"] = conf.admin_password.get_secret_value()
    port = conf.container_port

    upgrade_schema.upgrade(conf)
    # The URI holds a password, so it never goes on a command line: the server reads it
    # from its environment variable.
    os.environ["MLFLOW_BACKEND_STORE_URI"] = conf.uri(conf.tracking_db)
    if conf.auth_mode == "oidc":
        prepare_single_sign_on(conf)
    else:
        os.environ["MLFLOW_AUTH_CONFIG_PATH"] = write_auth_config(conf)
        # The admin's password follows .env like every other: rotating it is `make up`.
        reset_admin.apply(conf)

    # MLflow's background job runner serves GenAI features (scorers, trace rollups) that
    # this stack does not use; it costs two processes polling the database.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # GraphQL answers with the same permission checks as the REST API; said here rather
    # than left to MLflow's default, so an upgrade cannot turn it off unnoticed.
    os.environ["MLFLOW_SERVER_ENABLE_GRAPHQL_AUTH"] = "true"
    # Read by body_limit.py in every worker: bodies above it get 413 before they are read.
    # Read by auth_guard: who besides MLflow admins may create experiments and models.
    os.environ["MLFLOW_CREATORS"] = conf.creator
    # Read by auth_guard: who besides MLflow admins may read /metrics (Prometheus's account).
    os.environ["MLFLOW_METRICS_READERS"] = MONITORING_USERNAME
    os.environ["MLFLOW_MAX_BODY_BYTES"] = str(conf.max_body_bytes)
    # Read by auth_lookups.py in every worker.
    os.environ["MLFLOW_AUTH_GRANT_CACHE_SECONDS"] = str(conf.grant_cache_seconds)
    origins = conf.cors_origins
    args = [
        "mlflow", "server",
        # MLflow's basic-auth app or the plugin's, behind a request body limit (body_limit.py).
        "--app-name", "stack-oidc-auth" if conf.auth_mode == "oidc" else "stack-basic-auth",
        "--serve-artifacts",
        "--artifacts-destination", f"s3://{conf.bucket}/artifacts",
        "--host", "0.0.0.0",
        "--port", str(port),
        "--workers", str(conf.workers),
        "--allowed-hosts", allowed_hosts(port, conf.public_hosts),
        # /metrics for Prometheus, behind the same login as the API (the monitoring account).
        "--expose-prometheus", fresh_metrics_dir(),
    ]
    if origins:
        args += ["--cors-allowed-origins", origins]
    settings.log(f"starting the tracking server on port {port} ({conf.auth_mode} auth)")
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()

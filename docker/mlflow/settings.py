"""Settings shared by the tracking server's start script and its one-shot helpers.

Everything comes from the environment that compose.yaml fills from .env. A missing secret is
a configuration error reported by name; there is never a fallback value.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import quote


class ConfigError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"configuration error: {message}")


def required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(f"{name} is not set (run 'make env' to generate .env)")
    return value


def optional(name: str, default: str) -> str:
    return os.environ.get(name) or default


def postgres_uri(database: str) -> str:
    user = quote(required("POSTGRES_USER"), safe="")
    password = quote(required("POSTGRES_PASSWORD"), safe="")
    host = optional("POSTGRES_HOST", "postgres")
    port = optional("POSTGRES_PORT", "5432")
    # psycopg2 named explicitly: SQLAlchemy's bare "postgresql" now means psycopg 3.
    return f"postgresql+psycopg2://{user}:{password}@{host}:{port}/{database}"


def postgres_params(database: str) -> dict:
    """Keyword arguments for psycopg2.connect: no URI, so no parse error can echo a password."""
    return {
        "user": required("POSTGRES_USER"),
        "password": required("POSTGRES_PASSWORD"),
        "host": optional("POSTGRES_HOST", "postgres"),
        "port": optional("POSTGRES_PORT", "5432"),
        "dbname": database,
    }


def tracking_db() -> str:
    return required("POSTGRES_DB")


def auth_db() -> str:
    return optional("MLFLOW_AUTH_DB", "mlflow_auth")


def oidc_db() -> str:
    """The single sign-on plugin's users, groups, grants and tokens (AUTH_MODE=oidc)."""
    return optional("MLFLOW_OIDC_DB", "mlflow_oidc")


def auth_mode() -> str:
    mode = optional("AUTH_MODE", "basic")
    if mode not in ("basic", "oidc"):
        raise ConfigError(f"AUTH_MODE must be basic or oidc, not {mode!r}")
    return mode


def bucket() -> str:
    return required("S3_BUCKET")


def log(message: str) -> None:
    print(f"[mlflow-setup] {message}", file=sys.stderr, flush=True)

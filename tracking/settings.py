"""Settings shared by the tracking server's start script and its one-shot helpers.

Everything comes from the environment that compose.yaml fills from .env. A missing secret is
a configuration error reported by name; there is never a fallback value.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import quote


class ConfigError(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(f"configuration error: {message}")


def required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(f"{name} is not set (run 'make env' to generate .env)")
    return value


def optional(name: str, default: str) -> str:
    return os.environ.get(name) or default


_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def size_in_bytes(name: str, default: str) -> int:
    """A size as nginx writes it (512m, 2g, 1048576), so one setting serves both."""
    raw = optional(name, default).strip().lower()
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in "kmg" else (raw, "")
    if not number.isdigit() or int(number) == 0:
        raise ConfigError(f"{name}={raw!r} is not a size: expected e.g. 512m, 1g or a number of bytes")
    return int(number) * _UNITS[unit]


def postgres_uri(database: str) -> str:
    """The tracking server's connection, as its own role (never the superuser)."""
    user = quote(required("MLFLOW_DB_USER"), safe="")
    password = quote(required("MLFLOW_DB_PASSWORD"), safe="")
    host = optional("POSTGRES_HOST", "postgres")
    port = optional("POSTGRES_PORT", "5432")
    # psycopg2 named explicitly: SQLAlchemy's bare "postgresql" now means psycopg 3.
    return f"postgresql+psycopg2://{user}:{password}@{host}:{port}/{database}"


def _connection(user_var: str, password_var: str, database: str) -> dict:
    # Keyword arguments for psycopg2.connect: no URI, so no parse error can echo a password.
    return {
        "user": required(user_var),
        "password": required(password_var),
        "host": optional("POSTGRES_HOST", "postgres"),
        "port": optional("POSTGRES_PORT", "5432"),
        "dbname": database,
    }


def postgres_params(database: str) -> dict:
    """The tracking server's own role."""
    return _connection("MLFLOW_DB_USER", "MLFLOW_DB_PASSWORD", database)


def superuser_params(database: str) -> dict:
    """Only db-init holds the superuser."""
    return _connection("POSTGRES_USER", "POSTGRES_PASSWORD", database)


def tracking_db() -> str:
    return required("POSTGRES_DB")


def auth_db() -> str:
    return optional("MLFLOW_AUTH_DB", "mlflow_auth")


def bucket() -> str:
    return required("S3_BUCKET")


def log(message: str) -> None:
    print(f"[mlflow-setup] {message}", file=sys.stderr, flush=True)

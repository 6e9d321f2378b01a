"""Settings of the tracking server and its one-shot helpers, declared once per program.

Everything comes from the environment that compose.yaml fills from .env; each program loads
only the model it needs (`load(Server)`, `load(DatabaseInit)` ...), so a helper never asks
for a secret it does not hold. A missing secret is an error naming it; there is never a
fallback value. Nothing here imports MLflow: a typo fails in a second.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr, field_validator, model_validator

from stack_common import settings as env_settings
from stack_common.settings import ConfigError, EnvSettings

if TYPE_CHECKING:
    from botocore.client import BaseClient as S3Client

__all__ = ["Accounts", "AdminReset", "BucketInit", "ConfigError", "DatabaseInit", "S3", "Server", "ServiceAccounts",
           "SingleSignOn", "load", "log"]

# Prometheus's account: fixed, like the name in monitoring/prometheus.yml, where Prometheus
# expands no variables.
MONITORING_USERNAME = "monitoring"

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


class Postgres(EnvSettings):
    """The tracking server's own connection, as its role (never the superuser)."""

    host: str = Field("postgres", alias="POSTGRES_HOST", min_length=1, description="Postgres host")
    port: int = Field(5432, alias="POSTGRES_PORT", ge=1, le=65535, description="Postgres port")
    tracking_db: str = Field(alias="POSTGRES_DB", min_length=1, description="the tracking database")
    auth_db: str = Field("mlflow_auth", alias="MLFLOW_AUTH_DB", min_length=1,
                         description="the database of MLflow's users and permissions")
    oidc_db: str = Field("mlflow_oidc", alias="MLFLOW_OIDC_DB", min_length=1,
                         description="the single sign-on plugin's users, groups, grants and tokens")
    user: str = Field(alias="MLFLOW_DB_USER", min_length=1, description="the role the server logs in as")
    password: SecretStr = Field(alias="MLFLOW_DB_PASSWORD", description="that role's password")
    auth_mode: Literal["basic", "oidc"] = Field("basic", alias="AUTH_MODE",
                                                description="how people log in: MLflow's users, or single sign-on")

    def databases(self) -> tuple[str, ...]:
        """The databases the server's role owns: the plugin's only in single sign-on mode."""
        extra = (self.oidc_db,) if self.auth_mode == "oidc" else ()
        return (self.tracking_db, self.auth_db, *extra)

    def uri(self, database: str) -> str:
        user, password = quote(self.user, safe=""), quote(self.password.get_secret_value(), safe="")
        # psycopg2 named explicitly: SQLAlchemy's bare "postgresql" now means psycopg 3.
        return f"postgresql+psycopg2://{user}:{password}@{self.host}:{self.port}/{database}"

    def params(self, database: str) -> dict[str, Any]:
        # Keyword arguments for psycopg2.connect: no URI, so no parse error can echo a password.
        return {"user": self.user, "password": self.password.get_secret_value(), "host": self.host,
                "port": self.port, "dbname": database}


class DatabaseInit(Postgres):
    """db-init: the only holder of the superuser."""

    superuser: str = Field(alias="POSTGRES_USER", min_length=1, description="the Postgres superuser")
    superuser_password: SecretStr = Field(alias="POSTGRES_PASSWORD", description="its password")

    @model_validator(mode="after")
    def _distinct_roles(self) -> DatabaseInit:
        if self.user == self.superuser:
            raise ValueError("MLFLOW_DB_USER must differ from POSTGRES_USER: the tracking server logs in "
                             "as a role of its own, never as the superuser")
        return self

    # Sweeps keep their Optuna study in a database of their own, under a role that owns it
    # and nothing else: the sweep workers hold that role, never the tracking server's.
    optuna_user: str = Field("optuna", alias="OPTUNA_DB_USER", min_length=1,
                             description="the role sweep workers log in as")
    optuna_password: SecretStr = Field(alias="OPTUNA_DB_PASSWORD", description="that role's password")
    optuna_db: str = Field("optuna", alias="OPTUNA_DB", min_length=1, description="the sweeps' study database")

    @model_validator(mode="after")
    def _optuna_apart(self) -> DatabaseInit:
        if self.optuna_user in (self.user, self.superuser):
            raise ValueError("OPTUNA_DB_USER must differ from MLFLOW_DB_USER and POSTGRES_USER: sweep workers "
                             "get a role of their own")
        if self.optuna_db in (*Postgres.databases(self), "postgres"):
            raise ValueError("OPTUNA_DB must name a database of its own")
        return self

    def superuser_params(self, database: str) -> dict[str, Any]:
        return {**self.params(database), "user": self.superuser,
                "password": self.superuser_password.get_secret_value()}


class S3(EnvSettings):
    bucket: str = Field(alias="S3_BUCKET", min_length=1, description="the artifact bucket")
    endpoint: str = Field("", alias="MLFLOW_S3_ENDPOINT_URL", description="the S3 endpoint; empty for AWS")
    access_key: str = Field(alias="AWS_ACCESS_KEY_ID", min_length=1, description="the S3 key id")
    secret_key: SecretStr = Field(alias="AWS_SECRET_ACCESS_KEY", description="the S3 secret key")
    region: str = Field("us-east-1", alias="AWS_DEFAULT_REGION", min_length=1, description="the S3 region")

    def client(self, max_attempts: int, key: tuple[str, SecretStr] | None = None) -> S3Client:
        """A boto3 client with this key (or `key`), path-style addressing and bounded retries."""
        import boto3
        from botocore.config import Config

        access_key, secret_key = key or (self.access_key, self.secret_key)
        return boto3.client(
            "s3", endpoint_url=self.endpoint or None, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key.get_secret_value(), region_name=self.region,
            config=Config(retries={"max_attempts": max_attempts, "mode": "standard"}, s3={"addressing_style": "path"}),
        )


class BucketInit(S3):
    """s3-init: the only holder of the root key, which it uses to make the server's own key."""

    app_access_key: str = Field("", alias="S3_APP_ACCESS_KEY", description="the tracking server's S3 key id")
    app_secret_key: SecretStr = Field(SecretStr(""), alias="S3_APP_SECRET_KEY",
                                      description="the tracking server's S3 secret key")

    @model_validator(mode="after")
    def _both_halves(self) -> BucketInit:
        if bool(self.app_access_key) != bool(self.app_secret_key.get_secret_value()):
            raise ValueError("S3_APP_ACCESS_KEY and S3_APP_SECRET_KEY go together: set both or neither")
        return self


class Admin(EnvSettings):
    admin_username: str = Field(alias="MLFLOW_ADMIN_USERNAME", min_length=1, description="the MLflow admin")
    admin_password: SecretStr = Field(alias="MLFLOW_ADMIN_PASSWORD", description="the admin's password")
    container_port: int = Field(5000, alias="MLFLOW_CONTAINER_PORT", ge=1, le=65535,
                                description="the server's port inside its container")


class Server(Postgres, Admin):
    """The tracking server."""

    flask_secret: SecretStr = Field(alias="MLFLOW_FLASK_SERVER_SECRET_KEY",
                                    description="signs the UI's sessions")
    bucket: str = Field(alias="S3_BUCKET", min_length=1, description="the artifact bucket")
    s3_access_key: str = Field(alias="AWS_ACCESS_KEY_ID", min_length=1, description="the server's S3 key id")
    s3_secret_key: SecretStr = Field(alias="AWS_SECRET_ACCESS_KEY", description="the server's S3 secret key")
    workers: int = Field(2, alias="MLFLOW_WORKERS", ge=1, le=64, description="uvicorn worker processes")
    max_body_bytes: int = Field(512 * 1024**2, alias="MLFLOW_MAX_BODY_SIZE", ge=1,
                                description="largest request body, as nginx writes sizes: 512m, 1g, bytes")
    auth_cache_seconds: int = Field(30, alias="MLFLOW_AUTH_CACHE_SECONDS", ge=0, le=86400,
                                    json_schema_extra={"unit": " seconds"},
                                    description="how long a checked password is remembered")
    grant_cache_seconds: float = Field(5, alias="MLFLOW_AUTH_GRANT_CACHE_SECONDS", ge=0, le=300,
                                       json_schema_extra={"unit": " seconds"},
                                       description="how long a worker reuses a user's grants; a revoked right "
                                                   "applies within this in every worker (0: read every call)")
    public_hosts: str = Field("", alias="MLFLOW_PUBLIC_HOSTS",
                              description="comma-separated host names the server answers to besides its own")
    cors_origins: str = Field("", alias="MLFLOW_CORS_ORIGINS", description="comma-separated browser origins")
    creator: str = Field("trainer", alias="TRAINER_USERNAME",
                         description="the account besides admins that may create experiments and models")

    @field_validator("max_body_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        raw = value.strip().lower()
        number, unit = (raw[:-1], raw[-1]) if raw[-1:] in "kmg" else (raw, "")
        if not number.isdigit() or int(number) == 0:
            raise ValueError("expected a size such as 512m, 1g or a number of bytes")
        return int(number) * _UNITS[unit]


class Accounts(Admin):
    """mlflow-init: the service accounts and what they may do, made as the admin."""

    trainer_username: str = Field(alias="TRAINER_USERNAME", min_length=1, description="the trainer's account")
    trainer_password: SecretStr = Field(alias="TRAINER_PASSWORD", description="its password")
    serving_username: str = Field(alias="SERVING_USERNAME", min_length=1, description="serving's account")
    serving_password: SecretStr = Field(alias="SERVING_PASSWORD", description="its password")
    monitoring_password: SecretStr = Field(alias="MONITORING_PASSWORD",
                                           description="the password Prometheus reads /metrics with")
    experiment_name: str = Field(alias="EXPERIMENT_NAME", min_length=1, description="the trainer's experiment")
    model_name: str = Field(alias="MODEL_NAME", min_length=1, description="the registered model")
    prediction_log_username: str = Field("predictions", alias="PREDICTION_LOG_USERNAME", min_length=1,
                                         description="the account serving's prediction log uploads with")
    prediction_log_password: SecretStr = Field(alias="PREDICTION_LOG_PASSWORD", description="its password")
    prediction_log_experiment: str = Field("", alias="PREDICTION_LOG_EXPERIMENT", max_length=500,
                                           description="the prediction log's experiment; empty: <MODEL_NAME>-inference")
    drift_experiment: str = Field("", alias="DRIFT_EXPERIMENT", max_length=500,
                                  description="where drift reports go; empty: <MODEL_NAME>-drift")

    @model_validator(mode="after")
    def _log_account_apart(self) -> Accounts:
        others = (self.admin_username, self.trainer_username, self.serving_username, "monitoring")
        if self.prediction_log_username in others:
            raise ValueError("PREDICTION_LOG_USERNAME must name an account of its own: it may edit the inference "
                             "experiment and nothing else")
        return self

    @property
    def inference_experiment(self) -> str:
        return self.prediction_log_experiment or f"{self.model_name}-inference"

    @property
    def drift_report_experiment(self) -> str:
        return self.drift_experiment or f"{self.model_name}-drift"


class SingleSignOn(EnvSettings):
    """AUTH_MODE=oidc: what the server needs to send people to the identity provider. The
    plugin reads these (and its optional OIDC_* settings) from the environment itself; they
    are declared here so a missing one is one line at start, not a failed login later."""

    discovery_url: str = Field(alias="OIDC_DISCOVERY_URL", min_length=1,
                               description="the provider's .well-known/openid-configuration URL")
    client_id: str = Field(alias="OIDC_CLIENT_ID", min_length=1, description="MLflow's client at the provider")
    client_secret: SecretStr = Field(alias="OIDC_CLIENT_SECRET", description="that client's secret")
    redirect_uri: str = Field(alias="OIDC_REDIRECT_URI", min_length=1,
                              description="MLflow's public address + /callback")

    @field_validator("discovery_url", "redirect_uri")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("expected an http(s):// URL")
        return value

    @field_validator("client_secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value


class ServiceAccounts(Postgres):
    """mlflow-init with single sign-on: the trainer's and serving's accounts and tokens, made
    in the plugin's own store (its token API answers only people logged in at the provider)."""

    container_port: int = Field(5000, alias="MLFLOW_CONTAINER_PORT", ge=1, le=65535,
                                description="the server's port inside its container")
    trainer_username: str = Field(alias="TRAINER_USERNAME", min_length=1, description="the trainer's account")
    serving_username: str = Field(alias="SERVING_USERNAME", min_length=1, description="serving's account")
    experiment_name: str = Field(alias="EXPERIMENT_NAME", min_length=1, description="the trainer's experiment")
    model_name: str = Field(alias="MODEL_NAME", min_length=1, description="the registered model")
    read_groups: str = Field("", alias="OIDC_READ_GROUPS",
                             description="comma-separated groups given READ on the experiment and model")
    edit_groups: str = Field("", alias="OIDC_EDIT_GROUPS",
                             description="comma-separated groups given EDIT on the experiment and model")

    def group_grants(self) -> list[tuple[str, str]]:
        def names(value: str) -> list[str]:
            return [name.strip() for name in value.split(",") if name.strip()]
        return [(group, "READ") for group in names(self.read_groups)] + \
               [(group, "EDIT") for group in names(self.edit_groups)]


class AdminReset(Postgres, Admin):
    """After a restore: the admin logs in with this stack's password again."""


def load(cls: type[env_settings.Settings]) -> env_settings.Settings:
    """cls from the environment; one line and exit status 2 on a missing or bad value."""
    try:
        return env_settings.load(cls, missing_hint=" (run 'make env' to generate .env)")
    except ConfigError as error:
        log(f"configuration error: {error}")
        sys.exit(2)


def log(message: str) -> None:
    print(f"[mlflow-setup] {message}", file=sys.stderr, flush=True)

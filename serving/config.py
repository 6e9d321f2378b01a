"""Settings of the serving container, declared once and read from the environment.

Each field names its environment variable (its alias), type, range and meaning; pydantic
converts and checks them. `from_env` turns the first refusal into one line naming the
variable. No MLflow, gunicorn or torch import happens here: the entry point checks the
environment before any of them load, so a typo fails in a second.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from pydantic import Field, SecretStr, field_validator, model_validator

import model_signatures
from stack_common.settings import ConfigError, EnvSettings, load

MIB = 1024 * 1024
# A bearer token shorter than this could be guessed (`make env` writes 32 random characters).
METRICS_TOKEN_MIN_LENGTH = 16

# Same rule as MLflow's registry applies to alias names, so a bad alias fails here
# instead of as an endless "alias not found" wait.
_ALIAS_RE = re.compile(r"^[\w\-]+$")
_RESERVED_ALIAS_RE = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


__all__ = ["ConfigError", "Settings", "from_env"]


class Settings(EnvSettings):

    tracking_uri: str = Field(alias="MLFLOW_TRACKING_URI",
                              description="the tracking server, e.g. http://mlflow:5000")
    model_name: str = Field(alias="MODEL_NAME", min_length=1, description="the registered model served")
    public_key: model_signatures.PublicKey = Field(
        alias="MODEL_SIGNING_PUBLIC_KEY",
        description="base64 of the PEM public key; only versions signed with its private half are loaded")
    model_alias: str = Field("production", alias="MODEL_ALIAS", max_length=255,
                             description="the alias followed: letters, digits, '_' or '-'")
    poll_seconds: float = Field(5.0, alias="ALIAS_POLL_SECONDS", ge=0.1, le=3600.0, allow_inf_nan=False,
                                json_schema_extra={"unit": " seconds"},
                                description="seconds between two looks at the alias")
    workers: int = Field(2, alias="SERVING_WORKERS", ge=1, le=64, description="gunicorn worker processes")
    max_body_bytes: int = Field(8 * MIB, alias="SERVING_MAX_BODY_BYTES", ge=1024, le=1024 * MIB,
                                json_schema_extra={"unit": " bytes"},
                                description="largest request body, in bytes (413 above)")
    cache_dir: str = Field("/tmp/serving-cache", alias="SERVING_CACHE_DIR",
                           description="absolute directory for downloaded versions")
    torch_threads: int = Field(1, alias="SERVING_TORCH_THREADS", ge=1, le=256,
                               description="torch intra-op threads per worker")
    port: int = Field(8080, alias="SERVING_CONTAINER_PORT", ge=1, le=65535, description="port to listen on")
    bind_host: str = Field("0.0.0.0", alias="SERVING_BIND_HOST", description="address to listen on")
    graceful_timeout: int = Field(30, alias="SERVING_GRACEFUL_TIMEOUT", ge=1, le=3600,
                                  json_schema_extra={"unit": " seconds"},
                                  description="seconds requests in flight get on SIGTERM")
    batch_max_rows: int = Field(32, alias="SERVING_BATCH_MAX_ROWS", ge=1, le=4096,
                                description="rows per batched predict call; 1 turns batching off")
    direct_path: bool = Field(True, alias="SERVING_DIRECT_PATH",
                              description="score {\"inputs\": ...} bodies directly; false sends all to MLflow's app")
    prediction_log_sample: float = Field(0.0, alias="PREDICTION_LOG_SAMPLE", ge=0.0, le=1.0, allow_inf_nan=False,
                                         description="fraction of requests logged for drift reports; 0 is off")
    prediction_log_buffer: int = Field(10_000, alias="PREDICTION_LOG_BUFFER", ge=1, le=1_000_000,
                                       description="logged images held in memory while uploads fail")
    prediction_log_flush_seconds: float = Field(60.0, alias="PREDICTION_LOG_FLUSH_S", ge=1.0, le=86_400.0,
                                                allow_inf_nan=False, json_schema_extra={"unit": " seconds"},
                                                description="seconds between two uploads of the prediction log")
    prediction_log_experiment: str = Field("", alias="PREDICTION_LOG_EXPERIMENT", max_length=500,
                                           description="the prediction log's experiment; empty: <MODEL_NAME>-inference")
    prediction_log_username: str = Field("predictions", alias="PREDICTION_LOG_USERNAME", min_length=1,
                                         description="the MLflow account the prediction log uploads with")
    prediction_log_password: SecretStr = Field(SecretStr(""), alias="PREDICTION_LOG_PASSWORD",
                                               description="that account's password; needed when the log is on")
    metrics_token: SecretStr = Field(SecretStr(""), alias="SERVING_METRICS_TOKEN",
                                     description="bearer token GET /metrics requires; unset turns /metrics off")
    warm_start: bool = Field(True, alias="SERVING_WARM_START",
                             description="serve the last version served, from the cache, before the registry answers")
    challenger_alias: str = Field("challenger", alias="CHALLENGER_ALIAS", max_length=255,
                                  description="the alias of a canary or shadow version, served beside MODEL_ALIAS")
    rollout_max_error_rate_delta: float = Field(
        0.05, alias="ROLLOUT_MAX_ERROR_RATE_DELTA", ge=0.0, le=1.0, allow_inf_nan=False,
        description="the challenger's error rate may exceed production's by this much before the rollout aborts")
    rollout_max_p99_ratio: float = Field(
        2.0, alias="ROLLOUT_MAX_P99_RATIO", ge=1.0, le=1000.0, allow_inf_nan=False,
        description="the challenger's p99 latency may be this many times production's before the rollout aborts")
    rollout_min_requests: int = Field(
        50, alias="ROLLOUT_MIN_REQUESTS", ge=1, le=1_000_000,
        description="requests each version needs in the window before the rollout is judged")
    rollout_window_seconds: float = Field(
        300.0, alias="ROLLOUT_WINDOW_SECONDS", ge=1.0, le=86400.0, allow_inf_nan=False,
        json_schema_extra={"unit": " seconds"}, description="how far back the rollout counts look")
    shadow_queue_size: int = Field(64, alias="SHADOW_QUEUE_SIZE", ge=1, le=100_000,
                                   description="shadow requests waiting to be scored; more are dropped")

    @field_validator("tracking_uri")
    @classmethod
    def _a_uri(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("expected a URI such as http://mlflow:5000")
        return value

    @field_validator("model_alias", "challenger_alias")
    @classmethod
    def _alias_name(cls, value: str) -> str:
        if not _ALIAS_RE.match(value) or _RESERVED_ALIAS_RE.match(value):
            raise ValueError("use letters, digits, '_' or '-', and not 'latest' or 'v<number>' (MLflow reserves those)")
        return value

    @field_validator("cache_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not os.path.isabs(value):
            raise ValueError("expected an absolute path")
        return value

    @field_validator("public_key", mode="before")
    @classmethod
    def _read_key(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return model_signatures.public_key_from_env({"MODEL_SIGNING_PUBLIC_KEY": value})
            except model_signatures.KeyProblem as e:
                raise ValueError(str(e)) from None
        return value

    @field_validator("metrics_token")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        # The message names the variable itself, so that the one-line error never echoes the secret.
        if 0 < len(value.get_secret_value()) < METRICS_TOKEN_MIN_LENGTH:
            raise ValueError(f"SERVING_METRICS_TOKEN is too short: use at least {METRICS_TOKEN_MIN_LENGTH} "
                             "random characters (make env writes one)")
        return value

    @model_validator(mode="after")
    def _two_aliases(self) -> Settings:
        if self.challenger_alias == self.model_alias:
            raise ValueError(f"CHALLENGER_ALIAS={self.challenger_alias!r} is not valid: "
                             "it must differ from MODEL_ALIAS")
        return self

    @model_validator(mode="after")
    def _log_account(self) -> Settings:
        # Serving's own account may not write runs, so the log needs its own; better said at start.
        if self.prediction_log_sample > 0 and not self.prediction_log_password.get_secret_value():
            raise ValueError("PREDICTION_LOG_PASSWORD is not set: the prediction log (PREDICTION_LOG_SAMPLE > 0) "
                             "uploads with the account PREDICTION_LOG_USERNAME and its password")
        return self

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}@{self.model_alias}"

    @property
    def inference_experiment(self) -> str:
        return self.prediction_log_experiment or f"{self.model_name}-inference"

    @property
    def bind(self) -> str:
        return f"{self.bind_host}:{self.port}"


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from os.environ (or a given mapping); ConfigError, one line, on nonsense.

    An empty variable counts as unset, as compose passes `${VAR:-}` through."""
    # The key reader says how to make a missing key, which beats "is not set".
    return load(Settings, env, always=("MODEL_SIGNING_PUBLIC_KEY",))

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

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

import model_signatures

MIB = 1024 * 1024

# Same rule as MLflow's registry applies to alias names, so a bad alias fails here
# instead of as an endless "alias not found" wait.
_ALIAS_RE = re.compile(r"^[\w\-]+$")
_RESERVED_ALIAS_RE = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


class ConfigError(ValueError):
    """A setting that cannot work; its message is the one line shown to the operator."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, validate_by_name=True,
                              validate_by_alias=True, extra="ignore",
                              protected_namespaces=())

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

    @field_validator("tracking_uri")
    @classmethod
    def _a_uri(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("expected a URI such as http://mlflow:5000")
        return value

    @field_validator("model_alias")
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

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}@{self.model_alias}"

    @property
    def bind(self) -> str:
        return f"{self.bind_host}:{self.port}"


def _bounds(field: FieldInfo) -> tuple[object, object]:
    low = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
    high = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
    return low, high


def _one_line(error: ValidationError, given: Mapping[str, str]) -> str:
    first = error.errors()[0]
    name = str(first["loc"][0])
    if first["type"] == "missing":
        return f"{name} is not set"
    message = first["msg"].removeprefix("Value error, ")
    if message.startswith(f"{name} "):  # the key reader names the variable itself
        return message
    field = next(f for f in Settings.model_fields.values() if f.alias == name)
    low, high = _bounds(field)
    if first["type"] != "value_error" and low is not None and high is not None:
        kind = "an integer" if field.annotation in (int, "int") else "a number"
        message = f"expected {kind} from {low} to {high}{(field.json_schema_extra or {}).get('unit', '')}"
    elif first["type"] == "bool_parsing":
        message = "expected true or false"
    elif first["type"] != "value_error":
        message = f"{message} ({field.description})"
    return f"{name}={given.get(name, '')!r} is not valid: {message}"


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from os.environ (or a given mapping); ConfigError, one line, on nonsense.

    An empty variable counts as unset, as compose passes `${VAR:-}` through."""
    env = os.environ if env is None else env
    names = [field.alias for field in Settings.model_fields.values()]
    given = {name: env[name].strip() for name in names if env.get(name, "").strip()}
    # The key reader says how to make a missing key, which beats "is not set".
    given.setdefault("MODEL_SIGNING_PUBLIC_KEY", "")
    try:
        return Settings.model_validate(given)
    except ValidationError as e:
        raise ConfigError(_one_line(e, given)) from None

"""Settings read from the environment through a pydantic model, declared once per program.

Each field names its environment variable (its alias), type, range and meaning; pydantic
converts and checks them, and `load` turns the first refusal into one line naming the
variable. An empty variable counts as unset, as compose passes `${VAR:-}` through.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TypeVar
from urllib.parse import quote

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A setting that cannot work; its message is the one line shown to the operator."""


class EnvSettings(BaseModel):
    """Base of every program's settings: frozen, fields named by their variables."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, validate_by_name=True,
                              validate_by_alias=True, extra="ignore", protected_namespaces=())


Settings = TypeVar("Settings", bound=EnvSettings)


class SweepDatabase(EnvSettings):
    """The Postgres database that holds Optuna's studies, and the role that owns it.

    Declared here because two programs read it: the database set-up creates the role and the
    database, and every sweep worker connects with them."""

    host: str = Field("postgres", alias="POSTGRES_HOST", min_length=1, description="Postgres host")
    port: int = Field(5432, alias="POSTGRES_PORT", ge=1, le=65535, description="Postgres port")
    database: str = Field("optuna", alias="OPTUNA_DB", min_length=1, description="the studies' database")
    user: str = Field("optuna", alias="OPTUNA_DB_USER", min_length=1, description="the role sweeps log in as")
    password: SecretStr = Field(alias="OPTUNA_DB_PASSWORD", description="that role's password")

    def uri(self) -> str:
        user, password = quote(self.user, safe=""), quote(self.password.get_secret_value(), safe="")
        # psycopg2 named explicitly: SQLAlchemy's bare "postgresql" now means psycopg 3.
        return f"postgresql+psycopg2://{user}:{password}@{self.host}:{self.port}/{quote(self.database, safe='')}"


def _bounds(field: FieldInfo) -> tuple[object, object]:
    low = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
    high = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
    return low, high


def _one_line(cls: type[EnvSettings], error: ValidationError, given: Mapping[str, str], missing_hint: str) -> str:
    first = error.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    if first["type"] == "missing":
        return f"{name} is not set{missing_hint}"
    message = first["msg"].removeprefix("Value error, ")
    field = next((f for f in cls.model_fields.values() if f.alias == name), None)
    if field is None or message.startswith(f"{name} "):  # a check across fields, or one naming itself
        return message
    low, high = _bounds(field)
    if first["type"] != "value_error" and low is not None and high is not None:
        kind = "an integer" if field.annotation in (int, "int") else "a number"
        message = f"expected {kind} from {low} to {high}{(field.json_schema_extra or {}).get('unit', '')}"
    elif first["type"] == "bool_parsing":
        message = "expected true or false"
    elif first["type"] != "value_error":
        message = f"{message} ({field.description})"
    return f"{name}={given.get(name, '')!r} is not valid: {message}"


def load(cls: type[Settings], env: Mapping[str, str] | None = None, always: Iterable[str] = (),
         missing_hint: str = "") -> Settings:
    """cls from os.environ (or a given mapping); ConfigError, one line, on nonsense.

    `always` names variables passed even when empty, for fields whose own check says how to
    set them; `missing_hint` follows "NAME is not set"."""
    env = os.environ if env is None else env
    names = [field.alias for field in cls.model_fields.values()]
    given = {name: env[name].strip() for name in names if env.get(name, "").strip()}
    for name in always:
        given.setdefault(name, "")
    try:
        return cls.model_validate(given)
    except ValidationError as e:
        raise ConfigError(_one_line(cls, e, given, missing_hint)) from None

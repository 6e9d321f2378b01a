"""Settings of the serving container, read once from the environment and validated.

Only the standard library (and cryptography, to read the public key) is imported here:
the entry point validates the environment before gunicorn, MLflow or torch are loaded, so
a typo fails in a second with one line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import model_signatures

MIB = 1024 * 1024

# Same rule as MLflow's registry applies to alias names, so a bad alias fails here
# instead of as an endless "alias not found" wait.
_ALIAS_RE = re.compile(r"^[\w\-]{1,255}$")
_RESERVED_ALIAS_RE = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


class ConfigError(ValueError):
    """A setting that cannot work; its message is the one line shown to the operator."""


@dataclass(frozen=True)
class Settings:
    tracking_uri: str
    model_name: str
    # Versions are loaded only when their signature verifies with this key (MODEL_SIGNING_PUBLIC_KEY).
    public_key: model_signatures.PublicKey
    model_alias: str = "production"
    poll_seconds: float = 5.0
    workers: int = 2
    max_body_bytes: int = 8 * MIB
    cache_dir: str = "/tmp/serving-cache"
    torch_threads: int = 1
    port: int = 8080
    bind_host: str = "0.0.0.0"
    graceful_timeout: int = 30
    batch_max_rows: int = 32
    direct_path: bool = True

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}@{self.model_alias}"

    @property
    def bind(self) -> str:
        return f"{self.bind_host}:{self.port}"


def _text(env, name, default=None):
    value = env.get(name, "").strip()
    if value:
        return value
    if default is None:
        raise ConfigError(f"{name} is not set")
    return default


def _number(env, name, default, kind, low, high, unit=""):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    # NaN fails both comparisons, so it is rejected with the other nonsense.
    if value is None or not (low <= value <= high):
        kind_word = "an integer" if kind is int else "a number"
        raise ConfigError(
            f"{name}={raw!r} is not valid: expected {kind_word} from {low} to {high}{unit}"
        )
    return value


def _flag(env, name, default):
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("true", "1", "yes", "on"):
        return True
    if raw in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not valid: expected true or false")


def from_env(env=None) -> Settings:
    """Build Settings from os.environ (or a given mapping); raise ConfigError on nonsense."""
    env = os.environ if env is None else env

    tracking_uri = _text(env, "MLFLOW_TRACKING_URI")
    if "://" not in tracking_uri:
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={tracking_uri!r} is not valid: expected a URI such as "
            "http://mlflow:5000"
        )

    model_name = _text(env, "MODEL_NAME")
    alias = _text(env, "MODEL_ALIAS", "production")
    if not _ALIAS_RE.match(alias) or _RESERVED_ALIAS_RE.match(alias):
        raise ConfigError(
            f"MODEL_ALIAS={alias!r} is not valid: use letters, digits, '_' or '-', "
            "and not 'latest' or 'v<number>' (MLflow reserves those)"
        )

    cache_dir = _text(env, "SERVING_CACHE_DIR", "/tmp/serving-cache")
    if not os.path.isabs(cache_dir):
        raise ConfigError(f"SERVING_CACHE_DIR={cache_dir!r} is not valid: expected an absolute path")

    try:
        public_key = model_signatures.public_key_from_env(env)
    except model_signatures.KeyProblem as e:
        raise ConfigError(str(e)) from None

    return Settings(
        tracking_uri=tracking_uri,
        model_name=model_name,
        public_key=public_key,
        model_alias=alias,
        poll_seconds=_number(env, "ALIAS_POLL_SECONDS", 5.0, float, 0.1, 3600.0, " seconds"),
        workers=_number(env, "SERVING_WORKERS", 2, int, 1, 64),
        max_body_bytes=_number(
            env, "SERVING_MAX_BODY_BYTES", 8 * MIB, int, 1024, 1024 * MIB, " bytes"
        ),
        cache_dir=cache_dir,
        torch_threads=_number(env, "SERVING_TORCH_THREADS", 1, int, 1, 256),
        port=_number(env, "SERVING_CONTAINER_PORT", 8080, int, 1, 65535),
        bind_host=_text(env, "SERVING_BIND_HOST", "0.0.0.0"),
        graceful_timeout=_number(
            env, "SERVING_GRACEFUL_TIMEOUT", 30, int, 1, 3600, " seconds"
        ),
        batch_max_rows=_number(env, "SERVING_BATCH_MAX_ROWS", 32, int, 1, 4096),
        direct_path=_flag(env, "SERVING_DIRECT_PATH", True),
    )


def safe_uri(uri: str) -> str:
    """The URI with any user:password@ removed, for logs and /status."""
    return re.sub(r"(?<=://)[^/@]*@", "", uri)

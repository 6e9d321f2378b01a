"""Serving settings: defaults, and a one-line error for each value that cannot work."""

import base64
from pathlib import Path

import pytest
from signing_keys import signing_key_pair

from serving import config
from stack_common.uris import redact

KEYS = signing_key_pair()
REQUIRED = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MODEL_NAME": "fashion-mnist-cnn",
            "MODEL_SIGNING_PUBLIC_KEY": KEYS["MODEL_SIGNING_PUBLIC_KEY"]}


def test_defaults():
    s = config.from_env(REQUIRED)
    assert s.model_uri == "models:/fashion-mnist-cnn@production"
    assert s.poll_seconds == 5.0
    assert s.workers == 2
    assert s.max_body_bytes == 8 * 1024 * 1024
    assert s.cache_dir == "/tmp/serving-cache"
    assert s.torch_threads == 1
    assert s.bind == "0.0.0.0:8080"
    assert s.batch_max_rows == 32


def test_values_are_read():
    s = config.from_env(
        {
            **REQUIRED,
            "MODEL_ALIAS": "staging",
            "ALIAS_POLL_SECONDS": "1",
            "SERVING_WORKERS": "4",
            "SERVING_MAX_BODY_BYTES": "1048576",
            "SERVING_CACHE_DIR": "/tmp/models",
            "SERVING_TORCH_THREADS": "2",
            "SERVING_CONTAINER_PORT": "9000",
        }
    )
    assert (s.model_alias, s.poll_seconds, s.workers, s.max_body_bytes) == ("staging", 1.0, 4, 1048576)
    assert (s.cache_dir, s.torch_threads, s.port) == ("/tmp/models", 2, 9000)


@pytest.mark.parametrize(
    "name, value",
    [
        ("MLFLOW_TRACKING_URI", ""),
        ("MLFLOW_TRACKING_URI", "mlflow:5000"),
        ("MODEL_NAME", ""),
        ("MODEL_ALIAS", "prod uction"),
        ("MODEL_ALIAS", "latest"),
        ("MODEL_ALIAS", "v3"),
        ("ALIAS_POLL_SECONDS", "soon"),
        ("ALIAS_POLL_SECONDS", "0"),
        ("ALIAS_POLL_SECONDS", "-5"),
        ("ALIAS_POLL_SECONDS", "nan"),
        ("SERVING_WORKERS", "0"),
        ("SERVING_WORKERS", "2.5"),
        ("SERVING_MAX_BODY_BYTES", "8MiB"),
        ("SERVING_MAX_BODY_BYTES", "10"),
        ("SERVING_CACHE_DIR", "relative/cache"),
        ("SERVING_TORCH_THREADS", "0"),
        ("SERVING_CONTAINER_PORT", "70000"),
        ("SERVING_BATCH_MAX_ROWS", "0"),
        ("MODEL_SIGNING_PUBLIC_KEY", ""),
        ("MODEL_SIGNING_PUBLIC_KEY", "not base64!"),
        ("MODEL_SIGNING_PUBLIC_KEY", base64.b64encode(b"-----BEGIN PUBLIC KEY-----\nAAAA\n").decode()),
        ("MODEL_SIGNING_PUBLIC_KEY", KEYS["MODEL_SIGNING_KEY"]),  # the private half
    ],
)
def test_nonsense_is_one_line_naming_the_setting(name, value):
    with pytest.raises(config.ConfigError) as e:
        config.from_env({**REQUIRED, name: value})
    message = str(e.value)
    assert name in message and "\n" not in message


def test_credentials_never_shown():
    assert redact("http://serving:s3cret@mlflow:5000/") == "http://mlflow:5000/"
    assert redact("http://mlflow:5000") == "http://mlflow:5000"


def test_direct_path_can_be_turned_off():
    assert config.from_env(REQUIRED).direct_path is True
    assert config.from_env({**REQUIRED, "SERVING_DIRECT_PATH": "false"}).direct_path is False
    with pytest.raises(config.ConfigError, match="SERVING_DIRECT_PATH"):
        config.from_env({**REQUIRED, "SERVING_DIRECT_PATH": "perhaps"})


def test_every_setting_declares_its_variable_and_meaning():
    for name, field in config.Settings.model_fields.items():
        assert field.alias and field.alias.upper() == field.alias, name
        assert field.description, name
    documented = (Path(config.__file__).parent / "README.md").read_text()
    missing = [f.alias for f in config.Settings.model_fields.values() if f"`{f.alias}`" not in documented]
    assert not missing, f"not in serving/README.md: {missing}"


@pytest.mark.parametrize("uri, shown", [
    ("https://user:p%40ss@mlflow.example:443/prefix?x=1", "https://mlflow.example:443/prefix?x=1"),
    ("http://token@mlflow:5000", "http://mlflow:5000"),
    ("sqlite:///tmp/mlflow.db", "sqlite:///tmp/mlflow.db"),
])
def test_credentials_never_shown_in_any_uri(uri, shown):
    assert redact(uri) == shown

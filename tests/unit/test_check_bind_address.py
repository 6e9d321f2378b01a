"""`make up` refuses to publish the stack beyond this machine over plain http unless told to."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/check-bind-address.sh"
PLAIN = "compose.yaml:compose.offline.yaml"
TLS = "compose.yaml:compose.offline.yaml:compose.tls.yaml"
SETTINGS = ("BIND_ADDRESS", "COMPOSE_FILE", "ALLOW_PLAINTEXT_SHARING", "SERVING_AUTH")


def check(tmp_path: Path, environment: dict[str, str] | None = None, **settings: str) -> subprocess.CompletedProcess:
    """Runs the check against an .env holding `settings`, as `make up` does."""
    env_file = tmp_path / ".env"
    env_file.write_text("# written by the test\nCOMPOSE_PROJECT_NAME=mlops\n"
                        + "".join(f"{name}={value}\n" for name, value in settings.items()))
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS} | (environment or {})
    return subprocess.run([str(SCRIPT), str(env_file)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.1.1", "localhost", "::1", "[::1]", "0:0:0:0:0:0:0:1", ""])
def test_loopback_starts_quietly_without_tls(tmp_path, address):
    result = check(tmp_path, BIND_ADDRESS=address, COMPOSE_FILE=PLAIN)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_no_env_file_means_loopback(tmp_path):
    result = subprocess.run([str(SCRIPT), str(tmp_path / "missing.env")], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k not in SETTINGS})
    assert result.returncode == 0 and result.stderr == ""


@pytest.mark.parametrize("address", ["0.0.0.0", "10.0.4.17", "192.168.1.20", "::", "fe80::1", "2001:db8::1",
                                     "[2001:db8::1]", "mlflow.team.example"])
def test_beyond_loopback_without_tls_is_refused_with_the_fix(tmp_path, address):
    result = check(tmp_path, BIND_ADDRESS=address, COMPOSE_FILE=PLAIN)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert f"BIND_ADDRESS={address}" in lines[0]
    assert "compose.tls.yaml" in lines[0] and "COMPOSE_FILE" in lines[0]
    assert "ALLOW_PLAINTEXT_SHARING=yes" in lines[0]


def test_no_setting_for_the_override_is_the_same_as_no(tmp_path):
    assert check(tmp_path, BIND_ADDRESS="0.0.0.0", COMPOSE_FILE=PLAIN, ALLOW_PLAINTEXT_SHARING="no").returncode == 1
    assert check(tmp_path, BIND_ADDRESS="0.0.0.0", COMPOSE_FILE=PLAIN).returncode == 1
    # A default COMPOSE_FILE (the line missing) has no TLS file either.
    assert check(tmp_path, BIND_ADDRESS="0.0.0.0").returncode == 1


@pytest.mark.parametrize("address", ["0.0.0.0", "10.0.4.17", "::", "2001:db8::1"])
def test_beyond_loopback_with_the_tls_proxy_starts_quietly(tmp_path, address):
    result = check(tmp_path, BIND_ADDRESS=address, COMPOSE_FILE=TLS)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_open_model_endpoint_behind_the_proxy_gets_a_warning(tmp_path):
    """An .env from before SERVING_AUTH defaulted to basic says none."""
    shared = check(tmp_path, BIND_ADDRESS="0.0.0.0", COMPOSE_FILE=TLS, SERVING_AUTH="none")
    assert shared.returncode == 0
    lines = shared.stderr.splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "SERVING_AUTH=basic" in lines[0], lines
    for quiet in (check(tmp_path, BIND_ADDRESS="0.0.0.0", COMPOSE_FILE=TLS, SERVING_AUTH="basic"),
                  check(tmp_path, BIND_ADDRESS="127.0.0.1", COMPOSE_FILE=TLS, SERVING_AUTH="none")):
        assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.parametrize("address", ["0.0.0.0", "10.0.4.17", "2001:db8::1"])
def test_override_starts_with_one_warning_line(tmp_path, address):
    result = check(tmp_path, BIND_ADDRESS=address, COMPOSE_FILE=PLAIN, ALLOW_PLAINTEXT_SHARING="yes")
    assert result.returncode == 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "clear text" in lines[0], lines


@pytest.mark.parametrize("value", ["true", "1", "YES", "please"])
def test_nonsense_override_is_refused_in_one_line(tmp_path, value):
    result = check(tmp_path, BIND_ADDRESS="127.0.0.1", COMPOSE_FILE=PLAIN, ALLOW_PLAINTEXT_SHARING=value)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"make up: ALLOW_PLAINTEXT_SHARING must be yes or no, not '{value}'"]


def test_environment_wins_over_env_file_like_compose(tmp_path):
    """Compose reads BIND_ADDRESS from the environment before .env, so the check must too."""
    refused = check(tmp_path, {"BIND_ADDRESS": "0.0.0.0"}, BIND_ADDRESS="127.0.0.1", COMPOSE_FILE=PLAIN)
    assert refused.returncode == 1
    allowed = check(tmp_path, {"COMPOSE_FILE": TLS}, BIND_ADDRESS="0.0.0.0", COMPOSE_FILE=PLAIN)
    assert allowed.returncode == 0, allowed.stderr

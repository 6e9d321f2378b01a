"""`make env`: fresh random secrets, mode 600, and never a changed value on re-runs."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ["POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY",
           "S3_APP_ACCESS_KEY", "S3_APP_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD",
           "MLFLOW_FLASK_SERVER_SECRET_KEY", "TRAINER_PASSWORD", "SERVING_PASSWORD",
           "SERVING_CLIENT_PASSWORD", "SERVING_METRICS_TOKEN", "MONITORING_PASSWORD", "PREDICTION_LOG_PASSWORD",
           "BACKUP_KEY"]


def make_env(path: Path) -> str:
    env = dict(os.environ, OFFLINE="1")
    return subprocess.run([str(ROOT / "scripts/env.sh"), str(path)], check=True, env=env,
                          capture_output=True, text=True).stdout


def read(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if "=" in line and not line.startswith("#"))


def test_example_has_no_secret_values():
    example = read(ROOT / ".env.example")
    assert all(example[name] == "" for name in SECRETS + ["MODEL_SIGNING_KEY", "MODEL_SIGNING_PUBLIC_KEY"])


def test_model_signing_pair_is_generated_once_and_matches(tmp_path):
    first, second = tmp_path / "a.env", tmp_path / "b.env"
    make_env(first)
    make_env(second)
    a, b = read(first), read(second)
    assert a["MODEL_SIGNING_KEY"] != b["MODEL_SIGNING_KEY"]
    private = base64.b64decode(a["MODEL_SIGNING_KEY"])
    public = base64.b64decode(a["MODEL_SIGNING_PUBLIC_KEY"])
    assert public.startswith(b"-----BEGIN PUBLIC KEY-----")
    # The private half is a PEM key: openssl derives the very public key from it below.
    derived = subprocess.run(["openssl", "pkey", "-pubout"], input=private, capture_output=True, check=True).stdout
    assert derived == public
    make_env(first)
    assert read(first)["MODEL_SIGNING_KEY"] == a["MODEL_SIGNING_KEY"]


def test_first_run_writes_strong_distinct_secrets_with_mode_600(tmp_path):
    first, second = tmp_path / "a.env", tmp_path / "b.env"
    assert "fresh random secrets" in make_env(first)
    make_env(second)
    a, b = read(first), read(second)
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    for name in SECRETS:
        assert len(a[name]) >= 32, name
        assert a[name] != b[name], f"{name} is not random"
    assert len({a[name] for name in SECRETS}) == len(SECRETS)


def test_rerun_keeps_values_and_fills_only_what_is_missing(tmp_path):
    path = tmp_path / ".env"
    make_env(path)
    original = read(path)
    lines = [line for line in path.read_text().splitlines() if not line.startswith("SERVING_PASSWORD=")]
    lines = [("TRAINER_PASSWORD=" if line.startswith("TRAINER_PASSWORD=") else line) for line in lines]
    path.write_text("\n".join(lines) + "\n")
    output = make_env(path)
    updated = read(path)
    assert "SERVING_PASSWORD" in output and "TRAINER_PASSWORD" in output
    assert updated["SERVING_PASSWORD"] and updated["TRAINER_PASSWORD"]
    assert updated["TRAINER_PASSWORD"] != original["TRAINER_PASSWORD"]
    unchanged = {k: v for k, v in original.items() if k not in ("SERVING_PASSWORD", "TRAINER_PASSWORD")}
    assert {k: updated[k] for k in unchanged} == unchanged


def test_a_default_that_a_release_retired_is_replaced_and_said(tmp_path):
    """An older .env names the S3 stand-in image without SigV4 checks; keeping it would keep
    the hole the new image closes."""
    path = tmp_path / ".env"
    make_env(path)
    lines = [("OFFLINE_S3_IMAGE=mlops-local/s3:s3rver-3.7.1" if line.startswith("OFFLINE_S3_IMAGE=") else line)
             for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")
    output = make_env(path)
    assert read(path)["OFFLINE_S3_IMAGE"] == read(ROOT / ".env.example")["OFFLINE_S3_IMAGE"]
    assert "Updated OFFLINE_S3_IMAGE" in output

"""The compose files as users combine them: valid, and strict about secrets. No stack needed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from stack import ROOT, write_env

VARIANTS = {
    "default": ["compose.yaml"],
    "offline": ["compose.yaml", "compose.offline.yaml"],
    "gpu": ["compose.yaml", "compose.gpu.yaml"],
    "offline+gpu": ["compose.yaml", "compose.offline.yaml", "compose.gpu.yaml"],
    "tls": ["compose.yaml", "compose.tls.yaml"],
    "offline+tls": ["compose.yaml", "compose.offline.yaml", "compose.tls.yaml"],
}


def compose_config(env_file: Path, files: list[str]) -> subprocess.CompletedProcess:
    cmd = ["docker", "compose", "--env-file", str(env_file), "--profile", "train"]
    for f in files:
        cmd += ["-f", str(ROOT / f)]
    return subprocess.run(cmd + ["config", "--format", "yaml"], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / ".env"
    write_env(path, offline=False, overrides={})
    return path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_is_valid(env_file, variant):
    result = compose_config(env_file, VARIANTS[variant])
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert {"postgres", "minio", "s3-init", "mlflow", "mlflow-init", "trainer", "serving"} <= services.keys()
    # Postgres and S3 never get a host port; published ports bind to the loopback default.
    assert "ports" not in services["postgres"] and "ports" not in services["minio"]
    for name in ("mlflow", "serving") + (("proxy",) if "tls" in variant else ()):
        assert all(p["host_ip"] == "127.0.0.1" for p in services[name]["ports"])
    gpu_requested = "devices" in str(services["trainer"].get("deploy", {}))
    assert gpu_requested == ("gpu" in variant)
    if "offline" in variant:
        assert services["postgres"]["pull_policy"] == "never"
        assert services["minio"]["pull_policy"] == "never"


def test_missing_secret_stops_compose_and_names_it(env_file, tmp_path):
    broken = tmp_path / ".env"
    broken.write_text("".join(line + "\n" for line in env_file.read_text().splitlines()
                              if not line.startswith("POSTGRES_PASSWORD=")))
    result = compose_config(broken, VARIANTS["default"])
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr

"""The compose files as users combine them: valid, and strict about secrets. No stack needed."""

from __future__ import annotations

import re
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


def compose_config(env_file: Path, files: list[str], *profiles: str) -> subprocess.CompletedProcess:
    cmd = ["docker", "compose", "--env-file", str(env_file), "--profile", "train"]
    for profile in profiles:
        cmd += ["--profile", profile]
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
    # Serving is reached through the gateway, which is what lets it be replaced in place.
    assert "ports" not in services["serving"]
    for name in ("mlflow", "gateway") + (("proxy",) if "tls" in variant else ()):
        assert all(p["host_ip"] == "127.0.0.1" for p in services[name]["ports"])
    gpu_requested = "devices" in str(services["trainer"].get("deploy", {}))
    assert gpu_requested == ("gpu" in variant)
    if "offline" in variant:
        assert services["postgres"]["pull_policy"] == "never"
        assert services["minio"]["pull_policy"] == "never"


def test_prometheus_without_a_login_stays_on_this_machine_when_the_stack_is_shared(env_file, tmp_path):
    shared = tmp_path / ".env"
    shared.write_text(env_file.read_text() + "BIND_ADDRESS=0.0.0.0\n")
    result = compose_config(shared, VARIANTS["default"], "monitoring")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {p["host_ip"] for p in services["mlflow"]["ports"]} == {"0.0.0.0"}
    assert {p["host_ip"] for p in services["prometheus"]["ports"]} == {"127.0.0.1"}


def test_scheduled_retention_is_gc_with_the_same_rights_and_a_schedule(env_file):
    result = compose_config(env_file, VARIANTS["default"], "tools", "retention")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    scheduled, once = services["gc-schedule"], services["gc"]
    assert scheduled["entrypoint"] == once["entrypoint"] and scheduled["networks"] == once["networks"]
    assert {k: v for k, v in scheduled["environment"].items() if not k.startswith("GC_")} == once["environment"]
    assert scheduled["environment"]["GC_EVERY_HOURS"] == "24" and scheduled["restart"] == "unless-stopped"
    assert scheduled["init"] is True and scheduled["read_only"] is True


def test_missing_secret_stops_compose_and_names_it(env_file, tmp_path):
    broken = tmp_path / ".env"
    broken.write_text("".join(line + "\n" for line in env_file.read_text().splitlines()
                              if not line.startswith("POSTGRES_PASSWORD=")))
    result = compose_config(broken, VARIANTS["default"])
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_single_sign_on_needs_its_provider_settings_and_hands_out_no_password(env_file, tmp_path):
    files = ["compose.yaml", "compose.oidc.yaml"]
    result = compose_config(env_file, files)
    assert result.returncode != 0
    # Compose names the first unset one it meets, in no fixed order.
    assert re.search(r"OIDC_(DISCOVERY_URL|CLIENT_ID|CLIENT_SECRET|REDIRECT_URI) is not set; see Single sign-on",
                     result.stderr), result.stderr
    provider = {"OIDC_DISCOVERY_URL": "https://idp.example.com/.well-known/openid-configuration",
                "OIDC_CLIENT_ID": "mlflow", "OIDC_CLIENT_SECRET": "from-the-provider",
                "OIDC_REDIRECT_URI": "https://mlflow.example.com/callback"}
    configured = tmp_path / ".env"
    configured.write_text("".join(line + "\n" for line in env_file.read_text().splitlines()
                                  if line.split("=", 1)[0] not in provider)
                          + "".join(f"{k}={v}\n" for k, v in provider.items()))
    result = compose_config(configured, files)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["mlflow"]["environment"]["AUTH_MODE"] == "oidc"
    assert services["db-init"]["environment"]["AUTH_MODE"] == "oidc"
    # The service accounts' tokens come from a volume each, never from the environment.
    for name, home in (("trainer", "/home/app/.mlflow"), ("serving", "/tmp/.mlflow")):
        assert services[name]["environment"]["MLFLOW_TRACKING_PASSWORD"] == ""
        mount = next(v for v in services[name]["volumes"] if v["target"] == home)
        assert mount["source"] == f"{name}-credentials" and mount["read_only"]
    # mlflow-init works in the plugin's store as the server's role: no admin or service password.
    init = services["mlflow-init"]["environment"]
    assert "MLFLOW_DB_PASSWORD" in init
    assert not {"MLFLOW_ADMIN_PASSWORD", "TRAINER_PASSWORD", "SERVING_PASSWORD", "POSTGRES_PASSWORD"} & init.keys()

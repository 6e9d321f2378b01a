"""Upgrading MLflow keeps everything: a stack whose tracking server runs the previous MLflow
minor (the same Dockerfile, built with MLFLOW_VERSION) writes runs, metrics, artifacts, a
registered model with versions and an alias, and a teammate with a grant; the same volumes
then come up under the current image, which upgrades both schemas, and every one of them
reads back the same. Runs its own compose project, beside the shared stack."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.server.auth.client import AuthServiceClient
from stack import ROOT, Stack, free_port, signed_in_as, write_env

PREVIOUS_MLFLOW = "3.16.1"
TEAMMATE = "teammate"


def build_previous_image(offline: bool, tag: str) -> None:
    bundle = os.environ.get("BUILD_CA_BUNDLE") or str(ROOT / "docker/no-extra-ca.pem")
    base = "mlops-local/debian:trixie" if offline else "debian:trixie-slim"
    subprocess.run(["docker", "build", "--target", "mlflow", "--build-arg", f"MLFLOW_VERSION={PREVIOUS_MLFLOW}",
                    "--build-arg", f"BASE_IMAGE={base}", "--secret", f"id=ca_bundle,src={bundle}",
                    "-f", "docker/Dockerfile", "-t", tag, "."],
                   check=True, cwd=ROOT, env={**os.environ, "DOCKER_BUILDKIT": "1"}, capture_output=True, timeout=1800)


@pytest.fixture(scope="module")
def upgraded(images, tmp_path_factory) -> dict:
    offline = images
    project = f"mlopsupgrade{uuid.uuid4().hex[:8]}"
    previous_image = f"mlops/mlflow:mlflow-{PREVIOUS_MLFLOW}"
    build_previous_image(offline, previous_image)
    workdir = tmp_path_factory.mktemp("upgrade")
    env_file = workdir / ".env"
    env = write_env(env_file, offline, {"COMPOSE_PROJECT_NAME": project, "MLFLOW_PORT": str(free_port()),
                                        "SERVING_PORT": str(free_port()), "PREVIOUS_MLFLOW_IMAGE": previous_image})
    previous = Stack(project=project, env_file=env_file, offline=offline, env=env,
                     extra_files=(ROOT / "tests/upgrade/compose.previous.yaml",))
    current = Stack(project=project, env_file=env_file, offline=offline, env=env)
    try:
        previous.compose("up", "-d", "--wait", "--wait-timeout", "300")
        assert server_mlflow_version(previous) == PREVIOUS_MLFLOW
        with signed_in_as(previous, "admin") as client:
            write_data(previous, client)
            before = snapshot(previous, client, workdir / "before")
        current.compose("up", "-d", "--wait", "--wait-timeout", "300")
        with signed_in_as(current, "admin") as client:
            yield {"before": before, "stack": current, "client": client, "workdir": workdir}
    finally:
        current.compose("--profile", "train", "down", "--volumes", "--remove-orphans", check=False)


def server_mlflow_version(stack: Stack) -> str:
    version = stack.compose("exec", "-T", "mlflow", "python", "-c", "import mlflow; print(mlflow.__version__)")
    return version.stdout.strip()


def write_data(stack: Stack, client: MlflowClient) -> None:
    experiment_id = client.create_experiment("upgrade-check")
    run = client.create_run(experiment_id, run_name="written-by-the-previous-mlflow")
    run_id = run.info.run_id
    client.log_param(run_id, "learning_rate", "0.01")
    client.set_tag(run_id, "team", "vision")
    for step in range(20):
        client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step, timestamp=1_700_000_000_000 + step)
    artifact = stack.env_file.parent / "weights.bin"
    artifact.write_bytes(os.urandom(200_000))
    client.log_artifact(run_id, str(artifact), artifact_path="model")
    client.set_terminated(run_id, "FINISHED")
    name = "upgrade-check-model"
    client.create_registered_model(name, tags={"owner": "vision"})
    for _ in range(2):
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run_id)
    client.set_registered_model_alias(name, "production", "1")
    auth = AuthServiceClient(stack.mlflow_url)
    auth.create_user(TEAMMATE, "teammate-password-1")
    auth.grant_user_permission(TEAMMATE, "experiment", experiment_id, "READ")


def snapshot(stack: Stack, client: MlflowClient, workdir: Path) -> dict:
    experiment = client.get_experiment_by_name("upgrade-check")
    runs = client.search_runs([experiment.experiment_id])
    state = {"experiment": (experiment.name, experiment.lifecycle_stage), "runs": {}}
    for run in runs:
        local = Path(download_artifacts(run_id=run.info.run_id, artifact_path="", tracking_uri=stack.mlflow_url,
                                        dst_path=str(workdir / run.info.run_id)))
        state["runs"][run.info.run_id] = {
            "name": run.info.run_name, "status": run.info.status, "params": run.data.params,
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
            "loss": [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, "loss")],
            "artifacts": {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in sorted(local.rglob("*")) if p.is_file()},
        }
    model = client.get_registered_model("upgrade-check-model")
    state["model"] = {"tags": model.tags, "aliases": model.aliases,
                      "versions": sorted((v.version, v.run_id, v.source, v.status)
                                         for v in client.search_model_versions("name='upgrade-check-model'"))}
    auth = AuthServiceClient(stack.mlflow_url)
    state["teammate"] = {"is_admin": auth.get_user(TEAMMATE).is_admin,
                         "experiment": auth.get_user_permission(TEAMMATE, "experiment",
                                                                experiment.experiment_id).permission}
    return state


def test_the_current_image_upgraded_the_previous_mlflows_data(upgraded):
    stack = upgraded["stack"]
    assert server_mlflow_version(stack) != PREVIOUS_MLFLOW
    assert snapshot(stack, upgraded["client"], upgraded["workdir"] / "after") == upgraded["before"]


def test_the_teammate_logs_in_with_the_same_password_after_the_upgrade(upgraded):
    stack = upgraded["stack"]
    search = f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=10"
    answer = requests.get(search, auth=(TEAMMATE, "teammate-password-1"), timeout=30)
    assert answer.status_code == 200, answer.text
    assert [e["name"] for e in answer.json()["experiments"]] == ["upgrade-check"]

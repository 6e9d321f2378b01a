"""Only models the trainer made are served. A version registered without the trainer's
signature, or whose files were changed after it was signed, is refused before its code
can run: the old version keeps serving (or nothing, after a restart) and /status says why."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient
from stack import Stack, poll, signed_in_as

IMAGE = [[[0.0] * 28] * 28]
# Written by the code of the refused model, inside the serving container, if it ever ran.
MARKER = "/tmp/refused-model-ran"
# A models-from-code pyfunc as anyone with registry access could log it. Its code writes
# the marker when serving imports it (SERVING_CACHE_DIR is set only in the serving image,
# so logging it from here leaves no marker on this machine).
UNSIGNED_CODE = f"""
import os
import mlflow

if os.environ.get("SERVING_CACHE_DIR"):
    open({MARKER!r}, "w").write("the code of a refused model ran")


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(Echo())
"""


def holder(client: MlflowClient, stack: Stack) -> str:
    return client.get_model_version_by_alias(stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"]).version


def marker_in_serving(stack: Stack) -> bool:
    return stack.compose("exec", "-T", "serving", "test", "-e", MARKER, check=False).returncode == 0


def refusal(stack: Stack, version: str) -> dict:
    return poll(f"serving to refuse version {version}",
                lambda: (s := stack.serving_status()) and f"version {version} refused" in (s.get("last_error") or "")
                and s, timeout=120)


def answered_by(stack: Stack) -> str:
    answer = requests.post(f"{stack.serving_url}/invocations", json={"inputs": [IMAGE]}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.headers["X-Model-Version"]


def test_version_trained_by_the_trainer_is_signed_for_itself_and_served(stack: Stack, trained, admin_client):
    good = holder(admin_client, stack)
    status = stack.wait_served_version(good, timeout=180)
    assert status["last_error"] is None
    version = admin_client.get_model_version(stack.env["MODEL_NAME"], good)
    files = mlflow.artifacts.download_artifacts(
        artifact_uri=admin_client.get_model_version_download_uri(stack.env["MODEL_NAME"], good),
        tracking_uri=stack.mlflow_url)
    provenance = json.loads((Path(files) / "provenance.json").read_text())
    # The registry names the logged model as the version's source (models:/<id>).
    assert provenance == {"registered_model": stack.env["MODEL_NAME"], "run_id": version.run_id,
                          "model_id": version.model_id or version.source.removeprefix("models:/")}
    assert (Path(files) / "model.sig").is_file()


def test_unsigned_version_set_by_the_admin_is_refused_and_its_code_never_runs(
        stack: Stack, trained, admin_client, tmp_path):
    name, alias = stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"]
    good = holder(admin_client, stack)
    stack.wait_served_version(good, timeout=180)

    code = tmp_path / "unsigned_model.py"
    code.write_text(UNSIGNED_CODE)
    mlflow.set_tracking_uri(stack.mlflow_url)  # the registry resolves models:/m-... through it
    # Logged where the served model's files live, the one experiment serving may read from.
    experiment = admin_client.get_experiment_by_name(stack.env["EXPERIMENT_NAME"]).experiment_id
    with mlflow.start_run(experiment_id=experiment) as run:
        logged = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=[])
    unsigned = admin_client.create_model_version(name, logged.model_uri, run_id=run.info.run_id,
                                                 model_id=logged.model_id).version
    admin_client.set_registered_model_alias(name, alias, unsigned)
    try:
        status = refusal(stack, unsigned)
        assert status["last_error"] == f"version {unsigned} refused: it is not signed"
        assert str(status["version"]) == good
        assert answered_by(stack) == good
        assert not marker_in_serving(stack), "the refused model's code ran in the serving container"
        logs = stack.compose("logs", "--no-color", "serving").stdout
        assert f"version {unsigned} refused: it is not signed" in logs
    finally:
        admin_client.set_registered_model_alias(name, alias, good)
    poll("the refusal to clear", lambda: stack.serving_status()["last_error"] is None, timeout=60)


def test_weights_overwritten_with_the_trainers_account_are_refused_after_a_restart(
        stack: Stack, trained, admin_client, tmp_path):
    name, alias = stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"]
    good = holder(admin_client, stack)
    fresh = stack.train("--epochs", "1", "--batch-size", "32", "--promotion-policy", "always")["version"]
    try:
        stack.wait_served_version(fresh, timeout=180)
        with signed_in_as(stack, "trainer") as trainer:
            version = trainer.get_model_version(name, fresh)
            stored = mlflow.artifacts.list_artifacts(
                artifact_uri=trainer.get_model_version_download_uri(name, fresh) + "/artifacts",
                tracking_uri=stack.mlflow_url)
            assert [f.path.rsplit("/", 1)[-1] for f in stored] == ["model.pt"]
            forged = tmp_path / "model.pt"
            forged.write_bytes(b"not the weights the trainer signed")
            # Through the artifact proxy, as the trainer account may: no S3 key involved.
            # The registry names the logged model as the version's source (models:/<id>).
            model_id = version.model_id or version.source.removeprefix("models:/")
            trainer.log_model_artifact(model_id, str(forged), artifact_path="artifacts")

        # A restart answers with the copy it verified before (the serving-cache volume),
        # verified again: never with the forged file.
        stack.compose("restart", "serving")
        poll(f"every worker to answer with its verified copy of version {fresh}",
             lambda: all(answered_by(stack) == fresh for _ in range(8)), timeout=180)
        # Without that copy, serving downloads the version again and refuses it.
        stack.compose("rm", "--stop", "--force", "serving")
        subprocess.run(["docker", "volume", "rm", f"{stack.project}_serving-cache"], check=True,
                       capture_output=True)
        stack.compose("up", "-d", "--no-deps", "serving")
        status = refusal(stack, fresh)
        assert status["last_error"] == f"version {fresh} refused: its files differ from the files that were signed"
        assert status["state"] == "waiting" and status["version"] is None
        shown = json.dumps({k: v for k, v in status.items() if k != "model_uri"})
        assert "/" not in shown and "sha256" not in shown  # our words only; details in the log
        assert "model.pt" in stack.compose("logs", "--no-color", "serving").stdout
    finally:
        admin_client.set_registered_model_alias(name, alias, good)
    # Each worker follows the alias on its own: wait until none is still without a model.
    poll(f"every worker to serve version {good}",
         lambda: all(answered_by(stack) == good for _ in range(8)), timeout=180)

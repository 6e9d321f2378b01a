"""Canary and shadow rollouts through the stack, as `make canary`, `make shadow` and
`make abort-rollout` run them, and a restarted serving container answering at once from the
version it served before. The challenger is the session's `challenger`, a later version
never promoted; production is whichever version holds the alias when the module starts."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from stack import Stack, poll

import model_signatures

IMAGE = [[[0.5] * 28] * 28]
CANARY_PERCENT = 30
CANARY_REQUESTS = 400
# Two workers draw independently; 0.30 ± 0.10 is more than four standard deviations of a
# binomial share over 400 requests (0.023), so only a wrong share fails it.
CANARY_TOLERANCE = 0.10
# Each worker reads the rollout in its own poll; this many status answers in a row that agree
# (fresh connections, so both workers are asked) means both have seen it.
AGREEING_STATUS_ANSWERS = 12

# A version that passes every check serving makes before it serves one (signed for this
# model, answers its input example) and fails on the traffic it then gets.
FAILS_ON_TRAFFIC = """
import mlflow
import numpy as np


class FailsOnTraffic(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        x = np.asarray(model_input, dtype=np.float32)
        if not x.any():  # the input example: a black image
            return np.full((len(x), 10), 0.1, dtype=np.float32)
        raise RuntimeError("this version breaks on real images")


mlflow.models.set_model(FailsOnTraffic())
"""


def registry_cli(stack: Stack, *args: str) -> None:
    """What `make canary`, `make shadow` and `make abort-rollout` run."""
    result = stack.compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "trainer",
                           "-m", "trainer.registry_cli", *args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def every_worker_reports(stack: Stack, what: str, check) -> None:
    def all_agree() -> bool:
        return all(check(requests.get(f"{stack.serving_url}/status", timeout=5).json()["rollout"])
                   for _ in range(AGREEING_STATUS_ANSWERS))

    poll(f"every serving worker to report {what}", all_agree, timeout=120)


def answering_versions(stack: Stack, count: int) -> list[str]:
    versions = []
    with requests.Session() as session:
        for _ in range(count):
            answer = session.post(f"{stack.serving_url}/invocations", json={"inputs": [IMAGE]}, timeout=30)
            assert answer.status_code == 200, answer.text[:300]
            versions.append(answer.headers["X-Model-Version"])
    return versions


@pytest.fixture(scope="module")
def versions(stack: Stack, trained, challenger, admin_client: MlflowClient) -> dict[str, str]:
    production = admin_client.get_model_version_by_alias(stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"]).version
    stack.wait_served_version(production, timeout=180)
    return {"production": production, "challenger": challenger["version"]}


def test_canary_answers_its_share_with_the_challenger(stack: Stack, versions):
    registry_cli(stack, "canary", versions["challenger"], "--percent", str(CANARY_PERCENT))
    every_worker_reports(stack, f"a canary of version {versions['challenger']}",
                         lambda r: r["state"] == "active" and r["mode"] == "canary"
                         and r["challenger_version"] == versions["challenger"])
    answered = answering_versions(stack, CANARY_REQUESTS)
    assert set(answered) == {versions["production"], versions["challenger"]}
    share = answered.count(versions["challenger"]) / CANARY_REQUESTS
    assert abs(share - CANARY_PERCENT / 100) <= CANARY_TOLERANCE, share


def test_shadow_leaves_answers_to_production_and_records_agreement(stack: Stack, versions):
    registry_cli(stack, "shadow", versions["challenger"])
    every_worker_reports(stack, f"a shadow of version {versions['challenger']}",
                         lambda r: r["state"] == "active" and r["mode"] == "shadow")
    assert set(answering_versions(stack, 100)) == {versions["production"]}

    def compared() -> dict | None:
        shadow = requests.get(f"{stack.serving_url}/status", timeout=5).json()["rollout"]["shadow"]
        counts = shadow.get(versions["challenger"])
        return counts if counts and counts["compared_rows"] > 0 else None

    counts = poll("a worker to compare the challenger's answers with production's", compared, timeout=60)
    assert 0 <= counts["agreement_rate"] <= 1 and counts["agreed_rows"] <= counts["compared_rows"]


def test_abort_sends_every_request_back_to_production(stack: Stack, versions):
    registry_cli(stack, "abort")
    every_worker_reports(stack, "no rollout", lambda r: r["state"] == "none")
    assert set(answering_versions(stack, 50)) == {versions["production"]}


def test_restarted_serving_answers_with_its_cached_version(stack: Stack, versions):
    stack.compose("restart", "serving")

    def every_worker_serving() -> list[dict] | None:
        answers = [requests.get(f"{stack.serving_url}/status", timeout=5).json()
                   for _ in range(AGREEING_STATUS_ANSWERS)]
        return answers if all(a["state"] == "serving" for a in answers) else None

    statuses = poll("every serving worker to answer again after the restart", every_worker_serving, timeout=180)
    assert {s["warm_started_version"] for s in statuses} == {versions["production"]}, statuses
    assert set(answering_versions(stack, 10)) == {versions["production"]}


def register_failing_version(stack: Stack, admin_client: MlflowClient, tmp_path: Path) -> str:
    """Signed with the stack's key as the trainer signs, logged where serving may read."""
    name = stack.env["MODEL_NAME"]
    code = tmp_path / "fails_on_traffic.py"
    code.write_text(FAILS_ON_TRAFFIC)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]))

    def save(path, mlflow_model):
        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, python_model=str(code), signature=signature,
                                 input_example=np.zeros((1, 1, 28, 28), dtype=np.float32), pip_requirements=[])

    mlflow.set_tracking_uri(stack.mlflow_url)
    experiment = admin_client.get_experiment_by_name(stack.env["EXPERIMENT_NAME"]).experiment_id
    with mlflow.start_run(experiment_id=experiment) as run:
        uri = model_signatures.log_signed_model(save, "model", name, model_signatures.private_key_from_env(stack.env),
                                                run_id=run.info.run_id)
    return admin_client.create_model_version(name, uri, run_id=run.info.run_id,
                                             model_id=uri.removeprefix("models:/")).version


def test_a_failing_canary_is_aborted_by_itself_and_no_client_sees_a_failure(stack: Stack, versions, admin_client,
                                                                            tmp_path):
    failing = register_failing_version(stack, admin_client, tmp_path)
    registry_cli(stack, "canary", failing, "--percent", "50")
    try:
        every_worker_reports(stack, f"a canary of version {failing}",
                             lambda r: r["challenger_version"] == failing and r["state"] in ("active", "aborted"))
        answered: list[str] = []

        def aborted_on_every_worker() -> bool:
            answered.extend(answering_versions(stack, 50))  # each answer must be a 200
            return all(requests.get(f"{stack.serving_url}/status", timeout=5).json()["rollout"]["state"] == "aborted"
                       for _ in range(AGREEING_STATUS_ANSWERS))

        poll(f"every serving worker to abort the canary of version {failing}", aborted_on_every_worker, timeout=300)
        assert set(answered) == {versions["production"]}, "a client got the failing version's answer"
        rollout = requests.get(f"{stack.serving_url}/status", timeout=5).json()["rollout"]
        [aborted] = [a for a in rollout["aborted"] if a["version"] == failing]
        assert aborted["reason"].startswith("error rate 100.0% against production's 0.0%"), aborted
        assert f"version {failing} aborted: error rate" in stack.compose("logs", "--no-color", "serving").stdout
        assert set(answering_versions(stack, 50)) == {versions["production"]}
    finally:
        registry_cli(stack, "abort")

"""Canary and shadow rollouts through the stack, as `make canary`, `make shadow` and
`make abort-rollout` run them, and a restarted serving container answering at once from the
version it served before. Brings its own challenger: a version trained here and never
promoted; production is whichever version holds the alias when the module starts."""

from __future__ import annotations

import pytest
import requests
from mlflow import MlflowClient
from stack import Stack, poll

IMAGE = [[[0.5] * 28] * 28]
CANARY_PERCENT = 30
CANARY_REQUESTS = 400
# Two workers draw independently; 0.30 ± 0.10 is more than four standard deviations of a
# binomial share over 400 requests (0.023), so only a wrong share fails it.
CANARY_TOLERANCE = 0.10
# Each worker reads the rollout in its own poll; this many status answers in a row that agree
# (fresh connections, so both workers are asked) means both have seen it.
AGREEING_STATUS_ANSWERS = 12


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
def versions(stack: Stack, trained, admin_client: MlflowClient) -> dict[str, str]:
    production = admin_client.get_model_version_by_alias(stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"]).version
    stack.wait_served_version(production, timeout=180)
    challenger = stack.train("--epochs", "1", "--batch-size", "32", "--promotion-policy", "never")["version"]
    return {"production": production, "challenger": challenger}


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

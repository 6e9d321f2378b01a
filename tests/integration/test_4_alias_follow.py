"""Serving follows @production by itself: no dropped request while it switches, no switch to
a version that cannot answer, and `make rollback` brings the previous version back."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
import requests
from mlflow import MlflowClient
from stack import Stack, poll

IMAGE = [[[0.0] * 28] * 28]
# The client is bounded in both count and time, whatever happens to the stack, and paced so
# that it keeps going for the whole of a training run without starving it of CPU.
MAX_REQUESTS, MAX_SECONDS, PAUSE_SECONDS = 50_000, 900, 0.02


@dataclass
class SteadyClient:
    """Sends one-image requests back to back and records every outcome."""

    url: str
    answers: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + MAX_SECONDS
        while not self.stop.is_set() and len(self.answers) + len(self.failures) < MAX_REQUESTS \
                and time.monotonic() < deadline:
            try:
                response = session.post(self.url, json={"inputs": [IMAGE]}, timeout=30)
                if response.status_code == 200 and len(response.json()["predictions"][0]) == 10:
                    self.answers.append((time.monotonic(), response.headers.get("X-Model-Version", "?")))
                else:
                    self.failures.append(f"{response.status_code}: {response.text[:200]}")
            except Exception as error:  # noqa: BLE001 - every failure counts, none ends the client
                self.failures.append(repr(error))
            self.stop.wait(PAUSE_SECONDS)

    def first_answer_from(self, version: str, after: float) -> float | None:
        return next((t for t, v in self.answers if v == version and t >= after), None)

    def answers_after_last(self, version: str) -> int:
        answers = list(self.answers)
        last = max((i for i, (_, v) in enumerate(answers) if v == version), default=-1)
        return len(answers) - last - 1


def models_cli(stack: Stack, *args: str):
    """What `make promote`, `make rollback` and `make models` run."""
    return stack.compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "trainer",
                         "-m", "trainer.registry_cli", *args, check=False)


def alias_version(client: MlflowClient, stack: Stack) -> str:
    return client.get_model_version_by_alias(stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"]).version


@pytest.fixture(scope="module")
def versions(stack: Stack, trained, admin_client: MlflowClient):
    """v1 is served; v2 is trained and then promoted (`make promote`) while a client keeps
    sending requests."""
    stack.wait_served_version(trained["version"], timeout=180)
    client = SteadyClient(f"{stack.serving_url}/invocations")
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    try:
        v2 = stack.train("--epochs", "1", "--batch-size", "32", "--promotion-policy", "never")
        assert v2["promoted"].startswith("no"), v2
        promoted = models_cli(stack, "promote", v2["version"])
        assert promoted.returncode == 0, promoted.stderr
        assert alias_version(admin_client, stack) == v2["version"]
        poll(f"a response from version {v2['version']} (answers so far: {len(client.answers)}, "
             f"failures: {client.failures[:2]})",
             lambda: client.first_answer_from(v2["version"], 0), timeout=180)
        # Keep the client running past the last worker's switch, so in-flight overlap is covered.
        poll("50 answers after the last one from the old version",
             lambda: client.answers_after_last(trained["version"]) > 50, timeout=120)
    finally:
        client.stop.set()
        thread.join(timeout=60)
    return {"v1": trained["version"], "v2": v2["version"], "client": client}


def test_no_request_fails_while_the_alias_moves(versions):
    client: SteadyClient = versions["client"]
    assert len(client.answers) > 100, "the client kept the server busy during the switch"
    assert client.failures == [], f"{len(client.failures)} failed requests, first: {client.failures[:3]}"
    served = {v for _, v in client.answers}
    assert {versions["v1"], versions["v2"]} <= served


def test_once_switched_serving_never_answers_with_the_old_version_again(versions):
    """Each worker switches on its own poll, so the two versions interleave for a moment;
    after that, only the new one answers. How long the switch takes is a benchmark's figure
    (bench/alias_switch_bench.py), not a test's."""
    client: SteadyClient = versions["client"]
    answers = list(client.answers)
    last_old = max(i for i, (_, v) in enumerate(answers) if v == versions["v1"])
    after = [v for _, v in answers[last_old + 1:]]
    assert len(after) > 50 and set(after) == {versions["v2"]}, after[:20]


def test_broken_version_is_not_switched_to_and_rollback_restores(stack: Stack, versions, admin_client):
    name = stack.env["MODEL_NAME"]
    v2 = admin_client.get_model_version(name, versions["v2"])
    run = admin_client.get_run(v2.run_id)
    # A version whose files are not a model at all (the run's checkpoints): loading fails.
    broken = admin_client.create_model_version(name, f"{run.info.artifact_uri}/checkpoints", run_id=v2.run_id)
    promoted = models_cli(stack, "promote", broken.version)
    assert promoted.returncode == 0, promoted.stderr
    assert alias_version(admin_client, stack) == broken.version

    status = poll("serving to report the broken version's failure",
                  lambda: (s := stack.serving_status()) and s.get("last_error") and s, timeout=120)
    assert str(status["version"]) == versions["v2"]
    answer = requests.post(f"{stack.serving_url}/invocations", json={"inputs": [IMAGE]}, timeout=30)
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == versions["v2"]

    rolled = models_cli(stack, "rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert alias_version(admin_client, stack) == versions["v2"]
    rolled = models_cli(stack, "rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert alias_version(admin_client, stack) == versions["v1"]
    stack.wait_served_version(versions["v1"], timeout=60)

    table = models_cli(stack, "list")
    assert table.returncode == 0, table.stderr
    holder_line = next(line for line in table.stdout.splitlines() if line.split()[:1] == [versions["v1"]])
    assert f"@{stack.env['MODEL_ALIAS']}" in holder_line

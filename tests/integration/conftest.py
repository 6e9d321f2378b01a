"""One stack for the whole integration session: built once, brought up once, torn down with
its volumes at the end. When any test fails, the services' logs are printed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from mlflow import MlflowClient
from stack import ROOT, TEST_IMAGES, TRAIN_IMAGES, Stack, free_port, registry_reachable, write_env

_failed = False


def pytest_runtest_makereport(item, call):
    global _failed
    if call.excinfo is not None and call.when in ("setup", "call"):
        _failed = True


@pytest.fixture(scope="session")
def offline() -> bool:
    return not registry_reachable(os.environ.get("POSTGRES_IMAGE", "postgres:17-bookworm"))


@pytest.fixture(scope="session")
def session_started_at() -> str:
    return str(int(time.time()))


@pytest.fixture(scope="session")
def images(offline, session_started_at):
    """Builds every image once for the session (cached layers make repeat runs quick)."""
    env = dict(os.environ, OFFLINE="1" if offline else "0")
    if offline:
        subprocess.run([str(ROOT / "docker/offline/build-images.sh")], check=True, env=env)
    return offline


@pytest.fixture(scope="session")
def stack(images, tmp_path_factory) -> Stack:
    offline = images
    project = f"mlopstest{uuid.uuid4().hex[:8]}"
    env_file = tmp_path_factory.mktemp("stack") / ".env"
    env = write_env(env_file, offline, {
        "COMPOSE_PROJECT_NAME": project,
        "MLFLOW_PORT": str(free_port()),
        "SERVING_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()),
        "ALIAS_POLL_SECONDS": "1",
        # Uploads every 2 s while test_6_prediction_log turns the log on.
        "PREDICTION_LOG_FLUSH_S": "2",
        # Rollouts abort on errors only: on a shared 2-core machine a fresh challenger's p99
        # is noise. The latency abort is a unit test (tests/unit/serving/test_serving_rollout.py).
        "ROLLOUT_MAX_P99_RATIO": "1000",
        # Small enough that a test can send a body over it for real.
        "MLFLOW_MAX_BODY_SIZE": "64m",
    })
    stack = Stack(project=project, env_file=env_file, offline=offline, env=env)
    stack.compose("--profile", "train", "build", timeout=3600)
    try:
        stack.compose("up", "-d", "--wait", "--wait-timeout", "300")
        # As `make up` does: every test may use the accounts mlflow-init makes.
        subprocess.run([str(ROOT / "scripts/wait-for-accounts.sh"), *stack.compose_command()], check=True,
                       timeout=330, cwd=ROOT)
        yield stack
    finally:
        if _failed:
            # Straight to the terminal and to a file: pytest captures prints made in teardown.
            logs = stack.compose("--profile", "train", "--profile", "monitoring", "logs", "--no-color",
                                 "--timestamps", check=False).stdout
            saved = ROOT / "tests/artifacts/compose-logs.txt"
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(logs)
            sys.__stderr__.write(f"\n===== docker compose logs, last lines (all of them in {saved}) =====\n"
                                 + logs[-40000:] + "\n")
        stack.compose("--profile", "train", "--profile", "monitoring", "down", "--volumes", "--remove-orphans",
                      check=False)





@pytest.fixture(scope="session")
def trained(stack: Stack) -> dict:
    """Version 1: generated FashionMNIST-format data, then the trainer exactly as users run it."""
    stack.compose("run", "--rm", "-T", "--entrypoint", "python", "trainer", "-m", "trainer.synthetic",
                  "--data-dir", "/data", "--train", str(TRAIN_IMAGES), "--test", str(TEST_IMAGES))
    return stack.train("--epochs", "2", "--batch-size", "32")


@pytest.fixture(scope="session")
def challenger(stack: Stack, trained) -> dict:
    """A later version, never promoted, shared so that it is trained once: rollouts canary and
    shadow it, retention then prunes its checkpoints (two epochs, so it has two)."""
    return stack.train("--epochs", "2", "--batch-size", "64", "--promotion-policy", "never")


@pytest.fixture(scope="session")
def admin_client(stack: Stack) -> MlflowClient:
    user, password = stack.credentials("admin")
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, password
    return MlflowClient(stack.mlflow_url)

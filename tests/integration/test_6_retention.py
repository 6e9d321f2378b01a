"""`make gc` through the stack: a deleted run's files leave the bucket and its rows the
database, a dry run removes nothing, checkpoints of finished runs are pruned to the number
kept, and the registered versions' models are untouched; the scheduled gc does the same on
its own and stops cleanly. Trains one run of its own (two
epochs, so two checkpoints); the session's model is the registered version checked."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from stack import Stack, poll, signed_in_as

LIST_OBJECTS = """
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"], region_name=os.environ["AWS_DEFAULT_REGION"])
pages = s3.get_paginator("list_objects_v2").paginate(Bucket=os.environ["S3_BUCKET"], Prefix="artifacts/")
print("\\n".join(o["Key"] for page in pages for o in page.get("Contents", [])))
"""


def bucket_keys(stack: Stack) -> list[str]:
    """Every object key, listed with the gc service's own bucket-scoped key."""
    out = stack.compose("run", "--rm", "-T", "--entrypoint", "python", "gc", "-c", LIST_OBJECTS).stdout
    return out.split()


def container_output(name: str) -> str:
    logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=30)
    return logs.stdout + logs.stderr


def checkpoints(client: MlflowClient, run_id: str) -> list[str]:
    return [f.path for f in client.list_artifacts(run_id, "checkpoints")]


def test_gc_removes_deleted_runs_and_old_checkpoints_and_keeps_registered_models(
        stack: Stack, trained, challenger, admin_client: MlflowClient, monkeypatch):
    pruned = challenger
    pruned_run = pruned["run"].rstrip("/").rsplit("/", 1)[-1]
    assert len(checkpoints(admin_client, pruned_run)) >= 2

    with signed_in_as(stack, "trainer") as trainer:
        experiment = trainer.get_experiment_by_name(stack.env["EXPERIMENT_NAME"])
        doomed = trainer.create_run(experiment.experiment_id).info.run_id
        trainer.log_text(doomed, "x" * 100_000, "notes/large.txt")
        trainer.set_terminated(doomed)
    admin_client.delete_run(doomed)  # deleting needs MANAGE, which the trainer lacks
    assert any(doomed in key for key in bucket_keys(stack))

    dry = stack.compose("run", "--rm", "-T", "gc", "--dry-run", "--keep-checkpoints", "1")
    assert f"would remove deleted run {doomed}" in dry.stdout, dry.stdout
    assert any(doomed in key for key in bucket_keys(stack))
    assert len(checkpoints(admin_client, pruned_run)) >= 2

    removed = stack.compose("run", "--rm", "-T", "gc", "--keep-checkpoints", "1")
    assert f"removed deleted run {doomed}" in removed.stdout and "freed" in removed.stdout, removed.stdout
    assert not any(doomed in key for key in bucket_keys(stack))
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST|not found"):
        admin_client.get_run(doomed)
    assert len(checkpoints(admin_client, pruned_run)) == 1

    # The registered models are untouched: the session's version and the pruned run's own
    # still download whole (other tests register versions without a model on purpose).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)
    for version in (trained["version"], pruned["version"]):
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(f"models:/{stack.env['MODEL_NAME']}/{version}", dst_path=tmp)
            assert list(Path(local).rglob("MLmodel")) and list(Path(local).rglob("model.pt")), \
                f"version {version} lost its model"


def test_scheduled_gc_removes_a_deleted_run_and_stops_when_asked(stack: Stack, trained, admin_client: MlflowClient):
    with signed_in_as(stack, "trainer") as trainer:
        experiment = trainer.get_experiment_by_name(stack.env["EXPERIMENT_NAME"])
        doomed = trainer.create_run(experiment.experiment_id).info.run_id
        trainer.log_text(doomed, "x" * 1000, "notes/small.txt")
        trainer.set_terminated(doomed)
    admin_client.delete_run(doomed)

    # As `make up RETENTION=1` starts it, with what was deleted at any age in scope.
    scheduled = ("--profile", "retention")
    stack.compose(*scheduled, "run", "-d", "--name", f"{stack.project}-gc-schedule-test", "-e",
                  "GC_OLDER_THAN_DAYS=0", "gc-schedule")
    try:
        said = poll("the scheduled gc's first round",
                    lambda: (out := container_output(f"{stack.project}-gc-schedule-test"))
                    and "freed" in out and out, timeout=180)
        assert "collecting now and every 24 h" in said and f"removed deleted run {doomed}" in said, said
        assert not any(doomed in key for key in bucket_keys(stack))
        # Between rounds it waits; `docker stop` ends it at once and cleanly.
        stopped = subprocess.run(["docker", "stop", "--time", "30", f"{stack.project}-gc-schedule-test"],
                                 capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        state = subprocess.run(["docker", "inspect", "--format", "{{.State.ExitCode}}",
                                f"{stack.project}-gc-schedule-test"], capture_output=True, text=True, timeout=30)
        assert state.stdout.strip() == "0", state.stdout + state.stderr
    finally:
        subprocess.run(["docker", "rm", "--force", f"{stack.project}-gc-schedule-test"], capture_output=True,
                       timeout=60)

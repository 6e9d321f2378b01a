"""Training beyond one host, with the stack's own network standing in for two hosts: two
trainer containers join one job (c10d rendezvous on node-0, gloo on CPU) and produce one run
and one registered version, as the two-host walk-through in trainer/README.md does; nodes
started with different settings are refused. Uses the session's generated data (`trained`)."""

from __future__ import annotations

import dataclasses
import subprocess
import uuid

from mlflow import MlflowClient
from stack import ROOT, Stack

OVERLAY = ROOT / "tests/multinode/compose.yaml"


def node(stack: Stack, rank: int, job: str, *extra: str) -> subprocess.Popen:
    nodes = dataclasses.replace(stack, extra_files=(*stack.extra_files, OVERLAY))
    command = nodes.compose_command(
        "run", "--rm", "-T", "--no-deps", "--use-aliases", f"node-{rank}",
        "--nnodes", "2", "--node-rank", str(rank), "--nproc", "1", "--rdzv-endpoint", "node-0:29400",
        "--rdzv-id", job, "--rdzv-timeout", "120", "--epochs", "1", "--promotion-policy", "never", *extra)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*nodes: subprocess.Popen) -> list[tuple[int, str, str]]:
    results = []
    for process in nodes:
        out, err = process.communicate(timeout=900)
        results.append((process.returncode, out, err))
    return results


def test_two_nodes_train_one_run_and_one_version(stack: Stack, trained, admin_client: MlflowClient):
    job = f"it-{uuid.uuid4().hex[:8]}"
    results = finish(node(stack, 0, job, "--batch-size", "32"), node(stack, 1, job, "--batch-size", "32"))
    assert [code for code, _, _ in results] == [0, 0], [(code, err[-3000:]) for code, _, err in results]

    experiment = admin_client.get_experiment_by_name(stack.env["EXPERIMENT_NAME"])
    runs = admin_client.search_runs([experiment.experiment_id], f"tags.rdzv_id = '{job}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.params["nnodes"] == "2"
    assert run.data.params["backend"] == "gloo" and run.data.params["global_batch_size"] == "64"
    versions = [v for v in admin_client.search_model_versions(f"name = '{stack.env['MODEL_NAME']}'")
                if v.run_id == run.info.run_id]
    assert len(versions) == 1
    # Rank 0 alone reports: exactly one node printed the version line.
    assert sum(f"version: {versions[0].version}" in out for _, out, _ in results) == 1


def test_nodes_with_different_settings_are_refused(stack: Stack, trained, admin_client: MlflowClient):
    job = f"it-{uuid.uuid4().hex[:8]}"
    results = finish(node(stack, 0, job, "--batch-size", "32"), node(stack, 1, job, "--batch-size", "64"))
    for code, _, err in results:
        assert code == 2, err[-3000:]
        said = [line for line in err.splitlines() if "error:" in line]
        assert len(said) == 1 and "--batch-size" in said[0] and "Traceback" not in err, err[-3000:]

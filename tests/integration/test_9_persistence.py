"""`make down` then `make up` keeps runs, models and artifacts. Runs last: it restarts the
shared stack."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from stack import Stack


def snapshot(client: MlflowClient, stack: Stack, run_id: str, workdir: Path) -> dict:
    run = client.get_run(run_id)
    versions = client.search_model_versions(f"name='{stack.env['MODEL_NAME']}'")
    local = Path(download_artifacts(run_id=run_id, artifact_path="", dst_path=str(workdir),
                                    tracking_uri=stack.mlflow_url))
    checksums = {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(local.rglob("*")) if p.is_file()}
    return {
        "params": run.data.params,
        "metrics": run.data.metrics,
        "status": run.info.status,
        "versions": sorted((v.version, v.run_id) for v in versions),
        "alias": client.get_model_version_by_alias(stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"]).version,
        "artifacts": checksums,
    }


def test_down_and_up_keep_runs_models_and_artifacts(stack: Stack, trained, admin_client, tmp_path):
    run_id = trained["run"].rstrip("/").rsplit("/", 1)[-1]
    before = snapshot(admin_client, stack, run_id, tmp_path / "before")
    assert before["artifacts"], "the run has artifacts to compare"

    stack.compose("--profile", "train", "down")
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300")

    after = snapshot(admin_client, stack, run_id, tmp_path / "after")
    assert after == before
    stack.wait_served_version(before["alias"], timeout=120)

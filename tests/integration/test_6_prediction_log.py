"""The prediction log and `make drift` through the stack. This test turns
PREDICTION_LOG_SAMPLE on for serving (as a user edits .env and runs `make up`), and off
again afterwards. Sampled answers reach the inference experiment as Parquet through the
artifact proxy, uploaded as the log's own account (serving's may not write runs), and a
drift report compares them with the served version's reference statistics. Uses the
session's model."""

from __future__ import annotations

import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from mlflow import MlflowClient
from stack import Stack, poll


def set_sample(stack: Stack, fraction: str) -> None:
    lines = [line for line in stack.env_file.read_text().splitlines() if not line.startswith("PREDICTION_LOG_SAMPLE=")]
    stack.env_file.write_text("\n".join([*lines, f"PREDICTION_LOG_SAMPLE={fraction}"]) + "\n")
    stack.env["PREDICTION_LOG_SAMPLE"] = fraction
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "--no-deps", "serving")
    poll("every serving worker to serve again",
         lambda: all(requests.get(f"{stack.serving_url}/status", timeout=5).json()["state"] == "serving"
                     for _ in range(12)), timeout=180)


@pytest.fixture
def logging_on(stack: Stack, trained):
    set_sample(stack, "0.5")
    try:
        yield
    finally:
        set_sample(stack, "0")


def test_sampled_answers_are_logged_and_a_drift_report_compares_them(stack: Stack, trained, logging_on,
                                                                      admin_client: MlflowClient):
    served = str(stack.serving_status()["version"])
    body = {"inputs": stack.sample(8)["inputs"]}
    with requests.Session() as session:
        for _ in range(20):
            assert session.post(f"{stack.serving_url}/invocations", json=body, timeout=30).status_code == 200

    day = datetime.now(UTC).date().isoformat()
    experiment = admin_client.get_experiment_by_name(f"{stack.env['MODEL_NAME']}-inference")
    assert experiment is not None

    def logged_rows_of_served_version() -> int | None:
        runs = admin_client.search_runs([experiment.experiment_id], f"tags.prediction_day = '{day}'")
        rows = 0
        for run in runs:
            files = admin_client.list_artifacts(run.info.run_id, "predictions")
            with tempfile.TemporaryDirectory() as tmp:
                for f in files:
                    local = admin_client.download_artifacts(run.info.run_id, f.path, tmp)
                    table = pq.read_table(local).to_pydict()
                    rows += sum(1 for v, c in zip(table["model_version"], table["predicted_class"], strict=True)
                                if v == served and 0 <= c < 10)
        return rows or None

    assert poll("sampled answers of the served version in the prediction log", logged_rows_of_served_version,
                timeout=120) > 0
    # The day's runs: named for the day; two workers starting together may each make one.
    runs = admin_client.search_runs([experiment.experiment_id], f"tags.prediction_day = '{day}'")
    assert 1 <= len(runs) <= 2 and {r.info.run_name for r in runs} == {f"predictions-{day}"}

    report = stack.compose("run", "--rm", "-T", "drift", "--since", day)
    run_id = re.search(r"report: run (\w+)", report.stdout).group(1)
    run = admin_client.get_run(run_id)
    assert any(key.startswith(f"v{served}.") for key in run.data.metrics), run.data.metrics
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(admin_client.download_artifacts(run_id, "drift/report.png", tmp))
        assert plot.stat().st_size > 1000

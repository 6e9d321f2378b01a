"""Drift reports: the prediction log of a period against each version's reference statistics,
on a throwaway SQLite store with local artifacts."""

import json
import random
import shutil
from datetime import UTC, datetime

import mlflow
import numpy as np
import pytest

from serving.prediction_log import PredictionLog
from serving.prediction_upload import ARTIFACT_DIR, DAY_TAG
from serving.scoring import Reply
from stack_common import distributions
from tracking import drift

MODEL = "fashion"
INFERENCE = "fashion-inference"
DRIFT = "fashion-drift"
NOON = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A SQLite store with its schema, made once: creating the schema takes seconds."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def client(tmp_path, monkeypatch, empty_store):
    monkeypatch.chdir(tmp_path)  # new experiments' artifacts go under ./mlruns
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MODEL_NAME", MODEL)
    monkeypatch.delenv("PREDICTION_LOG_EXPERIMENT", raising=False)
    monkeypatch.delenv("DRIFT_EXPERIMENT", raising=False)
    return mlflow.MlflowClient(uri)


def images(rng, n, low=0.0, high=1.0):
    return rng.uniform(low, high, size=(n, 1, 28, 28)).astype(np.float32)


def register_reference(client, rng):
    """Version 1, whose test split had uniform pixels and predictions spread over all classes."""
    reference_images = images(rng, 500)
    stats = {
        "format": 1, "split": "test", "samples": 500, "classes": [f"class {i}" for i in range(10)],
        "label_counts": [50] * 10, "prediction_counts": [50] * 10,
        "intensity_edges": distributions.INTENSITY_EDGES.tolist(),
        "intensity_counts": distributions.intensity_counts(reference_images).tolist(),
    }
    experiment = client.create_experiment("training")
    run_id = client.create_run(experiment).info.run_id
    client.log_dict(run_id, stats, "reference/stats.json")
    client.create_registered_model(MODEL)
    client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id=run_id)


class StoreUploader:
    """Lays the files out as the prediction log's uploader does: one run per day, tagged, files under predictions/."""

    def __init__(self, client):
        self.client = client

    def upload(self, day, path):
        found = self.client.get_experiment_by_name(INFERENCE)
        experiment = found.experiment_id if found else self.client.create_experiment(INFERENCE)
        runs = self.client.search_runs([experiment], filter_string=f"tags.{DAY_TAG} = '{day}'")
        run_id = runs[0].info.run_id if runs else self.client.create_run(experiment, tags={DAY_TAG: day}).info.run_id
        self.client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_DIR)


def log_predictions(client, version, batches, at=NOON):
    plog = PredictionLog(1.0, 100_000, 60, StoreUploader(client), rng=random.Random(0), clock=lambda: at)
    for inputs, classes in batches:
        probabilities = np.full((len(classes), 10), 0.01)
        probabilities[np.arange(len(classes)), classes] = 0.91
        plog.record(version, inputs, Reply(200, json.dumps({"predictions": probabilities.tolist()}).encode()), 0.002)
    assert plog.flush() == sum(len(classes) for _, classes in batches)


def report(client, **kw):
    since = drift.parse_moment(kw.pop("since", "2026-12-01"), end_of_day=False)
    until = drift.parse_moment(kw.pop("until", "2026-12-01"), end_of_day=True)
    return drift.run_report(client, INFERENCE, MODEL, since, until, **kw)


def test_identical_data_shows_no_drift(client):
    rng = np.random.default_rng(1)
    register_reference(client, rng)
    log_predictions(client, "1", [(images(rng, 50), np.arange(50) % 10) for _ in range(6)])

    run_id, summary = report(client)

    entry = summary["versions"]["1"]
    assert entry["rows"] == 300 and entry["drift"] is False
    assert entry["metrics"]["class_psi"] < 0.01 and entry["metrics"]["class_tvd"] < 0.01
    assert entry["metrics"]["class_chi2_p"] > 0.5 and entry["metrics"]["intensity_psi"] < 0.01
    run = client.get_run(run_id)
    assert run.info.experiment_id == client.get_experiment_by_name(DRIFT).experiment_id  # never the inference one
    assert run.data.tags[drift.REPORT_TAG] == "yes"
    assert run.data.metrics["v1.class_psi"] == pytest.approx(entry["metrics"]["class_psi"])
    assert {a.path for a in client.list_artifacts(run_id, "drift")} == {"drift/report.png", "drift/summary.json"}
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/drift/summary.json")["versions"]["1"]["drift"] is False


def test_shifted_data_is_reported_as_drift(client, capsys):
    rng = np.random.default_rng(2)
    register_reference(client, rng)
    # Brighter images, almost all predicted as one class.
    log_predictions(client, "1", [(images(rng, 40, 0.7, 1.0), np.where(np.arange(40) < 36, 0, 5)) for _ in range(5)])

    assert drift.main(["--since", "2026-12-01", "--until", "2026-12-01"]) == 0

    out = capsys.readouterr().out
    assert "version 1: 200 images, DRIFT" in out
    _, summary = report(client)
    metrics = summary["versions"]["1"]["metrics"]
    assert metrics["class_psi"] > 1 and metrics["class_tvd"] > 0.8 and metrics["class_chi2_p"] < 1e-6
    assert metrics["intensity_psi"] > 1


def test_the_period_and_version_select_rows_and_a_version_without_reference_is_named(client):
    rng = np.random.default_rng(3)
    register_reference(client, rng)
    log_predictions(client, "1", [(images(rng, 10), np.arange(10))])
    log_predictions(client, "7", [(images(rng, 4), np.arange(4))])
    log_predictions(client, "1", [(images(rng, 3), np.arange(3))], at=NOON + 86_400)  # the next day

    _, summary = report(client)
    assert {v: e["rows"] for v, e in summary["versions"].items()} == {"1": 10, "7": 4}
    assert summary["versions"]["7"]["reference"] is None and "7" in summary["versions"]["7"]["problem"]

    _, summary = report(client, until="2026-12-02", version="1")
    assert {v: e["rows"] for v, e in summary["versions"].items()} == {"1": 13}

    _, summary = report(client, since="2026-12-01T12:30", until="2026-12-03")
    assert {v: e["rows"] for v, e in summary["versions"].items()} == {"1": 3}


@pytest.mark.parametrize("argv, status, says", [
    (["--since", "2026-13-01"], 2, "is not a date"),
    (["--since", "yesterday"], 2, "is not a date"),
    (["--since", "2026-12-01", "--until", "2026-02-30"], 2, "is not a date"),
    (["--since", "2026-12-01", "--version", "latest"], 2, "is not a version number"),
    (["--since", "2026-12-02", "--until", "2026-12-01"], 1, "is not after --since"),
    (["--since", "2026-11-01", "--until", "2026-11-02"], 1, "no predictions logged"),
    (["--since", "2026-12-01", "--version", "9"], 1, "no predictions logged by version 9"),
])
def test_bad_dates_and_empty_periods_are_one_line(client, capsys, argv, status, says):
    rng = np.random.default_rng(4)
    register_reference(client, rng)
    log_predictions(client, "1", [(images(rng, 2), np.arange(2))])

    assert drift.main(argv) == status

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def test_no_inference_experiment_is_one_line(client, capsys):
    assert drift.main(["--since", "2026-12-01"]) == 1
    assert "no experiment 'fashion-inference'" in capsys.readouterr().err

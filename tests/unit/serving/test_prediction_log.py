"""The prediction log: sampling, a bounded buffer while uploads fail, and Parquet files in
one run per UTC day of the inference experiment."""

import asyncio
import json
import random
from datetime import UTC, datetime

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from serving_helpers import ONE_IMAGE_BODY, async_wait_until, post_json
from signing_keys import signing_key_pair

from serving import config
from serving.app import ServingApp
from serving.prediction_log import DAY_TAG, MlflowUploader, PredictionLog
from serving.scoring import Reply

DAY_1 = datetime(2026, 12, 1, 23, 59, tzinfo=UTC).timestamp()
DAY_2 = datetime(2026, 12, 2, 0, 1, tzinfo=UTC).timestamp()


def image_request(n=1, value=0.5):
    return np.full((n, 1, 28, 28), value, dtype=np.float32)


def answer(n=1, winner=3):
    probabilities = np.full((n, 10), 0.02)
    probabilities[:, winner] = 0.82
    return Reply(200, json.dumps({"predictions": probabilities.tolist()}).encode())


class Recording:
    def __init__(self):
        self.tables = []

    def upload(self, day, path):
        self.tables.append((day, pq.read_table(path)))


class Refusing:
    calls = 0

    def upload(self, day, path):
        self.calls += 1
        raise ConnectionError("tracking server not answering")


def test_the_sampled_fraction_is_kept():
    kept = {}
    for sample in (0.0, 0.25, 1.0):
        plog = PredictionLog(sample, 1_000_000, 60, Recording(), rng=random.Random(7))
        for _ in range(4000):
            plog.record("1", image_request(), answer(), 0.001)
        kept[sample] = plog.buffered_rows
    assert kept[0.0] == 0
    assert 900 <= kept[0.25] <= 1100
    assert kept[1.0] == 4000


def test_the_buffer_is_bounded_and_drops_are_counted_while_uploads_fail():
    uploader = Refusing()
    plog = PredictionLog(1.0, 50, 60, uploader)
    for i in range(80):
        plog.record(str(i), image_request(), answer(), 0.001)
    assert plog.buffered_rows == 50 and plog.dropped_rows == 30

    assert plog.flush() == 0  # the upload fails: nothing raised, everything kept
    assert uploader.calls == 1 and plog.upload_failures == 1
    assert plog.buffered_rows == 50 and plog.dropped_rows == 30

    plog.record("80", image_request(2), answer(2), 0.001)  # arrives during the outage
    assert plog.buffered_rows == 50 and plog.dropped_rows == 32

    plog.uploader = recording = Recording()
    assert plog.flush() == 50
    [(_, table)] = recording.tables
    versions = table.column("model_version").to_pylist()
    assert versions == [str(i) for i in range(32, 80)] + ["80", "80"]  # the newest, oldest first
    assert plog.buffered_rows == 0


def test_recording_never_raises_into_the_request_path():
    def broken_clock():
        raise RuntimeError("clock broke")

    plog = PredictionLog(1.0, 10, 60, Recording(), clock=broken_clock)
    plog.record("1", image_request(), answer(), 0.001)  # the clock raises inside
    plog.record("1", object(), answer(), 0.001)  # not an image tensor
    plog.record("1", image_request(), Reply(400, b"{}"), 0.001)  # an error answer is not logged
    assert plog.buffered_rows == 0 and plog.dropped_rows == 0


def test_unparseable_entries_are_left_out_of_the_file():
    recording = Recording()
    plog = PredictionLog(1.0, 100, 60, recording)
    plog.record("1", b'{"inputs": not json', answer(), 0.001)
    plog.record("1", image_request(), Reply(200, b'{"predictions": "odd"}'), 0.001)
    assert plog.flush() == 1
    [(_, table)] = recording.tables
    assert table.column("probabilities").to_pylist() == [None]
    assert table.column("predicted_class").to_pylist() == [None]


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a SQLite store puts new experiments' artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return mlflow.MlflowClient(uri)


def test_parquet_files_land_in_one_run_per_utc_day_shared_by_workers(tracking):
    experiment = "fashion-inference"
    moments = iter([DAY_1, DAY_2, DAY_1, DAY_2])
    workers = [PredictionLog(1.0, 1000, 60, MlflowUploader(experiment, tracking), clock=lambda: next(moments))
               for _ in range(2)]
    for plog in workers:
        plog.record("3", image_request(2, 0.25), answer(2, winner=7), 0.004)
        plog.record("4", json.dumps({"inputs": image_request(1, 1.0).tolist()}).encode(), answer(1), 0.002)
        assert plog.flush() == 3

    experiment_id = tracking.get_experiment_by_name(experiment).experiment_id
    runs = tracking.search_runs([experiment_id])
    assert sorted(run.data.tags[DAY_TAG] for run in runs) == ["2026-12-01", "2026-12-02"]
    for run in runs:
        files = tracking.list_artifacts(run.info.run_id, "predictions")
        assert len(files) == 2 and all(f.path.endswith(".parquet") for f in files)
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="predictions",
                                                    tracking_uri=tracking.tracking_uri)
        rows = pq.read_table(local).to_pylist()
        day = run.data.tags[DAY_TAG]
        assert all(row["time"].strftime("%Y-%m-%d") == day for row in rows)
        assert all(len(row["inputs"]) == 28 * 28 and len(row["probabilities"]) == 10 for row in rows)
        if day == "2026-12-01":  # two images of version 3 from each worker
            assert [row["model_version"] for row in rows] == ["3"] * 4
            assert {(row["predicted_class"], row["inputs"][0]) for row in rows} == {(7, 0.25)}
            assert rows[0]["latency_ms"] == pytest.approx(4.0)
        else:  # one image of version 4, sent as a raw JSON body, from each worker
            assert [row["model_version"] for row in rows] == ["4"] * 2
            assert {(row["predicted_class"], row["inputs"][0]) for row in rows} == {(3, 1.0)}

KEYS = signing_key_pair()
REQUIRED = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MODEL_NAME": "fashion-mnist-cnn",
            "MODEL_SIGNING_PUBLIC_KEY": KEYS["MODEL_SIGNING_PUBLIC_KEY"]}


def test_settings_default_to_off_and_name_the_inference_experiment():
    s = config.from_env(REQUIRED)
    assert (s.prediction_log_sample, s.prediction_log_buffer, s.prediction_log_flush_seconds) == (0.0, 10_000, 60.0)
    assert s.inference_experiment == "fashion-mnist-cnn-inference"
    assert config.from_env({**REQUIRED, "PREDICTION_LOG_EXPERIMENT": "drift"}).inference_experiment == "drift"


@pytest.mark.parametrize("name, value", [("PREDICTION_LOG_SAMPLE", "1.5"), ("PREDICTION_LOG_SAMPLE", "some"),
                                         ("PREDICTION_LOG_SAMPLE", "-0.1"), ("PREDICTION_LOG_BUFFER", "0"),
                                         ("PREDICTION_LOG_FLUSH_S", "0")])
def test_bad_settings_are_one_line_naming_the_setting(name, value):
    with pytest.raises(config.ConfigError) as e:
        config.from_env({**REQUIRED, name: value})
    assert str(e.value).startswith(f"{name}=") and "\n" not in str(e.value)


@pytest.fixture
def app_logging_all(registry, tmp_path):
    name = registry.new_model("good-a")
    registry.point(name, 1)
    settings = config.Settings(tracking_uri=registry.tracking_uri, model_name=name, public_key=registry.public_key,
                               poll_seconds=0.2, cache_dir=str(tmp_path / "cache"), prediction_log_sample=1.0,
                               prediction_log_flush_seconds=3600.0)
    app = ServingApp(settings)
    app.prediction_log.uploader = Refusing()
    app.start()
    yield app
    app.stop()


def test_a_served_request_is_logged_and_answered_while_uploads_fail(app_logging_all):
    app = app_logging_all

    async def scenario():
        await async_wait_until(lambda: app.watcher.current is not None, what="version 1 served")
        reply = await post_json(app, ONE_IMAGE_BODY)
        assert reply.status == 200
        return reply

    reply = asyncio.run(scenario())
    assert app.prediction_log.buffered_rows == 1
    assert app.prediction_log.flush() == 0 and app.prediction_log.buffered_rows == 1
    app.prediction_log.uploader = recording = Recording()
    assert app.prediction_log.flush() == 1
    [(_, table)] = recording.tables
    assert table.column("model_version").to_pylist() == ["1"]
    assert table.column("probabilities").to_pylist()[0] == pytest.approx(reply.json()["predictions"][0])


class RefusingUploads:
    """An account that may create runs but whose uploads are refused."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name):
        return getattr(self.client, name)

    def log_artifact(self, *args, **kwargs):
        raise PermissionError("403: permission denied")


def test_refused_uploads_never_make_another_run(tracking):
    plog = PredictionLog(1.0, 1000, 60, MlflowUploader("fashion-inference", RefusingUploads(tracking)),
                         clock=lambda: DAY_1)
    for _ in range(3):
        plog.record("3", image_request(), answer(), 0.001)
        assert plog.flush() == 0

    assert plog.buffered_rows == 3 and plog.upload_failures == 3
    experiment_id = tracking.get_experiment_by_name("fashion-inference").experiment_id
    assert len(tracking.search_runs([experiment_id])) == 1

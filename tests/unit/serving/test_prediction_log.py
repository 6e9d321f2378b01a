"""The prediction log: sampling, a bounded buffer while uploads fail, and Parquet files in
one run per UTC day of the inference experiment."""

import asyncio
import io
import json
import random
import socket
from datetime import UTC, datetime

import numpy as np
import pyarrow.parquet as pq
import pytest
from fake_tracking import FakeTracking, basic
from serving_helpers import ONE_IMAGE_BODY, async_wait_until, call, post_json
from signing_keys import signing_key_pair

from serving import config, prediction_log
from serving.app import ServingApp
from serving.prediction_log import PredictionLog
from serving.prediction_upload import DAY_TAG, TrackingUploader, UploadError, proxy_path
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


PREDICTIONS = ("predictions", "log-secret")
EXPERIMENT = "fashion-inference"


@pytest.fixture
def tracking(monkeypatch):
    # Serving's own credentials are in the environment, as in the container; the log must not use them.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "serving")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "serving-secret")
    with FakeTracking({EXPERIMENT: "7"}, dict([PREDICTIONS, ("serving", "serving-secret")])) as server:
        yield server


def uploader(server, experiment=EXPERIMENT):
    return TrackingUploader(server.uri, experiment, *PREDICTIONS, retries=0)


def test_parquet_files_land_in_one_run_per_utc_day_shared_by_workers(tracking):
    moments = iter([DAY_1, DAY_2, DAY_1, DAY_2])
    workers = [PredictionLog(1.0, 1000, 60, uploader(tracking), clock=lambda: next(moments)) for _ in range(2)]
    for plog in workers:
        plog.record("3", image_request(2, 0.25), answer(2, winner=7), 0.004)
        plog.record("4", json.dumps({"inputs": image_request(1, 1.0).tolist()}).encode(), answer(1), 0.002)
        assert plog.flush() == 3

    assert sorted(run["tags"][DAY_TAG] for run in tracking.runs) == ["2026-12-01", "2026-12-02"]
    assert all(run["status"] == "FINISHED" and run["experiment_id"] == "7" for run in tracking.runs)
    for run in tracking.runs:
        folder = f"7/{run['run_id']}/artifacts/predictions/"
        files = [path for path in tracking.files if path.startswith(folder)]
        assert len(files) == 2 and all(path.endswith(".parquet") for path in files)
        rows = [row for path in sorted(files) for row in pq.read_table(io.BytesIO(tracking.files[path])).to_pylist()]
        day = run["tags"][DAY_TAG]
        assert run["run_name"] == f"predictions-{day}"
        assert all(row["time"].strftime("%Y-%m-%d") == day for row in rows)
        assert all(len(row["inputs"]) == 28 * 28 and len(row["probabilities"]) == 10 for row in rows)
        if day == "2026-12-01":  # two images of version 3 from each worker
            assert [row["model_version"] for row in rows] == ["3"] * 4
            assert {(row["predicted_class"], row["inputs"][0]) for row in rows} == {(7, 0.25)}
            assert rows[0]["latency_ms"] == pytest.approx(4.0)
        else:  # one image of version 4, sent as a raw JSON body, from each worker
            assert [row["model_version"] for row in rows] == ["4"] * 2
            assert {(row["predicted_class"], row["inputs"][0]) for row in rows} == {(3, 1.0)}


def test_every_call_logs_in_as_the_predictions_account_not_as_serving(tracking):
    plog = PredictionLog(1.0, 1000, 60, uploader(tracking), clock=lambda: DAY_1)
    plog.record("3", image_request(), answer(), 0.001)
    assert plog.flush() == 1
    assert {(method, path) for method, path, _ in tracking.requests} >= {
        ("GET", "/api/2.0/mlflow/experiments/get-by-name"), ("POST", "/api/2.0/mlflow/runs/search"),
        ("POST", "/api/2.0/mlflow/runs/create"), ("POST", "/api/2.0/mlflow/runs/update"),
        ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/7/{tracking.runs[0]['run_id']}/artifacts/predictions/"
                f"{next(iter(tracking.files)).rsplit('/', 1)[1]}")}
    assert {auth for _, _, auth in tracking.requests} == {basic(*PREDICTIONS)}


def test_refused_uploads_never_make_another_run(tracking):
    tracking.refuse_uploads = True
    plog = PredictionLog(1.0, 1000, 60, uploader(tracking), clock=lambda: DAY_1)
    for _ in range(3):
        plog.record("3", image_request(), answer(), 0.001)
        assert plog.flush() == 0

    assert plog.buffered_rows == 3 and plog.upload_failures == 3
    assert len(tracking.runs) == 1 and tracking.files == {}


@pytest.mark.parametrize("status", [500, 503])
def test_a_failing_server_costs_uploads_not_rows_until_the_buffer_is_full(tracking, status):
    tracking.answer_status = status
    plog = PredictionLog(1.0, 3, 60, uploader(tracking), clock=lambda: DAY_1)
    for i in range(5):
        plog.record(str(i), image_request(), answer(), 0.001)
        assert plog.flush() == 0
    assert (plog.buffered_rows, plog.dropped_rows, plog.upload_failures) == (3, 2, 5)

    tracking.answer_status = None  # the server is back: the newest three go up, in one run
    assert plog.flush() == 3
    [run] = tracking.runs
    [body] = tracking.files.values()
    assert pq.read_table(io.BytesIO(body)).column("model_version").to_pylist() == ["2", "3", "4"]


def test_a_server_that_refuses_connections_is_counted_not_raised():
    with socket.socket() as closed:  # a port nobody listens on once closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    plog = PredictionLog(1.0, 2, 60, TrackingUploader(f"http://127.0.0.1:{port}", EXPERIMENT, *PREDICTIONS,
                                                      retries=0), clock=lambda: DAY_1)
    for _ in range(3):
        plog.record("3", image_request(), answer(), 0.001)
        assert plog.flush() == 0
    assert (plog.buffered_rows, plog.dropped_rows, plog.upload_failures) == (2, 1, 3)


def test_a_missing_inference_experiment_is_named_and_never_created(tracking):
    with pytest.raises(UploadError, match="experiment 'elsewhere' .*mlflow-init creates it"):
        uploader(tracking, "elsewhere").run_for("2026-12-01")
    assert tracking.runs == []


def test_a_run_whose_files_are_not_behind_the_proxy_is_refused():
    with pytest.raises(UploadError, match="not behind the tracking server's artifact proxy"):
        proxy_path("s3://bucket/artifacts/7/abc/artifacts")
    assert proxy_path("mlflow-artifacts:/7/abc/artifacts") == "7/abc/artifacts"

KEYS = signing_key_pair()
REQUIRED = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MODEL_NAME": "fashion-mnist-cnn",
            "MODEL_SIGNING_PUBLIC_KEY": KEYS["MODEL_SIGNING_PUBLIC_KEY"]}


def test_settings_default_to_off_and_name_the_inference_experiment():
    s = config.from_env(REQUIRED)
    assert (s.prediction_log_sample, s.prediction_log_buffer, s.prediction_log_flush_seconds) == (0.0, 10_000, 60.0)
    assert s.inference_experiment == "fashion-mnist-cnn-inference"
    assert config.from_env({**REQUIRED, "PREDICTION_LOG_EXPERIMENT": "drift"}).inference_experiment == "drift"
    assert s.prediction_log_username == "predictions"


def test_the_log_needs_its_own_password_and_uploads_with_that_account():
    with pytest.raises(config.ConfigError) as e:
        config.from_env({**REQUIRED, "PREDICTION_LOG_SAMPLE": "0.05"})
    assert str(e.value).startswith("PREDICTION_LOG_PASSWORD is not set") and "\n" not in str(e.value)

    s = config.from_env({**REQUIRED, "PREDICTION_LOG_SAMPLE": "0.05", "PREDICTION_LOG_USERNAME": "log",
                         "PREDICTION_LOG_PASSWORD": "log-secret"})
    plog = prediction_log.from_settings(s)
    assert (plog.uploader.base, plog.uploader.username) == ("http://mlflow:5000", "log")
    assert plog.uploader.experiment_name == "fashion-mnist-cnn-inference"
    assert "log-secret" not in repr(s)


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
                               prediction_log_password="log-secret", prediction_log_flush_seconds=3600.0)
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


def test_a_binary_open_inference_request_is_logged_with_its_images_and_scores(app_logging_all):
    import tritonclient.http as triton

    app = app_logging_all
    images = np.random.default_rng(5).random((3, 1, 28, 28), dtype=np.float32)
    tensor = triton.InferInput("inputs", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=True)
    body, length = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=[triton.InferRequestedOutput("predictions", binary_data=True)])

    async def scenario():
        await async_wait_until(lambda: app.watcher.current is not None, what="version 1 served")
        return await call(app, "POST", f"/v2/models/{app.settings.model_name}/infer", body,
                          {"Inference-Header-Content-Length": str(length)})

    reply = asyncio.run(scenario())
    assert reply.status == 200, reply.body
    scores = triton.InferResult.from_response_body(
        reply.body, header_length=int(reply.headers["inference-header-content-length"])).as_numpy("predictions")
    app.prediction_log.uploader = recording = Recording()
    assert app.prediction_log.flush() == 3
    [(_, table)] = recording.tables
    np.testing.assert_array_equal(np.asarray(table.column("inputs").to_pylist(), dtype=np.float32),
                                  images.reshape(3, -1))
    np.testing.assert_array_equal(np.asarray(table.column("probabilities").to_pylist(), dtype=np.float32), scores)
    assert table.column("predicted_class").to_pylist() == scores.argmax(axis=1).tolist()

"""How runs end: FINISHED, FAILED on an error, KILLED on a signal; and an unreachable server."""

import os
import signal
import socket

import mlflow
import pytest
from conftest import FAST
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
from mlflow.tracking import MlflowClient

from stack_common.uris import redact
from trainer import export, loop, tracking


def only_run(store):
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return run


@pytest.mark.parametrize("target, module", [("evaluate", loop), ("log_served_model", export)])
def test_an_error_after_the_run_started_ends_it_failed(train, store, monkeypatch, target, module):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(module, target, broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        train(*FAST)
    assert only_run(store).info.status == "FAILED"
    assert MlflowClient().search_registered_models() == []


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_ends_the_run_killed(train, store, monkeypatch, sig, code):
    log = tracking.MetricLogger.log

    def log_then_signal(self, metrics, step):
        log(self, metrics, step)
        if step == 4:  # mid-epoch: 8 steps per epoch
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(tracking.MetricLogger, "log", log_then_signal)
    # Whatever this process had (a background job starts with SIGINT ignored), it gets back.
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    result = train("--epochs", "2", "--batch-size", "64", "--log-every", "2")
    assert result.code == code
    name = signal.Signals(sig).name
    assert f"{name} received: stopping after this step" in result.err
    assert result.summary == {"run": f"runs:/{result.run_id}", "version": "none",
                              "promoted": f"no (stopped by {name})"}
    assert f"continue with --resume-from {result.run_id}" in result.out
    run = only_run(store)
    assert run.info.status == "KILLED"
    checkpoints = [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "checkpoints")]
    # The signal came while step 4 was logged: step 5 never started.
    assert checkpoints == ["checkpoints/epoch-000-step-000000004.pt"]
    # The handlers are handed back: Ctrl-C works as before once the run is over.
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before

    monkeypatch.setattr(tracking.MetricLogger, "log", log)
    resumed = train("--epochs", "2", "--batch-size", "64", "--log-every", "2", "--resume-from", result.run_id)
    assert resumed.code == 0, resumed.err
    steps = [m.step for m in MlflowClient().get_metric_history(resumed.run_id, "train_loss")]
    assert sorted(steps) == [6, 8, 10, 12, 14, 16]
    assert MlflowClient().get_run(resumed.run_id).data.tags["resumed_checkpoint"] == checkpoints[0]


def test_a_second_signal_stops_at_once_and_still_ends_the_run_killed(train, store, monkeypatch):
    log = tracking.MetricLogger.log

    def log_then_signal_twice(self, metrics, step):
        log(self, metrics, step)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tracking.MetricLogger, "log", log_then_signal_twice)
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    result = train("--epochs", "2", "--batch-size", "64", "--log-every", "2")
    assert result.code == 130
    run = only_run(store)
    assert result.err.strip().splitlines()[-1] == f"stopped at once; run runs:/{run.info.run_id} marked KILLED"
    assert run.info.status == "KILLED"
    assert MlflowClient().search_registered_models() == []
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_retried_with_backoff_then_named(monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}"
    now, waits, notes = [0.0], [], []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    with pytest.raises(tracking.TrackingUnavailable) as error:
        tracking.connect(url, timeout_s=20, log=lambda *a, **k: notes.append(a[0]), sleep=sleep,
                         clock=lambda: now[0])
    assert waits == [1, 2, 4, 8]
    message = str(error.value)
    assert f"cannot reach MLflow tracking server at {url}" in message
    assert "5 attempt(s)" in message and "--connect-timeout 20" in message
    assert len(notes) == 4 and all("retrying" in note for note in notes)


def test_unreachable_server_fails_the_cli_before_any_run(train, store):
    url = f"http://127.0.0.1:{closed_port()}"
    result = train(*FAST, "--tracking-uri", url, "--connect-timeout", "0")
    assert result.code == 1
    assert result.err.strip().splitlines()[-1].startswith(f"error: cannot reach MLflow tracking server at {url}")
    mlflow.set_tracking_uri(store)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_refusal_is_not_retried(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise MlflowException("Permission denied", error_code=PERMISSION_DENIED)

    monkeypatch.setattr(MlflowClient, "search_experiments", refuse)
    now, waits = [0.0], []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    with pytest.raises(tracking.TrackingUnavailable) as error:
        tracking.connect("http://user:secret@mlflow:5000", timeout_s=60, sleep=sleep, clock=lambda: now[0])
    assert waits == []
    assert str(error.value).startswith("MLflow tracking at http://mlflow:5000 failed: Permission denied")


def test_credentials_never_appear_in_printed_urls():
    assert redact("https://user:secret@mlflow.example:5000/x") == "https://mlflow.example:5000/x"
    assert tracking.run_url("http://u:p@mlflow:5000/", "3", "abc") == "http://mlflow:5000/#/experiments/3/runs/abc"


def test_without_tracking_nothing_is_logged(train, store):
    result = train(*FAST, "--no-tracking")
    assert result.code == 0
    assert result.summary == {"run": "none (tracking off)", "version": "none", "promoted": "no (tracking off)"}
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


class FakeClient:
    """Records what MetricLogger hands to MLflow."""

    class Done:
        def wait(self):
            pass

    def __init__(self):
        self.batches = []

    def log_batch(self, run_id, metrics, synchronous):
        assert synchronous is False
        self.batches.append([(m.key, m.value, m.step) for m in metrics])
        return self.Done()


def test_metrics_are_sent_in_batches_at_most_every_interval():
    now = [0.0]
    client = FakeClient()
    logger = tracking.MetricLogger("r" * 32, client=client, interval_s=5, clock=lambda: now[0])
    logger.log({"train_loss": 2.0, "train_accuracy": 0.1}, step=50)
    now[0] = 4.9
    logger.log({"train_loss": 1.0}, step=100)
    assert client.batches == []  # nothing on the wire yet: the step goes on
    now[0] = 5.0
    logger.log({"train_loss": 0.5}, step=150)
    assert client.batches == [[("train_loss", 2.0, 50), ("train_accuracy", 0.1, 50),
                               ("train_loss", 1.0, 100), ("train_loss", 0.5, 150)]]
    logger.log({"eval_accuracy": 0.9}, step=150)
    logger.flush()
    assert client.batches[-1] == [("eval_accuracy", 0.9, 150)]

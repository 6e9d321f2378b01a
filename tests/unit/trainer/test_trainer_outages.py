"""A tracking server or artifact store that stops answering mid-run: the trainer waits it out,
says so, loses nothing, and never leaves a run RUNNING while the server can be told."""

import mlflow
import pytest
from conftest import FAST
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from trainer import tracking


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(tracking, "FIRST_WAIT_S", 0.01)
    monkeypatch.setattr(tracking, "MAX_BACKOFF_S", 0.05)


def unavailable():
    # What MLflow's client raises once its own HTTP retries are spent.
    return MlflowException("API request failed: Connection refused", error_code=INTERNAL_ERROR)


def fail_first(monkeypatch, method, times, only=lambda *args: True):
    """Make MlflowClient.<method> fail `times` times as if the server were down, then work;
    only(*args) picks the calls that fail."""
    real = getattr(MlflowClient, method)
    calls = {"failed": 0, "total": 0}

    def flaky(self, *args, **kwargs):
        calls["total"] += 1
        if calls["failed"] < times and only(*args):
            calls["failed"] += 1
            raise unavailable()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, flaky)
    return calls


def test_checkpoint_upload_is_retried_until_the_store_answers(train, store, monkeypatch):
    calls = fail_first(monkeypatch, "log_artifact", times=3, only=lambda run_id, path, *rest: "epoch-" in path)
    result = train(*FAST, "--epochs", "2")
    assert result.code == 0, result.err
    assert "tracking server not answering while uploading checkpoint epoch-001" in result.err
    assert "retrying in" in result.err
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    saved = [a.path for a in MlflowClient().list_artifacts(result.run_id, "checkpoints")]
    assert len(saved) == 2 and calls["failed"] == 3


def test_end_of_run_waits_for_the_server_to_take_the_status(train, store, monkeypatch):
    fail_first(monkeypatch, "set_terminated", times=2)
    result = train(*FAST)
    assert result.code == 0
    assert f"while marking run {result.run_id} FINISHED" in result.err
    assert mlflow.get_run(result.run_id).info.status == "FINISHED"


def test_an_outage_longer_than_the_limit_fails_the_run_with_the_reason(train, store, monkeypatch):
    real = MlflowClient.log_batch

    def metrics_never_arrive(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            if synchronous is False:
                return Failed()
            raise unavailable()
        return real(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(MlflowClient, "log_batch", metrics_never_arrive)
    result = train(*FAST, "--outage-timeout", "0.2")
    assert result.code == 1
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("error: gave up sending") and "limit --outage-timeout 0.2 s" in last, last
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"


class Failed:
    def wait(self):
        raise MlflowException("The following failures occurred while performing one or more async "
                              "logging operations: [Connection refused]")


class OutageClient:
    """Async sends fail; synchronous sends fail `down_for` times, then are recorded."""

    def __init__(self, down_for=0, error=None):
        self.down_for, self.error, self.sent = down_for, error or unavailable(), []

    def log_batch(self, run_id, metrics, synchronous=True):
        if not synchronous:
            return Failed()
        if self.down_for:
            self.down_for -= 1
            raise self.error
        self.sent.append([(m.key, m.step) for m in metrics])


def test_metrics_that_async_logging_lost_are_sent_again():
    client = OutageClient(down_for=2)
    logger = tracking.MetricLogger("r" * 32, client=client, interval_s=0, sleep=lambda s: None)
    logger.log({"train_loss": 1.0}, step=1)
    logger.log({"train_loss": 0.5, "train_accuracy": 0.9}, step=2)
    logger.flush()
    assert client.sent == [[("train_loss", 1)], [("train_loss", 2), ("train_accuracy", 2)]]


def test_a_refused_batch_is_not_retried():
    refused = MlflowException("Invalid metric", error_code=INVALID_PARAMETER_VALUE)
    client = OutageClient(down_for=5, error=refused)
    logger = tracking.MetricLogger("r" * 32, client=client, interval_s=0, sleep=lambda s: None)
    logger.log({"train_loss": 1.0}, step=1)
    with pytest.raises(MlflowException, match="Invalid metric"):
        logger.flush()
    assert client.down_for == 4  # one synchronous attempt, no retries

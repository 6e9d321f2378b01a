"""The MLflow side of a run: reaching the server, logging without stalling, ending runs.

A tracking server that is still starting (compose brings it up beside the trainer) is
retried with backoff for a bounded time. Metrics go through MLflow's asynchronous queue,
so a step never waits on the network. A run always ends with an honest status.
"""

import contextlib
import importlib.util
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import mlflow
import mlflow.data
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stack_common.text import one_line
from stack_common.uris import redact

if TYPE_CHECKING:  # the registry commands use this module and need no torch
    # What MLflow's public log_batch(synchronous=False) returns; named for the annotation only.
    from mlflow.utils.async_logging.run_operations import RunOperations

    from trainer.data import Split

T = TypeVar("T")
Log = Callable[..., None]  # print-like: log(message, file=..., flush=...)

# MLflow stores a dataset's digest in 36 characters; the full checksum goes in a tag.
DATASET_DIGEST_CHARS = 32
# Bounds for MLflow's own retries of every later request, unless the environment sets them
# (compose does, with these values, for the trainer and serving alike): MLflow's defaults
# (7 retries, factor 2, 120 s timeouts) would hang a failing call silently for minutes in a
# run outside compose. Longer outages are waited for by during_run(), which says so.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
PROBE_TIMEOUT_S = 10
FIRST_WAIT_S = 1.0
MAX_BACKOFF_S = 10


class TrackingUnavailable(Exception):
    """The tracking server could not be reached or refused us."""


def is_http(uri: str | None) -> bool:
    return urlsplit(uri or "").scheme in ("http", "https")


@contextlib.contextmanager
def environment(overrides: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `overrides` applied for the block, then as it was."""
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _transient(error: Exception) -> bool:
    # Connection errors surface as INTERNAL_ERROR (HTTP 500) in MLflow; 4xx answers
    # such as bad credentials or a forbidden host will not heal by waiting.
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(error, (ConnectionError, TimeoutError, OSError))


class GaveUp(Exception):
    """A transient failure outlasted the time allowed for it."""

    def __init__(self, error: Exception, attempts: int, elapsed: float) -> None:
        super().__init__(str(error))
        self.error, self.attempts, self.elapsed = error, attempts, elapsed


def retry_transient(call: Callable[[], T], budget_s: float, on_retry: Callable[[Exception, float], None],
                    sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """Return call(), retrying transient failures with doubling waits (1, 2, 4 ... 10 s).

    A permanent failure is raised at once; a transient one that lasts past budget_s raises
    GaveUp. on_retry(error, wait) is told about each retry before its wait.
    """
    started = clock()
    attempts, wait = 0, FIRST_WAIT_S
    while True:
        attempts += 1
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - classified just below
            elapsed = clock() - started
            if not _transient(error):
                raise
            if elapsed + wait > budget_s:
                raise GaveUp(error, attempts, elapsed) from error
            on_retry(error, wait)
            sleep(wait)
            wait = min(wait * 2, MAX_BACKOFF_S)


def connect(tracking_uri: str | None, timeout_s: float, log: Log = print, sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> str:
    """Point MLflow at tracking_uri and prove it answers a real API call.

    Retries transient failures until timeout_s has passed, then raises TrackingUnavailable
    naming the URL and what was tried.
    """
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    shown = redact(uri)
    client = MlflowClient(uri)
    started = clock()

    def probe() -> None:
        remaining = timeout_s - (clock() - started)
        probe_timeout = str(max(1, int(min(PROBE_TIMEOUT_S, max(remaining, 1)))))
        # A real API call: /health answers even when the host check or auth would
        # reject every request that matters.
        with environment({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                           "MLFLOW_HTTP_REQUEST_TIMEOUT": probe_timeout}):
            client.search_experiments(max_results=1)

    def on_retry(error: Exception, wait: float) -> None:
        log(f"tracking server {shown} not reachable yet ({one_line(error, 300)}); "
            f"retrying in {wait:g} s", file=sys.stderr)

    def failed(error: Exception) -> TrackingUnavailable:
        return TrackingUnavailable(
            f"MLflow tracking at {shown} failed: {one_line(error, 300)}. Check "
            "MLFLOW_TRACKING_URI and MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD.")

    try:
        # Only a server is worth waiting for; a local store that fails will not heal.
        retry_transient(probe, timeout_s if is_http(uri) else 0, on_retry, sleep, clock)
    except GaveUp as gave_up:
        if not is_http(uri):
            raise failed(gave_up.error) from gave_up.error
        raise TrackingUnavailable(
            f"cannot reach MLflow tracking server at {shown}: {gave_up.attempts} attempt(s) "
            f"over {gave_up.elapsed:.0f} s (limit --connect-timeout {timeout_s:g} s) failed, "
            f"last with: {one_line(gave_up.error, 300)}. Check MLFLOW_TRACKING_URI and that the "
            "server is up."
        ) from gave_up.error
    except Exception as error:  # noqa: BLE001 - every other failure is permanent
        raise failed(error) from error
    return uri


def during_run(what: str, call: Callable[[], T], budget_s: float, log: Log = print,
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """Return call(), made while a run is in progress.

    When the tracking server, or the storage behind it, stops answering mid-run (a restart,
    an upgrade), training should not be thrown away: the call is retried, saying so, for
    up to budget_s (--outage-timeout), then TrackingUnavailable names what was lost.
    """
    def on_retry(error: Exception, wait: float) -> None:
        log(f"tracking server not answering while {what} ({one_line(error, 300)}); retrying in {wait:g} s",
            file=sys.stderr, flush=True)

    try:
        return retry_transient(call, budget_s, on_retry, sleep, clock)
    except GaveUp as gave_up:
        raise TrackingUnavailable(
            f"gave up {what}: {gave_up.attempts} attempt(s) over {gave_up.elapsed:.0f} s "
            f"(limit --outage-timeout {budget_s:g} s) failed, last with: {one_line(gave_up.error, 300)}"
        ) from gave_up.error


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    # Inside compose the trainer reaches the server as http://mlflow:5000, a name only
    # containers resolve; MLFLOW_UI_URL is the address people open in a browser.
    base = os.environ.get("MLFLOW_UI_URL") or (tracking_uri if is_http(tracking_uri) else "")
    if base:
        return f"{redact(base).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id}"


def system_metrics_available() -> bool:
    return importlib.util.find_spec("psutil") is not None


def dataset(split: "Split", name: str, source: Path, sha256: str) -> mlflow.data.Dataset:
    """The split as an MLflow dataset, shown in the run's Datasets section: its shape and
    dtype, where it was read from, and the checksum of the files."""
    with warnings.catch_warnings():
        # A local path matches MLflow's local source under two schemes, "" and "file";
        # it warns that it picked one, and either is this one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        return mlflow.data.from_numpy(split.images.cpu().numpy(), targets=split.labels.cpu().numpy(),
                                      source=str(source), name=name, digest=sha256[:DATASET_DIGEST_CHARS])


def log_datasets(train: "Split", test: "Split", source: Path, sha256: str, outage_s: float) -> None:
    """Log the training and the evaluation data, read from `source`, as inputs of the active run."""
    for split, name, context in ((train, "fashion-mnist-train", "training"),
                                 (test, "fashion-mnist-test", "evaluation")):
        logged = dataset(split, name, source, sha256)
        during_run(f"logging the {context} dataset",
                   partial(mlflow.log_input, logged, context=context, tags={"dataset_sha256": sha256}), outage_s)


class MetricLogger:
    """Collects metrics and hands them to MLflow's asynchronous queue in batches.

    log() only appends a few objects; every `interval_s` seconds the collected metrics go
    to MLflow as one batch, which its worker thread sends while training goes on. One
    request every few seconds instead of one per log call keeps the tracking server's
    work, on the same CPUs in a small deployment, out of the training budget. flush()
    sends the rest and waits; a batch that MLflow could not deliver is sent again for up to
    outage_s, so a server restart loses nothing, and a metric that is still lost fails the
    run instead of vanishing. Sending twice is safe: the server drops exact duplicates.
    """

    def __init__(self, run_id: str, client: MlflowClient | None = None, interval_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, outage_s: float = 300.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.interval_s = interval_s
        self.clock = clock
        self.outage_s = outage_s
        self.sleep = sleep
        self.buffer: list[Metric] = []
        self.pending: list[tuple[list[Metric], RunOperations]] = []
        self.last_sent = clock()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.buffer.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        if self.clock() - self.last_sent >= self.interval_s:
            self._send()

    def _send(self) -> None:
        if self.buffer:
            batch, self.buffer = self.buffer, []
            self.pending.append((batch, self.client.log_batch(self.run_id, metrics=batch, synchronous=False)))
        self.last_sent = self.clock()

    def flush(self) -> None:
        self._send()
        pending, self.pending = self.pending, []
        for batch, operation in pending:
            try:
                operation.wait()
            except Exception:  # noqa: BLE001 - sent again below; a permanent error is raised from there
                during_run(f"sending {len(batch)} metrics", partial(self.client.log_batch, self.run_id, metrics=batch),
                           self.outage_s, sleep=self.sleep, clock=self.clock)


class NoLogger:
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass


def end_run(status: str, outage_s: float = 300.0, sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> None:
    """End the active run with status (FINISHED, FAILED or KILLED), if one is active.

    A run left RUNNING misleads everyone who looks at it, so a server that went away is
    waited for (up to outage_s). A failure here is reported, not raised: the error that
    brought us here is the one worth showing.
    """
    run = mlflow.active_run()
    if run is None:
        return
    run_id = run.info.run_id
    try:
        # mlflow.end_run forgets the run before telling the server, so it cannot be retried.
        during_run(f"marking run {run_id} {status}", partial(MlflowClient().set_terminated, run_id, status),
                   outage_s, sleep=sleep, clock=clock)
    except Exception as error:  # noqa: BLE001
        print(f"could not mark run {run_id} {status}: {one_line(error, 300)}. It shows as RUNNING until "
              f"it is ended, for example with MlflowClient().set_terminated('{run_id}', '{status}').",
              file=sys.stderr, flush=True)
    # Stops the system-metrics thread; the server already has the status, or is gone.
    with contextlib.suppress(Exception):
        mlflow.end_run(status=status)

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
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

# Bounds for MLflow's own retries of every later request, unless the user set them:
# its defaults (7 retries, factor 2, 120 s timeouts) can hang a failing run for minutes.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
PROBE_TIMEOUT_S = 10
MAX_BACKOFF_S = 10


class TrackingUnavailable(Exception):
    """The tracking server could not be reached or refused us."""


def redact(uri):
    """The URI without user:password, safe to print and to store in tags."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def is_http(uri):
    return urlsplit(uri or "").scheme in ("http", "https")


@contextlib.contextmanager
def _environment(overrides):
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


def _transient(error):
    # Connection errors surface as INTERNAL_ERROR (HTTP 500) in MLflow; 4xx answers
    # such as bad credentials or a forbidden host will not heal by waiting.
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(error, (ConnectionError, TimeoutError, OSError))


def _short(error):
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def connect(tracking_uri, timeout_s, log=print, sleep=time.sleep, clock=time.monotonic):
    """Point MLflow at tracking_uri and prove it answers a real API call.

    Retries transient failures with doubling waits (1, 2, 4 ... 10 s) until timeout_s has
    passed, then raises TrackingUnavailable naming the URL and what was tried.
    """
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    shown = redact(uri)
    client = MlflowClient(uri)
    started = clock()
    attempts, wait = 0, 1.0
    while True:
        attempts += 1
        remaining = timeout_s - (clock() - started)
        probe_timeout = str(max(1, int(min(PROBE_TIMEOUT_S, max(remaining, 1)))))
        try:
            # A real API call: /health answers even when the host check or auth would
            # reject every request that matters.
            with _environment({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                               "MLFLOW_HTTP_REQUEST_TIMEOUT": probe_timeout}):
                client.search_experiments(max_results=1)
            return uri
        except Exception as error:  # noqa: BLE001 - classified just below
            elapsed = clock() - started
            if not _transient(error) or not is_http(uri):
                raise TrackingUnavailable(
                    f"MLflow tracking at {shown} failed: {_short(error)}. Check "
                    "MLFLOW_TRACKING_URI and MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD."
                ) from error
            if elapsed + wait > timeout_s:
                raise TrackingUnavailable(
                    f"cannot reach MLflow tracking server at {shown}: {attempts} attempt(s) "
                    f"over {elapsed:.0f} s (limit --connect-timeout {timeout_s:g} s) failed, "
                    f"last with: {_short(error)}. Check MLFLOW_TRACKING_URI and that the "
                    "server is up."
                ) from error
            log(f"tracking server {shown} not reachable yet ({_short(error)}); "
                f"retrying in {wait:g} s", file=sys.stderr)
            sleep(wait)
            wait = min(wait * 2, MAX_BACKOFF_S)


def run_url(tracking_uri, experiment_id, run_id):
    # Inside compose the trainer reaches the server as http://mlflow:5000, a name only
    # containers resolve; MLFLOW_UI_URL is the address people open in a browser.
    base = os.environ.get("MLFLOW_UI_URL") or (tracking_uri if is_http(tracking_uri) else "")
    if base:
        return f"{redact(base).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id}"


def system_metrics_available():
    return importlib.util.find_spec("psutil") is not None


class MetricLogger:
    """Collects metrics and hands them to MLflow's asynchronous queue in batches.

    log() only appends a few objects; every `interval_s` seconds the collected metrics go
    to MLflow as one batch, which its worker thread sends while training goes on. One
    request every few seconds instead of one per log call keeps the tracking server's
    work, on the same CPUs in a small deployment, out of the training budget. flush()
    sends the rest and waits, so a lost metric fails the run instead of vanishing.
    """

    def __init__(self, run_id, client=None, interval_s=5.0, clock=time.monotonic):
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.interval_s = interval_s
        self.clock = clock
        self.buffer = []
        self.pending = []
        self.last_sent = clock()

    def log(self, metrics, step):
        now = int(time.time() * 1000)
        self.buffer.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        if self.clock() - self.last_sent >= self.interval_s:
            self._send()

    def _send(self):
        if self.buffer:
            self.pending.append(self.client.log_batch(self.run_id, metrics=self.buffer, synchronous=False))
            self.buffer = []
        self.last_sent = self.clock()

    def flush(self):
        self._send()
        pending, self.pending = self.pending, []
        for operation in pending:
            operation.wait()


class NoLogger:
    def log(self, metrics, step):
        pass

    def flush(self):
        pass


def end_run(status):
    """End the active run with status (FINISHED, FAILED or KILLED), if one is active.

    A failure here is reported, not raised: it usually means the server went away, and
    the error that brought us here is the one worth showing.
    """
    run = mlflow.active_run()
    if run is None:
        return
    try:
        mlflow.end_run(status=status)
    except Exception as error:  # noqa: BLE001
        print(f"could not mark run {run.info.run_id} {status}: {_short(error)}", file=sys.stderr)

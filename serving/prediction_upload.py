"""Uploads the prediction log's Parquet files to the tracking server, as the `predictions` account.

Serving's own account may read its model and nothing else (a DENY on every run), so the log
goes up with an account of its own, which may edit the inference experiment and nothing
else. MLflow's client takes its credentials from process-wide environment variables, which
are serving's; this module therefore talks to the tracking server's REST API itself, with
the log's credentials on its own `requests` session, bounded timeouts and urllib3's retries.

Files go through the server's artifact proxy (serving holds no storage key) into the day's
run: PUT /api/2.0/mlflow-artifacts/artifacts/<the run's artifact_uri path>/predictions/<file>,
as MLflow's own HttpArtifactRepository does for `mlflow-artifacts:` URIs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

ARTIFACT_DIR = "predictions"
DAY_TAG = "prediction_day"
PROXY_ROOT = "/api/2.0/mlflow-artifacts/artifacts"
# (connect, read) seconds: a file of a minute's sample uploads well within the read bound.
TIMEOUT = (5.0, 60.0)


class UploadError(Exception):
    """The tracking server refused or did not answer; the caller keeps the rows for next time."""


def _session(username: str, password: str, retries: int, backoff_s: float) -> requests.Session:
    session = requests.Session()
    session.auth = (username, password)  # set per session: never MLFLOW_TRACKING_USERNAME/PASSWORD
    # Retries cover connection failures and a proxy's 502-504 while the server restarts; a
    # duplicate run a retried create may leave is harmless: every worker settles on the oldest.
    retry = Retry(total=retries, backoff_factor=backoff_s, status_forcelist=(429, 502, 503, 504),
                  allowed_methods=frozenset({"GET", "POST", "PUT"}), raise_on_status=False,
                  respect_retry_after_header=True)
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class TrackingUploader:
    """Uploads to the day's run of the inference experiment.

    Several workers (and containers) share a day's run: each finds it by its tag, and one
    that creates it then settles on the oldest run so tagged, so all converge on one."""

    def __init__(self, tracking_uri: str, experiment_name: str, username: str, password: str,
                 retries: int = 2, backoff_s: float = 0.5) -> None:
        self.base = tracking_uri.rstrip("/")
        self.experiment_name = experiment_name
        self.username = username
        self._session = _session(username, password, retries, backoff_s)
        self._experiment_id: str | None = None
        self._runs: dict[str, tuple[str, str]] = {}  # day -> (run id, the run's artifact path on the proxy)

    def _call(self, method: str, path: str, **kwargs: object) -> dict[str, Any]:
        try:
            response = self._session.request(method, self.base + path, timeout=TIMEOUT, **kwargs)
        except requests.RequestException as error:
            raise UploadError(f"{method} {path}: {type(error).__name__}") from error
        if not response.ok:
            try:
                detail = response.json().get("message", "")
            except ValueError:
                detail = response.text[:200]
            raise UploadError(f"{method} {path} as {self.username!r}: {response.status_code} {detail}".rstrip())
        try:
            return response.json() if response.content else {}
        except ValueError as error:
            raise UploadError(f"{method} {path}: the answer is not JSON") from error

    def _experiment(self) -> str:
        if self._experiment_id is None:
            try:
                found = self._call("GET", "/api/2.0/mlflow/experiments/get-by-name",
                                   params={"experiment_name": self.experiment_name})
            except UploadError as error:
                # The account may not create experiments: mlflow-init makes this one.
                raise UploadError(f"experiment {self.experiment_name!r} is not there or not readable "
                                  f"(mlflow-init creates it): {error}") from error
            self._experiment_id = str(found["experiment"]["experiment_id"])
        return self._experiment_id

    def _oldest_run(self, experiment_id: str, day: str) -> dict[str, Any] | None:
        found = self._call("POST", "/api/2.0/mlflow/runs/search", json={
            "experiment_ids": [experiment_id], "filter": f"tags.{DAY_TAG} = '{day}'",
            "order_by": ["attributes.start_time ASC"], "max_results": 1})
        runs = found.get("runs") or []
        return runs[0]["info"] if runs else None

    def run_for(self, day: str) -> tuple[str, str]:
        """The day's run id and the folder its files go to behind the artifact proxy."""
        if day not in self._runs:
            experiment_id = self._experiment()
            info = self._oldest_run(experiment_id, day)
            created = None
            if info is None:
                now_ms = int(time.time() * 1000)
                created = self._call("POST", "/api/2.0/mlflow/runs/create", json={
                    "experiment_id": experiment_id, "run_name": f"predictions-{day}", "start_time": now_ms,
                    "tags": [{"key": DAY_TAG, "value": day}]})["run"]["info"]
                info = self._oldest_run(experiment_id, day) or created
            # Kept before anything else can fail, so that a failing upload never makes another run.
            self._runs = {d: r for d, r in self._runs.items() if d >= day}
            self._runs[day] = (info["run_id"], proxy_path(info["artifact_uri"]))
            if created is not None:  # a container of files, not a job that runs
                self._call("POST", "/api/2.0/mlflow/runs/update", json={
                    "run_id": created["run_id"], "status": "FINISHED", "end_time": int(time.time() * 1000)})
        return self._runs[day]

    def upload(self, day: str, path: Path) -> None:
        _, folder = self.run_for(day)
        # Bytes, not a stream: a retried PUT must send the whole file again.
        self._call("PUT", f"{PROXY_ROOT}/{folder}/{ARTIFACT_DIR}/{quote(path.name)}", data=path.read_bytes(),
                   headers={"Content-Type": "application/octet-stream"})


def proxy_path(artifact_uri: str) -> str:
    """`mlflow-artifacts:/1/<run>/artifacts` -> `1/<run>/artifacts`; any other scheme is an error,
    since serving holds no storage key and can upload only through the server's proxy."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme != "mlflow-artifacts":
        raise UploadError(f"the run's files live at {parsed.scheme}:, not behind the tracking server's "
                          "artifact proxy (mlflow server --serve-artifacts); the prediction log cannot upload there")
    return quote(parsed.path.strip("/"))

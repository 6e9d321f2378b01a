"""A sampled log of what serving answered, uploaded as Parquet for drift reports.

With PREDICTION_LOG_SAMPLE above 0, that fraction of the requests answered on the direct
path is kept: each image's pixels, the probabilities and predicted class, the version that
answered, the latency and the time. The request path only draws the sample and appends to
a bounded buffer under a lock; a background thread parses, writes Parquet and uploads it
every PREDICTION_LOG_FLUSH_S through the tracking server's artifact proxy, with an MLflow
account of its own (serving/prediction_upload.py), into one run per UTC day of the inference
experiment. While uploads
fail, the buffer keeps the newest PREDICTION_LOG_BUFFER images and counts the rest in
`dropped_rows`.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import orjson

from serving.prediction_upload import TrackingUploader
from serving.scoring import Reply

if TYPE_CHECKING:
    import pyarrow as pa

    from serving.config import Settings

log = logging.getLogger("serving")

# A body sent as raw JSON is parsed only once it is logged, off the request path; until then
# its image count is bounded from its size: a 28x28 image takes at least "0," per pixel.
MIN_JSON_BYTES_PER_IMAGE = 2 * 28 * 28
STOP_FLUSH_SECONDS = 10.0
_WARN_INTERVAL = 60.0


class Uploader(Protocol):
    def upload(self, day: str, path: Path) -> None: ...


@dataclass(frozen=True)
class Entry:
    at: float  # seconds since the epoch, UTC
    version: str
    inputs: np.ndarray | bytes  # the parsed tensor, or the raw JSON body
    predictions: np.ndarray | bytes  # the predictions, or the answer's JSON body
    latency_s: float
    rows: int


def utc_day(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


def _input_rows(inputs: np.ndarray | bytes) -> np.ndarray | None:
    if isinstance(inputs, bytes):
        try:
            inputs = np.asarray(orjson.loads(inputs)["inputs"], dtype=np.float32)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
    array = np.asarray(inputs, dtype=np.float32)
    return array.reshape(len(array), -1) if array.ndim >= 2 else array.reshape(1, -1)


def _prediction_rows(predictions: np.ndarray | bytes, rows: int) -> np.ndarray | None:
    try:
        if isinstance(predictions, bytes):
            predictions = orjson.loads(predictions)["predictions"]
        values = np.asarray(predictions, dtype=np.float32)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return values if values.ndim == 2 and len(values) == rows else None


def to_table(entries: list[Entry]) -> pa.Table:
    """One row per image: time, model_version, latency_ms, inputs, probabilities, predicted_class."""
    import pyarrow as pa

    columns: dict[str, list] = {name: [] for name in ("time", "model_version", "latency_ms", "inputs",
                                                      "probabilities", "predicted_class")}
    for entry in entries:
        images = _input_rows(entry.inputs)
        if images is None:
            continue
        probabilities = _prediction_rows(entry.predictions, len(images))
        stamp = datetime.fromtimestamp(entry.at, UTC)
        for i, image in enumerate(images):
            columns["time"].append(stamp)
            columns["model_version"].append(entry.version)
            columns["latency_ms"].append(entry.latency_s * 1000.0)
            columns["inputs"].append(image)
            columns["probabilities"].append(None if probabilities is None else probabilities[i])
            columns["predicted_class"].append(None if probabilities is None else int(probabilities[i].argmax()))
    return pa.table({
        "time": pa.array(columns["time"], pa.timestamp("ms", tz="UTC")),
        "model_version": pa.array(columns["model_version"], pa.string()),
        "latency_ms": pa.array(columns["latency_ms"], pa.float32()),
        "inputs": pa.array(columns["inputs"], pa.list_(pa.float32())),
        "probabilities": pa.array(columns["probabilities"], pa.list_(pa.float32())),
        "predicted_class": pa.array(columns["predicted_class"], pa.int16()),
    })


class PredictionLog:
    """The sampled buffer and its uploading thread; `record` never raises and never waits
    for anything but the buffer's lock."""

    def __init__(self, sample: float, buffer_rows: int, flush_seconds: float, uploader: Uploader | None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.time) -> None:
        self.sample = sample
        self.buffer_rows = buffer_rows
        self.flush_seconds = flush_seconds
        self.uploader = uploader
        self._random = (rng or random.Random()).random
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.deque[Entry] = collections.deque()
        self._buffered = 0
        self.dropped_rows = 0  # images let go because the buffer was full (uploads failing)
        self.uploaded_rows = 0
        self.upload_failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_warning = -_WARN_INTERVAL

    @property
    def enabled(self) -> bool:
        return self.sample > 0 and self.uploader is not None

    @property
    def buffered_rows(self) -> int:
        return self._buffered

    def record(self, version: str, inputs: object, reply: Reply, latency_s: float) -> None:
        """Keep this request's images and answer with probability `sample`."""
        try:
            if not self.enabled or reply.status != 200 or self._random() >= self.sample:
                return
            if isinstance(inputs, np.ndarray):
                rows = len(inputs) if inputs.ndim >= 2 else 1
            elif isinstance(inputs, bytes):
                rows = max(1, len(inputs) // MIN_JSON_BYTES_PER_IMAGE)
            else:
                return
            predictions = reply.predictions if isinstance(reply.predictions, np.ndarray) else reply.body
            entry = Entry(self._clock(), str(version), inputs, predictions, latency_s, rows)
            with self._lock:
                self._entries.append(entry)
                self._buffered += rows
                self._trim()
        except Exception:  # a log must never cost a request its answer
            log.debug("prediction log: a request was not recorded", exc_info=True)

    def _trim(self) -> None:
        """Drop the oldest entries beyond the bound; the caller holds the lock."""
        while self._buffered > self.buffer_rows and self._entries:
            oldest = self._entries.popleft()
            self._buffered -= oldest.rows
            self.dropped_rows += oldest.rows

    def flush(self) -> int:
        """Upload what is buffered, one Parquet file per UTC day; return the images uploaded.
        What fails to upload goes back into the buffer, in front of newer entries."""
        with self._lock:
            entries = list(self._entries)
            self._entries.clear()
            self._buffered = 0
        by_day: dict[str, list[Entry]] = collections.defaultdict(list)
        for entry in entries:
            by_day[utc_day(entry.at)].append(entry)
        failed: list[Entry] = []
        uploaded = 0
        for day, group in sorted(by_day.items()):
            try:
                uploaded += self._upload(day, group)
            except Exception as error:  # the tracking server away, a refused upload: retried next time
                failed.extend(group)
                self.upload_failures += 1
                self._warn(f"prediction log: upload for {day} failed, kept in memory: {type(error).__name__}: {error}")
        if failed:
            with self._lock:
                self._entries.extendleft(reversed(failed))
                self._buffered += sum(e.rows for e in failed)
                self._trim()
        self.uploaded_rows += uploaded
        return uploaded

    def _upload(self, day: str, entries: list[Entry]) -> int:
        import pyarrow.parquet as pq

        table = to_table(entries)
        if table.num_rows == 0:
            return 0
        name = f"{datetime.now(UTC):%H%M%S}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        with tempfile.TemporaryDirectory(prefix="prediction-log-") as folder:
            path = Path(folder) / name
            pq.write_table(table, path, compression="zstd")
            self.uploader.upload(day, path)
        return table.num_rows

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_INTERVAL:
            self._last_warning = now
            log.warning("%s (dropped so far: %d images; further warnings muted for %.0f s)",
                        message, self.dropped_rows, _WARN_INTERVAL)

    # -- the uploading thread ----------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self._flush_safely()
        self._flush_safely()  # what was buffered when the worker was told to stop

    def _flush_safely(self) -> None:
        try:
            self.flush()
        except Exception:  # the thread must outlive any surprise
            log.exception("prediction log: flushing failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_FLUSH_SECONDS)


def from_settings(settings: Settings) -> PredictionLog:
    """The worker's prediction log; with PREDICTION_LOG_SAMPLE=0 one that keeps nothing."""
    uploader = None
    if settings.prediction_log_sample > 0:
        uploader = TrackingUploader(settings.tracking_uri, settings.inference_experiment,
                                    settings.prediction_log_username,
                                    settings.prediction_log_password.get_secret_value())
    return PredictionLog(settings.prediction_log_sample, settings.prediction_log_buffer,
                         settings.prediction_log_flush_seconds, uploader)

"""Prometheus metrics of the serving container, and GET /metrics.

Each gunicorn worker records its own requests and model loads. With PROMETHEUS_MULTIPROC_DIR
set (`python -m serving` sets it before gunicorn starts), prometheus_client keeps every
worker's values in files there, and whichever worker answers a scrape reads them all: counters
and histograms are summed over workers (dead ones included, so totals never go back), gauges
are per worker (a `pid` label) or summed over live workers. gunicorn's hooks
(`serving.metrics_files`) empty the directory when the master starts and drop a dead worker's
gauges.

/metrics answers only `Authorization: Bearer <SERVING_METRICS_TOKEN>`; with no token set it
answers 404 "metrics are off", so a stack without the secret exposes nothing.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from pydantic import SecretStr

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# Resident memory is sampled this often per worker (a scrape reaches one worker only).
MEMORY_SAMPLE_SECONDS = 5.0

# From one image on the direct path (milliseconds) to a large batch or a swap under load (seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

REQUESTS = Counter("serving_requests", "POST /invocations answered, by status code and the model version that "
                   "answered ('none' while no version is served)", ["code", "version"])
LATENCY = Histogram("serving_request_duration_seconds", "Time from a POST /invocations arriving to its answer "
                    "being sent", ["version"], buckets=LATENCY_BUCKETS)
ROWS = Histogram("serving_request_rows", "Rows (images) per tensor request scored on the direct path",
                 buckets=ROW_BUCKETS)
IN_FLIGHT = Gauge("serving_requests_in_flight", "POST /invocations being answered, over live workers",
                  multiprocess_mode="livesum")
LOADS = Counter("serving_model_loads", "Versions downloaded, verified, loaded and checked")
SWAPS = Counter("serving_model_swaps", "Versions switched to (a worker starting counts its first version)")
REFUSALS = Counter("serving_model_refusals", "Versions refused by verification (signature, provenance, loader)")
FAILURES = Counter("serving_model_load_failures", "Versions that failed to prepare, by step", ["step"])
LOAD_SECONDS = Histogram("serving_model_load_duration_seconds", "Time to prepare a version, by outcome",
                         ["outcome"], buckets=LOAD_BUCKETS)
# Per worker (a `pid` label), live workers only: the workers switch independently.
SERVED_VERSION = Gauge("serving_model_version", "Version this worker serves; 0 while it serves none",
                       multiprocess_mode="liveall")
ALIAS_VERSION = Gauge("serving_model_alias_version", "Version the alias pointed at when this worker last "
                      "looked; 0 while no version holds it", multiprocess_mode="liveall")
MEMORY = Gauge("serving_worker_resident_memory_bytes", "Resident memory of this worker process",
               multiprocess_mode="liveall")

SHADOW_ROWS = Counter("serving_shadow_rows", "Rows the shadow challenger scored, by version and whether its "
                      "class agreed with production's", ["version", "agreed"])
ROLLOUT_ABORTS = Counter("serving_rollout_aborts", "Canary or shadow rollouts this worker aborted by itself",
                         ["version"])

_sampler_lock = threading.Lock()
_sampler_pid: int | None = None  # a forked child inherits this, but not the thread


def _version_number(version: str | None) -> float:
    # Registry versions are whole numbers; anything else shows as 0 (nothing comparable).
    try:
        return float(version) if version is not None else 0.0
    except ValueError:
        return 0.0


# -- what the watcher reports ------------------------------------------------------------


def version_prepared(seconds: float) -> None:
    LOADS.inc()
    LOAD_SECONDS.labels("loaded").observe(seconds)


def version_swapped(version: str) -> None:
    SWAPS.inc()
    SERVED_VERSION.set(_version_number(version))


def version_refused(seconds: float) -> None:
    REFUSALS.inc()
    LOAD_SECONDS.labels("refused").observe(seconds)


def version_failed(step: str, seconds: float) -> None:
    FAILURES.labels(step).inc()
    LOAD_SECONDS.labels("failed").observe(seconds)


def alias_seen(version: str | None) -> None:
    ALIAS_VERSION.set(_version_number(version))


# -- what the app reports ----------------------------------------------------------------


def request_rows(parsed: object) -> None:
    """Count the rows of a body the direct path parsed into an array (nothing else)."""
    if isinstance(parsed, np.ndarray):
        ROWS.observe(parsed.shape[0] if parsed.ndim else 1)


async def measure_invocation(handler: Callable[[Receive, Send], Awaitable[None]], receive: Receive,
                             send: Send) -> None:
    """Run one POST /invocations, counting it by the status and version of its answer."""
    answer: dict[str, str] = {}

    async def watch(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["code"] = str(message["status"])
            answer["version"] = next((v.decode("latin-1") for k, v in message.get("headers", ())
                                      if k == b"x-model-version"), "none")
        await send(message)

    started = time.perf_counter()
    IN_FLIGHT.inc()
    try:
        await handler(receive, watch)
    finally:
        IN_FLIGHT.dec()
        if answer:  # a client that left before its answer was not answered
            REQUESTS.labels(answer["code"], answer["version"]).inc()
            LATENCY.labels(answer["version"]).observe(time.perf_counter() - started)


def _sample_memory() -> None:
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return  # not Linux: no resident size to read cheaply
    MEMORY.set(pages * os.sysconf("SC_PAGE_SIZE"))


def start_memory_sampler() -> None:
    """Sample this worker's resident memory every few seconds, from a daemon thread (once per
    process): a scrape is answered by one worker, which cannot read the others' memory."""
    global _sampler_pid
    with _sampler_lock:
        if _sampler_pid == os.getpid():
            return
        _sampler_pid = os.getpid()

        _sample_memory()  # a worker's first figure is there from its start

        def sample() -> None:
            while True:
                time.sleep(MEMORY_SAMPLE_SECONDS)
                _sample_memory()

        threading.Thread(target=sample, name="memory-sampler", daemon=True).start()


# -- GET /metrics ------------------------------------------------------------------------


def exposition() -> bytes:
    """Every worker's metrics in Prometheus' text format."""
    _sample_memory()  # this worker's figure is fresh; the others' at most a few seconds old
    if not MULTIPROCESS:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


def _json(status: int, error_code: str, message: str, extra: list[tuple[bytes, bytes]]) -> Message:
    body = json.dumps({"error_code": error_code, "message": message}).encode()
    return {"status": status, "body": body, "headers": [(b"content-type", b"application/json"), *extra]}


def metrics_answer(token: SecretStr, authorization: bytes | None) -> Message:
    """Status, headers and body of GET /metrics for the given Authorization header."""
    expected = token.get_secret_value().encode()
    if not expected:
        return _json(404, "NOT_FOUND", "metrics are off: SERVING_METRICS_TOKEN is not set", [])
    scheme, _, given = (authorization or b"").strip().partition(b" ")
    if scheme.lower() != b"bearer" or not given.strip():
        return _json(401, "UNAUTHENTICATED", "GET /metrics needs the header 'Authorization: Bearer <token>' "
                     "with the token in SERVING_METRICS_TOKEN",
                     [(b"www-authenticate", b'Bearer realm="serving metrics"')])
    if not hmac.compare_digest(given.strip(), expected):
        return _json(401, "UNAUTHENTICATED", "the bearer token is not the one in SERVING_METRICS_TOKEN",
                     [(b"www-authenticate", b'Bearer realm="serving metrics", error="invalid_token"')])
    # The classic text format (names escaped to underscores), which every Prometheus 2 reads.
    return {"status": 200, "body": exposition(), "headers": [(b"content-type", CONTENT_TYPE_PLAIN_0_0_4.encode())]}


async def send_metrics(token: SecretStr, authorization: bytes | None, send: Send,
                       headers: list[tuple[bytes, bytes]]) -> None:
    answer = metrics_answer(token, authorization)
    body = answer["body"]
    all_headers = [*answer["headers"], (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": answer["status"], "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


# -- what the rollout reports ------------------------------------------------------------


def shadow_compared(version: str, rows: int, agreed: int) -> None:
    SHADOW_ROWS.labels(version, "true").inc(agreed)
    SHADOW_ROWS.labels(version, "false").inc(rows - agreed)


def rollout_aborted(version: str) -> None:
    ROLLOUT_ABORTS.labels(version).inc()

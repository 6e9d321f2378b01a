"""Canary and shadow rollouts: a challenger version served beside production.

`registry_cli canary VERSION --percent P` points the challenger alias (CHALLENGER_ALIAS) at
VERSION and writes the rollout on that version's tags (`rollout.mode`, `rollout.percent`),
so every worker reads both with the one registry call its challenger watcher makes per poll.

    canary   P% of requests (drawn per request) are answered by the challenger; an answer
             worse than production's (an error where production answers) is replaced by
             production's, so clients never see the challenger fail.
    shadow   P% of tensor requests (100 by default: MLflow's JSON on /invocations, and the
             Open Inference Protocol on /v2) are also scored by the challenger on a
             background thread, after the client has production's answer; how often both
             predict the same class is counted. A full queue drops the shadow copy.

Each worker keeps per-version counts in a rolling window and aborts the rollout by itself
when the challenger's error rate or p99 latency is worse than production's by more than
the settings allow. Aborting is local and needs no registry write (serving keeps READ on
the model): the worker stops routing to that version, says why on /status and in the log,
and leaves a marker in the cache directory that the other workers of the container (and
a restart) read. The operator ends the rollout in the registry with `registry_cli abort`,
which sets `rollout.mode` to `ended` (EDIT on the model suffices; serving then drops the
challenger) and removes the alias where its account may (MANAGE).

An abort belongs to one rollout, named by the `rollout.started_at` tag `registry_cli` writes:
rolling the same version out again (a new start) begins with no abort and fresh counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import random
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import orjson

from serving import metrics
from serving.watcher import AliasWatcher

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from serving.config import Settings
    from serving.model_store import LoadedModel, ModelStore
    from serving.scoring import Reply

log = logging.getLogger("serving")

MODE_TAG = "rollout.mode"
PERCENT_TAG = "rollout.percent"
STARTED_TAG = "rollout.started_at"
MODES = ("canary", "shadow")
ENDED = "ended"  # registry_cli abort/promote end a rollout with this mode, alias removed or not
# Samples kept per version, whatever the window: bounds memory and the cost of a p99.
MAX_SAMPLES = 4096
# The abort markers other workers leave are looked for at most this often per worker.
MARKER_CHECK_SECONDS = 1.0

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
Answer = Callable[["LoadedModel", Send], Awaitable[None]]
Headers = dict[bytes, bytes]


class ShadowCopy(NamedTuple):
    """A request the shadow may score again, in the protocol it came in: `score(model)` is
    that model's answer (None for a body only MLflow's own app reads), and
    `predictions(body, headers)` reads the predictions back from an answer."""

    score: Callable[[LoadedModel], Reply | None]
    predictions: Callable[[bytes, Headers], np.ndarray | None]


def plan_from_tags(tags: dict[str, str]) -> tuple[str, float]:
    """(mode, percent) written on a challenger version; ValueError in plain words if unusable."""
    mode = tags.get(MODE_TAG, "canary")
    if mode not in MODES:
        raise ValueError(f"its tag {MODE_TAG}={mode!r} is neither canary nor shadow")
    default = "100" if mode == "shadow" else None
    raw = tags.get(PERCENT_TAG, default)
    if raw is None:
        raise ValueError(f"it has no {PERCENT_TAG} tag")
    try:
        percent = float(raw)
    except ValueError:
        raise ValueError(f"its tag {PERCENT_TAG}={raw!r} is not a number") from None
    if not 0 <= percent <= 100:
        raise ValueError(f"its tag {PERCENT_TAG}={raw!r} is not between 0 and 100")
    return mode, percent


def json_predictions(body: bytes, headers: Headers | None = None) -> np.ndarray | None:
    """The predictions of a {"predictions": [[...], ...]} answer, or None."""
    try:
        return np.asarray(orjson.loads(body)["predictions"], dtype=np.float64)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def predicted_classes(predictions: np.ndarray | None) -> np.ndarray | None:
    """The argmax of each row of the predictions, or None where there are no rows of scores."""
    if predictions is None or predictions.ndim < 2 or predictions.shape[-1] == 0:
        return None
    return predictions.argmax(axis=-1).reshape(-1)


class Window:
    """Outcomes of one version's requests over the last `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._samples: deque[tuple[float, bool, float]] = deque(maxlen=MAX_SAMPLES)

    def add(self, now: float, failed: bool, latency: float) -> None:
        self._samples.append((now, failed, latency))

    def summary(self, now: float) -> tuple[int, int, float | None]:
        """(requests, errors, p99 latency in seconds) within the window."""
        while self._samples and self._samples[0][0] < now - self.seconds:
            self._samples.popleft()
        if not self._samples:
            return 0, 0, None
        errors = sum(1 for _, failed, _ in self._samples if failed)
        p99 = float(np.percentile([latency for _, _, latency in self._samples], 99))
        return len(self._samples), errors, p99


@dataclass
class VersionCounters:
    """Totals since the worker started: plain counters for metrics."""

    requests: int = 0
    errors: int = 0
    latency_seconds_sum: float = 0.0


@dataclass
class ShadowCounters:
    scored: int = 0  # challenger scorings compared with production's answer
    dropped: int = 0  # not scored: the queue was full
    skipped: int = 0  # not comparable: not a tensor JSON body, or production did not answer 200
    compared_rows: int = 0
    agreed_rows: int = 0


class _Captured:
    """An ASGI `send` that notes the status and keeps the answer, to look at before the
    client gets it; or, given `forward`, passes it straight on."""

    def __init__(self, forward: Send | None = None) -> None:
        self.messages: list[Message] = []
        self.status = 500
        self._forward = forward

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        if self._forward is not None:
            await self._forward(message)
        else:
            self.messages.append(message)

    @property
    def headers(self) -> Headers:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        return dict(starts[0].get("headers", [])) if starts else {}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    async def replay(self, send: Send) -> None:
        for message in self.messages:
            await send(message)


class Rollout:
    """The challenger of one worker: its watcher, routing, counts, abort and shadow thread."""

    def __init__(self, settings: Settings, production: AliasWatcher, registry: MlflowClient | None = None,
                 store: ModelStore | None = None, seed: int | None = None) -> None:
        self.settings = settings
        self.production = production
        self.watcher = AliasWatcher(settings.model_copy(update={"model_alias": settings.challenger_alias}),
                                    registry=registry, store=store, optional=True,
                                    pinned=lambda: self._path_of(production),
                                    accept=lambda ref: ref.tags.get(MODE_TAG) != ENDED)
        production.pinned = lambda: self._path_of(self.watcher)
        self.sampler = random.Random(seed)  # draws which requests the challenger gets; event loop only
        self._lock = threading.Lock()
        self._windows: dict[str, Window] = {}
        self.counters: dict[str, VersionCounters] = {}
        self.shadow_counters: dict[str, ShadowCounters] = {}
        self.aborted: dict[str, dict[str, str]] = {}  # rollout key -> version, reason, at
        self._started: dict[str, str] = {}  # challenger version -> the start of its rollout, as last read
        self.aborts = 0
        self._markers_checked = 0.0
        self._plan_problem: str | None = None
        self._shadow_queue: queue.Queue = queue.Queue(settings.shadow_queue_size)
        self._shadow_thread: threading.Thread | None = None

    @staticmethod
    def _path_of(watcher: AliasWatcher) -> set[str]:
        current = watcher.current
        return {current.path} if current is not None else set()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.watcher.start()
        if self._shadow_thread is None:
            self._shadow_thread = threading.Thread(target=self._shadow_loop, name="shadow-scoring", daemon=True)
            self._shadow_thread.start()

    def stop(self) -> None:
        self.watcher.stop()
        if self._shadow_thread is not None:
            with contextlib.suppress(queue.Full):
                self._shadow_queue.put_nowait(None)

    # -- which model answers -----------------------------------------------------------

    def challenger(self, production: LoadedModel) -> tuple[LoadedModel, str, float] | None:
        """(model, mode, percent) of the challenger this worker routes to, or None."""
        challenger = self.watcher.current
        if challenger is None or challenger.ref.version == production.ref.version:
            return None
        if self.watcher.alias_version != challenger.ref.version:
            return None  # the alias moved on and its tags describe the next version, not this one
        if self._is_aborted(challenger):
            return None
        try:
            mode, percent = plan_from_tags(self.watcher.alias_tags)
        except ValueError as e:
            problem = f"version {challenger.ref.version} is not rolled out: {e}"
            if problem != self._plan_problem:
                log.warning("%s@%s %s", self.settings.model_name, self.settings.challenger_alias, problem)
                self._plan_problem = problem
            return None
        self._plan_problem = None
        return challenger, mode, percent

    async def serve(self, production: LoadedModel, answer: Answer, send: Send, shadow: ShadowCopy | None) -> None:
        """Answer one scoring request while a challenger may exist. `answer(model, send)`
        scores the request with a model as the app always does; `shadow`: how the shadow
        scores a copy, None for a request it cannot read."""
        picked = self.challenger(production)
        if picked is None:
            return await answer(production, send)
        challenger, mode, percent = picked
        sampled = percent >= 100 or self.sampler.random() * 100 < percent
        if mode == "canary" and sampled:
            return await self._canary(production, challenger, answer, send)
        if mode == "shadow" and sampled and shadow is not None:
            reply = await self._timed(production, answer)
            await reply.replay(send)
            return self._submit_shadow(challenger, shadow, reply)
        await self._timed(production, answer, forward=send)
        return None

    async def _timed(self, model: LoadedModel, answer: Answer, forward: Send | None = None) -> _Captured:
        """Production's answer, counted in its window."""
        captured = _Captured(forward)
        started = time.perf_counter()
        try:
            await answer(model, captured)
        finally:
            self.record(model, captured.status >= 500, time.perf_counter() - started)
        return captured

    async def _canary(self, production: LoadedModel, challenger: LoadedModel, answer: Answer, send: Send) -> None:
        captured = _Captured()
        started = time.perf_counter()
        try:
            await answer(challenger, captured)
        except Exception:
            log.warning("challenger version %s failed to answer", challenger.ref.version, exc_info=True)
            captured.status = 500
        elapsed = time.perf_counter() - started
        if captured.status < 400:
            self.record(challenger, False, elapsed)
            return await captured.replay(send)
        # Production answers instead; if it does better, the challenger was at fault, not the input.
        fallback = await self._timed(production, answer)
        self.record(challenger, fallback.status < 400 or (captured.status >= 500 > fallback.status), elapsed)
        await fallback.replay(send)

    # -- counts and the automatic abort --------------------------------------------------

    def _note_start(self, version: str, started: str) -> None:
        """A rollout of this version that started anew is judged afresh: the counts of its
        earlier rollout (an aborted one, say) leave the window."""
        with self._lock:
            if self._started.get(version) == started:
                return
            known = version in self._started
            self._started[version] = started
            if known:
                self._windows.pop(version, None)

    def _rollout_key(self, challenger: LoadedModel) -> str:
        """What an abort is kept under: the version's files and the start of its rollout. The
        start is a tag anyone with EDIT may write, so it enters the marker's file name only as a
        short digest: any value makes a valid, bounded name."""
        if self.watcher.alias_version == challenger.ref.version:  # else the tags are another version's
            self._note_start(challenger.ref.version, self.watcher.alias_tags.get(STARTED_TAG, ""))
        with self._lock:
            started = self._started.get(challenger.ref.version, "")
        if not started:
            return challenger.ref.cache_key
        return f"{challenger.ref.cache_key}-{hashlib.sha256(started.encode()).hexdigest()[:16]}"

    def record(self, model: LoadedModel, failed: bool, latency: float) -> None:
        version = model.ref.version
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(version)
            if window is None:
                window = self._windows[version] = Window(self.settings.rollout_window_seconds)
            window.add(now, failed, latency)
            totals = self.counters.setdefault(version, VersionCounters())
            totals.requests += 1
            totals.errors += int(failed)
            totals.latency_seconds_sum += latency
        challenger = self.watcher.current
        if challenger is not None and model is challenger:
            self._judge(challenger)

    def _judge(self, challenger: LoadedModel) -> None:
        production = self.production.current
        if production is None or self._is_aborted(challenger):
            return
        s = self.settings
        now = time.monotonic()
        with self._lock:
            if production.ref.version not in self._windows:
                return
            mine = self._windows[challenger.ref.version].summary(now)
            theirs = self._windows[production.ref.version].summary(now)
        (n, errors, p99), (m, their_errors, their_p99) = mine, theirs
        if n < s.rollout_min_requests or m < s.rollout_min_requests:
            return
        rate, their_rate = errors / n, their_errors / m
        reason = None
        if rate - their_rate > s.rollout_max_error_rate_delta:
            reason = (f"error rate {rate:.1%} against production's {their_rate:.1%} over the last {n} and {m} "
                      f"requests (ROLLOUT_MAX_ERROR_RATE_DELTA={s.rollout_max_error_rate_delta:g})")
        elif p99 is not None and their_p99 is not None and p99 > their_p99 * s.rollout_max_p99_ratio:
            reason = (f"p99 latency {p99 * 1000:.1f} ms against production's {their_p99 * 1000:.1f} ms over the "
                      f"last {n} and {m} requests (ROLLOUT_MAX_P99_RATIO={s.rollout_max_p99_ratio:g})")
        if reason is not None:
            self.abort(challenger, reason)

    def abort(self, challenger: LoadedModel, reason: str) -> None:
        """Stop routing to this challenger version, here and (through the marker) in the
        other workers; production answers everything again."""
        key = self._rollout_key(challenger)
        with self._lock:
            if key in self.aborted:
                return
            self.aborted[key] = {"version": challenger.ref.version, "reason": reason,
                                 "at": datetime.now(UTC).isoformat(timespec="seconds")}
            self.aborts += 1
        metrics.rollout_aborted(challenger.ref.version)
        log.warning("rollout of %s version %s aborted: %s; production answers every request. "
                    "End it in the registry with `registry_cli abort`",
                    self.settings.model_name, challenger.ref.version, reason)
        self._write_marker(key, self.aborted[key])

    def _marker_path(self, key: str) -> str:
        name = f"{self.settings.model_name}@{self.settings.challenger_alias}.aborted-{key}"
        return os.path.join(self.settings.cache_dir, re.sub(r"[^\w.\-]", "_", name) + ".json")

    def _write_marker(self, key: str, record: dict[str, str]) -> None:
        path = self._marker_path(key)
        try:
            os.makedirs(self.settings.cache_dir, mode=0o700, exist_ok=True)
            with open(f"{path}.{os.getpid()}", "w") as out:
                json.dump(record, out)
            os.replace(f"{path}.{os.getpid()}", path)
        except OSError as e:
            log.warning("could not tell the other workers about the abort (%s); each judges for itself", e)

    def _is_aborted(self, challenger: LoadedModel) -> bool:
        key = self._rollout_key(challenger)
        if key in self.aborted:
            return True
        now = time.monotonic()
        if now - self._markers_checked < MARKER_CHECK_SECONDS:
            return False
        self._markers_checked = now
        try:
            with open(self._marker_path(key)) as f:
                record = json.load(f)
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        with self._lock:
            self.aborted[key] = {"version": challenger.ref.version,
                                 "reason": str(record.get("reason", "aborted by another worker")),
                                 "at": str(record.get("at", ""))}
        log.warning("rollout of version %s was aborted by another worker: %s", challenger.ref.version,
                    self.aborted[key]["reason"])
        return True

    # -- shadow scoring ----------------------------------------------------------------------

    def _submit_shadow(self, challenger: LoadedModel, shadow: ShadowCopy, reply: _Captured) -> None:
        counters = self._shadow(challenger)
        if reply.status != 200:
            counters.skipped += 1  # a refused input tells nothing about the challenger
            return
        try:
            self._shadow_queue.put_nowait((challenger, shadow, reply.body, reply.headers))
        except queue.Full:
            with self._lock:
                counters.dropped += 1

    def _shadow(self, challenger: LoadedModel) -> ShadowCounters:
        with self._lock:
            return self.shadow_counters.setdefault(challenger.ref.version, ShadowCounters())

    def _shadow_loop(self) -> None:
        while True:
            item = self._shadow_queue.get()
            if item is None:
                return
            try:
                self._score_shadow(*item)
            except Exception:
                log.warning("shadow scoring failed", exc_info=True)

    def _score_shadow(self, challenger: LoadedModel, shadow: ShadowCopy, production_body: bytes,
                      production_headers: Headers) -> None:
        counters = self._shadow(challenger)
        started = time.perf_counter()
        reply = shadow.score(challenger)
        elapsed = time.perf_counter() - started
        expected = predicted_classes(shadow.predictions(production_body, production_headers))
        if reply is None or expected is None:
            with self._lock:
                counters.skipped += 1  # a body only MLflow's app reads: not scored here
            return
        got = predicted_classes(shadow.predictions(reply.body, dict(reply.headers))) if reply.status == 200 else None
        agreed = int((got == expected).sum()) if got is not None and got.shape == expected.shape else 0
        with self._lock:
            counters.scored += 1
            counters.compared_rows += len(expected)
            counters.agreed_rows += agreed
        metrics.shadow_compared(challenger.ref.version, len(expected), agreed)
        self.record(challenger, reply.status != 200, elapsed)

    # -- reporting ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        challenger = self.watcher.current
        production = self.production.current
        now = time.monotonic()
        state, mode, percent = "none", None, None
        if challenger is not None:
            try:
                mode, percent = plan_from_tags(self.watcher.alias_tags)
                state = "active"
            except ValueError:
                state = "invalid"
            if production is not None and challenger.ref.version == production.ref.version:
                state = "none"  # promoted, the alias not removed yet
            elif self._is_aborted(challenger):
                state = "aborted"
        with self._lock:
            versions = {}
            for version, window in self._windows.items():
                n, errors, p99 = window.summary(now)
                versions[version] = {"requests": n, "errors": errors,
                                     "error_rate": round(errors / n, 4) if n else None,
                                     "p99_ms": round(p99 * 1000, 2) if p99 is not None else None}
            shadow = {
                version: {**vars(c), "agreement_rate": round(c.agreed_rows / c.compared_rows, 4)
                          if c.compared_rows else None}
                for version, c in self.shadow_counters.items()
            }
            aborted = list(self.aborted.values())
        return {
            "challenger_alias": self.settings.challenger_alias,
            "challenger_version": challenger.ref.version if challenger else None,
            "state": state,
            "mode": mode,
            "percent": percent,
            "aborted": aborted,
            "last_error": self.watcher.last_error,
            "window_seconds": self.settings.rollout_window_seconds,
            "versions": versions,
            "shadow": shadow,
        }

    def totals(self) -> dict[str, Any]:
        """Counters since the worker started, per version: what a metrics endpoint exports."""
        with self._lock:
            return {
                "versions": {v: vars(c).copy() for v, c in self.counters.items()},
                "shadow": {v: vars(c).copy() for v, c in self.shadow_counters.items()},
                "aborts": self.aborts,
            }

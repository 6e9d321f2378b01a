"""Following models:/NAME@ALIAS: a background thread per worker that polls the registry,
prepares a new version beside the served one, and swaps only a model that answers.

The swap is one attribute assignment. A request reads `watcher.current` once and scores
with that object to the end, so requests in flight finish on the old version and new ones
start on the new version; nothing is ever unloaded under a request.

What /status shows (waiting_for, last_error) is in our own words: anyone who can reach
the port reads it, so exception text, URIs and paths go to the log only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import model_signatures
from serving import metrics
from serving.config import Settings
from stack_common.text import one_line
from stack_common.uris import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from serving.model_store import LoadedModel, ModelStore, VersionRef

log = logging.getLogger("serving")

# A version that failed is retried after poll * 2**failures seconds, at most this long.
MAX_VERSION_RETRY_SECONDS = 120.0
# An unreachable registry is retried after poll * 2**(errors - 1) seconds, at most this
# long, so that a tracking server coming back is noticed soon.
MAX_REGISTRY_RETRY_SECONDS = 30.0
STARTUP_RETRY_SECONDS = 2.0
# The same waiting or registry message is repeated in the log at most this often.
REPEAT_LOG_SECONDS = 60.0
# What each step of preparing a version is called in /status.
STEP_WORDS = {"download": "downloading", "verify": "verifying", "load": "loading", "check": "checking"}


def version_retry_delay(poll: float, failures: int) -> float:
    return min(poll * 2**failures, max(poll, MAX_VERSION_RETRY_SECONDS))


def registry_retry_delay(poll: float, errors: int) -> float:
    return min(poll * 2 ** max(errors - 1, 0), max(poll, MAX_REGISTRY_RETRY_SECONDS))


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass
class _Failure:
    count: int
    retry_at: float
    message: str


class _RepeatLimiter:
    """Logs a message when it changes, and an unchanged one only every REPEAT_LOG_SECONDS."""

    def __init__(self) -> None:
        self._last: str | None = None
        self._at = 0.0

    def log(self, level: int, message: str) -> None:
        now = time.monotonic()
        if message != self._last or now - self._at >= REPEAT_LOG_SECONDS:
            log.log(level, message)
            self._last, self._at = message, now

    def reset(self) -> None:
        self._last = None


class AliasWatcher:
    """Follows settings.model_alias. `optional`: an alias that is often unset (the
    challenger): its absence is quiet, and removing it stops serving its version.
    `warm_start`: before the first look at the registry, serve the version this alias
    last served from the cache, and remember each version switched to. `pinned`: cache
    paths that pruning must keep (the other watcher's model). `accept`: whether a version
    the alias names is to be served at all; an optional alias on one that is not counts as unset."""

    def __init__(self, settings: Settings, registry: MlflowClient | None = None,
                 store: ModelStore | None = None, *, optional: bool = False, warm_start: bool = False,
                 pinned: Callable[[], set[str]] | None = None,
                 accept: Callable[[VersionRef], bool] | None = None) -> None:
        self.settings = settings
        self.optional = optional
        self.warm_start = warm_start
        self.pinned = pinned or set
        self.accept = accept
        self.alias_tags: dict[str, str] = {}  # tags of the version the alias points at, as last read
        self.warm_started_version: str | None = None
        self.current: LoadedModel | None = None  # LoadedModel being served; replaced whole, never mutated
        self.alias_version: str | None = None
        self.waiting_for = f"waiting for {self._wanted()}: not checked yet"
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.polls = 0  # finished polls, so that callers can wait for "one more look"
        # Set once there is a model from the cache or the first look at the registry is over.
        self.first_look = threading.Event()
        self._registry = registry
        self._store = store
        self._failures: dict[str, _Failure] = {}
        self._registry_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._torch_limited = False
        self.torch_threads: int | None = None  # as torch reports it once limited
        self._wait_log = _RepeatLimiter()
        self._error_log = _RepeatLimiter()
        self._step = "download"

    def _wanted(self) -> str:
        return f"{self.settings.model_name}@{self.settings.model_alias}"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"alias-watcher-{self.settings.model_alias}",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            # A download in progress cannot be interrupted; the thread is a daemon and
            # dies with the process.
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        if self.warm_start:
            try:
                self._serve_from_cache()
            except Exception:
                log.exception("starting from the cached version failed; waiting for the registry")
            if self.current is not None:
                self.first_look.set()
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                delay = self.poll_once()
            except Exception:
                # Whatever breaks, the served model keeps serving and the watcher keeps
                # watching; this is the last line before a silent dead thread.
                log.exception("unexpected error while following %s", self.settings.model_uri)
                delay = self.settings.poll_seconds
            finally:
                self.polls += 1
                self.first_look.set()

    def _limit_torch_threads(self) -> None:
        # Once, before the first model loads (not at start, so that the first look at the
        # registry is not delayed by importing torch): workers x threads <= cores.
        if self._torch_limited or importlib.util.find_spec("torch") is None:
            return
        self._torch_limited = True
        import torch

        torch.set_num_threads(self.settings.torch_threads)
        with contextlib.suppress(RuntimeError):  # already fixed by earlier torch work in this process
            torch.set_num_interop_threads(1)
        self.torch_threads = torch.get_num_threads()

    # -- one look at the registry ----------------------------------------------------------

    def _clients(self) -> tuple[MlflowClient, ModelStore]:
        if self._registry is None:
            from mlflow import MlflowClient

            uri = self.settings.tracking_uri
            self._registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if self._store is None:
            from serving.model_store import ModelStore

            self._store = ModelStore(
                self.settings.cache_dir, self.settings.tracking_uri, self._registry,
                self.settings.public_key,
            )
        return self._registry, self._store

    def _set_error(self, message: str | None) -> None:
        self.last_error = message
        self.last_error_at = time.time() if message else None

    def poll_once(self) -> float:
        """Look at the alias once, switch if there is something new; return the next delay."""
        from serving.model_store import AliasNotFound, resolve_alias

        s = self.settings
        poll = s.poll_seconds
        try:
            registry, store = self._clients()
            target = resolve_alias(registry, s.model_name, s.model_alias)
        except AliasNotFound as e:
            self._registry_errors = 0
            self._error_log.reset()
            return self._alias_missing(str(e))
        except Exception as e:
            self._registry_errors += 1
            # With nothing to serve yet, as when the whole stack starts together and the
            # tracking server or this container's account is not ready, ask again soon: the
            # first model should be served within seconds of the server answering.
            delay = (min(poll, STARTUP_RETRY_SECONDS) if self.current is None
                     else registry_retry_delay(poll, self._registry_errors))
            message = "cannot read the alias from the tracking server (the serving log says why)"
            self._set_error(message)
            self._error_log.log(
                logging.WARNING,
                f"cannot read {s.model_uri} from the tracking server at {redact(s.tracking_uri)}: "
                f"{type(e).__name__}: {one_line(e)}; {self._serving_words()}; retrying in {delay:.3g}s",
            )
            if self.current is None:
                self.waiting_for = f"waiting for {self._wanted()}: {message}"
            return delay

        if self._registry_errors:
            log.info("tracking server at %s answers again", redact(s.tracking_uri))
            self._registry_errors = 0
            self._error_log.reset()
        if self.optional and self.accept is not None and not self.accept(target):
            return self._alias_missing("the version it names is not to be served")
        self.alias_version = target.version
        self.alias_tags = target.tags
        if not self.optional:
            metrics.alias_seen(target.version)

        current = self.current
        if current is not None and current.ref == target:
            self._failures = {}
            self._set_error(None)
            return poll

        key = target.cache_key
        # Forget failures of versions the alias no longer points at.
        self._failures = {k: f for k, f in self._failures.items() if k == key}
        failure = self._failures.get(key)
        if failure is not None and time.monotonic() < failure.retry_at:
            if self.last_error != failure.message:  # e.g. a registry error in between
                self._set_error(failure.message)
            return min(poll, failure.retry_at - time.monotonic())

        self._switch_to(target, store, failure)
        return poll

    def _alias_missing(self, reason: str) -> float:
        s = self.settings
        self.alias_version = None
        self.alias_tags = {}
        if not self.optional:
            metrics.alias_seen(None)
        if self.optional:
            # Nothing to wait for: no challenger is the usual state.
            if self.current is not None:
                log.info("%s: %s; version %s is not served any more", self._wanted(), reason,
                         self.current.ref.version)
            self.current = None
            self._failures = {}
            self._set_error(None)
            self.waiting_for = f"no version holds {self._wanted()}"
            return s.poll_seconds
        if self.current is None:
            self.waiting_for = f"waiting for {self._wanted()}: no version holds the alias yet"
            self._set_error(None)
            self._wait_log.log(
                logging.INFO,
                f"no model to serve yet: waiting for {s.model_uri} ({reason}); "
                f"checking every {s.poll_seconds:g}s",
            )
        else:
            message = f"{self._wanted()}: no version holds the alias any more"
            self._set_error(message)
            self._wait_log.log(
                logging.WARNING, f"{message}; still serving version {self.current.ref.version}"
            )
        return s.poll_seconds

    def _serving_words(self) -> str:
        if self.current is None:
            return "no model served yet"
        return f"still serving version {self.current.ref.version}"

    def _prepare(self, target: VersionRef, store: ModelStore) -> LoadedModel:
        """Download (unless cached), verify, load and check a version; self._step says
        how far it got when this raises."""
        from serving.scoring import check_answers, rows_score_independently

        self._limit_torch_threads()
        self._step = "download"
        path = store.fetch(target)
        self._step = "verify"
        path = store.verify(target, path)  # before MLflow reads it: loading runs the model's code
        self._step = "load"
        candidate = store.load(target, path)
        self._step = "check"
        check_answers(candidate)
        if self.settings.batch_max_rows > 1:
            candidate.batchable = rows_score_independently(candidate)
            if not candidate.batchable:
                log.warning(
                    "version %s answers differently when requests are stacked; "
                    "its requests are scored one by one",
                    target.version,
                )
        return candidate

    def _serve_from_cache(self) -> None:
        """Serve the version recorded at the last switch, if its cached copy still verifies."""
        from serving import warm_start

        s = self.settings
        ref = warm_start.recall(s.cache_dir, s.model_name, s.model_alias)
        if ref is None:
            return
        _, store = self._clients()
        if store.cached(ref) is None:
            log.info("version %s, served before the restart, is no longer in the cache", ref.version)
            return
        started = time.monotonic()
        try:
            candidate = self._prepare(ref, store)  # the cached copy: nothing is downloaded
        except Exception as e:
            reason = e.reason if isinstance(e, model_signatures.Refused) else f"{type(e).__name__}: {one_line(e)}"
            log.warning("cached copy of version %s ignored (%s it failed: %s); it is downloaded again "
                        "when the registry names it", ref.version, STEP_WORDS[self._step], reason)
            return
        if self.current is None:  # the registry cannot have answered first, but never replace a newer model
            self.current = candidate
            metrics.version_prepared(time.monotonic() - started)
            metrics.version_swapped(ref.version)
            self.warm_started_version = ref.version
            self.waiting_for = ""
            log.info("serving %s version %s from the cache, as before the restart, in %.2fs; "
                     "checking %s next", s.model_name, ref.version, time.monotonic() - started, s.model_uri)

    def _switch_to(self, target: VersionRef, store: ModelStore, failure: _Failure | None) -> None:
        s = self.settings
        started = time.monotonic()
        log.info("%s now points at version %s: preparing it", s.model_uri, target.version)
        try:
            candidate = self._prepare(target, store)
        except Exception as e:
            step = self._step
            count = (failure.count if failure else 0) + 1
            delay = version_retry_delay(s.poll_seconds, count)
            if isinstance(e, model_signatures.Refused):
                metrics.version_refused(time.monotonic() - started)
                message = f"version {target.version} refused: {e.reason}"
                detail = e.detail
            else:
                metrics.version_failed(step, time.monotonic() - started)
                message = (f"version {target.version}: {STEP_WORDS[step]} it failed "
                           "(the serving log says why)")
                detail = f"{type(e).__name__}: {one_line(e)}"
            self._failures = {target.cache_key: _Failure(count, time.monotonic() + delay, message)}
            self._set_error(message)
            if self.current is None:
                self.waiting_for = f"waiting for a version of {self._wanted()} that works: {message}"
            log.warning(
                "%s not switched to (attempt %d): %s [%s]; %s; retrying in %.3gs",
                s.model_uri,
                count,
                message,
                detail,
                self._serving_words(),
                delay,
                exc_info=step not in ("verify", "check"),
            )
            return

        metrics.version_prepared(time.monotonic() - started)
        previous = self.current
        self.current = candidate  # the switch: requests from now on get the new version
        if not self.optional:  # the challenger's version is on /status, not in these gauges
            metrics.version_swapped(target.version)
        self._failures = {}
        self._set_error(None)
        self.waiting_for = ""
        log.info(
            "serving %s version %s (run %s) in place of %s; prepared in %.2fs",
            s.model_name,
            target.version,
            target.run_id or "-",
            f"version {previous.ref.version}" if previous else "nothing",
            time.monotonic() - started,
        )
        if self.warm_start:
            from serving import warm_start

            warm_start.remember(s.cache_dir, s.model_alias, target)
        try:
            store.prune(s.model_name, {candidate.path, *self.pinned()})
        except Exception:
            log.warning("could not prune the model cache", exc_info=True)

    # -- reporting ---------------------------------------------------------------------

    def status(self) -> dict:
        s = self.settings
        current = self.current
        failure = next(iter(self._failures.values()), None)  # only the alias target's is kept
        return {
            "model_name": s.model_name,
            "alias": s.model_alias,
            "model_uri": s.model_uri,
            "state": "serving" if current is not None else "waiting",
            "version": current.ref.version if current else None,
            "run_id": current.ref.run_id if current else None,
            "loaded_at": _iso(current.loaded_at) if current else None,
            "alias_version": self.alias_version,
            "waiting_for": self.waiting_for if current is None else None,
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
            "failed_attempts": failure.count if failure else 0,
            "next_retry_in_seconds": (
                round(max(failure.retry_at - time.monotonic(), 0.0), 1) if failure else None
            ),
            "poll_interval_seconds": s.poll_seconds,
            "torch_threads": self.torch_threads,
            "watcher_alive": self.alive,
            "warm_started_version": self.warm_started_version,
            "worker_pid": os.getpid(),
        }

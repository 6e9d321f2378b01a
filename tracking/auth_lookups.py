"""Two lookups MLflow 3.17's permission checks repeat on every API call, remembered per worker.

A `runs/log-batch` call from a non-admin user makes MLflow's basic auth read the user row
twice (is the sender an admin? whose grants?) and load the whole run (tags, params, latest
metrics) only to learn its experiment id; that cost grows with the run. Both are answered
here from small per-process caches:

- the run's requirement (its experiment and what is asked of it): a run never moves to
  another experiment, so this cannot go stale; a run that does not exist is never cached.
- the user row (id, admin flag): kept for the auth config's auth_cache_ttl_seconds, the
  bound MLflow already gives a password change. The worker that takes a password, admin or
  deletion change forgets the user at once, like MLflow's credential cache.

Grants are never cached: a revoked permission takes effect on the next call.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from cachetools import LRUCache, TTLCache
from mlflow.server import auth

_MAX_ENTRIES = 10_000
_lock = threading.Lock()
_requirements: LRUCache = LRUCache(maxsize=_MAX_ENTRIES)
_users: TTLCache | None = None
_installed = False


def install() -> None:
    """Put the caches in front of MLflow's lookups in this worker; idempotent."""
    global _installed, _users
    with _lock:
        if _installed:
            return
        ttl = auth.auth_config.auth_cache_ttl_seconds
        invalidate = getattr(auth, "_invalidate_user_auth_cache", None)
        if ttl > 0 and invalidate is not None:
            _users = TTLCache(maxsize=_MAX_ENTRIES, ttl=ttl)
            auth.store.get_user = _cached_get_user(auth.store.get_user)
            auth._invalidate_user_auth_cache = _also_forgetting(invalidate)
        # An MLflow without these lookups (another release) serves just the same, only
        # without the caches: said once per worker, never a failed start.
        run_requirement = getattr(auth, "_run_requirement", None)
        if run_requirement is not None:
            auth._run_requirement = _cached_run_requirement(run_requirement)
        missing = [name for name, found in (("_invalidate_user_auth_cache", invalidate),
                                            ("_run_requirement", run_requirement)) if found is None]
        if missing:
            print(f"[tracking] this MLflow has no {', '.join(missing)}: permission lookups are not cached",
                  file=sys.stderr, flush=True)
        _installed = True


def forget_user(username: str) -> None:
    if _users is not None:
        with _lock:
            _users.pop(username, None)


def _cached_get_user(get_user: Callable[[str], Any]) -> Callable[[str], Any]:
    def cached(username: str) -> Any:  # noqa: ANN401 - MLflow's User entity
        with _lock:
            user = _users.get(username)
        if user is None:
            user = get_user(username)  # an unknown user raises, and nothing is kept
            with _lock:
                _users[username] = user
        return user

    return cached


def _also_forgetting(invalidate: Callable[[str], None]) -> Callable[[str], None]:
    def invalidate_both(username: str) -> None:
        invalidate(username)
        forget_user(username)

    return invalidate_both


def _cached_run_requirement(resolve: Callable[[str, str], Any]) -> Callable[[str, str], Any]:
    def cached(run_id: str, action: str) -> Any:  # noqa: ANN401 - MLflow's (anchor, requirements)
        key = (run_id, action)
        with _lock:
            found = _requirements.get(key)
        if found is None:
            found = resolve(run_id, action)
            if found is None:
                return None  # no such run: asked again next time
            with _lock:
                _requirements[key] = found
        anchor, requirements = found
        # Callers append the logged models' requirements to the list: each gets its own.
        return anchor, list(requirements)

    return cached

"""Three lookups MLflow 3.17's permission checks repeat on every API call, remembered per worker.

A `runs/log-batch` call from a non-admin user makes MLflow's basic auth read the user row
twice (is the sender an admin? whose grants?), load the whole run (tags, params, latest
metrics) only to learn its experiment id, a cost that grows with the run, and query the
user's grants. All three are answered here from small per-process caches:

- the run's requirement (its experiment and what is asked of it): a run never moves to
  another experiment, so this cannot go stale; a run that does not exist is never cached.
- the user row (id, admin flag): kept for the auth config's auth_cache_ttl_seconds, the
  bound MLflow already gives a password change.
- the user's grants (one query per call, the largest share of what auth costs a log-batch):
  kept for MLFLOW_AUTH_GRANT_CACHE_SECONDS (start_server.py; 0 turns this off).

Any change to users, roles or grants made through this server is counted (auth_changes.py),
and every worker forgets every user, grant and checked password it remembers when the count
moves: a grant, a revoke, a password, an admin flag or a deletion applies to the next call,
whichever worker takes it. Changes made elsewhere (another replica, the database itself)
apply once the entries expire.

MLflow's own cache of checked passwords expires for all of a login's requests at once; each
then checked the password (tens of milliseconds of CPU) at the same time. Here one checks
and the others with the same login and password wait for its answer.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from cachetools import LRUCache, TTLCache
from mlflow.server import auth

from tracking import auth_changes

_MAX_ENTRIES = 10_000
_lock = threading.Lock()
_requirements: LRUCache = LRUCache(maxsize=_MAX_ENTRIES)
_users: TTLCache | None = None
_grants: TTLCache | None = None
_changes_seen = 0  # auth_changes.count() when the caches were last emptied
_checking: dict[Any, threading.Event] = {}  # credentials whose password check is under way
_installed = False
# Store methods that change users, roles or grants (MLflow 3.17's auth store names them so).
_CHANGES = ("create_", "update_", "delete_", "grant_", "revoke_", "rename_", "set_", "add_", "remove_",
            "assign_", "unassign_")


def install() -> None:
    """Put the caches in front of MLflow's lookups in this worker; idempotent."""
    global _installed, _users, _grants
    with _lock:
        if _installed:
            return
        _installed = True
        # An MLflow without these lookups (another release) serves just the same, only
        # without the caches: said once per worker, never a failed start.
        run_requirement = getattr(auth, "_run_requirement", None)
        if run_requirement is not None:
            auth._run_requirement = _cached_run_requirement(run_requirement)
        list_grants = getattr(auth.store, "list_grants", None)
        missing = [name for name, found in (("_run_requirement", run_requirement), ("list_grants", list_grants))
                   if found is None]
        if missing:
            print(f"[tracking] this MLflow has no {', '.join(missing)}: those lookups are not cached",
                  file=sys.stderr, flush=True)
        user_ttl = auth.auth_config.auth_cache_ttl_seconds
        grant_ttl = float(os.environ.get("MLFLOW_AUTH_GRANT_CACHE_SECONDS", "0"))
        if not (user_ttl > 0 or grant_ttl > 0) or not _counting_changes():
            return
        if user_ttl > 0:
            _users = TTLCache(maxsize=_MAX_ENTRIES, ttl=user_ttl)
            auth.store.get_user = _cached_get_user(auth.store.get_user)
        if grant_ttl > 0 and list_grants is not None:
            _grants = TTLCache(maxsize=_MAX_ENTRIES, ttl=grant_ttl)
            auth.store.list_grants = _cached_list_grants(list_grants)
        for name in dir(auth.store):
            if name.startswith(_CHANGES) and callable(getattr(auth.store, name)):
                setattr(auth.store, name, _counted(getattr(auth.store, name)))
        if all(hasattr(auth, name) for name in _CREDENTIAL_CACHE) and auth._USER_AUTH_CACHE is not None:
            auth._authenticate_cached = _one_check_per_credential(auth._authenticate_cached)


# MLflow 3.17's credential cache: checked passwords, the key they are kept under, and its lock.
_CREDENTIAL_CACHE = ("_authenticate_cached", "_auth_cache_key", "_USER_AUTH_CACHE", "_USER_AUTH_CACHE_LOCK")


def _counting_changes() -> bool:
    """The caches are only as good as the change count: without a writable count, none."""
    try:
        auth_changes.mark()
    except OSError as error:
        print(f"[tracking] cannot count auth changes in {auth_changes.path()} ({error}): users and grants "
              "are read on every call", file=sys.stderr, flush=True)
        return False
    return True


def _forget_if_changed() -> int:
    """Empty every cache if a change was counted since they were last emptied; the count."""
    global _changes_seen
    changes = auth_changes.count()
    with _lock:
        moved = changes != _changes_seen
        if moved:
            for each in (_users, _grants):
                if each is not None:
                    each.clear()
            _changes_seen = changes
    credentials = getattr(auth, "_USER_AUTH_CACHE", None)
    if moved and credentials is not None:
        with auth._USER_AUTH_CACHE_LOCK:
            credentials.clear()
    return changes


def _remembered(cache: TTLCache, key: Any, read: Callable[[], Any]) -> Any:  # noqa: ANN401
    """cache[key], or read() kept there; emptied first if a change was counted since."""
    changes = _forget_if_changed()
    with _lock:
        found = cache.get(key)
    if found is None:
        found = read()  # a failed read (an unknown user) raises, and nothing is kept
        with _lock:
            # A change counted while it read may not be in what it read.
            if auth_changes.count() == changes == _changes_seen:
                cache[key] = found
    return found


def _cached_get_user(get_user: Callable[[str], Any]) -> Callable[[str], Any]:
    def cached(username: str) -> Any:  # noqa: ANN401 - MLflow's User entity
        return _remembered(_users, username, lambda: get_user(username))

    return cached


def _cached_list_grants(list_grants: Callable[..., list]) -> Callable[..., list]:
    def cached(user_id: int, workspace: str, resource_types: Any) -> list:  # noqa: ANN401 - a collection
        key = (user_id, workspace, frozenset(resource_types))
        grants = _remembered(_grants, key, lambda: tuple(list_grants(user_id, workspace, resource_types)))
        return list(grants)

    return cached


def _one_check_per_credential(authenticate: Callable[[str, str], Any]) -> Callable[[str, str], Any]:
    def authenticate_once(username: str, password: str) -> Any:  # noqa: ANN401 - MLflow's User or None
        _forget_if_changed()
        key = auth._auth_cache_key(username, password)  # a keyed digest: no password is kept here
        with _lock:
            under_way = _checking.get(key)
            if under_way is None:
                _checking[key] = threading.Event()
        if under_way is not None:
            # Then MLflow's cache answers; after a failed check (or 30 s) this checks itself.
            under_way.wait(timeout=30)
            return authenticate(username, password)
        try:
            return authenticate(username, password)
        finally:
            with _lock:
                _checking.pop(key).set()

    return authenticate_once


def _counted(change: Callable[..., Any]) -> Callable[..., Any]:
    def changed(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - whatever the store returns
        try:
            return change(*args, **kwargs)
        finally:
            # Counted after the change is written, and also when it failed half way.
            auth_changes.mark()

    return changed


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


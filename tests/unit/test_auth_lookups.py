"""tracking/auth_lookups.py: the user row and the run's requirement are looked up once and
remembered; grants, unknown users and missing runs never are; a user change made through
this worker is seen at once."""

from types import SimpleNamespace

import pytest

from tracking import auth_lookups


class Store:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def get_user(self, username: str) -> SimpleNamespace:
        self.asked.append(username)
        if username == "nobody":
            raise LookupError("no such user")
        return SimpleNamespace(username=username, is_admin=False)


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """install() over a fake store and requirement lookup, undone after the test."""
    store = Store()
    resolved: list[str] = []
    invalidated: list[str] = []

    def run_requirement(run_id: str, action: str) -> tuple | None:
        resolved.append(run_id)
        if run_id == "missing":
            return None
        return ("experiment", "7"), [("experiment", "7", "read"), ("run", "*", action)]

    monkeypatch.setattr(auth_lookups.auth, "store", store)
    monkeypatch.setattr(auth_lookups.auth, "_run_requirement", run_requirement)
    monkeypatch.setattr(auth_lookups.auth, "_invalidate_user_auth_cache", invalidated.append)
    monkeypatch.setattr(auth_lookups.auth, "auth_config",
                        auth_lookups.auth.auth_config._replace(auth_cache_ttl_seconds=30))
    monkeypatch.setattr(auth_lookups, "_installed", False)
    monkeypatch.setattr(auth_lookups, "_requirements", auth_lookups.LRUCache(maxsize=10))
    auth_lookups.install()
    auth_lookups.install()  # a second call changes nothing
    return SimpleNamespace(store=store, resolved=resolved, invalidated=invalidated)


def test_a_runs_requirement_is_resolved_once(installed: SimpleNamespace) -> None:
    first = auth_lookups.auth._run_requirement("r1", "update")
    first[1].append(("logged_model", "*", "update"))  # what the log-batch check does
    second = auth_lookups.auth._run_requirement("r1", "update")
    assert installed.resolved == ["r1"]
    assert second == (("experiment", "7"), [("experiment", "7", "read"), ("run", "*", "update")])


def test_another_action_or_run_is_resolved_on_its_own(installed: SimpleNamespace) -> None:
    auth_lookups.auth._run_requirement("r1", "update")
    auth_lookups.auth._run_requirement("r1", "read")
    auth_lookups.auth._run_requirement("r2", "update")
    assert installed.resolved == ["r1", "r1", "r2"]


def test_a_missing_run_is_asked_about_every_time(installed: SimpleNamespace) -> None:
    assert auth_lookups.auth._run_requirement("missing", "update") is None
    assert auth_lookups.auth._run_requirement("missing", "update") is None
    assert installed.resolved == ["missing", "missing"]


def test_a_user_is_read_once_until_changed_here(installed: SimpleNamespace) -> None:
    assert auth_lookups.auth.store.get_user("alice").username == "alice"
    auth_lookups.auth.store.get_user("alice")
    assert installed.store.asked == ["alice"]
    auth_lookups.auth._invalidate_user_auth_cache("alice")  # password, admin flag or deletion
    auth_lookups.auth.store.get_user("alice")
    assert installed.store.asked == ["alice", "alice"]
    assert installed.invalidated == ["alice"]  # MLflow's own credential cache still forgets too


def test_an_unknown_user_is_never_remembered(installed: SimpleNamespace) -> None:
    for _ in range(2):
        with pytest.raises(LookupError):
            auth_lookups.auth.store.get_user("nobody")
    assert installed.store.asked == ["nobody", "nobody"]


def test_without_a_credential_cache_users_are_read_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store()
    monkeypatch.setattr(auth_lookups.auth, "store", store)
    monkeypatch.setattr(auth_lookups.auth, "_run_requirement", lambda run_id, action: None)
    monkeypatch.setattr(auth_lookups.auth, "auth_config",
                        auth_lookups.auth.auth_config._replace(auth_cache_ttl_seconds=0))
    monkeypatch.setattr(auth_lookups, "_installed", False)
    auth_lookups.install()
    store.get_user("alice")
    store.get_user("alice")
    assert store.asked == ["alice", "alice"]

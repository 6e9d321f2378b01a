"""tracking/auth_lookups.py: the user row, the run's requirement and the user's grants are
looked up once and remembered; unknown users and missing runs never are; a change to users,
roles or grants made through any worker of the server applies to the next call, and one made
elsewhere once the remembered entry expires."""

import threading
import time
from types import SimpleNamespace

import pytest

from tracking import auth_changes, auth_lookups


class Store:
    """MLflow's auth store as far as the caches see it."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.admins: set[str] = set()
        self.grants = {(1, "default"): [("experiment", "7", "EDIT")]}
        self.grant_queries: list[tuple] = []
        self.during_query = None  # a change another worker makes while a query runs

    def get_user(self, username: str) -> SimpleNamespace:
        self.asked.append(username)
        if username == "nobody":
            raise LookupError("no such user")
        return SimpleNamespace(username=username, is_admin=username in self.admins)

    def update_user(self, username: str, is_admin: bool) -> None:
        (self.admins.add if is_admin else self.admins.discard)(username)

    def list_grants(self, user_id: int, workspace: str, resource_types: set) -> list:
        self.grant_queries.append((user_id, workspace, frozenset(resource_types)))
        found = list(self.grants.get((user_id, workspace), []))
        if self.during_query:
            self.during_query()
        return found

    def delete_experiment_permission(self, experiment_id: str, username: str) -> None:
        self.grants[(1, "default")] = []


def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path, store: Store, user_ttl: int, grant_ttl: int) -> None:
    monkeypatch.setattr(auth_lookups.auth, "store", store)
    monkeypatch.setattr(auth_lookups.auth, "auth_config",
                        auth_lookups.auth.auth_config._replace(auth_cache_ttl_seconds=user_ttl))
    monkeypatch.setenv("MLFLOW_AUTH_GRANT_CACHE_SECONDS", str(grant_ttl))
    monkeypatch.setenv("MLFLOW_AUTH_CHANGES_FILE", str(tmp_path / "auth-changes"))
    for name, value in (("_installed", False), ("_users", None), ("_grants", None), ("_changes_seen", 0),
                        ("_requirements", auth_lookups.LRUCache(maxsize=10)), ("_checking", {})):
        monkeypatch.setattr(auth_lookups, name, value)
    passwords = Passwords(store)
    monkeypatch.setattr(auth_lookups.auth, "_USER_AUTH_CACHE", passwords.cache)
    monkeypatch.setattr(auth_lookups.auth, "_authenticate_cached", passwords.authenticate)
    store.passwords = passwords


class Passwords:
    """MLflow's cached password check: a miss checks the hash (counted here, and held at
    `gate` while a test wants it held), a hit answers from the cache."""

    def __init__(self, store: Store) -> None:
        self.cache = auth_lookups.TTLCache(maxsize=10, ttl=30)
        self.checks: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def authenticate(self, username: str, password: str) -> SimpleNamespace | None:
        key = auth_lookups.auth._auth_cache_key(username, password)
        with auth_lookups.auth._USER_AUTH_CACHE_LOCK:
            if key in self.cache:
                return self.cache[key]
            self.checks.append(username)
        self.gate.wait(timeout=30)
        if password != "right":
            return None
        with auth_lookups.auth._USER_AUTH_CACHE_LOCK:
            self.cache[key] = user = SimpleNamespace(username=username)
        return user


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch, tmp_path) -> SimpleNamespace:
    """install() over a fake store and requirement lookup, undone after the test."""
    store = Store()
    resolved: list[str] = []

    def run_requirement(run_id: str, action: str) -> tuple | None:
        resolved.append(run_id)
        if run_id == "missing":
            return None
        return ("experiment", "7"), [("experiment", "7", "read"), ("run", "*", action)]

    fresh(monkeypatch, tmp_path, store, user_ttl=30, grant_ttl=5)
    monkeypatch.setattr(auth_lookups.auth, "_run_requirement", run_requirement)
    auth_lookups.install()
    auth_lookups.install()  # a second call changes nothing
    return SimpleNamespace(store=store, resolved=resolved)


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


def test_a_user_is_read_once_until_changed(installed: SimpleNamespace) -> None:
    store = auth_lookups.auth.store
    assert not store.get_user("alice").is_admin
    store.get_user("alice")
    assert installed.store.asked == ["alice"]
    store.update_user("alice", is_admin=True)  # through this worker
    assert store.get_user("alice").is_admin
    assert installed.store.asked == ["alice", "alice"]


def test_an_unknown_user_is_never_remembered(installed: SimpleNamespace) -> None:
    for _ in range(2):
        with pytest.raises(LookupError):
            auth_lookups.auth.store.get_user("nobody")
    assert installed.store.asked == ["nobody", "nobody"]


def grants_of_user_1(types: set[str] | None = None) -> list:
    return auth_lookups.auth.store.list_grants(1, "default", types or {"experiment", "run"})


def test_grants_are_read_once_while_nothing_changes(installed: SimpleNamespace) -> None:
    first = grants_of_user_1()
    first.append(("run", "*", "MANAGE"))  # a caller's list is its own
    assert grants_of_user_1() == [("experiment", "7", "EDIT")]
    assert len(installed.store.grant_queries) == 1
    grants_of_user_1({"registered_model"})  # other types: another query
    auth_lookups.auth.store.list_grants(2, "default", {"experiment", "run"})  # another user
    assert len(installed.store.grant_queries) == 3


def test_a_grant_revoked_through_this_worker_applies_to_the_next_call(installed: SimpleNamespace) -> None:
    grants_of_user_1()
    auth_lookups.auth.store.delete_experiment_permission("7", "alice")
    assert grants_of_user_1() == []


def test_a_change_another_worker_counts_empties_both_caches(installed: SimpleNamespace) -> None:
    grants_of_user_1()
    auth_lookups.auth.store.get_user("alice")
    installed.store.grants[(1, "default")] = []  # the other worker's revoke, in the database
    auth_changes.mark()  # and counted, as its store wrapper does
    assert grants_of_user_1() == []
    auth_lookups.auth.store.get_user("alice")
    assert installed.store.asked == ["alice", "alice"]


def test_a_change_made_elsewhere_applies_once_the_grants_expire(
        installed: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(auth_lookups, "_grants", auth_lookups.TTLCache(maxsize=10, ttl=5, timer=lambda: clock[0]))
    grants_of_user_1()
    installed.store.grants[(1, "default")] = []  # another replica's revoke: nothing counted here
    clock[0] = 4.9
    assert grants_of_user_1() == [("experiment", "7", "EDIT")]
    clock[0] = 5.0
    assert grants_of_user_1() == []


def test_grants_read_while_a_change_is_counted_are_not_kept(installed: SimpleNamespace) -> None:
    store = installed.store
    store.during_query = lambda: (setattr(store, "during_query", None),
                                  auth_lookups.auth.store.delete_experiment_permission("7", "alice"))
    assert grants_of_user_1() == [("experiment", "7", "EDIT")]  # read before the change landed
    assert grants_of_user_1() == []
    assert len(store.grant_queries) == 2


@pytest.mark.parametrize(("user_ttl", "grant_ttl", "count_file", "said"), [
    (0, 0, "auth-changes", ""),  # both caches off
    (30, 5, "no-such-dir/auth-changes", "cannot count auth changes"),  # on, but no change count
])
def test_users_and_grants_are_read_every_call_when_nothing_may_be_remembered(
        monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture,
        user_ttl: int, grant_ttl: int, count_file: str, said: str) -> None:
    store = Store()
    fresh(monkeypatch, tmp_path, store, user_ttl=user_ttl, grant_ttl=grant_ttl)
    monkeypatch.setenv("MLFLOW_AUTH_CHANGES_FILE", str(tmp_path / count_file))
    monkeypatch.setattr(auth_lookups.auth, "_run_requirement", lambda run_id, action: None)
    auth_lookups.install()
    for _ in range(2):
        store.get_user("alice")
        store.list_grants(1, "default", {"experiment"})
    assert store.asked == ["alice", "alice"]
    assert len(store.grant_queries) == 2
    assert said in capsys.readouterr().err

def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def signing_in(count: int, password: str, answers: list) -> list[threading.Thread]:
    def sign_in() -> None:
        answers.append(auth_lookups.auth._authenticate_cached("alice", password))

    threads = [threading.Thread(target=sign_in) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_requests_with_one_login_check_its_password_once(installed: SimpleNamespace,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    passwords, answers, keyed = installed.store.passwords, [], []
    key = auth_lookups.auth._auth_cache_key
    monkeypatch.setattr(auth_lookups.auth, "_auth_cache_key", lambda *a: keyed.append(a) or key(*a))
    passwords.gate.clear()  # the first check takes its time, as scrypt does
    threads = signing_in(8, "right", answers)
    # The first request keys its login twice (here and in MLflow's check), the others once.
    wait_for(lambda: len(passwords.checks) == 1 and len(keyed) >= 9, "all eight requests to arrive")
    passwords.gate.set()
    for thread in threads:
        thread.join(timeout=10)
    assert passwords.checks == ["alice"]
    assert [a.username for a in answers] == ["alice"] * 8


def test_a_wrong_password_does_not_wait_for_the_right_ones_check(installed: SimpleNamespace) -> None:
    passwords, answers = installed.store.passwords, []
    passwords.gate.clear()
    held = signing_in(1, "right", answers)
    wait_for(lambda: len(passwords.checks) == 1, "the first check to start")
    wrong = signing_in(1, "wrong", answers)
    wait_for(lambda: len(passwords.checks) == 2, "the wrong password's own check to start")
    passwords.gate.set()
    for thread in held + wrong:
        thread.join(timeout=10)
    assert sorted(answers, key=bool) == [None, SimpleNamespace(username="alice")]


def test_a_failed_check_is_not_an_answer_for_those_waiting(installed: SimpleNamespace) -> None:
    passwords, answers = installed.store.passwords, []
    passwords.gate.clear()
    threads = signing_in(3, "wrong", answers)
    wait_for(lambda: len(passwords.checks) == 1, "the first check to start")
    passwords.gate.set()
    for thread in threads:
        thread.join(timeout=10)
    assert answers == [None, None, None]


def test_a_change_another_worker_counts_forgets_checked_passwords(installed: SimpleNamespace) -> None:
    passwords = installed.store.passwords
    auth_lookups.auth._authenticate_cached("alice", "right")
    auth_lookups.auth._authenticate_cached("alice", "right")
    assert passwords.checks == ["alice"]
    auth_changes.mark()  # e.g. alice's password changed through the other worker
    auth_lookups.auth._authenticate_cached("alice", "right")
    assert passwords.checks == ["alice", "alice"]

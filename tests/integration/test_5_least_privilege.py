"""Every account gets the least it needs: what the serving and trainer accounts, a teammate
without grants, the tracking server's Postgres role and its S3 key can and cannot do.
Uses the shared session stack and the `trained` fixture's run; changes nothing others use."""

from __future__ import annotations

import json
import secrets
import subprocess

import pytest
import requests
from mlflow import MlflowClient
from stack import Stack

API = "/api/2.0/mlflow"


def call(stack: Stack, who, method: str, path: str, **kwargs) -> requests.Response:
    auth = stack.credentials(who) if isinstance(who, str) else who
    return requests.request(method, stack.mlflow_url + path, auth=auth, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def served_experiment(stack: Stack, admin_client: MlflowClient) -> str:
    return admin_client.get_experiment_by_name(stack.env["EXPERIMENT_NAME"]).experiment_id


@pytest.fixture(scope="module")
def other_experiment(stack: Stack, admin_client: MlflowClient) -> str:
    """Another team's experiment with a run, made by the admin: nobody was granted it."""
    name = f"other-team-{secrets.token_hex(4)}"
    experiment_id = admin_client.create_experiment(name)
    run = admin_client.create_run(experiment_id)
    admin_client.log_param(run.info.run_id, "secret_sauce", "42")
    admin_client.set_terminated(run.info.run_id)
    return experiment_id


@pytest.fixture(scope="module")
def teammate(stack: Stack):
    """A user the admin created and granted nothing, as a new teammate starts."""
    login = (f"teammate-{secrets.token_hex(4)}", secrets.token_urlsafe(24))
    created = call(stack, "admin", "POST", f"{API}/users/create", json={"username": login[0], "password": login[1]})
    assert created.status_code == 200, created.text
    yield login
    # Later test files count the stack's accounts (backups): leave them as found.
    call(stack, "admin", "DELETE", f"{API}/users/delete", json={"username": login[0]})


# --- serving: reads its model, nothing else -------------------------------------------------

def test_serving_cannot_create_an_experiment(stack: Stack):
    response = call(stack, "serving", "POST", f"{API}/experiments/create", json={"name": f"x-{secrets.token_hex(4)}"})
    assert response.status_code == 403, response.text


def test_serving_cannot_create_a_registered_model(stack: Stack):
    response = call(stack, "serving", "POST", f"{API}/registered-models/create",
                    json={"name": f"x-{secrets.token_hex(4)}"})
    assert response.status_code == 403, response.text


def test_serving_cannot_upload_an_artifact(stack: Stack, trained, served_experiment: str):
    run_id = trained["run"].rstrip("/").rsplit("/", 1)[-1]
    path = f"/api/2.0/mlflow-artifacts/artifacts/{served_experiment}/{run_id}/artifacts/planted.txt"
    response = call(stack, "serving", "PUT", path, data=b"planted by serving")
    assert response.status_code == 403, response.text
    # The admin can, so the 403 is about rights, not a wrong path.
    assert call(stack, "admin", "PUT", path, data=b"admin was here").status_code == 200


def test_serving_cannot_read_another_experiment(stack: Stack, other_experiment: str):
    response = call(stack, "serving", "GET", f"{API}/experiments/get", params={"experiment_id": other_experiment})
    assert response.status_code == 403, response.text
    found = call(stack, "serving", "POST", f"{API}/runs/search", json={"experiment_ids": [other_experiment]})
    assert found.status_code == 403 or not found.json().get("runs"), found.text


def test_serving_reads_the_model_it_serves(stack: Stack, trained):
    response = call(stack, "serving", "GET", f"{API}/registered-models/alias",
                    params={"name": stack.env["MODEL_NAME"], "alias": stack.env["MODEL_ALIAS"]})
    assert response.status_code == 200, response.text


# --- a teammate with no grants, and resource creation ----------------------------------------

def test_a_teammate_without_grants_sees_nothing(stack: Stack, teammate, served_experiment: str, other_experiment: str):
    for experiment_id in (served_experiment, other_experiment):
        response = call(stack, teammate, "GET", f"{API}/experiments/get", params={"experiment_id": experiment_id})
        assert response.status_code == 403, f"experiment {experiment_id}: {response.status_code} {response.text}"
    listed = call(stack, teammate, "GET", f"{API}/experiments/search", params={"max_results": 100})
    assert listed.status_code == 200 and not listed.json().get("experiments"), listed.text


def test_a_grant_and_its_revoke_apply_to_the_next_call_on_every_worker(stack: Stack, teammate,
                                                                       other_experiment: str):
    """Each server worker remembers a user's grants for a few seconds
    (MLFLOW_AUTH_GRANT_CACHE_SECONDS); a change the server takes is seen at once by all of them.
    Twenty calls, each on a new connection, reach both workers."""
    def reads() -> set[int]:
        return {call(stack, teammate, "GET", f"{API}/experiments/get",
                     params={"experiment_id": other_experiment}).status_code for _ in range(20)}

    assert reads() == {403}  # now every worker remembers that the teammate holds nothing
    grant = {"username": teammate[0], "resource_type": "experiment", "resource_id": other_experiment}
    granted = call(stack, "admin", "POST", "/api/3.0/mlflow/users/permissions/grant",
                   json={**grant, "permission": "READ"})
    assert granted.status_code == 200, granted.text
    assert reads() == {200}
    revoked = call(stack, "admin", "POST", "/api/3.0/mlflow/users/permissions/revoke", json=grant)
    assert revoked.status_code == 200, revoked.text
    assert reads() == {403}


def test_the_trainer_uses_an_experiment_it_has_just_created(stack: Stack):
    """The creator's right is granted by the worker that took the create; the next calls may
    reach the other worker."""
    created = call(stack, "trainer", "POST", f"{API}/experiments/create", json={"name": f"new-{secrets.token_hex(4)}"})
    assert created.status_code == 200, created.text
    experiment_id = created.json()["experiment_id"]
    answers = [call(stack, "trainer", "POST", f"{API}/runs/create", json={"experiment_id": experiment_id})
               for _ in range(10)]
    assert [a.status_code for a in answers] == [200] * 10, [a.text for a in answers if a.status_code != 200]


def test_only_the_admin_and_the_trainer_create_experiments_and_models(stack: Stack, teammate):
    for who in (teammate, "serving"):
        for path, body in ((f"{API}/experiments/create", {"name": f"x-{secrets.token_hex(4)}"}),
                           (f"{API}/registered-models/create", {"name": f"x-{secrets.token_hex(4)}"})):
            response = call(stack, who, "POST", path, json=body)
            assert response.status_code == 403, f"{who if isinstance(who, str) else 'teammate'} {path}: {response.text}"
    for who in ("admin", "trainer"):
        response = call(stack, who, "POST", f"{API}/experiments/create",
                        json={"name": f"by-{who}-{secrets.token_hex(4)}"})
        assert response.status_code == 200, f"{who}: {response.text}"


# --- the trainer: its experiment and model, not the accounts ----------------------------------

def test_trainer_cannot_read_the_auth_database(stack: Stack):
    serving_user = stack.credentials("serving")[0]
    for path, params in ((f"{API}/users/get", {"username": serving_user}),
                         (f"{API}/users/permissions/list", {"username": serving_user})):
        response = call(stack, "trainer", "GET", path, params=params)
        assert response.status_code in (403, 404), f"{path}: {response.status_code} {response.text}"
    # Nor the database itself: Postgres is on a network the trainer is not attached to.
    probe = stack.compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "trainer", "-c",
                          "import socket; socket.create_connection(('postgres', 5432), timeout=5)", check=False)
    assert probe.returncode != 0 and ("gaierror" in probe.stderr or "Name or service" in probe.stderr), probe.stderr


# --- the tracking server's own credentials ----------------------------------------------------

def psql(stack: Stack, sql: str, database: str = "postgres") -> str:
    return stack.compose("exec", "-T", "postgres", "psql", "-At", "-v", "ON_ERROR_STOP=1",
                         "-U", stack.env["POSTGRES_USER"], "-d", database, "-c", sql).stdout.strip()


def test_tracking_server_logs_in_to_postgres_as_its_own_unprivileged_role(stack: Stack):
    role = stack.env["MLFLOW_DB_USER"]
    users = set(psql(stack, "SELECT DISTINCT usename FROM pg_stat_activity "
                            "WHERE datname IN ('mlflow', 'mlflow_auth') AND pid <> pg_backend_pid()").split())
    assert users == {role}, f"sessions on the tracking databases: {users}"
    flags = psql(stack, f"SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = '{role}'")
    assert flags == "f|f|f", flags
    owned = set(psql(stack, f"SELECT datname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba "
                            f"WHERE r.rolname = '{role}'").split())
    assert owned == {stack.env.get("POSTGRES_DB", "mlflow"), "mlflow_auth"}, owned
    # Every table of both databases is its own, so it never needs more than that.
    for database in owned:
        others = psql(stack, f"SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tableowner <> '{role}'",
                      database)
        assert others == "0", f"{database}: {others} tables owned by another role"


def test_the_tracking_server_holds_neither_superuser_nor_s3_root_secrets(stack: Stack):
    container = stack.compose("ps", "-q", "mlflow").stdout.strip()
    env = json.loads(subprocess.run(["docker", "inspect", container], capture_output=True, text=True,
                                    check=True).stdout)[0]["Config"]["Env"]
    values = {line.split("=", 1)[1] for line in env if "=" in line}
    for name in ("POSTGRES_PASSWORD", "S3_SECRET_KEY", "S3_ACCESS_KEY", "MODEL_SIGNING_KEY", "BACKUP_KEY"):
        value = stack.env.get(name, "")
        if value:
            assert value not in values, f"the tracking server's environment holds {name}"


# --- bodies the tracking server cannot hold ------------------------------------------------------

def raw_put(stack: Stack, path: str, declared: int, sent: bytes) -> tuple[int, bytes]:
    """A PUT over a plain socket that declares `declared` bytes and sends `sent` of them, as a
    client streaming a large upload does; returns the status and body the server answered."""
    import base64
    import socket

    token = base64.b64encode(":".join(stack.credentials("trainer")).encode()).decode()
    head = (f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{stack.env['MLFLOW_PORT']}\r\n"
            f"Authorization: Basic {token}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", int(stack.env["MLFLOW_PORT"])), timeout=30) as sock:
        sock.sendall(head)
        try:
            sock.sendall(sent)
        except OSError:
            pass  # the server may answer and close before taking the whole body
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < reply.index(b"\r\n\r\n") + 4 + 10:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, reply.partition(b"\r\n\r\n")[2]


def test_an_upload_over_the_limit_gets_413_and_the_server_stays_healthy(stack: Stack, trained, served_experiment: str):
    limit = 64 * 1024 * 1024  # MLFLOW_MAX_BODY_SIZE of the test stack
    run_id = trained["run"].rstrip("/").rsplit("/", 1)[-1]
    path = f"/api/2.0/mlflow-artifacts/artifacts/{served_experiment}/{run_id}/artifacts/too-big.bin"
    status, body = raw_put(stack, path, declared=limit + 1, sent=b"\0" * (4 * 1024 * 1024))
    assert status == 413, body[:300]
    assert b"REQUEST_TOO_LARGE" in body
    # Nothing was stored, and the server still takes an upload within the limit.
    fits = call(stack, "trainer", "PUT", path.replace("too-big", "fits"), data=b"\0" * (1024 * 1024))
    assert fits.status_code == 200, fits.text
    listed = call(stack, "trainer", "GET", "/api/2.0/mlflow-artifacts/artifacts",
                  params={"path": f"{served_experiment}/{run_id}/artifacts"})
    names = {f["path"] for f in listed.json().get("files", [])}
    assert "fits.bin" in names and "too-big.bin" not in names, names

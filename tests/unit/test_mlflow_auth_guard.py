"""tracking/auth_guard.py in a Flask request context: what MLflow's permission checks
would fail on with a 500 is refused with a 4xx; everything else reaches MLflow's basic auth."""

import base64
import json
from unittest import mock

import pytest
from flask import Flask
from werkzeug.datastructures import Authorization

from tracking import auth_guard

BASIC = "Basic " + base64.b64encode(b"trainer:secret").decode()
AUTHENTICATED = Authorization("basic", {"username": "trainer", "password": "secret"})
DEEP = b"[" * 100_000 + b"]" * 100_000


def guard(body=b"", method="POST", authorization=BASIC, content_type="application/json", mlflow_says=AUTHENTICATED):
    """(what the guard returned, how often MLflow's own basic auth was asked)."""
    headers = {"Content-Type": content_type}
    if authorization is not None:
        headers["Authorization"] = authorization
    with mock.patch.object(auth_guard.auth, "authenticate_request_basic_auth", return_value=mlflow_says) as mlflow_auth:
        with Flask(__name__).test_request_context("/api/2.0/mlflow/runs/create", method=method, data=body,
                                                  headers=headers):
            return auth_guard.authenticate_request(), mlflow_auth.call_count


@pytest.mark.parametrize("authorization", ["Bearer abc", "Digest username=x", "Basic !!!"])
def test_credentials_that_are_not_basic_get_401(authorization):
    answer, _ = guard(authorization=authorization)
    assert answer.status_code == 401 and "WWW-Authenticate" in answer.headers


@pytest.mark.parametrize("body, says", [
    (DEEP, "too deeply"),
    (b'{"experiment_id": ' + DEEP + b"}", "too deeply"),
    (json.dumps(DEEP.decode()).encode(), "too deeply"),
    (b'"not json"', "JSON string"),
    (b'{"experiment_id": ["1"]}', "'experiment_id' must be a single value, not a JSON list"),
    (b'{"run_id": {"a": 1}, "key": "m"}', "'run_id' must be a single value, not a JSON object"),
])
def test_bodies_the_permission_checks_cannot_read_get_400_json(body, says):
    answer, _ = guard(body)
    assert answer.status_code == 400 and answer.mimetype == "application/json"
    document = answer.get_json()
    assert document["error_code"] == "INVALID_PARAMETER_VALUE" and says in document["message"]


@pytest.mark.parametrize("body, method, content_type", [
    (b'{"experiment_id": "1", "tags": [{"key": "a", "value": "b"}]}', "POST", "application/json"),
    (b"{not json", "POST", "application/json"),  # MLflow's own 400 answers it
    (DEEP, "POST", "application/octet-stream"),  # not JSON: an artifact upload, say
    (DEEP, "GET", "application/json"),  # GET bodies are never read
])
def test_everything_else_is_left_to_mlflow(body, method, content_type):
    answer, asked = guard(body, method=method, content_type=content_type)
    assert answer is AUTHENTICATED and asked == 1


def test_bad_credentials_are_answered_before_the_body_is_looked_at():
    refusal = Flask(__name__).response_class("You are not authenticated.", status=401)
    answer, _ = guard(DEEP, mlflow_says=refusal)
    assert answer is refusal



@pytest.mark.parametrize("path", ["/api/2.0/mlflow/experiments/create",
                                  "/ajax-api/2.0/mlflow/registered-models/create"])
def test_only_admins_and_the_trainer_create(path, monkeypatch):
    monkeypatch.setattr(auth_guard, "_CREATORS", frozenset({"trainer"}))
    user = mock.Mock(is_admin=False)
    for name, allowed in (("trainer", True), ("teammate", False)):
        login = Authorization("basic", {"username": name, "password": "secret"})
        with mock.patch.object(auth_guard.auth, "authenticate_request_basic_auth", return_value=login), \
                mock.patch.object(auth_guard.auth, "store", mock.Mock(get_user=mock.Mock(return_value=user))):
            token = base64.b64encode(f"{name}:secret".encode()).decode()
            with Flask(__name__).test_request_context(path, method="POST", json={"name": "x"},
                                                      headers={"Authorization": "Basic " + token}):
                answer = auth_guard.authenticate_request()
        assert (answer is login) == allowed, name
        if not allowed:
            assert answer.status_code == 403


@pytest.mark.parametrize("user, allowed", [("monitoring", True), ("trainer", False), (None, False)])
def test_metrics_are_for_the_listed_readers_only(monkeypatch, user, allowed):
    validators: dict = {}
    monkeypatch.setattr(auth_guard.auth, "BEFORE_REQUEST_VALIDATORS", validators, raising=False)
    monkeypatch.setattr(auth_guard, "_METRICS_READERS", frozenset({"monitoring"}))
    auth_guard.allow_metrics_readers()
    with Flask(__name__).test_request_context("/metrics"):
        from flask import g
        if user is not None:
            g.mlflow_authenticated_user = user
        assert validators[("/metrics", "GET")]() is allowed

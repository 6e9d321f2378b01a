"""The tracking server's `authorization_function`: MLflow's own basic auth, after refusing
with a 4xx the requests that MLflow 3.17's permission checks would otherwise answer with a
500 and a Flask HTML page.

MLflow runs its permission checks in a `before_request` hook, before its handlers validate
anything, and some inputs break them:

  Authorization: Bearer ...      no username or password; the credential cache hashes None
  {"experiment_id": ["1"]}       an id that is a list or an object is used as a dict key
  [[[[...100k levels           json.loads raises RecursionError, which get_json(silent=True)
                                 does not catch
  "not json" (a JSON string)     read as a double-encoded body by the handlers, whose second
                                 json.loads fails unguarded

Only the request line, the headers and JSON bodies are looked at; artifact uploads and
other non-JSON bodies pass untouched.

It also keeps resource creation to MLflow admins and the accounts in MLFLOW_CREATORS (the
trainer): MLflow 3.17 lets every authenticated user create experiments and registered models
unless workspaces are on, and with workspaces on its UI opens no run or model link until a
workspace is picked.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from flask import Response, g, request
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.server import auth

if TYPE_CHECKING:
    from werkzeug.datastructures import Authorization

# The names MLflow 3.17's permission checks read from a request (`_get_request_param`); each
# must hold one value.
_SINGLE_VALUED = frozenset({
    "dataset_id", "endpoint_id", "experiment_id", "experiment_name", "is_admin", "issue_id",
    "job_id", "model_definition_id", "model_id", "name", "password", "permission", "queue_id",
    "request_id", "resource_id", "resource_pattern", "resource_type", "role_id",
    "role_permission_id", "run_id", "run_uuid", "schema_id", "scorer_name", "secret_id",
    "trace_id", "username", "workspace",
})
_METHODS_WITH_JSON_BODIES = frozenset({"POST", "PATCH", "DELETE"})
_CREATE_PATHS = frozenset(f"/{prefix}/2.0/mlflow/{what}/create" for prefix in ("api", "ajax-api")
                          for what in ("experiments", "registered-models"))
_CREATORS = frozenset(filter(None, (n.strip() for n in os.environ.get("MLFLOW_CREATORS", "").split(","))))
_METRICS_READERS = frozenset(filter(None, (n.strip() for n in os.environ.get("MLFLOW_METRICS_READERS", "").split(","))))
METRICS_PATH = "/metrics"


def allow_metrics_readers() -> None:
    """MLflow 3.17 refuses non-admins every route that has no permission check of its own
    (fail-closed), and --expose-prometheus's /metrics has none: this gives it one that lets
    the accounts in MLFLOW_METRICS_READERS (Prometheus's) read it, and nobody else."""
    validators = getattr(auth, "BEFORE_REQUEST_VALIDATORS", None)
    if validators is None:
        print("[tracking] this MLflow has no BEFORE_REQUEST_VALIDATORS: /metrics is for admins only", flush=True)
        return
    validators[(METRICS_PATH, "GET")] = _may_read_metrics


def _may_read_metrics() -> bool:
    return g.get("mlflow_authenticated_user") in _METRICS_READERS


def authenticate_request() -> Response | Authorization | None:
    """Named in the auth config's `authorization_function`."""
    credentials = request.authorization
    if credentials is None or credentials.type != "basic" or None in (credentials.username, credentials.password):
        return auth.make_basic_auth_response()
    result = auth.authenticate_request_basic_auth()
    if isinstance(result, Response):
        return result  # unauthenticated clients learn nothing about their bodies
    if request.method == "POST" and request.path.rstrip("/") in _CREATE_PATHS and not _may_create(credentials.username):
        return _error(403, "PERMISSION_DENIED", "Only admins and the trainer account create experiments and "
                      "registered models here; ask an admin to create it or to grant you one.")
    # MLflow calls this several times per request; the body is looked at once.
    if not g.get("auth_guard_body_checked"):
        g.auth_guard_body_checked = True
        refusal = _body_refusal()
        if refusal is not None:
            return refusal
    return result


def _may_create(username: str) -> bool:
    if username in _CREATORS:
        return True
    try:
        return bool(auth.store.get_user(username).is_admin)
    except Exception:  # noqa: BLE001 - an unknown user creates nothing
        return False


def _error(status: int, code: str, message: str) -> Response:
    return Response(json.dumps({"error_code": code, "message": message}), status=status, mimetype="application/json")


def _body_refusal() -> Response | None:
    if request.method not in _METHODS_WITH_JSON_BODIES or not request.is_json:
        return None
    try:
        raw = request.get_data(cache=True)  # cached: MLflow's own parsing reads it again
    except Exception:  # noqa: BLE001 - an unreadable body is MLflow's to answer, as before
        return None
    body, problem = _parse(raw)
    if problem is None and isinstance(body, str):
        body, problem = _parse(body)  # what the handlers do with a double-encoded body
        if problem == "malformed":
            return _bad_request("The request body is a JSON string that does not hold a JSON document.")
    if problem == "too deep":
        return _bad_request("The request body nests JSON arrays or objects too deeply.")
    if problem is not None:
        return None  # malformed JSON: MLflow answers it with its own 400
    if isinstance(body, dict):
        for key in _SINGLE_VALUED.intersection(body):
            if isinstance(body[key], (list, dict)):
                kind = "list" if isinstance(body[key], list) else "object"
                return _bad_request(f"Parameter '{key}' must be a single value, not a JSON {kind}.")
    return None


def _parse(text: str) -> tuple[object, str | None]:
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "too deep"
    except ValueError:
        return None, "malformed"


def _bad_request(message: str) -> Response:
    error = MlflowException(message, INVALID_PARAMETER_VALUE)
    return Response(error.serialize_as_json(), status=error.get_http_status_code(), mimetype="application/json")

"""mlflow-init's accounts and grants (tracking/provision_users.py), against an in-memory stand-in
for MLflow's auth client and tracking client: who may do what once it has run."""

import base64
import http.server
import threading
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException, RestException

from stack_common.settings import ConfigError, load
from tracking import provision_users, settings

ENV = {
    "MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_ADMIN_PASSWORD": "admin-pw", "TRAINER_USERNAME": "trainer",
    "TRAINER_PASSWORD": "t", "SERVING_USERNAME": "serving", "SERVING_PASSWORD": "s", "MONITORING_PASSWORD": "m",
    "PREDICTION_LOG_PASSWORD": "p", "EXPERIMENT_NAME": "fashion-mnist", "MODEL_NAME": "fashion-mnist-cnn",
}


class FakeAuth:
    def __init__(self):
        self.passwords = {}
        self.grants = {}  # (user, resource type, resource id) -> level
        self.roles = {}  # id -> (name, {(type, pattern): level}, members)

    def get_user(self, username):
        if username not in self.passwords:
            raise RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": username})

    def create_user(self, username, password):
        self.passwords[username] = password

    def update_user_password(self, username, password):
        self.passwords[username] = password

    def grant_user_permission(self, username, resource_type, resource_id, permission):
        if (username, resource_type, resource_id) in self.grants:
            raise RestException({"error_code": "RESOURCE_ALREADY_EXISTS", "message": "exists"})
        self.grants[(username, resource_type, resource_id)] = permission

    def get_user_permission(self, username, resource_type, resource_id):
        return SimpleNamespace(permission=self.grants[(username, resource_type, resource_id)])

    def revoke_user_permission(self, username, resource_type, resource_id):
        del self.grants[(username, resource_type, resource_id)]

    def list_roles(self, workspace):
        return [SimpleNamespace(id=i, name=name) for i, (name, _, _) in self.roles.items()]

    def create_role(self, workspace, name, description):
        self.roles[len(self.roles) + 1] = (name, {}, set())
        return SimpleNamespace(id=len(self.roles), name=name)

    def list_role_permissions(self, role_id):
        return [SimpleNamespace(id=(role_id, key), resource_type=key[0], resource_pattern=key[1], permission=level)
                for key, level in self.roles[role_id][1].items()]

    def add_role_permission(self, role_id, resource_type, pattern, level):
        self.roles[role_id][1][(resource_type, pattern)] = level

    def list_user_roles(self, username):
        return [SimpleNamespace(id=i) for i, (_, _, members) in self.roles.items() if username in members]

    def assign_role(self, username, role_id):
        self.roles[role_id][2].add(username)

    def rights(self, username):
        return {(kind, resource): level for (user, kind, resource), level in self.grants.items() if user == username}

    def role_names(self, username):
        return {name for name, _, members in self.roles.values() if username in members}


class FakeClient:
    def __init__(self):
        self.experiments = {}
        self.models = set()

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id=self.experiments[name]) if name in self.experiments else None

    def create_experiment(self, name):
        self.experiments[name] = str(len(self.experiments) + 1)
        return self.experiments[name]

    def get_registered_model(self, name):
        if name not in self.models:
            raise MlflowException(f"no model {name}")

    def create_registered_model(self, name, description):
        self.models.add(name)


@pytest.fixture
def provisioned():
    auth, client = FakeAuth(), FakeClient()
    provision_users.provision(auth, client, load(settings.Accounts, ENV))
    return auth, client


def test_the_predictions_account_may_edit_the_inference_experiment_and_nothing_else(provisioned):
    auth, client = provisioned
    inference = client.experiments["fashion-mnist-cnn-inference"]
    assert auth.passwords["predictions"] == "p"
    assert auth.rights("predictions") == {("experiment", inference): "EDIT"}
    assert auth.role_names("predictions") == set()  # the model readers' run DENY would win over the grant


def test_the_trainer_reads_the_log_and_writes_reports_apart(provisioned):
    auth, client = provisioned
    e = client.experiments
    assert auth.rights("trainer") == {
        ("experiment", e["fashion-mnist"]): "EDIT", ("registered_model", "fashion-mnist-cnn"): "EDIT",
        ("experiment", e["fashion-mnist-cnn-inference"]): "READ", ("experiment", e["fashion-mnist-cnn-drift"]): "EDIT"}


def test_serving_keeps_reading_only_its_model(provisioned):
    auth, client = provisioned
    assert auth.rights("serving") == {("experiment", client.experiments["fashion-mnist"]): "READ",
                                      ("registered_model", "fashion-mnist-cnn"): "READ"}
    assert auth.role_names("serving") == {"stack-model-readers"}
    assert auth.rights("monitoring") == {}


def test_running_again_rotates_the_password_and_corrects_a_changed_grant(provisioned):
    auth, client = provisioned
    inference = client.experiments["fashion-mnist-cnn-inference"]
    auth.grants[("predictions", "experiment", inference)] = "MANAGE"
    provision_users.provision(auth, client, load(settings.Accounts, {**ENV, "PREDICTION_LOG_PASSWORD": "rotated"}))
    assert auth.passwords["predictions"] == "rotated"
    assert auth.rights("predictions") == {("experiment", inference): "EDIT"}
    assert len(client.experiments) == 3


def test_named_experiments_and_account_are_used():
    auth, client = FakeAuth(), FakeClient()
    env = {**ENV, "PREDICTION_LOG_USERNAME": "log", "PREDICTION_LOG_EXPERIMENT": "seen", "DRIFT_EXPERIMENT": "drift"}
    provision_users.provision(auth, client, load(settings.Accounts, env))
    assert set(client.experiments) == {"fashion-mnist", "seen", "drift"}
    assert auth.rights("log") == {("experiment", client.experiments["seen"]): "EDIT"}


@pytest.mark.parametrize(("change", "line"), [
    ({"PREDICTION_LOG_PASSWORD": ""}, "PREDICTION_LOG_PASSWORD is not set"),
    ({"PREDICTION_LOG_USERNAME": "serving"}, "PREDICTION_LOG_USERNAME must name an account of its own"),
])
def test_the_log_account_is_checked_before_anything_is_made(change, line):
    with pytest.raises(ConfigError) as refused:
        load(settings.Accounts, {**ENV, **change})
    assert str(refused.value).startswith(line) and "\n" not in str(refused.value)


class TrackingApi(http.server.BaseHTTPRequestHandler):
    """Answers the experiment list only to the admin's login under the service's host name,
    and refuses the first `refusals` asks with a 503, as a server still starting does."""

    refusals = 0
    asked = []

    def do_GET(self):  # noqa: N802 (the handler's API)
        expected = "Basic " + base64.b64encode(b"admin:admin-pw").decode()
        type(self).asked.append(self.headers["Host"])
        if len(self.asked) <= self.refusals or self.headers["Authorization"] != expected:
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def tracking_api(monkeypatch):
    monkeypatch.setenv("MLFLOW_ADMIN_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_ADMIN_PASSWORD", "admin-pw")
    monkeypatch.delenv("AUTH_MODE", raising=False)
    TrackingApi.asked = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TrackingApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_provisioning_waits_until_the_server_answers_its_api(tracking_api):
    TrackingApi.refusals = 3
    provision_users.wait_for_server(tracking_api, host="mlflow:5000", deadline_s=60)
    assert TrackingApi.asked == ["mlflow:5000"] * 4


def test_a_server_that_never_answers_ends_provisioning_with_one_line(tracking_api):
    TrackingApi.refusals = 10**6
    with pytest.raises(SystemExit) as stopped:
        provision_users.wait_for_server(tracking_api, host="mlflow:5000", deadline_s=1)
    assert str(stopped.value).startswith(f"the tracking server at {tracking_api} did not answer within 1 s: ")
    assert "503" in str(stopped.value)

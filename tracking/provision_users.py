"""One-shot, once the tracking server answers: the service accounts and their rights.

The trainer and serving containers never hold admin credentials. Each gets its own user
with the least it needs; nobody reads anything without a grant (default_permission is
NO_PERMISSIONS) and only admins and the trainer may create experiments and registered
models (auth_guard.py):

  trainer      EDIT on its experiment, its registered model and the drift experiment (its
               reports); READ on the inference experiment (what the drift report compares)
  serving      READ on its registered model and on the experiment its files live in, and DENY
               on every run and trace (role stack-model-readers): the model, nothing else
  predictions  EDIT on the inference experiment only: serving's prediction log uploads with
               it, since serving's own account may not write a run
  monitoring   nothing: Prometheus's login for /metrics, which asks for a login only

The inference and drift experiments are made here whether or not the prediction log is on:
an empty experiment costs nothing, and the log's account may not create one.

Passwords come from .env and are re-applied on every start, so rotating one in .env and
running `make up` is the whole procedure. Roles and grants are re-applied too.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.server import get_app_client

from tracking import healthcheck, settings
from tracking.settings import MONITORING_USERNAME

if TYPE_CHECKING:
    from mlflow.server.auth.client import AuthServiceClient


def ensure_user(auth: AuthServiceClient, username: str, password: str) -> None:
    try:
        auth.get_user(username)
    except RestException:
        auth.create_user(username, password)
        settings.log(f"created user {username}")
        return
    auth.update_user_password(username, password)


def ensure_grant(auth: AuthServiceClient, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Grant, or correct a grant made earlier with another level; a no-op when it matches."""
    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)
        return
    except RestException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if auth.get_user_permission(username, resource_type, resource_id).permission != permission:
        auth.revoke_user_permission(username, resource_type, resource_id)
        auth.grant_user_permission(username, resource_type, resource_id, permission)


WORKSPACE = "default"
MODEL_READERS = ("stack-model-readers", [("run", "*", "DENY"), ("trace", "*", "DENY")])


def ensure_role(auth: AuthServiceClient, name: str, permissions: list[tuple[str, str, str]],
                members: list[str]) -> None:
    """A role in the default workspace with exactly `permissions`, held by `members`."""
    role = next((r for r in auth.list_roles(WORKSPACE) if r.name == name), None)
    if role is None:
        role = auth.create_role(WORKSPACE, name, description="Managed by mlflow-init; re-applied on every start.")
        settings.log(f"created role {name}")
    present = {(p.resource_type, p.resource_pattern): p for p in auth.list_role_permissions(role.id)}
    for resource_type, pattern, level in permissions:
        current = present.pop((resource_type, pattern), None)
        if current is None:
            auth.add_role_permission(role.id, resource_type, pattern, level)
        elif current.permission != level:
            auth.update_role_permission(current.id, level)
    for stale in present.values():
        auth.remove_role_permission(stale.id)
    for username in members:
        if all(r.id != role.id for r in auth.list_user_roles(username)):
            auth.assign_role(username, role.id)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    settings.log(f"creating experiment {name}")
    return client.create_experiment(name)


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        settings.log(f"creating registered model {name}")
        client.create_registered_model(name, description="FashionMNIST classifier trained by the stack's trainer.")


def provision(auth: AuthServiceClient, client: MlflowClient, conf: settings.Accounts) -> None:
    """Users, experiments, the registered model and every grant, as the admin; safe to repeat."""
    trainer = conf.trainer_username
    serving = conf.serving_username
    predictions = conf.prediction_log_username
    ensure_user(auth, trainer, conf.trainer_password.get_secret_value())
    ensure_user(auth, serving, conf.serving_password.get_secret_value())
    ensure_user(auth, predictions, conf.prediction_log_password.get_secret_value())
    # Prometheus's login for /metrics, which asks for a login and no permission: it gets none.
    ensure_user(auth, MONITORING_USERNAME, conf.monitoring_password.get_secret_value())

    experiment_id = ensure_experiment(client, conf.experiment_name)
    inference_id = ensure_experiment(client, conf.inference_experiment)
    drift_id = ensure_experiment(client, conf.drift_report_experiment)
    model_name = conf.model_name
    ensure_registered_model(client, model_name)

    grants = [
        (trainer, "experiment", experiment_id, "EDIT"),
        (trainer, "registered_model", model_name, "EDIT"),
        # Drift reports read the prediction log and write their runs apart, so no report can
        # alter what serving saw.
        (trainer, "experiment", inference_id, "READ"),
        (trainer, "experiment", drift_id, "EDIT"),
        # A version's files live under the experiment, so reading them needs the experiment;
        # the role below keeps its runs and traces out of reach.
        (serving, "experiment", experiment_id, "READ"),
        (serving, "registered_model", model_name, "READ"),
        # The prediction log: a run per day and its files; never in the role below, whose
        # run DENY would win over this grant.
        (predictions, "experiment", inference_id, "EDIT"),
    ]
    for grant in grants:
        ensure_grant(auth, *grant)
    ensure_role(auth, *MODEL_READERS, members=[serving])
    settings.log(f"users ready: {trainer} (edit its experiment {experiment_id} and model {model_name}, "
                 f"may create), {serving} (read model {model_name}, no runs), {predictions} "
                 f"(edit experiment {inference_id} only)")


def wait_for_server(tracking_uri: str, host: str, deadline_s: float = 300) -> None:
    """Compose starts this with the server rather than after its health check, so importing
    MLflow here overlaps the server's own start: seconds off `make up`. The wait matches
    `make up`'s, long enough for a schema upgrade."""
    deadline = time.monotonic() + deadline_s
    while (why := healthcheck.problem(tracking_uri, host)) is not None:
        if time.monotonic() > deadline:
            raise SystemExit(f"the tracking server at {tracking_uri} did not answer within {deadline_s:.0f} s: {why}")
        time.sleep(0.5)


def main() -> None:
    conf = settings.load(settings.Accounts)
    host = f"mlflow:{conf.container_port}"
    tracking_uri = f"http://{host}"
    wait_for_server(tracking_uri, host)
    os.environ["MLFLOW_TRACKING_USERNAME"] = conf.admin_username
    os.environ["MLFLOW_TRACKING_PASSWORD"] = conf.admin_password.get_secret_value()
    provision(get_app_client("basic-auth", tracking_uri=tracking_uri), MlflowClient(tracking_uri), conf)


if __name__ == "__main__":
    main()

"""One-shot, after the tracking server is healthy: the service accounts and their rights.

The trainer and serving containers never hold admin credentials. Each gets its own user:
the trainer may edit its experiment and registered model, serving may only read them.
Passwords come from .env and are re-applied on every start, so rotating one in .env and
running `make up` is the whole procedure.
"""

from __future__ import annotations

import os

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.server import get_app_client

import settings


def ensure_user(auth, username: str, password: str) -> None:
    try:
        auth.get_user(username)
    except RestException:
        auth.create_user(username, password)
        settings.log(f"created user {username}")
        return
    auth.update_user_password(username, password)


def ensure_grant(auth, username: str, resource_type: str, resource_id: str, permission: str) -> None:
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


def main() -> None:
    port = settings.optional("MLFLOW_CONTAINER_PORT", "5000")
    tracking_uri = f"http://mlflow:{port}"
    os.environ["MLFLOW_TRACKING_USERNAME"] = settings.required("MLFLOW_ADMIN_USERNAME")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = settings.required("MLFLOW_ADMIN_PASSWORD")
    trainer = settings.required("TRAINER_USERNAME")
    serving = settings.required("SERVING_USERNAME")

    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    ensure_user(auth, trainer, settings.required("TRAINER_PASSWORD"))
    ensure_user(auth, serving, settings.required("SERVING_PASSWORD"))

    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, settings.required("EXPERIMENT_NAME"))
    model_name = settings.required("MODEL_NAME")
    ensure_registered_model(client, model_name)

    grants = [
        (trainer, "experiment", experiment_id, "EDIT"),
        (trainer, "registered_model", model_name, "EDIT"),
        (serving, "experiment", experiment_id, "READ"),
        (serving, "registered_model", model_name, "READ"),
    ]
    for grant in grants:
        ensure_grant(auth, *grant)
    settings.log(f"users ready: {trainer} (edit), {serving} (read) on experiment "
                 f"{experiment_id} and model {model_name}")


if __name__ == "__main__":
    main()

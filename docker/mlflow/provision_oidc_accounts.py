"""One-shot for AUTH_MODE=oidc, after the tracking server is healthy: the service accounts,
their access tokens and their rights, and the groups' rights.

With single sign-on people log in through the identity provider; the trainer and serving
containers cannot, so each is a service account of the mlflow-oidc-auth plugin with an access
token that it presents as the password of HTTP basic auth. The plugin generates every token
itself (no chosen password is accepted), so the token is written into MLflow's own
credentials file (~/.mlflow/credentials) on a volume that only that service mounts.

A token is kept while it still works and has more than RENEW_BEFORE left; otherwise a new one
replaces it, so `make up` is also the renewal procedure. Rights are as in basic mode: the
trainer edits its experiment and registered model, serving reads them; the groups named in
OIDC_READ_GROUPS / OIDC_EDIT_GROUPS get READ / EDIT on both.
"""

from __future__ import annotations

import configparser
import os
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import settings

TOKEN_NAME = "stack"
TOKEN_LIFETIME = timedelta(days=365)
RENEW_BEFORE = timedelta(days=30)
CREDENTIALS_DIR = Path(os.environ.get("CREDENTIALS_DIR", "/credentials"))


def open_store():
    os.environ["OIDC_USERS_DB_URI"] = settings.postgres_uri(settings.oidc_db())
    from mlflow_oidc_auth.store import store

    return store


def read_token(path: Path) -> str | None:
    config = configparser.ConfigParser()
    if not config.read(path) or "mlflow" not in config:
        return None
    return config["mlflow"].get("mlflow_tracking_password")


def write_credentials(path: Path, username: str, token: str) -> None:
    """MLflow's credentials file format; replaced atomically, readable by its owner only."""
    config = configparser.ConfigParser()
    config["mlflow"] = {"mlflow_tracking_username": username, "mlflow_tracking_password": token}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".credentials-")
    with os.fdopen(fd, "w") as out:
        config.write(out)
    os.replace(tmp, path)


def token_is_current(store, username: str, token: str | None) -> bool:
    if not token or not store.authenticate_user(username, token):
        return False
    soon = datetime.now(timezone.utc) + RENEW_BEFORE
    for record in store.list_user_tokens(username):
        expires = record.expires_at
        if expires is not None and expires.tzinfo is None:
            expires = expires.replace(tzinfo=timezone.utc)
        if record.name == TOKEN_NAME and expires is not None and expires > soon:
            return True
    return False


def ensure_service_account(store, username: str, service: str) -> str:
    """The account and a working token in the service's credentials file; returns the token."""
    if not store.has_user(username):
        store.create_user(username, f"{service} service account", is_admin=False,
                          is_service_account=True, written_by="manual")
        settings.log(f"created service account {username}")
    path = CREDENTIALS_DIR / service / "credentials"
    token = read_token(path)
    if token_is_current(store, username, token):
        return token
    expires = datetime.now(timezone.utc) + TOKEN_LIFETIME
    _, token, _ = store.replace_user_token(username, TOKEN_NAME, expires, created_by="mlflow-init")
    write_credentials(path, username, token)
    settings.log(f"issued an access token for {username} (valid until {expires:%Y-%m-%d})")
    return token


def ensure_resources(tracking_uri: str, experiment_name: str, model_name: str) -> str:
    """Created as the trainer, the one account meant to write them; the plugin makes the
    creator their manager, which ensure_user_grant narrows to EDIT right after."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        settings.log(f"creating experiment {experiment_name}")
        experiment_id = client.create_experiment(experiment_name)
    else:
        experiment_id = experiment.experiment_id
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        settings.log(f"creating registered model {model_name}")
        client.create_registered_model(model_name, description="FashionMNIST classifier trained by the stack's trainer.")
    return experiment_id


def ensure_user_grant(store, username: str, kind: str, resource: str, permission: str) -> None:
    get, create, update = {
        "experiment": (store.get_experiment_permission, store.create_experiment_permission,
                       store.update_experiment_permission),
        "registered_model": (store.get_registered_model_permission, store.create_registered_model_permission,
                             store.update_registered_model_permission),
    }[kind]
    try:
        current = get(resource, username).permission
    except MlflowException:
        create(resource, username, permission)
        return
    if current != permission:
        update(resource, username, permission)


def ensure_group_grant(store, group: str, kind: str, resource: str, permission: str) -> None:
    listed, key, create, update = {
        "experiment": (store.get_group_experiments, "experiment_id", store.create_group_experiment_permission,
                       store.update_group_experiment_permission),
        "registered_model": (store.get_group_models, "name", store.create_group_model_permission,
                             store.update_group_model_permission),
    }[kind]
    current = {str(getattr(p, key)): p.permission for p in listed(group)}
    if resource not in current:
        create(group, resource, permission)
    elif current[resource] != permission:
        update(group, resource, permission)


def groups(name: str) -> list[str]:
    return [g.strip() for g in settings.optional(name, "").split(",") if g.strip()]


def main() -> None:
    if settings.auth_mode() != "oidc":
        raise settings.ConfigError("provision_oidc_accounts.py is for AUTH_MODE=oidc (compose.oidc.yaml)")
    tracking_uri = f"http://mlflow:{settings.optional('MLFLOW_CONTAINER_PORT', '5000')}"
    trainer = settings.required("TRAINER_USERNAME")
    serving = settings.required("SERVING_USERNAME")
    experiment_name = settings.required("EXPERIMENT_NAME")
    model_name = settings.required("MODEL_NAME")

    store = open_store()
    trainer_token = ensure_service_account(store, trainer, "trainer")
    ensure_service_account(store, serving, "serving")

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = trainer, trainer_token
    experiment_id = ensure_resources(tracking_uri, experiment_name, model_name)

    for username, permission in ((trainer, "EDIT"), (serving, "READ")):
        ensure_user_grant(store, username, "experiment", experiment_id, permission)
        ensure_user_grant(store, username, "registered_model", model_name, permission)
    group_grants = [(g, "READ") for g in groups("OIDC_READ_GROUPS")] + [(g, "EDIT") for g in groups("OIDC_EDIT_GROUPS")]
    store.populate_groups([g for g, _ in group_grants])
    for group, permission in group_grants:
        ensure_group_grant(store, group, "experiment", experiment_id, permission)
        ensure_group_grant(store, group, "registered_model", model_name, permission)
    settings.log(f"service accounts ready: {trainer} (edit), {serving} (read) on experiment {experiment_id} "
                 f"and model {model_name}; group grants: {group_grants or 'none'}")


if __name__ == "__main__":
    main()

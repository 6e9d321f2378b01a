"""One-shot with single sign-on (AUTH_MODE=oidc), after the tracking server is healthy: the
trainer's and serving's service accounts, their access tokens and rights, and the groups'.

People log in at the identity provider; the trainer and serving containers cannot, so each
is a service account of the mlflow-oidc-auth plugin with an access token, which MLflow's
client sends as the password of HTTP basic auth. The plugin generates every token itself (no
chosen password is accepted), so the token goes into MLflow's own credentials file
(~/.mlflow/credentials) on a volume only that service mounts. The plugin's token and grant
API answers only people logged in at the provider, so this works in the plugin's store
directly, as the server's own database role.

A token is kept while it works and has more than RENEW_BEFORE left, otherwise it is
replaced: `make up` is also the renewal. Rights are as with basic auth: the trainer edits
its experiment and registered model, serving reads them, and the groups in
OIDC_READ_GROUPS / OIDC_EDIT_GROUPS get READ / EDIT on both.
"""

from __future__ import annotations

import configparser
import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tracking import settings
from tracking.provision_users import ensure_experiment, ensure_registered_model

TOKEN_NAME = "stack"
TOKEN_LIFETIME = timedelta(days=365)
RENEW_BEFORE = timedelta(days=30)
CREDENTIALS_DIR = Path("/credentials")


def open_store(conf: settings.ServiceAccounts) -> Any:  # noqa: ANN401 - the plugin's store has no public type
    os.environ["OIDC_USERS_DB_URI"] = conf.uri(conf.oidc_db)
    from mlflow_oidc_auth.store import store

    return store


def read_token(path: Path) -> str | None:
    config = configparser.ConfigParser()
    if not config.read(path) or "mlflow" not in config:
        return None
    return config["mlflow"].get("mlflow_tracking_password")


def write_credentials(path: Path, username: str, token: str) -> None:
    """MLflow's credentials file; replaced atomically, readable by its owner only."""
    config = configparser.ConfigParser()
    config["mlflow"] = {"mlflow_tracking_username": username, "mlflow_tracking_password": token}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".credentials-")
    with os.fdopen(fd, "w") as out:
        config.write(out)
    os.replace(tmp, path)


def token_is_current(store: Any, username: str, token: str | None) -> bool:  # noqa: ANN401
    if not token or not store.authenticate_user(username, token):
        return False
    soon = datetime.now(UTC) + RENEW_BEFORE
    for record in store.list_user_tokens(username):
        expires = record.expires_at
        if expires is not None and expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        if record.name == TOKEN_NAME and expires is not None and expires > soon:
            return True
    return False


def ensure_service_account(store: Any, username: str, service: str) -> str:  # noqa: ANN401
    """The account, and a working token in the service's credentials file; returns the token."""
    if not store.has_user(username):
        store.create_user(username, f"{service} service account", is_admin=False,
                          is_service_account=True, written_by="manual")
        settings.log(f"created service account {username}")
    path = CREDENTIALS_DIR / service / "credentials"
    token = read_token(path)
    if token_is_current(store, username, token):
        return token
    expires = datetime.now(UTC) + TOKEN_LIFETIME
    _, token, _ = store.replace_user_token(username, TOKEN_NAME, expires, created_by="mlflow-init")
    write_credentials(path, username, token)
    settings.log(f"issued an access token for {username}, valid until {expires:%Y-%m-%d}")
    return token


def ensure_user_grant(store: Any, username: str, kind: str, resource: str, permission: str) -> None:  # noqa: ANN401
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


def ensure_group_grant(store: Any, group: str, kind: str, resource: str, permission: str) -> None:  # noqa: ANN401
    listed, key, create, update = {
        "experiment": (store.get_group_experiments, "experiment_id", store.create_group_experiment_permission,
                       store.update_group_experiment_permission),
        "registered_model": (store.get_group_models, "name", store.create_group_model_permission,
                             store.update_group_model_permission),
    }[kind]
    current = {str(getattr(grant, key)): grant.permission for grant in listed(group)}
    if resource not in current:
        create(group, resource, permission)
    elif current[resource] != permission:
        update(group, resource, permission)


def main() -> None:
    conf = settings.load(settings.ServiceAccounts)
    trainer, serving = conf.trainer_username, conf.serving_username
    store = open_store(conf)
    trainer_token = ensure_service_account(store, trainer, "trainer")
    ensure_service_account(store, serving, "serving")

    # Created as the trainer, the one account meant to write them; the plugin makes a
    # creator the manager, which the grant below narrows to EDIT.
    client = MlflowClient(f"http://mlflow:{conf.container_port}")
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = trainer, trainer_token
    experiment_id = ensure_experiment(client, conf.experiment_name)
    ensure_registered_model(client, conf.model_name)

    for username, permission in ((trainer, "EDIT"), (serving, "READ")):
        ensure_user_grant(store, username, "experiment", experiment_id, permission)
        ensure_user_grant(store, username, "registered_model", conf.model_name, permission)
    grants = conf.group_grants()
    store.populate_groups([group for group, _ in grants])
    for group, permission in grants:
        ensure_group_grant(store, group, "experiment", experiment_id, permission)
        ensure_group_grant(store, group, "registered_model", conf.model_name, permission)
    settings.log(f"service accounts ready: {trainer} (edit), {serving} (read) on experiment {experiment_id} and "
                 f"model {conf.model_name}; group grants: {', '.join(f'{g} {p}' for g, p in grants) or 'none'}")


if __name__ == "__main__":
    main()

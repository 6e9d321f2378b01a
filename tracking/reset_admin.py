"""The admin logs in with MLFLOW_ADMIN_PASSWORD from this stack's .env: applied by the
tracking server on every start, and as a one-shot after a restore.

MLflow creates its admin only when the user is missing, so without this the admin would keep
whatever password it was created with: the first .env's, or, after a restore, the password
hash of the stack the backup came from. With it, rotating the admin's password is the same
as rotating any other: edit .env, `make up`. The trainer's and serving's passwords need
nothing here: provision_users.py re-applies them on every start, logged in as this admin.
"""

from __future__ import annotations

import warnings

# Importing MLflow's server package warns about a module it uses; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"starlette\.middleware\.wsgi is deprecated")

from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore  # noqa: E402

from tracking import settings  # noqa: E402


def apply(conf: settings.Server | settings.AdminReset) -> None:
    username, password = conf.admin_username, conf.admin_password.get_secret_value()
    store = SqlAlchemyStore()
    # Also migrates an auth schema written by an older MLflow, as the server would at start.
    store.init_db(conf.uri(conf.auth_db))
    try:
        if not store.has_user(username):
            store.create_user(username, password, is_admin=True)
            settings.log(f"admin {username}: created")
        elif not store.authenticate_user(username, password) or not store.get_user(username).is_admin:
            store.update_user(username, password=password, is_admin=True)
            settings.log(f"admin {username}: password set to MLFLOW_ADMIN_PASSWORD")
    finally:
        store.engine.dispose()


def main() -> None:
    apply(settings.load(settings.AdminReset))


if __name__ == "__main__":
    main()

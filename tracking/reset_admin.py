"""One-shot, after a restore and before the tracking server starts: the admin logs in with
MLFLOW_ADMIN_PASSWORD from this stack's .env again.

A restored auth database holds the password hashes of the stack it was backed up from, and
the server creates its admin only when the user is missing, so the admin would otherwise keep
the old stack's password. The trainer's and serving's passwords need nothing here:
provision_users.py re-applies them on every start, logged in as this admin.
"""

from __future__ import annotations

import warnings

# Importing MLflow's server package warns about a module it uses; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"starlette\.middleware\.wsgi is deprecated")

from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore  # noqa: E402

from tracking import settings  # noqa: E402


def main() -> None:
    conf = settings.load(settings.AdminReset)
    username, password = conf.admin_username, conf.admin_password.get_secret_value()
    store = SqlAlchemyStore()
    # Also migrates an auth schema written by an older MLflow, as the server would at start.
    store.init_db(conf.uri(conf.auth_db))
    try:
        if store.has_user(username):
            store.update_user(username, password=password, is_admin=True)
            settings.log(f"admin {username}: password reset to MLFLOW_ADMIN_PASSWORD")
        else:
            store.create_user(username, password, is_admin=True)
            settings.log(f"admin {username}: created (the backup had no such user)")
    finally:
        store.engine.dispose()


if __name__ == "__main__":
    main()

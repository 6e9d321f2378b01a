"""The tracking schema brought up to this MLflow: run by the server at every start, and on
Kubernetes as a Job before a new server version rolls out (deploy/kubernetes).

The URI holds a password, so it never goes on a command line (ps, logs): the upgrade runs
in this process through the CLI command's own function.
"""

from __future__ import annotations

import time

import psycopg2

from tracking import settings


def wait_for_postgres(conf: settings.Postgres, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    delay = 0.5
    while True:
        try:
            psycopg2.connect(**conf.params(conf.tracking_db), connect_timeout=5).close()
            return
        except psycopg2.OperationalError as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"Postgres did not accept connections within {deadline_s:.0f} s: {error}") from None
            time.sleep(delay)
            delay = min(delay * 2, 5)


def upgrade(conf: settings.Postgres) -> None:
    """Wait for Postgres, then upgrade the tracking schema; a no-op when it is current."""
    wait_for_postgres(conf)
    settings.log("upgrading the tracking schema (no-op when current)")
    import mlflow.db

    mlflow.db.upgrade.callback(conf.uri(conf.tracking_db))


def main() -> None:
    upgrade(settings.load(settings.Postgres))


if __name__ == "__main__":
    main()

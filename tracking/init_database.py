"""One-shot, before the tracking server starts: the Postgres role it connects as.

The tracking server never holds the superuser. It logs in as MLFLOW_DB_USER, a role that
may log in and owns the tracking and auth databases (with single sign-on, the plugin's too)
and what is in them, nothing else: no superuser, no CREATEDB, no CREATEROLE, and no other
database accepts it. Everything here is idempotent and runs on every start, so a volume
written by an older release (where the superuser owned everything) is handed over, and a
password changed in .env takes effect.
"""

from __future__ import annotations

import time

import psycopg2
from psycopg2 import sql

from tracking import settings

# Objects in the public schema that a role can own, with the ALTER statement for each kind.
# Sequences owned by a table column follow their table; views and enums are listed too.
_OWNED_KINDS = {
    "r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE",
}


def connect(conf: settings.DatabaseInit, database: str) -> psycopg2.extensions.connection:
    deadline = time.monotonic() + 120
    delay = 0.5
    while True:
        try:
            conn = psycopg2.connect(**conf.superuser_params(database), connect_timeout=5)
            conn.autocommit = True
            return conn
        except psycopg2.OperationalError as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"Postgres did not accept connections within 120 s: {error}") from None
            time.sleep(delay)
            delay = min(delay * 2, 5)


def ensure_role(cur: psycopg2.extensions.cursor, role: str, password: str) -> None:
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
    if cur.fetchone() is None:
        settings.log(f"creating role {role}")
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    # Re-applied on every start: rotating MLFLOW_DB_PASSWORD in .env is `make up`.
    cur.execute(
        sql.SQL("ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
                "PASSWORD %s").format(sql.Identifier(role)),
        (password,),
    )


def ensure_database(cur: psycopg2.extensions.cursor, name: str, owner: str) -> None:
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    if cur.fetchone() is None:
        settings.log(f"creating database {name}")
        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(owner)))
    cur.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(name), sql.Identifier(owner)))
    # Only the owner (and the superuser) may connect; PUBLIC's default CONNECT goes.
    cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))


def hand_over_contents(conf: settings.DatabaseInit, database: str, owner: str) -> int:
    """Make `owner` the owner of the public schema and of everything in it."""
    conn = connect(conf, database)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(owner)))
            cur.execute(
                "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "JOIN pg_roles r ON r.oid = c.relowner "
                "WHERE n.nspname = 'public' AND r.rolname <> %s AND c.relkind = ANY(%s) "
                # Column-owned sequences move with their table.
                "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i'))",
                (owner, list(_OWNED_KINDS)),
            )
            relations = cur.fetchall()
            for name, kind in relations:
                cur.execute(sql.SQL("ALTER {} {} OWNER TO {}").format(
                    sql.SQL(_OWNED_KINDS[kind]), sql.Identifier("public", name), sql.Identifier(owner)))
            cur.execute(
                "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                "JOIN pg_roles r ON r.oid = t.typowner WHERE n.nspname = 'public' AND t.typtype = 'e' "
                "AND r.rolname <> %s",
                (owner,),
            )
            types = cur.fetchall()
            for (name,) in types:
                cur.execute(sql.SQL("ALTER TYPE {} OWNER TO {}").format(sql.Identifier("public", name),
                                                                        sql.Identifier(owner)))
        return len(relations) + len(types)
    finally:
        conn.close()


def main() -> None:
    conf = settings.load(settings.DatabaseInit)
    role = conf.user
    databases = conf.databases()
    conn = connect(conf, "postgres")
    try:
        with conn.cursor() as cur:
            ensure_role(cur, role, conf.password.get_secret_value())
            for database in databases:
                ensure_database(cur, database, role)
            ensure_role(cur, conf.optuna_user, conf.optuna_password.get_secret_value())
            ensure_database(cur, conf.optuna_db, conf.optuna_user)
            # Postgres's maintenance database is the superuser's alone.
            cur.execute("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
    finally:
        conn.close()
    moved = sum(hand_over_contents(conf, database, role) for database in databases)
    moved += hand_over_contents(conf, conf.optuna_db, conf.optuna_user)
    if moved:
        settings.log(f"handed {moved} existing tables, sequences and types to {role}")
    settings.log(f"role {role} owns databases {', '.join(databases)}, nothing else; "
                 f"role {conf.optuna_user} owns {conf.optuna_db}")


if __name__ == "__main__":
    main()

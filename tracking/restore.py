"""Replaces a stack's data with an archive written by scripts/backup.sh, in an order that
cannot leave the stack without its data:

 1. the archive is checked (HMAC under BACKUP_KEY, every checksum, every object's headers)
    and so is its schema against this stack's MLflow;
 2. each dump is restored into a new scratch database, owned by and loaded as the app role
    MLFLOW_DB_USER, not the superuser, and its row counts are compared with the manifest;
 3. only then: the apps stop, a safety backup of the stack as it is is written, the objects
    are uploaded, and the scratch databases take the live ones' names in one transaction;
 4. objects the archive does not hold are deleted, the admin password is reset from .env,
    the stack starts; once it is healthy the previous databases are dropped.

A failure in 1-3 changes nothing (the apps start again). Run through scripts/restore.sh;
the host's python3 and its standard library are all it needs besides docker compose.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tracking import backup_manifest
from tracking.backup_manifest import AUTH_TABLES, TRACKING_TABLES, Refused
from tracking.compose_stack import AUTH_DB, ROOT, STORES, Failed, Stack, env_value, last_line, say


class Member:
    """One file of the archive, streamed out of the gzip and hashed on the way."""

    def __init__(self, archive: Path, name: str) -> None:
        self.archive, self.name = archive, name

    def __enter__(self) -> Member:
        self.tar = tarfile.open(self.archive, "r|gz")
        for member in self.tar:
            if member.name == self.name:
                self.stream = self.tar.extractfile(member)
                return self
        raise Failed(f"{self.name} is missing from {self.archive}")

    def __exit__(self, *exc: object) -> None:
        self.tar.close()

    def pipe_into(self, process: subprocess.Popen) -> str:
        digest = hashlib.sha256()
        try:
            while chunk := self.stream.read(1 << 20):
                digest.update(chunk)
                process.stdin.write(chunk)
        except BrokenPipeError:
            pass  # the reader stopped early; its exit status says why
        finally:
            try:
                process.stdin.close()
            except BrokenPipeError:
                pass
        return digest.hexdigest()


def count_sql(tables: dict[str, str]) -> str:
    return "SELECT " + ", ".join(f"(SELECT count(*) FROM {table})" for table in tables.values())


class Restore:
    def __init__(self, stack: Stack, archive: Path, manifest: dict, backup_dir: Path) -> None:
        self.stack, self.archive, self.manifest, self.backup_dir = stack, archive, manifest, backup_dir
        stamp = datetime.now(UTC).strftime("%Y%m%dt%H%M%Sz")
        self.stamp = stamp
        # (dump, live name, scratch name, previous name); names stay under Postgres' 63 bytes.
        self.databases = [(dump, live, f"{live}_restoring"[:63], f"{live}_before_{stamp}"[:63])
                          for dump, live in (("tracking.dump", stack.db), ("auth.dump", AUTH_DB))]
        self.safety: Path | None = None

    # --- checks that change nothing ------------------------------------------------------
    def check_versions(self) -> None:
        image = json.loads(self.stack.one_shot("mlflow", "-m", "tracking.schema_info"))
        postgres = self.stack.psql("SHOW server_version")
        say(f"  made with {backup_manifest.versions_line(self.manifest)}")
        say(f"  this stack: MLflow {image['mlflow']} (tracking schema {image['tracking_schema']['head']}, "
            f"auth schema {image['auth_schema']['head']}), PostgreSQL {postgres}")
        versions = self.manifest["versions"]
        for schema in ("tracking_schema", "auth_schema"):
            if versions[schema] and versions[schema] not in image[schema]["known"]:
                raise Refused(f"its {schema.replace('_', ' ')} {versions[schema]} comes from a newer MLflow "
                              f"({versions['mlflow']}) than this stack's {image['mlflow']}; upgrade this stack first")

    def check_app_role(self) -> None:
        role = self.stack.app_role
        superuser = self.stack.psql("SELECT rolsuper FROM pg_roles WHERE rolname = :'role'", role=role)
        if not superuser:
            raise Refused(f"the Postgres role {role} (MLFLOW_DB_USER) does not exist yet; 'make up' creates it")
        if superuser == "t":
            raise Refused(f"the Postgres role {role} (MLFLOW_DB_USER) is a superuser; the dumps are loaded as a "
                          "role without superuser rights")

    # --- step 2: load into scratch databases ---------------------------------------------
    def drop_scratch(self) -> None:
        for _, _, scratch, _ in self.databases:
            self.stack.psql("DROP DATABASE IF EXISTS :\"name\" WITH (FORCE)", name=scratch)

    def load(self) -> None:
        self.drop_scratch()  # left over by an interrupted restore
        for dump, _, scratch, _ in self.databases:
            say(f"Loading {dump} into a new database {scratch}, as {self.stack.app_role}...")
            self.stack.psql("CREATE DATABASE :\"name\" OWNER :\"role\" TEMPLATE template0",
                            name=scratch, role=self.stack.app_role)
            with tempfile.TemporaryFile() as errors, Member(self.archive, dump) as member:
                # --no-owner: every object belongs to the role that loads it, whoever owned it before.
                process = subprocess.Popen(
                    self.stack.command("exec", "-T", "postgres", "pg_restore", "--exit-on-error", "--no-owner",
                                       "--no-privileges", "-U", self.stack.app_role, "-d", scratch),
                    cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
                sha256 = member.pipe_into(process)
                if process.wait() != 0:
                    errors.seek(0)
                    raise Failed(f"{dump} does not load: {last_line(errors.read().decode(errors='replace'))}")
            if sha256 != self.manifest["files"][dump]["sha256"]:
                raise Failed(f"{dump} changed on disk since it was checked")
        self.check_counts()

    def check_counts(self) -> None:
        (_, _, tracking, _), (_, _, auth, _) = self.databases
        counts = self.stack.psql(count_sql(TRACKING_TABLES), db=tracking).split("|")
        restored = dict(zip(TRACKING_TABLES, map(int, counts)))
        restored.update(zip(AUTH_TABLES, map(int, self.stack.psql(count_sql(AUTH_TABLES), db=auth).split("|"))))
        expected = {name: self.manifest["counts"][name] for name in restored}
        if restored != expected:
            differing = ", ".join(f"{name} {restored[name]} (backup: {expected[name]})"
                                  for name in restored if restored[name] != expected[name])
            raise Failed(f"the loaded databases do not hold what the backup counted: {differing}")
        say("  both databases loaded; their row counts match the manifest")

    # --- step 3: the swap ----------------------------------------------------------------
    def safety_backup(self) -> None:
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        self.safety = self.backup_dir / f"{self.stack.project}-{self.stamp.upper()}-before-restore.tar.gz"
        say(f"Backing up the stack as it is first, to {self.safety}...")
        result = subprocess.run([str(ROOT / "scripts/backup.sh"), str(self.safety)], cwd=ROOT,
                                env=dict(os.environ, ENV_FILE=str(self.stack.env_file)),
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise Failed(f"the safety backup failed: {last_line(result.stderr)}")
        say(f"  safety backup: {self.safety}")

    def upload(self) -> None:
        say("Uploading the artifacts...")
        with Member(self.archive, "bucket.tar") as member:
            sha256 = self.stack.one_shot_fed("s3-init", "-m", "tracking.bucket_archive", "upload", member=member)
        if sha256 != self.manifest["files"]["bucket.tar"]["sha256"]:
            raise Failed("bucket.tar changed on disk since it was checked")

    def swap(self) -> None:
        """The scratch databases take the live names in one transaction: both or neither."""
        say("Swapping the databases...")
        names = {}
        sql = ["SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
               "WHERE datname IN (:'live0', :'live1') AND pid <> pg_backend_pid();",
               "BEGIN;"]
        for i, (_, live, scratch, previous) in enumerate(self.databases):
            names.update({f"live{i}": live, f"scratch{i}": scratch, f"previous{i}": previous})
            exists = self.stack.psql("SELECT 1 FROM pg_database WHERE datname = :'name'", name=live)
            if exists:
                sql.append(f"ALTER DATABASE :\"live{i}\" RENAME TO :\"previous{i}\";")
            sql.append(f"ALTER DATABASE :\"scratch{i}\" RENAME TO :\"live{i}\";")
        sql.append("COMMIT;")
        self.stack.psql("\n".join(sql), db="postgres", **names)

    def drop_previous(self) -> None:
        for _, _, _, previous in self.databases:
            self.stack.psql("DROP DATABASE IF EXISTS :\"name\" WITH (FORCE)", name=previous)

    def admins(self) -> list[str]:
        return self.stack.psql("SELECT username FROM users WHERE is_admin ORDER BY username", db=AUTH_DB).split()

    def run(self) -> None:
        stack = self.stack
        started = time.monotonic()
        try:
            self.load()
        except Failed as error:
            self.drop_scratch()
            raise Failed(f"{error}. Nothing was changed; the stack keeps running") from None

        apps = stack.apps()
        try:
            say(f"Stopping {' '.join(apps)}...")
            stack.compose("stop", *apps, capture=False)
            self.safety_backup()
            self.upload()
            self.swap()
        except Failed as error:
            say("Starting the stack again, unchanged...")
            self.drop_scratch()
            try:
                stack.up()
            except Failed as again:
                raise Failed(f"{error}. The databases were not changed, but the stack did not start again "
                             f"({again}): 'make up'") from None
            raise Failed(f"{error}. The databases were not changed and the stack is running again; objects "
                         "uploaded so far stay in the bucket") from None

        kept = " and ".join(previous for *_, previous in self.databases)
        undo = (f"The previous databases are kept as {kept}, and {self.safety} holds the stack as it was: "
                f"'make restore FILE={self.safety}' puts it back. Drop them when they are no longer needed: "
                f"docker compose exec postgres sh -c 'dropdb -U \"$POSTGRES_USER\" NAME'")
        try:
            say("Removing objects the archive does not hold...")
            stack.one_shot("s3-init", "-m", "tracking.bucket_archive", "prune",
                           input=json.dumps({"objects": self.manifest["objects"]}))
            # The backup's admin password hash came with the auth database; this stack's .env
            # wins. In a one-off container of the tracking server: its code needs a writable /tmp.
            stack.one_shot("mlflow", "-m", "tracking.reset_admin")
            say("Starting the stack...")
            stack.up()
        except Failed as error:
            stack.compose("ps", "-a", capture=False, check=False)
            raise Failed(f"{error}. The restored databases are in place, but the stack is not healthy. "
                         f"{undo}") from None

        # Healthy on the restored data: the safety backup now is the way back, not the old databases.
        self.drop_previous()
        say(f"Restored the stack '{self.manifest['project']}' as of {self.manifest['created']} into "
            f"'{stack.project}' in {time.monotonic() - started:.0f} s. The replaced databases were dropped; "
            f"{self.safety} holds the stack as it was.")
        say(f"Admins of the restored stack (is_admin in {AUTH_DB}): {', '.join(self.admins()) or 'none'}")


def refuse(archive: Path, why: str) -> None:
    sys.exit(f"Refusing {archive}: {why}. Nothing was changed.")


def main() -> None:
    args = sys.argv[1:]
    verify_only = bool(args) and args[0] == "--verify"
    args = args[1:] if verify_only else args
    if len(args) != 1:
        sys.exit("usage: scripts/restore.sh [--verify] FILE")
    archive = Path(args[0]).absolute()
    env_file = Path(os.environ.get("ENV_FILE") or ROOT / ".env").absolute()
    if not archive.is_file():
        sys.exit(f"No such file: {archive}")
    key = env_value(env_file, "BACKUP_KEY")
    if not key:
        sys.exit(f"BACKUP_KEY is not set in {env_file}: the archive is checked with the key of the stack that "
                 "made it ('make env' writes one for a new stack; a new machine needs the old stack's value)")
    try:
        manifest = backup_manifest.verify(archive, key)
    except Refused as error:
        refuse(archive, str(error))
    intact = (f"the stack '{manifest['project']}' as of {manifest['created']}\n"
              f"  {backup_manifest.counts_line(manifest)}")
    if verify_only:
        say(f"{archive} is intact and authenticated by BACKUP_KEY: {intact}")
        say(f"  made with {backup_manifest.versions_line(manifest)}")
        return

    if not env_file.is_file():
        sys.exit(f"No {env_file}: run 'make env' (or 'make up') first.")
    stack = Stack(env_file)
    backup_dir = Path(os.environ.get("BACKUP_DIR") or ROOT / "backups").absolute()
    restore = Restore(stack, archive, manifest, backup_dir)
    say(f"The archive is intact and authenticated: {intact}")
    try:
        stack.up(*STORES, timeout=300)
        restore.check_versions()
        restore.check_app_role()
    except Refused as error:
        refuse(archive, str(error))
    except Failed as error:
        sys.exit(f"{error}. Nothing was changed.")
    say(f"Restoring it REPLACES ALL data of the stack '{stack.project}': runs, models, artifacts, users.")
    if os.environ.get("CONFIRM") != "yes":
        if not sys.stdin.isatty():
            sys.exit("Refusing without a terminal; run with CONFIRM=yes.")
        if input("Type the project name to confirm: ") != stack.project:
            say("Not confirmed; nothing changed.")
            sys.exit(1)
    try:
        restore.run()
    except Failed as error:
        sys.exit(f"{error}.")


if __name__ == "__main__":
    main()

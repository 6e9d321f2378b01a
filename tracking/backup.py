"""Writes one archive of a running stack's data: both Postgres databases (pg_dump) and every
object of the artifact bucket, with a manifest of counts, versions and sha256 checksums,
authenticated with BACKUP_KEY (HMAC-SHA256). Secrets stay out of it: restoring needs only
the target stack's own .env, with the same BACKUP_KEY.

    scripts/backup.sh [FILE]   -> FILE, or BACKUP_DIR (default backups/)/<project>-<UTC time>.tar.gz

Which stack: ENV_FILE (default .env), where compose's own variables (COMPOSE_PROJECT_NAME,
COMPOSE_FILE) win, as they do for docker compose. Standard library only: it runs on the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from tracking import backup_manifest
from tracking.backup_manifest import FILES, MAC, MANIFEST
from tracking.compose_stack import AUTH_DB, ROOT, STORES, Failed, Stack, env_value, last_line, say

# Local socket connections need no password, in the official image and in the stand-in.
DUMP = 'pg_dump --format=custom --compress=0 -U "$POSTGRES_USER" -d "$1"'
QUERY = 'psql -X -At -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$1" -c "$2"'


class Backup:
    def __init__(self, stack: Stack, work: Path) -> None:
        self.stack, self.work = stack, work
        self.archive_dir = work / "archive"
        self.archive_dir.mkdir()

    def to_file(self, name: str, *compose_args: str, stdin: Path | None = None) -> Path:
        """The stdout of a compose command, streamed into WORK/NAME."""
        path = self.work / name
        with open(path, "wb") as out, tempfile.TemporaryFile() as errors, \
                open(stdin or os.devnull, "rb") as feed:
            result = subprocess.run(self.stack.command(*compose_args), cwd=ROOT, stdin=feed, stdout=out,
                                    stderr=errors)
            if result.returncode != 0:
                errors.seek(0)
                raise Failed(f"{name}: {last_line(errors.read().decode(errors='replace'))}")
        return path

    def dump(self, database: str, name: str) -> None:
        # Uncompressed: the archive is gzipped as a whole, and stays searchable once unzipped.
        self.to_file(f"archive/{name}", "exec", "-T", "postgres", "sh", "-c", DUMP, "sh", database)

    def row_counts(self, dump: str) -> dict[str, int]:
        """Rows per table, counted in the dump itself, not in the live database."""
        counts: dict[str, int] = {}
        with open(self.archive_dir / dump, "rb") as feed, tempfile.TemporaryFile() as errors:
            # pg_restore turns the dump back into SQL: each table's rows follow its COPY line,
            # one per line (newlines inside values are escaped), up to a line holding "\.".
            process = subprocess.Popen(
                self.stack.command("exec", "-T", "postgres", "pg_restore", "--data-only", "--file=-"),
                cwd=ROOT, stdin=feed, stdout=subprocess.PIPE, stderr=errors)
            table = None
            for line in process.stdout:
                if table is None:
                    if line.startswith(b"COPY "):
                        table = line.split()[1].decode()
                        counts[table] = 0
                elif line == b"\\.\n":
                    table = None
                else:
                    counts[table] += 1
            if process.wait() != 0:
                errors.seek(0)
                raise Failed(f"counting the rows of {dump}: {last_line(errors.read().decode(errors='replace'))}")
        return counts

    def query(self, database: str, sql: str) -> str:
        result = self.stack.compose("exec", "-T", "postgres", "sh", "-c", QUERY, "sh", database, sql, check=False)
        if result.returncode != 0:
            raise Failed(f"PostgreSQL: {last_line(result.stderr)}")
        return result.stdout.strip()

    def write(self, project: str, created: str, key: str) -> Path:
        # Databases first, then objects: every artifact a dumped row can point at is in S3 by then.
        say(f"Backing up the stack '{project}': databases...")
        self.dump(self.stack.db, "tracking.dump")
        self.dump(AUTH_DB, "auth.dump")
        rows = {**self.row_counts("tracking.dump"), **self.row_counts("auth.dump")}
        (self.work / "rows").write_text("".join(f"{table} {n}\n" for table, n in rows.items()))
        say("...artifacts...")
        self.to_file("archive/bucket.tar", "run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "s3-init",
                     "-m", "tracking.bucket_archive", "export")
        # What wrote the data, so that a restore can tell whether its image can read it.
        (self.work / "postgres_version").write_text(self.query(self.stack.db, "SHOW server_version"))
        (self.work / "tracking_schema").write_text(
            self.query(self.stack.db, "SELECT version_num FROM alembic_version"))
        (self.work / "auth_schema").write_text(self.query(AUTH_DB, "SELECT version_num FROM alembic_version_auth"))
        # In a one-off container of the tracking server: importing its code needs a writable /tmp.
        (self.work / "image.json").write_text(self.stack.one_shot("mlflow", "-m", "tracking.schema_info"))
        backup_manifest.write(self.work, project, created, key)

        packed = self.work / "archive.tar.gz"
        with tarfile.open(packed, "w:gz") as tar:
            for name in (MANIFEST, MAC, *FILES):
                tar.add(self.archive_dir / name, arcname=name)
        return packed


def fail(message: str, status: int) -> None:
    print(message, file=sys.stderr)
    sys.exit(status)


def main() -> None:
    args = sys.argv[1:]
    if len(args) > 1 or (args and args[0].startswith("-")):
        fail("usage: scripts/backup.sh [FILE]", 2)
    env_file = Path(os.environ.get("ENV_FILE") or ROOT / ".env").absolute()
    backup_dir = Path(os.environ.get("BACKUP_DIR") or ROOT / "backups").absolute()
    archive = Path(args[0]).absolute() if args else None
    if archive is not None:
        backup_dir = archive.parent
    if not env_file.is_file():
        fail(f"No {env_file}: run 'make up' first.", 2)
    key = env_value(env_file, "BACKUP_KEY")
    if not key:
        fail(f"BACKUP_KEY is not set in {env_file}: run 'make env' to add it.", 2)
    stack = Stack(env_file)
    try:
        running = stack.running()
    except Failed as error:
        sys.exit(f"{error}.")
    for service in STORES:
        if service not in running:
            sys.exit(f"The stack '{stack.project}' is not running ({service} is down): 'make up' first; "
                     "a backup reads from it.")

    # The archive holds password hashes and everything the team logged: readable by its owner only.
    os.umask(0o077)
    backup_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    created, stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ"), now.strftime("%Y%m%dT%H%M%SZ")
    archive = archive or backup_dir / f"{stack.project}-{stamp}.tar.gz"
    work = Path(tempfile.mkdtemp(prefix=".backup-", dir=backup_dir))
    try:
        packed = Backup(stack, work).write(stack.project, created, key)
        # The same check restore makes before it touches anything.
        manifest = backup_manifest.verify(packed, key)
        # Written under a temporary name, so an archive with the final name is always complete.
        packed.replace(archive)
    except (Failed, backup_manifest.Refused) as error:
        sys.exit(f"Backup failed: {error}. Nothing was written to {archive}.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"Wrote {archive} ({archive.stat().st_size / 1e6:.1f} MB)")
    say(f"  {backup_manifest.counts_line(manifest)}")
    say(f"  made with {backup_manifest.versions_line(manifest)}")


if __name__ == "__main__":
    main()

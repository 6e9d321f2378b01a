"""The stack as the host's backup and restore see it: `docker compose` with the stack's env
file, SQL over the Postgres container's local socket, and one-shot containers of the mlflow
image (S3 is on the internal network only). Standard library only: it runs on the host."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parents[1]
AUTH_DB = "mlflow_auth"
STORES = ("postgres", "minio")


class Feed(Protocol):
    def pipe_into(self, process: subprocess.Popen) -> str: ...


def described(command: tuple[str, ...]) -> str:
    """`-m tracking.bucket_archive upload` as `bucket_archive upload`, for error lines."""
    module, *args = command[1:] if command[0] == "-m" else command
    return " ".join([module.rsplit(".", 1)[-1], *args])


class Failed(Exception):
    """A step failed; the message says what happened and in what state the stack is."""


def say(message: str) -> None:
    print(message, flush=True)


def env_value(env_file: Path, name: str, default: str = "") -> str:
    """The environment first, then the env file's last line for NAME, as compose reads them."""
    if os.environ.get(name):
        return os.environ[name]
    if env_file.is_file():
        for line in reversed(env_file.read_text().splitlines()):
            if line.startswith(f"{name}="):
                return line.split("=", 1)[1] or default
    return default


class Stack:
    def __init__(self, env_file: Path) -> None:
        self.env_file = env_file
        self.project = env_value(env_file, "COMPOSE_PROJECT_NAME", "mlops")
        self.db = env_value(env_file, "POSTGRES_DB", "mlflow")
        self.app_role = env_value(env_file, "MLFLOW_DB_USER", "mlflow_app")

    def command(self, *args: str) -> list[str]:
        return ["docker", "compose", "--env-file", str(self.env_file), *args]

    def compose(self, *args: str, input: str | None = None, check: bool = True,
                capture: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(*args), cwd=ROOT, input=input, text=True, capture_output=capture,
                                stdin=None if input is not None or capture else subprocess.DEVNULL)
        if check and result.returncode != 0:
            why = last_line(result.stderr) if capture else "its output is above"
            raise Failed(f"`docker compose {' '.join(args[:2])}` failed: {why}")
        return result

    def psql(self, sql: str, db: str = "postgres", **variables: str) -> str:
        """SQL as the superuser over the container's local socket, which needs no password."""
        flags = " ".join(f"-v {name}=\"${i + 2}\"" for i, name in enumerate(variables))
        script = f'psql -X -q -At -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$1" {flags}'
        result = self.compose("exec", "-T", "postgres", "sh", "-c", script, "sh", db, *variables.values(),
                              input=sql, check=False)
        if result.returncode != 0:
            raise Failed(f"PostgreSQL: {last_line(result.stderr)}")
        return result.stdout.strip()

    def one_shot(self, service: str, *command: str, input: str | None = None) -> str:
        """A script of the mlflow image in a container of its own: S3 is on the internal network only."""
        result = self.compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "python", service, *command,
                              input=input or "", check=False)
        if result.returncode != 0:
            raise Failed(f"{described(command)}: {last_line(result.stderr)}")
        return result.stdout

    def one_shot_fed(self, service: str, *command: str, member: Feed) -> str:
        """one_shot with an archive member streamed into it."""
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(self.command("run", "--rm", "--no-deps", "-T", "--entrypoint", "python",
                                                    service, *command),
                                       cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
            sha256 = member.pipe_into(process)
            if process.wait() != 0:
                errors.seek(0)
                raise Failed(f"{described(command)}: {last_line(errors.read().decode(errors='replace'))}")
        return sha256

    def apps(self) -> list[str]:
        return [s for s in self.compose("config", "--services").stdout.split() if s not in STORES]

    def up(self, *services: str, timeout: int = 600) -> None:
        self.compose("up", "-d", "--wait", "--wait-timeout", str(timeout), *services, capture=False)

    def running(self) -> set[str]:
        return set(self.compose("ps", "--status", "running", "--services").stdout.split())


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"

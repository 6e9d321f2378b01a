"""The stack under test: a private compose project on free loopback ports.

Everything here does what a user does (compose up/run/down, HTTP calls, the MLflow client)
and polls with deadlines instead of sleeping.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import requests
from mlflow import MlflowClient
from python_on_whales import DockerClient

ROOT = Path(__file__).resolve().parents[2]
# Like every client outside the stack, the tests must not follow the server's presigned S3
# URLs: S3 is reachable only inside the stack's internal network.
os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] = "false"
os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] = "false"
T = TypeVar("T")
# Generated FashionMNIST-format data: small enough for CI, large enough to learn from.
TRAIN_IMAGES, TEST_IMAGES = 600, 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def registry_reachable(image: str) -> bool:
    """True when compose could pull upstream images; OFFLINE=1/0 overrides the probe."""
    if os.environ.get("OFFLINE") in ("0", "1"):
        return os.environ["OFFLINE"] == "0"
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0:
        return True
    try:
        return subprocess.run(["docker", "pull", "-q", image], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def poll(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.5) -> T:
    """Call check() until it returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - remembered for the failure message
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last error: {last_error}")


def read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def write_env(path: Path, offline: bool, overrides: dict[str, str]) -> dict[str, str]:
    """A fresh .env made by the same script users run, then pointed at free ports."""
    env = {k: v for k, v in os.environ.items() if k != "OFFLINE"}
    env["OFFLINE"] = "1" if offline else "0"
    subprocess.run([str(ROOT / "scripts/env.sh"), str(path)], check=True, env=env, capture_output=True)
    text = path.read_text()
    for key, value in overrides.items():
        lines = [line for line in text.splitlines() if not line.startswith(f"{key}=")]
        lines.append(f"{key}={value}")
        text = "\n".join(lines) + "\n"
    path.write_text(text)
    return read_env(path)


@dataclass
class Stack:
    project: str
    env_file: Path
    offline: bool
    env: dict[str, str] = field(default_factory=dict)
    # Overrides after the base files, e.g. single sign-on (compose.oidc.yaml).
    extra_files: tuple[Path, ...] = ()

    @property
    def compose_files(self) -> list[Path]:
        files = [ROOT / "compose.yaml"]
        if self.offline:
            files.append(ROOT / "compose.offline.yaml")
        return files + list(self.extra_files)

    @property
    def docker(self) -> DockerClient:
        return DockerClient(compose_files=self.compose_files, compose_env_file=self.env_file,
                            compose_project_name=self.project)

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.env['MLFLOW_PORT']}"

    @property
    def serving_url(self) -> str:
        return f"http://127.0.0.1:{self.env['SERVING_PORT']}"

    def credentials(self, who: str) -> tuple[str, str]:
        prefix = {"admin": "MLFLOW_ADMIN", "trainer": "TRAINER", "serving": "SERVING"}[who]
        return self.env[f"{prefix}_USERNAME"], self.env[f"{prefix}_PASSWORD"]

    def rotate_secret(self, name: str) -> str:
        """A new value for one secret in the stack's .env, as a person edits it; returns it."""
        value = secrets.token_urlsafe(24)
        lines = [line for line in self.env_file.read_text().splitlines() if not line.startswith(f"{name}=")]
        self.env_file.write_text("\n".join(lines + [f"{name}={value}"]) + "\n")
        self.env[name] = value
        return value

    def compose_command(self, *args: str) -> list[str]:
        """The docker compose CLI, as a user would type it, for this project."""
        cmd = ["docker", "compose", "--project-name", self.project, "--env-file", str(self.env_file)]
        for f in self.compose_files:
            cmd += ["-f", str(f)]
        return cmd + list(args)

    def compose(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        result = subprocess.run(self.compose_command(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and result.returncode != 0:
            raise AssertionError(f"`docker compose {' '.join(args)}` exited {result.returncode}\n"
                                 f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}")
        return result

    def train(self, *args: str) -> dict[str, str]:
        """Runs the trainer and returns its closing lines (run, version, promoted)."""
        out = self.compose("run", "--rm", "-T", "trainer", *args).stdout
        summary = {}
        for line in out.splitlines():
            key, sep, value = line.partition(": ")
            if sep and key in ("run", "version", "promoted"):
                summary[key] = value.strip()
        assert {"run", "version", "promoted"} <= summary.keys(), f"trainer output lacks its summary:\n{out[-3000:]}"
        return summary

    def sample(self, count: int, offset: int = 0) -> dict:
        out = self.compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "trainer",
                           "-m", "trainer.sample", "--count", str(count), "--offset", str(offset)).stdout
        import json
        return json.loads(out)

    def serving_status(self) -> dict:
        response = requests.get(f"{self.serving_url}/status", timeout=5)
        response.raise_for_status()
        return response.json()

    def wait_served_version(self, version: str, timeout: float = 120) -> dict:
        return poll(f"serving to serve version {version}",
                    lambda: (s := self.serving_status()) and str(s.get("version")) == str(version) and s,
                    timeout)


@contextlib.contextmanager
def signed_in_as(stack: Stack, who: str):
    """An MLflow client acting with one account's credentials (read from the environment)."""
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(zip(names, stack.credentials(who)))
    try:
        yield MlflowClient(stack.mlflow_url)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

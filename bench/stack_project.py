"""A private compose project of the stack for the benchmarks that need the real thing: its
own name, free loopback ports and an env file made by scripts/env.sh as `make env` makes
.env, from images already built (never pulled or built here)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

from bench import common
from bench.common import ROOT

# The env file users get from `make env`, made the way the integration tests make theirs.
from tests.integration.stack import write_env


def image_exists(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


class MissingImages(Exception):
    pass


def private_env(env_file: Path, project: str) -> tuple[dict, bool, list[str]]:
    """A .env for a private compose project on free loopback ports, whether it runs the
    offline stand-ins, and the images it runs. Benchmarks never pull or build: without the upstream Postgres image
    the stand-ins are used, and a missing image raises MissingImages naming it."""
    forced = os.environ.get("OFFLINE")
    offline = forced == "1" if forced in ("0", "1") else not image_exists("postgres:17-bookworm")
    env = write_env(env_file, offline, {"COMPOSE_PROJECT_NAME": project, "MLFLOW_PORT": str(common.free_port()),
                                        "SERVING_PORT": str(common.free_port())})
    prefix, tag = env.get("IMAGE_PREFIX", "mlops"), env.get("IMAGE_TAG", "dev")
    images = [f"{prefix}/{s}:{tag}" for s in ("mlflow", "serving", "trainer")]
    images += ([env["OFFLINE_POSTGRES_IMAGE"], env["OFFLINE_S3_IMAGE"]] if offline
               else [env["POSTGRES_IMAGE"], env["S3_IMAGE"]])
    missing = [i for i in images if not image_exists(i)]
    if missing:
        raise MissingImages(f"image(s) missing: {', '.join(missing)}; run make build first")
    return env, offline, images


class Project:
    def __init__(self, name: str, env_file: Path, offline: bool):
        self.name, self.env_file, self.offline = name, env_file, offline

    def command(self, *args) -> list[str]:
        cmd = ["docker", "compose", "--project-name", self.name, "--env-file", str(self.env_file),
               "-f", str(ROOT / "compose.yaml")]
        if self.offline:
            cmd += ["-f", str(ROOT / "compose.offline.yaml")]
        return cmd + list(args)

    def run(self, *args, check=True, timeout=900) -> tuple[subprocess.CompletedProcess, float]:
        started = time.perf_counter()
        result = subprocess.run(self.command(*args), capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        seconds = time.perf_counter() - started
        if check and result.returncode != 0:
            raise RuntimeError(f"`docker compose {' '.join(args)}` exited {result.returncode}:\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result, seconds

    def container_ids(self) -> list[str]:
        out = subprocess.run(["docker", "ps", "-aq", "--no-trunc", "--filter",
                              f"label=com.docker.compose.project={self.name}"], capture_output=True, text=True)
        return out.stdout.split()


def ready_after(project: Project, port: int, began: float, timeout: float = 300) -> float:
    """Seconds from `began` (epoch) until mlflow-init has exited 0 (the trainer's and
    serving's accounts exist) and serving answers /status: `up -d --wait` can return while
    the one-shot still provisions."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project.name}",
                              "--filter", "label=com.docker.compose.service=mlflow-init"],
                             capture_output=True, text=True).stdout.split()
        state = subprocess.run(["docker", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", *ids],
                               capture_output=True, text=True).stdout.split() if ids else []
        if state[:2] == ["exited", "0"]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
                    if response.status == 200:
                        return round(time.time() - began, 2)
            except OSError:
                pass
        elif state[:1] == ["exited"]:
            raise RuntimeError(f"mlflow-init exited {state[1]}; see `docker compose logs mlflow-init`")
        time.sleep(0.1)
    raise RuntimeError(f"the stack was not ready {timeout:.0f} s after `up` began")

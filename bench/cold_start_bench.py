"""Benchmark: how long the stack takes to come up, and a trained model to reach clients.

    python bench/cold_start_bench.py [--rounds 2]

A private compose project (its own name, free loopback ports, a throwaway env file made
by scripts/env.sh as `make env` makes .env) from the images already built; nothing is
built or pulled (`--no-build --pull never`): without the images it stops and says to run
`make build`. Each round measures, fresh and restarted taking turns:

  fresh      `docker compose up -d --wait` on new volumes (what `make up` runs), timed
             until the stack is ready as a user needs it: mlflow-init has exited 0 (the
             accounts exist, so a training run can start) and serving answers /status
  restart    `docker compose down` (volumes kept), then the same, and the time from there
             until /invocations answers with the served version (serving is healthy
             while it still downloads and loads the model)

and, in the first round, twice: generated data, `docker compose run trainer --epochs 1
--promotion-policy always`, and the time from the trainer container's exit (the engine's
`die` event) to the first /invocations answer from the version it registered (polled every
0.1 s), first with no model served yet, then replacing the served one. Serving follows the
alias with the stack's default ALIAS_POLL_SECONDS. The project is removed with its volumes
at the end. Results: bench/results/cold_start.json and .md.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench import common
from bench.common import fmt, log
from bench.stack_project import MissingImages, Project, private_env, ready_after

TARGET_READY_S = 20.0
TRAIN_IMAGES, TEST_IMAGES = 300, 100
ONE_IMAGE = json.dumps({"inputs": [[[[0.5] * 28] * 28]]}).encode()


def timeline(project: Project, since: float) -> dict:
    """For each container of the project: seconds from `since` (epoch) until it started,
    until its first passing health check, and until it exited (one-shot services), read
    from the engine's own records: where the time of an `up` went."""
    from datetime import datetime

    def at(text):
        if not text or text.startswith("0001-"):
            return None
        # The engine writes nanoseconds; Python reads microseconds.
        text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
        return round(datetime.fromisoformat(text).timestamp() - since, 2)

    out = {}
    for cid in project.container_ids():
        info = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True)
        try:
            c = json.loads(info.stdout)[0]
        except (ValueError, IndexError):
            continue
        name = c["Name"].lstrip("/").removeprefix(project.name + "-")
        state = c["State"]
        healthy = [at(h.get("End")) for h in (state.get("Health") or {}).get("Log", []) if h.get("ExitCode") == 0]
        out[name] = {"started_s": at(state.get("StartedAt")),
                     "first_healthy_s": min((h for h in healthy if h is not None), default=None),
                     "exited_s": None if state.get("Running") else at(state.get("FinishedAt"))}
    return dict(sorted(out.items(), key=lambda kv: kv[1]["started_s"] or 0))


class Window:
    """The machine's busy share and load average over one step, and roughly how much of it
    was other work: the machine's busy time less what this project's containers used
    (containers that start within the step count from zero)."""

    def __init__(self, project: Project):
        self.project = project

    def _usage(self) -> dict:
        return {c: common.container_cpu_seconds(c) or 0.0 for c in self.project.container_ids()}

    def __enter__(self):
        self.load_before = common.load_average()
        self._jiffies = common.machine_jiffies()
        self._usage0 = self._usage()
        return self

    def __exit__(self, *exc):
        busy1, total1 = common.machine_jiffies()
        busy0, total0 = self._jiffies
        span = max(total1 - total0, 1)
        usage1 = self._usage()
        ours = sum(v - self._usage0.get(c, 0.0) for c, v in usage1.items())
        self.busy_share = (busy1 - busy0) / span
        self.others_share = max(0.0, (busy1 - busy0) / common.CLOCK_TICKS - ours) / (span / common.CLOCK_TICKS)
        self.load_after = common.load_average()
        return False

    def as_dict(self) -> dict:
        return {"machine_busy_share": round(self.busy_share, 3), "others_cpu_share_approx": round(self.others_share, 3),
                "load_before": self.load_before, "load_after": self.load_after}


class Poller(threading.Thread):
    """POSTs one image to /invocations every 0.1 s and notes the time (epoch seconds),
    status and X-Model-Version of every answer."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/invocations"
        self.answers: list[tuple[float, int, str | None]] = []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            request = urllib.request.Request(self.url, data=ONE_IMAGE, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=5) as r:
                    self.answers.append((time.time(), r.status, r.headers.get("X-Model-Version")))
            except urllib.error.HTTPError as e:
                self.answers.append((time.time(), e.code, e.headers.get("X-Model-Version")))
            except OSError:
                self.answers.append((time.time(), 0, None))
            self.halt.wait(0.1)

    def first(self, version: str, after: float = 0.0) -> float | None:
        for t, status, v in list(self.answers):
            if t >= after and status == 200 and v == version:
                return t
        return None


def die_events(project: str, since: float, until: float) -> list[tuple[float, str]]:
    """(epoch seconds, container name) of every container of the project that exited."""
    out = subprocess.run(["docker", "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}",
                          "--filter", f"label=com.docker.compose.project={project}", "--filter", "event=die",
                          "--format", "{{json .}}"], capture_output=True, text=True, timeout=60)
    events = []
    for line in out.stdout.splitlines():
        e = json.loads(line)
        events.append((e["timeNano"] / 1e9, e.get("Actor", {}).get("Attributes", {}).get("name", "")))
    return events


def alias_moves(project: Project, env: dict) -> dict:
    """version -> epoch seconds at which the trainer recorded moving the alias to it (the
    alias history tag it writes right after the move; whole seconds)."""
    from datetime import datetime

    sql = ("SELECT value FROM registered_model_tags WHERE name = '{}' AND key = 'alias_history.{}'"
           .format(env.get("MODEL_NAME", "fashion-mnist-cnn"), env.get("MODEL_ALIAS", "production")))
    result, _ = project.run("exec", "-T", "postgres", "psql", "-U", env.get("POSTGRES_USER", "mlflow"),
                            "-d", env.get("POSTGRES_DB", "mlflow"), "-tAc", sql, check=False)
    moves = {}
    try:
        for entry in json.loads(result.stdout.strip() or "[]"):
            moves[str(entry["version"])] = datetime.fromisoformat(entry["at"]).timestamp()
    except (ValueError, KeyError, TypeError):
        pass
    return moves


def idle_cpu(project: Project, seconds: float) -> dict:
    """CPU each container of the running stack uses while nobody calls it: health checks
    and serving's alias polls only."""
    names = {}
    for cid in project.container_ids():
        out = subprocess.run(["docker", "inspect", "--format", "{{.Name}} {{.State.Running}}", cid],
                             capture_output=True, text=True)
        name, _, running = out.stdout.strip().partition(" ")
        if running == "true":
            names[cid] = name.lstrip("/").removeprefix(project.name + "-")
    before = {c: common.container_cpu_seconds(c) for c in names}
    time.sleep(seconds)
    after = {c: common.container_cpu_seconds(c) for c in names}
    return {names[c]: round((after[c] - before[c]) / seconds, 3)
            for c in names if before[c] is not None and after[c] is not None}


def train_and_follow(project: Project, port: int, poller: Poller, env: dict) -> dict:
    started = time.time()
    with Window(project) as window:
        result, seconds = project.run("run", "--rm", "-T", "trainer", "--epochs", "1", "--promotion-policy", "always")
    returned = time.time()
    version = re.search(r"^version: (\d+)$", result.stdout, re.MULTILINE)
    if not version:
        raise RuntimeError(f"the trainer registered no version:\n{result.stdout[-3000:]}")
    version = version.group(1)
    exits = [t for t, name in die_events(project.name, started, returned + 1) if "trainer" in name]
    exited = exits[-1] if exits else None
    deadline = time.monotonic() + 180
    while poller.first(version) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first = poller.first(version)
    moved = alias_moves(project, env).get(version)
    return {
        "version": version, "trainer_run_s": round(seconds, 2),
        "alias_move_to_first_prediction_s": round(first - moved, 1) if first and moved else None,
        "trainer_exit_to_first_prediction_s": round(first - exited, 2) if first and exited else None,
        "compose_run_returned_to_first_prediction_s": round(first - returned, 2) if first else None,
        "container_exit_to_compose_return_s": round(returned - exited, 2) if exited else None,
        **window.as_dict(),
    }


def services_table(f) -> list[str]:
    """Where the first fresh and the first restarted `up` spent their time, per service."""
    fresh, restart = f["fresh_services"], f["restart_services"]
    if not fresh:
        return []
    lines = ["Per service, seconds after `up` began (first round): started / first passing health check / "
             "exited (one-shot services). The engine keeps a container's last five checks only, so for a "
             "service that was healthy long before `up` returned the middle figure is a late bound.", "",
             "| service | fresh | restart |", "|---|---|---|"]

    def cell(d):
        if not d:
            return "n/a"
        return " / ".join(fmt(d.get(k), ".1f", "-") for k in ("started_s", "first_healthy_s", "exited_s"))

    for name in fresh:
        lines.append(f"| {name} | {cell(fresh.get(name))} | {cell(restart.get(name))} |")
    return lines + [""]


def markdown(report) -> str:
    f, s = report["figures"], report["settings"]
    met = report["targets_met"]
    lines = [
        *common.heading("Cold start benchmark", report),
        f"A private compose project ({'offline stand-ins, compose.offline.yaml' if s['offline'] else 'upstream images'}), "
        f"env file from `scripts/env.sh`, images already built: the times exclude `make build` (a no-op when "
        f"nothing changed; `docker compose up` is run with `--no-build --pull never`). {s['rounds']} rounds, fresh and "
        f"restarted taking turns.", "",
        "| step | wall time s (each round) | median s |", "|---|---:|---:|",
        f"| `up -d --wait`, fresh project (new volumes) | {', '.join(fmt(x, '.1f') for x in f['fresh_up_s'])} | "
        f"{fmt(f['fresh_up_median_s'], '.1f')} |",
        f"| `down` (volumes kept) | {', '.join(fmt(x, '.1f') for x in f['down_s'])} | {fmt(common.median(f['down_s']), '.1f')} |",
        f"| fresh: `up` to ready (mlflow-init done, serving answers) | "
        f"{', '.join(fmt(x, '.1f') for x in f['fresh_ready_s'])} | {fmt(f['fresh_ready_median_s'], '.1f')} |",
        f"| `up -d --wait`, restart of an existing project | {', '.join(fmt(x, '.1f') for x in f['restart_up_s'])} | "
        f"{fmt(f['restart_up_median_s'], '.1f')} |",
        f"| restart: `up` to ready | {', '.join(fmt(x, '.1f') for x in f['restart_ready_s'])} | "
        f"{fmt(f['restart_ready_median_s'], '.1f')} |",
        f"| restart: from `up` returning to the first prediction | "
        f"{', '.join(fmt(x, '.1f') for x in f['restart_to_prediction_s'])} | "
        f"{fmt(common.median([x for x in f['restart_to_prediction_s'] if x is not None]), '.1f')} |",
        "", *services_table(f), "| target | result | |", "|---|---:|---|",
        f"| fresh `up` to ready <= {TARGET_READY_S:g} s | median {fmt(f['fresh_ready_median_s'], '.1f')} s, max "
        f"{fmt(max(f['fresh_ready_s']), '.1f')} s | {'met' if met['fresh_ready'] else 'MISSED'} |",
        f"| restart `up` to ready <= {TARGET_READY_S:g} s | median {fmt(f['restart_ready_median_s'], '.1f')} s, "
        f"max {fmt(max(f['restart_ready_s']), '.1f')} s | {'met' if met['restart_ready'] else 'MISSED'} |",
        "", f"Trainer to clients (ALIAS_POLL_SECONDS={s['alias_poll_seconds']}, {TRAIN_IMAGES} + {TEST_IMAGES} "
        f"generated images, 1 epoch, `--promotion-policy always`):", "",
        "| run | version | trainer run s | trainer exit -> first prediction from it s | compose run returned -> it s "
        "| alias move -> it s (1 s resolution) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, t in zip(("no model served before", "replacing the served version"), f["training"]):
        lines.append(f"| {label} | {t['version']} | {fmt(t['trainer_run_s'], '.1f')} | "
                     f"{fmt(t['trainer_exit_to_first_prediction_s'], '.2f')} | "
                     f"{fmt(t['compose_run_returned_to_first_prediction_s'], '.2f')} | "
                     f"{fmt(t.get('alias_move_to_first_prediction_s'), '.0f')} |")
    lines += ["", "Serving notices the alias on its next poll (every ALIAS_POLL_SECONDS), then downloads, loads "
              "and checks the version; the trainer moves the alias before it ends its run and exits, so a "
              "negative time means serving answered with the new version before the trainer's container "
              "had exited.", ""]
    if f.get("idle_cpu_cores"):
        lines += ["CPU used by the idle stack right after the fresh start (cores, over 20 s; health checks and "
                  "serving's alias polls only): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(f["idle_cpu_cores"].items()))
                  + ".", ""]
    lines += [
              f"The machine: load average (1 min) {f['load_1min_range'][0]:.1f} to {f['load_1min_range'][1]:.1f} "
              f"during the steps; machine busy {f['median_busy_share']:.0%} (median), other work roughly "
              f"{f['median_others_share']:.0%} of all CPUs (median; max {f['max_others_share']:.0%}). {report['verdict']}", ""]
    return "\n".join(lines)


def main():
    parser = common.arguments(__doc__, rounds=2, rounds_help="fresh + restart rounds", quiet_patience=120)
    args = parser.parse_args()

    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        raise SystemExit("cold_start_bench: `docker compose` does not work here; see `make doctor`")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise SystemExit("cold_start_bench: no Docker engine answers; start one and retry")

    workdir = Path(tempfile.mkdtemp(prefix="cold-start-bench-"))
    name = f"bench-cold-{secrets.token_hex(3)}"
    env_file = workdir / ".env"
    try:
        env, offline, images = private_env(env_file, name)
    except MissingImages as error:
        shutil.rmtree(workdir, ignore_errors=True)
        raise SystemExit(f"cold_start_bench: {error}") from None

    info = common.machine(docker=True)
    project = Project(name, env_file, offline)
    port = int(env["SERVING_PORT"])
    common.exit_on_signals()  # so that the project is removed with its volumes
    steps = {"fresh_up": [], "down": [], "restart_up": [], "restart_to_prediction": [], "training": []}
    poller = None
    idle = {}
    try:
        for r in range(args.rounds):
            common.wait_until_quiet(args.quiet_threshold, args.quiet_patience)
            with Window(project) as w:
                began = time.time()
                _, seconds = project.run("up", "-d", "--wait", "--wait-timeout", "300", "--no-build", "--pull", "never")
                ready = ready_after(project, port, began)
            steps["fresh_up"].append({"seconds": round(seconds, 2), "ready_s": ready, **w.as_dict(),
                                      "services": timeline(project, began)})
            log(f"round {r + 1}: fresh up returned in {seconds:.1f} s, ready in {ready:.1f} s "
                f"(load {w.load_before[0]:.1f} -> {w.load_after[0]:.1f})")
            if r == 0:
                idle = idle_cpu(project, 20)
                log(f"idle stack CPU (cores): {idle}")
                project.run("run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "trainer", "-m",
                            "trainer.synthetic", "--data-dir", "/data", "--train", str(TRAIN_IMAGES),
                            "--test", str(TEST_IMAGES))
                poller = Poller(port)
                poller.start()
                for _ in range(2):
                    t = train_and_follow(project, port, poller, env)
                    steps["training"].append(t)
                    log(f"trainer registered v{t['version']} in {t['trainer_run_s']:.0f} s; first prediction from it "
                        f"{fmt(t['trainer_exit_to_first_prediction_s'], '.2f')} s after the trainer exited")
                poller.halt.set()
                poller.join()
            # Only the first round trains; later rounds restart a stack with no model in it.
            served = steps["training"][-1]["version"] if r == 0 and steps["training"] else None
            with Window(project) as w:
                _, seconds = project.run("--profile", "train", "down")
            steps["down"].append({"seconds": round(seconds, 2), **w.as_dict()})
            common.wait_until_quiet(args.quiet_threshold, args.quiet_patience)
            with Window(project) as w:
                began = time.time()
                _, seconds = project.run("up", "-d", "--wait", "--wait-timeout", "300", "--no-build", "--pull", "never")
                returned = time.monotonic()
                ready = ready_after(project, port, began)
                services = timeline(project, began)
                to_prediction = None
                if served:
                    deadline = returned + 180
                    while time.monotonic() < deadline:
                        try:
                            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=ONE_IMAGE,
                                                             headers={"Content-Type": "application/json"})
                            with urllib.request.urlopen(request, timeout=5) as resp:
                                if resp.headers.get("X-Model-Version") == served:
                                    to_prediction = time.monotonic() - returned
                                    break
                        except OSError:
                            pass
                        time.sleep(0.1)
            steps["restart_up"].append({"seconds": round(seconds, 2), "ready_s": ready, **w.as_dict(),
                                        "services": services})
            steps["restart_to_prediction"].append(round(to_prediction, 2) if to_prediction is not None else None)
            log(f"round {r + 1}: restart up returned in {seconds:.1f} s, ready in {ready:.1f} s, first prediction "
                f"{fmt(to_prediction, '.1f')} s later (load {w.load_before[0]:.1f} -> {w.load_after[0]:.1f})")
            project.run("--profile", "train", "down", "--volumes", "--remove-orphans")
    finally:
        if poller is not None:
            poller.halt.set()
        project.run("--profile", "train", "down", "--volumes", "--remove-orphans", check=False)
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"project {name} removed with its volumes")

    info["load_average_at_end"] = common.load_average()
    windows = steps["fresh_up"] + steps["restart_up"] + steps["down"] + steps["training"]
    loads = [x for wd in windows for x in (wd["load_before"][0], wd["load_after"][0])]
    others = [wd["others_cpu_share_approx"] for wd in windows]
    figures = {
        "fresh_up_s": [s["seconds"] for s in steps["fresh_up"]],
        "restart_up_s": [s["seconds"] for s in steps["restart_up"]],
        "fresh_ready_s": [s["ready_s"] for s in steps["fresh_up"]],
        "restart_ready_s": [s["ready_s"] for s in steps["restart_up"]],
        "down_s": [s["seconds"] for s in steps["down"]],
        "restart_to_prediction_s": steps["restart_to_prediction"],
        "training": steps["training"],
        "idle_cpu_cores": idle,
        "fresh_services": steps["fresh_up"][0].get("services", {}) if steps["fresh_up"] else {},
        "restart_services": steps["restart_up"][0].get("services", {}) if steps["restart_up"] else {},
        "load_1min_range": [min(loads), max(loads)],
        "median_busy_share": common.median([wd["machine_busy_share"] for wd in windows]),
        "median_others_share": common.median(others), "max_others_share": max(others),
    }
    figures["fresh_up_median_s"] = common.median(figures["fresh_up_s"])
    figures["restart_up_median_s"] = common.median(figures["restart_up_s"])
    figures["fresh_ready_median_s"] = common.median(figures["fresh_ready_s"])
    figures["restart_ready_median_s"] = common.median(figures["restart_ready_s"])
    checks = {"fresh_ready": max(figures["fresh_ready_s"]) <= TARGET_READY_S,
              "restart_ready": max(figures["restart_ready_s"]) <= TARGET_READY_S}
    verdict = ("The machine was reasonably quiet." if figures["median_others_share"] < 0.15 else
               "The machine was busy with other work: start-up is mostly CPU-bound (Python imports, schema "
               "creation, health checks), so these times are longer than on a quiet machine.")
    report = {"date": common.now_iso(), "machine": info, "targets": {"ready_s": TARGET_READY_S}, "targets_met": checks,
              "verdict": verdict,
              "settings": {"rounds": args.rounds, "offline": offline, "images": images,
                           "alias_poll_seconds": env.get("ALIAS_POLL_SECONDS"),
                           "up_command": "docker compose up -d --wait --wait-timeout 300 --no-build --pull never"},
              "figures": figures, "steps": steps}
    common.write_results("cold_start", report, markdown(report), args.out_dir)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

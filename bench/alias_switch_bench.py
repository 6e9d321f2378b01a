"""Benchmark: how long a move of `@production` takes to reach clients through the real stack,
and what fails meanwhile.

    python -m bench.alias_switch_bench [--switches 5] [--concurrency 10]

A private compose project of the stack (bench/stack_project.py: its own name, free loopback
ports, an env file made as `make env` makes .env, the images already built): the tracking
server with basic auth, Postgres, S3 behind the artifact proxy, and serving as compose
starts it. The trainer registers two versions on generated data. Then, once with
ALIAS_POLL_SECONDS=1 and once with the default 5 (serving recreated between them), while a
client keeps `--concurrency` connections busy with 1-image requests on serving's published
port, the admin moves `@production` to the other version `--switches` times through the
tracking server's API. For each move it measures:

  first new      from the start of the alias-move call to the first answer carrying the
                 new version in X-Model-Version (target <= 10 s)
  all workers    until every serving worker reports the new version on /status (asked
                 on fresh connections, so that each worker gets asked)
  failed         answers other than 200, and connection errors, over the whole episode
                 (target 0)

The project is removed with its volumes at the end. Results: bench/results/alias_switch.json
and .md.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import common
from bench.cold_start_bench import Window
from bench.common import fmt, log
from bench.stack_project import MissingImages, Project, private_env, ready_after

TARGETS = {"first_new_version_s": 10.0, "failed_requests": 0}
POLLS = (1.0, 5.0)


async def status_prober(port: int, new: str, seen: dict, stop: asyncio.Event) -> None:
    """Ask /status on a fresh connection every 50 ms; note when each worker first says it
    serves `new`. Fresh connections land on whichever worker accepts first, so all are asked."""
    request = common.http_request("GET", "/status", f"127.0.0.1:{port}")
    while not stop.is_set():
        conn = common.HttpConnection("127.0.0.1", port)
        try:
            status, _, body = await conn.request(request)
            if status == 200:
                document = json.loads(body)
                if str(document.get("version")) == new:
                    seen.setdefault(document["worker_pid"], time.perf_counter())
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            conn.close()
        await asyncio.sleep(0.05)


async def episode(port, workers, client, name, alias, old, new, poll, concurrency, requests):
    seen: dict = {}
    stop = asyncio.Event()
    cap = 30 + 4 * poll  # a switch that takes longer than this is a failure in itself
    load = asyncio.create_task(common.drive("127.0.0.1", port, requests, concurrency, cap + 10,
                                            timeout_s=30, tag_header=b"x-model-version", stop=stop))
    prober = asyncio.create_task(status_prober(port, new, seen, stop))
    # A random start, so that moves do not fall at the same point of the watchers' schedule.
    await asyncio.sleep(1.0 + random.random())
    t_call = time.perf_counter()
    await asyncio.to_thread(client.set_registered_model_alias, name, alias, new)
    t_moved = time.perf_counter()
    deadline = t_call + cap
    while len(seen) < workers and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # keep calling for a moment after the last worker switched
    stop.set()
    result = await load
    await prober

    firsts = [end for end, tag in zip(result.ends, result.tags) if tag == new]
    olds_after = [end for end, tag in zip(result.ends, result.tags) if tag == old and end > t_moved]
    all_switched = max(seen.values()) if len(seen) >= workers else None
    window_end = (all_switched or deadline) + 0.5
    during = [lat for end, lat, s in zip(result.ends, result.latencies, result.statuses)
              if t_call <= end <= window_end and s == 200]
    before = [lat for end, lat, s in zip(result.ends, result.latencies, result.statuses)
              if end < t_call and s == 200]
    summary = result.summary()
    return {
        "from_version": old, "to_version": new, "poll_seconds": poll,
        "move_call_ms": round((t_moved - t_call) * 1000, 1),
        "first_new_version_s": round(firsts[0] - t_call, 3) if firsts else None,
        "all_workers_switched_s": round(all_switched - t_call, 3) if all_switched else None,
        "last_old_version_answer_s": round(olds_after[-1] - t_call, 3) if olds_after else None,
        "requests": summary["requests"], "failed": summary["failed"], "failures": summary["failures"],
        "requests_per_sec": summary["requests_per_sec"],
        "p99_ms_before_move": common.latency_ms(before)["p99"],
        "p99_ms_during_switch": common.latency_ms(during)["p99"],
    }


def prepared_times(log_text: str) -> list[float]:
    return [float(x) for x in re.findall(r"prepared in ([\d.]+)s", log_text)]


def set_env(env_file: Path, name: str, value: str) -> None:
    lines = [line for line in env_file.read_text().splitlines() if not line.startswith(f"{name}=")]
    env_file.write_text("\n".join([*lines, f"{name}={value}"]) + "\n")


def wait_served(port: int, version: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
                if str(json.loads(response.read()).get("version")) == version:
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"serving did not serve version {version} within {timeout:.0f} s")


def markdown(report) -> str:
    f, s = report["figures"], report["settings"]
    met = report["targets_met"]
    lines = [
        *common.heading("Alias switch benchmark", report),
        f"The real stack ({'offline stand-ins' if s['offline'] else 'upstream images'}): the tracking server "
        f"with basic auth, Postgres, S3 behind the artifact proxy, serving as compose starts it "
        f"({s['workers']} workers); two versions registered by the trainer on generated data. A client keeps "
        f"{s['concurrency']} keep-alive connections busy with 1-image requests throughout. The admin moves "
        f"`@{s['alias']}` {s['switches']} times per setting through the tracking server's API. Times are from "
        f"the start of the alias-move call.", "",
        "| ALIAS_POLL_SECONDS | first answer from the new version: median / max s | all workers switched: "
        "median / max s | version prepared in (per worker) s | requests | failed |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for key, a in f["by_poll"].items():
        lines.append(
            f"| {key} | {fmt(a['first_new_median_s'], '.2f')} / {fmt(a['first_new_max_s'], '.2f')} | "
            f"{fmt(a['all_switched_median_s'], '.2f')} / {fmt(a['all_switched_max_s'], '.2f')} | "
            f"{fmt(a['prepared_median_s'], '.2f')} (max {fmt(a['prepared_max_s'], '.2f')}) | "
            f"{a['requests']:,} | {a['failed']} |")
    lines += ["", "| target | result | |", "|---|---:|---|"]
    for key, a in f["by_poll"].items():
        lines.append(f"| first answer from the new version <= {TARGETS['first_new_version_s']:g} s "
                     f"(poll {key} s, every switch) | max {fmt(a['first_new_max_s'], '.2f')} s | "
                     f"{'met' if met[f'first_new_poll_{key}'] else 'MISSED'} |")
        lines.append(f"| failed requests during switches = 0 (poll {key} s) | {a['failed']} | "
                     f"{'met' if met[f'failed_poll_{key}'] else 'MISSED'} |")
    lines += ["", f"p99 latency of the client's answers: {fmt(f['p99_ms_before_median'], '.1f')} ms before a move, "
              f"{fmt(f['p99_ms_during_median'], '.1f')} ms from the move until every worker had switched "
              f"(medians over switches). A version is prepared on each worker's watcher thread, beside the "
              f"requests; this is what that costs the requests in flight.", "",
              "Every switch:", "",
              "| # | poll s | versions | first new s | all switched s | last old answer s | requests | failed | "
              "others' CPU share | load 1 min |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for i, e in enumerate(report["episodes"], 1):
        lines.append(f"| {i} | {e['poll_seconds']:g} | {e['from_version']} -> {e['to_version']} | "
                     f"{fmt(e['first_new_version_s'], '.2f')} | {fmt(e['all_workers_switched_s'], '.2f')} | "
                     f"{fmt(e['last_old_version_answer_s'], '.2f')} | {e['requests']:,} | {e['failed']} | "
                     f"{e['others_cpu_share']:.0%} | {e['load_before'][0]:.1f} -> {e['load_after'][0]:.1f} |")
    lines += ["", f"The machine: other processes took a median {f['median_others_cpu_share']:.0%} "
              f"(max {f['max_others_cpu_share']:.0%}) of all CPUs during the switches. {report['verdict']}", ""]
    return "\n".join(lines)


def main():
    parser = common.arguments(__doc__, concurrency=10)
    parser.add_argument("--switches", type=int, default=5, help="alias moves per poll setting (default 5)")
    args = parser.parse_args()
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise SystemExit("alias_switch_bench: no Docker engine answers; start one and retry")

    info = common.machine(docker=True)
    workdir = Path(tempfile.mkdtemp(prefix="switch-bench-"))
    name = f"bench-switch-{secrets.token_hex(3)}"
    env_file = workdir / ".env"
    try:
        env, offline, images = private_env(env_file, name)
    except MissingImages as error:
        shutil.rmtree(workdir, ignore_errors=True)
        raise SystemExit(f"alias_switch_bench: {error}") from None
    project = Project(name, env_file, offline)
    port, model, alias = int(env["SERVING_PORT"]), env["MODEL_NAME"], env["MODEL_ALIAS"]
    workers = int(env.get("SERVING_WORKERS") or 2)
    common.exit_on_signals()  # so that the project is removed with its volumes
    episodes, logs = [], {}
    try:
        log(f"starting project {name}")
        began = time.time()
        project.run("up", "-d", "--wait", "--wait-timeout", "300", "--no-build", "--pull", "never")
        ready_after(project, port, began)
        project.run("run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "trainer", "-m", "trainer.synthetic",
                    "--data-dir", "/data", "--train", "300", "--test", "100")
        for policy in ("always", "never"):
            project.run("run", "--rm", "-T", "trainer", "--epochs", "1", "--promotion-policy", policy)
        os.environ["MLFLOW_TRACKING_USERNAME"] = env["MLFLOW_ADMIN_USERNAME"]
        os.environ["MLFLOW_TRACKING_PASSWORD"] = env["MLFLOW_ADMIN_PASSWORD"]
        from mlflow import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{env['MLFLOW_PORT']}")
        current = client.get_model_version_by_alias(model, alias).version
        images_ = common.sample_images(64, seed=2)
        requests = [common.http_request("POST", "/invocations", f"127.0.0.1:{port}",
                                        json.dumps({"inputs": images_[k:k + 1].tolist()}).encode(),
                                        {"Content-Type": "application/json"}) for k in range(len(images_))]
        for poll in POLLS:
            set_env(env_file, "ALIAS_POLL_SECONDS", f"{poll:g}")
            project.run("up", "-d", "--wait", "--wait-timeout", "300", "--no-build", "--pull", "never", "serving")
            wait_served(port, current)
            for i in range(args.switches):
                share = common.wait_until_quiet(args.quiet_threshold, args.quiet_patience)
                old, new = current, "2" if current == "1" else "1"
                with Window(project) as window:
                    e = common.run_async(episode(port, workers, client, model, alias, old, new, poll,
                                                 args.concurrency, requests))
                e.update(window.as_dict(), others_cpu_share=window.others_share, quiet_share_before=round(share, 3),
                         workers=workers)
                episodes.append(e)
                current = new
                log(f"switch {i + 1}/{args.switches}, poll {poll:g} s, v{old} -> v{new}: first new answer after "
                    f"{fmt(e['first_new_version_s'], '.2f')} s, all workers after "
                    f"{fmt(e['all_workers_switched_s'], '.2f')} s, {e['requests']} requests, {e['failed']} failed")
            logs[poll] = project.run("logs", "--no-color", "serving", check=False)[0].stdout
    finally:
        project.run("--profile", "train", "down", "--volumes", "--remove-orphans", check=False)
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"project {name} removed with its volumes")

    info["load_average_at_end"] = common.load_average()
    by_poll = {}
    for poll in POLLS:
        mine = [e for e in episodes if e["poll_seconds"] == poll]
        firsts = [e["first_new_version_s"] for e in mine if e["first_new_version_s"] is not None]
        alls = [e["all_workers_switched_s"] for e in mine if e["all_workers_switched_s"] is not None]
        # Each worker's first load after serving started is in the log too; only the switches count.
        prepared = prepared_times(logs.get(poll, ""))[workers:]
        never = len(mine) - len(firsts)
        by_poll[f"{poll:g}"] = {
            "switches": len(mine), "switches_never_seen": never,
            "first_new_median_s": common.median(firsts), "first_new_max_s": max(firsts) if firsts else None,
            "all_switched_median_s": common.median(alls), "all_switched_max_s": max(alls) if alls else None,
            "all_switched_missing": len(mine) - len(alls),
            "prepared_median_s": common.median(prepared), "prepared_max_s": max(prepared) if prepared else None,
            "requests": sum(e["requests"] for e in mine), "failed": sum(e["failed"] for e in mine),
        }
    others = [e["others_cpu_share"] for e in episodes]
    figures = {"by_poll": by_poll,
               "p99_ms_before_median": common.median([e["p99_ms_before_move"] for e in episodes
                                                      if e["p99_ms_before_move"] is not None]),
               "p99_ms_during_median": common.median([e["p99_ms_during_switch"] for e in episodes
                                                      if e["p99_ms_during_switch"] is not None]),
               "median_others_cpu_share": common.median(others), "max_others_cpu_share": max(others)}
    checks = {}
    for key, a in by_poll.items():
        checks[f"first_new_poll_{key}"] = (a["switches_never_seen"] == 0 and a["first_new_max_s"] is not None
                                           and a["first_new_max_s"] <= TARGETS["first_new_version_s"])
        checks[f"failed_poll_{key}"] = a["failed"] <= TARGETS["failed_requests"]
    verdict = ("The machine was reasonably quiet." if figures["median_others_cpu_share"] < 0.15 else
               "The machine was busy with other work: the poll interval dominates the switch time, but "
               "preparing a version (download, signature check, load) and the answers' latencies take longer "
               "than on a quiet machine.")
    report = {"date": common.now_iso(), "machine": info, "targets": TARGETS, "targets_met": checks,
              "verdict": verdict,
              "settings": {"switches": args.switches, "concurrency": args.concurrency, "workers": workers,
                           "polls": list(POLLS), "offline": offline, "images": images, "alias": alias},
              "figures": figures, "episodes": episodes}
    common.write_results("alias_switch", report, markdown(report), args.out_dir)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: how long a move of `@production` takes to reach clients, and what fails meanwhile.

    python bench/alias_switch_bench.py [--switches 5] [--concurrency 10]

Our serving (`python -m serving`, its defaults, as the container starts it) runs here on
loopback against a temporary SQLite registry holding two versions of the trainer's
exported SmallCNN, once with ALIAS_POLL_SECONDS=5 (the default) and once with 1, each
following its own registered model. While a client keeps `--concurrency` connections
busy with 1-image requests, the alias is moved to the other version `--switches` times
per setting, the two settings taking turns. For each move it measures:

  first new      from the start of the alias-move call to the first answer carrying the
                 new version in X-Model-Version (target <= 10 s)
  all workers    until every gunicorn worker reports the new version on /status (asked
                 on fresh connections, so that each worker gets asked)
  failed         answers other than 200, and connection errors, over the whole episode
                 (target 0)

Results: bench/results/alias_switch.json and .md.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import fmt, log

TARGETS = {"first_new_version_s": 10.0, "failed_requests": 0}
POLLS = (5.0, 1.0)


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


async def episode(port, workers, client, name, old, new, poll, concurrency, requests):
    seen: dict = {}
    stop = asyncio.Event()
    cap = 30 + 4 * poll  # a switch that takes longer than this is a failure in itself
    load = asyncio.create_task(common.drive("127.0.0.1", port, requests, concurrency, cap + 10,
                                            timeout_s=30, tag_header=b"x-model-version", stop=stop))
    prober = asyncio.create_task(status_prober(port, new, seen, stop))
    # A random start, so that moves do not fall at the same point of the watchers' schedule.
    await asyncio.sleep(1.0 + random.random())
    t_call = time.perf_counter()
    await asyncio.to_thread(client.set_registered_model_alias, name, "production", new)
    t_moved = time.perf_counter()
    deadline = t_call + cap
    while not set(workers) <= set(seen) and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # keep calling for a moment after the last worker switched
    stop.set()
    result = await load
    await prober

    firsts = [end for end, tag in zip(result.ends, result.tags) if tag == new]
    olds_after = [end for end, tag in zip(result.ends, result.tags) if tag == old and end > t_moved]
    all_switched = max(seen.values()) if set(workers) <= set(seen) else None
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


def markdown(report) -> str:
    f, s = report["figures"], report["settings"]
    met = report["targets_met"]
    lines = [
        *common.heading("Alias switch benchmark", report),
        f"Our serving (`python -m serving`, {s['workers']} workers, otherwise its defaults) on a local "
        f"SQLite registry with two versions of the trainer's exported SmallCNN, pinned to CPUs "
        f"{s['server_cpus']}; a client keeps {s['concurrency']} keep-alive connections busy with 1-image "
        f"requests throughout. `@production` is moved {s['switches']} times per setting, the two settings "
        f"taking turns. Times are from the start of the alias-move call.", "",
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
    parser = common.arguments(__doc__, concurrency=10, cpus=True)
    parser.add_argument("--switches", type=int, default=5, help="alias moves per poll setting (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="SERVING_WORKERS (default 2, the container's)")
    args = parser.parse_args()

    info = common.machine()
    server_cpus, client_cpus = common.chosen_cpus(args)
    workdir = Path(tempfile.mkdtemp(prefix="switch-bench-"))
    servers = {}
    names = {poll: f"{common.MODEL_NAME}-poll{poll:g}" for poll in POLLS}
    episodes = []
    try:
        log(f"building two versions of the served model in {workdir}")
        tracking_uri = common.build_registry(workdir, list(names.values()), versions=2)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        for poll in POLLS:
            port = common.free_port()
            process = common.start_ours(workdir, tracking_uri, names[poll], port, server_cpus,
                                        log_name=f"ours-poll{poll:g}.log", ALIAS_POLL_SECONDS=poll,
                                        SERVING_WORKERS=args.workers)
            servers[poll] = (port, process)
        for poll, (port, process) in servers.items():
            common.wait_serving(port, process, "1")
            client.get_model_version_by_alias(names[poll], "production")  # the client's engine, warmed
        common.pin_self(client_cpus)
        images = common.sample_images(64, seed=2)
        current = {poll: "1" for poll in POLLS}
        for i in range(args.switches):
            share = common.wait_until_quiet(args.quiet_threshold, args.quiet_patience)
            order = POLLS if i % 2 == 0 else POLLS[::-1]
            for poll in order:
                port, process = servers[poll]
                workers = [p for p in common.descendants(process.pid) if p != process.pid]
                requests = [common.http_request("POST", "/invocations", f"127.0.0.1:{port}",
                                                json.dumps({"inputs": images[k:k + 1].tolist()}).encode(),
                                                {"Content-Type": "application/json"}) for k in range(len(images))]
                old = current[poll]
                new = "2" if old == "1" else "1"
                with common.CpuWindow(pids=[process.pid]) as window:
                    e = common.run_async(episode(port, workers, client, names[poll], old, new, poll,
                                                 args.concurrency, requests))
                e.update(window.as_dict(), quiet_share_before=round(share, 3), workers=len(workers))
                episodes.append(e)
                current[poll] = new
                log(f"switch {i + 1}/{args.switches}, poll {poll:g} s, v{old} -> v{new}: first new answer after "
                    f"{fmt(e['first_new_version_s'], '.2f')} s, all workers after {fmt(e['all_workers_switched_s'], '.2f')} s, "
                    f"{e['requests']} requests, {e['failed']} failed; others {window.others_share:.0%} of the CPUs")
    finally:
        for _, process in servers.values():
            common.stop_process(process)
        logs = {poll: (workdir / f"ours-poll{poll:g}.log").read_text(errors="replace")
                for poll in POLLS if (workdir / f"ours-poll{poll:g}.log").exists()}
        shutil.rmtree(workdir, ignore_errors=True)

    info["load_average_at_end"] = common.load_average()
    by_poll = {}
    for poll in POLLS:
        mine = [e for e in episodes if e["poll_seconds"] == poll]
        firsts = [e["first_new_version_s"] for e in mine if e["first_new_version_s"] is not None]
        alls = [e["all_workers_switched_s"] for e in mine if e["all_workers_switched_s"] is not None]
        # The first load of version 1 at start is in the log too; only the switches count.
        prepared = prepared_times(logs.get(poll, ""))[args.workers:]
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
               "preparing a version (load, check) and the answers' latencies take longer than on a quiet machine.")
    report = {"date": common.now_iso(), "machine": info, "targets": TARGETS, "targets_met": checks,
              "verdict": verdict,
              "settings": {"switches": args.switches, "concurrency": args.concurrency, "workers": args.workers,
                           "polls": list(POLLS), "server_cpus": server_cpus, "client_cpus": client_cpus},
              "figures": figures, "episodes": episodes}
    common.write_results("alias_switch", report, markdown(report), args.out_dir)
    return 0 if all(checks.values()) else 1



if __name__ == "__main__":
    sys.exit(main())

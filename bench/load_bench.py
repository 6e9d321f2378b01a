"""Benchmark: the serving container under load, one-image requests from 1, 10 and 50 clients.

    python bench/load_bench.py [--seconds 20] [--levels 1,10,50] [--rounds 3]
    python bench/load_bench.py --url http://127.0.0.1:5001      # the stack `make up` runs

Without --url it measures a stack of its own: a private compose project (its own name,
free loopback ports, an env file made by scripts/env.sh as `make env` makes .env) from the
images already built (`up --no-build --pull never`; without them it says to run `make
build`), with a model trained on generated data by `docker compose run trainer`, as the
integration tests do, and the stack's defaults otherwise. The project is removed with its
volumes at the end. Clients reach serving through the gateway, as users do; the private
project also publishes serving's own port on loopback (bench/compose.serving-port.yaml),
and every level is measured both ways, taking turns, so the gateway's cost is a per-round
ratio. With --url it measures that stack's endpoint (its gateway) as it is; a model must be
served there already, and the containers' CPU and memory are read when `docker compose` in
this repository finds the gateway publishing that port.

Each round runs the levels in turn, after waiting (bounded) for the machine to be quiet:
`--seconds` of closed-loop load from that many keep-alive connections (bench/common.py's
client), the same real-looking image bodies for every level. Per level and path:
requests/s, latency percentiles of the answers, errors by kind (anything but a 200 from the
served version counts), the serving container's CPU per request and its memory before and
after, the gateway's CPU per request, and the share of the CPUs other work took meanwhile.
Results: bench/results/load.json and .md (with --url: load-url.json and .md, so a run
against your own stack never replaces the reference figures).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench import common
from bench.cold_start_bench import MissingImages, private_env
from bench.common import fmt, fmt_ratio, log

# The integration tests' stack helpers and container memory reader, reused as they are.
from tests.integration.container_memory import MIB, container_memory
from tests.integration.stack import TEST_IMAGES, TRAIN_IMAGES, Stack

ROOT = Path(__file__).resolve().parents[1]

WARM_UP_SECONDS = 3.0
WARM_UP_CONCURRENCY = 10
SERVING_PORT_FILE = ROOT / "bench" / "compose.serving-port.yaml"
GATEWAY, DIRECT = "gateway", "direct"


@dataclass(frozen=True)
class Route:
    """One way to the model: through the gateway (what clients use) or to serving's own port."""

    name: str
    host: str
    port: int
    requests: list[bytes]


# --- the stack under test ----------------------------------------------------------------------


def private_stack(workdir: Path) -> Stack:
    project = f"bench-load-{uuid.uuid4().hex[:6]}"
    try:
        env, offline, _ = private_env(workdir / ".env", project)
    except MissingImages as error:
        raise SystemExit(f"load_bench: {error}") from None
    return Stack(project=project, env_file=workdir / ".env", offline=offline, env=env,
                 extra_files=(SERVING_PORT_FILE,))


def bring_up_and_train(stack: Stack) -> str:
    log(f"starting compose project {stack.project}")
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "--no-build", "--pull", "never")
    stack.compose("run", "--rm", "-T", "--entrypoint", "python", "trainer", "-m", "trainer.synthetic",
                  "--data-dir", "/data", "--train", str(TRAIN_IMAGES), "--test", str(TEST_IMAGES))
    log("training a model on generated data")
    version = stack.train("--epochs", "1", "--promotion-policy", "always")["version"]
    stack.wait_served_version(version, timeout=180)
    return version


def direct_port(stack: Stack) -> int:
    """The free loopback port the engine gave serving's own 8080 (compose.serving-port.yaml)."""
    published = stack.compose("port", "serving", "8080").stdout.strip()
    return int(published.rsplit(":", 1)[1])


def containers(stack: Stack | None, port: int) -> dict[str, str | None]:
    """The serving and gateway containers' full ids: the private project's, or else the ones
    `docker compose` finds for this repository's .env (the `make up` stack), if its gateway
    publishes the port being measured."""
    if stack is not None:
        return {name: stack.compose("ps", "-q", name).stdout.strip() or None for name in ("serving", "gateway")}
    unknown = {"serving": None, "gateway": None}
    try:
        published = subprocess.run(["docker", "compose", "port", "gateway", "8080"], capture_output=True,
                                   text=True, cwd=ROOT, timeout=30)
        if published.returncode != 0 or not published.stdout.strip().endswith(f":{port}"):
            return unknown  # another stack's: its figures would not belong to this URL
        found = {name: subprocess.run(["docker", "compose", "ps", "-q", name], capture_output=True, text=True,
                                      cwd=ROOT, timeout=30) for name in unknown}
    except (OSError, subprocess.TimeoutExpired):
        return unknown
    return {name: (done.stdout.strip() or None) if done.returncode == 0 else None for name, done in found.items()}


def served_version(url: str, body: bytes) -> str:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.headers["X-Model-Version"]
    except urllib.error.HTTPError as e:
        raise SystemExit(f"load_bench: {url}/invocations answered {e.code}: {e.read()[:300]!r}") from None
    except OSError as e:
        raise SystemExit(f"load_bench: {url}/invocations cannot be reached: {e}") from None


# --- measuring -----------------------------------------------------------------------------------


def memory_mib(container: str | None) -> dict | None:
    if container is None:
        return None
    try:
        memory = container_memory(container)
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError):
        return None
    return {"anon": round(memory.anon_bytes / MIB, 1), "usage": round(memory.usage_bytes / MIB, 1)}


def per_request_us(cpu_s: float | None, ok: int) -> float | None:
    return round(cpu_s / ok * 1e6) if cpu_s is not None and ok else None


def level(route: Route, clients: int, seconds: float, version: str, ids: dict[str, str | None]) -> dict:
    serving, gateway = ids["serving"], ids["gateway"]
    before = memory_mib(serving)
    with common.CpuWindow(containers=[c for c in (serving, gateway) if c]) as window:
        result = common.run_async(common.drive(route.host, route.port, route.requests, clients, seconds,
                                               timeout_s=60, tag_header=b"x-model-version"))
    after = memory_mib(serving)
    summary = result.summary()
    # A 200 from another version (the alias moved meanwhile) is not what was measured.
    summary["other_version_answers"] = sum(1 for tag in result.tags if tag != version)
    cpu = window.container_cpu.get(serving) if serving else None
    gateway_cpu = window.container_cpu.get(gateway) if gateway else None
    summary.update(window.as_dict(), path=route.name, clients=clients, memory_before_mib=before,
                   memory_after_mib=after, server_cpu_seconds=round(cpu, 3) if cpu is not None else None,
                   server_cpu_us_per_request=per_request_us(cpu, summary["ok"]),
                   gateway_cpu_us_per_request=per_request_us(gateway_cpu, summary["ok"]))
    if serving is None or gateway is None:
        summary["others_cpu_share"] = None  # the stack's own CPU would be counted as other work
    lat = summary["latency_ms"]
    log(f"{route.name}, {clients} clients: {fmt(summary['requests_per_sec'], ',.1f')} requests/s, "
        f"p50 {fmt(lat['p50'], '.1f')} ms, p99 {fmt(lat['p99'], '.1f')} ms, {summary['failed']} errors; "
        f"others {fmt(summary['others_cpu_share'], '.0%')} of the CPUs")
    return summary


def errors(summary: dict) -> int:
    return summary["failed"] + summary["other_version_answers"]


def gateway_cost(rows: list[dict], levels: list[int]) -> list[dict]:
    """Per level: the gateway's requests/s and p50 as per-round ratios to serving reached
    directly (the two ran back to back in each round)."""
    costs = []
    for clients in levels:
        through = [r for r in rows if r["clients"] == clients and r["path"] == GATEWAY]
        direct = [r for r in rows if r["clients"] == clients and r["path"] == DIRECT]
        if not direct:
            continue
        costs.append({
            "clients": clients,
            "requests_per_sec": common.per_round_ratios(through, direct, lambda r: r["requests_per_sec"]),
            "p50": common.per_round_ratios(through, direct, lambda r: r["latency_ms"]["p50"]),
            "gateway_cpu_us_per_request": common.median([r["gateway_cpu_us_per_request"] for r in through
                                                         if r["gateway_cpu_us_per_request"] is not None]),
        })
    return costs


# --- the report ------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    s = report["settings"]
    target = (f"`{s['url']}` (a running stack's gateway)" if s["url"] else
              f"a private compose project ({'offline stand-in images' if s['offline'] else 'upstream images'}), "
              f"{s['serving_workers']} serving workers (the default), model trained for 1 epoch on generated data")
    paths = ("through the gateway, as clients reach it, and directly to serving's own port (published on "
             "loopback for this project only), the two taking turns within each round"
             if s["paths"] == [GATEWAY, DIRECT] else "through the gateway")
    lines = [
        *common.heading("Serving under load", report),
        f"One-image `POST /invocations` requests (MLflow's `{{\"inputs\": ...}}` JSON, {s['distinct_bodies']} different "
        f"generated images, about {s['body_bytes']:,} bytes each) against {target}, {paths}; on loopback from this "
        f"machine: the client shares the CPUs with the stack. Closed loop: each client sends its next request when "
        f"the last answer is read, on one keep-alive connection. {fmt(s['seconds_per_level'], 'g')} s per level "
        f"after a {WARM_UP_SECONDS:g} s warm-up, {s['rounds']} round(s); an error is any answer but a 200 from "
        f"version {s['version']}, or a failed connection.", "",
    ]
    if report["gateway_cost"]:
        lines += ["The gateway's cost: its figures over serving's own, the median of per-round ratios (range).", ""]
        lines += common.markdown_table(
            ["clients", "requests/s, gateway / direct", "p50, gateway / direct", "gateway CPU µs/request (median)"],
            [[c["clients"], fmt_ratio(c["requests_per_sec"]), fmt_ratio(c["p50"]),
              fmt(c["gateway_cpu_us_per_request"], ",.0f")] for c in report["gateway_cost"]])
        lines.append("")
    lines += [
        "| clients | path | round | requests | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors "
        "| serving CPU µs/request | gateway CPU µs/request | serving memory before → after, MiB (anonymous) "
        "| other work, share of CPUs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in sorted(report["levels"], key=lambda r: (r["clients"], r["path"], r["round"])):
        lat = row["latency_ms"]
        before, after = row["memory_before_mib"], row["memory_after_mib"]
        memory = f"{before['anon']:,.1f} → {after['anon']:,.1f}" if before and after else "n/a"
        lines.append(
            f"| {row['clients']} | {row['path']} | {row['round']} | {row['requests']:,} | "
            f"{fmt(row['requests_per_sec'], ',.1f')} | {fmt(lat['p50'], '.1f')} | {fmt(lat['p90'], '.1f')} | "
            f"{fmt(lat['p99'], '.1f')} | {fmt(lat['max'], '.1f')} | {errors(row)} | "
            f"{fmt(row['server_cpu_us_per_request'], ',.0f')} | {fmt(row['gateway_cpu_us_per_request'], ',.0f')} | "
            f"{memory} | {fmt(row['others_cpu_share'], '.0%')} |")
    clean = report["clean"]
    others = (f"a median {report['median_others_share']:.0%}" if report["median_others_share"] is not None
              else "an unknown share (the stack's containers were not found, so their CPU cannot be told apart)")
    lines += [
        "",
        f"Errors: {'none at any level' if clean else 'SOME, see the table and ' + report['name'] + '.json'}. "
        "Latency percentiles are of the answers that succeeded; CPU per request is each container's own "
        "(its cgroup), which depends less on the neighbours than requests/s does. On the direct path the gateway "
        "only answers its health checks.",
        "",
        f"The machine is shared: other work took {others} of its CPUs during the levels (load average, 1 min, "
        f"{report['load_range'][0]:.1f} to {report['load_range'][1]:.1f}), so absolute requests/s and latencies "
        "vary by tens of percent between runs; nothing here is a target.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = common.arguments(__doc__, rounds=3, rounds_help="times every level is run, the paths taking turns",
                              seconds=20, seconds_help="load time per level and path")
    parser.add_argument("--levels", default="1,10,50", help="concurrent clients per level (default 1,10,50)")
    parser.add_argument("--url", help="measure this endpoint (e.g. http://127.0.0.1:5001, a stack's gateway) "
                                      "instead of bringing up a private stack")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x.strip()]

    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0 and not args.url:
        raise SystemExit("load_bench: no Docker engine answers; start one, or give --url")
    info = common.machine(docker=True)
    images = common.sample_images(64)
    workdir = Path(tempfile.mkdtemp(prefix="load-bench-"))
    stack = None
    common.exit_on_signals()  # so that the private stack is removed
    rows = []
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            stack = private_stack(workdir)
            url = stack.serving_url
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise SystemExit(f"load_bench: --url must be plain http://HOST:PORT, got {url}")
        host = parts.hostname
        bodies = [json.dumps({"inputs": images[i:i + 1].tolist()}).encode() for i in range(len(images))]

        def route(name: str, port: int) -> Route:
            return Route(name, host, port, [common.http_request("POST", "/invocations", f"{host}:{port}", body,
                                                                {"Content-Type": "application/json"})
                                            for body in bodies])

        version = bring_up_and_train(stack) if stack else served_version(url, bodies[0])
        routes = [route(GATEWAY, parts.port or 80)]
        if stack is not None:
            routes.append(route(DIRECT, direct_port(stack)))
        ids = containers(stack, routes[0].port)
        log(f"serving version {version} at {url}; containers: "
            + ", ".join(f"{name} {cid[:12] if cid else 'not found'}" for name, cid in ids.items()))
        for r in routes:
            common.run_async(common.drive(r.host, r.port, r.requests, WARM_UP_CONCURRENCY, WARM_UP_SECONDS,
                                          timeout_s=60))
        for index in range(args.rounds):
            for clients in levels:
                # The paths take turns going first, round by round.
                shift = index % len(routes)
                for r in routes[shift:] + routes[:shift]:
                    common.wait_until_quiet(args.quiet_threshold, args.quiet_patience)
                    rows.append({"round": index + 1, **level(r, clients, args.seconds, version, ids)})
        workers = stack.env.get("SERVING_WORKERS", "2") if stack else None
    finally:
        if stack is not None:
            stack.compose("--profile", "train", "down", "--volumes", "--remove-orphans", check=False)
            log(f"project {stack.project} removed with its volumes")
        shutil.rmtree(workdir, ignore_errors=True)

    info["load_average_at_end"] = common.load_average()
    loads = [x for row in rows for x in (row["load_before"][0], row["load_after"][0])]
    name = "load-url" if args.url else "load"
    report = {
        "name": name, "date": common.now_iso(), "machine": info,
        "settings": {"url": args.url, "offline": stack.offline if stack else None, "version": version,
                     "serving_workers": workers, "levels": levels, "paths": [r.name for r in routes],
                     "seconds_per_level": args.seconds, "rounds": args.rounds, "distinct_bodies": len(bodies),
                     "body_bytes": round(sum(map(len, bodies)) / len(bodies))},
        "clean": all(errors(row) == 0 for row in rows),
        "median_others_share": common.median([row["others_cpu_share"] for row in rows
                                              if row["others_cpu_share"] is not None]),
        "load_range": [min(loads), max(loads)],
        "gateway_cost": gateway_cost(rows, levels),
        "levels": rows,
    }
    common.write_results(name, report, markdown(report), args.out_dir)
    return 0 if report["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())

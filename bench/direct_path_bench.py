"""Benchmark: what serving's direct path for `{"inputs": ...}` bodies is worth.

    python -m bench.direct_path_bench [--rounds 5] [--seconds 8] [--concurrency 10]

Three runs of `python -m serving` on the same model, the same CPUs, with the same workers
and torch threads (its defaults: 2 workers, 1 thread each); only the body path differs:

  direct+batch   the default: the direct path parses the tensor and stacks concurrent
                 requests into one predict call (SERVING_DIRECT_PATH=true)
  direct         the direct path, one predict call per request (SERVING_BATCH_MAX_ROWS=1)
  mlflow-app     every body through MLflow's scoring app (SERVING_DIRECT_PATH=false)

The servers take turns phase by phase, in a rotating order, because other work on the
machine comes and goes. Each figure is the median over rounds of the per-round ratio to
mlflow-app (both measured back to back), with its range. Results:
bench/results/direct_path.json and .md.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bench import common
from bench.common import fmt, fmt_ratio, log

VARIANTS = {
    "direct+batch": {"SERVING_DIRECT_PATH": "true"},
    "direct": {"SERVING_DIRECT_PATH": "true", "SERVING_BATCH_MAX_ROWS": "1"},
    "mlflow-app": {"SERVING_DIRECT_PATH": "false"},
}
BASELINE = "mlflow-app"


def request_bodies(port: int, count: int = 64) -> list[bytes]:
    """One-image `{"inputs": ...}` requests, as a numpy client writes them."""
    import json

    images = common.sample_images(count, seed=1)
    return [common.http_request("POST", "/invocations", f"127.0.0.1:{port}",
                                json.dumps({"inputs": images[i:i + 1].tolist()}).encode(),
                                {"Content-Type": "application/json"}) for i in range(count)]


def phase(name: str, pid: int, port: int, requests: list[bytes], concurrency: int, seconds: float) -> dict:
    with common.CpuWindow(pids=[pid]) as window:
        result = common.run_async(common.drive("127.0.0.1", port, requests, concurrency, seconds, timeout_s=120))
    summary = result.summary()
    cpu = window.pid_cpu[pid]
    summary.update(window.as_dict(), server_cpu_us_per_request=round(cpu / summary["ok"] * 1e6) if summary["ok"] else None)
    log(f"{name}: {fmt(summary['requests_per_sec'], ',.0f')} req/s, p50 {fmt(summary['latency_ms']['p50'], '.1f')} ms, "
        f"p99 {fmt(summary['latency_ms']['p99'], '.1f')} ms, {fmt(summary['server_cpu_us_per_request'], ',.0f')} µs CPU "
        f"per request, {summary['failed']} failed; others {window.others_share:.0%} of the CPUs")
    return summary


def figures(samples: dict[str, list[dict]]) -> dict:
    out = {}
    base = samples[BASELINE]
    for variant, runs in samples.items():
        rps = [r["requests_per_sec"] for r in runs]
        out[variant] = {
            "requests_per_sec": round(common.median(rps), 1), "requests_per_sec_range": [min(rps), max(rps)],
            "p50_ms": common.median([r["latency_ms"]["p50"] for r in runs]),
            "p99_ms": common.median([r["latency_ms"]["p99"] for r in runs]),
            "server_cpu_us_per_request": common.median([r["server_cpu_us_per_request"] for r in runs]),
            "failed": sum(r["failed"] for r in runs),
            "rps_ratio": common.per_round_ratios(runs, base, lambda r: r["requests_per_sec"]),
            "p99_ratio": common.per_round_ratios(runs, base, lambda r: r["latency_ms"]["p99"]),
            "cpu_ratio": common.per_round_ratios(runs, base, lambda r: r["server_cpu_us_per_request"]),
        }
    return out


def markdown(report: dict) -> str:
    s, f = report["settings"], report["figures"]
    lines = [
        *common.heading("Serving's direct path", report),
        f"`python -m serving` three times on the same model (the trainer's SmallCNN export), each with "
        f"its defaults of {s['workers']} workers x {s['torch_threads']} torch thread, pinned to CPUs "
        f"{s['server_cpus']} (the load client on {s['client_cpus']}); only the body path differs. One image per "
        f"request, {s['concurrency']} connections, closed loop, {s['seconds']:g} s per phase, {s['rounds']} rounds "
        f"with the servers taking turns. Ratios are to `{BASELINE}` in the same round: the median of the "
        f"per-round ratios, the range in brackets.", "",
    ]
    lines += common.markdown_table(
        ["variant", "requests/s", "p50 ms", "p99 ms", "server CPU µs/request", "requests/s ratio", "p99 ratio",
         "CPU/request ratio", "failed"],
        [[variant, fmt(a["requests_per_sec"], ",.0f"), fmt(a["p50_ms"], ".1f"), fmt(a["p99_ms"], ".1f"),
          fmt(a["server_cpu_us_per_request"], ",.0f"), fmt_ratio(a["rps_ratio"]), fmt_ratio(a["p99_ratio"]),
          fmt_ratio(a["cpu_ratio"]), a["failed"]] for variant, a in f.items()])
    lines += ["", "Variants: " + "; ".join(f"`{k}` = {' '.join(f'{n}={v}' for n, v in e.items())}"
                                          for k, e in VARIANTS.items()) + ".",
              f"Other processes took a median {report['others_cpu_share_median']:.0%} of the CPUs during the phases "
              f"(max {report['others_cpu_share_max']:.0%}).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = common.arguments(__doc__, rounds=5, seconds=8, concurrency=10, cpus=True)
    args = parser.parse_args()

    info = common.machine()
    server_cpus, client_cpus = common.chosen_cpus(args)
    workdir = Path(tempfile.mkdtemp(prefix="direct-path-bench-"))
    processes, ports = {}, {}
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        log(f"building the served model in {workdir}")
        tracking_uri = common.build_registry(workdir, [common.MODEL_NAME], versions=1)
        for variant, settings in VARIANTS.items():
            ports[variant] = common.free_port()
            processes[variant] = common.start_ours(workdir, tracking_uri, common.MODEL_NAME, ports[variant],
                                                   server_cpus, log_name=f"{variant}.log", **settings)
        for variant in VARIANTS:
            common.wait_serving(ports[variant], processes[variant], "1")
        common.pin_self(client_cpus)
        requests = {v: request_bodies(ports[v]) for v in VARIANTS}
        log("warming up")
        for v in VARIANTS:
            common.run_async(common.drive("127.0.0.1", ports[v], requests[v], args.concurrency, 3, timeout_s=120))
        for r, order in common.rounds(args.rounds, list(VARIANTS), args.quiet_threshold, args.quiet_patience):
            for v in order:
                samples[v].append(phase(f"round {r + 1} {v}", processes[v].pid, ports[v], requests[v],
                                        args.concurrency, args.seconds))
    finally:
        for p in processes.values():
            common.stop_process(p)
        shutil.rmtree(workdir, ignore_errors=True)

    others = [s["others_cpu_share"] for runs in samples.values() for s in runs]
    report = {"date": common.now_iso(), "machine": info,
              "settings": {"rounds": args.rounds, "seconds": args.seconds, "concurrency": args.concurrency,
                           "workers": 2, "torch_threads": 1, "server_cpus": server_cpus, "client_cpus": client_cpus,
                           "variants": VARIANTS},
              "figures": figures(samples), "others_cpu_share_median": common.median(others),
              "others_cpu_share_max": max(others), "samples": samples}
    common.write_results("direct_path", report, markdown(report), args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

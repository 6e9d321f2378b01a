"""Benchmark: our serving against plain `mlflow models serve`, same model, same cores.

    python bench/serving_bench.py [--rounds 3] [--seconds 10] [--concurrency 10]

Both servers run here from this Python environment, on loopback, pinned with taskset to
the same CPUs, and score the same registered model: the trainer's own export of a
SmallCNN (TorchScript inside the models-from-code pyfunc) in a temporary SQLite registry.

  ours     `python -m serving`, as the serving container starts it, with its defaults
           (2 gunicorn/uvicorn workers, 1 torch thread each, batching on)
  mlflow   `mlflow models serve -m models:/NAME/1 --env-manager local` with its defaults
           (1 uvicorn worker, torch's default thread count)
  floor    `pyfunc.predict` on the same images, in this process, 1 torch thread: what
           scoring costs with no HTTP and no JSON at all

The load client keeps `--concurrency` connections busy (closed loop), sending MLflow's
`{"inputs": ...}` JSON with 1 image or `--batch-images` images per request. The servers
take turns (ours, mlflow, then mlflow, ours in the next round) phase by phase, because
other work on the machine comes and goes; each comparison is the median of the per-round
ratios (each pair back to back) with their range, reported with the load average and the
share of CPU that other processes took during each phase. A second,
shorter pass at concurrency 1 gives the latency with no queueing, which is what the
overhead over the floor is computed from. Results: bench/results/serving.json and .md.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import fmt, fmt_ratio, log

TARGETS = {"rps_ratio_1_image": 3.0, "p99_ratio_1_image": 0.5}
VARIANTS = ("ours", "mlflow")
LABELS = {"ours": "ours (`python -m serving`)", "mlflow": "`mlflow models serve`"}


def request_bodies(images, per_request: int, count: int, port: int) -> list[bytes]:
    """`count` different POST /invocations requests of `per_request` images each, as a
    numpy client would send them (float32 values written by tolist())."""
    out = []
    for i in range(count):
        start = (i * per_request) % max(len(images) - per_request + 1, 1)
        body = json.dumps({"inputs": images[start:start + per_request].tolist()}).encode()
        out.append(common.http_request("POST", "/invocations", f"127.0.0.1:{port}", body,
                                       {"Content-Type": "application/json"}))
    return out


def floor_latencies(pyfunc, images, per_request: int, calls: int) -> list[float]:
    batches = [images[i:i + per_request] for i in range(0, len(images) - per_request + 1, per_request)] or [images]
    latencies = []
    for i in range(calls):
        data = batches[i % len(batches)]
        t0 = time.perf_counter()
        pyfunc.predict(data)
        latencies.append(time.perf_counter() - t0)
    return latencies


def phase(name, process, port, requests, concurrency, seconds, max_requests):
    with common.CpuWindow(pids=[process.pid]) as window:
        result = common.run_async(common.drive("127.0.0.1", port, requests, concurrency, seconds,
                                               max_requests=max_requests, timeout_s=120))
    summary = result.summary()
    server_cpu = window.pid_cpu[process.pid]
    summary.update(window.as_dict(), server_cpu_seconds=round(server_cpu, 3),
                   server_cpu_us_per_request=round(server_cpu / summary["ok"] * 1e6) if summary["ok"] else None)
    lat = summary["latency_ms"]
    log(f"{name}: {fmt(summary['requests_per_sec'], ',.1f')} req/s, p50 {fmt(lat['p50'], '.1f')} ms, "
        f"p99 {fmt(lat['p99'], '.1f')} ms, {summary['failed']} failed; others {window.others_share:.0%} of the CPUs, "
        f"load {window.load_before[0]:.1f} -> {window.load_after[0]:.1f}")
    if summary["failed"]:
        log(f"  failures: {summary['failures']}")
    return summary


def aggregate(samples: list[dict]) -> dict:
    rps = [s["requests_per_sec"] or 0.0 for s in samples]
    p50 = [s["latency_ms"]["p50"] for s in samples if s["latency_ms"]["p50"] is not None]
    p99 = [s["latency_ms"]["p99"] for s in samples if s["latency_ms"]["p99"] is not None]
    cpu = [s["server_cpu_us_per_request"] for s in samples if s.get("server_cpu_us_per_request")]
    return {
        "requests_per_sec": common.median(rps), "requests_per_sec_range": [min(rps), max(rps)],
        "p50_ms": common.median(p50), "p99_ms": common.median(p99),
        "p99_ms_range": [min(p99), max(p99)] if p99 else None,
        "server_cpu_us_per_request": common.median(cpu),
        "failed": sum(s["failed"] for s in samples), "requests": sum(s["requests"] for s in samples),
        "max_others_cpu_share": max(s["others_cpu_share"] for s in samples),
    }


def markdown(report) -> str:
    f, s, m = report["figures"], report["settings"], report["machine"]
    met = report["targets_met"]

    def ok(key):
        return "met" if met[key] else "MISSED"

    def row(label, a):
        return (f"| {label} | {fmt(a['requests_per_sec'], ',.0f')} ({fmt(a['requests_per_sec_range'][0], ',.0f')}"
                f" to {fmt(a['requests_per_sec_range'][1], ',.0f')}) | {fmt(a['p50_ms'], '.1f')} | "
                f"{fmt(a['p99_ms'], '.1f')} | {fmt(a['server_cpu_us_per_request'], ',.0f')} | {a['failed']} |")

    lines = [
        *common.heading("Serving benchmark", report),
        f"The trainer's exported SmallCNN (TorchScript in the models-from-code pyfunc), both servers "
        f"run locally from the same Python environment and pinned to CPUs {s['server_cpus']}; the "
        f"load client (raw asyncio HTTP/1.1, keep-alive) on CPUs {s['client_cpus']}. Closed loop, "
        f"{s['concurrency']} connections, {s['seconds']:g} s per phase, {s['rounds']} rounds with the "
        f"servers taking turns; medians over rounds (range in brackets). `server CPU` is the servers' "
        f"own CPU time per answered request (all their processes).", "",
    ]
    for images in (1, s["batch_images"]):
        key = f"{images}"
        lines += [f"## {images} image{'s' if images > 1 else ''} per request, concurrency {s['concurrency']}", "",
                  "| server | requests/s | p50 ms | p99 ms | server CPU µs/request | failed |",
                  "|---|---:|---:|---:|---:|---:|"]
        for v in VARIANTS:
            lines.append(row(LABELS[v], f["c10"][v][key]))
        lines.append("")
    lines += ["## Latency without queueing (concurrency 1) and the in-process floor", "",
              "| | p50 ms, 1 image | p50 ms, " + f"{s['batch_images']} images |", "|---|---:|---:|"]
    for v in VARIANTS:
        lines.append(f"| {LABELS[v]} | {fmt(f['c1'][v]['1']['p50_ms'], '.2f')} | "
                     f"{fmt(f['c1'][v][str(s['batch_images'])]['p50_ms'], '.1f')} |")
    lines.append(f"| floor: `pyfunc.predict` in-process, 1 torch thread | {fmt(f['floor']['1']['p50_ms'], '.2f')} | "
                 f"{fmt(f['floor'][str(s['batch_images'])]['p50_ms'], '.1f')} |")
    lines += ["", f"Our p50 overhead over the floor: {fmt(f['overhead_ms']['1'], '.2f')} ms for 1 image "
              f"({fmt(f['overhead_ratio']['1'], '.1f')}x the floor), {fmt(f['overhead_ms'][str(s['batch_images'])], '.1f')} ms "
              f"for {s['batch_images']} images ({fmt(f['overhead_ratio'][str(s['batch_images'])], '.1f')}x); "
              f"MLflow's: {fmt(f['mlflow_overhead_ms']['1'], '.2f')} ms and "
              f"{fmt(f['mlflow_overhead_ms'][str(s['batch_images'])], '.1f')} ms.", "",
              "## Targets (1 image per request, concurrency 10)", "",
              *common.markdown_table(["target", "result", ""], [
                  [f"requests/s >= {TARGETS['rps_ratio_1_image']:g}x MLflow's", fmt_ratio(f["rps_ratio"]["1"]),
                   ok("rps_ratio_1_image")],
                  [f"p99 <= {TARGETS['p99_ratio_1_image']:g}x MLflow's", fmt_ratio(f["p99_ratio"]["1"]),
                   ok("p99_ratio_1_image")]], align="lrl"),
              "",
              "Each ratio is the median of the per-round ratios (each pair ran back to back), the range in "
              "brackets. Round by round: requests/s "
              + ", ".join(f"{x:.2f}x" for x in f["rps_ratio"]["1"]["by_round"]) + "; p99 "
              + ", ".join(f"{x:.2f}x" for x in f["p99_ratio"]["1"]["by_round"])
              + f". Server CPU per request: MLflow's is {fmt_ratio(f['cpu_ratio']['1'], '.1f')} ours; requests/s "
              "can only follow that ratio as far as the CPU each server gets on a machine shared with other work.",
              "",
              f"With {s['batch_images']} images per request: {fmt_ratio(f['rps_ratio'][str(s['batch_images'])])} "
              f"the requests/s, {fmt_ratio(f['p99_ratio'][str(s['batch_images'])])} the p99.", "",
              "## How quiet the machine was", "",
              f"Load average (1 min) during the phases: {f['load_1min_range'][0]:.1f} to {f['load_1min_range'][1]:.1f} "
              f"on {m['cores']} cores; other processes took up to {f['max_others_cpu_share']:.0%} of all CPUs during a "
              f"phase (median {f['median_others_cpu_share']:.0%}). {report['verdict']}", ""]
    return "\n".join(lines)


def main():
    parser = common.arguments(__doc__, rounds=3, seconds=10, seconds_help="seconds per concurrency-10 phase",
                              concurrency=10, quiet_patience=120, cpus=True)
    parser.add_argument("--single-seconds", type=float, default=4, help="seconds per concurrency-1 phase (default 4)")
    parser.add_argument("--batch-images", type=int, default=256, help="images per request, second size (default 256)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap per phase")
    args = parser.parse_args()

    info = common.machine()
    server_cpus, client_cpus = common.chosen_cpus(args)
    workdir = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    processes = {}
    try:
        log(f"building the served model in {workdir}")
        tracking_uri = common.build_registry(workdir, [common.MODEL_NAME], versions=1)
        ports = {"ours": common.free_port(), "mlflow": common.free_port()}
        processes["ours"] = common.start_ours(workdir, tracking_uri, common.MODEL_NAME, ports["ours"], server_cpus)
        processes["mlflow"] = common.start_mlflow_serve(workdir, tracking_uri, f"models:/{common.MODEL_NAME}/1",
                                                        ports["mlflow"], server_cpus)
        common.wait_serving(ports["ours"], processes["ours"], "1")
        common.wait_http("127.0.0.1", ports["mlflow"], "/ping", lambda status, _: status == 200, 180,
                         processes["mlflow"])
        log(f"servers up: ours on {ports['ours']}, mlflow on {ports['mlflow']} (CPUs {server_cpus})")

        import mlflow
        import numpy as np
        import torch

        torch.set_num_threads(1)
        pyfunc = mlflow.pyfunc.load_model(f"models:/{common.MODEL_NAME}/1")
        common.pin_self(client_cpus)
        images = common.sample_images(max(4 * args.batch_images, 256), seed=1)

        requests = {v: {1: request_bodies(images, 1, 64, ports[v]),
                        args.batch_images: request_bodies(images, args.batch_images, 4, ports[v])}
                    for v in VARIANTS}
        # Same answers from both servers and from the pyfunc: they serve the same model.
        expected = pyfunc.predict(images[:args.batch_images])
        for v in VARIANTS:
            answer = common.run_async(_one(ports[v], requests[v][args.batch_images][0]))
            got = np.asarray(json.loads(answer)["predictions"], dtype=np.float32)
            if not np.allclose(got, expected, atol=1e-5):
                raise SystemExit(f"{v} answers differently from the in-process model")

        log("warming up both servers")
        for v in VARIANTS:
            for images_per_request, seconds in ((1, 3), (args.batch_images, 3)):
                common.run_async(common.drive("127.0.0.1", ports[v], requests[v][images_per_request],
                                              args.concurrency, seconds, timeout_s=120))

        sizes = (1, args.batch_images)
        samples = {c: {v: {str(n): [] for n in sizes} for v in VARIANTS} for c in ("c10", "c1")}
        floor = {str(n): [] for n in sizes}
        for r, order in common.rounds(args.rounds, VARIANTS, args.quiet_threshold, args.quiet_patience):
            for n in sizes:
                for v in order:
                    samples["c10"][v][str(n)].append(phase(
                        f"round {r + 1} {v} {n} image(s) c{args.concurrency}", processes[v], ports[v],
                        requests[v][n], args.concurrency, args.seconds, args.max_requests))
                for v in order:
                    samples["c1"][v][str(n)].append(phase(
                        f"round {r + 1} {v} {n} image(s) c1", processes[v], ports[v], requests[v][n], 1,
                        args.single_seconds, args.max_requests))
                floor[str(n)].extend(floor_latencies(pyfunc, images, n, 300 if n == 1 else 20))
    finally:
        for p in processes.values():
            common.stop_process(p)
        logs = {name: (workdir / name).read_text(errors="replace")[-1500:]
                for name in ("ours.log", "mlflow-serve.log") if (workdir / name).exists()}
        shutil.rmtree(workdir, ignore_errors=True)

    info["load_average_at_end"] = common.load_average()
    floor_figures = {n: {"p50_ms": common.percentile(latencies, 50) * 1000,
                         "p99_ms": common.percentile(latencies, 99) * 1000, "calls": len(latencies)}
                     for n, latencies in floor.items()}
    report = summarise(samples, floor_figures, info)
    report.update(settings={"rounds": args.rounds, "seconds": args.seconds, "single_seconds": args.single_seconds,
                            "concurrency": args.concurrency, "batch_images": args.batch_images,
                            "server_cpus": server_cpus, "client_cpus": client_cpus,
                            "ours": "python -m serving, defaults (SERVING_WORKERS=2, SERVING_TORCH_THREADS=1, "
                                    "SERVING_BATCH_MAX_ROWS=32)",
                            "mlflow": "mlflow models serve -m models:/NAME/1 --env-manager local (defaults)"},
                  server_log_tails=logs)
    common.write_results("serving", report, markdown(report), args.out_dir)
    return 0 if all(report["targets_met"].values()) else 1


def summarise(samples: dict, floor: dict, info: dict) -> dict:
    """The report's figures from every phase's samples: medians over rounds for each server,
    and each comparison as the median of the per-round ratios with their range."""
    figures = {"c10": {}, "c1": {}, "floor": floor, "rps_ratio": {}, "p99_ratio": {}, "overhead_ms": {},
               "overhead_ratio": {}, "mlflow_overhead_ms": {}, "cpu_ratio": {}}
    for c in ("c10", "c1"):
        for v in VARIANTS:
            figures[c][v] = {n: aggregate(runs) for n, runs in samples[c][v].items()}
    for n in floor:
        ours, theirs = samples["c10"]["ours"][n], samples["c10"]["mlflow"][n]
        figures["rps_ratio"][n] = common.per_round_ratios(ours, theirs, lambda r: r["requests_per_sec"])
        figures["p99_ratio"][n] = common.per_round_ratios(ours, theirs, lambda r: r["latency_ms"]["p99"])
        # How many times ours' CPU per request MLflow's takes.
        figures["cpu_ratio"][n] = common.per_round_ratios(theirs, ours, lambda r: r["server_cpu_us_per_request"])
        floor_p50 = figures["floor"][n]["p50_ms"]
        figures["overhead_ms"][n] = figures["c1"]["ours"][n]["p50_ms"] - floor_p50
        figures["overhead_ratio"][n] = figures["c1"]["ours"][n]["p50_ms"] / floor_p50
        figures["mlflow_overhead_ms"][n] = figures["c1"]["mlflow"][n]["p50_ms"] - floor_p50
    every = [s for c in samples.values() for v in c.values() for runs in v.values() for s in runs]
    loads = [x for s in every for x in (s["load_before"][0], s["load_after"][0])]
    others = [s["others_cpu_share"] for s in every]
    figures.update(load_1min_range=[min(loads), max(loads)], max_others_cpu_share=max(others),
                   median_others_cpu_share=common.median(others))
    checks = {"rps_ratio_1_image": figures["rps_ratio"]["1"]["median"] >= TARGETS["rps_ratio_1_image"],
              "p99_ratio_1_image": figures["p99_ratio"]["1"]["median"] <= TARGETS["p99_ratio_1_image"]}
    quiet = figures["median_others_cpu_share"] < 0.15
    verdict = ("The machine was reasonably quiet; the ratios are meaningful." if quiet else
               "The machine was busy with other work during the runs: absolute requests/s and "
               "latencies are lower and noisier than on a quiet machine; the ratios, measured with "
               "the servers taking turns, are the figures to read, and even they carry that noise.")
    return {"date": common.now_iso(), "machine": info, "targets": TARGETS, "targets_met": checks,
            "verdict": verdict, "figures": figures, "samples": samples}


async def _one(port, data):
    conn = common.HttpConnection("127.0.0.1", port)
    try:
        status, _, body = await conn.request(data)
    finally:
        conn.close()
    if status != 200:
        raise SystemExit(f"port {port} answered {status}: {body[:300]!r}")
    return body


if __name__ == "__main__":
    sys.exit(main())

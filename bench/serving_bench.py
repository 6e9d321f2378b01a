"""Benchmark: our serving against plain `mlflow models serve`, same model, same cores.

    python -m bench.serving_bench [--rounds 3] [--seconds 10] [--concurrency 10]

Every server runs here from this Python environment, on loopback, pinned with taskset to
the same CPUs, and scores the same registered model: the trainer's own export of a
SmallCNN (TorchScript inside the models-from-code pyfunc) in a temporary SQLite registry.
Four configurations, all measured in every round:

  ours            `python -m serving`, as the serving container starts it, with its
                  defaults (2 gunicorn/uvicorn workers, 1 torch thread each, batching on)
  ours_oip        the same `ours` server, asked through the Open Inference Protocol with
                  binary tensors (POST /v2/models/NAME/infer, `binary_data`), the request
                  format for large batches: raw float32 bytes instead of JSON numbers
  ours_unbatched  the same with SERVING_BATCH_MAX_ROWS=1 (batching off)
  mlflow          `mlflow models serve -m models:/NAME/1 --env-manager local` with its
                  defaults (1 uvicorn worker, torch's default thread count)
  mlflow_2x1      the same with `--workers 2` and OMP_NUM_THREADS=MKL_NUM_THREADS=1: the
                  processes and threads ours has
  floor           `pyfunc.predict` on the same images, in this process, 1 torch thread:
                  what scoring costs with no HTTP and no JSON at all

The load client keeps `--concurrency` connections busy (closed loop), sending MLflow's
`{"inputs": ...}` JSON (the binary request for ours_oip, built by Triton's client library)
with 1 image or `--batch-images` images per request. The servers
take turns phase by phase (the order rotates from round to round), because other work on
the machine comes and goes; each comparison is the median of the per-round ratios (each
round's phases back to back) with their range, reported with the load average and the
share of CPU that other processes took during each phase. A second, shorter pass at
concurrency 1 gives the latency with no queueing, which is compared with the floor
measured in the same round. Results: bench/results/serving.json and .md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench import common
from bench.common import fmt, fmt_ratio, log

if TYPE_CHECKING:
    import numpy as np
    from mlflow.pyfunc import PyFuncModel

TARGETS = {"rps_ratio_1_image": 3.0, "p99_ratio_1_image": 0.5, "p50_over_floor_batch": 1.5}
VARIANTS = ("ours", "ours_oip", "ours_unbatched", "mlflow", "mlflow_2x1")
OURS = ("ours", "ours_unbatched")
# Variants that are another request format sent to a server of another variant.
SERVER_OF = {"ours_oip": "ours"}
MLFLOW = ("mlflow", "mlflow_2x1")
LABELS = {
    "ours": "ours, batching on (defaults: 2 workers, 1 torch thread each)",
    "ours_oip": "ours, the same server, Open Inference Protocol with binary tensors",
    "ours_unbatched": "ours, batching off (`SERVING_BATCH_MAX_ROWS=1`), 2 workers x 1 thread",
    "mlflow": "`mlflow models serve`, defaults (1 worker, torch's threads)",
    "mlflow_2x1": "`mlflow models serve --workers 2`, 1 torch thread each",
}
SHORT = {"ours": "ours", "ours_oip": "ours OIP binary", "ours_unbatched": "ours unbatched", "mlflow": "MLflow defaults",
         "mlflow_2x1": "MLflow 2x1"}
# (ours variant, the variant it is compared with): every comparison a table shows.
PAIRS = (("ours", "mlflow"), ("ours", "mlflow_2x1"), ("ours_unbatched", "mlflow"),
         ("ours_unbatched", "mlflow_2x1"), ("ours", "ours_unbatched"), ("mlflow_2x1", "mlflow"),
         ("ours_oip", "mlflow"), ("ours_oip", "ours"))
COMMANDS = {
    "ours": "python -m serving",
    "ours_oip": "python -m serving; POST /v2/models/NAME/infer with binary_data input and output",
    "ours_unbatched": "SERVING_BATCH_MAX_ROWS=1 python -m serving",
    "mlflow": "mlflow models serve -m models:/NAME/1 --env-manager local",
    "mlflow_2x1": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 mlflow models serve "
                  "-m models:/NAME/1 --env-manager local --workers 2",
}


def request_bodies(images: np.ndarray, per_request: int, count: int, port: int) -> list[bytes]:
    """`count` different POST /invocations requests of `per_request` images each, as a
    numpy client would send them (float32 values written by tolist())."""
    out = []
    for i in range(count):
        start = (i * per_request) % max(len(images) - per_request + 1, 1)
        body = json.dumps({"inputs": images[start:start + per_request].tolist()}).encode()
        out.append(common.http_request("POST", "/invocations", f"127.0.0.1:{port}", body,
                                       {"Content-Type": "application/json"}))
    return out


def oip_requests(images: np.ndarray, per_request: int, count: int, port: int) -> list[bytes]:
    """The same requests as request_bodies, as Triton's client sends them through the Open
    Inference Protocol: raw float32 input, binary output."""
    import tritonclient.http as triton

    out = []
    for i in range(count):
        start = (i * per_request) % max(len(images) - per_request + 1, 1)
        tensor = triton.InferInput("inputs", [per_request, *images.shape[1:]], "FP32")
        tensor.set_data_from_numpy(images[start:start + per_request], binary_data=True)
        wanted = triton.InferRequestedOutput("predictions", binary_data=True)
        body, header_length = triton.InferenceServerClient.generate_request_body([tensor], outputs=[wanted])
        out.append(common.http_request("POST", f"/v2/models/{common.MODEL_NAME}/infer", f"127.0.0.1:{port}", body,
                                       {"Inference-Header-Content-Length": header_length}))
    return out


def answered_predictions(headers: dict, body: bytes) -> np.ndarray:
    import numpy as np
    import tritonclient.http as triton

    length = headers.get(b"inference-header-content-length")
    if length is None:
        return np.asarray(json.loads(body)["predictions"], dtype=np.float32)
    return triton.InferResult.from_response_body(body, header_length=int(length)).as_numpy("predictions")


def floor_latencies(pyfunc: PyFuncModel, images: np.ndarray, per_request: int, calls: int) -> list[float]:
    batches = [images[i:i + per_request] for i in range(0, len(images) - per_request + 1, per_request)] or [images]
    latencies = []
    for i in range(calls):
        data = batches[i % len(batches)]
        t0 = time.perf_counter()
        pyfunc.predict(data)
        latencies.append(time.perf_counter() - t0)
    return latencies


def phase(name: str, process: subprocess.Popen, port: int, requests: list[bytes], concurrency: int,
          seconds: float, max_requests: int) -> dict:
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


def markdown(report: dict) -> str:
    f, s, m = report["figures"], report["settings"], report["machine"]
    met = report["targets_met"]
    big = str(s["batch_images"])

    def ok(key: str) -> str:
        return "met" if met[key] else "MISSED"

    def row(v: str, a: dict) -> list[str]:
        low, high = a["requests_per_sec_range"]
        return [LABELS[v], f"{fmt(a['requests_per_sec'], ',.0f')} ({fmt(low, ',.0f')} to {fmt(high, ',.0f')})",
                fmt(a["p50_ms"], ".1f"), fmt(a["p99_ms"], ".1f"), fmt(a["server_cpu_us_per_request"], ",.0f"),
                str(a["failed"])]

    lines = [
        *common.heading("Serving benchmark", report),
        f"The trainer's exported SmallCNN (TorchScript in the models-from-code pyfunc). Four servers run "
        f"locally from the same Python environment, all pinned to CPUs {s['server_cpus']}; ours is asked both "
        f"with MLflow's JSON and with the Open Inference Protocol's binary tensors. Every round measures all "
        f"five configurations, taking turns phase by phase (the order rotates from round to round); the load "
        f"client (raw asyncio HTTP/1.1, keep-alive) runs on CPUs {s['client_cpus']}. Closed loop, "
        f"{s['seconds']:g} s per phase at concurrency {s['concurrency']} and {s['single_seconds']:g} s at "
        f"concurrency 1, {s['rounds']} round{'s' if s['rounds'] != 1 else ''}. Figures are medians over rounds (range of requests/s in "
        f"brackets); every ratio is the median of the per-round ratios, each round's phases having run back to "
        f"back, with their range (never a best of N). `server CPU` is a server's own CPU time per answered "
        f"request (all its processes).", "",
        *common.markdown_table(["configuration", "command"], [[LABELS[v], f"`{s['commands'][v]}`"]
                                                              for v in VARIANTS], align="ll"),
        "",
    ]
    for n in ("1", big):
        lines += [f"## {n} image{'s' if n != '1' else ''} per request, concurrency {s['concurrency']}", "",
                  *common.markdown_table(["server", "requests/s", "p50 ms", "p99 ms", "server CPU µs/request",
                                          "failed"], [row(v, f["c10"][v][n]) for v in VARIANTS]),
                  "",
                  *common.markdown_table(
                      ["compared", "requests/s", "p99", "server CPU per request"],
                      [[f"{SHORT[a]} / {SHORT[b]}", fmt_ratio(f["ratios"][n][f"{a}/{b}"]["rps"]),
                        fmt_ratio(f["ratios"][n][f"{a}/{b}"]["p99"]),
                        fmt_ratio(f["ratios"][n][f"{a}/{b}"]["cpu"])] for a, b in PAIRS]),
                  ""]
    lines += ["## Latency without queueing (concurrency 1) against the in-process floor", "",
              *common.markdown_table(
                  ["", "p50 ms, 1 image", "p50 / floor, 1 image", f"p50 ms, {big} images", f"p50 / floor, {big} images"],
                  [*([LABELS[v], fmt(f["c1"][v]["1"]["p50_ms"], ".2f"), fmt_ratio(f["over_floor"]["1"][v]),
                      fmt(f["c1"][v][big]["p50_ms"], ".1f"), fmt_ratio(f["over_floor"][big][v])] for v in VARIANTS),
                   ["floor: `pyfunc.predict` in-process, 1 torch thread", fmt(f["floor"]["1"]["p50_ms"], ".2f"), "1",
                    fmt(f["floor"][big]["p50_ms"], ".1f"), "1"]]),
              "",
              f"`p50 / floor` is the median of the per-round ratios of a server's p50 to the floor's p50 measured "
              f"in the same round. Ours (batching on) is {fmt(f['overhead_ms']['1'], '.2f')} ms over the floor for "
              f"1 image and {fmt(f['overhead_ms'][big], '.1f')} ms for {big} images with JSON, "
              f"{fmt(f['oip_overhead_ms']['1'], '.2f')} ms and {fmt(f['oip_overhead_ms'][big], '.1f')} ms with "
              f"binary tensors (medians); MLflow's defaults "
              f"{fmt(f['mlflow_overhead_ms']['1'], '.2f')} ms and {fmt(f['mlflow_overhead_ms'][big], '.1f')} ms.", "",
              "## Targets", "",
              *common.markdown_table(["target", "result", ""], [
                  [f"requests/s >= {TARGETS['rps_ratio_1_image']:g}x MLflow's defaults (1 image, concurrency "
                   f"{s['concurrency']})", fmt_ratio(f["ratios"]["1"]["ours/mlflow"]["rps"]), ok("rps_ratio_1_image")],
                  [f"p99 <= {TARGETS['p99_ratio_1_image']:g}x MLflow's defaults (1 image, concurrency "
                   f"{s['concurrency']})", fmt_ratio(f["ratios"]["1"]["ours/mlflow"]["p99"]), ok("p99_ratio_1_image")],
                  [f"p50 <= {TARGETS['p50_over_floor_batch']:g}x the floor ({big} images, concurrency 1, Open "
                   "Inference Protocol binary tensors)", fmt_ratio(f["over_floor"][big]["ours_oip"]),
                   ok("p50_over_floor_batch")],
                  ["the same with MLflow's JSON (reported)", fmt_ratio(f["over_floor"][big]["ours"]), ""]],
                  align="lrl"),
              "",
              "## How quiet the machine was", "",
              f"Load average (1 min) during the phases: {f['load_1min_range'][0]:.1f} to {f['load_1min_range'][1]:.1f} "
              f"on {m['cores']} cores; other processes took up to {f['max_others_cpu_share']:.0%} of all CPUs during a "
              f"phase (median {f['median_others_cpu_share']:.0%}). {report['verdict']}", ""]
    return "\n".join(lines)


def main() -> int:
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
        model_uri = f"models:/{common.MODEL_NAME}/1"
        ports = {v: common.free_port() for v in VARIANTS if v not in SERVER_OF}
        processes["ours"] = common.start_ours(workdir, tracking_uri, common.MODEL_NAME, ports["ours"], server_cpus)
        processes["ours_unbatched"] = common.start_ours(workdir, tracking_uri, common.MODEL_NAME,
                                                        ports["ours_unbatched"], server_cpus,
                                                        log_name="ours-unbatched.log", SERVING_BATCH_MAX_ROWS=1)
        # Ours first: `mlflow models serve` writes a registered_model_meta file into a local
        # artifact store's model directory, which ours' signature check then refuses.
        for v in OURS:
            common.wait_serving(ports[v], processes[v], "1")
        processes["mlflow"] = common.start_mlflow_serve(workdir, tracking_uri, model_uri, ports["mlflow"],
                                                        server_cpus)
        processes["mlflow_2x1"] = common.start_mlflow_serve_sized(workdir, tracking_uri, model_uri,
                                                                  ports["mlflow_2x1"], server_cpus, workers=2,
                                                                  threads=1, log_name="mlflow-serve-2x1.log")
        for v in MLFLOW:
            common.wait_http("127.0.0.1", ports[v], "/ping", lambda status, _: status == 200, 180, processes[v])
        for variant, server in SERVER_OF.items():
            ports[variant], processes[variant] = ports[server], processes[server]
        log(f"servers up on CPUs {server_cpus}: " + ", ".join(f"{v} on {ports[v]}" for v in VARIANTS))

        import mlflow
        import numpy as np
        import torch

        torch.set_num_threads(1)
        pyfunc = mlflow.pyfunc.load_model(model_uri)
        common.pin_self(client_cpus)
        images = common.sample_images(max(4 * args.batch_images, 256), seed=1)

        requests = {v: {n: (oip_requests if v == "ours_oip" else request_bodies)(images, n, count, ports[v])
                        for n, count in ((1, 64), (args.batch_images, 4))}
                    for v in VARIANTS}
        # Same answers from every server and from the pyfunc: they serve the same model.
        expected = pyfunc.predict(images[:args.batch_images])
        for v in VARIANTS:
            got = answered_predictions(*common.run_async(_one(ports[v], requests[v][args.batch_images][0])))
            if not np.allclose(got, expected, atol=1e-5):
                raise SystemExit(f"{v} answers differently from the in-process model")

        log("warming up every server")
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
                floor[str(n)].append(floor_latencies(pyfunc, images, n, 300 if n == 1 else 20))
    finally:
        for p in {id(p): p for p in processes.values()}.values():  # a server shared by two variants once
            common.stop_process(p)
        logs = {name: (workdir / name).read_text(errors="replace")[-1500:]
                for name in ("ours.log", "ours-unbatched.log", "mlflow-serve.log", "mlflow-serve-2x1.log")
                if (workdir / name).exists()}
        shutil.rmtree(workdir, ignore_errors=True)

    info["load_average_at_end"] = common.load_average()
    floor_figures = {}
    for n, by_round in floor.items():
        every = [x for latencies in by_round for x in latencies]
        floor_figures[n] = {"p50_ms": common.percentile(every, 50) * 1000,
                            "p99_ms": common.percentile(every, 99) * 1000, "calls": len(every),
                            "by_round_p50_ms": [common.percentile(latencies, 50) * 1000 for latencies in by_round]}
    report = summarise(samples, floor_figures, info)
    report.update(settings={"rounds": args.rounds, "seconds": args.seconds, "single_seconds": args.single_seconds,
                            "concurrency": args.concurrency, "batch_images": args.batch_images,
                            "server_cpus": server_cpus, "client_cpus": client_cpus, "commands": COMMANDS},
                  server_log_tails=logs)
    common.write_results("serving", report, markdown(report), args.out_dir)
    return 0 if all(report["targets_met"].values()) else 1


def summarise(samples: dict, floor: dict, info: dict) -> dict:
    """The report's figures from every phase's samples: medians over rounds for each server,
    and each comparison as the median of the per-round ratios with their range."""
    figures = {"c10": {}, "c1": {}, "floor": floor, "ratios": {}, "over_floor": {}, "overhead_ms": {},
               "oip_overhead_ms": {}, "mlflow_overhead_ms": {}}
    for c in ("c10", "c1"):
        for v in VARIANTS:
            figures[c][v] = {n: aggregate(runs) for n, runs in samples[c][v].items()}
    for n in floor:
        figures["ratios"][n] = {}
        for a, b in PAIRS:
            ours, theirs = samples["c10"][a][n], samples["c10"][b][n]
            figures["ratios"][n][f"{a}/{b}"] = {
                "rps": common.per_round_ratios(ours, theirs, lambda r: r["requests_per_sec"]),
                "p99": common.per_round_ratios(ours, theirs, lambda r: r["latency_ms"]["p99"]),
                # How many times `a`'s CPU per request `b` takes.
                "cpu": common.per_round_ratios(theirs, ours, lambda r: r["server_cpu_us_per_request"]),
            }
        floor_rounds = [{"latency_ms": {"p50": p50}} for p50 in floor[n]["by_round_p50_ms"]]
        figures["over_floor"][n] = {v: common.per_round_ratios(samples["c1"][v][n], floor_rounds,
                                                               lambda r: r["latency_ms"]["p50"])
                                    for v in VARIANTS}
        floor_p50 = floor[n]["p50_ms"]
        figures["overhead_ms"][n] = figures["c1"]["ours"][n]["p50_ms"] - floor_p50
        figures["oip_overhead_ms"][n] = figures["c1"]["ours_oip"][n]["p50_ms"] - floor_p50
        figures["mlflow_overhead_ms"][n] = figures["c1"]["mlflow"][n]["p50_ms"] - floor_p50
    every = [s for c in samples.values() for v in c.values() for runs in v.values() for s in runs]
    loads = [x for s in every for x in (s["load_before"][0], s["load_after"][0])]
    others = [s["others_cpu_share"] for s in every]
    figures.update(load_1min_range=[min(loads), max(loads)], max_others_cpu_share=max(others),
                   median_others_cpu_share=common.median(others))
    batch = max(floor, key=int)
    checks = {"rps_ratio_1_image": figures["ratios"]["1"]["ours/mlflow"]["rps"]["median"]
              >= TARGETS["rps_ratio_1_image"],
              "p99_ratio_1_image": figures["ratios"]["1"]["ours/mlflow"]["p99"]["median"]
              <= TARGETS["p99_ratio_1_image"],
              "p50_over_floor_batch": figures["over_floor"][batch]["ours_oip"]["median"]
              <= TARGETS["p50_over_floor_batch"]}
    quiet = figures["median_others_cpu_share"] < 0.15
    verdict = ("The machine was reasonably quiet; the ratios are meaningful." if quiet else
               "The machine was busy with other work during the runs: absolute requests/s and "
               "latencies are lower and noisier than on a quiet machine; the ratios, measured with "
               "the servers taking turns, are the figures to read, and even they carry that noise.")
    return {"date": common.now_iso(), "machine": info, "targets": TARGETS, "targets_met": checks,
            "verdict": verdict, "figures": figures, "samples": samples}


async def _one(port: int, data: bytes) -> tuple[dict, bytes]:
    conn = common.HttpConnection("127.0.0.1", port)
    try:
        status, headers, body = await conn.request(data)
    finally:
        conn.close()
    if status != 200:
        raise SystemExit(f"port {port} answered {status}: {body[:300]!r}")
    return headers, body


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: data-parallel training on CPU, one process against two, side by side.

    python -m bench.ddp_bench [--rounds 3] [--epochs 1] [--threads 1] [--batch-size 128]

On generated data of FashionMNIST's size (written as IDX files and read through
torchvision), each round runs `python -m trainer --no-tracking --device cpu --nproc W` for
every world size W (1 and 2 by default) back to back, in a rotating order, each process with
--threads torch threads. It reads the trainer's own `trained N images in T s` line (rank 0
counts the images of all ranks, from the first step to the end of the last epoch, evaluation
included) and reports images/s per world size and the scaling efficiency
(images/s at W) / (W x images/s at 1 process), as the median of the per-round ratios with
their range. --batch-size is per process, so the global batch grows with W, as it does in
the trainer. Tracking is off: this measures the training processes, not the MLflow server.
Results go to bench/results/ddp.json and bench/results/ddp.md.
"""

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import fmt_ratio, log

ROOT = Path(__file__).resolve().parents[1]
TRAINED = re.compile(r"^trained (\d+) images in ([\d.]+) s", re.MULTILINE)
ACCURACY = re.compile(r"^final eval_accuracy ([\d.]+)$", re.MULTILINE)


def measure(world_size: int, args, data_dir: Path, env: dict[str, str]) -> dict:
    command = [sys.executable, "-m", "trainer", "--no-tracking", "--device", "cpu", "--nproc", str(world_size),
               "--data-dir", str(data_dir), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--log-every", "1000000", "--no-download"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"--nproc {world_size} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}")
    images, seconds = TRAINED.search(result.stdout).groups()
    accuracy = ACCURACY.search(result.stdout)
    return {"world_size": world_size, "images": int(images), "seconds": float(seconds),
            "images_per_sec": int(images) / float(seconds), "process_seconds": wall,
            "eval_accuracy": float(accuracy.group(1)) if accuracy else None}


def summarise(samples: dict[str, list[dict]], conf: dict, info: dict) -> dict:
    names = list(samples)
    base = samples[names[0]]
    speed, efficiency = {}, {}
    for name, runs in samples.items():
        values = [r["images_per_sec"] for r in runs]
        speed[name] = {"median": statistics.median(values), "range": [min(values), max(values)]}
        # Per round: (images/s at W) / (W x images/s at 1), the two runs having met the same neighbours.
        efficiency[name] = common.ratio_summary([run["images_per_sec"] / (run["world_size"] * one["images_per_sec"])
                                                 for run, one in zip(runs, base, strict=True)])
    return {"date": common.now_iso(), "machine": info, "settings": conf,
            "figures": {"images_per_sec": speed, "scaling_efficiency": efficiency}, "samples": samples}


def markdown(report: dict) -> str:
    f, s = report["figures"], report["settings"]
    rows = []
    for name, speed in f["images_per_sec"].items():
        low, high = speed["range"]
        size = report["samples"][name][0]["world_size"]
        rows.append([f"`--nproc {size}`", f"{size * s['batch_size']}",
                     f"{speed['median']:,.0f} ({low:,.0f} to {high:,.0f})", fmt_ratio(f["scaling_efficiency"][name])])
    table = common.markdown_table(["processes", "global batch", "images/s, median (range)",
                                   "scaling efficiency"], rows)
    return "\n".join([
        *common.heading("Data-parallel trainer benchmark (CPU, gloo)", report),
        f"Generated data ({s['train_images']:,} + {s['test_images']:,} images), small CNN, batch {s['batch_size']} "
        f"per process, {s['epochs']} epoch(s) with evaluation, tracking off, {s['threads']} torch thread(s) per "
        f"process; {s['rounds']} round(s), each running every world size back to back in a rotating order. "
        "Scaling efficiency is (images/s at W) / (W x images/s at 1 process), the median of the per-round "
        "ratios with their range.", "", *table, ""])


def main() -> int:
    parser = common.arguments(__doc__, rounds=3, rounds_help="rounds, each running every world size",
                              quiet_threshold=0.10, quiet_patience=30)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every run (default 1)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step and process (default 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--world-sizes", default="1,2", help="process counts to compare, 1 first (default 1,2)")
    parser.add_argument("--train-images", type=int, default=60_000, help="generated training images (default 60000)")
    parser.add_argument("--test-images", type=int, default=10_000, help="generated test images (default 10000)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.world_sizes.split(",")]
    if sizes[0] != 1:
        parser.error("--world-sizes must start with 1, the baseline of the efficiency")

    from trainer import synthetic

    common.exit_on_signals(signal.SIGTERM, signal.SIGINT)
    info = common.machine()
    workdir = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    data_dir = workdir / "data"
    log(f"writing {args.train_images}+{args.test_images} generated images to {data_dir}")
    synthetic.write_dataset(data_dir, args.train_images, args.test_images, seed=0)
    # The launcher leaves a thread count that is set alone: every process gets --threads.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    names = [f"nproc_{size}" for size in sizes]
    samples: dict[str, list[dict]] = {name: [] for name in names}
    try:
        for r, order in common.rounds(args.rounds, names, args.quiet_threshold, args.quiet_patience):
            for name in order:
                result = measure(int(name.removeprefix("nproc_")), args, data_dir, env)
                samples[name].append(result)
                log(f"round {r + 1}/{args.rounds} {name}: {result['images_per_sec']:,.0f} images/s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info["load_average_at_end"] = common.load_average()
    conf = {"rounds": args.rounds, "epochs": args.epochs, "batch_size": args.batch_size, "threads": args.threads,
            "world_sizes": sizes, "train_images": args.train_images, "test_images": args.test_images,
            "quiet_threshold": args.quiet_threshold, "quiet_patience_s": args.quiet_patience}
    report = summarise(samples, conf, info)
    common.write_results("ddp", report, markdown(report), args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: our trainer against MLflow's PyTorch quickstart loop, side by side.

    python bench/trainer_bench.py [--epochs 3] [--repeats 3] [--recipe-epochs 2]

On generated data of FashionMNIST's full size (60,000 + 10,000 images written as IDX files
and read through torchvision), against a real `mlflow server` started here on a free
loopback port (SQLite backend, local artifacts) and stopped at the end, it measures:

  quickstart   the quickstart's loop: ToTensor, DataLoader(batch_size=64), its CNN, SGD
               lr 1e-3, synchronous mlflow.log_metric every 100 batches, eval per epoch
  trainer      python -m trainer with the same model, batch size, optimizer and epochs
  untracked    the same with --no-tracking: the logging overhead is the difference
  bound        the same model stepping over pre-loaded, pre-standardised tensors with no
               logging and no evaluation: the compute bound both are compared with
  recipe       python -m trainer with its defaults, for --recipe-epochs

images/s counts training images over the span from the first step to the end of the last
epoch (evaluation, logging and checkpoints included; process start, data loading and the
final model upload excluded) for the quickstart and the trainer alike. Each measurement
runs in a fresh process; the configurations take turns, --repeats times, and the best run
of each counts, because on a shared machine neighbours only ever slow a run down. Results go to bench/results/trainer.json
and bench/results/trainer.md.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import common
from bench.common import log, signing_keys

ROOT = Path(__file__).resolve().parents[1]

TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000
BATCH_SIZE, LR = 64, 1e-3
LOG_EVERY_BATCHES = 100  # the quickstart's logging interval
TARGETS = {"speedup": 1.5, "efficiency": 0.90, "logging_overhead": 0.02}
# Before each measurement, wait (up to --quiet-patience seconds) until other processes use
# less than this share of the CPUs: the machine is shared and its neighbours come and go.
QUIET_THRESHOLD = 0.10


# --- the measured programs, each run as `trainer_bench.py --role NAME` in its own process


def quickstart_loop(data_dir, tracking_uri, epochs):
    """MLflow's PyTorch quickstart loop, as its tutorial writes it."""
    import mlflow
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    training_data = datasets.FashionMNIST(root=data_dir, train=True, download=True, transform=ToTensor())
    test_data = datasets.FashionMNIST(root=data_dir, train=False, download=True, transform=ToTensor())
    train_dataloader = DataLoader(training_data, batch_size=BATCH_SIZE)
    test_dataloader = DataLoader(test_data, batch_size=BATCH_SIZE)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(10)).to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("bench-quickstart")
    with mlflow.start_run():
        mlflow.log_params({"epochs": epochs, "batch_size": BATCH_SIZE, "learning_rate": LR,
                           "loss_function": "CrossEntropyLoss", "optimizer": "SGD"})
        started = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            for batch, (X, y) in enumerate(train_dataloader):
                X, y = X.to(device), y.to(device)
                pred = model(X)
                loss = loss_fn(pred, y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if batch % LOG_EVERY_BATCHES == 0:
                    # The tutorial computes accuracy with torchmetrics on every batch; only
                    # logged batches do it here, which if anything favours this loop.
                    accuracy = (pred.argmax(1) == y).float().mean().item()
                    step = epoch * len(train_dataloader) + batch
                    mlflow.log_metric("loss", loss.item(), step=step)
                    mlflow.log_metric("accuracy", accuracy, step=step)
                    print(f"loss: {loss.item():3f} accuracy: {accuracy:3f} [{batch} / {len(train_dataloader)}]")
            model.eval()
            eval_loss, correct = 0.0, 0
            with torch.no_grad():
                for X, y in test_dataloader:
                    X, y = X.to(device), y.to(device)
                    pred = model(X)
                    eval_loss += loss_fn(pred, y).item()
                    correct += (pred.argmax(1) == y).sum().item()
            eval_loss /= len(test_dataloader)
            eval_accuracy = correct / len(test_data)
            mlflow.log_metric("eval_loss", eval_loss, step=epoch)
            mlflow.log_metric("eval_accuracy", eval_accuracy, step=epoch)
        seconds = time.perf_counter() - started
    return {"images": epochs * len(training_data), "seconds": seconds, "eval_accuracy": eval_accuracy}


def compute_bound(data_dir, epochs):
    """The quickstart CNN, prepared and stepped exactly as the trainer steps it, over
    batches built before the clock starts: no data work, no logging, no evaluation."""
    import torch
    import torch.nn.functional as F

    from trainer import architectures, data, loop

    train, _ = data.load(data_dir, download=False)
    batches = [(data.standardise(train.images[i:i + BATCH_SIZE]), train.labels[i:i + BATCH_SIZE])
               for i in range(0, len(train), BATCH_SIZE)]
    torch.manual_seed(0)
    model = loop.prepare(architectures.build("quickstart"), torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    started = time.perf_counter()
    for _ in range(epochs):
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    return {"images": epochs * len(train), "seconds": seconds}


def run_role(args):
    if args.role == "quickstart":
        result = quickstart_loop(args.data_dir, args.tracking_uri, args.epochs)
    else:
        result = compute_bound(args.data_dir, args.epochs)
    print("RESULT " + json.dumps(result))
    return 0


# --- orchestration


def start_server(workdir):
    port = common.free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "2", "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
               "--artifacts-destination", str(workdir / "artifacts")]
    server_log = open(workdir / "server.log", "w")  # noqa: SIM115 - the server writes to it after we return
    # Its own session, so stopping it stops its uvicorn workers and nothing else.
    process = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, cwd=workdir,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    from trainer import tracking

    try:
        tracking.connect(url, timeout_s=120, log=lambda *a, **k: None)
    except tracking.TrackingUnavailable:
        common.stop_process(process)
        raise SystemExit(f"mlflow server did not come up; see {workdir / 'server.log'}") from None
    return process, url


def children_jiffies():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * os.sysconf("SC_CLK_TCK")


def run(command, env, label, patience_s):
    common.wait_until_quiet(QUIET_THRESHOLD, patience_s)
    busy0, total0 = common.machine_jiffies()
    ours0 = children_jiffies()
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    wall = time.perf_counter() - started
    busy1, total1 = common.machine_jiffies()
    # CPU time spent by anything but the measured process (the tracking server included),
    # as a share of the machine: how much the measurement was disturbed.
    others = max(0.0, (busy1 - busy0) - (children_jiffies() - ours0)) / max(total1 - total0, 1)
    if result.returncode != 0:
        raise SystemExit(f"{label} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout, wall, others


def measure_role(role, data_dir, url, epochs, env, patience_s):
    command = [sys.executable, "-m", "bench.trainer_bench", "--role", role, "--data-dir", str(data_dir),
               "--tracking-uri", url, "--epochs", str(epochs)]
    out, wall, others = run(command, env, role, patience_s)
    result = json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))
    result.update(images_per_sec=result["images"] / result["seconds"], process_seconds=wall,
                  other_cpu_share=others)
    return result


TRAINED = re.compile(r"^trained (\d+) images in ([\d.]+) s", re.MULTILINE)
EPOCH = re.compile(r"^epoch (\d+)/\d+  eval_loss [\d.]+  eval_accuracy ([\d.]+)  ([\d.]+) s$", re.MULTILINE)


def measure_trainer(args, data_dir, env, patience_s):
    out, wall, others = run([sys.executable, "-m", "trainer", "--data-dir", str(data_dir), *args], env, "trainer",
                            patience_s)
    images, seconds = TRAINED.search(out).groups()
    epochs = EPOCH.findall(out)
    return {"images": int(images), "seconds": float(seconds), "images_per_sec": int(images) / float(seconds),
            "process_seconds": wall, "other_cpu_share": others, "eval_accuracy": float(epochs[-1][1]),
            "epoch_seconds": [float(e[2]) for e in epochs]}


def machine():
    import torch

    info = common.machine()
    info.update(torch_threads=torch.get_num_threads(), torch=info["packages"]["torch"],
                mlflow=info["packages"]["mlflow"],
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


def best_of(samples, key="images_per_sec"):
    return max(s[key] for s in samples)


def median_of(samples, key="images_per_sec"):
    return statistics.median(s[key] for s in samples)


def summarise(samples, recipe, conf, info):
    # Best of N for every configuration alike: interference from neighbours only ever
    # slows a run down, so the fastest run is the closest to the machine's own speed.
    quickstart, trainer, untracked, bound = (
        best_of(samples[k]) for k in ("quickstart", "trainer", "untracked", "bound"))
    medians = {f"{k}_median_images_per_sec": median_of(v) for k, v in samples.items()}
    figures = {
        "quickstart_images_per_sec": quickstart,
        "trainer_images_per_sec": trainer,
        "trainer_untracked_images_per_sec": untracked,
        "compute_bound_images_per_sec": bound,
        "speedup": trainer / quickstart,
        "trainer_efficiency": trainer / bound,
        "quickstart_efficiency": quickstart / bound,
        "logging_overhead": 1 - trainer / untracked,
        "quickstart_eval_accuracy": samples["quickstart"][-1]["eval_accuracy"],
        "trainer_eval_accuracy": samples["trainer"][-1]["eval_accuracy"],
        "recipe_images_per_sec": recipe["images_per_sec"],
        "recipe_epoch_seconds": statistics.mean(recipe["epoch_seconds"]),
        "recipe_eval_accuracy": recipe["eval_accuracy"],
        "max_other_cpu_share": max(r["other_cpu_share"] for runs in samples.values() for r in runs),
        **medians,
    }
    checks = {
        "speedup": figures["speedup"] >= TARGETS["speedup"],
        "efficiency": figures["trainer_efficiency"] >= TARGETS["efficiency"],
        "logging_overhead": figures["logging_overhead"] <= TARGETS["logging_overhead"],
    }
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": info,
            "settings": conf, "targets": TARGETS, "figures": figures, "targets_met": checks,
            "samples": samples, "recipe": recipe}


def markdown(report):
    f, m, s = report["figures"], report["machine"], report["settings"]
    met = report["targets_met"]

    def ok(key):
        return "met" if met[key] else "MISSED"

    gpu = m["gpu"] or "none"
    return f"""# Trainer benchmark

{report['date']}; machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads),
{m['memory_gib']} GiB, GPU {gpu}; {m['os']}; Python {m['python']}, torch {m['torch']}, mlflow
{m['mlflow']}. The machine is shared: before each run the bench waited up to
{s['quiet_patience_s']:g} s for other processes to use under {QUIET_THRESHOLD:.0%} of the CPUs; during the
runs they used up to {f['max_other_cpu_share']:.0%} of them (the tracking server's share included). Generated data of FashionMNIST's size ({TRAIN_IMAGES:,} + {TEST_IMAGES:,}
images, IDX files read through torchvision), a real `mlflow server` on loopback.
Quickstart model, batch {BATCH_SIZE}, SGD lr {LR:g}, {s['epochs']} epochs, evaluation every
epoch; {s['repeats']} runs of each, taking turns; the best run counts (medians for reference).

| | images/s | median | share of compute bound |
|---|---:|---:|---:|
| quickstart loop (ToTensor + DataLoader, sync log_metric) | {f['quickstart_images_per_sec']:,.0f} | {f['quickstart_median_images_per_sec']:,.0f} | {f['quickstart_efficiency']:.1%} |
| `python -m trainer --arch quickstart` (tracking on) | {f['trainer_images_per_sec']:,.0f} | {f['trainer_median_images_per_sec']:,.0f} | {f['trainer_efficiency']:.1%} |
| same, `--no-tracking` | {f['trainer_untracked_images_per_sec']:,.0f} | {f['untracked_median_images_per_sec']:,.0f} | {f['trainer_untracked_images_per_sec'] / f['compute_bound_images_per_sec']:.1%} |
| compute bound (pre-loaded tensors, no logging, no eval) | {f['compute_bound_images_per_sec']:,.0f} | {f['bound_median_images_per_sec']:,.0f} | 100% |

| target | result | |
|---|---:|---|
| trainer / quickstart >= {TARGETS['speedup']}x | {f['speedup']:.2f}x | {ok('speedup')} |
| trainer / compute bound >= {TARGETS['efficiency']:.0%} | {f['trainer_efficiency']:.1%} | {ok('efficiency')} |
| logging overhead (tracking on vs off) <= {TARGETS['logging_overhead']:.0%} | {f['logging_overhead']:.1%} | {ok('logging_overhead')} |

Eval accuracy after {s['epochs']} epochs on the generated data: quickstart
{f['quickstart_eval_accuracy']:.3f}, trainer {f['trainer_eval_accuracy']:.3f}.

Default recipe (`python -m trainer`: small CNN, batch 128, AdamW, cosine), {s['recipe_epochs']}
epoch(s): {f['recipe_images_per_sec']:,.0f} images/s, {f['recipe_epoch_seconds']:.1f} s per epoch
(training plus evaluation), eval accuracy {f['recipe_eval_accuracy']:.3f}.
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the side-by-side runs (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration (default 3)")
    parser.add_argument("--recipe-epochs", type=int, default=2, help="epochs of the default recipe (default 2)")
    parser.add_argument("--quiet-patience", type=float, default=30,
                        help="seconds to wait for a quiet machine before each run (default 30)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--role", choices=["quickstart", "bound"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return run_role(args)

    from trainer import synthetic

    def stop(signum, frame):
        raise SystemExit(f"stopped by {signal.Signals(signum).name}")

    # SIGTERM (and SIGINT in a background job) must still run the clean-up below.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    data_dir = workdir / "data"
    log(f"writing {TRAIN_IMAGES}+{TEST_IMAGES} generated images to {data_dir}")
    synthetic.write_dataset(data_dir, TRAIN_IMAGES, TEST_IMAGES, seed=0)
    server, url = start_server(workdir)
    log(f"mlflow server up at {url}")
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(ROOT), "TRAINER_NO_DOWNLOAD": "1",
           "EXPERIMENT_NAME": "bench-trainer", "MODEL_NAME": "bench-fashion-mnist",
           "MODEL_SIGNING_KEY": signing_keys()["MODEL_SIGNING_KEY"]}
    same_as_quickstart = ["--arch", "quickstart", "--batch-size", str(BATCH_SIZE), "--optimizer", "sgd",
                          "--lr", str(LR), "--lr-schedule", "constant", "--epochs", str(args.epochs),
                          "--seed", "0"]
    configurations = {
        "quickstart": lambda: measure_role("quickstart", data_dir, url, args.epochs, env, args.quiet_patience),
        "trainer": lambda: measure_trainer(same_as_quickstart + ["--promotion-policy", "never"], data_dir, env,
                                           args.quiet_patience),
        "untracked": lambda: measure_trainer(same_as_quickstart + ["--no-tracking"], data_dir, env,
                                             args.quiet_patience),
        "bound": lambda: measure_role("bound", data_dir, url, args.epochs, env, args.quiet_patience),
    }
    samples = {name: [] for name in configurations}
    try:
        names = list(configurations)
        for repeat in range(args.repeats):
            # Rotating the order spreads slow phases of a shared machine over all of them.
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                result = configurations[name]()
                samples[name].append(result)
                log(f"round {repeat + 1}/{args.repeats} {name}: {result['images_per_sec']:,.0f} images/s")
        recipe = measure_trainer(["--epochs", str(args.recipe_epochs), "--promotion-policy", "never"], data_dir, env,
                                 args.quiet_patience)
        log(f"default recipe: {recipe['images_per_sec']:,.0f} images/s")
    finally:
        common.stop_process(server)
        shutil.rmtree(workdir, ignore_errors=True)

    info["load_average_at_end"] = os.getloadavg()
    conf = {"epochs": args.epochs, "repeats": args.repeats, "recipe_epochs": args.recipe_epochs,
            "quiet_threshold": QUIET_THRESHOLD, "quiet_patience_s": args.quiet_patience,
            "batch_size": BATCH_SIZE, "lr": LR, "train_images": TRAIN_IMAGES, "test_images": TEST_IMAGES}
    report = summarise(samples, recipe, conf, info)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "trainer.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "trainer.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(report["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: our trainer against MLflow's PyTorch quickstart loop, side by side.

    python -m bench.trainer_bench [--epochs 3] [--rounds 3] [--threads N] [--recipe-epochs 2]

On generated data of FashionMNIST's full size (60,000 + 10,000 images written as IDX files
and read through torchvision), against a real `mlflow server` started here on a free
loopback port (SQLite backend, local artifacts) and stopped at the end, it measures:

  quickstart   the quickstart's loop: ToTensor, DataLoader(batch_size=64), its CNN, SGD
               lr 1e-3, synchronous mlflow.log_metric every 100 batches, eval per epoch
  trainer      python -m trainer with the same model, batch size, optimizer and epochs
  untracked    the same with --no-tracking: the logging overhead is the difference
  bound        the same model stepping over pre-loaded, pre-standardised tensors with no
               logging, and the trainer's own evaluation of the pre-loaded test images once
               per epoch (both others evaluate every epoch too, inside their timed span):
               the compute bound both are compared with
  bound_training  the same without the evaluation, shown beside it: how much of every
               timed span the evaluation takes
  recipe       python -m trainer with its defaults, for --recipe-epochs

images/s counts training images over the span from the first step to the end of the last
epoch (evaluation, logging and checkpoints included; process start, data loading and the
final model upload excluded) for the quickstart and the trainer alike. Each measurement
runs in a fresh process with the same torch thread count (--threads); every round runs all
of them back to back, in a rotating order, --rounds times. Each comparison is the median of
the per-round ratios with their range, never a best of N: on a shared machine the fastest
run of one side and of the other need not have met the same neighbours. Results go to
bench/results/trainer.json and bench/results/trainer.md.
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
from pathlib import Path

from bench import common
from bench.common import fmt_ratio, log, signing_keys

ROOT = Path(__file__).resolve().parents[1]

TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000
BATCH_SIZE, LR = 64, 1e-3
LOG_EVERY_BATCHES = 100  # the quickstart's logging interval
# The ratio to the quickstart loop is reported, not a target: it depends on the CPU (the
# quickstart's per-image ToTensor costs more on some than on others).
TARGETS = {"efficiency": 0.90, "logging_overhead": 0.02}
CONFIGURATIONS = ("quickstart", "trainer", "untracked", "bound", "bound_training")


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


def compute_bound(data_dir, epochs, evaluate=True):
    """The quickstart CNN, prepared and stepped exactly as the trainer steps it, over
    batches built before the clock starts: no data work and no logging. Each epoch ends
    with the trainer's evaluation of the test images, as the trainer's and the quickstart's
    timed spans do; leaving it out would count it as overhead of the loops measured."""
    import torch
    import torch.nn.functional as F

    from trainer import architectures, data, loop

    train, test = data.load(data_dir, download=False)
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
        if evaluate:
            loop.evaluate(model, test, torch.device("cpu"))
            model.train()
    seconds = time.perf_counter() - started
    return {"images": epochs * len(train), "seconds": seconds}


def run_role(args):
    if args.role == "quickstart":
        result = quickstart_loop(args.data_dir, args.tracking_uri, args.epochs)
    else:
        result = compute_bound(args.data_dir, args.epochs, evaluate=args.role == "bound")
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


def run(command, env, label):
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


def measure_role(role, data_dir, url, epochs, env):
    command = [sys.executable, "-m", "bench.trainer_bench", "--role", role, "--data-dir", str(data_dir),
               "--tracking-uri", url, "--epochs", str(epochs)]
    out, wall, others = run(command, env, role)
    result = json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))
    result.update(images_per_sec=result["images"] / result["seconds"], process_seconds=wall,
                  other_cpu_share=others)
    return result


TRAINED = re.compile(r"^trained (\d+) images in ([\d.]+) s", re.MULTILINE)
EPOCH = re.compile(r"^epoch (\d+)/\d+  eval_loss [\d.]+  eval_accuracy ([\d.]+)  ([\d.]+) s "
                   r"\(evaluation ([\d.]+) s\)$", re.MULTILINE)


def measure_trainer(args, data_dir, env):
    out, wall, others = run([sys.executable, "-m", "trainer", "--data-dir", str(data_dir), *args], env, "trainer")
    images, seconds = TRAINED.search(out).groups()
    epochs = EPOCH.findall(out)
    evaluating = sum(float(e[3]) for e in epochs)
    return {"images": int(images), "seconds": float(seconds), "images_per_sec": int(images) / float(seconds),
            # The same span less its evaluations: what the training-only bound is compared with.
            "training_images_per_sec": int(images) / (float(seconds) - evaluating),
            "process_seconds": wall, "other_cpu_share": others, "eval_accuracy": float(epochs[-1][1]),
            "epoch_seconds": [float(e[2]) for e in epochs]}


def machine(threads):
    import torch

    info = common.machine()
    info.update(torch_threads=threads, torch=info["packages"]["torch"],
                mlflow=info["packages"]["mlflow"],
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


def images_per_sec(run):
    return run["images_per_sec"]


def summarise(samples, recipe, conf, info):
    """Each configuration's images/s as the median over rounds with its range, and every
    comparison as the median of the per-round ratios (the runs of one round ran back to
    back) with their range."""
    speed = {}
    for name, runs in samples.items():
        values = [r["images_per_sec"] for r in runs]
        speed[name] = {"median": statistics.median(values), "range": [min(values), max(values)]}
    ratio = {f"{a}_to_{b}": common.per_round_ratios(samples[a], samples[b], images_per_sec)
             for a, b in (("trainer", "quickstart"), ("trainer", "bound"), ("quickstart", "bound"),
                          ("untracked", "bound"), ("trainer", "untracked"), ("bound_training", "bound"))}
    ratio["trainer_training_to_bound_training"] = common.per_round_ratios(
        samples["trainer"], samples["bound_training"], lambda run: run.get("training_images_per_sec")
        or run["images_per_sec"])
    tracked = ratio["trainer_to_untracked"]
    figures = {
        "images_per_sec": speed,
        "ratios": ratio,
        "speedup": ratio["trainer_to_quickstart"]["median"],
        "trainer_efficiency": ratio["trainer_to_bound"]["median"],
        # 1 - (tracking on / off) per round: its median and range, the range turned round.
        "logging_overhead": {"median": round(1 - tracked["median"], 3),
                             "range": [round(1 - tracked["range"][1], 3), round(1 - tracked["range"][0], 3)]},
        "quickstart_eval_accuracy": statistics.median(r["eval_accuracy"] for r in samples["quickstart"]),
        "trainer_eval_accuracy": statistics.median(r["eval_accuracy"] for r in samples["trainer"]),
        "recipe_images_per_sec": recipe["images_per_sec"],
        "recipe_epoch_seconds": statistics.mean(recipe["epoch_seconds"]),
        "recipe_eval_accuracy": recipe["eval_accuracy"],
        "max_other_cpu_share": max(r["other_cpu_share"] for runs in samples.values() for r in runs),
    }
    checks = {
        "efficiency": figures["trainer_efficiency"] >= TARGETS["efficiency"],
        "logging_overhead": figures["logging_overhead"]["median"] <= TARGETS["logging_overhead"],
    }
    return {"date": common.now_iso(), "machine": info, "settings": conf, "targets": TARGETS, "figures": figures,
            "targets_met": checks, "samples": samples, "recipe": recipe}


def markdown(report):
    f, m, s = report["figures"], report["machine"], report["settings"]
    met = report["targets_met"]
    speed, ratio = f["images_per_sec"], f["ratios"]

    def ok(key):
        return "met" if met[key] else "MISSED"

    def images(name):
        low, high = speed[name]["range"]
        return f"{speed[name]['median']:,.0f} ({low:,.0f} to {high:,.0f})"

    overhead = f["logging_overhead"]
    gpu = m["gpu"] or "none"
    table = common.markdown_table(["", "images/s, median (range)", "share of compute bound"], [
        ["quickstart loop (ToTensor + DataLoader, sync log_metric)", images("quickstart"),
         fmt_ratio(ratio["quickstart_to_bound"])],
        ["`python -m trainer --arch quickstart` (tracking on)", images("trainer"), fmt_ratio(ratio["trainer_to_bound"])],
        ["same, `--no-tracking`", images("untracked"), fmt_ratio(ratio["untracked_to_bound"])],
        ["compute bound (pre-loaded tensors, no logging, the same evaluation per epoch)", images("bound"),
         "1.00x"],
        ["the same without the evaluation", images("bound_training"), fmt_ratio(ratio["bound_training_to_bound"])],
    ])
    targets = common.markdown_table(["target", "result", ""], [
        ["trainer / quickstart (reported: it depends on the CPU)", fmt_ratio(ratio["trainer_to_quickstart"]), ""],
        [f"trainer / compute bound >= {TARGETS['efficiency']:.2f}x", fmt_ratio(ratio["trainer_to_bound"]),
         ok("efficiency")],
        ["the same, training steps only (each epoch's evaluation time taken out of the trainer's span, "
         "against the bound without evaluation)", fmt_ratio(ratio["trainer_training_to_bound_training"]), ""],
        [f"logging overhead (1 - tracking on / off) <= {TARGETS['logging_overhead']:.0%}",
         f"{overhead['median']:.1%} ({overhead['range'][0]:.1%} to {overhead['range'][1]:.1%})",
         ok("logging_overhead")],
    ], align="lrl")
    return "\n".join([
        "# Trainer benchmark", "",
        f"{report['date']}; machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads in every "
        f"run), {m['memory_gib']} GiB, GPU {gpu}; {m['os']}; Python {m['python']}, torch {m['torch']}, mlflow "
        f"{m['mlflow']}. The machine is shared: before each round the bench waited up to "
        f"{s['quiet_patience_s']:g} s for other processes to use under {s['quiet_threshold']:.0%} of the CPUs; during "
        f"the runs they used up to {f['max_other_cpu_share']:.0%} of them (the tracking server's share included). "
        f"Generated data of FashionMNIST's size ({TRAIN_IMAGES:,} + {TEST_IMAGES:,} images, IDX files read through "
        f"torchvision), a real `mlflow server` on loopback. Quickstart model, batch {BATCH_SIZE}, SGD lr {LR:g}, "
        f"{s['epochs']} epochs, evaluation every epoch; {s['rounds']} rounds, each running every configuration "
        f"back to back in a rotating order. Ratios are the median of the per-round ratios, the range in brackets.",
        "", *table, "", *targets, "",
        f"Eval accuracy after {s['epochs']} epochs on the generated data: quickstart "
        f"{f['quickstart_eval_accuracy']:.3f}, trainer {f['trainer_eval_accuracy']:.3f}.", "",
        f"Default recipe (`python -m trainer`: small CNN, batch 128, AdamW, cosine), {s['recipe_epochs']} "
        f"epoch(s), one run: {f['recipe_images_per_sec']:,.0f} images/s, {f['recipe_epoch_seconds']:.1f} s per epoch "
        f"(training plus evaluation), eval accuracy {f['recipe_eval_accuracy']:.3f}.", "",
    ])


def main():
    parser = common.arguments(__doc__, rounds=3, rounds_help="rounds, each running every configuration",
                              quiet_threshold=0.10, quiet_patience=30)
    # The earlier name of --rounds, still accepted.
    parser.add_argument("--repeats", type=int, dest="rounds", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the side-by-side runs (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every measured process (default: torch's own count here)")
    parser.add_argument("--recipe-epochs", type=int, default=2, help="epochs of the default recipe (default 2)")
    parser.add_argument("--role", choices=["quickstart", "bound", "bound_training"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return run_role(args)

    import torch

    from trainer import synthetic

    # SIGTERM (and SIGINT in a background job) must still run the clean-up below.
    common.exit_on_signals(signal.SIGTERM, signal.SIGINT)
    threads = args.threads or torch.get_num_threads()
    info = machine(threads)
    workdir = Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    data_dir = workdir / "data"
    log(f"writing {TRAIN_IMAGES}+{TEST_IMAGES} generated images to {data_dir}")
    synthetic.write_dataset(data_dir, TRAIN_IMAGES, TEST_IMAGES, seed=0)
    server, url = start_server(workdir)
    log(f"mlflow server up at {url}")
    # The same thread count for every configuration: torch reads it at start-up.
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(ROOT), "TRAINER_NO_DOWNLOAD": "1",
           "EXPERIMENT_NAME": "bench-trainer", "MODEL_NAME": "bench-fashion-mnist",
           "MODEL_SIGNING_KEY": signing_keys()["MODEL_SIGNING_KEY"], "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    same_as_quickstart = ["--arch", "quickstart", "--batch-size", str(BATCH_SIZE), "--optimizer", "sgd",
                          "--lr", str(LR), "--lr-schedule", "constant", "--epochs", str(args.epochs),
                          "--seed", "0"]
    configurations = {
        "quickstart": lambda: measure_role("quickstart", data_dir, url, args.epochs, env),
        "trainer": lambda: measure_trainer(same_as_quickstart + ["--promotion-policy", "never"], data_dir, env),
        "untracked": lambda: measure_trainer(same_as_quickstart + ["--no-tracking"], data_dir, env),
        "bound": lambda: measure_role("bound", data_dir, url, args.epochs, env),
        "bound_training": lambda: measure_role("bound_training", data_dir, url, args.epochs, env),
    }
    samples = {name: [] for name in CONFIGURATIONS}
    try:
        for r, order in common.rounds(args.rounds, CONFIGURATIONS, args.quiet_threshold, args.quiet_patience):
            for name in order:
                result = configurations[name]()
                samples[name].append(result)
                log(f"round {r + 1}/{args.rounds} {name}: {result['images_per_sec']:,.0f} images/s")
        recipe = measure_trainer(["--epochs", str(args.recipe_epochs), "--promotion-policy", "never"], data_dir, env)
        log(f"default recipe: {recipe['images_per_sec']:,.0f} images/s")
    finally:
        common.stop_process(server)
        shutil.rmtree(workdir, ignore_errors=True)

    info["load_average_at_end"] = common.load_average()
    conf = {"epochs": args.epochs, "rounds": args.rounds, "threads": threads, "recipe_epochs": args.recipe_epochs,
            "quiet_threshold": args.quiet_threshold, "quiet_patience_s": args.quiet_patience,
            "batch_size": BATCH_SIZE, "lr": LR, "train_images": TRAIN_IMAGES, "test_images": TEST_IMAGES}
    report = summarise(samples, recipe, conf, info)
    common.write_results("trainer", report, markdown(report), args.out_dir)
    return 0 if all(report["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

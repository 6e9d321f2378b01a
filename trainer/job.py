"""The training job behind `python -m trainer`, top to bottom: check the flags; load the
data; reach the tracking server; start a run; train and evaluate epoch by epoch with a
checkpoint after each; log the served model and the evaluation artifacts; register a
version; move the alias per policy; print the run URL, the version and whether it was
promoted.
"""

import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import mlflow
import torch

from trainer import architectures, checkpoints, data, export, loop, registry, report, tracking
from trainer.config import ConfigError

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def say(message=""):
    print(message, flush=True)


def warn(message):
    print(message, file=sys.stderr, flush=True)


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a stop between steps, so a checkpoint of a
    consistent state can be saved; a second signal stops at once."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        warn(f"{self.received} received: stopping after this step and saving a checkpoint "
             "(send it again to stop at once)")

    def __call__(self):
        return self.received is not None


def git_commit():
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def fit(model, optimizer, train_split, test_split, conf, device, progress, logger, stop,
        on_epoch_end=lambda progress: None):
    """Train until conf.epochs are complete; return the last evaluation."""
    steps = data.steps_per_epoch(len(train_split), conf.batch_size)
    total_steps = conf.epochs * steps

    def on_log(metrics, p):
        logger.log({"train_loss": metrics["loss"], "train_accuracy": metrics["accuracy"],
                    "train_images_per_sec": metrics["images_per_sec"], "lr": metrics["lr"]}, p.global_step)
        say(f"epoch {p.epoch + 1}/{conf.epochs}  step {p.step_in_epoch}/{steps}  "
            f"global {p.global_step}  loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.4f}  "
            f"{metrics['images_per_sec']:.0f} img/s")

    per_epoch = len(train_split) - (1 if len(train_split) % conf.batch_size == 1 else 0)
    images = (conf.epochs - progress.epoch) * per_epoch - progress.step_in_epoch * conf.batch_size
    fit_started = time.perf_counter()
    evaluation = None
    while progress.epoch < conf.epochs:
        started = time.perf_counter()
        loop.train_epoch(model, optimizer, train_split, progress, seed=conf.seed,
                         batch_size=conf.batch_size, lr=conf.lr, lr_schedule=conf.lr_schedule,
                         total_steps=total_steps, log_every=conf.log_every, device=device,
                         on_log=on_log, should_stop=stop)
        evaluation = loop.evaluate(model, test_split, device)
        seconds = time.perf_counter() - started
        logger.log({"eval_loss": evaluation["loss"], "eval_accuracy": evaluation["accuracy"],
                    "epoch": progress.epoch, "epoch_seconds": seconds}, progress.global_step)
        say(f"epoch {progress.epoch}/{conf.epochs}  eval_loss {evaluation['loss']:.4f}  "
            f"eval_accuracy {evaluation['accuracy']:.4f}  {seconds:.1f} s")
        on_epoch_end(progress)
    seconds = time.perf_counter() - fit_started
    # Everything between the first step and the last checkpoint counts: evaluation,
    # logging and checkpoints included. The benchmark reads this line.
    say(f"trained {images} images in {seconds:.2f} s: {images / seconds:.0f} images/s")
    return evaluation


def build(conf, device):
    torch.manual_seed(conf.seed)
    model = loop.prepare(architectures.build(conf.arch), device)
    optimizer = loop.make_optimizer(conf.optimizer, model, conf.lr)
    return model, optimizer


def run_untracked(conf, device, train_split, test_split):
    model, optimizer = build(conf, device)
    with StopSignals() as stop:
        try:
            evaluation = fit(model, optimizer, train_split, test_split, conf, device,
                             loop.Progress(), tracking.NoLogger(), stop)
        except loop.StopRequested:
            say("run: none (tracking off)\nversion: none\n"
                f"promoted: no (stopped by {stop.received})")
            return EXIT_SIGNAL[stop.received]
    say(f"final eval_accuracy {evaluation['accuracy']:.4f}")
    say("run: none (tracking off)\nversion: none\npromoted: no (tracking off)")
    return 0


def params_of(conf, device, model, train_split, test_split):
    params = {key: value for key, value in vars(conf).items() if key not in ("tracking", "tracking_uri", "signing_key")}
    params.update(
        data_dir=str(conf.data_dir),
        device=str(device),
        amp="bf16" if device.type == "cuda" else "off",
        train_samples=len(train_split),
        test_samples=len(test_split),
        steps_per_epoch=data.steps_per_epoch(len(train_split), conf.batch_size),
        eval_batch_size=loop.EVAL_BATCH_SIZE,
        parameters=sum(p.numel() for p in model.parameters()),
        torch_version=torch.__version__,
        mlflow_version=mlflow.__version__,
    )
    return {key: "" if value is None else value for key, value in params.items()}


def tracked(conf, what, call, *args, **kwargs):
    """call(*args, **kwargs), waiting out a tracking server or S3 restart (--outage-timeout)."""
    return tracking.during_run(what, partial(call, *args, **kwargs), conf.outage_timeout)


def publish(model, evaluation, test_split, conf, run_id, dataset_sha256):
    """Log the served model and evaluation artifacts, register a version, apply the policy.

    Each step waits out a tracking server or S3 restart (--outage-timeout) on its own, so a
    retry never repeats a step that already took effect, such as a registration.
    """
    confusion = evaluation["confusion"]
    figure = report.confusion_figure(confusion, data.CLASSES,
                                     f"{conf.arch}: eval accuracy {evaluation['accuracy']:.4f}")
    tracked(conf, "logging the confusion matrix", mlflow.log_figure, figure, "confusion_matrix.png")
    tracked(conf, "logging the per-class table", mlflow.log_table, report.per_class_table(confusion, data.CLASSES),
         artifact_file="per_class_accuracy.json")
    model_uri = tracked(conf, "logging the model", export.log_served_model, model, test_split, conf.arch,
                        conf.model_name, conf.signing_key)
    version = tracked(conf, "registering the model", registry.register, model_uri, conf.model_name, run_id, {
        "eval_accuracy": f"{evaluation['accuracy']:.6f}",
        "eval_loss": f"{evaluation['loss']:.6f}",
        "eval_samples": len(test_split),
        "dataset_sha256": dataset_sha256,
        "architecture": conf.arch,
    })
    decision = tracked(conf, "moving the alias", registry.promote_by_policy, conf.model_name, conf.model_alias,
                    version.version, conf.promotion_policy)
    tracked(conf, "tagging the run", mlflow.set_tags, {"registered_version": version.version,
                                               "promoted": "yes" if decision.promoted else "no"})
    return str(version.version), decision


def run_tracked(conf, device, train_split, test_split, dataset_sha256):
    uri = tracking.connect(conf.tracking_uri, conf.connect_timeout, log=print)
    resumed = None
    if conf.resume_from:
        resumed, resumed_path = checkpoints.download(conf.resume_from)
        checkpoints.check_compatible(resumed, conf)

    model, optimizer = build(conf, device)
    progress = loop.Progress()
    if resumed is not None:
        progress = checkpoints.restore(resumed, model, optimizer)

    experiment = mlflow.set_experiment(conf.experiment_name)
    system_metrics = tracking.system_metrics_available()
    if not system_metrics:
        warn("system metrics off: install psutil to record CPU, memory and GPU use")
    tags = {"dataset_sha256": dataset_sha256, "device": loop.describe(device), "architecture": conf.arch,
            "system_metrics": "on" if system_metrics else "off (psutil not installed)"}
    commit = git_commit()
    if commit:
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    if resumed is not None:
        tags.update({"resumed_from": conf.resume_from, "resumed_checkpoint": resumed_path})

    logger = uploads = None
    saved_step = [progress.global_step if resumed is not None else -1]

    def save_checkpoint(p):
        uploads.save(model, optimizer, p, conf)
        saved_step[0] = p.global_step

    # Signals are caught from before the run exists, so no window leaves it RUNNING.
    with StopSignals() as stop:
        run = mlflow.start_run(run_name=conf.run_name, tags=tags, log_system_metrics=system_metrics)
        run_id = run.info.run_id
        url = tracking.run_url(uri, experiment.experiment_id, run_id)
        say(f"run {run_id} started: {url}")
        try:
            logger = tracking.MetricLogger(run_id, outage_s=conf.outage_timeout)
            uploads = checkpoints.Uploads(run_id, outage_s=conf.outage_timeout)
            tracked(conf, "logging parameters", mlflow.log_params,
                    params_of(conf, device, model, train_split, test_split))
            tracked(conf, "logging the model summary", mlflow.log_text,
                    architectures.summary(model, conf.arch), "model_summary.txt")
            evaluation = fit(model, optimizer, train_split, test_split, conf, device, progress,
                             logger, stop, on_epoch_end=save_checkpoint)
            if stop():
                raise loop.StopRequested()
            if evaluation is None:
                evaluation = loop.evaluate(model, test_split, device)
            logger.flush()
            uploads.wait()
            version, decision = publish(model, evaluation, test_split, conf, run_id, dataset_sha256)
        except loop.StopRequested:
            try:
                if saved_step[0] != progress.global_step:
                    save_checkpoint(progress)
                uploads.wait()
                logger.flush()
            except BaseException as error:  # noqa: BLE001 - a second Ctrl-C included: end KILLED anyway
                warn(f"could not save the final checkpoint: {error or type(error).__name__}")
            tracking.end_run("KILLED", conf.outage_timeout)
            say(f"stopped by {stop.received} at global step {progress.global_step}; "
                f"continue with --resume-from {run_id}")
            say(f"run: {url}\nversion: none\npromoted: no (stopped by {stop.received})")
            return EXIT_SIGNAL[stop.received]
        except KeyboardInterrupt:
            tracking.end_run("KILLED", conf.outage_timeout)
            warn(f"stopped at once; run {url} marked KILLED")
            return EXIT_SIGNAL["SIGINT"]
        except BaseException:
            tracking.end_run("FAILED", conf.outage_timeout)
            warn(f"run {url} marked FAILED")
            raise
        tracking.end_run("FINISHED", conf.outage_timeout)
    say(f"run: {url}")
    say(f"version: {version}")
    say(f"promoted: {'yes' if decision.promoted else 'no'} ({decision.reason})")
    return 0


def run(conf):
    """Run the job for a checked Config; return the process exit status."""
    try:
        device = loop.pick_device(conf.device)
    except ConfigError as error:
        warn(f"python -m trainer: error: {error}")
        return EXIT_CONFIG
    try:
        train_split, test_split = data.load(conf.data_dir, conf.download)
        dataset_sha256 = data.checksum(conf.data_dir)
        train_split = data.take(train_split, conf.max_train_samples).to(device)
        test_split = data.take(test_split, conf.max_test_samples).to(device)
        say(f"data: {len(train_split)} train / {len(test_split)} test images from "
            f"{data.raw_dir(conf.data_dir)}; device {loop.describe(device)}")
        if not conf.tracking:
            return run_untracked(conf, device, train_split, test_split)
        return run_tracked(conf, device, train_split, test_split, dataset_sha256)
    except checkpoints.CheckpointError as error:
        warn(f"python -m trainer: error: {error}")
        return EXIT_CONFIG
    except (data.DataError, tracking.TrackingUnavailable, loop.TrainingDiverged, registry.RegistryError) as error:
        warn(f"error: {error}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        warn("interrupted before a run was started; nothing was logged")
        return EXIT_SIGNAL["SIGINT"]

"""The training job behind `python -m trainer`, top to bottom: check the flags; load the
data; reach the tracking server; start a run; train and evaluate epoch by epoch with a
checkpoint after each; log the served model and the evaluation artifacts; register a
version; move the alias per policy; print the run URL, the version and whether it was
promoted. How the run starts and ends is trainer/lifecycle.py.
"""

import os
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import torch

from trainer import architectures, checkpoints, data, export, loop, reference_stats, registry, report, tracking
from trainer.config import Config, ConfigError
from trainer.lifecycle import EXIT_SIGNAL, StopSignals, say, tracked_run, warn
from trainer.loop import TrainingState

EXIT_FAILED = 1
EXIT_CONFIG = 2
T = TypeVar("T")


def git_commit() -> str | None:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def fit(state: TrainingState, train_split: data.Split, test_split: data.Split, conf: Config,
        logger: tracking.MetricLogger | tracking.NoLogger, stop: Callable[[], bool],
        on_epoch_end: Callable[[TrainingState], None] = lambda state: None,
        on_evaluation: Callable[[int, dict[str, Any]], None] = lambda epoch, evaluation: None,
        ) -> dict[str, Any] | None:
    """Train until conf.epochs are complete; return the last evaluation (None if none was left to do).

    on_evaluation(epoch, evaluation) follows each epoch's checkpoint; a sweep reports the
    accuracy there and may end a hopeless trial by raising.
    """
    progress, world = state.progress, state.world
    shard = world.shard_len(len(train_split))
    steps = data.steps_per_epoch(shard, conf.batch_size)

    def on_log(metrics: loop.Metrics, p: loop.Progress) -> None:
        logger.log({"train_loss": metrics["loss"], "train_accuracy": metrics["accuracy"],
                    "train_images_per_sec": metrics["images_per_sec"], "lr": metrics["lr"]}, p.global_step)
        say(f"epoch {p.epoch + 1}/{conf.epochs}  step {p.step_in_epoch}/{steps}  "
            f"global {p.global_step}  loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.4f}  "
            f"{metrics['images_per_sec']:.0f} img/s")

    per_epoch = world.size * (shard - (1 if shard % conf.batch_size == 1 else 0))
    images = (conf.epochs - progress.epoch) * per_epoch - progress.step_in_epoch * conf.batch_size * world.size
    fit_started = time.perf_counter()
    evaluation = None
    while progress.epoch < conf.epochs:
        started = time.perf_counter()
        loop.train_epoch(state, train_split, conf, on_log, stop)
        evaluating = time.perf_counter()
        evaluation = loop.evaluate(state.model, test_split, state.device, world=world)
        evaluated = time.perf_counter()
        seconds = evaluated - started
        logger.log({"eval_loss": evaluation["loss"], "eval_accuracy": evaluation["accuracy"],
                    "epoch": progress.epoch, "epoch_seconds": seconds}, progress.global_step)
        say(f"epoch {progress.epoch}/{conf.epochs}  eval_loss {evaluation['loss']:.4f}  "
            f"eval_accuracy {evaluation['accuracy']:.4f}  {seconds:.1f} s (evaluation {evaluated - evaluating:.2f} s)")
        on_epoch_end(state)
        on_evaluation(progress.epoch, evaluation)
    seconds = time.perf_counter() - fit_started
    # Everything between the first step and the last checkpoint counts: evaluation,
    # logging and checkpoints included. The benchmark reads this line.
    say(f"trained {images} images in {seconds:.2f} s: {images / seconds:.0f} images/s")
    return evaluation


def build(conf: Config, device: torch.device) -> TrainingState:
    torch.manual_seed(conf.seed)
    model = loop.prepare(architectures.build(conf.arch), device)
    return TrainingState(model, loop.make_optimizer(conf.optimizer, model, conf.lr), device)


def run_untracked(conf: Config, device: torch.device, train_split: data.Split, test_split: data.Split) -> int:
    state = build(conf, device)
    with StopSignals() as stop:
        try:
            evaluation = fit(state, train_split, test_split, conf, tracking.NoLogger(), stop)
        except loop.StopRequested:
            say("run: none (tracking off)\nversion: none\n"
                f"promoted: no (stopped by {stop.received})")
            return EXIT_SIGNAL[stop.received]
    say(f"final eval_accuracy {evaluation['accuracy']:.4f}")
    say("run: none (tracking off)\nversion: none\npromoted: no (tracking off)")
    return 0


def params_of(conf: Config, state: TrainingState, train_split: data.Split,
              test_split: data.Split) -> dict[str, Any]:
    params = {key: value for key, value in vars(conf).items() if key not in ("tracking", "tracking_uri", "signing_key")}
    params.update(
        data_dir=str(conf.data_dir),
        device=str(state.device),
        amp="bf16" if state.device.type == "cuda" else "off",
        train_samples=len(train_split),
        test_samples=len(test_split),
        steps_per_epoch=data.steps_per_epoch(len(train_split), conf.batch_size),
        eval_batch_size=loop.EVAL_BATCH_SIZE,
        parameters=sum(p.numel() for p in state.model.parameters()),
        torch_version=torch.__version__,
        mlflow_version=mlflow.__version__,
    )
    return {key: "" if value is None else value for key, value in params.items()}


def tracked(conf: Config, what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """call(*args, **kwargs), waiting out a tracking server or S3 restart (--outage-timeout)."""
    return tracking.during_run(what, partial(call, *args, **kwargs), conf.outage_timeout)


def publish(model: torch.nn.Module, evaluation: dict[str, Any], test_split: data.Split, conf: Config, run_id: str,
            dataset_sha256: str) -> tuple[str, registry.Decision]:
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
    tracked(conf, "logging reference statistics", mlflow.log_dict, reference_stats.compute(confusion, test_split),
            reference_stats.ARTIFACT)
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


def run_tracked(conf: Config, device: torch.device, train_split: data.Split, test_split: data.Split,
                dataset_sha256: str) -> int:
    uri = tracking.connect(conf.tracking_uri, conf.connect_timeout, log=print)
    tags = {"dataset_sha256": dataset_sha256, "device": loop.describe(device), "architecture": conf.arch}
    resumed = None
    if conf.resume_from:
        resumed, resumed_path = checkpoints.download(conf.resume_from)
        checkpoints.check_compatible(resumed, conf)
        tags.update({"resumed_from": conf.resume_from, "resumed_checkpoint": resumed_path})
    state = build(conf, device)
    if resumed is not None:
        checkpoints.restore(resumed, state)
    commit = git_commit()
    if commit:
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})

    with tracked_run(conf, uri, state, tags, resumed=bool(conf.resume_from)) as run:
        tracked(conf, "logging parameters", mlflow.log_params, params_of(conf, state, train_split, test_split))
        tracking.log_datasets(train_split, test_split, data.raw_dir(conf.data_dir).resolve(), dataset_sha256,
                              conf.outage_timeout)
        tracked(conf, "logging the model summary", mlflow.log_text,
                architectures.summary(state.model, conf.arch), "model_summary.txt")
        evaluation = fit(state, train_split, test_split, conf, run.logger, run.stop,
                         on_epoch_end=lambda state: run.checkpoint(state, conf))
        if run.stop():  # the signal came during the last evaluation or checkpoint
            raise loop.StopRequested()
        if evaluation is None:
            evaluation = loop.evaluate(state.model, test_split, device)
        run.logger.flush()
        run.uploads.wait()
        version, decision = publish(state.model, evaluation, test_split, conf, run.run_id, dataset_sha256)
    if run.stopped_status is not None:
        return run.stopped_status
    say(f"run: {run.url}")
    say(f"version: {version}")
    say(f"promoted: {'yes' if decision.promoted else 'no'} ({decision.reason})")
    return 0


def run(conf: Config) -> int:
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

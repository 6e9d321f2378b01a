"""One rank of a multi-process run: `python -m trainer.distributed ARGS`.

trainer/launch.py starts these through PyTorch's elastic launcher, which sets RANK,
WORLD_SIZE, LOCAL_RANK and the restart count; they are not meant to be started by hand.
Every rank trains a DistributedDataParallel replica on its share of each epoch; rank 0
alone talks to MLflow, in the run that node 0's launcher created before any rank started.
After a restart, rank 0 resumes from that run's last checkpoint and logs only the steps
the run does not have yet, so every global step's metrics are in the run exactly once.
"""

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import mlflow
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stack_common.text import one_line
from trainer import architectures, checkpoints, config, data, job, loop, registry, tracking
from trainer.config import Config, ConfigError
from trainer.lifecycle import EXIT_SIGNAL, StopSignals, TrackedRun, say, warn
from trainer.loop import TrainingState
from trainer.world import World

# Set by the launcher on node 0 for its workers: the MLflow run that every attempt logs to.
RUN_ID_ENV = "TRAINER_DISTRIBUTED_RUN_ID"
# Fault injection for tests: "RANK:STEP" makes that rank exit abruptly (os._exit) once it has
# done STEP global steps, on the first attempt only, as a crashed or OOM-killed worker would.
FAULT_EXIT_ENV = "TRAINER_FAULT_EXIT_AT"
FAULT_EXIT_STATUS = 13
# What the trainer logs at global steps; a restart skips the steps the run already has.
STEP_METRICS = ("train_loss", "train_accuracy", "train_images_per_sec", "lr",
                "eval_loss", "eval_accuracy", "epoch", "epoch_seconds")
# Settings that change what is trained: every rank must have the same.
AGREED = ("epochs", "batch_size", "lr", "optimizer", "lr_schedule", "seed", "arch", "max_train_samples",
          "max_test_samples", "log_every", "tracking", "experiment_name", "model_name", "model_alias",
          "promotion_policy", "resume_from", "nproc", "nnodes", "max_restarts", "lr_scaling")


class ConfigMismatch(Exception):
    """Ranks were started with different settings, data or node numbers."""


@dataclass(frozen=True)
class Attempt:
    """Which start of the worker group this is, as the elastic launcher counts."""

    restart: int
    max_restarts: int

    @property
    def restarts_left(self) -> bool:
        return self.restart < self.max_restarts


def from_environment(environ: Mapping[str, str]) -> tuple[World, int, Attempt]:
    """(world, local rank, attempt) from the variables the elastic launcher sets."""
    world = World(rank=int(environ["RANK"]), size=int(environ["WORLD_SIZE"]))
    attempt = Attempt(int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                      int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0")))
    return world, int(environ.get("LOCAL_RANK", "0")), attempt


def settings_of(conf: Config, device: torch.device, dataset_sha256: str) -> dict[str, Any]:
    return {**{key: getattr(conf, key) for key in AGREED}, "device": device.type, "dataset": dataset_sha256}


def describe_setting(key: str) -> str:
    if key == "dataset":
        return "the dataset's sha256"
    if key == "device":
        return "the device type"
    return "--" + key.replace("_", "-")


def agree(conf: Config, device: torch.device, dataset_sha256: str, world: World) -> str | None:
    """Check that every rank has rank 0's settings and data and that node numbers fit;
    return the run id node 0's launcher created (None without tracking)."""
    mine = {"settings": settings_of(conf, device, dataset_sha256), "node_rank": conf.node_rank,
            "run_id": os.environ.get(RUN_ID_ENV) or None}
    everyone: list[Any] = [None] * world.size
    dist.all_gather_object(everyone, mine)
    reference = everyone[0]["settings"]
    for rank, theirs in enumerate(everyone):
        differing = [key for key in reference if theirs["settings"][key] != reference[key]]
        if differing:
            key = differing[0]
            raise ConfigMismatch(
                f"rank {rank} was started with another training configuration than rank 0: {describe_setting(key)} "
                f"is {theirs['settings'][key]!r} there and {reference[key]!r} on rank 0; start every node with the "
                "same image, data and arguments")
    node_ranks = sorted({entry["node_rank"] for entry in everyone})
    if node_ranks != list(range(conf.nnodes)):
        raise ConfigMismatch(f"the {conf.nnodes} node(s) were started with --node-rank {node_ranks}; give each node "
                             f"its own number from 0 to {conf.nnodes - 1}")
    run_ids = {entry["run_id"] for entry in everyone if entry["run_id"]}
    if conf.tracking and len(run_ids) != 1:
        raise ConfigMismatch(f"expected one MLflow run from node 0's launcher, found {len(run_ids)}")
    return next(iter(run_ids), None)


def build(conf: Config, device: torch.device, world: World) -> TrainingState:
    """The replica each rank trains: seeded as a single process is, so all ranks start equal."""
    torch.manual_seed(conf.seed)
    model = architectures.build(conf.arch)
    if device.type == "cuda":
        # Batch statistics over the global batch; PyTorch's SyncBatchNorm runs on GPUs only,
        # so on CPU each rank normalises with its own batch and DDP copies rank 0's running stats.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = loop.prepare(model, device)
    return TrainingState(model, loop.make_optimizer(conf.optimizer, model, conf.lr), device, world=world)


def replicate(state: TrainingState) -> None:
    """Wrap the model for gradient averaging; DDP also copies rank 0's weights to the others."""
    device_ids = [state.device.index] if state.device.type == "cuda" else None
    state.replica = DistributedDataParallel(state.model, device_ids=device_ids)


def served_copy(state: TrainingState, conf: Config) -> nn.Module:
    """The trained weights in a plain module (no SyncBatchNorm), for the TorchScript export."""
    plain = loop.prepare(architectures.build(conf.arch), state.device)
    plain.load_state_dict(state.model.state_dict())
    return plain


def share(value: Any, world: World) -> Any:
    """Rank 0's value, on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def scaled(conf: Config, world: World) -> Config:
    """The configuration the ranks train with: --lr times the process count under --lr-scaling linear."""
    return replace(conf, lr=conf.lr * world.size) if conf.lr_scaling == "linear" else conf


class OncePerStep:
    """Passes on only metrics at steps after the last one the run already has for that key.

    A restarted attempt repeats the steps between its checkpoint and the crash; the crashed
    attempt logged some of them already, and a step must be in the run once.
    """

    def __init__(self, logger: tracking.MetricLogger, logged: dict[str, int]) -> None:
        self.logger, self.logged = logger, logged

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        new = {key: value for key, value in metrics.items() if step > self.logged.get(key, -1)}
        if new:
            self.logger.log(new, step)

    def flush(self) -> None:
        self.logger.flush()


def logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    steps = {}
    for key in STEP_METRICS:
        history = client.get_metric_history(run_id, key)
        if history:
            steps[key] = max(metric.step for metric in history)
    return steps


def with_fault_injection(stop: Callable[[], bool], state: TrainingState, attempt: Attempt) -> Callable[[], bool]:
    spec = os.environ.get(FAULT_EXIT_ENV, "")
    if not spec or attempt.restart:
        return stop
    rank, step = (int(part) for part in spec.split(":"))
    if rank != state.world.rank:
        return stop

    def stop_or_crash() -> bool:
        if state.progress.global_step >= step:
            warn(f"{FAULT_EXIT_ENV}: rank {rank} exits abruptly at global step {step}")
            os._exit(FAULT_EXIT_STATUS)
        return stop()

    return stop_or_crash


def resume_point(conf: Config, run_id: str | None, attempt: Attempt, world: World) -> tuple[Any, str | None]:
    """Rank 0 picks what to continue from, every rank gets it: (checkpoint or None, its origin).

    A restarted attempt continues its own run's last checkpoint; a first attempt the one of
    --resume-from, if given. Only rank 0 reads MLflow.
    """
    found: tuple[Any, str | None] = (None, None)
    if world.rank == 0 and conf.tracking:
        if attempt.restart and run_id and any(checkpoints.NAME.search(info.path) for info in
                                              MlflowClient().list_artifacts(run_id, checkpoints.ARTIFACT_DIR)):
            checkpoint, path = checkpoints.download(run_id)
            found = (checkpoint, path)
        elif conf.resume_from:
            checkpoint, path = checkpoints.download(conf.resume_from)
            checkpoints.check_compatible(checkpoint, conf)
            found = (checkpoint, path)
    return share(found, world)


def leave_for_restart(run: TrackedRun, error: BaseException, attempt: Attempt, code: int) -> None:
    """Exit without ending the run: the launcher restarts the group and the next attempt
    continues it. os._exit skips MLflow's exit hook, which would mark the run FINISHED."""
    try:
        run.logger.flush()
        run.uploads.wait()
    except Exception as flush_error:  # noqa: BLE001 - the next attempt logs what is missing
        warn(f"could not send the last metrics: {one_line(flush_error, 200)}")
    warn(f"error: rank 0 stopped ({one_line(error, 300) or type(error).__name__}); run {run.url} stays RUNNING "
         f"for restart {attempt.restart + 1} of {attempt.max_restarts}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def attached_run(conf: Config, uri: str, state: TrainingState, run_id: str, tags: dict[str, str],
                 attempt: Attempt) -> Iterator[TrackedRun]:
    """Continue the launcher's run on rank 0; end it FINISHED, KILLED or FAILED, unless the
    launcher still has a restart to give, in which case it stays RUNNING for the next attempt."""
    system_metrics = tracking.system_metrics_available()
    with StopSignals() as stop:
        # Resuming the run also resumes MLflow's system-metrics steps where they were.
        active = mlflow.start_run(run_id=run_id, tags=tags, log_system_metrics=system_metrics)
        url = tracking.run_url(uri, active.info.experiment_id, run_id)
        say(f"run {run_id}: rank 0 of {state.world.size} logs to it (attempt {attempt.restart + 1})")
        run = TrackedRun(run_id, url, stop, tracking.MetricLogger(run_id, outage_s=conf.outage_timeout),
                         checkpoints.Uploads(run_id, outage_s=conf.outage_timeout),
                         checkpointed_step=state.progress.global_step)
        try:
            yield run
        except (Exception, KeyboardInterrupt) as error:
            stopped = isinstance(error, loop.StopRequested | KeyboardInterrupt)
            if isinstance(error, loop.StopRequested):
                run.save_before_stopping(state, conf)
            code = EXIT_SIGNAL[stop.received] if stopped and stop.received else job.EXIT_FAILED
            if attempt.restarts_left:
                leave_for_restart(run, error, attempt, code)
            tracking.end_run("KILLED" if stopped else "FAILED", conf.outage_timeout)
            warn(f"run {url} marked {'KILLED' if stopped else 'FAILED'}")
            raise
        tracking.end_run("FINISHED", conf.outage_timeout)


def run_tags(conf: Config, state: TrainingState, dataset_sha256: str, attempt: Attempt,
             resumed_path: str | None) -> dict[str, str]:
    tags = {"dataset_sha256": dataset_sha256, "device": loop.describe(state.device), "architecture": conf.arch,
            "world_size": str(state.world.size), "restarts": str(attempt.restart)}
    if resumed_path and attempt.restart:
        tags[f"restart_{attempt.restart}_checkpoint"] = resumed_path
    elif resumed_path:
        tags.update({"resumed_from": conf.resume_from or "", "resumed_checkpoint": resumed_path})
    commit = job.git_commit()
    if commit:
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    return tags


def params_of(given: Config, conf: Config, state: TrainingState, train_split: data.Split,
              test_split: data.Split) -> dict[str, Any]:
    """The single-process parameters of the flags as given, plus how the work was shared."""
    world = state.world
    shard = world.shard_len(len(train_split))
    params = job.params_of(given, state, train_split, test_split)
    params.update(world_size=world.size, nproc_per_node=given.nproc, backend=dist.get_backend(),
                  batch_size_per_rank=given.batch_size, global_batch_size=given.batch_size * world.size,
                  lr_effective=conf.lr, train_samples_per_rank=shard,
                  steps_per_epoch=data.steps_per_epoch(shard, given.batch_size))
    return params


def train_rank0(given: Config, conf: Config, state: TrainingState, splits: tuple[data.Split, data.Split],
                dataset_sha256: str, run_id: str, attempt: Attempt, resumed_path: str | None) -> int:
    train_split, test_split = splits
    uri = mlflow.get_tracking_uri()
    client = MlflowClient()
    first = not client.get_run(run_id).data.params
    tags = run_tags(given, state, dataset_sha256, attempt, resumed_path)
    with attached_run(conf, uri, state, run_id, tags, attempt) as run:
        if first:
            job.tracked(conf, "logging parameters", mlflow.log_params,
                        params_of(given, conf, state, train_split, test_split))
            tracking.log_datasets(train_split, test_split, data.raw_dir(conf.data_dir).resolve(), dataset_sha256,
                                  conf.outage_timeout)
            job.tracked(conf, "logging the model summary", mlflow.log_text,
                        architectures.summary(state.model, conf.arch), "model_summary.txt")
        logger = OncePerStep(run.logger, logged_steps(client, run_id) if attempt.restart else {})
        if attempt.restart:
            say(f"restart {attempt.restart}: continuing at global step {state.progress.global_step}")
            run.logger.log({"restarts": attempt.restart}, state.progress.global_step)
        stop = with_fault_injection(run.stop, state, attempt)
        evaluation = job.fit(state, train_split, test_split, conf, logger, stop,
                             on_epoch_end=lambda state: run.checkpoint(state, conf))
        if run.stop():
            raise loop.StopRequested()
        if evaluation is None:
            evaluation = loop.evaluate(state.model, test_split, state.device, world=state.world)
        run.logger.flush()
        run.uploads.wait()
        version, decision = job.publish(served_copy(state, conf), evaluation, test_split, conf, run.run_id,
                                        dataset_sha256)
    say(f"run: {run.url}")
    say(f"version: {version}")
    say(f"promoted: {'yes' if decision.promoted else 'no'} ({decision.reason})")
    return 0


def train_untracked(conf: Config, state: TrainingState, splits: tuple[data.Split, data.Split],
                    attempt: Attempt) -> int:
    """Every rank but a tracking rank 0: train, take part in the collectives, log nothing."""
    with StopSignals() as stop:
        try:
            evaluation = job.fit(state, *splits, conf, tracking.NoLogger(), with_fault_injection(stop, state, attempt))
        except loop.StopRequested:
            return EXIT_SIGNAL[stop.received or "SIGTERM"]
        if evaluation is None:  # rank 0 evaluates the restored final state: take part
            evaluation = loop.evaluate(state.model, splits[1], state.device, world=state.world)
    say(f"final eval_accuracy {evaluation['accuracy']:.4f}")
    say("run: none (tracking off)\nversion: none\npromoted: no (tracking off)")
    return 0


def train(given: Config, world: World, device: torch.device, attempt: Attempt) -> int:
    splits = data.load(given.data_dir, given.download)
    dataset_sha256 = data.checksum(given.data_dir)
    splits = tuple(data.take(split, limit).to(device)
                   for split, limit in zip(splits, (given.max_train_samples, given.max_test_samples), strict=True))
    run_id = agree(given, device, dataset_sha256, world)
    conf = scaled(given, world)
    if world.rank == 0:
        say(f"data: {len(splits[0])} train / {len(splits[1])} test images from {data.raw_dir(given.data_dir)}, "
            f"{world.shard_len(len(splits[0]))} per rank; {world.size} processes, backend {dist.get_backend()}, "
            f"global batch {given.batch_size * world.size}")
        if conf.tracking:
            tracking.connect(conf.tracking_uri, conf.connect_timeout, log=print)
    state = build(conf, device, world)
    checkpoint, resumed_path = resume_point(conf, run_id, attempt, world)
    if checkpoint is not None:
        # Every rank restores the same state, RNGs included, so a resumed CPU run repeats
        # the steps an uninterrupted one would have taken.
        checkpoints.restore(checkpoint, state)
    replicate(state)
    if world.rank == 0 and conf.tracking and run_id:
        return train_rank0(given, conf, state, splits, dataset_sha256, run_id, attempt, resumed_path)
    return train_untracked(conf, state, splits, attempt)


def device_of(conf: Config, local_rank: int) -> torch.device:
    device = loop.pick_device(conf.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def join(device: torch.device, world: World, attempt: Attempt) -> None:
    """Form the process group of this attempt.

    The elastic launcher keeps one key-value store for all attempts; without a prefix of its
    own, a restarted rank could read an address the previous attempt published there and
    wait on a process that is gone.
    """
    store, _, _ = next(dist.rendezvous("env://"))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            store=dist.PrefixStore(f"trainer/attempt-{attempt.restart}", store),
                            rank=world.rank, world_size=world.size)


def leave_together(code: int) -> None:
    """Exit with code where every rank exits with it, right after the same collective.

    Tearing the process group down while the other rank still uses it aborts the process
    (SIGABRT: the launcher then reports a rank "killed by signal 6" instead of the exit
    code). So the ranks meet once more, and leave without tearing it down.
    """
    try:
        dist.barrier()
    except RuntimeError:
        pass  # the other rank has gone already: nothing left to wait for
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    conf = config.load(argv)
    world, local_rank, attempt = from_environment(os.environ)
    if world.rank != 0:
        # One voice on the console: the other ranks' progress would repeat rank 0's. Errors still show.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    try:
        device = device_of(conf, local_rank)
        join(device, world, attempt)
    except (ConfigError, RuntimeError, ValueError) as error:
        warn(f"python -m trainer: error: rank {world.rank}: {one_line(error, 300)}")
        return job.EXIT_CONFIG
    try:
        return train(conf, world, device, attempt)
    except ConfigMismatch as error:
        if local_rank == 0:  # every rank finds the same difference: one line per node is enough
            warn(f"python -m trainer: error: {error}")
        leave_together(job.EXIT_CONFIG)
    except checkpoints.CheckpointError as error:
        warn(f"python -m trainer: error: {error}")
        return job.EXIT_CONFIG
    except (data.DataError, tracking.TrackingUnavailable, loop.TrainingDiverged, registry.RegistryError) as error:
        warn(f"error: {error}")
        return job.EXIT_FAILED
    except loop.StopRequested:
        return EXIT_SIGNAL["SIGTERM"]
    except RuntimeError as error:  # a collective failed: another rank died or the network broke
        warn(f"error: rank {world.rank}: {one_line(error, 300)}")
        return job.EXIT_FAILED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

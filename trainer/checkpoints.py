"""Checkpoints: everything needed to continue training exactly where it stopped.

Each is logged as the run artifact checkpoints/epoch-EEE-step-SSSSSSSSS.pt after every
epoch and when the run is stopped. --resume-from RUN_ID picks the one with the highest
step; the continuation is a new run tagged resumed_from=RUN_ID whose metrics carry on
from that global step, so the stopped run keeps its honest KILLED or FAILED status.
"""

import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient

from trainer import tracking
from trainer.config import Config
from trainer.loop import Progress, TrainingState

ARTIFACT_DIR = "checkpoints"
NAME = re.compile(r"epoch-(\d+)-step-(\d+)\.pt$")
FORMAT = 1


class CheckpointError(Exception):
    pass


Checkpoint = dict[str, Any]


def state(training: TrainingState, config: Config) -> Checkpoint:
    progress = training.progress
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "format": FORMAT,
        "arch": config.arch,
        "optimizer_name": config.optimizer,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "epoch": progress.epoch,
        "step_in_epoch": progress.step_in_epoch,
        "global_step": progress.global_step,
        # Each rank's share of an epoch depends on how many there are.
        "world_size": training.world.size,
        # Dropout draws from these; restoring them makes a resumed run repeat exactly
        # what an uninterrupted one would have done.
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": cuda_rng,
    }


class Uploads:
    """Writes checkpoints at once and uploads them to the run in a background thread.

    The file is a snapshot taken between steps; only the upload, which waits on the
    tracking server, overlaps with the next epoch. wait() surfaces any failed upload.
    """

    def __init__(self, run_id: str, client: MlflowClient | None = None, outage_s: float = 300.0) -> None:
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.outage_s = outage_s
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self.pending: list[Future[None]] = []

    def save(self, training: TrainingState, config: Config) -> str:
        """Snapshot the training state, queue its upload, return its artifact path."""
        progress = training.progress
        name = f"epoch-{progress.epoch:03d}-step-{progress.global_step:09d}.pt"
        folder = Path(tempfile.mkdtemp(prefix="checkpoint-"))
        torch.save(state(training, config), folder / name)
        self.pending.append(self.executor.submit(self._upload, folder, name))
        return f"{ARTIFACT_DIR}/{name}"

    def _upload(self, folder: Path, name: str) -> None:
        try:
            # The client, not the fluent API: the active run is thread-local. Retried here,
            # in the background, so an S3 or server restart does not stop training.
            tracking.during_run(f"uploading checkpoint {name}",
                                partial(self.client.log_artifact, self.run_id, str(folder / name),
                                        artifact_path=ARTIFACT_DIR), self.outage_s)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for upload in pending:
            upload.result()


def latest(run_id: str, client: MlflowClient | None = None) -> str:
    """Artifact path of the highest-step checkpoint of run_id."""
    client = client or MlflowClient()
    found = []
    for info in client.list_artifacts(run_id, ARTIFACT_DIR):
        match = NAME.search(info.path)
        if match:
            found.append((int(match.group(2)), info.path))
    if not found:
        raise CheckpointError(f"run {run_id} has no checkpoint under {ARTIFACT_DIR}/ to resume from")
    return max(found)[1]


def download(run_id: str, client: MlflowClient | None = None) -> tuple[Checkpoint, str]:
    """Fetch and load the latest checkpoint of run_id; return (checkpoint, artifact path)."""
    client = client or MlflowClient()
    try:
        client.get_run(run_id)
    except Exception as error:
        raise CheckpointError(f"--resume-from {run_id}: no such run ({error})") from error
    path = latest(run_id, client)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        # weights_only: a checkpoint is data; loading one must never run code.
        checkpoint = torch.load(local, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} of run {run_id} has an unknown checkpoint format")
    return checkpoint, path


def check_compatible(checkpoint: Checkpoint, config: Config) -> None:
    for key, flag, value in (("arch", "--arch", config.arch), ("optimizer_name", "--optimizer", config.optimizer)):
        if checkpoint[key] != value:
            raise CheckpointError(
                f"the checkpoint was trained with {flag} {checkpoint[key]}, not {value}; "
                f"pass {flag} {checkpoint[key]} to resume it")
    if checkpoint["step_in_epoch"]:
        # Mid-epoch, the remaining batches are defined by the seed and the batch size.
        for key, flag, value in (("seed", "--seed", config.seed), ("batch_size", "--batch-size", config.batch_size)):
            if checkpoint[key] != value:
                raise CheckpointError(
                    f"the checkpoint stopped mid-epoch with {flag} {checkpoint[key]}, not {value}; "
                    f"pass {flag} {checkpoint[key]} to resume it")
        # ... and by the number of processes sharing each epoch (checkpoints from before they were
        # recorded come from one process).
        saved, processes = checkpoint.get("world_size", 1), config.nnodes * config.nproc
        if saved != processes:
            raise CheckpointError(f"the checkpoint stopped mid-epoch with {saved} training process(es), not "
                                  f"{processes}; resume it with --nnodes x --nproc = {saved}")
    if checkpoint["epoch"] >= config.epochs:
        raise CheckpointError(
            f"the checkpoint has already completed {checkpoint['epoch']} epoch(s); "
            f"pass --epochs above {checkpoint['epoch']} to train further")


def restore(checkpoint: Checkpoint, training: TrainingState) -> None:
    """Load weights, optimizer, progress and RNG state into `training`, to continue from there."""
    training.model.load_state_dict(checkpoint["model"])
    training.optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng_cpu"])
    if checkpoint["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])
    training.progress = Progress(epoch=checkpoint["epoch"], step_in_epoch=checkpoint["step_in_epoch"],
                                 global_step=checkpoint["global_step"])

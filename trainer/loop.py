"""Training and evaluation over tensor-resident data.

A step is: cut a batch by index, standardise it on the device, forward, backward, update.
Loss and accuracy are summed on the device and read back only every --log-every steps,
so on a GPU the host never waits for a step to finish between logs.
"""

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer import data
from trainer.config import Config, ConfigError
from trainer.data import standardise
from trainer.world import SINGLE, World

EVAL_BATCH_SIZE = 1000


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived; raised between steps so the state is consistent."""


class TrainingDiverged(Exception):
    pass


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps completed in the epoch under way
    global_step: int = 0  # steps completed in total, the step of every logged metric


@dataclass
class TrainingState:
    """What training changes, and where it runs: all a checkpoint saves but the RNGs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    progress: Progress = field(default_factory=Progress)
    world: World = SINGLE
    # With several processes, the DistributedDataParallel wrapper that steps go through;
    # `model` stays the plain module that checkpoints, evaluation and export use.
    replica: nn.Module | None = None


Metrics = dict[str, float]


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device is 'cuda' but PyTorch sees no CUDA device; use auto or cpu")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        # Fixed input shapes: let cuDNN time its kernels once and keep the fastest. GPU
        # runs are not bit-reproducible anyway; CPU runs are.
        torch.backends.cudnn.benchmark = True
    return torch.device(requested)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    # channels_last lets oneDNN on CPU and cuDNN on GPU pick their fastest conv kernels;
    # on this project's 2-core CPU it halves the step time of both architectures.
    return model.to(device=device, memory_format=torch.channels_last)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    # bf16 on CPU would change results between machines; CPU runs stay float32 and exact.
    return contextlib.nullcontext()


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def learning_rate(base: float, schedule: str, step: int, total_steps: int) -> float:
    """Rate for the step about to run; a pure function of the step, so resuming needs no
    scheduler state."""
    if schedule == "constant":
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


class Meter:
    """Running sums on the device; read() is the only host sync."""

    def __init__(self, device: torch.device, world: World = SINGLE) -> None:
        self.device = device
        self.world = world
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.count = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        self.loss_sum += loss.detach().float() * n
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.count += n

    def read(self) -> Metrics:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        if self.world.size > 1:
            # One all-reduce of the three sums: every rank logs the same global numbers.
            sums = self.world.sum(torch.stack([self.loss_sum.double(), self.correct.double(),
                                               torch.tensor(float(self.count), dtype=torch.float64,
                                                            device=self.device)]))
            self.loss_sum, self.correct, self.count = sums[0], sums[1], int(sums[2].item())
        loss = self.loss_sum.item() / self.count
        accuracy = self.correct.item() / self.count
        result = {"loss": loss, "accuracy": accuracy, "images_per_sec": self.count / elapsed}
        self.reset()
        return result


def train_epoch(state: TrainingState, split: data.Split, conf: Config,
                on_log: Callable[[Metrics, Progress], None], should_stop: Callable[[], bool]) -> None:
    """Run the rest of epoch `state.progress.epoch`, updating the progress after every step.

    on_log(metrics, progress) is called every --log-every global steps, and at the end of the
    epoch, with the train loss, accuracy and images/s averaged since the previous call.
    """
    model, optimizer, progress, world = state.replica or state.model, state.optimizer, state.progress, state.world
    steps = data.steps_per_epoch(world.shard_len(len(split)), conf.batch_size)
    model.train()
    # Every rank draws the same order from the shared seed and takes its own share of it.
    order = world.shard(data.epoch_order(len(split), conf.seed, progress.epoch, state.device))
    meter = Meter(state.device, world)
    for images, labels in data.batches(split, order, conf.batch_size, progress.step_in_epoch):
        if should_stop():
            raise StopRequested()
        if conf.lr_schedule != "constant":
            rate = learning_rate(conf.lr, conf.lr_schedule, progress.global_step, conf.epochs * steps)
            for group in optimizer.param_groups:
                group["lr"] = rate
        with autocast(state.device):
            logits = model(standardise(images))
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.add(loss, logits, labels)
        progress.step_in_epoch += 1
        progress.global_step += 1
        # The epoch's last step always reports, so short runs still have a train curve.
        if progress.global_step % conf.log_every == 0 or progress.step_in_epoch == steps:
            metrics = meter.read()
            if not math.isfinite(metrics["loss"]):
                raise TrainingDiverged(
                    f"train loss is {metrics['loss']} at step {progress.global_step}; "
                    "lower --lr or check the data")
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            on_log(metrics, progress)
    progress.epoch += 1
    progress.step_in_epoch = 0


@torch.inference_mode()
def evaluate(model: nn.Module, split: data.Split, device: torch.device,
             num_classes: int = 10, world: World = SINGLE) -> dict[str, float | torch.Tensor]:
    """Loss, accuracy and the confusion matrix (rows: true class, columns: predicted).

    With several ranks each evaluates every size-th image and the sums are all-reduced, so
    every test image counts exactly once."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    mine = split if world.size == 1 else data.Split(split.images[world.rank::world.size],
                                                     split.labels[world.rank::world.size])
    for start in range(0, len(mine), EVAL_BATCH_SIZE):
        images = mine.images[start:start + EVAL_BATCH_SIZE]
        labels = mine.labels[start:start + EVAL_BATCH_SIZE]
        with autocast(device):
            logits = model(standardise(images))
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
    if world.size > 1:
        world.sum(confusion)
        world.sum(loss_sum)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = max(len(split), 1)
    return {
        "loss": loss_sum.item() / n,
        "accuracy": confusion.diagonal().sum().item() / n,
        "confusion": confusion,
    }

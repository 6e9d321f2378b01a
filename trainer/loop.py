"""Training and evaluation over tensor-resident data.

A step is: cut a batch by index, standardise it on the device, forward, backward, update.
Loss and accuracy are summed on the device and read back only every --log-every steps,
so on a GPU the host never waits for a step to finish between logs.
"""

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer import data
from trainer.config import ConfigError

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


def pick_device(requested):
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device is 'cuda' but PyTorch sees no CUDA device; use auto or cpu")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        # Fixed input shapes: let cuDNN time its kernels once and keep the fastest. GPU
        # runs are not bit-reproducible anyway; CPU runs are.
        torch.backends.cudnn.benchmark = True
    return torch.device(requested)


def describe(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def prepare(model, device):
    # channels_last lets oneDNN on CPU and cuDNN on GPU pick their fastest conv kernels;
    # on this project's 2-core CPU it halves the step time of both architectures.
    return model.to(device=device, memory_format=torch.channels_last)


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    # bf16 on CPU would change results between machines; CPU runs stay float32 and exact.
    return contextlib.nullcontext()


def make_optimizer(name, model, lr):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def learning_rate(base, schedule, step, total_steps):
    """Rate for the step about to run; a pure function of the step, so resuming needs no
    scheduler state."""
    if schedule == "constant":
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def standardise(images_uint8):
    return data.normalise(images_uint8).contiguous(memory_format=torch.channels_last)


class Meter:
    """Running sums on the device; read() is the only host sync."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.count = 0
        self.started = time.perf_counter()

    def add(self, loss, logits, labels):
        n = labels.shape[0]
        self.loss_sum += loss.detach().float() * n
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.count += n

    def read(self):
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        loss = self.loss_sum.item() / self.count
        accuracy = self.correct.item() / self.count
        result = {"loss": loss, "accuracy": accuracy, "images_per_sec": self.count / elapsed}
        self.reset()
        return result


def train_epoch(model, optimizer, split, progress, *, seed, batch_size, lr, lr_schedule,
                total_steps, log_every, device, on_log, should_stop):
    """Run the rest of epoch `progress.epoch`, updating `progress` after every step.

    on_log(metrics, progress) is called every log_every global steps, and at the end of the
    epoch, with the train loss, accuracy and images/s averaged since the previous call.
    """
    model.train()
    order = data.epoch_order(len(split), seed, progress.epoch, device)
    meter = Meter(device)
    for images, labels in data.batches(split, order, batch_size, progress.step_in_epoch):
        if should_stop():
            raise StopRequested()
        if lr_schedule != "constant":
            rate = learning_rate(lr, lr_schedule, progress.global_step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = rate
        x = standardise(images)
        with autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.add(loss, logits, labels)
        progress.step_in_epoch += 1
        progress.global_step += 1
        # The epoch's last step always reports, so short runs still have a train curve.
        last_step = progress.step_in_epoch == data.steps_per_epoch(len(split), batch_size)
        if progress.global_step % log_every == 0 or last_step:
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
def evaluate(model, split, device, num_classes=10):
    """Loss, accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for start in range(0, len(split), EVAL_BATCH_SIZE):
        images = split.images[start:start + EVAL_BATCH_SIZE]
        labels = split.labels[start:start + EVAL_BATCH_SIZE]
        with autocast(device):
            logits = model(standardise(images))
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = max(len(split), 1)
    return {
        "loss": loss_sum.item() / n,
        "accuracy": confusion.diagonal().sum().item() / n,
        "confusion": confusion,
    }

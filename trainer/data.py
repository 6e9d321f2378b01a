"""FashionMNIST as tensors: decoded once, batched by index, standardised on the device.

torchvision finds, downloads and decodes the IDX files; after that no PIL image or
per-sample transform is involved. The uint8 images stay uint8 until a batch is cut, so
the whole dataset costs 55 MB and fits on any GPU, where a batch is a single gather.
"""

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Mean and standard deviation of the FashionMNIST training pixels scaled to [0, 1].
MEAN = 0.2860
STD = 0.3530


class DataError(Exception):
    """The dataset is neither cached nor downloadable."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


def raw_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "FashionMNIST" / "raw"


def missing_files(data_dir: str | Path) -> list[str]:
    folder = raw_dir(data_dir)
    return [name for name in RAW_FILES if not (folder / name).is_file()]


def load(data_dir: str | Path, download: bool = True) -> tuple[Split, Split]:
    """Return (train, test) Splits, downloading into data_dir if needed and allowed."""
    # Imported here so that the served model and the registry CLI never need torchvision.
    from torchvision.datasets import FashionMNIST

    data_dir = Path(data_dir)
    if missing_files(data_dir) and download:
        try:
            FashionMNIST(root=data_dir, train=True, download=True)
        except Exception as error:  # torchvision raises RuntimeError, URLError or OSError
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise DataError(_missing_message(data_dir, f"download failed: {reason}")) from error
    missing = missing_files(data_dir)
    if missing:
        raise DataError(_missing_message(data_dir, "download disabled" if not download else "not found"))
    splits = []
    for train in (True, False):
        dataset = FashionMNIST(root=data_dir, train=train, download=False)
        splits.append(Split(dataset.data.contiguous(), dataset.targets.to(torch.int64)))
    return splits[0], splits[1]


def _missing_message(data_dir: Path, reason: str) -> str:
    folder = raw_dir(data_dir).resolve()
    names = ", ".join(missing_files(data_dir)) or ", ".join(RAW_FILES)
    return (f"FashionMNIST is not in {folder} ({reason}). Put the uncompressed files {names} "
            f"there (from https://github.com/zalandoresearch/fashion-mnist), "
            f"or run with network access to download them.")


def checksum(data_dir: str | Path) -> str:
    """SHA-256 over the four raw files, so a run records exactly which data it saw."""
    digest = hashlib.sha256()
    for name in RAW_FILES:
        with open(raw_dir(data_dir) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def take(split: Split, limit: int) -> Split:
    """The first `limit` samples (0 means all), for smoke runs."""
    if limit and limit < len(split):
        return Split(split.images[:limit], split.labels[:limit])
    return split


def standardise(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float32 [B, 1, 28, 28] with the training set's mean 0 and
    deviation 1, channels-last, on the images' device."""
    x = images_uint8.unsqueeze(1).to(torch.float32)
    # One fused multiply-subtract instead of /255, -MEAN, /STD: three passes over the batch.
    x = x.mul_(1.0 / (255.0 * STD)).sub_(MEAN / STD)
    return x.contiguous(memory_format=torch.channels_last)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The shuffled sample order of one epoch: a pure function of (seed, epoch).

    Deriving it instead of drawing from a running generator lets a resumed run rebuild
    the exact order of an interrupted epoch and skip the batches already done.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).to(device)


def steps_per_epoch(n: int, batch_size: int) -> int:
    # A last batch of one sample would break batch norm in training mode, so it is dropped.
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 else 0)


def batches(split: Split, order: torch.Tensor, batch_size: int,
            start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images uint8, labels) index slices of `split` in `order`."""
    for step in range(start_step, steps_per_epoch(len(order), batch_size)):
        index = order[step * batch_size:(step + 1) * batch_size]
        yield split.images[index], split.labels[index]

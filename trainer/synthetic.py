"""Generated stand-in for FashionMNIST, written in its own IDX format.

Tests and the benchmark run where the real dataset cannot be downloaded. The files land
where torchvision's ``FashionMNIST(root=DIR)`` looks for them, so the trainer reads them
through exactly the same path as the real data. Only numpy and click are needed.

    python -m trainer.synthetic --data-dir DIR --train 60000 --test 10000

Each class is a fixed pattern of a few soft blobs; every image is its class pattern with
a random brightness, a shift of up to two pixels and pixel noise. A small CNN learns it
well above chance within an epoch or two of a few hundred images, yet not instantly.
"""

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np

from trainer import config

IMAGE_SIZE = 28
NUM_CLASSES = 10
IDX_UBYTE = 0x08
FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def raw_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "FashionMNIST" / "raw"


def class_patterns(rng: np.random.Generator) -> np.ndarray:
    """Ten 28x28 float patterns in [0, 1], each a sum of a few soft blobs."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    patterns = np.zeros((NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for c in range(NUM_CLASSES):
        for _ in range(4):
            cy, cx = rng.uniform(5, IMAGE_SIZE - 5, size=2)
            sigma = rng.uniform(2.0, 4.5)
            patterns[c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        patterns[c] /= patterns[c].max()
    return patterns


def make_split(n: int, patterns: np.ndarray, rng: np.random.Generator,
               chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, NUM_CLASSES, size=n, dtype=np.int64)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    # Chunks keep peak memory small at full size without a per-image Python loop.
    for start in range(0, n, chunk):
        y = labels[start : start + chunk]
        m = len(y)
        x = patterns[y] * rng.uniform(0.5, 1.0, size=(m, 1, 1)).astype(np.float32)
        shifts = rng.integers(-2, 3, size=(m, 2))
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                pick = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                x[pick] = np.roll(x[pick], (dy, dx), axis=(1, 2))
        x += rng.normal(0.0, 0.25, size=x.shape).astype(np.float32)
        images[start : start + m] = (np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: big-endian magic (0, 0, type, ndim), big-endian dims, then raw bytes."""
    header = bytes([0, 0, IDX_UBYTE, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    # A half-written file must never look like a complete dataset to torchvision.
    os.replace(tmp, path)


def write_dataset(data_dir: str | Path, train: int, test: int, seed: int = 0) -> Path:
    """Write train/test IDX files under DATA_DIR/FashionMNIST/raw and return that folder."""
    rng = np.random.default_rng(seed)
    patterns = class_patterns(rng)
    out = raw_dir(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    for is_train, n in ((True, train), (False, test)):
        images, labels = make_split(n, patterns, rng)
        image_file, label_file = FILES[is_train]
        write_idx(out / image_file, images)
        write_idx(out / label_file, labels)
    return out


PROG = "python -m trainer.synthetic"
COMMAND = click.Command(
    "synthetic", help="Write generated FashionMNIST-format IDX files for tests and benchmarks.",
    context_settings=config.CONTEXT, params=[
        config.Setting("--data-dir", None, type=config.Directory(), required=True,
                       help="root that FashionMNIST(root=...) is given"),
        config.Setting("--train", None, type=click.IntRange(1, 10_000_000), default=600, help="training images"),
        config.Setting("--test", None, type=click.IntRange(1, 10_000_000), default=200, help="test images"),
        config.Setting("--seed", None, type=click.IntRange(0, 2**32 - 1), default=0, help="generator seed"),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    args = config.options(COMMAND, PROG, argv)
    out = write_dataset(args["data_dir"], args["train"], args["test"], args["seed"])
    print(f"wrote {args['train']} train and {args['test']} test images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

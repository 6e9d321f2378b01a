"""Print a request body of real test images for the model endpoint, with their labels.

    python -m trainer.sample --count 5 > request.json

Output: {"inputs": [N x 1 x 28 x 28 floats in [0, 1]], "labels": [N ints]}. The endpoint
reads only "inputs"; the labels let `make predict` and the tests check the answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"),
                        help="dataset root holding FashionMNIST/ (env DATA_DIR)")
    parser.add_argument("--count", type=int, default=5, help="how many test images (1 to 10000)")
    parser.add_argument("--offset", type=int, default=0, help="index of the first test image")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 10_000:
        parser.error("--count must be between 1 and 10000")

    from torchvision.datasets import FashionMNIST

    try:
        test = FashionMNIST(args.data_dir, train=False, download=False)
    except RuntimeError:
        print(f"no FashionMNIST test set under {args.data_dir}: train once first "
              "(docker compose run trainer) so the dataset is downloaded", file=sys.stderr)
        return 1
    images = test.data[args.offset:args.offset + args.count]
    labels = test.targets[args.offset:args.offset + args.count]
    inputs = (images.to(torch.float32) / 255.0).unsqueeze(1)
    json.dump({"inputs": inputs.tolist(), "labels": labels.tolist()}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

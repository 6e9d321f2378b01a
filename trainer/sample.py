"""Print a request body of real test images for the model endpoint, with their labels.

    python -m trainer.sample --count 5 > request.json

Output: {"inputs": [N x 1 x 28 x 28 floats in [0, 1]], "labels": [N ints]}. The endpoint
reads only "inputs"; the labels let `make predict` and the tests check the answers.
"""

import json
import sys
from collections.abc import Sequence

import click
import torch

from trainer import config

PROG = "python -m trainer.sample"
COMMAND = click.Command("sample", help=__doc__.splitlines()[0], context_settings=config.CONTEXT, params=[
    config.DATA_DIR,
    config.Setting("--count", None, type=click.IntRange(1, 10_000), default=5, help="how many test images"),
    config.Setting("--offset", None, type=click.IntRange(0), default=0, help="index of the first test image"),
])


def main(argv: Sequence[str] | None = None) -> int:
    args = config.options(COMMAND, PROG, argv)

    from torchvision.datasets import FashionMNIST

    try:
        test = FashionMNIST(args["data_dir"], train=False, download=False)
    except RuntimeError:
        print(f"no FashionMNIST test set under {args['data_dir']}: train once first "
              "(docker compose run trainer) so the dataset is downloaded", file=sys.stderr)
        return 1
    first, count = args["offset"], args["count"]
    images = test.data[first:first + count]
    labels = test.targets[first:first + count]
    inputs = (images.to(torch.float32) / 255.0).unsqueeze(1)
    json.dump({"inputs": inputs.tolist(), "labels": labels.tolist()}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

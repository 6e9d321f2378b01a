"""python -m trainer: train a FashionMNIST classifier, log it to MLflow, register it and
apply the promotion policy. `python -m trainer --help` lists every flag."""

import sys
from collections.abc import Sequence

from trainer import config


def main(argv: Sequence[str] | None = None) -> int:
    conf = config.load(argv)
    # Imported after the flags are checked: --help and a typo answer in a blink instead
    # of after loading torch and mlflow.
    if conf.nproc > 1 or conf.nnodes > 1:
        from trainer import launch

        return launch.run(conf, argv)
    from trainer import job

    return job.run(conf)


if __name__ == "__main__":
    sys.exit(main())

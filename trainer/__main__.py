"""python -m trainer: train a FashionMNIST classifier, log it to MLflow, register it and
apply the promotion policy. `python -m trainer --help` lists every flag."""

import os
import sys
from collections.abc import Sequence

from trainer import config


def main(argv: Sequence[str] | None = None) -> int:
    conf = config.load(argv)
    # Imported after the flags are checked: --help and a typo answer in a blink instead
    # of after loading torch and mlflow.
    if conf.nproc > 1 or conf.nnodes > 1:
        # PyTorch's C++ side logs each failed connection attempt with a stack trace; the launcher
        # says what failed in one line instead. Read when torch loads; a value set by hand wins.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
        from trainer import launch

        return launch.run(conf, argv)
    from trainer import job

    return job.run(conf)


if __name__ == "__main__":
    sys.exit(main())

"""Fixtures for the trainer's unit tests: generated data and a throwaway MLflow store.

Everything runs in-process against a SQLite store in a temp dir (the model registry
needs a database store), so the suite needs no server, no Docker and no network.
"""

import os
import re
import shutil
import sys
from dataclasses import dataclass

import mlflow
import pytest
import torch
from signing_keys import signing_key_pair

from trainer import synthetic
from trainer.__main__ import main

# Batches this small gain nothing from a second thread, and on a busy 2-core machine
# OpenMP barriers between two threads cost more than the work.
torch.set_num_threads(1)

TRAIN_IMAGES, TEST_IMAGES = 512, 256
# Small and quick, yet enough steps that each epoch logs several train metrics.
FAST = ("--epochs", "1", "--batch-size", "64", "--log-every", "2")


# The trainer signs every model it logs; tracked runs refuse to start without a key.
SIGNING_ENV = signing_key_pair()


@pytest.fixture(scope="session", autouse=True)
def signing_key():
    saved = os.environ.get("MODEL_SIGNING_KEY")
    os.environ["MODEL_SIGNING_KEY"] = SIGNING_ENV["MODEL_SIGNING_KEY"]
    yield SIGNING_ENV
    if saved is None:
        os.environ.pop("MODEL_SIGNING_KEY")
    else:
        os.environ["MODEL_SIGNING_KEY"] = saved


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.write_dataset(root, train=TRAIN_IMAGES, test=TEST_IMAGES, seed=0)
    return root


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An MLflow SQLite database with its schema created once; creating it takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def fresh_store(empty_store, directory):
    shutil.copy(empty_store, directory / "mlflow.db")
    return f"sqlite:///{directory}/mlflow.db"


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store):
    """A fresh tracking + registry store; artifacts land in tmp_path/mlruns."""
    # MLflow puts a SQLite store's artifacts under ./mlruns of the working directory.
    monkeypatch.chdir(tmp_path)
    uri = fresh_store(empty_store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("EXPERIMENT_NAME", "MODEL_NAME", "MODEL_ALIAS", "PROMOTION_POLICY"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def summary(self):
        """The closing lines a user reads: run, version, promoted."""
        lines = self.out.strip().splitlines()[-3:]
        return dict(line.split(": ", 1) for line in lines)

    @property
    def run_id(self):
        return re.search(r"run ([0-9a-f]{32}) started", self.out).group(1)


@pytest.fixture
def train(capsys, data_dir):
    """Run `python -m trainer ARGS` in-process against the generated data."""

    def run(*args):
        capsys.readouterr()
        try:
            code = main(["--data-dir", str(data_dir), *args])
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        sys.stdout.write(captured.out)  # shown by pytest when a test fails
        return Result(code, captured.out, captured.err)

    return run

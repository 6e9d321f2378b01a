"""Retention: deleted runs and experiments go for good with their files, checkpoints are
pruned to the last N, and a registered version's files are never touched. A throwaway
SQLite store with local artifacts stands in for Postgres and S3."""

import posixpath
import shutil
import threading
from pathlib import Path

import mlflow
import pytest

from tracking import gc

SIZE = 1000


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


class Stack:
    def __init__(self, root, empty_store):
        shutil.copy(empty_store, root / "mlflow.db")
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.root = root
        self.artifacts = root / "artifacts"
        self.client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.files = root / "files"
        self.files.mkdir()

    def experiment(self, name):
        return self.client.create_experiment(name, artifact_location=(self.artifacts / name).as_uri())

    def run(self, experiment_id, files=(), status="FINISHED"):
        run_id = self.client.create_run(experiment_id).info.run_id
        for path in files:
            local = self.files / Path(path).name
            local.write_bytes(b"x" * SIZE)
            self.client.log_artifact(run_id, str(local), artifact_path=posixpath.dirname(path) or None)
        self.client.set_terminated(run_id, status)
        return run_id

    def folder(self, run_id):
        return Path(self.client.get_run(run_id).info.artifact_uri.removeprefix("file://"))

    def register(self, run_id, name="fashion"):
        if not self.client.search_registered_models(f"name = '{name}'"):
            self.client.create_registered_model(name)
        return self.client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id).version

    def collect(self, keep=None, dry_run=False):
        said = []
        tally = gc.Collector(self.uri, self.artifacts.as_uri(), dry_run, said.append).collect(keep)
        return tally, said

    def gone(self, run_id):
        try:
            self.client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            return True
        return False


@pytest.fixture
def stack(tmp_path, empty_store):
    return Stack(tmp_path, empty_store)


CHECKPOINTS = [f"checkpoints/epoch-{e:03d}-step-{e * 8:09d}.pt" for e in range(1, 6)]


def test_deleted_runs_go_with_their_files_and_others_stay(stack):
    experiment = stack.experiment("training")
    trash = stack.run(experiment, ["report.txt", "plots/a.png"])
    kept = stack.run(experiment, ["report.txt"])
    stack.client.delete_run(trash)
    trash_folder = stack.folder(trash)

    tally, said = stack.collect()

    assert stack.gone(trash) and not trash_folder.exists()
    assert not stack.gone(kept) and (stack.folder(kept) / "report.txt").is_file()
    assert (tally.runs, tally.freed) == (1, 2 * SIZE)
    assert f"removed deleted run {trash}: 2000 bytes" in said
    assert said[-1].startswith("1 run(s), 0 experiment(s), 0 checkpoint(s); freed 2000 bytes")


def test_deleted_experiments_go_with_their_runs_and_files(stack):
    experiment = stack.experiment("old")
    run_id = stack.run(experiment, ["report.txt"])
    stack.client.delete_experiment(experiment)

    tally, _ = stack.collect()

    assert (tally.experiments, tally.runs, tally.freed) == (1, 1, SIZE)
    assert not (stack.artifacts / "old").exists() and stack.gone(run_id)
    assert stack.client.get_experiment_by_name("old") is None


def test_checkpoints_are_pruned_to_the_last_n_of_finished_runs(stack):
    experiment = stack.experiment("training")
    finished = stack.run(experiment, [*CHECKPOINTS, "model/model.pt"])
    failed = stack.run(experiment, CHECKPOINTS, status="FAILED")  # kept whole: it may be resumed

    tally, said = stack.collect(keep=2)

    remaining = sorted(p.name for p in (stack.folder(finished) / "checkpoints").iterdir())
    assert remaining == ["epoch-004-step-000000032.pt", "epoch-005-step-000000040.pt"]
    assert (stack.folder(finished) / "model" / "model.pt").is_file()
    assert len(list((stack.folder(failed) / "checkpoints").iterdir())) == 5
    assert (tally.checkpoints, tally.freed) == (3, 3 * SIZE)
    assert f"removed checkpoint {CHECKPOINTS[0]} of run {finished}: 1000 bytes" in said


def test_a_registered_versions_files_are_never_touched(stack):
    experiment = stack.experiment("training")
    registered = stack.run(experiment, ["model/model.pt", "report.txt"])
    version = stack.register(registered)
    stack.client.delete_run(registered)  # deleted by mistake: its version is still served
    # A version made from a checkpoint folder, so pruning that folder would break it.
    from_checkpoints = stack.run(experiment, CHECKPOINTS)
    stack.client.create_model_version("fashion", str(stack.folder(from_checkpoints) / "checkpoints"),
                                      run_id=from_checkpoints)
    other = stack.experiment("deleted-but-registered")
    inside = stack.run(other, ["model/model.pt"])
    stack.register(inside)
    stack.client.delete_experiment(other)

    tally, said = stack.collect(keep=1)

    assert (stack.folder(registered) / "model" / "model.pt").is_file() and not stack.gone(registered)
    assert len(list((stack.folder(from_checkpoints) / "checkpoints").iterdir())) == 5
    assert (stack.artifacts / "deleted-but-registered").exists() and not stack.gone(inside)
    assert f"kept deleted run {registered}: it holds the files of fashion version {version}" in said
    assert (tally.runs, tally.experiments, tally.checkpoints, tally.freed) == (0, 0, 0, 0)
    # The deleted run, the experiment and its run, and each checkpoint beyond the first.
    assert tally.kept == 3 + 4


def test_dry_run_removes_nothing_and_says_what_it_would(stack):
    experiment = stack.experiment("training")
    trash = stack.run(experiment, ["report.txt"])
    stack.client.delete_run(trash)
    finished = stack.run(experiment, CHECKPOINTS)
    before = sorted(str(p) for p in stack.artifacts.rglob("*"))

    tally, said = stack.collect(keep=1, dry_run=True)

    assert sorted(str(p) for p in stack.artifacts.rglob("*")) == before
    assert stack.client.get_run(trash).info.lifecycle_stage == "deleted"
    assert f"would remove deleted run {trash}: 1000 bytes" in said
    assert said[-1].startswith("dry run: 1 run(s), 0 experiment(s), 4 checkpoint(s); would free 5000 bytes")
    assert not stack.gone(finished) and tally.freed == 5 * SIZE


def test_the_command_line_prints_removals_and_bytes(stack, capsys):
    experiment = stack.experiment("training")
    stack.client.delete_run(stack.run(experiment, ["report.txt"]))

    assert gc.main(["--backend-store-uri", stack.uri, "--artifacts-destination", stack.artifacts.as_uri()]) == 0
    assert "freed 1000 bytes (1000 B)" in capsys.readouterr().out
    assert gc.main(["--keep-checkpoints", "-1", "--backend-store-uri", stack.uri,
                    "--artifacts-destination", stack.artifacts.as_uri()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--keep-checkpoints" in err[0]


def test_proxied_artifact_paths_resolve_under_the_servers_destination(stack):
    collector = gc.Collector(stack.uri, "s3://bucket/artifacts")
    assert collector.resolve("mlflow-artifacts:/3/abc/artifacts") == "s3://bucket/artifacts/3/abc/artifacts"
    assert collector.resolve("mlflow-artifacts://mlflow:5000/3/abc") == "s3://bucket/artifacts/3/abc"


def test_checkpoint_names_match_the_trainers():
    from trainer import checkpoints

    name = "epoch-012-step-000000345.pt"
    assert checkpoints.NAME.pattern == gc.CHECKPOINT_NAME.pattern
    assert gc.CHECKPOINT_NAME.search(f"{checkpoints.ARTIFACT_DIR}/{name}").group(2) == "000000345"
    assert checkpoints.ARTIFACT_DIR == gc.CHECKPOINT_DIR


def test_a_version_whose_files_cannot_be_found_stops_it_before_any_removal(stack, capsys):
    experiment = stack.experiment("training")
    trash = stack.run(experiment, ["report.txt"])
    stack.client.delete_run(trash)
    stack.client.create_registered_model("fashion")
    stack.client.create_model_version("fashion", "runs:/0123456789abcdef0123456789abcdef/model")

    assert gc.main(["--backend-store-uri", stack.uri, "--artifacts-destination", stack.artifacts.as_uri()]) == 1

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot tell where the files of fashion version 1 are" in err[0]
    assert "nothing was removed" in err[0]
    assert (stack.folder(trash) / "report.txt").is_file()


def test_a_schedule_runs_rounds_until_stopped_and_outlives_a_failed_one():
    stop, rounds, said = threading.Event(), [], []

    def job():
        rounds.append(len(rounds))
        if len(rounds) == 2:
            raise OSError("database went away")
        if len(rounds) == 3:
            stop.set()

    gc.run_every(0.01, job, lambda line, err=False: said.append((line, err)), stop)

    assert rounds == [0, 1, 2]
    assert said == [("gc: error: this round failed: OSError: database went away; the next one is in 2.77778e-06 h",
                     True)]


def test_every_hours_comes_from_the_environment_and_nonsense_is_one_line(stack, capsys, monkeypatch):
    monkeypatch.setenv("GC_EVERY_HOURS", "soon")
    assert gc.main(["--backend-store-uri", stack.uri, "--artifacts-destination", stack.artifacts.as_uri()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--every-hours" in err[0] and "soon" in err[0]
    monkeypatch.setenv("GC_EVERY_HOURS", "0")
    assert gc.main(["--backend-store-uri", stack.uri, "--artifacts-destination", stack.artifacts.as_uri()]) == 2

"""`python -m trainer.sweep`: trials as nested runs under one parent, pruning, resuming, and
the best trial's model registered once; on generated data, a SQLite study and a local store.

The first trials are queued through Optuna's own enqueue_trial, so which trial is clearly
poor (plain SGD at the lowest rate, two steps an epoch) does not depend on the sampler.
"""

import os
import signal
import sys

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from trainer import search_space, study, sweep, tracking

STUDY = "fashion-sweep"
GOOD = {"lr": 3e-3, "batch_size": 32, "optimizer": "adamw", "lr_schedule": "constant", "arch": "small-cnn"}
POOR = {"lr": 1e-4, "batch_size": 256, "optimizer": "sgd", "lr_schedule": "constant", "arch": "quickstart"}


@pytest.fixture
def storage(tmp_path):
    return f"sqlite:///{tmp_path}/optuna.db"


@pytest.fixture
def run_sweep(capsys, data_dir, storage):
    def run(*args):
        capsys.readouterr()
        try:
            code = sweep.main(["--data-dir", str(data_dir), "--storage", storage, "--study", STUDY, "--device", "cpu",
                               "--epochs", "2", "--log-every", "50", "--sampler-seed", "0", *args])
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        sys.stdout.write(captured.out)  # shown by pytest when a test fails
        return code, captured.out, captured.err

    return run


def trial_runs(client):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.sweep_study = '{STUDY}'")
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = sorted((r for r in runs if "sweep_trial" in r.data.tags), key=lambda r: int(r.data.tags["sweep_trial"]))
    return parents, children


def test_trials_nest_under_one_parent_poor_ones_are_pruned_and_the_best_is_registered(store, storage, run_sweep):
    queued = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    for params in (GOOD, {**GOOD, "lr": 1e-2}, POOR):
        queued.enqueue_trial(params)

    code, out, err = run_sweep("--trials", "3")

    assert code == 0, err
    client = MlflowClient()
    parents, children = trial_runs(client)
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    pruned = children[2]
    assert (pruned.info.status, pruned.data.tags["sweep_state"]) == ("KILLED", "pruned")
    assert pruned.data.params["optimizer"] == "sgd" and pruned.data.params["lr"] == "0.0001"
    assert "trial 2: pruned after epoch 1" in out
    complete = children[:2]
    assert [(c.info.status, c.data.tags["sweep_state"]) for c in complete] == [("FINISHED", "complete")] * 2
    best = max(complete, key=lambda c: c.data.metrics["eval_accuracy"])

    version = client.get_model_version_by_alias("fashion-mnist-cnn", "production")
    assert str(version.version) == "1" and version.run_id == best.info.run_id
    assert version.tags["sweep_study"] == STUDY and version.tags["promotion.decision"] == "promoted"
    assert float(version.tags["eval_accuracy"]) == pytest.approx(best.data.metrics["eval_accuracy"], abs=1e-6)
    assert out.strip().splitlines()[-2:] == ["version: 1", "promoted: yes (no version held the alias)"]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["registered_version"] == "1"


def test_a_second_run_continues_the_study_and_registers_only_a_new_best(store, storage, run_sweep):
    queued = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    queued.enqueue_trial(GOOD)
    assert run_sweep("--trials", "1")[0] == 0

    # A worker stopped mid-trial leaves it failed; failed trials do not count towards the budget.
    stopped = queued.ask()
    queued.tell(stopped, state=TrialState.FAIL)
    queued.enqueue_trial(POOR)  # cannot beat the first, so no second version
    code, out, err = run_sweep("--trials", "2")
    assert code == 0, err
    assert "1 of 2 trials finished; running the rest" in out
    assert "this worker ran 1" in out and "trial 2: " in out and "trial 0: " not in out
    client = MlflowClient()
    parents, children = trial_runs(client)
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert out.strip().splitlines()[-2:] == ["version: 1 (registered earlier)",
                                             "promoted: yes (no version held the alias)"]

    code, out, _ = run_sweep("--trials", "2")  # the budget is spent: nothing left to run
    assert code == 0 and "this worker ran 0" in out
    assert len(trial_runs(client)[1]) == 2
    assert [str(v.version) for v in client.search_model_versions("name = 'fashion-mnist-cnn'")] == ["1"]


def test_a_stopped_sweep_continues_where_it_stopped(store, storage, run_sweep, monkeypatch):
    queued = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    for params in (GOOD, {**GOOD, "lr": 1e-2}, {**GOOD, "lr": 2e-3}):
        queued.enqueue_trial(params)
    log = tracking.MetricLogger.log

    def log_then_signal(self, metrics, step):
        log(self, metrics, step)
        # At the end of trial 1's first epoch (its train metrics; the eval metrics share the step).
        if mlflow.active_run().info.run_name == f"{STUDY}-trial-1" and step == 16 and "train_loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tracking.MetricLogger, "log", log_then_signal)
    code, out, err = run_sweep("--trials", "2")
    assert code == 143
    assert err.strip().splitlines()[-1] == ("sweep stopped; the interrupted trial is marked failed and will be "
                                            "run again: run the same command to continue")
    assert "Traceback" not in err
    client = MlflowClient()
    stopped = trial_runs(client)[1][1]
    assert (stopped.info.status, stopped.data.tags["sweep_state"]) == ("KILLED", "interrupted")
    assert [t.state for t in queued.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert client.search_model_versions("name = 'fashion-mnist-cnn'") == []

    monkeypatch.setattr(tracking.MetricLogger, "log", log)
    code, out, err = run_sweep("--trials", "2")
    assert code == 0, err
    assert "1 of 2 trials finished; running the rest" in out and "this worker ran 1" in out
    assert [t.state for t in queued.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert len(trial_runs(client)[1]) == 3
    assert out.strip().splitlines()[-2] == "version: 1"


def test_each_claim_goes_to_one_worker_and_trials_past_the_budget_stand_down(storage):
    shared = study.open_storage(storage)
    assert study.claim(shared, "s:registration:trial-3") is True
    assert study.claim(study.open_storage(storage), "s:registration:trial-3") is False  # another worker
    study.release(shared, "s:registration:trial-3")
    assert study.claim(shared, "s:registration:trial-3") is True

    sweep_study = study.load_or_create(shared, "s", sampler_seed=0)
    first, second, third = sweep_study.ask(), sweep_study.ask(), sweep_study.ask()  # three workers at once
    sweep_study.tell(first, state=TrialState.FAIL)
    assert [study.slot(sweep_study, t.number) for t in (second, third)] == [0, 1]  # budget 1: only `second` runs


@pytest.mark.parametrize(("args", "line"), [
    (("--trials", "0"), "--trials must be an integer from 1 to 10000, got '0'"),
    (("--trials", "-3"), "--trials must be an integer from 1 to 10000, got '-3'"),
    (("--parallel", "2"), "No such option '--parallel'"),
    (("--study", "it's mine"), "--study must be 1 to 100 letters, digits, '.', '_' or '-', got \"it's mine\""),
    (("--storage", "redis://localhost"), "--storage must be a database URL such as sqlite:///optuna.db"),
])
def test_bad_input_is_one_line_and_starts_nothing(store, storage, run_sweep, tmp_path, args, line):
    code, out, err = run_sweep(*args)
    assert code == 2
    assert err.count("\n") == 1 and line in err and "Traceback" not in err
    assert not (tmp_path / "optuna.db").exists()
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


def test_an_unreachable_storage_is_one_line_without_the_password(store, data_dir, capsys):
    code = sweep.main(["--data-dir", str(data_dir), "--trials", "2",
                       "--storage", "postgresql+psycopg2://optuna:s3cret@127.0.0.1:9/optuna"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("python -m trainer.sweep: error: cannot open the study storage "
                          "postgresql+psycopg2://127.0.0.1:9/optuna: ")
    assert err.count("\n") == 1 and "s3cret" not in err
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


def test_without_a_storage_it_says_how_to_give_one(monkeypatch, capsys):
    for name in ("SWEEP_STORAGE_URL", "OPTUNA_DB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_:
        sweep.main([])
    assert exit_.value.code == 2
    assert "no study storage: pass --storage URL or set SWEEP_STORAGE_URL" in capsys.readouterr().err


def test_the_stack_postgres_settings_make_the_storage_url(monkeypatch):
    environ = {"OPTUNA_DB_PASSWORD": "p@ss/word", "POSTGRES_HOST": "db", "MODEL_SIGNING_KEY": "unused"}
    assert sweep.storage_url(None, environ) == "postgresql+psycopg2://optuna:p%40ss%2Fword@db:5432/optuna"
    assert sweep.storage_url("sqlite:///x.db", environ) == "sqlite:///x.db"


def test_help_lists_the_search_space(capsys):
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for dimension in search_space.SPACE:
        assert f"  {dimension.describe()}" in out
    assert "lr: float from 0.0001 to 0.03, log scale (peak learning rate)" in out
    assert "--trials" in out and "SWEEP_STORAGE_URL" in out


def test_workers_racing_to_create_the_study_tables_retry(tmp_path, monkeypatch):
    import sqlalchemy.exc

    real = optuna.storages.RDBStorage
    attempts = []

    def racing(*args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:  # another worker created the tables first
            raise sqlalchemy.exc.IntegrityError("CREATE TABLE alembic_version", {}, Exception("duplicate key"))
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    pauses = []
    storage = study.open_storage(f"sqlite:///{tmp_path / 'race.db'}", sleep=pauses.append)
    assert len(attempts) == 2 and len(pauses) == 1
    assert storage.get_all_studies() == []

"""One sweep worker, top to bottom: open the study's storage; load the data; reach the
tracking server; join (or create) the study and its parent run; run trials until the
budget is taken; wait for trials still running elsewhere; register the best model if no
other worker has. What the study's database decides between workers is trainer/study.py.
"""

import dataclasses
import time
from typing import Any

import mlflow
import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from trainer import data, loop, registry, search_space, study, sweep_runs, tracking
from trainer.config import Config, ConfigError
from trainer.lifecycle import EXIT_SIGNAL, say, warn
from trainer.sweep import PROG, Options

EXIT_FAILED = 1
EXIT_CONFIG = 2
WAIT_POLL_S = 5.0


class BudgetTaken(Exception):
    """Other workers asked for the study's last trials at the same moment; this one stands down."""


class SweepFailed(Exception):
    pass


def load_data(conf: Config, device: torch.device) -> sweep_runs.Data:
    train_split, test_split = data.load(conf.data_dir, conf.download)
    sha256 = data.checksum(conf.data_dir)
    train_split = data.take(train_split, conf.max_train_samples).to(device)
    test_split = data.take(test_split, conf.max_test_samples).to(device)
    say(f"data: {len(train_split)} train / {len(test_split)} test images from {data.raw_dir(conf.data_dir)}; "
        f"device {loop.describe(device)}")
    return sweep_runs.Data(train_split, test_split, sha256, device)


def shown(params: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
                     for name, value in params.items())


def outcome(trial: FrozenTrial) -> str:
    if trial.state == TrialState.COMPLETE:
        return f"complete, eval_accuracy {trial.value:.4f}"
    if trial.state == TrialState.PRUNED and trial.last_step is not None:
        return (f"pruned after epoch {trial.last_step} "
                f"(eval_accuracy {trial.intermediate_values[trial.last_step]:.4f})")
    return trial.state.name.lower()


class Worker:
    def __init__(self, options: Options, storage: optuna.storages.RDBStorage, sweep: optuna.Study,
                 tracking_uri: str, splits: sweep_runs.Data, parent_run_id: str) -> None:
        self.options, self.storage, self.sweep = options, storage, sweep
        self.tracking_uri, self.splits, self.parent_run_id = tracking_uri, splits, parent_run_id
        self.ran: list[int] = []
        self.failed = 0
        self.failure = ""

    def objective(self, trial: optuna.Trial) -> float:
        if study.slot(self.sweep, trial.number) >= self.options.trials:
            raise BudgetTaken(f"the study's {self.options.trials} trials were taken by other workers")
        self.ran.append(trial.number)
        params = search_space.suggest(trial)
        say(f"trial {trial.number}: {shown(params)}")
        conf = dataclasses.replace(self.options.conf, **params, run_name=f"{self.options.study}-trial-{trial.number}")
        try:
            return sweep_runs.run_trial(trial, conf, self.tracking_uri, self.splits, self.parent_run_id)
        except loop.TrainingDiverged as error:
            self.failure = str(error)
            raise

    def work(self) -> None:
        """Run trials until the study's budget is finished, here or elsewhere."""
        budget, said_waiting = self.options.trials, False
        while True:
            study.fail_stale_trials(self.sweep)
            tally = study.counts(self.sweep)
            done, busy = study.finished(tally), study.in_flight(tally)
            if done >= budget:
                return
            if done + busy >= budget:
                if not said_waiting:
                    say(f"waiting for {busy} trial(s) running in other workers")
                    said_waiting = True
                time.sleep(WAIT_POLL_S)
                continue
            if not self.ran:
                say(f"study {self.options.study}: {done} of {budget} trials finished; running the rest")
            ran_before = len(self.ran)
            self.sweep.optimize(self.objective, n_trials=1, catch=(BudgetTaken, loop.TrainingDiverged),
                                gc_after_trial=True)
            if len(self.ran) == ran_before:
                continue  # stood down: the budget was taken meanwhile
            trial = self.sweep.trials[self.ran[-1]]
            say(f"trial {trial.number}: {outcome(trial)}" + (f" ({self.failure})" if self.failure else ""))
            self.failure = ""
            if trial.state == TrialState.FAIL:
                self.failed += 1
                if self.failed >= budget:
                    raise SweepFailed(f"{self.failed} trials failed in this worker; see the errors above")

    def finish(self) -> int:
        tally = study.counts(self.sweep)
        say(f"study {self.options.study}: {study.finished(tally)} of {self.options.trials} trials finished "
            f"({tally[TrialState.COMPLETE]} complete, {tally[TrialState.PRUNED]} pruned); this worker ran "
            f"{len(self.ran)}")
        try:
            best = self.sweep.best_trial
        except ValueError:
            warn("error: no trial completed, so there is no model to register")
            return EXIT_FAILED
        say(f"best: trial {best.number}, eval_accuracy {best.value:.4f} ({shown(best.params)})")
        run_id = best.user_attrs["mlflow_run_id"]
        experiment_id = MlflowClient().get_run(run_id).info.experiment_id
        url = tracking.run_url(self.tracking_uri, experiment_id, run_id)
        job_name = f"{self.options.study}:registration:trial-{best.number}"
        if study.claim(self.storage, job_name):
            try:
                _, version, decision = sweep_runs.register_best(self.sweep, self.options.conf, self.parent_run_id)
            except BaseException:
                study.release(self.storage, job_name)
                raise
            say(f"run: {url}\nversion: {version}\npromoted: {'yes' if decision.promoted else 'no'} "
                f"({decision.reason})")
            return 0
        registered = optuna.load_study(study_name=self.options.study, storage=self.storage).user_attrs.get(
            sweep_runs.REGISTERED_ATTR)
        if registered and registered["trial"] == best.number:
            say(f"run: {url}\nversion: {registered['version']} (registered earlier)\n"
                f"promoted: {'yes' if registered['promoted'] else 'no'} ({registered['reason']})")
        else:
            say(f"run: {url}\nversion: being registered by another worker\npromoted: decided by that worker")
        return 0


def run(options: Options) -> int:
    """Run this worker's share of the sweep; return the process exit status."""
    # Each trial's outcome is one line of ours; Optuna's own would add a traceback for a
    # trial stopped by a signal.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        storage = study.open_storage(options.storage)
    except study.StorageUnavailable as error:
        warn(f"{PROG}: error: {error}")
        return EXIT_FAILED
    conf = options.conf
    try:
        device = loop.pick_device(conf.device)
        splits = load_data(conf, device)
        uri = tracking.connect(conf.tracking_uri, conf.connect_timeout, log=print)
        mlflow.set_experiment(conf.experiment_name)
        sweep = study.load_or_create(storage, options.study, options.sampler_seed)
        if sweep.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ConfigError(f"study {options.study!r} exists and minimises; a sweep maximises eval accuracy, "
                              "so choose another --study")
        worker = Worker(options, storage, sweep, uri, splits, sweep_runs.parent_run(storage, sweep, conf))
        worker.work()
        return worker.finish()
    except ConfigError as error:
        warn(f"{PROG}: error: {error}")
        return EXIT_CONFIG
    except (data.DataError, tracking.TrackingUnavailable, registry.RegistryError, sweep_runs.ParentMissing,
            SweepFailed) as error:
        warn(f"error: {error}")
        return EXIT_FAILED
    except sweep_runs.Interrupted as stopped:
        warn("sweep stopped; the interrupted trial is marked failed and will be run again: "
             "run the same command to continue")
        return stopped.status
    except KeyboardInterrupt:
        warn("sweep stopped; run the same command to continue")
        return EXIT_SIGNAL["SIGINT"]

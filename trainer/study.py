"""The Optuna study every sweep worker shares: its storage, its trial budget, and claims.

Workers on several hosts meet only in the study's database, so everything they must agree
on is decided there:

- The budget counts finished trials (complete or pruned); failed ones are replaced. A trial
  takes a slot only if fewer than the budget of non-failed trials were numbered before it
  (trial numbers are handed out by the database, one at a time), so workers that ask at the
  same moment never run more than the budget between them.
- One-off jobs (making the MLflow parent run, registering the best model) go to whoever
  claims them first. A claim is a study named after the job: study names are unique in the
  storage, so creating one succeeds for exactly one worker.
- A worker that dies mid-trial stops sending heartbeats; after GRACE_S its trial is marked
  failed and another worker runs a trial in its place.
"""

import random
import time
import warnings
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

import optuna
import sqlalchemy.exc
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning
from optuna.trial import TrialState

from stack_common.text import one_line
from stack_common.uris import redact

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
IN_FLIGHT = (TrialState.RUNNING,)
HEARTBEAT_S = 60
GRACE_S = 180
# A storage that does not answer is reported after this long, not after the OS's TCP timeout.
CONNECT_TIMEOUT_S = 10
SCHEMA_RACE_ATTEMPTS = 3
# Small studies should prune too: after two complete trials, a trial whose accuracy after an
# epoch is below the median of theirs at that epoch is stopped.
PRUNER_STARTUP_TRIALS = 2
PRUNER_WARMUP_EPOCHS = 0
SAMPLER_STARTUP_TRIALS = 5


class StorageUnavailable(Exception):
    """The study's database could not be opened; the message is one line without the password."""


def open_storage(url: str, sleep: Callable[[float], None] = time.sleep) -> optuna.storages.RDBStorage:
    engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} if url.startswith("postgres") else {}
    attempt = 1
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=GRACE_S)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # Workers started together race to create the study's tables on a new database;
            # the losers find them made on a second look.
            if attempt == SCHEMA_RACE_ATTEMPTS:
                raise _unavailable(url, error) from None
        except Exception as error:  # noqa: BLE001 - SQLAlchemy, the driver and Optuna each raise their own
            raise _unavailable(url, error) from None
        attempt += 1
        sleep(random.uniform(0.5, 2.0))


def _unavailable(url: str, error: Exception) -> StorageUnavailable:
    message = one_line(error, 400)
    password = urlsplit(url).password
    if password:
        message = message.replace(password, "***")
    return StorageUnavailable(f"cannot open the study storage {redact(url)}: {message}")


def load_or_create(storage: optuna.storages.RDBStorage, name: str, sampler_seed: int | None) -> optuna.Study:
    # constant_liar: trials still running elsewhere count as mediocre, so parallel workers
    # do not all try the same promising corner at once.
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=SAMPLER_STARTUP_TRIALS,
                                         constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                         n_warmup_steps=PRUNER_WARMUP_EPOCHS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                                   pruner=pruner, load_if_exists=True)


def counts(study: optuna.Study) -> Counter[TrialState]:
    return Counter(trial.state for trial in study.get_trials(deepcopy=False))


def finished(tally: Counter[TrialState]) -> int:
    return sum(tally[state] for state in FINISHED)


def in_flight(tally: Counter[TrialState]) -> int:
    return sum(tally[state] for state in IN_FLIGHT)


def slot(study: optuna.Study, number: int) -> int:
    """How many trials before trial `number` may still count towards the budget."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.number < number and t.state != TrialState.FAIL)


def fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def claim(storage: optuna.storages.RDBStorage, job: str) -> bool:
    """True for exactly one caller per job name, across every worker and host."""
    try:
        optuna.create_study(storage=storage, study_name=job)
    except DuplicatedStudyError:
        return False
    return True


def release(storage: optuna.storages.RDBStorage, job: str) -> None:
    """Give a claim back after its job failed, so a later run can do the job."""
    try:
        optuna.delete_study(study_name=job, storage=storage)
    except KeyError:
        pass


def wait_for(read: Callable[[], str | None], deadline_s: float, sleep: Callable[[float], None],
             clock: Callable[[], float]) -> str | None:
    """read() until it gives a value or deadline_s passes."""
    started = clock()
    while True:
        value = read()
        if value is not None or clock() - started > deadline_s:
            return value
        sleep(1.0)

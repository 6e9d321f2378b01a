"""python -m trainer.sweep: a hyperparameter sweep with Optuna, shared by any number of workers.

Every worker started with the same --study and --storage pulls trials from one study until
--trials of them have finished (complete or pruned), then the best trial's model is
registered and the promotion policy applied, exactly as `python -m trainer` does for one
run. A stopped sweep is continued by running the same command again. The search space is
trainer/search_space.py; `--help` prints it.
"""

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from stack_common import settings as env_settings
from trainer import config, search_space
from trainer.config import Config, ConfigError

PROG = "python -m trainer.sweep"
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
# Study names go into MLflow search filters and the names of the study's claims.
STUDY_NAME = re.compile(r"^[\w.-]{1,100}$")
# Trainer flags the sweep chooses per trial, or that have no meaning for a trial.
NOT_FLAGS = {dimension.name for dimension in search_space.SPACE} | {"no_tracking", "run_name", "resume_from"}


class StorageUrl(config.Checked):
    def __init__(self) -> None:
        super().__init__("url", "a database URL such as sqlite:///optuna.db or "
                                "postgresql+psycopg2://user:password@host:5432/optuna", optional=True)

    def check(self, text: str) -> str | None:
        scheme = config.SCHEME.match(text)
        return text if scheme and scheme.group(1).lower().split("+", 1)[0] in STORAGE_SCHEMES else None


SWEEP_SETTINGS = (
    config.Setting("--study", "SWEEP_STUDY", default="fashion-mnist-sweep",
                   type=config.Matching("name", STUDY_NAME, "1 to 100 letters, digits, '.', '_' or '-'"),
                   help="Optuna study name; workers with the same name share its trials"),
    config.Setting("--trials", "SWEEP_TRIALS", type=click.IntRange(1, 10_000), default=20,
                   help="trials the study runs in total, counting those finished before (complete or pruned)"),
    config.Setting("--storage", "SWEEP_STORAGE_URL", type=StorageUrl(), default=None,
                   help="the study's database; unset: the stack's Postgres from OPTUNA_DB, OPTUNA_DB_USER, "
                        "OPTUNA_DB_PASSWORD, POSTGRES_HOST and POSTGRES_PORT"),
    config.Setting("--sampler-seed", "SWEEP_SAMPLER_SEED", type=click.IntRange(0, 2**32 - 1), default=None,
                   help="seeds the sampler of this worker (unset: random; give each worker its own)"),
)
TRAINER_SETTINGS = tuple(s for s in config.SETTINGS if s.name not in NOT_FLAGS)

COMMAND = click.Command(
    "sweep", params=[*SWEEP_SETTINGS, *TRAINER_SETTINGS], context_settings=config.CONTEXT,
    help="Search hyperparameters with Optuna: train trials as nested MLflow runs, prune poor ones after an epoch, "
         "and register the best model when the study's trial budget is spent. Run it on several hosts with the "
         "same --study and --storage to share the work. Every flag defaults to the environment variable shown.",
    epilog="\b\nSearch space (trainer/search_space.py):\n" + "\n".join(f"  {line}" for line in search_space.describe())
           + "\n\nA trial is pruned when its eval accuracy after an epoch is below the median of the complete "
             "trials at that epoch (from the third complete trial on). Running the command again continues the "
             "study. Exit status: 0 done, 1 failed, 2 bad configuration, 130/143 stopped by SIGINT/SIGTERM.")


@dataclass(frozen=True)
class Options:
    conf: Config
    study: str
    trials: int
    storage: str
    sampler_seed: int | None


def storage_url(given: str | None, environ: Mapping[str, str]) -> str:
    if given:
        return given
    if not environ.get("OPTUNA_DB_PASSWORD"):
        raise ConfigError("no study storage: pass --storage URL or set SWEEP_STORAGE_URL, or set OPTUNA_DB_PASSWORD "
                          "(with OPTUNA_DB, OPTUNA_DB_USER, POSTGRES_HOST) to use the stack's Postgres")
    try:
        return env_settings.load(env_settings.SweepDatabase, environ).uri()
    except env_settings.ConfigError as error:
        raise ConfigError(str(error)) from None


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Options:
    values: dict[str, Any] = dict(config.parse_args(COMMAND, PROG, argv, environ).params)
    sweep = {setting.name: values.pop(setting.name) for setting in SWEEP_SETTINGS}
    # Placeholders until each trial picks its own; the trainer's defaults.
    values.update({s.name: s.default for s in config.SETTINGS if s.name in NOT_FLAGS})
    values["download"] = not values.pop("no_download")
    values["tracking"] = not values.pop("no_tracking")
    values["signing_key"] = config.signing_key(environ)
    return Options(Config(**values), sweep["study"], sweep["trials"], storage_url(sweep["storage"], environ),
                   sweep["sampler_seed"])


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    with config.exit_on_bad_input(PROG):
        options = parse(argv, environ)
    # Imported after the flags are checked, so --help and a typo answer at once.
    from trainer import sweep_worker

    return sweep_worker.run(options)


if __name__ == "__main__":
    sys.exit(main())

"""What a sweep searches: one row per training flag it varies, with its type and range.

`python -m trainer.sweep --help` prints SPACE through `describe`, and each trial gets its
values from `suggest`, so the table is the only place the search space is written down.
Every name is a field of trainer.config.Config, so a trial trains with the ordinary job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.config import ARCHITECTURES, LR_SCHEDULES, OPTIMIZERS

if TYPE_CHECKING:  # --help prints the table without loading optuna
    import optuna


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str  # "float", "int" or "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    meaning: str = ""

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, self.choices)

    def describe(self) -> str:
        if self.kind == "choice":
            values = "one of " + ", ".join(map(str, self.choices))
        else:
            values = f"{self.kind} from {self.low:g} to {self.high:g}" + (", log scale" if self.log else "")
        return f"{self.name}: {values} ({self.meaning})"


SPACE: tuple[Dimension, ...] = (
    Dimension("lr", "float", 1e-4, 3e-2, log=True, meaning="peak learning rate"),
    Dimension("batch_size", "choice", choices=(32, 64, 128, 256), meaning="images per training step"),
    Dimension("optimizer", "choice", choices=OPTIMIZERS, meaning="adamw (weight decay 0.01) or plain sgd"),
    Dimension("lr_schedule", "choice", choices=LR_SCHEDULES, meaning="learning-rate schedule"),
    Dimension("arch", "choice", choices=ARCHITECTURES, meaning="network architecture"),
)


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    """One trial's values, by Config field name."""
    return {dimension.name: dimension.suggest(trial) for dimension in SPACE}


def describe() -> list[str]:
    return [dimension.describe() for dimension in SPACE]

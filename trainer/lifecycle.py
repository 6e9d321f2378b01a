"""How a tracked run starts and ends: stop signals, checkpoints, and an honest final status.

FINISHED when the block completes; KILLED on SIGINT/SIGTERM, after a checkpoint of a
consistent state is saved (a second signal stops at once), or on EndedEarly, which goes on to
the caller; FAILED on any other error, which goes on too.
"""

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import mlflow

from trainer import checkpoints, loop, tracking
from trainer.config import Config

EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def say(message: str = "") -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class EndedEarly(Exception):
    """Raised inside a tracked run to stop it on purpose (a pruned sweep trial): the run is
    marked KILLED, not FAILED, and the exception goes on to the caller."""


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a stop between steps, so a checkpoint of a
    consistent state can be saved; a second signal stops at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        warn(f"{self.received} received: stopping after this step and saving a checkpoint "
             "(send it again to stop at once)")

    def __call__(self) -> bool:
        return self.received is not None


@dataclass
class TrackedRun:
    """A run in progress: where it is shown, and what sends its metrics and checkpoints."""

    run_id: str
    url: str
    stop: StopSignals
    logger: tracking.MetricLogger
    uploads: checkpoints.Uploads
    checkpointed_step: int
    # Set when a stop signal ended the run: the process's exit status.
    stopped_status: int | None = None

    def checkpoint(self, state: loop.TrainingState, conf: Config) -> None:
        self.uploads.save(state, conf)
        self.checkpointed_step = state.progress.global_step

    def save_before_stopping(self, state: loop.TrainingState, conf: Config) -> None:
        try:
            if self.checkpointed_step != state.progress.global_step:
                self.checkpoint(state, conf)
            self.uploads.wait()
            self.logger.flush()
        except (Exception, KeyboardInterrupt) as error:  # a second signal included: the run still ends KILLED
            warn(f"could not save the final checkpoint: {error or type(error).__name__}")


@contextmanager
def tracked_run(conf: Config, tracking_uri: str, state: loop.TrainingState, tags: dict[str, str],
                resumed: bool) -> Iterator[TrackedRun]:
    """Start a run; on leaving, end it FINISHED, KILLED (run.stopped_status set, no exception;
    or EndedEarly, which goes on) or FAILED (the exception goes on)."""
    experiment = mlflow.set_experiment(conf.experiment_name)
    system_metrics = tracking.system_metrics_available()
    if not system_metrics:
        warn("system metrics off: install psutil to record CPU, memory and GPU use")
    tags = {**tags, "system_metrics": "on" if system_metrics else "off (psutil not installed)"}
    # Signals are caught from before the run exists, so no window leaves it RUNNING.
    with StopSignals() as stop:
        run_id = mlflow.start_run(run_name=conf.run_name, tags=tags, log_system_metrics=system_metrics).info.run_id
        url = tracking.run_url(tracking_uri, experiment.experiment_id, run_id)
        say(f"run {run_id} started: {url}")
        # Neither constructor contacts the server.
        run = TrackedRun(run_id, url, stop, tracking.MetricLogger(run_id, outage_s=conf.outage_timeout),
                         checkpoints.Uploads(run_id, outage_s=conf.outage_timeout),
                         checkpointed_step=state.progress.global_step if resumed else -1)
        status, at_once = "FAILED", False
        try:
            yield run
            status = "FINISHED"
        except loop.StopRequested:
            status = "KILLED"
            run.save_before_stopping(state, conf)
        except EndedEarly:
            status = "KILLED"
            raise
        except KeyboardInterrupt:
            status, at_once = "KILLED", True
        finally:
            tracking.end_run(status, conf.outage_timeout)
            if status == "FAILED":
                warn(f"run {url} marked FAILED")
    # Only a stopped or finished run gets here; a failed one has raised.
    if at_once:
        warn(f"stopped at once; run {url} marked KILLED")
        run.stopped_status = EXIT_SIGNAL["SIGINT"]
    elif status == "KILLED":
        say(f"stopped by {stop.received} at global step {state.progress.global_step}; "
            f"continue with --resume-from {run_id}")
        say(f"run: {url}\nversion: none\npromoted: no (stopped by {stop.received})")
        run.stopped_status = EXIT_SIGNAL[stop.received]

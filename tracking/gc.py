"""`python -m tracking.gc [--keep-checkpoints N] [--older-than-days D] [--dry-run] [--every-hours H]`:
retention.

Removes for good what was deleted in the UI or the API, and old checkpoints:

- runs in the `deleted` lifecycle stage: their artifacts, then their rows;
- experiments in the `deleted` stage: their artifact folder, their runs, then their rows;
- with --keep-checkpoints N, every checkpoint but the N of highest step of each FINISHED run
  (resuming starts from the highest; trainer/checkpoints.py names them).

With --every-hours H it keeps running and collects every H hours (the compose service
`gc-schedule`, `make up RETENTION=1`); a round that fails is reported and the next one
comes on time.

A registered version's model files are never touched: every removal is first checked
against the storage location of every version in the registry, and a run or experiment
whose artifacts hold one is kept and named. It prints each removal and the bytes freed.

The deletion is MLflow's own (`mlflow gc` uses the same store calls), done here because
`mlflow gc` would delete proxied artifacts through the tracking server with an admin login,
does not look at the registry and does not prune checkpoints. It runs in the tracking
server's image with the server's database role and bucket-scoped S3 key, the only holders
of the right to delete, and never with the admin's password.
"""

from __future__ import annotations

import posixpath
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click
from pydantic import Field

from tracking import settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

CHECKPOINT_DIR = "checkpoints"
# The trainer's checkpoint names (trainer/checkpoints.py; a test keeps the two in step).
CHECKPOINT_NAME = re.compile(r"epoch-(\d+)-step-(\d+)\.pt$")
# start_server.py passes --artifacts-destination s3://<bucket>/artifacts.
ARTIFACTS_PREFIX = "artifacts"
DAY_MS = 86_400_000


class GcRefused(Exception):
    """The registry could not be read in full, so no removal could be checked against it."""


class Retention(settings.Postgres):
    """gc in the tracking server's image: its database role and its S3 bucket (the S3 key
    comes through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, read by boto3 itself)."""

    bucket: str = Field(alias="S3_BUCKET", min_length=1, description="the artifact bucket")


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _normal(uri: str) -> str:
    """One spelling per location, so that prefixes compare: local paths as resolved file URIs."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        return Path(parts.path).resolve().as_uri()
    return uri.rstrip("/")


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


@dataclass
class Tally:
    runs: int = 0
    experiments: int = 0
    checkpoints: int = 0
    kept: int = 0
    freed: int = 0


class Collector:
    def __init__(self, backend_store_uri: str, artifacts_destination: str, dry_run: bool = False,
                 echo: Callable[[str], None] = print) -> None:
        from mlflow import MlflowClient
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        self.store: SqlAlchemyStore = SqlAlchemyStore(backend_store_uri, artifacts_destination)
        self.client: MlflowClient = MlflowClient(tracking_uri=backend_store_uri, registry_uri=backend_store_uri)
        self.destination = artifacts_destination.rstrip("/")
        self.dry_run = dry_run
        self.echo = echo
        self.tally = Tally()
        self.handled: set[str] = set()  # runs already removed with their experiment
        self.protected = self._registered_files()

    # -- where things are ---------------------------------------------------------------------

    def resolve(self, uri: str) -> str:
        """Where an artifact URI's files are: mlflow-artifacts:/ paths are under the server's
        artifacts destination, as the server itself resolves them."""
        if uri.startswith("mlflow-artifacts:"):
            return f"{self.destination}/{urlsplit(uri).path.lstrip('/')}"
        return uri

    def _location(self, uri: str) -> str:
        """Where a version's source or storage URI keeps its files."""
        if uri.startswith("runs:/"):
            run_id, _, path = uri.removeprefix("runs:/").partition("/")
            root = self.store.get_run(run_id).info.artifact_uri
            return posixpath.join(root, path) if path else root
        if uri.startswith("models:/m-"):
            return self.store.get_logged_model(uri.removeprefix("models:/").split("/")[0]).artifact_location
        return uri

    def _registered_files(self) -> dict[str, str]:
        """Storage location of every registered version -> "name version N". A location that
        cannot be found stops the collection before anything is removed."""
        protected = {}
        token = None
        while True:
            page = self.client.search_model_versions(page_token=token)
            for version in page:
                label = f"{version.name} version {version.version}"
                for uri in {version.source, self.client.get_model_version_download_uri(version.name, version.version)}:
                    try:
                        protected[_normal(self.resolve(self._location(uri)))] = label
                    except Exception as error:
                        raise GcRefused(f"cannot tell where the files of {label} are ({uri}): {error}; "
                                        "nothing was removed") from error
            token = page.token
            if not token:
                return protected

    def registered_in(self, uri: str) -> str | None:
        """The registered version whose files this location holds or lies within, if any."""
        where = _normal(self.resolve(uri))
        return next((label for location, label in self.protected.items() if _overlap(where, location)), None)

    def _size(self, uri: str, path: str | None = None) -> int:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(self.resolve(uri))

        def walk(folder: str | None) -> Iterator[int]:
            for info in repo.list_artifacts(folder):
                if info.is_dir:
                    yield from walk(info.path)
                else:
                    yield info.file_size or 0

        try:
            if path:  # a file is sized from its folder's listing; listing the file itself gives nothing
                entry = next((i for i in repo.list_artifacts(posixpath.dirname(path) or None) if i.path == path), None)
                if entry is None:
                    return 0
                if not entry.is_dir:
                    return entry.file_size or 0
            return sum(walk(path))
        except Exception:  # noqa: BLE001 - a folder already gone frees nothing
            return 0

    def _remove_files(self, uri: str, path: str | None, what: str) -> bool:
        """Delete uri[/path] unless it holds a registered version's files; say what was done."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        target = posixpath.join(uri, path) if path else uri
        version = self.registered_in(target)
        if version is not None:  # the guard: nothing below runs for a registered version's files
            self.tally.kept += 1
            self.echo(f"kept {what}: it holds the files of {version}")
            return False
        size = self._size(uri, path)
        if not self.dry_run:
            get_artifact_repository(self.resolve(uri)).delete_artifacts(path)
        self.tally.freed += size
        self.echo(f"{'would remove' if self.dry_run else 'removed'} {what}: {size} bytes")
        return True

    # -- the three kinds of removal -----------------------------------------------------------

    def deleted_runs(self, older_than_ms: int) -> None:
        for run_id in self.store._get_deleted_runs(older_than=older_than_ms):
            if run_id in self.handled:
                continue
            run = self.store.get_run(run_id)
            if self._remove_files(run.info.artifact_uri, None, f"deleted run {run_id}"):
                if not self.dry_run:
                    self.store._hard_delete_run(run_id)
                self.tally.runs += 1

    def deleted_experiments(self, older_than_ms: int) -> None:
        from mlflow.entities import ViewType

        threshold = int(time.time() * 1000) - older_than_ms
        for experiment in self._pages(lambda token: self.store.search_experiments(
                view_type=ViewType.DELETED_ONLY, page_token=token)):
            if older_than_ms and (experiment.last_update_time or 0) >= threshold:
                continue
            what = f"deleted experiment {experiment.experiment_id} ({experiment.name})"
            runs = list(self._pages(lambda token, e=experiment: self.store.search_runs(
                [e.experiment_id], "", ViewType.ALL, page_token=token)))
            root = experiment.artifact_location
            if not self._remove_files(root, None, what):
                continue
            for run in runs:  # runs kept elsewhere than under the experiment's folder
                inside = _overlap(_normal(self.resolve(run.info.artifact_uri)), _normal(self.resolve(root)))
                if inside or self._remove_files(run.info.artifact_uri, None, f"run {run.info.run_id} of {what}"):
                    self.handled.add(run.info.run_id)
                    if not self.dry_run:
                        self.store._hard_delete_run(run.info.run_id)
                    self.tally.runs += 1
            if not self.dry_run:
                self.store._hard_delete_experiment(experiment.experiment_id)
            self.tally.experiments += 1

    def checkpoints(self, keep: int) -> None:
        from mlflow.entities import ViewType
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        experiments = [e.experiment_id for e in self._pages(
            lambda token: self.store.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=token))]
        if not experiments:
            return
        for run in self._pages(lambda token: self.store.search_runs(
                experiments, "attributes.status = 'FINISHED'", ViewType.ACTIVE_ONLY, page_token=token)):
            uri = run.info.artifact_uri
            try:
                listed = get_artifact_repository(self.resolve(uri)).list_artifacts(CHECKPOINT_DIR)
            except Exception:  # noqa: BLE001 - a run without artifacts has no checkpoints
                continue
            found = sorted(((int(m.group(2)), info.path) for info in listed
                            if not info.is_dir and (m := CHECKPOINT_NAME.search(info.path))), reverse=True)
            for _, path in found[keep:]:
                if self._remove_files(uri, path, f"checkpoint {path} of run {run.info.run_id}"):
                    self.tally.checkpoints += 1

    @staticmethod
    def _pages(fetch: Callable[[str | None], Any]) -> Iterator[Any]:
        token = None
        while True:
            page = fetch(token)
            yield from page
            token = page.token
            if not token:
                return

    def collect(self, keep_checkpoints: int | None, older_than_days: float = 0.0) -> Tally:
        older_than_ms = int(older_than_days * DAY_MS)
        self.deleted_experiments(older_than_ms)
        self.deleted_runs(older_than_ms)
        if keep_checkpoints is not None:
            self.checkpoints(keep_checkpoints)
        t = self.tally
        verb = "would free" if self.dry_run else "freed"
        self.echo(f"{'dry run: ' if self.dry_run else ''}{t.runs} run(s), {t.experiments} experiment(s), "
                  f"{t.checkpoints} checkpoint(s); {verb} {t.freed} bytes ({human(t.freed)}); "
                  f"{t.kept} kept for registered versions")
        return t


def run_every(interval_s: float, job: Callable[[], object], echo: Callable[..., None],
              stop: threading.Event) -> None:
    """job() now and then every interval_s until stop is set. A round that fails is said in
    one line; the schedule goes on, as the next round may well succeed (a database back)."""
    from stack_common.text import one_line

    while True:
        try:
            job()
        except Exception as error:  # noqa: BLE001 - the schedule outlives any one round
            echo(f"gc: error: this round failed: {type(error).__name__}: {one_line(error)}; "
                 f"the next one is in {interval_s / 3600:g} h", err=True)
        if stop.wait(interval_s):
            return


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--keep-checkpoints", type=click.IntRange(min=0), default=None, envvar="GC_KEEP_CHECKPOINTS",
              help="keep only the N checkpoints of highest step of each finished run; default: prune none "
                   "[GC_KEEP_CHECKPOINTS]")
@click.option("--older-than-days", type=click.FloatRange(min=0), default=0.0, show_default=True,
              envvar="GC_OLDER_THAN_DAYS",
              help="remove only what was deleted at least this many days ago [GC_OLDER_THAN_DAYS]")
@click.option("--every-hours", type=click.FloatRange(min=0, min_open=True), default=None, envvar="GC_EVERY_HOURS",
              help="keep running: collect now and then every H hours [GC_EVERY_HOURS]")
@click.option("--dry-run", is_flag=True, help="say what would be removed, remove nothing")
@click.option("--backend-store-uri", default=None,
              help="the tracking database; default: the server's, from its environment")
@click.option("--artifacts-destination", default=None,
              help="where mlflow-artifacts:/ paths live; default: s3://$S3_BUCKET/artifacts")
def cli(keep_checkpoints: int | None, older_than_days: float, every_hours: float | None, dry_run: bool,
        backend_store_uri: str | None, artifacts_destination: str | None) -> None:
    """Permanently remove deleted runs and experiments, and prune old checkpoints."""
    if backend_store_uri is None or artifacts_destination is None:
        conf = settings.load(Retention)
        backend_store_uri = backend_store_uri or conf.uri(conf.tracking_db)
        artifacts_destination = artifacts_destination or f"s3://{conf.bucket}/{ARTIFACTS_PREFIX}"

    def collect() -> Tally:
        return Collector(backend_store_uri, artifacts_destination, dry_run, click.echo).collect(keep_checkpoints,
                                                                                                older_than_days)

    if every_hours is None:
        collect()
        return
    stop = threading.Event()
    # `docker stop`: the round in progress finishes, no new one starts.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    click.echo(f"collecting now and every {every_hours:g} h")
    run_every(every_hours * 3600, collect, click.echo, stop)


def main(argv: list[str] | None = None) -> int:
    from mlflow.exceptions import MlflowException

    from stack_common.text import one_line

    try:
        cli.main(args=argv, prog_name="python -m tracking.gc", standalone_mode=False)
    except click.ClickException as error:
        print(f"gc: error: {one_line(error.format_message())}", file=sys.stderr)
        return 2
    except MlflowException as error:
        print(f"gc: error: {one_line(error.message)}", file=sys.stderr)
        return 1
    except GcRefused as error:
        print(f"gc: error: {one_line(error, 1000)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

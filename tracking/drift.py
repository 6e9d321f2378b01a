"""`python -m tracking.drift --since DATE [--until DATE] [--version N]`: how far what serving
saw in a period drifted from what each version was trained and evaluated on.

Reads the period's Parquet files of the prediction log (serving/prediction_log.py) from the
inference experiment, groups the rows by the version that answered, and compares each group
with that version's reference statistics (trainer/reference_stats.py): the predicted classes
by population stability index, total variation distance and a chi-square test, the pixel
intensities by population stability index. The report is a run in the drift experiment
(DRIFT_EXPERIMENT, default <model name>-drift) with the metrics, a plot (drift/report.png) and
a JSON summary (drift/summary.json). The inference experiment is only read: it holds what
serving saw, written by the prediction log's own account, and no report can alter it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np
from mlflow.exceptions import MlflowException

from stack_common import distributions
from stack_common.text import one_line

if TYPE_CHECKING:
    import pyarrow as pa
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

DAY_TAG = "prediction_day"  # as serving/prediction_upload.py tags each day's run
PREDICTIONS_DIR = "predictions"
REFERENCE_ARTIFACT = "reference/stats.json"  # as trainer/reference_stats.py logs it
REPORT_TAG = "drift_report"
# Commonly read as a significant shift; the report says which versions pass it.
PSI_THRESHOLD = 0.2
EXIT_NOTHING = 1
EXIT_USAGE = 2


class DriftError(Exception):
    """Nothing to compare, said in one line."""


@dataclass
class Served:
    """What one version answered in the period."""

    rows: int = 0
    class_counts: np.ndarray = field(default_factory=lambda: np.zeros(10, dtype=np.int64))
    intensity_counts: np.ndarray = field(
        default_factory=lambda: np.zeros(len(distributions.INTENSITY_EDGES) - 1, dtype=np.int64))
    first: datetime | None = None
    last: datetime | None = None

    def add(self, table: pa.Table) -> None:
        import pyarrow.compute as pc

        self.rows += table.num_rows
        classes = table.column("predicted_class").drop_null().to_numpy()
        self.class_counts += np.bincount(classes[(classes >= 0) & (classes < 10)], minlength=10)
        self.intensity_counts += distributions.intensity_counts(pc.list_flatten(table.column("inputs")).to_numpy())
        times = table.column("time")
        first, last = pc.min(times).as_py(), pc.max(times).as_py()
        self.first = first if self.first is None else min(self.first, first)
        self.last = last if self.last is None else max(self.last, last)


def parse_moment(text: str, end_of_day: bool) -> datetime:
    """A date (its start, or with end_of_day its end) or an ISO time; UTC unless it says."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day + timedelta(days=1) if end_of_day else day, time(), UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a date (YYYY-MM-DD) or an ISO time "
                                 "(YYYY-MM-DDTHH:MM[:SS][+HH:MM])") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _day_runs(client: MlflowClient, experiment_id: str, since: datetime, until: datetime) -> list[str]:
    first, last = since.date().isoformat(), until.date().isoformat()
    found, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.{DAY_TAG} != ''", page_token=token)
        found += [run.info.run_id for run in page if first <= run.data.tags[DAY_TAG] <= last]
        token = page.token
        if not token:
            return found


def read_period(client: MlflowClient, experiment_id: str, since: datetime, until: datetime,
                version: str | None) -> dict[str, Served]:
    """Per version, what the prediction log holds from since (inclusive) to until (exclusive)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    served: dict[str, Served] = {}
    for run_id in _day_runs(client, experiment_id, since, until):
        for info in client.list_artifacts(run_id, PREDICTIONS_DIR):
            if info.is_dir or not info.path.endswith(".parquet"):
                continue
            with tempfile.TemporaryDirectory(prefix="drift-") as folder:
                table = pq.read_table(client.download_artifacts(run_id, info.path, folder),
                                      columns=["time", "model_version", "inputs", "predicted_class"])
            times = table.column("time")
            bounds = [pa.scalar(moment, times.type) for moment in (since, until)]
            table = table.filter(pc.and_(pc.greater_equal(times, bounds[0]), pc.less(times, bounds[1])))
            for name in pc.unique(table.column("model_version")).to_pylist():
                if version is None or name == version:
                    served.setdefault(name, Served()).add(table.filter(pc.equal(table.column("model_version"), name)))
    return served


def reference_of(client: MlflowClient, model_name: str, version: str) -> dict[str, Any]:
    """The reference statistics logged with the version's training run."""
    run_id = client.get_model_version(model_name, version).run_id
    if not run_id:
        raise DriftError(f"version {version} of {model_name} names no training run")
    with tempfile.TemporaryDirectory(prefix="drift-") as folder:
        try:
            path = client.download_artifacts(run_id, REFERENCE_ARTIFACT, folder)
        except Exception:  # noqa: BLE001 - any failure means the same to the reader
            raise DriftError(f"version {version}'s run {run_id} has no {REFERENCE_ARTIFACT} "
                             "(trained before reference statistics were logged)") from None
        return json.loads(Path(path).read_text())


def compare(reference: dict[str, Any], served: Served) -> dict[str, float]:
    if reference.get("intensity_edges") != distributions.INTENSITY_EDGES.tolist():
        raise DriftError("the reference's intensity bins differ from this report's")
    chi2, p_value = distributions.chi_square(reference["prediction_counts"], served.class_counts)
    return {
        "rows": float(served.rows),
        "class_psi": distributions.psi(reference["prediction_counts"], served.class_counts),
        "class_tvd": distributions.total_variation(reference["prediction_counts"], served.class_counts),
        "class_chi2": chi2,
        "class_chi2_p": p_value,
        "intensity_psi": distributions.psi(reference["intensity_counts"], served.intensity_counts),
    }


def summarise(client: MlflowClient, model_name: str, served: dict[str, Served]) -> dict[str, Any]:
    versions: dict[str, Any] = {}
    for version, seen in sorted(served.items(), key=lambda item: int(item[0]) if item[0].isdigit() else 0):
        entry: dict[str, Any] = {
            "rows": seen.rows,
            "first": seen.first.isoformat() if seen.first else None,
            "last": seen.last.isoformat() if seen.last else None,
            "served_class_counts": seen.class_counts.tolist(),
            "served_intensity_counts": seen.intensity_counts.tolist(),
        }
        try:
            reference = reference_of(client, model_name, version)
            metrics = compare(reference, seen)
        except Exception as error:  # noqa: BLE001 - one version without a reference does not stop the rest
            entry.update(reference=None, problem=one_line(error))
        else:
            entry.update(reference={k: reference.get(k) for k in ("classes", "samples", "prediction_counts",
                                                                   "label_counts", "intensity_counts")},
                         metrics=metrics,
                         drift=metrics["class_psi"] > PSI_THRESHOLD or metrics["intensity_psi"] > PSI_THRESHOLD)
        versions[version] = entry
    return {"model_name": model_name, "psi_threshold": PSI_THRESHOLD, "versions": versions}


def figure(summary: dict[str, Any], classes: list[str]) -> Figure:
    """Per version: class shares and intensity shares, reference beside served."""
    from matplotlib.figure import Figure

    rows = summary["versions"]
    fig = Figure(figsize=(12, 3.2 * max(1, len(rows))), layout="constrained")
    axes = fig.subplots(max(1, len(rows)), 2, squeeze=False)
    centres = (distributions.INTENSITY_EDGES[:-1] + distributions.INTENSITY_EDGES[1:]) / 2
    for (version, entry), (left, right) in zip(rows.items(), axes, strict=False):
        reference = entry.get("reference") or {}
        x = np.arange(len(classes))
        left.bar(x - 0.2, distributions.shares(entry["served_class_counts"]), 0.4, label="served")
        if reference:
            left.bar(x + 0.2, distributions.shares(reference["prediction_counts"]), 0.4, label="reference")
        left.set_xticks(x, classes, rotation=45, ha="right", fontsize=8)
        metrics = entry.get("metrics") or {}
        left.set_title(f"v{version}: predicted classes" + (f" (PSI {metrics['class_psi']:.3f})" if metrics else ""))
        left.legend(fontsize=8)
        # Log scale: black background pixels outnumber the rest; empty bins at the floor PSI uses.
        floor = distributions.SHARE_FLOOR
        right.plot(centres, np.maximum(distributions.shares(entry["served_intensity_counts"]), floor), marker="o",
                   label="served")
        if reference:
            right.plot(centres, np.maximum(distributions.shares(reference["intensity_counts"]), floor), marker="x",
                       label="reference")
        right.set_yscale("log")
        right.set_xlabel("pixel value")
        left.set_ylabel("share")
        right.set_title(f"v{version}: pixel intensity" + (f" (PSI {metrics['intensity_psi']:.3f})" if metrics else ""))
        right.legend(fontsize=8)
    return fig


def log_report(client: MlflowClient, experiment_id: str, summary: dict[str, Any], classes: list[str]) -> str:
    since, until = summary["since"], summary["until"]
    run = client.create_run(experiment_id, run_name=f"drift {since[:16]} to {until[:16]}",
                            tags={REPORT_TAG: "yes", "drift.since": since, "drift.until": until})
    run_id = run.info.run_id
    from mlflow.entities import Metric

    stamp = int(datetime.now(UTC).timestamp() * 1000)
    metrics = [Metric(f"v{version}.{key}", value, stamp, 0)
               for version, entry in summary["versions"].items() for key, value in (entry.get("metrics") or {}).items()]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, summary, "drift/summary.json")
    client.log_figure(run_id, figure(summary, classes), "drift/report.png")
    client.set_terminated(run_id)
    return run_id


def report_experiment(client: MlflowClient, name: str) -> str:
    """The drift experiment's id; mlflow-init makes it, and the trainer's account may create it too."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def run_report(client: MlflowClient, experiment_name: str, model_name: str, since: datetime, until: datetime,
               version: str | None = None, report_to: str | None = None) -> tuple[str, dict[str, Any]]:
    """Read, compare and log; return the report's run id and its summary."""
    if until <= since:
        raise DriftError(f"--until {until.isoformat()} is not after --since {since.isoformat()}")
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise DriftError(f"no experiment {experiment_name!r}: serving has logged no predictions there "
                         "(PREDICTION_LOG_SAMPLE, PREDICTION_LOG_EXPERIMENT)")
    served = read_period(client, experiment.experiment_id, since, until, version)
    if not served:
        which = f" by version {version}" if version else ""
        raise DriftError(f"no predictions logged{which} from {since.isoformat()} to {until.isoformat()} "
                         f"in experiment {experiment_name!r}")
    summary = {"since": since.isoformat(), "until": until.isoformat(), **summarise(client, model_name, served)}
    classes = next((e["reference"].get("classes") for e in summary["versions"].values()
                    if e.get("reference") and e["reference"].get("classes")), None)
    classes = classes or [str(i) for i in range(10)]
    report_id = report_experiment(client, report_to or f"{model_name}-drift")
    return log_report(client, report_id, summary, classes), summary


def describe(summary: dict[str, Any]) -> list[str]:
    lines = []
    for version, entry in summary["versions"].items():
        metrics = entry.get("metrics")
        if metrics is None:
            lines.append(f"version {version}: {entry['rows']} images, not compared: {entry['problem']}")
            continue
        verdict = "DRIFT" if entry["drift"] else "no drift"
        lines.append(f"version {version}: {entry['rows']} images, {verdict}: class PSI {metrics['class_psi']:.3f}, "
                     f"TVD {metrics['class_tvd']:.3f}, chi-square p {metrics['class_chi2_p']:.3g}; "
                     f"intensity PSI {metrics['intensity_psi']:.3f}")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--since", required=True, help="start of the period: YYYY-MM-DD (UTC) or an ISO time")
@click.option("--until", default=None, help="end of the period, that day included; default: now")
@click.option("--version", default=None, help="only the answers of this version")
@click.option("--model-name", envvar="MODEL_NAME", required=True, help="the registered model [MODEL_NAME]")
@click.option("--experiment", envvar="PREDICTION_LOG_EXPERIMENT", default=None,
              help="the prediction log's experiment [PREDICTION_LOG_EXPERIMENT; default <model name>-inference]")
@click.option("--report-experiment", envvar="DRIFT_EXPERIMENT", default=None,
              help="where the report run goes [DRIFT_EXPERIMENT; default <model name>-drift]")
def cli(since: str, until: str | None, version: str | None, model_name: str, experiment: str | None,
        report_experiment: str | None) -> None:
    """Compare what serving answered in a period with each version's reference statistics."""
    from mlflow import MlflowClient

    # MLflow draws a progress bar on stderr for every download; the report's lines are enough.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    start = parse_moment(since, end_of_day=False)
    end = parse_moment(until, end_of_day=True) if until else datetime.now(UTC)
    if version is not None and not version.isdigit():
        raise click.BadParameter(f"{version!r} is not a version number", param_hint="--version")
    client = MlflowClient()
    run_id, summary = run_report(client, experiment or f"{model_name}-inference", model_name, start, end, version,
                                 report_experiment)
    for line in describe(summary):
        click.echo(line)
    click.echo(f"report: run {run_id} (drift/report.png, drift/summary.json)")


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="python -m tracking.drift", standalone_mode=False)
    except click.ClickException as error:
        print(f"drift: error: {one_line(error.format_message())}", file=sys.stderr)
        return EXIT_USAGE
    except DriftError as error:
        print(f"drift: {error}", file=sys.stderr)
        return EXIT_NOTHING
    except MlflowException as error:  # refused, unreachable: the server's words, on one line
        print(f"drift: error: {one_line(error.message)}", file=sys.stderr)
        return EXIT_NOTHING
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The MLflow side of a sweep: one parent run per study, one nested run per trial, and the
registration of the best trial's model.

Every trial run carries the tags `sweep_study`, `sweep_trial` and `sweep_state` (complete,
pruned or interrupted) and MLflow's `mlflow.parentRunId`. A pruned trial ends KILLED, as a
run stopped on purpose does; a trial that crashed ends FAILED.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlflow
import optuna
import torch
from mlflow.tracking import MlflowClient

from trainer import architectures, data, export, job, loop, registry, report, study, tracking
from trainer.config import Config
from trainer.job import tracked
from trainer.lifecycle import EndedEarly, say, tracked_run

PARENT_ATTR = "mlflow_parent_run_id"
REGISTERED_ATTR = "registered"


class Pruned(EndedEarly):
    """The pruner stopped a trial: its run ends KILLED and tagged sweep_state=pruned."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped a trial; status is the process's exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"stopped by a signal (exit status {status})")
        self.status = status


class ParentMissing(Exception):
    """The worker that claimed the study's parent run did not record it in time."""


@dataclass(frozen=True)
class Data:
    train: data.Split
    test: data.Split
    sha256: str
    device: torch.device


def parent_run(storage: optuna.storages.RDBStorage, sweep: optuna.Study, conf: Config,
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> str:
    """The run every trial of the study nests under, made once for all workers and resumes."""
    recorded = sweep.user_attrs.get(PARENT_ATTR)
    if recorded:
        return recorded
    if study.claim(storage, f"{sweep.study_name}:parent"):
        client = MlflowClient()
        experiment = mlflow.set_experiment(conf.experiment_name)
        # Found first: a worker that crashed after making it but before recording it.
        filter_string = f"tags.sweep_study = '{sweep.study_name}' and tags.sweep_role = 'parent'"
        found = tracked(conf, "looking for the sweep's parent run", client.search_runs, [experiment.experiment_id],
                        filter_string, max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {"sweep_study": sweep.study_name, "sweep_role": "parent"}
            commit = job.git_commit()
            if commit:
                tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
            run_id = tracked(conf, "creating the sweep's parent run", client.create_run, experiment.experiment_id,
                             run_name=sweep.study_name, tags=tags).info.run_id
        sweep.set_user_attr(PARENT_ATTR, run_id)
        return run_id
    # Another worker claimed it a moment ago and is making it; its MLflow calls may be
    # waiting out an outage, so allow as long as they may take.
    run_id = study.wait_for(lambda: optuna.load_study(study_name=sweep.study_name, storage=storage)
                            .user_attrs.get(PARENT_ATTR), conf.connect_timeout + conf.outage_timeout, sleep, clock)
    if run_id is None:
        raise ParentMissing(f"the worker that claimed making the parent run of study {sweep.study_name!r} did not "
                            f"record it; if that worker is gone, delete the study '{sweep.study_name}:parent' "
                            "(optuna delete-study) and run again")
    return run_id


def run_trial(trial: optuna.Trial, conf: Config, tracking_uri: str, splits: Data, parent_run_id: str) -> float:
    """Train one trial as a run nested under the parent; return its final eval accuracy.

    Reports eval accuracy after every epoch; raises optuna.TrialPruned when the pruner stops
    it and Interrupted after SIGINT/SIGTERM.
    """
    state = job.build(conf, splits.device)
    tags = {"mlflow.parentRunId": parent_run_id, "sweep_study": trial.study.study_name,
            "sweep_trial": str(trial.number), "dataset_sha256": splits.sha256,
            "device": loop.describe(splits.device), "architecture": conf.arch}
    commit = job.git_commit()
    if commit:
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    try:
        with tracked_run(conf, tracking_uri, state, tags, resumed=False) as run:
            trial.set_user_attr("mlflow_run_id", run.run_id)

            def report_or_prune(epoch: int, evaluation: dict[str, Any]) -> None:
                trial.report(evaluation["accuracy"], epoch)
                if trial.should_prune():
                    run.logger.flush()
                    tracked(conf, "tagging the run", mlflow.set_tags,
                            {"sweep_state": "pruned", "sweep_pruned_at_epoch": str(epoch)})
                    raise Pruned(f"eval_accuracy {evaluation['accuracy']:.4f} after epoch {epoch} is below "
                                 "the median of earlier trials")

            params = job.params_of(conf, state, splits.train, splits.test)
            tracked(conf, "logging parameters", mlflow.log_params, params)
            tracking.log_datasets(splits.train, splits.test, data.raw_dir(conf.data_dir).resolve(), splits.sha256,
                                  conf.outage_timeout)
            tracked(conf, "logging the model summary", mlflow.log_text,
                    architectures.summary(state.model, conf.arch), "model_summary.txt")
            evaluation = job.fit(state, splits.train, splits.test, conf, run.logger, run.stop,
                                 on_evaluation=report_or_prune)
            if run.stop():  # the signal came during the last evaluation
                raise loop.StopRequested()
            run.logger.flush()
            confusion = evaluation["confusion"]
            figure = report.confusion_figure(confusion, data.CLASSES,
                                             f"{conf.arch}: eval accuracy {evaluation['accuracy']:.4f}")
            tracked(conf, "logging the confusion matrix", mlflow.log_figure, figure, "confusion_matrix.png")
            tracked(conf, "logging the per-class table", mlflow.log_table,
                    report.per_class_table(confusion, data.CLASSES), artifact_file="per_class_accuracy.json")
            model_uri = tracked(conf, "logging the model", export.log_served_model, state.model, splits.test,
                                conf.arch, conf.model_name, conf.signing_key)
            tracked(conf, "tagging the run", mlflow.set_tag, "sweep_state", "complete")
    except Pruned as pruned:
        raise optuna.TrialPruned(str(pruned)) from None
    if run.stopped_status is not None:
        MlflowClient().set_tag(run.run_id, "sweep_state", "interrupted")
        raise Interrupted(run.stopped_status)
    trial.set_user_attr("model_uri", model_uri)
    trial.set_user_attr("eval_loss", f"{evaluation['loss']:.6f}")
    trial.set_user_attr("eval_samples", len(splits.test))
    trial.set_user_attr("dataset_sha256", splits.sha256)
    return float(evaluation["accuracy"])


def register_best(sweep: optuna.Study, conf: Config, parent_run_id: str) -> tuple[optuna.trial.FrozenTrial, str,
                                                                                   registry.Decision]:
    """Register the best trial's model and apply the promotion policy, as a training run does."""
    best = sweep.best_trial
    attrs = best.user_attrs
    run_id = attrs["mlflow_run_id"]
    version = tracked(conf, "registering the model", registry.register, attrs["model_uri"], conf.model_name, run_id, {
        "eval_accuracy": f"{best.value:.6f}",
        "eval_loss": attrs["eval_loss"],
        "eval_samples": attrs["eval_samples"],
        "dataset_sha256": attrs["dataset_sha256"],
        "architecture": best.params["arch"],
        "sweep_study": sweep.study_name,
        "sweep_trial": best.number,
    })
    decision = tracked(conf, "moving the alias", registry.promote_by_policy, conf.model_name, conf.model_alias,
                       version.version, conf.promotion_policy)
    client = MlflowClient()
    promoted = "yes" if decision.promoted else "no"
    for key, value in {"registered_version": version.version, "promoted": promoted}.items():
        tracked(conf, "tagging the run", client.set_tag, run_id, key, str(value))
    for key, value in {"best_trial": best.number, "best_run_id": run_id, "registered_version": version.version,
                       "promoted": promoted}.items():
        tracked(conf, "tagging the parent run", client.set_tag, parent_run_id, key, str(value))
    tracked(conf, "logging the best accuracy", client.log_metric, parent_run_id, "best_eval_accuracy", best.value)
    tracked(conf, "ending the parent run", client.set_terminated, parent_run_id, "FINISHED")
    sweep.set_user_attr(REGISTERED_ATTR, {"trial": best.number, "version": str(version.version),
                                          "promoted": decision.promoted, "reason": decision.reason})
    say(f"registered trial {best.number}'s model as version {version.version}")
    return best, str(version.version), decision

"""`make sweep TRIALS=4 PARALLEL=2`: two sweep workers, each its own container, pull trials from
one Optuna study kept in the stack's Postgres; every trial is a child run of one parent run,
and the best trial's model is registered once. Run again, the finished study does nothing.
Uses the session's generated data (the `trained` fixture)."""

from __future__ import annotations

import re
import subprocess

from mlflow import MlflowClient
from stack import Stack

STUDY, TRIALS = "integration-sweep", 4


def sweep_worker(stack: Stack) -> subprocess.Popen:
    # As `make sweep` starts each worker; the alias stays where it is for the other tests.
    command = stack.compose_command("run", "--rm", "-T", "--no-deps", "-e", "PROMOTION_POLICY=never", "sweep",
                                    "--study", STUDY, "--trials", str(TRIALS), "--epochs", "2")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(worker: subprocess.Popen) -> str:
    out, _ = worker.communicate(timeout=1200)
    assert worker.returncode == 0, out[-4000:]
    return out


def test_two_workers_share_one_study_and_register_its_best_trial(stack: Stack, trained, admin_client: MlflowClient):
    outputs = [finish(w) for w in [sweep_worker(stack), sweep_worker(stack)]]

    experiment = admin_client.get_experiment_by_name(stack.env["EXPERIMENT_NAME"])
    runs = admin_client.search_runs([experiment.experiment_id], f"tags.sweep_study = '{STUDY}'")
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [r.data.tags for r in parents]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    finished = [r for r in trials if r.data.tags.get("sweep_state") in ("complete", "pruned")]
    assert len(finished) == TRIALS, [(r.data.tags.get("sweep_state"), r.info.status) for r in trials]
    assert all(r.info.status == ("FINISHED" if r.data.tags["sweep_state"] == "complete" else "KILLED")
               for r in finished)
    # Both workers took trials from the one study (each starts within seconds; a trial takes longer).
    started = [re.findall(r"^trial (\d+): ", out, re.MULTILINE) for out in outputs]
    assert all(started) and not set(started[0]) & set(started[1]), started

    complete = {r.info.run_id: r for r in finished if r.data.tags["sweep_state"] == "complete"}
    best_accuracy = max(r.data.metrics["eval_accuracy"] for r in complete.values())
    registered = [v for v in admin_client.search_model_versions(f"name = '{stack.env['MODEL_NAME']}'")
                  if v.run_id in {r.info.run_id for r in trials}]
    # One version, of a trial with the best accuracy (on generated data, trials may tie).
    assert len(registered) == 1 and registered[0].run_id in complete, [v.run_id for v in registered]
    assert complete[registered[0].run_id].data.metrics["eval_accuracy"] == best_accuracy
    assert admin_client.get_run(parents[0].info.run_id).data.tags["best_run_id"] == registered[0].run_id

    again = finish(sweep_worker(stack))
    after = admin_client.search_runs([experiment.experiment_id], f"tags.sweep_study = '{STUDY}'")
    assert len(after) == len(runs), again[-2000:]

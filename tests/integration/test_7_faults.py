"""Faults while people work: Postgres, the tracking server and S3 go away under a running
trainer, and serving restarts under a steady client.

Training goes on while each service is down (progress lines keep coming), nothing is lost
(each printed step's metric rows are counted in Postgres), no run is left RUNNING, a model
uploaded while S3 was away loads, and the requests that fail are confined to serving's
restart window, counted and reported. Every fault is aimed at the containers of the stack the tests started.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import requests
from mlflow import MlflowClient
from stack import ROOT, Stack, poll

# More images than the other tests use, so that training outlasts each fault.
FAULT_DATA, FAULT_TRAIN_IMAGES, FAULT_TEST_IMAGES = "/data/faults", 3000, 200
TRAIN_ARGS = ("--data-dir", FAULT_DATA, "--no-download", "--epochs", "10", "--batch-size", "32",
              "--log-every", "5", "--promotion-policy", "never")
PROGRESS = re.compile(r"^epoch \d+/\d+  step \d+/\d+  global (\d+)  loss")
EVALUATION = re.compile(r"^epoch \d+/\d+  eval_loss")
TRAINED = re.compile(r"^trained \d+ images in ")
TRAIN_KEYS = ("train_loss", "train_accuracy", "train_images_per_sec", "lr")
EVAL_KEYS = ("eval_loss", "eval_accuracy", "epoch", "epoch_seconds")
REPORT = ROOT / "tests/artifacts/fault-report.json"


class TrainingJob:
    """`docker compose run trainer ...` in the background, its output read as it comes.

    stdout and stderr are read from separate pipes: the progress lines are counted from
    stdout alone, so a warning written to stderr at the same moment cannot split one.
    """

    def __init__(self, stack: Stack, *args: str):
        self.lines: list[str] = []
        self.stdout_lines: list[str] = []
        self.process = subprocess.Popen(stack.compose_command("run", "--rm", "-T", "trainer", *args),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.readers = [threading.Thread(target=self._read, args=(self.process.stdout, True), daemon=True),
                        threading.Thread(target=self._read, args=(self.process.stderr, False), daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, is_stdout: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            self.lines.append(line)
            if is_stdout:
                self.stdout_lines.append(line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def said(self, text: str) -> str | None:
        return next((line for line in list(self.lines) if text in line), None)

    def run_id(self) -> str:
        line = poll("the trainer to start its run", lambda: self.said(" started: "), timeout=240)
        return re.search(r"run ([0-9a-f]{32}) started", line).group(1)

    def running(self) -> bool:
        return self.process.poll() is None

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=10)
        return code

    def stop(self) -> None:
        if self.running():
            self.process.kill()
            self.process.wait(timeout=30)

    def printed_steps(self) -> Counter:
        """The global step of every progress line the trainer printed, each one it logged metrics for."""
        return Counter(int(match.group(1)) for line in list(self.stdout_lines) if (match := PROGRESS.match(line)))

    def printed_evaluations(self) -> int:
        return sum(1 for line in list(self.stdout_lines) if EVALUATION.match(line))


def metric_steps(stack: Stack, run_id: str) -> dict[str, Counter]:
    """Rows per metric key and step in the tracking database itself."""
    query = f"SELECT key, step FROM metrics WHERE run_uuid = '{run_id}'"
    out = stack.compose("exec", "-T", "postgres", "sh", "-c",
                        f'psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -At -F " " -c "{query}"').stdout
    steps: dict[str, Counter] = {}
    for key, step in (line.split() for line in out.splitlines() if line):
        steps.setdefault(key, Counter())[int(step)] += 1
    return steps


def metric_rows(stack: Stack, run_id: str) -> Counter:
    """Rows per metric key in the tracking database itself."""
    return Counter({key: sum(steps.values()) for key, steps in metric_steps(stack, run_id).items()})


def report(name: str, figures: dict) -> None:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    results[name] = figures
    REPORT.write_text(json.dumps(results, indent=2) + "\n")


@pytest.fixture(scope="module")
def fault_data(stack: Stack, trained) -> str:
    stack.compose("run", "--rm", "-T", "--entrypoint", "python", "trainer", "-m", "trainer.synthetic",
                  "--data-dir", FAULT_DATA, "--train", str(FAULT_TRAIN_IMAGES), "--test", str(FAULT_TEST_IMAGES))
    return FAULT_DATA


@pytest.fixture
def healthy_again(stack: Stack):
    """Whatever a test stopped, the next one starts from a whole, healthy stack."""
    yield
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300")


@pytest.fixture
def training(stack: Stack, fault_data, healthy_again):
    jobs: list[TrainingJob] = []

    def start() -> TrainingJob:
        jobs.append(TrainingJob(stack, *TRAIN_ARGS))
        return jobs[-1]

    yield start
    for job in jobs:
        job.stop()


def first_metrics_stored(stack: Stack, run_id: str) -> None:
    poll("the run's first metrics in Postgres", lambda: metric_rows(stack, run_id)["train_loss"], timeout=240)


def assert_finished_with_every_metric(stack: Stack, admin_client: MlflowClient, job: TrainingJob, run_id: str):
    """The run finished, and Postgres holds each printed step's metrics exactly once: no gap, no duplicate."""
    code = job.finish()
    assert code == 0, f"trainer exited {code}:\n{job.output[-4000:]}"
    assert admin_client.get_run(run_id).info.status == "FINISHED"
    printed = job.printed_steps()
    assert printed and max(printed.values()) == 1, f"progress lines unreadable: {sorted(printed.items())[:20]}"
    assert job.printed_evaluations() == 10, job.output[-3000:]
    stored = metric_steps(stack, run_id)
    for key in TRAIN_KEYS:
        rows = stored.get(key, Counter())
        duplicated = sorted(step for step, count in rows.items() if count > 1)
        missing = sorted(set(printed) - set(rows))
        unprinted = sorted(set(rows) - set(printed))
        assert not (duplicated or missing or unprinted), (
            f"{key}: steps stored twice {duplicated}, printed but not stored {missing}, "
            f"stored but never printed {unprinted}\n{job.output[-3000:]}")
    for key in EVAL_KEYS:
        rows = stored.get(key, Counter())
        assert len(rows) == 10 and max(rows.values()) == 1, f"{key}: {sorted(rows.items())}"
    return Counter({key: sum(steps.values()) for key, steps in stored.items()})


def training_goes_on(job: TrainingJob, while_what: str, steps: int = 3) -> int:
    """Waits until the trainer prints `steps` more progress lines; returns how many it printed.
    Called while a service is down: the outage does not stop training."""
    before = len(job.printed_steps())
    # Bounded, but generous: an epoch's evaluation and checkpoint on a busy 2-core machine
    # can take minutes before the next progress line.
    poll(f"training to go on while {while_what}", lambda: len(job.printed_steps()) >= before + steps, timeout=400)
    return len(job.printed_steps()) - before


def registered_version(job: TrainingJob, admin_client: MlflowClient, stack: Stack, run_id: str) -> str:
    version = re.search(r"^version: (\d+)$", "\n".join(job.stdout_lines), re.M)
    assert version, job.output[-2000:]
    assert admin_client.get_model_version(stack.env["MODEL_NAME"], version.group(1)).run_id == run_id
    return version.group(1)


LOAD_AND_PREDICT = """
import sys
import numpy as np
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
print(model.predict(np.zeros((2, 1, 28, 28), dtype=np.float32)).shape)
"""


def test_postgres_down_mid_run_training_goes_on_and_no_metric_is_lost(stack: Stack, training, admin_client):
    job = training()
    run_id = job.run_id()
    first_metrics_stored(stack, run_id)
    before = metric_rows(stack, run_id)["train_loss"]
    stack.compose("stop", "postgres")
    steps_during = training_goes_on(job, "Postgres is down")
    assert job.running(), "the run ended while Postgres was down: the fault missed it"
    stack.compose("start", "postgres")
    rows = assert_finished_with_every_metric(stack, admin_client, job, run_id)
    assert rows["train_loss"] > before, "nothing was logged after the restart"
    report("postgres_down", {"train_loss_rows_before": before, "progress_lines_while_down": steps_during,
                             "rows_after": dict(rows)})


def test_tracking_server_killed_mid_run_is_waited_for_and_the_run_finishes(stack: Stack, training, admin_client):
    job = training()
    run_id = job.run_id()
    first_metrics_stored(stack, run_id)
    stack.compose("kill", "mlflow")
    killed_at = time.monotonic()
    steps_during = training_goes_on(job, "the tracking server is down")
    waiting = poll("the trainer to say it waits for the tracking server", lambda: job.said("retrying in"), timeout=240)
    noticed_after = time.monotonic() - killed_at
    assert "tracking server not answering while" in waiting, waiting
    stack.compose("start", "mlflow")
    rows = assert_finished_with_every_metric(stack, admin_client, job, run_id)
    registered_version(job, admin_client, stack, run_id)
    report("tracking_server_killed", {"trainer_said": waiting[:200], "retry_said_after_kill_s": round(noticed_after, 1),
                                      "progress_lines_while_down": steps_during,
                                      "kill_to_trainer_exit_s": round(time.monotonic() - killed_at, 1),
                                      "metric_rows": dict(rows)})


def test_s3_down_mid_run_training_goes_on_and_the_upload_is_retried(stack: Stack, training, admin_client):
    job = training()
    run_id = job.run_id()
    first_metrics_stored(stack, run_id)
    stack.compose("stop", "minio")
    steps_during = training_goes_on(job, "S3 is down")
    waiting = poll("the trainer to retry an artifact upload", lambda: job.said("retrying in"), timeout=240)
    stack.compose("start", "minio")
    assert_finished_with_every_metric(stack, admin_client, job, run_id)
    checkpoints = admin_client.list_artifacts(run_id, "checkpoints")
    assert len(checkpoints) == 10, [c.path for c in checkpoints]
    assert admin_client.search_logged_models(experiment_ids=[admin_client.get_run(run_id).info.experiment_id],
                                             filter_string=f"source_run_id = '{run_id}'")
    report("s3_down_mid_run", {"trainer_said": waiting[:200], "progress_lines_while_down": steps_during,
                               "checkpoints": len(checkpoints)})


def test_s3_down_as_training_ends_the_final_uploads_wait_and_the_model_loads(stack: Stack, training, admin_client):
    """S3 goes away the moment the last epoch is done, while the last checkpoint, the
    evaluation report and the model are still to be uploaded."""
    job = training()
    run_id = job.run_id()
    poll("the end of training", lambda: any(TRAINED.match(line) for line in list(job.stdout_lines)), timeout=600)
    stack.compose("kill", "minio")
    waiting = poll("the trainer to retry a final upload", lambda: job.said("retrying in"), timeout=240)
    stack.compose("start", "minio")
    assert_finished_with_every_metric(stack, admin_client, job, run_id)
    version = registered_version(job, admin_client, stack, run_id)
    uri = f"models:/{stack.env['MODEL_NAME']}/{version}"
    loaded = stack.compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "trainer",
                           "-c", LOAD_AND_PREDICT, uri)
    assert loaded.stdout.split()[-2:] == ["(2,", "10)"], loaded.stdout[-2000:]
    report("s3_down_at_the_end", {"trainer_said": waiting[:200], "version": version})


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    detail: str = ""


@dataclass
class SteadyLoad:
    """A few clients sending one-image requests back to back, every outcome timed."""

    url: str
    clients: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _client(self) -> None:
        session = requests.Session()
        body = {"inputs": [[[[0.0] * 28] * 28]]}
        deadline = time.monotonic() + 600  # bounded whatever happens
        while not self.stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                response = session.post(self.url, json=body, timeout=30)
                ok = response.status_code == 200
                # Who answered and why (the gateway's JSON 503 or serving's own), for a failure's report.
                detail = f"{response.status_code}" if ok else f"{response.status_code} {response.text[:120]}"
            except requests.RequestException as error:
                ok, detail = False, type(error).__name__
                session = requests.Session()
            self.outcomes.append(Outcome(started, time.monotonic(), ok, detail))
            self.stop.wait(0.01)

    def __enter__(self) -> SteadyLoad:
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def successes_since(self, moment: float) -> int:
        return sum(1 for o in list(self.outcomes) if o.ok and o.started >= moment)


def test_serving_restart_under_load_fails_requests_only_inside_the_restart(stack: Stack, trained, healthy_again,
                                                                             capsys):
    served = poll("a served model", lambda: (status := stack.serving_status()).get("version") and status, timeout=180)
    with SteadyLoad(f"{stack.serving_url}/invocations") as load:
        poll("steady answers before the restart", lambda: load.successes_since(0) >= 100, timeout=120)
        restart_began = time.monotonic()
        stack.compose("restart", "serving")
        restarted = time.monotonic()
        poll("answers from the restarted serving", lambda: load.successes_since(restarted) >= 1, timeout=240)
        back = min(o.started for o in list(load.outcomes) if o.ok and o.started >= restarted)
        poll("steady answers after the restart", lambda: load.successes_since(back) >= 200, timeout=240)
    outcomes = list(load.outcomes)
    failures = [o for o in outcomes if not o.ok]
    outside = [o for o in failures if not restart_began <= o.started <= back]
    assert not outside, (f"{len(outside)} requests failed outside the restart window "
                         f"({restart_began:.3f}-{back:.3f}): {outside[:5]}")
    assert all(o.ok for o in outcomes if o.started > back)
    figures = {"requests": len(outcomes), "failed": len(failures),
               "failed_kinds": dict(Counter(o.detail for o in failures)),
               "window_s": round(back - restart_began, 2), "restart_command_s": round(restarted - restart_began, 2),
               # From the first failed request's start to the last one's answer: the outage
               # clients saw (requests sent while workers load wait for them instead).
               "failing_s": round(max(o.ended for o in failures) - min(o.started for o in failures), 2)
               if failures else 0.0,
               "served_version": served.get("version")}
    report("serving_restart_under_load", figures)
    with capsys.disabled():
        print(f"\nserving restart under load: {figures['failed']} of {figures['requests']} requests failed, all "
              f"inside the {figures['window_s']} s window, over {figures['failing_s']} s ({figures['failed_kinds']})")


def set_env(stack: Stack, name: str, value: str) -> None:
    """Edit .env as a user does."""
    lines = [line for line in stack.env_file.read_text().splitlines() if not line.startswith(f"{name}=")]
    stack.env_file.write_text("\n".join([*lines, f"{name}={value}"]) + "\n")
    stack.env[name] = value


def test_make_up_after_a_settings_change_replaces_serving_with_no_failed_request(stack: Stack, trained,
                                                                                 healthy_again, capsys):
    served = poll("a served model", lambda: (status := stack.serving_status()).get("version") and status, timeout=180)
    old = stack.compose("ps", "-q", "serving").stdout.split()
    batch_rows = stack.env.get("SERVING_BATCH_MAX_ROWS", "32")
    changed = "16" if batch_rows != "16" else "8"
    set_env(stack, "SERVING_BATCH_MAX_ROWS", changed)
    try:
        with SteadyLoad(f"{stack.serving_url}/invocations") as load:
            poll("steady answers before the upgrade", lambda: load.successes_since(0) >= 100, timeout=120)
            began = time.monotonic()
            # What `make up` runs: the replacement, then the rest of the stack as it is.
            replaced = subprocess.run([str(ROOT / "scripts" / "replace-serving.sh"), *stack.compose_command()],
                                      capture_output=True, text=True, timeout=900, cwd=ROOT)
            assert replaced.returncode == 0, replaced.stdout + replaced.stderr
            rest = stack.compose("up", "-d", "--wait", "--wait-timeout", "300")
            done = time.monotonic()
            poll("steady answers after the upgrade", lambda: load.successes_since(done) >= 200, timeout=240)
        outcomes = list(load.outcomes)
        failures = [o for o in outcomes if not o.ok]
        assert not failures, (f"{len(failures)} of {len(outcomes)} requests failed, {began:.1f}-{done:.1f}: "
                              f"{failures[:3]} ... {failures[-3:]}\n{replaced.stderr}\n{rest.stderr}")
        now = stack.compose("ps", "-q", "serving").stdout.split()
        assert len(now) == 1 and now != old, (old, now)
        assert "serving replaced" in replaced.stderr
        statuses = [stack.serving_status() for _ in range(8)]
        assert {s["batching"]["max_rows"] for s in statuses} == {int(changed)}
        assert {str(s["version"]) for s in statuses} == {str(served["version"])}
        during = [o for o in outcomes if began <= o.started <= done]
        figures = {"requests": len(outcomes), "during_upgrade": len(during), "failed": len(failures),
                   "upgrade_s": round(done - began, 1)}
        report("serving_upgrade_under_load", figures)
        with capsys.disabled():
            print(f"\nserving replaced under load in {figures['upgrade_s']} s: {len(during)} requests during it, "
                  f"{len(failures)} of {len(outcomes)} failed")
        # Nothing changed: `make up` leaves the container alone.
        again = subprocess.run([str(ROOT / "scripts" / "replace-serving.sh"), *stack.compose_command()],
                               capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert again.returncode == 0 and again.stderr == "", again.stderr
        assert stack.compose("ps", "-q", "serving").stdout.split() == now
    finally:
        set_env(stack, "SERVING_BATCH_MAX_ROWS", batch_rows)

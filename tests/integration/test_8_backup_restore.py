"""`make backup`, lose the stack, `make restore`: every experiment, run, metric, model version,
alias and artifact comes back, and this stack's .env is what logs in afterwards.

Uses the shared stack as the `trained` fixture left it (one run, version 1 at @production):
the `backup` fixture snapshots it and backs it up. The refusals come first and must leave
that state exactly as it was (a damaged archive, one edited and re-checksummed without
BACKUP_KEY, one from a newer MLflow schema, one whose dump does not load). The last test
replaces the stack with fresh volumes and restores into it; test_9 then checks persistence on
the restored stack."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import requests
from backup_archives import (
    bucket_members,
    edit_manifest,
    edit_object,
    read_archive,
    rechecksum,
    sign,
    write_archive,
    write_bucket,
)
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import ViewType
from stack import ROOT, Stack

SECRET_NAME = re.compile(r"(PASSWORD|SECRET_KEY|ACCESS_KEY|BACKUP_KEY)$")
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def run_script(stack: Stack, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """A script of scripts/ pointed at the test stack the way the README's users would point
    it at theirs: compose's own variables and ENV_FILE. Returns the result and its seconds."""
    environment = dict(os.environ, ENV_FILE=str(stack.env_file), COMPOSE_PROJECT_NAME=stack.project,
                       COMPOSE_FILE=os.pathsep.join(str(f) for f in stack.compose_files), **env)
    started = time.monotonic()
    result = subprocess.run([str(ROOT / "scripts" / args[0]), *args[1:]], env=environment, cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)
    return result, time.monotonic() - started


def checksums(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def snapshot(client: MlflowClient, stack: Stack, workdir: Path) -> dict:
    """Everything a user sees through MLflow, artifacts as checksums, as the admin."""
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL,
                              max_results=1000)
    models = {}
    for registered in client.search_registered_models():
        versions = client.search_model_versions(f"name='{registered.name}'")
        models[registered.name] = {
            "aliases": client.get_registered_model(registered.name).aliases,
            "tags": registered.tags,
            "versions": {v.version: {
                "run_id": v.run_id, "source": v.source, "status": v.status, "tags": v.tags,
                "created": v.creation_timestamp,
                "artifacts": checksums(Path(download_artifacts(
                    artifact_uri=client.get_model_version_download_uri(registered.name, v.version),
                    dst_path=str(workdir / "models" / registered.name / v.version),
                    tracking_uri=stack.mlflow_url))),
            } for v in versions},
        }
    return {
        "experiments": {e.experiment_id: (e.name, e.lifecycle_stage, e.artifact_location, e.tags, e.creation_time)
                        for e in experiments},
        "runs": {run.info.run_id: {
            "info": (run.info.experiment_id, run.info.run_name, run.info.status, run.info.start_time,
                     run.info.end_time, run.info.lifecycle_stage, run.info.artifact_uri),
            "params": run.data.params,
            "tags": run.data.tags,
            "metrics": {key: [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                        for key in run.data.metrics},
            "artifacts": checksums(Path(download_artifacts(
                run_id=run.info.run_id, artifact_path="", dst_path=str(workdir / "runs" / run.info.run_id),
                tracking_uri=stack.mlflow_url))),
        } for run in runs},
        "models": models,
    }


def read_manifest(archive: Path) -> dict:
    with tarfile.open(archive) as tar:
        return json.load(tar.extractfile("manifest.json"))


def psql(stack: Stack, sql: str, db: str = "postgres") -> str:
    """SQL as the Postgres superuser, over the container's local socket."""
    result = subprocess.run(stack.compose_command("exec", "-T", "postgres", "sh", "-c",
                                                  'psql -X -q -At -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$1"',
                                                  "sh", db),
                            input=sql, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def ensure_app_role(stack: Stack) -> None:
    """The role the tracking server's databases belong to (MLFLOW_DB_USER), as the stack's
    db-init service creates it; restore loads the dumps as this role. Does nothing where it exists."""
    psql(stack, f"""\\set role {stack.env['MLFLOW_DB_USER']}
\\set password {stack.env['MLFLOW_DB_PASSWORD']}
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'role', :'password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \\gexec
""")


def started_at(stack: Stack) -> dict[str, str]:
    """When each running container started: a restore that changed nothing restarted nothing."""
    ids = stack.compose("ps", "-q").stdout.split()
    out = subprocess.run(["docker", "inspect", "--format", "{{.Name}} {{.State.StartedAt}}", *ids],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def assert_unchanged(stack: Stack, backup: dict, admin_client: MlflowClient, name: str, started: dict) -> None:
    assert started_at(stack) == started, "no service was stopped or restarted"
    assert snapshot(admin_client, stack, backup["workdir"] / name) == backup["before"]
    databases = psql(stack, "SELECT datname FROM pg_database ORDER BY 1").split()
    assert not [d for d in databases if "_restoring" in d or "_before_" in d], databases
    alias = backup["before"]["models"][stack.env["MODEL_NAME"]]["aliases"][stack.env["MODEL_ALIAS"]]
    stack.wait_served_version(alias, timeout=60)
    response = requests.post(f"{stack.serving_url}/invocations", json={"inputs": [[[[0.0] * 28] * 28]]}, timeout=30)
    assert response.status_code == 200, response.text


def refusal_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refused restore ends with."""
    assert result.returncode != 0, result.stdout
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def backup(stack: Stack, trained, admin_client: MlflowClient, tmp_path_factory) -> dict:
    """What the stack holds, then `make backup` of it."""
    ensure_app_role(stack)
    workdir = tmp_path_factory.mktemp("backup")
    before = snapshot(admin_client, stack, workdir / "before")
    result, seconds = run_script(stack, "backup.sh", BACKUP_DIR=str(workdir / "backups"))
    assert result.returncode == 0, f"backup failed:\n{result.stdout}\n{result.stderr}"
    archives = list((workdir / "backups").glob("*.tar.gz"))
    assert len(archives) == 1, archives
    print(f"\nbackup: {seconds:.1f} s, {archives[0].stat().st_size / 1e6:.2f} MB")
    return {"archive": archives[0], "before": before, "output": result.stdout + result.stderr,
            "workdir": workdir, "secrets": {k: v for k, v in stack.env.items() if SECRET_NAME.search(k) and v}}


def test_backup_writes_one_archive_with_counts_and_checksums(stack: Stack, backup):
    archive = backup["archive"]
    assert re.fullmatch(rf"{stack.project}-\d{{8}}T\d{{6}}Z\.tar\.gz", archive.name), archive.name
    assert archive.stat().st_mode & 0o077 == 0, "the archive holds password hashes: owner only"
    manifest = read_manifest(archive)
    before = backup["before"]
    counts = manifest["counts"]
    assert counts["experiments"] == len(before["experiments"])
    assert counts["runs"] == len(before["runs"])
    assert counts["metric_rows"] == sum(len(h) for run in before["runs"].values() for h in run["metrics"].values())
    assert counts["params"] == sum(len(run["params"]) for run in before["runs"].values())
    assert counts["registered_models"] == len(before["models"])
    assert counts["model_versions"] == sum(len(m["versions"]) for m in before["models"].values())
    assert counts["aliases"] == sum(len(m["aliases"]) for m in before["models"].values())
    assert counts["users"] == 5  # admin, trainer, serving, monitoring, predictions
    assert counts["objects"] == len(manifest["objects"]) > 0
    assert set(manifest["files"]) == {"tracking.dump", "auth.dump", "bucket.tar"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", o["sha256"]) for o in manifest["objects"])
    # What wrote the data: the server's MLflow, its schema revisions, the Postgres server.
    versions = manifest["versions"]
    served = requests.get(f"{stack.mlflow_url}/version", auth=stack.credentials("admin"), timeout=10)
    assert versions["mlflow"] == served.text.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", versions["tracking_schema"]), versions
    assert re.fullmatch(r"[0-9a-f]{12}", versions["auth_schema"]), versions
    assert versions["postgres"].startswith("17."), versions
    # The manifest's exact bytes, authenticated with the stack's BACKUP_KEY.
    with tarfile.open(archive) as tar:
        manifest_bytes = tar.extractfile("manifest.json").read()
        signature = tar.extractfile("manifest.json.hmac").read().decode().strip()
    assert signature == hmac.new(stack.env["BACKUP_KEY"].encode(), manifest_bytes, hashlib.sha256).hexdigest()
    # The output names the archive, what is in it and what made it.
    assert str(archive) in backup["output"]
    assert f"runs: {counts['runs']}" in backup["output"]
    assert f"MLflow {versions['mlflow']}" in backup["output"]


def test_backup_holds_no_secret_from_env(backup):
    # Dumps and bucket.tar are stored uncompressed inside the gzip, so one scan sees every byte.
    with gzip.open(backup["archive"]) as unzipped:
        content = unzipped.read()
    assert backup["secrets"], "the stack's .env has secrets to look for"
    leaked = [name for name, value in backup["secrets"].items() if value.encode() in content]
    assert not leaked, f"the archive contains the values of {leaked}"
    leaked = [name for name, value in backup["secrets"].items() if value in backup["output"]]
    assert not leaked, f"the backup printed the values of {leaked}"


def test_a_damaged_archive_is_refused_by_its_checksums_and_nothing_changes(
        stack: Stack, backup, admin_client: MlflowClient):
    """A well-formed archive in which one object and one dump changed, as a failing disk would
    change them: the manifest and its signature are intact, so only the sha256 checks stand
    in the way."""
    members = read_archive(backup["archive"])
    objects = bucket_members(members["bucket.tar"])
    index = next(i for i, (info, _) in enumerate(objects) if info.name.startswith("objects/"))
    info, data = objects[index]
    objects[index] = (info, bytes(b ^ 0xFF for b in data[:64]) + data[64:])
    members["bucket.tar"] = write_bucket(objects)
    members["tracking.dump"] = members["tracking.dump"][:-1] + bytes([members["tracking.dump"][-1] ^ 0xFF])
    damaged = write_archive(backup["workdir"] / "damaged.tar.gz", members)
    started = started_at(stack)
    result, _ = run_script(stack, "restore.sh", str(damaged), CONFIRM="yes", BACKUP_DIR=str(backup["workdir"]))
    line = refusal_line(result)
    assert line.startswith(f"Refusing {damaged}: "), line
    assert "does not match its checksum in manifest.json: the archive is damaged" in line, line
    assert line.endswith("Nothing was changed."), line
    assert_unchanged(stack, backup, admin_client, "after-damaged", started)


@pytest.fixture(scope="module")
def tampered(backup) -> Path:
    """The backup with one object and one dump altered and their sha256 recomputed in the
    manifest, as someone without BACKUP_KEY would: the old signature stays."""
    members = read_archive(backup["archive"])
    edit_object(members, data=b"not the model that was trained")
    members["auth.dump"] += b"\n-- altered"
    rechecksum(members)
    return write_archive(backup["workdir"] / "tampered.tar.gz", members)


def test_verify_accepts_the_backup_and_refuses_a_tampered_copy(stack: Stack, backup, tampered: Path):
    good, _ = run_script(stack, "restore.sh", "--verify", str(backup["archive"]))
    assert good.returncode == 0, good.stderr
    assert "is intact and authenticated by BACKUP_KEY" in good.stdout
    assert f"MLflow {read_manifest(backup['archive'])['versions']['mlflow']}" in good.stdout

    bad, _ = run_script(stack, "restore.sh", "--verify", str(tampered))
    assert refusal_line(bad) == bad.stderr.strip(), "one line"
    assert "manifest.json is not authenticated by this stack's BACKUP_KEY" in bad.stderr, bad.stderr


def test_a_rechecksummed_archive_without_the_key_is_refused_and_nothing_changes(
        stack: Stack, backup, tampered: Path, admin_client: MlflowClient):
    started = started_at(stack)
    result, _ = run_script(stack, "restore.sh", str(tampered), CONFIRM="yes", BACKUP_DIR=str(backup["workdir"]))
    line = refusal_line(result)
    assert line.startswith(f"Refusing {tampered}: manifest.json is not authenticated by this stack's BACKUP_KEY"), line
    assert line.endswith("Nothing was changed."), line
    assert_unchanged(stack, backup, admin_client, "after-tampered", started)


def test_an_archive_from_a_newer_mlflow_schema_is_refused(stack: Stack, backup):
    members = read_archive(backup["archive"])
    edit_manifest(members, lambda m: m["versions"].update(mlflow="99.0.0", tracking_schema="ffffffffffff"))
    sign(members, stack.env["BACKUP_KEY"])  # made with the key: only the schema stands in the way
    newer = write_archive(backup["workdir"] / "newer.tar.gz", members)
    started = started_at(stack)
    result, _ = run_script(stack, "restore.sh", str(newer), CONFIRM="yes", BACKUP_DIR=str(backup["workdir"]))
    line = refusal_line(result)
    assert "tracking schema ffffffffffff comes from a newer MLflow (99.0.0)" in line, line
    assert line.endswith("Nothing was changed."), line
    # The versions were printed before the refusal: the archive's and this stack's.
    assert "made with MLflow 99.0.0" in result.stdout and "this stack: MLflow" in result.stdout, result.stdout
    assert started_at(stack) == started


def test_a_dump_that_cannot_load_leaves_the_stack_as_it_was(stack: Stack, backup, admin_client: MlflowClient):
    # Cut short, its checksum recomputed and the manifest signed with this stack's key: the
    # archive passes every check and fails only when Postgres reads it.
    members = read_archive(backup["archive"])
    members["tracking.dump"] = members["tracking.dump"][: len(members["tracking.dump"]) * 2 // 3]
    rechecksum(members)
    sign(members, stack.env["BACKUP_KEY"])
    broken = write_archive(backup["workdir"] / "broken-dump.tar.gz", members)
    started = started_at(stack)

    result, _ = run_script(stack, "restore.sh", str(broken), CONFIRM="yes",
                           BACKUP_DIR=str(backup["workdir"] / "safety"))
    line = refusal_line(result)
    assert line.startswith("tracking.dump does not load:"), f"{line}\n{result.stdout[-3000:]}"
    assert line.endswith("Nothing was changed; the stack keeps running."), line
    assert f"Loading tracking.dump into a new database {stack.env['POSTGRES_DB']}_restoring, " \
           f"as {stack.env['MLFLOW_DB_USER']}" in result.stdout
    assert not (backup["workdir"] / "safety").exists(), "nothing was stopped, so nothing needed a safety backup"
    assert_unchanged(stack, backup, admin_client, "after-broken-dump", started)


def test_restore_into_a_fresh_stack_brings_everything_back(stack: Stack, backup, admin_client: MlflowClient):
    before = backup["before"]
    admin = stack.env["MLFLOW_ADMIN_USERNAME"]
    old_admin_password = stack.env["MLFLOW_ADMIN_PASSWORD"]

    # The stack is lost; a new one, on new volumes, has its own admin and serving passwords.
    stack.compose("--profile", "train", "down", "--volumes", "--remove-orphans")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = stack.rotate_secret("MLFLOW_ADMIN_PASSWORD")
    stack.rotate_secret("SERVING_PASSWORD")
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300")
    ensure_app_role(stack)
    assert not admin_client.search_runs([e.experiment_id for e in admin_client.search_experiments()]), \
        "a fresh stack has no runs yet"

    safety_dir = backup["workdir"] / "safety-fresh"
    result, seconds = run_script(stack, "restore.sh", str(backup["archive"]), CONFIRM="yes", BACKUP_DIR=str(safety_dir))
    assert result.returncode == 0, f"restore failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    print(f"\nrestore: {seconds:.1f} s")
    output = result.stdout
    versions = read_manifest(backup["archive"])["versions"]
    assert f"made with MLflow {versions['mlflow']} (tracking schema {versions['tracking_schema']}" in output, output
    assert "this stack: MLflow" in output and "PostgreSQL 17." in output, output
    # The stack as it was before the restore was backed up first, and the output says where.
    safety = list(safety_dir.glob(f"{stack.project}-*-before-restore.tar.gz"))
    assert len(safety) == 1 and f"safety backup: {safety[0]}" in output, output
    assert read_manifest(safety[0])["counts"]["runs"] == 0
    # Who can administer the restored stack.
    assert f"Admins of the restored stack (is_admin in mlflow_auth): {admin}" in output, output
    # Loaded as the app role, not the superuser; the replaced databases are gone.
    app_role = stack.env["MLFLOW_DB_USER"]
    assert psql(stack, "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'",
                db=stack.env["POSTGRES_DB"]) == app_role
    owners = "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
    assert psql(stack, owners, db="mlflow_auth") == app_role
    databases = psql(stack, "SELECT datname FROM pg_database ORDER BY 1").split()
    assert not [d for d in databases if "_restoring" in d or "_before_" in d], databases

    after = snapshot(admin_client, stack, backup["workdir"] / "after")
    assert after == before

    # This stack's .env logs in; the backup's admin password does not.
    assert requests.get(stack.mlflow_url + SEARCH, auth=(admin, old_admin_password), timeout=10).status_code == 401
    assert requests.get(stack.mlflow_url + SEARCH, auth=stack.credentials("admin"), timeout=10).status_code == 200
    # Serving logs in with its new password and serves the alias holder again.
    alias = stack.env["MODEL_ALIAS"]
    stack.wait_served_version(before["models"][stack.env["MODEL_NAME"]]["aliases"][alias], timeout=180)

    # Backed up again, the restored stack gives the same counts and the same objects, byte for byte.
    again, _ = run_script(stack, "backup.sh", BACKUP_DIR=str(backup["workdir"] / "again"))
    assert again.returncode == 0, f"second backup failed:\n{again.stdout}\n{again.stderr}"
    first = read_manifest(backup["archive"])
    second = read_manifest(next((backup["workdir"] / "again").glob("*.tar.gz")))
    assert second["counts"] == first["counts"]
    assert second["objects"] == first["objects"]

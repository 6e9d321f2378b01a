"""`make down` then `make up` keeps runs, models and artifacts, and rotating the passwords in
.env then `make up` on the same volumes puts the new ones in force. Runs last: it restarts the
shared stack. It needs only the `trained` run; after test_8 that run is the one test_8 restored."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import requests
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from stack import Stack, poll


def snapshot(client: MlflowClient, stack: Stack, run_id: str, workdir: Path) -> dict:
    run = client.get_run(run_id)
    versions = client.search_model_versions(f"name='{stack.env['MODEL_NAME']}'")
    local = Path(download_artifacts(run_id=run_id, artifact_path="", dst_path=str(workdir),
                                    tracking_uri=stack.mlflow_url))
    checksums = {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(local.rglob("*")) if p.is_file()}
    return {
        "params": run.data.params,
        "metrics": run.data.metrics,
        "status": run.info.status,
        "versions": sorted((v.version, v.run_id) for v in versions),
        "alias": client.get_model_version_by_alias(stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"]).version,
        "artifacts": checksums,
    }


def test_down_and_up_keep_runs_models_and_artifacts(stack: Stack, trained, admin_client, tmp_path):
    run_id = trained["run"].rstrip("/").rsplit("/", 1)[-1]
    before = snapshot(admin_client, stack, run_id, tmp_path / "before")
    assert before["artifacts"], "the run has artifacts to compare"

    stack.compose("--profile", "train", "down")
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300")
    # `down` stopped Postgres cleanly, not by the engine's SIGKILL after its grace period:
    # the new container starts from a shut-down database, without crash recovery.
    started = stack.compose("logs", "--no-color", "postgres").stdout
    assert "database system was shut down at" in started, started[-2000:]
    assert "not properly shut down" not in started, started[-2000:]

    after = snapshot(admin_client, stack, run_id, tmp_path / "after")
    assert after == before
    stack.wait_served_version(before["alias"], timeout=120)


# Every secret that `make up` re-applies to an existing stack. POSTGRES_PASSWORD and
# S3_SECRET_KEY are the roots, fixed when their volumes are made (README: Security).
ROTATED = ("MLFLOW_ADMIN_PASSWORD", "TRAINER_PASSWORD", "SERVING_PASSWORD", "MLFLOW_DB_PASSWORD", "S3_APP_SECRET_KEY")
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
DB_PROBE = """
import os, sys, psycopg2
try:
    psycopg2.connect(host="postgres", user=os.environ["MLFLOW_DB_USER"], password=sys.argv[1],
                     dbname=os.environ["POSTGRES_DB"], connect_timeout=10).close()
    print("allowed")
except psycopg2.OperationalError as error:
    print("refused", str(error).splitlines()[0][:200])
"""
S3_PROBE = """
import os, sys, boto3
from botocore.exceptions import ClientError
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"], region_name=os.environ["AWS_DEFAULT_REGION"],
                  aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"], aws_secret_access_key=sys.argv[1])
try:
    s3.list_objects_v2(Bucket=os.environ["S3_BUCKET"], Prefix=".s3-init-check/", MaxKeys=1)
    print("allowed")
except ClientError as error:
    print("refused", error.response["Error"]["Code"])
"""


def test_rotated_passwords_take_effect_with_make_up_on_the_same_volumes(stack: Stack, trained, admin_client):
    old = {name: stack.env[name] for name in ROTATED}
    for name in ROTATED:
        stack.rotate_secret(name)
    os.environ["MLFLOW_TRACKING_PASSWORD"] = stack.env["MLFLOW_ADMIN_PASSWORD"]
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300")

    for who, prefix in (("admin", "MLFLOW_ADMIN"), ("trainer", "TRAINER"), ("serving", "SERVING")):
        user = stack.credentials(who)[0]
        # `up --wait` can return while mlflow-init is still applying the service accounts' passwords.
        poll(f"{who}'s new password to be accepted", lambda user=user, prefix=prefix: requests.get(
            stack.mlflow_url + SEARCH, auth=(user, stack.env[f"{prefix}_PASSWORD"]), timeout=30).status_code == 200,
            timeout=180)
        stale = requests.get(stack.mlflow_url + SEARCH, auth=(user, old[f"{prefix}_PASSWORD"]), timeout=30)
        assert stale.status_code == 401, f"{who}'s old password: {stale.status_code}"

    # The server's database role, over the network as the server logs in (Postgres trusts its own
    # loopback): the new password is in use (the API answered), the old one is refused.
    for password, expected in ((stack.env["MLFLOW_DB_PASSWORD"], "allowed"), (old["MLFLOW_DB_PASSWORD"], "refused")):
        probe = stack.compose("exec", "-T", "mlflow", "python", "-c", DB_PROBE, password).stdout.split()
        assert probe[:1] == [expected], probe

    # The server's S3 key: its new secret lists the bucket, its old one is refused.
    for secret, expected in ((stack.env["S3_APP_SECRET_KEY"], "allowed"), (old["S3_APP_SECRET_KEY"], "refused")):
        probe = stack.compose("exec", "-T", "mlflow", "python", "-c", S3_PROBE, secret).stdout.split()
        assert probe[:1] == [expected], probe

    # Serving logged in again with its new password and serves the alias holder.
    alias = admin_client.get_model_version_by_alias(stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"]).version
    stack.wait_served_version(alias, timeout=180)

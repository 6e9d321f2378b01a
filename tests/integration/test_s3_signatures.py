"""S3 from where an attacker inside the stack would stand: the backend network, next to the
object store (which publishes no port). Every request of tests/s3_forgeries.py is sent from
a one-shot container of the mlflow image on that network; each must be refused and change
nothing, while boto3 keeps working with the root key and with the tracking server's
bucket-scoped key (S3_APP_ACCESS_KEY), which must not reach any other bucket.

The corpus holds every case; here it runs against whatever serves `minio`: the offline
stand-in, or MinIO itself with a registry (where the scoped key exists only once a policy
gives it one, so its cases are then skipped with that reason, as is the stand-in's one rule
stricter than S3's).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from s3_forgeries import FORGERIES, OTHER_BUCKET
from stack import ROOT, Stack


@pytest.fixture(scope="module")
def results(stack: Stack) -> dict:
    env = stack.env
    variables = {
        "S3_ENDPOINT": "http://minio:9000",
        "S3_REGION": env.get("S3_REGION") or "us-east-1",
        "S3_BUCKET": env.get("S3_BUCKET") or "mlflow",
        "S3_ROOT_ACCESS_KEY": env["S3_ACCESS_KEY"],
        "S3_ROOT_SECRET_KEY": env["S3_SECRET_KEY"],
        "S3_STANDIN": "1" if stack.offline else "0",
    }
    if stack.offline:
        variables |= {"S3_SCOPED_ACCESS_KEY": env["S3_APP_ACCESS_KEY"],
                      "S3_SCOPED_SECRET_KEY": env["S3_APP_SECRET_KEY"]}
    # `-e NAME` without a value: compose takes it from this process's environment, so no key
    # appears on a command line.
    names = [arg for name in variables for arg in ("-e", name)]
    command = stack.compose_command("run", "--rm", "--no-deps", "-T", *names, "--entrypoint", "python",
                                    "s3-init", "-")
    done = subprocess.run(command, input=(ROOT / "tests/s3_forgeries.py").read_text(), capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=dict(os.environ, **variables))
    assert done.returncode == 0, f"the forgery run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    outcome["by_name"] = {r["name"]: r for r in outcome["forgeries"]}
    return outcome


@pytest.mark.parametrize("name", [f.name for f in FORGERIES])
def test_forgery_from_the_backend_network_is_refused(results, name):
    result = results["by_name"][name]
    if "skipped" in result:
        pytest.skip(f"{name} not sent to MinIO: {result['skipped']}")
    assert result["refused"], f"{name} ({result['why']}) was answered {result['status']}: {result['body']}"


def test_forgeries_changed_nothing(results, stack: Stack):
    after = results["aftermath"]
    assert after["forged_objects"] == []
    assert after["other_object_intact"] is True
    assert set(after["buckets"]) == {stack.env.get("S3_BUCKET") or "mlflow", OTHER_BUCKET}
    assert after["own_bucket_cors"] is False


def test_boto3_still_works_with_the_root_and_the_scoped_key(results, stack: Stack):
    honest = results["honest"]
    failed = {name: value for name, value in honest.items() if isinstance(value, str) and value.startswith("FAILED")}
    assert failed == {}
    assert honest["root: delete_objects of one directory"] == {"deleted": 20, "errors": [], "left": 0}
    users = ["root", "scoped"] if stack.offline else ["root"]
    for who in users:
        assert honest[f"{who}: get_object"] == "hello"
        assert honest[f"{who}: download intact"] is True
        assert honest[f"{who}: presigned get"] == "hello"
        assert honest[f"{who}: presigned put"] == "sent by URL"
    if stack.offline:
        assert honest["scoped: list_buckets"] == [stack.env.get("S3_BUCKET") or "mlflow"]

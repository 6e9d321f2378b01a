"""The offline S3 stand-in (docker/offline/s3) on loopback, without Docker: every forged
request of tests/s3_forgeries.py is refused, changes nothing, and boto3 still works with the
root key and with a key limited to one bucket.

Needs node (18 or later) and s3rver's packages. The packages come from the npm registry, by
`npm ci` from the stand-in's own lock file, into a cache directory kept between runs
(S3_STANDIN_NODE_MODULES names another place). Without node or npm, or when the registry
cannot be reached, the tests are skipped and say why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import s3_forgeries
from s3_forgeries import FORGERIES, Keys, Target

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "docker/offline/s3"
ROOT_KEYS = Keys("standin-root", "root-secret-for-tests")
SCOPED_KEYS = Keys("standin-app", "app-secret-for-tests")
BUCKET = "mlflow"


def node_modules() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed to run the S3 stand-in outside Docker")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.lstrip("v").split(".")[0])
    if major < 18:
        pytest.skip(f"node {major} is too old for the S3 stand-in (needs 18 or later)")
    lock = (STANDIN / "package-lock.json").read_bytes()
    default = Path.home() / ".cache/mlops-s3-standin" / hashlib.sha256(lock).hexdigest()[:16]
    place = Path(os.environ.get("S3_STANDIN_NODE_MODULES", default))
    if not (place / "node_modules/s3rver/package.json").exists():
        place.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(STANDIN / name, place / name)
        done = subprocess.run([npm, "ci", "--omit=dev", "--no-audit", "--no-fund", "--no-update-notifier"],
                              cwd=place, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"npm ci for the S3 stand-in failed (registry out of reach?): {done.stderr[-500:]}")
    return place / "node_modules"


def start(tmp_path: Path, extra_env: dict[str, str]) -> subprocess.Popen:
    port = free_port()
    env = dict(os.environ, NODE_PATH=str(node_modules()), MINIO_ROOT_USER=ROOT_KEYS.access_key,
               MINIO_ROOT_PASSWORD=ROOT_KEYS.secret_key, **extra_env)
    process = subprocess.Popen(["node", str(STANDIN / "s3-server.js"), "server", str(tmp_path / "data"),
                                "--address", f"127.0.0.1:{port}"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process.port = port
    return process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{process.port}/minio/health/ready"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the stand-in exited {process.returncode}: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the stand-in did not answer {url} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    process = start(tmp_path_factory.mktemp("s3"), {
        "S3_STANDIN_SCOPED_ACCESS_KEY": SCOPED_KEYS.access_key,
        "S3_STANDIN_SCOPED_SECRET_KEY": SCOPED_KEYS.secret_key,
        "S3_STANDIN_SCOPED_BUCKET": BUCKET,
    })
    try:
        wait_ready(process)
        yield Target(endpoint=f"http://127.0.0.1:{process.port}", region="us-east-1", bucket=BUCKET,
                     root=ROOT_KEYS, scoped=SCOPED_KEYS)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def results(standin: Target) -> dict:
    outcome = s3_forgeries.run_all(standin)
    outcome["by_name"] = {r["name"]: r for r in outcome["forgeries"]}
    return outcome


@pytest.mark.parametrize("name", [f.name for f in FORGERIES])
def test_forgery_is_refused(results, name):
    result = results["by_name"][name]
    assert result["refused"], f"{name} ({result['why']}) was answered {result['status']}: {result['body']}"


def test_forgeries_changed_nothing(results):
    after = results["aftermath"]
    assert after["forged_objects"] == []
    assert after["other_object_intact"] is True
    assert after["buckets"] == sorted([BUCKET, s3_forgeries.OTHER_BUCKET])
    assert after["own_bucket_cors"] is False


def test_refusals_name_the_broken_rule(results):
    """Spot checks that a forgery is refused for what it broke, not by accident."""
    codes = {name: r["code"] for name, r in results["by_name"].items()}
    assert codes["anonymous-list"] == "AccessDenied"
    assert codes["algorithm-tab-signed"] == "InvalidRequest"
    assert codes["sigv2-header"] == "InvalidRequest"
    assert codes["body-swapped-same-length"] == "XAmzContentSHA256Mismatch"
    assert codes["expired-date"] == "RequestTimeTooSkewed"
    assert codes["scope-date-mismatch"] == "AuthorizationHeaderMalformed"
    assert codes["wrong-region"] == "AuthorizationHeaderMalformed"
    assert codes["duplicated-credential"] == "AuthorizationHeaderMalformed"
    assert codes["unsigned-meta"] == "AccessDenied"
    assert codes["path-traversal"] == "XMinioInvalidObjectName"
    assert codes["scoped-get-other-bucket"] == "AccessDenied"


def test_boto3_works_with_the_root_and_the_scoped_key(results):
    honest = results["honest"]
    failed = {name: value for name, value in honest.items() if isinstance(value, str) and value.startswith("FAILED")}
    assert failed == {}
    assert honest["root: delete_objects of one directory"] == {"deleted": 20, "errors": [], "left": 0}
    for who in ("root", "scoped"):
        assert honest[f"{who}: get_object"] == "hello"
        assert honest[f"{who}: download intact"] is True
        assert honest[f"{who}: presigned get"] == "hello"
        assert honest[f"{who}: presigned put"] == "sent by URL"
        assert honest[f"{who}: list with delimiter"] == [f"honest/{who}/"]
    assert honest["root: list_buckets"] == sorted([BUCKET, s3_forgeries.OTHER_BUCKET])
    assert honest["scoped: list_buckets"] == [BUCKET]


def test_health_probes_need_no_signature(standin: Target):
    for path in ("/minio/health/live", "/minio/health/ready"):
        status, _ = s3_forgeries.send(standin, s3_forgeries.Request("GET", path, headers=(("Host", standin.host),)))
        assert status == 200


def test_scoped_key_settings_come_together(tmp_path):
    process = start(tmp_path, {"S3_STANDIN_SCOPED_ACCESS_KEY": "lonely-key"})
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 1
    assert "S3_STANDIN_SCOPED_ACCESS_KEY, _SECRET_KEY and _BUCKET go together" in output

"""The backup manifest (tracking/backup_manifest.py) and `scripts/restore.sh --verify`
on archives built here: no Docker. An intact archive passes; one edited and re-checksummed
without BACKUP_KEY, damaged, or carrying S3 headers other than ContentType and Metadata is
refused with one line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from backup_archives import edit_manifest, edit_object, read_archive, rechecksum, sign, write_archive

from tracking import backup_manifest
from tracking.backup_manifest import Refused

ROOT = Path(__file__).resolve().parents[2]

KEY = "test-backup-key-0123456789"


def bucket_tar(objects: dict[str, tuple[bytes, dict]]) -> bytes:
    out, index = io.BytesIO(), []
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, (data, headers) in objects.items():
            info = tarfile.TarInfo("objects/" + key)
            info.size = len(data)
            info.pax_headers = {backup_manifest.S3_HEADER: json.dumps(headers)}
            tar.addfile(info, io.BytesIO(data))
            index.append({"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        data = json.dumps({"bucket": "mlflow", "objects": index}).encode()
        info = tarfile.TarInfo("bucket.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """An archive as scripts/backup.sh writes it, from made-up dumps and objects."""
    work = tmp_path / "work"
    (work / "archive").mkdir(parents=True)
    (work / "archive/tracking.dump").write_bytes(b"PGDMP tracking" * 100)
    (work / "archive/auth.dump").write_bytes(b"PGDMP auth" * 50)
    (work / "archive/bucket.tar").write_bytes(bucket_tar({
        "1/abc/artifacts/model/MLmodel": (b"flavors: {}\n", {"ContentType": "application/octet-stream"}),
        "1/abc/artifacts/../odd key": (b"\x00" * 1000, {"Metadata": {"origin": "trainer"}}),
    }))
    tables = {**backup_manifest.TRACKING_TABLES, **backup_manifest.AUTH_TABLES}
    (work / "rows").write_text("".join(f"public.{table} {n}\n" for n, table in enumerate(tables.values())))
    (work / "postgres_version").write_text("17.6\n")
    (work / "tracking_schema").write_text("1b5f0d9ad7c1\n")
    (work / "auth_schema").write_text("8606fa83a998\n")
    (work / "image.json").write_text(json.dumps({"mlflow": "3.17.2"}))
    backup_manifest.write(work, "mlops", "2026-12-01T22:00:00Z", KEY)
    return write_archive(tmp_path / "mlops-20261201T220000Z.tar.gz",
                         {p.name: p.read_bytes() for p in (work / "archive").iterdir()})


def verify_cli(path: Path, key: str = KEY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BACKUP_KEY"}
    return subprocess.run([str(ROOT / "scripts/restore.sh"), "--verify", str(path)], capture_output=True, text=True,
                          env={**env, "BACKUP_KEY": key, "ENV_FILE": str(path.parent / "no.env")}, timeout=60)


def test_an_intact_archive_is_verified_with_its_versions(archive: Path):
    manifest = backup_manifest.verify(archive, KEY)
    assert manifest["versions"] == {"mlflow": "3.17.2", "postgres": "17.6", "tracking_schema": "1b5f0d9ad7c1",
                                    "auth_schema": "8606fa83a998"}
    assert manifest["counts"]["objects"] == 2
    result = verify_cli(archive)
    assert result.returncode == 0, result.stderr
    assert "is intact and authenticated by BACKUP_KEY" in result.stdout
    assert "MLflow 3.17.2 (tracking schema 1b5f0d9ad7c1" in result.stdout and "PostgreSQL 17.6" in result.stdout


def test_an_archive_edited_and_rechecksummed_without_the_key_is_refused(archive: Path, tmp_path: Path):
    members = read_archive(archive)
    edit_object(members, data=b"something else entirely")
    members["auth.dump"] += b"-- altered"
    rechecksum(members)  # every sha256 right again; the old signature kept
    tampered = write_archive(tmp_path / "tampered.tar.gz", members)
    with pytest.raises(Refused, match="not authenticated by this stack's BACKUP_KEY"):
        backup_manifest.verify(tampered, KEY)
    result = verify_cli(tampered)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, "one line"
    assert result.stderr.startswith(f"Refusing {tampered}: manifest.json is not authenticated") \
        and "Nothing was changed" in result.stderr


def test_the_same_edit_signed_with_another_key_is_refused(archive: Path, tmp_path: Path):
    members = read_archive(archive)
    members["tracking.dump"] = b"PGDMP other"
    rechecksum(members)
    sign(members, "an attacker's own key")
    with pytest.raises(Refused, match="BACKUP_KEY"):
        backup_manifest.verify(write_archive(tmp_path / "resigned.tar.gz", members), KEY)


def test_an_archive_without_its_signature_is_refused(archive: Path, tmp_path: Path):
    members = read_archive(archive)
    del members["manifest.json.hmac"]
    with pytest.raises(Refused, match="holds no manifest.json.hmac"):
        backup_manifest.verify(write_archive(tmp_path / "unsigned.tar.gz", members), KEY)


def test_a_damaged_file_is_refused_by_its_checksum(archive: Path, tmp_path: Path):
    members = read_archive(archive)
    members["tracking.dump"] = members["tracking.dump"][:-1] + b"X"
    with pytest.raises(Refused, match="tracking.dump does not match its checksum"):
        backup_manifest.verify(write_archive(tmp_path / "damaged.tar.gz", members), KEY)


@pytest.mark.parametrize("headers, refusal", [
    ({"ContentType": "text/plain", "ACL": "public-read"}, "S3 header 'ACL'"),
    ({"WebsiteRedirectLocation": "https://example.com/"}, "S3 header 'WebsiteRedirectLocation'"),
    ({"ServerSideEncryption": "AES256"}, "S3 header 'ServerSideEncryption'"),
    ({"Metadata": {"a": "x" * 3000}}, "more than 2048 bytes of Metadata"),
    ({"Metadata": {"a": 1}}, "Metadata that is not short names mapped to text"),
    ({"Metadata": {"bad name\n": "x"}}, "Metadata that is not short names mapped to text"),
    ({"ContentType": "text/plain\r\nX-Injected: 1"}, "ContentType that is not a short line of text"),
])
def test_object_headers_other_than_content_type_and_metadata_are_refused(archive, tmp_path, headers, refusal):
    members = read_archive(archive)
    key = edit_object(members, headers=headers)
    rechecksum(members)
    sign(members, KEY)  # made with the key: only the header rule stands in the way
    edited = write_archive(tmp_path / "headers.tar.gz", members)
    with pytest.raises(Refused, match=refusal.replace("(", r"\(")) as refused:
        backup_manifest.verify(edited, KEY)
    assert repr(key) in str(refused.value)
    result = verify_cli(edited)
    assert result.returncode != 0 and refusal in result.stderr


def test_content_type_and_metadata_are_what_an_upload_gets():
    assert backup_manifest.object_headers("k", json.dumps({"ContentType": "text/plain", "Metadata": {"a": "b"}})) \
        == {"ContentType": "text/plain", "Metadata": {"a": "b"}}
    assert backup_manifest.object_headers("k", None) == {}


def test_a_newer_format_is_refused(archive: Path, tmp_path: Path):
    members = read_archive(archive)
    edit_manifest(members, lambda m: m.update(format=3))
    sign(members, KEY)
    with pytest.raises(Refused, match="format 3 is not one this version reads"):
        backup_manifest.verify(write_archive(tmp_path / "format.tar.gz", members), KEY)


def test_verify_without_a_key_says_where_it_comes_from(archive: Path):
    result = verify_cli(archive, key="")
    assert result.returncode != 0 and "BACKUP_KEY is not set" in result.stderr

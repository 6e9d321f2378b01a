"""The backup archive's manifest: what tracking/backup.py writes and what a restore trusts.

An archive holds manifest.json, manifest.json.hmac, tracking.dump, auth.dump and bucket.tar.
The manifest lists every file's and every object's sha256, the row counts and the versions
that wrote it; manifest.json.hmac is an HMAC-SHA256 of the manifest's exact bytes under
BACKUP_KEY. The checksums catch damage; only the HMAC catches an archive that was edited and
re-checksummed.

Standard library only: the host runs it (backup.py, restore.py) and so does the mlflow
image (bucket_archive.py applies the same rule to object headers).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import tarfile
import zlib
from pathlib import Path
from typing import IO

FORMAT = 2
MANIFEST = "manifest.json"
MAC = "manifest.json.hmac"
FILES = ("tracking.dump", "auth.dump", "bucket.tar")
OBJECTS = "objects/"
INDEX = "bucket.json"
# How S3 serves an object, kept in its bucket.tar member's PAX header under the keyword tar
# tools use for extended attributes, so GNU tar and bsdtar read bucket.tar without warnings.
S3_HEADER = "SCHILY.xattr.user.s3"
# Manifest count -> table, in the tracking database except users (auth database).
TRACKING_TABLES = {"experiments": "experiments", "runs": "runs", "metric_rows": "metrics", "params": "params",
                   "registered_models": "registered_models", "model_versions": "model_versions",
                   "aliases": "registered_model_aliases"}
AUTH_TABLES = {"users": "users"}
# S3 allows 2 KB of user metadata per object; a content type is one short header line.
METADATA_MAX_BYTES = 2048
CONTENT_TYPE_MAX = 255
METADATA_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


class Refused(Exception):
    """The archive must not be restored; the message says why, in one line."""


def mac(manifest: bytes, key: str) -> str:
    return hmac.new(key.encode(), manifest, hashlib.sha256).hexdigest()


def _header_text(value: str) -> bool:
    return value.isascii() and value.isprintable()


def object_headers(key: str, raw: str | None) -> dict:
    """The upload arguments for one object: its ContentType and user Metadata, nothing else.
    Anything more (ACL, redirects, encryption, ...) would let an archive change how the
    bucket serves or protects objects, so it is refused by name."""
    try:
        headers = json.loads(raw) if raw else {}
    except ValueError:
        raise Refused(f"object {key!r} has unreadable S3 headers") from None
    if not isinstance(headers, dict):
        raise Refused(f"object {key!r} has unreadable S3 headers")
    for name in headers:
        if name not in ("ContentType", "Metadata"):
            raise Refused(f"object {key!r} carries the S3 header {name!r}; only ContentType and Metadata are restored")
    content_type = headers.get("ContentType")
    if content_type is not None and not (isinstance(content_type, str) and 0 < len(content_type) <= CONTENT_TYPE_MAX
                                         and _header_text(content_type)):
        raise Refused(f"object {key!r} has a ContentType that is not a short line of text")
    metadata = headers.get("Metadata", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and METADATA_NAME.fullmatch(k) and _header_text(v)
            for k, v in metadata.items()):
        raise Refused(f"object {key!r} has Metadata that is not short names mapped to text")
    if sum(len(k) + len(v) for k, v in metadata.items()) > METADATA_MAX_BYTES:
        raise Refused(f"object {key!r} has more than {METADATA_MAX_BYTES} bytes of Metadata")
    return headers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write(work: Path, project: str, created: str, key: str) -> None:
    """manifest.json and manifest.json.hmac in WORK/archive, from what backup.py left in
    WORK: rows (table and row count per line, read from the dumps), postgres_version,
    tracking_schema, auth_schema and image.json (schema_info.py of the running image)."""
    archive = work / "archive"
    rows = dict(line.rsplit(" ", 1) for line in (work / "rows").read_text().splitlines())
    with tarfile.open(archive / "bucket.tar") as bucket:
        index = json.load(bucket.extractfile(INDEX))
    image = json.loads((work / "image.json").read_text())
    manifest = {
        "format": FORMAT,
        "project": project,
        "created": created,
        "versions": {
            "mlflow": image["mlflow"],
            "postgres": (work / "postgres_version").read_text().strip(),
            "tracking_schema": (work / "tracking_schema").read_text().strip(),
            "auth_schema": (work / "auth_schema").read_text().strip(),
        },
        "counts": {**{name: int(rows[f"public.{table}"]) for name, table in {**TRACKING_TABLES, **AUTH_TABLES}.items()},
                   "objects": len(index["objects"])},
        "files": {name: {"size": (archive / name).stat().st_size, "sha256": sha256_file(archive / name)}
                  for name in FILES},
        "bucket": index["bucket"],
        "objects": index["objects"],
    }
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    (archive / MANIFEST).write_bytes(data)
    (archive / MAC).write_text(mac(data, key) + "\n")


class _Hashing:
    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> dict:
        while self.read(1 << 20):
            pass
        return {"size": self.size, "sha256": self.digest.hexdigest()}


def verify(path: Path, key: str) -> dict:
    """One streaming pass over the archive; returns its manifest once the HMAC, every file's
    and every object's checksum and every object's headers are right, or raises Refused."""
    manifest_bytes = signature = index = None
    files, objects = {}, {}
    bad_headers: str | None = None
    try:
        with tarfile.open(path, "r|gz") as archive:
            for member in archive:
                if not member.isfile():
                    raise Refused(f"unexpected entry {member.name!r}")
                stream = _Hashing(archive.extractfile(member))
                if member.name == MANIFEST:
                    manifest_bytes = stream.read()
                    continue
                if member.name == MAC:
                    signature = stream.read(200).decode("ascii", "replace").strip()
                    continue
                if member.name == "bucket.tar":
                    with tarfile.open(fileobj=stream, mode="r|") as bucket:
                        for item in bucket:
                            if item.name == INDEX:
                                index = json.load(bucket.extractfile(item))
                                continue
                            name = item.name.removeprefix(OBJECTS)
                            try:
                                object_headers(name, item.pax_headers.get(S3_HEADER))
                            except Refused as error:
                                bad_headers = bad_headers or str(error)
                            objects[name] = _Hashing(bucket.extractfile(item)).drain() if item.isfile() else None
                files[member.name] = stream.drain()
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as error:
        raise Refused(f"it is not a readable backup archive ({error})") from None

    if manifest_bytes is None:
        raise Refused(f"it holds no {MANIFEST}, so it was not written by scripts/backup.sh")
    if signature is None:
        raise Refused(f"it holds no {MAC}, so nothing shows it was made with this stack's BACKUP_KEY")
    if not hmac.compare_digest(signature, mac(manifest_bytes, key)):
        raise Refused(f"{MANIFEST} is not authenticated by this stack's BACKUP_KEY: "
                      "the archive was altered, or made by a stack with another key")
    try:
        manifest = json.loads(manifest_bytes)
        if manifest["format"] != FORMAT:
            raise Refused(f"its format {manifest['format']!r} is not one this version reads")
        for name in sorted(files.keys() | manifest["files"].keys()):
            if name not in files:
                raise Refused(f"{name} is missing")
            if files[name] != manifest["files"].get(name):
                raise Refused(f"{name} does not match its checksum in {MANIFEST}: the archive is damaged")
        expected = {o["key"]: {"size": o["size"], "sha256": o["sha256"]} for o in manifest["objects"]}
        damaged = sorted(k for k in expected.keys() | objects.keys() if expected.get(k) != objects.get(k))
        if damaged:
            raise Refused(f"{len(damaged)} objects in bucket.tar do not match their checksums, e.g. {damaged[0]}")
        if index is None or index["objects"] != manifest["objects"]:
            raise Refused(f"bucket.tar's own index does not match {MANIFEST}")
        if bad_headers:
            raise Refused(bad_headers)
        for name in ("project", "created"):
            str(manifest[name])
        for name in ("mlflow", "postgres", "tracking_schema", "auth_schema"):
            str(manifest["versions"][name])
        for name in (*TRACKING_TABLES, *AUTH_TABLES, "objects"):
            int(manifest["counts"][name])
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise Refused(f"its {MANIFEST} is malformed ({error!r})") from None
    return manifest


def counts_line(manifest: dict) -> str:
    return ", ".join(f"{name.replace('_', ' ')}: {count}" for name, count in manifest["counts"].items())


def versions_line(manifest: dict) -> str:
    v = manifest["versions"]
    return (f"MLflow {v['mlflow']} (tracking schema {v['tracking_schema']}, auth schema {v['auth_schema']}), "
            f"PostgreSQL {v['postgres']}")

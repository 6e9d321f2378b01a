"""Backup archives edited the way an attacker or a broken disk would edit them, shared by the
unit and the integration tests: members rewritten, checksums recomputed, the manifest signed
again with a given key or left with its old signature."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import tarfile
from pathlib import Path

ORDER = ("manifest.json", "manifest.json.hmac", "tracking.dump", "auth.dump", "bucket.tar")


def read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def write_archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in sorted(members, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    return path


def bucket_members(bucket: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(bucket)) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar]


def write_bucket(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def edit_object(members: dict[str, bytes], data: bytes | None = None, headers: dict | None = None) -> str:
    """Changes the first object of bucket.tar (its bytes, or its S3 headers) and its entries in
    bucket.json and the manifest, as someone who knows the format would. Returns its key."""
    items = bucket_members(members["bucket.tar"])
    info, body = next((i, d) for i, d in items if i.name.startswith("objects/"))
    key = info.name.removeprefix("objects/")
    if data is not None:
        items = [(i, data if i is info else d) for i, d in items]
    if headers is not None:
        info.pax_headers = {**info.pax_headers, "SCHILY.xattr.user.s3": json.dumps(headers)}
    manifest = json.loads(members["manifest.json"])
    for entry in manifest["objects"]:
        if entry["key"] == key and data is not None:
            entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    index = json.dumps({"bucket": manifest["bucket"], "objects": manifest["objects"]}).encode()
    items = [(i, index if i.name == "bucket.json" else d) for i, d in items]
    members["bucket.tar"] = write_bucket(items)
    members["manifest.json"] = json.dumps(manifest, indent=1).encode()
    return key


def edit_manifest(members: dict[str, bytes], change) -> None:
    manifest = json.loads(members["manifest.json"])
    change(manifest)
    members["manifest.json"] = json.dumps(manifest, indent=1).encode()


def rechecksum(members: dict[str, bytes]) -> None:
    """Every file's size and sha256 in the manifest recomputed from the members."""
    manifest = json.loads(members["manifest.json"])
    manifest["files"] = {name: {"size": len(members[name]), "sha256": hashlib.sha256(members[name]).hexdigest()}
                         for name in manifest["files"]}
    members["manifest.json"] = json.dumps(manifest, indent=1).encode()


def sign(members: dict[str, bytes], key: str) -> None:
    members["manifest.json.hmac"] = (hmac.new(key.encode(), members["manifest.json"], hashlib.sha256)
                                     .hexdigest() + "\n").encode()

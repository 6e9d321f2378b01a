"""One-shot: every object of the artifact bucket as a tar stream, out and back in.

    python -m tracking.bucket_archive export  >bucket.tar
    python -m tracking.bucket_archive upload  <bucket.tar
    python -m tracking.bucket_archive prune   <manifest.json

export writes one member `objects/<key>` per object, then `bucket.json`: every key with its
size and sha256, hashed while it was read from S3. A restore runs upload once the databases
are known to load (it adds and overwrites, never deletes), and prune only after the databases
were swapped: it deletes every object the manifest does not list, then reads the whole bucket
back against the manifest's checksums.

S3 sits on the stack's internal network, out of the host's reach, so backup.py and
restore.py run this in a container and pipe the data through. The tar is only a
transport and is never unpacked to disk: keys stay exactly as S3 has them, `..` and all.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import time
from typing import IO, TYPE_CHECKING

from tracking import create_bucket, settings
from tracking.backup_manifest import INDEX, OBJECTS, S3_HEADER, Refused, object_headers

if TYPE_CHECKING:
    from botocore.client import BaseClient as S3Client


class HashingReader:
    """Hands reads through and hashes what went by. It has only read(), so boto3 treats it
    as the one-way stream it is and never tries to seek."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def list_keys(s3: S3Client, bucket: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return sorted(keys)


def sha256_of(s3: S3Client, bucket: str, key: str) -> str:
    body = HashingReader(s3.get_object(Bucket=bucket, Key=key)["Body"])
    while body.read(1 << 20):
        pass
    return body.digest.hexdigest()


def export(s3: S3Client, bucket: str, out: IO[bytes]) -> None:
    index = []
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key in list_keys(s3, bucket):
            try:
                obj = s3.get_object(Bucket=bucket, Key=key)
            except s3.exceptions.NoSuchKey:
                # Deleted since the listing (the stack keeps running during a backup).
                settings.log(f"skipped {key}: deleted while the backup ran")
                continue
            member = tarfile.TarInfo(OBJECTS + key)
            member.size = obj["ContentLength"]
            member.mtime = obj["LastModified"].timestamp()
            serving = {"ContentType": obj.get("ContentType")} if obj.get("ContentType") else {}
            if obj.get("Metadata"):
                serving["Metadata"] = obj["Metadata"]
            member.pax_headers = {S3_HEADER: json.dumps(serving)}
            body = HashingReader(obj["Body"])
            # addfile copies exactly member.size bytes and fails on a short body.
            tar.addfile(member, body)
            index.append({"key": key, "size": member.size, "sha256": body.digest.hexdigest()})
        data = json.dumps({"bucket": bucket, "objects": index}, indent=1).encode()
        member = tarfile.TarInfo(INDEX)
        member.size, member.mtime = len(data), time.time()
        tar.addfile(member, io.BytesIO(data))
    total = sum(item["size"] for item in index)
    settings.log(f"exported {len(index)} objects ({total} bytes) from bucket {bucket}")


def upload(s3: S3Client, bucket: str, source: IO[bytes]) -> None:
    create_bucket.main()  # a fresh S3 volume may not have the bucket yet
    uploaded: dict[str, str] = {}
    index = None
    with tarfile.open(fileobj=source, mode="r|") as tar:
        for member in tar:
            if member.name == INDEX:
                index = json.load(tar.extractfile(member))
                continue
            if not (member.isfile() and member.name.startswith(OBJECTS)):
                raise SystemExit(f"not a bucket archive: unexpected member {member.name!r}")
            key = member.name[len(OBJECTS):]
            try:
                # Checked on the host before the restore began; again here, where it counts.
                serving = object_headers(key, member.pax_headers.get(S3_HEADER))
            except Refused as error:
                raise SystemExit(str(error)) from None
            body = HashingReader(tar.extractfile(member))
            s3.upload_fileobj(body, bucket, key, ExtraArgs=serving or None)
            uploaded[key] = body.digest.hexdigest()
    if index is None:
        raise SystemExit(f"not a complete bucket archive: {INDEX} is missing")
    expected = {item["key"]: item["sha256"] for item in index["objects"]}
    differing = sorted(k for k in expected.keys() | uploaded.keys() if expected.get(k) != uploaded.get(k))
    if differing:
        raise SystemExit(f"{len(differing)} objects differ from the archive's index, e.g. {differing[:3]}")
    settings.log(f"uploaded {len(uploaded)} objects into bucket {bucket}")


def prune(s3: S3Client, bucket: str, manifest: dict) -> None:
    expected = {item["key"]: item["sha256"] for item in json.load(manifest)["objects"]}
    stale = [key for key in list_keys(s3, bucket) if key not in expected]
    for start in range(0, len(stale), 1000):
        batch = [{"Key": key} for key in stale[start:start + 1000]]
        errors = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}).get("Errors")
        if errors:
            first = errors[0]
            raise SystemExit(f"could not delete {len(errors)} objects, e.g. {first.get('Key')}: {first.get('Code')}")

    # Read back what S3 now holds: the bucket must be the archive, byte for byte.
    present = list_keys(s3, bucket)
    if present != sorted(expected):
        missing, extra = expected.keys() - set(present), set(present) - expected.keys()
        raise SystemExit(f"bucket {bucket} does not match the archive: {len(missing)} missing, {len(extra)} extra")
    for key in present:
        if sha256_of(s3, bucket, key) != expected[key]:
            raise SystemExit(f"object {key} does not match its checksum after upload")
    settings.log(f"bucket {bucket} holds the archive's {len(present)} objects (each checksum verified); "
                 f"removed {len(stale)} that were not in the archive")


def main() -> None:
    command = sys.argv[1] if len(sys.argv) == 2 else ""
    commands = {"export": lambda s3, b: export(s3, b, sys.stdout.buffer),
                "upload": lambda s3, b: upload(s3, b, sys.stdin.buffer),
                "prune": lambda s3, b: prune(s3, b, sys.stdin.buffer)}
    if command not in commands:
        raise SystemExit("usage: bucket_archive.py export >bucket.tar | upload <bucket.tar | prune <manifest.json")
    s3 = settings.load(settings.S3)
    commands[command](s3.client(max_attempts=5), s3.bucket)


if __name__ == "__main__":
    main()

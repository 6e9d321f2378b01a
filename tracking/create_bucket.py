"""One-shot: make sure the artifact bucket exists, and the tracking server's key that is
limited to it. Safe to run on every start.

Uses boto3 against any S3-compatible endpoint (MinIO, RustFS, Garage, AWS itself), so the
stack has no dependency on a vendor's CLI image. The root credentials stay here: the
tracking server gets S3_APP_ACCESS_KEY, which MinIO's admin API limits to the bucket. An S3
server without that API (the offline stand-in, a cloud provider) must be given the key and
its limits by its own configuration; this only checks that the key reaches the bucket.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from botocore.exceptions import ClientError, EndpointConnectionError

from tracking import settings

if TYPE_CHECKING:
    from botocore.client import BaseClient as S3Client


def bucket_policy(bucket: str) -> dict:
    """What the tracking server needs on its bucket, and nothing on any other."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow",
             "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
             "Resource": [f"arn:aws:s3:::{bucket}"]},
            {"Effect": "Allow",
             "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                        "s3:ListMultipartUploadParts"],
             "Resource": [f"arn:aws:s3:::{bucket}/*"]},
        ],
    }


def ensure_bucket(s3: S3Client, bucket: str, endpoint: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            s3.head_bucket(Bucket=bucket)
            settings.log(f"bucket {bucket} already exists at {endpoint or 'AWS'}")
            return
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                break
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise SystemExit(f"S3 at {endpoint} refused the credentials for bucket {bucket}: {code}") from None
            if time.monotonic() > deadline:
                raise
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise SystemExit(f"S3 endpoint {endpoint} did not answer within 60 s") from None
        time.sleep(1)
    try:
        s3.create_bucket(Bucket=bucket)
        settings.log(f"created bucket {bucket} at {endpoint or 'AWS'}")
    except ClientError as error:
        # Another init run may have won the race; either way the bucket is ours.
        if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def provision_app_key(conf: settings.BucketInit) -> bool:
    """Create or update the tracking server's MinIO user with a policy for the bucket alone.
    False when the server has no MinIO admin API."""
    from minio.credentials import StaticProvider
    from minio.error import MinioAdminException
    from minio.minioadmin import MinioAdmin
    from urllib3.exceptions import HTTPError

    bucket, endpoint = conf.bucket, conf.endpoint
    url = urlsplit(endpoint or "https://s3.amazonaws.com")
    admin = MinioAdmin(
        endpoint=url.netloc,
        credentials=StaticProvider(conf.access_key, conf.secret_key.get_secret_value()),
        region=conf.region,
        secure=url.scheme == "https",
    )
    access_key = conf.app_access_key
    policy = f"mlflow-{bucket}"
    try:
        # Also re-applies the secret: rotating S3_APP_SECRET_KEY in .env is `make up`.
        admin.user_add(access_key, conf.app_secret_key.get_secret_value())
    except (MinioAdminException, ValueError, HTTPError) as error:
        settings.log(f"S3 at {endpoint} has no MinIO admin API ({type(error).__name__}); "
                     "the bucket-scoped key must come from the server's own configuration")
        return False
    admin.policy_add(policy, policy=bucket_policy(bucket))
    try:
        admin.attach_policy([policy], user=access_key)
    except MinioAdminException as error:
        # Attaching a policy the user already has is refused; anything else is real.
        if "already" not in str(error).lower():
            raise
    settings.log(f"S3 key {access_key[:4]}... limited to bucket {bucket} (policy {policy})")
    return True


def check_app_key(conf: settings.BucketInit) -> None:
    """The tracking server's key must reach its bucket, whoever configured it."""
    bucket, endpoint = conf.bucket, conf.endpoint
    s3 = conf.client(max_attempts=3, key=(conf.app_access_key, conf.app_secret_key))
    deadline = time.monotonic() + 30
    while True:
        try:
            s3.head_bucket(Bucket=bucket)
            # A prefix that holds nothing: the listing right is checked without paging, which
            # the offline stand-in answers with 500 once a bucket holds more than a page.
            s3.list_objects_v2(Bucket=bucket, Prefix=".s3-init-check/", MaxKeys=1)
            return
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            # A new MinIO user can take a moment to be seen by every node.
            if time.monotonic() > deadline:
                raise SystemExit(f"S3 at {endpoint} refuses S3_APP_ACCESS_KEY on bucket {bucket} ({code}); "
                                 "give that key read, write and list rights on the bucket in the S3 server") from None
        time.sleep(1)


def main() -> None:
    conf = settings.load(settings.BucketInit)
    ensure_bucket(conf.client(max_attempts=3), conf.bucket, conf.endpoint)
    if conf.app_access_key:
        provision_app_key(conf)
        check_app_key(conf)


if __name__ == "__main__":
    main()

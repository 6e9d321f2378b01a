"""One-shot: make sure the artifact bucket exists. Safe to run on every start.

Uses boto3 against any S3-compatible endpoint (MinIO, RustFS, Garage, AWS itself), so the
stack has no dependency on a vendor's CLI image.
"""

import time

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

import settings


def main() -> None:
    bucket = settings.bucket()
    endpoint = settings.optional("MLFLOW_S3_ENDPOINT_URL", "")
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        aws_access_key_id=settings.required("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=settings.required("AWS_SECRET_ACCESS_KEY"),
        region_name=settings.optional("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"}),
    )
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
                raise SystemExit(f"S3 at {endpoint} refused the credentials for bucket {bucket}: {code}")
            if time.monotonic() > deadline:
                raise
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise SystemExit(f"S3 endpoint {endpoint} did not answer within 60 s")
        time.sleep(1)
    try:
        s3.create_bucket(Bucket=bucket)
        settings.log(f"created bucket {bucket} at {endpoint or 'AWS'}")
    except ClientError as error:
        # Another init run may have won the race; either way the bucket is ours.
        if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


if __name__ == "__main__":
    main()

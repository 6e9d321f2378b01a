"""Forged and out-of-contract S3 requests, and the honest boto3 calls that must keep working.

Shared by the stand-in's unit test (tests/unit/test_s3_standin.py: the server on loopback)
and the integration test (tests/integration/test_s3_signatures.py: sent from inside the
stack's backend network, where this file runs as a script in a one-shot container of the
mlflow image). It needs only botocore and boto3, which that image has.

Every forgery must be refused with 400 or 403 and an S3 XML error, and must change nothing:
what it tries to write is checked afterwards. Two kinds:
- forged: made without the secret (a guessed spelling, SigV2, no signature, a captured
  request replayed with changes), the attack the access key id alone allows;
- out of contract: signed with the real secret, but breaking a rule S3 holds signed requests
  to (stale date, wrong scope, unsigned x-amz-* headers, ...); each rule on its own, so a
  server that skips one is caught.
The scoped key's cases are signed correctly with that key and must be refused by its bucket
limit alone.

As a script: reads S3_ENDPOINT, S3_REGION, S3_BUCKET, S3_ROOT_ACCESS_KEY, S3_ROOT_SECRET_KEY,
S3_SCOPED_ACCESS_KEY, S3_SCOPED_SECRET_KEY (optional) and S3_STANDIN (1, the default: the
offline stand-in, held to its stricter rules too) from the environment, runs everything and
prints one JSON object with the results.
"""

from __future__ import annotations

import datetime
import http.client
import io
import json
import os
import sys
import urllib.parse
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from unittest import mock

import boto3
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

# A second bucket, made by the root key, that the scoped key must not reach.
OTHER_BUCKET = "forgery-other"
OTHER_KEY = "kept.txt"
OTHER_BODY = b"only the root key may read or change this"
# Keys that forged writes aim at; none of them may exist afterwards.
FORGED_PREFIX = "forged/"


@dataclass(frozen=True)
class Keys:
    access_key: str
    secret_key: str


@dataclass(frozen=True)
class Target:
    endpoint: str  # http://host:port
    region: str
    bucket: str
    root: Keys
    scoped: Keys | None

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.endpoint).netloc


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class Forgery:
    name: str
    why: str
    build: Callable[[Target], Request]
    kind: str = "forged"  # forged | out-of-contract | scoped
    # Set for the scoped cases a server without per-bucket limits cannot pass.
    needs_scoped_key: bool = False
    # A rule of the offline stand-in stricter than S3 and MinIO, which accept it.
    standin_rule: bool = False


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _url(t: Target, path: str, query: str = "") -> str:
    return f"{t.endpoint}{path}" + (f"?{query}" if query else "")


def _as_request(aws: AWSRequest, t: Target, body: bytes) -> Request:
    parts = urllib.parse.urlsplit(aws.url)
    headers = [("Host", t.host)] + [(k, v) for k, v in aws.headers.items() if k.lower() != "host"]
    return Request(aws.method, parts.path, parts.query, tuple(headers), body)


class _ScopeDateAuth(S3SigV4Auth):
    """Signs properly, except that the credential scope carries another date than X-Amz-Date."""

    scope_date = "20200101"

    def scope(self, request):
        return "/".join([self.credentials.access_key, self.credential_scope(request)])

    def credential_scope(self, request):
        return "/".join([self.scope_date, self._region_name, self._service_name, "aws4_request"])

    def signature(self, string_to_sign, request):
        key = self._sign(f"AWS4{self.credentials.secret_key}".encode(), self.scope_date)
        for part in (self._region_name, self._service_name, "aws4_request"):
            key = self._sign(key, part)
        return self._sign(key, string_to_sign, hex=True)


def signed(t: Target, method: str, path: str, *, query: str = "", headers: dict | None = None,
           body: bytes = b"", keys: Keys | None = None, region: str | None = None,
           service: str = "s3", when: datetime.datetime | None = None, unsigned_payload: bool = False,
           auth_class=S3SigV4Auth) -> Request:
    """A request signed by botocore, as boto3 signs it (optionally with one parameter changed)."""
    keys = keys or t.root
    aws = AWSRequest(method=method, url=_url(t, path, query), data=body, headers=dict(headers or {}))
    if unsigned_payload:  # what boto3 sends with payload_signing_enabled=False
        aws.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    auth = auth_class(Credentials(keys.access_key, keys.secret_key), service, region or t.region)
    with mock.patch("botocore.auth.get_current_datetime", return_value=when) if when else nullcontext():
        auth.add_auth(aws)
    return _as_request(aws, t, body)


def presigned(t: Target, method: str, path: str, *, expires: int = 300, keys: Keys | None = None,
              when: datetime.datetime | None = None) -> Request:
    keys = keys or t.root
    aws = AWSRequest(method=method, url=_url(t, path))
    auth = S3SigV4QueryAuth(Credentials(keys.access_key, keys.secret_key), "s3", t.region, expires=expires)
    with mock.patch("botocore.auth.get_current_datetime", return_value=when) if when else nullcontext():
        auth.add_auth(aws)
    return _as_request(aws, t, b"")


def replace_header(request: Request, name: str, value: str | None) -> Request:
    headers = [(k, v) for k, v in request.headers if k.lower() != name.lower()]
    if value is not None:
        headers.append((name, value))
    return Request(request.method, request.path, request.query, tuple(headers), request.body)


def add_header(request: Request, name: str, value: str) -> Request:
    return Request(request.method, request.path, request.query, request.headers + ((name, value),), request.body)


def header(request: Request, name: str) -> str:
    return next(v for k, v in request.headers if k.lower() == name.lower())


def with_authorization(request: Request, transform: Callable[[str], str]) -> Request:
    return replace_header(request, "Authorization", transform(header(request, "Authorization")))


def edit_query(request: Request, transform: Callable[[list[tuple[str, str]]], list[tuple[str, str]]]) -> Request:
    pairs = urllib.parse.parse_qsl(request.query, keep_blank_values=True)
    query = urllib.parse.urlencode(transform(pairs), quote_via=urllib.parse.quote)
    return Request(request.method, request.path, query, request.headers, request.body)


GARBAGE_SIGNATURE = "0" * 64


def listing(t: Target) -> Request:
    """A captured, correctly signed ListObjectsV2 of the bucket: the base of many forgeries."""
    return signed(t, "GET", f"/{t.bucket}", query="list-type=2")


def put(t: Target, name: str, body: bytes = b"forged", **kwargs) -> Request:
    return signed(t, "PUT", f"/{t.bucket}/{FORGED_PREFIX}{name}", body=body, **kwargs)


def _wrong_secret(t: Target) -> Request:
    return signed(t, "GET", f"/{t.bucket}", query="list-type=2",
                  keys=Keys(t.root.access_key, t.root.secret_key + "x"))


def _sigv2_header(t: Target) -> Request:
    return replace_header(listing(t), "Authorization", f"AWS {t.root.access_key}:c2lnbmF0dXJlLWd1ZXNz")


def _bare(t: Target, method: str, path: str, query: str = "", body: bytes = b"") -> Request:
    return Request(method, path, query, (("Host", t.host),), body)


def _respelled(t: Target, respell: Callable[[str], str], signature: str = GARBAGE_SIGNATURE) -> Request:
    """A listing whose Authorization header spells the algorithm otherwise; the signature is
    guessed unless given (a server must not skip checking it for an odd spelling)."""
    return with_authorization(
        listing(t), lambda a: respell(a.rsplit("=", 1)[0] + "=" + (signature or a.rsplit("=", 1)[1])))


def _duplicated_param(t: Target) -> Request:
    # A valid signature, with a second Credential naming another scope after it.
    def twice(auth: str) -> str:
        credential = auth.split("Credential=", 1)[1].split(",", 1)[0]
        return auth.replace(", SignedHeaders=", f", Credential={credential}, SignedHeaders=", 1)
    return with_authorization(listing(t), twice)


def _unsigned_copy_source(t: Target) -> Request:
    # A captured PutObject of an empty body, turned into a copy by an added header.
    request = put(t, "unsigned-copy-source", body=b"")
    return add_header(request, "x-amz-copy-source", f"/{OTHER_BUCKET}/{OTHER_KEY}")


def _host_unsigned(t: Target) -> Request:
    base = listing(t)
    aws = AWSRequest(method="GET", url=_url(t, base.path, base.query))

    class NoHost(S3SigV4Auth):
        def headers_to_sign(self, request):
            headers = super().headers_to_sign(request)
            del headers["host"]
            return headers

    NoHost(Credentials(t.root.access_key, t.root.secret_key), "s3", t.region).add_auth(aws)
    return _as_request(aws, t, b"")


def _x_amz_date_unsigned(t: Target) -> Request:
    base = listing(t)
    aws = AWSRequest(method="GET", url=_url(t, base.path, base.query))

    class NoDate(S3SigV4Auth):
        def headers_to_sign(self, request):
            headers = super().headers_to_sign(request)
            del headers["x-amz-date"]
            return headers

    NoDate(Credentials(t.root.access_key, t.root.secret_key), "s3", t.region).add_auth(aws)
    return _as_request(aws, t, b"")


def _meta_unsigned(t: Target) -> Request:
    return add_header(put(t, "unsigned-meta"), "x-amz-meta-note", "added after signing")


def _body_swapped(t: Target) -> Request:
    request = put(t, "body-swapped", body=b"what the key holder signed")
    return Request(request.method, request.path, request.query,
                   tuple((k, "25" if k.lower() == "content-length" else v) for k, v in request.headers),
                   b"what a forger sent instead")


def _body_swapped_same_length(t: Target) -> Request:
    request = put(t, "body-swapped-same-length", body=b"AAAAAAAA")
    return Request(request.method, request.path, request.query, request.headers, b"BBBBBBBB")


def _streaming_forged(t: Target) -> Request:
    request = put(t, "streaming", body=b"")
    request = replace_header(request, "X-Amz-Content-SHA256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    request = add_header(request, "Content-Encoding", "aws-chunked")
    return with_authorization(request, lambda a: a.rsplit("Signature=", 1)[0] + "Signature=" + GARBAGE_SIGNATURE)


def _presign_algorithm(t: Target, algorithm: str) -> Request:
    base = presigned(t, "GET", f"/{OTHER_BUCKET}/{OTHER_KEY}")
    return edit_query(base, lambda pairs: [(k, algorithm if k == "X-Amz-Algorithm" else v) for k, v in pairs])


def _presign_sigv2(t: Target) -> Request:
    query = urllib.parse.urlencode({"AWSAccessKeyId": t.root.access_key, "Expires": "4102444800",
                                    "Signature": "c2lnbmF0dXJlLWd1ZXNz"})
    return Request("GET", f"/{OTHER_BUCKET}/{OTHER_KEY}", query, (("Host", t.host),))


def _presign_duplicate_signature(t: Target) -> Request:
    base = presigned(t, "GET", f"/{OTHER_BUCKET}/{OTHER_KEY}")
    return edit_query(base, lambda pairs: pairs + [("X-Amz-Signature", GARBAGE_SIGNATURE)])


def _presign_plus_header(t: Target) -> Request:
    base = presigned(t, "GET", f"/{OTHER_BUCKET}/{OTHER_KEY}")
    return add_header(base, "Authorization", header(listing(t), "Authorization"))


def _unsigned_payload_with_body(t: Target) -> Request:
    return put(t, "unsigned-payload", body=b"a body nothing signed", unsigned_payload=True)


def _scoped(t: Target, method: str, path: str, **kwargs) -> Request:
    return signed(t, method, path, keys=t.scoped, **kwargs)


FORGERIES: tuple[Forgery, ...] = (
    # Forged: no secret needed to make these.
    Forgery("anonymous-list", "no Authorization at all",
            lambda t: _bare(t, "GET", f"/{t.bucket}", "list-type=2")),
    Forgery("anonymous-list-buckets", "ListBuckets without any signature", lambda t: _bare(t, "GET", "/")),
    Forgery("anonymous-put", "an unsigned upload",
            lambda t: _bare(t, "PUT", f"/{t.bucket}/{FORGED_PREFIX}anonymous-put", body=b"x")),
    Forgery("anonymous-get-other", "an unsigned read of another bucket",
            lambda t: _bare(t, "GET", f"/{OTHER_BUCKET}/{OTHER_KEY}")),
    Forgery("algorithm-lowercase", "the algorithm name in lowercase, signature guessed",
            lambda t: _respelled(t, lambda a: "aws4-hmac-sha256" + a[len("AWS4-HMAC-SHA256"):])),
    Forgery("algorithm-mixed-case", "Aws4-Hmac-Sha256, signature guessed",
            lambda t: _respelled(t, lambda a: "Aws4-Hmac-Sha256" + a[len("AWS4-HMAC-SHA256"):])),
    Forgery("algorithm-two-spaces", "two spaces after the algorithm name, signature guessed",
            lambda t: _respelled(t, lambda a: a.replace(" ", "  ", 1))),
    Forgery("algorithm-tab", "a tab after the algorithm name, signature guessed",
            lambda t: _respelled(t, lambda a: a.replace(" ", "\t", 1))),
    Forgery("algorithm-no-space", "no space after the algorithm name, signature guessed",
            lambda t: _respelled(t, lambda a: a.replace(" ", "", 1))),
    Forgery("algorithm-other", "AWS4-HMAC-SHA512, signature guessed",
            lambda t: _respelled(t, lambda a: a.replace("SHA256", "SHA512", 1))),
    Forgery("algorithm-ecdsa", "AWS4-ECDSA-P256-SHA256 (SigV4a), signature guessed",
            lambda t: _respelled(t, lambda a: a.replace("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256"))),
    Forgery("algorithm-only", "the algorithm name and nothing else",
            lambda t: replace_header(listing(t), "Authorization", "AWS4-HMAC-SHA256 ")),
    Forgery("authorization-empty", "an empty Authorization header",
            lambda t: replace_header(listing(t), "Authorization", "")),
    Forgery("bearer-token", "a bearer token",
            lambda t: replace_header(listing(t), "Authorization", f"Bearer {t.root.access_key}")),
    Forgery("sigv2-header", "SigV2: AWS key:signature", _sigv2_header),
    Forgery("sigv2-header-put", "SigV2 on an upload",
            lambda t: replace_header(put(t, "sigv2-put"), "Authorization", f"AWS {t.root.access_key}:Zm9yZ2Vk")),
    Forgery("wrong-secret", "well-formed SigV4 made with a guessed secret", _wrong_secret),
    Forgery("garbage-signature", "the right form, signature all zeros",
            lambda t: with_authorization(listing(t), lambda a: a.rsplit("=", 1)[0] + "=" + GARBAGE_SIGNATURE)),
    Forgery("signature-uppercase", "the right signature in uppercase hex",
            lambda t: with_authorization(
                listing(t), lambda a: a.rsplit("=", 1)[0] + "=" + a.rsplit("=", 1)[1].upper())),
    Forgery("unknown-access-key", "a key that does not exist",
            lambda t: signed(t, "GET", f"/{t.bucket}", query="list-type=2", keys=Keys("nobody", "nobody-secret"))),
    Forgery("replayed-to-other-path", "a captured signed listing sent for another bucket",
            lambda t: Request("GET", f"/{OTHER_BUCKET}", "list-type=2", listing(t).headers)),
    Forgery("replayed-with-other-query", "a captured signed listing with another prefix",
            lambda t: edit_query(listing(t), lambda pairs: pairs + [("prefix", "secrets/")])),
    Forgery("replayed-as-delete", "a captured signed GET sent as DELETE",
            lambda t: (lambda r: Request("DELETE", f"/{OTHER_BUCKET}/{OTHER_KEY}", "", r.headers))(
                signed(t, "GET", f"/{OTHER_BUCKET}/{OTHER_KEY}"))),
    Forgery("body-swapped", "a captured signed PUT with another body", _body_swapped),
    Forgery("body-swapped-same-length", "a captured signed PUT, body replaced byte for byte",
            _body_swapped_same_length),
    Forgery("unsigned-copy-source", "x-amz-copy-source added to a captured signed PUT",
            _unsigned_copy_source),
    Forgery("unsigned-meta", "x-amz-meta-* added to a captured signed PUT", _meta_unsigned),
    Forgery("duplicated-credential", "Credential given twice in a captured header", _duplicated_param),
    Forgery("duplicated-signature", "Signature given twice, the second guessed",
            lambda t: with_authorization(listing(t), lambda a: a + ", Signature=" + GARBAGE_SIGNATURE)),
    Forgery("unknown-auth-param", "an extra parameter in a captured header",
            lambda t: with_authorization(listing(t), lambda a: a + ", Extra=1")),
    Forgery("duplicated-authorization-header", "a garbage Authorization header, then a captured one",
            lambda t: (lambda r: Request(r.method, r.path, r.query,
                                         (("Authorization", "AWS4-HMAC-SHA256 Credential=x/y"),) + r.headers))(
                listing(t))),
    Forgery("duplicated-x-amz-date", "a second x-amz-date after the signed one",
            lambda t: add_header(listing(t), "X-Amz-Date", now().strftime("%Y%m%dT%H%M%SZ"))),
    Forgery("streaming-forged", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD with a guessed seed signature",
            _streaming_forged),
    Forgery("presigned-algorithm-lowercase", "presigned URL with X-Amz-Algorithm in lowercase",
            lambda t: _presign_algorithm(t, "aws4-hmac-sha256")),
    Forgery("presigned-algorithm-other", "presigned URL with X-Amz-Algorithm=AWS4-HMAC-SHA1",
            lambda t: _presign_algorithm(t, "AWS4-HMAC-SHA1")),
    Forgery("presigned-sigv2", "SigV2 query string (AWSAccessKeyId, Expires, Signature)", _presign_sigv2),
    Forgery("presigned-duplicate-signature", "a second X-Amz-Signature in a presigned URL",
            _presign_duplicate_signature),
    Forgery("presigned-other-object", "a presigned URL for one object used for another",
            lambda t: Request("GET", f"/{OTHER_BUCKET}/other.txt",
                              presigned(t, "GET", f"/{OTHER_BUCKET}/{OTHER_KEY}").query, (("Host", t.host),))),
    Forgery("presigned-longer-expiry", "a presigned URL with X-Amz-Expires raised",
            lambda t: edit_query(presigned(t, "GET", f"/{OTHER_BUCKET}/{OTHER_KEY}", expires=1),
                                 lambda p: [(k, "604800" if k == "X-Amz-Expires" else v) for k, v in p])),
    Forgery("presigned-and-header", "presigned query and an Authorization header at once", _presign_plus_header),
    # Out of contract: signed with the real secret, each breaking one rule.
    Forgery("expired-date", "x-amz-date an hour old (a replay)",
            lambda t: signed(t, "GET", f"/{t.bucket}", query="list-type=2", when=now() - datetime.timedelta(hours=1)),
            kind="out-of-contract"),
    Forgery("future-date", "x-amz-date an hour ahead",
            lambda t: signed(t, "GET", f"/{t.bucket}", query="list-type=2", when=now() + datetime.timedelta(hours=1)),
            kind="out-of-contract"),
    Forgery("scope-date-mismatch", "credential scope dated 2020-01-01, x-amz-date today",
            lambda t: signed(t, "GET", f"/{t.bucket}", query="list-type=2", auth_class=_ScopeDateAuth),
            kind="out-of-contract"),
    Forgery("wrong-region", "signed for another region",
            lambda t: signed(t, "GET", f"/{t.bucket}", query="list-type=2",
                             region="eu-west-3" if t.region != "eu-west-3" else "us-west-2"),
            kind="out-of-contract"),
    Forgery("wrong-service", "signed for the sts service",
            lambda t: signed(t, "GET", f"/{t.bucket}", query="list-type=2", service="sts"),
            kind="out-of-contract"),
    Forgery("algorithm-two-spaces-signed", "two spaces after the algorithm name, real signature",
            lambda t: _respelled(t, lambda a: a.replace(" ", "  ", 1), signature=""), kind="out-of-contract"),
    Forgery("algorithm-tab-signed", "a tab after the algorithm name, real signature",
            lambda t: _respelled(t, lambda a: a.replace(" ", "\t", 1), signature=""), kind="out-of-contract"),
    Forgery("algorithm-lowercase-signed", "the algorithm name in lowercase, real signature",
            lambda t: _respelled(t, lambda a: "aws4-hmac-sha256" + a[len("AWS4-HMAC-SHA256"):], signature=""),
            kind="out-of-contract"),
    Forgery("host-unsigned", "SignedHeaders without host", _host_unsigned, kind="out-of-contract"),
    Forgery("x-amz-date-unsigned", "SignedHeaders without x-amz-date", _x_amz_date_unsigned, kind="out-of-contract"),
    Forgery("content-sha256-missing", "no x-amz-content-sha256 header",
            lambda t: replace_header(listing(t), "X-Amz-Content-SHA256", None), kind="out-of-contract"),
    Forgery("unsigned-payload-with-body", "UNSIGNED-PAYLOAD on a PUT over plain http",
            _unsigned_payload_with_body, kind="out-of-contract", standin_rule=True),
    Forgery("presigned-expired", "a presigned URL whose time is up",
            lambda t: presigned(t, "GET", f"/{OTHER_BUCKET}/{OTHER_KEY}", expires=60,
                                when=now() - datetime.timedelta(minutes=5)),
            kind="out-of-contract"),
    Forgery("presigned-too-long", "X-Amz-Expires over S3's 7 days",
            lambda t: presigned(t, "GET", f"/{OTHER_BUCKET}/{OTHER_KEY}", expires=604801),
            kind="out-of-contract"),
    Forgery("path-traversal", "a key with .. segments reaching another bucket",
            lambda t: signed(t, "PUT", f"/{t.bucket}/{FORGED_PREFIX}../../{OTHER_BUCKET}/{OTHER_KEY}",
                             body=b"overwritten"),
            kind="out-of-contract"),
    # The scoped key, signed correctly: refused by its bucket limit alone.
    Forgery("scoped-list-other-bucket", "ListObjects of another bucket",
            lambda t: _scoped(t, "GET", f"/{OTHER_BUCKET}", query="list-type=2"), kind="scoped",
            needs_scoped_key=True),
    Forgery("scoped-get-other-bucket", "GetObject from another bucket",
            lambda t: _scoped(t, "GET", f"/{OTHER_BUCKET}/{OTHER_KEY}"), kind="scoped", needs_scoped_key=True),
    Forgery("scoped-put-other-bucket", "PutObject into another bucket",
            lambda t: _scoped(t, "PUT", f"/{OTHER_BUCKET}/{FORGED_PREFIX}scoped", body=b"x"), kind="scoped",
            needs_scoped_key=True),
    Forgery("scoped-delete-other-object", "DeleteObject in another bucket",
            lambda t: _scoped(t, "DELETE", f"/{OTHER_BUCKET}/{OTHER_KEY}"), kind="scoped", needs_scoped_key=True),
    Forgery("scoped-copy-from-other-bucket", "CopyObject out of another bucket into its own",
            lambda t: _scoped(t, "PUT", f"/{t.bucket}/{FORGED_PREFIX}scoped-copy",
                              headers={"x-amz-copy-source": f"/{OTHER_BUCKET}/{OTHER_KEY}"}),
            kind="scoped", needs_scoped_key=True),
    Forgery("scoped-create-bucket", "CreateBucket",
            lambda t: _scoped(t, "PUT", "/forgery-scoped-new"), kind="scoped", needs_scoped_key=True),
    Forgery("scoped-delete-own-bucket", "DeleteBucket of its own bucket",
            lambda t: _scoped(t, "DELETE", f"/{t.bucket}"), kind="scoped", needs_scoped_key=True),
    Forgery("scoped-bucket-cors", "PutBucketCors on its own bucket",
            lambda t: _scoped(t, "PUT", f"/{t.bucket}", query="cors=",
                              body=b"<CORSConfiguration><CORSRule><AllowedOrigin>*</AllowedOrigin>"
                                   b"<AllowedMethod>GET</AllowedMethod></CORSRule></CORSConfiguration>"),
            kind="scoped", needs_scoped_key=True),
)


def send(t: Target, request: Request) -> tuple[int, str]:
    """Sends the request exactly as built: header spelling, order and duplicates kept."""
    host, _, port = t.host.partition(":")
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=30)
    try:
        path = request.path + (f"?{request.query}" if request.query else "")
        conn.putrequest(request.method, path, skip_host=True, skip_accept_encoding=True)
        names = {k.lower() for k, _ in request.headers}
        for name, value in request.headers:
            conn.putheader(name, value)
        if "content-length" not in names and (request.body or request.method in ("PUT", "POST")):
            conn.putheader("Content-Length", str(len(request.body)))
        conn.endheaders(request.body or None)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def client(t: Target, keys: Keys, **config):
    return boto3.client("s3", endpoint_url=t.endpoint, aws_access_key_id=keys.access_key,
                        aws_secret_access_key=keys.secret_key, region_name=t.region,
                        # No retries: a failed call must show, not be hidden by a second try.
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"},
                                      **config))


def prepare(t: Target) -> None:
    """The root key makes the other bucket and its object; the stack's bucket exists already,
    or is made here for a bare server."""
    root = client(t, t.root)
    for bucket in (t.bucket, OTHER_BUCKET):
        try:
            root.head_bucket(Bucket=bucket)
        except ClientError:
            root.create_bucket(Bucket=bucket)
    root.put_object(Bucket=OTHER_BUCKET, Key=OTHER_KEY, Body=OTHER_BODY)


def refused(status: int, body: str) -> bool:
    return status in (400, 403) and "<Error>" in body and "<Code>" in body


def run_forgeries(t: Target, standin: bool = True) -> list[dict]:
    results = []
    for forgery in FORGERIES:
        if forgery.needs_scoped_key and t.scoped is None:
            results.append({"name": forgery.name, "kind": forgery.kind, "skipped": "no scoped key"})
            continue
        if forgery.standin_rule and not standin:
            results.append({"name": forgery.name, "kind": forgery.kind, "skipped": "S3 itself accepts it"})
            continue
        try:
            status, body = send(t, forgery.build(t))
        except (OSError, http.client.HTTPException) as error:
            # A dropped connection refuses too, but not the way S3 does: reported as such.
            status, body = 0, f"{type(error).__name__}: {error}"
        code = body.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in body else ""
        results.append({"name": forgery.name, "kind": forgery.kind, "why": forgery.why, "status": status,
                        "code": code, "refused": refused(status, body), "body": body[:300]})
    return results


def aftermath(t: Target) -> dict:
    """What the forgeries changed, seen with the root key: nothing, when all went well."""
    root = client(t, t.root)
    forged = [o["Key"] for b in (t.bucket, OTHER_BUCKET)
              for o in root.list_objects_v2(Bucket=b, Prefix=FORGED_PREFIX).get("Contents", [])]
    try:
        kept = root.get_object(Bucket=OTHER_BUCKET, Key=OTHER_KEY)["Body"].read() == OTHER_BODY
    except ClientError:
        kept = False
    buckets = sorted(b["Name"] for b in root.list_buckets()["Buckets"])
    cors = True
    try:
        root.get_bucket_cors(Bucket=t.bucket)
    except ClientError:
        cors = False
    return {"forged_objects": forged, "other_object_intact": kept, "buckets": buckets, "own_bucket_cors": cors}


def honest(t: Target) -> dict:
    """boto3 as MLflow and the stack's scripts use it: every call must succeed."""
    checks: dict[str, object] = {}

    def check(name: str, call: Callable[[], object]) -> None:
        try:
            checks[name] = call()
        except Exception as error:  # noqa: BLE001 - reported, the caller asserts
            checks[name] = f"FAILED: {type(error).__name__}: {error}"

    users = [("root", t.root)] + ([("scoped", t.scoped)] if t.scoped else [])
    big = os.urandom(9 * 1024 * 1024)  # over boto3's 8 MiB threshold: a multipart upload
    for who, keys in users:
        s3 = client(t, keys)
        prefix = f"honest/{who}/"
        check(f"{who}: head_bucket", lambda: s3.head_bucket(Bucket=t.bucket)["ResponseMetadata"]["HTTPStatusCode"])
        check(f"{who}: put_object", lambda: s3.put_object(Bucket=t.bucket, Key=prefix + "small.txt",
                                                         Body=b"hello")["ResponseMetadata"]["HTTPStatusCode"])
        check(f"{who}: get_object", lambda: s3.get_object(Bucket=t.bucket, Key=prefix + "small.txt")["Body"].read()
              .decode())
        check(f"{who}: upload_fileobj multipart", lambda: s3.upload_fileobj(io.BytesIO(big), t.bucket,
                                                                            prefix + "big.bin") or "ok")
        check(f"{who}: download intact", lambda: s3.get_object(Bucket=t.bucket, Key=prefix + "big.bin")["Body"]
              .read() == big)
        check(f"{who}: list with delimiter", lambda: [p["Prefix"] for p in s3.list_objects_v2(
            Bucket=t.bucket, Prefix="honest/", Delimiter="/").get("CommonPrefixes", [])])
        check(f"{who}: copy within bucket", lambda: s3.copy_object(
            Bucket=t.bucket, Key=prefix + "copy.txt", CopySource={"Bucket": t.bucket, "Key": prefix + "small.txt"})
              ["ResponseMetadata"]["HTTPStatusCode"])
        check(f"{who}: presigned get", lambda: _presigned_get(t, keys, prefix + "small.txt"))
        check(f"{who}: presigned put", lambda: _presigned_put(t, keys, prefix + "presigned.txt"))
        check(f"{who}: list_buckets", lambda: sorted(b["Name"] for b in s3.list_buckets()["Buckets"]))
        check(f"{who}: delete_objects", lambda: sorted(d["Key"] for d in s3.delete_objects(
            Bucket=t.bucket, Delete={"Objects": [{"Key": prefix + n}
                                    for n in ("small.txt", "big.bin", "copy.txt", "presigned.txt")]})
            .get("Deleted", [])))
    check("root: delete_objects of one directory", lambda: _delete_many(t))
    return checks


def _delete_many(t: Target, count: int = 20) -> object:
    """DeleteObjects of many keys in one directory, as bucket_archive.py's import does."""
    s3 = client(t, t.root)
    keys = [f"honest/many/{i:02d}.txt" for i in range(count)]
    for key in keys:
        s3.put_object(Bucket=t.bucket, Key=key, Body=b"x")
    answer = s3.delete_objects(Bucket=t.bucket, Delete={"Objects": [{"Key": k} for k in keys]})
    left = s3.list_objects_v2(Bucket=t.bucket, Prefix="honest/many/").get("KeyCount", 0)
    return {"deleted": len(answer.get("Deleted", [])), "errors": answer.get("Errors", []), "left": left}


def _presigned_get(t: Target, keys: Keys, key: str) -> str:
    url = client(t, keys, signature_version="s3v4").generate_presigned_url(
        "get_object", Params={"Bucket": t.bucket, "Key": key}, ExpiresIn=300)
    parts = urllib.parse.urlsplit(url)
    status, body = send(t, Request("GET", parts.path, parts.query, (("Host", t.host),)))
    return body if status == 200 else f"FAILED: HTTP {status}: {body[:200]}"


def _presigned_put(t: Target, keys: Keys, key: str) -> str:
    """A presigned PUT leaves the body unsigned (UNSIGNED-PAYLOAD), as S3 allows."""
    url = client(t, keys, signature_version="s3v4").generate_presigned_url(
        "put_object", Params={"Bucket": t.bucket, "Key": key}, ExpiresIn=300)
    parts = urllib.parse.urlsplit(url)
    status, body = send(t, Request("PUT", parts.path, parts.query, (("Host", t.host),), b"sent by URL"))
    if status != 200:
        return f"FAILED: HTTP {status}: {body[:200]}"
    return client(t, keys).get_object(Bucket=t.bucket, Key=key)["Body"].read().decode()


def target_from_env() -> Target:
    env = os.environ
    scoped = Keys(env["S3_SCOPED_ACCESS_KEY"], env["S3_SCOPED_SECRET_KEY"]) if env.get("S3_SCOPED_ACCESS_KEY") else None
    return Target(endpoint=env["S3_ENDPOINT"], region=env.get("S3_REGION", "us-east-1"), bucket=env["S3_BUCKET"],
                  root=Keys(env["S3_ROOT_ACCESS_KEY"], env["S3_ROOT_SECRET_KEY"]), scoped=scoped)


def run_all(t: Target, standin: bool = True) -> dict:
    prepare(t)
    forgeries = run_forgeries(t, standin)
    return {"forgeries": forgeries, "aftermath": aftermath(t), "honest": honest(t)}


if __name__ == "__main__":
    json.dump(run_all(target_from_env(), standin=os.environ.get("S3_STANDIN", "1") == "1"), sys.stdout)
    sys.stdout.write("\n")

"""S3 for the whole project: clients with retries and timeouts, URIs, and one error type for storage failures.

Problems with a whole input or output (a missing bucket, refused credentials, a location that names nothing) and
with a single object raise `StorageError`; its `reason` says why in one word, and messages never include
credentials (botocore's messages carry endpoint URLs, userinfo included: they are masked).
"""

from __future__ import annotations

import os
import random
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import botocore.exceptions

from vitaclip.redact import endpoint_without_userinfo, has_object_userinfo, redact_text, redact_url

S3Client = Any
"""A boto3 S3 client (boto3 ships no type stubs)."""

StorageErrorReason = Literal[
    "invalid_input",  # the location is malformed or names nothing
    "no_such_bucket",
    "access_denied",  # refused or missing credentials
    "archived",  # in an archive storage class (Glacier Flexible Retrieval, Deep Archive): restore it to read it
    "not_found",  # the object is gone
    "not_a_file",  # a local path names a folder, FIFO, socket or device
    "broken_link",  # a local path is a symbolic link loop
    "outside_folder",  # a local path under an input folder resolves outside it (a link swapped in after listing)
    "changed",  # the object changed (ETag or size) while it was being read
    "read_error",  # bodies kept arriving shorter than announced
    "unavailable",  # transient failures outlasted the retries
    "s3_error",  # any other refusal from S3
    "empty",  # a listing matched nothing where something was required
]

MiB = 2**20
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "Forbidden",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "403",
    }
)
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_CHANGED_CODES = frozenset({"PreconditionFailed", "InvalidRange", "412", "416"})
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
    }
)
# Connection resets, timeouts, broken or short streams: worth another try.
_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    ConnectionError,
    TimeoutError,
)
_CREDENTIAL_EXCEPTIONS: tuple[type[BaseException], ...] = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
)

T = TypeVar("T")


class StorageError(ValueError):
    """An input, output or object that cannot be used; `reason` says why in one word, `uri` says where."""

    def __init__(self, message: str, *, reason: StorageErrorReason, uri: str | None = None) -> None:
        # botocore's messages carry the endpoint URL, userinfo included: mask it before anyone prints this.
        super().__init__(redact_text(message))
        self.reason: StorageErrorReason = reason
        self.uri = None if uri is None else redact_text(uri)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default exception pickling (Ray ships errors between processes).
        return (_rebuild_error, (type(self), str(self), self.reason, self.uri))


class EmptyInputError(StorageError):
    """A listing that had to match at least one video matched none."""

    def __init__(self, message: str, *, reason: StorageErrorReason = "empty", uri: str | None = None) -> None:
        super().__init__(message, reason=reason, uri=uri)


def _rebuild_error(cls: type[StorageError], message: str, reason: StorageErrorReason, uri: str | None) -> StorageError:
    return cls(message, reason=reason, uri=uri)


class ShortRead(Exception):
    """A body that ended before its announced length without the transport noticing."""

    def __init__(self, got: int, expected: int) -> None:
        super().__init__(f"got {got} of {expected} bytes")
        self.got = got
        self.expected = expected


# ----------------------------------------------------------------------------------------------------- clients


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    max_attempts: int = 10,
    retry_mode: Literal["standard", "adaptive"] = "standard",
    region_name: str | None = None,
    connect_timeout_seconds: float = 10.0,
    read_timeout_seconds: float = 60.0,
    max_pool_connections: int = 32,
) -> S3Client:
    """An S3 client with retries and timeouts, credentials from the standard AWS chain only.

    Args:
        endpoint_url: An S3-compatible server (MinIO, moto); also taken from `AWS_ENDPOINT_URL_S3` or
            `AWS_ENDPOINT_URL` when unset. Such servers get path-style addressing. A user or password in it is
            dropped (credentials come from the AWS chain), so presigned URLs never carry it.
        max_attempts: Attempts per request, the first included; transient errors (500, 503, throttling, resets)
            are retried with botocore's backoff.
        retry_mode: botocore's retry mode; `adaptive` also rate-limits the client after throttling.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    import boto3  # here: a decode task reading local files never needs it (0.25 s of import)
    import botocore.config

    custom_endpoint = endpoint_url or _endpoint_from_environment()
    if custom_endpoint:  # given to boto3 without userinfo, which it would copy into every presigned URL
        custom_endpoint = endpoint_without_userinfo(custom_endpoint)
    config = botocore.config.Config(
        retries={"total_max_attempts": max_attempts, "mode": retry_mode},
        connect_timeout=connect_timeout_seconds,
        read_timeout=read_timeout_seconds,
        max_pool_connections=max_pool_connections,
        # Custom servers seldom resolve bucket subdomains (and never on an IP address).
        s3={"addressing_style": "path"} if custom_endpoint else None,
        # Presigned URLs (the service's /media redirects) signed with SigV4: botocore signs them with SigV2 in
        # us-east-1, which S3 refuses for buckets created since mid-2020.
        signature_version="s3v4",
    )
    # A session per client: the default session is not safe to share between threads while creating clients.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=custom_endpoint, region_name=region_name, config=config)


def _endpoint_from_environment() -> str | None:
    """The endpoint boto3 would take from the environment (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``,
    unless ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true)."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def check_endpoint_reachable(endpoint_url: str | None = None, *, timeout_seconds: float = 5.0) -> None:
    """Raises `OSError` at once when a custom S3 endpoint (given, or from the environment) takes no TCP connection.

    For interactive commands: the object store clients retry a refused connection with backoff for a minute or more
    before they give up, which is right for a nightly job riding out a blip and wrong for someone waiting on a search.
    One connection attempt settles the common mistakes (a wrong port or host, a server not started) in milliseconds.
    AWS's own endpoints are not probed.
    """
    endpoint = endpoint_url or _endpoint_from_environment()
    if not endpoint:
        return
    shown = redact_url(endpoint_without_userinfo(endpoint))
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or ""):
        return  # reached through a proxy: a direct connection says nothing
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a port that is not a number
        raise ValueError(f"S3 endpoint {shown!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"S3 endpoint {shown!r} is not an http:// or https:// URL")
    try:
        socket.create_connection((host, port), timeout=timeout_seconds).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OSError(f"Could not connect to the endpoint URL {shown}: {reason}") from None


def check_credentials_found(uri: str, action: str = "read") -> None:
    """Raises `StorageError` (a ValueError: a configuration error) at once when the standard AWS chain finds no
    credentials, in the words the job uses, instead of the store's ACCESS_DENIED from the first request."""
    import boto3

    try:
        found = boto3.session.Session().get_credentials()
    except _CREDENTIAL_EXCEPTIONS as exc:
        raise storage_error(exc, uri=uri, action=action) from None
    if found is None:
        raise storage_error(botocore.exceptions.NoCredentialsError(), uri=uri, action=action)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Splits `s3://bucket/key/or/prefix` into bucket and key (the key may be empty)."""
    if not uri.startswith("s3://"):
        raise StorageError(f"not an s3:// URI: {uri!r}", reason="invalid_input", uri=uri)
    if has_object_userinfo(uri):  # botocore would name "KEY:SECRET" as an invalid bucket in its errors
        raise StorageError(
            f"{redact_url(uri)} has credentials in it: S3 credentials come from the standard AWS chain only",
            reason="invalid_input",
            uri=redact_url(uri),
        )
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {uri!r}: expected s3://bucket/prefix", reason="invalid_input", uri=uri)
    return bucket, key


def client_error_fields(error: botocore.exceptions.ClientError) -> tuple[str, str, int]:
    details = error.response.get("Error", {})
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return str(details.get("Code", "")), str(details.get("Message", "") or ""), status


def is_transient(error: BaseException) -> bool:
    if isinstance(error, botocore.exceptions.ClientError):
        code, _, status = client_error_fields(error)
        return code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504)
    return isinstance(error, _TRANSIENT_EXCEPTIONS)


def storage_error(error: BaseException, *, uri: str, action: str) -> StorageError:
    """Translates a boto error met while doing `action` on `uri`; messages never include credentials."""
    if isinstance(error, _CREDENTIAL_EXCEPTIONS):
        return StorageError(
            f"cannot {action} {uri}: no usable AWS credentials in the standard chain "
            "(environment, shared config and credentials files, container or instance role)",
            reason="access_denied",
            uri=uri,
        )
    if isinstance(error, botocore.exceptions.ParamValidationError):
        return StorageError(f"cannot {action} {uri}: {error}", reason="invalid_input", uri=uri)
    if isinstance(error, botocore.exceptions.ClientError):
        code, message, status = client_error_fields(error)
        said = f"S3 said {code}" + (f": {message}" if message else "")
        if code == "NoSuchBucket":
            bucket = uri[len("s3://") :].partition("/")[0]
            return StorageError(
                f"bucket {bucket!r} does not exist (cannot {action} {uri})", reason="no_such_bucket", uri=uri
            )
        if code == "InvalidObjectState":  # a 403 too, but about the object's storage class, not the credentials
            return StorageError(
                f"{uri} is archived ({said}): restore it (S3 RestoreObject) before it can be read",
                reason="archived",
                uri=uri,
            )
        if code in _ACCESS_CODES or status == 403:
            return StorageError(
                f"access denied: cannot {action} {uri} ({said}); check the credentials the standard AWS chain "
                "resolves to and their permissions on this bucket and prefix",
                reason="access_denied",
                uri=uri,
            )
        if code in NOT_FOUND_CODES or status == 404:
            return StorageError(f"no object at {uri}", reason="not_found", uri=uri)
        if code in _CHANGED_CODES or status in (412, 416):
            return StorageError(f"{uri} changed while reading it ({said})", reason="changed", uri=uri)
        if is_transient(error):
            return StorageError(
                f"cannot {action} {uri}: S3 kept failing after retries ({said})", reason="unavailable", uri=uri
            )
        return StorageError(f"cannot {action} {uri} ({said})", reason="s3_error", uri=uri)
    if isinstance(error, ShortRead):
        return StorageError(
            f"cannot {action} {uri}: the body kept arriving truncated ({error})", reason="read_error", uri=uri
        )
    return StorageError(
        f"cannot {action} {uri}: S3 unreachable after retries ({type(error).__name__}: {error})",
        reason="unavailable",
        uri=uri,
    )


def backoff_delay(attempt: int, base_seconds: float, *, cap_seconds: float = 10.0) -> float:
    # The jitter keeps readers that failed together from retrying together.
    return random.uniform(0.5, 1.0) * min(cap_seconds, base_seconds * float(2**attempt))


def with_retries(call: Callable[[], T], *, uri: str, action: str, max_attempts: int, backoff_seconds: float) -> T:
    """Runs `call`, retrying transient S3 failures and short bodies; anything else becomes a StorageError at once."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    last: BaseException | None = None
    for attempt in range(max_attempts):
        try:
            return call()
        except ShortRead as error:
            last = error
        except (
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
            ConnectionError,
            TimeoutError,
        ) as error:
            if not is_transient(error):
                raise storage_error(error, uri=uri, action=action) from error
            last = error
        if attempt + 1 < max_attempts:
            time.sleep(backoff_delay(attempt, backoff_seconds))
    assert last is not None
    raise storage_error(last, uri=uri, action=action) from last


# ----------------------------------------------------------------------------------------------------- reads


def if_match(etag: str | None) -> dict[str, str]:
    if not etag:
        return {}
    return {"IfMatch": etag if etag.startswith('"') else f'"{etag}"'}


def read_body(response: dict[str, Any], *, expected: int | None) -> bytes:
    body = response["Body"]
    try:
        data: bytes = body.read()
    finally:
        body.close()
    if expected is not None and len(data) != expected:
        raise ShortRead(len(data), expected)
    return data


def read_whole(
    client: S3Client,
    bucket: str,
    key: str,
    *,
    etag: str | None = None,
    max_attempts: int = 5,
    backoff_seconds: float = 0.2,
) -> bytes:
    """The whole object in one GET, retried until its body is as long as its Content-Length says."""

    def attempt() -> bytes:
        response = client.get_object(Bucket=bucket, Key=key, **if_match(etag))
        length = response.get("ContentLength")
        return read_body(response, expected=None if length is None else int(length))

    return with_retries(
        attempt, uri=f"s3://{bucket}/{key}", action="read", max_attempts=max_attempts, backoff_seconds=backoff_seconds
    )

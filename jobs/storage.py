"""The indexing job's I/O layer: S3 clients, streamed video listings, object reads and the output store.

Only this module talks to S3. Problems with a whole input (a missing bucket, refused credentials, a location that
names nothing) raise `StorageError` with the location in the message. A single unreadable object raises
`StorageError` too, with a `reason` the job records on that video's row instead of stopping the run.
"""

from __future__ import annotations

import abc
import collections
import csv
import errno
import io
import itertools
import os
import random
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import boto3
import boto3.s3.transfer
import botocore.config
import botocore.exceptions
import pyarrow.parquet as pq

from index.delta_tables import OutputLocation
from index.schema import local_etag
from vitaclip.redact import redact_text, redact_url

S3Client = Any
"""A boto3 S3 client (boto3 ships no type stubs)."""

DEFAULT_VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {"mp4", "mov", "mkv", "webm", "avi", "m4v", "mpg", "mpeg", "ts", "flv", "wmv", "3gp"}
)
MANIFEST_SUFFIXES: tuple[str, ...] = (".csv", ".txt", ".parquet")
UNKNOWN_SIZE = -1
"""`VideoObject.size_bytes` of a manifest row whose object could not be found; reading it reports why."""

StorageErrorReason = Literal[
    "invalid_input",  # the location is malformed or names nothing
    "no_such_bucket",
    "access_denied",  # refused or missing credentials
    "not_found",  # the object is gone
    "changed",  # the object changed (ETag or size) while it was being read
    "truncated",  # bodies kept arriving shorter than announced
    "unavailable",  # transient failures outlasted the retries
    "s3_error",  # any other refusal from S3
    "empty",  # a listing matched nothing where something was required
]

_MiB = 2**20
_COPY_CHUNK_BYTES = 8 * _MiB
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
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
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
_TMP_SUFFIX = ".tmp-write"

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


class _ShortRead(Exception):
    """A body that ended before its announced length without the transport noticing."""

    def __init__(self, got: int, expected: int) -> None:
        super().__init__(f"got {got} of {expected} bytes")
        self.got = got
        self.expected = expected


@dataclass(frozen=True)
class VideoObject:
    """One listed video: where it is, a fingerprint that changes when its content does, and its size."""

    uri: str
    etag: str
    size_bytes: int
    status: str = ""
    """Set when the listing already knows this entry cannot be read (e.g. ``broken_link``); empty otherwise."""
    error_message: str = ""


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
            `AWS_ENDPOINT_URL` when unset. Such servers get path-style addressing.
        max_attempts: Attempts per request, the first included; transient errors (500, 503, throttling, resets)
            are retried with botocore's backoff.
        retry_mode: botocore's retry mode; `adaptive` also rate-limits the client after throttling.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    custom_endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = botocore.config.Config(
        retries={"total_max_attempts": max_attempts, "mode": retry_mode},
        connect_timeout=connect_timeout_seconds,
        read_timeout=read_timeout_seconds,
        max_pool_connections=max_pool_connections,
        # Custom servers seldom resolve bucket subdomains (and never on an IP address).
        s3={"addressing_style": "path"} if custom_endpoint else None,
    )
    # A session per client: the default session is not safe to share between threads while creating clients.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, region_name=region_name, config=config)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Splits `s3://bucket/key/or/prefix` into bucket and key (the key may be empty)."""
    if not uri.startswith("s3://"):
        raise StorageError(f"not an s3:// URI: {uri!r}", reason="invalid_input", uri=uri)
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {uri!r}: expected s3://bucket/prefix", reason="invalid_input", uri=uri)
    return bucket, key


def _client_error_fields(error: botocore.exceptions.ClientError) -> tuple[str, str, int]:
    details = error.response.get("Error", {})
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return str(details.get("Code", "")), str(details.get("Message", "") or ""), status


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, botocore.exceptions.ClientError):
        code, _, status = _client_error_fields(error)
        return code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504)
    return isinstance(error, _TRANSIENT_EXCEPTIONS)


def _storage_error(error: BaseException, *, uri: str, action: str) -> StorageError:
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
        code, message, status = _client_error_fields(error)
        said = f"S3 said {code}" + (f": {message}" if message else "")
        if code == "NoSuchBucket":
            bucket = uri[len("s3://") :].partition("/")[0]
            return StorageError(
                f"bucket {bucket!r} does not exist (cannot {action} {uri})", reason="no_such_bucket", uri=uri
            )
        if code in _ACCESS_CODES or status == 403:
            return StorageError(
                f"access denied: cannot {action} {uri} ({said}); check the credentials the standard AWS chain "
                "resolves to and their permissions on this bucket and prefix",
                reason="access_denied",
                uri=uri,
            )
        if code in _NOT_FOUND_CODES or status == 404:
            return StorageError(f"no object at {uri}", reason="not_found", uri=uri)
        if code in _CHANGED_CODES or status in (412, 416):
            return StorageError(f"{uri} changed while reading it ({said})", reason="changed", uri=uri)
        if _is_transient(error):
            return StorageError(
                f"cannot {action} {uri}: S3 kept failing after retries ({said})", reason="unavailable", uri=uri
            )
        return StorageError(f"cannot {action} {uri} ({said})", reason="s3_error", uri=uri)
    if isinstance(error, _ShortRead):
        return StorageError(
            f"cannot {action} {uri}: the body kept arriving truncated ({error})", reason="truncated", uri=uri
        )
    return StorageError(
        f"cannot {action} {uri}: S3 unreachable after retries ({type(error).__name__}: {error})",
        reason="unavailable",
        uri=uri,
    )


def _backoff_seconds(attempt: int, base_seconds: float, *, cap_seconds: float = 10.0) -> float:
    # The jitter keeps readers that failed together from retrying together.
    return random.uniform(0.5, 1.0) * min(cap_seconds, base_seconds * float(2**attempt))


def _with_retries(call: Callable[[], T], *, uri: str, action: str, max_attempts: int, backoff_seconds: float) -> T:
    """Runs `call`, retrying transient S3 failures and short bodies; anything else becomes a StorageError at once."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    last: BaseException | None = None
    for attempt in range(max_attempts):
        try:
            return call()
        except _ShortRead as error:
            last = error
        except (
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
            ConnectionError,
            TimeoutError,
        ) as error:
            if not _is_transient(error):
                raise _storage_error(error, uri=uri, action=action) from error
            last = error
        if attempt + 1 < max_attempts:
            time.sleep(_backoff_seconds(attempt, backoff_seconds))
    assert last is not None
    raise _storage_error(last, uri=uri, action=action) from last


# ----------------------------------------------------------------------------------------------------- listing


def _normalize_extensions(extensions: Iterable[str] | None) -> frozenset[str] | None:
    if extensions is None:
        return None
    if isinstance(extensions, str):
        raise TypeError("extensions must be a collection of suffixes such as {'mp4', 'mov'}, not one string")
    return frozenset(ext.lower().lstrip(".") for ext in extensions)


def _extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.rpartition(".")[2].lower() if "." in base else ""


def describe_listing(
    inputs: Sequence[str],
    *,
    extensions: Iterable[str] | None = DEFAULT_VIDEO_EXTENSIONS,
    min_size_bytes: int = 0,
    max_size_bytes: int | None = None,
) -> str:
    """The inputs and filters of a listing in words, for messages such as "no videos under ..."."""
    allowed = _normalize_extensions(extensions)
    filters = ["any extension" if allowed is None else "extensions " + ",".join(sorted(allowed))]
    filters.append(f"size >= {min_size_bytes} bytes")
    if max_size_bytes is not None:
        filters.append(f"size <= {max_size_bytes} bytes")
    return f"{', '.join(inputs)} (filters: {'; '.join(filters)})"


def require_any(videos: Iterable[VideoObject], *, where: str) -> Iterator[VideoObject]:
    """Returns `videos` unchanged, still streamed, after checking now that there is at least one.

    Raises:
        EmptyInputError: Nothing was listed; the message reads "no videos under {where}".
    """
    iterator = iter(videos)
    try:
        first = next(iterator)
    except StopIteration:
        raise EmptyInputError(f"no videos under {where}") from None
    return itertools.chain([first], iterator)


def list_videos(
    inputs: Sequence[str],
    *,
    extensions: Iterable[str] | None = DEFAULT_VIDEO_EXTENSIONS,
    min_size_bytes: int = 0,
    max_size_bytes: int | None = None,
    page_size: int = 1000,
    s3_client: S3Client | None = None,
    endpoint_url: str | None = None,
) -> Iterator[VideoObject]:
    """Streams the videos under each input, in input order and then in key order, filtered by extension and size.

    Each input is an `s3://bucket/prefix` (a raw S3 prefix, listed page by page), a local folder (walked
    recursively, in the same order as S3 would list the relative paths), or a manifest: a `.csv` or `.txt`
    (a header with a `uri` column and optional `etag` and `size_bytes` columns, or one URI per line) or a
    `.parquet` with those columns, local or on S3. Relative manifest entries are relative to the manifest's folder;
    rows without an ETag or size are looked up, and entries that cannot be found come out with
    `size_bytes=UNKNOWN_SIZE` and an empty ETag so that reading them records why. Zero-byte objects are kept by
    default: they become rows with a status downstream.

    Args:
        extensions: Allowed suffixes, case-insensitive, without dots; None allows any.
        min_size_bytes: Smallest size kept, inclusive.
        max_size_bytes: Largest size kept, inclusive; None for no limit.
        page_size: Keys per S3 listing request.
        s3_client: Client for S3 inputs; one is made with `make_s3_client(endpoint_url=...)` when absent.

    Raises:
        StorageError: At once, for an input that is neither an s3:// URI nor an existing folder or manifest;
            while iterating, for a missing bucket, refused credentials or S3 failing past its retries.
    """
    if isinstance(inputs, str):
        raise TypeError("inputs must be a sequence of locations, not one string")
    if min_size_bytes < 0:
        raise ValueError(f"min_size_bytes must be >= 0, got {min_size_bytes}")
    if max_size_bytes is not None and max_size_bytes < min_size_bytes:
        raise ValueError(f"max_size_bytes ({max_size_bytes}) is below min_size_bytes ({min_size_bytes})")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    allowed = _normalize_extensions(extensions)
    kinds = [_classify_input(location) for location in inputs]
    client = s3_client
    if client is None and any(kind != "folder" for kind in kinds):  # manifests may name S3 objects
        client = make_s3_client(endpoint_url=endpoint_url)
    return _list_all(
        list(zip(inputs, kinds, strict=True)),
        allowed=allowed,
        min_size_bytes=min_size_bytes,
        max_size_bytes=max_size_bytes,
        page_size=page_size,
        client=client,
    )


_InputKind = Literal["s3_prefix", "s3_manifest", "folder", "manifest"]


def _is_manifest_name(name: str) -> bool:
    return name.lower().endswith(MANIFEST_SUFFIXES)


def _classify_input(location: str) -> _InputKind:
    if location.startswith("s3://"):
        _, key = parse_s3_uri(location)
        return "s3_manifest" if _is_manifest_name(key) else "s3_prefix"
    if "://" in location:
        raise StorageError(
            f"unsupported input {location!r}: use s3://bucket/prefix, a local folder or a manifest file",
            reason="invalid_input",
            uri=location,
        )
    if os.path.isdir(location):
        return "folder"
    if os.path.isfile(location) and _is_manifest_name(location):
        return "manifest"
    if os.path.isfile(location):
        raise StorageError(
            f"input {location!r} is a file but not a manifest ({', '.join(MANIFEST_SUFFIXES)})",
            reason="invalid_input",
            uri=location,
        )
    raise StorageError(
        f"input {location!r} is neither an s3:// URI nor an existing folder or manifest file",
        reason="invalid_input",
        uri=location,
    )


def _list_all(
    inputs: list[tuple[str, _InputKind]],
    *,
    allowed: frozenset[str] | None,
    min_size_bytes: int,
    max_size_bytes: int | None,
    page_size: int,
    client: S3Client,
) -> Iterator[VideoObject]:
    def keep_name(name: str) -> bool:
        return allowed is None or _extension(name) in allowed

    def keep_size(size_bytes: int) -> bool:
        if size_bytes == UNKNOWN_SIZE:
            return True
        return size_bytes >= min_size_bytes and (max_size_bytes is None or size_bytes <= max_size_bytes)

    for location, kind in inputs:
        if kind == "s3_prefix":
            found: Iterator[VideoObject] = _list_s3_prefix(client, location, page_size=page_size, keep_name=keep_name)
        elif kind == "folder":
            found = _list_folder(location, keep_name=keep_name)
        else:
            found = _list_manifest(location, client=client, keep_name=keep_name)
        for video in found:
            if keep_size(video.size_bytes):
                yield video


def _list_s3_prefix(
    client: S3Client, location: str, *, page_size: int, keep_name: Callable[[str], bool]
) -> Iterator[VideoObject]:
    bucket, prefix = parse_s3_uri(location)
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
    )
    try:
        for page in pages:  # one request per page, made only when the previous page has been consumed
            for entry in page.get("Contents", ()):
                key = entry["Key"]
                if key.endswith("/") or not keep_name(key):
                    continue
                yield VideoObject(f"s3://{bucket}/{key}", str(entry.get("ETag", "")).strip('"'), int(entry["Size"]))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise _storage_error(error, uri=location, action="list") from error


def printable_path(path: str) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogates) become ``\\xNN``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def _odd(path: str, status: str, message: str) -> VideoObject:
    return VideoObject(printable_path(path), "", UNKNOWN_SIZE, status=status, error_message=message)


def _walk_sorted(folder: str, *, keep_name: Callable[[str], bool]) -> Iterator[VideoObject]:
    """Files under `folder`, ordered like the sorted relative paths; symlinked folders are not followed.

    Entries that cannot be videos come out with a listing `status` instead of stopping the listing: a name that is
    not valid UTF-8 (`invalid_name`), a dangling symlink or a symlink loop (`broken_link`), a FIFO, socket or device
    (`not_a_file`, which a decoder would block on), a file that cannot be inspected (`read_error`).
    """
    try:
        with os.scandir(folder) as scan:
            entries = []
            for entry in scan:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                entries.append((entry.name + "/" if is_dir else entry.name, entry))
    except PermissionError as error:
        raise StorageError(
            f"access denied: cannot list folder {printable_path(folder)}", reason="access_denied", uri=folder
        ) from error
    except FileNotFoundError:  # removed since its parent was read
        return
    for sort_name, entry in sorted(entries, key=lambda pair: pair[0]):
        if sort_name.endswith("/"):
            yield from _walk_sorted(entry.path, keep_name=keep_name)
            continue
        if not keep_name(entry.path):
            continue
        try:
            st = entry.stat()  # follows symlinks
        except FileNotFoundError:
            if entry.is_symlink():
                yield _odd(entry.path, "broken_link", "symbolic link to a missing file")
            continue  # removed since the folder was read
        except OSError as error:
            if error.errno == errno.ELOOP:
                yield _odd(entry.path, "broken_link", "symbolic link loop")
            else:
                yield _odd(entry.path, "read_error", f"cannot inspect the file: {error.strerror or error}")
            continue
        if stat.S_ISDIR(st.st_mode):
            continue  # a symlinked folder: not followed
        if not stat.S_ISREG(st.st_mode):
            yield _odd(entry.path, "not_a_file", "not a regular file (a FIFO, socket or device)")
            continue
        if printable_path(entry.path) != entry.path:
            yield _odd(entry.path, "invalid_name", "the file name is not valid UTF-8 (shown with \\x escapes)")
            continue
        yield VideoObject(entry.path, local_etag(st), st.st_size)


def _list_folder(location: str, *, keep_name: Callable[[str], bool]) -> Iterator[VideoObject]:
    yield from _walk_sorted(os.path.abspath(location), keep_name=keep_name)


_ManifestRow = tuple[str, "str | None", "int | None"]  # uri, etag, size_bytes


def _list_manifest(location: str, *, client: S3Client, keep_name: Callable[[str], bool]) -> Iterator[VideoObject]:
    on_s3 = location.startswith("s3://")
    base = location.rsplit("/", 1)[0] if on_s3 else os.path.dirname(os.path.abspath(location))
    for uri, etag, size_bytes in _manifest_rows(location, client=client):
        if not on_s3 and not uri.startswith("s3://") and not os.path.isabs(uri):
            uri = os.path.normpath(os.path.join(base, uri))
        elif on_s3 and not uri.startswith("s3://") and not uri.startswith("/"):
            uri = f"{base}/{uri}"
        if not keep_name(uri):
            continue
        if etag is None or size_bytes is None:
            looked_up = _look_up(uri, client=client)
            etag = looked_up.etag if etag is None else etag
            size_bytes = looked_up.size_bytes if size_bytes is None else size_bytes
        yield VideoObject(uri, etag, size_bytes)


def _head(uri: str, *, client: S3Client, action: str) -> Any:
    """HEAD of an S3 object, retried a few times on transient failures."""
    bucket, key = parse_s3_uri(uri)
    return _with_retries(
        lambda: client.head_object(Bucket=bucket, Key=key),
        uri=uri,
        action=action,
        max_attempts=3,
        backoff_seconds=0.2,
    )


def _look_up(uri: str, *, client: S3Client) -> VideoObject:
    """ETag and size of one object; a missing or refused one comes back with UNKNOWN_SIZE."""
    if uri.startswith("s3://"):
        try:
            head = _head(uri, client=client, action="look up")
        except StorageError as error:
            if error.reason == "unavailable":
                raise
            return VideoObject(uri, "", UNKNOWN_SIZE)
        return VideoObject(uri, str(head.get("ETag", "")).strip('"'), int(head["ContentLength"]))
    try:
        st = os.stat(uri)
    except OSError:
        return VideoObject(uri, "", UNKNOWN_SIZE)
    return VideoObject(uri, local_etag(st), st.st_size)


def _manifest_rows(location: str, *, client: S3Client) -> Iterator[_ManifestRow]:
    if location.lower().endswith(".parquet"):
        source: Any = location
        if location.startswith("s3://"):
            head = _head(location, client=client, action="read manifest")
            source = S3RangeReader(location, s3_client=client, size_bytes=int(head["ContentLength"]))
        yield from _parquet_rows(source, where=location)
        return
    if location.startswith("s3://"):
        bucket, key = parse_s3_uri(location)
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            lines = (line.decode("utf-8") for line in body.iter_lines())
            yield from _csv_rows(lines, where=location)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            raise _storage_error(error, uri=location, action="read manifest") from error
        return
    with open(location, newline="", encoding="utf-8") as handle:
        yield from _csv_rows(handle, where=location)


def _parse_size(value: Any, *, where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise StorageError(
            f"{where}: size_bytes {value!r} is not an integer", reason="invalid_input", uri=where
        ) from None
    if size < 0:
        raise StorageError(f"{where}: size_bytes {size} is negative", reason="invalid_input", uri=where)
    return size


def _csv_rows(lines: Iterable[str], *, where: str) -> Iterator[_ManifestRow]:
    header: list[str] | None = None
    for row in csv.reader(lines):
        cells = [cell.strip().lstrip("\ufeff") for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if header is None:
            lowered = [cell.lower() for cell in cells]
            header = lowered if "uri" in lowered else []
            if header:
                continue
        if not header:
            yield cells[0], None, None
            continue
        values = dict(zip(header, cells, strict=False))  # short rows leave columns out
        uri = values.get("uri", "")
        if not uri:
            raise StorageError(f"{where}: a row has no uri: {row!r}", reason="invalid_input", uri=where)
        etag = values.get("etag") or None
        yield uri, etag, _parse_size(values.get("size_bytes"), where=where)


def _parquet_rows(source: Any, *, where: str) -> Iterator[_ManifestRow]:
    try:
        table = pq.ParquetFile(source)
    except (OSError, ValueError) as error:
        if isinstance(error, StorageError):
            raise
        raise StorageError(
            f"{where} is not a readable Parquet file: {error}", reason="invalid_input", uri=where
        ) from error
    names = set(table.schema_arrow.names)
    if "uri" not in names:
        raise StorageError(
            f"{where} has no 'uri' column (columns: {', '.join(sorted(names))})", reason="invalid_input", uri=where
        )
    columns = [name for name in ("uri", "etag", "size_bytes") if name in names]
    for batch in table.iter_batches(columns=columns, batch_size=4096):
        data = batch.to_pydict()
        empty: list[Any] = [None] * batch.num_rows
        for uri, etag, size in zip(data["uri"], data.get("etag", empty), data.get("size_bytes", empty), strict=True):
            if not uri:
                raise StorageError(f"{where}: a row has no uri", reason="invalid_input", uri=where)
            yield str(uri), (str(etag) if etag else None), _parse_size(size, where=where)


# ----------------------------------------------------------------------------------------------------- reading


def open_video(
    uri: str,
    *,
    size_bytes: int | None,
    etag: str | None = None,
    s3_client: S3Client | None = None,
    whole_object_max_bytes: int = 32 * _MiB,
    block_size_bytes: int = 2 * _MiB,
    max_cached_blocks: int = 4,
    max_attempts: int = 5,
    backoff_seconds: float = 0.2,
) -> str | bytes | S3RangeReader:
    """A source the decoder can open: a local path as given, a small S3 object's bytes, or a ranged reader.

    Args:
        size_bytes: The listed size; None (or UNKNOWN_SIZE) looks it up first.
        etag: When given, S3 reads require this ETag, so an object replaced mid-read fails with reason "changed"
            instead of mixing two versions.
        whole_object_max_bytes: S3 objects up to this size are read in one GET; larger ones are read in ranges.
        block_size_bytes: Bytes per ranged GET (the read-ahead) of the ranged reader.
        max_attempts: Tries per GET, against resets, 5xx, throttling and short bodies, with exponential backoff.

    Raises:
        StorageError: The object is missing, refused, changed, or could not be read whole after retries.
    """
    if not uri.startswith("s3://"):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            raise StorageError(f"no file at {printable_path(path)}", reason="not_found", uri=uri) from None
        if not regular:  # a FIFO or device would block the decoder
            raise StorageError(f"not a regular file: {printable_path(path)}", reason="not_found", uri=uri)
        return path
    bucket, key = parse_s3_uri(uri)
    client = s3_client if s3_client is not None else make_s3_client()
    if size_bytes is None or size_bytes == UNKNOWN_SIZE:
        head = _with_retries(
            lambda: client.head_object(Bucket=bucket, Key=key, **_if_match(etag)),
            uri=uri,
            action="look up",
            max_attempts=max_attempts,
            backoff_seconds=backoff_seconds,
        )
        size_bytes = int(head["ContentLength"])
    if size_bytes <= whole_object_max_bytes:
        return _read_whole(client, bucket, key, etag=etag, max_attempts=max_attempts, backoff_seconds=backoff_seconds)
    return S3RangeReader(
        uri,
        s3_client=client,
        size_bytes=size_bytes,
        etag=etag,
        block_size_bytes=block_size_bytes,
        max_cached_blocks=max_cached_blocks,
        max_attempts=max_attempts,
        backoff_seconds=backoff_seconds,
    )


def _if_match(etag: str | None) -> dict[str, str]:
    if not etag:
        return {}
    return {"IfMatch": etag if etag.startswith('"') else f'"{etag}"'}


def _read_body(response: dict[str, Any], *, expected: int | None) -> bytes:
    body = response["Body"]
    try:
        data: bytes = body.read()
    finally:
        body.close()
    if expected is not None and len(data) != expected:
        raise _ShortRead(len(data), expected)
    return data


def _read_whole(
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
        response = client.get_object(Bucket=bucket, Key=key, **_if_match(etag))
        length = response.get("ContentLength")
        return _read_body(response, expected=None if length is None else int(length))

    return _with_retries(
        attempt, uri=f"s3://{bucket}/{key}", action="read", max_attempts=max_attempts, backoff_seconds=backoff_seconds
    )


class S3RangeReader(io.RawIOBase):
    """A seekable, read-only file over one S3 object, read in ranged GETs of `block_size_bytes`.

    Recently used blocks are kept (least recently used first out), so a demuxer that jumps between the header and
    the data does not fetch the same bytes twice. Each GET is retried on resets, 5xx, throttling and short bodies.
    Not safe to share between threads; open one per reader.
    """

    def __init__(
        self,
        uri: str,
        *,
        s3_client: S3Client,
        size_bytes: int,
        etag: str | None = None,
        block_size_bytes: int = 2 * _MiB,
        max_cached_blocks: int = 4,
        max_attempts: int = 5,
        backoff_seconds: float = 0.2,
    ) -> None:
        super().__init__()
        if size_bytes < 0:
            raise ValueError(f"size_bytes must be >= 0, got {size_bytes}")
        if block_size_bytes < 1 or max_cached_blocks < 1:
            raise ValueError(
                f"block_size_bytes and max_cached_blocks must be >= 1, got {block_size_bytes}, {max_cached_blocks}"
            )
        self.uri = uri
        self.bucket, self.key = parse_s3_uri(uri)
        self.size_bytes = size_bytes
        self.etag = etag
        self.block_size_bytes = block_size_bytes
        self.max_cached_blocks = max_cached_blocks
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.requests_made = 0
        """GET attempts so far, retries included."""
        self._client = s3_client
        self._position = 0
        self._blocks: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"S3RangeReader({self.uri!r}, size_bytes={self.size_bytes})"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = self.size_bytes + offset
        else:
            raise ValueError(f"whence must be SEEK_SET, SEEK_CUR or SEEK_END, got {whence}")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def read(self, size: int | None = -1) -> bytes:
        self._check_open()
        end = self.size_bytes if size is None or size < 0 else min(self.size_bytes, self._position + size)
        parts: list[memoryview] = []
        position = self._position
        while position < end:
            index, offset = divmod(position, self.block_size_bytes)
            block = self._block(index)
            chunk = memoryview(block)[offset : offset + (end - position)]
            parts.append(chunk)
            position += len(chunk)
        self._position = max(self._position, position)
        return b"".join(parts)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._blocks.clear()
        super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on a closed reader ({self.uri})")

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is not None:
            self._blocks.move_to_end(index)
            return block
        start = index * self.block_size_bytes
        last = min(self.size_bytes, start + self.block_size_bytes) - 1
        block = _with_retries(
            lambda: self._get_range(start, last),
            uri=self.uri,
            action=f"read bytes {start}-{last} of",
            max_attempts=self.max_attempts,
            backoff_seconds=self.backoff_seconds,
        )
        self._blocks[index] = block
        while len(self._blocks) > self.max_cached_blocks:
            self._blocks.popitem(last=False)
        return block

    def _get_range(self, start: int, last: int) -> bytes:
        self.requests_made += 1
        response = self._client.get_object(
            Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{last}", **_if_match(self.etag)
        )
        return _read_body(response, expected=last - start + 1)


# ----------------------------------------------------------------------------------------------------- output store


def _check_rel_path(rel_path: str, *, prefix: bool = False) -> str:
    """A relative path with forward slashes and no `.`, `..` or empty parts (a prefix may end in `/` or be empty)."""
    if prefix and rel_path == "":
        return rel_path
    parts = rel_path.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]
    if not rel_path or rel_path.startswith("/") or "\\" in rel_path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"expected a relative path with '/' separators and no '.', '..' or empty parts, got {rel_path!r}"
        )
    return rel_path


class Store(abc.ABC):
    """The job's output location, a local folder or an S3 prefix, addressed by relative paths such as `runs/x.json`."""

    url: str

    @abc.abstractmethod
    def put_bytes(self, rel_path: str, data: bytes) -> None:
        """Writes a whole file at once: readers see the old content or the new one, never a part."""

    @abc.abstractmethod
    def put_file(self, rel_path: str, source: Path) -> None:
        """Writes a local file, streamed (never read whole into memory), as atomically as `put_bytes`."""

    @abc.abstractmethod
    def get_bytes(self, rel_path: str) -> bytes:
        """The file's content. Raises FileNotFoundError when there is none."""

    @abc.abstractmethod
    def get_file(self, rel_path: str, target: Path) -> None:
        """Copies the file to a local path, streamed. Raises FileNotFoundError when there is none."""

    @abc.abstractmethod
    def exists(self, rel_path: str) -> bool:
        """Whether a file is at `rel_path`."""

    @abc.abstractmethod
    def list(self, rel_prefix: str = "") -> list[str]:
        """Sorted relative paths of all files whose path starts with `rel_prefix` (a folder ends with `/`)."""

    @abc.abstractmethod
    def delete(self, rel_path: str) -> None:
        """Removes the file; a missing one is not an error."""

    @abc.abstractmethod
    def url_for(self, rel_path: str) -> str:
        """The absolute location of `rel_path` (of the store itself for ""): a path or an s3:// URI."""

    @abc.abstractmethod
    def local_path(self, rel_path: str) -> Path | None:
        """The file's path on this machine, or None for a remote store."""

    @property
    def location(self) -> OutputLocation:
        """The same output for the Delta tables (`index.delta_tables`): URL and endpoint, never credentials."""
        return OutputLocation.from_url(self.url, s3_endpoint_url=getattr(self, "endpoint_url", None))


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in `folder` durable; a best effort where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class LocalStore(Store):
    """A folder; writes go to a temporary file beside the target, then `os.replace`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"output location {self.root} exists and is not a folder", reason="invalid_input")
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    def _path(self, rel_path: str) -> Path:
        return self.root / _check_rel_path(rel_path)

    def put_bytes(self, rel_path: str, data: bytes) -> None:
        self._write(rel_path, lambda handle: handle.write(data))

    def put_file(self, rel_path: str, source: Path) -> None:
        def copy(handle: Any) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, handle, _COPY_CHUNK_BYTES)

        self._write(rel_path, copy)

    def _write(self, rel_path: str, fill: Callable[[Any], Any]) -> None:
        path = self._path(rel_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            # os.open with 0o666 honours the umask, unlike mkstemp's private 0o600.
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(descriptor, "wb") as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_folder(path.parent)

    def get_bytes(self, rel_path: str) -> bytes:
        return self._path(rel_path).read_bytes()

    def get_file(self, rel_path: str, target: Path) -> None:
        shutil.copyfile(self._path(rel_path), target)

    def exists(self, rel_path: str) -> bool:
        return self._path(rel_path).is_file()

    def list(self, rel_prefix: str = "") -> list[str]:
        _check_rel_path(rel_prefix, prefix=True)
        folder = rel_prefix.rsplit("/", 1)[0] if "/" in rel_prefix else ""
        start = self.root / folder if folder else self.root
        if not start.is_dir():
            return []
        found = []
        for found_file in _walk_sorted(str(start), keep_name=lambda _: True):
            if found_file.status:
                continue  # not a file this store wrote
            rel = Path(found_file.uri).relative_to(self.root).as_posix()
            if rel.startswith(rel_prefix) and not rel.endswith(_TMP_SUFFIX):
                found.append(rel)
        return sorted(found)

    def delete(self, rel_path: str) -> None:
        self._path(rel_path).unlink(missing_ok=True)

    def url_for(self, rel_path: str) -> str:
        return str(self._path(rel_path)) if rel_path else self.url

    def local_path(self, rel_path: str) -> Path | None:
        return self._path(rel_path) if rel_path else self.root


class S3Store(Store):
    """An S3 prefix; each write is one whole object (a PUT, or a multipart upload completed at once for large files:
    a single PUT stops at 5 GiB), so readers never see a partial file."""

    def __init__(
        self,
        url: str,
        *,
        s3_client: S3Client,
        multipart_threshold_bytes: int = 64 * _MiB,
        endpoint_url: str | None = None,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.bucket, prefix = parse_s3_uri(url)
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = s3_client
        # Parts of the threshold's size: S3 allows 10,000 parts, so 64 MiB parts reach 625 GiB per object.
        self._transfer = boto3.s3.transfer.TransferConfig(
            multipart_threshold=multipart_threshold_bytes, multipart_chunksize=max(5 * _MiB, multipart_threshold_bytes)
        )

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    def _key(self, rel_path: str) -> str:
        return self.prefix + _check_rel_path(rel_path)

    def _call(self, action: str, rel_path: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            uri = f"s3://{self.bucket}/{self.prefix}{rel_path}"
            raise _storage_error(error, uri=uri, action=action) from error

    def put_bytes(self, rel_path: str, data: bytes) -> None:
        key = self._key(rel_path)
        self._call("write", rel_path, lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data)))

    def put_file(self, rel_path: str, source: Path) -> None:
        key = self._key(rel_path)
        self._call(
            "write",
            rel_path,
            lambda: self._client.upload_file(str(source), self.bucket, key, Config=self._transfer),
        )

    def get_file(self, rel_path: str, target: Path) -> None:
        key = self._key(rel_path)
        try:
            self._call(
                "read",
                rel_path,
                lambda: self._client.download_file(self.bucket, key, str(target), Config=self._transfer),
            )
        except StorageError as error:
            if error.reason == "not_found":
                raise FileNotFoundError(errno.ENOENT, "no such object", self.url_for(rel_path)) from error
            raise

    def get_bytes(self, rel_path: str) -> bytes:
        key = self._key(rel_path)
        try:
            return _read_whole(self._client, self.bucket, key)
        except StorageError as error:
            if error.reason == "not_found":
                raise FileNotFoundError(errno.ENOENT, "no such object", self.url_for(rel_path)) from error
            raise

    def exists(self, rel_path: str) -> bool:
        key = self._key(rel_path)
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as error:
            code, _, status = _client_error_fields(error)
            if code in _NOT_FOUND_CODES or status == 404:
                return False
            raise _storage_error(error, uri=self.url_for(rel_path), action="look up") from error
        except botocore.exceptions.BotoCoreError as error:
            raise _storage_error(error, uri=self.url_for(rel_path), action="look up") from error
        return True

    def list(self, rel_prefix: str = "") -> list[str]:
        _check_rel_path(rel_prefix, prefix=True)
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + rel_prefix
        )

        def collect() -> list[str]:
            return [
                entry["Key"][len(self.prefix) :]
                for page in pages
                for entry in page.get("Contents", ())
                if not entry["Key"].endswith("/")
            ]

        return sorted(self._call("list", rel_prefix, collect))

    def delete(self, rel_path: str) -> None:
        key = self._key(rel_path)
        self._call("delete", rel_path, lambda: self._client.delete_object(Bucket=self.bucket, Key=key))

    def url_for(self, rel_path: str) -> str:
        return f"s3://{self.bucket}/{self._key(rel_path)}" if rel_path else self.url

    def local_path(self, rel_path: str) -> Path | None:
        if rel_path:
            self._key(rel_path)
        return None


class ObjectFsStore(Store):
    """A ``gs://`` or ``az://`` (``abfss://``) prefix through ``pyarrow.fs``, credentials from the environment (see
    `index.delta_tables.OutputLocation.filesystem`). Blob stores write an object whole when its stream closes, so
    readers never see a partial file."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._fs, self._base = OutputLocation.from_url(self.url).filesystem()

    def __repr__(self) -> str:
        return f"ObjectFsStore({redact_url(self.url)!r})"

    def _path(self, rel_path: str) -> str:
        return f"{self._base}/{_check_rel_path(rel_path)}"

    def put_bytes(self, rel_path: str, data: bytes) -> None:
        with self._fs.open_output_stream(self._path(rel_path)) as out:
            out.write(data)

    def put_file(self, rel_path: str, source: Path) -> None:
        with open(source, "rb") as src, self._fs.open_output_stream(self._path(rel_path)) as out:
            shutil.copyfileobj(src, out, _COPY_CHUNK_BYTES)

    def get_bytes(self, rel_path: str) -> bytes:
        with self._fs.open_input_stream(self._path(rel_path)) as src:
            return src.read()

    def get_file(self, rel_path: str, target: Path) -> None:
        with self._fs.open_input_stream(self._path(rel_path)) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, _COPY_CHUNK_BYTES)

    def exists(self, rel_path: str) -> bool:
        import pyarrow.fs as pafs

        return self._fs.get_file_info(self._path(rel_path)).type == pafs.FileType.File

    def list(self, rel_prefix: str = "") -> list[str]:
        import pyarrow.fs as pafs

        _check_rel_path(rel_prefix, prefix=True)
        folder = rel_prefix.rsplit("/", 1)[0] if "/" in rel_prefix else ""
        start = f"{self._base}/{folder}" if folder else self._base
        infos = self._fs.get_file_info(pafs.FileSelector(start, recursive=True, allow_not_found=True))
        found = [i.path[len(self._base) + 1 :] for i in infos if i.type == pafs.FileType.File]
        return sorted(rel for rel in found if rel.startswith(rel_prefix))

    def delete(self, rel_path: str) -> None:
        try:
            self._fs.delete_file(self._path(rel_path))
        except FileNotFoundError:
            pass

    def url_for(self, rel_path: str) -> str:
        return f"{self.url}/{_check_rel_path(rel_path)}" if rel_path else self.url

    def local_path(self, rel_path: str) -> Path | None:
        return None


def open_store(url: str, *, s3_client: S3Client | None = None, endpoint_url: str | None = None) -> Store:
    """The output store at `url`: a local folder (created when missing), `s3://bucket/prefix`, or a ``gs://`` or
    ``az://`` prefix (through ``pyarrow.fs``)."""
    if url.startswith("s3://"):
        client = s3_client if s3_client is not None else make_s3_client(endpoint_url=endpoint_url)
        return S3Store(url, s3_client=client, endpoint_url=endpoint_url)
    if url.startswith(("gs://", "az://", "abfss://")):
        if endpoint_url is not None:
            raise StorageError("--s3-endpoint-url is only for s3:// outputs", reason="invalid_input", uri=url)
        return ObjectFsStore(url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        raise StorageError(
            f"unsupported output location {url!r}: use a local folder, s3://, gs://, az:// or abfss://",
            reason="invalid_input",
            uri=url,
        )
    return LocalStore(url)

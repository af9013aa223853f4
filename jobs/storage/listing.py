"""Streamed video listings: local folders, S3 prefixes and manifests (CSV or Parquet, S3 Inventory included), one
`VideoObject` per video with a fingerprint that changes when its content does. Odd entries (broken links, FIFOs,
undecodable names) are listed with a status instead of stopping the listing."""

from __future__ import annotations

import csv
import errno
import itertools
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import botocore.exceptions
import pyarrow.parquet as pq

from index.s3 import EmptyInputError, S3Client, StorageError, make_s3_client, parse_s3_uri, storage_error, with_retries
from index.schema import local_etag

DEFAULT_VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {"mp4", "mov", "mkv", "webm", "avi", "m4v", "mpg", "mpeg", "ts", "flv", "wmv", "3gp"}
)
MANIFEST_SUFFIXES: tuple[str, ...] = (".csv", ".txt", ".parquet")
UNKNOWN_SIZE = -1
"""`VideoObject.size_bytes` of a manifest row whose object could not be found; reading it reports why."""


@dataclass(frozen=True)
class VideoObject:
    """One listed video: where it is, a fingerprint that changes when its content does, and its size."""

    uri: str
    etag: str
    size_bytes: int
    status: str = ""
    """Set when the listing already knows this entry cannot be read (e.g. ``broken_link``); empty otherwise."""
    error_message: str = ""


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
    follow_outside_symlinks: bool = False,
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
        follow_outside_symlinks: In folders, read symlinks to files outside the folder too. By default they come
            out with the status ``outside_folder`` and are never read: whoever can write a link into an input
            folder would otherwise have any file the job can read indexed, and its thumbnail served. Symlinks to
            files inside the folder are followed either way.

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
        follow_outside_symlinks=follow_outside_symlinks,
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
    follow_outside_symlinks: bool,
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
            found = _list_folder(location, keep_name=keep_name, follow_outside_symlinks=follow_outside_symlinks)
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
        raise storage_error(error, uri=location, action="list") from error


def printable_path(path: str) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogates) become ``\\xNN``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def _odd(path: str, status: str, message: str) -> VideoObject:
    return VideoObject(printable_path(path), "", UNKNOWN_SIZE, status=status, error_message=message)


def _walk_sorted(folder: str, *, keep_name: Callable[[str], bool], inside: str | None) -> Iterator[VideoObject]:
    """Files under `folder`, ordered like the sorted relative paths; symlinked folders are not followed.

    Entries that cannot be videos come out with a listing `status` instead of stopping the listing: a name that is
    not valid UTF-8 (`invalid_name`), a dangling symlink or a symlink loop (`broken_link`), a symlink to a file
    outside `inside` (`outside_folder`; None: any target), a FIFO, socket or device (`not_a_file`, which a decoder
    would block on), a file that cannot be inspected (`read_error`).
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
            yield from _walk_sorted(entry.path, keep_name=keep_name, inside=inside)
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
        if inside is not None and entry.is_symlink() and not _is_within(os.path.realpath(entry.path), inside):
            yield _odd(
                entry.path,
                "outside_folder",
                "symbolic link to a file outside the listed folder: not read (--follow-outside-symlinks reads it)",
            )
            continue
        if not stat.S_ISREG(st.st_mode):
            yield _odd(entry.path, "not_a_file", "not a regular file (a FIFO, socket or device)")
            continue
        if printable_path(entry.path) != entry.path:
            yield _odd(entry.path, "invalid_name", "the file name is not valid UTF-8 (shown with \\x escapes)")
            continue
        yield VideoObject(entry.path, local_etag(st), st.st_size)


def _list_folder(
    location: str, *, keep_name: Callable[[str], bool], follow_outside_symlinks: bool
) -> Iterator[VideoObject]:
    inside = None if follow_outside_symlinks else os.path.realpath(location)
    yield from _walk_sorted(os.path.abspath(location), keep_name=keep_name, inside=inside)


def _is_within(path: str, folder: str) -> bool:
    """Whether the resolved `path` is `folder` or under it (``/data/in2/x`` is not under ``/data/in``)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


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
    return with_retries(
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
            from jobs.storage.reading import S3RangeReader  # reading imports this module

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
            raise storage_error(error, uri=location, action="read manifest") from error
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

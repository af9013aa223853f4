"""Streamed video listings: local folders, S3 prefixes and manifests, one `VideoObject` per video with a
fingerprint that changes when its content does. Odd entries (broken links, FIFOs, undecodable names, URIs the job
cannot read) are listed with a status instead of stopping the listing.

Manifests, local or on S3:

- ``.txt``: one entry per line, taken verbatim (only the line ending is removed: spaces, commas and quotes are part
  of the name). Blank lines are left out, and so are comments: lines that start with ``#`` followed by a space, a
  tab or the line's end (``# note``, ``#``). ``#1.mp4`` is a name; a name that starts with ``#`` and a space is
  written ``./# name.mp4`` (or as an absolute path).
- ``.csv`` (or ``.csv.gz``): a header with a ``uri`` column (``etag`` and ``size_bytes`` optional; header names are
  stripped and case-insensitive) or, without one, the first cell of each row. Cells are names as written, never
  stripped; a quoted cell may hold commas, quotes and line breaks. A row whose line starts with an unquoted ``#``
  followed by a space, a tab, a comma or the line's end is a comment; a quoted cell never is (``"# a.mp4"``).
- ``.parquet``: columns ``uri`` and optional ``etag`` and ``size_bytes``, or an S3 Inventory Parquet data file
  (``bucket``, ``key``, ``size``, ``e_tag``, ...).
- ``.json``: the ``manifest.json`` of an S3 Inventory report (CSV or Parquet; ORC is refused); its data files are
  read from the destination bucket or, for a local manifest.json, from a local copy next to it when there is one.
  Inventory rows become ``s3://bucket/key`` with the inventory's size and ETag; non-current versions and delete
  markers are left out; CSV keys are URL-decoded.

Text manifests are UTF-8 (with or without a byte order mark) or UTF-16 with a byte order mark; bytes that are not
valid raise `StorageError` naming the manifest and the line. Entries are ``s3://`` URIs, ``file://`` URIs (only
``file:///abs/path`` or ``file://localhost/abs/path``, percent-decoded), absolute paths, or paths relative to the
manifest's folder (for a manifest on S3, keys relative to its prefix, a leading ``./`` dropped). Local paths are
normalised (`os.path.normpath`), so that a video listed by a folder and by a manifest has one URI. An entry with
another scheme (``gs://``, ``http://``, ...) or a ``file://`` URI naming another host is a row with the status
``unsupported_uri`` and a message naming the manifest and line, never read as a path.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import datetime
import errno
import functools
import gzip
import itertools
import json
import logging
import os
import re
import stat
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, NamedTuple, TypeVar
from urllib.parse import quote, unquote, unquote_plus

import botocore.exceptions
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from index.s3 import (
    EmptyInputError,
    S3Client,
    StorageError,
    StorageErrorReason,
    make_s3_client,
    parse_s3_uri,
    storage_error,
    with_retries,
)
from index.schema import LOCAL_ETAG_PREFIX, local_etag, plain_types
from vitaclip.redact import has_object_userinfo, printable_name, redact_text, redact_url

log = logging.getLogger(__name__)

DEFAULT_VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {"mp4", "mov", "mkv", "webm", "avi", "m4v", "mpg", "mpeg", "ts", "flv", "wmv", "3gp"}
    | {"mts", "m2ts", "vob", "ogv", "mxf"}  # camcorders (AVCHD), DVDs, Ogg, broadcast
)
MANIFEST_SUFFIXES: tuple[str, ...] = (".csv", ".csv.gz", ".txt", ".parquet", ".json")
UNKNOWN_SIZE = -1
"""`VideoObject.size_bytes` of a manifest row whose object could not be found; reading it reports why."""
UNLISTED_FOLDER = "unlisted_folder"
"""The status of a listing entry that is no video: a subfolder that could not be read (permission denied). Its
``uri`` is the folder's path with a trailing separator; the job leaves the folder's videos as they are (no row is
written for it, and pruning spares the videos committed under it)."""


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
    include_hidden: bool = False,
) -> Iterator[VideoObject]:
    """Streams the videos under each input, filtered by extension and size: the live listings (folders, S3
    prefixes) first, then the manifests, each in input order and then in key order. An object both name keeps the
    live listing's entry (the planner keeps the first of a video listed twice): the object as it is now, where an
    inventory report may be a day old (its ETag then says `changed` when read, or `already indexed` for a video
    replaced since).

    Each input is an `s3://bucket/prefix` (a raw S3 prefix, listed page by page), a local folder (walked
    recursively, in the same order as S3 would list the relative paths), or a manifest, local or on S3 (see the
    module docstring): a `.txt` (one entry per line), a `.csv` or `.csv.gz` (a header with a `uri` column and
    optional `etag` and `size_bytes` columns, or the first cell of each row), a `.parquet` with those columns or an
    S3 Inventory Parquet data file, or an S3 Inventory report's `manifest.json`. Manifests are read in batches,
    never whole. Relative manifest entries are relative to the manifest's folder; rows without an ETag or size are
    looked up, and entries that cannot be found come out with `size_bytes=UNKNOWN_SIZE` and an empty ETag so that
    reading them records why; entries the job cannot read (``gs://``, ``http://``) come out with the status
    ``unsupported_uri``. Zero-byte objects are kept by default: they become rows with a status downstream.

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
            while iterating, for a missing bucket, refused credentials or S3 failing past its retries, or a
            manifest that cannot be read (bad text encoding, malformed CSV, JSON or Parquet, a bad size_bytes),
            naming the manifest and, where it applies, the line.
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
    kinds = classify_inputs(inputs)
    client = s3_client
    if client is None and any(kind != "folder" for kind in kinds):  # manifests may name S3 objects
        client = make_s3_client(endpoint_url=endpoint_url)
    live_first = sorted(zip(inputs, kinds, strict=True), key=lambda pair: pair[1] in ("manifest", "s3_manifest"))
    return _list_all(
        live_first,
        allowed=allowed,
        min_size_bytes=min_size_bytes,
        max_size_bytes=max_size_bytes,
        page_size=page_size,
        client=client,
        follow_outside_symlinks=follow_outside_symlinks,
        include_hidden=include_hidden,
    )


_InputKind = Literal["s3_prefix", "s3_manifest", "folder", "manifest"]


def _is_manifest_name(name: str) -> bool:
    return name.lower().endswith(MANIFEST_SUFFIXES)


def classify_inputs(inputs: Sequence[str]) -> list[_InputKind]:
    """What each input is (an S3 prefix or manifest, a local folder or manifest), from its name and a local stat
    only: no listing, no request.

    Raises:
        StorageError: For an input that is neither an s3:// URI nor an existing folder or manifest.
    """
    return [_classify_input(location) for location in inputs]


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
    _same_place_as_written(location)
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


def _same_place_as_written(location: str) -> None:
    """Refuses a local input whose ``..`` follows a symbolic link: the system resolves ``link/..`` to the link
    target's parent, the listing (which spells paths without ``..``) to the folder holding the link, so the files
    listed and the files read would be of two places."""
    if ".." not in location.split(os.sep):
        return
    read, written = os.path.realpath(location), os.path.realpath(absolute_path(location))
    if read != written:
        raise StorageError(
            f"input {printable_path(location)}: '..' after a symbolic link leads to {printable_path(read)}, the path "
            f"as written to {printable_path(written)}: give the folder without '..'",
            reason="invalid_input",
            uri=location,
        )


def listed_scopes(inputs: Sequence[str], declared: Sequence[str] = ()) -> list[str]:
    """The URI prefixes the listing of `inputs` covers whole: every object under one, filters allowing, is listed.

    A folder's is its absolute path and a separator (the prefix of the paths it lists), an ``s3://`` prefix is
    itself. A run that prunes rows of videos no longer listed (``--prune-missing``) prunes only under these.
    `declared` scopes (``--prune-scope``: what a manifest covers) replace those of the inputs.

    Raises:
        ValueError: An input is a manifest and no scope is declared: a manifest names objects, not a place whose
            missing objects could be told.
    """
    if declared:
        scopes = [_scope_of(scope, "s3_prefix" if scope.startswith("s3://") else "folder") for scope in declared]
        kinds = [_classify_input(i) for i in inputs]
        # With a manifest among the inputs a raw prefix may be what it covers (an inventory filtered on one).
        manifests = {"manifest", "s3_manifest"} & set(kinds)
        listed = [] if manifests else [i for i, kind in zip(inputs, kinds, strict=True) if kind == "s3_prefix"]
        own = {_scope_of(i, "s3_prefix") for i in listed}
        for scope in (s for s in scopes if s not in own):  # an input's own scope covers what it lists
            # A raw key prefix that a listed prefix extends (s3://b/in or s3://b/i for the input s3://b/in/) covers
            # that prefix's siblings (s3://b/in2/) too, which the listing never looks at: their videos would be pruned.
            wider = [
                i
                for i in listed
                if not scope.endswith("/")
                and _scope_of(i, "s3_prefix").startswith(scope)
                and _scope_of(i, "s3_prefix") != scope
            ]
            if wider:
                raise ValueError(
                    f"--prune-scope {scope} is a raw key prefix: it covers every key starting so, not only the input "
                    f"{wider[0]} (videos under {scope}2/, say, would be marked deleted): give the input's folder, "
                    f"{_scope_of(wider[0], 's3_prefix')}"
                )
        return scopes
    scopes = []
    for location, kind in zip(inputs, (_classify_input(i) for i in inputs), strict=True):
        if kind in ("manifest", "s3_manifest"):
            raise ValueError(
                f"--prune-missing needs folder or s3:// prefix inputs, or --prune-scope: {location} is a manifest, "
                "which names objects rather than a place whose deleted objects could be told (give the place it "
                "covers whole, such as the bucket of an S3 Inventory report, with --prune-scope)"
            )
        scopes.append(_scope_of(location, kind))
    return scopes


def live_scopes(inputs: Sequence[str]) -> list[str]:
    """The scopes (`listed_scopes`) of the folder and ``s3://`` prefix inputs among `inputs`: listed as they are
    now, whole, unlike a manifest's."""
    return [
        _scope_of(location, kind)
        for location, kind in zip(inputs, classify_inputs(inputs), strict=True)
        if kind in ("folder", "s3_prefix")
    ]


def _scope_of(location: str, kind: _InputKind) -> str:
    if kind == "s3_prefix":  # the listed keys' URIs start with it (``s3://b`` is ``s3://b/``, never ``s3://b2/``)
        bucket, prefix = parse_s3_uri(location)
        return f"s3://{bucket}/{prefix}"
    return absolute_path(location).rstrip(os.sep) + os.sep


def _list_all(
    inputs: list[tuple[str, _InputKind]],
    *,
    allowed: frozenset[str] | None,
    min_size_bytes: int,
    max_size_bytes: int | None,
    page_size: int,
    client: S3Client,
    follow_outside_symlinks: bool,
    include_hidden: bool,
) -> Iterator[VideoObject]:
    def keep_name(name: str) -> bool:
        return allowed is None or _extension(name) in allowed

    def keep_size(size_bytes: int) -> bool:
        if size_bytes == UNKNOWN_SIZE:
            return True
        return size_bytes >= min_size_bytes and (max_size_bytes is None or size_bytes <= max_size_bytes)

    for location, kind in inputs:
        left_out = _SkippedNames(location)
        hidden = None if include_hidden else _SkippedHidden(location)
        linked = _SkippedLinkedFolders(location)
        if kind == "s3_prefix":
            found: Iterator[VideoObject] = _list_s3_prefix(
                client, location, page_size=page_size, keep_name=left_out.counting(keep_name), hidden=hidden
            )
        elif kind == "folder":
            found = _list_folder(
                location,
                keep_name=left_out.counting(keep_name),
                follow_outside_symlinks=follow_outside_symlinks,
                hidden=hidden,
                linked=linked,
            )
        else:
            found = _list_manifest(location, client=client, keep_name=keep_name)
        for video in found:
            if keep_size(video.size_bytes):
                yield video
        if kind in ("s3_prefix", "folder"):
            left_out.report()
            linked.report()
            if hidden is not None:
                hidden.report()


_T = TypeVar("_T")


class _LeftOut(Generic[_T]):
    """What a listing of `location` left out: how many, and the first of them, for one line once it has been read."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.count = 0
        self.first: _T | None = None

    def note(self, item: _T) -> None:
        self.count += 1
        self.first = self.first or item


class _SkippedNames(_LeftOut[str]):
    """Counts the files of a folder or prefix listing left out by the extension filter and says so, in one info
    line, once it has been listed: a video named ``v.mp4 `` (a trailing space) or ``v.mp4.part`` is not indexed
    without a trace. A folder holds other files as a rule, so it is not a warning."""

    def counting(self, keep_name: Callable[[str], bool]) -> Callable[[str], bool]:
        def keep(name: str) -> bool:
            if keep_name(name):
                return True
            self.note(name)
            return False

        return keep

    def report(self) -> None:
        if self.first is not None:
            first = printable_name(_shortened(redact_url(self.first)))
            log.info("%s: %s", redact_url(self.location), self.said(self.count, first))

    @staticmethod
    def said(count: int, first: str) -> str:
        files = "file" if count == 1 else "files"
        return f"{count} {files} left out: not named with a video extension (--extensions), such as {first}"


class _SkippedHidden(_SkippedNames):
    """Counts the hidden entries (a name starting with ``.``) a folder or prefix listing leaves out, and says so in
    one info line once it has been listed: a hidden folder is one entry, as it is not walked; under a prefix each
    key below a hidden name is one."""

    @staticmethod
    def said(count: int, first: str) -> str:
        entries = "entry" if count == 1 else "entries"
        return (
            f"{count} hidden {entries} left out (a name starting with '.'), such as {first}; --include-hidden lists "
            "them"
        )


class _SkippedLinkedFolders(_SkippedNames):
    """Counts the symbolic links to folders a folder listing does not follow (a loop, or a tree listed twice, is one
    link away), and says so in one info line once it has been listed."""

    @staticmethod
    def said(count: int, first: str) -> str:
        links = "symbolic link to a folder" if count == 1 else "symbolic links to folders"
        return f"{count} {links} not followed, such as {first}; give the folder itself as an input to list it"


def is_hidden_key(key: str, prefix: str) -> bool:
    """Whether an S3 key listed under the raw `prefix` has a hidden name below it: a ``/``-separated part that
    starts with ``.``, other than the part the prefix itself ends in (``in/.h`` names ``.h...`` explicitly)."""
    rest = key[len(prefix) :]
    parts = rest.split("/")
    if prefix and not prefix.endswith("/"):
        parts = parts[1:]  # the end of a name the prefix began
    return any(part.startswith(".") for part in parts)


def _list_s3_prefix(
    client: S3Client,
    location: str,
    *,
    page_size: int,
    keep_name: Callable[[str], bool],
    hidden: _SkippedHidden | None = None,
) -> Iterator[VideoObject]:
    bucket, prefix = parse_s3_uri(location)
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
    )
    try:
        for page in pages:  # one request per page, made only when the previous page has been consumed
            for entry in page.get("Contents", ()):
                key = entry["Key"]
                if key.endswith("/") and not entry.get("Size"):  # a folder marker (one with data is a file's name)
                    continue
                if hidden is not None and is_hidden_key(key, prefix):
                    hidden.note(f"s3://{bucket}/{key}")
                    continue
                if not keep_name(key):
                    continue
                yield VideoObject(f"s3://{bucket}/{key}", str(entry.get("ETag", "")).strip('"'), int(entry["Size"]))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise storage_error(error, uri=location, action="list") from error


def printable_path(path: str) -> str:
    """A path as one line of valid UTF-8 text that no other path prints as (`vitaclip.redact.printable_name`): bytes
    that are not UTF-8 (kept by Python as surrogates) become ``\\xNN``, control and invisible characters are escaped,
    a backslash is doubled."""
    return printable_name(path)


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def listed_uri(path: str) -> str:
    """The row URI of a listed local file: its path, or, for a path that is not valid UTF-8, a ``file://`` URI of its
    bytes with %-escapes (``%`` itself as ``%25``). No valid path is a ``file://`` URI (manifests' are decoded), so
    two files never share a URI: ``\\xff`` escapes would make ``bad<0xff>.mp4`` the name ``bad\\xff.mp4`` has."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + quote(os.fsencode(path), safe="/")


def scope_prefixes(scope: str) -> tuple[str, ...]:
    """The URI prefixes of the rows under a listed scope (`listed_scopes`): a folder's rows include the ``file://``
    URIs of its files whose names are not UTF-8 (`listed_uri`)."""
    if not scope.startswith("/"):
        return (scope,)
    return scope, "file://" + quote(os.fsencode(scope), safe="/")


def _odd(path: str, status: str, message: str) -> VideoObject:
    return VideoObject(listed_uri(path), "", UNKNOWN_SIZE, status=status, error_message=message)


def _walk_sorted(
    folder: str,
    *,
    keep_name: Callable[[str], bool],
    inside: str | None,
    hidden: _SkippedHidden | None = None,
    linked: _SkippedLinkedFolders | None = None,
) -> Iterator[VideoObject]:
    """Files under `folder`, ordered like the sorted relative paths; symlinked folders are not followed (counted in
    `linked`).

    Entries that cannot be videos come out with a listing `status` instead of stopping the listing: a name that is
    not valid UTF-8 (`invalid_name`), a dangling symlink or a symlink loop (`broken_link`), a symlink to a file
    outside `inside` (`outside_folder`; None: any target), a FIFO, socket or device (`not_a_file`, which a decoder
    would block on), a file that cannot be inspected (`read_error`), a subfolder that cannot be read
    (`UNLISTED_FOLDER`, the folder itself: its videos are unknown). A top folder that cannot be read fails the
    listing. With `hidden`, entries whose name starts with ``.`` are left out (and counted there).

    The walk keeps its own stack of open folders, one sorted list each: a tree as deep as paths allow (a folder
    per level, thousands of levels) is listed, not a RecursionError that would fail the run.
    """
    top = _sorted_entries(folder, top=True)
    assert not isinstance(top, VideoObject)  # a top folder that cannot be read raises
    stack = [iter(top)]
    while stack:
        pair = next(stack[-1], None)
        if pair is None:
            stack.pop()
            continue
        sort_name, entry = pair
        if hidden is not None and entry.name.startswith("."):
            hidden.note(entry.path)
            continue
        if sort_name.endswith("/"):
            below = _sorted_entries(entry.path, top=False)
            if isinstance(below, VideoObject):
                yield below
            else:
                stack.append(iter(below))
            continue
        if _is_linked_folder(entry):
            if linked is not None:
                linked.note(entry.path)
            continue
        if not keep_name(entry.path):
            continue
        found = _listed_file(entry, inside=inside)
        if found is not None:
            yield found


def _sorted_entries(folder: str, *, top: bool) -> list[tuple[str, os.DirEntry[str]]] | VideoObject:
    """A folder's entries as `_walk_sorted` orders them (a subfolder's sort name ends with ``/``); none when it was
    removed since its parent was read; an `UNLISTED_FOLDER` row for a subfolder that cannot be read.

    Raises:
        StorageError: The top folder cannot be read.
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
    except FileNotFoundError:  # removed since its parent was read
        return []
    except OSError as error:  # permission denied, a path past PATH_MAX, a folder swapped for a file, EIO, ESTALE
        why = "permission denied" if isinstance(error, PermissionError) else (error.strerror or type(error).__name__)
        if not top:
            log.warning(
                "cannot list folder %s (%s): its videos are left as they are by this run", printable_path(folder), why
            )
            return _odd(folder.rstrip(os.sep) + os.sep, UNLISTED_FOLDER, f"{why}: the folder cannot be listed")
        if isinstance(error, PermissionError):
            raise StorageError(
                f"access denied: cannot list folder {printable_path(folder)}", reason="access_denied", uri=folder
            ) from error
        raise StorageError(
            f"cannot list folder {printable_path(folder)}: {why}", reason="read_error", uri=folder
        ) from error
    return sorted(entries, key=lambda pair: pair[0])


def _is_linked_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_symlink() and entry.is_dir()  # is_dir follows the link
    except OSError:  # a loop, or gone: `_listed_file` says which
        return False


def _listed_file(entry: os.DirEntry[str], *, inside: str | None) -> VideoObject | None:
    """A folder entry that is not a folder, as `_walk_sorted` lists it: a video, a row with a listing status, or
    None (removed since the folder was read, or a symlinked folder)."""
    try:
        st = entry.stat()  # follows symlinks
    except FileNotFoundError:
        if entry.is_symlink():
            return _odd(entry.path, "broken_link", "symbolic link to a missing file")
        return None  # removed since the folder was read
    except OSError as error:
        if error.errno == errno.ELOOP:
            return _odd(entry.path, "broken_link", "symbolic link loop")
        if isinstance(error, PermissionError):  # a folder readable but not searchable (no x bit)
            return _odd(entry.path, "access_denied", f"cannot inspect the file: {error.strerror or error}")
        return _odd(entry.path, "read_error", f"cannot inspect the file: {error.strerror or error}")
    if stat.S_ISDIR(st.st_mode):
        return None  # a symlinked folder: not followed
    if inside is not None and entry.is_symlink() and not _is_within(os.path.realpath(entry.path), inside):
        return _odd(
            entry.path,
            "outside_folder",
            "symbolic link to a file outside the listed folder: not read (--follow-outside-symlinks reads it)",
        )
    if not stat.S_ISREG(st.st_mode):
        return _odd(entry.path, "not_a_file", "not a regular file (a FIFO, socket or device)")
    if is_kernel_file(entry.path, st):  # its size says 0 (or a page) whatever it reads: never the same
        return _odd(entry.path, "not_a_file", "a file of the kernel's /proc or /sys, not a stored file")
    if not _is_utf8(entry.path):
        return _odd(entry.path, "invalid_name", f"the file name is not valid UTF-8: {printable_path(entry.path)}")
    return VideoObject(entry.path, local_etag(st), st.st_size)


def is_kernel_file(path: str, st: os.stat_result) -> bool:
    """Whether ``path`` (``st``: its stat) is a file of the kernel's /proc or /sys: they report size 0 (or a page)
    and read what the kernel makes of the reading process (its environment, say)."""
    if st.st_dev in _kernel_devices():
        return True
    if st.st_size != 0:
        return False
    real = os.path.realpath(path)  # a size of 0 also on file systems mounted below them (cgroups)
    return any(_is_within(real, root) for root in ("/proc", "/sys"))


@functools.cache
def _kernel_devices() -> frozenset[int]:
    """The devices of /proc and /sys where they are mounted (not folders of the root file system)."""
    found = set()
    for root in ("/proc", "/sys"):
        with contextlib.suppress(OSError):
            if os.path.ismount(root) and os.stat(root).st_dev != os.stat("/").st_dev:
                found.add(os.stat(root).st_dev)
    return frozenset(found)


def _list_folder(
    location: str,
    *,
    keep_name: Callable[[str], bool],
    follow_outside_symlinks: bool,
    hidden: _SkippedHidden | None = None,
    linked: _SkippedLinkedFolders | None = None,
) -> Iterator[VideoObject]:
    inside = None if follow_outside_symlinks else os.path.realpath(location)
    yield from _walk_sorted(absolute_path(location), keep_name=keep_name, inside=inside, hidden=hidden, linked=linked)


def _is_within(path: str, folder: str) -> bool:
    """Whether the resolved `path` is `folder` or under it (``/data/in2/x`` is not under ``/data/in``)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _ManifestRow(NamedTuple):
    """One entry of a manifest as written: a URI or path, and the ETag and size when the manifest gives them."""

    uri: str
    etag: str | None
    size_bytes: int | None
    line: int
    """Where it is in its manifest, for messages: the line of a .txt or CSV file, the row of a data file."""


def _list_manifest(location: str, *, client: S3Client, keep_name: Callable[[str], bool]) -> Iterator[VideoObject]:
    on_s3 = location.startswith("s3://")
    base = location.rsplit("/", 1)[0] if on_s3 else os.path.dirname(absolute_path(location))
    skipped = _SkippedEntries(location)
    for row in _manifest_rows(location, client=client):
        video = _resolve_entry(row, base=base, on_s3=on_s3, where=location)
        # A URI the job cannot read is filtered by its path, without a query (a presigned https:// URL of an .mp4
        # is a row saying why it is not read, not a line dropped without a trace).
        if not keep_name(video.uri) and not (video.status and keep_name(re.split(r"[?#]", video.uri, maxsplit=1)[0])):
            skipped.note(row)
            continue
        if video.status:
            yield video
            continue
        etag, size_bytes = _given_etag_and_size(row, video.uri)
        if etag is not None and size_bytes is not None:
            yield VideoObject(video.uri, etag, size_bytes)
            continue
        looked_up = _look_up(video.uri, client=client)
        yield VideoObject(
            video.uri,
            looked_up.etag if etag is None else etag,
            looked_up.size_bytes if size_bytes is None else size_bytes,
        )
    skipped.report()


def _given_etag_and_size(row: _ManifestRow, uri: str) -> tuple[str | None, int | None]:
    """The ETag and size a manifest entry gives that the job takes as listed (None: looked up).

    An object's are taken as given (an inventory's, S3 checks the ETag on every read). A local file's ETag is its
    size and modification time (`index.schema.local_etag`), checked on read: any other ETag could never be checked,
    so a file replaced since would keep its old row for ever; such an entry, or one whose size is not its ETag's, is
    looked up (a ``stat``) instead."""
    if uri.startswith("s3://"):
        return row.etag, row.size_bytes
    if row.etag is None or not row.etag.startswith(LOCAL_ETAG_PREFIX):
        return None, None
    size = row.etag[len(LOCAL_ETAG_PREFIX) :].partition("-")[0]
    if not (size.isascii() and size.isdigit()) or (row.size_bytes is not None and int(size) != row.size_bytes):
        return None, None
    return row.etag, int(size)


class _SkippedEntries(_LeftOut["_ManifestRow"]):
    """Counts a manifest's entries left out by the extension filter and says so once it has been read: an entry
    that a person wrote (``in/v.mp4 `` with a trailing space) never disappears without a trace. Inventories list
    every object of a bucket, so theirs is an info line."""

    def report(self) -> None:
        if self.first is None:
            return
        written = not self.location.lower().endswith((".json", ".parquet"))
        log.log(
            logging.WARNING if written else logging.INFO,
            "%s: %d %s left out: not named with a video extension (--extensions), such as %r (%s %d)",
            redact_url(self.location), self.count, "entry" if self.count == 1 else "entries",
            _shortened(redact_url(self.first.uri)), "line" if written else "row", self.first.line,
        )  # fmt: skip


def _shortened(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_ANY_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,254}")  # the rules of today's and of legacy S3 buckets


def _resolve_entry(row: _ManifestRow, *, base: str, on_s3: bool, where: str) -> VideoObject:
    """The listed location of a manifest entry (ETag and size as given, or empty and UNKNOWN_SIZE), or a row with the
    status ``unsupported_uri`` for a URI the job cannot read."""
    uri = row.uri
    scheme = _SCHEME.match(uri)
    local = (scheme is None and uri.startswith("/")) or (scheme is not None and scheme.group(1).lower() == "file")
    if on_s3 and local:  # whoever may write to the bucket must not make the workers read their own files
        problem = "a manifest on S3 names objects (s3:// URIs or keys beside it), not files of the machines"
        return _unsupported(row, problem, where=where)
    if scheme is None and _SCHEME.match(uri.lstrip()):  # " https://user:pw@host/...": not a relative path
        problem = "a URI with blanks before it (manifest cells and lines are taken as written)"
        return _unsupported(row, problem, where=where)
    if scheme is None:
        if on_s3:
            while uri.startswith("./"):
                uri = uri[2:]
            uri = f"{base}/{uri}"  # a key next to the manifest's, as written (but a leading "./")
        elif "\x00" in uri:  # no file name holds one (a Parquet or CSV cell may): a row named by a file:// URI
            named = "file://" + quote(os.fsencode(_normalize_path(os.path.join(base, uri))), safe="/")
            return _unsupported(row._replace(uri=named), "a path with a NUL character", where=where)
        else:
            uri = _normalize_path(os.path.join(base, uri))  # an absolute path stays itself
    elif scheme.group(1).lower() == "s3":
        uri = "s3://" + uri[scheme.end() :]
        bucket, _, key = uri[5:].partition("/")
        if "@" in bucket or has_object_userinfo(uri):  # no bucket name holds "@" (or ":"): userinfo, kept out
            problem = "s3:// URI with credentials in it: the job takes credentials from the AWS chain only"
            return _unsupported(row, problem, where=where)
        if not _ANY_BUCKET_NAME.fullmatch(bucket) or not key:  # no read could ever succeed: not retried by every run
            return _unsupported(row, "s3:// URI without a valid bucket name and key (s3://bucket/key)", where=where)
    elif scheme.group(1).lower() == "file":
        path, problem = _file_uri_path(uri[scheme.end() :])
        if problem:
            return _unsupported(row, problem, where=where)
        uri = _normalize_path(path)
    else:
        problem = f"the job reads s3:// objects, local paths and file:// URIs, not {scheme.group(1)}://"
        return _unsupported(row, problem, where=where)
    return VideoObject(uri, row.etag or "", UNKNOWN_SIZE if row.size_bytes is None else row.size_bytes)


def absolute_path(path: str) -> str:
    """`path` made absolute as the folder listing spells its files: ``//data/in`` is ``/data/in`` (POSIX keeps two
    leading slashes in `os.path.abspath`), so one folder given two ways is one scope and one set of rows."""
    return _normalize_path(os.path.abspath(path))


def _normalize_path(path: str) -> str:
    """`path` as the folder listing spells it: no ``.``, ``..``, doubled or trailing separators (``//a`` too)."""
    normalized = os.path.normpath(path)
    return "/" + normalized.lstrip("/") if normalized.startswith("//") else normalized


def _file_uri_path(rest: str) -> tuple[str, str]:
    """The local path of a ``file://`` URI from what follows ``file://``, or an empty path and the problem."""
    host, _, path = rest.partition("/")
    if host.lower() not in ("", "localhost"):
        return "", f"file:// URI with the host {host!r}: only file:///path and file://localhost/path are local"
    if "?" in path or "#" in path:
        return "", "file:// URI with a query or fragment: write '?' as %3F and '#' as %23 in a file name"
    try:
        decoded = unquote("/" + path, errors="strict")
    except UnicodeDecodeError:
        return "", "file:// URI whose %-escapes are not UTF-8"
    if "\x00" in decoded:
        return "", "file:// URI with a NUL character"
    return decoded, ""


def _unsupported(row: _ManifestRow, problem: str, *, where: str) -> VideoObject:
    message = f"{problem} (line {row.line} of {redact_text(where)})"
    return VideoObject(redact_url(row.uri), "", UNKNOWN_SIZE, status="unsupported_uri", error_message=message)


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


def current_etags(
    uris: Sequence[str], *, endpoint_url: str | None = None, s3_client: S3Client | None = None
) -> list[str | None]:
    """The ETags the listed objects at `uris` have now, as a listing would give them (None: missing, refused or not
    answering), one lookup each: for the few videos of a run that another run committed meanwhile with another ETag."""
    client = s3_client
    found: list[str | None] = []
    for uri in uris:
        if client is None and uri.startswith("s3://"):
            client = make_s3_client(endpoint_url=endpoint_url)
        try:
            etag = _look_up(uri, client=client).etag  # type: ignore[arg-type]  # local paths need no client
        except StorageError:
            etag = ""
        found.append(etag or None)
    return found


def _manifest_rows(location: str, *, client: S3Client) -> Iterator[_ManifestRow]:
    name = location.lower()
    if name.endswith(".json"):
        yield from _inventory_rows(location, client=client)
    elif name.endswith(".parquet"):
        yield from _parquet_rows(_parquet_source(location, client=client), where=location)
    elif name.endswith(".txt"):
        yield from _txt_rows(_text_lines(_byte_chunks(location, client=client), where=location))
    else:  # .csv, .csv.gz
        yield from _csv_rows(_text_lines(_byte_chunks(location, client=client), where=location), where=location)


def manifests_made_at(
    inputs: Sequence[str], *, endpoint_url: str | None = None, s3_client: S3Client | None = None
) -> float | None:
    """When the oldest manifest among `inputs` was made, in seconds since the epoch (None: no manifest among them):
    an S3 Inventory report's ``creationTimestamp``, else the manifest file's modification time. A manifest cannot
    name an object made after it, so `--prune-missing` prunes no video indexed later than this."""
    found: list[float] = []
    client = s3_client
    for location, kind in zip(inputs, classify_inputs(inputs), strict=True):
        if kind not in ("manifest", "s3_manifest"):
            continue
        if client is None and kind == "s3_manifest":
            client = make_s3_client(endpoint_url=endpoint_url)
        made = _manifest_made_at(location, client=client)  # type: ignore[arg-type]  # local: no client
        if made is not None:
            found.append(made)
    return min(found, default=None)


_FIRST_PLAUSIBLE_TIME = 1_141_171_200.0  # 2006-03-01, before S3 and every manifest the job could be given


def _plausible(made: float) -> bool:
    return _FIRST_PLAUSIBLE_TIME <= made <= time.time() + 86_400


def _manifest_made_at(location: str, *, client: S3Client) -> float | None:
    if location.lower().endswith(".json"):
        stamp = _inventory_manifest(location, client=client).get("creationTimestamp")
        try:
            made = int(str(stamp)) / 1000  # milliseconds since the epoch, as a string
        except ValueError:
            made = -1.0
        if _plausible(made):
            return made
    if location.startswith("s3://"):
        made = float(_head(location, client=client, action="read").get("LastModified").timestamp())
    else:
        made = os.stat(location).st_mtime
    if _plausible(made):
        return made
    log.warning(
        "%s: its time (%s) cannot be when it was made (before 2006, or in the future): --prune-missing spares no "
        "video for being newer than it",
        redact_url(location), _utc(made),
    )  # fmt: skip
    return None


def _utc(seconds: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.0f} s after the epoch"


# ----------------------------------------------------------------------------------------------- manifest bytes

_CHUNK_BYTES = 1 << 20


@contextlib.contextmanager
def _open_binary(location: str, *, client: S3Client) -> Iterator[Any]:
    """A local file or an S3 object's body as a binary stream; a ``.gz`` one decompressed as it is read."""
    if location.startswith("s3://"):
        bucket, key = parse_s3_uri(location)
        raw: Any = client.get_object(Bucket=bucket, Key=key)["Body"]
    else:
        raw = open(location, "rb")  # closed below
    try:
        yield gzip.GzipFile(fileobj=raw, mode="rb") if location.lower().endswith(".gz") else raw
    finally:
        raw.close()


@contextlib.contextmanager
def _manifest_errors(location: str) -> Iterator[None]:
    """Turns failures to read `location` (S3, the file system, gzip) into `StorageError` naming it."""
    try:
        yield
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise storage_error(error, uri=location, action="read manifest") from error
    except (OSError, EOFError, zlib.error) as error:
        reason: StorageErrorReason = "access_denied" if isinstance(error, PermissionError) else "invalid_input"
        raise StorageError(f"cannot read the manifest {location}: {error}", reason=reason, uri=location) from error


def _byte_chunks(location: str, *, client: S3Client) -> Iterator[bytes]:
    """The bytes of a manifest file, local or on S3, in chunks of about 1 MiB (decompressed when ``.gz``)."""
    with _manifest_errors(location), _open_binary(location, client=client) as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            yield chunk


_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_LINE_END = re.compile(r"\r\n|\r|\n")


def _text_lines(chunks: Iterator[bytes], *, where: str) -> Iterator[tuple[int, str]]:
    """(line number, line with its ending) of a text manifest, streamed: UTF-8 with or without a byte order mark, or
    UTF-16 with one (what Excel and PowerShell write). Lines end at ``\\n``, ``\\r\\n`` or ``\\r``.

    Raises:
        StorageError: A byte sequence that is not valid in the encoding, or a NUL character (UTF-16 without a byte
            order mark, or a binary file), naming the manifest and the line.
    """
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= 3:
            break
    encoding = "utf-8"
    for bom, name in _BOMS:
        if head.startswith(bom):
            encoding, head = name, head[len(bom) :]
            break
    decoder = codecs.getincrementaldecoder(encoding)()
    number, pending = 1, ""
    pieces: Iterator[bytes | None] = itertools.chain([head], chunks, [None])
    for piece in pieces:
        final = piece is None
        try:
            pending += decoder.decode(piece or b"", final=final)
        except UnicodeDecodeError as error:
            raise _decode_error(error, pending, number, encoding=encoding, where=where) from None
        if len(pending) > MAX_MANIFEST_LINE_CHARS and not _LINE_END.search(pending, 0, MAX_MANIFEST_LINE_CHARS + 1):
            raise StorageError(  # no path or URI is this long; read on, the line would take the memory it has
                f"{where} line {number} is longer than {MAX_MANIFEST_LINE_CHARS} characters: not a list of paths or "
                "URIs (one per line)",
                reason="invalid_input",
                uri=where,
            )
        start = 0
        for end in _LINE_END.finditer(pending):
            if end.group() == "\r" and end.end() == len(pending) and not final:
                break  # maybe the first half of "\r\n"
            yield _checked_line(pending[start : end.end()], number, where=where)
            number, start = number + 1, end.end()
        pending = pending[start:]
    if pending:
        yield _checked_line(pending, number, where=where)


MAX_MANIFEST_LINE_CHARS = 1 << 16
"""Longest line of a text manifest: a Linux path is at most 4,096 bytes, an S3 key 1,024, a presigned URL a few KB."""


def _checked_line(line: str, number: int, *, where: str) -> tuple[int, str]:
    if "\x00" in line:
        raise StorageError(
            f"{where} line {number}: a NUL character (a UTF-16 file without a byte order mark, or not text at all?): "
            "save the manifest as UTF-8, or as UTF-16 with a byte order mark",
            reason="invalid_input",
            uri=where,
        )
    return number, line


def _decode_error(error: UnicodeDecodeError, pending: str, number: int, *, encoding: str, where: str) -> StorageError:
    """The error for bytes that are not `encoding`, on the line where they are (`pending`: decoded text not yet split
    into lines, starting on line `number`)."""
    before = bytes(error.object[: error.start]).decode(encoding, errors="replace")
    line = number + len(_LINE_END.findall(pending + before))
    label = "UTF-8" if encoding == "utf-8" else "UTF-16"
    bad = bytes(error.object[error.start : error.end])
    return StorageError(
        f"{where} line {line}: not valid {label} text ({error.reason}, bytes {bad!r}): "
        "save the manifest as UTF-8, or as UTF-16 with a byte order mark",
        reason="invalid_input",
        uri=where,
    )


# ----------------------------------------------------------------------------------------------- .txt and CSV

# "#" followed by a space, a tab or the line's end (in CSV: also a comma) starts a comment; "#1.mp4" is a name.
_TXT_COMMENT = re.compile(r"#(?:[ \t\r\n]|$)")
_CSV_COMMENT = re.compile(r"#(?:[ \t\r\n,]|$)")


def _txt_rows(lines: Iterable[tuple[int, str]]) -> Iterator[_ManifestRow]:
    """One entry per line, verbatim without its line ending; blank lines and comments are left out."""
    for number, line in lines:
        entry = line.rstrip("\r\n")
        if entry.strip() and not _TXT_COMMENT.match(entry):
            yield _ManifestRow(entry, None, None, number)


def _csv_records(lines: Iterable[tuple[int, str]], *, where: str) -> Iterator[tuple[int, list[str]]]:
    """CSV records with the line each starts on. A line that starts a record with an unquoted "#" and then a space,
    tab, comma or the line's end is a comment, left out before parsing (a quoted cell is never one)."""
    state = {"first_line": 0, "at_start": True}

    def feed() -> Iterator[str]:
        for number, line in lines:
            if state["at_start"]:
                if _CSV_COMMENT.match(line):
                    continue
                state["first_line"], state["at_start"] = number, False
            yield line

    reader = csv.reader(feed())
    try:
        for cells in reader:
            state["at_start"] = True
            yield state["first_line"], cells
    except csv.Error as error:
        raise StorageError(
            f"{where} line {state['first_line']}: not valid CSV: {error}", reason="invalid_input", uri=where
        ) from error


def _csv_rows(lines: Iterable[tuple[int, str]], *, where: str) -> Iterator[_ManifestRow]:
    """Rows of a CSV manifest: with a header naming a ``uri`` column (``etag``, ``size_bytes`` optional; header
    names are case-insensitive and stripped), or without one, the first cell of each row. Cells are not stripped."""
    header: list[str] | None = None
    for number, cells in _csv_records(lines, where=where):
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            names = [cell.strip().lower() for cell in cells]
            header = names if "uri" in names else []
            if header:
                continue
            _refuse_inventory_data(cells, number, where=where)
        if not header:
            if cells[0].strip():
                yield _ManifestRow(cells[0], None, None, number)
            continue
        values = dict(zip(header, cells, strict=False))  # short rows leave columns out
        uri = values.get("uri", "")
        if not uri.strip():
            raise StorageError(f"{where} line {number}: a row has no uri: {cells!r}", reason="invalid_input", uri=where)
        size_bytes = _parse_size(values.get("size_bytes"), where=where, line=number)
        yield _ManifestRow(uri, _clean_etag(values.get("etag")), size_bytes, number)


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9\-]{1,61}[a-z0-9]")


def _refuse_inventory_data(cells: list[str], number: int, *, where: str) -> None:
    """Refuses a header-less CSV whose first row looks like S3 Inventory data (a bucket name, then a key with a "/" or
    a "."): without its manifest.json, which column is which is unknown, and the first cells (bucket names) name no
    video. A header such as ``path,label`` does not look like one."""
    if len(cells) >= 2 and _BUCKET_NAME.fullmatch(cells[0]) and ("/" in cells[1] or "." in cells[1]):
        raise StorageError(
            f"{where} looks like an S3 Inventory CSV data file (line {number} starts with the bucket {cells[0]!r}): "
            "give the inventory's manifest.json, which names its columns, or a CSV with a 'uri' header",
            reason="invalid_input",
            uri=where,
        )


def _clean_etag(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().strip('"')
    return text or None


def _parse_size(value: Any, *, where: str, line: int) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise StorageError(
            f"{where} line {line}: size_bytes {value!r} is not an integer", reason="invalid_input", uri=where
        ) from None
    if not 0 <= size < 2**63:  # sizes are int64 in every table
        raise StorageError(
            f"{where} line {line}: size_bytes {size} is {'negative' if size < 0 else 'too large (2**63 or more)'}",
            reason="invalid_input",
            uri=where,
        )
    return size


# ----------------------------------------------------------------------------------------------- Parquet


def _parquet_source(location: str, *, client: S3Client) -> Any:
    """What pyarrow opens for a Parquet file: a local path, or a ranged reader of an S3 object."""
    if not location.startswith("s3://"):
        return location
    from jobs.storage.reading import S3RangeReader  # reading imports this module

    head = _head(location, client=client, action="read manifest")
    return S3RangeReader(location, s3_client=client, size_bytes=int(head["ContentLength"]))


def _parquet_rows(source: Any, *, where: str) -> Iterator[_ManifestRow]:
    """Rows of a Parquet manifest (``uri``, optional ``etag`` and ``size_bytes``) or of an S3 Inventory Parquet data
    file (``bucket``, ``key``, optional ``size``, ``e_tag``, ``is_latest``, ``is_delete_marker``), in batches."""
    try:
        table = pq.ParquetFile(source)
    except (OSError, ValueError) as error:
        if isinstance(error, StorageError):
            raise
        raise StorageError(
            f"{where} is not a readable Parquet file: {error}", reason="invalid_input", uri=where
        ) from error
    names = set(table.schema_arrow.names)
    if "uri" not in names and {"bucket", "key"} <= names:
        columns = [name for name in _INVENTORY_COLUMNS if name in names]
        row = 1
        for batch in table.iter_batches(columns=columns, batch_size=4096):
            batch = plain_types(batch)  # string_view columns (polars writes them) as plain strings
            yield from _inventory_batch_rows(batch, url_encoded=False, where=where, first_row=row)
            row += batch.num_rows
        return
    if "uri" not in names:
        raise StorageError(
            f"{where} has no 'uri' column, nor S3 Inventory 'bucket' and 'key' columns (columns: "
            f"{', '.join(sorted(names))})",
            reason="invalid_input",
            uri=where,
        )
    columns = [name for name in ("uri", "etag", "size_bytes") if name in names]
    _check_manifest_types(table.schema_arrow, columns, where=where)
    row = 0
    for batch in table.iter_batches(columns=columns, batch_size=4096):
        try:
            data = plain_types(batch).to_pydict()
        except (UnicodeDecodeError, pa.ArrowException) as error:  # text that another tool wrote as bytes
            raise StorageError(
                f"{where} rows {row + 1}-{row + batch.num_rows}: cannot be read as text: {error}",
                reason="invalid_input",
                uri=where,
            ) from None
        empty: list[Any] = [None] * batch.num_rows
        for uri, etag, size in zip(data["uri"], data.get("etag", empty), data.get("size_bytes", empty), strict=True):
            row += 1
            if not uri:
                raise StorageError(f"{where} row {row}: a row has no uri", reason="invalid_input", uri=where)
            yield _ManifestRow(str(uri), _clean_etag(etag), _parse_size(size, where=where, line=row), row)


def _check_manifest_types(schema: pa.Schema, columns: Sequence[str], *, where: str) -> None:
    """Refuses a Parquet manifest whose columns are not text (``uri``, ``etag``) or whole numbers (``size_bytes``):
    a binary ``uri`` became the path ``b'/x.mp4'``, an integer one a path named by the number, a ``size_bytes`` of
    1.5 the size 1."""
    expected = {"uri": "text", "etag": "text", "size_bytes": "whole numbers"}
    for name in columns:
        kind = schema.field(name).type
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
        ok = text if expected[name] == "text" else pa.types.is_integer(kind)
        if not (ok or pa.types.is_null(kind)):
            raise StorageError(
                f"{where}: column {name!r} holds {kind}, not {expected[name]}", reason="invalid_input", uri=where
            )


# ----------------------------------------------------------------------------------------------- S3 Inventory

_INVENTORY_COLUMNS = ("bucket", "key", "size", "e_tag", "is_latest", "is_delete_marker")
# CSV inventories name their columns in manifest.json's fileSchema ("Bucket, Key, Size, ETag, ..."): the Parquet
# names of the columns read here.
_CSV_INVENTORY_NAMES = {
    "bucket": "bucket",
    "key": "key",
    "size": "size",
    "etag": "e_tag",
    "islatest": "is_latest",
    "isdeletemarker": "is_delete_marker",
}


def _inventory_batch_rows(
    batch: pa.RecordBatch, *, url_encoded: bool, where: str, first_row: int
) -> Iterator[_ManifestRow]:
    """``s3://bucket/key`` rows of a batch of inventory data; non-current versions, delete markers and folder
    markers are left out. CSV inventories URL-encode their keys (a space as ``+``)."""
    data = batch.to_pydict()
    empty: list[Any] = [None] * batch.num_rows
    columns = [data["bucket"], data["key"], *(data.get(name, empty) for name in _INVENTORY_COLUMNS[2:])]
    for row, (bucket, key, size, etag, latest, deleted) in enumerate(zip(*columns, strict=True), start=first_row):
        if _is(latest, False) or _is(deleted, True):
            continue
        if not bucket or not key:
            raise StorageError(f"{where} row {row}: no bucket or key", reason="invalid_input", uri=where)
        if url_encoded:
            key = unquote_plus(key)
        if key.endswith("/") and _is_folder_marker(size):  # a folder marker (one with data is a file's name)
            continue
        size_bytes = _parse_size(size, where=where, line=row)
        yield _ManifestRow(f"s3://{bucket}/{key}", _clean_etag(etag), size_bytes, row)


def _is_folder_marker(size: Any) -> bool:
    """Whether an inventory row whose key ends in ``/`` is a folder marker: no data (or a size that says nothing,
    which a marker's row was never refused for)."""
    try:
        return not int(size or 0)
    except (TypeError, ValueError):
        return True


def _is(value: Any, flag: bool) -> bool:
    """Whether an inventory flag (a bool in Parquet, "true"/"false" in CSV) is set to `flag`."""
    if isinstance(value, str):
        return value.strip().lower() == str(flag).lower()
    return value is flag


def _inventory_rows(location: str, *, client: S3Client) -> Iterator[_ManifestRow]:
    """The objects of an S3 Inventory report given by its manifest.json, data file after data file, each streamed."""
    manifest = _inventory_manifest(location, client=client)
    file_format = str(manifest["fileFormat"]).upper()
    if file_format == "ORC":
        raise StorageError(
            f"{location}: ORC inventories are not read: configure the inventory's output format as CSV or Parquet",
            reason="invalid_input",
            uri=location,
        )
    columns = _inventory_csv_columns(manifest, where=location) if file_format == "CSV" else []
    destination = _destination_bucket(manifest.get("destinationBucket"))
    for entry in manifest["files"]:
        data_location = _inventory_data_location(location, str(entry["key"]), destination=destination)
        if file_format == "CSV":
            yield from _inventory_csv_rows(data_location, columns, client=client)
        else:
            yield from _parquet_rows(_parquet_source(data_location, client=client), where=data_location)


def _inventory_manifest(location: str, *, client: S3Client) -> dict[str, Any]:
    """The parsed manifest.json of an inventory report (a few kB: read whole), checked."""
    try:
        manifest = json.loads(b"".join(_byte_chunks(location, client=client)).decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError, or a number past Python's 4,300 digits
        raise StorageError(f"{location} is not valid JSON: {error}", reason="invalid_input", uri=location) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, list)
        or not all(isinstance(entry, dict) and isinstance(entry.get("key"), str) for entry in files)
        or str(manifest.get("fileFormat", "")).upper() not in ("CSV", "PARQUET", "ORC")
    ):
        raise StorageError(
            f"{location} is not an S3 Inventory manifest.json (a 'fileFormat' of CSV, Parquet or ORC and a list of "
            "'files' with their 'key')",
            reason="invalid_input",
            uri=location,
        )
    return manifest


def _inventory_csv_columns(manifest: dict[str, Any], *, where: str) -> list[str]:
    """The column names of a CSV inventory's data files, from fileSchema ("Bucket, Key, Size, ..."), the columns read
    here under their Parquet names."""
    names = [name.strip() for name in str(manifest.get("fileSchema", "")).split(",")]
    columns = [_CSV_INVENTORY_NAMES.get(name.lower(), name) for name in names]
    if "bucket" not in columns or "key" not in columns:
        raise StorageError(
            f"{where}: the fileSchema {manifest.get('fileSchema')!r} has no Bucket and Key columns",
            reason="invalid_input",
            uri=where,
        )
    return columns


def _destination_bucket(value: Any) -> str | None:
    """The bucket of a destinationBucket ARN (``arn:aws:s3:::name``), or None."""
    if not isinstance(value, str) or not value:
        return None
    bucket = value.split(":", 5)[5] if value.startswith("arn:") and value.count(":") >= 5 else value
    return bucket if bucket and "/" not in bucket else None


def _inventory_data_location(manifest: str, key: str, *, destination: str | None) -> str:
    """Where a data file of an inventory is: in the destination bucket for a manifest.json on S3 (its own bucket when
    it names none); for a local one, a local copy (the key, or its end, under the manifest's folder or one of its
    parents: a copy of the destination bucket, of the report's folder, or all in one folder), else the destination
    bucket."""
    if manifest.startswith("s3://"):
        return f"s3://{destination or parse_s3_uri(manifest)[0]}/{key}"
    parts = [part for part in key.split("/") if part not in ("", ".", "..")]
    folders = [os.path.dirname(absolute_path(manifest))]
    while os.path.dirname(folders[-1]) != folders[-1]:
        folders.append(os.path.dirname(folders[-1]))
    for start in range(len(parts)):
        for folder in folders:
            candidate = os.path.join(folder, *parts[start:])
            if os.path.isfile(candidate):
                return candidate
    if destination is None:
        raise StorageError(
            f"{manifest}: the data file {key!r} was not found under the manifest's folder or its parents, and the "
            "manifest names no destinationBucket to read it from",
            reason="invalid_input",
            uri=manifest,
        )
    return f"s3://{destination}/{key}"


def _inventory_csv_rows(location: str, columns: list[str], *, client: S3Client) -> Iterator[_ManifestRow]:
    """Rows of a CSV inventory data file (usually ``.csv.gz``, no header), read in batches of about 1 MiB."""
    wanted = [name for name in _INVENTORY_COLUMNS if name in columns]
    read_options = pacsv.ReadOptions(column_names=columns, block_size=_CHUNK_BYTES, use_threads=False)
    convert_options = pacsv.ConvertOptions(include_columns=wanted, column_types=dict.fromkeys(wanted, pa.string()))
    with _manifest_errors(location), _open_binary(location, client=client) as stream:
        try:
            reader = pacsv.open_csv(stream, read_options=read_options, convert_options=convert_options)
            row = 1
            for batch in reader:
                yield from _inventory_batch_rows(batch, url_encoded=True, where=location, first_row=row)
                row += batch.num_rows
        except pa.ArrowInvalid as error:
            if "Empty CSV file" in str(error):
                return
            raise StorageError(
                f"{location} is not a readable inventory CSV file: {error}", reason="invalid_input", uri=location
            ) from error

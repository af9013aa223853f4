"""Delta Lake output tables: where they live, their schema, data files, conditional commits and reading the log.

The job's output tables ``OUT/videos`` and ``OUT/segments`` are Delta Lake tables written with delta-rs. Ray workers
write Parquet data files where the rows are made (`write_data_file`); the driver commits only metadata (`commit`:
add and remove actions in one atomic commit at exactly ``read_version + 1``), so two runs on one output cannot
corrupt it: the loser of a race gets `CommitConflict`, re-plans and retries. The schema version and the embedding
size are table properties; readers refuse what they do not know (`check_table`).

Everything here is a plain function of an `OutputLocation` (a picklable value without secrets, so it can travel to
Ray workers); nothing imports Ray.
"""

from __future__ import annotations

import contextlib
import datetime as dt_
import json
import logging
import math
import os
import random
import re
import time
import urllib.parse
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake import Field as DeltaField
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction

from index.s3 import StorageError
from index.schema import plain_schema, plain_types, schema_for
from vitaclip.redact import endpoint_without_userinfo, redact_text, redact_url, refuse_object_userinfo, terminal_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
"""Version of the table schemas below; stored as the table property ``vitaclip.schema_version``."""

_ADDED_COLUMNS: dict[int, dict[str, tuple[pa.Field, ...]]] = {
    3: {"videos": (pa.field("attempts", pa.int32()),)},
}
"""Nullable columns each schema version added to the one before: data files written before them read as nulls.

Version 2 tables are read as they are and upgraded by the first writer (`create_tables`): adding a nullable column
and raising the version property are metadata-only commits, no data file is rewritten."""

READ_VERSIONS = (2, 3)
"""Schema versions this vitaclip reads; it writes only `SCHEMA_VERSION`."""

TABLES: tuple[str, ...] = ("videos", "segments")

TABLE_KEY = "vitaclip.table"
SCHEMA_VERSION_KEY = "vitaclip.schema_version"
EMBED_DIM_KEY = "vitaclip.embed_dim"

MAX_STRING_STAT_CHARS = 256
"""Longer string minimums and maximums are left out of file statistics (a truncated maximum would be wrong)."""

_DEFAULT_DELETED_FILE_RETENTION_HOURS = 7 * 24  # delta.deletedFileRetentionDuration when a table does not set it
_S3_MAX_ATTEMPTS = 10
_UPGRADE_ATTEMPTS = 10  # tries of each schema upgrade step by writers upgrading one table at once
MAX_RETENTION_HOURS = 1_000_000  # about 114 years; delta-rs's own limit is near 2.5e12 hours (it panics past it)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*\.parquet$")
Scheme = Literal["file", "s3", "gs", "az", "abfss"]

# Columns whose values rarely repeat within a data file: dictionary-encoding them fills a dictionary page that
# overflows, then writes them plainly anyway. Left plain from the start, a file of 2,048 video rows (512-dim
# embeddings, JPEG thumbnails) takes about 0.7 times the CPU and 4 % fewer bytes (benchmarks/data_file_writes.py);
# the columns whose values repeat (status, codec, labels, model and run ids) keep dictionaries.
_RESULT_PLAIN = frozenset({"row_id", "embedding", "label_scores", "thumbnail_jpeg"})
_PLAIN_COLUMNS = {
    "videos": _RESULT_PLAIN | {"video_id", "uri", "etag", "size_bytes", "duration_seconds"},
    "segments": _RESULT_PLAIN | {"start_seconds", "end_seconds"},  # a video's segments share its id and URI
}


class TableMismatchError(ValueError):
    """An output table this vitaclip cannot use: another table, schema version or embedding size."""


class NotAnOutputError(TableMismatchError):
    """A folder given as an output that holds other files where its tables would go (the videos, most often): no
    run of it is recorded there."""


class TableUnreadableError(ValueError):
    """A Delta table whose log cannot be read: a commit file cut short or damaged, or a protocol this delta-rs does
    not support."""


class DataFilesMissingError(TableUnreadableError):
    """A table version names data files that are gone from the storage (deleted by hand, by another tool, or by a
    vacuum that outran a commit): no reader can read it until they are removed from the table."""


class CommitConflict(RuntimeError):
    """Another writer committed to the table since the version a commit was planned against."""


class RecordChangedError(ValueError):
    """An app transaction a commit required (`commit`'s ``require``) has another version at the version it commits
    on: another writer changed what the commit's rows depend on (`index.row_settings`). Not retried."""

    def __init__(self, message: str, *, app_id: str, expected: int, found: int | None) -> None:
        super().__init__(message)
        self.app_id, self.expected, self.found = app_id, expected, found


class LogUnavailableError(LookupError):
    """A commit of the Delta log is gone (cleaned up after its retention): read the table in full instead."""


# ----------------------------------------------------------------------------------------------------- location


def refuse_percent(location: str) -> None:
    """Delta Lake tables cannot live under a path holding ``%``: delta-rs decodes percent escapes in table paths (as
    paths, file:// URLs and object keys alike), so a table in "o%41" would be written to "oA" and never found again,
    and DuckDB's ``delta_scan`` fails on a bare ``%``. Nor a local one holding a control character (delta-rs refuses
    the path as illegal, after the run had made its folders and recorded itself) or a backslash (delta-rs reads it
    as a folder separator: "o\\bs" became "o/bs"); object-store prefixes are checked by `refuse_odd_key_prefix`."""
    local = "://" not in location or location.startswith("file://")  # object-store keys: `refuse_odd_key_prefix`
    odd = [c for c in ("%\\" if local else "%") if c in location] + (
        ["a control character"] if local and any(ord(c) < 32 or ord(c) == 127 for c in location) else []
    )
    if odd:
        found = ", ".join(repr(c) if len(c) == 1 else c for c in odd)
        raise StorageError(
            f"output location {terminal_text(redact_url(location))}: Delta Lake tables cannot live under a path "
            f"holding '%' (delta-rs reads %XX as a percent escape), a backslash or a control character (found "
            f"{found}): choose another name",
            reason="invalid_input",
            uri=location,
        )


def refuse_odd_key_prefix(url: str, prefix: str) -> None:
    """An object-store output whose prefix delta-rs would read as another place: ``?`` and ``#`` end a URL's path
    (the tables went to ``o``, the runs and the index to ``o#1``), and ``.``, ``..`` or empty segments (``//``) are
    collapsed or refused by its object stores while this store writes the key as it is."""
    body = prefix[:-1] if prefix.endswith("/") else prefix  # one trailing '/' closes the prefix; two are a segment
    segments = body.split("/") if body else []
    odd = sorted({c for c in "?#" if c in prefix}) + sorted({repr(seg) for seg in segments if seg in ("", ".", "..")})
    if any(ord(c) < 32 or ord(c) == 127 for c in prefix):  # URL parsers drop tabs and newlines, keys keep them
        odd.append("a control character")
    if odd or prefix.startswith("/"):
        raise StorageError(
            f"output location {redact_url(url)}: Delta Lake tables need a prefix without '?', '#', '.' or '..' "
            f"segments or doubled '/' (found {', '.join(odd) or 'a leading /'}): choose another prefix",
            reason="invalid_input",
            uri=url,
        )


@dataclass(frozen=True)
class OutputLocation:
    """Where an output lives: a local folder or an object store prefix, plus how to reach it, without secrets.

    Build it with `from_url`. It pickles, so the driver can hand it to Ray workers; credentials always come from
    the environment of the process that uses it (the standard AWS chain for S3, ``GOOGLE_*`` for GCS,
    ``AZURE_STORAGE_*`` for Azure) and are never stored here.

    Attributes:
        url: An absolute local path, or ``s3://bucket/prefix`` (``gs://``, ``az://``, ``abfss://`` likewise),
            without a trailing slash.
        s3_endpoint_url: An S3-compatible server (MinIO, moto) as ``scheme://host[:port]``, userinfo stripped;
            None for AWS itself.
    """

    url: str
    s3_endpoint_url: str | None = None

    @classmethod
    def from_url(cls, url: str, *, s3_endpoint_url: str | None = None) -> OutputLocation:
        """Parses an output URL: a local folder (made absolute) or ``s3://``, ``gs://``, ``az://``, ``abfss://``.

        ``pyarrow.fs`` reads and writes the data files and delta-rs the log, both with credentials from their
        standard environment variables. Tested against moto's S3 server, Azurite and fake-gcs-server.

        Args:
            url: The output folder or prefix.
            s3_endpoint_url: An S3-compatible server for ``s3://`` outputs; when None, ``AWS_ENDPOINT_URL_S3`` or
                ``AWS_ENDPOINT_URL`` from this process's environment, if set (as `jobs.storage.make_s3_client`
                does). Userinfo in it (``http://user:pass@host``) is dropped: it is never stored or passed on.

        Raises:
            ValueError: An unsupported scheme, a missing bucket, or an endpoint given for a non-S3 output.
        """
        refuse_object_userinfo(url, "output")
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
            path = parts.path if scheme == "file" else url
            if s3_endpoint_url is not None:
                raise ValueError(f"s3_endpoint_url is only for s3:// outputs, got a local output {url!r}")
            return cls(url=os.path.abspath(os.path.expanduser(path)).rstrip(os.sep) or os.sep)
        if scheme not in ("s3", "gs", "az", "abfss"):
            raise ValueError(f"unsupported output URL {url!r}; use a local folder, s3://, gs://, az:// or abfss://")
        if not parts.netloc:
            raise ValueError(f"output URL {url!r} names no bucket or container")
        # What urlsplit would drop or a store collapse ('?', '#', '..') names another place: refused, not read.
        refuse_percent(url)
        bucket, _, prefix = url.split("://", 1)[1].partition("/")
        refuse_odd_key_prefix(url, prefix)
        refuse_odd_key_prefix(url, bucket)  # '?' or '#' after the bucket's name: urlsplit reads the bare bucket
        normalized = f"{scheme}://{parts.netloc}{parts.path}".rstrip("/")
        if scheme != "s3":
            if s3_endpoint_url is not None:
                raise ValueError(f"s3_endpoint_url is only for s3:// outputs, got {normalized!r}")
            return cls(url=normalized)
        endpoint = s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return cls(url=normalized, s3_endpoint_url=endpoint_without_userinfo(endpoint) if endpoint else None)

    @property
    def scheme(self) -> Scheme:
        """``file`` for a local folder, else the URL's scheme."""
        scheme = urllib.parse.urlsplit(self.url).scheme
        return "file" if scheme not in ("s3", "gs", "az", "abfss") else scheme  # type: ignore[return-value]

    def table_uri(self, table: str) -> str:
        """The URI of one table for delta-rs, e.g. ``s3://bucket/out/videos`` or ``/abs/out/videos``."""
        _check_table_name(table)
        return os.path.join(self.url, table) if self.scheme == "file" else f"{self.url}/{table}"

    def storage_options(self) -> dict[str, str]:
        """Options for delta-rs: the S3 endpoint, plain HTTP when it is ``http://``, and the region; no secrets.

        The region comes from ``AWS_REGION`` or ``AWS_DEFAULT_REGION`` in this process's environment, else
        ``us-east-1``. GCS takes its endpoint from ``STORAGE_EMULATOR_HOST`` when that is set (an emulator, no
        credentials). Other stores need no options: delta-rs reads their environment variables itself.
        """
        if self.scheme == "gs":
            emulator = _gcs_emulator()
            if emulator is None:
                return {}
            # object_store takes a GCS endpoint only from a service-account document; this one holds no key.
            account = {"gcs_base_url": emulator, "disable_oauth": True, "client_email": "", "private_key": "",
                       "private_key_id": ""}  # fmt: skip
            return {"google_service_account_key": json.dumps(account)}
        if self.scheme != "s3":
            return {}
        options = {"AWS_REGION": _aws_region()}
        if self.s3_endpoint_url:
            options["AWS_ENDPOINT_URL"] = self.s3_endpoint_url
            if self.s3_endpoint_url.startswith("http://"):
                options["AWS_ALLOW_HTTP"] = "true"
        return options

    def filesystem(self, *, attempts: int = _S3_MAX_ATTEMPTS) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the output's base path in it, for reading and writing data and log files.

        S3 uses the standard credential chain, the endpoint (``endpoint_override`` and its scheme) when one is set
        and path-style addressing; ``attempts`` per request (fewer for reads a client waits on: a store that is
        down then fails them in seconds, not after a minute of back-off).
        """
        if self.scheme == "file":
            return pafs.LocalFileSystem(), self.url
        parts = urllib.parse.urlsplit(self.url)
        base = f"{parts.netloc}{parts.path}".rstrip("/")
        if self.scheme == "s3":
            # Throttling (503 SlowDown), 500s and dropped connections are retried with backoff, as boto3 does.
            retry = pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)
            if not self.s3_endpoint_url:
                return pafs.S3FileSystem(region=_aws_region(), retry_strategy=retry), base
            endpoint = urllib.parse.urlsplit(self.s3_endpoint_url)
            return (
                pafs.S3FileSystem(
                    region=_aws_region(),
                    endpoint_override=endpoint.netloc,
                    scheme=endpoint.scheme,
                    force_virtual_addressing=False,
                    retry_strategy=retry,
                ),
                base,
            )
        if self.scheme == "az":  # delta-rs spells Azure az://container/path; pyarrow wants the account separately
            return _azure_filesystem(), base
        if self.scheme == "gs":
            if (emulator := _gcs_emulator()) is not None:
                endpoint = urllib.parse.urlsplit(emulator)
                gcs = pafs.GcsFileSystem(anonymous=True, endpoint_override=endpoint.netloc, scheme=endpoint.scheme)
            else:
                gcs = pafs.GcsFileSystem()
            return pafs.PyFileSystem(_RangedGcsReads(gcs, self.storage_options())), base
        filesystem, path = pafs.FileSystem.from_uri(self.url)
        return filesystem, path.rstrip("/")

    def table_path(self, table: str) -> tuple[pafs.FileSystem, str]:
        """`filesystem` and the path of one table's root folder in it."""
        _check_table_name(table)
        filesystem, base = self.filesystem()
        return filesystem, f"{base}/{table}"


def pyarrow_dataset(location: OutputLocation, table: str, dt: DeltaTable) -> Any:
    """A table version's data files as a pyarrow dataset (deltalake's file statistics prune files), read through
    the output's pyarrow filesystem. deltalake's own Python filesystem handler leaves Arrow threads behind that abort
    the interpreter at exit about half the time ("terminate called without an active exception", apache/arrow#34314).
    """
    filesystem, root = location.table_path(table)
    files = pafs.SubTreeFileSystem(root, filesystem)
    if "deletionVectors" not in (dt.protocol().reader_features or ()):
        return dt.to_pyarrow_dataset(filesystem=files)
    # deltalake refuses a table that may have deletion vectors, even when no file has one: the same dataset without
    # its statistics pruning, once `check_table`'s test holds for this version.
    refuse_deletion_vectors(dt)
    parquet = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=True))
    fragments = [parquet.make_fragment(path, filesystem=files) for path in data_file_paths(dt)]
    return ds.FileSystemDataset(fragments, pa.schema(dt.schema().to_arrow()), parquet, files)


# Data files read at once by `scan` on a filesystem written in Python: the reads wait on the network, not the GIL.
_PYTHON_READERS = 16


# Byte ranges of a file on a filesystem written in Python, read by `caller_image`: gaps up to _HOLE_BYTES are read
# through, and no request asks for more than _RANGE_BYTES (Arrow's own pre-buffering defaults).
_HOLE_BYTES = 8 << 10
_RANGE_BYTES = 32 << 20
_TAIL_BYTES = 64 << 10  # read first: the footer (its length, then the metadata) mostly fits
FILE_INDEX = "__fragment_index"
"""A column `scan` can add: each row's data file as its position in ``dataset.files`` (int32)."""


def scan(
    dataset: ds.Dataset,
    columns: list[str] | None,
    where: pc.Expression | None = None,
    *,
    where_columns: Sequence[str] | None = None,
) -> pa.Table:
    """``dataset.to_table(columns, filter=where)`` in the plain column types whatever types the files hold, and on a
    filesystem written in Python (gs://, see `_RangedGcsReads`) each data file scanned on a Python thread of the
    caller, several files at once.

    Arrow cannot push a filter into a file whose columns are view types (``string_view``: other writers' files, see
    `plain_types`): it has no kernel between such a file's statistics and the dataset's plain type. Then the
    filter's columns (`where_columns`; None: all columns) are read with the others and the rows filtered here.

    Arrow's own scan threads hold what a Python file returns (its buffers, the file, the filesystem) and release it
    when they get the GIL again; a process that ends just after a read left some of it to be released during the
    interpreter's finalization, and a thread that asks for the GIL then aborts the process ("terminate called
    without an active exception": 11 to 15 of 20 short scripts that read a gs:// table). Scanned with
    ``use_threads=False``, a file's reader and what it holds are released by the thread that asked for it, before
    the read returns. Measured on the GCS emulator, reading the keys of 200 files: 3.2 s on 8 such threads, 2.4 s on
    16, 9.6 s on Arrow's threads; without pre-buffering (a request per column) 16.4 s."""
    plain = plain_schema(dataset.schema)
    if not plain.equals(dataset.schema):
        dataset = dataset.replace_schema(plain)
    # The columns a file on a filesystem written in Python is read for (None: all of it).
    read = (
        None if columns is None or (where is not None and where_columns is None) else {*columns, *(where_columns or ())}
    )
    try:
        return _scan(dataset, columns, where, read)
    except pa.ArrowNotImplementedError:
        if where is None:
            raise
    wanted = None if columns is None or where_columns is None else [*columns, *set(where_columns) - set(columns)]
    rows = _scan(dataset, wanted, None, read).filter(where)
    return rows if columns is None else rows.select(columns)


def _scan(
    dataset: ds.Dataset, columns: list[str] | None, where: pc.Expression | None, read: Collection[str] | None
) -> pa.Table:
    if not _python_backed(getattr(dataset, "filesystem", None)):
        return dataset.to_table(columns=columns, filter=where)
    fragments = list(dataset.get_fragments(filter=where))
    if not fragments:
        return dataset.to_table(columns=columns, filter=where)  # reads no file
    # A fragment scanned alone is fragment 0 of its scan: its place in the dataset is added here.
    wanted = columns if columns is None or FILE_INDEX not in columns else [c for c in columns if c != FILE_INDEX]
    place = {path: i for i, path in enumerate(dataset.files)} if wanted is not columns else {}

    def scan_one(fragment: ds.Fragment) -> pa.Table:
        image = caller_image(dataset.filesystem, fragment.path, read)
        in_memory = dataset.format.make_fragment(pa.BufferReader(image))
        rows = in_memory.to_table(schema=dataset.schema, columns=wanted, filter=where, use_threads=False)
        if not place:
            return rows
        index = pa.array(np.full(rows.num_rows, place[fragment.path], np.int32))
        return rows.add_column(columns.index(FILE_INDEX), FILE_INDEX, index)  # type: ignore[union-attr]

    if len(fragments) == 1:
        return scan_one(fragments[0])
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(_PYTHON_READERS, len(fragments))) as pool:
        return pa.concat_tables(pool.map(scan_one, fragments))


def read_file(
    filesystem: pafs.FileSystem, path: str, columns: list[str] | None = None, *, as_dictionary: Sequence[str] = ()
) -> pa.Table:
    """One Parquet data file (some of its columns) in the plain column types, read as `scan` reads it on a
    filesystem written in Python; the columns named in `as_dictionary` as dictionary arrays (Parquet's own
    dictionary pages, not a string per row)."""
    dictionary = list(as_dictionary) or None
    source: Any = pa.BufferReader(caller_image(filesystem, path, columns)) if _python_backed(filesystem) else path
    read = pq.read_table(
        source,
        columns=columns,
        filesystem=None if _python_backed(filesystem) else filesystem,
        read_dictionary=dictionary,
    )
    return plain_types(read)


def open_parquet(
    filesystem: pafs.FileSystem, path: str, columns: Collection[str] | None = None, row_group: int | None = None
) -> pq.ParquetFile:
    """A Parquet file to read `columns` (None: all) of one row group (None: all) from; on a filesystem written in
    Python, read into memory first by `caller_image`."""
    if _python_backed(filesystem):
        return pq.ParquetFile(pa.BufferReader(caller_image(filesystem, path, columns, row_group)))
    return pq.ParquetFile(filesystem.open_input_file(path))


def caller_image(
    filesystem: pafs.FileSystem, path: str, columns: Collection[str] | None = None, row_group: int | None = None
) -> pa.Buffer:
    """A Parquet file's bytes in Arrow's memory as far as reading `columns` (None: all) of one row group (None: all)
    needs them (its footer and their column chunks, in coalesced requests), read by the calling thread; the rest is
    left unread (an untouched allocation costs no memory).

    Why: Arrow reads a file of a filesystem written in Python (gs://, see `_RangedGcsReads`) on its own threads (its
    scan threads, and the I/O threads of pre-buffering, which may still read a range after the scan returned), and
    holds what Python returned there. A thread that asks for the GIL after the interpreter began to end aborts the
    process ("terminate called without an active exception": 2 of 60 short scripts that read a gs:// table, on a
    busy machine, with ``use_threads=False`` scans). Arrow reads these images without Python."""
    with filesystem.open_input_file(path) as raw:
        size = raw.size()
        image = pa.allocate_buffer(size)
        view = memoryview(image).cast("B")

        def fill(start: int, end: int) -> None:
            for offset in range(start, end, _RANGE_BYTES):
                stop = min(end, offset + _RANGE_BYTES)
                view[offset:stop] = raw.read_at(stop - offset, offset)

        if columns is None and row_group is None:
            fill(0, size)
            return image
        tail = max(0, size - _TAIL_BYTES)
        fill(tail, size)
        footer = size - 8 - int.from_bytes(view[size - 8 : size - 4], "little") if size >= 8 else 0
        if 0 <= footer < tail:
            fill(footer, tail)
        metadata = pq.read_metadata(pa.BufferReader(image))
        wanted = None if columns is None else {name for name in columns if not name.startswith("__")}
        ranges = []
        for group in range(metadata.num_row_groups) if row_group is None else (row_group,):
            chunks = metadata.row_group(group)
            for index in range(chunks.num_columns):
                chunk = chunks.column(index)
                if wanted is None or chunk.path_in_schema.split(".")[0] in wanted:
                    offsets = [o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o]
                    start = min(offsets) if offsets else 0
                    ranges.append((start, min(size, start + chunk.total_compressed_size)))
        for start, end in _coalesced(ranges):
            fill(start, end)
    return image


def _coalesced(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges merged where the gap between them is at most `_HOLE_BYTES`."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start - merged[-1][1] <= _HOLE_BYTES:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _python_backed(filesystem: pafs.FileSystem | None) -> bool:
    while isinstance(filesystem, pafs.SubTreeFileSystem):
        filesystem = filesystem.base_fs
    return isinstance(filesystem, pafs.PyFileSystem)


class _RangedGcsReads(pafs.FileSystemHandler):
    """pyarrow's GCS filesystem, except that files opened for random access read through delta-rs's object store.

    pyarrow's GCS file starts a download of the whole object when it is opened, and reads ranges with further
    requests; closing it early still costs what the connection took in by then (measured on a local emulator, to read
    four key columns: all of a 3 MB data file, 4.1 MB of a 31 MB one, 4.9 MB of a 126 MB one). delta-rs's files read
    only the ranges asked for (71-81 KB each). Listings, whole-file streams and writes stay with pyarrow."""

    def __init__(self, gcs: pafs.FileSystem, storage_options: dict[str, str]) -> None:
        self._gcs = gcs
        self._options = storage_options
        self._ranged: dict[str, Any] = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RangedGcsReads) and other._gcs.equals(self._gcs)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "gcs"

    def normalize_path(self, path: str) -> str:
        return str(self._gcs.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return list(self._gcs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return list(self._gcs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._gcs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._gcs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._gcs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete every bucket's contents")

    def delete_file(self, path: str) -> None:
        self._gcs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._gcs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._gcs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._gcs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        from deltalake.fs import DeltaStorageHandler

        bucket, _, key = path.lstrip("/").partition("/")
        if bucket not in self._ranged:
            self._ranged[bucket] = DeltaStorageHandler(f"gs://{bucket}", options=self._options)
        if self._gcs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"gs://{path} does not exist")
        return self._ranged[bucket].open_input_file(key)

    def open_output_stream(self, path: str, metadata: dict[str, str]) -> pa.NativeFile:
        return self._gcs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict[str, str]) -> pa.NativeFile:
        return self._gcs.open_append_stream(path, metadata=metadata)


def _gcs_emulator() -> str | None:
    """The GCS emulator named by ``STORAGE_EMULATOR_HOST`` (the variable Google's client libraries read), as
    ``scheme://host:port``; None when it is not set (real GCS, credentials from ``GOOGLE_APPLICATION_CREDENTIALS`` or
    the machine's service account)."""
    value = os.environ.get("STORAGE_EMULATOR_HOST", "").strip().rstrip("/")
    if not value:
        return None
    url = value if "://" in value else f"http://{value}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.username:
        raise ValueError("STORAGE_EMULATOR_HOST must look like http://host:port")
    return f"{parts.scheme}://{parts.netloc}"


def _azure_filesystem() -> pafs.FileSystem:
    """pyarrow's Azure filesystem from the variables delta-rs reads: ``AZURE_STORAGE_ACCOUNT_NAME``, optionally
    ``AZURE_STORAGE_ACCOUNT_KEY`` (otherwise Azure's default credential chain), and for the Azurite emulator
    ``AZURE_STORAGE_USE_EMULATOR=true`` with ``AZURITE_BLOB_STORAGE_URL`` (default ``http://127.0.0.1:10000``)."""
    account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise ValueError("az:// outputs need AZURE_STORAGE_ACCOUNT_NAME in the environment")
    options: dict[str, str] = {"account_name": account}
    if os.environ.get("AZURE_STORAGE_ACCOUNT_KEY"):
        options["account_key"] = os.environ["AZURE_STORAGE_ACCOUNT_KEY"]
    if os.environ.get("AZURE_STORAGE_USE_EMULATOR", "").lower() in ("1", "true", "yes"):
        emulator = urllib.parse.urlsplit(os.environ.get("AZURITE_BLOB_STORAGE_URL") or "http://127.0.0.1:10000")
        options.update(
            blob_storage_authority=emulator.netloc,
            blob_storage_scheme=emulator.scheme,
            dfs_storage_authority=emulator.netloc,
            dfs_storage_scheme=emulator.scheme,
        )
    return pafs.AzureFileSystem(**options)


def _aws_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _check_table_name(table: str) -> None:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")


# ----------------------------------------------------------------------------------------------------- schemas


# Delta has no fixed-size list (the embedding size is the table property vitaclip.embed_dim, checked on write), and
# its timestamps are microseconds in UTC (values are truncated to milliseconds, see write_data_file).
_DELTA_TYPES = {"embedding": pa.list_(pa.float32()), "indexed_at": pa.timestamp("us", tz="UTC")}


def table_schema(table: str, embed_dim: int, *, version: int = SCHEMA_VERSION) -> pa.Schema:
    """The arrow schema of a table at a schema version (`READ_VERSIONS`; default `SCHEMA_VERSION`).

    Version 2 holds the columns of version 1 (`index.schema`), in the same order, except that ``embedding`` is a
    variable-size list (its size is the ``vitaclip.embed_dim`` table property) and ``indexed_at`` is in
    microseconds. Version 3 adds ``attempts`` as the videos table's last column: the runs that have tried the
    video's current object, this row's run included (null in rows written before version 3).

    Raises:
        ValueError: An unknown table or version, or an embedding size below 1.
    """
    _check_table_name(table)
    if embed_dim < 1:
        raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
    if version not in READ_VERSIONS:
        raise ValueError(f"unknown schema version {version}; versions: {', '.join(map(str, READ_VERSIONS))}")
    fields = [
        f.with_type(_DELTA_TYPES[f.name]) if f.name in _DELTA_TYPES else f
        for f in schema_for(table, embed_dim).remove_metadata()
    ]
    for added_in in range(3, version + 1):  # at the end, where Delta's ADD COLUMN puts them
        fields += _ADDED_COLUMNS[added_in].get(table, ())
    return pa.schema(fields)


def _table_properties(table: str, embed_dim: int) -> dict[str, str | None]:
    return {TABLE_KEY: table, SCHEMA_VERSION_KEY: str(SCHEMA_VERSION), EMBED_DIM_KEY: str(embed_dim)}


# ----------------------------------------------------------------------------------------------------- tables


_NO_BUCKET_CODES = {"<Code>NoSuchBucket</Code>": "bucket", "<Code>ContainerNotFound</Code>": "container"}
"""The error codes in a delta-rs error (the store's XML answer) of a bucket (S3, GCS) or container (Azure) missing."""


def open_table(location: OutputLocation, table: str, *, version: int | None = None) -> DeltaTable | None:
    """Opens one table at its latest version (or `version`); None when there is no Delta table there yet."""
    for attempt in range(_S3_MAX_ATTEMPTS):
        try:
            return DeltaTable(location.table_uri(table), version=version, storage_options=location.storage_options())
        except TableNotFoundError:
            return None
        except OSError as exc:
            missing = next((kind for code, kind in _NO_BUCKET_CODES.items() if code in str(exc)), None)
            if missing:  # final: no retry, and one line instead of delta-rs's chain
                bucket = urllib.parse.urlsplit(location.url).netloc
                raise StorageError(
                    f"{missing} {bucket!r} does not exist (cannot read {location.table_uri(table)}): create it first",
                    reason="no_such_bucket",
                    uri=location.table_uri(table),
                ) from None
            # delta-rs does not retry its log reads: a throttled or dropped request (503, reset) fails the open.
            if attempt + 1 == _S3_MAX_ATTEMPTS or location.scheme == "file":
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt))
        except DeltaError as exc:  # a damaged log: its reason in one line, not delta-rs's backtrace
            reason = redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            at = "" if version is None else f" at version {version}"
            raise TableUnreadableError(
                f"{location.table_uri(table)}{at} cannot be read as a Delta table: {reason[:300]}"
            ) from None
    raise AssertionError("unreachable")


_COMMIT_FILE = re.compile(r"(\d{20})\.json")


def latest_version(location: OutputLocation, table: str) -> int | None:
    """A table's latest version, from the names in its log folder (one listing; no log entry, checkpoint or data file
    is read); None when there is no table.

    For polling (the search service checks every minute whether a run committed): opening the table would read its
    checkpoint, whose size follows the number of data files (megabytes past millions of rows, every minute), where
    the listing follows the log entries kept (``delta.logRetentionDuration``, 30 days by default: a few pages).
    Commit entries are written whole or not at all (a conditional put on object stores, a rename locally), so a
    listed name is a committed version.
    """
    filesystem, root = location.table_path(table)
    listed = filesystem.get_file_info(pafs.FileSelector(f"{root}/_delta_log", allow_not_found=True))
    versions = [int(m.group(1)) for info in listed if (m := _COMMIT_FILE.fullmatch(info.base_name))]
    return max(versions, default=None)


def create_tables(
    location: OutputLocation, embed_dim: int, *, model_id: str | None = None, into_old_layout: bool = False
) -> dict[str, int]:
    """Creates the missing tables of an output and checks all of them; returns each table's latest version.

    Idempotent, and safe when two processes create at once: the loser of the race re-opens the winner's table and
    checks it like any existing one.

    Args:
        embed_dim: The embedding size of the model that will write; an existing table must hold the same.
        model_id: Named in the error when an existing table holds another embedding size.
        into_old_layout: Create tables in folders that hold the previous layout's parts (`vitaclip migrate`).

    Raises:
        TableMismatchError: An existing table this vitaclip cannot write (see `check_table`, `check_writable`), or a
            table folder that holds other files and no table: the folder would be the table's, and a vacuum
            deletes data files no commit names.
    """
    versions: dict[str, int] = {}
    for table in TABLES:
        dt = open_table(location, table)
        if dt is None:
            if not into_old_layout:
                _refuse_foreign_files(location, table)
            try:
                dt = DeltaTable.create(
                    location.table_uri(table),
                    schema=table_schema(table, embed_dim),
                    mode="error",
                    configuration=_table_properties(table, embed_dim),
                    raise_if_key_not_exists=False,  # custom (non-delta.*) properties are refused otherwise
                    storage_options=location.storage_options(),
                    # With retries, the loser of a creation race commits its CREATE again as version 1 (a second
                    # metaData action, seen on S3); without, it fails and checks the winner's table below.
                    commit_properties=CommitProperties(max_commit_retries=0),
                )
            except Exception:
                # Lost a creation race (delta-rs raises a generic DeltaError or CommitFailedError): use the winner's
                # table if there is one; any other failure is re-raised as it was.
                dt = open_table(location, table)
                if dt is None:
                    raise
        check_table(dt, table, embed_dim=embed_dim, model_id=model_id)
        check_writable(dt, table)
        if schema_version(dt) < SCHEMA_VERSION:
            dt = _upgrade(location, table, dt)
            check_table(dt, table, embed_dim=embed_dim, model_id=model_id)
        versions[table] = dt.version()
    return versions


def _refuse_foreign_files(location: OutputLocation, table: str) -> None:
    """Refuses to make a table in a folder that already holds files (one listing of the folder itself)."""
    filesystem, root = location.table_path(table)
    listed = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    # Names starting with '.' or '_' (a .DS_Store, the log) are not a table's data: no vacuum ever deletes them.
    foreign = sorted(info.base_name for info in listed if not info.base_name.startswith((".", "_")))
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise NotAnOutputError(
            f"{redact_url(location.table_uri(table))} holds files and no Delta table ({shown}): an output's "
            f"{'/'.join(TABLES)} folders hold its tables only; give --output a folder of its own (not one holding "
            "the videos)"
        )


def schema_version(dt: DeltaTable) -> int:
    """The schema version of a table `check_table` accepted."""
    return int(dt.metadata().configuration[SCHEMA_VERSION_KEY])


def _upgrade(location: OutputLocation, table: str, dt: DeltaTable) -> DeltaTable:
    """Brings a table of an older schema version to `SCHEMA_VERSION` in metadata-only commits (the added columns,
    then the version property); returns it reopened. Writers upgrading at once take turns: each step is done by
    whoever commits it first, and a writer whose commit lost re-reads the table and goes on from there. A writer
    killed between the two commits leaves the columns, which the next one keeps."""
    for version in range(schema_version(dt) + 1, SCHEMA_VERSION + 1):
        failure: Exception | None = None
        for attempt in range(_UPGRADE_ATTEMPTS):
            if schema_version(dt) >= version:
                break
            try:
                present = set(dt.schema().to_arrow().names)
                added = [f for f in _ADDED_COLUMNS[version].get(table, ()) if f.name not in present]
                if added:
                    dt.alter.add_columns([DeltaField.from_arrow(f) for f in added])
                    dt = open_table(location, table) or dt
                dt.alter.set_table_properties({SCHEMA_VERSION_KEY: str(version)}, raise_if_not_exists=False)
            except Exception as exc:  # delta-rs raises generic errors; another writer may have committed first
                failure = exc
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
            reopened = open_table(location, table)
            if reopened is None:
                raise FileNotFoundError(f"the {table} table at {location.table_uri(table)} disappeared")
            dt = reopened
        if schema_version(dt) < version:
            reason = f": {type(failure).__name__}: {failure}" if failure else ""
            raise TableMismatchError(
                f"{location.table_uri(table)} could not be upgraded to schema version {version}{reason}"
            ) from failure
    return dt


def check_table(dt: DeltaTable, table: str, *, embed_dim: int | None = None, model_id: str | None = None) -> int:
    """Checks a Delta table is vitaclip's `table` at this schema version; returns its embedding size.

    Args:
        embed_dim: The embedding size the caller writes or searches with; None to accept any.
        model_id: The model that makes `embed_dim`-sized embeddings, named in the error.

    Raises:
        TableMismatchError: Another table, an unknown schema version, another embedding size, other columns, or
            Delta reader features (deletion vectors, column mapping) this vitaclip does not read.
    """
    _check_table_name(table)
    where = dt.table_uri.rstrip("/")
    config = dt.metadata().configuration
    found_table = config.get(TABLE_KEY)
    if found_table != table:
        found = f"a {found_table!r} table" if found_table else "a Delta table without vitaclip properties"
        raise TableMismatchError(f"{where} is {found}; expected vitaclip's {table!r} table")
    found_version = config.get(SCHEMA_VERSION_KEY)
    if found_version not in {str(v) for v in READ_VERSIONS}:
        raise TableMismatchError(
            f"{where} has schema version {found_version or '?'}; this vitaclip reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}"
        )
    try:
        found_dim = int(config.get(EMBED_DIM_KEY, ""))
    except ValueError:
        raise TableMismatchError(f"{where} has no valid {EMBED_DIM_KEY} property") from None
    if embed_dim is not None and found_dim != embed_dim:
        model = f"model {model_id}" if model_id else "the model"
        raise TableMismatchError(
            f"{where} holds {found_dim}-dim embeddings but {model} makes {embed_dim}-dim ones; use another --output"
        )
    # An upgrade between its two commits (`_upgrade`: the next version's columns are in, its version property not
    # yet) is read as the version it says: the added columns are nullable and readers project the ones they know.
    accepted = [int(found_version)] + ([int(found_version) + 1] if int(found_version) < SCHEMA_VERSION else [])
    found_columns = json.loads(dt.schema().to_json())
    expected = [
        json.loads(DeltaSchema.from_arrow(table_schema(table, found_dim, version=v)).to_json()) for v in accepted
    ]
    if found_columns not in expected:
        raise TableMismatchError(
            f"{where} columns differ from {table} schema version {found_version} "
            f"({_column_differences(found_columns, expected[0])}): restore the version before the change "
            f"(DeltaTable({where!r}).history() lists the commits, .restore(version) goes back) or give the job "
            "another --output"
        )
    partitions = list(dt.metadata().partition_columns)
    if partitions:
        # The partition values live in the folder names, not in the data files, which vitaclip reads directly.
        raise TableMismatchError(
            f"{where} is partitioned by {', '.join(partitions)}, and vitaclip's tables are not: restore the version "
            f"before (DeltaTable({where!r}).history() lists the commits, .restore(version) goes back) or give the "
            "job another --output"
        )
    protocol = dt.protocol()
    features = set(protocol.reader_features or ())
    if protocol.min_reader_version not in (1, 3) or features - _READER_FEATURES_KNOWN:
        # Data files are read directly with pyarrow (read_keys, rewrite_without): column mapping would make those
        # reads wrong.
        raise TableMismatchError(
            f"{where} needs Delta reader version {protocol.min_reader_version} "
            f"(features {protocol.reader_features or []}); vitaclip reads version 1 tables, and version 3 ones with "
            f"the features {sorted(_READER_FEATURES_KNOWN)}"
        )
    if "deletionVectors" in features:
        refuse_deletion_vectors(dt)
    return found_dim


def refuse_deletion_vectors(dt: DeltaTable) -> None:
    """Raises `TableMismatchError` when a data file of the table version has a deletion vector.

    Turning deletion vectors on cannot be undone (the protocol stays upgraded), so a table that allows them is read
    while none of its files has one: rows deleted through one would come back in vitaclip's direct file reads.
    """
    if any(batch.num_rows for batch in dt.deletion_vectors()):
        raise TableMismatchError(
            f"{dt.table_uri.rstrip('/')} has rows deleted through deletion vectors, which vitaclip does not apply: "
            "purge them (Spark: REORG TABLE ... APPLY (PURGE) rewrites those files without the rows) and unset "
            "delta.enableDeletionVectors, or give the job another --output"
        )


# Delta reader features a table may need and still be read by vitaclip: deletion vectors while no data file has one
# (`check_table` looks), and types the exact column check already rules out (delta-rs lists ``variantType`` when it
# upgrades a table to table features).
_READER_FEATURES_KNOWN = frozenset({"deletionVectors", "variantType", "timestampNtz"})


def _column_differences(found: dict[str, Any], expected: dict[str, Any]) -> str:
    """What an analyst's change did to a table's columns, in a few words (Delta schema JSON on both sides)."""
    have = {f["name"]: f for f in found.get("fields", [])}
    want = {f["name"]: f for f in expected.get("fields", [])}
    parts = []
    if extra := [name for name in have if name not in want]:
        parts.append(f"added: {', '.join(extra)}")
    if missing := [name for name in want if name not in have]:
        parts.append(f"missing: {', '.join(missing)}")
    if changed := [name for name in want if name in have and have[name] != want[name]]:
        parts.append(f"changed: {', '.join(changed)}")
    return "; ".join(parts) or "the order of the columns"


# Delta writer features a vitaclip commit honours (those below that change what a writer must do are checked by
# their table property in `check_writable`); a table that needs any other is refused before a run writes to it.
_WRITER_FEATURES_KNOWN = frozenset(
    {
        "appendOnly",
        "invariants",
        "checkConstraints",
        "changeDataFeed",
        "generatedColumns",
        "identityColumns",
        "timestampNtz",
        "domainMetadata",
        "deletionVectors",  # a vitaclip commit writes none, and check_table refuses tables whose files have any
        "variantType",  # with timestampNtz: a column type, and the columns are checked to be vitaclip's
    }
)


def check_writable(dt: DeltaTable, table: str) -> None:
    """Raises `TableMismatchError` when a table that `check_table` accepted carries Delta writer settings a
    vitaclip commit would break, typically set by an analyst's tool: append-only (the job replaces and deletes
    rows), CHECK constraints (the job's files are not checked against them), the change data feed or row tracking
    (the job writes neither change files nor row ids), or writer features this vitaclip does not know."""
    where = dt.table_uri.rstrip("/")
    config = {key.lower(): str(value).strip().lower() for key, value in dt.metadata().configuration.items()}
    fix = f"unset it (DeltaTable({where!r}).alter) or give the job another --output"
    if config.get("delta.appendonly") == "true":
        raise TableMismatchError(
            f"{where} is append-only (delta.appendOnly), but a run replaces and deletes rows: {fix}"
        )
    constraints = sorted(
        key.removeprefix("delta.constraints.") for key in config if key.startswith("delta.constraints.")
    )
    if constraints:
        raise TableMismatchError(
            f"{where} has CHECK constraints ({', '.join(constraints)}), which a run's files are not checked against: "
            f"drop them (DeltaTable({where!r}).alter.drop_constraint) or give the job another --output"
        )
    for key, what in (
        ("delta.enablechangedatafeed", "the change data feed"),
        ("delta.enablerowtracking", "row tracking"),
    ):
        if config.get(key) == "true":
            raise TableMismatchError(f"{where} has {what} on ({key}), which a run does not write: {fix}")
    if "delta.settransactionretentionduration" in config:
        raise TableMismatchError(
            f"{where} expires app transactions (delta.setTransactionRetentionDuration), in which runs record their "
            f"row settings and commits: {fix}"
        )
    unknown = sorted(set(dt.protocol().writer_features or ()) - _WRITER_FEATURES_KNOWN)
    if unknown:
        raise TableMismatchError(
            f"{where} needs Delta writer features {unknown}, which this vitaclip does not write; give the job "
            "another --output"
        )


def detect_old_layout(location: OutputLocation) -> bool:
    """Whether the output holds vitaclip's previous layout: ``_commits/*.json`` commit records, which the migration
    deletes last (Delta tables next to them are a migration that did not finish: it runs again)."""
    filesystem, base = location.filesystem()
    commits = filesystem.get_file_info(pafs.FileSelector(f"{base}/_commits", allow_not_found=True))
    return any(info.type == pafs.FileType.File and info.base_name.endswith(".json") for info in commits)


def old_layout_message(location: OutputLocation) -> str:
    """The error to show for an output of the previous layout (see `detect_old_layout`)."""
    return (
        f"{location.url} was written by an older vitaclip (commit records under _commits/, or a migration that did "
        f"not finish); run `vitaclip migrate {location.url}` first"
    )


# ----------------------------------------------------------------------------------------------------- data files


@dataclass(frozen=True)
class DataFile:
    """A written, not yet committed Parquet data file: what `commit` needs to add it to a table.

    Attributes:
        table: The table it belongs to.
        path: Its path relative to the table root (a plain file name).
        size_bytes: Its size.
        num_rows: Its row count.
        stats: Delta file statistics as JSON (numRecords, minValues, maxValues, nullCount).
        modification_time_ms: When it was written, in milliseconds since the epoch.
    """

    table: str
    path: str
    size_bytes: int
    num_rows: int
    stats: str
    modification_time_ms: int


@dataclass(frozen=True)
class RemovedFile:
    """A committed data file to take out of a table (its rows replaced by a rewrite)."""

    path: str
    size_bytes: int


def _conform(data: pa.Table, table: str, embed_dim: int) -> pa.Table:
    """`data` cast to `table_schema`, with embedding sizes, nulls and millisecond timestamps checked or made so."""
    schema = table_schema(table, embed_dim)
    for added in (f for columns in _ADDED_COLUMNS.values() for f in columns.get(table, ())):
        if added.name not in data.column_names:  # rows of a file written before the column (a rewrite's copy)
            data = data.append_column(added, pa.nulls(data.num_rows, added.type))
    missing = [name for name in schema.names if name not in data.column_names]
    extra = [name for name in data.column_names if name not in schema.names]
    if missing or extra:
        raise ValueError(
            f"{table} data does not match schema version {SCHEMA_VERSION}: missing {missing}, extra {extra}"
        )
    columns = []
    for schema_field in schema:
        column = data.column(schema_field.name)
        if schema_field.name == "indexed_at":
            # Delta statistics hold milliseconds: truncating the values keeps min/max exact for file skipping.
            if not pa.types.is_timestamp(column.type):
                raise ValueError(f"indexed_at must be a timestamp, got {column.type}")
            if column.type.tz is None:
                column = column.cast(pa.timestamp(column.type.unit, tz="UTC"))
            column = pc.floor_temporal(column, unit="millisecond")
        try:
            column = column.cast(schema_field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"{table}.{schema_field.name}: cannot use {column.type} as {schema_field.type}") from exc
        if not schema_field.nullable and column.null_count:
            raise ValueError(f"{table}.{schema_field.name} must not be null ({column.null_count} nulls)")
        columns.append(column)
    conformed = pa.Table.from_arrays(columns, schema=schema)
    lengths = pc.list_value_length(conformed.column("embedding"))
    wrong = pc.sum(pc.cast(pc.not_equal(lengths, embed_dim), pa.int64())).as_py() or 0
    if wrong:
        sizes = sorted({n for n in lengths.to_pylist() if n is not None and n != embed_dim})
        raise ValueError(f"{table}: {wrong} embeddings have {sizes} values; the table holds {embed_dim}-dim ones")
    return conformed


def _stat_value(value: pa.Scalar) -> Any:
    """A min or max in Delta's JSON statistics form; None when it must be left out."""
    if not value.is_valid:
        return None
    if pa.types.is_timestamp(value.type):
        moment: dt_.datetime = value.cast(pa.timestamp("us", tz="UTC")).as_py()
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    python = value.as_py()
    if isinstance(python, float) and not math.isfinite(python):
        return None  # JSON has no NaN or infinity
    if isinstance(python, str) and len(python) > MAX_STRING_STAT_CHARS:
        return None  # a truncated maximum would be below the true one
    return python


def file_stats(data: pa.Table) -> dict[str, Any]:
    """Delta statistics of a data file: numRecords, and min, max and null counts of its non-nested columns.

    Readers (delta-rs, DuckDB, Spark, polars) skip files with these, so they must never exclude a value the file
    holds: minimums and maximums are given for numbers, strings of at most `MAX_STRING_STAT_CHARS` characters
    and timestamps (milliseconds, which `write_data_file` makes exact), and left out for floats with NaN.
    """
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for schema_field in data.schema:
        kind = schema_field.type
        if pa.types.is_nested(kind):
            continue
        column = data.column(schema_field.name)
        nulls[schema_field.name] = column.null_count
        numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind)
        if not (numeric or pa.types.is_timestamp(kind) or pa.types.is_string(kind)):
            continue
        if pa.types.is_floating(kind) and pc.any(pc.is_nan(column)).as_py():
            continue  # readers order NaN differently; leave the column unbounded
        extremes = pc.min_max(column)
        low, high = _stat_value(extremes["min"]), _stat_value(extremes["max"])
        if low is not None:
            mins[schema_field.name] = low
        if high is not None:
            maxs[schema_field.name] = high
    return {"numRecords": data.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}


def table_embed_dim(location: OutputLocation, table: str) -> int:
    """The embedding size of an existing table (its ``vitaclip.embed_dim`` property), after `check_table`."""
    dt = open_table(location, table)
    if dt is None:
        raise FileNotFoundError(f"no Delta table at {location.table_uri(table)}; create_tables first")
    return check_table(dt, table)


def parquet_options(table: str, schema: pa.Schema) -> dict[str, Any]:
    """`pq.write_table` options of a data file of `table`: zstd, and dictionary encoding only for the columns whose
    values repeat (Parquet names a list column's values ``<name>.list.element``)."""
    repeated = []
    for schema_field in schema:
        if schema_field.name in _PLAIN_COLUMNS[table]:
            continue
        nested = pa.types.is_list(schema_field.type) or pa.types.is_fixed_size_list(schema_field.type)
        repeated.append(f"{schema_field.name}.list.element" if nested else schema_field.name)
    return {"compression": "zstd", "use_dictionary": repeated}


def _write_parquet(filesystem: pafs.FileSystem, path: str, data: pa.Table, options: dict[str, Any]) -> int:
    """Writes `data` as one Parquet file at `path`; returns the bytes written."""
    with filesystem.open_output_stream(path) as stream:
        pq.write_table(data, stream, **options)
        return int(stream.tell())


def write_data_file(
    location: OutputLocation, table: str, data: pa.Table, *, name: str, embed_dim: int | None = None
) -> DataFile:
    """Writes rows as one Parquet data file (`parquet_options`) in a table's folder, ready for `commit`; nothing
    is committed.

    Runs where the rows are made (Ray workers). A file that is never committed is invisible to readers and goes
    at the next `vacuum`.

    Args:
        data: Rows with the table's columns; cast to `table_schema` (a fixed-size embedding list is fine). The
            ``indexed_at`` values are truncated to milliseconds so that file statistics are exact.
        name: The file name, such as ``part-<run>-<uuid4>.parquet``: letters, digits, ``._=-``, ending in
            ``.parquet``. A committed file must never change, so use a fresh name per attempt; an existing file
            is refused.
        embed_dim: The table's embedding size; None reads it from the table properties (a log read).

    Raises:
        ValueError: A bad name, columns other than the table's, nulls in a non-nullable column, or an embedding
            whose length is not the table's embedding size.
        FileExistsError: A file of that name exists.
    """
    _check_table_name(table)
    if not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"data file name {name!r} must match {_NAME_RE.pattern} and contain no '..'")
    if embed_dim is None:
        embed_dim = table_embed_dim(location, table)
    conformed = _conform(data, table, embed_dim)
    stats = json.dumps(file_stats(conformed), separators=(",", ":"))
    filesystem, root = location.table_path(table)
    target = f"{root}/{name}"
    if filesystem.get_file_info(target).type != pafs.FileType.NotFound:
        raise FileExistsError(f"data file {name} exists in {location.table_uri(table)}; names must be fresh")
    options = parquet_options(table, conformed.schema)
    if isinstance(filesystem, pafs.LocalFileSystem):
        # Local files appear whole (temp file, then rename); an object store PUT is atomic already.
        filesystem.create_dir(root, recursive=True)
        temporary = f"{root}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            written = _write_parquet(filesystem, temporary, conformed, options)
            filesystem.move(temporary, target)
        except BaseException:  # a full disk, a kill: no part file left for each attempt
            with contextlib.suppress(OSError):
                filesystem.delete_file(temporary)
            raise
    else:
        written = _write_parquet(filesystem, target, conformed, options)
    info = filesystem.get_file_info(target)
    if info.size != written:
        # A store that kept something else than was sent (a worker without credentials whose unsigned upload a
        # server stored with its chunk framing): committed, the file would make the table unreadable for good.
        with contextlib.suppress(OSError):
            filesystem.delete_file(target)
        raise OSError(
            f"data file {name} in {redact_text(location.table_uri(table))} holds {info.size} bytes where {written} "
            "were written: the store did not keep it as sent (an unsigned upload from a worker without credentials?)"
        )
    mtime = info.mtime_ns // 1_000_000 if info.mtime_ns else int(time.time() * 1000)
    return DataFile(
        table=table,
        path=name,
        size_bytes=int(info.size or 0),
        num_rows=conformed.num_rows,
        stats=stats,
        modification_time_ms=mtime,
    )


# ----------------------------------------------------------------------------------------------------- commits


def commit(
    location: OutputLocation,
    table: str,
    *,
    adds: Sequence[DataFile],
    removes: Sequence[RemovedFile],
    read_version: int,
    app_id: str,
    app_version: int,
    metadata: Mapping[str, str],
    require: Mapping[str, int] | None = None,
) -> int:
    """Adds and removes data files in one atomic commit at exactly ``read_version + 1``; returns that version.

    The commit is conditional: if any other writer committed after `read_version` (even a plain append), it fails
    with `CommitConflict` and nothing changes; the caller re-reads, re-plans and retries. The app transaction
    ``(app_id, app_version)`` lands in the same commit, so after an ambiguous failure (a timeout)
    `committed_app_version` tells whether it happened.

    Args:
        adds: Files written with `write_data_file` for this table.
        removes: Files of the table at `read_version` whose rows the adds replace.
        read_version: The table version the commit was planned against.
        app_id: Identifies the writer (e.g. ``vitaclip-index``).
        app_version: Increases with each commit of that writer.
        metadata: Custom keys for the commit (run id, counts); they land at the top level of the commit info.
        require: App transaction versions the commit needs at `read_version` (a later change is a conflict).

    Raises:
        CommitConflict: Another writer committed since `read_version`.
        RecordChangedError: An app transaction of `require` has another version at `read_version`.
        ValueError: A file of another table, or a removal of a file the table does not hold at `read_version`.
    """
    _check_table_name(table)
    for data_file in adds:
        if data_file.table != table:
            raise ValueError(f"cannot add {data_file.table} file {data_file.path} to the {table} table")
    latest = open_table(location, table)
    if latest is None:
        raise FileNotFoundError(f"no Delta table at {location.table_uri(table)}; create_tables first")
    if latest.version() != read_version:
        raise CommitConflict(
            f"{location.table_uri(table)} is at version {latest.version()}, the commit was planned at {read_version}"
        )
    check_writable(latest, table)  # settings an analyst changed while the run worked: refused, not retried
    check_records(latest, require or {})
    _check_added_files_exist(location, table, adds)
    if removes:
        held = {urllib.parse.unquote(path) for path in pa.table(latest.get_add_actions()).column("path").to_pylist()}
        unknown = sorted(removed.path for removed in removes if removed.path not in held)
        if unknown:
            raise ValueError(f"cannot remove files the {table} table does not hold at {read_version}: {unknown}")
    now_ms = int(time.time() * 1000)
    actions: list[AddAction | RemoveAction] = [
        AddAction(
            path=data_file.path,
            size=data_file.size_bytes,
            partition_values={},
            modification_time=data_file.modification_time_ms,
            data_change=True,
            stats=data_file.stats,
        )
        for data_file in adds
    ]
    actions += [
        RemoveAction(path=r.path, data_change=True, deletion_timestamp=now_ms, size=r.size_bytes, partition_values={})
        for r in removes
    ]
    properties = CommitProperties(
        custom_metadata=dict(metadata),
        max_commit_retries=0,  # a commit at any version but read_version + 1 would not be the one planned
        app_transactions=[Transaction(app_id, app_version)],
    )
    try:
        # In append mode delta-rs ignores the schema argument (it neither checks the files against it nor changes
        # the table's); data files were checked against table_schema when written.
        latest.create_write_transaction(actions, "append", latest.schema(), commit_properties=properties)
    except CommitFailedError as exc:
        raise CommitConflict(f"{location.table_uri(table)} changed since version {read_version}: {exc}") from exc
    return read_version + 1


def check_records(dt: DeltaTable, require: Mapping[str, int]) -> None:
    """Raises `RecordChangedError` for the first app id of `require` whose transaction version `dt` does not hold."""
    for app_id, expected in require.items():
        found = dt.transaction_version(app_id)
        if found != expected:
            raise RecordChangedError(
                f"{dt.table_uri.rstrip('/')} records {app_id} version {found} at table version {dt.version()}, not "
                f"{expected}",
                app_id=app_id, expected=expected, found=found,
            )  # fmt: skip


def record(dt: DeltaTable, app_id: str, version: int, *, metadata: Mapping[str, str] | None = None) -> int:
    """Records an app transaction ``(app_id, version)`` in a commit of its own at exactly ``dt.version() + 1``, which
    adds and removes no data file; returns that version.

    Delta keeps the last version of each app id in the table's state (`DeltaTable.transaction_version`), so this is
    a small record ordered with every commit: one that `commit` requires (``require``) either lands before it, or
    conflicts and sees it.

    Raises:
        CommitConflict: Another writer committed after `dt`'s version.
    """
    read_version = dt.version()
    properties = CommitProperties(
        custom_metadata=dict(metadata or {}), max_commit_retries=0, app_transactions=[Transaction(app_id, version)]
    )
    try:
        dt.create_write_transaction([], "append", dt.schema(), commit_properties=properties)
    except CommitFailedError as exc:
        raise CommitConflict(f"{dt.table_uri.rstrip('/')} changed since version {read_version}: {exc}") from exc
    return read_version + 1


# Files younger than this cannot have been vacuumed: vacuum's retention is whole hours, at least one (the job turns
# vacuum off at 0); half an hour of it allows for the storage's clock running ahead of this one (S3 refuses requests
# signed more than 15 minutes off its clock).
_VACUUM_SAFE_AGE_MS = 30 * 60 * 1000


def _check_added_files_exist(location: OutputLocation, table: str, adds: Sequence[DataFile]) -> None:
    """Raises FileNotFoundError (nothing committed) when a file to add is gone: a commit naming it would leave the
    table unreadable for every reader. A vacuum with a retention shorter than the time since a file was written
    deletes it before its commit. Only files old enough for that are looked up (none in a run that commits every
    few minutes), so a commit of thousands of files costs no request per file."""
    cutoff_ms = int(time.time() * 1000) - _VACUUM_SAFE_AGE_MS
    old = [data_file for data_file in adds if data_file.modification_time_ms < cutoff_ms]
    if not old:
        return
    filesystem, root = location.table_path(table)
    infos = filesystem.get_file_info([f"{root}/{data_file.path}" for data_file in old])
    gone = sorted(data_file.path for data_file, info in zip(old, infos, strict=True) if info.type != pafs.FileType.File)
    if gone:
        raise FileNotFoundError(
            f"{len(gone)} data files written for the {table} table are gone before their commit (deleted by a vacuum "
            f"with a retention shorter than the time since they were written?): {', '.join(gone[:5])}; nothing was "
            "committed, their videos are planned again by the next run"
        )


def committed_app_version(location: OutputLocation, table: str, app_id: str) -> int | None:
    """The last app transaction version `app_id` committed to a table (None if none): did an ambiguous commit land?"""
    dt = open_table(location, table)
    return None if dt is None else dt.transaction_version(app_id)


# ----------------------------------------------------------------------------------------------------- the log


@dataclass(frozen=True)
class LoggedAdd:
    """A data file added by a commit."""

    path: str
    size_bytes: int
    stats: dict[str, Any]


@dataclass(frozen=True)
class LogCommit:
    """What one commit of the Delta log changed.

    Attributes:
        version: The table version it made.
        adds: Data files it added.
        removes: Paths (relative to the table root) of data files it removed.
        commit_info: Its ``commitInfo`` action; custom metadata keys are at the top level.
        app_transactions: App id -> version of its ``txn`` actions.
        changes_metadata: Whether it changed the table's metadata or protocol (schema, properties).
        metadata: Its ``metaData`` action (the table's whole new metadata), None when it has none.
    """

    version: int
    adds: tuple[LoggedAdd, ...] = ()
    removes: tuple[str, ...] = ()
    commit_info: dict[str, Any] = field(default_factory=dict)
    app_transactions: dict[str, int] = field(default_factory=dict)
    changes_metadata: bool = False
    metadata: dict[str, Any] | None = None


def rows_shape(metadata: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a table's metadata (a ``metaData`` action) decides which rows its data files hold and how they read:
    the table's id, columns, partitioning and vitaclip's own properties. Other properties (an analyst's
    ``delta.checkpointInterval``, statistics settings) change none of it."""
    configuration = metadata.get("configuration") or {}
    return (
        metadata.get("id"),
        json.loads(metadata.get("schemaString") or "null"),
        tuple(metadata.get("partitionColumns") or ()),
        tuple(sorted((k, v) for k, v in configuration.items() if k.startswith("vitaclip."))),
    )


def metadata_of(dt: DeltaTable) -> dict[str, Any]:
    """An opened table version's metadata in the shape of a log ``metaData`` action (the keys `rows_shape` reads)."""
    meta = dt.metadata()
    return {
        "id": meta.id,
        "schemaString": dt.schema().to_json(),
        "partitionColumns": list(meta.partition_columns),
        "configuration": dict(meta.configuration),
    }


def log_changes(location: OutputLocation, table: str, *, after_version: int, upto_version: int) -> list[LogCommit]:
    """The commits of a table after `after_version` up to and including `upto_version`, read from the log.

    Reads the small ``_delta_log/<version>.json`` files only, never data files or checkpoints: this is how the
    index follows a table incrementally.

    Raises:
        LogUnavailableError: A commit's JSON is gone (log cleanup): read the table in full instead.
        ValueError: `after_version` is above `upto_version` or negative below -1.
    """
    if not -1 <= after_version <= upto_version:
        raise ValueError(f"need -1 <= after_version <= upto_version, got {after_version} and {upto_version}")
    filesystem, root = location.table_path(table)
    commits = []
    for version in range(after_version + 1, upto_version + 1):
        log_path = f"{root}/_delta_log/{version:020d}.json"
        try:
            with filesystem.open_input_stream(log_path) as stream:
                text = stream.read().decode("utf-8")
        except FileNotFoundError as exc:
            raise LogUnavailableError(
                f"commit {version} of {location.table_uri(table)} is not in its log (cleaned up or not made yet)"
            ) from exc
        commits.append(_parse_commit(version, text))
    return commits


def _parse_commit(version: int, text: str) -> LogCommit:
    adds: list[LoggedAdd] = []
    removes: list[str] = []
    commit_info: dict[str, Any] = {}
    app_transactions: dict[str, int] = {}
    changes_metadata = False
    metadata = None
    for line in text.splitlines():
        if not line.strip():
            continue
        action = json.loads(line)
        if "add" in action:
            add = action["add"]
            stats = json.loads(add["stats"]) if add.get("stats") else {}
            adds.append(LoggedAdd(urllib.parse.unquote(add["path"]), int(add["size"]), stats))
        elif "remove" in action:
            removes.append(urllib.parse.unquote(action["remove"]["path"]))
        elif "commitInfo" in action:
            commit_info = action["commitInfo"]
        elif "txn" in action:
            app_transactions[action["txn"]["appId"]] = int(action["txn"]["version"])
        elif "metaData" in action or "protocol" in action:
            changes_metadata = True
            metadata = action.get("metaData", metadata)
    return LogCommit(version, tuple(adds), tuple(removes), commit_info, app_transactions, changes_metadata, metadata)


# ----------------------------------------------------------------------------------------------------- reading


KEY_COLUMNS = ("video_id", "etag", "status", "attempts")


def read_keys(location: OutputLocation, *, version: int, model_id: str) -> pa.Table:
    """The planning keys of the videos table at `version` for one model: video_id, etag, status, attempts and file.

    Reads only those columns and ``model_id`` (column projection; Parquet row-group statistics skip more), from
    the files whose Delta statistics allow `model_id`: embeddings and thumbnails are never downloaded.

    Returns:
        Columns video_id, etag, status, attempts (null in rows written before schema version 3), and file (the
        data file's path relative to the table root, dictionary-encoded over every file the model may be in).
    """
    dt = open_table(location, "videos", version=version)
    if dt is None:
        raise FileNotFoundError(f"no Delta table at {location.table_uri('videos')}")
    check_table(dt, "videos")
    table_uri = dt.table_uri.rstrip("/")
    uris = dt.file_uris(file_pruning_predicate=[("model_id", "=", model_id)])
    filesystem, root = location.table_path("videos")
    relative = [_relative_file(uri, table_uri, location.table_uri("videos")) for uri in uris]
    schema = pa.schema([f for f in table_schema("videos", 1) if f.name in (*KEY_COLUMNS, "model_id")])
    paths = [f"{root}/{path}" for path in relative]
    try:
        dataset = ds.dataset(paths, schema=schema, format="parquet", filesystem=filesystem)
        where = pc.field("model_id") == model_id
        scanned = scan(dataset, [*KEY_COLUMNS, FILE_INDEX], where, where_columns=["model_id"])
    except OSError:
        check_data_files(location, "videos", version, relative)
        raise
    # The file of each row as a code into one list of paths: 4 bytes a row, not its path's string.
    names = pa.array(relative, pa.string())
    files = pa.chunked_array(
        [pa.DictionaryArray.from_arrays(chunk, names) for chunk in scanned.column(FILE_INDEX).chunks],
        pa.dictionary(pa.int32(), pa.string()),
    )
    return pa.table(
        [*(scanned.column(name) for name in KEY_COLUMNS), files],
        schema=pa.schema(
            [
                *(schema.field(name) for name in KEY_COLUMNS),
                pa.field("file", pa.dictionary(pa.int32(), pa.string()), False),
            ]
        ),
    )


def check_data_files(location: OutputLocation, table: str, version: int | None, files: Sequence[str]) -> None:
    """Raises `DataFilesMissingError` naming the data `files` (relative to the table root) of a table version (None:
    the current one) that are gone: one request per file, so only after a read of them failed."""
    filesystem, root = location.table_path(table)
    infos = filesystem.get_file_info([f"{root}/{path}" for path in files])
    gone = [path for path, info in zip(files, infos, strict=True) if info.type != pafs.FileType.File]
    if gone:
        uri = redact_text(location.table_uri(table))
        raise DataFilesMissingError(
            f"the {table} table at {uri} ({'its current version' if version is None else f'version {version}'}) "
            f"names {len(gone)} data files that are gone "
            f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}), deleted by hand or by another tool: no "
            f"reader can read it. delta-rs's repair removes them from the table (python -c \"from deltalake import "
            f"DeltaTable; DeltaTable('{uri}').repair()\"); the next run indexes their videos again"
        )


def data_file_paths(dt: DeltaTable) -> list[str]:
    """Paths, relative to the table root, of the data files of an opened table version (from its add actions)."""
    actions = pa.table(dt.get_add_actions(flatten=True))
    return sorted(urllib.parse.unquote(p) for p in actions.column("path").to_pylist())


def may_hold_model(location: OutputLocation, table: str, model_id: str) -> bool:
    """Whether the table's current files may hold rows of `model_id`, from the log's file statistics only (no data
    file is read): False when no file's ``model_id`` range includes it. A file without statistics may."""
    dt = open_table(location, table)
    if dt is None:
        return False
    actions = pa.table(dt.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return False
    if "min.model_id" not in actions.column_names or "max.model_id" not in actions.column_names:
        return True
    lows, highs = actions.column("min.model_id").to_pylist(), actions.column("max.model_id").to_pylist()
    for low, high in zip(lows, highs, strict=True):
        if low is None or high is None or low <= model_id <= high:
            return True
    return False


def _relative_file(uri: str, *table_uris: str) -> str:
    """The path of a data file URI relative to its table root. delta-rs gives absolute URIs with the root's
    characters percent-encoded (``/out/my%20out/videos/part-1.parquet``, ``file:///out/out%231/videos/``), a
    location names it as written (``/out/my out/videos``): both are compared decoded. (A root holding ``%`` itself is
    refused by `index.stores`.)"""
    path = urllib.parse.unquote(uri.removeprefix("file://"))
    for table_uri in table_uris:
        root = urllib.parse.unquote(table_uri.removeprefix("file://")).rstrip("/") + "/"
        if path.startswith(root):
            return path[len(root) :]
    raise ValueError(f"data file {uri} is not under the table root {table_uris[0]}")


def rewrite_without(
    location: OutputLocation,
    table: str,
    path: str,
    video_ids: Collection[str],
    *,
    model_id: str,
    name: str,
    embed_dim: int | None = None,
) -> DataFile | None:
    """Writes a copy of a data file without the rows of `video_ids` under `model_id`; None when no row is left.

    Used when re-indexed videos replace their old rows: commit the copy as an add and the old file as a remove.
    A file may hold rows of several models (a job writes one model's rows per file, but an ``optimize.compact``
    or a rewrite by other tools merges files): the rows of the same videos under other models stay.

    Args:
        path: The data file, relative to the table root.
        model_id: The model whose rows of `video_ids` go.
        name: The new file's name (see `write_data_file`).
        embed_dim: The table's embedding size; None reads it from the table properties.
    """
    filesystem, root = location.table_path(table)
    data = read_file(filesystem, f"{root}/{path}")
    drop = pc.and_(
        pc.is_in(data.column("video_id"), value_set=pa.array(sorted(set(video_ids)), pa.string())),
        pc.equal(data.column("model_id"), model_id),
    )
    rest = data.filter(pc.invert(pc.fill_null(drop, False)))
    if rest.num_rows == 0:
        return None
    return write_data_file(location, table, rest, name=name, embed_dim=embed_dim)


def _retention_hours_of(dt: DeltaTable) -> float:
    """The table's ``delta.deletedFileRetentionDuration`` in hours (``interval 7 days`` and the like)."""
    setting = dt.metadata().configuration.get("delta.deletedFileRetentionDuration")
    match = re.fullmatch(r"\s*interval\s+(\d+)\s+(\w+?)s?\s*", setting or "", flags=re.IGNORECASE)
    if not match:
        return _DEFAULT_DELETED_FILE_RETENTION_HOURS
    hours_per = {"week": 168.0, "day": 24.0, "hour": 1.0, "minute": 1 / 60, "second": 1 / 3600}
    return int(match.group(1)) * hours_per.get(match.group(2).lower(), math.inf)


_TEMPORARY_RE = re.compile(r"^\.[A-Za-z0-9][A-Za-z0-9._=-]*\.parquet\.[0-9a-f]{32}\.tmp$")  # write_data_file's


def vacuum(location: OutputLocation, *, retention_hours: float, full: bool = True) -> dict[str, int]:
    """Deletes data files of both tables that no version younger than `retention_hours` references; counts them.

    That covers files removed by commits and, with `full`, files no commit ever referenced (left by killed runs or
    lost commit races). Keep the retention longer than a run takes, or files a running job wrote but has not
    committed yet go too.

    delta-rs refuses a retention below the table's ``delta.deletedFileRetentionDuration`` (7 days by default)
    unless its check is turned off; vitaclip turns it off only for such a retention, as the caller chose it.
    delta-rs takes whole hours: a fraction is rounded up (files are kept longer, never shorter). Vacuum records
    its own commits, so a run committing at the same time gets `CommitConflict` and retries.
    """
    if not 0 <= retention_hours <= MAX_RETENTION_HOURS:  # delta-rs panics past its time range (NaN too)
        raise ValueError(f"retention_hours must be 0 to {MAX_RETENTION_HOURS:,}, got {retention_hours}")
    if detect_old_layout(location):  # the old parts sit untracked in the table folders until migrated
        raise ValueError(old_layout_message(location))
    hours = math.ceil(retention_hours)
    deleted: dict[str, int] = {}
    for table in TABLES:
        dt = open_table(location, table)
        if dt is None:
            deleted[table] = 0
            continue
        enforce = hours >= _retention_hours_of(dt)
        # delta-rs's own vacuum only for what commits removed: its full mode deletes every file of the table folder
        # the log does not name, whoever put it there (videos given as the output's `videos` folder went too).
        files = dt.vacuum(retention_hours=hours, dry_run=False, enforce_retention_duration=enforce, full=False)
        deleted[table] = len(files)
        if full:
            deleted[table] += _sweep_orphans(location, table, hours, enforce, already=set(files)) + _sweep_temporaries(
                location, table, hours
            )
    return deleted


_DATA_FILE_RE = re.compile(
    r"^part-[A-Za-z0-9._=-]*\.parquet$"
)  # data files as Delta writers name them (vitaclip's too)


def _sweep_orphans(location: OutputLocation, table: str, hours: int, enforce: bool, *, already: set[str]) -> int:
    """Deletes the data files no commit ever named (left by killed runs or lost commit races) that are older than
    `hours`: of the unnamed files delta-rs's full vacuum would delete, those named like a data file, in the table
    folder itself. Any other file found there is left alone and logged."""
    dt = open_table(location, table)
    if dt is None:
        return 0
    unnamed = set(dt.vacuum(retention_hours=hours, dry_run=True, enforce_retention_duration=enforce, full=True))
    unnamed -= already  # the files commits removed, deleted just before (their removes are still in the log)
    orphans = [path for path in unnamed if _DATA_FILE_RE.match(path)]
    others = sorted(unnamed.difference(orphans))
    if others:
        log.warning(
            "%s holds %d files that are not data files of the table (%s): left alone; the table's folder should "
            "hold the table only",
            redact_url(location.table_uri(table)),
            len(others),
            ", ".join(repr(p) for p in others[:3]) + (", ..." if len(others) > 3 else ""),
        )
    filesystem, root = location.table_path(table)
    swept = 0
    for path in orphans:
        with contextlib.suppress(FileNotFoundError):  # another vacuum took it
            filesystem.delete_file(f"{root}/{path}")
            swept += 1
    return swept


def _sweep_temporaries(location: OutputLocation, table: str, hours: int) -> int:
    """Deletes the hidden temporary files (``.<name>.<hex>.tmp``) of local writes killed before their rename that
    are older than `hours`; delta-rs's vacuum skips hidden files. Object stores write no temporaries."""
    filesystem, root = location.table_path(table)
    if not isinstance(filesystem, pafs.LocalFileSystem):
        return 0
    cutoff_ns = time.time_ns() - hours * 3600 * 1_000_000_000
    swept = 0
    for info in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if _TEMPORARY_RE.match(info.base_name) and info.type == pafs.FileType.File and (info.mtime_ns or 0) < cutoff_ns:
            filesystem.delete_file(info.path)
            swept += 1
    return swept

"""Reading the committed output tables (``OUT/videos``, ``OUT/segments``: Delta Lake) for vitaclip's own readers.

The job writes through `index.delta_tables` and `index.commits`; this module reads, at the latest version or a
given one, only the columns asked for. Analysts need none of it: any Delta reader (DuckDB ``delta_scan``, polars
``read_delta``, ``deltalake``, Spark) reads the same tables.

Every function takes an output as an `OutputLocation`, a URL or path, or a `index.stores.Store`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc

from index.delta_tables import (
    TABLES,
    OutputLocation,
    check_data_files,
    check_table,
    data_file_paths,
    detect_old_layout,
    old_layout_message,
    open_table,
    pyarrow_dataset,
    scan,
)
from index.segments import INFO_FILE, IndexUnusableError, parse_info, referenced_files
from vitaclip.redact import redact_url

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from index.stores import Store

__all__ = [
    "TABLES",
    "Output",
    "as_location",
    "data_files",
    "local_copy",
    "read_table",
    "table_states",
    "table_versions",
]

Output: TypeAlias = "OutputLocation | Store | str | os.PathLike[str]"
"""An output as the functions here take it."""


def as_location(output: Output) -> OutputLocation:
    """An `OutputLocation` for an output given as one, as a URL or path, or as a store."""
    if isinstance(output, OutputLocation):
        return output
    if isinstance(output, (str, os.PathLike)):
        return OutputLocation.from_url(os.fspath(output))
    location = getattr(output, "location", None)
    if isinstance(location, OutputLocation):
        return location
    raise TypeError(f"not an output: {output!r}")


def _open_checked(location: OutputLocation, table: str, version: int | None) -> Any:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; tables: {TABLES}")
    dt = open_table(location, table, version=version)
    if dt is None:
        if detect_old_layout(location):
            raise ValueError(old_layout_message(location))
        return None
    check_table(dt, table)
    return dt


def table_versions(output: Output) -> dict[str, int] | None:
    """The latest version of each table, or None when the output has no tables yet."""
    found = table_states(output)
    return None if found is None else found[0]


def table_states(output: Output) -> tuple[dict[str, int], dict[str, str]] | None:
    """The latest version and the Delta table id (``metaData.id``, fixed when a table is created) of each table, or
    None when the output has no tables yet. A table deleted and created again has a new id: its versions start over
    and its log does not continue the old one."""
    location = as_location(output)
    if detect_old_layout(location):  # old records left: a migration that did not finish (or none yet)
        raise ValueError(old_layout_message(location))
    versions, ids = {}, {}
    for table in TABLES:
        dt = _open_checked(location, table, None)
        if dt is None:
            return None
        versions[table] = dt.version()
        ids[table] = str(dt.metadata().id)
    return versions, ids


def read_table(
    output: Output,
    table: str,
    columns: Sequence[str] | None = None,
    *,
    model_id: str | None = None,
    version: int | None = None,
    where: pc.Expression | None = None,
) -> pa.Table | None:
    """The committed rows of a table (of one model when `model_id` is given); None when there is no table yet.

    Reads only `columns` (plus ``model_id`` for the filter), from the files whose statistics allow `model_id` and
    the `where` condition (an Arrow expression over the table's columns).

    Raises:
        ValueError: An output in the previous layout (with the migrate command to run) or an unknown table.
        TableMismatchError: A table of another schema version.
    """
    location = as_location(output)
    dt = _open_checked(location, table, version)
    if dt is None:
        return None
    wanted = list(columns) if columns else None
    read_columns = wanted if wanted is None or model_id is None or "model_id" in wanted else [*wanted, "model_id"]
    row_filter = (pc.field("model_id") == model_id) if model_id is not None else None
    if where is not None:
        row_filter = where if row_filter is None else row_filter & where
    where_columns = ["model_id"] if where is None else None  # a caller's condition: its columns are not known
    try:
        data = scan(pyarrow_dataset(location, table, dt), read_columns, row_filter, where_columns=where_columns)
    except FileNotFoundError:  # a data file deleted by hand: which, and delta-rs's repair, not Arrow's error
        check_data_files(location, table, dt.version(), data_file_paths(dt))
        raise
    if wanted is not None and read_columns != wanted:
        data = data.select(wanted)
    return data


def data_files(output: Output, table: str, *, version: int | None = None) -> list[str]:
    """Paths, relative to the table's root, of the data files of a table's version (empty when there is no table)."""
    location = as_location(output)
    dt = _open_checked(location, table, version)
    if dt is None:
        return []
    return data_file_paths(dt)


_SEGMENT_FILE = re.compile(r"\.\d{6,}-[0-9a-f]{8}\.")  # index segment and deletion files: a fresh id per write


def _written_once(folder: str, rel: str) -> bool:
    """Whether an output file is written once under a name never reused (data files, Delta commits, index
    segments), so a cached copy of it stays good; the index's info file, the run records and the log's checkpoint
    pointer change."""
    if folder in ("videos", "segments"):
        return not rel.endswith("_last_checkpoint")
    return folder == "index" and bool(_SEGMENT_FILE.search(rel.rsplit("/", 1)[-1]))


_ABANDONED_PARTIAL_SECONDS = 15 * 60
"""A partial copy untouched this long was abandoned (its copier was killed, or stopped mid-copy at exit: reloads run
in a daemon thread); one being written is touched at every chunk of 8 MiB."""


def _drop_superseded(folder: Path, listed: set[str]) -> None:
    """Removes cached index files that the output no longer has, except those the cached info file still names
    (a process sharing the cache may be loading them; they go at the next update), and partial copies abandoned by
    their copier (`_ABANDONED_PARTIAL_SECONDS`; a copy under way is left alone, whichever process makes it)."""
    if not folder.is_dir():
        return
    try:
        named = referenced_files(json.loads((folder / INFO_FILE).read_text()))
    except (OSError, ValueError):
        named = set()
    _remove_abandoned_partials(folder)
    for path in folder.iterdir():
        if path.name not in listed and path.name not in named and not path.name.startswith("."):
            path.unlink(missing_ok=True)


def _remove_abandoned_partials(folder: Path) -> None:
    """Removes the partial copies in `folder` that no copier has touched for `_ABANDONED_PARTIAL_SECONDS`: a base
    index's copy cut short is GiB, and named for its copier only (no later copy replaces it)."""
    abandoned_before = time.time() - _ABANDONED_PARTIAL_SECONDS
    for path in folder.glob(".*.partial"):
        try:
            if path.stat().st_mtime < abandoned_before:
                path.unlink(missing_ok=True)
        except OSError:  # gone meanwhile
            continue


def _cacheable(rel: str, location: OutputLocation) -> bool:
    """Whether an object of the output (its key below the output's prefix) may be copied into the cache: plain
    segments only. A key such as ``index/../../../x`` (whoever can write to the bucket can make one) would land
    outside the cache; vitaclip never writes such keys, so it is left out, and said."""
    parts = rel.split("/")
    if all(part not in ("", ".", "..") and "\\" not in part and "\0" not in part for part in parts):
        return True
    log.warning(
        "%s: object %r left out of the local copy: not a file vitaclip writes", redact_url(location.url), rel[:200]
    )
    return False


def local_copy(
    output: str, *, s3_endpoint_url: str | None = None, cache_root: str | None = None, tables: bool = True
) -> Path:
    """A local folder with an output's tables, index and run records: a local output itself, or a cached copy of
    one on an object store (``s3://``, ``gs://``, ``az://``), for the search engine.

    Data files, Delta commits and index segments never change once written and are fetched once; the index's info
    file, the run records and the log's checkpoint pointer are fetched again; index files an update superseded and
    run records deleted from the output are dropped from the cache. The index is copied as one published version
    (`_copy_index`). Several processes may copy into one cache at once (service replicas on a node).
    With ``tables=False`` only the index and the run records are copied (the search engine then reads the tables
    where they are: `index.search.SearchEngine`'s `tables`). The cache lives under ``~/.cache/vitaclip/outputs`` (or
    `cache_root`), one folder per output URL and S3 endpoint.
    """
    import hashlib

    import pyarrow.fs as pafs

    if "://" not in output or output.startswith("file://"):
        return Path(output.removeprefix("file://"))
    location = OutputLocation.from_url(output, s3_endpoint_url=s3_endpoint_url)
    filesystem, base = location.filesystem()
    root = Path(cache_root) if cache_root else Path.home() / ".cache" / "vitaclip" / "outputs"
    # One folder per output and endpoint: a bucket of the same name on another server is another output.
    cache = root / hashlib.sha256(f"{location.url}\0{location.s3_endpoint_url or ''}".encode()).hexdigest()[:16]
    for folder in ("videos", "segments", "index", "runs") if tables else ("index", "runs"):
        if folder == "index":
            _copy_index(filesystem, base, cache, location)
            continue
        infos = filesystem.get_file_info(pafs.FileSelector(f"{base}/{folder}", recursive=True, allow_not_found=True))
        listed = [i.path[len(base) + 1 :] for i in infos if i.type == pafs.FileType.File]
        for rel in (rel for rel in listed if _cacheable(rel, location)):
            if not ((cache / rel).exists() and _written_once(folder, rel)):
                _fetch(filesystem, f"{base}/{rel}", cache / rel)
        if folder == "runs":  # records deleted from the output go here too: they name the folders media come from
            _remove_abandoned_partials(cache / folder)
            kept = set(listed)
            for path in (cache / folder).glob("*"):
                if path.is_file() and not path.name.startswith(".") and f"{folder}/{path.name}" not in kept:
                    path.unlink(missing_ok=True)
    return cache


_INDEX_COPY_TRIES = 5


def _copy_index(filesystem: Any, base: str, cache: Path, location: OutputLocation) -> None:
    """Copies one published version of the index: its info file (read once), the files that info names, then the
    info itself into the cache, last.

    An update may publish while this copies (a nightly run, while a service starts): the info read first stays the
    one copied, so the cache never pairs one update's info with another's files. A file it names that the output
    no longer has was removed by a later update's clean-up: the copy starts again from the newer info. A file
    missing while the info is unchanged is missing for good; the engine's load says so.
    """
    import pyarrow.fs as pafs

    folder, remote = cache / "index", f"{base}/index"
    for _ in range(_INDEX_COPY_TRIES):
        data = _read_info_bytes(filesystem, remote, location)
        try:
            names = referenced_files(parse_info(data))
        except IndexUnusableError:  # damaged: copied as it is, and the engine's load says what is wrong with it
            names = set()
        names = {name for name in names if _cacheable(f"index/{name}", location)}
        # Kept too: what the output still has, which another process sharing this cache may be copying for the
        # version it read (an update removes the files of the version before the one it replaces only).
        stored = filesystem.get_file_info(pafs.FileSelector(remote, allow_not_found=True))
        _drop_superseded(folder, names | {INFO_FILE} | {info.base_name for info in stored})
        try:
            for name in sorted(names):
                if not (folder / name).exists():  # index files are written once under a name never reused
                    _fetch(filesystem, f"{remote}/{name}", folder / name)
        except FileNotFoundError:
            if _read_info_bytes(filesystem, remote, location) != data:
                continue  # superseded while copying: copy the newer update
        _write_atomically(folder / INFO_FILE, data)
        return
    raise IndexUnusableError(
        f"the index at {redact_url(location.url)} changed {_INDEX_COPY_TRIES} times while it was being copied; "
        "try again"
    )


def _read_info_bytes(filesystem: Any, remote: str, location: OutputLocation) -> bytes:
    try:
        with filesystem.open_input_stream(f"{remote}/{INFO_FILE}") as f:
            return bytes(f.read())
    except FileNotFoundError:  # say where it is missing: the output, not this cache
        raise IndexUnusableError(
            f"no index at {redact_url(location.url)} (index/{INFO_FILE} missing, or the bucket or container does not "
            "exist): run the job on it, or build one with `vitaclip build-index`"
        ) from None


def _partial_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")  # one per copier


def _fetch(filesystem: Any, path: str, target: Path) -> None:
    """Copies one object into the cache under a temporary name, then renames it into place (streamed: index files
    can be many GiB). Raises FileNotFoundError when there is no such object."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(target)
    try:
        with filesystem.open_input_stream(path) as src, open(partial, "wb") as out:
            while chunk := src.read(8 * 2**20):
                out.write(chunk)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(target)
    partial.write_bytes(data)
    os.replace(partial, target)

"""The committed rows a search engine answers with, held as Arrow columns sorted by row id.

A search hit, ``/videos/{id}``, a thumbnail and a "more like this" all start from a row id (the FAISS id) or a video
id, which maps to a row id (`index.schema.row_id_for`). A `RowCatalog` keeps one table's rows of one model in
memory as Arrow columns (about 150-250 bytes per row, labels dictionary-encoded) with the row ids as a sorted
int64 array, so a lookup is a binary search and a hit's fields are one ``take``. Each row also remembers which
Parquet row group of which data file holds it: a thumbnail or a stored embedding is read from that row group only,
and a row id the catalog does not hold reads nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index.delta_tables import OutputLocation, check_data_files, open_parquet
from index.schema import plain_types
from index.tables import data_files

VIDEO_COLUMNS = (
    "row_id", "video_id", "uri", "labels", "label_scores", "duration_seconds", "status", "etag", "size_bytes", "run_id",
)  # fmt: skip
SEGMENT_COLUMNS = (
    "row_id", "video_id", "labels", "label_scores", "segment_index", "start_seconds", "end_seconds", "run_id",
)  # fmt: skip
_GROUP = "_group"  # index into RowCatalog.groups: (data file, row group) of the row
_CELL_READ_ATTEMPTS = 3  # per S3 request of a read made while a client waits (thumbnails, stored vectors)
_CACHE_BYTES = 64 * 2**20  # row groups' thumbnails or embeddings kept (as Arrow), per catalog
_MAX_ROW_ID = 2**63 - 1  # row ids are non-negative int64 (`index.schema.row_id_for`)


class RowCatalog:
    """One table's committed rows of one model at one version of the table, by row id.

    Args:
        location: the output (local or on an object store: data files are read with ranged reads, several at once).
        table: ``videos`` or ``segments``.
        model_id: only this model's rows are held.
        columns: the columns held (``row_id`` among them).
        version: the table version (None: the latest).
        previous: a catalog of an earlier version of the same table: its rows of data files still in this version
            are taken over instead of read again.
    """

    def __init__(
        self,
        location: OutputLocation,
        table: str,
        model_id: str,
        columns: Sequence[str] = (),
        *,
        version: int | None = None,
        previous: RowCatalog | None = None,
    ) -> None:
        self.table_name, self.model_id = table, model_id
        self.columns = list(columns or (VIDEO_COLUMNS if table == "videos" else SEGMENT_COLUMNS))
        self.location = location
        self._filesystem, base = location.filesystem()
        # A thumbnail or a stored vector is read while a client waits: few tries, so a store that is down answers
        # "unavailable" within the request's time limit.
        self._cell_filesystem, _ = location.filesystem(attempts=_CELL_READ_ATTEMPTS)
        self._folder = f"{base}/{table}"
        self.files = data_files(location, table, version=version)  # names in the table's folder, each written once
        self.groups: list[tuple[int, int]] = []  # (index into files, row group)
        pieces, known = [], set()
        if previous is not None and (previous.location.url, previous.table_name, previous.model_id) == (
            location.url,
            table,
            model_id,
        ):
            if previous.columns == self.columns:
                kept = self._kept(previous)
                pieces += [kept] if kept.num_rows else []
                known = set(previous.files)
        new = [i for i, name in enumerate(self.files) if name not in known]
        try:
            with ThreadPoolExecutor(max_workers=min(16, max(1, len(new)))) as pool:  # object stores: latency-bound
                for file_index, groups in zip(new, pool.map(self._read, new), strict=True):
                    for row_group, rows in groups:
                        marker = pa.array(np.full(rows.num_rows, len(self.groups), dtype=np.int32))
                        pieces.append(rows.append_column(_GROUP, marker))
                        self.groups.append((file_index, row_group))
        except FileNotFoundError:  # a data file deleted by hand: which, and delta-rs's repair, not Arrow's error
            check_data_files(location, table, version, [self.files[i] for i in new])
            raise
        if pieces:
            rows = pa.concat_tables(pieces, promote_options="permissive")
            order = np.argsort(rows.column("row_id").to_numpy(), kind="stable")
            rows = rows.take(order)
        else:
            empty = self._open(self.files[0]).schema_arrow.empty_table() if self.files else None
            rows = empty.select(self.columns) if empty is not None else pa.table({"row_id": pa.array([], pa.int64())})
            rows = rows.append_column(_GROUP, pa.array([], pa.int32()))
        self.rows = _compact(rows)
        self.row_ids: np.ndarray = self.rows.column("row_id").to_numpy()
        self.label_names = _label_names(self.rows)
        self.duration_range = _range(self.rows, "duration_seconds")  # (NaN, NaN): none known
        self._cache: OrderedDict[tuple[int, str], tuple[np.ndarray, pa.Array, int]] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    def _open(self, name: str, columns: Sequence[str] = (), row_group: int | None = None) -> pq.ParquetFile:
        """A data file to read `columns` of one row group (None: all) from."""
        return open_parquet(self._filesystem, f"{self._folder}/{name}", columns, row_group)

    def _read(self, file_index: int) -> list[tuple[int, pa.Table]]:
        """(row group, its rows of this model) of one data file, the held columns only."""
        groups = []
        parquet = self._open(self.files[file_index], [*self.columns, "model_id"])
        for group in range(parquet.num_row_groups):
            rows = plain_types(parquet.read_row_group(group, columns=[*self.columns, "model_id"]))
            rows = rows.filter(pc.equal(rows.column("model_id"), self.model_id)).drop_columns(["model_id"])
            if rows.num_rows:
                groups.append((group, rows))
        return groups

    def _kept(self, previous: RowCatalog) -> pa.Table:
        """The rows of `previous` in files that are still the table's (data files never change), renumbered."""
        index_of = {path: i for i, path in enumerate(self.files)}
        renumber = np.full(len(previous.groups), -1, dtype=np.int32)
        for old, (file_index, row_group) in enumerate(previous.groups):
            new_index = index_of.get(previous.files[file_index])
            if new_index is not None:
                renumber[old] = len(self.groups)
                self.groups.append((new_index, row_group))
        mapped = renumber[previous.rows.column(_GROUP).to_numpy()]
        keep = mapped >= 0
        rows = previous.rows.filter(pa.array(keep))
        rows = rows.set_column(rows.schema.get_field_index(_GROUP), _GROUP, pa.array(mapped[keep], pa.int32()))
        if "run_id" in rows.column_names:
            rows = rows.set_column(
                rows.schema.get_field_index("run_id"), "run_id", rows.column("run_id").cast(pa.string())
            )
        if "labels" in rows.column_names:  # plain again, to meet the new files' rows (encoded once, below)
            item = rows.schema.field("labels").type.value_field.name  # as the files name it ("element")
            plain = rows.column("labels").cast(pa.list_(pa.field(item, pa.string())))
            rows = rows.set_column(rows.schema.get_field_index("labels"), "labels", plain)
        return rows

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.row_ids.nbytes)

    def positions(self, row_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions of `row_ids` in the catalog, -1 for each one it does not hold."""
        wanted = np.asarray(row_ids, dtype=np.int64)
        at = np.searchsorted(self.row_ids, wanted)
        found = at < len(self.row_ids)
        found[found] = self.row_ids[at[found]] == wanted[found]
        return np.where(found, at, -1)

    def rows_of(self, row_ids: Sequence[int] | np.ndarray) -> list[dict[str, Any] | None]:
        """The held fields of each row id (None for one the catalog does not hold), in one ``take``."""
        at = self.positions(row_ids)
        present = at[at >= 0]
        taken = iter(self.rows.take(present).drop_columns([_GROUP]).to_pylist()) if len(present) else iter(())
        return [next(taken) if p >= 0 else None for p in at]

    def row(self, row_id: int) -> dict[str, Any] | None:
        return self.rows_of([row_id])[0] if 0 <= row_id <= _MAX_ROW_ID else None

    def cell(self, row_id: int, column: str) -> Any:
        """A column of one row that the catalog does not hold in memory (``thumbnail_jpeg``, ``embedding``), read
        from the row group holding it (kept in a small cache, as Arrow); None for a row id the catalog does not
        hold."""
        if not 0 <= row_id <= _MAX_ROW_ID:
            return None
        at = int(self.positions([row_id])[0])
        if at < 0:
            return None
        group = int(self.rows.column(_GROUP)[at].as_py())
        key = (group, column)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if cached is None:
            cached = self._read_cells(group, column)
            with self._lock:
                if key not in self._cache:
                    self._cache[key] = cached
                    self._cache_bytes += cached[2]
                while self._cache_bytes > _CACHE_BYTES and len(self._cache) > 1:
                    _, (_, _, size) = self._cache.popitem(last=False)
                    self._cache_bytes -= size
        ids, values, _ = cached
        found = np.flatnonzero(ids == row_id)
        return values[int(found[-1])].as_py() if len(found) else None

    def _read_cells(self, group: int, column: str) -> tuple[np.ndarray, pa.Array, int]:
        """(row ids, `column`) of this model's rows in one row group, and the bytes they hold."""
        file_index, row_group = self.groups[group]
        columns = ["row_id", "model_id", column]
        parquet = open_parquet(self._cell_filesystem, f"{self._folder}/{self.files[file_index]}", columns, row_group)
        read = parquet.read_row_group(row_group, columns=columns)
        read = plain_types(read)
        read = read.filter(pc.equal(read.column("model_id"), self.model_id))  # a file may hold several models
        return read.column("row_id").to_numpy(), read.column(column).combine_chunks(), read.nbytes


def _range(rows: pa.Table, column: str) -> tuple[float, float]:
    """(smallest, largest) non-null value of a numeric column; NaNs when there is none."""
    if column not in rows.column_names:
        return float("nan"), float("nan")
    found = pc.min_max(rows.column(column))
    low, high = found["min"].as_py(), found["max"].as_py()
    return (float("nan"), float("nan")) if low is None or high is None else (float(low), float(high))


def _label_names(rows: pa.Table) -> frozenset[str]:
    """Every label name the rows hold (a filter on another one can match nothing)."""
    if "labels" not in rows.column_names or rows.num_rows == 0:
        return frozenset()
    names = pc.list_flatten(rows.column("labels"))
    if pa.types.is_dictionary(names.type):
        dictionaries = pa.chunked_array([c.dictionary for c in names.chunks], type=names.type.value_type)
        return frozenset(str(n) for n in dictionaries.to_pylist())  # no chunks: rows without labels (all failed)
    return frozenset(pc.unique(names).to_pylist())


def _compact(rows: pa.Table) -> pa.Table:
    """`rows` with the label names and run ids dictionary-encoded (a handful repeat over millions of rows)."""
    if "run_id" in rows.column_names and rows.num_rows and pa.types.is_string(rows.schema.field("run_id").type):
        run_ids = rows.column("run_id").combine_chunks().dictionary_encode()
        rows = rows.set_column(rows.schema.get_field_index("run_id"), "run_id", run_ids)
    if "labels" not in rows.column_names or rows.num_rows == 0:
        return rows
    labels = rows.column("labels").combine_chunks()
    if not pa.types.is_list(labels.type) and not pa.types.is_large_list(labels.type):
        return rows
    values = labels.values.dictionary_encode()
    list_type = (pa.large_list if pa.types.is_large_list(labels.type) else pa.list_)(
        pa.field(labels.type.value_field.name, values.type)
    )
    compact = type(labels).from_arrays(labels.offsets, values, type=list_type, mask=labels.is_null())
    return rows.set_column(rows.schema.get_field_index("labels"), "labels", compact)

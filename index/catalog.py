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
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index.tables import data_files

VIDEO_COLUMNS = (
    "row_id", "video_id", "uri", "labels", "label_scores", "duration_seconds", "status", "etag", "size_bytes",
)  # fmt: skip
SEGMENT_COLUMNS = ("row_id", "video_id", "labels", "label_scores", "segment_index", "start_seconds", "end_seconds")
_GROUP = "_group"  # index into RowCatalog.groups: (data file, row group) of the row
_CACHE_BYTES = 64 * 2**20  # thumbnail row groups kept, per catalog


class RowCatalog:
    """One table's committed rows of one model (at the table's latest version), by row id.

    Args:
        root: a local output folder (the tables are ``root/<table>``).
        table: ``videos`` or ``segments``.
        model_id: only this model's rows are held.
        columns: the columns held (``row_id`` among them).
    """

    def __init__(
        self,
        root: Path,
        table: str,
        model_id: str,
        columns: Sequence[str] = (),
        *,
        previous: RowCatalog | None = None,
    ) -> None:
        self.table_name, self.model_id = table, model_id
        self.columns = list(columns or (VIDEO_COLUMNS if table == "videos" else SEGMENT_COLUMNS))
        self.files = [root / table / name for name in data_files(root, table)]
        self.groups: list[tuple[int, int]] = []  # (index into files, row group)
        pieces, known = [], set()
        if previous is not None and (previous.table_name, previous.model_id, previous.columns) == (
            table,
            model_id,
            self.columns,
        ):
            pieces.append(self._kept(previous))
            known = set(previous.files)
        for file_index, path in enumerate(self.files):
            if path not in known:
                pieces += self._read(file_index)
        if pieces:
            rows = pa.concat_tables(pieces)
            order = np.argsort(rows.column("row_id").to_numpy(), kind="stable")
            rows = rows.take(order)
        else:
            schema = pq.read_schema(self.files[0]) if self.files else None
            fields = [schema.field(c) for c in self.columns] if schema else [pa.field("row_id", pa.int64())]
            rows = pa.table({f.name: pa.array([], f.type) for f in fields}).append_column(
                _GROUP, pa.array([], pa.int32())
            )
        self.rows = _compact(rows)
        self.row_ids: np.ndarray = self.rows.column("row_id").to_numpy()
        self._cache: OrderedDict[tuple[int, str], tuple[dict[int, Any], int]] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    def _read(self, file_index: int) -> list[pa.Table]:
        """The rows of this model in one data file, a table per row group (marked with its index in `groups`)."""
        pieces = []
        parquet = pq.ParquetFile(self.files[file_index])
        for group in range(parquet.num_row_groups):
            rows = parquet.read_row_group(group, columns=[*self.columns, "model_id"])
            rows = rows.filter(pc.equal(rows.column("model_id"), self.model_id)).drop_columns(["model_id"])
            if rows.num_rows:
                marker = pa.array(np.full(rows.num_rows, len(self.groups), dtype=np.int32))
                pieces.append(rows.append_column(_GROUP, marker))
                self.groups.append((file_index, group))
        return pieces

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
        return self.rows_of([row_id])[0]

    def cell(self, row_id: int, column: str) -> Any:
        """A column of one row that the catalog does not hold in memory (``thumbnail_jpeg``, ``embedding``), read
        from the row group holding it (kept in a small cache); None for a row id the catalog does not hold."""
        at = int(self.positions([row_id])[0])
        if at < 0:
            return None
        group = int(self.rows.column(_GROUP)[at].as_py())
        key = (group, column)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached[0].get(row_id)
        file_index, row_group = self.groups[group]
        read = pq.ParquetFile(self.files[file_index]).read_row_group(row_group, columns=["row_id", column])
        values = dict(zip(read.column("row_id").to_pylist(), read.column(column).to_pylist(), strict=True))
        with self._lock:
            if key not in self._cache:
                self._cache[key] = (values, read.nbytes)
                self._cache_bytes += read.nbytes
            while self._cache_bytes > _CACHE_BYTES and len(self._cache) > 1:
                _, (_, size) = self._cache.popitem(last=False)
                self._cache_bytes -= size
        return values.get(row_id)


def _compact(rows: pa.Table) -> pa.Table:
    """`rows` with the label names dictionary-encoded (a handful of names repeat over millions of rows)."""
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

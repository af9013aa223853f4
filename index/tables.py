"""Reading committed tables: the latest commit record names the live Parquet parts of each table.

The job (``jobs.tables``) writes and commits; this module only reads, through any store with ``get_bytes(rel)`` and
``list(prefix)`` (a local folder or S3, see ``jobs.storage``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from index.schema import check_schema

TABLES = ("videos", "segments")
COMMITS = "_commits"


class ReadableStore(Protocol):
    def get_bytes(self, rel_path: str) -> bytes: ...

    def list(self, rel_prefix: str) -> list[str]: ...


def table_to_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_part(store: ReadableStore, rel: str, table: str, columns: Sequence[str] | None = None) -> pa.Table:
    data = store.get_bytes(rel)
    pf = pq.ParquetFile(io.BytesIO(data))
    check_schema(pf.schema_arrow, table)
    return pf.read(columns=list(columns) if columns else None)


@dataclass
class CommitState:
    """The latest commit record (seq 0 and no files when the output is new)."""

    seq: int = 0
    files: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in TABLES})
    consumed_staging: list[str] = field(default_factory=list)


def latest_commit(store: ReadableStore) -> CommitState:
    records = [p for p in store.list(COMMITS + "/") if p.endswith(".json")]
    if not records:
        return CommitState()
    rec = json.loads(store.get_bytes(max(records)))
    return CommitState(
        seq=int(rec["seq"]),
        files={t: list(rec["files"].get(t, [])) for t in TABLES},
        consumed_staging=list(rec.get("consumed_staging", [])),
    )


def live_files(store: ReadableStore, table: str) -> list[str]:
    """Parts of ``table`` in the latest commit: what readers read."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; tables: {TABLES}")
    return latest_commit(store).files[table]


def read_table(store: ReadableStore, table: str, columns: Sequence[str] | None = None) -> pa.Table | None:
    """All committed rows of a table (None when nothing is committed)."""
    parts = [read_part(store, rel, table, columns) for rel in live_files(store, table)]
    return pa.concat_tables(parts) if parts else None

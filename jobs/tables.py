"""Committed tables under OUT: staging, an atomic commit record, and garbage collection.

Layout::

    OUT/videos/part-<run>-<n>.parquet        live parts (the ones the latest commit record lists)
    OUT/segments/part-<run>-<n>.parquet
    OUT/_staging/<run_id>/{videos,segments}/part-<n>.parquet   a run's finished but uncommitted work
    OUT/_commits/<seq>.json                  commit records; the highest seq is the table's state

A run writes parts to its staging folder as it goes. Commit copies them to their final names, rewrites the live
parts that hold rows it replaces (same video and model id), writes the next commit record (the atomic step), then
deletes its staging folder and any file no record references. Killed before the record: nothing it did is visible,
and the next run reuses its staged parts. Killed after: the next run only cleans up. Readers, including plain
``read_parquet('OUT/videos/*.parquet')``, see one row per video and model id once cleanup has run (it runs at the
end of every commit and at the start of every run).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index.schema import check_schema
from index.tables import COMMITS, TABLES, latest_commit, live_files, read_part, read_table, table_to_bytes

__all__ = ["COMMITS", "TABLES", "latest_commit", "live_files", "read_part", "read_table", "table_to_bytes"]
from jobs.storage import Store

STAGING = "_staging"


def cleanup(store: Store) -> list[str]:
    """Deletes staging of already committed runs and parts no commit references. Returns what it deleted."""
    state = latest_commit(store)
    deleted = []
    for run_id in state.consumed_staging:
        for rel in store.list(f"{STAGING}/{run_id}/"):
            store.delete(rel)
            deleted.append(rel)
    for table in TABLES:
        live = set(state.files[table])
        for rel in store.list(f"{table}/"):
            if rel.endswith(".parquet") and rel not in live:
                store.delete(rel)
                deleted.append(rel)
    return deleted


def staged_runs(store: Store) -> list[str]:
    """Run ids with uncommitted staged parts (call after :func:`cleanup`)."""
    runs = {rel.split("/")[1] for rel in store.list(STAGING + "/") if rel.endswith(".parquet")}
    return sorted(runs)


def staged_parts(store: Store, run_ids: Iterable[str], table: str) -> list[str]:
    out: list[str] = []
    for run_id in run_ids:
        out.extend(p for p in store.list(f"{STAGING}/{run_id}/{table}/") if p.endswith(".parquet"))
    return sorted(out)


class StagingWriter:
    """Accumulates rows of one table and writes them as staged parts of about ``rows_per_part`` rows."""

    def __init__(self, store: Store, run_id: str, table: str, schema: pa.Schema, *, rows_per_part: int) -> None:
        self.store, self.run_id, self.table, self.schema = store, run_id, table, schema
        self.rows_per_part = rows_per_part
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._next = len(staged_parts(store, [run_id], table))
        self.rows_written = 0
        self.parts_written = 0

    @property
    def pending_rows(self) -> int:
        """Rows added but not yet written."""
        return self._pending_rows

    def add(self, table: pa.Table, *, flush: bool = True) -> None:
        """Queues ``table``'s rows; with ``flush``, writes a part once ``rows_per_part`` rows are pending."""
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
        if flush and self._pending_rows >= self.rows_per_part:
            self.flush()

    def flush(self) -> str | None:
        if not self._pending_rows:
            return None
        table = pa.concat_tables(self._pending).cast(self.schema)
        rel = f"{STAGING}/{self.run_id}/{self.table}/part-{self._next:06d}.parquet"
        self.store.put_bytes(rel, table_to_bytes(table))
        self._next += 1
        self.rows_written += table.num_rows
        self.parts_written += 1
        self._pending, self._pending_rows = [], 0
        return rel


class RunStager:
    """The staging of one run: a video's segment rows are always written before its video row.

    A resumed run treats a staged video row as finished work, so a video row must never reach storage before the
    segment rows it owns; segment rows whose video row never made it (a kill between the two writes) are dropped at
    commit. Parts are written once ``rows_per_part`` rows of either table are pending, or ``flush_seconds`` after the
    previous write, which bounds the work a killed driver loses.
    """

    def __init__(
        self,
        store: Store,
        run_id: str,
        schemas: dict[str, pa.Schema],
        *,
        rows_per_part: int,
        flush_seconds: float,
        clock: Any = time.monotonic,
    ) -> None:
        self.writers = {t: StagingWriter(store, run_id, t, schemas[t], rows_per_part=rows_per_part) for t in TABLES}
        self.rows_per_part, self.flush_seconds, self._clock = rows_per_part, flush_seconds, clock
        self._last_flush = clock()

    @property
    def parts_written(self) -> int:
        return sum(w.parts_written for w in self.writers.values())

    def add(self, videos: pa.Table, segments: pa.Table) -> bool:
        """Queues one batch's rows; returns whether parts were written."""
        self.writers["segments"].add(segments, flush=False)
        self.writers["videos"].add(videos, flush=False)
        full = any(w.pending_rows >= self.rows_per_part for w in self.writers.values())
        if full or self._clock() - self._last_flush >= self.flush_seconds:
            return self.flush()
        return False

    def flush(self) -> bool:
        """Writes every pending row, segments first; returns whether anything was written."""
        wrote = [self.writers[t].flush() for t in ("segments", "videos")]
        self._last_flush = self._clock()
        return any(w is not None for w in wrote)


def _keys(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table.column("video_id").to_pylist(), table.column("model_id").to_pylist(), strict=True))


def _drop_keys(table: pa.Table, keys: set[tuple[str, str]]) -> pa.Table:
    if not keys:
        return table
    mask = [k not in keys for k in _keys(table)]
    return table.filter(pa.array(mask))


def commit(store: Store, *, run_id: str, staged_run_ids: Sequence[str], now: float | None = None) -> dict[str, Any]:
    """Makes every staged part of ``staged_run_ids`` live, replacing older rows of the same video and model id.

    Returns the commit record.
    """
    state = latest_commit(store)
    new_files = {t: list(state.files[t]) for t in TABLES}
    # A video staged by several killed runs keeps the newest row; each run stages a video at most once.
    staged = {t: staged_parts(store, staged_run_ids, t) for t in TABLES}
    newest: dict[tuple[str, str], tuple[Any, str]] = {}
    for rel in staged["videos"]:
        run = rel.split("/")[1]
        t = read_part(store, rel, "videos", ["video_id", "model_id", "indexed_at"])
        for key, ts in zip(_keys(t), t.column("indexed_at").to_pylist(), strict=True):
            if key not in newest or ts > newest[key][0]:
                newest[key] = (ts, run)
    seen = set(newest)

    # Live parts holding rows that staged rows replace get rewritten without them (copy on write).
    for table in TABLES:
        kept = []
        for rel in new_files[table]:
            part = read_part(store, rel, table)
            stale = {k for k in _keys(part) if k in seen}
            if not stale:
                kept.append(rel)
                continue
            remaining = _drop_keys(part, stale)
            if remaining.num_rows:
                new_rel = f"{table}/part-{run_id}-rw{state.seq + 1:06d}-{len(kept):05d}.parquet"
                store.put_bytes(new_rel, table_to_bytes(remaining))
                kept.append(new_rel)
        new_files[table] = kept

    # Copy staged parts to their final names, without rows that a newer staged run replaced.
    for table in TABLES:
        for rel in staged[table]:
            run, name = rel.split("/")[1], rel.rsplit("/", 1)[1]
            final = f"{table}/part-{run}-{name.removeprefix('part-')}"
            part = read_part(store, rel, table)
            # Rows of a video staged by a newer run lose; segment rows without a staged video row are orphans
            # of a run killed between its two writes (the video was planned again and staged by a later run).
            losers = {k for k in _keys(part) if (newest[k][1] != run if k in newest else table != "videos")}
            if losers:
                part = _drop_keys(part, losers)
                if part.num_rows:
                    store.put_bytes(final, table_to_bytes(part))
                    new_files[table].append(final)
            else:
                store.put_bytes(final, store.get_bytes(rel))
                new_files[table].append(final)

    record = {
        "seq": state.seq + 1,
        "run_id": run_id,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "files": {t: sorted(new_files[t]) for t in TABLES},
        "consumed_staging": sorted(set(staged_run_ids)),
    }
    store.put_bytes(f"{COMMITS}/{record['seq']:010d}.json", json.dumps(record, indent=1).encode())
    cleanup(store)
    return record


def committed_embed_dim(store: Store) -> int | None:
    """The embedding size of the committed rows (one per output), from one live part's schema; None when empty."""
    for table in TABLES:
        for rel in live_files(store, table):
            schema = pq.read_schema(io.BytesIO(store.get_bytes(rel)))
            return check_schema(schema, table)
    return None


def committed_keys(store: Store, model_id: str) -> dict[str, tuple[str, str]]:
    """video_id -> (etag, status) of committed rows of one model id."""
    table = read_table(store, "videos", ["video_id", "etag", "status", "model_id"])
    if table is None:
        return {}
    table = table.filter(pc.equal(table.column("model_id"), model_id))
    return {
        v: (e or "", s)
        for v, e, s in zip(
            table.column("video_id").to_pylist(),
            table.column("etag").to_pylist(),
            table.column("status").to_pylist(),
            strict=True,
        )
    }


def staged_keys(store: Store, run_ids: Sequence[str], model_id: str) -> dict[str, str]:
    """video_id -> etag of staged (finished, uncommitted) rows of one model id."""
    out: dict[str, str] = {}
    for rel in staged_parts(store, run_ids, "videos"):
        t = read_part(store, rel, "videos", ["video_id", "etag", "model_id"])
        for v, e, m in zip(
            t.column("video_id").to_pylist(),
            t.column("etag").to_pylist(),
            t.column("model_id").to_pylist(),
            strict=True,
        ):
            if m == model_id:
                out[v] = e or ""
    return out

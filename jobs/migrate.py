"""``vitaclip migrate OUT``: converts an output of the previous layout (schema version 1) to the Delta tables.

The previous layout kept Parquet parts under ``OUT/videos`` and ``OUT/segments``, a commit record per commit under
``OUT/_commits/<seq>.json`` (the highest names the live parts) and uncommitted work under ``OUT/_staging``. The
migration reads the live parts of the latest record one at a time, keeps one row per row id (the newest, as the
index build did), writes them as Delta data files of the current schema version (``attempts`` null: unknown) and
commits each table once (segments, then videos). Only then are the old parts, staging and, last, the records
deleted, so a migration killed half-way leaves the old layout readable and can simply run again: while a record is
left the output counts as the old layout (the job refuses it, vacuum leaves it alone), and a table whose commit
landed already (its app transaction ``vitaclip-migrate`` at the record's number) is not written again. The index
(``OUT/index``) is rebuilt by the next run or by ``vitaclip build-index``; run records (``OUT/runs``) stay.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index import delta_tables as dlt
from index.schema import SchemaError, check_schema
from jobs.storage import Store

log = logging.getLogger("vitaclip.migrate")

_COMMITS, _STAGING = "_commits", "_staging"
_APP_ID = "vitaclip-migrate"


def _latest_record(store: Store) -> dict[str, Any]:
    records = [p for p in store.list(_COMMITS + "/") if p.endswith(".json")]
    if not records:
        raise ValueError(f"{store.url} has no commit records of the previous layout: nothing to migrate")
    latest = max(records)
    try:
        record = json.loads(store.get_bytes(latest))
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            raise ValueError("not a commit record: no 'files' object")
    except ValueError as exc:  # JSONDecodeError too
        raise ValueError(
            f"the latest commit record {store.url_for(latest)} is damaged ({exc}): restore it, or delete it to "
            "migrate what the record before it names"
        ) from None
    return record


def _read_part(store: Store, rel: str, table: str, columns: list[str] | None = None) -> tuple[pa.Table, int]:
    data = pq.ParquetFile(io.BytesIO(store.get_bytes(rel)))
    try:
        embed_dim = check_schema(data.schema_arrow, table)
    except SchemaError as exc:
        raise ValueError(f"{store.url_for(rel)}: {exc}") from exc
    return data.read(columns=columns), embed_dim


def _newest_rows(store: Store, table: str, parts: list[str]) -> tuple[dict[str, np.ndarray], int | None]:
    """Part -> sorted row numbers to keep: one row per (row id, model id), the newest (an output written before
    duplicate listings were planned once may hold a video twice; every model's rows stay); and the parts' embedding
    size. Only the key columns of every part are held at once."""
    embed_dim = None
    ids, models, stamps, part_of, row_of = [], [], [], [], []
    model_codes: dict[str, int] = {}
    for index, rel in enumerate(parts):
        keys, dim = _read_part(store, rel, table, ["row_id", "model_id", "indexed_at"])
        if embed_dim is not None and dim != embed_dim:
            raise ValueError(f"{store.url_for(rel)} holds {dim}-dim embeddings, other parts {embed_dim}-dim")
        embed_dim = dim
        ids.append(keys.column("row_id").to_numpy())
        names = keys.column("model_id").to_pylist()
        models.append(np.asarray([model_codes.setdefault(str(n), len(model_codes)) for n in names], np.int64))
        stamps.append(keys.column("indexed_at").cast(pa.int64()).to_numpy())
        part_of.append(np.full(keys.num_rows, index, np.int64))
        row_of.append(np.arange(keys.num_rows, dtype=np.int64))
    if not ids:
        return {}, None
    all_ids, all_models, all_stamps = np.concatenate(ids), np.concatenate(models), np.concatenate(stamps)
    order = np.lexsort((-all_stamps, all_models, all_ids))  # by id and model, newest first
    first = np.ones(len(order), bool)
    first[1:] = (all_ids[order][1:] != all_ids[order][:-1]) | (all_models[order][1:] != all_models[order][:-1])
    chosen = order[first]
    parts_chosen, rows_chosen = np.concatenate(part_of)[chosen], np.concatenate(row_of)[chosen]
    return {parts[p]: np.sort(rows_chosen[parts_chosen == p]) for p in np.unique(parts_chosen).tolist()}, embed_dim


def migrate(store: Store) -> dict[str, Any]:
    """Converts the output in `store` to Delta tables; returns what it did (rows and files per table).

    Raises:
        ValueError: The output is not in the previous layout (already migrated, or not a vitaclip output).
    """
    location = store.location
    if not dlt.detect_old_layout(location):
        if dlt.open_table(location, "videos") is not None:
            raise ValueError(f"{location.url} already holds Delta tables: nothing to migrate")
        raise ValueError(f"{location.url} is not a vitaclip output of the previous layout (no _commits/)")
    record = _latest_record(store)
    # One app version per source record: a run again after a kill finds the commits that landed.
    app_version = int(record.get("seq") or 0) + 1
    parts = {table: list(record["files"].get(table, [])) for table in dlt.TABLES}
    if dlt.committed_app_version(location, "videos", _APP_ID) == app_version:
        # Killed while deleting the old layout (some of its parts may be gone already): finish that. The videos
        # table commits last, so both tables are done (a migration of another version committed a table only
        # when it had rows).
        report: dict[str, Any] = {t: {"old_parts": len(parts[t]), "committed_before": True} for t in dlt.TABLES}
        return _finish(store, location, report)
    embed_dim = None
    winners: dict[str, dict[str, np.ndarray]] = {}
    for table in dlt.TABLES:
        winners[table], dim = _newest_rows(store, table, parts[table])
        if dim is not None and embed_dim is not None and dim != embed_dim:
            raise ValueError(f"{location.url}: the {table} parts hold {dim}-dim embeddings, others {embed_dim}-dim")
        embed_dim = dim if dim is not None else embed_dim
    if embed_dim is None:
        raise ValueError(f"{location.url} has commit records but no committed rows: delete it and run the job")
    versions = dlt.create_tables(location, embed_dim, into_old_layout=True)
    report = {"embed_dim": embed_dim}
    migration = uuid.uuid4().hex
    for table in ("segments", "videos"):  # the job's order: segments never point at missing video rows
        if dlt.committed_app_version(location, table, _APP_ID) == app_version:
            report[table] = {"old_parts": len(parts[table]), "committed_before": True}
            continue  # a migration killed after this commit: done
        adds = []
        rows = 0
        for index, (rel, keep) in enumerate(sorted(winners[table].items())):
            data, _ = _read_part(store, rel, table)
            data = data.take(pa.array(keep)) if len(keep) != data.num_rows else data
            data = data.replace_schema_metadata(None)
            name = f"part-migrated-{migration}-{index:06d}.parquet"
            adds.append(dlt.write_data_file(location, table, data, name=name, embed_dim=embed_dim))
            rows += data.num_rows
        dlt.commit(  # also with no rows: the commit records that this table is done
            location,
            table,
            adds=adds,
            removes=[],
            read_version=versions[table],
            app_id=_APP_ID,
            app_version=app_version,
            metadata={"vitaclip.migrated_from_commit": str(record.get("seq"))},
        )
        report[table] = {"rows": rows, "files": len(adds), "old_parts": len(parts[table])}
    return _finish(store, location, report)


def _finish(store: Store, location: dlt.OutputLocation, report: dict[str, Any]) -> dict[str, Any]:
    """Committed: the old layout goes (parts of tables, staging, and last the records), leaving the Delta files."""
    new_files = {f"{t}/{p}" for t in dlt.TABLES for p in dlt.data_file_paths(dlt.open_table(location, t))}  # type: ignore[arg-type]
    deleted = 0
    for prefix in (*(f"{t}/" for t in dlt.TABLES), _STAGING + "/", _COMMITS + "/"):
        for rel in store.list(prefix):
            if prefix.rstrip("/") in dlt.TABLES and (rel in new_files or "/_delta_log/" in rel):
                continue
            if prefix.rstrip("/") in dlt.TABLES and not rel.endswith(".parquet"):
                continue
            store.delete(rel)
            deleted += 1
    report["deleted_old_files"] = deleted
    for old in (_STAGING, _COMMITS):  # a local output's old folders, now empty (object stores have none)
        folder = store.local_path(old)
        if folder is not None and folder.is_dir() and not folder.is_symlink():
            _remove_empty_folders(folder)
    log.info("migrated %s: %s", location.url, report)
    return report


def _remove_empty_folders(root: Path) -> None:
    """`root` and the folders under it that are empty, deepest first; a folder that holds anything stays."""
    folders = [p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()]
    for folder in [*sorted(folders, key=lambda p: len(p.parts), reverse=True), root]:
        with contextlib.suppress(OSError):  # not empty (or gone): left as it is
            folder.rmdir()


def rows_per_model(store: Store) -> dict[str, int]:
    """Video rows per model id after migration (what `vitaclip migrate` prints)."""
    from index.tables import read_table

    table = read_table(store, "videos", ["model_id"])
    if table is None:
        return {}
    counts = pc.value_counts(table.column("model_id")).to_pylist()
    return {c["values"]: int(c["counts"]) for c in counts}

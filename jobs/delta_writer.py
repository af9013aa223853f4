"""One embedded batch -> a pair of Delta data files (``videos/<name>``, ``segments/<name>``), written where it was made.

This is the write step of the Delta output layer: a worker turns the embed stage's output batch into rows of the
schema-2 tables, writes them with `index.delta_tables.write_data_file` and returns only metadata (the files, the
video keys and the files their old rows live in) for the driver's `index.commits.Committer`. Rows never pass through
the driver.
"""

from __future__ import annotations

import uuid

import numpy as np

from index.commits import WrittenBatch
from index.delta_tables import TABLES, OutputLocation, table_schema, write_data_file
from jobs.pipeline import result_tables


def write_result_files(
    location: OutputLocation,
    batch: dict[str, np.ndarray],
    *,
    model_id: str,
    run_id: str,
    label_names: list[str],
    embed_dim: int,
    name: str | None = None,
) -> WrittenBatch:
    """Writes one embed output batch as a videos file and (when it has segment rows) a segments file of one name.

    Args:
        batch: the embed stage's output (clip rows: ``segment_index`` -1 for a whole video), with the Planner's
            ``current_video_file`` and ``current_segment_files`` columns when it planned them.
        name: the file name for both tables (default: a fresh ``part-<run_id>-<uuid>.parquet``; a retried write
            must use a fresh one, a committed file is never overwritten).

    Returns:
        The files (None for an empty side), the video rows' ``(video_id, etag, status)`` keys and where their
        current rows are, for `index.commits.Committer.add`.
    """
    schemas = {table: table_schema(table, embed_dim) for table in TABLES}
    videos, segments = result_tables(
        batch, model_id=model_id, run_id=run_id, label_names=label_names, embed_dim=embed_dim, schemas=schemas
    )
    name = name or f"part-{run_id}-{uuid.uuid4().hex}.parquet"
    files = {
        table: write_data_file(location, table, rows, name=name, embed_dim=embed_dim) if rows.num_rows else None
        for table, rows in (("videos", videos), ("segments", segments))
    }
    keys = tuple(
        zip(
            videos.column("video_id").to_pylist(),
            videos.column("etag").to_pylist(),
            videos.column("status").to_pylist(),
            strict=True,
        )
    )
    is_video = np.asarray(batch["segment_index"]) < 0
    video_ids = videos.column("video_id").to_pylist()

    def planned(column: str) -> dict[str, str]:
        if column not in batch:
            return {}
        values = [str(v) for v, m in zip(batch[column], is_video, strict=True) if m]
        return {v: f for v, f in zip(video_ids, values, strict=True) if f}

    return WrittenBatch(
        videos=files["videos"],
        segments=files["segments"],
        keys=keys,
        current_video_files=planned("current_video_file"),
        current_segment_files=planned("current_segment_files"),
    )

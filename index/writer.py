"""The write stage of the output tables: one embedded batch -> a pair of Delta data files (``videos/<name>``,
``segments/<name>``), written where the batch was made.

`ResultWriter` turns the embed stage's output batch into rows of the tables' schemas (`ResultWriter.rows`), writes
them with `index.delta_tables.write_data_file` and returns only metadata (the files, the video keys and the files
their old rows live in) for the driver's `index.commits.Committer`. Rows never pass through the driver. With
`index.delta_tables` (schemas, files, commits), `index.commits` (planning and conflict-safe commits) and
`index.tables` (reading), this is the tables' contract, in one package.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from index.commits import KEYS_SCHEMA, WrittenBatch, recorded_attempts
from index.delta_tables import TABLES, OutputLocation, table_schema, write_data_file
from index.schema import STATUS_OK, row_id_for, video_id_for


@dataclass(frozen=True)
class CompleteVideos:
    """Embed output rows split by `complete_videos`.

    Attributes:
        rows: Every clip of each video it holds in full, one decode per video, in their order in the input.
        leftover: Clips of videos not yet complete, to join the rows that follow (None: none, or ``final``).
        duplicates: Rows dropped as copies: of kept rows (a retried task's output), of rows of another attempt at a
            video kept in full, or of videos in `drop_uris`.
        incomplete: Rows dropped at the end (``final``) because their video never became complete.
    """

    rows: pa.Table
    leftover: pa.Table | None
    duplicates: int
    incomplete: int


def complete_videos(table: pa.Table, *, final: bool = False, drop_uris: Collection[str] = ()) -> CompleteVideos:
    """Keeps the videos whose clips are all in `table`; the rest is left over for the rows that follow.

    Ray Data cuts a stage's output into blocks by size (past 1.5 times its target), and a decode task hands a long
    video's rows on in several batches, so a video's clips may arrive in several blocks, in any order; a retried
    task's output may arrive twice, and a retried decode task's replay may complete what its first attempt
    delivered. A video is complete when its rows of one ``decode_id`` and ``clip_count`` (a failed retry makes one
    row) are all present; writing only complete videos keeps each video's row and its segment rows in one pair of
    files, which `index.commits.Committer` relies on.

    Args:
        table: Embed output rows (with the decode stage's ``decode_id``, ``clip_count`` and ``segment_index``).
        final: No more rows will come: what is still incomplete is dropped (and counted) instead of left over.
        drop_uris: Videos already written whole by another write task: their rows here are copies.

    Raises:
        RuntimeError: A decode with more distinct clips than its ``clip_count`` (a bug).
    """
    uris = table.column("uri").to_pylist()
    keys = zip(
        uris,
        table.column("decode_id").to_pylist(),
        table.column("clip_count").to_pylist(),
        table.column("segment_index").to_pylist(),
        strict=True,
    )
    seen: set[tuple[str, int, int, int]] = set()
    groups: dict[tuple[str, int, int], list[int]] = {}  # (uri, decode id, clip count) -> rows, in order of arrival
    duplicates = 0
    for i, key in enumerate(keys):
        if key in seen or key[0] in drop_uris:
            duplicates += 1
            continue
        seen.add(key)
        groups.setdefault(key[:3], []).append(i)
    kept_groups: dict[str, tuple[str, int, int]] = {}  # uri -> the group kept
    for group, rows in groups.items():
        uri, decode_id, expected = group
        if len(rows) > expected:
            raise RuntimeError(f"bug: decode {decode_id} of {uri} has {len(rows)} distinct clips, {expected} expected")
        if len(rows) == expected and uri not in kept_groups:
            kept_groups[uri] = group
    kept: list[int] = []
    left: list[int] = []
    for group, rows in groups.items():
        if kept_groups.get(group[0]) == group:
            kept += rows
        elif group[0] in kept_groups:
            duplicates += len(rows)  # rows of another attempt at a video kept in full
        else:
            left += rows
    rows_table = table.take(pa.array(sorted(kept), pa.int64()))
    if final or not left:
        return CompleteVideos(rows_table, None, duplicates, len(left) if final else 0)
    return CompleteVideos(rows_table, table.take(pa.array(sorted(left), pa.int64())), duplicates, 0)


class ResultWriter:
    """Writes embed output batches of one run and model into the output tables' data files (not committed).

    Args:
        location: The output.
        model_id: The model every row is of.
        run_id: The run writing (its rows and file names carry it).
        label_names: The names the batches' ``label_indices`` point into.
        embed_dim: The tables' embedding size.
    """

    def __init__(
        self, location: OutputLocation, *, model_id: str, run_id: str, label_names: list[str], embed_dim: int
    ) -> None:
        self.location = location
        self.model_id = model_id
        self.run_id = run_id
        self.label_names = list(label_names)
        self.embed_dim = embed_dim
        self.schemas = {table: table_schema(table, embed_dim) for table in TABLES}

    def rows(self, batch: dict[str, np.ndarray]) -> tuple[pa.Table, pa.Table]:
        """One embed output batch -> (video rows, segment rows) as Arrow tables of the output tables' schemas."""
        return _result_tables(
            batch, model_id=self.model_id, run_id=self.run_id, label_names=self.label_names, schemas=self.schemas
        )

    def __call__(self, batch: dict[str, np.ndarray], *, name: str | None = None) -> WrittenBatch:
        """Writes one embed output batch as a videos file and (when it has segment rows) a segments file of one name.

        Args:
            batch: the embed stage's output (clip rows: ``segment_index`` -1 for a whole video), with the Planner's
                ``current_video_file`` and ``current_segment_files`` columns when it planned them.
            name: the file name for both tables (default: a fresh ``part-<run_id>-<uuid>.parquet``; a retried write
                must use a fresh one, a committed file is never overwritten).

        Returns:
            The files (None for an empty side), the video rows' keys (``video_id``, ``etag``, ``status``) and where
            their current rows are, for `index.commits.Committer.add`.
        """
        videos, segments = self.rows(batch)
        with_segments = frozenset(segments.column("video_id").to_pylist())
        orphans = with_segments - set(videos.column("video_id").to_pylist())
        if orphans:
            # Write tasks pass only complete videos (`complete_videos`): clips of one video in two batches would let
            # one batch's segments commit remove the other's.
            raise RuntimeError(f"bug: segment rows of {len(orphans)} videos came without their video row")
        name = name or f"part-{self.run_id}-{uuid.uuid4().hex}.parquet"
        files = {
            table: write_data_file(self.location, table, rows, name=name, embed_dim=self.embed_dim)
            if rows.num_rows
            else None
            for table, rows in (("videos", videos), ("segments", segments))
        }
        is_video = np.asarray(batch["segment_index"]) < 0

        def planned(column: str) -> pa.Array:
            if column not in batch:
                return pa.array([""] * videos.num_rows, pa.string())
            return pa.array([str(v) if v else "" for v in np.asarray(batch[column])[is_video]], pa.string())

        keys = pa.table(
            [
                videos.column("video_id"),
                videos.column("etag"),
                videos.column("status"),
                planned("current_video_file"),
                planned("current_segment_files"),
            ],
            schema=KEYS_SCHEMA,
        )
        return WrittenBatch(
            videos=files["videos"],
            segments=files["segments"],
            keys=keys,
            segment_video_ids=pa.array(sorted(with_segments), pa.string()),
        )


def _etag(value: Any) -> str | None:
    """A row's ETag; None for a row marked deleted (its null arrives as None or as NaN: a block whose ETags are all
    null has a null-typed column, which Ray Data hands over as float32 NaN)."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return None
    return str(value)


def _result_tables(
    batch: dict[str, np.ndarray],
    *,
    model_id: str,
    run_id: str,
    label_names: list[str],
    schemas: dict[str, pa.Schema],
) -> tuple[pa.Table, pa.Table]:
    now = datetime.now(timezone.utc)
    n = len(batch["uri"])
    ok = np.asarray([s == STATUS_OK for s in batch["status"]])
    is_video = np.asarray(batch["segment_index"]) < 0
    labels = [
        [label_names[j] for j in row if j >= 0] if ok[i] else None for i, row in enumerate(batch["label_indices"])
    ]
    scores = [batch["label_scores"][i].tolist() if ok[i] else None for i in range(n)]
    embeddings = [batch["embedding"][i] if ok[i] else None for i in range(n)]
    video_ids = [video_id_for(str(u)) for u in batch["uri"]]
    emb_type = schemas["videos"].field("embedding").type

    def col(values: Any, mask: np.ndarray) -> list[Any]:
        return [v for v, m in zip(values, mask, strict=True) if m]

    def emb(mask: np.ndarray) -> pa.Array:
        vals = col(embeddings, mask)
        return pa.array([None if v is None else v.astype(np.float32) for v in vals], type=emb_type)

    def result_columns(mask: np.ndarray) -> dict[str, Any]:
        """The columns every row ends with, videos and segments alike (`index.schema` declares them once too)."""
        count = int(mask.sum())
        return {
            "embedding": emb(mask),
            "labels": col(labels, mask),
            "label_scores": col(scores, mask),
            "thumbnail_jpeg": [t or None for t in col(batch["thumbnail_jpeg"], mask)],
            "model_id": [model_id] * count,
            "run_id": [run_id] * count,
            "indexed_at": [now] * count,
        }

    vm = is_video
    videos = pa.table(
        {
            "video_id": col(video_ids, vm),
            "row_id": [row_id_for(v) for v in col(video_ids, vm)],
            "uri": [str(u) for u in col(batch["uri"], vm)],
            "etag": [_etag(e) for e in col(batch["etag"], vm)],
            "size_bytes": [int(s) for s in col(batch["size_bytes"], vm)],
            "duration_seconds": [None if np.isnan(d) else float(d) for d in col(batch["duration_seconds"], vm)],
            "fps": [None if np.isnan(f) else float(f) for f in col(batch["fps"], vm)],
            "width": [None if w < 0 else int(w) for w in col(batch["width"], vm)],
            "height": [None if h < 0 else int(h) for h in col(batch["height"], vm)],
            "codec": [c or None for c in col(batch["codec"], vm)],
            "status": [str(s) for s in col(batch["status"], vm)],
            "error_message": [m or None for m in col(batch["error_message"], vm)],
            # The planner's count (rows of a batch it did not plan, from tests or tools, are a first attempt), less
            # this run's try where the storage failed rather than the video.
            "attempts": recorded_attempts(
                col(batch["attempt"], vm) if "attempt" in batch else np.ones(int(vm.sum()), np.int64),
                col(batch["status"], vm),
            ),
            **result_columns(vm),
        },
        schema=schemas["videos"],
    )
    sm = ~is_video
    seg_index = [int(i) for i in col(batch["segment_index"], sm)]
    segments = pa.table(
        {
            "video_id": col(video_ids, sm),
            "row_id": [row_id_for(v, i) for v, i in zip(col(video_ids, sm), seg_index, strict=True)],
            "uri": [str(u) for u in col(batch["uri"], sm)],
            "segment_index": seg_index,
            "start_seconds": [float(s) for s in col(batch["start_seconds"], sm)],
            "end_seconds": [float(s) for s in col(batch["end_seconds"], sm)],
            **result_columns(sm),
        },
        schema=schemas["segments"],
    )
    return videos, segments

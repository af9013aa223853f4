"""Staging and commit of the job's tables (jobs.tables), on a local store, without Ray."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from index.schema import row_id_for, schema_for
from jobs import tables
from jobs.storage import open_store

DIM = 4
SCHEMAS = {t: schema_for(t, DIM) for t in tables.TABLES}


def _result(run_id: str, hour: int) -> dict:
    return {
        "embedding": [0.5] * DIM,
        "labels": ["a"],
        "label_scores": [1.0],
        "thumbnail_jpeg": None,
        "model_id": "m",
        "run_id": run_id,
        "indexed_at": datetime(2026, 1, 1, hour, tzinfo=timezone.utc),
    }


def videos(names: list[str], run_id: str = "r1", hour: int = 0) -> pa.Table:
    rows = [
        dict(video_id=n, row_id=row_id_for(n), uri=f"/v/{n}.mp4", etag="e", size_bytes=1, duration_seconds=2.0,
             fps=12.0, width=8, height=8, codec="h264", status="ok", error_message=None, **_result(run_id, hour))
        for n in names
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=SCHEMAS["videos"])


def segments(names: list[str], per_video: int = 2, run_id: str = "r1", hour: int = 0) -> pa.Table:
    rows = [
        dict(video_id=n, row_id=row_id_for(n, i), uri=f"/v/{n}.mp4", segment_index=i, start_seconds=float(i),
             end_seconds=i + 1.0, **_result(run_id, hour))
        for n in names
        for i in range(per_video)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=SCHEMAS["segments"])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stager_writes_segments_before_videos_by_rows_and_by_time(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    written: list[str] = []
    put = store.put_bytes

    def recording_put(rel_path: str, data: bytes) -> None:
        written.append(rel_path.split("/")[2])
        put(rel_path, data)

    store.put_bytes = recording_put  # type: ignore[method-assign]
    clock = Clock()
    stager = tables.RunStager(store, "r1", SCHEMAS, rows_per_part=4, flush_seconds=60, clock=clock)
    assert not stager.add(videos(["a"]), segments(["a"]))  # 1 video, 2 segments pending: nothing written yet
    assert tables.staged_runs(store) == []
    assert stager.add(videos(["b"]), segments(["b"]))  # 4 segment rows: both tables are written
    assert written == ["segments", "videos"]  # a video row never reaches storage before its segments
    for table in ("segments", "videos"):
        (part,) = tables.staged_parts(store, ["r1"], table)
        assert tables.read_part(store, part, table).num_rows == {"segments": 4, "videos": 2}[table]
    assert tables.staged_keys(store, ["r1"], "m") == {"a": "e", "b": "e"}

    assert not stager.add(videos(["c"]), segments(["c"], per_video=0))
    clock.now = 61.0  # flush_seconds after the last write, one pending row is written too
    assert stager.add(videos(["d"]), segments(["d"], per_video=0))
    assert len(tables.staged_parts(store, ["r1"], "videos")) == 2 and stager.parts_written == 3
    assert not stager.flush()  # nothing pending


def test_commit_drops_segments_whose_video_row_was_never_staged(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    # Run k1 was killed between its two writes: segments of "a" and "b" staged, their video rows not.
    killed = tables.RunStager(store, "k1", SCHEMAS, rows_per_part=100, flush_seconds=1e9)
    killed.add(videos(["a", "b"], run_id="k1"), segments(["a", "b"], run_id="k1"))
    killed.writers["segments"].flush()
    # The next run planned "a" again (its video row was missing) and staged it with 3 segments; "b" left the input.
    rerun = tables.RunStager(store, "r2", SCHEMAS, rows_per_part=100, flush_seconds=1e9)
    rerun.add(videos(["a"], run_id="r2", hour=1), segments(["a"], per_video=3, run_id="r2", hour=1))
    rerun.flush()
    tables.commit(store, run_id="r2", staged_run_ids=["k1", "r2"])
    segs = tables.read_table(store, "segments")
    vids = tables.read_table(store, "videos")
    assert segs is not None and vids is not None
    assert vids.column("video_id").to_pylist() == ["a"]
    assert sorted(zip(segs.column("video_id").to_pylist(), segs.column("segment_index").to_pylist(), strict=True)) == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
    ]
    assert set(segs.column("run_id").to_pylist()) == {"r2"}
    assert tables.staged_runs(store) == []

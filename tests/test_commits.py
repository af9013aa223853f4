"""Planning and committing a run's output (index.commits): one row and one set of segments per video, always."""

from __future__ import annotations

import datetime as dt_
import json
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from counting_fs import CountingHandler
from deltalake import DeltaTable

from index import delta_tables as dlt
from index.commits import (
    KEYS_SCHEMA,
    RETRYABLE,
    UNCOUNTED,
    CommitReport,
    Committer,
    Planner,
    WrittenBatch,
    recorded_attempts,
)
from index.delta_tables import OutputLocation
from index.schema import video_id_for

DIM = 4
SEGMENTS = 3  # segment rows of every "ok" video
MODEL = "m1"
T0 = dt_.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt_.timezone.utc)


class Killed(Exception):
    """Stands for a killed driver."""


def uri_of(k: int) -> str:
    return f"s3://in/v{k}.mp4"


def vid(k: int) -> str:
    return video_id_for(uri_of(k))


def listing(etags: dict[int, str]) -> dict[str, np.ndarray]:
    """Listed objects: video k with its etag."""
    n = len(etags)
    return {
        "uri": np.array([uri_of(k) for k in etags], dtype=object),
        "etag": np.array(list(etags.values()), dtype=object),
        "size_bytes": np.arange(n, dtype=np.int64) + 1000,
        "listing_status": np.array(["ok"] * n, dtype=object),
        "listing_error": np.array([None] * n, dtype=object),
    }


def write_batch(
    location: OutputLocation,
    planned: dict[str, np.ndarray],
    run_id: str,
    *,
    statuses: dict[str, str] | None = None,
    thumb_bytes: int = 3,
    without_segments: frozenset[str] = frozenset(),
    attempts: bool = True,
) -> WrittenBatch:
    """What a worker does: one video row per planned object, `SEGMENTS` segment rows for each "ok" one (but those
    `without_segments`: ok videos too short for a segment)."""
    ids = [str(v) for v in planned["video_id"]]
    uris = [str(u) for u in planned["uri"]]
    etags = [str(e) for e in planned["etag"]]
    status = [(statuses or {}).get(v, "ok") for v in ids]
    n = len(ids)
    name = f"part-{run_id}-{uuid.uuid4().hex}.parquet"
    common = {
        "labels": [["cat"]],
        "label_scores": [[0.9]],
        "model_id": [MODEL],
        "run_id": [run_id],
        "indexed_at": [T0],
    }
    videos = pa.table(
        {
            "video_id": ids,
            "row_id": list(range(n)),
            "uri": uris,
            "etag": etags,
            "size_bytes": [1000] * n,
            "duration_seconds": [1.5] * n,
            "fps": [30.0] * n,
            "width": [64] * n,
            "height": [48] * n,
            "codec": ["h264"] * n,
            "status": status,
            "error_message": [None if s == "ok" else "failed" for s in status],
            "embedding": [[0.5] * DIM if s == "ok" else None for s in status],
            "thumbnail_jpeg": [os.urandom(thumb_bytes) for _ in range(n)],
            **{key: value * n for key, value in common.items()},
        }
    )
    if attempts and "attempt" in planned:  # as the job's writer does (without: a row of before schema version 3)
        videos = videos.append_column("attempts", pa.array(recorded_attempts(planned["attempt"], status), pa.int32()))
    videos_file = dlt.write_data_file(location, "videos", videos, name=name, embed_dim=DIM)
    with_segments = [
        (v, u) for v, u, s in zip(ids, uris, status, strict=True) if s == "ok" and v not in without_segments
    ]
    segments_file = None
    if with_segments:
        m = len(with_segments) * SEGMENTS
        segments = pa.table(
            {
                "video_id": [v for v, _ in with_segments for _ in range(SEGMENTS)],
                "row_id": list(range(m)),
                "uri": [u for _, u in with_segments for _ in range(SEGMENTS)],
                "segment_index": [k for _ in with_segments for k in range(SEGMENTS)],
                "start_seconds": [float(k) for _ in with_segments for k in range(SEGMENTS)],
                "end_seconds": [float(k + 1) for _ in with_segments for k in range(SEGMENTS)],
                "embedding": [[0.25] * DIM] * m,
                "thumbnail_jpeg": [os.urandom(thumb_bytes) for _ in range(m)],
                **{key: value * m for key, value in common.items()},
            }
        )
        segments_file = dlt.write_data_file(location, "segments", segments, name=name, embed_dim=DIM)
    return WrittenBatch.of(
        videos_file,
        segments_file,
        zip(ids, etags, status, strict=True),
        current_video_files=dict(zip(ids, (str(f) for f in planned["current_video_file"]), strict=True)),
        current_segment_files=dict(zip(ids, (str(f) for f in planned["current_segment_files"]), strict=True)),
    )


def latest_versions(location: OutputLocation) -> dict[str, int]:
    return {
        table: DeltaTable(location.table_uri(table), storage_options=location.storage_options()).version()
        for table in dlt.TABLES
    }


def select(planned: dict[str, np.ndarray], keep: set[int]) -> dict[str, np.ndarray]:
    mask = np.array([str(v) in {vid(k) for k in keep} for v in planned["video_id"]], dtype=bool)
    return {name: column[mask] for name, column in planned.items()}


def run(
    location: OutputLocation,
    etags: dict[int, str],
    run_id: str,
    *,
    statuses: dict[int, str] | None = None,
    max_attempts: int | None = 3,
) -> tuple[Planner, CommitReport]:
    """A whole run: plan the listing, write two batches, commit."""
    planner = Planner(location, model_id=MODEL, versions=latest_versions(location), max_attempts=max_attempts)
    planned = planner(listing(etags))
    committer = Committer(location, model_id=MODEL, run_id=run_id, versions=planner.versions)
    status_by_id = {vid(k): s for k, s in (statuses or {}).items()}
    half = len(planned["video_id"]) // 2
    for part in (slice(0, half), slice(half, None)):
        chunk = {name: column[part] for name, column in planned.items()}
        if len(chunk["video_id"]):
            committer.add(write_batch(location, chunk, run_id, statuses=status_by_id))
    return planner, committer.commit()


def fields_of(rows: dict[str, dict[str, Any]], videos: Iterable[int], *names: str) -> dict[int, tuple[Any, ...]]:
    """Video k -> the named fields of its committed row, for the videos asked for."""
    return {k: tuple(rows[vid(k)][name] for name in names) for k in videos}


def read_tables(location: OutputLocation) -> tuple[pa.Table, pa.Table]:
    options = location.storage_options()
    return (
        DeltaTable(location.table_uri("videos"), storage_options=options).to_pyarrow_table(),
        DeltaTable(location.table_uri("segments"), storage_options=options).to_pyarrow_table(),
    )


def assert_one_row_and_one_set_each(location: OutputLocation, expected: set[int]) -> dict[str, dict[str, Any]]:
    """Exactly one video row per expected video; `SEGMENTS` segments from one run for each "ok" one, none else."""
    videos, segments = read_tables(location)
    ids = Counter(videos.column("video_id").to_pylist())
    assert ids == Counter({vid(k): 1 for k in expected})
    rows = {row["video_id"]: row for row in videos.to_pylist()}
    by_video: dict[str, list[dict[str, Any]]] = {}
    for row in segments.to_pylist():
        by_video.setdefault(row["video_id"], []).append(row)
    for video_id, row in rows.items():
        sets = by_video.get(video_id, [])
        if row["status"] == "ok":
            assert sorted(s["segment_index"] for s in sets) == list(range(SEGMENTS)), (video_id, sets)
            assert len({s["run_id"] for s in sets}) == 1
        else:
            assert sets == [], video_id
    assert set(by_video) <= set(rows)
    return rows


@pytest.fixture
def local(tmp_path: Path) -> OutputLocation:
    location = OutputLocation.from_url(str(tmp_path / "out"))
    dlt.create_tables(location, DIM)
    return location


# ----------------------------------------------------------------------------------------------------- planner


def test_planner_plans_only_what_is_not_done(local: OutputLocation) -> None:
    first = {k: f"e{k}" for k in range(4)}
    planner, report = run(local, first, "r1")
    assert planner.counts == {
        "listed": 4,
        "already_indexed": 0,
        "duplicate_in_listing": 0,
        "attempts_exhausted": 0,
        "planned": 4,
        "no_longer_listed": 0,
    }
    assert report.videos_committed == 4 and report.segments_committed == 4 * SEGMENTS and report.rounds == 1

    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    assert len(planner(listing(first))["video_id"]) == 0
    assert planner.counts == {
        "listed": 4,
        "already_indexed": 4,
        "duplicate_in_listing": 0,
        "attempts_exhausted": 0,
        "planned": 0,
        "no_longer_listed": 0,
    }

    # video 3 changed and its re-indexing timed out: a committed row with a retryable status
    assert "timeout" in RETRYABLE
    run(local, {3: "e3-new"}, "r2", statuses={3: "timeout"})
    versions = latest_versions(local)
    files = {
        r["video_id"]: r["file"] for r in dlt.read_keys(local, version=versions["videos"], model_id=MODEL).to_pylist()
    }
    planner = Planner(local, model_id=MODEL, versions=versions)
    changed = {0: "e0", 1: "e1-new", 2: "e2", 3: "e3-new"}
    planned = planner(listing(changed))
    assert list(planned["video_id"]) == [vid(1), vid(3)]  # a changed etag, a retryable status
    assert set(planned) == {
        "uri",
        "etag",
        "size_bytes",
        "listing_status",
        "listing_error",
        "video_id",
        "attempt",
        "current_video_file",
        "current_segment_files",
    }
    assert list(planned["etag"]) == ["e1-new", "e3-new"]
    assert list(planned["attempt"]) == [1, 2]  # another object; the second try of the same one
    assert list(planned["current_video_file"]) == [files[vid(1)], files[vid(3)]]
    assert files[vid(1)] != files[vid(3)]  # r1's file, r2's file
    assert planned["current_segment_files"][0] == files[vid(1)]  # the partner in the segments table
    assert planned["current_segment_files"][1] == ""  # r2 made no segments and removed r1's
    assert planner.counts == {
        "listed": 4,
        "already_indexed": 2,
        "duplicate_in_listing": 0,
        "attempts_exhausted": 0,
        "planned": 2,
        "no_longer_listed": 0,
    }

    # listed twice (in one batch and across batches): planned once; unknown videos have no current files
    planned = planner(listing({7: "e7"}))
    again = planner({name: np.concatenate([a, a]) for name, a in listing({7: "e7", 1: "e1-new"}).items()})
    assert list(planned["video_id"]) == [vid(7)] and list(planned["current_video_file"]) == [""]
    assert list(planned["current_segment_files"]) == [""]
    assert len(again["video_id"]) == 0  # 7 seen before, 1 seen before
    assert planner.counts["duplicate_in_listing"] == 4 and planner.counts["planned"] == 3
    assert planner.counts["listed"] == sum(v for k, v in planner.counts.items() if k != "listed")
    rows = dlt.read_keys(local, version=planner.versions["videos"], model_id=MODEL).num_rows
    held = planner._id_hash.nbytes + planner._etag_hash.nbytes + planner._file_code.nbytes + planner._attempts.nbytes
    assert rows == 4 and held == 21 * rows  # 21 bytes a committed row


def test_a_video_that_keeps_failing_is_tried_by_max_attempts_runs(local: OutputLocation) -> None:
    """A video whose row keeps failing retryably is planned in at most `max_attempts` runs per ETag; the count
    starts again when the object changes, and a run allowing more (or None: no limit) plans it again."""
    tried = []
    for run_id in ("r1", "r2", "r3", "r4"):
        planner, _ = run(local, {0: "e0", 1: "e1"}, run_id, statuses={0: "timeout", 1: "decoder_crashed"})
        tried.append(planner.counts["planned"])
        assert planner.counts["listed"] == sum(v for k, v in planner.counts.items() if k != "listed")
    assert tried == [2, 2, 2, 0] and planner.counts["attempts_exhausted"] == 2
    rows = assert_one_row_and_one_set_each(local, {0, 1})
    assert {row["attempts"] for row in rows.values()} == {3} and {row["run_id"] for row in rows.values()} == {"r3"}

    versions = latest_versions(local)
    planned = Planner(local, model_id=MODEL, versions=versions)(listing({0: "e0", 1: "e1-new"}))
    assert list(planned["video_id"]) == [vid(1)] and list(planned["attempt"]) == [1]  # a new object
    more = Planner(local, model_id=MODEL, versions=versions, max_attempts=5)(listing({0: "e0"}))
    assert list(more["attempt"]) == [4]
    unlimited = Planner(local, model_id=MODEL, versions=versions, max_attempts=None)
    assert list(unlimited(listing({0: "e0"}))["attempt"]) == [4]
    with pytest.raises(ValueError, match="max_attempts must be 1 to 255"):
        Planner(local, model_id=MODEL, versions=versions, max_attempts=0)

    planner, _ = run(local, {0: "e0"}, "r5", statuses={0: "ok"}, max_attempts=5)  # the fourth try succeeds
    assert planner.counts["planned"] == 1
    rows = assert_one_row_and_one_set_each(local, {0, 1})
    assert (rows[vid(0)]["status"], rows[vid(0)]["attempts"]) == ("ok", 4)
    final = Planner(local, model_id=MODEL, versions=latest_versions(local), max_attempts=None)
    assert len(final(listing({0: "e0"}))["video_id"]) == 0 and final.counts["already_indexed"] == 1


def test_storage_failures_do_not_use_up_attempts(local: OutputLocation) -> None:
    """A video whose storage keeps failing is planned by every run, so an outage that spans more runs than
    `max_attempts` leaves nothing given up; the tries that reach the video still count."""
    assert UNCOUNTED < RETRYABLE
    for run_id in ("r1", "r2", "r3", "r4", "r5"):
        planner, _ = run(local, {0: "e0", 1: "e1"}, run_id, statuses={0: "unavailable", 1: "access_denied"})
        assert planner.counts["planned"] == 2 and planner.counts["attempts_exhausted"] == 0
    rows = assert_one_row_and_one_set_each(local, {0, 1})
    assert [rows[vid(i)]["attempts"] for i in (0, 1)] == [0, 0]
    for run_id, status in (("t1", "timeout"), ("t2", "s3_error"), ("t3", "timeout"), ("t4", "timeout")):
        planner, _ = run(local, {0: "e0"}, run_id, statuses={0: status})
        assert planner.counts["planned"] == 1, run_id
    rows = assert_one_row_and_one_set_each(local, {0, 1})
    assert (rows[vid(0)]["status"], rows[vid(0)]["attempts"]) == ("timeout", 3)  # t2's storage failure not counted
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    assert len(planner(listing({0: "e0"}))["video_id"]) == 0 and planner.counts["attempts_exhausted"] == 1
    status = np.asarray(["ok", "timeout", "read_error", "changed", "s3_error", "decoder_crashed"], dtype=object)
    assert recorded_attempts(np.asarray([1, 2, 1, 3, 2, 1]), status).tolist() == [1, 2, 0, 2, 1, 1]


def test_a_video_gone_when_read_is_tried_again_when_listed_again(local: OutputLocation) -> None:
    """A file moved away during a run and put back (same size and time), or an object deleted and uploaded again
    with the same bytes (same ETag), is listed with the ETag of its ``not_found`` row: that row stood for good."""
    run(local, {0: "e0"}, "r1", statuses={0: "not_found"})
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    planned = planner(listing({0: "e0"}))
    assert list(planned["video_id"]) == [vid(0)] and list(planned["attempt"]) == [2]  # counted, like a timeout


def test_a_read_that_found_the_listing_stale_never_replaces_a_row(local: OutputLocation) -> None:
    """A stale manifest or inventory lists an object's old ETag; its read fails ``changed`` (the object is not that
    version any more). That said nothing of the video, yet its row replaced the current ok one (the video left
    search). It stays now, whoever committed it; a video with no row still gets its ``changed`` row (shown, retried)."""
    run(local, {0: "e0-new", 1: "e1-new"}, "r1")  # the current versions, indexed
    planner, report = run(local, {0: "e0-old", 1: "e1-new", 2: "e2-old"}, "r2", statuses={0: "changed", 2: "changed"})
    assert planner.counts["planned"] == 2  # 0 (another ETag than its row) and 2 (new)
    assert (report.stale_listings, report.dropped, report.videos_committed) == (1, 0, 1)
    rows = assert_one_row_and_one_set_each(local, {0, 1, 2})
    expected = {0: ("e0-new", "ok"), 1: ("e1-new", "ok"), 2: ("e2-old", "changed")}
    assert fields_of(rows, range(3), "etag", "status") == expected
    # Another writer's row of the video, committed while this run read it, stays too.
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    planned = planner(listing({0: "e0-stale"}))
    run(local, {0: "e0-newer"}, "r3")
    committer = Committer(local, model_id=MODEL, run_id="r4", versions=planner.versions)
    committer.add(write_batch(local, planned, "r4", statuses={vid(0): "changed"}))
    assert committer.commit().stale_listings == 1
    rows = assert_one_row_and_one_set_each(local, {0, 1, 2})
    assert (rows[vid(0)]["etag"], rows[vid(0)]["status"], rows[vid(0)]["run_id"]) == ("e0-newer", "ok", "r3")


def test_a_verdict_on_the_bytes_stands_until_the_etag_changes(local: OutputLocation) -> None:
    """A video cut short (`truncated`, the decoder's verdict on the file) fails the same way every time: the next
    run leaves it alone. A body that S3 kept cutting short is a `read_error`, tried again and never counted."""
    assert "truncated" not in RETRYABLE and "read_error" in UNCOUNTED
    run(local, {0: "e0", 1: "e1"}, "r1", statuses={0: "truncated", 1: "read_error"})
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    assert list(planner(listing({0: "e0", 1: "e1"}))["video_id"]) == [vid(1)]
    assert planner.counts["already_indexed"] == 1 and planner.counts["attempts_exhausted"] == 0
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    assert list(planner(listing({0: "e0-rewritten"}))["video_id"]) == [vid(0)]  # another object: tried anew


def test_rows_without_an_attempt_count_are_one_attempt(local: OutputLocation) -> None:
    """Rows written before schema version 3 (attempts null) count as one attempt."""
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    batch = write_batch(local, planner(listing({0: "e0"})), "r1", statuses={vid(0): "timeout"}, attempts=False)
    committer = Committer(local, model_id=MODEL, run_id="r1", versions=planner.versions)
    committer.add(batch)
    committer.commit()
    videos, _ = read_tables(local)
    assert videos.column("attempts").to_pylist() == [None]
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local), max_attempts=2)
    assert list(planner(listing({0: "e0"}))["attempt"]) == [2]
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local), max_attempts=1)
    assert len(planner(listing({0: "e0"}))["video_id"]) == 0 and planner.counts["attempts_exhausted"] == 1


def test_commit_gives_up_when_another_writer_keeps_committing(
    local: OutputLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    committer = Committer(local, model_id=MODEL, run_id="r1", versions=planner.versions, max_rounds=3)
    committer.add(write_batch(local, planner(listing({0: "e0"})), "r1"))
    calls = []

    def conflict(*args: Any, **kwargs: Any) -> int:
        calls.append(kwargs["app_version"])
        raise dlt.CommitConflict("another writer committed")

    monkeypatch.setattr(dlt, "commit", conflict)
    with pytest.raises(RuntimeError, match="succeeded in 3 rounds: other writers kept committing"):
        committer.commit()
    assert calls == [1, 2, 3]  # the segments commit of each round, app versions counting rounds
    monkeypatch.undo()
    report = committer.commit()  # nothing was lost: the next call commits
    assert report.videos_committed == 1 and report.rounds == 1
    assert_one_row_and_one_set_each(local, {0})


def test_reindexed_video_replaces_its_row_and_segments_in_one_round(local: OutputLocation) -> None:
    run(local, {k: f"e{k}" for k in range(4)}, "r1")
    before = latest_versions(local)
    planner, report = run(local, {0: "e0", 1: "e1-new", 2: "e2", 3: "e3-new"}, "r2")
    assert planner.counts["planned"] == 2
    assert report.videos_committed == 2 and report.replaced == 2 and report.dropped == 0 and report.rounds == 1
    assert report.versions == {table: before[table] + 1 for table in dlt.TABLES}  # one commit per table
    rows = assert_one_row_and_one_set_each(local, set(range(4)))
    assert {k: rows[vid(k)]["etag"] for k in range(4)} == {0: "e0", 1: "e1-new", 2: "e2", 3: "e3-new"}
    assert {k: rows[vid(k)]["run_id"] for k in range(4)} == {0: "r1", 1: "r2", 2: "r1", 3: "r2"}
    _, segments = read_tables(local)
    runs = {(r["video_id"], r["run_id"]) for r in segments.to_pylist()}
    assert runs == {(vid(0), "r1"), (vid(1), "r2"), (vid(2), "r1"), (vid(3), "r2")}
    # rewritten pairs keep their shared name: nothing is unpartnered
    assert Planner(local, model_id=MODEL, versions=latest_versions(local)).unpartnered_segment_files == []
    # and the next run plans nothing
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    assert len(planner(listing({0: "e0", 1: "e1-new", 2: "e2", 3: "e3-new"}))["uri"]) == 0


def test_reindexing_after_a_compaction_keeps_the_rows_of_other_models(local: OutputLocation) -> None:
    """``optimize.compact()`` merges files of two models into one: replacing one model's rows of a video rewrote that
    file without every row of the video, the other model's included (gone with no warning until its next run)."""
    run(local, {k: f"e{k}" for k in range(4)}, "r1")
    for table, rows in zip(dlt.TABLES, read_tables(local), strict=True):  # the same videos under another model
        other = rows.set_column(rows.schema.get_field_index("model_id"), "model_id", pa.array(["m2"] * rows.num_rows))
        added = dlt.write_data_file(local, table, other, name=f"part-o1-{uuid.uuid4().hex}.parquet", embed_dim=DIM)
        version = latest_versions(local)[table]
        dlt.commit(local, table, adds=[added], removes=[], read_version=version, app_id="o", app_version=1, metadata={})
    for table in dlt.TABLES:
        DeltaTable(local.table_uri(table)).optimize.compact()
        assert len(dlt.data_file_paths(DeltaTable(local.table_uri(table)))) == 1  # one file, both models
    planner, report = run(local, {0: "e0", 1: "e1-new", 2: "e2", 3: "e3-new"}, "r2")
    assert planner.counts["planned"] == 2 and report.replaced == 2
    videos, segments = read_tables(local)
    for table in (videos, segments):
        models = Counter(zip(table.column("video_id").to_pylist(), table.column("model_id").to_pylist(), strict=True))
        per_video = SEGMENTS if table is segments else 1
        assert models == Counter({(vid(k), m): per_video for k in range(4) for m in (MODEL, "m2")})
    etags = {(r["video_id"], r["model_id"]): r["etag"] for r in videos.to_pylist()}
    assert etags[(vid(1), MODEL)] == "e1-new" and etags[(vid(1), "m2")] == "e1"


# ----------------------------------------------------------------------------------------------------- concurrency


def _race(location: OutputLocation, rep: int) -> None:
    run(location, {k: f"e{k}" for k in range(6)}, f"r0-{rep}")
    listed = {0: "e0-new", 1: "e1-new", 2: "e2-new", 3: "e3-new", 4: "e4", 5: "e5", 6: "e6", 7: "e7"}
    versions = latest_versions(location)
    committers, expected_planned = [], {0, 1, 2, 3, 6, 7}
    statuses = {f"rb-{rep}": {vid(2): "timeout"}}  # ra's row of video 2 wins whatever the order
    for run_id, keep in ((f"ra-{rep}", {0, 1, 2, 3, 6}), (f"rb-{rep}", {1, 2, 3, 6, 7})):
        planner = Planner(location, model_id=MODEL, versions=versions)
        planned = planner(listing(listed))
        assert {str(v) for v in planned["video_id"]} == {vid(k) for k in expected_planned}
        committer = Committer(location, model_id=MODEL, run_id=run_id, versions=versions)
        mine = select(planned, keep)
        half = len(mine["uri"]) // 2
        for part in (slice(0, half), slice(half, None)):
            chunk = {name: column[part] for name, column in mine.items()}
            committer.add(write_batch(location, chunk, run_id, statuses=statuses.get(run_id)))
        committers.append(committer)

    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def commit(index: int) -> None:
        barrier.wait()
        try:
            results[index] = committers[index].commit()
        except Exception as exc:  # reported below
            results[index] = exc

    threads = [threading.Thread(target=commit, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(isinstance(r, CommitReport) for r in results), results
    assert sum(r.videos_committed + r.dropped for r in results) == 10
    rows = assert_one_row_and_one_set_each(location, set(range(8)))
    assert {rows[vid(k)]["etag"] for k in (0, 1, 2, 3)} == {"e0-new", "e1-new", "e2-new", "e3-new"}
    planner = Planner(location, model_id=MODEL, versions=latest_versions(location))
    assert len(planner(listing(listed))["uri"]) == 0 and planner.counts["already_indexed"] == 8


@pytest.mark.slow  # about 2 s a repetition on a busy 2-core machine
def test_two_runs_committing_at_once_on_s3_leave_one_row_and_one_set_each(
    s3_server: str, s3_bucket: tuple[Any, str]
) -> None:
    for rep in range(3):
        location = OutputLocation.from_url(f"s3://{s3_bucket[1]}/out{rep}", s3_endpoint_url=s3_server)
        dlt.create_tables(location, DIM)
        _race(location, rep)


def test_two_runs_committing_at_once_locally(local: OutputLocation) -> None:
    _race(local, 0)


# ----------------------------------------------------------------------------------------------------- killed runs


def test_run_killed_between_its_two_commits_is_healed_by_the_next(local: OutputLocation) -> None:
    run(local, {k: f"e{k}" for k in range(4)}, "r1")
    changed = {0: "e0", 1: "e1-new", 2: "e2-new", 3: "e3"}
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    planned = planner(listing(changed))

    def kill() -> None:
        raise Killed("killed between the segments and the videos commit")

    killed = Committer(local, model_id=MODEL, run_id="killed", versions=planner.versions, before_videos_commit=kill)
    killed.add(write_batch(local, planned, "killed"))
    with pytest.raises(Killed):
        killed.commit()
    videos, segments = read_tables(local)
    assert Counter(r["run_id"] for r in segments.to_pylist() if r["video_id"] == vid(1)) == {"killed": SEGMENTS}
    assert {r["run_id"] for r in videos.to_pylist()} == {"r1"}  # the videos commit never happened

    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    orphans = planner.unpartnered_segment_files
    assert len(orphans) >= 1 and any("killed" in name for name in orphans)
    planned = planner(listing(changed))
    assert list(planned["video_id"]) == [vid(1), vid(2)]
    for joined in planned["current_segment_files"]:
        assert any("killed" in name for name in str(joined).split("\n"))  # the orphans are found
    committer = Committer(local, model_id=MODEL, run_id="r3", versions=planner.versions)
    committer.add(write_batch(local, planned, "r3"))
    report = committer.commit()
    assert report.videos_committed == 2 and report.replaced == 2
    rows = assert_one_row_and_one_set_each(local, set(range(4)))
    _, segments = read_tables(local)
    assert {r["run_id"] for r in segments.to_pylist() if r["video_id"] in (vid(1), vid(2))} == {"r3"}
    assert rows[vid(1)]["run_id"] == rows[vid(2)]["run_id"] == "r3"


def test_segments_landed_then_videos_conflict_does_not_add_segments_twice(local: OutputLocation) -> None:
    """B's videos commit conflicts after its segments landed: B re-plans without committing its segments again."""
    run(local, {k: f"e{k}" for k in range(3)}, "r1")
    listed = {0: "e0-new", 1: "e1-new", 2: "e2"}
    versions = latest_versions(local)
    committers = {}
    for run_id, keep in (("ra", {0}), ("rb", {0, 1})):
        planner = Planner(local, model_id=MODEL, versions=versions)
        committers[run_id] = Committer(local, model_id=MODEL, run_id=run_id, versions=versions)
        committers[run_id].add(write_batch(local, select(planner(listing(listed)), keep), run_id))
    # rb's segments land, then ra commits both tables, then rb's videos commit conflicts and rb retries
    hooked = {"done": False}

    def other_writer_commits() -> None:
        if not hooked["done"]:
            hooked["done"] = True
            committers["ra"].commit()

    committers["rb"]._before_videos_commit = other_writer_commits
    report = committers["rb"].commit()
    assert report.rounds == 2 and report.videos_committed + report.dropped == 2
    rows = assert_one_row_and_one_set_each(local, {0, 1, 2})
    assert rows[vid(1)]["run_id"] == "rb"
    log = dlt.log_changes(
        local, "segments", after_version=versions["segments"], upto_version=report.versions["segments"]
    )
    added_by_rb = [a.path for c in log if c.commit_info.get("vitaclip.run_id") == "rb" for a in c.adds]
    assert len(added_by_rb) == len(set(added_by_rb))


def _stale_and_fresh_runs(
    local: OutputLocation, now: str | None, *, race: bool = False
) -> tuple[CommitReport, list[list[str]]]:
    """Video 0 changes twice while two runs overlap: ra lists it as "e0-a", it changes, rb lists it as "e0-b" and
    commits first (before ra plans its commit, or with `race` between ra's segments and videos commits); then ra
    commits with ETag lookups that say the object is `now`. Video 1 is listed alike by both (rb's row is DONE for
    ra), video 2 by ra alone (rb's rewrite of r1's file carries r1's row of it along: looked up too, as it is now).
    Returns ra's report and the lookups it asked for."""
    run(local, {0: "e0", 1: "e1", 2: "e2"}, "r1")
    versions = latest_versions(local)
    asked: list[list[str]] = []

    def lookup(uris: Any) -> list[str | None]:
        asked.append(list(uris))
        return [now if uri == uri_of(0) else "e2-new" for uri in uris]

    a = Committer(local, model_id=MODEL, run_id="ra", versions=versions, current_etags=lookup)
    a.add(
        write_batch(
            local,
            Planner(local, model_id=MODEL, versions=versions)(listing({0: "e0-a", 1: "e1-new", 2: "e2-new"})),
            "ra",
        )
    )
    b = Committer(local, model_id=MODEL, run_id="rb", versions=versions)
    b.add(
        write_batch(local, Planner(local, model_id=MODEL, versions=versions)(listing({0: "e0-b", 1: "e1-new"})), "rb")
    )
    if race:
        reports: list[CommitReport] = []

        def rb_commits_once() -> None:
            if not reports:
                reports.append(b.commit())

        a._before_videos_commit = rb_commits_once
    else:
        b.commit()
    return a.commit(), asked


@pytest.mark.parametrize("now", [None, "e0-back"])
def test_a_run_that_listed_a_video_before_a_prune_never_puts_it_back_while_it_is_gone(
    local: OutputLocation, now: str | None
) -> None:
    """ra lists video 0 (changed), the file is deleted, a prune (rb) commits its ``deleted`` row, then ra commits:
    its ``ok`` row replaced the deleted one, and search returned a file that no longer exists until the next prune.
    The object is looked up: while it is gone, ra's row is dropped; put back, ra's row goes in as before."""
    run(local, {0: "e0", 1: "e1"}, "r1")
    versions = latest_versions(local)
    a = Committer(local, model_id=MODEL, run_id="ra", versions=versions, current_etags=lambda uris: [now] * len(uris))
    a.add(write_batch(local, Planner(local, model_id=MODEL, versions=versions)(listing({0: "e0-new"})), "ra"))
    run(local, {0: None}, "rb", statuses={0: "deleted"})  # as a --prune-missing run commits it
    report = a.commit()
    rows = assert_one_row_and_one_set_each(local, {0, 1})
    if now is None:
        assert report.superseded == 1 and report.videos_committed == 0
        assert (rows[vid(0)]["run_id"], rows[vid(0)]["status"]) == ("rb", "deleted")
    else:
        assert (rows[vid(0)]["run_id"], rows[vid(0)]["status"]) == ("ra", "ok")


def test_a_run_that_listed_an_older_version_leaves_the_newer_row_in_place(local: OutputLocation) -> None:
    """A run that listed a video before it changed and commits after another run committed the changed video keeps
    out of its way: committing its row would put the older version back until the next run."""
    report, asked = _stale_and_fresh_runs(local, "e0-b")
    assert asked == [[uri_of(0), uri_of(2)]]  # those whose rows other writers added have another ETag than ours
    assert report.superseded == 1 and report.dropped == 2  # video 0 superseded, video 1 DONE by rb
    rows = assert_one_row_and_one_set_each(local, {0, 1, 2})
    expected = {0: ("e0-b", "rb"), 1: ("e1-new", "rb"), 2: ("e2-new", "ra")}
    assert fields_of(rows, range(3), "etag", "run_id") == expected
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    assert len(planner(listing({0: "e0-b", 1: "e1-new", 2: "e2-new"}))["uri"]) == 0  # the next run plans nothing


@pytest.mark.parametrize("now", ["e0-a", "e0-c", None])
def test_a_row_of_the_current_version_or_of_an_unknown_one_replaces_the_other_run(
    local: OutputLocation, now: str | None
) -> None:
    """Ours is of the object as it is now ("e0-a"), or neither row is ("e0-c": it changed again), or the lookup
    could not tell (None): ours replaces the other run's row, as without lookups."""
    report, asked = _stale_and_fresh_runs(local, now)
    assert asked == [[uri_of(0), uri_of(2)]]
    assert report.superseded == 0 and report.dropped == 1
    rows = assert_one_row_and_one_set_each(local, {0, 1, 2})
    assert (rows[vid(0)]["etag"], rows[vid(0)]["run_id"]) == ("e0-a", "ra")


def test_a_newer_row_landing_between_our_two_commits_is_replaced_consistently(local: OutputLocation) -> None:
    """rb commits between ra's segments and videos commits: ra's segments commit has already replaced rb's segments
    of video 0, so ra keeps its row (one row and one set each; the next run sees the changed ETag and redoes it)."""
    report, asked = _stale_and_fresh_runs(local, "e0-b", race=True)
    assert report.rounds == 2 and report.superseded == 0 and asked == []
    rows = assert_one_row_and_one_set_each(local, {0, 1, 2})
    assert (rows[vid(0)]["etag"], rows[vid(0)]["run_id"]) == ("e0-a", "ra")


def _two_runs_reindexing(local: OutputLocation, etags: dict[int, str]) -> tuple[Committer, Committer]:
    """Commits ``etags`` as run r1, then plans them changed for runs ra (all ok) and rb (video 0 timed out)."""
    run(local, etags, "r1")
    versions = latest_versions(local)
    planned = Planner(local, model_id=MODEL, versions=versions)(listing({k: f"{e}-new" for k, e in etags.items()}))
    a = Committer(local, model_id=MODEL, run_id="ra", versions=versions)
    b = Committer(local, model_id=MODEL, run_id="rb", versions=versions)
    a.add(write_batch(local, planned, "ra"))
    b.add(write_batch(local, planned, "rb", statuses={vid(0): "timeout"}))
    return a, b


def test_a_segments_commit_leaves_the_segments_of_videos_it_has_none_for(local: OutputLocation) -> None:
    """A: segments(X, Y ok) | B: segments(X timeout, Y ok) | A: videos | B: videos conflict, drops X and Y.

    B's segments commit replaces A's Y segments by its own but leaves A's X segments: it adds none for X. (Under the
    old rule it removed them too, and B had to put them back after dropping X; that restore path is gone.)
    """
    a, b = _two_runs_reindexing(local, {0: "e0", 1: "e1"})
    paused = {"b": True}

    def pause_b() -> None:
        if paused["b"]:
            paused["b"] = False
            raise InterruptedError("b pauses after its segments commit")

    def b_segments_then_pause() -> None:
        b._before_videos_commit = pause_b
        with pytest.raises(InterruptedError):
            b.commit()
        _, segments = read_tables(local)
        assert Counter((r["video_id"], r["run_id"]) for r in segments.to_pylist()) == {
            (vid(0), "ra"): SEGMENTS,
            (vid(1), "rb"): SEGMENTS,
        }

    a._before_videos_commit = b_segments_then_pause
    assert a.commit().videos_committed == 2
    b._before_videos_commit = None
    report = b.commit()
    assert report.dropped == 2 and report.videos_committed == 0
    rows = assert_one_row_and_one_set_each(local, {0, 1})
    assert rows[vid(0)]["run_id"] == rows[vid(1)]["run_id"] == "ra"
    _, segments = read_tables(local)
    assert {r["run_id"] for r in segments.to_pylist() if r["video_id"] == vid(0)} == {"ra"}


def test_run_killed_after_removing_nothing_of_a_video_it_failed_leaves_it_whole(local: OutputLocation) -> None:
    """A: segments(X ok) | B: segments(X timeout, Y ok), killed | A: videos. X keeps A's segments (the old gap).

    Under the old rule B's segments commit removed A's X segments and X was left DONE without any, for good.
    """
    run(local, {0: "e0", 1: "e1"}, "r1")
    listed = {0: "e0-new", 1: "e1-new"}
    versions = latest_versions(local)
    planned = Planner(local, model_id=MODEL, versions=versions)(listing(listed))

    def kill() -> None:
        raise Killed("killed between the segments and the videos commit")

    a = Committer(local, model_id=MODEL, run_id="ra", versions=versions)
    b = Committer(local, model_id=MODEL, run_id="rb", versions=versions, before_videos_commit=kill)
    a.add(write_batch(local, planned, "ra"))
    b.add(write_batch(local, planned, "rb", statuses={vid(0): "timeout"}))

    def b_commits_segments_and_dies() -> None:
        with pytest.raises(Killed):
            b.commit()

    a._before_videos_commit = b_commits_segments_and_dies
    report = a.commit()
    assert report.videos_committed == 2 and report.rounds == 1
    rows = assert_one_row_and_one_set_each(local, {0, 1})
    assert rows[vid(0)]["run_id"] == rows[vid(1)]["run_id"] == "ra" and rows[vid(0)]["status"] == "ok"
    _, segments = read_tables(local)
    runs = {(r["video_id"], r["run_id"]) for r in segments.to_pylist()}
    assert runs == {(vid(0), "ra"), (vid(1), "rb")}  # Y: B's orphans replaced A's, for the same etag
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    assert len(planner(listing(listed))["uri"]) == 0


def test_a_video_reindexed_as_a_failure_loses_its_old_segments(local: OutputLocation) -> None:
    """The clean-up after the videos commit removes the segments of the rows a video without segments replaced."""
    run(local, {k: f"e{k}" for k in range(4)}, "r1")  # batches {0, 1} and {2, 3}
    before = latest_versions(local)
    _, report = run(local, {0: "e0", 1: "e1-new", 2: "e2", 3: "e3-new"}, "r2", statuses={1: "corrupt"})
    assert report.videos_committed == 2 and report.replaced == 2 and report.rounds == 1
    assert report.versions == {"videos": before["videos"] + 1, "segments": before["segments"] + 2}  # + clean-up
    rows = assert_one_row_and_one_set_each(local, set(range(4)))  # 1 corrupt, without segments
    assert rows[vid(1)]["status"] == "corrupt" and rows[vid(3)]["run_id"] == "r2"
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    assert planner.unpartnered_segment_files == []  # the clean-up's rewrite shares its name with the videos one
    assert len(planner(listing({0: "e0", 1: "e1-new", 2: "e2", 3: "e3-new"}))["uri"]) == 0

    # one batch: 2 re-indexed ok and 3 as a failure, both from r1's second file
    _, report = run(local, {2: "e2-new", 3: "e3-newer"}, "r3", statuses={3: "corrupt"})
    rows = assert_one_row_and_one_set_each(local, set(range(4)))
    assert rows[vid(3)]["status"] == "corrupt" and rows[vid(2)]["run_id"] == "r3"


def _record(location: OutputLocation, run_id: str, state: str) -> None:
    """The run record a job writes (``OUT/runs/<run_id>.json``), as far as `finished_runs` reads it."""
    folder = Path(location.url.removeprefix("file://")) / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{run_id}.json").write_text(json.dumps({"run_id": run_id, "state": state}))


def _plan_and_commit(location: OutputLocation, etags: dict[int, str], run_id: str) -> CommitReport:
    """A run as the job makes it: plans, hands the abandoned segment rows to its Committer, commits."""
    planner = Planner(location, model_id=MODEL, versions=latest_versions(location))
    planned = planner(listing(etags))
    committer = Committer(location, model_id=MODEL, run_id=run_id, versions=planner.versions)
    committer.clean_up_abandoned(planner.abandoned_segments())
    if len(planned["video_id"]):
        committer.add(write_batch(location, planned, run_id))
    return committer.commit()


def test_segments_a_run_killed_before_its_clean_up_left_are_removed_by_a_later_run(
    local: OutputLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """r2 re-indexed two videos as failures, committed their rows and was killed before its clean-up commit: r1's
    segment rows of them stayed for good (no later run plans a video whose row is final), and in the segments
    index. A later run removes them once r1's record says it ended; while it says "running" (a live run between
    its two commits looks the same), they stay."""
    etags = {k: f"e{k}" for k in range(4)}
    run(local, etags, "r1")
    changed = {**etags, 1: "e1-new", 2: "e2-new"}

    def killed(self: Committer, attempt: int) -> None:
        raise Killed("killed before the clean-up commit")

    with monkeypatch.context() as patch:
        patch.setattr(Committer, "_clean_up", killed)
        with pytest.raises(Killed):
            run(local, changed, "r2", statuses={1: "not_a_video", 2: "corrupt"})
    _record(local, "r2", "running")
    _, segments = read_tables(local)
    left = {
        v
        for v, r in zip(segments.column("video_id").to_pylist(), segments.column("run_id").to_pylist(), strict=True)
        if r == "r1"
    }
    assert left == {vid(k) for k in range(4)}  # r1's rows of 1 and 2 are stale: their rows are r2's failures

    runs = Path(local.url.removeprefix("file://")) / "runs"
    for record in (
        '{"run_id": "r1", "state": ["committed"]}',
        "[" * 100_000,
        "\xff",
        '{"run_id": "r0", "state": "committed"}',
    ):
        (runs / "r1.json").write_text(record, encoding="latin-1")  # not a record saying r1 ended: left alone
        assert not _plan_and_commit(local, changed, "r3").wrote
    _record(local, "r1", "running")  # not known to have ended: nothing is removed
    report = _plan_and_commit(local, changed, "r3")
    assert not report.wrote and read_tables(local)[1].num_rows == segments.num_rows
    _record(local, "r1", "committed")
    report = _plan_and_commit(local, changed, "r4")
    assert report.wrote and report.videos_committed == 0
    rows = assert_one_row_and_one_set_each(local, set(range(4)))  # segments only next to ok rows
    assert rows[vid(1)]["status"] == "not_a_video" and rows[vid(0)]["run_id"] == "r1"
    assert _plan_and_commit(local, changed, "r5").wrote is False  # nothing left to do


def test_clean_up_leaves_the_segments_another_run_committed_since(local: OutputLocation) -> None:
    """B: segments(X timeout: none), videos | A: snapshot, segments(X ok) | B: clean-up | A: videos (no conflict).

    B's clean-up runs while X's row is still B's, but A's X segments are not stale: A's videos commit lands next
    without a conflict. The clean-up removes only rows of runs whose rows of X it replaced.
    """
    a, b = _two_runs_reindexing(local, {0: "e0"})
    clean_up = b._clean_up
    cleaned: list[int | None] = []

    def a_commits_around_the_clean_up(attempt: int) -> int | None:
        a._before_videos_commit = lambda: cleaned.append(clean_up(attempt))
        a.commit()
        return cleaned[0]

    b._clean_up = a_commits_around_the_clean_up  # type: ignore[method-assign]
    assert b.commit().videos_committed == 1
    assert cleaned == [None]  # r1's segments of X went with A's segments commit: nothing left to clean
    rows = assert_one_row_and_one_set_each(local, {0})
    assert rows[vid(0)]["run_id"] == "ra" and rows[vid(0)]["status"] == "ok"
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    assert len(planner(listing({0: "e0-new"}))["uri"]) == 0


# ----------------------------------------------------------------------------------------------------- I/O


def test_planner_reads_only_key_columns(local: OutputLocation, monkeypatch: pytest.MonkeyPatch) -> None:
    thumbs = 256 * 1024  # big thumbnails: reading them would show in the byte count
    versions = latest_versions(local)
    planned = Planner(local, model_id=MODEL, versions=versions)(listing({k: f"e{k}" for k in range(4)}))
    batch = write_batch(local, planned, "r1", thumb_bytes=thumbs)
    assert batch.videos is not None and batch.segments is not None
    dlt.commit(local, "videos", adds=[batch.videos], removes=[], read_version=0, app_id="t", app_version=1, metadata={})
    orphan = write_batch(local, select(planned, {0, 1}), "killed", thumb_bytes=thumbs).segments  # unpartnered
    assert orphan is not None
    dlt.commit(
        local,
        "segments",
        adds=[batch.segments, orphan],
        removes=[],
        read_version=0,
        app_id="t",
        app_version=1,
        metadata={},
    )

    counting = CountingHandler()
    monkeypatch.setattr(OutputLocation, "filesystem", lambda self: (pafs.PyFileSystem(counting), self.url))
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    assert planner.unpartnered_segment_files == [orphan.path]
    videos_root, segments_root = local.table_uri("videos"), local.table_uri("segments")
    assert set(counting.bytes_read) == {f"{videos_root}/{batch.videos.path}", f"{segments_root}/{orphan.path}"}
    for path, size in (
        (f"{videos_root}/{batch.videos.path}", batch.videos.size_bytes),
        (f"{segments_root}/{orphan.path}", orphan.size_bytes),
    ):
        assert counting.bytes_read[path] < 80 * 1024 < size / 6  # footer and key columns, no thumbnails
    monkeypatch.undo()
    planned = planner(listing({0: "e0-new", 1: "e1", 2: "e2", 3: "e3"}))
    assert list(planned["video_id"]) == [vid(0)]
    assert set(str(planned["current_segment_files"][0]).split("\n")) == {batch.segments.path, orphan.path}


def test_a_video_pending_in_two_batches_is_committed_once(local: OutputLocation) -> None:
    versions = latest_versions(local)
    committer = Committer(local, model_id=MODEL, run_id="r1", versions=versions)
    for _ in range(2):  # two Planner actors that each saw video 1 listed
        planned = Planner(local, model_id=MODEL, versions=versions)(listing({0: "e0", 1: "e1"}))
        committer.add(write_batch(local, select(planned, {0, 1} if not committer.pending_videos else {1}), "r1"))
    report = committer.commit()
    assert report.duplicates == 1 and report.videos_committed == 2
    assert_one_row_and_one_set_each(local, {0, 1})
    # a third actor's batch of video 1 after that commit: left out too, the table keeps one row
    planned = Planner(local, model_id=MODEL, versions=versions)(listing({1: "e1", 2: "e2"}))
    committer.add(write_batch(local, planned, "r1"))
    report = committer.commit()
    assert report.duplicates == 1 and report.videos_committed == 1 and report.replaced == 0
    assert_one_row_and_one_set_each(local, {0, 1, 2})
    with pytest.raises(ValueError, match="names a video twice"):
        committer.add(WrittenBatch.of(None, None, ((vid(0), "e0", "ok"), (vid(0), "e0", "ok"))))
    # two ids of one hash (their first 16 hex digits) are two videos, not one named twice
    committer.add(WrittenBatch.of(None, None, ((f"{'ab' * 8}00000000", "e", "ok"), (f"{'ab' * 8}11111111", "e", "ok"))))
    with pytest.raises(ValueError, match="without a video id"):
        committer.add(WrittenBatch(None, None, pa.table([[None], [None], ["ok"], [""], [""]], schema=KEYS_SCHEMA)))
    with pytest.raises(ValueError, match="must have the schema"):
        committer.add(WrittenBatch(None, None, pa.table({"video_id": [vid(3)], "etag": ["e3"], "status": ["ok"]})))


def test_a_video_pending_in_an_earlier_batch_is_found_whatever_else_a_batch_names(local: OutputLocation) -> None:
    """Pending videos are matched by id hash: a video's hash must not depend on the other ids of its batch (ids that
    are not `video_id_for` ids hash another way)."""
    versions = latest_versions(local)
    committer = Committer(local, model_id=MODEL, run_id="r1", versions=versions)
    committer.add(WrittenBatch.of(None, None, [(vid(0), "e0", "ok")]))
    committer.add(WrittenBatch.of(None, None, [(vid(0), "e0", "ok"), ("not-a-video-id", "e", "ok")]))
    assert committer.pending_videos == 2 and committer.holds([vid(0), "not-a-video-id", vid(1)]) == [True, True, False]


def test_a_commit_that_landed_but_failed_is_not_made_twice(
    local: OutputLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(local, {0: "e0", 1: "e1"}, "r1")
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    committer = Committer(local, model_id=MODEL, run_id="r2", versions=planner.versions)
    committer.add(write_batch(local, planner(listing({0: "e0-new", 1: "e1"})), "r2"))
    real = dlt.commit

    def lands_then_times_out(*args: Any, **kwargs: Any) -> int:
        real(*args, **kwargs)
        raise OSError("timed out waiting for the store")

    monkeypatch.setattr(dlt, "commit", lands_then_times_out)
    report = committer.commit()
    assert report.rounds == 1 and report.videos_committed == 1 and report.replaced == 1
    assert report.versions == {"videos": 2, "segments": 2}
    rows = assert_one_row_and_one_set_each(local, {0, 1})
    assert rows[vid(0)]["run_id"] == "r2"


def test_segments_another_run_removed_after_ours_landed_are_committed_again(local: OutputLocation) -> None:
    """A: segments(X ok) | B: segments(X ok, another etag: removes A's X segments), videos | A: videos conflict.

    X's object changed between the two listings. A replaces B's row (not DONE for A's etag) and B's segments; its
    own X segments are gone, so A commits them again from its data file. (A B whose X timed out no longer removes
    A's X segments: a segments commit removes only the rows of videos it adds rows for.)
    """
    run(local, {0: "e0", 1: "e1"}, "r1")
    versions = latest_versions(local)
    planned = Planner(local, model_id=MODEL, versions=versions)(listing({0: "e0-new", 1: "e1-new"}))
    a = Committer(local, model_id=MODEL, run_id="ra", versions=versions)
    b = Committer(local, model_id=MODEL, run_id="rb", versions=versions)
    a.add(write_batch(local, planned, "ra"))
    newer = Planner(local, model_id=MODEL, versions=versions)(listing({0: "e0-newer"}))
    b.add(write_batch(local, newer, "rb"))
    calls: list[CommitReport] = []

    def b_commits_both_tables() -> None:
        if not calls:
            calls.append(b.commit())

    a._before_videos_commit = b_commits_both_tables
    report = a.commit()
    assert calls[0].videos_committed == 1 and calls[0].replaced == 1
    assert report.rounds == 2 and report.readded == 1 and report.dropped == 0 and report.videos_committed == 2
    rows = assert_one_row_and_one_set_each(local, {0, 1})
    assert rows[vid(0)]["run_id"] == rows[vid(1)]["run_id"] == "ra" and rows[vid(0)]["status"] == "ok"
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    assert len(planner(listing({0: "e0-new", 1: "e1-new"}))["uri"]) == 0


def test_our_landed_segments_go_when_another_run_finishes_the_video_as_a_failure(local: OutputLocation) -> None:
    """A's segments of X land; B commits X as a final failure (same etag); A's videos commit conflicts and drops X
    (B's row is done). No row has segments then: A's clean-up removes its own landed segment rows of X."""
    versions = latest_versions(local)
    seen = listing({0: "e0", 1: "e1"})
    a = Committer(local, model_id=MODEL, run_id="ra", versions=versions)
    b = Committer(local, model_id=MODEL, run_id="rb", versions=versions)
    a.add(write_batch(local, Planner(local, model_id=MODEL, versions=versions)(seen), "ra"))
    b.add(write_batch(local, Planner(local, model_id=MODEL, versions=versions)(listing({0: "e0"})), "rb",
                      statuses={vid(0): "not_a_video"}))  # fmt: skip
    a._before_videos_commit = lambda: (b.commit(), setattr(a, "_before_videos_commit", None))  # type: ignore[func-returns-value]
    report = a.commit()
    assert report.dropped == 1 and report.videos_committed == 1
    rows = assert_one_row_and_one_set_each(local, {0, 1})
    assert rows[vid(0)]["run_id"] == "rb" and rows[vid(0)]["status"] == "not_a_video"
    assert rows[vid(1)]["run_id"] == "ra"


@pytest.mark.parametrize("seed", [22, 24, 43, 57, 79, 88, 103, 113])
def test_nested_races_leave_one_row_and_segments_only_next_to_ok_rows(tmp_path: Path, seed: int) -> None:
    """A committed base, then three runs over random etags and outcomes (ok, ok without segments, final and
    retryable failures), each committing in two parts, a commit nested inside another's gap between its two table
    commits at random. After all: one row per video, and segment rows (of one run, a whole set) only next to an ok
    row. The seeds are those that left stale segments next to failed rows before the clean-up found them all."""
    import random

    rnd = random.Random(seed)
    local = OutputLocation.from_url(str(tmp_path / "out"))
    dlt.create_tables(local, DIM)
    outcomes = ["ok", "ok", "bare", "not_a_video"]

    def batch(planned: dict[str, np.ndarray], run_id: str, chosen: dict[str, str]) -> WrittenBatch:
        statuses = {v: ("ok" if s == "bare" else s) for v, s in chosen.items()}
        bare = frozenset(v for v, s in chosen.items() if s == "bare")
        return write_batch(local, planned, run_id, statuses=statuses, without_segments=bare)

    base = Planner(local, model_id=MODEL, versions=latest_versions(local))
    planned = base(listing({k: "e0" for k in range(5)}))
    committer = Committer(local, model_id=MODEL, run_id="r0", versions=base.versions)
    committer.add(batch(planned, "r0", {str(v): rnd.choice(outcomes) for v in planned["video_id"]}))
    committer.commit()
    runs: dict[str, dict[str, Any]] = {}
    for name in ("ra", "rb", "rc"):
        etags = {k: rnd.choice(["e0", "e1", "e2"]) for k in range(5) if rnd.random() < 0.8} or {0: "e1"}
        planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
        planned = planner(listing(etags))
        chosen = {str(v): rnd.choice([*outcomes, "timeout"]) for v in planned["video_id"]}
        cut = rnd.randint(0, len(planned["video_id"]))
        parts = [{k: col[:cut] for k, col in planned.items()}, {k: col[cut:] for k, col in planned.items()}]
        committer = Committer(local, model_id=MODEL, run_id=name, versions=planner.versions)
        runs[name] = {"c": committer, "parts": [p for p in parts if len(p["video_id"])], "chosen": chosen}

    def step(name: str, depth: int) -> None:
        run = runs[name]
        if not run["parts"]:
            return
        run["c"].add(batch(run["parts"].pop(0), name, run["chosen"]))

        def nested() -> None:
            run["c"]._before_videos_commit = None
            for other in rnd.sample(list(runs), len(runs)):
                if other != name and rnd.random() < 0.5 and depth < 3:
                    step(other, depth + 1)

        run["c"]._before_videos_commit = nested
        run["c"].commit()

    while any(run["parts"] for run in runs.values()):
        step(rnd.choice([name for name, run in runs.items() if run["parts"]]), 0)
    videos, segments = read_tables(local)
    assert max(Counter(videos.column("video_id").to_pylist()).values()) == 1
    status = dict(zip(videos.column("video_id").to_pylist(), videos.column("status").to_pylist(), strict=True))
    sets: dict[str, list[tuple[str, int]]] = {}
    for row in segments.select(["video_id", "run_id", "segment_index"]).to_pylist():
        sets.setdefault(row["video_id"], []).append((row["run_id"], row["segment_index"]))
    for video_id, rows in sets.items():
        assert status.get(video_id) == "ok", (video_id, status.get(video_id), rows)
        assert len({run for run, _ in rows}) == 1 and sorted(i for _, i in rows) == list(range(SEGMENTS))


def test_a_commit_that_lands_but_is_reported_as_a_conflict_counts_as_landed(local, monkeypatch) -> None:
    """A conditional write retried after its answer was lost finds its own commit there: a conflict on the surface.
    The round must count it as landed, or the rows it moved out of another writer's file are lost to later rounds
    and a video ends up with two rows."""
    import index.commits as commits_module

    va = latest_versions(local)
    planned_a = Planner(local, model_id=MODEL, versions=va)(listing({0: "e2", 1: "e2"}))
    planned_b = Planner(local, model_id=MODEL, versions=va)(listing({0: "e1", 1: "e1"}))
    b = Committer(local, model_id=MODEL, run_id="rb", versions=va)
    b.add(write_batch(local, planned_b, "rb"))
    b.commit()  # videos 0 and 1 in one file of run rb
    a = Committer(local, model_id=MODEL, run_id="ra", versions=va)
    real, fired = dlt.commit, []

    def landed_but_reported_as_conflict(location: Any, table: str, **kwargs: Any) -> int:
        version = real(location, table, **kwargs)
        if table == "videos" and not fired:
            fired.append(version)
            raise dlt.CommitConflict("the version exists (our own retried write)")
        return version

    monkeypatch.setattr(commits_module.dlt, "commit", landed_but_reported_as_conflict)
    a.add(write_batch(local, select(planned_a, {0}), "ra"))
    assert a.commit().rounds == 1 and fired
    a.add(write_batch(local, select(planned_a, {1}), "ra"))
    a.commit()
    videos, _ = read_tables(local)
    rows = [(r["video_id"], r["etag"], r["run_id"]) for r in videos.to_pylist()]
    assert sorted(rows) == sorted([(vid(0), "e2", "ra"), (vid(1), "e2", "ra")])


def _segment_runs(location: OutputLocation) -> dict[str, tuple[str, str, set[str]]]:
    """video id -> (its row's status, its row's run, the runs of its segment rows)."""
    videos, segments = read_tables(location)
    rows = {r["video_id"]: (r["status"], r["run_id"], set()) for r in videos.to_pylist()}
    for row in segments.to_pylist():
        rows[row["video_id"]][2].add(row["run_id"])
    return rows


def _one_batch(location: OutputLocation, etags: dict[int, str], run_id: str, **options: Any) -> None:
    planner = Planner(location, model_id=MODEL, versions=latest_versions(location))
    committer = Committer(location, model_id=MODEL, run_id=run_id, versions=planner.versions)
    committer.add(write_batch(location, planner(listing(etags)), run_id, **options))
    committer.commit()


@pytest.mark.parametrize("status", ["ok", "corrupt"])
def test_a_video_indexed_again_without_segments_loses_the_old_ones_wherever_they_moved(local, status) -> None:
    """Video 2's segments move to a rewrite named apart from any videos file (run r2 re-indexes 0 with segments and
    1 without, from one file). When r3 indexes 2 again without segments (too short, or a final failure), the old
    ones go too."""
    _one_batch(local, {0: "e0", 1: "e1", 2: "e2"}, "r1")
    _one_batch(local, {0: "e0b", 1: "e1b"}, "r2", without_segments=frozenset({vid(1)}))
    _one_batch(local, {2: "e2b"}, "r3", statuses={vid(2): status}, without_segments=frozenset({vid(2)}))
    assert _segment_runs(local) == {
        vid(0): ("ok", "r2", {"r2"}),
        vid(1): ("ok", "r2", set()),
        vid(2): (status, "r3", set()),
    }


def test_a_killed_run_segments_are_left_to_the_video_next_set(local) -> None:
    """A run killed between its segments commit and its videos commit: its segments look like a live run's in that
    gap, so a run indexing the video again without segments leaves them, next to a row of another run (which search
    tells apart); the next commit that adds segments of the video removes them."""

    def kill() -> None:
        raise Killed

    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    committer = Committer(local, model_id=MODEL, run_id="r1", versions=planner.versions, before_videos_commit=kill)
    committer.add(write_batch(local, planner(listing({0: "e0"})), "r1"))
    with pytest.raises(Killed):
        committer.commit()  # its segments landed, its video row never did
    _one_batch(local, {0: "e0b"}, "r2", without_segments=frozenset({vid(0)}))
    assert _segment_runs(local) == {vid(0): ("ok", "r2", {"r1"})}
    _one_batch(local, {0: "e0c"}, "r3")
    assert _segment_runs(local) == {vid(0): ("ok", "r3", {"r3"})}


def test_seen_ids_find_every_duplicate_across_merges() -> None:
    """The planner's record of listed ids (a sorted array plus a small set, merged when the set is full) answers as a
    set would, for repeats within a batch, across batches and across merges."""
    from index.commits import _SeenIds

    rng = np.random.default_rng(7)
    seen, reference = _SeenIds(recent_max=50), set()
    for _ in range(40):
        batch = rng.integers(0, 2**64 - 1, size=30, dtype=np.uint64, endpoint=True)
        batch[::3] = rng.choice(np.fromiter(reference, np.uint64), size=10) if reference else batch[::3]
        before = seen.in_array(batch)
        for i, key in enumerate(batch.tolist()):
            assert seen.add(key, in_array=bool(before[i])) is (key not in reference)
            reference.add(key)
        seen.merge()
    assert len(seen) == len(reference) and seen.array().tolist() == sorted(reference)
    assert len(seen._recent) < 50  # merged along the way: the set stays small


@pytest.mark.parametrize(
    "layout", ["runs", "no_dictionaries", "small_row_groups", "string_views", "shuffled", "two_models", "empty"]
)
def test_a_files_distinct_values_are_read_as_runs_whatever_wrote_it(local: OutputLocation, layout: str) -> None:
    """Which (video, run) pairs a segments file holds is read as one row per run of equal rows, from Parquet's
    dictionary codes: the same pairs as a plain read, for files written without dictionaries, in many row groups,
    with view types (polars, delta-rs's merge), in any order and with another model's rows between."""
    import pyarrow.parquet as pq

    from index.commits import _distinct_runs, _read_columns

    rng = np.random.default_rng(3)
    pairs = [(vid(k), f"run-{k % 3}") for k in range(400)]
    rows = [(v, r, "m2" if layout == "two_models" and k % 5 == 0 else MODEL) for k, (v, r) in enumerate(pairs)]
    rows = [row for row in rows for _ in range(7)]  # seven segments a video, together
    if layout == "shuffled":
        rows = [rows[i] for i in rng.permutation(len(rows))]
    if layout == "empty":
        rows = []
    names = ["video_id", "run_id", "model_id"]
    kind = pa.string_view() if layout == "string_views" else pa.string()
    data = pa.table([pa.array([row[i] for row in rows], kind) for i in range(3)], names=names)
    folder = Path(local.table_uri("segments"))
    pq.write_table(
        data,
        folder / "written.parquet",
        use_dictionary=layout != "no_dictionaries",
        row_group_size=100 if layout == "small_row_groups" else None,
    )
    runs = _distinct_runs(local, "segments", "written.parquet", ["video_id", "run_id"], MODEL)
    plain = _read_columns(local, "segments", "written.parquet", ["video_id", "run_id"], MODEL)
    assert runs.schema == pa.schema([("video_id", pa.string()), ("run_id", pa.string())])
    expected = set(zip(*(plain.column(name).to_pylist() for name in ("video_id", "run_id")), strict=True))
    assert set(zip(*(runs.column(name).to_pylist() for name in ("video_id", "run_id")), strict=True)) == expected
    assert expected == {(v, r) for v, r, m in rows if m == MODEL}
    if layout in ("runs", "no_dictionaries", "string_views", "two_models"):
        assert runs.num_rows == len(expected)  # one row per video, not per segment
    elif layout == "small_row_groups":
        assert runs.num_rows <= len(expected) + len(rows) // 100  # at most one more per row group


def test_planner_names_committed_videos_the_listing_left_out_under_a_scope(local: OutputLocation) -> None:
    """`Planner.missing` (--prune-missing): committed, not listed this run, under a scope, not already deleted."""
    run(local, {k: f"e{k}" for k in range(4)}, "r1")
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    planner(listing({0: "e0", 2: "e2"}))
    assert planner.missing(["s3://in/"]).column("uri").to_pylist() == [uri_of(1), uri_of(3)]
    assert planner.missing(["s3://in/v3"]).column("uri").to_pylist() == [uri_of(3)]
    assert planner.missing(["s3://other/"]).num_rows == 0 and planner.missing([]).num_rows == 0
    missing = planner.missing(["s3://in/"])
    assert missing.column("listing_status").to_pylist() == ["deleted"] * 2
    assert missing.column("etag").null_count == 2  # planned whatever the row's etag
    planned = planner({name: missing.column(name).to_numpy(zero_copy_only=False) for name in missing.column_names})
    assert list(planned["video_id"]) == [vid(1), vid(3)] and all(planned["current_video_file"])

    run(local, {1: None, 3: None}, "r2", statuses={1: "deleted", 3: "deleted"})  # as the job commits them
    planner = Planner(local, model_id=MODEL, versions=latest_versions(local))
    planner(listing({0: "e0", 2: "e2"}))
    assert planner.missing(["s3://in/"]).num_rows == 0  # rows that say deleted are left alone
    planned = planner(listing({3: "e3-back"}))  # a video put back is indexed again
    assert list(planned["video_id"]) == [vid(3)]


def test_the_planners_etag_hash_tells_strings_apart_without_a_python_object_per_row() -> None:
    """`_keyed_hash`: equal strings, equal values wherever they sit (sliced arrays, chunks, passes); different
    strings, different values; null 0 and nothing else 0; strings past the numpy width hashed the same way every
    time; another key, other values."""
    from index.commits import _ROWS_PER_PASS, _WIDE, _keyed_hash

    rng = np.random.default_rng(7)
    n = _ROWS_PER_PASS * 2 + 123  # several passes
    lengths = rng.integers(0, _WIDE + 20, n)
    alphabet = np.array(list('0123456789abcdef-"\x00é'))
    strings = ["".join(rng.choice(alphabet, k)) for k in lengths]
    strings[:6] = ["", "\x00", "\x00\x00", "a", "a\x00", '"d41d8cd98f00b204e9800998ecf8427e"']
    values: list[str | None] = [*strings, None]
    key = 123456789
    whole = _keyed_hash(pa.array(values, pa.string()), key)
    assert whole[-1] == 0 and np.all(whole[:-1] != 0)
    distinct = dict(zip(strings, whole[:-1].tolist(), strict=True))
    assert len(set(distinct.values())) == len(distinct)  # no two different strings collide
    assert [distinct[s] for s in strings] == whole[:-1].tolist()  # equal strings, equal values
    sliced = pa.array(values, pa.string()).slice(1000, 5000)
    assert np.array_equal(_keyed_hash(sliced, key), whole[1000:6000])
    chunked = pa.chunked_array([pa.array(values[:777], pa.string()), pa.array(values[777:], pa.string())])
    assert np.array_equal(_keyed_hash(chunked, key), whole)
    assert np.array_equal(_keyed_hash(pa.array(values, pa.large_string()), key), whole)
    reordered = _keyed_hash(pa.array(values[::-1], pa.string()), key)
    assert np.array_equal(reordered, whole[::-1])
    other = _keyed_hash(pa.array(values, pa.string()), key + 1)
    assert np.count_nonzero(other[:-1] == whole[:-1]) == 0
    assert np.array_equal(_keyed_hash(pa.array([], pa.string()), key), np.zeros(0, np.uint64))
    assert np.array_equal(_keyed_hash(pa.array([None, None], pa.string()), key), np.zeros(2, np.uint64))


def test_video_id_hashes_are_the_ids_first_16_hex_digits_across_passes() -> None:
    from index.commits import _ROWS_PER_PASS, _id_hash, _str_hash

    ids: list[str | None] = [video_id_for(f"/videos/{i}.mp4") for i in range(_ROWS_PER_PASS + 50)]
    odd = ["ABCDEF0123456789abcdef01", "g" * 24, "short", "0" * 24, None]
    values = pa.array(ids + odd, pa.string())
    hashes = _id_hash(values)
    assert hashes[: len(ids)].tolist() == [int(v[:16], 16) for v in ids if v is not None]
    assert hashes[len(ids) : -1].tolist() == [*_str_hash(odd[:3]).tolist(), 0]  # blake2b unless lowercase hex
    assert hashes[-1] == _str_hash([None])[0] == 0
    assert np.array_equal(_id_hash(values.slice(7, 40_000)), hashes[7:40_007])
    # Only ids, 24 bytes each (a job's batch): read as one matrix, sliced or not; any other 24-byte value among them
    # is hashed as above.
    only_ids = pa.array(ids[:1000], pa.string())
    assert _id_hash(only_ids).tolist() == [int(v[:16], 16) for v in ids[:1000] if v is not None]
    assert np.array_equal(_id_hash(only_ids.slice(3, 500)), hashes[3:503])
    for other in ("ABCDEF0123456789abcdef01", "g" * 24, "0123456789abcdef0123456g"[::-1]):
        mixed = _id_hash(pa.array([*ids[:10], other], pa.string()))
        assert np.array_equal(mixed[:10], hashes[:10])
        assert mixed[10] == _str_hash([other])[0]


def test_a_video_with_two_rows_is_indexed_again_and_left_with_one(local: OutputLocation) -> None:
    """A copy of a committed row appended by another writer (an analyst's `write_deltalake(mode="append")`): the
    planner plans that video again although it is done, and the commit replaces both rows with one."""
    from deltalake import write_deltalake

    run(local, {k: f"e{k}" for k in range(3)}, "r1")
    videos = DeltaTable(local.table_uri("videos"))
    table = videos.to_pyarrow_table()
    copy = table.filter(pa.array([v == vid(1) for v in table.column("video_id").to_pylist()]))
    write_deltalake(local.table_uri("videos"), copy, mode="append")
    assert Counter(DeltaTable(local.table_uri("videos")).to_pyarrow_table().column("video_id").to_pylist())[vid(1)] == 2

    planner, _ = run(local, {k: f"e{k}" for k in range(3)}, "r2")
    assert planner.counts["already_indexed"] == 2 and planner.counts["planned"] == 1
    rows = assert_one_row_and_one_set_each(local, {0, 1, 2})
    assert rows[vid(1)]["run_id"] == "r2" and rows[vid(0)]["run_id"] == "r1"
    planner, _ = run(local, {k: f"e{k}" for k in range(3)}, "r3")
    assert planner.counts["planned"] == 0


def test_a_file_to_rewrite_gone_before_the_commit_says_why(local: OutputLocation) -> None:
    """A file the commit must rewrite (a run's own, after another run committed some of its videos) deleted by a
    vacuum whose retention was shorter than the wait for the commit: a bare FileNotFoundError naming the path
    reached the operator. The error now says what happened and that nothing of the round was committed."""
    run(local, {k: f"e{k}" for k in range(4)}, "r1")
    before = latest_versions(local)
    planner = Planner(local, model_id=MODEL, versions=before)
    planned = planner(listing({0: "e0-new"}))  # one of r1's file's four videos changed: that file is rewritten

    def vacuumed(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory")

    committer = Committer(local, model_id=MODEL, run_id="r2", versions=planner.versions, rewrite=vacuumed)
    committer.add(write_batch(local, planned, "r2"))
    with pytest.raises(FileNotFoundError, match="gone before this run's commit .*nothing was committed"):
        committer.commit()
    assert latest_versions(local) == before

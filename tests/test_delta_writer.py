"""The Delta output layer end to end without Ray: list -> plan -> decode -> embed -> write file pair -> commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from ray.data.block import BlockAccessor
from test_index_job import make_videos

from index.commits import Committer, Planner
from index.delta_tables import OutputLocation, create_tables
from index.writer import ResultWriter, complete_videos
from jobs.storage import list_videos
from vitaclip.stages import LISTING_ERROR, LISTING_STATUS, DecodeStage, EmbedStage


def _listed(folder: Path) -> dict[str, np.ndarray]:
    objects = list(list_videos([str(folder)]))

    def column(values: list[Any]) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    return {
        "uri": column([o.uri for o in objects]),
        "etag": column([o.etag for o in objects]),
        "size_bytes": np.asarray([o.size_bytes for o in objects]),
        LISTING_STATUS: column([o.status for o in objects]),
        LISTING_ERROR: column([o.error_message for o in objects]),
    }


def test_one_batch_from_listing_to_committed_tables(tmp_path: Path) -> None:
    make_videos(tmp_path / "in", 2)  # two videos of 3 and 3.5 s, plus broken files
    embed = EmbedStage(model="vitaclip-tiny", top_k=2)
    model_id, embed_dim = embed.model_id, embed.model.embed_dim
    location = OutputLocation.from_url(str(tmp_path / "out"))
    versions = create_tables(location, embed_dim, model_id=model_id)

    listed = _listed(tmp_path / "in")
    planner = Planner(location, model_id=model_id, versions=versions)
    planned = planner(listed)
    assert planner.counts["planned"] == len(listed["uri"]) == len(planned["uri"])
    decode = DecodeStage(num_frames=2, size=embed.model.image_size, segment_seconds=1.0)
    writer = ResultWriter(
        location, model_id=model_id, run_id="run-1", label_names=embed.label_names, embed_dim=embed_dim
    )
    written = writer(embed(decode(planned)))
    assert written.videos is not None and written.segments is not None
    assert written.videos.path == written.segments.path  # a pair: one name in both tables
    committer = Committer(location, model_id=model_id, run_id="run-1", versions=versions)
    committer.add(written)
    report = committer.commit()
    assert report.videos_committed == len(listed["uri"])

    videos = DeltaTable(location.table_uri("videos")).to_pyarrow_table().to_pylist()
    segments = DeltaTable(location.table_uri("segments")).to_pyarrow_table().to_pylist()
    assert sorted(v["uri"] for v in videos) == sorted(listed["uri"].tolist())  # one row per video
    ok = {v["video_id"]: v for v in videos if v["status"] == "ok"}
    assert len(ok) == 2
    for row in videos:
        assert (row["embedding"] is None) == (row["status"] != "ok")
        if row["status"] == "ok":
            assert len(row["embedding"]) == embed_dim and row["model_id"] == model_id and row["run_id"] == "run-1"
    keys = [(s["video_id"], s["segment_index"]) for s in segments]
    assert len(keys) == len(set(keys)) and {v for v, _ in keys} == set(ok)
    for video_id, row in ok.items():
        indices = sorted(i for v, i in keys if v == video_id)
        assert indices == list(range(len(indices))) and len(indices) >= int(row["duration_seconds"])

    # The next run over the same listing plans nothing.
    again = Planner(location, model_id=model_id, versions=report.versions)
    assert len(again(listed)["uri"]) == 0 and again.counts["already_indexed"] == len(listed["uri"])


def test_videos_cut_across_blocks_are_written_whole_and_once(tmp_path: Path) -> None:
    """Ray Data cuts a stage's output into blocks by size, so a video's clips may come in several blocks, in any
    order, some twice (a retried embed task), and a retried decode task replays what its first attempt made."""
    make_videos(tmp_path / "in", 3)  # three videos of 3 to 4 s with 1 s segments, plus broken files
    embed = EmbedStage(model="vitaclip-tiny", top_k=2)
    model_id, embed_dim = embed.model_id, embed.model.embed_dim
    location = OutputLocation.from_url(str(tmp_path / "out"))
    versions = create_tables(location, embed_dim, model_id=model_id)
    listed = _listed(tmp_path / "in")
    decode = DecodeStage(num_frames=2, size=embed.model.image_size, segment_seconds=1.0)
    rows = BlockAccessor.batch_to_block(embed(decode(listed)))
    again = BlockAccessor.batch_to_block(embed(decode(listed)))  # the same videos decoded a second time
    assert again.column("decode_id").equals(rows.column("decode_id"))  # a replay completes the first attempt
    first_ok = again.column("clip_count").to_pylist().index(max(again.column("clip_count").to_pylist()))

    pieces = [rows.slice(i, 3) for i in range(0, rows.num_rows, 3)]
    extra = [pieces[1], again.slice(first_ok, 2), pieces[-1]]  # copies of blocks; part of a replayed decode
    order = np.random.default_rng(7).permutation(len(pieces) + len(extra))
    arriving = [(pieces + extra)[i] for i in order]
    writer = ResultWriter(
        location, model_id=model_id, run_id="run-1", label_names=embed.label_names, embed_dim=embed_dim
    )
    committer = Committer(location, model_id=model_id, run_id="run-1", versions=versions)
    dropped, written, leftover, written_uris = 0, 0, None, set()
    for start in range(0, len(arriving), 2):  # write tasks of two blocks each, with what the last one left over
        blocks = arriving[start : start + 2] + ([leftover] if leftover is not None else [])
        known = written_uris & set(leftover.column("uri").to_pylist()) if leftover is not None else set()
        split = complete_videos(pa.concat_tables(blocks), final=start + 2 >= len(arriving), drop_uris=known)
        leftover = split.leftover
        dropped += split.duplicates + split.incomplete
        if split.rows.num_rows:
            # No segment row without its video's row (the writer checks), one decode per video, never twice.
            uris = split.rows.column("uri").to_pylist()
            for uri in set(uris):
                assert uris.count(uri) == split.rows.column("clip_count")[uris.index(uri)].as_py()
            written_uris.update(uris)
            written += len(uris)
            committer.add(writer(BlockAccessor.for_block(split.rows).to_batch_format("numpy")))
    # Every arriving row is written or dropped as a copy; a whole copy written again (a failed file's one row) is
    # the Committer's to leave out.
    assert leftover is None and written + dropped == rows.num_rows + sum(e.num_rows for e in extra) and dropped > 0
    committer.commit()

    videos = DeltaTable(location.table_uri("videos")).to_pyarrow_table()
    segments = DeltaTable(location.table_uri("segments")).to_pyarrow_table()
    assert sorted(videos.column("uri").to_pylist()) == sorted(listed["uri"].tolist())  # one row per video
    keys = list(zip(segments.column("video_id").to_pylist(), segments.column("segment_index").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == rows.num_rows - len(listed["uri"])  # every segment once
    for row in videos.to_pylist():
        indices = sorted(i for v, i in keys if v == row["video_id"])
        assert indices == list(range(len(indices))) and len(indices) >= (int(row["duration_seconds"] or 0))


def test_a_failed_retry_of_a_video_is_its_own_complete_decode(tmp_path: Path) -> None:
    """A retried decode that fails makes one row with the same decode id: it never mixes with the first attempt's
    clips; the first complete attempt is kept, the other attempt's rows are copies."""
    make_videos(tmp_path / "in", 1, broken=False)
    rows = BlockAccessor.batch_to_block(
        DecodeStage(num_frames=2, size=32, segment_seconds=1.0)(_listed(tmp_path / "in"))
    ).drop_columns(["frames"])
    n = rows.num_rows
    failed = rows.slice(0, 1)
    failed = failed.set_column(failed.schema.get_field_index("clip_count"), "clip_count", pa.array([1]))
    failed = failed.set_column(failed.schema.get_field_index("status"), "status", pa.array(["timeout"]))
    head = complete_videos(pa.concat_tables([rows.slice(0, 2), failed]))  # the failed retry completes at once
    assert head.rows.column("status").to_pylist() == ["timeout"] and head.leftover is None and head.duplicates == 2
    whole = complete_videos(pa.concat_tables([rows.slice(0, 2), rows.slice(2), failed]))
    assert whole.rows.num_rows == n and set(whole.rows.column("status").to_pylist()) == {"ok"} and whole.duplicates == 1
    later = complete_videos(rows.slice(2), drop_uris={rows.column("uri")[0].as_py()})  # written whole elsewhere
    assert later.rows.num_rows == 0 and later.leftover is None and later.duplicates == n - 2


def test_a_decode_with_more_clips_than_it_made_is_a_bug(tmp_path: Path) -> None:
    make_videos(tmp_path / "in", 1, broken=False)
    decode = DecodeStage(num_frames=2, size=32, segment_seconds=1.0)
    rows = BlockAccessor.batch_to_block(decode(_listed(tmp_path / "in"))).drop_columns(["frames"])
    assert rows.num_rows > 2 and complete_videos(rows).rows.num_rows == rows.num_rows
    short = rows.set_column(rows.schema.get_field_index("clip_count"), "clip_count", pa.array([2] * rows.num_rows))
    with pytest.raises(RuntimeError, match="bug: decode .* distinct clips, 2 expected"):
        complete_videos(short)


def test_a_try_the_storage_failed_is_not_recorded_as_an_attempt(tmp_path: Path) -> None:
    """The writer records the planner's attempt for a video it reached, one less where the storage failed."""
    make_videos(tmp_path / "in", 1, broken=False)
    embed = EmbedStage(model="vitaclip-tiny", top_k=2)
    location = OutputLocation.from_url(str(tmp_path / "out"))
    versions = create_tables(location, embed.model.embed_dim, model_id=embed.model_id)
    listed = _listed(tmp_path / "in")
    (n,) = {len(v) for v in listed.values()}
    listed = {k: np.concatenate([v, v]) for k, v in listed.items()}  # the video, and a copy named apart
    listed["uri"][n:] = [f"{u}.gone" for u in listed["uri"][:n]]
    listed[LISTING_STATUS][n:] = "read_error"
    listed[LISTING_ERROR][n:] = "cannot inspect the file: Input/output error"
    planned = Planner(location, model_id=embed.model_id, versions=versions)(listed)
    planned["attempt"] = np.full(len(planned["uri"]), 3, dtype=np.int32)  # the third try of each
    decode = DecodeStage(num_frames=2, size=embed.model.image_size)
    writer = ResultWriter(
        location, model_id=embed.model_id, run_id="r", label_names=embed.label_names, embed_dim=embed.model.embed_dim
    )
    videos, _ = writer.rows(embed(decode(planned)))
    attempts = {(row["uri"].endswith(".gone"), row["status"]): row["attempts"] for row in videos.to_pylist()}
    assert attempts == {(False, "ok"): 3, (True, "read_error"): 2}

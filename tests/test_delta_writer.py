"""The Delta output layer end to end without Ray: list -> plan -> decode -> embed -> write file pair -> commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from deltalake import DeltaTable
from test_index_job import make_videos

from index.commits import Committer, Planner
from index.delta_tables import OutputLocation, create_tables
from index.writer import ResultWriter
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

"""The job on an object-store output, end to end, as the Azure and GCS tests run it against their emulators."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from test_index_job import BROKEN, job_command, make_videos

from index.delta_tables import OutputLocation
from index.service import OutputSource
from index.tables import read_table
from jobs.storage import ObjectFsStore, open_store

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def check_two_runs(location: OutputLocation, env: dict[str, str], tmp_path: Path, checkpoint: Path) -> None:
    """Two job runs on `location` (its bucket or container exists; credentials in `env`): the first indexes four
    videos and the broken inputs, the second finds them done and re-indexes one changed video, replacing its row;
    the run records, the incremental index and a search (the index cached, the tables read in place) follow."""
    import pyarrow.fs as pafs

    url = location.url
    videos = make_videos(tmp_path / "in", 4)
    _run(job_command([str(tmp_path / "in")], url, "--segment-seconds", "2", checkpoint=checkpoint), env)

    store = open_store(url)
    assert isinstance(store, ObjectFsStore)
    table = read_table(location, "videos", ["video_id", "uri", "status", "embedding"])
    assert table is not None and table.num_rows == len(videos) + len(BROKEN)
    assert len(set(table.column("video_id").to_pylist())) == table.num_rows
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    assert {Path(r["uri"]).name for r in ok} == {p.name for p in videos}
    segments = read_table(location, "segments", ["video_id", "segment_index"])
    assert segments is not None and segments.num_rows > len(videos)
    (record,) = [json.loads(store.get_bytes(rel)) for rel in store.list("runs/")]
    assert record["state"] == "committed" and record["commit"]["versions"]["videos"] >= 1
    info = json.loads(store.get_bytes("index/index_info.json"))
    assert info["indexes"]["videos"]["count"] == len(videos)

    # A second run finds everything done; a changed video is re-indexed, replacing its row.
    make_videos(tmp_path / "other", 1, start=7, broken=False)
    shutil.copyfile(next((tmp_path / "other").rglob("*.mp4")), videos[0])  # same name, new content
    _run(job_command([str(tmp_path / "in")], url, "--segment-seconds", "2", checkpoint=checkpoint), env)
    table = read_table(location, "videos", ["video_id", "uri", "status", "embedding"])
    assert table is not None and table.num_rows == len(videos) + len(BROKEN)  # replaced, not added
    records = [json.loads(store.get_bytes(rel)) for rel in store.list("runs/")]
    second = max(records, key=lambda r: r["started_at"])
    assert second["counts"]["already_indexed"] >= len(videos) - 1 and second["commit"]["replaced"] >= 1, second
    entry = json.loads(store.get_bytes("index/index_info.json"))["indexes"]["videos"]
    assert entry["count"] == len(videos) and entry["incremental"]["updated"] >= 1 and "rebuild_reason" not in entry

    # Search from the cached copy finds a video by its own embedding.
    row = next(r for r in table.to_pylist() if r["status"] == "ok")
    target = np.asarray(row["embedding"], dtype=np.float32)
    source = OutputSource(url, cache_root=str(tmp_path / "cache"))
    engine = source.open(text_encoder=lambda texts: np.stack([target] * len(texts)))
    (hit,) = engine.search("anything", k=1)
    assert hit.video_id == row["video_id"]
    thumbnail = engine.thumbnail(hit.row_id)  # read where the table is, from the row group holding the row
    assert thumbnail is not None and thumbnail[:2] == b"\xff\xd8"
    assert not list((tmp_path / "cache").rglob("*.parquet"))  # the cache holds the index and run records only
    # The bucket or container holds both tables' logs.
    filesystem, base = location.filesystem()
    bucket = base.split("/", 1)[0]
    names = {info.path for info in filesystem.get_file_info(pafs.FileSelector(bucket, recursive=True))}
    assert f"{base}/videos/_delta_log/00000000000000000000.json" in names
    assert f"{base}/segments/_delta_log/00000000000000000000.json" in names

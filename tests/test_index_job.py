"""The indexing job end to end on an embedded Ray with 2 CPUs, tiny model, generated videos.

Local folders here; S3 (moto server, faults) and `ray job submit` live in tests/test_index_job_s3.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pytest
import ray
from local_ray import start_local_ray
from local_servers import free_port

import vitaclip
from index import tables
from index.schema import LOCAL_ETAG_PREFIX, video_id_for
from index.segments import open_index
from jobs.config import DEFAULT_MODEL, config_from_args
from jobs.index_videos import main
from vitaclip.samples import write_sample_video

ROOT = Path(__file__).resolve().parents[1]
BROKEN = {"empty.mp4": b"", "noise.mp4": bytes(range(256)) * 64, "notes.mkv": b"this is not a video\n" * 50}


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray()
    yield
    ray.shutdown()


def make_videos(folder: Path, count: int, *, start: int = 0, broken: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        paths.append(
            write_sample_video(
                sub / f"clip{i:02d}.mp4", num_frames=36 + 6 * i, fps=12, width=96, height=72, pattern="shape", seed=i
            )
        )
    if broken:
        for name, data in BROKEN.items():
            (folder / name).write_bytes(data)
    (folder / "readme.txt").write_text("not listed: wrong extension")
    return paths


def job_args(inputs: list[str], out: Path, *extra: str, checkpoint: Path | None = None) -> list[str]:
    """The job's flags for a smoke run of the tiny model from ``inputs`` to ``out``: its random weights, or the
    `tiny_checkpoint` folder (a driver that never imports torch: what separate job processes use)."""
    model = ["--checkpoint", str(checkpoint)] if checkpoint else ["--model", "vitaclip-tiny", "--random-weights"]
    return [*inputs, "--output", str(out), *model, *extra]


def job_command(inputs: list[str], out: Path | str, *extra: str, checkpoint: Path | None = None) -> list[str]:
    """The same run as a separate process, as `ray job submit` or a scheduler starts it."""
    return [sys.executable, "-m", "jobs.index_videos", *job_args(inputs, out, *extra, checkpoint=checkpoint)]


def run(inputs: list[str], out: Path, *extra: str) -> int:
    return main(job_args(inputs, out, "--decode-batch-size", "2", "--embed-batch-size", "4", *extra))


def committed_videos(out: Path):
    table = tables.read_table(out, "videos")
    assert table is not None
    return table


def test_local_folder_end_to_end(local_ray, tmp_path: Path) -> None:
    videos = make_videos(tmp_path / "in", 4)
    out = tmp_path / "out"
    assert run([str(tmp_path / "in")], out, "--segment-seconds", "1.5", "--top-k", "3") == 0

    table = committed_videos(out)
    rows = {r["uri"]: r for r in table.to_pylist()}
    assert len(rows) == len(videos) + len(BROKEN) == table.num_rows
    for path in videos:
        r = rows[str(path)]
        assert r["status"] == "ok" and r["error_message"] is None
        assert r["video_id"] == video_id_for(str(path))
        assert abs(np.linalg.norm(r["embedding"]) - 1) < 1e-4 and len(r["embedding"]) == 32
        assert len(r["labels"]) == 3 and r["label_scores"] == sorted(r["label_scores"], reverse=True)
        assert r["width"] == 96 and r["height"] == 72 and r["codec"] == "h264"
        assert r["duration_seconds"] == pytest.approx(
            path.stat().st_size and (36 + 6 * int(path.stem[-2:])) / 12, abs=0.2
        )
        assert r["thumbnail_jpeg"][:2] == b"\xff\xd8"
        assert r["model_id"].startswith("vitaclip-tiny@sha256:") and r["size_bytes"] == path.stat().st_size
    for name in BROKEN:
        r = rows[str(tmp_path / "in" / name)]
        assert r["status"] not in ("ok", "error") and r["error_message"]
        assert r["embedding"] is None and r["labels"] is None
    assert rows[str(tmp_path / "in" / "empty.mp4")]["status"] == "empty"

    # Segments: consecutive 1.5 s windows covering each ok video.
    segs = tables.read_table(out, "segments")
    assert segs is not None
    for path in videos:
        mine = segs.filter(pc.equal(segs.column("uri"), str(path))).sort_by("segment_index").to_pylist()
        assert [s["segment_index"] for s in mine] == list(range(len(mine))) and mine
        assert mine[0]["start_seconds"] == pytest.approx(0.0)
        for a, b in zip(mine, mine[1:], strict=False):
            assert b["start_seconds"] == pytest.approx(a["end_seconds"])

    # Run summary, index, and what an analyst sees through Delta readers.
    summary_files = list((out / "runs").glob("*.json"))
    assert len(summary_files) == 1
    summary = json.loads(summary_files[0].read_text())
    assert summary["counts"]["processed"] == len(rows) and summary["status"]["ok"] == len(videos)
    assert "AWS_SECRET_ACCESS_KEY" not in summary_files[0].read_text()
    phases = summary["phase_seconds"]
    assert list(phases) == [
        "prepare", "ray_start", "plan", "decode_embed_write", "final_commit", "index_update", "vacuum"
    ]  # fmt: skip
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= summary["elapsed_seconds"]
    index = open_index(out)
    assert index.count == len(videos)
    ok = [r for r in rows.values() if r["status"] == "ok"]
    scores, ids = index.search(np.asarray([ok[0]["embedding"]]), 1)
    assert ids[0, 0] == ok[0]["row_id"] and scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    from delta_readers import duckdb_scan

    n, n_ok, n_ids = duckdb_scan(
        out / "videos", "SELECT count(*), count(*) FILTER (WHERE status = 'ok'), count(DISTINCT video_id) FROM t"
    )[0]
    assert (n, n_ok, n_ids) == (len(rows), len(videos), len(rows))
    n_segments, n_segment_ids = duckdb_scan(out / "segments", "SELECT count(*), count(DISTINCT row_id) FROM t")[0]
    assert n_segments == n_segment_ids == segs.num_rows
    import polars as pl
    from deltalake import DeltaTable

    frame = DeltaTable(str(out / "videos")).to_pandas()
    assert len(frame) == len(rows) and set(frame["status"]) == {r["status"] for r in rows.values()}
    polars_frame = pl.read_delta(str(out / "videos"))
    assert polars_frame.height == len(rows) and polars_frame["embedding"].list.len().max() == 32


def test_a_stale_manifest_leaves_the_current_rows_in_place(local_ray, tmp_path: Path, capsys) -> None:
    """An inventory a day old names an indexed file with the ETag it had then. Alone, its read finds the file
    changed: the video's current row stays (it was replaced by a `changed` row of the old ETag, out of search), and
    the summary says so. Given with the folder, first or second among the inputs, the folder's listing (the file as
    it is now) is the one kept: nothing to do; and once the file is replaced, it is indexed again (the manifest's
    entry, listed first, made it `already indexed` under its old ETag for as long as the two were given)."""
    (video,) = make_videos(tmp_path / "in", 1, broken=False)
    stale = f"{LOCAL_ETAG_PREFIX}{video.stat().st_size}-{video.stat().st_mtime_ns - 10**9}"  # a second older
    manifest = tmp_path / "inventory.csv"
    manifest.write_text(f"uri,etag\n{video},{stale}\n")
    out = tmp_path / "out"
    assert run([str(tmp_path / "in")], out) == 0
    (row,) = committed_videos(out).to_pylist()
    for inputs in ([str(manifest), str(tmp_path / "in")], [str(tmp_path / "in"), str(manifest)], [str(manifest)]):
        capsys.readouterr()
        assert run(inputs, out) == 0
        printed = capsys.readouterr().out
        (now,) = committed_videos(out).to_pylist()
        assert (now["etag"], now["status"], now["run_id"]) == (row["etag"], "ok", row["run_id"]), inputs
        if len(inputs) == 1:
            assert '{"changed": 1}' in printed and "1 left out: changed since listed" in printed, printed
        else:
            assert "0 videos processed, 1 already indexed, 1 listed twice" in printed, printed

    # Replaced since the inventory: indexed again whatever the order of the inputs.
    manifest.write_text(f"uri,etag\n{video},{row['etag']}\n")  # the report names it as it was indexed
    write_sample_video(video, num_frames=30, fps=12, width=96, height=72, pattern="shape", seed=99)
    os.utime(video, ns=(1, 10**18))
    assert run([str(manifest), str(tmp_path / "in")], out) == 0
    (now,) = committed_videos(out).to_pylist()
    assert now["status"] == "ok" and now["etag"] != row["etag"] and now["size_bytes"] == video.stat().st_size


def test_rerun_does_no_work_and_picks_up_changes(local_ray, tmp_path: Path) -> None:
    make_videos(tmp_path / "in", 3, broken=False)
    out = tmp_path / "nightly out #1 ü"  # delta-rs gives this path's data files percent-encoded
    assert run([str(tmp_path / "in")], out) == 0
    first = committed_videos(out)

    assert run([str(tmp_path / "in")], out) == 0
    summaries = sorted((out / "runs").glob("*.json"))
    second = json.loads(summaries[-1].read_text())
    assert second["counts"]["processed"] == 0 and second["counts"]["already_indexed"] == 3
    again = committed_videos(out)
    assert sorted(again.column("video_id").to_pylist()) == sorted(first.column("video_id").to_pylist())
    assert again.column("run_id").to_pylist() == first.column("run_id").to_pylist()

    # One new object and one changed object: exactly those two are processed; still one row per video.
    make_videos(tmp_path / "in", 1, start=3, broken=False)
    changed = sorted((tmp_path / "in").rglob("clip00.mp4"))[0]
    write_sample_video(changed, num_frames=30, fps=12, width=96, height=72, pattern="shape", seed=99)
    os.utime(changed, ns=(1, 10**18))
    assert run([str(tmp_path / "in")], out) == 0
    third = json.loads(sorted((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1].read_text())
    assert third["counts"]["processed"] == 2 and third["counts"]["already_indexed"] == 2
    final = committed_videos(out)
    assert final.num_rows == 4 and len(set(final.column("video_id").to_pylist())) == 4
    new_row = [r for r in final.to_pylist() if r["uri"] == str(changed)][0]
    assert new_row["duration_seconds"] == pytest.approx(2.5, abs=0.2)
    # The index followed the tables' log: one added, one replaced, nothing rebuilt.
    info = json.loads((out / "index" / "index_info.json").read_text())
    incremental = info["indexes"]["videos"]["incremental"]
    assert incremental["added"] == 1 and incremental["updated"] >= 1 and incremental["removed"] == 0
    assert "rebuild_reason" not in info["indexes"]["videos"]
    assert open_index(out).count == 4

    # A run whose only change is a removal (a manifest naming a new version of an indexed video that is no video,
    # nothing else): its id leaves the index in that run.
    changed.write_bytes(b"not a video any more " * 100)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"uri\n{changed}\n")
    assert run([str(manifest)], out) == 0
    fourth = committed_videos(out)
    assert {r["uri"]: r["status"] for r in fourth.to_pylist()}[str(changed)] == "not_a_video"
    info = json.loads((out / "index" / "index_info.json").read_text())
    assert info["indexes"]["videos"]["incremental"]["removed"] == 1
    assert open_index(out).count == 3 and new_row["row_id"] not in set(open_index(out).ids.tolist())


def test_a_video_that_keeps_failing_stops_costing_runs_after_max_attempts(local_ray, tmp_path: Path, capsys) -> None:
    """A retryable failure (here too_long: a frame limit that holds one clip but not a video's 0.5 s segments) is
    tried again by later runs only while fewer than --max-attempts runs have tried that object; a run allowing more
    tries it again."""
    make_videos(tmp_path / "in", 2, broken=False)
    out = tmp_path / "out"
    segments = ("--segment-seconds", "0.5")
    tight = (*segments, "--max-frames-mib", "0.2")  # one 8-frame clip is about 0.1 MiB; 3 s of segments are 0.8
    assert run([str(tmp_path / "in")], out, *tight) == 0
    rows = committed_videos(out).to_pylist()
    assert [(r["status"], r["attempts"]) for r in rows] == [("too_long", 1)] * 2

    capsys.readouterr()
    assert run([str(tmp_path / "in")], out, *tight, "--max-attempts", "1") == 0
    record = json.loads(sorted((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1].read_text())
    assert record["counts"]["attempts_exhausted"] == 2 and record["counts"]["processed"] == 0
    assert "0 videos processed, 0 already indexed, 0 listed twice, 2 failed in every allowed attempt" in (
        capsys.readouterr().out
    )
    assert [r["run_id"] for r in committed_videos(out).to_pylist()] == [r["run_id"] for r in rows]

    assert run([str(tmp_path / "in")], out, *segments) == 0  # the default allows three: the second try, in limits
    assert sorted((r["status"], r["attempts"]) for r in committed_videos(out).to_pylist()) == [("ok", 2)] * 2


def test_an_output_where_every_video_failed_says_so_in_build_index_and_search(
    local_ray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs.cli import main as cli_main

    for name, data in BROKEN.items():
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
    out = tmp_path / "out"
    assert run([str(tmp_path / "in")], out) == 0
    capsys.readouterr()
    assert cli_main(["build-index", str(out)]) == 0
    assert "nothing to index: no row of vitaclip-tiny@" in capsys.readouterr().out
    assert cli_main(["search", "--index", str(out), "a red circle"]) == 2
    err = capsys.readouterr().err
    assert "this index has no videos: no row has status ok yet" in err and "Traceback" not in err, err


def test_storage_failing_while_the_index_updates_fails_the_run_clearly(
    local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run's rows stay committed, the index stays at its version, the message says so without a traceback,
    and the next run brings the index up to date from the tables' log."""
    from jobs import pipeline
    from jobs.cli import main as cli_main

    videos = make_videos(tmp_path / "in", 3, broken=False)
    out = tmp_path / "out"
    assert run([str(tmp_path / "in")], out) == 0
    info_before = (out / "index" / "index_info.json").read_bytes()
    kept: dict[Path, bytes] = {}

    def break_removed_files() -> None:  # as a store failing after its retries, on the files the commit removed
        for table in ("videos", "segments"):
            referenced = set(tables.data_files(out, table))
            for path in (out / table).glob("*.parquet"):
                if path.name not in referenced and path.is_file():
                    kept[path] = path.read_bytes()
                    path.unlink()
                    path.mkdir()

    real = pipeline.run_index_job
    monkeypatch.setattr(
        pipeline, "run_index_job", lambda c: real(c, hooks=pipeline.RunHooks(after_commit=break_removed_files))
    )
    write_sample_video(videos[0], num_frames=30, fps=12, width=96, height=72, pattern="shape", seed=99)
    os.utime(videos[0], ns=(1, 10**18))
    capsys.readouterr()
    assert run([str(tmp_path / "in")], out) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: the run's rows are committed, but updating the index failed: \w*Error: .+\. The ", err)
    assert "Traceback" not in err and kept
    assert (out / "index" / "index_info.json").read_bytes() == info_before
    replaced = [r for r in committed_videos(out).to_pylist() if r["uri"] == str(videos[0])]
    assert len(replaced) == 1 and replaced[0]["duration_seconds"] == pytest.approx(2.5, abs=0.2)
    record = json.loads(max((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert record["state"] == "failed" and "updating the index failed" in record["error"]
    # What it committed before failing (those rows stay), in the record and in `vitaclip runs`.
    assert record["commit"]["videos_committed"] == 1 and record["commit"]["versions"]["videos"] >= 2
    assert cli_main(["runs", str(out), "--last", "1"]) == 0
    listed = capsys.readouterr().out
    assert "1 video rows committed, then: IndexUpdateError: the run's rows are committed" in listed, listed

    assert cli_main(["build-index", str(out)]) == 1  # the command alike: what failed, no traceback
    err = capsys.readouterr().err
    assert err.startswith("vitaclip build-index: error: IsADirectoryError: ") and "Traceback" not in err

    monkeypatch.setattr(pipeline, "run_index_job", real)
    for path, data in kept.items():
        path.rmdir()
        path.write_bytes(data)
    assert run([str(tmp_path / "in")], out) == 0
    entry = json.loads((out / "index" / "index_info.json").read_text())["indexes"]["videos"]
    assert "rebuild_reason" not in entry and entry["incremental"]["updated"] >= 1
    assert open_index(out).count == 3


def test_an_index_update_whose_process_dies_says_the_rows_are_committed(local_ray, tmp_path: Path) -> None:
    """The update runs in the planner's process, which holds the index whole: killed (out of memory), the run still
    says its rows are committed and the next run updates the index, not a bare Ray traceback."""
    import types

    from jobs import pipeline
    from jobs.storage import open_store

    @ray.remote(num_cpus=0)
    class Dying:
        def update_index(self, config: object, model_id: str) -> None:
            os._exit(1)

    planner = Dying.remote()  # type: ignore[attr-defined]
    commits = types.SimpleNamespace(status={"ok": 1})
    config = types.SimpleNamespace(build_index=True, switch_index=False)
    with pytest.raises(pipeline.IndexUpdateError, match="rows are committed, but updating the index failed: Actor"):
        pipeline.update_run_index(
            config,  # type: ignore[arg-type]
            open_store(str(tmp_path / "out")),
            planner,
            commits,  # type: ignore[arg-type]
            {"counts": {"already_indexed": 0}},
            model_id="m",
        )


def test_a_data_file_deleted_from_under_the_table_is_one_line_until_repaired(
    local_ray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A committed data file deleted by hand or by another tool: every later run died in the planner's creation,
    with a traceback. It is one line naming the file and delta-rs's repair; after the repair the next run indexes
    the file's videos again and the index follows (in full: the removed file cannot be read)."""
    from deltalake import DeltaTable

    videos = make_videos(tmp_path / "in", 3, broken=False)
    out = tmp_path / "out"
    assert run([str(tmp_path / "in")], out) == 0
    (committed,) = tables.data_files(out, "videos")
    (out / "videos" / committed).unlink()
    capsys.readouterr()
    assert run([str(tmp_path / "in")], out) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("python -m jobs.index_videos: error: the videos table"), err
    assert committed in last and "repair()" in last
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert sorted(r["state"] for r in records) == ["committed", "failed"]
    DeltaTable(str(out / "videos")).repair()
    assert run([str(tmp_path / "in")], out) == 0
    rows = committed_videos(out).to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(map(str, videos)) and {r["status"] for r in rows} == {"ok"}
    assert sorted(open_index(out).ids.tolist()) == sorted(r["row_id"] for r in rows)


def _assert_every_video_once(out: Path, videos: list[Path]) -> None:
    """One row per video, every segment of every ok video exactly once, and no segment of an unknown video."""
    table = tables.read_table(out, "videos")
    assert table is not None
    assert sorted(table.column("uri").to_pylist()) == sorted(str(p) for p in videos)
    segments = tables.read_table(out, "segments")
    assert segments is not None
    keys = list(zip(segments.column("video_id").to_pylist(), segments.column("segment_index").to_pylist(), strict=True))
    assert len(keys) == len(set(keys))  # exactly one row per segment
    for row in table.to_pylist():  # and every segment of every video: 1-second segments of 3 to 5.5 s videos
        indices = sorted(i for v, i in keys if v == row["video_id"])
        assert indices == list(range(len(indices))) and len(indices) >= int(row["duration_seconds"]), row["uri"]
    assert {v for v, _ in keys} <= set(table.column("video_id").to_pylist())


def _hooked(action: str, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "tests" / "run_job_with_hooks.py"), action, "--", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_drivers_killed_at_random_points_leave_every_video_once(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from deltalake import DeltaTable
    from ray_head import ray_head

    from index.delta_tables import OutputLocation, vacuum

    videos = make_videos(tmp_path / "in", 4, broken=False)
    out = tmp_path / "out"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # Points every run with work reaches: its first written batch, its first commit, the gap between the two tables'
    # commits, a landed commit its record does not know of yet. (A second written batch is not among them: a run of
    # a few videos is one embed call, whose output Ray Data gathers into one block, written by one task.)
    points = ["kill-after-write:1", "kill-before-commit:1", "kill-before-videos:1", "kill-after-commit:1"]
    actions = [rng.choice(points) for _ in range(10)]
    with ray_head(dashboard=False) as head:
        argv = job_args(
            [str(tmp_path / "in")], out, "--ray-address", head.address, "--segment-seconds", "1",
            "--decode-batch-size", "1", "--embed-batch-size", "2", "--rows-per-file", "1", "--commit-seconds", "1",
            "--no-index", "--decode-workers", "1",  # 2 videos per run: a second decoder would only be a process more
            checkpoint=tiny_checkpoint,
        )  # fmt: skip
        killed = 0
        for step, action in enumerate(actions):
            # Work for every run: one new video, and one changed video (a new ETag: its rows are replaced).
            videos += make_videos(tmp_path / "in", 1, start=4 + step, broken=False)
            changed = videos[rng.randrange(len(videos) - 1)]
            write_sample_video(changed, num_frames=36, fps=12, width=96, height=72, pattern="shape", seed=100 + step)
            os.utime(changed, ns=(1, 10**18 + step))
            done = _hooked(action, argv, head.env)
            assert done.returncode in (0, -signal.SIGKILL), (seed, action, done.stderr[-3000:])
            killed += done.returncode == -signal.SIGKILL
            for name in ("videos", "segments"):  # readable after every kill, by any Delta reader
                DeltaTable(str(out / name)).to_pyarrow_table(columns=["video_id"])
        assert killed == len(actions), (seed, actions)
        final = _hooked("none", argv, head.env)
        assert final.returncode == 0, final.stderr[-3000:]
        assert "driver imported: -\n" in final.stdout  # a checkpoint folder's run: no torch in the driver
        assert "Total Progress" not in final.stderr + final.stdout  # Ray Data's block counts: not logged
        _assert_every_video_once(out, videos)
        again = _hooked("none", argv, head.env)
        assert again.returncode == 0, again.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    last = max((r for r in records if r["state"] == "committed"), key=lambda r: r["started_at"])
    assert last["counts"]["planned"] == 0 and last["counts"]["already_indexed"] == len(videos)
    import open_clip
    import torch

    assert (last["versions"]["torch"], last["versions"]["open_clip"]) == (torch.__version__, open_clip.__version__)
    assert sum(r["state"] == "running" for r in records) == killed  # a killed run's record stays "running"
    # What killed runs wrote and never committed is only unreferenced files: vacuum removes them, rows stay.
    before = {name: tables.read_table(out, name, ["row_id"]).num_rows for name in ("videos", "segments")}
    vacuum(OutputLocation.from_url(str(out)), retention_hours=0)
    for name in ("videos", "segments"):
        referenced = set(tables.data_files(out, name))
        assert {p.name for p in (out / name).glob("*.parquet")} == referenced
        assert tables.read_table(out, name, ["row_id"]).num_rows == before[name]


def test_killed_decoder_and_embed_actor_are_replaced_without_duplicates(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """A decode task's worker killed mid-task (Ray retries the task, resuming after the pieces its actor holds),
    then the embed actor (Ray Data restarts it and retries its block, decode tasks and all)."""
    from ray_head import ray_head

    videos = make_videos(tmp_path / "in", 6, broken=False)
    out = tmp_path / "out"
    with ray_head(dashboard=False) as head:
        argv = job_args(
            [str(tmp_path / "in")], out, "--ray-address", head.address, "--embed-batch-size", "1",
            "--decode-batch-size", "1", checkpoint=tiny_checkpoint,
        )  # fmt: skip
        cmd = [sys.executable, str(ROOT / "tests" / "run_job_with_hooks.py"), "none", "--", *argv]
        job = subprocess.Popen(cmd, cwd=ROOT, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed: dict[str, int] = {}
        while job.poll() is None and len(killed) < 2:
            title = "ray::decode_chunk" if not killed else "MapBatches(DecodeEmbed)"
            pids = head.pids_titled(title)
            if pids:
                time.sleep(0.05 if not killed else 1.0)  # mid-task; the actor after its first batches
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[0], signal.SIGKILL)  # like an OOM kill
                    killed[title] = pids[0]
            time.sleep(0.02)
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr[-3000:]
    assert len(killed) == 2, killed
    table = tables.read_table(out, "videos")
    assert table is not None
    assert sorted(table.column("uri").to_pylist()) == sorted(str(p) for p in videos)
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_unreadable_checkpoint_fails_before_any_work(tmp_path: Path, capsys) -> None:
    make_videos(tmp_path / "in", 1, broken=False)
    (tmp_path / "bad.pth").write_bytes(b"garbage" * 100)
    rc = main(
        [
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "o"),
            "--model",
            "vitaclip-tiny",
            "--checkpoint",
            str(tmp_path / "bad.pth"),
        ]
    )
    assert rc == 2 and "bad.pth" in capsys.readouterr().err
    assert not (tmp_path / "o" / "videos").exists()


def test_a_run_of_another_model_leaves_the_index_as_it_is(
    local_ray, tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    """An output holds rows of several models and an index of one: a run of another checkpoint of the same size
    (a candidate tried on the output) rebuilt the index from its own rows alone, and every video of the model
    searches use left search (a schedule of each rebuilt it whole every run)."""
    import torch

    import vitaclip

    candidate = vitaclip.create_model("vitaclip-tiny")
    with torch.no_grad():
        next(candidate.parameters()).add_(0.01)
    vitaclip.save_checkpoint(candidate, tmp_path / "candidate")
    make_videos(tmp_path / "in", 2, broken=False)
    out = tmp_path / "out"
    assert main(job_args([str(tmp_path / "in")], out, checkpoint=tiny_checkpoint)) == 0
    info = (out / "index" / "index_info.json").read_text()
    assert main(job_args([str(tmp_path / "in")], out, checkpoint=tmp_path / "candidate")) == 0
    assert (out / "index" / "index_info.json").read_text() == info
    assert any("left as it is" in r.getMessage() for r in caplog.records)
    rows = committed_videos(out)
    assert rows.num_rows == 4 and len(set(rows.column("model_id").to_pylist())) == 2
    summary = json.loads(max((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert "left_as_it_is" in summary["index"]
    # `vitaclip build-index OUT --rebuild` (the README's fix after rows are edited) failed on such an output ("rows
    # of several models"), and one naming a model whose index it is not switched the index silently.
    from jobs.cli import main as cli_main

    indexed = json.loads(info)["model_id"]
    assert cli_main(["build-index", str(out), "--rebuild"]) == 0  # the index's own model
    assert json.loads((out / "index" / "index_info.json").read_text())["model_id"] == indexed

    def rebuild(checkpoint: Path, *extra: str) -> int:
        return cli_main(
            ["build-index", str(out), "--rebuild", "--model", "vitaclip-tiny", "--checkpoint", str(checkpoint), *extra]
        )

    assert rebuild(tmp_path / "candidate") == 2
    assert "--switch-index" in capsys.readouterr().err
    assert json.loads((out / "index" / "index_info.json").read_text())["model_id"] == indexed
    assert rebuild(tmp_path / "candidate", "--switch-index") == 0
    assert json.loads((out / "index" / "index_info.json").read_text())["model_id"] != indexed
    assert rebuild(tiny_checkpoint, "--switch-index") == 0  # back: the job's --switch-index below switches again
    assert main(job_args([str(tmp_path / "in")], out, "--switch-index", checkpoint=tmp_path / "candidate")) == 0
    switched = json.loads((out / "index" / "index_info.json").read_text())
    assert switched["model_id"] != json.loads(info)["model_id"] and switched["indexes"]["videos"]["count"] == 2


def test_a_mistyped_input_folder_fails_before_the_output_is_touched(tmp_path: Path, capsys) -> None:
    make_videos(tmp_path / "in", 1, broken=False)
    rc = main(
        [str(tmp_path / "in"), str(tmp_path / "inn"), "--output", str(tmp_path / "o"), "--model", "vitaclip-demo"]
    )
    assert rc == 2 and "inn" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # no tables, settings or run record for a run that could not start


def test_an_output_whose_table_folder_holds_the_videos_is_refused(tmp_path: Path, capsys) -> None:
    """``index media/videos --output media``: the table would be made in the videos' folder, whose files a vacuum
    deletes once no commit names them (the first run deleted every video older than the retention)."""
    videos = make_videos(tmp_path / "media" / "videos", 2, broken=False)
    before = {p: p.read_bytes() for p in videos}
    rc = main([str(tmp_path / "media" / "videos"), "--output", str(tmp_path / "media"), "--model", "vitaclip-demo"])
    assert rc == 2 and "holds files and no Delta table" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in videos} == before
    assert not (tmp_path / "media" / "videos" / "_delta_log").exists()
    assert [p.name for p in (tmp_path / "media").iterdir()] == ["videos"]  # no run record in the user's folder


def test_a_folder_checkpoint_that_does_not_fit_its_model_fails_the_run_clearly(
    local_ray, tmp_path: Path, tiny_checkpoint: Path, capsys
) -> None:
    """A hand-made folder (its sha256 recorded right) whose tensors do not fit its config passes the driver's
    torch-free check; the embed actors' strict load fails and the run fails with the loader's message, nothing
    committed, and without Ray Data's copies of the loader's traceback (170 lines, asking for a Ray bug report)."""
    import hashlib

    from safetensors.numpy import load_file, save_file

    make_videos(tmp_path / "in", 2, broken=False)
    folder = tmp_path / "handmade"
    shutil.copytree(tiny_checkpoint, folder)
    state = load_file(folder / "model.safetensors")
    state["clip.positional_embedding"] = np.zeros((3, 5), dtype=np.float32)
    save_file(state, folder / "model.safetensors")
    meta = json.loads((folder / "config.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    assert main(job_args([str(tmp_path / "in")], out, checkpoint=folder)) == 2
    printed = capsys.readouterr().err
    err = printed.splitlines()[-1]
    assert "does not match model vitaclip-tiny" in err and "clip.positional_embedding" in err, err
    assert "Traceback" not in printed and "Ray Data or Ray Core internal code" not in printed, printed
    (record,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert record["state"] == "failed" and "clip.positional_embedding" in record["error"]
    assert tables.read_table(out, "videos", ["video_id"]).num_rows == 0


def test_bad_configuration_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path), "--output", str(tmp_path / "o"), "--model", "vitaclip-b16"]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err
    assert (
        main(
            [str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--model", "vitaclip-tiny", "--random-weights"]
        )
        == 2
    )
    assert "missing" in capsys.readouterr().err
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("model: vitaclip-tiny\nrandom-weights: true\ntop_kk: 3\n")
    assert main([str(tmp_path), "--output", str(tmp_path / "o"), "--config", str(yaml_file)]) == 2
    assert "unknown option 'top_kk'" in capsys.readouterr().err
    assert main(job_args([str(tmp_path)], tmp_path / "o", "--decode-piece-mib", "0")) == 2
    assert "decode_piece_mib must be > 0 and finite (MiB), got 0.0" in capsys.readouterr().err
    assert main(job_args([str(tmp_path)], tmp_path / "o", "--decode-piece-mib", "inf")) == 2
    assert "decode_piece_mib must be > 0 and finite (MiB), got inf" in capsys.readouterr().err
    # Values that would fail only in the decoder, as an `error` row per video that uses up its attempts, are refused.
    for flag, value, message in [
        ("--decode-timeout-seconds", "0", "decode_timeout_seconds must be > 0 and finite (seconds), got 0.0"),
        ("--decode-timeout-seconds", "nan", "decode_timeout_seconds must be > 0 and finite (seconds), got nan"),
        ("--commit-seconds", "nan", "commit_seconds must be > 0 and finite (seconds), got nan"),
        ("--whole-object-max-bytes", "-5", "whole_object_max_bytes and min_size_bytes must be >= 0"),
        ("--segment-seconds", "inf", "segment_seconds must be > 0 and finite"),
        ("--prune-max", "1.5", "prune_max is a share of a scope's videos, 0 to 1, got 1.5"),
        ("--prune-max", "nan", "prune_max is a share of a scope's videos, 0 to 1, got nan"),
        ("--prune-max", "0.5", "prune_max is for --prune-missing runs: give --prune-missing too"),
        # delta-rs panics past its time range, after the run committed (a BaseException: a crashed run)
        ("--vacuum-retention-hours", "1e13", "vacuum_retention_hours must be 0 (no vacuum) to 1,000,000"),
        ("--vacuum-retention-hours", "0.5", "vacuum_retention_hours must be whole hours, got 0.5"),  # not 1 h
        # Resources: refused here, not after Ray starts (or silently taken as the default, or capped).
        ("--decode-workers", "0", "decode_workers must be >= 1 (or left out: sized to the machine), got 0"),
        ("--decode-workers", "-1", "decode_workers must be >= 1"),
        ("--num-cpus", "0", "num_cpus must be >= 1"),
        ("--cpus-per-embed-worker", "nan", "cpus_per_embed_worker must be > 0 and gpus_per_embed_worker >= 0"),
        ("--cpus-per-embed-worker", "inf", "both finite, got inf"),
        ("--gpus-per-embed-worker", "nan", "both finite"),
        ("--ray-address", "not-a-host:99999", "ray_address has no valid port (1-65535): 'not-a-host:99999'"),
        ("--ray-address", "ray://:", "ray_address must be auto, host:port or ray://host:port"),
        # Every clip would be over the frames limit (and a failed row's empty frames would take that memory).
        ("--num-frames", "100000000", "num_frames must be 1 to 1024, got 100000000"),
        (
            "--num-frames",
            "1000 --max-frames-mib 8",
            "1000 frames at 64 px are 11.7 MiB per clip, over --max-frames-mib 8",
        ),
    ]:
        assert main(job_args([str(tmp_path)], tmp_path / "o", flag, *value.split())) == 2, flag
        assert message in capsys.readouterr().err, flag
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_a_ray_cluster_that_cannot_be_reached_is_one_line(tmp_path: Path) -> None:
    """--ray-address naming a cluster that does not answer, a Ray client address or a GCS address (where Ray
    itself retries for minutes): the run says so in one line once the address has refused connections for
    `RAY_ANSWER_WAIT_SECONDS`, and exits 1 (the cluster may come back), not with Ray's traceback. (Both runs at
    once: each mostly waits.)"""
    (tmp_path / "in").mkdir()
    write_sample_video(tmp_path / "in" / "a.mp4", num_frames=12, fps=12, width=64, height=48)
    runs = {}
    for scheme in ("ray://", ""):
        argv = [str(tmp_path / "in"), "--output", str(tmp_path / f"o{len(runs)}"), "--model", "vitaclip-demo"]
        address = f"{scheme}127.0.0.1:{free_port()}"
        runs[address] = subprocess.Popen(
            [sys.executable, "-m", "jobs.index_videos", *argv, "--ray-address", address],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
    for address, run in runs.items():
        _, err = run.communicate(timeout=120)
        assert run.returncode == 1, err[-2000:]
        assert "Traceback" not in err
        refused = (
            f"cannot connect to the Ray cluster at {address}: nothing answered there for 15 s (Connection refused)"
        )
        assert err.strip().splitlines()[-1].endswith(f"error: {refused}"), err[-2000:]


def test_outputs_that_cannot_be_written_are_one_line_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "in").mkdir()
    for output, message in [
        (tmp_path / "a-file" / "sub", "cannot be made: Not a directory"),
        (Path("/proc/vitaclip-out"), "cannot be made"),
        (tmp_path / "o%41", "holding '%'"),  # delta-rs would write o%41/videos to oA/videos
        (tmp_path / "o%", "holding '%'"),  # DuckDB's delta_scan fails on a bare percent sign
        (tmp_path / "o\tab", "(found a control character)"),  # delta-rs: "illegal character", after a run began
        (tmp_path / "o\nline", "(found a control character)"),
        (tmp_path / "o\\bs", "(found '\\\\')"),  # delta-rs read it as a separator: o/bs/videos
    ]:
        assert main(job_args([str(tmp_path / "in")], output)) == 2, output
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not output.exists(), output  # refused before anything is made or recorded
    assert not (tmp_path / "oA").exists() and not (tmp_path / "o%41").exists() and not (tmp_path / "o%").exists()
    assert not (tmp_path / "o").exists()
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    # As root, drop the capabilities that skip permission checks.
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    done = subprocess.run(
        [*prefix, *job_command([str(tmp_path / "in")], read_only)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and "is not writable: Permission denied" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_model_name_that_is_not_the_checkpoint_folders_is_refused(tmp_path: Path, tiny_checkpoint, capsys) -> None:
    base = [str(tmp_path), "--output", str(tmp_path / "o"), "--checkpoint", str(tiny_checkpoint)]
    for model in ("nosuchmodel", "vitaclip-demo", DEFAULT_MODEL):  # the default's name too, when given
        assert main([*base, "--model", model]) == 2
        err = capsys.readouterr().err
        assert f"--model {model!r} is not the model of checkpoint" in err and "'vitaclip-tiny'" in err, err
    assert config_from_args(base).checkpoint is not None  # left out: the folder's model
    assert config_from_args([*base, "--model", "vitaclip-tiny"]).model == "vitaclip-tiny"


def test_videos_decoded_in_pieces_are_committed_whole(local_ray, tmp_path: Path) -> None:
    """A decode task hands its clips on every ``--decode-piece-mib`` of frames (32 MiB: 27 clips of 8 x 224 x 224 x
    3 bytes), so a long video with many segments reaches its embed actor in several pieces, and embed batches mix
    pieces of several videos. Here the pieces are small enough to cut every video."""
    videos = make_videos(tmp_path / "in", 4, broken=False)  # 3 to 4.5 s: 4 to 6 clips of 98 KB each
    out = tmp_path / "out"
    extra = ["--segment-seconds", "1", "--decode-piece-mib", "0.15", "--rows-per-file", "1", "--embed-batch-size", "3"]
    assert run([str(tmp_path / "in")], out, *extra) == 0
    _assert_every_video_once(out, videos)
    summary = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert summary["commit"]["incomplete_clips_dropped"] == 0 and summary["status"] == {"ok": 4}
    assert summary["commit"]["duplicate_clips_dropped"] == 0


def test_a_video_listed_twice_is_indexed_once(tmp_path: Path) -> None:
    videos = make_videos(tmp_path / "in", 3, broken=False)
    manifest = tmp_path / "list.csv"
    manifest.write_text("uri\n" + "\n".join(str(v) for v in videos[:2]) + "\n")
    out = tmp_path / "out"
    start_local_ray()
    try:
        # The folder twice (once spelled //x/./: one folder to POSIX) and a manifest naming two of its files: every
        # video is planned once.
        twice = [str(tmp_path / "in"), "/" + str(tmp_path / "in") + "/./", str(manifest)]
        assert main(job_args(twice, out)) == 0
        again = json.loads(next(p for p in (out / "runs").glob("*.json")).read_text())
        assert main(job_args(["/" + str(tmp_path / "in")], out, "--no-index")) == 0  # a later run: nothing to do
    finally:
        ray.shutdown()
    table = tables.read_table(out, "videos")
    assert table is not None and sorted(table.column("uri").to_pylist()) == sorted(str(v) for v in videos)
    assert again["counts"]["duplicate_in_listing"] == 5 and again["counts"]["processed"] == 3
    assert len(set(open_index(out).ids.tolist())) == 3
    last = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert sorted((r["counts"]["processed"], r["counts"]["already_indexed"]) for r in last) == [(0, 3), (3, 0)]
    assert tables.read_table(out, "videos").num_rows == 3


def test_a_model_of_another_embedding_size_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    make_videos(tmp_path / "in", 1, broken=False)
    out = tmp_path / "out"
    start_local_ray()
    try:
        assert main(job_args([str(tmp_path / "in")], out, "--no-index")) == 0  # vitaclip-tiny: 32-dim
        before = sorted(p.relative_to(out) for p in out.rglob("*") if p.parent.name != "runs")
        argv = [str(tmp_path / "in"), "--output", str(out), "--model", "vitaclip-demo", "--no-index"]
        assert main(argv) == 2  # vitaclip-demo: another size
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert "holds 32-dim embeddings" in err and "vitaclip-demo" in err and "use another --output" in err, err
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.parent.name != "runs") == before  # nothing written
    records = sorted((json.loads(p.read_text()) for p in (out / "runs").glob("*.json")), key=lambda r: r["run_id"])
    assert [r["state"] for r in records] == ["committed", "failed"]  # the refusal is a recorded run
    assert "holds 32-dim embeddings" in records[1]["error"] and records[1]["model_id"].startswith("vitaclip-demo@")
    from deltalake import DeltaTable

    assert DeltaTable(str(out / "videos")).metadata().configuration["vitaclip.embed_dim"] == "32"


def test_settings_recorded_by_a_run_that_committed_nothing_do_not_refuse_the_next(
    local_ray, tmp_path: Path, capsys
) -> None:
    """A first run refused after it recorded its row settings (here: it asked for more decoders than the cluster
    has) left them behind, and the corrected run was refused for "other settings" of rows that did not exist. With
    no committed row of the model, recorded settings describe nothing and the next run's replace them; once rows
    exist, other settings are refused as before."""
    make_videos(tmp_path / "in", 1, broken=False)
    out = tmp_path / "out"
    assert run([str(tmp_path / "in")], out, "--no-index", "--top-k", "3", "--decode-workers", "50") == 2
    assert "CPU" in capsys.readouterr().err
    assert [s.top_k for s in recorded_settings(out)] == [3]  # recorded before
    assert run([str(tmp_path / "in")], out, "--no-index") == 0  # top-k 5: no refusal
    assert [s.top_k for s in recorded_settings(out)] == [5]
    assert committed_videos(out).num_rows == 1
    capsys.readouterr()
    assert run([str(tmp_path / "in")], out, "--no-index", "--top-k", "3") == 2  # now rows of top-k 5 exist
    assert "top_k: 5 (this run: 3)" in capsys.readouterr().err


def recorded_settings(out: Path) -> list[Any]:
    """The row settings an output records, per model (what `vitaclip runs` shows)."""
    from index.row_settings import recorded_per_model
    from jobs.storage import open_store

    return recorded_per_model(open_store(str(out)))


@pytest.mark.parametrize("moment", ["before_commit", "before_videos_commit"])
def test_a_run_commits_nothing_after_another_run_replaced_the_settings(local_ray, tmp_path: Path, moment: str) -> None:
    """Run B's --replace-settings lands while run A (the old settings) is still running, before A's commit call or
    between its segments commit and its videos commit: A's videos commit is refused, so no row of the old kind lands
    after B's record (A's segment rows, without a video row of theirs, reach no search result)."""
    import dataclasses

    import jobs.pipeline as pipeline
    from index.row_settings import SettingsMismatchError, check_row_settings
    from jobs.config import config_from_args
    from jobs.storage import open_store

    make_videos(tmp_path / "in", 2, broken=False)
    out = tmp_path / "out"
    config = config_from_args(job_args([str(tmp_path / "in")], out, "--no-index", "--segment-seconds", "1"))
    store = open_store(str(out))

    def replaced_meanwhile() -> None:  # what run B does with --top-k 2 --replace-settings
        (ours,) = recorded_settings(out)
        check_row_settings(store, dataclasses.replace(ours, top_k=2), replace=True)

    with pytest.raises(SettingsMismatchError, match="another run recorded other row settings during this run"):
        pipeline.run_index_job(config, hooks=pipeline.RunHooks(**{moment: replaced_meanwhile}))
    table = tables.read_table(out, "videos")
    assert table is None or table.num_rows == 0  # nothing of run A committed
    (record,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert record["state"] == "failed" and "top_k: 2 (this run: 5)" in record["error"]
    assert [s.top_k for s in recorded_settings(out)] == [2]


def test_a_run_whose_settings_another_run_took_over_before_its_first_commit_commits_nothing(
    local_ray, tmp_path: Path
) -> None:
    """Run A recorded its settings and has not committed yet; run B, with other labels, finds no rows of the model
    and takes the record over (no --replace-settings needed: the record describes nothing yet), here while A is
    between its settings check and its videos commit. A's commit must not land then: its rows would carry the old
    labels under settings that say the new ones (rows with 5 and 3 labels under one model)."""
    import dataclasses

    import jobs.pipeline as pipeline
    from index.delta_tables import may_hold_model
    from index.row_settings import SettingsMismatchError, check_row_settings
    from jobs.config import config_from_args
    from jobs.storage import open_store

    make_videos(tmp_path / "in", 2, broken=False)
    out = tmp_path / "out"
    config = config_from_args(job_args([str(tmp_path / "in")], out, "--no-index"))
    store = open_store(str(out))

    def other_run_starts() -> None:
        (ours,) = recorded_settings(out)
        theirs = dataclasses.replace(ours, labels=ours.labels[:3], top_k=3)
        has_rows = lambda: may_hold_model(store.location, "videos", ours.model_id)  # noqa: E731
        assert check_row_settings(store, theirs, has_rows=has_rows) is None  # taken over, not refused

    with pytest.raises(SettingsMismatchError, match="another run recorded other row settings during this run"):
        pipeline.run_index_job(config, hooks=pipeline.RunHooks(before_videos_commit=other_run_starts))
    table = tables.read_table(out, "videos")
    assert table is None or table.num_rows == 0
    assert [len(s.labels) for s in recorded_settings(out)] == [3]


def test_a_subfolder_that_cannot_be_listed_is_left_as_it_is(
    local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """One unreadable subfolder (permission denied) does not fail the run: the rest is indexed, the folder's videos
    keep their rows (pruning spares them: the listing cannot tell whether they are there), and the run says so."""
    from jobs.storage import listing

    videos = make_videos(tmp_path / "in", 4, broken=False)  # two each under in/a and in/b
    out = tmp_path / "out"
    assert run([str(tmp_path / "in")], out) == 0
    locked = tmp_path / "in" / "a"
    added = write_sample_video(tmp_path / "in" / "b" / "new.mp4", num_frames=30, fps=12, width=96, height=72)
    scandir = os.scandir

    def refusing(path: Any) -> Any:
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(listing.os, "scandir", refusing)
    gone = videos[0]  # in/b: really deleted
    gone.unlink()
    capsys.readouterr()
    # 1 of the 4 videos the listing can speak for is gone (within --prune-max 0.4); the locked folder's 2 are not
    # counted as gone, which would make 3 of 6 and hold all pruning back.
    assert run([str(tmp_path / "in")], out, "--prune-missing", "--prune-max", "0.4") == 0
    assert "1 folders not readable (left as they are)" in capsys.readouterr().out
    rows = {r["uri"]: r for r in committed_videos(out).to_pylist()}
    expected = {str(p): "ok" for p in [*videos[1:], added]}
    assert {uri: row["status"] for uri, row in rows.items()} == {**expected, str(gone): "deleted"}
    summary = json.loads(max((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert summary["unlisted_folders"] == [f"{locked}/"] and summary["status"] == {"ok": 1, "deleted": 1}
    monkeypatch.setattr(listing.os, "scandir", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied")))
    assert run([str(tmp_path / "in")], out) == 2  # the input folder itself: nothing can be listed, the run fails


def test_prune_with_a_manifest_spares_videos_indexed_after_it_was_made(local_ray, tmp_path: Path) -> None:
    """A manifest (yesterday's inventory report) cannot name a video uploaded since: one that a run over the live
    folder indexed after the manifest was made is not pruned for being absent from it (it was, and came back the
    next night with the next report, decoded again)."""
    a, b, c = make_videos(tmp_path / "in", 3, broken=False)
    out = tmp_path / "out"
    assert run([str(tmp_path / "in")], out) == 0
    manifest = tmp_path / "inventory.txt"  # made after the first run: names a, not b (deleted since), not d
    manifest.write_text(f"{a}\n{c}\n")
    time.sleep(0.1)
    (d,) = make_videos(tmp_path / "in", 1, start=3, broken=False)  # uploaded after the manifest
    assert run([str(tmp_path / "in")], out) == 0
    prune = ("--prune-missing", "--prune-scope", str(tmp_path / "in"), "--prune-max", "1")
    assert run([str(manifest)], out, *prune) == 0
    statuses = {r["uri"]: r["status"] for r in committed_videos(out).to_pylist()}
    assert [statuses[str(p)] for p in (a, b, c, d)] == ["ok", "deleted", "ok", "ok"]
    summary = json.loads(sorted((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1].read_text())
    assert summary["counts"]["no_longer_listed"] == 1 and summary["counts"]["indexed_after_manifest"] == 1
    # Beside a live listing of the same place, what that listing no longer names is gone, however new its row
    # (the manifest's time spared it: found by review).
    d.unlink()
    assert run([str(tmp_path / "in"), str(manifest)], out, *prune) == 0
    statuses = {r["uri"]: r["status"] for r in committed_videos(out).to_pylist()}
    assert [statuses[str(p)] for p in (a, c, d)] == ["ok", "ok", "deleted"]


def test_prune_after_hidden_entries_were_indexed_prunes_them_outside_the_share(local_ray, tmp_path: Path) -> None:
    """An output indexed with hidden entries (--include-hidden, or before the listing left them out: a ._clip.mp4
    beside every video) is pruned of them by a plain --prune-missing run: not held back by --prune-max, which they
    would exceed at once (found by review)."""
    videos = make_videos(tmp_path / "in", 3, broken=False)
    forks = [video.with_name("._" + video.name) for video in videos]
    for fork in forks:
        fork.write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    out = tmp_path / "out"
    assert run([str(tmp_path / "in")], out, "--include-hidden") == 0
    assert {r["status"] for r in committed_videos(out).to_pylist()} == {"ok", "not_a_video"}
    assert run([str(tmp_path / "in")], out, "--prune-missing") == 0  # 3 of 6 gone, past the default 0.1
    statuses = {r["uri"]: r["status"] for r in committed_videos(out).to_pylist()}
    assert [statuses[str(p)] for p in videos] == ["ok"] * 3
    assert [statuses[str(p)] for p in forks] == ["deleted"] * 3
    summary = json.loads(sorted((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1].read_text())
    assert summary["counts"]["no_longer_listed_hidden"] == 3 and summary["prune_held_back"] == []


def test_prune_missing_marks_videos_no_longer_listed_as_deleted(
    local_ray, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    """--prune-missing: a deleted video's row becomes status deleted and leaves the index and the segments, only
    under the run's inputs, never under an input that lists nothing; a video put back is indexed again."""
    kept = make_videos(tmp_path / "in", 3, broken=False)
    others = make_videos(tmp_path / "other", 2, start=3, broken=False)
    dangling = tmp_path / "in" / "dangling.mp4"  # a row with status broken_link and no ETag
    dangling.symlink_to(tmp_path / "nowhere.mp4")
    odd_name = os.fsencode(tmp_path / "in") + b"/odd\xff.mp4"  # a row with status invalid_name and a file:// URI
    shutil.copyfile(kept[1], odd_name)
    out = tmp_path / "out"
    flags = ("--segment-seconds", "1.5")
    assert run([str(tmp_path / "in"), str(tmp_path / "other")], out, *flags) == 0
    assert {r["uri"]: r["status"] for r in committed_videos(out).to_pylist()}[str(dangling)] == "broken_link"
    gone_path, *_ = kept
    gone_id = video_id_for(str(gone_path))
    saved = gone_path.read_bytes()
    gone_path.unlink()
    dangling.unlink()
    for path in others:  # an input that now lists nothing (unmounted, emptied by mistake): left alone
        path.unlink()
    # Half of what `in` held is gone: past the default --prune-max (0.1), so nothing is pruned and the run exits 3.
    assert run([str(tmp_path / "in"), str(tmp_path / "other")], out, *flags, "--prune-missing") == 3
    assert f"pruning held back under {tmp_path / 'in'}/: 2 of 5 videos no longer listed" in capsys.readouterr().err
    summary = json.loads(sorted((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1].read_text())
    assert summary["state"] == "committed" and summary["counts"]["no_longer_listed"] == 0
    assert summary["prune_held_back"] == [{"scope": f"{tmp_path / 'in'}/", "no_longer_listed": 2, "listed": 3}]
    assert "deleted" not in {r["status"] for r in committed_videos(out).to_pylist()}
    caplog.clear()
    inputs = [str(tmp_path / "in"), str(tmp_path / "other")]
    assert run(inputs, out, *flags, "--prune-missing", "--prune-max", "0.5") == 0  # 2 of 4: not more than half
    assert f"nothing listed under {tmp_path / 'other'}/: its indexed videos are not pruned" in caplog.text

    summary = json.loads(sorted((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1].read_text())
    assert summary["counts"]["no_longer_listed"] == 2 and summary["status"] == {"deleted": 2}
    # Nothing to decode: written by plain tasks, the model never ran (an embed actor's seconds would count).
    assert summary["throughput"]["embed_clips_per_worker_second"] is None
    assert summary["prune_left_alone"] == [f"{tmp_path / 'other'}/"]
    rows = {r["uri"]: r for r in committed_videos(out).to_pylist()}
    assert len(rows) == 7 and rows[str(gone_path)]["status"] == "deleted" and rows[str(gone_path)]["embedding"] is None
    assert rows[str(dangling)]["status"] == "deleted"
    assert rows[str(gone_path)]["etag"] is None  # no object, no ETag (not the string "None")
    assert [rows[str(p)]["status"] for p in [*kept[1:], *others]] == ["ok"] * 4
    index = open_index(out)
    assert index.count == 4 and rows[str(gone_path)]["row_id"] not in set(index.ids.tolist())
    segments = tables.read_table(out, "segments")
    assert segments is not None and gone_id not in set(segments.column("video_id").to_pylist())
    # The other folder was emptied for good: alone, it lists nothing, which is refused (a wrong or unmounted input)
    # and names the way out; --prune-max 1 (no limit) prunes a scope that lists nothing, alone too.
    capsys.readouterr()
    assert run([str(tmp_path / "other")], out, *flags, "--prune-missing") == 2
    assert "run once with --prune-missing --prune-max 1" in capsys.readouterr().err
    assert run([str(tmp_path / "other")], out, *flags, "--prune-missing", "--prune-max", "1") == 0
    rows = {r["uri"]: r for r in committed_videos(out).to_pylist()}
    assert [rows[str(p)]["status"] for p in others] == ["deleted"] * 2 and open_index(out).count == 2

    assert run([str(tmp_path / "in")], out, *flags, "--prune-missing") == 0  # already deleted: nothing to do
    summary = json.loads(sorted((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1].read_text())
    assert summary["counts"]["no_longer_listed"] == 0 and summary["counts"]["processed"] == 0

    gone_path.write_bytes(saved)  # put back: indexed again
    make_videos(tmp_path / "other", 2, start=3, broken=False)
    assert run(inputs, out, *flags) == 0
    assert {r["uri"]: r["status"] for r in committed_videos(out).to_pylist()}[str(gone_path)] == "ok"
    assert open_index(out).count == 5

    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{kept[1]}\n")
    assert run([str(manifest)], out, *flags, "--prune-missing") == 2
    assert "--prune-missing needs folder or s3:// prefix inputs, or --prune-scope" in capsys.readouterr().err
    assert run([str(manifest)], out, *flags, "--prune-scope", str(tmp_path / "in")) == 2
    assert "give --prune-missing too" in capsys.readouterr().err
    # A manifest with the place it covers whole: the rest of that place is pruned, nothing outside it.
    prune = ("--prune-missing", "--prune-scope", str(tmp_path / "in"), "--prune-max", "1")
    assert run([str(manifest)], out, *flags, *prune) == 0
    statuses = {r["uri"]: r["status"] for r in committed_videos(out).to_pylist()}
    assert [statuses[str(p)] for p in kept] == ["deleted", "ok", "deleted"]
    assert [statuses[str(p)] for p in others] == ["ok", "ok"]
    assert statuses[f"file://{tmp_path / 'in'}/odd%FF.mp4"] == "deleted"  # under the scope though not UTF-8


def test_other_frames_segments_or_labels_are_refused_until_replaced(local_ray, tmp_path: Path, capsys) -> None:
    """Already indexed videos are skipped, so a run with other row settings would mix two kinds of rows: refused
    before any work, naming the difference, unless --replace-settings makes its settings the output's."""
    make_videos(tmp_path / "in", 2, broken=False)
    out = tmp_path / "out"
    assert run([str(tmp_path / "in")], out, "--no-index") == 0
    (frames,) = [s.num_frames for s in recorded_settings(out)]
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.parent.name != "runs")
    capsys.readouterr()
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join([*vitaclip.load_label_set("kinetics400"), "folding origami"]) + "\n")
    for extra, expected in [
        (["--num-frames", str(frames + 2)], f"num_frames: {frames} (this run: {frames + 2})"),
        (["--segment-seconds", "1"], "segment_seconds: none (this run: 1)"),
        (["--top-k", "2"], "top_k: 5 (this run: 2)"),
        (["--labels", str(labels)], "this run adds 'folding origami'"),
    ]:
        assert run([str(tmp_path / "in")], out, "--no-index", *extra) == 2, extra
        err = capsys.readouterr().err
        assert expected in err and "--replace-settings" in err, err
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.parent.name != "runs") == before  # nothing written
    refused = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    refused = [r for r in refused if r["state"] == "failed"]  # but each refusal recorded, for `vitaclip runs`
    assert len(refused) == 4 and all("--replace-settings" in r["error"] for r in refused)

    make_videos(tmp_path / "in", 1, start=2, broken=False)
    assert run([str(tmp_path / "in")], out, "--no-index", "--top-k", "2", "--replace-settings") == 0
    summary = json.loads(sorted((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1].read_text())
    assert summary["replaced_settings"]["top_k"] == 5
    assert summary["counts"]["processed"] == 1 and summary["counts"]["already_indexed"] == 2
    assert sorted(len(labels) for labels in committed_videos(out).column("labels").to_pylist()) == [2, 5, 5]
    assert run([str(tmp_path / "in")], out, "--no-index") == 2  # the recorded top_k is now 2
    assert "top_k: 2 (this run: 5)" in capsys.readouterr().err

    from jobs.cli import main as cli_main

    assert cli_main(["runs", str(out)]) == 0  # what an operator reads after a night
    shown = capsys.readouterr().out.splitlines()
    records = {p.stem: json.loads(p.read_text())["state"] for p in (out / "runs").glob("*.json")}
    assert sorted(records.values()) == ["committed"] * 2 + ["failed"] * 5
    committed = [line for line in shown[1:] if line.split()[1:2] == ["committed"]]
    assert [line.split()[0] for line in committed] == sorted(i for i, state in records.items() if state == "committed")
    assert committed[0].split()[-2:] == ["ok", "2"] and committed[1].split()[-2:] == ["ok", "1"]
    assert sum(line.split()[1:2] == ["failed"] for line in shown[1:]) == 5  # the refused runs show
    (settings_line,) = [line for line in shown if line.startswith("settings of vitaclip-tiny@sha256:")]
    assert "top_k 2, 400 labels" in settings_line, shown


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--embed-device", "gpu"], "1 GPU"),  # a local Ray without GPUs would wait for ever
        (["--decode-workers", "40"], "40 decode tasks"),  # 40 x 0.1 CPU on 2 CPUs
    ],
)
def test_a_run_that_cannot_fit_is_refused_at_once(tmp_path: Path, capsys, extra: list[str], expected: str) -> None:
    make_videos(tmp_path / "in", 1, broken=False)
    start_local_ray()
    try:
        assert main(job_args([str(tmp_path / "in")], tmp_path / "out", *extra)) == 2
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert "the run needs" in err and "but the Ray cluster has 2 CPUs and 0 GPUs" in err and expected in err
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")]
    assert record["state"] == "failed" and "the run needs" in record["error"]  # not "running" for ever


def test_any_failure_is_recorded_and_a_failed_vacuum_is_only_a_warning(
    tmp_path: Path, local_ray: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import jobs.pipeline as pipeline
    from jobs.config import config_from_args

    def unreachable(*_: object, **__: object) -> None:
        raise OSError("the store went away")

    monkeypatch.setattr(pipeline, "vacuum", unreachable)
    monkeypatch.setattr(pipeline, "_PROGRESS_SECONDS", 0.0)  # a progress line at every step of the driver's loop
    caplog.set_level(logging.INFO, logger="vitaclip.job")
    make_videos(tmp_path / "in", 2, broken=False)
    summary = pipeline.run_index_job(config_from_args(job_args([str(tmp_path / "in")], tmp_path / "out")))
    assert summary["state"] == "committed" and summary["vacuumed_files"] is None  # the commits stand
    assert "vacuum failed (the run's commits stand): OSError: the store went away" in caplog.text
    assert re.search(r"progress: [0-2] of 2 videos \([0-9.]+ %\) in \d+ s, [0-9.]+ videos/s", caplog.text)

    def broken_commit() -> None:
        raise RuntimeError("the committer gave up")

    def interrupted_again(self: object, seconds: float = 2.0) -> None:  # a second Ctrl-C while reading the writes
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Commits, "abandon", interrupted_again)
    make_videos(tmp_path / "in", 1, start=5, broken=False)
    with pytest.raises(RuntimeError, match="gave up"):  # the run's own error, recorded first
        pipeline.run_index_job(
            config_from_args(job_args([str(tmp_path / "in")], tmp_path / "out")),
            hooks=pipeline.RunHooks(before_commit=broken_commit),
        )
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")]
    assert sorted(r["state"] for r in records) == ["committed", "failed"]  # not "running" for ever
    (failed,) = [r for r in records if r["state"] == "failed"]
    assert failed["error"] == "RuntimeError: the committer gave up"


def _descendants(root: int) -> dict[int, str]:
    """Processes under `root` now (pid -> command name), from /proc."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            pid = int(stat.parent.name)
            names[pid] = text[text.index("(") + 1 : text.rindex(")")]
            parents[pid] = int(text[text.rindex(")") + 2 :].split()[1])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = names[pid]
                frontier.append(pid)
    return found


def _alive(pid: int, name: str) -> bool:
    """Whether `pid` still runs `name` (and is not a zombie: its parent may not have reaped it yet)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.index("(") + 1 : text.rindex(")")] == name and text[text.rindex(")") + 2] != "Z"


def test_storage_failing_is_reported_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """An OSError out of a run (storage failing after its retries, a data file deleted before its commit) printed a
    traceback, as a bug does; `vitaclip build-index` and the other commands say what failed in one line."""
    from jobs import pipeline

    def gone(config: Any) -> Any:
        raise FileNotFoundError("a data file of the videos table to rewrite is gone before this run's commit")

    monkeypatch.setattr(pipeline, "run_index_job", gone)
    (tmp_path / "in").mkdir()
    assert main([str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "vitaclip-demo"]) == 1
    err = capsys.readouterr().err
    assert "error: FileNotFoundError: a data file of the videos table" in err and "Traceback" not in err, err


def test_a_sigterm_after_the_run_committed_does_not_make_it_a_failure(tmp_path: Path) -> None:
    """A SIGTERM that came once the run had committed and written its record (while it printed its summary) ended
    the process with 143, "interrupted", though the record said committed: a CronJob counted the run failed and
    might run it again. From then on SIGTERM is ignored; the run exits 0."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        from jobs import index_videos, pipeline

        pipeline.run_index_job = lambda config: {"run_id": "r", "state": "committed"}

        def print_summary(summary):
            os.kill(os.getpid(), signal.SIGTERM)  # a pod's end, right after the commit
            print("summary printed", flush=True)

        index_videos.print_summary = print_summary
        index_videos.exit_process(index_videos.main(sys.argv[1:]))
        """
    )
    (tmp_path / "in").mkdir()
    args = [str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "vitaclip-demo"]
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0 and "summary printed" in done.stdout, (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("stop", ["sigterm", "sigint_twice"])
def test_a_stopped_job_exits_with_its_signal_and_an_interrupted_record(tmp_path: Path, stop: str) -> None:
    """`ray job stop` and a pod's end send SIGTERM: the driver records the run as interrupted and exits with 143
    (128 + SIGTERM), not with the abort (-6) of Ray's core worker while the interpreter tears down, which a SIGTERM
    while the driver waited on the planner used to end in. Ctrl-C pressed twice (0.3 s apart) exits with 130: the
    second one interrupted Ray's shutdown, with a traceback ("Exception ignored in atexit callback"), at times a
    segfault, and left the raylet's agents running."""
    import threading

    from vitaclip.demo.world import generate, world_labels

    generate(tmp_path / "in", 80, seed=3, labels=world_labels(), workers=1)  # light: other tests start Ray meanwhile
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.index_videos", str(tmp_path / "in"), "--output", str(out)]
    job = subprocess.Popen(
        [*cmd, "--model", "vitaclip-demo", "--no-index"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    planned = threading.Event()  # Ray is up and the run under way

    def read() -> None:
        assert job.stdout is not None
        for line in job.stdout:  # the log and the messages
            lines.append(line)
            if " embed device: " in line:  # Ray is up; the planner is at work
                planned.set()
        planned.set()  # the job ended first: the assertions below say how

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        planned.wait(120)
        time.sleep(0.5)
        assert job.poll() is None, "the run ended before it could be stopped:\n" + "".join(lines)[-3000:]
        started = _descendants(job.pid)  # the embedded Ray: GCS, raylet, its agents and workers
        if stop == "sigterm":
            job.send_signal(signal.SIGTERM)
        else:
            job.send_signal(signal.SIGINT)
            time.sleep(0.3)
            job.send_signal(signal.SIGINT)
        job.wait(120)
        reader.join(10)
    finally:
        if job.poll() is None:
            job.kill()
    output = "".join(lines)
    assert job.returncode == (128 + signal.SIGTERM if stop == "sigterm" else 130), output[-3000:]
    assert ("(SIGTERM)" if stop == "sigterm" else "interrupted") in output
    assert "Traceback" not in output and "Exception ignored" not in output, output[-3000:]
    # Every process of its Ray ends with it (the raylet's agents stayed on, orphaned, when it was killed outright).
    deadline = time.monotonic() + 30
    while (left := {pid: name for pid, name in started.items() if _alive(pid, name)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
    (record,) = (json.loads(p.read_text()) for p in (out / "runs").glob("*.json"))
    # A second Ctrl-C that came while the run was writing its record ends the process before it is written.
    again = "interrupted again: ending now" in output
    assert record["state"] == "interrupted" or (again and record["state"] == "running"), (record, output[-3000:])


def test_a_failed_run_leaves_no_write_error_for_ray_to_report_as_unhandled(
    local_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray prints a task's error ("Unhandled error", its whole traceback) when the references to its results go
    unread: after a run that failed on one write, every other write that failed, below the run's one-line error.
    `Commits.abandon` (on any failure) reads the ended ones and lets the run's error go without waiting for the
    others."""
    from typing import cast

    from ray._private import worker as ray_worker

    from jobs.pipeline import Commits, RunHooks

    reported: list[Exception] = []
    monkeypatch.setattr(ray_worker, "_unhandled_error_handler", reported.append)

    @ray.remote(num_returns=2, num_cpus=0, max_retries=0)
    def full_disk() -> tuple[Any, Any]:
        raise OSError(28, "No space left on device")

    @ray.remote(num_returns=2, num_cpus=0, max_retries=0)
    def slow_write() -> tuple[Any, Any]:
        time.sleep(120)
        return (None, {}, []), None

    def failed_writes(*, abandon: bool) -> Any:
        commits = Commits(cast(Any, None), commit_seconds=300.0, hooks=RunHooks())
        for task in (full_disk, full_disk, slow_write):
            commits.submit(task)
        refs = list(commits.in_flight)
        ray.wait(refs[:2], num_returns=2, timeout=60, fetch_local=False)
        time.sleep(0.5)  # the failed tasks' second values are in too
        if abandon:
            start = time.monotonic()
            commits.abandon()
            assert time.monotonic() - start < 10 and not commits.in_flight  # not waiting for the slow write
        slow = refs[2]
        del commits, refs
        import gc

        gc.collect()
        time.sleep(1)
        return slow

    slow = failed_writes(abandon=False)  # the references dropped unread: Ray reports the failed writes
    ray.cancel(slow, force=True)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(slow, timeout=30)
    assert reported and all("No space left on device" in str(e) for e in reported), reported
    reported.clear()
    slow = failed_writes(abandon=True)
    ray.cancel(slow, force=True)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(slow, timeout=30)
    assert reported == []

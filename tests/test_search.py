"""Search end to end: generated videos -> the job -> index -> CLI, HTTP API and the page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from index import tables
from index.build import build_from_output
from index.search import SearchEngine
from index.segments import open_index
from jobs.cli import main as cli_main
from jobs.storage import open_store


def committed(indexed: Path, table: str) -> list[dict]:
    t = tables.read_table(indexed, table)
    assert t is not None
    return [r for r in t.to_pylist() if table != "videos" or r["status"] == "ok"]


def test_text_query_matches_exact_search(indexed: Path, engine: SearchEngine) -> None:
    rows = committed(indexed, "videos")
    vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
    for text in ("a red circle moving left", "a person juggling", "blue square"):
        q = engine.encode([text])[0]
        best = rows[int(np.argmax(vectors @ q))]
        hits = engine.search(text, k=3)
        assert hits[0].video_id == best["video_id"] and hits[0].score == pytest.approx(
            float(np.max(vectors @ q)), abs=1e-4
        )
        assert len({h.video_id for h in hits}) == len(hits) == 3
    # A video's own embedding finds that video first.
    for row in rows[:3]:
        assert engine.search_vector(np.asarray(row["embedding"], np.float32), k=1)[0].video_id == row["video_id"]


def test_segments_one_best_moment_per_video(indexed: Path, engine: SearchEngine) -> None:
    hits = engine.search("something moving", k=10, segments=True)
    videos = {r["video_id"] for r in committed(indexed, "videos")}
    assert len(hits) == len(videos) and len({h.video_id for h in hits}) == len(hits)
    for h in hits:
        assert h.segment_index is not None and h.end_seconds > h.start_seconds >= 0
    many = engine.search("something moving", k=100, segments=True, per_video=100)
    assert len(many) == len(committed(indexed, "segments"))


def test_filters_keep_k_results(indexed: Path, engine: SearchEngine) -> None:
    rows = committed(indexed, "videos")
    label = rows[0]["labels"][-1]
    with_label = {r["video_id"] for r in rows if label in r["labels"]}
    hits = engine.search("anything", k=10, label=label)
    assert {h.video_id for h in hits} == with_label
    long_ones = {r["video_id"] for r in rows if r["duration_seconds"] >= 3.75}
    assert 0 < len(long_ones) < len(rows)
    hits = engine.search("anything", k=2, min_duration=3.75)
    assert len(hits) == min(2, len(long_ones)) and {h.video_id for h in hits} <= long_ones
    with pytest.raises(ValueError, match="empty"):
        engine.search("   ")
    with pytest.raises(ValueError, match="between 1 and 100"):
        engine.search("x", k=0)
    # The Python API refuses what the HTTP API refuses, instead of answering something else (k=2.5 gave 3 hits,
    # per_video=0 none, k="3" a TypeError).
    for wrong, message in [
        (dict(k=2.5), "k must be an integer"),
        (dict(k=True), "k must be an integer"),
        (dict(k="3"), "k must be an integer"),
        (dict(per_video=0), "per_video must be an integer >= 1"),
        (dict(per_video=1.5), "per_video must be an integer >= 1"),
        (dict(min_duration="5"), "min_duration must be a finite number"),
        (dict(max_duration=float("nan")), "max_duration must be a finite number"),
        (dict(label=3), "label must be a label name"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.search("x", **wrong)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the query must be text"):
        engine.search(b"red")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="takes the file's bytes"):
        engine.search_upload(str(indexed / "some.mp4"))  # type: ignore[arg-type]
    assert len(engine.search("x", k=np.int64(2))) == 2  # a NumPy integer is an integer


def test_incremental_index_after_replaced_rows(indexed: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    from index.commits import Committer, Planner, WrittenBatch
    from index.delta_tables import table_schema, write_data_file

    out = tmp_path / "out"
    shutil.copytree(indexed, out)
    store = open_store(str(out))
    rows = committed(out, "videos")
    model_id = rows[0]["model_id"]
    info = build_from_output(store, model_id=model_id)
    assert info["indexes"]["videos"]["incremental"] == {
        "added": 0,
        "updated": 0,
        "removed": 0,
        "moved": 0,
        "files_read": 0,
        "segments_merged": 0,
    }
    # Commit a new version of one video (another etag) as a run would: the index follows the log and replaces it.
    versions = tables.table_versions(out)
    assert versions is not None
    row = dict(rows[0], run_id="rerun", etag="changed")
    schema = table_schema("videos", len(row["embedding"]))
    written = write_data_file(
        store.location, "videos", pa.Table.from_pylist([row], schema=schema), name="part-rerun-1.parquet"
    )
    planned = Planner(store.location, model_id=model_id, versions=versions)(
        {"uri": np.asarray([row["uri"]], dtype=object), "etag": np.asarray(["changed"], dtype=object)}
    )
    current = {row["video_id"]: str(planned["current_video_file"][0])}
    committer = Committer(store.location, model_id=model_id, run_id="rerun", versions=versions)
    committer.add(WrittenBatch.of(written, None, ((row["video_id"], "changed", "ok"),), current_video_files=current))
    assert committer.commit().replaced == 1
    info = build_from_output(store, model_id=model_id)
    incremental = info["indexes"]["videos"]["incremental"]
    assert incremental["added"] == 0 and incremental["removed"] == 0 and incremental["updated"] == 1
    assert "rebuild_reason" not in info["indexes"]["videos"]
    index = open_index(out)
    assert index.count == len(rows) and len(set(index.ids.tolist())) == len(rows)


def test_cli_build_index_says_how_it_built(indexed: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(indexed, out)
    assert cli_main(["build-index", str(out), "--rebuild"]) == 0
    printed = capsys.readouterr().out
    assert "videos: flat (IDMap2,Flat)" in printed and "in 1 segment(s) (0 deleted ids)" in printed
    assert "built whole: asked for (--rebuild)" in printed
    assert cli_main(["build-index", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "followed the tables' log: 0 added, 0 replaced, 0 removed, 0 data files read" in printed, printed
    # A kind asked for that these few vectors cannot train is built exact, and the output says why.
    assert cli_main(["build-index", str(out), "--kind", "ivf"]) == 0
    printed = capsys.readouterr().out
    assert "videos: flat" in printed and "are too few to train ivf" in printed, printed


def test_an_output_of_a_checkpoint_folder_is_searched_with_the_folder_alone(tmp_path: Path, capsys) -> None:
    """A model known only by its checkpoint folder (a converted or trained one, its config named as its author
    chose): search asked for the unregistered name and said to pass --model, where the folder is the model."""
    import dataclasses

    import ray
    from local_ray import start_local_ray
    from test_index_job import make_videos

    import vitaclip
    from jobs.index_videos import main as job_main
    from vitaclip.registry import get_model_config

    config = dataclasses.replace(get_model_config("vitaclip-tiny"), name="house-tiny")
    folder = tmp_path / "house-tiny"
    vitaclip.save_checkpoint(vitaclip.create_model(config), folder)
    make_videos(tmp_path / "in", 2)
    start_local_ray()
    try:
        # Named as the folder names itself (the job's embed actors asked the registry for it: "unknown model").
        job = [str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--checkpoint", str(folder)]
        assert job_main([*job, "--model", "house-tiny"]) == 0
    finally:
        ray.shutdown()
    capsys.readouterr()
    query = ["search", "--index", str(tmp_path / "out"), "a", "red", "circle", "--json"]
    assert cli_main(query) == 2
    err = capsys.readouterr().err
    assert "cannot load the index's model 'house-tiny'" in err and "pass --checkpoint (a vitaclip checkpoint" in err
    assert cli_main([*query, "--model", "vitaclip-tiny", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "cannot load the given model 'vitaclip-tiny'" in capsys.readouterr().err  # the user's, not the index's
    assert cli_main([*query, "--checkpoint", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)
    assert cli_main([*query, "--checkpoint", str(folder), "--model", "vitaclip-tiny"]) == 2  # not the folder's
    assert "--model 'vitaclip-tiny' is not the model of checkpoint" in capsys.readouterr().err
    assert cli_main([*query, "--checkpoint", str(folder), "--model", "house-tiny"]) == 0
    assert json.loads(capsys.readouterr().out)
    video = str(sorted((tmp_path / "in").rglob("*.mp4"))[0])
    assert cli_main(["label", video, "--checkpoint", str(folder), "--model", "house-tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "ok"
    # Rebuilt without the folder: tuned with synthetic queries (it said "unknown model 'house-tiny'"); with it, text.
    assert cli_main(["build-index", str(tmp_path / "out"), "--rebuild"]) == 0
    assert cli_main(["build-index", str(tmp_path / "out"), "--rebuild", "--checkpoint", str(folder)]) == 0


def test_cli_search_json(indexed: Path, capsys) -> None:
    assert cli_main(["search", "--index", str(indexed), "a", "red", "circle", "-k", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2
    for r in results:
        assert {"uri", "score", "video_id", "start_seconds", "end_seconds", "labels"} <= set(r)
    assert cli_main(["search", "--index", str(indexed), "x", "--segments", "-k", "1"]) == 0
    assert re.search(r" \[\d+\.\d\d-\d+\.\d\d s\]", capsys.readouterr().out)  # 0.25 s segments print as such
    assert cli_main(["search", "--index", str(indexed), "x", "--label", " "]) == 2  # as the API refuses it
    assert "non-empty" in capsys.readouterr().err
    assert cli_main(["search", "--index", str(indexed), "x", "--label", "Dancing Macarena"]) == 0
    assert "no results\n(no row has the label 'Dancing Macarena'; labels are written as in: " in capsys.readouterr().out
    assert cli_main(["search", "--index", str(indexed), "x", "--model", "vitaclip-b16"]) == 2
    assert "built with vitaclip-tiny" in capsys.readouterr().err
    # By a clip instead of text: an indexed video finds itself first (decoded and embedded as the job did).
    ok_rows = [r for r in committed(indexed, "videos") if r["status"] == "ok"]
    row = min(ok_rows, key=lambda r: r["size_bytes"])  # not the one padded past --like's size limit
    assert cli_main(["search", "--index", str(indexed), "--like", row["uri"], "-k", "3", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)[0]
    assert first["video_id"] == row["video_id"] and first["score"] > 0.99, first
    fifo = indexed.parent / "fifo.mp4"
    if not fifo.exists():
        os.mkfifo(fifo)
    for argv, message in [
        (["--like", row["uri"], "words"], "not both"),
        ([], "give the text to search for, or --like FILE (a picture or a short clip)\n"),  # neither: no "not both"
        (["--like", str(indexed / "missing.mp4")], "missing.mp4: No such file or directory"),
        (["--like", str(fifo)], "fifo.mp4: not a regular file"),  # opening it waited for a writer forever
        (["--like", "/dev/zero"], "/dev/zero: not a regular file"),  # read 256 MiB before it was refused
        (["--like", str(indexed)], "not a regular file"),  # a folder: a bare IsADirectoryError, exit 1
    ]:
        assert cli_main(["search", "--index", str(indexed), *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv


def _commit_new_version(out: Path, row: dict, **changes: object) -> None:
    """Commits a new version of `row`'s video (another ETag, `changes` on top) as a run does, without updating the
    index: the tables move on, the index stays at the versions it was built from."""
    import pyarrow as pa

    from index.commits import Committer, Planner, WrittenBatch
    from index.delta_tables import table_schema, write_data_file

    store = open_store(str(out))
    versions = tables.table_versions(out)
    assert versions is not None
    new = dict(row, run_id="rerun", etag="changed", **changes)
    written = write_data_file(
        store.location,
        "videos",
        pa.Table.from_pylist([new], schema=table_schema("videos", len(row["embedding"]))),
        name="part-rerun-1.parquet",
    )
    planned = Planner(store.location, model_id=row["model_id"], versions=versions)(
        {"uri": np.asarray([row["uri"]], dtype=object), "etag": np.asarray(["changed"], dtype=object)}
    )
    committer = Committer(store.location, model_id=row["model_id"], run_id="rerun", versions=versions)
    committer.add(
        WrittenBatch.of(
            written, None, ((row["video_id"], "changed", str(new["status"])),),
            current_video_files={row["video_id"]: str(planned["current_video_file"][0])},
            current_segment_files={row["video_id"]: str(planned["current_segment_files"][0])},
        )
    )  # fmt: skip
    committer.commit()


def test_segments_of_an_older_version_never_come_back(
    indexed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed between its videos commit and its clean-up leaves the old version's segments next to the new
    row (indexed again, too short for a segment): search counts a segment only while its video's row is ok and of
    the run that made it."""
    from index.commits import Committer

    out = tmp_path / "out"
    shutil.copytree(indexed, out)
    with_segments = {r["video_id"] for r in committed(out, "segments")}
    row = next(r for r in committed(out, "videos") if r["video_id"] in with_segments)
    monkeypatch.setattr(Committer, "_clean_up", lambda self, attempt: None)  # killed before its clean-up
    _commit_new_version(out, row)
    stale = [r for r in committed(out, "segments") if r["video_id"] == row["video_id"]]
    assert stale and {r["run_id"] for r in stale} == {row["run_id"]}  # still in the table
    build_from_output(open_store(str(out)), model_id=row["model_id"])
    engine = SearchEngine(out)
    hits = engine.search("something moving", k=100, segments=True, per_video=100)
    assert hits and row["video_id"] not in {h.video_id for h in hits}
    assert len(hits) == len(committed(out, "segments")) - len(stale)


def test_a_video_whose_row_is_no_longer_ok_is_never_a_hit_while_the_index_is_behind(
    indexed: Path, tmp_path: Path
) -> None:
    """A run that committed without updating the index (``--no-index``, a failed update, a driver killed between
    its commit and its index update, a service started in between): the engine answers from the tables' latest rows,
    so a video deleted or failed since is no hit, though the index still holds its vector."""
    out = tmp_path / "out"
    shutil.copytree(indexed, out)
    row = next(r for r in committed(out, "videos") if r["status"] == "ok")
    query = np.asarray(row["embedding"], dtype=np.float32)
    query /= np.linalg.norm(query)
    assert row["video_id"] in {h.video_id for h in SearchEngine(out).search_vector(query, k=100)}
    _commit_new_version(
        out, row, status="not_a_video", embedding=None, labels=None, label_scores=None, thumbnail_jpeg=None
    )
    info = json.loads((out / "index" / "index_info.json").read_text())
    latest = tables.table_versions(out)
    assert latest is not None and latest["videos"] == info["table_versions"]["videos"] + 1
    engine = SearchEngine(out)
    assert engine.table_versions == latest
    hits = engine.search_vector(query, k=100)
    assert hits and row["video_id"] not in {h.video_id for h in hits}


def test_an_index_without_its_tables_or_with_a_damaged_log_is_one_clear_error(
    indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(indexed, damaged)
    last = sorted((damaged / "videos" / "_delta_log").glob("*.json"))[-1]
    last.write_bytes(last.read_bytes()[:50])  # a commit cut short
    assert cli_main(["search", "--index", str(damaged), "a circle"]) == 2
    assert "cannot be read as a Delta table" in capsys.readouterr().err
    gone = tmp_path / "gone"
    shutil.copytree(indexed, gone)
    shutil.rmtree(gone / "videos")
    assert cli_main(["search", "--index", str(gone), "a circle"]) == 2  # was: "no results", exit 0
    assert "the index holds vectors but the output has no tables" in capsys.readouterr().err
    # A data file deleted by hand: which, and delta-rs's repair (the job says so too), not Arrow's FileNotFoundError.
    lost = tmp_path / "lost"
    shutil.copytree(indexed, lost)
    part = sorted((lost / "videos").glob("*.parquet"))[0]
    part.unlink()
    assert cli_main(["search", "--index", str(lost), "a circle"]) == 2
    err = capsys.readouterr().err
    assert f"names 1 data files that are gone ({part.name})" in err and ".repair()" in err, err
    # A damaged index_info.json: what mends it.
    cut = tmp_path / "cut"
    shutil.copytree(indexed, cut)
    (cut / "index" / "index_info.json").write_bytes(b"")
    assert cli_main(["search", "--index", str(cut), "a circle"]) == 2
    err = capsys.readouterr().err
    assert "index_info.json is damaged" in err and "vitaclip build-index OUT --rebuild" in err, err

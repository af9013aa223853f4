"""`vitaclip migrate`: an output of the previous layout (Parquet parts + `_commits/` records) becomes Delta tables."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index import tables
from index.schema import row_id_for, schema_for, video_id_for
from jobs.cli import main as cli_main
from jobs.index_videos import main as job_main

DIM = 8


def _old_rows(uris: list[str], *, when: dt.datetime, run_id: str, model_id: str = "m@1") -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(len(run_id))
    videos, segments = [], []
    for uri in uris:
        vid = video_id_for(uri)
        emb = rng.normal(size=DIM).astype(np.float32)
        common = dict(
            labels=["a"], label_scores=[1.0], thumbnail_jpeg=None, model_id=model_id, run_id=run_id, indexed_at=when
        )
        videos.append(
            dict(
                video_id=vid, row_id=row_id_for(vid), uri=uri, etag=f"e-{run_id}", size_bytes=10,
                duration_seconds=2.0, fps=10.0, width=8, height=8, codec="h264", status="ok", error_message=None,
                embedding=(emb / np.linalg.norm(emb)).tolist(), **common,
            )
        )  # fmt: skip
        for i in range(2):
            segments.append(
                dict(
                    video_id=vid, row_id=row_id_for(vid, i), uri=uri, segment_index=i, start_seconds=float(i),
                    end_seconds=float(i + 1), embedding=(emb / np.linalg.norm(emb)).tolist(), **common,
                )
            )  # fmt: skip
    return (
        pa.Table.from_pylist(videos, schema=schema_for("videos", DIM)),
        pa.Table.from_pylist(segments, schema=schema_for("segments", DIM)),
    )


def _old_output(out: Path, *, segments: bool = True) -> None:
    """Two committed runs (the second re-indexed one video and, listed twice, holds it twice) and staged work; with
    no segment rows when not `segments` (runs without --segment-seconds)."""
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    first = _old_rows(["/v/a.mp4", "/v/b.mp4", "/v/c.mp4"], when=t0, run_id="r1")
    second = _old_rows(["/v/a.mp4"], when=t0 + dt.timedelta(days=1), run_id="r2")
    files: dict[str, list[str]] = {"videos": [], "segments": []}
    for name, (videos, segment_rows) in (("r1", first), ("r2", second)):
        for table, rows in (("videos", videos), ("segments", segment_rows)):
            if table == "segments" and not segments:
                continue
            rel = f"{table}/part-{name}-000000.parquet"
            (out / table).mkdir(parents=True, exist_ok=True)
            pq.write_table(rows, out / rel)
            files[table].append(rel)
    (out / "_staging" / "r3" / "videos").mkdir(parents=True)
    pq.write_table(first[0], out / "_staging" / "r3" / "videos" / "part-000000.parquet")
    (out / "_commits").mkdir()
    (out / "_commits" / "0000000002.json").write_text(json.dumps({"seq": 2, "files": files, "consumed_staging": []}))


def test_old_layout_is_refused_then_migrated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _old_output(out)
    (tmp_path / "in").mkdir()
    argv = [str(tmp_path / "in"), "--output", str(out), "--model", "vitaclip-tiny", "--random-weights"]
    assert job_main(argv) == 2
    assert f"vitaclip migrate {out}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="vitaclip migrate"):
        tables.read_table(out, "videos")

    assert cli_main(["migrate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "videos: 3 rows" in printed and "segments: 6 rows" in printed
    videos = tables.read_table(out, "videos")
    assert videos is not None and videos.num_rows == 3  # one row per video: the newest of a
    rows = {r["uri"]: r for r in videos.to_pylist()}
    assert rows["/v/a.mp4"]["run_id"] == "r2" and rows["/v/b.mp4"]["run_id"] == "r1"
    assert len(rows["/v/a.mp4"]["embedding"]) == DIM
    segments = tables.read_table(out, "segments", ["row_id"])
    assert segments is not None and segments.num_rows == 6
    assert not (out / "_commits").exists() and not (out / "_staging").exists()  # no empty folders left either
    assert {p.name for p in (out / "videos").glob("*.parquet")} == set(tables.data_files(out, "videos"))
    assert cli_main(["migrate", str(out)]) == 0  # already migrated: nothing to do, not an error
    assert "already holds Delta tables: nothing to migrate" in capsys.readouterr().out


def test_a_migration_killed_between_its_commits_runs_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the segments commit: the output still counts as the old layout (the job and vacuum refuse it,
    the old parts stay), and migrate again finishes without writing the segments twice."""
    from index import delta_tables as dlt
    from jobs.migrate import migrate
    from jobs.storage import open_store

    out = tmp_path / "out"
    _old_output(out)
    store = open_store(str(out))
    real_commit = dlt.commit

    def killed_at_videos(location: Any, table: str, **options: Any) -> int:
        if table == "videos":
            raise KeyboardInterrupt("killed")
        return real_commit(location, table, **options)

    monkeypatch.setattr(dlt, "commit", killed_at_videos)
    with pytest.raises(KeyboardInterrupt):
        migrate(store)
    monkeypatch.setattr(dlt, "commit", real_commit)
    assert dlt.detect_old_layout(store.location)
    with pytest.raises(ValueError, match="vitaclip migrate"):
        dlt.vacuum(store.location, retention_hours=0)
    with pytest.raises(ValueError, match="vitaclip migrate"):
        tables.table_versions(out)
    assert any(p.name.startswith("part-") and "migrated" not in p.name for p in (out / "videos").glob("*.parquet"))
    report = migrate(store)
    assert report["segments"]["committed_before"] and report["videos"]["rows"] == 3
    videos, segments = tables.read_table(out, "videos"), tables.read_table(out, "segments")
    assert videos is not None and videos.num_rows == 3
    assert segments is not None and segments.num_rows == 6  # not twice
    assert not dlt.detect_old_layout(store.location)
    assert {p.name for p in (out / "videos").glob("*.parquet")} == set(tables.data_files(out, "videos"))


def test_every_model_rows_are_migrated(tmp_path: Path) -> None:
    """The previous layout held one row per (video, model): a second model's rows of the same videos stay."""
    from jobs.migrate import migrate, rows_per_model
    from jobs.storage import open_store

    out = tmp_path / "out"
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    files: dict[str, list[str]] = {"videos": [], "segments": []}
    for name, model, when in (("r1", "m@1", t0), ("r2", "m@2", t0 + dt.timedelta(days=1))):
        for table, rows in zip(("videos", "segments"), _old_rows(["/v/a.mp4", "/v/b.mp4"], when=when, run_id=name,
                                                                  model_id=model), strict=True):  # fmt: skip
            (out / table).mkdir(parents=True, exist_ok=True)
            pq.write_table(rows, out / table / f"part-{name}-000000.parquet")
            files[table].append(f"{table}/part-{name}-000000.parquet")
    (out / "_commits").mkdir()
    (out / "_commits" / "0000000001.json").write_text(json.dumps({"seq": 1, "files": files, "consumed_staging": []}))
    report = migrate(open_store(str(out)))
    assert report["videos"]["rows"] == 4 and report["segments"]["rows"] == 8
    assert rows_per_model(open_store(str(out))) == {"m@1": 2, "m@2": 2}


@pytest.mark.parametrize("segments", [True, False])
def test_a_migration_killed_while_deleting_the_old_layout_finishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], segments: bool
) -> None:
    """Also of an output without segment rows (an empty table is committed too, so a rerun knows it is done)."""
    from jobs.migrate import migrate, rows_per_model
    from jobs.storage import open_store

    out = tmp_path / "out"
    _old_output(out, segments=segments)
    store = open_store(str(out))
    real_delete, deleted = store.delete, []

    def killed_at_the_second(rel: str) -> None:
        if len(deleted) == 1:
            raise KeyboardInterrupt("killed")
        deleted.append(rel)
        real_delete(rel)

    store.delete = killed_at_the_second  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        migrate(store)
    assert deleted and deleted[0].endswith(".parquet")  # an old part is gone, its record is not
    capsys.readouterr()
    assert cli_main(["migrate", str(out)]) == 0
    said = capsys.readouterr().out
    assert "videos: committed by an earlier, interrupted migrate" in said and "segments: committed by" in said, said
    assert rows_per_model(open_store(str(out))) == {"m@1": 3}
    assert not (out / "_commits").exists() or not any((out / "_commits").iterdir())
    assert tables.table_versions(out) is not None  # no longer the old layout


def test_a_damaged_commit_record_is_named_and_nothing_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    _old_output(out)
    record = out / "_commits" / "0000000002.json"
    for damaged in ('{"seq": 2, "files": {"videos": [', '{"seq": 2}', "[]"):
        record.write_text(damaged)
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        assert cli_main(["migrate", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"the latest commit record {record} is damaged" in err and "Traceback" not in err, err
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

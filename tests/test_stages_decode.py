"""DecodeStage without Ray: rows per video and segment, bad inputs as statuses, one time limit per video."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vitaclip.stages as stages
from vitaclip.samples import write_sample_video
from vitaclip.stages import DecodeStage


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 3 s at 12 fps: a whole-video clip and three 1 s segments.
    return write_sample_video(
        tmp_path_factory.mktemp("stages") / "clip.mp4", num_frames=36, fps=12, width=96, height=72, pattern="shape"
    )


def test_whole_video_then_segments(video: Path) -> None:
    rows = DecodeStage(num_frames=4, size=32, segment_seconds=1.0).decode_one(str(video), video.stat().st_size)
    assert [r["segment_index"] for r in rows] == [-1, 0, 1, 2]
    assert {r["status"] for r in rows} == {"ok"}
    whole = rows[0]
    assert whole["duration_seconds"] == pytest.approx(3.0, abs=0.1)
    assert (whole["width"], whole["height"], whole["codec"]) == (96, 72, "h264")
    assert whole["end_seconds"] == pytest.approx(whole["duration_seconds"])
    bounds = [bound for r in rows[1:] for bound in (r["start_seconds"], r["end_seconds"])]
    assert bounds == pytest.approx([0, 1, 1, 2, 2, 3], abs=0.1)
    for row in rows:
        assert row["frames"].shape == (4, 32, 32, 3) and row["frames"].dtype == np.uint8
        assert row["thumbnail_jpeg"][:2] == b"\xff\xd8"
    assert whole["decode_seconds"] > 0 and all(r["decode_seconds"] == 0 for r in rows[1:])  # counted once per video


def test_bad_inputs_become_status_rows(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_bytes(b"this is not a video\n" * 50)

    def failing_opener(uri: str, size_bytes: int) -> Any:
        raise ConnectionError("connection reset")

    (row,) = DecodeStage(num_frames=4, size=32).decode_one(str(text), text.stat().st_size)
    assert row["status"] == "not_a_video" and row["error_message"]
    assert row["frames"].shape == (4, 32, 32, 3) and not row["frames"].any()
    (row,) = DecodeStage(num_frames=4, size=32, opener=failing_opener).decode_one("s3://b/k.mp4", 10)
    assert row["status"] == "read_error" and "connection reset" in row["error_message"]


def test_one_time_limit_covers_probe_and_decodes(video: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_probe = stages.probe

    def slow_probe(source: Any, **kwargs: Any) -> Any:
        calls.append("probe")
        time.sleep(0.3)
        return real_probe(source, **kwargs)

    def decode_clip(*args: Any, **kwargs: Any) -> Any:
        calls.append("decode_clip")
        raise AssertionError("the time limit was spent before decoding started")

    monkeypatch.setattr(stages, "probe", slow_probe)
    monkeypatch.setattr(stages, "decode_clip", decode_clip)
    (row,) = DecodeStage(num_frames=4, size=32, timeout_seconds=0.2).decode_one(str(video), video.stat().st_size)
    assert row["status"] == "timeout", row["error_message"]
    assert calls == ["probe"]


def test_batch_keeps_input_columns(video: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    batch = {
        "uri": np.array([str(video), str(empty)], dtype=object),
        "etag": np.array(["e1", "e2"], dtype=object),
        "size_bytes": np.array([video.stat().st_size, 0]),
    }
    out = DecodeStage(num_frames=4, size=32, segment_seconds=2.0)(batch)
    assert list(out["uri"]) == [str(video)] * 3 + [str(empty)]
    assert list(out["etag"]) == ["e1"] * 3 + ["e2"]
    assert list(out["status"]) == ["ok", "ok", "ok", "empty"]
    assert out["frames"].shape == (4, 4, 32, 32, 3)

"""DecodeStage without Ray: rows per video and segment, bad inputs as statuses, one time limit per video."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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

    def failing_opener(uri: str, size_bytes: int, etag: str | None) -> Any:
        raise ConnectionError("connection reset")

    (row,) = DecodeStage(num_frames=4, size=32).decode_one(str(text), text.stat().st_size)
    assert row["status"] == "not_a_video" and row["error_message"]
    assert row["frames"].shape == (4, 32, 32, 3) and not row["frames"].any()
    (row,) = DecodeStage(num_frames=4, size=32, opener=failing_opener).decode_one("s3://b/k.mp4", 10)
    assert row["status"] == "read_error" and "connection reset" in row["error_message"]


class SlowReader:
    """A file object whose every read takes `delay` seconds (a slow network)."""

    def __init__(self, path: Path, delay: float) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 (closed by the stage, as its sources are)
        self.delay = delay
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        time.sleep(self.delay)
        return self._file.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


@pytest.mark.serial
def test_one_time_limit_covers_the_whole_video(tmp_path: Path) -> None:
    # Unhurried, the slow source decodes, clips and metadata from one open input, after many reads.
    video = write_sample_video(tmp_path / "long.mp4", num_frames=240, fps=24, width=320, height=240)
    readers: list[SlowReader] = []

    def opener(uri: str, size_bytes: int, etag: str | None) -> SlowReader:
        readers.append(SlowReader(Path(uri), delay=0.05))
        return readers[-1]

    rows = DecodeStage(num_frames=4, size=32, segment_seconds=1.0, opener=opener).decode_one(str(video), 0)
    assert {r["status"] for r in rows} == {"ok"} and len(readers) == 1
    needed = rows[0]["decode_seconds"]
    assert readers[0].reads * 0.05 > 0.3, readers[0].reads
    # With a limit of 0.3 s every read still fits, but not all of them: the limit is the video's, not one call's.
    readers.clear()
    start = time.perf_counter()
    (row,) = DecodeStage(num_frames=4, size=32, segment_seconds=1.0, timeout_seconds=0.3, opener=opener).decode_one(
        str(video), 0
    )
    assert row["status"] == "timeout", row["error_message"]
    assert time.perf_counter() - start < min(needed, 0.3 + 0.5)


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


def test_rows_say_which_video_they_are_and_how_many_it_made(video: Path, tmp_path: Path) -> None:
    """Every row names its video's decode (a hash of URI and ETag: the same in every decode of the object) and how
    many rows that video made, so a consumer of blocks cut by size can tell when it holds a whole video;
    `iter_batches` hands rows on every `max_bytes` of frames, in the middle of a video too."""
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    batch = {
        "uri": np.array([str(video), str(empty), str(video)], dtype=object),
        "etag": np.array(["a", "b", "c"], dtype=object),
        "size_bytes": np.array([video.stat().st_size, 0, video.stat().st_size]),
    }
    stage = DecodeStage(num_frames=4, size=32, segment_seconds=1.0)
    out = stage(batch)
    assert list(out["clip_count"]) == [4] * 4 + [1] + [4] * 4
    ids = list(out["decode_id"])
    assert ids == [ids[0]] * 4 + [ids[4]] + [ids[5]] * 4 and len({ids[0], ids[4], ids[5]}) == 3  # new ETag: new id
    assert out["decode_id"].dtype == np.int64 and min(ids) > 0
    np.testing.assert_array_equal(stage(batch)["decode_id"], out["decode_id"])  # decoded again: the same ids

    # Handed on past 30 KB of frames (a clip, failed ones too, is 4 x 32 x 32 x 3 = 12 KB): every three rows.
    parts = list(stage.iter_batches(batch, max_bytes=30_000))
    assert [len(p["uri"]) for p in parts] == [3, 3, 3]
    for key in ("uri", "decode_id", "segment_index", "frames"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), out[key])
    whole = list(stage.iter_batches(batch))  # the default (32 MiB): one batch
    assert len(whole) == 1 and list(whole[0]["segment_index"]) == list(out["segment_index"])


def test_a_video_over_the_run_frame_limit_is_a_too_long_row_a_later_run_retries(video: Path, tmp_path: Path) -> None:
    from index.commits import is_done
    from jobs.config import IndexJobConfig
    from jobs.decode_embed import ReadDecode
    from jobs.pipeline import decoder_args, resolve_run_model

    # The job's flag reaches the decoder: 3 s in 1 s segments, the whole clip and three segments of the tiny model.
    config = IndexJobConfig(
        inputs=(str(video),), output=str(tmp_path / "out"), model="vitaclip-tiny", random_weights=True,
        segment_seconds=1.0,
    )  # fmt: skip
    model = resolve_run_model(config)
    need = 4 * model.num_frames * model.image_size**2 * 3
    exact = IndexJobConfig(**{**config.to_dict(), "max_frames_mib": need / 2**20})
    rows = ReadDecode(**decoder_args(exact, model)).decode_one(str(video), video.stat().st_size)
    assert [r["status"] for r in rows] == ["ok"] * 4 and sum(r["frames"].nbytes for r in rows) == need
    smaller = IndexJobConfig(**{**config.to_dict(), "max_frames_mib": (need - 1) / 2**20})
    (row,) = ReadDecode(**decoder_args(smaller, model)).decode_one(str(video), 0)
    assert row["status"] == "too_long" and "above the limit" in row["error_message"]
    assert not is_done("e1", "too_long", "e1")  # a later run (a higher limit, longer segments) indexes it again
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_frames_mib"):
            IndexJobConfig(**{**config.to_dict(), "max_frames_mib": bad})


def test_a_cut_off_upload_gives_the_same_rows_from_a_path_and_a_reader(tmp_path: Path) -> None:
    # Half of a 4 s upload: its header still says 4 s. Read as a path or through a reader (the job's ranged S3
    # reads), the rows cover the 2 s there are and say so; no segment repeats the last frame past the data.
    whole = write_sample_video(tmp_path / "whole.mkv", num_frames=96, width=96, height=72, gop=24)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    stages = [
        DecodeStage(num_frames=4, size=32, segment_seconds=1.0),
        DecodeStage(num_frames=4, size=32, segment_seconds=1.0, opener=lambda uri, size, etag: open(uri, "rb")),
    ]
    by_path, by_reader = (stage.decode_one(str(cut), cut.stat().st_size) for stage in stages)
    assert len(by_path) == len(by_reader) == 3  # the whole video and two 1 s segments
    for path_row, reader_row in zip(by_path, by_reader, strict=True):
        assert path_row["status"] == reader_row["status"] == "ok"
        for key in ("duration_seconds", "start_seconds", "end_seconds"):
            assert path_row[key] == pytest.approx(reader_row[key]), key
        np.testing.assert_array_equal(path_row["frames"], reader_row["frames"])
    duration = by_path[0]["duration_seconds"]
    assert 1.5 < duration < 2.5
    assert by_path[0]["end_seconds"] == by_path[-1]["end_seconds"] == pytest.approx(duration)

"""Tests for vitaclip.video: frame-exact sampling on generated videos, sources, probing and bad inputs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from video_helpers import (
    CountingReader,
    Truth,
    clip_indices,
    expected_uniform,
    frame_at,
    ground_truth,
    trim_mp4_start,
    with_display_matrix,
    with_stray_pid,
    write_avi_with_b_frames,
    write_concatenated_ts,
    write_indexed_video,
    write_marked_mp4,
    write_mkv_with_block_times,
)

from vitaclip.samples import (
    INDEX_MODULUS,
    available_sample_codecs,
    read_frame_index,
    render_frame,
    sample_frame_times,
    write_sample_video,
)
from vitaclip.video import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    DecodeStats,
    Dense,
    Uniform,
    VideoDecodeError,
    VideoDecoder,
    Windows,
    decode_clip,
    decode_clips,
    dense_indices,
    frame_indices_at,
    frames_to_tensor,
    normalize_frames,
    probe,
    sampling_spec,
    uniform_times,
    window_bounds,
    window_count,
)

SIZE = 64  # model-side output size used in these tests (small to keep them fast)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def make_video(video_dir: Path) -> Callable[..., tuple[Path, Truth]]:
    """Write a sample video once per module and return it with its ground truth."""
    cache: dict[tuple[str, tuple[tuple[str, Any], ...]], tuple[Path, Truth]] = {}

    def make(name: str, **options: Any) -> tuple[Path, Truth]:
        options = {"width": 128, "height": 96, "num_frames": 60, "gop": 12, **options}
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            path = write_sample_video(video_dir / name, **options)
            cache[key] = (path, ground_truth(path))
        return cache[key]

    return make


def _codec_params() -> list[Any]:
    available = set(available_sample_codecs())
    cases: list[tuple[str, dict[str, Any]]] = [
        ("h264.mp4", {"codec": "h264"}),
        ("hevc.mkv", {"codec": "hevc"}),
        ("vp9.webm", {"codec": "vp9"}),
        ("av1.mp4", {"codec": "av1"}),
        ("mpeg4.avi", {"codec": "mpeg4"}),
        ("h264.mov", {"codec": "h264", "bframes": 3}),
        ("hevc.mp4", {"codec": "hevc", "gop": 7}),
        # MPEG-TS/PS: the demuxer's seeks land on whatever packet is near the time, not on a keyframe.
        ("h264.ts", {"codec": "h264"}),
        ("mpeg2.ts", {"codec": "mpeg2", "gop": 12, "bframes": 2}),
        ("mpeg2.mpg", {"codec": "mpeg2", "gop": 12}),
    ]
    return [
        pytest.param(
            name,
            options,
            id=name,
            marks=pytest.mark.skipif(options["codec"] not in available, reason=f"no {options['codec']} encoder"),
        )
        for name, options in cases
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Sampling as pure functions (no video)


def test_uniform_times_are_slice_centres() -> None:
    np.testing.assert_allclose(uniform_times(2.0, num_frames=4), [0.25, 0.75, 1.25, 1.75])
    np.testing.assert_allclose(uniform_times(1.0, num_frames=2, start_seconds=3.0), [3.25, 3.75])
    with pytest.raises(ValueError, match="num_frames"):
        uniform_times(1.0, num_frames=0)
    with pytest.raises(ValueError, match="duration"):
        uniform_times(float("nan"), num_frames=2)


def test_frame_indices_at_picks_the_frame_on_screen() -> None:
    pts = np.array([0.0, 0.1, 0.5, 0.6])  # variable frame rate
    times = np.array([0.05, 0.1, 0.4999, 0.55, 10.0, -1.0])
    assert frame_indices_at(pts, times).tolist() == [0, 1, 1, 2, 3, 0]
    # A time equal to a timestamp up to float rounding still selects that frame.
    assert frame_indices_at(np.array([0.0, 0.1 + 0.2]), np.array([0.3])).tolist() == [1]
    with pytest.raises(ValueError, match="ascending"):
        frame_indices_at(np.array([0.0, 0.5, 0.2]), np.array([0.3]))


def test_dense_indices_follow_the_official_protocol() -> None:
    # n=60, T=4, stride 4: seg_len 13, slide 47.
    assert dense_indices(60, num_frames=4, stride=4).tolist() == [[23, 27, 31, 35]]
    assert dense_indices(60, num_frames=4, stride=4, num_views=3).tolist() == [
        [0, 4, 8, 12],
        [24, 28, 32, 36],  # round(47 / 2 * 1) = 24
        [47, 51, 55, 59],
    ]
    # Shorter than seg_len (113): padded by repeating the last frame.
    assert dense_indices(60, num_frames=8, stride=16).tolist() == [[0, 16, 32, 48, 59, 59, 59, 59]]
    assert dense_indices(1, num_frames=3, stride=2, num_views=2).tolist() == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="stride"):
        dense_indices(10, num_frames=2, stride=0)


def test_window_bounds() -> None:
    assert window_bounds(10.0, segment_seconds=4.0) == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]
    assert window_bounds(10.0, segment_seconds=4.0, overlap_seconds=1.0) == [(0.0, 4.0), (3.0, 7.0), (6.0, 10.0)]
    assert window_bounds(8.0, segment_seconds=4.0) == [(0.0, 4.0), (4.0, 8.0)]  # no empty trailing window
    assert window_bounds(3.0, segment_seconds=4.0) == [(0.0, 3.0)]
    with pytest.raises(ValueError, match="overlap"):
        window_bounds(10.0, segment_seconds=4.0, overlap_seconds=4.0)


def test_window_count_is_the_number_of_window_bounds() -> None:
    rng = np.random.default_rng(0)
    cases = [(10.0, 4.0, 0.0), (8.0, 4.0, 0.0), (3.0, 4.0, 0.0), (0.0, 2.0, 0.0), (10.0, 4.0, 1.0), (0.3, 0.1, 0.0)]
    for _ in range(3000):
        segment = float(rng.choice([0.1, 0.3, 1.0, 2.0, 10 / 3, rng.uniform(0.05, 20.0)]))
        overlap = float(rng.choice([0.0, segment / 3, rng.uniform(0.0, segment * 0.99)]))
        # Durations on and around a window's end, where float rounding decides whether one more window starts.
        end = int(rng.integers(0, 300)) * (segment - overlap) + segment
        nudge = float(rng.choice([0.0, 1e-7, -1e-7, 1e-6, -1e-6, 2e-6, rng.uniform(-1.0, 1.0)]))
        cases.append((max(0.0, end + nudge), segment, overlap))
    for duration, segment, overlap in cases:
        expected = len(window_bounds(duration, segment_seconds=segment, overlap_seconds=overlap))
        assert window_count(duration, segment_seconds=segment, overlap_seconds=overlap) == expected, (duration, segment)
    assert window_count(1e6, segment_seconds=0.5) == 2_000_000  # counted without making two million windows
    assert window_count(10.0, segment_seconds=5e-324) == 2**53  # the smallest float: a count, not an OverflowError
    with pytest.raises(ValueError, match="overlap"):
        window_count(10.0, segment_seconds=4.0, overlap_seconds=4.0)


# ---------------------------------------------------------------------------------------------------------------------
# The sample writer's index code


def test_index_code_round_trips_and_rejects_wrong_orientation() -> None:
    for index in (0, 1, 5, 1000, INDEX_MODULUS - 1, INDEX_MODULUS + 3):
        frame = render_frame(index, width=160, height=90)
        assert read_frame_index(frame) == index % INDEX_MODULUS
    frame = render_frame(37, width=160, height=90)
    # Shorter side to 224 (nearest-neighbour upscale) and a centre crop keep the code readable.
    big = np.repeat(np.repeat(frame, 3, axis=0), 3, axis=1)[:, :]
    top, left = (big.shape[0] - 224) // 2, (big.shape[1] - 224) // 2
    assert read_frame_index(big[top : top + 224, left : left + 224]) == 37
    for turns in (1, 2, 3):
        with pytest.raises(ValueError, match="orientation|ambiguous|parity"):
            read_frame_index(np.rot90(frame, k=turns))
    with pytest.raises(ValueError, match="ambiguous"):
        read_frame_index(np.full((64, 64, 3), 128, dtype=np.uint8))


def test_sample_writer_is_deterministic(tmp_path: Path) -> None:
    a = write_sample_video(tmp_path / "a.mp4", num_frames=10, width=64, height=48, seed=3)
    b = write_sample_video(tmp_path / "b.mp4", num_frames=10, width=64, height=48, seed=3)
    assert a.read_bytes() == b.read_bytes()
    # Other encoders running in between must not change the bytes (libvpx did, through libx264's mbtree).
    others = [c for c in ("vp9", "hevc", "mpeg4") if c in available_sample_codecs()]
    assert others, "no second encoder in this FFmpeg build"
    rng = np.random.default_rng(0)
    for i in range(12):
        width, height = (int(v) * 2 for v in rng.integers(32, 90, size=2))
        codec = others[i % len(others)]
        write_sample_video(tmp_path / "other.mp4", num_frames=int(rng.integers(2, 20)), width=width, height=height,
                           codec=codec, seed=i)  # fmt: skip
        again = write_sample_video(tmp_path / "again.mp4", num_frames=10, width=64, height=48, seed=3)
        assert again.read_bytes() == a.read_bytes(), f"bytes changed after a {codec} encode (round {i})"
    assert ground_truth(a).indices == list(range(10))


def test_two_frame_hevc_samples_write_after_other_encoders(tmp_path: Path) -> None:
    """libx265 with B-frames gave 2-frame clips packets without timestamps about one write in four after a VP9
    encode in the same process (the MP4 muxer refused them): such clips are written without B-frames."""
    assert {"hevc", "vp9"} <= set(available_sample_codecs())
    for i in range(16):
        write_sample_video(tmp_path / "vp9.mp4", num_frames=8, width=110, height=84, codec="vp9", seed=i)
        clip = write_sample_video(tmp_path / "two.mp4", num_frames=2, width=94, height=98, codec="hevc", seed=i)
        assert ground_truth(clip).indices == [0, 1]
    with pytest.raises(ValueError, match="hevc samples of 2 frames cannot have B-frames"):
        write_sample_video(tmp_path / "bad.mp4", num_frames=2, width=94, height=98, codec="hevc", bframes=2)


# ---------------------------------------------------------------------------------------------------------------------
# Frame-exact decoding


def _check_clip_shape(frames: np.ndarray, num_frames: int) -> None:
    assert frames.shape == (num_frames, SIZE, SIZE, 3)
    assert frames.dtype == np.uint8
    assert frames.flags.c_contiguous


@pytest.mark.parametrize(("name", "options"), _codec_params())
def test_uniform_is_frame_exact_for_every_codec(make_video: Callable[..., Any], name: str, options: dict) -> None:
    path, truth = make_video(name, **options)
    info = probe(path)
    stats = DecodeStats()
    clip = decode_clip(path, Uniform(8), size=SIZE, stats=stats)
    _check_clip_shape(clip.frames, 8)
    expected = expected_uniform(truth, info.duration_seconds, 8)
    assert clip_indices(clip.frames) == expected
    positions = [frame_at(truth, (i + 0.5) * info.duration_seconds / 8) for i in range(8)]
    np.testing.assert_allclose(clip.pts_seconds, truth.pts_seconds[positions], atol=1e-6)
    assert (clip.start_seconds, clip.end_seconds) == (0.0, pytest.approx(info.duration_seconds))
    # Decoding stops short of the whole video and converts only the distinct targets.
    assert stats.index == "demux"
    assert stats.frames_converted == len(set(expected))
    assert stats.packets_decoded < len(truth.indices)


def _encode_frames(
    path: Path, codec: str, options: dict[str, str], *, n: int, width: int, height: int, **kw: Any
) -> Path:
    """`n` frames of `render_frame`'s pattern at 24 fps (pts from ``pts_offset``); ``all_key``: every packet flagged
    as a keyframe; ``bframes``: B-frames between references."""
    with av.open(str(path), "w", format=kw.get("format")) as container:
        stream = container.add_stream(codec, rate=24, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if "bframes" in kw:
            stream.codec_context.gop_size, stream.codec_context.max_b_frames = 48, kw["bframes"]

        def mux(packets: Any) -> None:
            for packet in packets:
                packet.is_keyframe = packet.is_keyframe or kw.get("all_key", False)
                container.mux(packet)

        for i in range(n):
            rgb = render_frame(i, width=width, height=height, num_frames=n)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = i + kw.get("pts_offset", 0), Fraction(1, 24)
            mux(stream.encode(frame))
        mux(stream.encode(None))
    return path


def test_pictures_a_container_flags_as_keyframes_wrongly_are_decoded_from_the_start(tmp_path: Path) -> None:
    """An MP4 whose every packet is flagged as a keyframe (no sync-sample table), FFmpeg's H.261 in AVI, and H.264
    with periodic intra refresh: a seek to such a "keyframe" decoded pictures without their references, which came
    back as grey smears (or a half-refreshed picture) with status ok. The first picture after a seek must be a
    keyframe's; else the clip is decoded in one pass from the start (found by review)."""
    cases = [
        ("allkey.mp4", "mpeg4", {"qscale": "2", "g": "48"}, 48, 160, 120, {"all_key": True}),
        ("h261.avi", "h261", {"qscale": "2"}, 48, 176, 144, {}),
        ("refresh.mp4", "libx264", {"x264-params": "keyint=12:intra-refresh=1:bframes=0"}, 96, 160, 120, {}),
    ]
    for name, codec, options, n, width, height, kw in cases:
        path = _encode_frames(tmp_path / name, codec, options, n=n, width=width, height=height, **kw)
        stats = DecodeStats()
        clip = decode_clip(path, Uniform(8), size=SIZE, stats=stats)
        assert clip_indices(clip.frames) == [int((i + 0.5) * n / 8) for i in range(8)], name
        assert stats.sequential_fallback, name
    # Honest flags keep the seeks, also where the decoder never flags a keyframe as one (QuickTime Animation: it
    # calls no picture inter-coded either; found by review).
    honest = _encode_frames(tmp_path / "honest.mp4", "mpeg4", {"qscale": "2", "g": "12"}, n=48, width=160, height=120)
    with av.open(str(tmp_path / "qtrle.mov"), "w") as container:
        stream = container.add_stream("qtrle", rate=24)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "rgb24"
        stream.codec_context.gop_size = 12
        for i in range(48):
            frame = av.VideoFrame.from_ndarray(render_frame(i, width=160, height=120, num_frames=48), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 24)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    for path in (honest, tmp_path / "qtrle.mov"):
        stats = DecodeStats()
        assert clip_indices(decode_clip(path, Uniform(8), size=SIZE, stats=stats).frames) == [
            3,
            9,
            15,
            21,
            27,
            33,
            39,
            45,
        ]
        assert not stats.sequential_fallback and stats.packets_decoded < 48, path.name


def test_mpeg_ps_and_nut_durations_end_where_the_last_frame_ends(tmp_path: Path) -> None:
    """FFmpeg's duration of an MPEG-PS or NUT stream ends where its last frame starts: kept when it agreed with the
    packets within two frames, it made the duration one frame short and every sampled frame one early (found by
    review)."""
    mpg = write_sample_video(tmp_path / "v.mpg", num_frames=48, fps=24, width=160, height=120, codec="mpeg2")
    nut = _encode_frames(tmp_path / "v.nut", "ffv1", {}, n=48, width=160, height=120, format="nut")
    for path in (mpg, nut):
        for method in ("metadata", "demux"):
            assert probe(path, method=method).duration_seconds == pytest.approx(2.0), (path.name, method)
        clip = decode_clip(path, Uniform(8), size=SIZE)
        assert clip_indices(clip.frames) == [3, 9, 15, 21, 27, 33, 39, 45], path.name
        assert clip.end_seconds == pytest.approx(2.0)


def test_an_edit_list_that_cuts_the_first_keyframe_keeps_the_seeks(tmp_path: Path) -> None:
    """A keyframe an MP4 edit list cuts is decoded but not shown: the first picture shown after it is no keyframe,
    which is no reason to decode the whole video in one pass (found by review)."""
    x264 = {"x264-params": "keyint=48:min-keyint=48:scenecut=0:bframes=3"}
    path = _encode_frames(tmp_path / "cut.mp4", "libx264", x264, n=240, width=160, height=128, pts_offset=-20)
    stats = DecodeStats()
    clip = decode_clip(path, Uniform(8), size=SIZE, stats=stats)
    assert clip_indices(clip.frames) == [20 + int((i + 0.5) * 220 / 8) for i in range(8)]
    assert not stats.sequential_fallback and stats.packets_decoded < 200


def test_mpeg_ps_durations_and_untimed_packets_give_the_whole_video(tmp_path: Path) -> None:
    """FFmpeg estimates an MPEG-PS duration from timestamps, short of the last frame by one or two: it is always the
    packets' end now, in decode and both probe methods. H.264 in MPEG-PS needs a timestamp only every 0.7 s: a table
    of the timed packets spanned a third of the video, whose clip then ended at 3.5 s of 10 (found by review)."""
    x264 = {"x264-params": "keyint=48:min-keyint=48:scenecut=0:bframes=3"}
    cases = [
        ("a.mpg", "mpeg1video", "mpeg", {"qscale": "3"}, 240),
        ("b.mpg", "mpeg2video", "vob", {"qscale": "3"}, 241),
        ("c.mpg", "libx264", "vob", x264, 240),
        ("d.mpg", "libx264", "vob", x264, 3),  # one of three packets untimed: a third of the frames (found by review)
    ]
    for name, codec, container, options, n in cases:
        kw = {"format": container} | ({} if codec == "libx264" else {"bframes": 2})
        path = _encode_frames(tmp_path / name, codec, options, n=n, width=160, height=128, **kw)
        for method in ("metadata", "demux"):
            assert probe(path, method=method).duration_seconds == pytest.approx(n / 24), (name, method)
        clip = decode_clip(path, Uniform(8), size=SIZE)
        assert clip_indices(clip.frames) == [int((i + 0.5) * n / 8) for i in range(8)], name
        assert clip.end_seconds == pytest.approx(n / 24), name


def test_a_file_object_whose_index_fails_is_read_from_its_start(tmp_path: Path) -> None:
    """A file object's keyframes come from the container's index; where that fails (the one keyframe of an MP4 is
    one its edit list cuts), the demux of every packet ran from where the index reading left the input: 110 of
    155 frames, a 4.6 s video of 6.5 s, segments labelled with the wrong times (found by review). It starts from a
    fresh open now, as a path does."""
    options = {"g": "240", "keyint_min": "240", "sc_threshold": "0", "bf": "3"}
    path = _encode_frames(tmp_path / "cut.mp4", "libx264", options, n=175, width=160, height=128, pts_offset=-20)
    by_path = VideoDecoder(path)
    with by_path, open(path, "rb") as file, VideoDecoder(file) as by_file:
        clips = [
            decoder.clips(Windows(2.0, num_frames=4, with_whole_video=True), size=SIZE)
            for decoder in (by_path, by_file)
        ]
        assert by_file.info.duration_seconds == pytest.approx(by_path.info.duration_seconds)
        assert by_file.info.duration_seconds == pytest.approx(155 / 24, abs=0.01)
    assert len(clips[0]) == len(clips[1]) == 5  # the whole video, then four windows of 2 s
    for a, b in zip(*clips, strict=True):
        assert clip_indices(a.frames) == clip_indices(b.frames)
        assert (a.start_seconds, a.end_seconds) == pytest.approx((b.start_seconds, b.end_seconds))


def test_a_variable_rate_mp4s_fps_is_its_frames_over_its_duration(tmp_path: Path) -> None:
    """The README promises frames / duration where the container counts frames: FFmpeg's average rate of a
    variable-rate MP4 is rounded to a standard one (25 for 25.11) (found by review)."""
    path = write_sample_video(
        tmp_path / "vfr.mp4", width=160, height=120, num_frames=175, fps=24, codec="h264", vfr=True
    )
    info = probe(path)
    assert info.num_frames == 175 and info.num_frames_exact
    assert info.fps == pytest.approx(175 / info.duration_seconds)
    assert probe(path, method="demux").fps == pytest.approx(info.fps)


def test_seeking_decodes_only_the_needed_stretches(make_video: Callable[..., Any]) -> None:
    path, truth = make_video("sparse.mp4", num_frames=120, gop=24)
    stats = DecodeStats()
    clip = decode_clip(path, Uniform(4), size=SIZE, stats=stats)
    expected = expected_uniform(truth, 5.0, 4)
    assert clip_indices(clip.frames) == expected
    # Per target: from its keyframe to the target, plus a few packets for B-frame reordering; keyframes shared by
    # several targets count once.
    keyframe_positions = [frame_at(truth, k) for k in truth.keyframe_seconds]
    targets = [frame_at(truth, (i + 0.5) * 5.0 / 4) for i in range(4)]
    last_per_keyframe: dict[int, int] = {}
    for target in targets:
        keyframe = max(k for k in keyframe_positions if k <= target)
        last_per_keyframe[keyframe] = max(last_per_keyframe.get(keyframe, 0), target)
    budget = sum(last - keyframe + 1 + 3 for keyframe, last in last_per_keyframe.items())
    assert stats.packets_decoded <= budget < len(truth.indices)
    assert stats.seeks <= len(last_per_keyframe)


def test_non_reference_frames_are_skipped_but_results_stay_exact(make_video: Callable[..., Any]) -> None:
    path, truth = make_video("nonref.mp4", num_frames=120, gop=60, bframes=3)
    stats = DecodeStats()
    clip = decode_clip(path, Uniform(3), size=SIZE, stats=stats)
    assert clip_indices(clip.frames) == expected_uniform(truth, 5.0, 3)
    assert stats.packets_nonref_skippable > 0
    assert stats.frames_decoded < stats.packets_decoded  # the decoder really dropped some


@pytest.mark.parametrize(
    ("name", "options"),
    [
        pytest.param("odd.mp4", {"width": 161, "height": 121}, id="odd-h264-444"),
        pytest.param("odd.webm", {"codec": "vp9", "width": 161, "height": 121}, id="odd-vp9"),
        pytest.param("odd.avi", {"codec": "mpeg4", "width": 150, "height": 86}, id="odd-mpeg4"),
        pytest.param("portrait.mp4", {"width": 96, "height": 160}, id="portrait"),
        pytest.param("ten_bit.mp4", {"pix_fmt": "yuv420p10le"}, id="10bit-h264"),
        pytest.param("ten_bit.mkv", {"codec": "hevc", "pix_fmt": "yuv420p10le"}, id="10bit-hevc"),
        pytest.param("vfr.mp4", {"vfr": True}, id="vfr-mp4"),
        pytest.param("vfr.mkv", {"vfr": True, "bframes": 0}, id="vfr-mkv"),
        pytest.param("rot90.mp4", {"rotation": 90}, id="rotate-90"),
        pytest.param("rot180.mkv", {"rotation": 180}, id="rotate-180"),
        pytest.param("rot270.mov", {"rotation": 270, "width": 96, "height": 160}, id="rotate-270-portrait"),
    ],
)
def test_uniform_is_frame_exact_for_variants(make_video: Callable[..., Any], name: str, options: dict) -> None:
    path, truth = make_video(name, **options)
    info = probe(path)
    clip = decode_clip(path, Uniform(8), size=SIZE)
    _check_clip_shape(clip.frames, 8)
    assert clip_indices(clip.frames) == expected_uniform(truth, info.duration_seconds, 8)
    assert (info.width, info.height) == (options.get("width", 128), options.get("height", 96))
    assert info.rotation == options.get("rotation", 0)


@pytest.mark.parametrize(
    ("matrix", "corner", "rotation"),
    [
        ((1, 0, 0, 1), "top-left", 0),
        ((0, 1, -1, 0), "top-right", 270),  # turned clockwise (a phone held upright)
        ((-1, 0, 0, -1), "bottom-right", 180),
        ((0, -1, 1, 0), "bottom-left", 90),
        ((-1, 0, 0, 1), "top-right", 0),  # mirrored left to right (a front camera): was turned upside down
        ((1, 0, 0, -1), "bottom-left", 180),  # mirrored top to bottom: was shown as stored
        ((0, 0, 0, 0), "top-left", 0),  # no matrix at all: shown as stored (was turned a quarter)
    ],
)
def test_display_matrices_turn_and_mirror_the_picture(
    video_dir: Path, matrix: tuple[int, int, int, int], corner: str, rotation: int
) -> None:
    source = video_dir / "marked.mp4"
    if not source.exists():
        write_marked_mp4(source)
    path = with_display_matrix(source, video_dir / f"matrix-{'_'.join(map(str, matrix))}.mp4", matrix)
    frame = decode_clip(path, Uniform(1), size=32, crop="none").frames[0, ..., 0].astype(float)  # [H, W]
    h, w = frame.shape
    quarters = {
        "top-left": frame[: h // 2, : w // 2],
        "top-right": frame[: h // 2, w // 2 :],
        "bottom-left": frame[h // 2 :, : w // 2],
        "bottom-right": frame[h // 2 :, w // 2 :],
    }
    assert max(quarters, key=lambda name: quarters[name].mean()) == corner
    assert (w < h) == (rotation in (90, 270))  # 64 x 32 stored
    info = probe(path)
    assert info.rotation == rotation and (info.width, info.height) == ((32, 64) if w < h else (64, 32))


def test_non_square_pixels_are_displayed_wide(video_dir: Path) -> None:
    path = write_sample_video(video_dir / "sar.mp4", width=128, height=96, gop=12, sample_aspect_ratio=Fraction(2))
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.width == 64  # stored half as wide as displayed
    info = probe(path)
    assert (info.width, info.height) == (128, 96)
    clip = decode_clip(path, Uniform(8), size=SIZE)
    # 48 frames at a constant 24 fps: frame k is shown from k / 24 s. The code reads only if pixels were stretched.
    assert clip_indices(clip.frames) == [int((i + 0.5) * 2.0 / 8 * 24) for i in range(8)]


@pytest.mark.parametrize(("name", "options"), [("h264.mp4", {"codec": "h264"}), ("hevc.mkv", {"codec": "hevc"})])
def test_decoder_threads_stay_frame_exact(make_video: Callable[..., Any], name: str, options: dict) -> None:
    path, truth = make_video(name, **options)
    expected = expected_uniform(truth, probe(path).duration_seconds, 8)
    assert clip_indices(decode_clip(path, Uniform(8), size=SIZE, num_threads=2).frames) == expected


def test_out_of_order_timestamps_fall_back_to_output_order(video_dir: Path) -> None:
    path = write_avi_with_b_frames(video_dir / "bframes.avi", num_frames=60)
    assert np.any(np.diff(ground_truth(path).pts_seconds) < 0)  # the container's timestamps are not display order
    # Frames are then numbered as the decoder shows them, at the nominal 24 fps.
    for source in (path, path.read_bytes()):
        stats = DecodeStats()
        clip = decode_clip(source, Uniform(8), size=SIZE, stats=stats)
        assert clip_indices(clip.frames) == [int((i + 0.5) * 60 / 8) for i in range(8)]
        assert stats.sequential_fallback
    views = decode_clips(path, Dense(4, stride=4, num_views=2), size=SIZE)
    assert [clip_indices(v.frames) for v in views] == [[0, 4, 8, 12], [47, 51, 55, 59]]


@pytest.mark.parametrize("order", ["reversed", "shuffled", "all equal"])
def test_timestamps_that_cannot_be_display_times_are_numbered_in_output_order(video_dir: Path, order: str) -> None:
    """Block times that run backwards, come in any order or are all one: each clip used to be the first frame in
    the file, over and over. Such a stream's frames are numbered as they come out, at the nominal rate."""
    times = {
        "reversed": [83 * (23 - i) for i in range(24)],
        "shuffled": [83 * int(i) for i in np.random.default_rng(0).permutation(24)],
        "all equal": [0] * 24,
    }[order]
    path = write_mkv_with_block_times(video_dir / f"times-{order.replace(' ', '-')}.mkv", times, fps=12)
    for source in (path, path.read_bytes()):  # demuxed whole, and read as a file object through the container index
        stats = DecodeStats()
        clip = decode_clip(source, Uniform(8), size=SIZE, stats=stats)
        assert clip_indices(clip.frames) == [int((i + 0.5) * 24 / 8) for i in range(8)]
        assert clip.end_seconds == pytest.approx(2.0) and stats.sequential_fallback
        with VideoDecoder(source) as video:  # what the job's row says: the timeline the clips span
            video.clips(Windows(0.5, with_whole_video=True), size=SIZE)
            assert (video.info.duration_seconds, video.info.fps, video.info.num_frames) == (2.0, 12.0, 24)


def test_timestamps_that_start_again_mid_file_keep_every_part(video_dir: Path) -> None:
    """`cat a.ts b.ts`: b's timestamps start at zero again. Only a's frames were ever picked, over a's duration."""
    path = write_concatenated_ts(video_dir / "joined.ts", parts=2, frames_per_part=40, fps=2)
    clip = decode_clip(path, Uniform(8), size=SIZE)
    assert clip_indices(clip.frames) == [int((i + 0.5) * 80 / 8) for i in range(8)]
    assert clip.end_seconds == pytest.approx(40.0)
    windows = decode_clips(path, Windows(10.0), size=SIZE)
    assert [w.start_seconds for w in windows] == [0.0, 10.0, 20.0, 30.0]
    with VideoDecoder(path) as video:  # the row's duration: the parts' 40 s, not the header's 20
        assert video.clips(Windows(10.0), size=SIZE)[-1].end_seconds == 40.0
        assert (video.info.duration_seconds, video.info.fps, video.info.num_frames) == (40.0, 2.0, 80)


def test_a_stream_that_appears_midway_leaves_the_video_whole(video_dir: Path) -> None:
    """An MPEG-TS packet on a PID no table names makes FFmpeg add a stream while demuxing: PyAV's demux then ended
    with an IndexError, which failed the video (a retried internal error in the job). Every frame is still there."""
    clean = write_indexed_video(video_dir / "clean.ts", num_frames=72, fps=24)
    path = with_stray_pid(clean, video_dir / "stray.ts")
    with av.open(str(path)) as container:
        with pytest.raises(IndexError):  # PyAV's own iterator, to the end
            for _ in container.demux(container.streams.video[0]):
                pass
    truth = ground_truth(clean)
    info = probe(path)
    assert info.duration_seconds == pytest.approx(3.0, abs=1 / 24)
    clip = decode_clip(path, Uniform(8), size=SIZE)
    picked = clip_indices(clip.frames)
    expected = expected_uniform(truth, info.duration_seconds, 8)
    assert sum(a != b for a, b in zip(picked, expected, strict=True)) <= 1  # the moved packet's frame may be lost
    assert picked[-1] == expected[-1]  # frames after the new stream are decoded
    windows = decode_clips(path, Windows(1.0, with_whole_video=True), size=SIZE)
    assert [w.start_seconds for w in windows[1:]] == [0.0, 1.0, 2.0]


def test_variable_frame_rate_uses_timestamps(make_video: Callable[..., Any]) -> None:
    path, truth = make_video("vfr.mp4", vfr=True)
    pts, durations, time_base = sample_frame_times(60, fps=24, vfr=True)
    intervals = np.diff(truth.pts_seconds)
    assert intervals.max() > 2 * intervals.min()  # really irregular
    info = probe(path)
    assert info.duration_seconds == pytest.approx(float((pts[-1] + durations[-1]) * time_base), abs=1.5 / 24)
    clip = decode_clip(path, Uniform(16), size=SIZE)
    expected = expected_uniform(truth, info.duration_seconds, 16)
    assert clip_indices(clip.frames) == expected
    # With irregular spacing, time-based picks differ from picking evenly spaced frame numbers.
    by_count = [truth.indices[int((i + 0.5) * 60 / 16)] for i in range(16)]
    assert expected != by_count


def test_one_frame_video(make_video: Callable[..., Any]) -> None:
    path, _ = make_video("one.mp4", num_frames=1)
    info = probe(path)
    assert info.num_frames == 1
    clip = decode_clip(path, Uniform(8), size=SIZE)
    assert clip_indices(clip.frames) == [0] * 8
    dense = decode_clip(path, Dense(4, stride=2), size=SIZE)
    assert clip_indices(dense.frames) == [0] * 4


def test_dense_sampling_views(make_video: Callable[..., Any]) -> None:
    path, truth = make_video("h264.mp4", codec="h264")
    clip = decode_clip(path, Dense(4, stride=4), size=SIZE)
    assert clip_indices(clip.frames) == [truth.indices[k] for k in (23, 27, 31, 35)]
    np.testing.assert_allclose(clip.pts_seconds, truth.pts_seconds[[23, 27, 31, 35]], atol=1e-6)
    stats = DecodeStats()
    views = decode_clips(path, Dense(4, stride=4, num_views=3), size=SIZE, stats=stats)
    expected_positions = [[0, 4, 8, 12], [24, 28, 32, 36], [47, 51, 55, 59]]
    assert [clip_indices(v.frames) for v in views] == [[truth.indices[k] for k in ks] for ks in expected_positions]
    assert [v.start_seconds for v in views] == pytest.approx([truth.pts_seconds[ks[0]] for ks in expected_positions])
    assert stats.frames_converted == 12
    padded = decode_clip(path, Dense(8, stride=16), size=SIZE)
    assert clip_indices(padded.frames) == [truth.indices[k] for k in (0, 16, 32, 48, 59, 59, 59, 59)]


def test_dense_start_fraction_is_the_official_random_start(make_video: Callable[..., Any]) -> None:
    # 60 frames, T=4, stride 4: seg_len 13, so the starts 0 .. 47 are possible, each for 1/48 of the fractions.
    starts = [int(dense_indices(60, num_frames=4, stride=4, start_fraction=k / 48)[0, 0]) for k in range(48)]
    assert starts == list(range(48))
    assert dense_indices(60, num_frames=4, stride=4, start_fraction=0.9999).tolist() == [[47, 51, 55, 59]]
    assert dense_indices(5, num_frames=4, stride=4, start_fraction=0.7).tolist() == [[0, 4, 4, 4]]  # too short
    with pytest.raises(ValueError, match="start_fraction"):
        dense_indices(60, num_frames=4, stride=4, start_fraction=1.0)
    with pytest.raises(ValueError, match="num_views"):
        dense_indices(60, num_frames=4, stride=4, num_views=2, start_fraction=0.5)
    path, truth = make_video("h264.mp4", codec="h264")
    clip = decode_clip(path, Dense(4, stride=4, start_fraction=10 / 48), size=SIZE)
    assert clip_indices(clip.frames) == [truth.indices[k] for k in (10, 14, 18, 22)]
    with pytest.raises(ValueError, match="num_views"):
        Dense(4, num_views=2, start_fraction=0.5)  # a start places one view
    with pytest.raises(ValueError, match="start_fraction"):
        Dense(4, start_fraction=1.0)


def test_whole_pictures_keep_their_aspect_ratio(make_video: Callable[..., Any]) -> None:
    path, truth = make_video("h264.mp4", codec="h264")  # 128x96
    whole = decode_clip(path, Uniform(4), size=48, crop="none")
    assert whole.frames.shape == (4, 48, 64, 3)
    square = decode_clip(path, Uniform(4), size=48)
    np.testing.assert_array_equal(whole.frames[:, :, 8:56], square.frames)  # the square is the centre of the whole
    rotated, _ = make_video("rot90.mp4", codec="h264", rotation=90)  # displayed 128x96, stored 96x128
    assert decode_clip(rotated, Uniform(2), size=48, crop="none").frames.shape == (2, 48, 64, 3)


def test_dense_sampling_on_variable_frame_rate_counts_frames(make_video: Callable[..., Any]) -> None:
    path, truth = make_video("vfr.mp4", vfr=True)
    clip = decode_clip(path, Dense(5, stride=3), size=SIZE)
    # n=60, seg_len=13, slide=47, start=23: presentation positions, whatever their timestamps.
    assert clip_indices(clip.frames) == [truth.indices[k] for k in (23, 26, 29, 32, 35)]


def test_windows_sampling(make_video: Callable[..., Any]) -> None:
    path, truth = make_video("h264.mp4", codec="h264")
    duration = probe(path).duration_seconds  # 60 frames at 24 fps: 2.5 s
    stats = DecodeStats()
    clips = decode_clips(path, Windows(1.0, num_frames=4, overlap_seconds=0.25), size=SIZE)
    bounds = [(0.0, 1.0), (0.75, 1.75), (1.5, 2.5)]
    assert [(c.start_seconds, c.end_seconds) for c in clips] == [pytest.approx(b) for b in bounds]
    for clip, (start, end) in zip(clips, bounds, strict=True):
        assert clip_indices(clip.frames) == expected_uniform(truth, end - start, 4, start=start)
    assert duration == pytest.approx(2.5)
    decode_clips(path, Windows(1.0, num_frames=4, overlap_seconds=0.25), size=SIZE, stats=stats)
    assert stats.frames_converted == len({i for c in clips for i in clip_indices(c.frames)})


def test_whole_video_and_windows_in_one_pass(make_video: Callable[..., Any]) -> None:
    path, truth = make_video("h264.mp4", codec="h264")
    separate = DecodeStats(), DecodeStats()
    whole = decode_clip(path, Uniform(8), size=SIZE, stats=separate[0])
    windows = decode_clips(path, Windows(1.0, num_frames=8), size=SIZE, stats=separate[1])
    together = DecodeStats()
    first, *rest = decode_clips(path, Windows(1.0, num_frames=8, with_whole_video=True), size=SIZE, stats=together)
    assert clip_indices(first.frames) == clip_indices(whole.frames) == expected_uniform(truth, 2.5, 8)
    assert (first.start_seconds, first.end_seconds) == (0.0, pytest.approx(2.5))
    assert [clip_indices(c.frames) for c in rest] == [clip_indices(c.frames) for c in windows]
    np.testing.assert_array_equal(first.frames, whole.frames)
    # Frames both samplings want are converted once, and the packets are decoded in one pass.
    shared = set(clip_indices(whole.frames)) & {i for c in windows for i in clip_indices(c.frames)}
    assert shared
    assert together.frames_converted == sum(s.frames_converted for s in separate) - len(shared)
    assert together.packets_decoded < sum(s.packets_decoded for s in separate)


# ---------------------------------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize(
    ("name", "options"),
    [("h264.mp4", {"codec": "h264"}), ("vp9.webm", {"codec": "vp9"}), ("mpeg2.ts", {"codec": "mpeg2", "gop": 12})],
)
def test_bytes_and_file_objects_match_paths(make_video: Callable[..., Any], name: str, options: dict) -> None:
    path, truth = make_video(name, **options)
    from_path = decode_clip(path, Uniform(8), size=SIZE)
    from_str = decode_clip(str(path), Uniform(8), size=SIZE)
    from_bytes = decode_clip(path.read_bytes(), Uniform(8), size=SIZE)
    stats = DecodeStats()
    with open(path, "rb") as f:
        from_file = decode_clip(f, Uniform(8), size=SIZE, stats=stats)
        assert not f.closed  # the caller owns it
        f.seek(0)
        assert f.read(4) == path.read_bytes()[:4]
    # Remote reads use the container's index where the file has one; MPEG-TS has none, so it is scanned.
    assert stats.index == ("demux" if name.endswith(".ts") else "container")
    for clip in (from_str, from_bytes, from_file):
        np.testing.assert_array_equal(clip.frames, from_path.frames)
        np.testing.assert_allclose(clip.pts_seconds, from_path.pts_seconds)
    assert clip_indices(from_file.frames) == expected_uniform(truth, probe(path).duration_seconds, 8)


@pytest.mark.parametrize(
    ("name", "options", "seconds"),
    [
        ("late_start.mkv", {"num_frames": 60, "first_pts": 120}, 2.5),  # timestamps start at 5 s
        ("long_audio.mkv", {"num_frames": 48, "audio_seconds": 6.0}, 1.999),  # the audio runs on to 6 s
        ("late_start.flv", {"num_frames": 48}, 2.0),  # B-frames: the first frame is shown at 83 ms
    ],
)
def test_the_duration_is_the_video_streams_not_the_files(
    video_dir: Path, name: str, options: dict, seconds: float
) -> None:
    # Matroska and FLV give no duration per stream; the file's runs from time 0 and over every stream.
    path = write_indexed_video(video_dir / name, **options)
    truth = ground_truth(path)
    assert probe(path).duration_seconds == pytest.approx(seconds, abs=1e-3)
    expected = expected_uniform(truth, seconds, 8)
    with open(path, "rb") as file:
        for source in (path, path.read_bytes(), file):
            with VideoDecoder(source) as video:
                clip = video.clip(Uniform(8), size=SIZE)
                assert video.info.duration_seconds == pytest.approx(seconds, abs=1e-3)
            assert clip_indices(clip.frames) == expected
            assert clip.end_seconds == pytest.approx(seconds, abs=1e-3)


@pytest.mark.parametrize(
    ("name", "options"), [("cut.mkv", {}), ("cut.mp4", {"container_options": {"movflags": "faststart"}})]
)
def test_a_cut_off_upload_gives_the_frames_it_holds(video_dir: Path, name: str, options: dict) -> None:
    # Cut half-way: the header still says 4 s. Every source samples the 2 s there are and says so, never padding the
    # clip with the last frame.
    whole = write_indexed_video(video_dir / f"whole_{name}", num_frames=96, **options)
    data = whole.read_bytes()
    path = video_dir / name
    path.write_bytes(data[: len(data) // 2])
    truth = ground_truth(path)
    seconds = float(truth.pts_seconds[-1]) + 1 / 24
    assert 1.5 < seconds < 2.5
    assert probe(path).duration_seconds == pytest.approx(seconds, abs=2e-3)
    results = []
    with open(path, "rb") as file:
        for source in (path, path.read_bytes(), file):
            with VideoDecoder(source) as video:
                clips = video.clips(Windows(1.0, num_frames=4, with_whole_video=True), size=SIZE)
                results.append(([clip_indices(clip.frames) for clip in clips], video.info.duration_seconds))
    assert results[1] == results[0] and results[2] == results[0]
    indices, duration = results[0]
    assert duration == pytest.approx(seconds, abs=2e-3)
    assert indices[0] == expected_uniform(truth, duration, 4)
    assert len(indices) == 3  # the whole video and two 1 s windows


def _top_boxes(data: bytes) -> dict[bytes, tuple[int, int]]:
    """An MP4's top-level boxes: type -> (offset, size)."""
    boxes, offset = {}, 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        boxes[data[offset + 4 : offset + 8]] = (offset, size)
        offset += size
    return boxes


def test_an_upload_cut_before_any_frame_is_truncated_not_corrupt(video_dir: Path) -> None:
    """An MP4 whose header comes first, cut before its first picture ends, decodes no frame: it was called
    ``corrupt`` (damaged) where the file is only cut short (an upload or recording that stopped), as is one that
    holds its ``ftyp`` box alone. Garbage in a whole file's media data stays ``corrupt``."""
    whole = write_indexed_video(
        video_dir / "whole_fast.mp4", num_frames=96, container_options={"movflags": "faststart"}
    )
    data = whole.read_bytes()
    boxes = _top_boxes(data)
    assert boxes[b"moov"][0] < boxes[b"mdat"][0]  # the header first
    cut = data[: boxes[b"mdat"][0] + 8 + 64]  # the header whole, 64 bytes of the first picture
    path = video_dir / "cut_early.mp4"
    path.write_bytes(cut)
    with open(path, "rb") as file:
        for source in (path, cut, file):
            with pytest.raises(VideoDecodeError) as info:
                decode_clip(source, size=SIZE)
            assert info.value.reason == "truncated", info.value
            assert "ends before its media data" in info.value.message
    assert _reason(data[: boxes[b"ftyp"][1]]) == "truncated"  # the ftyp box alone
    start, size = boxes[b"mdat"]
    garbage = data[: start + 8] + bytes(size - 8) + data[start + size :]  # whole, but no picture in it
    assert _reason(garbage) == "corrupt"


def test_a_whole_mp4_whose_index_points_outside_it_is_corrupt_not_truncated(video_dir: Path) -> None:
    """A whole MP4 (every top-level box there) whose chunk offsets (``stco``) were overwritten reads no packet: it was
    called ``truncated`` (cut short, worth waiting for the rest of an upload) where the file is damaged."""
    whole = write_indexed_video(video_dir / "whole_for_stco.mp4", num_frames=48)
    data = bytearray(whole.read_bytes())
    at = data.find(b"stco")
    assert at > 0
    count = int.from_bytes(data[at + 8 : at + 12], "big")
    data[at + 12 : at + 12 + 4 * count] = b"\xff\xff\xff\x00" * count  # every chunk past the end of the file
    path = video_dir / "bad_stco.mp4"
    path.write_bytes(bytes(data))
    with open(path, "rb") as file:
        for source in (path, bytes(data), file):
            with pytest.raises(VideoDecodeError) as info:
                decode_clip(source, size=SIZE)
            assert info.value.reason == "corrupt", info.value
            assert "its index (moov) is damaged" in info.value.message
    with pytest.raises(VideoDecodeError) as info:
        probe(path, method="demux")
    assert info.value.reason == "corrupt", info.value
    # Cut where a box ends before any media data: a header alone (faststart), a fragmented recording's init segment
    # alone: cut short, though every box there is whole (found by review).
    fast = write_indexed_video(
        video_dir / "fast_for_cut.mp4", num_frames=48, container_options={"movflags": "faststart"}
    )
    fast_bytes = fast.read_bytes()
    assert _reason(fast_bytes[: _top_boxes(fast_bytes)[b"mdat"][0]]) == "truncated"
    fragmented = write_indexed_video(
        video_dir / "fragmented.mp4",
        num_frames=48,
        container_options={"movflags": "frag_keyframe+empty_moov+default_base_moof"},
    ).read_bytes()
    init = fragmented[: fragmented.index(b"moof") - 4]  # ftyp and moov (no samples): up to the first fragment
    assert b"mdat" not in init and b"moov" in init
    assert _reason(init) == "truncated"
    with pytest.raises(VideoDecodeError) as info:
        probe(init, method="demux")
    assert info.value.reason == "truncated"


def test_a_decoded_video_leaves_nothing_to_the_garbage_collector(make_video: Callable[..., Any]) -> None:
    """Reading a frame's display matrix through `frame.side_data` made a reference cycle (the frame caches the
    container, which refers back to it): every converted frame, its picture buffers and through them the decoder's
    threads lived until a garbage collection (a service decoding 4096 px uploads grew to 8 GB and hundreds of
    threads). Decoding now frees all of it when the call returns."""
    import gc

    path, _ = make_video("rotated.mp4", num_frames=48, rotation=90)
    decode_clip(path, Uniform(8), size=SIZE)  # imports and caches warmed up
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            with VideoDecoder(path, num_threads=4) as video:
                (clip,) = video.clips(Uniform(8), size=SIZE)
                assert video.info.rotation == 90
            del clip
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = sorted({type(o).__module__ for o in gc.garbage if type(o).__module__.startswith("av.")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == [], left


def test_frames_an_edit_list_cuts_are_not_shown(make_video: Callable[..., Any], video_dir: Path) -> None:
    # Trimmed in place at 1.25 s, mid-GOP: players show frames 30..95; the demuxer hands out 24..29 flagged discard.
    source, _ = make_video("untrimmed.mp4", num_frames=96, gop=24)
    path = trim_mp4_start(source, video_dir / "trimmed.mp4", seconds=1.25)
    truth = ground_truth(path)
    assert (truth.indices[0], len(truth.indices)) == (30, 66)
    for method in ("metadata", "demux"):
        info = probe(path, method=method)  # type: ignore[arg-type]
        assert (info.num_frames, info.duration_seconds) == (66, pytest.approx(2.75)), method
    with open(path, "rb") as file:
        for source in (path, path.read_bytes(), file):
            with VideoDecoder(source) as video:
                whole = video.clip(Uniform(8), size=SIZE)
                (first,) = video.clips(Dense(4, stride=1, start_fraction=0.0), size=SIZE)
            assert clip_indices(whole.frames) == expected_uniform(truth, 2.75, 8)
            assert clip_indices(first.frames) == [30, 31, 32, 33]
            np.testing.assert_allclose(first.pts_seconds, np.arange(4) / 24)
    views = decode_clips(path, Dense(4, stride=3, num_views=2), size=SIZE)
    assert [clip_indices(view.frames) for view in views] == [[30, 33, 36, 39], [86, 89, 92, 95]]


def _mp4_shown_late(path: Path, *, num_frames: int, fps: int, late_seconds: int) -> Path:
    """An MP4 whose display times all lie ``late_seconds`` after its decode times, with no edit list to say so."""
    with av.open(str(path), "w", options={"use_editlist": "0"}) as container:
        stream = container.add_stream("libx264", rate=fps, options={"x264-params": f"keyint={fps}:bframes=0"})
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for i in [*range(num_frames), None]:
            picture = None
            if i is not None:
                image = render_frame(i, width=128, height=96, num_frames=num_frames)
                picture = av.VideoFrame.from_ndarray(image, format="rgb24")
                picture.pts = i
            for packet in stream.encode(picture):
                packet.pts += int(late_seconds / packet.time_base)
                container.mux(packet)
    return path


def test_display_times_long_after_decode_times_pick_the_right_frames(video_dir: Path) -> None:
    """MP4 indexes decode times, and seeks to display times land late; a retreat before the first display time
    sought that (decode) time and took a later keyframe's frame for the first targets ([48, 48, 48, 48, 54, ...])."""
    path = _mp4_shown_late(video_dir / "late.mp4", num_frames=96, fps=24, late_seconds=3)
    truth = ground_truth(path)
    assert truth.indices == list(range(96))
    with VideoDecoder(path) as video:
        assert clip_indices(video.clip(Uniform(8), size=SIZE).frames) == expected_uniform(truth, 4.0, 8)
        (first,) = video.clips(Dense(4, stride=1, start_fraction=0.0), size=SIZE)
    assert clip_indices(first.frames) == [0, 1, 2, 3]
    views = decode_clips(path, Dense(4, stride=3, num_views=3), size=SIZE)
    assert [clip_indices(view.frames) for view in views] == [[0, 3, 6, 9], [43, 46, 49, 52], [86, 89, 92, 95]]


def test_the_default_video_track_is_decoded(video_dir: Path) -> None:
    # A one-frame preview track comes first; players show the second, flagged default.
    path = write_indexed_video(video_dir / "preview_first.mkv", num_frames=48, preview_track=True)
    info = probe(path)
    assert (info.codec, info.width, info.height) == ("h264", 128, 96)
    clip = decode_clip(path, Uniform(4), size=SIZE)
    assert clip_indices(clip.frames) == [6, 18, 30, 42]


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_file_object_is_not_read_whole_when_seeking(video_dir: Path, ext: str) -> None:
    path = write_sample_video(video_dir / f"long.{ext}", num_frames=300, fps=10, width=320, height=240, gop=10)
    truth = ground_truth(path)
    reader = CountingReader(path)
    try:
        stats = DecodeStats()
        clip = decode_clip(reader, Uniform(4), size=SIZE, stats=stats)
    finally:
        reader.close()
    assert clip_indices(clip.frames) == expected_uniform(truth, 30.0, 4)
    assert stats.index == "container"
    assert reader.bytes_read < 0.5 * reader.size, f"read {reader.bytes_read} of {reader.size} bytes"
    # (FFmpeg reads through forward gaps under 64 KiB instead of seeking, hence few, far-apart targets here.)
    # The demux-first path reads everything, which is what the file-object path avoids.
    full = CountingReader(path)
    try:
        decode_clip(full, Dense(8, stride=4), size=SIZE)
    finally:
        full.close()
    assert full.bytes_read >= full.size


def test_unseekable_file_objects_are_refused() -> None:
    class Pipe(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

    with pytest.raises(ValueError, match="seekable"):
        decode_clip(Pipe())
    with pytest.raises(TypeError):
        decode_clip(12345)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# Probe


def test_probe_metadata_and_demux(make_video: Callable[..., Any]) -> None:
    path, truth = make_video("h264.mp4", codec="h264")
    info = probe(path)
    assert info.duration_seconds == pytest.approx(2.5)
    assert info.fps == pytest.approx(24.0)
    assert (info.num_frames, info.num_frames_exact) == (60, True)
    assert (info.width, info.height, info.codec, info.rotation) == (128, 96, "h264", 0)
    assert info.keyframe_seconds is None  # MP4 indexes decode times; with B-frames they are not display times
    exact = probe(path, method="demux")
    assert exact.keyframe_seconds == pytest.approx(truth.keyframe_seconds)
    assert len(truth.keyframe_seconds) == 5
    assert (exact.num_frames, exact.num_frames_exact) == (60, True)

    mkv, mkv_truth = make_video("hevc.mkv", codec="hevc")
    info = probe(mkv)
    assert info.codec == "hevc"
    assert info.num_frames == 60 and not info.num_frames_exact  # Matroska has no frame count: estimated
    exact = probe(mkv, method="demux")
    assert (exact.num_frames, exact.num_frames_exact) == (len(mkv_truth.indices), True)
    assert exact.keyframe_seconds == pytest.approx(mkv_truth.keyframe_seconds)

    avi, avi_truth = make_video("mpeg4.avi", codec="mpeg4")
    info = probe(avi)
    assert info.keyframe_seconds == pytest.approx(avi_truth.keyframe_seconds)  # complete index, no B-frames

    rotated, _ = make_video("rot90.mp4", rotation=90)
    info = probe(rotated)
    assert (info.width, info.height, info.rotation) == (128, 96, 90)


def test_probe_falls_back_to_demuxing_when_metadata_is_missing(video_dir: Path) -> None:
    # A raw H.264 elementary stream carries no duration or frame count in a header.
    path = write_sample_video(video_dir / "raw.mkv", num_frames=30, width=64, height=48, gop=10)
    raw = video_dir / "raw.h264"
    with av.open(str(path)) as src, av.open(str(raw), "w", format="h264") as dst:
        in_stream = src.streams.video[0]
        out_stream = dst.add_stream_from_template(in_stream)
        for packet in src.demux(in_stream):
            if packet.size:
                packet.stream = out_stream
                dst.mux(packet)
    info = probe(raw)
    assert (info.num_frames, info.num_frames_exact) == (30, True)
    clip = decode_clip(raw, Uniform(3), size=SIZE)
    assert len(set(clip_indices(clip.frames))) == 3


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs


def _reason(source: Any, **options: Any) -> str:
    with pytest.raises(VideoDecodeError) as info:
        decode_clip(source, size=SIZE, **options)
    assert info.value.message
    return info.value.reason


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _audio_with_cover_art(path: Path) -> Path:
    """An MP3 with its album picture: a video stream flagged as attached picture, which is no video."""
    with av.open(str(path), "w") as container:
        audio = container.add_stream("mp3", rate=16000)
        cover = container.add_stream("mjpeg")
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
        for packet in [*cover.encode(picture.reformat(format="yuvj420p")), *cover.encode(None)]:
            container.mux(packet)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = i * 1152
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
    return path


def test_audio_files_say_what_they_hold(tmp_path: Path) -> None:
    for path, holds in [
        (_audio_only(tmp_path / "audio.m4a"), "only audio"),
        (_audio_with_cover_art(tmp_path / "song.mp3"), "only audio and cover art"),  # was "only audio, video"
    ]:
        with pytest.raises(VideoDecodeError) as error:
            decode_clip(path, size=SIZE)
        assert error.value.reason == "no_video_stream" and f"no video stream, {holds}" in str(error.value), error.value


def test_pictures_past_the_limit_are_too_large_whatever_the_codec(tmp_path: Path) -> None:
    """FFmpeg zeroes a stream's size past max_pixels when it opens a decoder with that limit; codecs whose size is
    known only from the container's header (FFV1) then read as 0x0 and failed as `corrupt`."""
    for container_format in ("mkv", "avi", "nut"):
        path = tmp_path / f"ffv1.{container_format}"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("ffv1", rate=1)
            stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
            picture = av.VideoFrame.from_ndarray(np.zeros((96, 96), np.uint8), format="yuv420p")
            for packet in [*stream.encode(picture), *stream.encode(None)]:
                container.mux(packet)
        data = path.read_bytes()
        for source in (path, data, io.BytesIO(data)):
            with pytest.raises(VideoDecodeError) as error:
                decode_clip(source, size=SIZE, max_pixels=96 * 64 - 1)
            assert error.value.reason == "too_large" and "96x64 exceeds" in str(error.value), error.value
        assert decode_clip(path, size=SIZE, max_pixels=2 * 96 * 64).frames.shape[0] > 0  # under it: decoded


def test_bad_inputs_have_reasons(tmp_path: Path, make_video: Callable[..., Any]) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert _reason(b"") == "empty"
    assert _reason(empty) == "empty"
    assert _reason(io.BytesIO()) == "empty"
    assert _reason(np.random.default_rng(0).bytes(5000)) == "not_a_video"
    text = b"this is not a video, just a few lines of text\n" * 50
    assert _reason(text) == "not_a_video"
    text_file = tmp_path / "notes.txt"  # FFmpeg renders .txt as ANSI art; that is still not a video
    text_file.write_bytes(text)
    assert _reason(text_file) == "not_a_video"
    assert _reason(_audio_only(tmp_path / "audio.m4a")) == "no_video_stream"

    path, _ = make_video("h264.mp4", codec="h264")
    data = path.read_bytes()
    assert _reason(data[: len(data) // 2]) == "truncated"  # the index (moov) was at the end
    assert _reason(data, max_pixels=100) == "too_large"
    huge = b"YUV4MPEG2 W16000 H16000 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(1000)
    assert _reason(huge) == "too_large"  # refused from the header, before allocating a picture
    with pytest.raises(VideoDecodeError) as error:
        probe(huge)
    assert error.value.reason == "too_large"
    for size in ("W30000 H30000", "W0 H0"):  # FFmpeg refuses these headers itself, with EBUSY ("resource busy")
        with pytest.raises(VideoDecodeError) as error:
            probe(f"YUV4MPEG2 {size} F25:1 Ip A1:1 C420jpeg\nFRAME\n".encode() + bytes(1000))
        assert error.value.reason == "corrupt" and "header is invalid" in str(error.value), str(error.value)
        assert "busy" not in str(error.value)


def test_inputs_that_name_other_files_or_sockets_are_refused(
    tmp_path: Path, make_video: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file list (FFmpeg's concat demuxer) or a session description (SDP: binds the UDP ports it names) is data,
    never directions: given as a path, bytes or a file object it is refused, and nothing it names is opened. A still
    picture named .mp4 is not a video."""
    import socket

    path, _ = make_video("h264.mp4", codec="h264")
    (tmp_path / "real.mp4").write_bytes(path.read_bytes())
    listing = tmp_path / "list.mp4"
    listing.write_text("ffconcat version 1.0\nfile real.mp4\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    sdp = tmp_path / "session.mp4"
    sdp.write_bytes(
        b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        + f"m=video {port} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n".encode()
    )
    for hostile in (listing, sdp):
        for source in (hostile, hostile.read_bytes(), io.BytesIO(hostile.read_bytes())):
            started = time.monotonic()
            assert _reason(source) == "not_a_video", (hostile.name, type(source).__name__)
            assert time.monotonic() - started < 5, "an SDP input waited for packets on its ports"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as after:
        after.bind(("127.0.0.1", port))  # free: nothing bound the port the description named
    # A still picture named as a video is not one; raw Motion JPEG (JPEG pictures one after another) is.
    from PIL import Image

    for kind in ("PNG", "JPEG"):
        still = tmp_path / f"still-{kind}.mp4"
        Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(still, format=kind)
        for source in (still, still.read_bytes(), io.BytesIO(still.read_bytes())):
            with pytest.raises(VideoDecodeError, match="still picture") as refused:
                decode_clip(source, Uniform(2), size=SIZE)
            assert refused.value.reason == "not_a_video", (kind, type(source).__name__)
    mjpeg = tmp_path / "raw.mjpeg"
    with av.open(str(mjpeg), "w", format="mjpeg") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(6):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), "rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    for source in (mjpeg, mjpeg.read_bytes()):
        assert decode_clip(source, Uniform(3), size=SIZE).frames.shape[0] == 3
    monkeypatch.chdir(tmp_path)  # a relative path names the file, whatever "proto:" it looks like
    (tmp_path / "concat:real.mp4").write_bytes(path.read_bytes())
    assert decode_clip("concat:real.mp4", Uniform(2), size=SIZE).frames.shape[0] == 2


def write_video_with_a_gap(path: Path, *, last_seconds: int) -> Path:
    """A tiny file of three 32 px frames, at 0 s, 1 s and `last_seconds`: it claims hours of video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1)
        for pts in (0, 1, last_seconds):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), pts % 251, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def test_clips_past_the_frame_limit_are_refused_before_decoding(tmp_path: Path, make_video: Callable[..., Any]) -> None:
    # A 1 KB file that claims 5.5 hours: 2 s windows at 224 px would take 11 GiB.
    gap = write_video_with_a_gap(tmp_path / "gap.mkv", last_seconds=20_000)
    assert gap.stat().st_size < 4096
    stats = DecodeStats()
    with pytest.raises(VideoDecodeError) as error:
        decode_clips(gap, Windows(2.0, with_whole_video=True), size=224, stats=stats)
    assert error.value.reason == "too_long"
    assert "10,002 clips of 8 frames at 224x224" in error.value.message and "2.0 GiB" in error.value.message
    assert stats.packets_decoded == 0 and stats.frames_converted == 0  # nothing was decoded
    assert decode_clip(gap, Uniform(8), size=224).frames.shape == (8, 224, 224, 3)  # one clip of it is fine

    # The limit is the bytes of the frames returned, to the byte: centre crops, and whole pictures (crop="none").
    path, _ = make_video("h264.mp4", codec="h264")
    for spec, crop in ((Windows(0.5, with_whole_video=True), "center"), (Dense(4, stride=2, num_views=3), "none")):
        clips = decode_clips(path, spec, size=SIZE, crop=crop)
        need = sum(clip.frames.nbytes for clip in clips)
        assert len(clips) > 2 and need > 0
        exact = decode_clips(path, spec, size=SIZE, crop=crop, max_frame_bytes=need)
        assert [c.frames.tobytes() for c in exact] == [c.frames.tobytes() for c in clips]
        with pytest.raises(VideoDecodeError, match="too_long"):
            decode_clips(path, spec, size=SIZE, crop=crop, max_frame_bytes=need - 1)
    with pytest.raises(ValueError, match="max_frame_bytes"):
        VideoDecoder(path, max_frame_bytes=0)


def test_thin_pictures_are_refused_before_scaling(tmp_path: Path) -> None:
    """A 4 x 6000 picture scaled to a shorter side of 224 px would be 224 x 336,000 (225 MB a frame)."""
    for width, height, refused in ((4, 6000, True), (6000, 4, True), (16, 256, False), (8, 256, True)):
        path = tmp_path / f"thin{width}x{height}.mkv"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("rawvideo", rate=1)
            stream.width, stream.height, stream.pix_fmt = width, height, "gray"
            for pts in range(2):
                frame = av.VideoFrame.from_ndarray(np.full((height, width), 100, np.uint8), format="gray")
                frame.pts = pts
                for packet in stream.encode(frame):
                    container.mux(packet)
        if refused:
            with pytest.raises(VideoDecodeError, match="aspect ratio of 16:1") as error:
                decode_clip(path, Uniform(2), size=224)
            assert error.value.reason == "too_large"
        else:
            assert decode_clip(path, Uniform(2), size=SIZE).frames.shape == (2, SIZE, SIZE, 3)


def test_a_frame_larger_than_the_header_says_is_refused_before_it_is_allocated(tmp_path: Path) -> None:
    """The pixel limit was checked on the header and on each decoded frame: a Motion JPEG stream whose header says
    64 x 48 and two of whose packets are 6000 x 6000 pictures had FFmpeg allocate them first (a 16k x 16k 4:4:4
    frame is 0.8 GB per decoder). FFmpeg now refuses them itself; the frames the stream holds are decoded."""
    from PIL import Image

    small = tmp_path / "small.avi"
    with av.open(str(small), "w") as out:
        stream = out.add_stream("mjpeg", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    big = io.BytesIO()
    Image.fromarray(np.zeros((6000, 6000, 3), np.uint8)).save(big, "JPEG", quality=10, subsampling=0)
    bomb = tmp_path / "bomb.avi"
    with av.open(str(small)) as src, av.open(str(bomb), "w") as dst:
        source = src.streams.video[0]
        target = dst.add_stream_from_template(source)
        for i, packet in enumerate(p for p in src.demux(source) if p.size):
            if i in (4, 8):
                swapped = av.Packet(big.getvalue())
                swapped.pts, swapped.dts, swapped.time_base = packet.pts, packet.dts, packet.time_base
                packet = swapped
            packet.stream = target
            dst.mux(packet)
    script = (
        "import resource, sys; from vitaclip.video import decode_clip, Uniform; "
        "clip = decode_clip(sys.argv[1], Uniform(8), size=32); "
        "print(clip.frames.shape[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    peaks = {}
    for path in (small, bomb):
        done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        frames, peaks[path.name] = map(int, done.stdout.split())
        assert frames == 8
    assert peaks["bomb.avi"] < peaks["small.avi"] + 40, peaks  # MiB: a 6000 x 6000 4:4:4 frame alone is 103


def test_damaged_files_give_a_clip_or_a_reason(make_video: Callable[..., Any]) -> None:
    rng = np.random.default_rng(1)
    outcomes: list[str] = []
    for name, options in (("h264.mp4", {"codec": "h264"}), ("hevc.mkv", {"codec": "hevc"})):
        path, _ = make_video(name, **options)
        data = path.read_bytes()
        damaged = bytearray(data)
        for start in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
            damaged[start : start + 300] = rng.bytes(300)
        candidates = [bytes(damaged), data[: int(len(data) * 0.6)], data[: int(len(data) * 0.97)]]
        for candidate in candidates:
            try:
                clip = decode_clip(candidate, Uniform(8), size=SIZE, timeout_seconds=10)
            except VideoDecodeError as e:
                assert e.reason in ("truncated", "corrupt")
                outcomes.append(e.reason)
            else:
                _check_clip_shape(clip.frames, 8)
                assert np.all(np.diff(clip.pts_seconds) >= 0)
                outcomes.append("clip")
    assert "clip" in outcomes  # some damage is recoverable


def test_undecodable_metadata_text_is_ignored(make_video: Callable[..., Any]) -> None:
    path, truth = make_video("h264.mp4", codec="h264")
    data = path.read_bytes()
    assert b"Lavf" in data  # the muxer's name, stored as a metadata string
    damaged = data.replace(b"Lavf", b"\x91\xff\xfe\x80")
    clip = decode_clip(damaged, Uniform(8), size=SIZE)
    assert clip_indices(clip.frames) == expected_uniform(truth, 2.5, 8)


@pytest.mark.serial
def test_timeout_bounds_a_slow_source(video_dir: Path) -> None:
    path = write_sample_video(video_dir / "slow.mp4", num_frames=120, width=128, height=96, gop=12)
    reader = CountingReader(path, delay_seconds=0.05)
    started = time.monotonic()
    try:
        with pytest.raises(VideoDecodeError) as error:
            decode_clip(reader, Uniform(8), size=SIZE, timeout_seconds=0.2)
    finally:
        reader.close()
    assert error.value.reason == "timeout"
    assert time.monotonic() - started < 2.0
    with pytest.raises(VideoDecodeError) as error:
        decode_clip(path.read_bytes(), timeout_seconds=1e-6)
    assert error.value.reason == "timeout"


def test_errors_survive_pickling() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(VideoDecodeError("truncated", "moov atom not found")))
    assert (error.reason, error.message) == ("truncated", "moov atom not found")
    with pytest.raises(ValueError, match="reason"):
        VideoDecodeError("nope", "x")  # type: ignore[arg-type]


def test_containers_are_closed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make_video: Callable[..., Any]) -> None:
    opened: list[Any] = []
    real_open = av.open

    class Tracked:
        def __init__(self, inner: Any) -> None:
            self._inner = inner
            self.closed = False

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def __enter__(self) -> Tracked:
            return self

        def __exit__(self, *exc: object) -> None:
            self.closed = True
            self._inner.__exit__(*exc)

        def close(self) -> None:
            self.closed = True
            self._inner.close()

    def tracking_open(*args: Any, **kwargs: Any) -> Any:
        container = Tracked(real_open(*args, **kwargs))
        opened.append(container)
        return container

    monkeypatch.setattr(av, "open", tracking_open)
    path, _ = make_video("h264.mp4", codec="h264")

    def inputs_open() -> list[str]:
        """The files under the test's folders this process holds open (other threads' files are not counted: a
        count of every descriptor failed when one opened a log file meanwhile)."""
        held = []
        for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
            try:
                held.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue  # closed since it was listed
        return [target for target in held if target.startswith((str(tmp_path), str(path.parent)))]

    assert inputs_open() == []
    decode_clip(path, size=SIZE)
    decode_clips(path, Windows(1.0, num_frames=8), size=SIZE)
    probe(path)
    for bad, options in (
        (_audio_only(tmp_path / "a.m4a"), {}),
        (path, {"max_pixels": 10}),
        (path.read_bytes(), {"timeout_seconds": 1e-6}),
    ):
        with pytest.raises(VideoDecodeError):
            decode_clip(bad, size=SIZE, **options)
    assert len(opened) >= 6
    assert all(c.closed for c in opened)
    assert inputs_open() == []


# ---------------------------------------------------------------------------------------------------------------------
# Options and tensors


def test_option_errors(make_video: Callable[..., Any]) -> None:
    path, _ = make_video("h264.mp4", codec="h264")
    with pytest.raises(ValueError, match="clips"):
        decode_clip(path, Windows(1.0, num_frames=8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clips"):
        decode_clip(path, Dense(4, num_views=2))
    with pytest.raises(ValueError, match="segment_seconds"):
        Windows(0.0)
    with pytest.raises(ValueError, match="overlap_seconds"):
        Windows(1.0, overlap_seconds=1.0)
    for bad in (None, "uniform"):
        with pytest.raises(TypeError, match="sampling"):
            decode_clips(path, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_frames"):
        Uniform(0)
    with pytest.raises(ValueError, match="stride"):
        Dense(4, stride=0)
    with pytest.raises(ValueError, match="sampling"):
        sampling_spec("random", num_frames=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        decode_clip(path, size=0)
    with pytest.raises(ValueError, match="crop"):
        decode_clip(path, crop="left")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_threads"):
        VideoDecoder(path, num_threads=0)


def test_one_decoder_serves_clips_and_info_from_one_open(make_video: Callable[..., Any]) -> None:
    import vitaclip.video._container as container

    opened = []
    real_open = container.av.open

    def counting_open(*args: Any, **kwargs: Any) -> Any:
        opened.append(args[0])
        return real_open(*args, **kwargs)

    for name, options in (("h264.mp4", {"codec": "h264"}), ("rot90.mp4", {"codec": "h264", "rotation": 90})):
        path, truth = make_video(name, **options)
        expected_info = probe(path)
        opened.clear()
        container.av.open = counting_open
        try:
            with VideoDecoder(path) as video:
                whole, *windows = video.clips(Windows(1.0, num_frames=4, with_whole_video=True), size=SIZE)
                info = video.info
        finally:
            container.av.open = real_open
        assert len(opened) == 1  # one open for the clips and the metadata
        assert info == expected_info
        assert clip_indices(whole.frames) == expected_uniform(truth, info.duration_seconds, 4)
        assert len(windows) == 3
    # Asked before any clip, the metadata is probed (as `probe` does); clips then open the input again.
    with VideoDecoder(path) as video:
        assert video.info == expected_info
        assert clip_indices(video.clip(Uniform(4), size=SIZE).frames) == expected_uniform(
            truth, info.duration_seconds, 4
        )


def test_frames_to_tensor() -> None:
    frames = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    frames[1] = 255
    x = frames_to_tensor(frames)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    mean, std = torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)
    torch.testing.assert_close(x[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(x[1, :, 2, 3], (1 - mean) / std)
    y = frames_to_tensor(torch.from_numpy(frames), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(y[1], torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="uint8"):
        frames_to_tensor(frames.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        frames_to_tensor(frames[0])


def test_frames_to_tensor_on_a_decoded_clip(make_video: Callable[..., Any]) -> None:
    path, _ = make_video("h264.mp4", codec="h264")
    x = frames_to_tensor(decode_clip(path, Uniform(4), size=SIZE).frames)  # [T, 3, H, W]
    assert x.shape == (4, 3, SIZE, SIZE)
    assert -2.0 < float(x.min()) and float(x.max()) < 2.2


def test_import_does_not_load_the_cloud_stack() -> None:
    code = "import sys, vitaclip.video; print('ray' in sys.modules, 'boto3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("channels_last", [True, False])
def test_normalize_frames_is_the_reference_formula_bit_for_bit(channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 16, 20, 3) if channels_last else (2, 3, 3, 16, 20)
    frames = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    x = frames.movedim(-1, -3) if channels_last else frames
    reference = (x.to(torch.float32) / 255.0 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    out = normalize_frames(frames, mean, std, channels_last=channels_last)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert torch.equal(out, reference)
    assert out.stride() == reference.stride()  # the layout the model's first convolution sees is unchanged


def test_normalize_frames_leaves_float_input_alone() -> None:
    frames = torch.full((1, 2, 3, 4, 4), 51.0)
    normalize_frames(frames, channels_last=False)
    assert torch.equal(frames, torch.full((1, 2, 3, 4, 4), 51.0))

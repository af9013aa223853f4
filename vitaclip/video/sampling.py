"""Frame sampling: what a clip takes from a video, as typed specs and pure functions of durations, timestamps and
frame counts.

A sampling spec says which frames make each clip: `Uniform` (the whole video), `Dense` (the official Vita-CLIP
protocol, several views) or `Windows` (consecutive segments). `plan_views` turns a spec and a video's `Timeline`
into per-frame thresholds the decoder answers. Everything works on presentation timestamps, so variable-frame-rate
videos sample the frame that is actually on screen at a given time. Times are seconds from the first frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np

if TYPE_CHECKING:
    from vitaclip.video._container import Header, PacketTable

__all__ = [
    "TIME_EPSILON_SECONDS",
    "Dense",
    "Sampling",
    "SamplingSpec",
    "Timeline",
    "Uniform",
    "View",
    "Windows",
    "ESTIMATED_DURATION_FORMATS",
    "choose_duration",
    "ends_at_last_start",
    "durations_agree",
    "clip_count",
    "plan_views",
    "sampling_spec",
    "dense_indices",
    "frame_indices_at",
    "uniform_times",
    "window_bounds",
    "window_count",
]

Sampling = Literal["uniform", "dense", "windows"]
"""The name of a sampling, as configs and flags give it (see `sampling_spec`)."""

TIME_EPSILON_SECONDS = 1e-6
"""A frame whose timestamp is within this of a sampling time counts as displayed at that time (float rounding)."""


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def uniform_times(duration_seconds: float, *, num_frames: int, start_seconds: float = 0.0) -> np.ndarray:
    """Centres of ``num_frames`` equal slices of ``[start, start + duration)``.

    Frame ``i`` is sampled at ``start + (i + 0.5) * duration / num_frames``.

    Returns:
        float64 ``[num_frames]`` times in seconds.
    """
    _check_positive("num_frames", num_frames)
    if not duration_seconds >= 0.0:  # also rejects NaN
        raise ValueError(f"duration_seconds must be >= 0, got {duration_seconds}")
    steps = np.arange(num_frames, dtype=np.float64) + 0.5
    return start_seconds + steps * (duration_seconds / num_frames)  # [T]


def frame_indices_at(pts_seconds: np.ndarray, times_seconds: np.ndarray) -> np.ndarray:
    """For each time, the index of the frame on screen then: the last frame whose timestamp is <= the time.

    Times before the first frame map to frame 0.

    Args:
        pts_seconds: ``[N]`` presentation timestamps in ascending order.
        times_seconds: ``[...]`` query times.

    Returns:
        int64 array shaped like ``times_seconds``.
    """
    pts = np.asarray(pts_seconds, dtype=np.float64)
    if pts.ndim != 1 or pts.size == 0:
        raise ValueError(f"pts_seconds must be a non-empty 1-D array, got shape {pts.shape}")
    if pts.size > 1 and np.any(np.diff(pts) < 0):
        raise ValueError("pts_seconds must be in ascending (presentation) order")
    times = np.asarray(times_seconds, dtype=np.float64)
    indices = np.searchsorted(pts, times + TIME_EPSILON_SECONDS, side="right") - 1
    return np.clip(indices, 0, pts.size - 1).astype(np.int64)


def dense_indices(
    num_video_frames: int,
    *,
    num_frames: int,
    stride: int,
    num_views: int = 1,
    start_fraction: float | None = None,
) -> np.ndarray:
    """The official Vita-CLIP dense protocol on frame indices (presentation order).

    A view is ``num_frames`` frames ``stride`` apart, spanning ``seg_len = (num_frames - 1) * stride + 1`` frames.
    With ``slide = num_video_frames - seg_len``, one view starts at ``slide // 2``; ``V > 1`` views start at
    ``round(slide / (V - 1) * i)``. A video shorter than ``seg_len`` is padded by repeating its last frame.

    ``start_fraction`` in ``[0, 1)`` places one view instead (training's temporal jitter): it starts at
    ``floor(start_fraction * (slide + 1))``, so a uniform fraction gives every start in ``0 .. slide`` the same
    chance, as the official trainer's random start does.

    Returns:
        int64 ``[num_views, num_frames]`` frame indices.
    """
    _check_positive("num_video_frames", num_video_frames)
    _check_positive("num_frames", num_frames)
    _check_positive("stride", stride)
    _check_positive("num_views", num_views)
    seg_len = (num_frames - 1) * stride + 1
    slide = max(num_video_frames, seg_len) - seg_len  # padding makes a short video exactly seg_len long
    if start_fraction is not None:
        if not 0.0 <= start_fraction < 1.0:
            raise ValueError(f"start_fraction must be in [0, 1), got {start_fraction}")
        if num_views != 1:
            raise ValueError("start_fraction places a single view; num_views must be 1")
        starts = [min(slide, math.floor(start_fraction * (slide + 1)))]
    elif num_views == 1:
        starts = [slide // 2]
    else:
        starts = [round(slide / (num_views - 1) * i) for i in range(num_views)]
    offsets = np.arange(num_frames, dtype=np.int64) * stride  # [T]
    indices = np.asarray(starts, dtype=np.int64)[:, None] + offsets[None, :]  # [V, T]
    return np.minimum(indices, num_video_frames - 1)  # padding: repeat the last frame


def window_bounds(
    duration_seconds: float, *, segment_seconds: float, overlap_seconds: float = 0.0
) -> list[tuple[float, float]]:
    """Consecutive windows of ``segment_seconds`` covering ``[0, duration]``.

    Window ``k`` starts at ``k * (segment_seconds - overlap_seconds)``; the last one is cut at the end of the video
    and is the first to reach it, so no window lies wholly inside another.

    Returns:
        ``[(start_seconds, end_seconds), ...]``, at least one window.
    """
    _check_windows(duration_seconds, segment_seconds, overlap_seconds)
    step = segment_seconds - overlap_seconds
    bounds: list[tuple[float, float]] = []
    k = 0
    while True:
        start = k * step
        end = min(start + segment_seconds, duration_seconds)
        bounds.append((start, end))
        if end >= duration_seconds - TIME_EPSILON_SECONDS:
            return bounds
        k += 1


MAX_WINDOW_COUNT = 2**53
"""The most windows `window_count` counts (floats count integers exactly up to here)."""


def window_count(duration_seconds: float, *, segment_seconds: float, overlap_seconds: float = 0.0) -> int:
    """``len(window_bounds(...))``, without making the windows (a hostile file may claim a duration of days).
    Counts past ``MAX_WINDOW_COUNT`` (windows of a few picoseconds) are given as that number."""
    _check_windows(duration_seconds, segment_seconds, overlap_seconds)
    step = segment_seconds - overlap_seconds
    # Window k is the last one when k * step + segment_seconds >= duration - epsilon (as `window_bounds` stops).
    last = (duration_seconds - TIME_EPSILON_SECONDS - segment_seconds) / step  # inf for a subnormal step
    if last >= MAX_WINDOW_COUNT:
        return MAX_WINDOW_COUNT
    k = max(0, math.ceil(last))
    while k > 0 and (k - 1) * step + segment_seconds >= duration_seconds - TIME_EPSILON_SECONDS:
        k -= 1
    while k * step + segment_seconds < duration_seconds - TIME_EPSILON_SECONDS:
        k += 1
    return k + 1


def _check_windows(duration_seconds: float, segment_seconds: float, overlap_seconds: float) -> None:
    if not segment_seconds > 0.0:
        raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}")
    if not 0.0 <= overlap_seconds < segment_seconds:
        raise ValueError(f"overlap_seconds must be in [0, segment_seconds), got {overlap_seconds}")
    if not duration_seconds >= 0.0:
        raise ValueError(f"duration_seconds must be >= 0, got {duration_seconds}")


# ------------------------------------------------------------------------------------------------ sampling specs


@dataclass(frozen=True)
class Uniform:
    """One clip of the whole video: ``num_frames`` frames at the centres of equal slices of it (`uniform_times`)."""

    num_frames: int = 8

    def __post_init__(self) -> None:
        _check_positive("num_frames", self.num_frames)


@dataclass(frozen=True)
class Dense:
    """The official Vita-CLIP protocol (`dense_indices`): clips of ``num_frames`` frames ``stride`` frames apart.

    Attributes:
        num_views: Clips spread evenly over the video (the centre one alone for 1).
        start_fraction: With one view, where it starts, as a fraction in ``[0, 1)`` of the possible starts
            (training's random temporal jitter). None: the centre view.
    """

    num_frames: int = 8
    stride: int = 16
    num_views: int = 1
    start_fraction: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_frames", "stride", "num_views"):
            _check_positive(name, getattr(self, name))
        if self.start_fraction is not None:
            if self.num_views != 1:
                raise ValueError(f"start_fraction places a single view; num_views must be 1, got {self.num_views}")
            if not 0.0 <= self.start_fraction < 1.0:
                raise ValueError(f"start_fraction must be in [0, 1), got {self.start_fraction}")


@dataclass(frozen=True)
class Windows:
    """Consecutive ``segment_seconds`` windows overlapping by ``overlap_seconds`` (`window_bounds`), ``num_frames``
    uniform frames each; ``with_whole_video`` adds the `Uniform` clip of the whole video, first, from the same pass
    (frames shared by it and a window are decoded once)."""

    segment_seconds: float
    num_frames: int = 8
    overlap_seconds: float = 0.0
    with_whole_video: bool = False

    def __post_init__(self) -> None:
        _check_positive("num_frames", self.num_frames)
        if not self.segment_seconds > 0:
            raise ValueError(f"segment_seconds must be > 0, got {self.segment_seconds}")
        if not 0 <= self.overlap_seconds < self.segment_seconds:
            raise ValueError(f"overlap_seconds must be in [0, segment_seconds), got {self.overlap_seconds}")


SamplingSpec: TypeAlias = "Uniform | Dense | Windows"


def sampling_spec(
    sampling: Sampling, *, num_frames: int, stride: int = 16, num_views: int = 1, start_fraction: float | None = None
) -> Uniform | Dense:
    """The spec of a sampling named in a config (``uniform`` or ``dense``; ``stride`` and the views apply to dense)."""
    if sampling == "uniform":
        return Uniform(num_frames)
    if sampling == "dense":
        return Dense(num_frames, stride=stride, num_views=num_views, start_fraction=start_fraction)
    raise ValueError(f"sampling must be 'uniform' or 'dense', got {sampling!r}")


# ------------------------------------------------------------------------------------------------ view planning


@dataclass(frozen=True)
class Timeline:
    """Where a video's frames are, as far as the chosen index knows (ticks of ``time_base``).

    Attributes:
        start: The first frame's timestamp.
        duration: From the first frame's start to the last frame's end.
        frame_pts: int64 ``[N]`` every frame's timestamp, when every packet was demuxed (None: from the index).
        seek_points: int64 ``[K]`` keyframe timestamps, ascending.
        synthetic: Timestamps are output positions (a stream without usable timestamps).
    """

    start: int
    duration: Fraction
    frame_pts: np.ndarray | None
    seek_points: np.ndarray
    time_base: Fraction
    synthetic: bool = False


@dataclass(frozen=True)
class View:
    """One clip to make: frame ``i`` is the last one whose timestamp is ``<= thresholds[i]`` (int64 ``[T]``)."""

    thresholds: np.ndarray
    start_seconds: float
    end_seconds: float


def durations_agree(meta: Fraction, measured: Fraction, median_interval: float) -> bool:
    """Whether a container's duration and one measured from packets (ticks) agree: within two frames or 2 %."""
    return abs(float(meta - measured)) <= max(2 * median_interval, 0.02 * float(measured))


ESTIMATED_DURATION_FORMATS = frozenset({"mpeg", "nut"})
"""Formats with no duration of their own: FFmpeg's is estimated from timestamps (it ends where the last frame starts,
or earlier where MPEG-PS packets carry no timestamp). Their duration is always the demuxed packets'."""


def choose_duration(header: Header, table: PacketTable) -> Fraction:
    """Trust the container's duration when it agrees with the demuxed packets, otherwise the packets. A container
    duration that ends where the last frame starts (MPEG-PS, NUT: one frame short) is the packets' end short of that
    frame's own duration, never the video's: the packets' end it is."""
    start = int(table.pts[0])
    scanned = table.end_pts - start
    meta = header.duration_ticks
    estimated = ESTIMATED_DURATION_FORMATS.intersection(header.format_name.split(","))
    if meta is None or table.synthetic or estimated or not durations_agree(meta, scanned, table.median_interval):
        return scanned
    if ends_at_last_start(meta, scanned, int(table.pts.max()) - start, table.median_interval):
        return scanned
    return meta


def ends_at_last_start(meta: Fraction, measured: Fraction, last_start: float, median_interval: float) -> bool:
    """Whether a container's duration (ticks from the first frame) ends where the last frame starts, short of the
    end `measured` from the packets: MPEG-PS and NUT count the last frame without its own duration."""
    return meta < measured and abs(float(meta) - last_start) <= max(1.0, 0.01 * median_interval)


def _threshold(timeline: Timeline, seconds: float) -> int:
    return timeline.start + math.floor(Fraction(seconds + TIME_EPSILON_SECONDS) / timeline.time_base)


def _uniform_view(timeline: Timeline, num_frames: int, start: float, end: float) -> View:
    times = uniform_times(end - start, num_frames=num_frames, start_seconds=start)
    thresholds = np.array([_threshold(timeline, float(t)) for t in times], dtype=np.int64)
    return View(thresholds, start, end)


def clip_count(timeline: Timeline, sampling: SamplingSpec) -> tuple[int, int]:
    """``(clips, frames per clip)`` that `plan_views` makes for `sampling` on `timeline`, counted without making
    them."""
    if isinstance(sampling, Uniform):
        return 1, sampling.num_frames
    if isinstance(sampling, Dense):
        return sampling.num_views, sampling.num_frames
    if isinstance(sampling, Windows):
        windows = window_count(
            float(timeline.duration * timeline.time_base),
            segment_seconds=sampling.segment_seconds,
            overlap_seconds=sampling.overlap_seconds,
        )
        return windows + sampling.with_whole_video, sampling.num_frames
    raise TypeError(f"sampling must be Uniform, Dense or Windows, got {type(sampling).__name__}")


def plan_views(timeline: Timeline, sampling: SamplingSpec) -> list[View]:
    """The clips of `sampling` on `timeline`, in time order (the whole-video clip first with
    ``Windows.with_whole_video``). `Dense` needs every frame's timestamp (``timeline.frame_pts``)."""
    time_base = timeline.time_base
    duration_seconds = float(timeline.duration * time_base)
    if isinstance(sampling, Uniform):
        return [_uniform_view(timeline, sampling.num_frames, 0.0, duration_seconds)]
    if isinstance(sampling, Windows):
        views = (
            [_uniform_view(timeline, sampling.num_frames, 0.0, duration_seconds)] if sampling.with_whole_video else []
        )
        bounds = window_bounds(
            duration_seconds, segment_seconds=sampling.segment_seconds, overlap_seconds=sampling.overlap_seconds
        )
        return views + [_uniform_view(timeline, sampling.num_frames, start, end) for start, end in bounds]
    if not isinstance(sampling, Dense):
        raise TypeError(f"sampling must be Uniform, Dense or Windows, got {type(sampling).__name__}")
    if timeline.frame_pts is None:
        raise ValueError("dense sampling needs every frame's timestamp (a demuxed timeline)")
    frame_pts = timeline.frame_pts
    all_views = dense_indices(
        frame_pts.size,
        num_frames=sampling.num_frames,
        stride=sampling.stride,
        num_views=sampling.num_views,
        start_fraction=sampling.start_fraction,
    )
    views = []
    for indices in all_views:
        thresholds = frame_pts[indices]  # [T] exact timestamps
        start = float((int(thresholds[0]) - timeline.start) * time_base)
        last = int(indices[-1])
        end_ticks = int(frame_pts[last + 1]) if last + 1 < frame_pts.size else timeline.start + timeline.duration
        views.append(View(thresholds, start, float((end_ticks - timeline.start) * time_base)))
    return views

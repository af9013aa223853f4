"""Frame sampling as pure functions of durations, timestamps and frame counts.

Everything works on presentation timestamps, so variable-frame-rate videos sample the frame that is actually on
screen at a given time. Times are seconds from the first frame.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

__all__ = [
    "TIME_EPSILON_SECONDS",
    "Sampling",
    "dense_indices",
    "frame_indices_at",
    "uniform_times",
    "window_bounds",
]

Sampling = Literal["uniform", "dense", "windows"]

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
    if not segment_seconds > 0.0:
        raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}")
    if not 0.0 <= overlap_seconds < segment_seconds:
        raise ValueError(f"overlap_seconds must be in [0, segment_seconds), got {overlap_seconds}")
    if not duration_seconds >= 0.0:
        raise ValueError(f"duration_seconds must be >= 0, got {duration_seconds}")
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

"""Decoding only the frames a clip needs.

The plan: learn every packet's timestamp by demuxing (no decoding), or, for file-like sources read over the network,
take keyframe positions from the container's own index so that only the needed stretches are read. Sampling maps to
"the last frame whose timestamp is <= t" thresholds. Thresholds are grouped by the keyframe they follow; for each
group the decoder seeks (FFmpeg lands on the last keyframe at or before the first target) and decodes forward,
stopping at the group's last target. Packets are demuxed a little ahead of the decoder, which tells it (decode
timestamps only grow) when a target is settled, lets it jump to a later keyframe without decoding the packets in
between, and lets it skip non-reference frames that cannot be a target. Only targets are converted to RGB, at the
output size. Streams whose timestamps cannot be trusted are decoded in one pass, frames numbered as they come out.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import av
import av.error
import numpy as np
from av.packet import Packet
from av.video.frame import VideoFrame

from vitaclip.video._container import (
    Deadline,
    DeadlineExceeded,
    Header,
    OpenedVideo,
    PacketTable,
    VideoSource,
    keyframe_index,
    open_video,
    scan_packets,
)
from vitaclip.video.errors import DecodeErrorReason, VideoDecodeError
from vitaclip.video.sampling import (
    TIME_EPSILON_SECONDS,
    Sampling,
    dense_indices,
    uniform_times,
    window_bounds,
)
from vitaclip.video.transforms import frame_to_rgb

__all__ = ["DEFAULT_MAX_PIXELS", "Clip", "DecodeStats", "decode_clip", "decode_clips"]

DEFAULT_MAX_PIXELS = 8192 * 4320
"""Largest picture (width * height) decoded by default: DCI 8K."""

# Decoders whose skip_frame="NONREF" is known to drop only frames nothing else refers to, switchable per packet.
_NONREF_SKIP_CODECS = frozenset({"h264", "hevc", "mpeg4", "mpeg2video", "mpeg1video"})
_LOOKAHEAD_BYTES = 32 << 20  # compressed bytes demuxed ahead of the decoder before it must start
_MAX_RETREATS = 16  # then seeking is given up for one pass from the start
SkipMode = Literal["DEFAULT", "NONREF"]


@dataclass(frozen=True, eq=False)
class Clip:
    """Frames sampled from one video (one view or window).

    Attributes:
        frames: uint8 ``[T, size, size, 3]`` RGB, upright (rotation metadata applied).
        pts_seconds: float64 ``[T]`` timestamps of the returned frames, in seconds from the first frame.
        start_seconds: Start of the span the frames were sampled from (a window's start for ``windows``).
        end_seconds: End of that span.
    """

    frames: np.ndarray
    pts_seconds: np.ndarray
    start_seconds: float
    end_seconds: float


@dataclass(frozen=True)
class _Timeline:
    """Where frames are, as far as the chosen index knows."""

    start: int  # ticks of the first frame
    duration: Fraction  # ticks
    frame_pts: np.ndarray | None  # [N] int64 when every packet was demuxed
    seek_points: np.ndarray  # [K] int64 keyframe timestamps, ascending
    time_base: Fraction
    synthetic: bool = False  # timestamps are output positions (stream without timestamps)


@dataclass(frozen=True)
class _View:
    thresholds: np.ndarray  # [T] int64: frame i is the last one with pts <= thresholds[i]
    start_seconds: float
    end_seconds: float


@dataclass
class DecodeStats:
    """Counters filled in by ``decode_clips(..., stats=DecodeStats())``, for tests and benchmarks.

    Attributes:
        index: ``demux`` when every packet was demuxed first, ``container`` when the container's seek index was used.
        seeks: Seeks performed.
        packets_decoded: Packets sent to the decoder.
        packets_nonref_skippable: Of those, packets sent with ``skip_frame="NONREF"`` (non-reference ones are dropped).
        frames_decoded: Frames the decoder returned.
        frames_converted: Frames scaled and converted to RGB (the distinct frames returned).
        sequential_fallback: Whether seeking was abandoned for one pass from the start.
    """

    index: str = ""
    seeks: int = 0
    packets_decoded: int = 0
    packets_nonref_skippable: int = 0
    frames_decoded: int = 0
    frames_converted: int = 0
    sequential_fallback: bool = False


class _Overshoot(Exception):
    """A seek landed past the target: on a later keyframe (``pts``), or at the end of the stream (``pts`` None)."""

    def __init__(self, pts: int | None, dts: int | None) -> None:
        super().__init__(pts)
        self.pts = pts
        self.dts = dts


class _SeekUnreliable(Exception):
    pass


class _TimestampsUnreliable(Exception):
    pass


def choose_duration(header: Header, table: PacketTable) -> Fraction:
    """Trust the container's duration when it agrees with the demuxed packets, otherwise the packets."""
    start = int(table.pts[0])
    scanned = table.end_pts - start
    meta = header.duration_ticks
    if meta is not None and not table.synthetic:
        tolerance = max(2 * table.median_interval, 0.02 * float(scanned))
        if abs(float(meta - scanned)) <= tolerance:
            return meta
    return scanned


def _timeline_from_scan(header: Header, table: PacketTable) -> _Timeline:
    return _Timeline(
        start=int(table.pts[0]),
        duration=choose_duration(header, table),
        frame_pts=table.pts,
        seek_points=table.keyframe_pts,
        time_base=table.time_base,
        synthetic=table.synthetic,
    )


def _first_keyframe_pts(opened: OpenedVideo, start_pts: int) -> int | None:
    opened.container.seek(start_pts, stream=opened.stream, backward=True)
    for n, packet in enumerate(opened.container.demux(opened.stream)):
        if n >= 64 or packet.size == 0:
            break
        if packet.is_keyframe:
            return packet.pts if packet.pts is not None else packet.dts
    return None


# Demuxers whose seek index comes from the file's own index (MP4/MOV moov, Matroska cues, AVI idx1, ASF). Others,
# MPEG-TS and MPEG-PS among them, fill the index only with what they have read so far (and may flag any packet as a
# keyframe): their frames are found by a demux scan instead.
_INDEXED_DEMUXERS = frozenset({"mov", "mp4", "matroska", "webm", "avi", "asf"})


def _timeline_from_index(opened: OpenedVideo) -> _Timeline | None:
    header = opened.header
    if not _INDEXED_DEMUXERS.intersection(opened.container.format.name.split(",")):
        return None
    if header.duration_ticks is None or header.start_pts is None:
        return None
    try:
        # The first keyframe's own timestamp, not the header's start (AVI's can be a frame off); the seek also makes
        # Matroska load its cues.
        start = _first_keyframe_pts(opened, header.start_pts)
    except av.error.FFmpegError:
        return None
    index = keyframe_index(opened.stream, has_dts=header.index_has_dts)
    if start is None or index is None:
        return None
    return _Timeline(
        start=start,
        duration=header.duration_ticks,
        frame_pts=None,
        seek_points=index[0],
        time_base=header.time_base,
    )


def _threshold(timeline: _Timeline, seconds: float) -> int:
    return timeline.start + math.floor(Fraction(seconds + TIME_EPSILON_SECONDS) / timeline.time_base)


def _plan_views(
    timeline: _Timeline,
    *,
    sampling: Sampling,
    num_frames: int,
    stride: int,
    num_views: int,
    segment_seconds: float | None,
    overlap_seconds: float,
    with_whole_video: bool = False,
    start_fraction: float | None = None,
) -> list[_View]:
    time_base = timeline.time_base
    duration_seconds = float(timeline.duration * time_base)

    def uniform_view() -> _View:
        times = uniform_times(duration_seconds, num_frames=num_frames)
        thresholds = np.array([_threshold(timeline, float(t)) for t in times], dtype=np.int64)
        return _View(thresholds, 0.0, duration_seconds)

    if sampling == "uniform":
        return [uniform_view()]
    if sampling == "windows":
        assert segment_seconds is not None
        views = [uniform_view()] if with_whole_video else []
        for start, end in window_bounds(
            duration_seconds, segment_seconds=segment_seconds, overlap_seconds=overlap_seconds
        ):
            times = uniform_times(end - start, num_frames=num_frames, start_seconds=start)
            thresholds = np.array([_threshold(timeline, float(t)) for t in times], dtype=np.int64)
            views.append(_View(thresholds, start, end))
        return views
    assert timeline.frame_pts is not None, "dense sampling needs every frame's timestamp"
    frame_pts = timeline.frame_pts
    views = []
    all_views = dense_indices(
        frame_pts.size, num_frames=num_frames, stride=stride, num_views=num_views, start_fraction=start_fraction
    )
    for indices in all_views:
        thresholds = frame_pts[indices]  # [T] exact timestamps
        start = float((int(thresholds[0]) - timeline.start) * time_base)
        last = int(indices[-1])
        end_ticks = int(frame_pts[last + 1]) if last + 1 < frame_pts.size else timeline.start + timeline.duration
        views.append(_View(thresholds, start, float((end_ticks - timeline.start) * time_base)))
    return views


def _group_by_keyframe(thresholds: list[int], seek_points: np.ndarray) -> list[tuple[int | None, list[int]]]:
    """Targets that follow the same keyframe share one seek."""
    if seek_points.size == 0:
        return [(None, thresholds)]
    groups: dict[int, list[int]] = {}
    for t in thresholds:
        k = max(0, int(np.searchsorted(seek_points, t, side="right")) - 1)
        groups.setdefault(int(seek_points[k]), []).append(t)
    return sorted(groups.items())


class _Collector:
    """Decodes the frames answering sorted thresholds, keeping at most one decoded frame besides the results."""

    def __init__(
        self,
        opened: OpenedVideo,
        *,
        deadline: Deadline,
        size: int,
        max_pixels: int,
        stats: DecodeStats,
        trust_keyframes: bool = True,
        number_frames: bool = False,
        start_pts: int | None = None,
        square: bool = True,
    ) -> None:
        self._square = square
        self._container = opened.container
        self._start_pts = start_pts  # the stream's first timestamp: no keyframe lies before it
        self._second_ticks = max(1, int(1 / opened.header.time_base))
        self._stream = opened.stream
        self._ctx = opened.stream.codec_context
        self._sar = opened.header.sample_aspect_ratio
        self._deadline = deadline
        self._size = size
        self._max_pixels = max_pixels
        self._trust_keyframes = trust_keyframes
        # Streams without timestamps: a frame's time is its position in the output (one pass from the start).
        self._number_frames = number_frames
        self._output_position = 0
        self._allow_skip = trust_keyframes and opened.header.codec in _NONREF_SKIP_CODECS
        self._skip_mode: SkipMode = "DEFAULT"
        self._pending: list[int] = []
        self._head = 0
        self._results: dict[int, tuple[int, np.ndarray] | None] = {}
        self._converted: dict[int, np.ndarray] = {}
        self._seek_target = 0
        self._retreats = 0
        self._stats = stats
        self.decode_errors = 0
        self._reset_region(None)

    # Region state: everything learnt since the last seek (or since the start).
    def _reset_region(self, packets: Iterator[Packet] | None) -> None:
        self._packets = packets
        self._lookahead: deque[Packet] = deque()
        self._lookahead_bytes = 0
        self._seen: list[int] = []  # pts of demuxed packets at or after the region's keyframe, sorted
        self._max_dts: int | None = None
        self._frontier: int | None = None
        self._latest: VideoFrame | None = None
        self._latest_pts = 0
        self._region_kf: int | None = None
        self._fed = False
        self._eof = False
        self._flushed = False
        self._may_retreat = False

    def run(self, groups: list[tuple[int | None, list[int]]]) -> dict[int, tuple[int, np.ndarray] | None]:
        self._pending = sorted({t for _, ths in groups for t in ths})
        self._head = 0
        for keyframe, thresholds in groups:
            last = max(thresholds)
            if self._head >= len(self._pending) or self._pending[self._head] > last:
                continue
            if keyframe is None:
                if self._packets is None:
                    self._reset_region(self._container.demux(self._stream))
            elif not (
                self._packets is not None
                and not self._eof
                and self._frontier is not None
                and keyframe <= self._frontier
            ):
                # Demuxing has not reached this group's keyframe: seek. The target is the first frame time itself, so
                # FFmpeg picks the last keyframe shown at or before it (MP4 indexes hold decode times, which are
                # earlier than display times and would land one keyframe early).
                self._retreats = 0
                self._seek(self._pending[self._head], may_retreat=True)
            while self._head < len(self._pending) and self._pending[self._head] <= last:
                try:
                    self._step()
                except _Overshoot as overshoot:
                    self._retreat(overshoot)
        return self._results

    def _seek(self, target: int, *, may_retreat: bool) -> None:
        try:
            self._container.seek(target, stream=self._stream, backward=True)
        except av.error.FFmpegError as e:
            raise _SeekUnreliable(str(e)) from None
        self._stats.seeks += 1
        self._reset_region(self._container.demux(self._stream))
        self._seek_target = target
        self._may_retreat = may_retreat

    def _retreat(self, overshoot: _Overshoot) -> None:
        # The seek landed on a keyframe after the first target: step back and try again. First just before that
        # keyframe's decode time (MP4 indexes hold decode times); then, for demuxers whose seeks land on any packet
        # (MPEG-TS/PS search by timestamp, not by keyframe), twice as far back each time.
        self._retreats += 1
        if self._retreats > _MAX_RETREATS:
            raise _SeekUnreliable(f"seeks kept landing after the target ({_MAX_RETREATS} retreats)")
        landed = overshoot.dts if overshoot.dts is not None else overshoot.pts
        earlier = landed - 1 if landed is not None else self._seek_target
        if self._retreats > 1 or earlier >= self._seek_target:
            past = overshoot.pts - self._seek_target if overshoot.pts is not None else 0
            step = max(past, self._second_ticks)
            earlier = min(earlier, self._seek_target - step * 2 ** max(0, self._retreats - 2))
        if self._start_pts is not None and earlier < self._start_pts:
            # Back before the start: a keyframe after the target is the stream's first; earlier targets get its frame.
            self._seek(earlier, may_retreat=False)
        else:
            self._seek(earlier, may_retreat=True)

    def _witnessed(self, t: int) -> bool:
        """No packet still to be demuxed can show a frame at or before ``t`` (decode timestamps only grow)."""
        return self._eof or (self._max_dts is not None and self._max_dts > t)

    def _step(self) -> None:
        self._deadline.check()
        t = self._pending[self._head]
        if self._latest is not None and self._latest_pts <= t and self._witnessed(t):
            i = bisect.bisect_right(self._seen, t)
            if i > 0 and self._seen[i - 1] == self._latest_pts:
                self._finalize(t, self._latest, self._latest_pts)
                return
        if not self._eof and (
            not self._lookahead or (not self._witnessed(t) and self._lookahead_bytes < _LOOKAHEAD_BYTES)
        ):
            self._pull(t)
        elif self._lookahead:
            self._feed(self._lookahead.popleft())
        elif not self._flushed:
            self._flush()
        else:
            self._finalize(t, self._latest, self._latest_pts)  # after the last frame (or none decoded here)

    def _pull(self, t: int) -> None:
        assert self._packets is not None
        try:
            packet = next(self._packets)
        except StopIteration:
            self._end_of_stream()
            return
        except av.error.FFmpegError:
            self._check_timeout()
            self._end_of_stream()  # a damaged tail ends the stream here
            return
        if packet.size == 0:  # PyAV's end-of-stream marker
            self._end_of_stream()
            return
        pts = packet.pts if packet.pts is not None else packet.dts
        if self._number_frames or (pts is None and not self._trust_keyframes):
            # Packet timestamps are meaningless (or absent) here: decode everything, output order decides.
            self._lookahead.append(packet)
            self._lookahead_bytes += packet.size
            return
        if pts is None:
            return
        if self._region_kf is None:
            if self._trust_keyframes and not packet.is_keyframe:
                return  # cannot decode before the first keyframe
            if self._may_retreat and pts > t:
                raise _Overshoot(pts, packet.dts)
            self._region_kf = pts
        elif self._trust_keyframes and packet.is_keyframe and self._region_kf < pts <= t:
            # A later keyframe still at or before the next target: start there, never decoding what lies between.
            if self._fed:
                self._ctx.flush_buffers()
            self._lookahead.clear()
            self._lookahead_bytes = 0
            self._seen.clear()
            self._latest = None
            self._fed = False
            self._region_kf = pts
        self._lookahead.append(packet)
        self._lookahead_bytes += packet.size
        if pts >= self._region_kf:
            bisect.insort(self._seen, pts)
        if packet.dts is not None and (self._max_dts is None or packet.dts > self._max_dts):
            self._max_dts = packet.dts
        if self._frontier is None or pts > self._frontier:
            self._frontier = pts

    def _end_of_stream(self) -> None:
        if self._may_retreat and self._region_kf is None:
            raise _Overshoot(None, None)  # the seek went past the last keyframe before the target
        self._eof = True

    def _cannot_be_target(self, pts: int) -> bool:
        """True when a later-shown frame is known to come at or before the next target at or after ``pts``."""
        j = bisect.bisect_left(self._pending, pts, lo=self._head)
        if j == len(self._pending):
            return True
        i = bisect.bisect_right(self._seen, pts)
        return i < len(self._seen) and self._seen[i] <= self._pending[j]

    def _feed(self, packet: Packet) -> None:
        if self._allow_skip:
            pts = packet.pts if packet.pts is not None else packet.dts
            skip = not packet.is_keyframe and pts is not None and self._cannot_be_target(pts)
            mode: SkipMode = "NONREF" if skip else "DEFAULT"
            if mode != self._skip_mode:
                self._ctx.skip_frame = mode
                self._skip_mode = mode
            self._stats.packets_nonref_skippable += skip
        self._stats.packets_decoded += 1
        self._fed = True
        try:
            frames = self._stream.decode(packet)
        except av.error.FFmpegError:
            self._check_timeout()
            self.decode_errors += 1
            return
        for frame in frames:
            self._on_frame(frame)

    def _flush(self) -> None:
        self._flushed = True
        if not self._fed:
            return
        try:
            frames = self._stream.decode(None)
        except av.error.FFmpegError:
            self._check_timeout()
            self.decode_errors += 1
            return
        for frame in frames:
            self._on_frame(frame)

    def _check_timeout(self) -> None:
        # PyAV's own timeout surfaces as an FFmpeg error; report it as ours.
        if self._deadline.remaining() <= 0:
            raise DeadlineExceeded(f"gave up after {self._deadline.timeout_seconds:g} s")

    def _on_frame(self, frame: VideoFrame) -> None:
        self._deadline.check()
        pts = self._output_position if self._number_frames else frame.pts
        self._output_position += 1
        if pts is None:
            return
        if frame.width * frame.height > self._max_pixels:
            raise VideoDecodeError(
                "too_large", f"decoded a {frame.width}x{frame.height} picture (max {self._max_pixels})"
            )
        self._stats.frames_decoded += 1
        if self._region_kf is not None and pts < self._region_kf:
            return  # a leading picture of an open GOP, shown before the keyframe we started from
        if self._latest is not None and pts <= self._latest_pts:
            if self._trust_keyframes and pts < self._latest_pts:
                raise _TimestampsUnreliable(f"frame at {pts} came out after {self._latest_pts}")
            return  # a repeated or out-of-order timestamp in a plain pass: keep the first
        # Frames come out in presentation order: every target before this frame is answered by the previous one.
        while self._head < len(self._pending) and self._pending[self._head] < pts:
            if self._latest is not None:
                self._finalize(self._pending[self._head], self._latest, self._latest_pts)
            else:
                self._finalize(self._pending[self._head], frame, pts)
        self._latest = frame
        self._latest_pts = pts

    def _finalize(self, t: int, frame: VideoFrame | None, pts: int) -> None:
        assert self._pending[self._head] == t
        self._head += 1
        if frame is None:
            self._results[t] = None
            return
        rgb = self._converted.get(pts)
        if rgb is None:
            rgb = frame_to_rgb(frame, size=self._size, sample_aspect_ratio=self._sar, square=self._square)
            self._converted[pts] = rgb
            self._stats.frames_converted += 1
        self._results[t] = (pts, rgb)


def _check_options(
    *,
    num_frames: int,
    size: int,
    sampling: str,
    stride: int,
    num_views: int,
    segment_seconds: float | None,
    overlap_seconds: float,
    num_threads: int,
    timeout_seconds: float,
    max_pixels: int,
    with_whole_video: bool = False,
    start_fraction: float | None = None,
) -> None:
    if with_whole_video and sampling != "windows":
        raise ValueError(f"with_whole_video only applies to sampling='windows', got sampling={sampling!r}")
    if start_fraction is not None:
        if sampling != "dense" or num_views != 1:
            raise ValueError("start_fraction applies to sampling='dense' with num_views=1")
        if not 0.0 <= start_fraction < 1.0:
            raise ValueError(f"start_fraction must be in [0, 1), got {start_fraction}")
    if sampling not in ("uniform", "dense", "windows"):
        raise ValueError(f"sampling must be 'uniform', 'dense' or 'windows', got {sampling!r}")
    for name, value in (("num_frames", num_frames), ("stride", stride), ("num_views", num_views)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 1 <= size <= 4096:
        raise ValueError(f"size must be in [1, 4096], got {size}")
    if not 1 <= num_threads <= 64:
        raise ValueError(f"num_threads must be in [1, 64], got {num_threads}")
    if not timeout_seconds > 0:
        raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if sampling == "windows":
        if segment_seconds is None or not segment_seconds > 0:
            raise ValueError(f"sampling='windows' needs segment_seconds > 0, got {segment_seconds}")
        if not 0 <= overlap_seconds < segment_seconds:
            raise ValueError(f"overlap_seconds must be in [0, segment_seconds), got {overlap_seconds}")
    elif segment_seconds is not None:
        raise ValueError(f"segment_seconds only applies to sampling='windows', got sampling={sampling!r}")
    if num_views != 1 and sampling != "dense":
        raise ValueError(f"num_views only applies to sampling='dense', got sampling={sampling!r}")


def _numbered_timeline(header: Header, table: PacketTable) -> _Timeline:
    """Frames numbered in output order at the nominal rate, for streams whose timestamps cannot be trusted."""
    count = int(table.pts.size)
    if table.synthetic:
        fps = 1 / table.time_base
    elif header.average_fps:
        fps = Fraction(header.average_fps).limit_denominator(1001)
    else:
        seconds = float((table.end_pts - int(table.pts[0])) * table.time_base)
        fps = Fraction(count / seconds if seconds > 0 else 25).limit_denominator(1001)
    return _Timeline(
        start=0,
        duration=Fraction(count),
        frame_pts=np.arange(count, dtype=np.int64),
        seek_points=np.zeros(0, dtype=np.int64),
        time_base=1 / fps,
        synthetic=True,
    )


def _collect(
    source: VideoSource,
    *,
    deadline: Deadline,
    size: int,
    max_pixels: int,
    num_threads: int,
    plan: dict[str, Any],
    stats: DecodeStats,
    square: bool = True,
) -> list[Clip]:
    def open_source() -> AbstractContextManager[OpenedVideo]:
        return open_video(source, deadline=deadline, max_pixels=max_pixels, num_threads=num_threads)

    def collector(opened: OpenedVideo, **options: Any) -> _Collector:
        return _Collector(
            opened, deadline=deadline, size=size, max_pixels=max_pixels, stats=stats, square=square, **options
        )

    results: dict[int, tuple[int, np.ndarray] | None] | None = None
    with open_source() as opened:
        timeline = None
        if opened.is_file_like and plan["sampling"] != "dense":
            # Remote reads are what costs here: take keyframes from the container's index and read only what is needed.
            timeline = _timeline_from_index(opened)
            if timeline is not None:
                stats.index = "container"
        if timeline is None:
            table = scan_packets(opened, deadline=deadline)
            timeline = (
                _numbered_timeline(opened.header, table)
                if table.synthetic
                else _timeline_from_scan(opened.header, table)
            )
            stats.index = "demux"
        views = _plan_views(timeline, **plan)
        thresholds = sorted({int(t) for view in views for t in view.thresholds})
        if not timeline.synthetic:
            try:
                seeking = collector(opened, start_pts=timeline.start)
                results = seeking.run(_group_by_keyframe(thresholds, timeline.seek_points))
            except _SeekUnreliable:
                results = None
            except _TimestampsUnreliable:
                # Frames came out of order (for example B-frames in AVI, which stores no presentation times): number
                # the frames as the decoder shows them instead.
                with open_source() as rescan:
                    timeline = _numbered_timeline(rescan.header, scan_packets(rescan, deadline=deadline))
                views = _plan_views(timeline, **plan)
                thresholds = sorted({int(t) for view in views for t in view.thresholds})
                results = None
    if results is None or all(r is None for r in results.values()):
        # No usable timestamps, seeking failed, or keyframe flags led nowhere: one plain pass from the start.
        stats.sequential_fallback = True
        with open_source() as opened:
            options = {"trust_keyframes": False, "number_frames": timeline.synthetic}
            results = collector(opened, **options).run([(None, thresholds)])
    return _assemble(views, results, timeline)


def _assemble(
    views: list[_View],
    results: dict[int, tuple[int, np.ndarray] | None],
    timeline: _Timeline,
) -> list[Clip]:
    found = sorted((t, r) for t, r in results.items() if r is not None)
    if not found:
        raise VideoDecodeError("corrupt", "no frame could be decoded")
    found_thresholds = [t for t, _ in found]
    clips = []
    for view in views:
        chosen = []
        for t in view.thresholds:
            result = results.get(int(t))
            if result is None:
                # Nothing decodable near this target (damaged data): use the nearest target that decoded.
                k = bisect.bisect_left(found_thresholds, int(t))
                candidates = [c for c in (k - 1, k) if 0 <= c < len(found)]
                nearest = min(candidates, key=lambda c: abs(found_thresholds[c] - int(t)))
                result = found[nearest][1]
            chosen.append(result)
        frames = np.stack([rgb for _, rgb in chosen])  # [T, size, size, 3]
        pts_seconds = np.array(
            [float((pts - timeline.start) * timeline.time_base) for pts, _ in chosen], dtype=np.float64
        )
        clips.append(Clip(frames, pts_seconds, view.start_seconds, view.end_seconds))
    return clips


def decode_clips(
    source: VideoSource,
    *,
    num_frames: int = 8,
    size: int = 224,
    sampling: Sampling = "uniform",
    stride: int = 16,
    num_views: int = 1,
    segment_seconds: float | None = None,
    overlap_seconds: float = 0.0,
    num_threads: int = 1,
    timeout_seconds: float = 60.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    stats: DecodeStats | None = None,
    with_whole_video: bool = False,
    start_fraction: float | None = None,
    square: bool = True,
) -> list[Clip]:
    """Decode every clip a sampling asks for (several dense views or windows), decoding each frame once.

    Args:
        source: Local path, encoded bytes, or a seekable binary file-like object (read with ranged reads).
        num_frames: Frames per clip (T).
        size: Output side: the shorter side is scaled to it, then the centre square is cropped.
        sampling: ``uniform`` (T frames at the centres of T equal slices of the video), ``dense`` (the official
            Vita-CLIP protocol: T frames ``stride`` frames apart, ``num_views`` views spread evenly) or ``windows``
            (consecutive ``segment_seconds`` windows overlapping by ``overlap_seconds``, T uniform frames each).
        stride: Frame stride for ``dense``.
        num_views: Number of views for ``dense``.
        segment_seconds: Window length for ``windows``.
        overlap_seconds: Overlap between consecutive windows.
        num_threads: Decoder threads; 1 suits one decoder per core.
        timeout_seconds: Time limit for this video, checked between reads, packets and frames.
        max_pixels: Pictures larger than this (width * height) are refused before decoding.
        stats: Optional counters to fill in (what was demuxed, decoded and converted).
        with_whole_video: With ``windows``, also return the ``uniform`` clip of the whole video, first, from the same
            pass (frames shared by the whole clip and a window are decoded once).
        start_fraction: With ``dense`` and one view, where the view starts, as a fraction in ``[0, 1)`` of the
            possible starts (training's random temporal jitter; see ``dense_indices``). None: the centre view.
        square: Centre-crop a ``size`` square (default). False keeps the whole picture with its shorter side
            ``size`` (frames ``[T, H, W, 3]``), for crops taken elsewhere (several spatial views).

    Returns:
        One ``Clip`` per view or window, in time order (after the whole-video clip with ``with_whole_video``).

    Raises:
        VideoDecodeError: the input is not a decodable video, is too large, or took too long.
        ValueError: an option is out of range, or a file-like source cannot seek.
        FileNotFoundError: a path that does not exist. Errors raised by a file-like source's own ``read`` (network
            failures) also propagate unchanged, so callers can retry them.

    Paths and bytes are demuxed whole first (cheap, no decoding) for exact timestamps. File-like objects are taken
    to be remote: for ``uniform`` and ``windows`` only the container's index and the stretches around the targets
    are read; ``dense`` counts frames, so it reads the whole file.
    """
    _check_options(
        num_frames=num_frames,
        size=size,
        sampling=sampling,
        stride=stride,
        num_views=num_views,
        segment_seconds=segment_seconds,
        overlap_seconds=overlap_seconds,
        num_threads=num_threads,
        timeout_seconds=timeout_seconds,
        max_pixels=max_pixels,
        with_whole_video=with_whole_video,
        start_fraction=start_fraction,
    )
    deadline = Deadline(timeout_seconds)
    try:
        return _collect(
            source,
            deadline=deadline,
            size=size,
            max_pixels=max_pixels,
            num_threads=num_threads,
            plan={
                "sampling": sampling,
                "num_frames": num_frames,
                "stride": stride,
                "num_views": num_views,
                "segment_seconds": segment_seconds,
                "overlap_seconds": overlap_seconds,
                "with_whole_video": with_whole_video,
                "start_fraction": start_fraction,
            },
            stats=stats if stats is not None else DecodeStats(),
            square=square,
        )
    except DeadlineExceeded as e:
        raise VideoDecodeError("timeout", str(e)) from None
    except FileNotFoundError:
        raise
    except av.error.FFmpegError as e:
        # Anything FFmpeg still reports (a failed conversion, an interrupted call) is a property of this input.
        reason: DecodeErrorReason = "timeout" if deadline.remaining() <= 0 else "corrupt"
        raise VideoDecodeError(reason, f"FFmpeg: {e}") from None


def decode_clip(
    source: VideoSource,
    *,
    num_frames: int = 8,
    size: int = 224,
    sampling: Sampling = "uniform",
    stride: int = 16,
    num_views: int = 1,
    segment_seconds: float | None = None,
    overlap_seconds: float = 0.0,
    num_threads: int = 1,
    timeout_seconds: float = 60.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    stats: DecodeStats | None = None,
    start_fraction: float | None = None,
    square: bool = True,
) -> Clip:
    """Decode one clip of ``num_frames`` frames; see ``decode_clips`` for the options.

    Only samplings that yield exactly one clip are allowed here: ``uniform``, or ``dense`` with ``num_views=1``.
    Use ``decode_clips`` for several views or for windows.

    Returns:
        ``Clip`` with ``frames`` uint8 ``[T, size, size, 3]`` and ``pts_seconds`` ``[T]``.
    """
    if sampling == "windows" or num_views != 1:
        raise ValueError("decode_clip returns one clip; use decode_clips for several views or windows")
    (clip,) = decode_clips(
        source,
        num_frames=num_frames,
        size=size,
        sampling=sampling,
        stride=stride,
        num_views=num_views,
        segment_seconds=segment_seconds,
        overlap_seconds=overlap_seconds,
        num_threads=num_threads,
        timeout_seconds=timeout_seconds,
        max_pixels=max_pixels,
        stats=stats,
        start_fraction=start_fraction,
        square=square,
    )
    return clip

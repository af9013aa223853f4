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
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Literal, TypeVar

import av
import av.error
import numpy as np
from av.packet import Packet
from av.video.frame import VideoFrame

from vitaclip.video._container import (
    DAMAGED_INDEX,
    DEFAULT_MAX_PIXELS,
    NO_PACKETS,
    Deadline,
    DeadlineExceeded,
    Header,
    OpenedVideo,
    PacketTable,
    VideoSource,
    as_decode_errors,
    check_container_duration,
    cut_short,
    keyframe_index,
    open_video,
    scan_packets,
    video_packets,
    whole_iso_bmff,
)
from vitaclip.video.errors import VideoDecodeError
from vitaclip.video.sampling import (
    Dense,
    SamplingSpec,
    Timeline,
    Uniform,
    View,
    Windows,
    choose_duration,
    clip_count,
    plan_views,
)
from vitaclip.video.transforms import display_rotation, frame_to_rgb, resized_size

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_PIXELS",
    "Clip",
    "Crop",
    "DecodeStats",
    "VideoDecoder",
    "closing_source",
    "decode_clip",
    "decode_clips",
    "decode_or_error",
]


# Decoders whose skip_frame="NONREF" is known to drop only frames nothing else refers to, switchable per packet.
_NONREF_SKIP_CODECS = frozenset({"h264", "hevc", "mpeg4", "mpeg2video", "mpeg1video"})
_LOOKAHEAD_BYTES = 32 << 20  # compressed bytes demuxed ahead of the decoder before it must start
_MAX_RETREATS = 16  # then seeking is given up for one pass from the start
# Pictures are scaled with their shorter side to the output size before the crop: a thin one (8 x 20000) would be
# hundreds of MB per frame. Displayed aspect ratios beyond this are refused.
MAX_ASPECT_RATIO = 16
SkipMode = Literal["DEFAULT", "NONREF"]
_T = TypeVar("_T")

DEFAULT_MAX_FRAME_BYTES = 2 << 30
"""Most bytes of frames one decode may return (all its clips): 1,783 clips of 8 frames at 224 px, 59 minutes of 2 s
windows."""


_NO_FRAME = "no frame could be decoded"


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
        rotation: Degrees counter-clockwise the converted frames were turned for display (None before any).
    """

    index: str = ""
    seeks: int = 0
    packets_decoded: int = 0
    packets_nonref_skippable: int = 0
    frames_decoded: int = 0
    frames_converted: int = 0
    sequential_fallback: bool = False
    rotation: int | None = None


class _Overshoot(Exception):
    """A seek landed past the target: on a later keyframe (``pts``), or at the end of the stream (``pts`` None)."""

    def __init__(self, pts: int | None, dts: int | None) -> None:
        super().__init__(pts)
        self.pts = pts
        self.dts = dts


_INTER_PICTURES = frozenset({2, 3, 4, 6})  # AVPictureType P, B, S (global motion) and SP: decoded from others


class _SeekUnreliable(Exception):
    pass


class _TimestampsUnreliable(Exception):
    pass


def _timeline_from_scan(header: Header, table: PacketTable) -> Timeline:
    return Timeline(
        start=int(table.pts[0]),
        duration=choose_duration(header, table),
        frame_pts=table.pts,
        seek_points=table.keyframe_pts,
        time_base=table.time_base,
        synthetic=table.synthetic,
    )


def _first_keyframe_pts(opened: OpenedVideo, start_pts: int) -> int | None:
    """The first keyframe's timestamp; when an MP4 edit list cuts it (discarded packets), the first shown frame's."""
    opened.container.seek(start_pts, stream=opened.stream, backward=True)
    keyframe: int | None = None
    shown: list[int] = []
    for n, packet in enumerate(video_packets(opened.container, opened.stream)):
        if n >= 64 or packet.size == 0:
            break
        pts = packet.pts if packet.pts is not None else packet.dts
        if keyframe is None:
            if not packet.is_keyframe:
                continue
            if not packet.is_discard:
                return pts
            keyframe = pts
        elif packet.is_keyframe:
            break  # the next group of pictures: the first shown frame lies before it
        if pts is not None and not packet.is_discard:
            shown.append(pts)
    return min(shown) if shown else None


# Demuxers whose seek index comes from the file's own index (MP4/MOV moov, Matroska cues, AVI idx1, ASF). Others,
# MPEG-TS and MPEG-PS among them, fill the index only with what they have read so far (and may flag any packet as a
# keyframe): their frames are found by a demux scan instead.
_INDEXED_DEMUXERS = frozenset({"mov", "mp4", "matroska", "webm", "avi", "asf"})


def _timeline_from_index(opened: OpenedVideo, deadline: Deadline) -> Timeline | None:
    if not _INDEXED_DEMUXERS.intersection(opened.container.format.name.split(",")):
        return None
    if opened.header.index_past_end:
        return None  # the index lists frames the input does not hold (a cut-off upload): find those it does
    start_pts = opened.header.start_pts
    if opened.header.duration_ticks is None or start_pts is None:
        return None
    try:
        check_container_duration(opened, deadline=deadline)
        # The first keyframe's own timestamp, not the header's start (AVI's can be a frame off); the seek also makes
        # Matroska load its cues.
        start = _first_keyframe_pts(opened, start_pts)
    except av.error.FFmpegError:
        return None
    header = opened.header
    index = keyframe_index(opened.stream, has_dts=header.index_has_dts)
    if start is None or index is None or header.duration_ticks is None:
        return None
    return Timeline(
        start=start,
        duration=header.duration_ticks,
        frame_pts=None,
        seek_points=index[0],
        time_base=header.time_base,
    )


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
        self._key_checked = False  # the region's first picture shown was checked to be a keyframe's
        self._kf_shown = True  # the region's keyframe is shown (not cut by an MP4 edit list)
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
                    self._reset_region(video_packets(self._container, self._stream))
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
        self._reset_region(video_packets(self._container, self._stream))
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
            # Seek to the index's first entry: MP4 indexes decode times, which without an edit list may lie seconds
            # before the display times (pts = dts + 3 s), and a seek to a display time just before the start then
            # lands on a later keyframe.
            entries = self._stream.index_entries
            self._seek(min(earlier, entries[0].timestamp) if len(entries) else earlier, may_retreat=False)
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
        if (
            not self._number_frames
            and packet.dts is not None
            and self._max_dts is not None
            and packet.dts < self._max_dts
        ):
            raise _TimestampsUnreliable(f"decode timestamp {packet.dts} after {self._max_dts}")  # all else assumes not
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
            self._kf_shown = not packet.is_discard
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
            self._key_checked = False
            self._kf_shown = not packet.is_discard
        self._lookahead.append(packet)
        self._lookahead_bytes += packet.size
        if pts >= self._region_kf and not packet.is_discard:
            # A discarded packet (cut by an MP4 edit list) is decoded for the frames after it but never shown.
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
        check_aspect(frame.width, frame.height, self._sar)
        self._stats.frames_decoded += 1
        if self._latest is not None and pts < self._latest_pts:
            # A decoder shows frames in presentation order: these timestamps are not presentation times.
            raise _TimestampsUnreliable(f"frame at {pts} came out after {self._latest_pts}")
        if self._region_kf is not None and pts < self._region_kf:
            return  # a leading picture of an open GOP, shown before the keyframe we started from
        if self._trust_keyframes and not self._number_frames and not self._key_checked:
            self._key_checked = True
            # A keyframe an edit list cuts is decoded, not shown: the first picture shown after it is not one. Only
            # a picture its decoder calls inter-coded counts: some (QuickTime Animation, CineForm, Flash Screen
            # Video) never flag a keyframe as one.
            if self._kf_shown and not frame.key_frame and int(frame.pict_type) in _INTER_PICTURES:
                # The packet flagged as a keyframe decodes to a picture that needs earlier ones (a container that
                # flags every packet: an MP4 without its sync-sample table, FFmpeg's H.261 in AVI): every picture
                # decoded from such a "keyframe" would be garbage. One pass from the start instead.
                raise _SeekUnreliable("a packet flagged as a keyframe did not decode to a keyframe")
        if self._latest is not None and pts == self._latest_pts:
            return  # a repeated timestamp: keep the first
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
            self._stats.rotation = display_rotation(frame)
            self._converted[pts] = rgb
            self._stats.frames_converted += 1
        self._results[t] = (pts, rgb)


def _numbered_timeline(header: Header, table: PacketTable) -> Timeline:
    """Frames numbered in output order at the nominal rate, for streams whose timestamps cannot be trusted."""
    count = int(table.pts.size)
    if table.synthetic:
        fps = 1 / table.time_base
    elif header.average_fps:
        fps = Fraction(header.average_fps).limit_denominator(1001)
    else:
        seconds = float((table.end_pts - int(table.pts[0])) * table.time_base)
        fps = Fraction(count / seconds if seconds > 0 else 25).limit_denominator(1001)
    return Timeline(
        start=0,
        duration=Fraction(count),
        frame_pts=np.arange(count, dtype=np.int64),
        seek_points=np.zeros(0, dtype=np.int64),
        time_base=1 / fps,
        synthetic=True,
    )


def _scanned_timeline(opened: OpenedVideo, deadline: Deadline) -> tuple[PacketTable, Timeline]:
    """The packet table of a demux of every packet of `opened` (from where it is), and the timeline it gives."""
    table = scan_packets(opened, deadline=deadline)
    if table.synthetic:
        return table, _numbered_timeline(opened.header, table)
    timeline = _timeline_from_scan(opened.header, table)
    if opened.header.duration_ticks is not None:
        # What the clips span is the video's duration (`info` reports it): the header's may count data the input
        # lacks (a cut-off upload) or other streams.
        opened.header = replace(opened.header, duration_ticks=timeline.duration, duration_from_container=False)
    return table, timeline


def _collect(
    opened: OpenedVideo,
    reopen: Callable[[], AbstractContextManager[OpenedVideo]],
    *,
    deadline: Deadline,
    size: int,
    max_pixels: int,
    sampling: SamplingSpec,
    stats: DecodeStats,
    square: bool = True,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    use_index: bool = True,
) -> tuple[list[Clip], PacketTable | None, Timeline]:
    """The clips of `sampling` from `opened` (a fresh open of the source; `reopen` opens it again for a rescan or a
    sequential pass), the packet table when the source was demuxed whole, and the timeline the clips were cut from.
    A file object's keyframes are taken from the container's index where it has them (`use_index`)."""

    def collector(video: OpenedVideo, **options: Any) -> _Collector:
        return _Collector(
            video, deadline=deadline, size=size, max_pixels=max_pixels, stats=stats, square=square, **options
        )

    results: dict[int, tuple[int, np.ndarray] | None] | None = None
    timeline, table = None, None
    if use_index and opened.is_file_like and not isinstance(sampling, Dense):
        # Remote reads are what costs here: take keyframes from the container's index and read only what is needed.
        timeline = _timeline_from_index(opened, deadline)
        if timeline is not None:
            stats.index = "container"
        else:
            # Read in vain, the index left the input past its first packets (or at its end): a demux of every packet
            # from there would miss frames. Everything starts again from a fresh open.
            with reopen() as fresh:
                found = _collect(
                    fresh, reopen, deadline=deadline, size=size, max_pixels=max_pixels, sampling=sampling,
                    stats=stats, square=square, max_frame_bytes=max_frame_bytes, use_index=False,
                )  # fmt: skip
                opened.header = fresh.header
            return found
    if timeline is None:
        table, timeline = _scanned_timeline(opened, deadline)
        stats.index = "demux"
    _check_frame_bytes(opened.header, timeline, sampling, size=size, square=square, limit=max_frame_bytes)
    views = plan_views(timeline, sampling)
    thresholds = sorted({int(t) for view in views for t in view.thresholds})

    def renumbered() -> tuple[Timeline, list[View], list[int]]:
        # Frames came out of order (for example B-frames in AVI, which stores no presentation times, or timestamps
        # that run backwards): number the frames as the decoder shows them instead.
        with reopen() as rescan:
            numbered = _numbered_timeline(rescan.header, scan_packets(rescan, deadline=deadline))
        _check_frame_bytes(rescan.header, numbered, sampling, size=size, square=square, limit=max_frame_bytes)
        numbered_views = plan_views(numbered, sampling)
        return numbered, numbered_views, sorted({int(t) for view in numbered_views for t in view.thresholds})

    if not timeline.synthetic:
        try:
            seeking = collector(opened, start_pts=timeline.start)
            results = seeking.run(_group_by_keyframe(thresholds, timeline.seek_points))
        except _SeekUnreliable:
            results = None
        except _TimestampsUnreliable:
            timeline, views, thresholds = renumbered()
            results = None
    if results is None or all(r is None for r in results.values()):
        # No usable timestamps, seeking failed, or keyframe flags led nowhere: one plain pass from the start.
        stats.sequential_fallback = True
        try:
            with reopen() as again:
                options = {"trust_keyframes": False, "number_frames": timeline.synthetic}
                results = collector(again, **options).run([(None, thresholds)])
        except _TimestampsUnreliable:
            timeline, views, thresholds = renumbered()
            with reopen() as again:
                results = collector(again, trust_keyframes=False, number_frames=True).run([(None, thresholds)])
    return _assemble(views, results, timeline), table, timeline


def _bytes_text(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count} bytes"


def check_aspect(width: int, height: int, sample_aspect_ratio: Fraction) -> None:
    """Refuse a picture whose displayed aspect ratio is beyond `MAX_ASPECT_RATIO` (either way; sizes not known yet,
    0, pass)."""
    if width <= 0 or height <= 0 or sample_aspect_ratio <= 0:
        return
    long, short = sorted((width * sample_aspect_ratio, Fraction(height)), reverse=True)
    if long > MAX_ASPECT_RATIO * short:
        raise VideoDecodeError(
            "too_large", f"a {width}x{height} picture is beyond an aspect ratio of {MAX_ASPECT_RATIO}:1 (refused)"
        )


def _check_frame_bytes(
    header: Header, timeline: Timeline, sampling: SamplingSpec, *, size: int, square: bool, limit: int
) -> None:
    """Refuse, before decoding, thin pictures (`check_aspect`) and clips whose frames would take more than `limit`
    bytes (a long video in short windows, or a file claiming days of duration)."""
    check_aspect(header.width, header.height, header.sample_aspect_ratio)
    clips, frames = clip_count(timeline, sampling)
    width, height = (
        (size, size)
        if square
        else resized_size(header.width, header.height, size=size, sample_aspect_ratio=header.sample_aspect_ratio)
    )
    need = clips * frames * width * height * 3
    if need > limit:
        seconds = float(timeline.duration * timeline.time_base)
        raise VideoDecodeError(
            "too_long",
            f"{clips:,} clips of {frames} frames at {width}x{height} for {seconds:,.0f} s of video need "
            f"{_bytes_text(need)} of frames, above the limit of {_bytes_text(limit)} (refused before decoding)",
        )


def _assemble(
    views: list[View],
    results: dict[int, tuple[int, np.ndarray] | None],
    timeline: Timeline,
) -> list[Clip]:
    found = sorted((t, r) for t, r in results.items() if r is not None)
    if not found:
        raise VideoDecodeError("corrupt", _NO_FRAME)
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


Crop = Literal["center", "none"]


class VideoDecoder:
    """One video, opened once: its clips (`clips`, `clip`) and what it holds (`info`) from the same open input.

    Use it as a context manager (the input is closed on exit)::

        with VideoDecoder("talk.mp4", timeout_seconds=30) as video:
            whole, *segments = video.clips(Windows(segment_seconds=2.0, with_whole_video=True), size=224)
            seconds = video.info.duration_seconds

    Args:
        source: Local path, encoded bytes, or a seekable binary file-like object (read with ranged reads).
        num_threads: Decoder threads; 1 suits one decoder per core.
        timeout_seconds: Time limit for everything done with this video, checked between reads, packets and frames.
        max_pixels: Pictures larger than this (width * height) are refused before decoding.
        max_frame_bytes: Most bytes of frames one `clips` call may return; sampling that asks for more (many windows
            of a long video) is refused before decoding, as ``too_long``. Decoding holds up to about twice that.
        stats: Optional counters to fill in (what was demuxed, decoded and converted).

    Raises (on opening, and from every method):
        VideoDecodeError: the input is not a decodable video, is too large, or took too long.
        ValueError: an option is out of range, or a file-like source cannot seek.
        FileNotFoundError: a path that does not exist. Errors raised by a file-like source's own ``read`` (network
            failures) also propagate unchanged, so callers can retry them.

    Paths and bytes are demuxed whole first (cheap, no decoding) for exact timestamps. File-like objects are taken
    to be remote: for `Uniform` and `Windows` only the container's index and the stretches around the targets are
    read; `Dense` counts frames, so it reads the whole file.
    """

    def __init__(
        self,
        source: VideoSource,
        *,
        num_threads: int = 1,
        timeout_seconds: float = 60.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        stats: DecodeStats | None = None,
    ) -> None:
        if not 1 <= num_threads <= 64:
            raise ValueError(f"num_threads must be in [1, 64], got {num_threads}")
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds}")
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be >= 1, got {max_frame_bytes}")
        self._max_frame_bytes = max_frame_bytes
        self._source = source
        self._num_threads = num_threads
        self._max_pixels = max_pixels
        self._deadline = Deadline(timeout_seconds)
        self.stats = stats if stats is not None else DecodeStats()
        self._stack = ExitStack()
        self._opened: OpenedVideo | None = None
        self._used = False  # the open input has been read (a second decode opens the source again)
        self._table: PacketTable | None = None
        self._numbered: Timeline | None = None  # the frames as numbered by decoding, when timestamps were not used
        self._info: Any = None

    def _open(self) -> AbstractContextManager[OpenedVideo]:
        return open_video(
            self._source, deadline=self._deadline, max_pixels=self._max_pixels, num_threads=self._num_threads
        )

    def __enter__(self) -> VideoDecoder:
        if self._opened is None:
            with as_decode_errors(self._deadline, "FFmpeg"):
                self._opened = self._stack.enter_context(self._open())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def clips(self, sampling: SamplingSpec, *, size: int = 224, crop: Crop = "center") -> list[Clip]:
        """Decode every clip `sampling` asks for (several dense views or windows), decoding each frame once.

        Args:
            sampling: `Uniform`, `Dense` or `Windows`.
            size: Output side: the shorter side is scaled to it, then (``crop="center"``) the centre square is cut.
            crop: ``center`` (frames ``[T, size, size, 3]``) or ``none``: the whole picture with its shorter side
                ``size`` (``[T, H, W, 3]``), for crops taken elsewhere (several spatial views).

        Returns:
            One `Clip` per view or window, in time order (after the whole-video clip with ``with_whole_video``).
        """
        if not isinstance(sampling, (Uniform, Dense, Windows)):
            raise TypeError(f"sampling must be Uniform, Dense or Windows, got {type(sampling).__name__}")
        if not 1 <= size <= 4096:
            raise ValueError(f"size must be in [1, 4096], got {size}")
        if crop not in ("center", "none"):
            raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
        self.__enter__()
        with as_decode_errors(self._deadline, "FFmpeg"), ExitStack() as scratch:
            opened = self._opened if not self._used else scratch.enter_context(self._open())
            assert opened is not None
            fresh = not self._used
            self._used = True
            try:
                clips, table, timeline = _collect(
                    opened,
                    self._open,
                    deadline=self._deadline,
                    size=size,
                    max_pixels=self._max_pixels,
                    sampling=sampling,
                    stats=self.stats,
                    square=crop == "center",
                    max_frame_bytes=self._max_frame_bytes,
                )
            except VideoDecodeError as error:
                if error.reason == "corrupt" and error.message == _NO_FRAME and cut_short(self._source):
                    raise VideoDecodeError("truncated", f"{_NO_FRAME}: the file ends before its media data") from None
                if error.reason == "truncated" and error.message == NO_PACKETS and whole_iso_bmff(self._source):
                    raise VideoDecodeError("corrupt", DAMAGED_INDEX) from None
                raise
        if fresh:
            self._table = table
            self._numbered = timeline if timeline.synthetic else None
        return clips

    def clip(self, sampling: Uniform | Dense | None = None, *, size: int = 224, crop: Crop = "center") -> Clip:
        """Decode one clip (`Uniform` by default, or `Dense` with one view); see `clips`."""
        sampling = sampling if sampling is not None else Uniform()
        if isinstance(sampling, Windows) or (isinstance(sampling, Dense) and sampling.num_views != 1):
            raise ValueError("clip returns one clip; use clips for several views or windows")
        (clip,) = self.clips(sampling, size=size, crop=crop)
        return clip

    @property
    def info(self) -> Any:
        """What the video holds (a `vitaclip.video.VideoInfo`, as `vitaclip.video.probe` gives): after `clips`,
        from what decoding learned, without reading the input again; before, by a probe of its own."""
        if self._info is None:
            from vitaclip.video.probe import info_after_decode, probe

            self.__enter__()
            assert self._opened is not None
            with as_decode_errors(self._deadline, "cannot read the video stream"):
                if self._used and self.stats.rotation is not None:
                    self._info = info_after_decode(
                        self._opened, self._table, self.stats.rotation, source=self._source, deadline=self._deadline,
                        max_pixels=self._max_pixels,
                    )  # fmt: skip
                    if self._numbered is not None:
                        # Timestamps that could not be used (files joined byte by byte, all equal): the duration
                        # and rate are those of the frames as decoding numbered them, which the clips span.
                        seconds = float(self._numbered.duration * self._numbered.time_base)
                        self._info = replace(
                            self._info,
                            duration_seconds=seconds,
                            fps=float(1 / self._numbered.time_base),
                            num_frames=int(self._numbered.duration),  # frames numbered 0, 1, ...: one tick each
                            num_frames_exact=True,
                            keyframe_seconds=None,
                        )
                else:
                    self._info = probe(
                        self._source, timeout_seconds=max(self._deadline.remaining(), 1e-3),
                        max_pixels=self._max_pixels,
                    )  # fmt: skip
        return self._info


def decode_clips(
    source: VideoSource,
    sampling: SamplingSpec,
    *,
    size: int = 224,
    crop: Crop = "center",
    num_threads: int = 1,
    timeout_seconds: float = 60.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    stats: DecodeStats | None = None,
) -> list[Clip]:
    """The clips of `sampling` from one video: `VideoDecoder(source, ...).clips(sampling, size=, crop=)`."""
    with VideoDecoder(
        source, num_threads=num_threads, timeout_seconds=timeout_seconds, max_pixels=max_pixels,
        max_frame_bytes=max_frame_bytes, stats=stats,
    ) as decoder:  # fmt: skip
        return decoder.clips(sampling, size=size, crop=crop)


def decode_clip(
    source: VideoSource,
    sampling: Uniform | Dense | None = None,
    *,
    size: int = 224,
    crop: Crop = "center",
    num_threads: int = 1,
    timeout_seconds: float = 60.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    stats: DecodeStats | None = None,
) -> Clip:
    """One clip (`Uniform` of 8 frames by default, or `Dense` with one view): `VideoDecoder.clip`.

    Returns:
        `Clip` with ``frames`` uint8 ``[T, size, size, 3]`` and ``pts_seconds`` ``[T]``.
    """
    with VideoDecoder(
        source, num_threads=num_threads, timeout_seconds=timeout_seconds, max_pixels=max_pixels, stats=stats
    ) as decoder:
        return decoder.clip(sampling, size=size, crop=crop)


@contextmanager
def closing_source(source: VideoSource) -> Iterator[VideoSource]:
    """`source` for the block, closed after it when it can be (file objects and readers an opener made)."""
    try:
        yield source
    finally:
        close = getattr(source, "close", None)
        if callable(close):
            close()


def decode_or_error(
    uri: str, decode: Callable[[VideoSource], _T], *, opener: Callable[[str], VideoSource] | None = None
) -> tuple[_T | None, str]:
    """The per-video boundary of decoding loops: ``(decode(source), "")`` for the opened `uri` (the uri itself
    without an `opener`), or ``(None, "Type: message")`` when opening or decoding it failed in any way."""
    try:
        with closing_source(opener(uri) if opener is not None else uri) as source:
            return decode(source), ""
    except Exception as exc:  # per-video boundary: a bad or unreadable video is a result, never a crash
        return None, f"{type(exc).__name__}: {exc}"

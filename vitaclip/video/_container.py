"""Opening sources, reading container headers and demuxing packet tables (no decoding here)."""

from __future__ import annotations

import errno
import io
import os
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Literal, Protocol, Union

import av
import av.error
import numpy as np
from av.container import InputContainer
from av.packet import Packet
from av.video.stream import VideoStream

from vitaclip.video.errors import DecodeErrorReason, VideoDecodeError
from vitaclip.video.sampling import durations_agree, ends_at_last_start

DEFAULT_MAX_PIXELS = 8192 * 4320
"""Largest picture (width * height) decoded by default: DCI 8K."""


class SeekableReader(Protocol):
    """What a file-like source must offer: ``read``, ``seek`` and ``tell`` over bytes (an open file, an S3 reader)."""

    def read(self, size: int = ..., /) -> bytes | None: ...

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def tell(self) -> int: ...


VideoSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, SeekableReader]
"""A local path, the encoded bytes, or a seekable binary file-like object (for example an S3 object reader)."""

MAX_DURATION_SECONDS = 1e6  # about 11.6 days: anything longer is corrupt metadata

# Demuxers that open further resources named inside the input (playlists, file lists, session descriptions that
# bind sockets, numbered image sequences, filter graphs) or read devices. An input is always untrusted data: it is
# read as the one stream of bytes it is, never as directions to open other files or the network.
_REFERRING_DEMUXERS = frozenset(
    {
        "concat", "hls", "applehttp", "dash", "sdp", "rtp", "rtsp", "sap", "image2", "imf", "lavfi",
        "webm_dash_manifest", "alsa", "oss", "fbdev", "kmsgrab", "x11grab", "video4linux2", "v4l2", "avisynth",
        "vapoursynth", "libcdio", "openal", "pulse", "jack", "dshow", "gdigrab", "avfoundation",
    }
)  # fmt: skip


def _allowed_demuxers() -> str:
    names: set[str] = set()
    for name in av.formats_available:
        try:
            av.format.ContainerFormat(name, "r")
        except ValueError:
            continue  # a muxer only
        names.update(name.split(","))  # "mov,mp4,m4a,..." is one demuxer; FFmpeg matches each of its names
    # Still pictures (png_pipe, jpeg_pipe, ...: one image read as a one-frame stream) are not videos; animated
    # formats (gif, apng, webp animations through their own demuxers) and raw Motion JPEG (mjpeg) stay.
    stills = {name for name in names if name.endswith("_pipe") or name == "image2pipe"}
    return ",".join(sorted(names - _REFERRING_DEMUXERS - stills))


def open_options(*, is_path: bool) -> dict[str, str]:
    """FFmpeg options for opening an untrusted input: the demuxers of moving pictures that read only the input
    itself (a still picture, even one named .mp4, is refused as not a video), and no
    protocol but the local file a path names (none for bytes and file objects, which PyAV reads through its own
    I/O), so that nothing the input says can make FFmpeg open another file or a socket."""
    global _ALLOWED_DEMUXERS
    if _ALLOWED_DEMUXERS is None:
        _ALLOWED_DEMUXERS = _allowed_demuxers()
    return {"format_whitelist": _ALLOWED_DEMUXERS, "protocol_whitelist": "file" if is_path else "data"}


_ALLOWED_DEMUXERS: str | None = None

MAX_FPS = 1000.0

# Demuxers that turn text or character art into pictures; a text file is not a video.
_TEXT_DEMUXERS = frozenset({"tty", "bin", "idf", "adf", "xbin", "ansi"})


class DeadlineExceeded(Exception):
    """Raised inside I/O and decode loops when the per-video time limit has passed."""


class Deadline:
    """A per-video time limit, checked between packets, frames and reads."""

    def __init__(self, timeout_seconds: float) -> None:
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds}")
        self.timeout_seconds = timeout_seconds
        self._end = time.monotonic() + timeout_seconds

    def check(self) -> None:
        if time.monotonic() > self._end:
            raise DeadlineExceeded(f"gave up after {self.timeout_seconds:g} s")

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())


class _GuardedReader:
    """The subset of a binary file that PyAV uses, checking the deadline on every call.

    It has no ``close``: the caller owns the wrapped object.
    """

    def __init__(self, raw: Any, deadline: Deadline) -> None:
        self._raw = raw
        self._deadline = deadline

    def read(self, size: int = -1) -> bytes:
        self._deadline.check()
        data = self._raw.read(size) or b""
        return data if isinstance(data, bytes) else bytes(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._deadline.check()
        return int(self._raw.seek(offset, whence))

    def tell(self) -> int:
        return int(self._raw.tell())

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


@dataclass(frozen=True)
class Header:
    """What the container says about the chosen video stream, with insane values dropped."""

    time_base: Fraction
    start_pts: int | None
    duration_ticks: Fraction | None  # sane metadata duration in time_base ticks
    frames: int  # from the container, 0 when unknown
    average_fps: float | None
    width: int  # coded
    height: int
    sample_aspect_ratio: Fraction
    codec: str
    format_name: str
    has_b_frames: bool
    index_has_dts: bool  # ISO-BMFF sample tables index decode timestamps
    index_complete: bool  # the seek index lists every frame (sample tables), not just some keyframes
    # The duration is the whole file's (the stream has none): `check_container_duration` has not yet compared it with
    # the video's own last packets.
    duration_from_container: bool = False
    index_past_end: bool = False  # the seek index places frames past the end of the input (a cut-off upload)

    def seconds(self, ticks: float | Fraction) -> float:
        return float(ticks * self.time_base)

    def ticks(self, seconds: float) -> Fraction:
        return Fraction(seconds) / self.time_base


@dataclass(frozen=True)
class PacketTable:
    """Timestamps of every video packet, from one demux pass (no decoding).

    Raw elementary streams (``.h264``) carry no timestamps at all; their packets are then numbered in order at the
    nominal frame rate (``synthetic``), and frames must be decoded in one pass and numbered as they come out.
    """

    pts: np.ndarray  # [N] int64, presentation order, unique
    keyframe_pts: np.ndarray  # [K] int64, ascending
    end_pts: Fraction  # end of the last displayed frame
    median_interval: float  # ticks between consecutive frames (0 for one frame)
    time_base: Fraction
    synthetic: bool = False


@dataclass
class OpenedVideo:
    container: InputContainer
    stream: VideoStream
    header: Header
    is_file_like: bool


def _head_bytes(source: VideoSource, size: int) -> bytes:
    """First bytes of a source, for classifying open failures; leaves file-likes at position 0."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read(size)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:size])
    source.seek(0)
    head = source.read(size) or b""
    source.seek(0)
    return bytes(head)


def _source_size(source: VideoSource) -> int:
    if isinstance(source, (str, os.PathLike)):
        return os.path.getsize(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    size = int(source.seek(0, io.SEEK_END))
    source.seek(0)
    return size


def _read_at(source: VideoSource, offset: int, size: int) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            f.seek(offset)
            return f.read(size)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[offset : offset + size])
    source.seek(offset)
    data = bytes(source.read(size) or b"")
    source.seek(0)
    return data


def _iso_bmff_truncated(source: VideoSource, total: int) -> bool | None:
    """Walk the top-level boxes of an MP4/MOV: True if one runs past the end or the file ends before any ``moov`` box
    (its header: a recording or an upload cut short), False if complete, None if unknown."""
    return _walk_boxes(source, total)[0]


def _walk_boxes(source: VideoSource, total: int) -> tuple[bool | None, set[bytes]]:
    """`_iso_bmff_truncated`'s answer, and the types of the top-level boxes walked."""
    offset, seen = 0, set[bytes]()
    for _ in range(10_000):
        if offset == total:
            return b"moov" not in seen, seen
        header = _read_at(source, offset, 16)
        if len(header) < 8:
            return True, seen
        size = int.from_bytes(header[:4], "big")
        seen.add(bytes(header[4:8]))
        if size == 1:
            if len(header) < 16:
                return True, seen
            size = int.from_bytes(header[8:16], "big")
        elif size == 0:  # box extends to the end of the file
            return b"moov" not in seen, seen
        if size < 8:
            return None, seen
        offset += size
        if offset > total:
            return True, seen
    return None, seen


def cut_short(source: VideoSource) -> bool:
    """Whether an input that decoded no frame is an MP4/MOV cut short (`_iso_bmff_truncated`): its header may be
    whole (written first) while the media data it indexes ends early."""
    try:
        head = _head_bytes(source, 64)
        return head[4:8] in _ISO_BMFF_BOXES and _iso_bmff_truncated(source, _source_size(source)) is True
    except OSError:
        return False


def whole_iso_bmff(source: VideoSource) -> bool:
    """Whether an input is an MP4/MOV whose top-level boxes are all there (`_iso_bmff_truncated` says complete), its
    media data (``mdat``) among them: a stream of it with no packet to read has a damaged index, not a file cut short.
    A file cut where a box ends before any media data (a header alone, a fragmented file's init segment) is cut
    short."""
    try:
        head = _head_bytes(source, 64)
        if head[4:8] not in _ISO_BMFF_BOXES:
            return False
        truncated, seen = _walk_boxes(source, _source_size(source))
        return truncated is False and b"mdat" in seen
    except OSError:
        return False


NO_PACKETS = "the video stream holds no packets"
DAMAGED_INDEX = f"{NO_PACKETS} that can be read, yet the file is whole: its index (moov) is damaged"


_ISO_BMFF_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")


def _looks_like_container(head: bytes) -> bool:
    return (
        head[4:8] in _ISO_BMFF_BOXES
        or head.startswith((b"\x1a\x45\xdf\xa3", b"OggS", b"FLV", b"YUV4MPEG2", b"\x00\x00\x01\xba"))
        or (head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"AVIX"))
    )


def _classify_open_error(source: VideoSource, error: Exception) -> DecodeErrorReason:
    try:
        head = _head_bytes(source, 64)
        total = _source_size(source)
    except OSError:
        return "corrupt"
    if not _looks_like_container(head):
        return "not_a_video"
    if head[4:8] in _ISO_BMFF_BOXES:
        truncated = _iso_bmff_truncated(source, total)
        if truncated is not None:
            return "truncated" if truncated else "corrupt"
    if isinstance(error, av.error.EOFError) or getattr(error, "errno", None) == 5:  # EIO: read past the end
        return "truncated"
    return "corrupt"


def _sane_fraction(value: Fraction | None) -> Fraction | None:
    if value is None or value.denominator == 0 or value <= 0:
        return None
    return value


def _index_past_end(stream: VideoStream, size_bytes: int) -> bool:
    entries = stream.index_entries
    if len(entries) == 0:
        return False
    last = entries[len(entries) - 1]
    return last.pos >= 0 and last.pos + last.size > size_bytes


def _read_header(container: InputContainer, stream: VideoStream, *, size_bytes: int) -> Header:
    time_base = _sane_fraction(stream.time_base)
    if time_base is None:
        raise VideoDecodeError("corrupt", f"video stream has no usable time base ({stream.time_base})")
    duration_ticks: Fraction | None = None
    from_container = False
    if stream.duration is not None and stream.duration > 0:
        duration_ticks = Fraction(stream.duration)
    elif container.duration is not None and container.duration > 0:
        # The whole file's (Matroska, FLV): it runs from time 0, not from the video's first frame, and covers every
        # stream (audio may run on past the video). The start is taken off here; the end is checked against the
        # video's last packets before the duration is used without a demux of every packet.
        duration_ticks = Fraction(container.duration, av.time_base) / time_base - (stream.start_time or 0)
        from_container = True
    if duration_ticks is not None and not 0 < duration_ticks * time_base <= MAX_DURATION_SECONDS:
        duration_ticks = None
    fps: float | None = None
    for rate in (stream.average_rate, stream.guessed_rate):
        rate = _sane_fraction(rate)
        if rate is not None and 0 < rate <= MAX_FPS:
            fps = float(rate)
            break
    ctx = stream.codec_context
    if ctx is None:
        # A damaged header (or a codec this FFmpeg lacks) leaves the stream without a decoder.
        raise VideoDecodeError("corrupt", "the video stream has no usable decoder (unknown codec or damaged header)")
    is_iso_bmff = "mp4" in container.format.name or "mov" in container.format.name
    sar = _sane_fraction(stream.sample_aspect_ratio)
    if sar is None or not Fraction(1, 16) <= sar <= 16:
        sar = Fraction(1)
    return Header(
        time_base=time_base,
        start_pts=stream.start_time,
        duration_ticks=duration_ticks,
        frames=_shown_frames(stream) if is_iso_bmff else max(0, int(stream.frames or 0)),
        average_fps=fps,
        width=int(ctx.width or 0),
        height=int(ctx.height or 0),
        sample_aspect_ratio=sar,
        codec=stream.codec.canonical_name,
        format_name=container.format.name,
        has_b_frames=bool(ctx.has_b_frames),
        index_has_dts=is_iso_bmff,
        index_complete=is_iso_bmff or container.format.name == "avi",
        duration_from_container=from_container and duration_ticks is not None,
        index_past_end=_index_past_end(stream, size_bytes),
    )


def _shown_frames(stream: VideoStream) -> int:
    """The sample table's frame count, less what an edit list cuts (its index then leaves samples out or flags them
    discarded; counted only then, as walking a long index costs about 0.3 us an entry)."""
    frames = max(0, int(stream.frames or 0))
    entries = stream.index_entries
    if frames == 0 or len(entries) == frames:
        return frames
    return sum(1 for entry in entries if not entry.is_discard)


def _pick_stream(container: InputContainer) -> VideoStream:
    if container.format.name in _TEXT_DEMUXERS:
        raise VideoDecodeError("not_a_video", f"input was detected as {container.format.name!r} (text), not video")
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        if len(container.streams) == 0:
            raise VideoDecodeError("not_a_video", f"{container.format.name!r} input has no streams")
        kinds = sorted({"cover art" if s in container.streams.video else s.type for s in container.streams})
        held = " and ".join(kinds) if len(kinds) < 3 else f"{', '.join(kinds[:-1])} and {kinds[-1]}"
        raise VideoDecodeError("no_video_stream", f"input has no video stream, only {held}")
    # The track players show: the one flagged default (a file may hold a small preview track before it), else the first.
    default = [s for s in videos if s.disposition & av.stream.Disposition.default]
    return default[0] if default else videos[0]


def _check_source(source: VideoSource) -> None:
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        return
    if not (hasattr(source, "read") and hasattr(source, "seek") and hasattr(source, "tell")):
        raise TypeError(f"source must be a path, bytes or a seekable binary file object, got {type(source).__name__}")
    seekable = getattr(source, "seekable", None)
    if seekable is not None and not seekable():
        raise ValueError("file-like sources must be seekable (wrap a stream in a ranged reader or read it to bytes)")


@contextmanager
def open_video(
    source: VideoSource, *, deadline: Deadline, max_pixels: int, num_threads: int = 1
) -> Iterator[OpenedVideo]:
    """Open ``source``, pick its video stream and refuse oversized pictures; the container is closed on exit."""
    _check_source(source)
    size_bytes = _source_size(source)
    if size_bytes == 0:
        raise VideoDecodeError("empty", "the input has zero bytes")
    is_file_like = not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview))
    try:
        # Also for the frames FFmpeg decodes while probing the streams (where they are known before it).
        container = _open_container(source, deadline, options={"max_pixels": str(max_pixels)})
    except DeadlineExceeded as e:
        raise VideoDecodeError("timeout", str(e)) from None
    except FileNotFoundError:
        raise
    except av.error.FFmpegError as e:
        if e.errno == errno.EINVAL:  # what FFmpeg says of a probed format outside the whitelist
            said = (
                "a format not read as video (a still picture, a playlist, a file list or a session description is "
                "refused: see open_options), or damaged"
            )
        elif e.errno == errno.EBUSY:  # how FFmpeg's demuxers refuse an impossible header (YUV4MPEG2 0x0, 30000x30000)
            said = "its header is invalid (a picture size of zero or past FFmpeg's limits, or damaged)"
        else:
            said = e.strerror or str(e)  # without the file name (the row names it; a stream's is '<none>')
        raise VideoDecodeError(_classify_open_error(source, e), f"cannot open input: {said}") from None
    with container:
        stream = _pick_stream(container)
        header = _read_header(container, stream, size_bytes=size_bytes)
        width, height = header.width, header.height
        if not (width and height):  # FFmpeg zeroes a size past max_pixels when it opens a decoder with that limit
            width, height = _size_in_header(source, stream.index, deadline)
        if width * height > max_pixels:
            raise VideoDecodeError(
                "too_large", f"{width}x{height} exceeds max_pixels={max_pixels} (refused before decoding)"
            )
        ctx = stream.codec_context
        # FFmpeg's own limit too: a frame larger than the header said (a stream that changes size midway) is
        # refused before it is allocated, not after (a 16k x 16k 4:4:4 picture is 0.8 GB).
        ctx.options = {**ctx.options, "max_pixels": str(max_pixels)}
        ctx.thread_count = num_threads
        # Slice threads add no latency; frame threads are only worth it when one decoder gets several cores.
        ctx.thread_type = "SLICE" if num_threads == 1 else "AUTO"
        yield OpenedVideo(container=container, stream=stream, header=header, is_file_like=is_file_like)


def _open_container(
    source: VideoSource, deadline: Deadline, *, options: dict[str, str], no_decoders: bool = False
) -> InputContainer:
    """`av.open` of an untrusted source (`open_options`); ``no_decoders``: probe without opening any decoder."""
    file: Any
    if isinstance(source, (str, os.PathLike)):
        file = os.path.abspath(os.fspath(source))  # FFmpeg reads "proto:name" as a URL; "/..." is always a file
    elif isinstance(source, (bytes, bytearray, memoryview)):
        file = _GuardedReader(io.BytesIO(source if isinstance(source, bytes) else bytes(source)), deadline)
    else:
        source.seek(0)
        file = _GuardedReader(source, deadline)
    container_options = open_options(is_path=isinstance(file, str))
    if no_decoders:
        container_options["codec_whitelist"] = "none"
    # PyAV's own timeout interrupts a single blocking FFmpeg call (for example a probe that never ends).
    timeout = max(1.0, deadline.remaining())
    return av.open(
        file,
        "r",
        container_options=container_options,
        options=options,
        timeout=(timeout, timeout),
        metadata_errors="replace",
    )


def _size_in_header(source: VideoSource, index: int, deadline: Deadline) -> tuple[int, int]:
    """The picture size the container's header gives stream ``index``, read with no decoder opened (so none
    allocates a picture); (0, 0) when it gives none or cannot be read again. A file object is left where it was."""
    reader = None if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)) else source
    position = reader.tell() if reader is not None else 0
    try:
        with _open_container(source, deadline, options={}, no_decoders=True) as again:
            stream = again.streams[index] if index < len(again.streams) else None
            if stream is None or stream.type != "video" or stream.codec_context is None:
                return 0, 0
            return max(0, int(stream.codec_context.width or 0)), max(0, int(stream.codec_context.height or 0))
    except (av.error.FFmpegError, DeadlineExceeded, OSError):
        return 0, 0
    finally:
        if reader is not None:
            reader.seek(position)


def video_packets(container: InputContainer, stream: VideoStream) -> Iterator[Packet]:
    """`container.demux(stream)` from the current position up to and including the stream's end marker (PyAV's
    empty packet, which decoding takes as "flush"), then no more.

    Why not PyAV's iterator alone: a stream may appear after the header (an MPEG-TS whose programme table gains a
    stream midway, or a packet on a new PID), and PyAV 18's demux then ends with an IndexError while it makes the
    end markers of the streams it knew of. The video stream's marker comes before that, and nothing of the video
    after it; an IndexError before it ends the packets as the end of the input would."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except (StopIteration, IndexError):
            return
        yield packet
        if packet.size == 0:
            return


def _shown_packets(opened: OpenedVideo, deadline: Deadline) -> Iterator[Packet]:
    """The video stream's packets from the current position, less flush and discarded ones (cut by an MP4 edit list:
    decoded for the frames after them, never shown). A damaged tail ends them: what was read before it stays."""
    packets = video_packets(opened.container, opened.stream)
    while True:
        deadline.check()
        try:
            packet = next(packets)
        except (StopIteration, av.error.FFmpegError):
            return
        if packet.size > 0 and not packet.is_discard:
            yield packet


def _packets_end(all_pts: array, durations: array, header: Header) -> tuple[np.ndarray, Fraction, float]:
    """Unique sorted timestamps ``[N]``, the end of the last shown frame (its duration, else the median interval,
    else the nominal rate) and the median interval, of packets' timestamps and durations (ticks)."""
    pts = np.frombuffer(all_pts, dtype=np.int64)
    frame_pts = np.unique(pts)  # [N]
    median_interval = float(np.median(np.diff(frame_pts))) if frame_pts.size > 1 else 0.0
    last = int(frame_pts[-1])
    last_duration: float = int(np.frombuffer(durations, dtype=np.int64)[np.flatnonzero(pts == last)[-1]])
    if last_duration <= 0:
        if median_interval > 0:
            last_duration = median_interval
        elif header.average_fps:
            last_duration = float(1 / (header.average_fps * header.time_base))
    return frame_pts, Fraction(last) + Fraction(last_duration), median_interval


_MAX_REORDER = 32
"""Packets a stream may show out of their decode order: a decoder holds at most 16 pictures back (H.264, HEVC)."""


def _order_unreliable(pts: np.ndarray) -> bool:
    """Whether timestamps in decode order (`pts`, [N]) cannot be a stream's presentation times: a packet further from
    its place in presentation order than any decoder reorders (timestamps that restart, as in files concatenated
    byte by byte, run backwards or jump far ahead), or most packets sharing a timestamp with another."""
    if pts.size < 2:
        return False
    order = np.argsort(pts, kind="stable")  # [N]
    displaced = np.abs(order - np.arange(pts.size)).max()
    return bool(displaced > _MAX_REORDER) or 2 * np.unique(pts).size < pts.size


def scan_packets(opened: OpenedVideo, *, deadline: Deadline) -> PacketTable:
    """Demux every packet of the video stream (no decoding) to learn all timestamps and keyframes.

    Timestamps that cannot be presentation times (decode timestamps that go back, or `_order_unreliable`) are
    dropped like absent ones, as they are when more than a few packets have none: the packets are numbered in order
    at the nominal rate and the frames decoded in one pass, numbered as they come out."""
    # Typed arrays, 8 bytes a packet: a hostile stream of millions of tiny packets must not cost 100 bytes each.
    pts_list = array("q")
    durations = array("q")
    key_list = array("q")
    count = 0
    key_positions = array("q")  # keyframes' places among all packets, for a table numbered in packet order
    last_dts: int | None = None
    dts_back = False  # decode timestamps only grow in a stream whose timestamps mean anything
    for packet in _shown_packets(opened, deadline):
        if packet.is_keyframe:
            key_positions.append(count)
        count += 1
        if packet.dts is not None:
            dts_back = dts_back or (last_dts is not None and packet.dts < last_dts)
            last_dts = packet.dts
        pts = packet.pts if packet.pts is not None else packet.dts
        if pts is None:
            continue
        pts_list.append(pts)
        durations.append(packet.duration or 0)
        if packet.is_keyframe:
            key_list.append(pts)
    if not count:
        raise VideoDecodeError("truncated", NO_PACKETS)
    # Packets without any timestamp (H.264 in MPEG-PS, which needs one only every 0.7 s) are frames the timestamps
    # leave out: a table of the others would span a third of the video. Past 1% of them, they are numbered instead.
    untimed = count - len(pts_list)
    if not pts_list or dts_back or untimed > count // 100 or _order_unreliable(np.frombuffer(pts_list, dtype=np.int64)):
        fps = Fraction(opened.header.average_fps or 25).limit_denominator(1001)
        return PacketTable(
            pts=np.arange(count, dtype=np.int64),
            keyframe_pts=np.asarray(key_positions, dtype=np.int64),
            end_pts=Fraction(count),
            median_interval=1.0,
            time_base=1 / fps,
            synthetic=True,
        )
    frame_pts, end_pts, median_interval = _packets_end(pts_list, durations, opened.header)
    return PacketTable(
        pts=frame_pts,
        keyframe_pts=np.unique(np.frombuffer(key_list, dtype=np.int64)),  # [K]
        end_pts=end_pts,
        median_interval=median_interval,
        time_base=opened.header.time_base,
    )


_TAIL_MAX_PACKETS = 4096  # a last group of pictures longer than this leaves a container's duration unchecked


def _tail_end(opened: OpenedVideo, deadline: Deadline) -> tuple[Fraction, float, int] | None:
    """End of the video stream's last shown frame, the median interval there and the last frame's start, from a seek
    to the last keyframe before the header's end and a demux of what follows (no decoding); None when that finds
    nothing in reach."""
    header = opened.header
    assert header.duration_ticks is not None and header.start_pts is not None
    target = header.start_pts + int(header.duration_ticks)
    step = max(1, round(1 / header.time_base))  # one second
    for _ in range(3):  # some demuxers (FLV) land past the last packet when asked for the very end: step back
        try:
            opened.container.seek(target, stream=opened.stream, backward=True)
        except av.error.FFmpegError:
            return None
        pts_list, durations = array("q"), array("q")
        for packet in _shown_packets(opened, deadline):
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is not None:
                pts_list.append(pts)
                durations.append(packet.duration or 0)
            if len(pts_list) > _TAIL_MAX_PACKETS:
                return None
        if pts_list:
            frame_pts, end, median_interval = _packets_end(pts_list, durations, header)
            return end, median_interval, int(frame_pts[-1])
        target -= step
        step *= 4
    return None


def check_container_duration(opened: OpenedVideo, *, deadline: Deadline) -> None:
    """Check a duration taken from the whole container (`Header.duration_from_container`) against the end of the
    video's own last packets, read after a seek near the end, and keep the packets' when they disagree (audio that
    runs on past the video, an upload cut off after its header was written). Leaves the input at its end."""
    header = opened.header
    if not header.duration_from_container or header.duration_ticks is None or header.start_pts is None:
        return
    duration = header.duration_ticks
    tail = _tail_end(opened, deadline)
    if tail is not None:
        measured = tail[0] - header.start_pts
        if measured > 0 and (
            not durations_agree(duration, measured, tail[1])
            or ends_at_last_start(duration, measured, tail[2] - header.start_pts, tail[1])
        ):
            duration = measured
    opened.header = replace(header, duration_ticks=duration, duration_from_container=False)


IndexKind = Literal["pts", "dts"]


def keyframe_index(stream: VideoStream, *, has_dts: bool) -> tuple[np.ndarray, IndexKind] | None:
    """Keyframe timestamps from the container's own seek index (no packet reads), or None if it has none."""
    entries = stream.index_entries
    if len(entries) == 0:
        return None
    timestamps = [entry.timestamp for entry in entries if entry.is_keyframe and not entry.is_discard]
    if not timestamps:
        return None
    return np.unique(np.asarray(timestamps, dtype=np.int64)), ("dts" if has_dts else "pts")


@contextmanager
def as_decode_errors(deadline: Deadline, what: str) -> Iterator[None]:
    """FFmpeg failures and the time limit as `VideoDecodeError`s (a missing file stays FileNotFoundError)."""
    try:
        yield
    except DeadlineExceeded as e:
        raise VideoDecodeError("timeout", str(e)) from None
    except FileNotFoundError:
        raise
    except av.error.FFmpegError as e:
        # Anything FFmpeg still reports (a failed conversion, an interrupted call) is a property of this input.
        reason: DecodeErrorReason = "timeout" if deadline.remaining() <= 0 else "corrupt"
        raise VideoDecodeError(reason, f"{what}: {e}") from None

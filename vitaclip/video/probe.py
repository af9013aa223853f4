"""Cheap facts about a video: container metadata where it is sane, demuxed packets where it is not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import av.error

from vitaclip.video._container import (
    DAMAGED_INDEX,
    DEFAULT_MAX_PIXELS,
    NO_PACKETS,
    Deadline,
    Header,
    OpenedVideo,
    PacketTable,
    VideoSource,
    as_decode_errors,
    check_container_duration,
    keyframe_index,
    open_video,
    scan_packets,
    video_packets,
    whole_iso_bmff,
)
from vitaclip.video.errors import VideoDecodeError
from vitaclip.video.sampling import ESTIMATED_DURATION_FORMATS, choose_duration
from vitaclip.video.transforms import display_rotation

__all__ = ["VideoInfo", "info_after_decode", "probe"]

_ROTATION_PROBE_PACKETS = 64


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds, as displayed.

    Attributes:
        duration_seconds: From the first frame's start to the last frame's end.
        fps: Frame rate: frames / duration where the frames were counted (``num_frames_exact``: MP4/MOV and AVI
            sample tables, a demux), else the rate the container declares (Matroska/WebM's default frame duration,
            MPEG-TS's), which for variable-rate video is nominal, not the average.
        num_frames: Number of frames; exact when ``num_frames_exact``, else ``duration * fps`` rounded.
        num_frames_exact: Whether ``num_frames`` was counted (sample table or demuxed packets).
        width: Displayed width: after the sample aspect ratio and rotation.
        height: Displayed height.
        codec: Codec name, e.g. ``h264``, ``hevc``, ``vp9``, ``av1``.
        rotation: Degrees counter-clockwise the stored picture is turned for display (0, 90, 180 or 270).
        keyframe_seconds: Keyframe timestamps in seconds from the first frame, or None when not cheaply known.
        container_format: FFmpeg's name for the container format.
    """

    duration_seconds: float
    fps: float
    num_frames: int
    num_frames_exact: bool
    width: int
    height: int
    codec: str
    rotation: int
    keyframe_seconds: tuple[float, ...] | None
    container_format: str


def _metadata_is_sane(header: Header) -> bool:
    if header.duration_ticks is None or header.average_fps is None or header.start_pts is None:
        return False
    if ESTIMATED_DURATION_FORMATS.intersection(header.format_name.split(",")):
        return False  # FFmpeg estimated the duration from timestamps: the packets' end it is
    if header.index_past_end:
        return False  # the header describes more than the input holds (a cut-off upload)
    if header.frames > 0:
        expected = header.seconds(header.duration_ticks) * header.average_fps
        return abs(header.frames - expected) <= max(2.0, 0.1 * header.frames)
    return True


def _first_frame_rotation(opened: OpenedVideo, deadline: Deadline) -> int:
    """Rotation from the first decoded frame's display matrix (PyAV exposes no stream-level side data)."""
    stream = opened.stream
    for n, packet in enumerate(video_packets(opened.container, stream)):
        deadline.check()
        if n >= _ROTATION_PROBE_PACKETS:
            break
        try:
            frames = stream.decode(packet)
        except av.error.FFmpegError:
            continue
        if frames:
            return display_rotation(frames[0])
    return 0


def _rotation_after_scan(
    source: VideoSource, opened: OpenedVideo, table: PacketTable, *, deadline: Deadline, max_pixels: int
) -> int:
    """Rotation once a scan has consumed the packets: seek back, or reopen a stream that cannot seek."""
    if not table.synthetic:
        try:
            opened.container.seek(int(table.pts[0]), stream=opened.stream, backward=True)
            return _first_frame_rotation(opened, deadline)
        except av.error.FFmpegError:
            pass
    with open_video(source, deadline=deadline, max_pixels=max_pixels) as reopened:
        return _first_frame_rotation(reopened, deadline)


def probe(
    source: VideoSource,
    *,
    method: Literal["metadata", "demux"] = "metadata",
    timeout_seconds: float = 60.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> VideoInfo:
    """Describe a video without decoding it (one frame is decoded to read its rotation).

    Args:
        source: Local path, encoded bytes, or a seekable binary file-like object.
        method: ``metadata`` trusts the container's header where it is sane and demuxes packets otherwise;
            ``demux`` always demuxes every packet (reads the whole file), giving exact counts and keyframes.
        timeout_seconds: Time limit.
        max_pixels: Pictures larger than this are refused, as in ``decode_clip``.

    Raises:
        VideoDecodeError: the input is not a readable video.
    """
    if method not in ("metadata", "demux"):
        raise ValueError(f"method must be 'metadata' or 'demux', got {method!r}")
    deadline = Deadline(timeout_seconds)
    with as_decode_errors(deadline, "cannot read the video stream"):
        with open_video(source, deadline=deadline, max_pixels=max_pixels) as opened:
            if method == "demux" or not _metadata_is_sane(opened.header):
                try:
                    table = scan_packets(opened, deadline=deadline)
                except VideoDecodeError as error:
                    if error.reason == "truncated" and error.message == NO_PACKETS and whole_iso_bmff(source):
                        raise VideoDecodeError("corrupt", DAMAGED_INDEX) from None
                    raise
                rotation = _rotation_after_scan(source, opened, table, deadline=deadline, max_pixels=max_pixels)
                return _info(opened, table, rotation)
            rotation = _first_frame_rotation(opened, deadline)
            check_container_duration(opened, deadline=deadline)
            return _info(opened, None, rotation)


def info_after_decode(
    opened: OpenedVideo,
    table: PacketTable | None,
    rotation: int,
    *,
    source: VideoSource,
    deadline: Deadline,
    max_pixels: int,
) -> VideoInfo:
    """What `probe` (``metadata``) says, from an input a decoder has read: its header, the packet table when it
    demuxed every packet, and the rotation of the frames it decoded. Only when the header is not sane and the
    decoder used the container's index instead of a demux is the input demuxed again (opened anew)."""
    if _metadata_is_sane(opened.header):
        return _info(opened, None, rotation)
    if table is None:
        with open_video(source, deadline=deadline, max_pixels=max_pixels) as again:
            return _info(again, scan_packets(again, deadline=deadline), rotation)
    return _info(opened, table, rotation)


def _info(opened: OpenedVideo, table: PacketTable | None, rotation: int) -> VideoInfo:
    """The video's facts from its demuxed packets (`table`), or from its sane header when None."""
    header = opened.header
    keyframes: tuple[float, ...] | None = None
    if table is not None:
        start = int(table.pts[0])
        duration_seconds = float(choose_duration(header, table) * table.time_base)
        num_frames, exact = int(table.pts.size), True
        fps = num_frames / duration_seconds if duration_seconds > 0 else (header.average_fps or 0.0)
        keyframes = tuple(float((int(k) - start) * table.time_base) for k in table.keyframe_pts)
    else:
        assert header.duration_ticks is not None and header.average_fps is not None
        assert header.start_pts is not None
        duration_seconds = header.seconds(header.duration_ticks)
        exact = header.frames > 0
        # Frames over duration where the container counts frames (FFmpeg rounds a variable rate's average to a
        # standard one), else the declared rate.
        fps = header.frames / duration_seconds if exact and duration_seconds > 0 else header.average_fps
        num_frames = header.frames if exact else max(1, round(duration_seconds * fps))
        # Only sample tables (MP4/MOV, AVI) list every keyframe (Matroska cues may list one per cluster), and MP4
        # tables hold decode timestamps, which are not display times when B-frames reorder.
        index = keyframe_index(opened.stream, has_dts=header.index_has_dts)
        if index is not None and header.index_complete and (index[1] == "pts" or not header.has_b_frames):
            keyframes = tuple(header.seconds(int(k) - header.start_pts) for k in index[0])
    width, height = _display_size(header)
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(
        duration_seconds=duration_seconds,
        fps=fps,
        num_frames=num_frames,
        num_frames_exact=exact,
        width=width,
        height=height,
        codec=header.codec,
        rotation=rotation,
        keyframe_seconds=keyframes,
        container_format=header.format_name,
    )


def _display_size(header: Header) -> tuple[int, int]:
    sar = header.sample_aspect_ratio
    if sar == 1:
        return header.width, header.height
    return max(1, round(header.width * sar)), header.height

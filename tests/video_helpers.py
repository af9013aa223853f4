"""Ground truth for decoder tests: decode every frame the plain way and read back the drawn indices."""

from __future__ import annotations

import io
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from vitaclip.samples import read_frame_index


@dataclass(frozen=True)
class Truth:
    """Every frame of a sample video in presentation order."""

    pts_seconds: np.ndarray  # [N] seconds from the first frame
    indices: list[int]  # [N] the index drawn on each frame
    keyframe_seconds: list[float]
    width: int  # displayed
    height: int


def ground_truth(path: str | os.PathLike[str]) -> Truth:
    """Decode all frames sequentially with PyAV (no seeking), apply rotation, read each frame's index."""
    pts: list[float] = []
    indices: list[int] = []
    keyframes: list[float] = []
    width = height = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.time_base is not None
        for frame in _decoded(container.demux(stream)):
            assert frame.pts is not None
            seconds = float(frame.pts * stream.time_base)
            image = np.rot90(frame.to_ndarray(format="rgb24"), k=round(frame.rotation / 90) % 4)
            pts.append(seconds)
            indices.append(read_frame_index(image))
            if frame.key_frame:
                keyframes.append(seconds)
            height, width = image.shape[:2]
    start = pts[0]
    return Truth(
        pts_seconds=np.asarray(pts) - start,
        indices=indices,
        keyframe_seconds=[k - start for k in keyframes],
        width=width,
        height=height,
    )


def _decoded(packets: Iterator[av.Packet]) -> Iterator[av.VideoFrame]:
    for packet in packets:
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            continue  # the last packet of a cut-off file
        for frame in frames:
            assert isinstance(frame, av.VideoFrame)
            yield frame


def frame_at(truth: Truth, seconds: float) -> int:
    """Position (in presentation order) of the frame on screen at ``seconds``: the last one starting at or before it.

    Written independently of ``vitaclip.video.sampling`` on purpose, as a plain loop.
    """
    position = 0
    for k, pts in enumerate(truth.pts_seconds):
        if pts <= seconds + 1e-6:
            position = k
    return position


def expected_uniform(truth: Truth, duration: float, num_frames: int, *, start: float = 0.0) -> list[int]:
    return [truth.indices[frame_at(truth, start + (i + 0.5) * duration / num_frames)] for i in range(num_frames)]


def clip_indices(frames: np.ndarray) -> list[int]:
    return [read_frame_index(frame) for frame in frames]


class CountingReader(io.RawIOBase):
    """A seekable binary reader over a file that counts bytes read (like an S3 object read by ranged GETs)."""

    def __init__(self, path: Path, *, delay_seconds: float = 0.0) -> None:
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.size = os.path.getsize(path)
        self.bytes_read = 0
        self.reads = 0
        self.delay_seconds = delay_seconds

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.delay_seconds:
            time.sleep(self.delay_seconds)
        data = self._file.read(-1 if size is None else size)
        self.bytes_read += len(data)
        self.reads += 1
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        super().close()


def write_avi_with_b_frames(path: Path, *, num_frames: int, fps: int = 24) -> Path:
    """H.264 with B-frames in AVI: the container keeps decode order only, so frame timestamps come out of order.

    ``write_sample_video`` refuses this combination on purpose; decoders must still cope with such files.
    """
    from vitaclip.samples import render_frame

    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream(
            "libx264", rate=fps, options={"preset": "veryfast", "x264-params": "keyint=12:min-keyint=12:bframes=2"}
        )
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(render_frame(index, width=128, height=96), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_indexed_video(
    path: Path,
    *,
    num_frames: int = 48,
    fps: int = 24,
    first_pts: int = 0,
    audio_seconds: float = 0.0,
    preview_track: bool = False,
    container_options: dict[str, str] | None = None,
) -> Path:
    """H.264 frames drawing their index (``vitaclip.samples.render_frame``), in the container of ``path``'s extension.

    Args:
        first_pts: The first frame's timestamp in frames (a recording cut from a longer one starts late).
        audio_seconds: Add a silent AAC track this long (it may run past the video).
        preview_track: Put a one-frame MJPEG track without the default flag before the video, which is flagged
            default (a thumbnail track some tools write).
        container_options: Muxer options, for example ``{"movflags": "faststart"}``.
    """
    from fractions import Fraction

    from vitaclip.samples import render_frame

    with av.open(str(path), "w", options=container_options or {}) as container:
        if preview_track:
            preview = container.add_stream("mjpeg", rate=1)
            preview.width, preview.height, preview.pix_fmt = 64, 48, "yuvj420p"
            preview.disposition = av.stream.Disposition(0)
        stream = container.add_stream(
            "libx264", rate=fps, options={"preset": "veryfast", "x264-params": f"keyint={fps}:bframes=2"}
        )
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        stream.disposition = av.stream.Disposition.default
        audio = container.add_stream("aac", rate=48000, layout="mono") if audio_seconds > 0 else None
        if preview_track:
            still = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 200, np.uint8), format="rgb24")
            still = still.reformat(format="yuvj420p")
            still.pts, still.time_base = 0, Fraction(1, 1)
            for packet in [*preview.encode(still), *preview.encode(None)]:
                container.mux(packet)
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(render_frame(index, width=128, height=96), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = first_pts + index, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        if audio is not None:
            for k in range(round(audio_seconds * 48000 / 1024)):
                silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                silence.sample_rate, silence.pts, silence.time_base = 48000, k * 1024, Fraction(1, 48000)
                for packet in audio.encode(silence):
                    container.mux(packet)
            for packet in audio.encode(None):
                container.mux(packet)
    return path


def _mp4_boxes(data: bytes | bytearray, path: list[str], start: int = 0, end: int | None = None) -> Iterator[int]:
    """Offsets of the bodies of the boxes at ``path`` (``["moov", "trak", "mdhd"]``), in file order."""
    end = len(data) if end is None else end
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        size = size or end - offset
        if kind.decode("latin1") == path[0]:
            if len(path) == 1:
                yield offset + 8
            else:
                yield from _mp4_boxes(data, path[1:], offset + 8, offset + size)
        offset += size


def trim_mp4_start(source: Path, out: Path, *, seconds: float) -> Path:
    """Copy an MP4 whose first track's edit list starts ``seconds`` later (a phone's trim-in-place export): players
    show the frames from there, the samples before it stay in the file (those after the last keyframe flagged
    discarded by the demuxer, to decode from it)."""
    data = bytearray(source.read_bytes())
    mvhd = next(_mp4_boxes(data, ["moov", "mvhd"]))
    movie_scale = struct.unpack(">I", data[mvhd + 12 : mvhd + 16])[0]  # version 0 boxes, as FFmpeg writes them
    mdhd = next(_mp4_boxes(data, ["moov", "trak", "mdia", "mdhd"]))
    media_scale = struct.unpack(">I", data[mdhd + 12 : mdhd + 16])[0]
    elst = next(_mp4_boxes(data, ["moov", "trak", "edts", "elst"]))
    assert data[elst] == 0, "version 0 edit list expected"
    entry = elst + 8 + 12 * (struct.unpack(">I", data[elst + 4 : elst + 8])[0] - 1)  # the last (played) entry
    segment, media_time = struct.unpack(">Ii", data[entry : entry + 8])
    new = (segment - round(seconds * movie_scale), media_time + round(seconds * media_scale))
    struct.pack_into(">Ii", data, entry, *new)
    out.write_bytes(bytes(data))
    return out


def _ebml_number(data: bytes | bytearray, offset: int, *, keep_marker: bool) -> tuple[int, int]:
    """An EBML variable-length number at `offset`: (value, length). IDs keep their length marker, sizes drop it."""
    length = 1
    while length <= 8 and not data[offset] & (0x80 >> (length - 1)):
        length += 1
    value = int.from_bytes(data[offset : offset + length], "big")
    return (value if keep_marker else value & ((1 << (7 * length)) - 1)), length


def _block_times(data: bytes | bytearray, start: int, end: int) -> Iterator[tuple[bool, int, int]]:
    """(is a block's, offset, length) of the times in the Matroska clusters between `start` and `end`: each
    cluster's timestamp, then its (Simple)Blocks' 16-bit timestamps relative to it, in file order."""
    offset = start
    while offset < end:
        element, id_length = _ebml_number(data, offset, keep_marker=True)
        size, size_length = _ebml_number(data, offset + id_length, keep_marker=False)
        body = offset + id_length + size_length
        if size == (1 << (7 * size_length)) - 1:  # unknown size: runs to the end of its parent
            size = end - body
        if element in (0x18538067, 0x1F43B675, 0xA0):  # Segment, Cluster, BlockGroup
            yield from _block_times(data, body, body + size)
        elif element == 0xE7:  # the cluster's timestamp
            yield False, body, size
        elif element in (0xA3, 0xA1):  # SimpleBlock, Block: track number, then the timestamp
            yield True, body + _ebml_number(data, body, keep_marker=False)[1], 2
        offset = body + size


def write_mkv_with_block_times(path: Path, block_ms: list[int], *, fps: int = 12) -> Path:
    """An intra-only (FFV1) Matroska video of ``len(block_ms)`` indexed frames whose blocks carry the given times
    (milliseconds) in file order, as a broken muxer or a careless edit could leave them."""
    from vitaclip.samples import render_frame

    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for index in range(len(block_ms)):
            frame = av.VideoFrame.from_ndarray(render_frame(index, width=128, height=96), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = bytearray(path.read_bytes())
    times = list(_block_times(data, 0, len(data)))
    blocks = [offset for is_block, offset, _ in times if is_block]
    assert len(blocks) == len(block_ms), "one block per frame expected"
    for is_block, offset, length in times:
        if not is_block:
            data[offset : offset + length] = bytes(length)  # every cluster at 0: block times are the times
    for offset, ms in zip(blocks, block_ms, strict=True):
        struct.pack_into(">h", data, offset, ms)
    path.write_bytes(bytes(data))
    return path


def write_concatenated_ts(path: Path, *, parts: int = 2, frames_per_part: int = 40, fps: int = 2) -> Path:
    """MPEG-TS files of indexed frames joined byte by byte (``cat a.ts b.ts``): each part's timestamps start again
    at zero, the frame index runs on across parts."""
    from vitaclip.samples import render_frame

    data = b""
    for part in range(parts):
        one = path.with_name(f"{path.stem}-part{part}.ts")
        with av.open(str(one), "w", format="mpegts") as container:
            stream = container.add_stream("mpeg2video", rate=fps, options={"qscale": "2"})
            stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
            stream.codec_context.gop_size = 10
            for index in range(frames_per_part):
                picture = render_frame(part * frames_per_part + index, width=128, height=96)
                for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        data += one.read_bytes()
        one.unlink()
    path.write_bytes(data)
    return path


def with_stray_pid(source: Path, out: Path, *, after: float = 1 / 3) -> Path:
    """An MPEG-TS whose first video PES start past `after` of the file moves to a PID no table names (a bit error in
    a broadcast capture, or a private stream): FFmpeg adds a stream for it while demuxing, after the header."""
    data = bytearray(source.read_bytes())
    pat = data[:188]
    assert pat[0] == 0x47
    for k in range(int(len(data) * after) // 188, len(data) // 188):
        p = k * 188
        pid = ((data[p + 1] & 0x1F) << 8) | data[p + 2]
        if data[p] == 0x47 and data[p + 1] & 0x40 and pid == 0x100:  # a PES start on the video PID (PyAV's 0x100)
            data[p + 1] = (data[p + 1] & 0xE0) | 0x14  # PID 0x100 -> 0x1400
            break
    else:
        raise AssertionError("no video PES start found")
    out.write_bytes(bytes(data))
    return out


def write_marked_mp4(path: Path, *, width: int = 64, height: int = 32) -> Path:
    """An H.264 MP4 whose pictures are black with a white square in the top-left corner (orientation checks)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        picture = np.zeros((height, width, 3), np.uint8)
        picture[: height // 4, : height // 4] = 255
        for _ in range(6):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def with_display_matrix(source: Path, out: Path, matrix: tuple[int, int, int, int]) -> Path:
    """A copy of an MP4 whose (first) track header holds the display matrix a, b, c, d (as -1, 0 or 1)."""
    data = bytearray(source.read_bytes())
    tkhd = next(_mp4_boxes(data, ["moov", "trak", "tkhd"]))
    assert data[tkhd] == 0, "version 0 track header expected"
    a, b, c, d = (v << 16 for v in matrix)  # 16.16 fixed point; u, v, w: 0, 0, 1 (2.30)
    struct.pack_into(">9i", data, tkhd + 40, a, b, 0, c, d, 0, 0, 0, 1 << 30)
    out.write_bytes(bytes(data))
    return out

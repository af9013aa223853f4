"""What a search may start from besides text: an uploaded picture or short clip, a raw embedding, a stored row.

Everything here turns untrusted input into one L2-normalised float32 query vector, or raises `QueryError` with a
message that is safe to send back (no paths, no internals).

Uploads are bounded before anything is decoded: a picture's size and shape come from its header, and JPEG data
(a picture, or the frames of a Motion-JPEG clip) may hold only a few scans. A progressive JPEG is decoded one scan
at a time over the whole picture, so a small file with thousands of cheap scans would keep a query slot for
minutes, and neither libjpeg nor FFmpeg can be stopped inside one picture.
"""

from __future__ import annotations

import io
import math
import re
import time
from typing import Any, Literal

import numpy as np

from vitaclip.video import DEFAULT_MAX_PIXELS, Uniform, VideoDecodeError, decode_clip, open_options
from vitaclip.video.transforms import frame_to_rgb

MAX_UPLOAD_PIXELS = 4096 * 4096
UPLOAD_DECODE_SECONDS = 10.0
# Encoders write 10 scans for a progressive colour JPEG (6 for grey), 1 for a baseline one; each scan is a pass
# over every block of the picture (about 1 ms at 4096x4096 even when it holds nothing).
MAX_JPEG_SCANS = 64
# A JPEG's markers outside its scans (tables, metadata): real files have tens.
MAX_JPEG_MARKERS = 1000
# The longer side over the shorter one: a picture is scaled so that its shorter side is the model's input size
# before the centre square is cut, so a 1x3400 picture would become 224x761600 (500 MB) for one query.
MAX_ASPECT_RATIO = 16
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_PICTURE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")  # what `is_image` lets through: no other Pillow plugin
# A marker: 0xFF then a byte that is not a stuffed zero, a fill byte, a restart marker (RST0-7, inside scans) or
# TEM. Fill bytes before a marker are skipped by matching only the last 0xFF of a run.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\x01\xff\xd0-\xd7]")
_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA


class QueryError(ValueError):
    """A query that cannot be answered as given; the message is meant for the client."""


class UploadTimeout(QueryError):
    """An upload whose checks and decoding took longer than `UPLOAD_DECODE_SECONDS`: a long or high-resolution
    clip, or a busy service; not proof that the file is broken (answered 503, not 400)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"decoding the upload took longer than the service's {seconds:g} s limit (a long or high-resolution clip, "
            "or a busy service): send a shorter or smaller clip, or try again later"
        )


class StorageUnavailable(Exception):
    """The output's storage failed a read a query needs (a stored vector, a thumbnail): not the query's fault, and
    not a row that is gone (answered 503: try again)."""


def is_image(data: bytes) -> bool:
    """Whether `data` starts like a JPEG, PNG, GIF, BMP or WebP picture (anything else is tried as a video)."""
    return data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def jpeg_scan_count(
    data: bytes | memoryview, *, pictures: Literal["first", "all"] = "first", stop_after: int = MAX_JPEG_SCANS
) -> int:
    """The start-of-scan markers in JPEG `data`, counted up to ``stop_after + 1``, without decoding anything.

    Segments are skipped by their declared lengths (metadata may hold any bytes) and scan data up to the next
    marker, as libjpeg and FFmpeg read them. `pictures`: "first" stops at the first end-of-image marker, as libjpeg
    does (a phone may append a video to a photo); "all" counts every picture, for a Motion-JPEG packet (FFmpeg
    decodes both fields of an interlaced frame from one packet).

    Raises:
        QueryError: more than `MAX_JPEG_MARKERS` segments (a file made of nothing but tiny segments).
    """
    scans, markers, position = 0, 0, 0
    while scans <= stop_after:
        found = _JPEG_MARKER.search(data, position)
        if found is None:
            break
        marker, position = data[found.start() + 1], found.end()
        if marker == _EOI and pictures == "first":
            break
        if marker in (_SOI, _EOI):
            continue  # no length follows
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise QueryError(f"the upload's JPEG data has more than {MAX_JPEG_MARKERS} segments")
        if marker == _SOS:
            scans += 1
        position += max(2, int.from_bytes(data[position : position + 2], "big"))  # then scan data or a marker
    return scans


def _check_jpeg(data: bytes | memoryview, what: str, pictures: Literal["first", "all"]) -> None:
    if jpeg_scan_count(data, pictures=pictures) > MAX_JPEG_SCANS:
        raise QueryError(f"{what} has more than {MAX_JPEG_SCANS} JPEG scans (refused before decoding)")


def _check_shape(width: int, height: int, what: str) -> None:
    """Refuses pictures too large to decode or too thin to scale (see `MAX_ASPECT_RATIO`)."""
    if width * height > MAX_UPLOAD_PIXELS:
        raise QueryError(f"{what} is {width}x{height}; at most {MAX_UPLOAD_PIXELS} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise QueryError(f"{what} is {width}x{height}; its sides may be at most {MAX_ASPECT_RATIO} to 1")


def image_frames(data: bytes, *, num_frames: int, size: int) -> np.ndarray:
    """A still picture as a clip of `num_frames` identical frames, ``[T, size, size, 3]`` uint8, cropped as the job
    crops video frames (shorter side to `size`, centre square)."""
    import av
    from PIL import Image, UnidentifiedImageError

    if data.startswith(b"\xff\xd8"):
        _check_jpeg(data, "the picture", "first")
    try:
        with Image.open(io.BytesIO(data), formats=_PICTURE_FORMATS) as picture:
            _check_shape(picture.width, picture.height, "the picture")
            rgb = np.asarray(picture.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise QueryError(f"the upload is not a readable picture ({type(exc).__name__})") from None
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    square = frame_to_rgb(frame, size=size)
    return np.repeat(square[None], num_frames, axis=0)


def check_clip(data: bytes, *, timeout_seconds: float = UPLOAD_DECODE_SECONDS) -> None:
    """Refuses, before decoding, a clip whose video is too thin to scale or whose JPEG frames (Motion JPEG) hold too
    many scans: the decoder's time limit is checked between frames, and one such frame took 13 s. Reads packets
    only; what cannot be opened here is left for the decoder to report."""
    import av

    try:
        container = av.open(
            io.BytesIO(data),
            "r",
            container_options=open_options(is_path=False),  # an upload never opens files or sockets
            timeout=(timeout_seconds, timeout_seconds),
        )
    except (av.error.FFmpegError, OSError, ValueError):
        return
    with container:
        streams = list(container.streams.video)
        for stream in streams:
            width, height = stream.codec_context.width, stream.codec_context.height
            if width and height:
                _check_shape(width, height, "the clip's picture")
        jpeg = [s for s in streams if "jpeg" in (s.codec_context.name or "")]
        if not jpeg:
            return
        deadline = time.monotonic() + timeout_seconds
        try:
            for packet in container.demux(jpeg):
                if packet.size:
                    _check_jpeg(memoryview(packet), "a frame of the clip", "all")
                if time.monotonic() > deadline:
                    raise UploadTimeout(timeout_seconds)
        except av.error.FFmpegError:
            return  # damaged data: the decoder reports it
        except IndexError:
            return  # PyAV's end of a demux where a stream appeared midway: every packet has been checked


def video_frames(data: bytes, *, num_frames: int, size: int) -> np.ndarray:
    """`num_frames` frames sampled uniformly from an uploaded clip, as the job samples whole videos.

    Checking and decoding share one `UPLOAD_DECODE_SECONDS` limit: each with its own held a query slot twice as long.
    """
    deadline = time.monotonic() + UPLOAD_DECODE_SECONDS
    check_clip(data, timeout_seconds=UPLOAD_DECODE_SECONDS)
    left = deadline - time.monotonic()
    if left <= 0:
        raise UploadTimeout(UPLOAD_DECODE_SECONDS)
    try:
        clip = decode_clip(
            data,
            Uniform(num_frames),
            size=size,
            timeout_seconds=left,
            max_pixels=min(DEFAULT_MAX_PIXELS, MAX_UPLOAD_PIXELS),
        )
    except VideoDecodeError as exc:
        if exc.reason == "timeout":
            raise UploadTimeout(UPLOAD_DECODE_SECONDS) from None
        raise QueryError(f"the upload is not a decodable picture or video ({exc.reason})") from None
    return np.asarray(clip.frames)


def upload_frames(data: bytes, *, num_frames: int, size: int) -> np.ndarray:
    """The frames a query upload stands for: a picture repeated, or a video's uniformly sampled frames.

    Raises:
        QueryError: the upload cannot be used; any `OSError` of reading it is one (FFmpeg's errors are OSErrors,
            `FileNotFoundError` among them): an upload is the client's data, never the service's fault.
    """
    if not data:
        raise QueryError("the upload is empty")
    try:
        if is_image(data):
            return image_frames(data, num_frames=num_frames, size=size)
        return video_frames(data, num_frames=num_frames, size=size)
    except OSError as exc:
        raise QueryError(f"the upload is not a decodable picture or video ({type(exc).__name__})") from None


def embedding_query(values: Any, dim: int) -> np.ndarray:
    """A client's raw embedding as a unit-length ``[dim]`` float32 vector.

    Raises:
        QueryError: wrong length, a value that is not a finite number, the zero vector, or a vector whose length
            is not a finite number (values near the largest float: their squares overflow).
    """
    try:
        vector = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise QueryError("the embedding must be a list of numbers") from None
    if vector.ndim != 1 or vector.shape[0] != dim:
        got = vector.shape[0] if vector.ndim == 1 else f"shape {list(vector.shape)}"
        raise QueryError(f"the embedding must have {dim} numbers (the index's dimension), got {got}")
    if not np.isfinite(vector).all():
        raise QueryError("the embedding holds a value that is not a finite number")
    with np.errstate(over="ignore", under="ignore"):
        norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm):
        raise QueryError("the embedding's length is not a finite number (its values are too large)")
    if norm == 0.0:  # or values so small that their squares underflow (1e-200): scaled up, their direction stays
        scale = float(np.abs(vector).max())
        if scale == 0.0:
            raise QueryError("the embedding is the zero vector")
        vector = vector / scale
        norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32)

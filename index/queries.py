"""What a search may start from besides text: an uploaded picture or short clip, a raw embedding, a stored row.

Everything here turns untrusted input into one L2-normalised float32 query vector, or raises `QueryError` with a
message that is safe to send back (no paths, no internals).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from vitaclip.video import DEFAULT_MAX_PIXELS, Uniform, VideoDecodeError, decode_clip
from vitaclip.video.transforms import frame_to_rgb

MAX_UPLOAD_PIXELS = 4096 * 4096
UPLOAD_DECODE_SECONDS = 10.0
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


class QueryError(ValueError):
    """A query that cannot be answered as given; the message is meant for the client."""


def is_image(data: bytes) -> bool:
    """Whether `data` starts like a JPEG, PNG, GIF, BMP or WebP picture (anything else is tried as a video)."""
    return data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def image_frames(data: bytes, *, num_frames: int, size: int) -> np.ndarray:
    """A still picture as a clip of `num_frames` identical frames, ``[T, size, size, 3]`` uint8, cropped as the job
    crops video frames (shorter side to `size`, centre square)."""
    import av
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as picture:
            if picture.width * picture.height > MAX_UPLOAD_PIXELS:
                raise QueryError(f"the picture is {picture.width}x{picture.height}; at most {MAX_UPLOAD_PIXELS} pixels")
            rgb = np.asarray(picture.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise QueryError(f"the upload is not a readable picture ({type(exc).__name__})") from None
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    square = frame_to_rgb(frame, size=size)
    return np.repeat(square[None], num_frames, axis=0)


def video_frames(data: bytes, *, num_frames: int, size: int) -> np.ndarray:
    """`num_frames` frames sampled uniformly from an uploaded clip, as the job samples whole videos."""
    try:
        clip = decode_clip(
            data,
            Uniform(num_frames),
            size=size,
            timeout_seconds=UPLOAD_DECODE_SECONDS,
            max_pixels=min(DEFAULT_MAX_PIXELS, MAX_UPLOAD_PIXELS),
        )
    except VideoDecodeError as exc:
        raise QueryError(f"the upload is not a decodable picture or video ({exc.reason})") from None
    return np.asarray(clip.frames)


def upload_frames(data: bytes, *, num_frames: int, size: int) -> np.ndarray:
    """The frames a query upload stands for: a picture repeated, or a video's uniformly sampled frames."""
    if not data:
        raise QueryError("the upload is empty")
    if is_image(data):
        return image_frames(data, num_frames=num_frames, size=size)
    return video_frames(data, num_frames=num_frames, size=size)


def embedding_query(values: Any, dim: int) -> np.ndarray:
    """A client's raw embedding as a unit-length ``[dim]`` float32 vector.

    Raises:
        QueryError: wrong length, a value that is not a finite number, or the zero vector.
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
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise QueryError("the embedding is the zero vector")
    return (vector / norm).astype(np.float32)

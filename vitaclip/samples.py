"""Deterministic synthetic videos for tests, benchmarks and the README's first command.

Frames drawn with ``pattern="index"`` carry their own frame index as a 4x4 grid of large black and white cells in
the centre square of the picture, so a decoder test can read back which frame it got even after compression, a
resize to the model size and a centre crop. ``pattern="shape"`` draws a coloured disc moving over a panning texture,
which looks like something (a sample for zero-shot labelling) and costs a realistic amount to decode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np

__all__ = [
    "SampleCodec",
    "SamplePattern",
    "INDEX_MODULUS",
    "available_sample_codecs",
    "render_frame",
    "read_frame_index",
    "sample_frame_times",
    "write_sample_video",
]

SampleCodec = Literal["h264", "hevc", "vp9", "av1", "mpeg4", "mpeg2"]
SamplePattern = Literal["index", "shape"]

# Candidate encoders per codec, first available wins.
_ENCODERS: dict[str, tuple[str, ...]] = {
    "h264": ("libx264",),
    "hevc": ("libx265",),
    "vp9": ("libvpx-vp9",),
    "av1": ("libsvtav1", "libaom-av1", "librav1e"),
    "mpeg4": ("mpeg4",),
    "mpeg2": ("mpeg2video",),
}
_CONTAINERS = {
    ".mp4": "mp4",
    ".mov": "mov",
    ".mkv": "matroska",
    ".webm": "webm",
    ".avi": "avi",
    ".ts": "mpegts",  # broadcast and HLS segments; seeks land on any packet, not on keyframes
    ".mpg": "mpeg",  # MPEG program stream
}

# Code layout: a 4x4 grid; the four corners are orientation markers (only the top-left one is white), the other
# twelve cells hold 11 index bits and one even-parity bit.
_GRID = 4
_MARGIN = 0.1  # of the centre square, on each side
_CORNERS = {(0, 0): 1, (0, _GRID - 1): 0, (_GRID - 1, 0): 0, (_GRID - 1, _GRID - 1): 0}
_DATA_CELLS = [(r, c) for r in range(_GRID) for c in range(_GRID) if (r, c) not in _CORNERS]
_INDEX_BITS = len(_DATA_CELLS) - 1
INDEX_MODULUS = 1 << _INDEX_BITS
"""Frame indices are coded modulo this (2048)."""


def _encoder_name(codec: str) -> str | None:
    for name in _ENCODERS.get(codec, ()):
        try:
            av.codec.Codec(name, "w")
        except ValueError:  # UnknownCodecError: not built into this FFmpeg
            continue
        return name
    return None


def available_sample_codecs() -> tuple[str, ...]:
    """Codecs that ``write_sample_video`` can encode with the FFmpeg bundled in PyAV."""
    return tuple(codec for codec in _ENCODERS if _encoder_name(codec) is not None)


def sample_frame_times(
    num_frames: int, *, fps: int = 24, vfr: bool = False, seed: int = 0
) -> tuple[list[int], list[int], Fraction]:
    """Presentation timestamps and durations that ``write_sample_video`` gives its frames.

    Returns:
        ``(pts, durations, time_base)``: integer ticks of ``time_base`` per frame. With ``vfr`` the durations vary
        between half and one and a half nominal frame intervals, so the average rate stays near ``fps``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    if not vfr:
        return list(range(num_frames)), [1] * num_frames, Fraction(1, fps)
    rng = np.random.default_rng(seed + 7919)
    durations = [int(d) for d in rng.integers(2, 7, size=num_frames)]  # quarter-frame ticks: 0.5x .. 1.5x
    pts = [0]
    for duration in durations[:-1]:
        pts.append(pts[-1] + duration)
    return pts, durations, Fraction(1, 4 * fps)


def _code_square(height: int, width: int) -> tuple[int, int, int]:
    """Top, left and side of the square that holds the code: the centre square minus a margin."""
    side = min(height, width)
    margin = int(round(side * _MARGIN))
    inner = side - 2 * margin
    return (height - side) // 2 + margin, (width - side) // 2 + margin, inner


def _cell_box(top: int, left: int, inner: int, row: int, col: int) -> tuple[int, int, int, int]:
    y0 = top + (row * inner) // _GRID
    y1 = top + ((row + 1) * inner) // _GRID
    x0 = left + (col * inner) // _GRID
    x1 = left + ((col + 1) * inner) // _GRID
    return y0, y1, x0, x1


def _code_bits(index: int) -> dict[tuple[int, int], int]:
    value = index % INDEX_MODULUS
    bits = [(value >> b) & 1 for b in range(_INDEX_BITS)]
    bits.append(sum(bits) % 2)
    cells = dict(_CORNERS)
    cells.update(zip(_DATA_CELLS, bits, strict=True))
    return cells


class _Background:
    """A smooth random texture that pans one step per frame (cheap to render, realistic to encode)."""

    def __init__(self, height: int, width: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        block = 8
        coarse = rng.integers(40, 216, size=(height // block + 2, width // block + 2, 3), dtype=np.uint8)
        texture = np.repeat(np.repeat(coarse, block, axis=0), block, axis=1)[:height, :width].astype(np.int16)
        texture += rng.integers(-12, 13, size=texture.shape, dtype=np.int16)
        texture = np.clip(texture, 0, 255).astype(np.uint8)
        self._tiled = np.concatenate([texture, texture], axis=1)  # [H, 2W, 3]
        self._width = width

    def at(self, index: int) -> np.ndarray:
        offset = (2 * index) % self._width
        return self._tiled[:, offset : offset + self._width].copy()  # [H, W, 3]


def _draw_index(image: np.ndarray, index: int) -> None:
    height, width = image.shape[:2]
    top, left, inner = _code_square(height, width)
    # A grey frame around the grid keeps the outer cells' edges sharp against the texture.
    image[top : top + inner, left : left + inner] = 128
    for (row, col), bit in _code_bits(index).items():
        y0, y1, x0, x1 = _cell_box(top, left, inner, row, col)
        pad_y, pad_x = max(1, (y1 - y0) // 10), max(1, (x1 - x0) // 10)
        image[y0 + pad_y : y1 - pad_y, x0 + pad_x : x1 - pad_x] = 255 if bit else 0


def _draw_shape(image: np.ndarray, index: int, num_frames: int, seed: int) -> None:
    height, width = image.shape[:2]
    rng = np.random.default_rng(seed + 1)
    colour = np.array([230, 40, 40]) if seed == 0 else rng.integers(0, 256, size=3)
    radius = max(2, min(height, width) // 6)
    phase = 2 * np.pi * index / max(num_frames, 1)
    cy = height / 2 + (height / 2 - radius - 1) * 0.8 * np.sin(phase)
    cx = width / 2 + (width / 2 - radius - 1) * 0.8 * np.cos(phase)
    ys, xs = np.ogrid[:height, :width]
    mask = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
    image[mask] = colour.astype(np.uint8)


def render_frame(
    index: int,
    *,
    width: int,
    height: int,
    num_frames: int = 48,
    pattern: SamplePattern = "index",
    seed: int = 0,
    background: _Background | None = None,
) -> np.ndarray:
    """Render frame ``index`` as it should be displayed (before any rotation metadata).

    Returns:
        uint8 RGB array ``[height, width, 3]``.
    """
    bg = background if background is not None else _Background(height, width, seed)
    image = bg.at(index)  # [H, W, 3]
    if pattern == "index":
        _draw_index(image, index)
    elif pattern == "shape":
        _draw_shape(image, index, num_frames, seed)
    else:
        raise ValueError(f"pattern must be 'index' or 'shape', got {pattern!r}")
    return image


def read_frame_index(frame: np.ndarray) -> int:
    """Read back the index drawn by ``pattern="index"`` from an upright RGB frame.

    Works on the full frame and on a resized or centre-cropped version of it (the code sits in the centre square).

    Args:
        frame: uint8 ``[H, W, 3]`` RGB (or ``[H, W]`` grey).

    Returns:
        The frame index modulo ``INDEX_MODULUS``.

    Raises:
        ValueError: the code is unreadable: a cell is neither clearly black nor clearly white, the orientation markers
            do not match (for example a frame whose rotation was not applied), or the parity check fails.
    """
    if frame.ndim == 3:
        grey = frame.astype(np.float32).mean(axis=2)
    elif frame.ndim == 2:
        grey = frame.astype(np.float32)
    else:
        raise ValueError(f"expected a [H, W, 3] or [H, W] frame, got shape {frame.shape}")
    height, width = grey.shape
    top, left, inner = _code_square(height, width)
    if inner < 2 * _GRID:
        raise ValueError(f"frame {width}x{height} is too small to hold a code")
    bits: dict[tuple[int, int], int] = {}
    for row in range(_GRID):
        for col in range(_GRID):
            y0, y1, x0, x1 = _cell_box(top, left, inner, row, col)
            qy, qx = (y1 - y0) // 4, (x1 - x0) // 4
            level = float(grey[y0 + qy : y1 - qy, x0 + qx : x1 - qx].mean())
            if level < 80:
                bits[(row, col)] = 0
            elif level > 175:
                bits[(row, col)] = 1
            else:
                raise ValueError(f"cell ({row}, {col}) is ambiguous (mean level {level:.0f})")
    for cell, expected in _CORNERS.items():
        if bits[cell] != expected:
            raise ValueError("orientation markers do not match: the frame is rotated, flipped or not a sample frame")
    data = [bits[cell] for cell in _DATA_CELLS]
    if sum(data) % 2:
        raise ValueError("parity check failed")
    return sum(bit << b for b, bit in enumerate(data[:_INDEX_BITS]))


def _encoder_options(codec: str, encoder: str, *, gop: int, bframes: int) -> dict[str, str]:
    if codec == "h264":
        # mbtree off: with it, libx264's bytes for small pictures varied with what other encoders (libvpx) had run
        # earlier in the process, and a sample video must be a function of its arguments alone.
        params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:mbtree=0"
        return {"preset": "veryfast", "crf": "20", "x264-params": params}
    if codec == "hevc":
        params = f"log-level=error:keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}"
        return {"preset": "ultrafast", "crf": "22", "x265-params": params}
    if codec == "vp9":
        # Alternate reference frames (hidden frames packed into superframes) stand in for B-frames.
        altref = "1" if bframes > 0 else "0"
        return {
            "deadline": "good",
            "cpu-used": "8",
            "crf": "28",
            "b": "0",
            "g": str(gop),
            "auto-alt-ref": altref,
            "lag-in-frames": "16" if bframes > 0 else "0",
        }
    if codec == "av1":
        if encoder == "libsvtav1":
            return {"preset": "12", "crf": "30", "g": str(gop)}
        return {"cpu-used": "8", "crf": "30", "g": str(gop)}
    return {"qscale": "3", "g": str(gop)}  # mpeg4


def _default_pix_fmt(codec: str, width: int, height: int) -> str:
    # libx264/libx265 refuse 4:2:0 with odd dimensions; 4:4:4 keeps odd sizes encodable.
    if codec in ("h264", "hevc") and (width % 2 or height % 2):
        return "yuv444p"
    return "yuv420p"


def _coded_frames(
    num_frames: int,
    *,
    width: int,
    height: int,
    coded_width: int,
    rotation: int,
    pattern: SamplePattern,
    seed: int,
) -> Iterator[np.ndarray]:
    background = _Background(height, width, seed)
    turns = (rotation // 90) % 4
    # Non-square pixels: store fewer (or more) columns than are displayed; players stretch them back.
    columns = None if turns or coded_width == width else (np.arange(coded_width) * width) // coded_width
    for index in range(num_frames):
        display = render_frame(
            index, width=width, height=height, num_frames=num_frames, pattern=pattern, seed=seed, background=background
        )
        if columns is not None:
            display = display[:, columns]
        # Store the picture turned clockwise; the display matrix turns it back counter-clockwise.
        yield np.ascontiguousarray(np.rot90(display, k=-turns))


@dataclass(frozen=True)
class _SampleLayout:
    """How a sample video is stored: container, encoder, GOP, B-frames, turns, coded size, pixel shape and format."""

    container_format: str
    encoder: str
    gop: int
    bframes: int
    turns: int
    coded_width: int
    coded_height: int
    sar: Fraction
    pix_fmt: str

    def add_stream(self, container: Any, *, codec: str, fps: int, time_base: Fraction) -> Any:
        stream = container.add_stream(
            self.encoder, rate=fps, options=_encoder_options(codec, self.encoder, gop=self.gop, bframes=self.bframes)
        )
        stream.width = self.coded_width
        stream.height = self.coded_height
        stream.pix_fmt = self.pix_fmt
        stream.codec_context.time_base = time_base
        if self.sar != 1:
            stream.codec_context.sample_aspect_ratio = self.sar
        if codec in ("mpeg4", "mpeg2"):
            stream.codec_context.gop_size = self.gop
            stream.codec_context.max_b_frames = self.bframes
        if self.turns:
            stream.set_display_rotation(90 * self.turns)
        return stream


def _sample_layout(
    out: Path,
    *,
    codec: str,
    fps: int,
    width: int,
    height: int,
    gop: int | None,
    bframes: int | None,
    rotation: int,
    pix_fmt: str | None,
    sample_aspect_ratio: Fraction,
) -> _SampleLayout:
    """Checks `write_sample_video`'s arguments and resolves its defaults (see its Raises)."""
    container_format = _CONTAINERS.get(out.suffix.lower())
    if container_format is None:
        raise ValueError(f"unsupported extension {out.suffix!r}; use one of {sorted(_CONTAINERS)}")
    if codec not in _ENCODERS:
        raise ValueError(f"codec must be one of {sorted(_ENCODERS)}, got {codec!r}")
    if rotation % 90 != 0:
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {rotation}")
    if rotation % 360 and container_format == "avi":
        raise ValueError("AVI cannot store rotation metadata")
    if width < 16 or height < 16:
        raise ValueError(f"width and height must be >= 16, got {width}x{height}")
    encoder = _encoder_name(codec)
    if encoder is None:
        raise RuntimeError(f"no {codec} encoder in this FFmpeg build (tried {', '.join(_ENCODERS[codec])})")
    if bframes is None:
        bframes = 0 if codec in ("mpeg4", "av1") or container_format == "avi" else 2
    turns = (rotation // 90) % 4
    coded_width, coded_height = (height, width) if turns % 2 else (width, height)
    sar = Fraction(sample_aspect_ratio)
    if sar != 1:
        if turns or not Fraction(1, 4) <= sar <= 4:
            raise ValueError(f"sample_aspect_ratio must be in [1/4, 4] and used without rotation, got {sar}")
        coded_width = round(width / sar)
    if codec == "hevc" and coded_width < 64:
        # Seen with the libx265 bundled in PyAV: narrower pictures corrupt the heap (glibc aborts later).
        raise ValueError(f"hevc samples need a stored width >= 64, got {coded_width}")
    if bframes and container_format == "avi":
        raise ValueError("AVI stores no presentation timestamps, so it cannot hold B-frames faithfully")
    return _SampleLayout(
        container_format=container_format,
        encoder=encoder,
        gop=gop if gop is not None else 2 * fps,
        bframes=bframes,
        turns=turns,
        coded_width=coded_width,
        coded_height=coded_height,
        sar=sar,
        pix_fmt=pix_fmt or _default_pix_fmt(codec, coded_width, coded_height),
    )


def _short_clip_bframes(codec: str, num_frames: int, bframes: int | None) -> int | None:
    """No B-frames in hevc clips of fewer than 3 frames: libx265 gave them packets without timestamps now and then
    (about one write in four after a VP9 encode in the process), which the MP4 muxer refuses ("pts/dts pair
    unsupported")."""
    if codec != "hevc" or num_frames >= 3:
        return bframes
    if bframes:
        raise ValueError(f"hevc samples of {num_frames} frames cannot have B-frames (got bframes={bframes})")
    return 0


def write_sample_video(
    path: str | os.PathLike[str],
    *,
    num_frames: int = 48,
    fps: int = 24,
    width: int = 320,
    height: int = 240,
    codec: SampleCodec = "h264",
    gop: int | None = None,
    bframes: int | None = None,
    rotation: int = 0,
    pix_fmt: str | None = None,
    vfr: bool = False,
    seed: int = 0,
    pattern: SamplePattern = "index",
    sample_aspect_ratio: Fraction = Fraction(1),
) -> Path:
    """Write a small deterministic video; the container follows the file extension.

    Args:
        path: Output file; ``.mp4``, ``.mov``, ``.mkv``, ``.webm``, ``.avi``, ``.ts`` (MPEG-TS) or ``.mpg`` (MPEG-PS).
        num_frames: Number of frames.
        fps: Nominal frame rate (the average rate when ``vfr`` is set).
        width: Displayed width in pixels (after rotation).
        height: Displayed height in pixels (after rotation).
        codec: ``h264`` (libx264), ``hevc`` (libx265), ``vp9`` (libvpx-vp9), ``av1`` (SVT-AV1 or libaom), ``mpeg4`` or
            ``mpeg2`` (mpeg2video).
        gop: Keyframe interval in frames; defaults to two seconds.
        bframes: Consecutive B-frames (alt-ref frames for VP9); defaults to 2, or 0 for ``mpeg4``, AV1, AVI and
            ``hevc`` clips of fewer than 3 frames.
        rotation: Display rotation in degrees counter-clockwise (0, 90, 180 or 270), stored as a display matrix.
        pix_fmt: Encoder pixel format, for example ``yuv420p10le``; defaults to ``yuv420p`` (``yuv444p`` for odd
            sizes with h264/hevc).
        vfr: Give frames irregular durations (variable frame rate).
        seed: Seed for the texture, the shape colour and the VFR durations.
        pattern: ``index`` draws the frame-index code, ``shape`` a moving coloured disc.
        sample_aspect_ratio: Pixel shape (width / height of one stored pixel); with 2, half as many columns are
            stored as displayed. Only without rotation.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: an unsupported extension, codec, rotation or size, or B-frames in AVI.
        RuntimeError: no encoder for ``codec`` is built into this FFmpeg (see ``available_sample_codecs``).
    """
    out = Path(path)
    bframes = _short_clip_bframes(codec, num_frames, bframes)
    layout = _sample_layout(
        out, codec=codec, fps=fps, width=width, height=height, gop=gop, bframes=bframes, rotation=rotation,
        pix_fmt=pix_fmt, sample_aspect_ratio=sample_aspect_ratio,
    )  # fmt: skip
    pts, durations, time_base = sample_frame_times(num_frames, fps=fps, vfr=vfr, seed=seed)
    frames = _coded_frames(
        num_frames,
        width=width,
        height=height,
        coded_width=layout.coded_width,
        rotation=rotation,
        pattern=pattern,
        seed=seed,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), "w", format=layout.container_format) as container:
        stream = layout.add_stream(container, codec=codec, fps=fps, time_base=time_base)
        for image, frame_pts, duration in zip(frames, pts, durations, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if layout.pix_fmt != "rgb24":
                frame = frame.reformat(format=layout.pix_fmt)
            frame.pts = frame_pts
            frame.time_base = time_base
            frame.duration = duration
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out

"""Picture geometry (resize, centre crop, rotation) and the model's input normalisation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
from av.sidedata.sidedata import SideDataContainer
from av.video.frame import VideoFrame

if TYPE_CHECKING:  # torch is imported where tensors are made: decode workers never need it
    import torch

__all__ = [
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "frame_to_rgb",
    "frames_to_tensor",
    "normalize_frames",
    "resized_size",
]

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(width: int, height: int, *, size: int, sample_aspect_ratio: Fraction = Fraction(1)) -> tuple[int, int]:
    """Width and height after scaling the shorter displayed side to ``size`` (both at least ``size``)."""
    display_width = width * sample_aspect_ratio
    if display_width <= height:
        return size, max(size, round(height * size / display_width))
    return max(size, round(display_width * size / height)), size


def frame_to_rgb(
    frame: VideoFrame, *, size: int, sample_aspect_ratio: Fraction = Fraction(1), square: bool = True
) -> np.ndarray:
    """Scale the shorter side to ``size``, centre-crop a square (unless ``square`` is False) and apply the frame's
    rotation metadata.

    Only the returned picture is scaled; swscale converts and resizes in one pass.

    Returns:
        uint8 ``[size, size, 3]`` RGB, upright; with ``square=False`` the whole picture, ``[H, W, 3]`` with the
        shorter side ``size``.
    """
    out_width, out_height = resized_size(frame.width, frame.height, size=size, sample_aspect_ratio=sample_aspect_ratio)
    rgb = frame.to_ndarray(width=out_width, height=out_height, format="rgb24", interpolation="BILINEAR")  # [h, w, 3]
    crop = rgb
    if square:
        top, left = (out_height - size) // 2, (out_width - size) // 2
        crop = rgb[top : top + size, left : left + size]  # [size, size, 3]
    transpose, flip_columns, flip_rows = display_transform(frame)
    if transpose:
        crop = crop.transpose(1, 0, 2)
    if flip_columns:
        crop = crop[:, ::-1]
    if flip_rows:
        crop = crop[::-1]
    return np.ascontiguousarray(crop)


def display_transform(frame: VideoFrame) -> tuple[bool, bool, bool]:
    """How the frame's display matrix shows the stored picture: (transpose, then flip columns, then flip rows).

    The matrix maps a stored pixel (x, y) to x' = a x + c y, y' = b x + d y (FFmpeg's display matrix). Turns and
    mirror images (front cameras) are those with a, d = +-1 and b = c = 0, or the reverse; any other matrix (all
    zeros, a turn by another angle) is ignored, as players show such pictures as stored."""
    matrix = _display_matrix(frame)
    scale = max((abs(v) for v in matrix), default=0.0) if matrix is not None else 0.0
    if matrix is None or not 0 < scale < math.inf:
        return False, False, False
    a, b, c, d = (0 if abs(v) < 0.01 * scale else (1 if v > 0 else -1) for v in matrix)
    if a and d and not b and not c:
        return False, a < 0, d < 0
    if b and c and not a and not d:
        return True, c < 0, b < 0
    return False, False, False


def display_rotation(frame: VideoFrame) -> int:
    """The turn the frame's display matrix applies, in degrees counter-clockwise (0, 90, 180 or 270; a picture
    stored upright on its side). A mirror image reports the turn that leaves it mirrored left to right."""
    transpose, flip_columns, flip_rows = display_transform(frame)
    if transpose:
        return 270 if flip_columns else 90
    return 180 if flip_rows else 0


def _display_matrix(frame: VideoFrame) -> tuple[float, float, float, float] | None:
    """(a, b, c, d) of the frame's display matrix (16.16 fixed point), or None when it has none."""
    # A container of our own, not `frame.side_data`: the frame caches that one, which refers back to it, and the
    # cycle kept every frame read so (its picture buffers, and through them the decoder's threads, 16 per video at
    # 4096 px) until a garbage collection.
    found: Any = SideDataContainer(frame).get("DISPLAYMATRIX")  # type: ignore[call-arg]  # (the stub lacks it)
    if found is None:
        return None
    raw = bytes(found)  # the side data's buffer
    if len(raw) < 36:
        return None
    values = np.frombuffer(raw[:36], dtype="<i4").astype(np.float64) / 65536.0
    return float(values[0]), float(values[1]), float(values[3]), float(values[4])


def frames_to_tensor(
    frames: np.ndarray | torch.Tensor,
    *,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> torch.Tensor:
    """Turn decoded frames into the model's input layout, normalised per channel.

    Args:
        frames: uint8 ``[T, H, W, 3]`` RGB, as in ``Clip.frames``.
        mean: Per-channel mean on the 0-1 scale (OpenAI CLIP's by default).
        std: Per-channel standard deviation on the 0-1 scale.

    Returns:
        float32 ``[T, 3, H, W]``.
    """
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {tensor.dtype} {tuple(tensor.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    return normalize_frames(tensor, mean, std)


def normalize_frames(
    frames: torch.Tensor,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    *,
    channels_last: bool = True,
) -> torch.Tensor:
    """The model's input normalisation, on the frames' device: uint8 RGB -> ``(x / 255 - mean) / std`` float32.

    Args:
        frames: uint8 ``[..., H, W, 3]`` (``channels_last``, as decoded) or ``[..., 3, H, W]``.

    Returns:
        float32 ``[..., 3, H, W]``.
    """
    import torch

    x = frames.movedim(-1, -3) if channels_last else frames
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    # The same three operations as ``(x / 255 - mean) / std``, bit for bit, on one fresh float32 copy: the
    # out-of-place form allocated three temporaries the size of the batch, which took 2.7x as long on a CPU.
    return x.to(torch.float32, copy=True).div_(255.0).sub_(mean_t).div_(std_t)

"""Clip augmentation: RandAugment applied identically to every frame, one random resized crop per clip."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from vitaclip.training.config import AugmentConfig
from vitaclip.video.transforms import normalize_frames

_RANDAUG_OPS = (
    "identity",
    "autocontrast",
    "equalize",
    "rotate",
    "solarize",
    "color",
    "posterize",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)


def _randaug_op(video: torch.Tensor, op: str, level: float, sign: float) -> torch.Tensor:
    """One RandAugment operation at ``level`` in [0, 1] on uint8 ``[T, 3, H, W]``; every frame gets the same one."""
    import torchvision.transforms.v2.functional as TF

    h, w = video.shape[-2:]
    if op == "identity":
        return video
    if op == "autocontrast":
        return TF.autocontrast(video)
    if op == "equalize":
        return TF.equalize(video)
    if op == "rotate":
        return TF.rotate(video, angle=sign * 30.0 * level, fill=[128.0])
    if op == "solarize":
        return TF.solarize(video, threshold=float(round(255 * (1 - level))))
    if op == "posterize":
        return TF.posterize(video, bits=max(1, 8 - int(round(4 * level))))
    if op in ("color", "contrast", "brightness", "sharpness"):
        factor = max(0.0, 1.0 + sign * 0.9 * level)
        fn = {
            "color": TF.adjust_saturation,
            "contrast": TF.adjust_contrast,
            "brightness": TF.adjust_brightness,
            "sharpness": TF.adjust_sharpness,
        }[op]
        return fn(video, factor)
    if op in ("shear_x", "shear_y"):
        degrees = math.degrees(math.atan(sign * 0.3 * level))
        shear = [degrees, 0.0] if op == "shear_x" else [0.0, degrees]
        return TF.affine(video, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, fill=[128.0])
    if op in ("translate_x", "translate_y"):
        shift = int(round(sign * 0.45 * level * (w if op == "translate_x" else h)))
        translate = [shift, 0] if op == "translate_x" else [0, shift]
        return TF.affine(video, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], fill=[128.0])
    raise ValueError(f"unknown RandAugment op {op!r}")


def random_resized_box(
    height: int, width: int, rng: np.random.Generator, *, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of a random resized crop (Inception-style, 10 tries then centre)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(rng.integers(0, height - ch + 1))
            left = int(rng.integers(0, width - cw + 1))
            return top, left, ch, cw
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def augment_clip(
    frames: np.ndarray | torch.Tensor, config: AugmentConfig, rng: np.random.Generator, *, size: int
) -> torch.Tensor:
    """RandAugment, then a random resized crop, drawn once per clip and applied identically to every frame.

    Args:
        frames: uint8 ``[T, H, W, 3]`` (as decoded).
        config: what to apply.
        rng: the clip's generator (seeded from the clip's data position, so a resumed run repeats it).
        size: the output side (the model's input size).

    Returns:
        uint8 ``[T, 3, size, size]``.
    """
    import torchvision.transforms.v2.functional as TF

    video = torch.as_tensor(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W]
    if video.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {video.dtype}")
    for _ in range(config.randaug_num_ops):
        op = _RANDAUG_OPS[int(rng.integers(0, len(_RANDAUG_OPS)))]
        magnitude = config.randaug_magnitude
        if config.randaug_magnitude_std > 0:
            magnitude = float(rng.normal(magnitude, config.randaug_magnitude_std))
        level = min(max(magnitude, 0.0), 10.0) / 10.0
        sign = -1.0 if rng.random() < 0.5 else 1.0
        video = _randaug_op(video, op, level, sign)
    h, w = video.shape[-2:]
    top, left, ch, cw = random_resized_box(h, w, rng, scale=config.crop_scale, ratio=config.crop_ratio)
    video = TF.resized_crop(video, top, left, ch, cw, [size, size], antialias=True)
    if config.hflip_prob > 0 and rng.random() < config.hflip_prob:
        video = video.flip(-1)
    return video.contiguous()  # [T, 3, size, size]


def normalize_video(video: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[B, T, 3, H, W]`` -> CLIP-normalised float32 of the same shape (on the tensor's device)."""
    return normalize_frames(video, mean, std, channels_last=False)

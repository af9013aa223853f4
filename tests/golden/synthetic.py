"""Deterministic pseudo-random tensors for golden tests.

The official-code recipe and the tests both fill every tensor of an official-format checkpoint from this function,
so only the key list and the small output tensors need committing. SplitMix64 on integer indices: bit-exact on every
platform and independent of any RNG implementation.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def uniform(key: str, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Values in [-1, 1), a fixed function of ``key`` and the element index."""
    n = int(np.prod(shape)) if len(shape) else 1
    seed = np.uint64(zlib.crc32(key.encode()))
    with np.errstate(over="ignore"):
        z = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN + seed * np.uint64(0x100000001B3)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return torch.from_numpy((2.0 * u - 1.0).astype(np.float32)).reshape(tuple(shape))


def official_tensor(key: str, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """A non-zero value of a sensible scale for an official Vita-CLIP checkpoint key."""
    u = uniform(key, shape)
    leaf = key.rsplit(".", 1)[-1]
    if key == "logit_scale":
        return torch.tensor(3.9)
    if leaf == "weight" and len(shape) == 1:  # LayerNorm scale
        return 1.0 + 0.2 * u
    if leaf in ("bias", "in_proj_bias"):
        return 0.1 * u
    if len(shape) == 2 and (leaf in ("weight", "in_proj_weight") or key.endswith("proj")) and "embedding" not in key:
        fan_in = shape[1] if leaf != "proj" and not key.endswith("_projection") else shape[0]
        return u * (3.0 / fan_in) ** 0.5
    if len(shape) == 4:  # patch embedding convolution
        fan_in = shape[1] * shape[2] * shape[3]
        return u * (3.0 / fan_in) ** 0.5
    return 0.5 * u  # embeddings, prompts, text context, stored label prompts


def official_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: official_tensor(k, s) for k, s in shapes.items()}


def video(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A CLIP-normalised-looking input video."""
    return 1.5 * uniform(key, shape)

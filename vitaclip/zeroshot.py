"""Zero-shot labelling: prompt templates and top-k labels with probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Prompt ensemble for label names that have no learned text context. Video-flavoured phrasings of CLIP's
# zero-shot recipe; averaging normalised features over several phrasings is steadier than any single one.
TEMPLATES: tuple[str, ...] = (
    "a video of {}.",
    "a photo of {}.",
    "a video of a person {}.",
    "a clip showing {}.",
    "a frame from a video of {}.",
    "footage of {}.",
    "an example of {}.",
    "a demonstration of {}.",
)


@dataclass(frozen=True)
class LabelScore:
    name: str
    probability: float


def top_k_scores(
    video_features: torch.Tensor,
    label_features: torch.Tensor,
    *,
    k: int,
    logit_scale: torch.Tensor | float = 100.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities over all K labels, top ``k`` (capped at K) per video: ``[B, k]`` probabilities and
    ``[B, k]`` label indices, best first, on the features' device (see `top_k_labels` for the arguments)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scale = logit_scale.detach().float().exp() if isinstance(logit_scale, torch.Tensor) else float(logit_scale)
    logits = scale * video_features.detach().float() @ label_features.detach().float().t()  # [B, K]
    values, indices = logits.softmax(dim=-1).topk(min(k, label_features.shape[0]), dim=-1)
    return values, indices


def top_k_labels(
    video_features: torch.Tensor,
    label_features: torch.Tensor,
    label_names: Sequence[str],
    *,
    k: int = 5,
    logit_scale: torch.Tensor | float = 100.0,
) -> list[list[LabelScore]]:
    """Top-k labels per video from normalised features.

    Args:
        video_features: ``[B, E]`` L2-normalised video features.
        label_features: ``[K, E]`` L2-normalised label features.
        label_names: K names, in the order of ``label_features``.
        k: labels per video (capped at K).
        logit_scale: the model's ``logit_scale`` (log of the temperature inverse) as a tensor, or the already
            exponentiated scale as a float.

    Returns:
        For each video, k labels with softmax probabilities over all K labels, best first.
    """
    if video_features.ndim != 2 or label_features.ndim != 2 or video_features.shape[1] != label_features.shape[1]:
        raise ValueError(
            f"need [B, E] video and [K, E] label features, got {tuple(video_features.shape)} "
            f"and {tuple(label_features.shape)}"
        )
    if label_features.shape[0] != len(label_names):
        raise ValueError(f"{label_features.shape[0]} label features but {len(label_names)} names")
    values, indices = top_k_scores(video_features, label_features, k=k, logit_scale=logit_scale)
    return [
        [LabelScore(label_names[int(i)], float(p)) for p, i in zip(row_p, row_i, strict=True)]
        for row_p, row_i in zip(values.cpu(), indices.cpu(), strict=True)
    ]

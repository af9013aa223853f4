"""Evaluation metrics, as percentages (0-100) as the paper reports them: top-1/top-5 with views
averaged, confusion matrices, retrieval recall and ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def average_view_probabilities(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Softmax over labels of each view, averaged over views: ``[N, V, K]`` logits -> ``[N, K]`` probabilities."""
    t = torch.as_tensor(logits, dtype=torch.float64)
    if t.ndim != 3:
        raise ValueError(f"logits must be [N, V, K], got shape {tuple(t.shape)}")
    return t.softmax(dim=-1).mean(dim=1).numpy()


def classification_metrics(
    probs: np.ndarray, labels: Sequence[int] | np.ndarray, label_names: Sequence[str]
) -> dict[str, Any]:
    """Top-1, top-5, per-class accuracy and mean class accuracy (percent) of scores ``[N, K]``."""
    probs = np.asarray(probs)
    y = np.asarray(labels, dtype=np.int64)
    n, k = probs.shape
    if y.shape != (n,):
        raise ValueError(f"labels must be [{n}], got {y.shape}")
    order = np.argsort(-probs, axis=1, kind="stable")
    top1 = order[:, 0] == y
    top5 = (order[:, : min(5, k)] == y[:, None]).any(axis=1)
    per_class: dict[str, float | None] = {}
    for c, name in enumerate(label_names):
        mask = y == c
        per_class[name] = float(100.0 * top1[mask].mean()) if mask.any() else None
    seen = [v for v in per_class.values() if v is not None]
    return {
        "top1": float(100.0 * top1.mean()) if n else 0.0,
        "top5": float(100.0 * top5.mean()) if n else 0.0,
        "mean_class_accuracy": float(np.mean(seen)) if seen else 0.0,
        "num_videos": int(n),
        "num_classes": int(k),
        "per_class": per_class,
    }


def confusion_matrix(
    predictions: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, num_classes: int
) -> np.ndarray:
    """``[K, K]`` counts, rows the true class, columns the prediction."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return m


def _ranks(sim: np.ndarray, targets: Sequence[Sequence[int]]) -> np.ndarray:
    """1-based rank, per query row, of the best-ranked of its target columns."""
    out = np.empty(sim.shape[0], dtype=np.int64)
    for i, cols in enumerate(targets):
        best = max(sim[i, c] for c in cols)
        # Ties count against the query: a target tied with others ranks after all of them.
        out[i] = (
            int((sim[i] > best).sum()) + int((sim[i] == best).sum()) - int(sum(sim[i, c] == best for c in cols)) + 1
        )
    return out


RECALL_CURVE_MAX_K = 50
"""Recall is reported for every k from 1 up to this (or the number of candidates, when fewer)."""


def _rank_summary(ranks: np.ndarray, candidates: int) -> dict[str, Any]:
    ks = np.arange(1, min(candidates, RECALL_CURVE_MAX_K) + 1)
    return {
        "r1": float(100.0 * (ranks <= 1).mean()),
        "r5": float(100.0 * (ranks <= 5).mean()),
        "r10": float(100.0 * (ranks <= 10).mean()),
        "median_rank": float(np.median(ranks)),
        "mean_rank": float(ranks.mean()),
        "recall_curve": [float(100.0 * (ranks <= k).mean()) for k in ks],  # R@k for k = 1, 2, ...
    }


def retrieval_metrics(
    similarity: np.ndarray | torch.Tensor, caption_video: Sequence[int] | np.ndarray
) -> dict[str, Any]:
    """Text-to-video and video-to-text retrieval metrics.

    Args:
        similarity: ``[num_captions, num_videos]`` scores (cosine similarities).
        caption_video: ``[num_captions]``: the video each caption describes. A video may have several captions.

    Returns:
        ``{"text_to_video": {...}, "video_to_text": {...}, "num_captions", "num_videos"}``; each direction has
        ``r1``, ``r5``, ``r10`` (percent), ``median_rank`` and ``mean_rank`` (1-based), and ``recall_curve`` (R@k
        for k = 1 .. min(candidates, `RECALL_CURVE_MAX_K`)). Text-to-video ranks the
        caption's video among all videos; video-to-text ranks the best of the video's captions among all captions.
    """
    sim = np.asarray(torch.as_tensor(similarity, dtype=torch.float64))
    owner = np.asarray(caption_video, dtype=np.int64)
    nt, nv = sim.shape
    if owner.shape != (nt,):
        raise ValueError(f"caption_video must be [{nt}], got {owner.shape}")
    t2v = _ranks(sim, [[int(v)] for v in owner])
    captions_of = [np.flatnonzero(owner == v).tolist() for v in range(nv)]
    videos = [v for v in range(nv) if captions_of[v]]
    v2t = _ranks(sim.T[videos], [captions_of[v] for v in videos])
    return {
        "text_to_video": _rank_summary(t2v, nv),
        "video_to_text": _rank_summary(v2t, nt),
        "num_captions": int(nt),
        "num_videos": int(nv),
    }

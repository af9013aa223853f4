"""One training step with gradient accumulation, and its losses."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitaclip.training.augment import normalize_video

#: A micro-batch: ``(video uint8 [b, T, 3, H, W], labels int64 [b], valid bool [b])``, optionally with the ``b``
#: captions (``""``: none) as a fourth item.
MicroBatch = (
    tuple[torch.Tensor, torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[str]]
)


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed cross-entropy over ``logit_scale * cos(video, label)`` logits ``[B, K]`` (weights ``[B]``: 0 skips)."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")  # [B]
    if weights is not None:
        losses = losses * weights
    return losses.sum()


def video_text_contrastive_loss(logits: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Symmetric InfoNCE of ``n`` matched (video, text) pairs, summed over the pairs.

    ``logits`` ``[n, n]`` = ``logit_scale * cos(video_i, text_j)``; pair ``i`` costs the mean of the cross-entropy
    of row ``i`` (video to text) and of column ``i`` (text to video) against ``i``: CLIP's loss times ``n``.
    Identical texts in one batch are all right answers (the target is shared equally between them), so a batch
    holding one caption twice does not push a video away from its own words; with distinct texts the loss is
    exactly the standard one.
    """
    n = len(texts)
    if logits.shape != (n, n):
        raise ValueError(f"logits must be [{n}, {n}] for {n} texts, got {list(logits.shape)}")
    codes = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    ids = torch.tensor([codes[t] for t in texts], device=logits.device)
    same = (ids[:, None] == ids[None, :]).float()  # symmetric: the targets of rows and of columns
    targets = same / same.sum(dim=1, keepdim=True)
    logits = logits.float()
    video_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    text_to_video = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1)
    return ((video_to_text + text_to_video) / 2).sum()


@dataclass
class StepStats:
    """One step on one process: ``loss`` (label loss + weighted caption loss) and ``accuracy`` are means over the
    valid labelled videos (``num_labelled``), ``caption_loss`` over the valid captioned ones (``num_captioned``)."""

    loss: float
    accuracy: float
    lr: float
    num_videos: int
    grad_norm: float | None = None
    num_labelled: int = 0
    caption_loss: float = 0.0
    num_captioned: int = 0


def _captions_of(micro: MicroBatch) -> list[str]:
    return [str(c) for c in micro[3]] if len(micro) > 3 else []


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    micro_batches: Sequence[MicroBatch],
    *,
    precision: str,
    mean: Sequence[float],
    std: Sequence[float],
    max_grad_norm: float | None = None,
    no_sync: Callable[[], Any] | None = None,
    caption_loss_weight: float = 1.0,
) -> StepStats:
    """One optimizer step over accumulated micro-batches.

    Args:
        model: the model, or its DDP wrapper (``model(video)`` gives logits over the training labels;
            ``model(video, texts=...)`` also the video-text logits).
        micro_batches: ``(video uint8 [b, T, 3, H, W], labels int64 [b], valid bool [b])`` on the model's device,
            optionally with the ``b`` captions; videos that failed to decode have ``valid=False`` and do not count,
            a label of -1 is no label (caption-only), a caption of ``""`` no caption.
        precision: ``bf16``/``fp16`` (autocast on CUDA) or ``fp32``.
        no_sync: DDP's ``no_sync`` context: gradients are all-reduced only on the last micro-batch.
        caption_loss_weight: weight of the contrastive loss over each micro-batch's captioned videos. Without any
            caption in the step (or at 0) the step is the label loss alone, computed as it always was.

    Returns:
        The step's mean losses and accuracy over this worker's valid videos, and the learning rate it used.
    """
    with_captions = caption_loss_weight > 0 and any(any(_captions_of(m)) for m in micro_batches)
    if not with_captions:
        parts = _StepParts(model, optimizer, scheduler, scaler, precision, mean, std, max_grad_norm, no_sync)
        return _label_step(parts, micro_batches)
    device = micro_batches[0][0].device
    total = sum(int(m[2].sum()) for m in micro_batches)
    labelled = sum(int((m[2] & (m[1] >= 0)).sum()) for m in micro_batches)
    captioned = sum(
        sum(1 for c, ok in zip(_captions_of(m), m[2].tolist(), strict=True) if c and ok) for m in micro_batches
    )
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.zero_grad(set_to_none=True)
    label_sum = caption_sum = 0.0
    correct = 0
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for i, micro in enumerate(micro_batches):
        video, labels, valid = micro[0], micro[1], micro[2]
        captions = _captions_of(micro)
        keep = [j for j, (c, ok) in enumerate(zip(captions, valid.tolist(), strict=True)) if c and ok]
        last = i == len(micro_batches) - 1
        ctx: Any = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            x = normalize_video(video, mean, std)  # [b, T, 3, H, W]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                texts = [captions[j] for j in keep]
                logits, text_logits = model(x, texts=texts, labels=labelled > 0)  # [b, K] or None, [b, len(keep)]
            loss = torch.zeros((), device=device)
            if logits is not None:
                has_label = valid & (labels >= 0)
                label_loss = classification_loss(logits, labels.clamp(min=0), has_label.to(torch.float32))
                loss = loss + label_loss / max(labelled, 1)
                label_sum += float(label_loss.detach())
                correct += int(((logits.detach().argmax(dim=-1) == labels) & has_label).sum())
            if keep:
                pair_logits = text_logits[torch.tensor(keep, device=device)]  # [n, n]: video keep[i], caption i
                caption_loss = video_text_contrastive_loss(pair_logits, texts)
                loss = loss + caption_loss_weight * caption_loss / captioned
                caption_sum += float(caption_loss.detach())
            else:
                loss = loss + 0.0 * text_logits.sum()  # every parameter joins the graph (DDP's all-reduce)
            scaler.scale(loss).backward()
    grad_norm = _finish_step(optimizer, scheduler, scaler, max_grad_norm)
    label_mean = label_sum / max(labelled, 1)
    caption_mean = caption_sum / max(captioned, 1)
    return StepStats(
        loss=label_mean + caption_loss_weight * caption_mean, accuracy=correct / max(labelled, 1), lr=lr,
        num_videos=total, grad_norm=grad_norm, num_labelled=labelled, caption_loss=caption_mean,
        num_captioned=captioned,
    )  # fmt: skip


def _finish_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    max_grad_norm: float | None,
) -> float | None:
    grad_norm = None
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return grad_norm


@dataclass(frozen=True)
class _StepParts:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: str
    mean: Sequence[float]
    std: Sequence[float]
    max_grad_norm: float | None
    no_sync: Callable[[], Any] | None


def _label_step(parts: _StepParts, micro_batches: Sequence[MicroBatch]) -> StepStats:
    """The label loss alone (the official recipe): summed cross-entropy over the valid videos, averaged."""
    model, optimizer, scheduler, scaler = parts.model, parts.optimizer, parts.scheduler, parts.scaler
    precision, mean, std, no_sync = parts.precision, parts.mean, parts.std, parts.no_sync
    device = micro_batches[0][0].device
    total = sum(int(m[2].sum()) for m in micro_batches)
    denominator = max(total, 1)
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    correct = 0
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for i, micro in enumerate(micro_batches):
        video, labels, valid = micro[0], micro[1], micro[2]
        last = i == len(micro_batches) - 1
        ctx: Any = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            x = normalize_video(video, mean, std)  # [b, T, 3, H, W]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(x)  # [b, K]
            weights = valid.to(torch.float32)
            loss = classification_loss(logits, labels, weights) / denominator
            scaler.scale(loss).backward()
        loss_sum += float(loss.detach()) * denominator
        correct += int(((logits.detach().argmax(dim=-1) == labels) & valid).sum())
    grad_norm = _finish_step(optimizer, scheduler, scaler, parts.max_grad_norm)
    return StepStats(
        loss=loss_sum / denominator, accuracy=correct / denominator, lr=lr, num_videos=total, grad_norm=grad_norm,
        num_labelled=total,
    )  # fmt: skip

"""One training step with gradient accumulation, and its loss."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitaclip.training.augment import normalize_video


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed cross-entropy over ``logit_scale * cos(video, label)`` logits ``[B, K]`` (weights ``[B]``: 0 skips)."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")  # [B]
    if weights is not None:
        losses = losses * weights
    return losses.sum()


@dataclass
class StepStats:
    loss: float
    accuracy: float
    lr: float
    num_videos: int
    grad_norm: float | None = None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    precision: str,
    mean: Sequence[float],
    std: Sequence[float],
    max_grad_norm: float | None = None,
    no_sync: Callable[[], Any] | None = None,
) -> StepStats:
    """One optimizer step over accumulated micro-batches.

    Args:
        model: the model, or its DDP wrapper (``model(video)`` gives logits over the training labels).
        micro_batches: ``(video uint8 [b, T, 3, H, W], labels int64 [b], valid bool [b])`` on the model's device;
            videos that failed to decode have ``valid=False`` and do not count.
        precision: ``bf16``/``fp16`` (autocast on CUDA) or ``fp32``.
        no_sync: DDP's ``no_sync`` context: gradients are all-reduced only on the last micro-batch.

    Returns:
        The step's mean loss and accuracy over this worker's valid videos, and the learning rate it used.
    """
    device = micro_batches[0][0].device
    total = sum(int(v.sum()) for _, _, v in micro_batches)
    denominator = max(total, 1)
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    correct = 0
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for i, (video, labels, valid) in enumerate(micro_batches):
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
    grad_norm = None
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return StepStats(
        loss=loss_sum / denominator, accuracy=correct / denominator, lr=lr, num_videos=total, grad_norm=grad_norm
    )

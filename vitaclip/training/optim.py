"""The optimizer over the trainable set only, the learning-rate schedule and the loss scaler."""

from __future__ import annotations

import math

import torch
from torch import nn

from vitaclip.model import VitaClip
from vitaclip.training.config import TrainConfig


def trainable_parameters(model: VitaClip) -> list[tuple[str, nn.Parameter]]:
    """The parameters to optimise, checked against the model's declared trainable set and the frozen backbone."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    declared = model.trainable_parameter_names()
    if [n for n, _ in named] != declared:
        raise AssertionError(f"trainable parameters {[n for n, _ in named]} differ from the declared set {declared}")
    frozen_prefixes = ("clip.", "cls_proj.", "patch_bias")
    leaked = [n for n, _ in named if n.startswith(frozen_prefixes)]
    if leaked:
        raise AssertionError(f"frozen backbone parameters would be trained: {leaked}")
    return named


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def build_optimizer(model: VitaClip, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable set only (the frozen backbone gets no optimizer state and no gradients).

    Weight decay applies to parameters with two or more dimensions (prompt tables, context, projections); 1-D
    parameters (norms, biases) and ``logit_scale`` are not decayed.
    """
    named = trainable_parameters(model)
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.optimizer.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.optimizer.lr, betas=(0.9, 0.999))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and id(p) in in_optimizer]
    assert not frozen, f"frozen parameters in the optimizer: {frozen}"
    assert len(in_optimizer) == len(named)
    return optimizer


def lr_factor(step: int, *, steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine from 1 to ``min_ratio``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine schedule over ``config.steps`` (stepped once per optimizer step)."""
    ratio = config.optimizer.min_lr / config.optimizer.lr

    def factor(step: int) -> float:
        return lr_factor(step, steps=config.steps, warmup_steps=config.optimizer.warmup_steps, min_ratio=ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A grad scaler, enabled only for fp16 (bf16 needs none); saved and restored with the checkpoints anyway."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")

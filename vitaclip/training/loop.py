"""The training loop's body, in plain torch: optimizer steps from a micro-batch stream, with the metrics of each
step summed over every process. Where the model, the stream and the records come from is the caller's business (the
Ray Train job in `jobs.train`, or a plain loop)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitaclip.training.config import TrainConfig
from vitaclip.training.step import MicroBatch, train_step


@dataclass
class TrainingParts:
    """What one training process steps: the model (and its DDP wrapper when there are several processes), the
    optimizer, scheduler and scaler, where and in what precision it runs, and the step it starts from."""

    config: TrainConfig
    model: Any
    ddp_model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    device: torch.device
    precision: str
    world_size: int
    start_step: int


def next_micro_batches(stream: Iterator[dict[str, np.ndarray]], count: int, device: torch.device) -> list[MicroBatch]:
    """`count` micro-batches (``video``, ``label``, ``valid``, and ``caption`` when the stream has it) on `device`."""
    micro: list[MicroBatch] = []
    for _ in range(count):
        batch = next(stream)
        # Ray Data hands out read-only arrays; torch wants writable ones.
        video, label, valid = (np.require(batch[k], requirements=["W"]) for k in ("video", "label", "valid"))
        tensors = (
            torch.from_numpy(video).to(device, non_blocking=True),
            torch.from_numpy(label).to(device),
            torch.from_numpy(valid).to(device),
        )
        micro.append((*tensors, [str(c) for c in batch["caption"]]) if "caption" in batch else tensors)
    return micro


def one_step(parts: TrainingParts, stream: Iterator[dict[str, np.ndarray]]) -> dict[str, float]:
    """One optimizer step over ``accumulation_steps`` micro-batches; sums over every process: ``loss`` (weighted by
    labelled videos), ``correct``, ``labelled``, ``videos``, ``caption_loss`` (weighted by captioned videos) and
    ``captioned``, and the step's ``lr``."""
    config = parts.config
    stats = train_step(
        parts.ddp_model,
        parts.optimizer,
        parts.scheduler,
        parts.scaler,
        next_micro_batches(stream, config.accumulation_steps, parts.device),
        precision=parts.precision,
        mean=parts.model.config.mean,
        std=parts.model.config.std,
        max_grad_norm=config.optimizer.max_grad_norm,
        no_sync=getattr(parts.ddp_model, "no_sync", None) if parts.world_size > 1 else None,
        caption_loss_weight=config.caption_loss_weight,
    )
    weight = max(stats.num_labelled, stats.num_captioned)
    totals = torch.tensor(
        [
            stats.loss * weight,
            stats.accuracy * stats.num_labelled,
            stats.num_labelled,
            stats.num_videos,
            stats.caption_loss * stats.num_captioned,
            stats.num_captioned,
            weight,
        ],
        dtype=torch.float64,
    )
    if parts.world_size > 1:
        import torch.distributed as dist

        totals = totals.to(parts.device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    keys = ("loss", "correct", "labelled", "videos", "caption_loss", "captioned", "weight")
    return {**dict(zip(keys, totals.tolist(), strict=True)), "lr": stats.lr}


def run_steps(
    parts: TrainingParts,
    stream: Iterator[dict[str, np.ndarray]],
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], float]:
    """Steps from ``parts.start_step`` to ``config.steps``; `on_step` gets each step's metrics (``step``, ``loss``,
    ``accuracy``, ``lr``, ``videos_per_second``, ``samples_seen``, ``valid_videos``) and may add to them. Returns
    the last step's metrics and the seconds spent."""
    config = parts.config
    started = time.perf_counter()
    last: dict[str, Any] = {}
    for step in range(parts.start_step, config.steps):
        sums = one_step(parts, stream)
        done = step + 1
        elapsed = max(time.perf_counter() - started, 1e-9)
        last = {
            "step": done,
            "loss": sums["loss"] / max(sums["weight"], 1.0),
            "accuracy": sums["correct"] / max(sums["labelled"], 1.0),
            "lr": sums["lr"],
            "videos_per_second": (done - parts.start_step) * config.batch_size / elapsed,
            "samples_seen": done * config.batch_size,
            "valid_videos": int(sums["videos"]),
        }
        if sums["captioned"]:
            last["caption_loss"] = sums["caption_loss"] / sums["captioned"]
            last["captioned_videos"] = int(sums["captioned"])
        if on_step is not None:
            on_step(last)
    return last, time.perf_counter() - started

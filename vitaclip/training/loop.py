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
from vitaclip.training.step import train_step


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


def next_micro_batches(
    stream: Iterator[dict[str, np.ndarray]], count: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`count` micro-batches (``video``, ``label``, ``valid``) from the stream, on `device`."""
    micro = []
    for _ in range(count):
        batch = next(stream)
        # Ray Data hands out read-only arrays; torch wants writable ones.
        video, label, valid = (np.require(batch[k], requirements=["W"]) for k in ("video", "label", "valid"))
        micro.append(
            (
                torch.from_numpy(video).to(device, non_blocking=True),
                torch.from_numpy(label).to(device),
                torch.from_numpy(valid).to(device),
            )
        )
    return micro


def one_step(parts: TrainingParts, stream: Iterator[dict[str, np.ndarray]]) -> tuple[float, float, float, float]:
    """One optimizer step over ``accumulation_steps`` micro-batches: (loss sum, correct sum, videos, lr) over every
    process."""
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
    )
    totals = torch.tensor([stats.loss * stats.num_videos, stats.accuracy * stats.num_videos, stats.num_videos])
    if parts.world_size > 1:
        import torch.distributed as dist

        totals = totals.to(parts.device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    return float(totals[0]), float(totals[1]), float(totals[2]), stats.lr


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
        loss, correct, videos, lr = one_step(parts, stream)
        done = step + 1
        count = max(videos, 1.0)
        elapsed = max(time.perf_counter() - started, 1e-9)
        last = {
            "step": done,
            "loss": loss / count,
            "accuracy": correct / count,
            "lr": lr,
            "videos_per_second": (done - parts.start_step) * config.batch_size / elapsed,
            "samples_seen": done * config.batch_size,
            "valid_videos": int(videos),
        }
        if on_step is not None:
            on_step(last)
    return last, time.perf_counter() - started

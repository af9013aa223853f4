"""Contrastive pretraining of the demo world's small CLIP, on single frames and their videos' captions.

The result is an ordinary open_clip ``CLIP`` (the ``vitaclip-demo`` backbone config, with the demo BPE vocabulary),
saved as an open_clip state dict in safetensors: exactly what ``--checkpoint`` takes as OpenAI/open_clip weights. A
single frame cannot show which way a shape moves, so this CLIP learns colours, shapes and backgrounds but not
motion; Vita-CLIP's video prompts, trained on top of the frozen model, are what can add it.

Each frame is paired with a caption of what that frame shows (:func:`vitaclip.demo.world.frame_caption`: size,
colour, shape, which part of the frame it is in, background), so the CLIP's features keep where a shape is and how
big: what Vita-CLIP's prompts compare across frames to see motion. Motion words never appear in these captions.

Captions repeat across frames, so the loss is the symmetric InfoNCE with every pair of identical captions counted as
a positive (a multi-positive target), not only the diagonal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitaclip.config import VitaClipConfig
from vitaclip.demo.world import BACKGROUNDS, COLOURS, SHAPES, frame_caption, spec_from_manifest
from vitaclip.model import build_backbone, get_tokenizer
from vitaclip.video import Uniform, decode_clip, frames_to_tensor

log = logging.getLogger("vitaclip.demo.pretrain")


@dataclass(frozen=True)
class PretrainConfig:
    """Optimisation settings of :func:`pretrain_clip`.

    Attributes:
        steps: optimizer steps.
        batch_size: frame-caption pairs per step (one frame from each of that many distinct videos).
        lr: peak AdamW learning rate (linear warmup, cosine decay to 0).
        weight_decay: AdamW weight decay of matrices (not of norms, biases, embeddings of positions or the scale).
        warmup_steps: linear warmup length.
        seed: seed of the initialisation and the batch order.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0


@dataclass
class FrameCaptionSet:
    """Decoded frames of a generated world, each with the caption of what that frame shows.

    Attributes:
        frames: uint8 ``[N, F, H, W, 3]``: F frames of each of N videos.
        captions: ``N`` lists of ``F`` frame captions (:func:`vitaclip.demo.world.frame_caption`).
    """

    frames: np.ndarray
    captions: list[list[str]]


def read_manifest(world_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a generated world's ``manifest.jsonl`` (one per video)."""
    path = Path(world_dir) / "manifest.jsonl"
    if not path.is_file():
        raise ValueError(
            f"{world_dir} has no manifest.jsonl; generate a world first (python -m vitaclip.demo generate)"
        )
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path}: no videos")
    return records


def load_frames(
    world_dir: str | Path, *, image_size: int, frames_per_video: int = 8, threads: int | None = None
) -> FrameCaptionSet:
    """Decodes ``frames_per_video`` evenly spaced frames of every video of a world, at the model's input size, and
    captions each from the video's spec at that frame's timestamp."""
    records = read_manifest(world_dir)

    def decode(record: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
        clip = decode_clip(str(Path(world_dir) / record["path"]), Uniform(frames_per_video), size=image_size)
        spec = spec_from_manifest(record)
        last = max(1, record["num_frames"] - 1)
        captions = [frame_caption(spec, round(t * record["fps"]) / last) for t in clip.pts_seconds.tolist()]
        return clip.frames, captions

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        decoded = list(tqdm(pool.map(decode, records), total=len(records), desc="decode frames", unit="video"))
    return FrameCaptionSet(frames=np.stack([f for f, _ in decoded]), captions=[c for _, c in decoded])


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        # Matrices decay; norms, biases, embeddings of positions/classes and the logit scale do not (CLIP's rule).
        (decay if p.ndim >= 2 and "positional_embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE. ``image``/``text``: normalised ``[B, E]``; ``same``: bool ``[B, B]``, true
    where two rows share a caption (the diagonal included)."""
    logits = scale * image @ text.t()  # [B, B]
    target = same.float() / same.float().sum(dim=1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
        + torch.sum(-target * F.log_softmax(logits.t(), dim=1), dim=1).mean()
    )


def pretrain_clip(
    config: VitaClipConfig,
    data: FrameCaptionSet,
    train: PretrainConfig = PretrainConfig(),
    *,
    progress: bool = True,
    log_every: int = 50,
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Trains the open_clip backbone of ``config`` from scratch on frame-caption pairs.

    Returns:
        The trained ``open_clip.CLIP`` (eval mode) and its loss curve (one record per ``log_every`` steps).
    """
    num_videos, frames_per_video = data.frames.shape[:2]
    if num_videos < 2:
        raise ValueError(f"pretraining needs at least 2 videos, got {num_videos}")
    batch_size = min(train.batch_size, num_videos)
    torch.manual_seed(train.seed)
    clip = build_backbone(config)
    clip.train()
    tokenizer = get_tokenizer(config.tokenizer)
    captions = sorted({c for per_video in data.captions for c in per_video})
    lookup = {c: i for i, c in enumerate(captions)}
    caption_ids = torch.tensor([[lookup[c] for c in per_video] for per_video in data.captions])  # [N, F]
    tokens = tokenizer(captions, context_length=clip.context_length)  # [C, L]
    optimizer = torch.optim.AdamW(_param_groups(clip, train.weight_decay), lr=train.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(train.seed)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    frames = torch.from_numpy(data.frames)  # [N, F, H, W, 3] uint8
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    bar = tqdm(range(train.steps), desc="pretrain CLIP", unit="step", disable=not progress)
    running = 0.0
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, train)
        videos = torch.from_numpy(rng.choice(num_videos, size=batch_size, replace=False))
        which = torch.from_numpy(rng.integers(0, frames_per_video, size=batch_size))
        x = frames[videos, which].permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std)  # [B, 3, H, W]
        ids = caption_ids[videos, which]  # [B]
        unique, inverse = torch.unique(ids, return_inverse=True)
        image = F.normalize(clip.encode_image(x), dim=-1)  # [B, E]
        text = F.normalize(clip.encode_text(tokens[unique]), dim=-1)[inverse]  # [B, E]
        loss = contrastive_loss(image, text, clip.logit_scale.exp().clamp(max=100.0), ids[:, None] == ids[None, :])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if step == 0 else 0.9 * running + 0.1 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % log_every == 0 or step + 1 == train.steps:
            curve.append({"step": step + 1, "loss": running, "seconds": time.perf_counter() - started})
    clip.eval()
    return clip, curve


_PARTS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": ("up", "down", "left", "right", "middle"),
    "size": ("small", "large"),
    "background": tuple(f"{b} background" for b in BACKGROUNDS),
}


def _caption_part(caption: str, words: Sequence[str]) -> str:
    padded = f" {caption} "
    return " ".join(w for w in words if f" {w} " in padded)


@torch.no_grad()
def frame_caption_accuracy(clip: Any, config: VitaClipConfig, data: FrameCaptionSet) -> dict[str, float]:
    """How well single frames find their words: each video's middle frame against every frame caption of the set;
    per part (colour, shape, position, size, background) the share of frames whose best caption gets it right."""
    tokenizer = get_tokenizer(config.tokenizer)
    captions = sorted({c for per_video in data.captions for c in per_video})
    text = torch.cat(
        [
            F.normalize(clip.encode_text(tokenizer(captions[i : i + 512], context_length=clip.context_length)), dim=-1)
            for i in range(0, len(captions), 512)
        ]
    )  # [C, E]
    middle_index = data.frames.shape[1] // 2
    middle = data.frames[:, middle_index]  # [N, H, W, 3]
    feats = []
    for start in range(0, len(middle), 256):
        x = frames_to_tensor(middle[start : start + 256], mean=config.mean, std=config.std)
        feats.append(F.normalize(clip.encode_image(x), dim=-1))
    image = torch.cat(feats)  # [N, E]
    predicted = [captions[i] for i in (image @ text.t()).argmax(dim=1).tolist()]
    truth = [per_video[middle_index] for per_video in data.captions]
    return {
        part: float(
            np.mean([_caption_part(p, words) == _caption_part(t, words) for p, t in zip(predicted, truth, strict=True)])
        )
        for part, words in _PARTS.items()
    }


def save_clip(clip: torch.nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Writes the CLIP's state dict (open_clip key names) as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in clip.state_dict().items() if not k.endswith("attn_mask")}
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(state, str(tmp), metadata=metadata or {})
    os.replace(tmp, path)
    return path


def run_pretraining(
    world_dir: str | Path,
    config: VitaClipConfig,
    out_path: str | Path,
    train: PretrainConfig = PretrainConfig(),
    *,
    eval_world_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Decodes a world, pretrains, saves ``out_path`` (safetensors) and ``out_path``'s ``.json`` report."""
    image_size = config.image_size
    data = load_frames(world_dir, image_size=image_size)
    clip, curve = pretrain_clip(config, data, train, progress=progress)
    report: dict[str, Any] = {
        "config": asdict(train),
        "num_videos": len(data.captions),
        "num_frame_captions": len({c for per_video in data.captions for c in per_video}),
        "curve": curve,
        "train_accuracy": frame_caption_accuracy(clip, config, data),
    }
    if eval_world_dir is not None:
        held_out = load_frames(eval_world_dir, image_size=image_size)
        report["held_out_accuracy"] = frame_caption_accuracy(clip, config, held_out)
    save_clip(clip, out_path, metadata={"format": "open_clip", "model": config.name})
    Path(out_path).with_suffix(".json").write_text(json.dumps(report, indent=2))
    return report


def summarize(report: dict[str, Any]) -> Sequence[str]:
    """Human-readable lines of a pretraining report."""
    lines = [f"pretrained on {report['num_videos']} videos, final loss {report['curve'][-1]['loss']:.3f}"]
    for key in ("train_accuracy", "held_out_accuracy"):
        if key in report:
            acc = report[key]
            lines.append(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return lines

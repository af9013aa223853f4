"""Training pieces for Vita-CLIP prompt learning, in plain torch (no Ray): the recipe, the optimizer over the trainable
set only, clip augmentation, one training step with gradient accumulation, and checkpoints that resume exactly.

The distributed job (``jobs/train.py``) wires these to Ray Train and Ray Data; everything here also runs in a plain
loop, which is how the tests exercise it.

The default :class:`TrainConfig` is the official recipe of Vita-CLIP-B on Kinetics-400 (Wasim et al., CVPR 2023):
8 frames sampled densely 16 frames apart, AdamW (lr 4e-4, weight decay 0.05) with a cosine schedule over 30k steps
and no warm-up, a global batch of 256 reached by gradient accumulation, RandAugment ``rand-m7-n4-mstd0.5`` applied
identically to every frame of a clip followed by a random resized crop (one box for all frames), and the model
config ``vitaclip-b16`` (class-specific text context of 8 tokens, 8 global prompts, local prompts, summary token).
The official code trains in float32 by default with optional fp16; here CUDA runs use bf16 autocast (float32 master
weights), CPUs float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitaclip.checkpoints import CONFIG_FILE, WEIGHTS_FILE, is_vitaclip_checkpoint, load_torch_file, save_checkpoint
from vitaclip.config import check_field_types
from vitaclip.model import VitaClip
from vitaclip.video.transforms import normalize_frames

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Sampling = Literal["uniform", "dense"]

TRAINING_STATE_FILE = "training_state.pt"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Every field is a ``--flag`` of ``vitaclip train`` and a key of its YAML ``--config``.

    Attributes:
        train_list: ``path,label`` lines (label: an index into ``label_names`` or a name), or a Parquet manifest with
            ``path`` (or ``uri``) and ``label`` columns; local or ``s3://``.
        label_names: the training labels in order: a packaged label set (``kinetics400``, ``hmdb51``, ``ucf101``) or
            a file with one name per line.
        output: folder or ``s3://bucket/prefix`` for checkpoints, metrics and plots.
        model: registered model name or JSON config (the model's config decides prompts and text context).
        checkpoint: weights to start from: OpenAI/open_clip CLIP weights (a fresh set of prompts on a frozen
            backbone) or a Vita-CLIP checkpoint (official or vitaclip). None: random weights (smoke runs only).
        val_list: optional held-out list, evaluated every ``eval_every`` steps (top-1, one centre view).
        data_root: prefix joined to relative paths of the lists (a folder or ``s3://bucket/prefix``).
        steps: optimizer steps.
        batch_size: global batch (videos per optimizer step over all workers).
        micro_batch_size: videos per forward pass on one worker; ``batch_size / (num_workers * micro_batch_size)``
            micro-batches are accumulated per step.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay on matrices and prompt tables (not on 1-D parameters or ``logit_scale``).
        warmup_steps: linear warm-up before the cosine decay (the official recipe has none).
        min_lr: learning rate at the end of the cosine.
        max_grad_norm: clip the gradient norm (None: no clipping, as the official recipe).
        precision: ``auto`` (bf16 autocast on CUDA, float32 on CPU), ``bf16``, ``fp16`` (with a grad scaler), ``fp32``.
        num_frames: frames per clip (None: the model's training T).
        sampling: ``dense`` (``num_frames`` frames ``stride`` apart, the official protocol) or ``uniform``.
        stride: frame stride of dense sampling.
        temporal_jitter: with dense sampling, each training clip starts at a random frame (uniform over every start
            that fits, as the official trainer); False: the centre view.
        decode_scale: training frames are decoded with a side of ``image_size * decode_scale`` before the crop.
        crop_scale: area range of the random resized crop (of the decoded square).
        crop_ratio: aspect ratio range of the random resized crop.
        randaug_num_ops: RandAugment operations per clip (0: none).
        randaug_magnitude: RandAugment magnitude, out of 10.
        randaug_magnitude_std: standard deviation of the per-clip magnitude.
        hflip_prob: horizontal flip probability (0 in the recipe; flips change the meaning of direction classes).
        seed: data order, augmentation and RNG seed.
        save_every: steps between checkpoints.
        keep_last: checkpoints kept.
        eval_every: steps between validations (0: never).
        log_every: steps between JSON lines in ``metrics.jsonl``.
        num_workers: Ray Train workers (DDP processes). None: one per GPU (the most that divide the batch), or one
            without GPUs. The data a step reads does not depend on it, so a run may resume with another count.
        use_gpu: one GPU per worker (None: when the cluster has GPUs).
        cpus_per_worker: CPUs reserved by each training worker (None: 1 with a GPU, else half the cluster's CPUs;
            fractions under one CPU on small machines).
        decode_workers: Ray Data decode actors per training worker, at most (None: one per CPU left to it).
        decode_cpus: CPUs reserved by each decode actor (None: 1, or the fraction left on small machines).
        num_cpus: CPUs of the embedded local Ray (None: all); ignored with ``ray_address``.
        decode_threads: decode threads in local mode (``--local``) and for validation.
        local: run the loop in this process without Ray (one worker).
        ray_address: an existing Ray cluster; None: an embedded local one.
        s3_endpoint_url: S3-compatible endpoint.
        decode_timeout_seconds: per-video decode time limit.
        max_failures: Ray Train restarts after a worker failure (each resumes from the latest checkpoint).
    """

    train_list: str = ""
    label_names: str = "kinetics400"
    output: str = ""
    model: str = "vitaclip-b16"
    checkpoint: str | None = None
    val_list: str | None = None
    data_root: str = ""
    steps: int = 30000
    batch_size: int = 256
    micro_batch_size: int = 16
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr: float = 0.0
    max_grad_norm: float | None = None
    precision: Precision = "auto"
    num_frames: int | None = None
    sampling: Sampling = "dense"
    stride: int = 16
    temporal_jitter: bool = True
    decode_scale: float = 256 / 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaug_num_ops: int = 4
    randaug_magnitude: float = 7.0
    randaug_magnitude_std: float = 0.5
    hflip_prob: float = 0.0
    seed: int = 0
    save_every: int = 5000
    keep_last: int = 3
    eval_every: int = 5000
    log_every: int = 10
    num_workers: int | None = None
    use_gpu: bool | None = None
    cpus_per_worker: float | None = None
    decode_workers: int | None = None
    decode_cpus: float | None = None
    num_cpus: int | None = None
    decode_threads: int = 4
    local: bool = False
    ray_address: str | None = None
    s3_endpoint_url: str | None = None
    decode_timeout_seconds: float = 60.0
    max_failures: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        positive = ("steps", "batch_size", "micro_batch_size", "stride", "save_every")
        for name in (*positive, "keep_last", "log_every", "num_workers", "decode_workers", "decode_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cpus_per_worker", "decode_cpus"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.sampling not in ("uniform", "dense"):
            raise ValueError(f"sampling must be 'dense' or 'uniform', got {self.sampling!r}")
        workers = self.workers
        if self.batch_size % (workers * self.micro_batch_size):
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of num_workers * micro_batch_size "
                f"({workers} * {self.micro_batch_size})"
            )
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(float(v) for v in self.crop_ratio))
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if not 0 <= self.hflip_prob <= 1:
            raise ValueError(f"hflip_prob must be in [0, 1], got {self.hflip_prob}")
        if self.lr <= 0 or self.weight_decay < 0 or self.min_lr < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0; weight_decay, min_lr and warmup_steps >= 0")

    @property
    def workers(self) -> int:
        """Training processes: 1 locally or until the Ray driver has sized ``num_workers`` to the cluster."""
        return 1 if self.local or self.num_workers is None else self.num_workers

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        return self.batch_size // (self.workers * self.micro_batch_size)

    @property
    def per_worker_batch_size(self) -> int:
        return self.batch_size // self.workers

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["crop_scale"] = list(self.crop_scale)
        out["crop_ratio"] = list(self.crop_ratio)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; allowed: {sorted(known)}")
        for key in ("crop_scale", "crop_ratio"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        return cls(**values)


def resolve_precision(precision: Precision, device: torch.device) -> Literal["bf16", "fp16", "fp32"]:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


# ------------------------------------------------------------------------------------------------ optimizer


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
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.999))
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
    ratio = config.min_lr / config.lr

    def factor(step: int) -> float:
        return lr_factor(step, steps=config.steps, warmup_steps=config.warmup_steps, min_ratio=ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A grad scaler, enabled only for fp16 (bf16 needs none); saved and restored with the checkpoints anyway."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")


# ------------------------------------------------------------------------------------------------ augmentation


@dataclass(frozen=True)
class AugmentConfig:
    """What :func:`augment_clip` does (the part of :class:`TrainConfig` it needs)."""

    # Defaults are the training recipe's, defined once on TrainConfig.
    size: int
    crop_scale: tuple[float, float] = TrainConfig.crop_scale
    crop_ratio: tuple[float, float] = TrainConfig.crop_ratio
    randaug_num_ops: int = TrainConfig.randaug_num_ops
    randaug_magnitude: float = TrainConfig.randaug_magnitude
    randaug_magnitude_std: float = TrainConfig.randaug_magnitude_std
    hflip_prob: float = TrainConfig.hflip_prob

    @classmethod
    def from_train_config(cls, config: TrainConfig, size: int) -> AugmentConfig:
        return cls(
            size=size,
            crop_scale=config.crop_scale,
            crop_ratio=config.crop_ratio,
            randaug_num_ops=config.randaug_num_ops,
            randaug_magnitude=config.randaug_magnitude,
            randaug_magnitude_std=config.randaug_magnitude_std,
            hflip_prob=config.hflip_prob,
        )


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


def augment_clip(frames: np.ndarray | torch.Tensor, config: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """RandAugment, then a random resized crop, drawn once per clip and applied identically to every frame.

    Args:
        frames: uint8 ``[T, H, W, 3]`` (as decoded).
        config: what to apply.
        rng: the clip's generator (seeded from the clip's data position, so a resumed run repeats it).

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
    video = TF.resized_crop(video, top, left, ch, cw, [config.size, config.size], antialias=True)
    if config.hflip_prob > 0 and rng.random() < config.hflip_prob:
        video = video.flip(-1)
    return video.contiguous()  # [T, 3, size, size]


def normalize_video(video: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[B, T, 3, H, W]`` -> CLIP-normalised float32 of the same shape (on the tensor's device)."""
    return normalize_frames(video, mean, std, channels_last=False)


# ------------------------------------------------------------------------------------------------ data order


def position_for(local_index: int, *, rank: int, world_size: int, batch_size: int, start_step: int) -> tuple[int, int]:
    """(step, global data position) of the ``local_index``-th sample a worker reads when starting at ``start_step``.

    Step ``s`` consumes positions ``[s * batch_size, (s + 1) * batch_size)``; worker ``r`` takes the ``r``-th equal
    slice of them. The data position of a run is therefore a function of its step: resuming at step ``s`` reads
    exactly what the uninterrupted run would have read from there on.
    """
    per_worker = batch_size // world_size
    step = start_step + local_index // per_worker
    return step, step * batch_size + rank * per_worker + local_index % per_worker


class EpochOrder:
    """The sample index at a data position: epoch ``e`` reads the samples in a permutation seeded by ``(seed, e)``."""

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError("the training list is empty")
        self.num_samples = num_samples
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        perm = self._cache.get(epoch)
        if perm is None:
            if len(self._cache) > 2:
                self._cache.clear()
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._cache[epoch] = perm
        return int(perm[offset])


def sample_rng(seed: int, position: int) -> np.random.Generator:
    """The augmentation generator of the sample at a data position."""
    return np.random.default_rng([seed, 1_000_003, position])


# ------------------------------------------------------------------------------------------------ loss and step


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


# ------------------------------------------------------------------------------------------------ checkpoints


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states, as tensors and plain containers (safe to load)."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


@dataclass
class TrainingState:
    """What a training checkpoint restores besides the model: where the run stands."""

    step: int
    samples_seen: int
    extra: dict[str, Any]


def save_training_checkpoint(
    folder: str | Path,
    model: VitaClip,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    step: int,
    samples_seen: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a checkpoint folder: the model in the project format plus ``training_state.pt``.

    The folder is built under a temporary name beside ``folder`` and renamed into place, so a reader sees a whole
    checkpoint or none. ``training_state.pt`` holds tensors and plain containers only (``weights_only`` loads it):
    the optimizer, scheduler and scaler state dicts, the step, the data position and the RNG states.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        save_checkpoint(model, tmp)
        state = {
            "format": "vitaclip-training-state",
            "version": 1,
            "step": int(step),
            "samples_seen": int(samples_seen),
            "trainable": model.trainable_parameter_names(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "extra": json.dumps(dict(extra or {})),
        }
        torch.save(state, tmp / TRAINING_STATE_FILE)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_training_checkpoint(
    folder: str | Path,
    model: VitaClip,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    restore_rng: bool = True,
) -> TrainingState:
    """Restores the trainable weights, optimizer, scheduler, scaler and RNG states of a training checkpoint.

    The frozen backbone in the checkpoint must equal the model's: a run resumes on the weights it started from.
    """
    import safetensors.torch

    folder = Path(folder)
    state = load_torch_file(folder / TRAINING_STATE_FILE)  # tensors and containers only, never TorchScript
    names = model.trainable_parameter_names()
    if list(state["trainable"]) != names:
        raise ValueError(f"{folder}: trained parameters {state['trainable']} do not match the model's {names}")
    weights = safetensors.torch.load_file(str(folder / WEIGHTS_FILE), device="cpu")
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {missing[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            if name in own:
                own[name].copy_(value.to(own[name].dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return TrainingState(
        step=int(state["step"]), samples_seen=int(state["samples_seen"]), extra=json.loads(state["extra"])
    )


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def list_training_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output/checkpoints`` as ``(step, folder)``, oldest first."""
    root = Path(output) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and (entry / CONFIG_FILE).is_file() and (entry / WEIGHTS_FILE).is_file():
                found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint a path stands for: itself when it is a vitaclip checkpoint folder, else the latest complete
    checkpoint of a training output folder (``path/checkpoints/step-*``), else None."""
    path = Path(path)
    if is_vitaclip_checkpoint(path):
        return path
    found = list_training_checkpoints(path)
    return found[-1][1] if found else None


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint argument as a loadable path: a training output folder becomes its latest checkpoint."""
    p = Path(path)
    if p.is_dir() and not is_vitaclip_checkpoint(p):
        latest = latest_checkpoint(p)
        if latest is None:
            raise ValueError(f"{p} is neither a checkpoint nor a training output folder with checkpoints")
        return latest
    return p


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class LabelledVideo:
    uri: str
    label: int


def join_root(data_root: str, path: str) -> str:
    """A list entry's location: absolute paths and URIs as they are, relative ones under ``data_root``."""
    if not data_root or "://" in path or path.startswith("/"):
        return path
    return data_root.rstrip("/") + "/" + path


def parse_label(value: Any, label_index: Mapping[str, int], *, where: str) -> int:
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        label = int(text)
        if not 0 <= label < len(label_index):
            raise ValueError(f"{where}: label {label} is out of range for {len(label_index)} label names")
        return label
    key = text.replace("_", " ").strip().lower()
    if key not in label_index:
        raise ValueError(f"{where}: label {text!r} is not one of the label names")
    return label_index[key]


def label_lookup(label_names: Sequence[str]) -> dict[str, int]:
    """Name (``_`` read as a space, any case) -> index; also usable for range checks (its length)."""
    return {n.replace("_", " ").strip().lower(): i for i, n in enumerate(label_names)}


def parse_list_text(
    text: str, label_names: Sequence[str], *, data_root: str = "", where: str = "list"
) -> list[LabelledVideo]:
    """``path,label`` lines (the official trainer's list format; ``path label`` also works) -> entries.

    The label is an index into ``label_names`` or a name from it. Blank lines and ``#`` comments are skipped.
    """
    index = label_lookup(label_names)
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "," in line:
            path, label = line.rsplit(",", 1)
        else:
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{where}:{n}: expected 'path,label', got {line!r}")
            path, label = parts
        out.append(LabelledVideo(join_root(data_root, path.strip()), parse_label(label, index, where=f"{where}:{n}")))
    if not out:
        raise ValueError(f"{where}: no entries")
    return out


class TrainClipSource:
    """Decodes and augments training clips by data position.

    In: ``{"index": int64 [B]}``, a worker's local sample counters (``id``, Ray Data's range column, also works).
    Out: ``{"video": uint8 [B, T, 3, S, S], "label": int64 [B], "position": int64 [B], "valid": bool [B]}``.

    A callable class, so Ray Data can run it on decode actors; the same object runs in a plain loop. Each clip's
    sample and augmentation are functions of its data position only, so the stream is the same whichever process
    decodes it, and a resumed run reads exactly what an uninterrupted one would. A video that cannot be read or
    decoded yields zeros with ``valid=False`` (it does not count in the loss), never an exception.
    """

    def __init__(
        self,
        entries: Sequence[LabelledVideo] | Sequence[tuple[str, int]],
        *,
        config: TrainConfig,
        num_frames: int,
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        opener: Callable[[str], Any] | None = None,
    ) -> None:
        self.entries = [e if isinstance(e, LabelledVideo) else LabelledVideo(str(e[0]), int(e[1])) for e in entries]
        self.config = config
        self.num_frames = num_frames
        self.image_size = image_size
        self.decode_size = max(image_size, int(round(image_size * config.decode_scale)))
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.order = EpochOrder(len(self.entries), config.seed)
        self.augment = AugmentConfig.from_train_config(config, image_size)
        self.opener = opener

    def position(self, local_index: int) -> int:
        return position_for(
            local_index,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.config.batch_size,
            start_step=self.start_step,
        )[1]

    def clip_at(self, position: int) -> tuple[torch.Tensor, int, bool]:
        """(uint8 ``[T, 3, S, S]``, label, valid) of the sample at a data position."""
        from vitaclip.video import decode_clip, sampling_spec

        entry = self.entries[self.order(position)]
        rng = sample_rng(self.config.seed, position)
        jitter = self.config.sampling == "dense" and self.config.temporal_jitter
        start_fraction = float(rng.random()) if jitter else None
        try:
            source = self.opener(entry.uri) if self.opener is not None else entry.uri
            try:
                clip = decode_clip(
                    source,
                    sampling_spec(
                        self.config.sampling,
                        num_frames=self.num_frames,
                        stride=self.config.stride,
                        start_fraction=start_fraction,
                    ),
                    size=self.decode_size,
                    timeout_seconds=self.config.decode_timeout_seconds,
                )
            finally:
                close = getattr(source, "close", None)
                if callable(close):
                    close()
        except Exception:  # per-video boundary: a bad or unreadable video is skipped in the loss, never fatal
            empty = torch.zeros(self.num_frames, 3, self.image_size, self.image_size, dtype=torch.uint8)
            return empty, entry.label, False
        return augment_clip(clip.frames, self.augment, rng), entry.label, True

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        counters = batch["index"] if "index" in batch else batch["id"]  # "id": the column of ray.data.range
        positions = [self.position(int(i)) for i in np.asarray(counters).tolist()]
        videos, labels, valid = [], [], []
        for p in positions:
            video, label, ok = self.clip_at(p)
            videos.append(video.numpy())
            labels.append(label)
            valid.append(ok)
        return {
            "video": np.stack(videos),  # [B, T, 3, S, S]
            "label": np.asarray(labels, dtype=np.int64),
            "position": np.asarray(positions, dtype=np.int64),
            "valid": np.asarray(valid, dtype=bool),
        }

"""The training recipe (`TrainConfig`, with its `OptimizerConfig` and `AugmentConfig`) and its precision.

Nothing here knows about Ray: how many processes train and where is the job's business (`jobs.train`); the recipe
only needs ``world_size`` to split the global batch. Flags and YAML files name every field flat (``--lr``,
``randaug_num_ops:``): `TrainConfig.from_dict` takes that form as well as the nested one `TrainConfig.to_dict` writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from vitaclip.config import check_field_types
from vitaclip.redact import endpoint_without_userinfo

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Sampling = Literal["uniform", "dense"]

TRAINING_STATE_FILE = "training_state.pt"


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW over the trainable set, a cosine schedule and the numeric precision.

    Attributes:
        lr: peak learning rate.
        weight_decay: weight decay on matrices and prompt tables (not on 1-D parameters or ``logit_scale``).
        warmup_steps: linear warm-up before the cosine decay (the official recipe has none).
        min_lr: learning rate at the end of the cosine.
        max_grad_norm: clip the gradient norm (None: no clipping, as the official recipe).
        precision: ``auto`` (bf16 autocast on CUDA, float32 on CPU), ``bf16``, ``fp16`` (with a grad scaler), ``fp32``.
    """

    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr: float = 0.0
    max_grad_norm: float | None = None
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.min_lr < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0; weight_decay, min_lr and warmup_steps >= 0")


@dataclass(frozen=True)
class AugmentConfig:
    """What `vitaclip.training.augment_clip` does to a training clip.

    Attributes:
        decode_scale: frames are decoded with a side of ``image_size * decode_scale`` before the crop.
        crop_scale: area range of the random resized crop (of the decoded square).
        crop_ratio: aspect ratio range of the random resized crop.
        randaug_num_ops: RandAugment operations per clip (0: none).
        randaug_magnitude: RandAugment magnitude, out of 10.
        randaug_magnitude_std: standard deviation of the per-clip magnitude.
        hflip_prob: horizontal flip probability (0 in the recipe; flips change the meaning of direction classes).
    """

    decode_scale: float = 256 / 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaug_num_ops: int = 4
    randaug_magnitude: float = 7.0
    randaug_magnitude_std: float = 0.5
    hflip_prob: float = 0.0

    def __post_init__(self) -> None:
        check_field_types(self)
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(float(v) for v in self.crop_ratio))
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if not 0 <= self.hflip_prob <= 1:
            raise ValueError(f"hflip_prob must be in [0, 1], got {self.hflip_prob}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, schedule, clips, and the nested optimizer and augmentation configs.

    Attributes:
        train_list: ``path,label`` lines (label: an index into ``label_names`` or a name), a CSV with a header naming
            ``path`` (or ``uri``/``video``) and ``label`` and/or ``caption`` columns, or a Parquet manifest with those
            columns; local or ``s3://``. Rows repeating a path give that video several captions (one is drawn per
            sample); a list with captions may leave out labels (caption-only training).
        label_names: the training labels in order: a packaged label set (``kinetics400``, ``hmdb51``, ``ucf101``,
            ``demo``) or a file with one name per line (empty: the model's own label set, which the train command
            resolves before the run starts).
        output: folder or ``s3://bucket/prefix`` for checkpoints, metrics and plots.
        model: registered model name or JSON config (the model's config decides prompts and text context).
        checkpoint: weights to start from: OpenAI/open_clip CLIP weights (a fresh set of prompts on a frozen
            backbone) or a Vita-CLIP checkpoint (official or vitaclip). None: random weights (smoke runs only).
        val_list: optional held-out list, evaluated every ``eval_every`` steps (top-1, one centre view).
        data_root: prefix joined to relative paths of the lists (a folder or ``s3://bucket/prefix``).
        steps: optimizer steps.
        batch_size: global batch (videos per optimizer step over all processes).
        micro_batch_size: videos per forward pass in one process; ``batch_size / (world_size * micro_batch_size)``
            micro-batches are accumulated per step.
        world_size: training processes the global batch is split between (the job sets it from the cluster). The
            data a step reads does not depend on it, so a run may resume with another count.
        optimizer: `OptimizerConfig`.
        augment: `AugmentConfig`.
        num_frames: frames per clip (None: the model's training T).
        sampling: ``dense`` (``num_frames`` frames ``stride`` apart, the official protocol) or ``uniform``.
        stride: frame stride of dense sampling.
        temporal_jitter: with dense sampling, each training clip starts at a random frame (uniform over every start
            that fits, as the official trainer); False: the centre view.
        seed: data order, augmentation and RNG seed.
        save_every: steps between checkpoints.
        keep_last: checkpoints kept.
        eval_every: steps between validations (0: never).
        log_every: steps between JSON lines in ``metrics.jsonl``.
        decode_threads: decode threads of a process that decodes its own clips, and of validation.
        s3_endpoint_url: S3-compatible endpoint.
        decode_timeout_seconds: per-video decode time limit.
        caption_loss_weight: weight of the video-text contrastive loss (symmetric InfoNCE over each micro-batch)
            added to the label loss when the training list has captions; a list without captions trains exactly as
            before whatever this is. 0 ignores the captions.
    """

    train_list: str = ""
    label_names: str = ""
    output: str = ""
    model: str = "vitaclip-b16"
    checkpoint: str | None = None
    val_list: str | None = None
    data_root: str = ""
    steps: int = 30000
    batch_size: int = 256
    micro_batch_size: int = 16
    world_size: int = 1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    num_frames: int | None = None
    sampling: Sampling = "dense"
    stride: int = 16
    temporal_jitter: bool = True
    seed: int = 0
    save_every: int = 5000
    keep_last: int = 3
    eval_every: int = 5000
    log_every: int = 10
    decode_threads: int = 4
    s3_endpoint_url: str | None = None
    decode_timeout_seconds: float = 60.0
    caption_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.s3_endpoint_url:  # userinfo dropped here: never recorded, logged or sent
            object.__setattr__(self, "s3_endpoint_url", endpoint_without_userinfo(self.s3_endpoint_url))
        if not self.caption_loss_weight >= 0:
            raise ValueError(f"caption_loss_weight must be >= 0, got {self.caption_loss_weight}")
        positive = ("steps", "batch_size", "micro_batch_size", "world_size", "stride", "save_every")
        for name in (*positive, "keep_last", "log_every", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.sampling not in ("uniform", "dense"):
            raise ValueError(f"sampling must be 'dense' or 'uniform', got {self.sampling!r}")
        if self.batch_size % (self.world_size * self.micro_batch_size):
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of the number of workers * micro_batch_size "
                f"({self.world_size} * {self.micro_batch_size})"
            )

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step in each process."""
        return self.batch_size // (self.world_size * self.micro_batch_size)

    @property
    def per_worker_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["augment"]["crop_scale"] = list(self.augment.crop_scale)
        out["augment"]["crop_ratio"] = list(self.augment.crop_ratio)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """A config from its nested form (`to_dict`) or the flat one flags and YAML files use (``lr``, ``crop_scale``
        at the top level); keys may use dashes.

        Raises:
            ValueError: an unknown key (listing the allowed ones) or a bad value.
        """
        values = {str(k).replace("-", "_"): v for k, v in data.items()}
        nested = {"optimizer": OptimizerConfig, "augment": AugmentConfig}
        parts: dict[str, dict[str, Any]] = {name: dict(values.pop(name, None) or {}) for name in nested}
        for name, kind in nested.items():
            for key in [k for k in values if k in _field_names(kind)]:
                parts[name][key] = values.pop(key)
        known = _field_names(cls) - set(nested)
        unknown = sorted(set(values) - known)
        if unknown:
            allowed = sorted(known | _field_names(OptimizerConfig) | _field_names(AugmentConfig))
            raise ValueError(f"unknown training options {unknown}; allowed: {allowed}")
        augment = parts["augment"]
        for key in ("crop_scale", "crop_ratio"):
            if augment.get(key) is not None:
                augment[key] = tuple(augment[key])
        return cls(**values, optimizer=OptimizerConfig(**parts["optimizer"]), augment=AugmentConfig(**augment))

    @classmethod
    def flat_field_names(cls) -> set[str]:
        """Every option a flag or a YAML key may set."""
        return (
            (_field_names(cls) - {"optimizer", "augment"}) | _field_names(OptimizerConfig) | _field_names(AugmentConfig)
        )


def _field_names(kind: type) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}


def resolve_precision(precision: Precision, device: torch.device) -> Literal["bf16", "fp16", "fp32"]:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision

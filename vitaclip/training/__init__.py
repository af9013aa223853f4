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

from vitaclip.checkpoint_folder import CHECKPOINTS_DIR, list_training_checkpoints
from vitaclip.training.augment import (
    augment_clip,
    normalize_video,
    random_resized_box,
)
from vitaclip.training.config import (
    TRAINING_STATE_FILE,
    AugmentConfig,
    OptimizerConfig,
    Precision,
    Sampling,
    TrainConfig,
    resolve_precision,
)
from vitaclip.training.data import (
    EpochOrder,
    LabelledVideo,
    TrainClipSource,
    entries_from_rows,
    join_root,
    label_lookup,
    parse_label,
    parse_list_text,
    position_for,
    sample_rng,
)
from vitaclip.training.loop import TrainingParts, next_micro_batches, one_step, run_steps
from vitaclip.training.optim import (
    build_optimizer,
    build_scaler,
    build_scheduler,
    count_parameters,
    lr_factor,
    trainable_parameters,
)
from vitaclip.training.state import (
    TrainingState,
    checkpoint_dir_name,
    latest_checkpoint,
    load_training_checkpoint,
    resolve_checkpoint_path,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from vitaclip.training.step import (
    MicroBatch,
    StepStats,
    classification_loss,
    train_step,
    video_text_contrastive_loss,
)

__all__ = [
    "TrainingParts",
    "next_micro_batches",
    "one_step",
    "run_steps",
    "AugmentConfig",
    "OptimizerConfig",
    "CHECKPOINTS_DIR",
    "EpochOrder",
    "LabelledVideo",
    "Precision",
    "Sampling",
    "StepStats",
    "TRAINING_STATE_FILE",
    "TrainClipSource",
    "TrainConfig",
    "TrainingState",
    "augment_clip",
    "build_optimizer",
    "build_scaler",
    "build_scheduler",
    "checkpoint_dir_name",
    "MicroBatch",
    "classification_loss",
    "count_parameters",
    "entries_from_rows",
    "join_root",
    "label_lookup",
    "latest_checkpoint",
    "list_training_checkpoints",
    "load_training_checkpoint",
    "lr_factor",
    "normalize_video",
    "parse_label",
    "parse_list_text",
    "position_for",
    "random_resized_box",
    "resolve_checkpoint_path",
    "resolve_precision",
    "rng_state",
    "sample_rng",
    "save_training_checkpoint",
    "set_rng_state",
    "train_step",
    "video_text_contrastive_loss",
    "trainable_parameters",
]

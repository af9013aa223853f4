"""vitaclip: Vita-CLIP video embeddings, zero-shot labels and text-to-video search.

The top-level package holds the model, checkpoints and zero-shot helpers; it imports torch, numpy and open_clip and
never the distributed or cloud stack (ray, boto3), which live in ``jobs``. Names load lazily, so that
``import vitaclip.video`` (what decode workers need) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vitaclip._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "vitaclip.checkpoint_folder",
    "save_checkpoint": "vitaclip.checkpoints",
    "TextContextConfig": "vitaclip.config",
    "VitaClipConfig": "vitaclip.config",
    "list_label_sets": "vitaclip.labels",
    "load_label_set": "vitaclip.labels",
    "VitaClip": "vitaclip.model",
    "create_model": "vitaclip.registry",
    "get_model_config": "vitaclip.registry",
    "list_models": "vitaclip.registry",
    "LabelScore": "vitaclip.zeroshot",
    "top_k_labels": "vitaclip.zeroshot",
}

__all__ = [
    "CheckpointError",
    "LabelScore",
    "TextContextConfig",
    "VitaClip",
    "VitaClipConfig",
    "create_model",
    "get_model_config",
    "list_label_sets",
    "list_models",
    "load_label_set",
    "save_checkpoint",
    "top_k_labels",
]

if TYPE_CHECKING:
    from vitaclip.checkpoint_folder import CheckpointError
    from vitaclip.checkpoints import save_checkpoint
    from vitaclip.config import TextContextConfig, VitaClipConfig
    from vitaclip.labels import list_label_sets, load_label_set
    from vitaclip.model import VitaClip
    from vitaclip.registry import create_model, get_model_config, list_models
    from vitaclip.zeroshot import LabelScore, top_k_labels


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

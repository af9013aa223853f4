"""vitaclip: Vita-CLIP video embeddings, zero-shot labels and text-to-video search.

The top-level package holds the model, checkpoints and zero-shot helpers; it imports torch, numpy and open_clip and
never the distributed or cloud stack (ray, boto3), which live in ``jobs``.
"""

from vitaclip.checkpoints import CheckpointError, save_checkpoint
from vitaclip.config import TextContextConfig, VitaClipConfig
from vitaclip.labels import list_label_sets, load_label_set
from vitaclip.model import VitaClip
from vitaclip.registry import create_model, get_model_config, list_models
from vitaclip.zeroshot import LabelScore, top_k_labels

__version__ = "0.1.0"

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

"""Named model presets (JSON files in ``vitaclip/model_configs``) and :func:`create_model`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from vitaclip.checkpoints import CheckpointError, is_vitaclip_checkpoint, load_checkpoint
from vitaclip.config import VitaClipConfig
from vitaclip.model import VitaClip


@lru_cache(maxsize=1)
def _presets() -> dict[str, VitaClipConfig]:
    out = {}
    for entry in resources.files("vitaclip").joinpath("model_configs").iterdir():
        if entry.name.endswith(".json"):
            config = VitaClipConfig.from_dict(json.loads(entry.read_text(encoding="utf-8")))
            out[config.name] = config
    return out


def _config_path(checkpoint: str | Path) -> Path:
    from vitaclip.checkpoints import CONFIG_FILE

    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    return folder / CONFIG_FILE


def checkpoint_meta(checkpoint: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a vitaclip checkpoint folder, checked for the fields the registry reads.

    Raises:
        CheckpointError: unreadable JSON or missing fields, naming the file.
    """
    path = _config_path(checkpoint)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint config: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: no model config in it (a 'config' mapping is expected)")
    if not isinstance(meta["config"].get("name"), str) or not isinstance(meta.get("weights_sha256"), str):
        raise CheckpointError(f"{path}: 'config.name' and 'weights_sha256' must be strings")
    return meta


def list_models() -> list[str]:
    """Registered model names."""
    return sorted(_presets())


def packaged_checkpoint(name: str | None) -> Path | None:
    """The trained weights shipped with the package for a registered name (``vitaclip/pretrained/<name>/``, a
    vitaclip checkpoint folder), or None: most presets are architectures whose weights come from ``--checkpoint``."""
    if name is None or name not in _presets():
        return None
    folder = Path(str(resources.files("vitaclip").joinpath("pretrained").joinpath(name)))
    return folder if is_vitaclip_checkpoint(folder) else None


def _with_packaged(name: str | None, checkpoint: str | Path | None) -> str | Path | None:
    return checkpoint if checkpoint is not None else packaged_checkpoint(name)


def get_model_config(name: str) -> VitaClipConfig:
    """The config of a registered model, or of a JSON config file."""
    presets = _presets()
    if name in presets:
        return presets[name]
    if name.endswith(".json") and Path(name).is_file():
        return VitaClipConfig.from_json(Path(name))
    raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")


def create_model(
    name: str | VitaClipConfig | None,
    *,
    checkpoint: str | Path | None = None,
    label_names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> VitaClip:
    """Builds a model by name, optionally loading a checkpoint, in eval mode.

    Args:
        name: a registered name (:func:`list_models`), a JSON config path or a config. May be None when
            ``checkpoint`` is a vitaclip checkpoint folder, which carries its own config.
        checkpoint: an official Vita-CLIP checkpoint (``.pth``), OpenAI/open_clip CLIP weights (used as the frozen
            backbone; prompts are freshly initialised), or a vitaclip checkpoint folder. None: the weights packaged
            for ``name`` (:func:`packaged_checkpoint`, e.g. ``vitaclip-demo``), else random weights.
        label_names: the labels a class-specific text context was trained on, in training order; also the default
            labels for zero-shot labelling. Defaults to the config's packaged label set.
        device: where to put the model.
        dtype: parameter dtype (``torch.bfloat16`` on GPUs for speed).

    Raises:
        ValueError: an unknown name; :class:`~vitaclip.checkpoints.CheckpointError` (a ValueError) for a checkpoint
            that cannot be used.
    """
    if isinstance(name, str):
        checkpoint = _with_packaged(name, checkpoint)
    config: VitaClipConfig | None
    if isinstance(name, VitaClipConfig):
        config = name
    elif name is None:
        if checkpoint is None or not is_vitaclip_checkpoint(checkpoint):
            raise ValueError("create_model needs a model name unless the checkpoint is a vitaclip checkpoint folder")
        config = None
    else:
        config = get_model_config(name)
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise CheckpointError(f"checkpoint {checkpoint} does not exist")
        model = load_checkpoint(checkpoint, config=config, label_names=label_names)
    else:
        assert config is not None
        model = VitaClip(config, label_names=label_names)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def model_id_for(name: str | None, checkpoint: str | Path | None) -> str:
    """The ``model_id`` a model would report, without loading its weights when a checkpoint file is given.

    Name + sha256 of the checkpoint (the recorded weights hash for a vitaclip folder); for random init, the hash of
    the initial weights (this builds the model).
    """
    checkpoint = _with_packaged(name, checkpoint)
    from vitaclip.checkpoints import file_sha256

    if checkpoint is not None and is_vitaclip_checkpoint(checkpoint):
        meta = checkpoint_meta(checkpoint)
        return f"{meta['config']['name']}@sha256:{meta['weights_sha256']}"
    if name is None:
        raise ValueError("a model name is needed unless the checkpoint is a vitaclip checkpoint folder")
    config = get_model_config(name)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise CheckpointError(f"checkpoint {checkpoint} does not exist")
        return f"{config.name}@sha256:{file_sha256(checkpoint)}"
    return VitaClip(config).model_id


def default_label_names(name: str | None, checkpoint: str | Path | None) -> tuple[str, ...] | None:
    """The labels a model scores by default: a vitaclip checkpoint's recorded labels, else the config's label set."""
    checkpoint = _with_packaged(name, checkpoint)
    from vitaclip.labels import load_label_set

    if checkpoint is not None and is_vitaclip_checkpoint(checkpoint):
        meta = checkpoint_meta(checkpoint)
        names = meta.get("default_labels") or meta.get("label_names")
        if names:
            return tuple(names)
        label_set = meta["config"].get("label_set")
        return load_label_set(label_set) if label_set else None
    if name is None:
        return None
    config = get_model_config(name)
    return load_label_set(config.label_set) if config.label_set else None


def resolve_config(name: str | None, checkpoint: str | Path | None) -> VitaClipConfig:
    """The config a run should plan with (frames, image size) without loading weights: a vitaclip checkpoint's own
    config, else the named one."""
    checkpoint = _with_packaged(name, checkpoint)
    if checkpoint is not None and is_vitaclip_checkpoint(checkpoint):
        meta = checkpoint_meta(checkpoint)
        try:
            return VitaClipConfig.from_dict(meta["config"])
        except ValueError as exc:
            raise CheckpointError(f"{_config_path(checkpoint)}: {exc}") from None
    if name is None:
        raise ValueError("a model name is needed unless the checkpoint is a vitaclip checkpoint folder")
    return get_model_config(name)


def require_trained_weights(model_name: str | None, checkpoint: str | None, *, random_weights: bool) -> None:
    """Refuses a model without trained weights unless asked for: random weights give confident nonsense.

    Raises:
        ValueError: an unknown model name (listing the known ones), or no weights and no ``random_weights``.
    """
    if checkpoint is not None and is_vitaclip_checkpoint(checkpoint):
        return
    if model_name is None:
        raise ValueError("give --model (or a vitaclip checkpoint folder as --checkpoint)")
    get_model_config(model_name)
    if checkpoint is None and packaged_checkpoint(model_name) is None and not random_weights:
        raise ValueError(
            f"model {model_name!r} needs --checkpoint: without trained weights its labels mean nothing (the packaged "
            "demo model is --model vitaclip-demo; pass --random-weights for a smoke run)"
        )

"""Named model presets (JSON files in ``vitaclip/model_configs``) and :func:`create_model`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitaclip.checkpoint_folder import (
    CONFIG_FILE,
    CheckpointError,
    checkpoint_config,
    is_vitaclip_checkpoint,
    recorded_labels,
)
from vitaclip.config import VitaClipConfig, format_model_id
from vitaclip.readable import read_small_text
from vitaclip.redact import redact_url

if TYPE_CHECKING:  # torch and the model load only where a model is built: planning needs neither
    import torch

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
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    return folder / CONFIG_FILE


def checkpoint_meta(checkpoint: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a vitaclip checkpoint folder, checked for the fields the registry reads.

    Raises:
        CheckpointError: unreadable JSON or missing fields, naming the file.
    """
    path = _config_path(checkpoint)
    try:
        meta = json.loads(read_small_text(path, "the checkpoint config"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint config: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: no model config in it (a 'config' mapping is expected)")
    if not isinstance(meta["config"].get("name"), str) or not isinstance(meta.get("weights_sha256"), str):
        raise CheckpointError(f"{path}: 'config.name' and 'weights_sha256' must be strings")
    for key in ("default_labels", "label_names"):
        recorded_labels(meta, key, path.parent)
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
    """The checkpoint to read: the one given (a training output folder: its latest checkpoint), else the packaged
    weights of `name`, if any."""
    from vitaclip.checkpoint_folder import concrete_checkpoint

    return concrete_checkpoint(checkpoint) if checkpoint is not None else packaged_checkpoint(name)


def get_model_config(name: str) -> VitaClipConfig:
    """The config of a registered model, or of a JSON config file."""
    presets = _presets()
    if name in presets:
        return presets[name]
    if name.endswith(".json") and Path(name).is_file():
        return VitaClipConfig.from_json(Path(name))
    raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")


def preset_suffix(config: VitaClipConfig) -> str:
    """What a model id adds for a config named like a registered model but describing another one (a JSON config
    file or an edited config object keeping the registered name, with other mean and std, text context or tower
    options): ``+config:<12 hex digits>`` of its model fields (`vitaclip.checkpoint_folder.model_fields`), so that
    the same weights under it never share an id with the registered model; empty otherwise."""
    from vitaclip.checkpoint_folder import model_fields

    preset = _presets().get(config.name)
    if preset is None:
        return ""
    now, then = model_fields(config.to_dict()), model_fields(preset.to_dict())
    if now is None or then is None or now == then:
        return ""
    return "+config:" + hashlib.sha256(now.encode()).hexdigest()[:12]


def _is_the_folders_own_name(name: str, checkpoint: str | Path | None) -> bool:
    """Whether ``name`` is not a registered model but the name a vitaclip checkpoint folder's config gives itself."""
    if checkpoint is None or name in _presets() or not is_vitaclip_checkpoint(checkpoint):
        return False
    from vitaclip.checkpoint_folder import folder_model_name

    return folder_model_name(checkpoint) == name


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
    from vitaclip.checkpoints import load_checkpoint
    from vitaclip.model import VitaClip

    if isinstance(name, str) or checkpoint is not None:
        checkpoint = _with_packaged(name if isinstance(name, str) else None, checkpoint)
    config: VitaClipConfig | None
    if isinstance(name, VitaClipConfig):
        config = name
    elif name is None:
        if checkpoint is None or not is_vitaclip_checkpoint(checkpoint):
            raise ValueError("create_model needs a model name unless the checkpoint is a vitaclip checkpoint folder")
        config = None
    elif _is_the_folders_own_name(name, checkpoint):
        config = None  # a converted or trained model known only by its folder: the folder's config is the model
    else:
        config = get_model_config(name)
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise _missing_checkpoint(checkpoint)
        model = load_checkpoint(checkpoint, config=config, label_names=label_names)
    else:
        assert config is not None
        model = VitaClip(config, label_names=label_names)
    if config is not None and not (checkpoint is not None and is_vitaclip_checkpoint(checkpoint)):
        model.id_suffix = preset_suffix(model.config)  # a folder's id follows its own recorded config instead
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    if checkpoint is not None and dtype is not None:  # weights past the new type's range (float16: 65504)
        weights = model.state_dict().items()
        overflowed = sorted(k for k, t in weights if t.is_floating_point() and not t.isfinite().all())
        if overflowed:
            raise CheckpointError(
                f"checkpoint {checkpoint}: {len(overflowed)} tensors hold NaN or infinity in {dtype} {overflowed[:6]}"
            )
    return model


@dataclass(frozen=True)
class ResolvedModel:
    """A model as a run plans with it, resolved once and without loading weights.

    Attributes:
        name: The registered name (or JSON config path) asked for; None for a vitaclip checkpoint folder alone.
        checkpoint: The checkpoint asked for (None: the packaged weights of `name`, if any, else random weights).
        config: The model's config (a vitaclip checkpoint's own).
        model_id: What the loaded model reports as ``model_id`` (see `model_id_for`).
        label_names: The labels it scores: the ones asked for, else its default label set (may be empty).
        num_frames: Frames per clip: the one asked for, else the config's.
    """

    name: str | None
    checkpoint: str | None
    config: VitaClipConfig
    model_id: str
    label_names: tuple[str, ...]
    num_frames: int

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim


def resolve_model(
    name: str | None,
    checkpoint: str | Path | None,
    *,
    label_names: Sequence[str] | None = None,
    num_frames: int | None = None,
) -> ResolvedModel:
    """Config, model id and labels of a model, reading a vitaclip checkpoint's ``config.json`` once.

    Raises:
        ValueError: An unknown name, or no name and no vitaclip checkpoint folder;
            :class:`~vitaclip.checkpoints.CheckpointError` for a checkpoint whose config cannot be used.
    """
    found = _with_packaged(name, checkpoint)
    if found is not None and is_vitaclip_checkpoint(found):
        meta = checkpoint_meta(found)
        config, model_id, defaults = _config_of(meta, found), _id_of(meta, found), _labels_of(meta, found)
    else:
        config = _named_config(name)
        model_id = _id_of_named(config, found) + preset_suffix(config)
        defaults = _label_set(config.label_set)
    return ResolvedModel(
        name=name,
        checkpoint=None if checkpoint is None else str(checkpoint),
        config=config,
        model_id=model_id,
        label_names=tuple(label_names) if label_names else tuple(defaults or ()),
        num_frames=num_frames or config.num_frames,
    )


def _named_config(name: str | None) -> VitaClipConfig:
    if name is None:
        raise ValueError("a model name is needed unless the checkpoint is a vitaclip checkpoint folder")
    return get_model_config(name)


def _config_of(meta: dict[str, Any], checkpoint: str | Path) -> VitaClipConfig:
    try:
        return VitaClipConfig.from_dict(checkpoint_config(meta, checkpoint))
    except CheckpointError:
        raise  # names the file already
    except ValueError as exc:
        raise CheckpointError(f"{_config_path(checkpoint)}: {exc}") from None


def _id_of(meta: dict[str, Any], checkpoint: str | Path) -> str:
    """``NAME@sha256:WEIGHTS`` of a vitaclip folder, and ``+config:...`` where its config.json was edited since the
    weights were saved (`vitaclip.checkpoint_folder.config_suffix`)."""
    from vitaclip.checkpoint_folder import WEIGHTS_FILE, config_suffix, folder_of

    name = meta.get("weights_file", WEIGHTS_FILE)
    plain = isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..")
    suffix = config_suffix(meta, folder_of(checkpoint) / name) if plain else ""  # a bad name is refused at load
    return format_model_id(meta["config"]["name"], meta["weights_sha256"]) + suffix


def _id_of_named(config: VitaClipConfig, checkpoint: str | Path | None) -> str:
    from vitaclip.checkpoint_folder import file_sha256

    if checkpoint is not None:
        if Path(checkpoint).is_dir():
            raise CheckpointError(
                f"{checkpoint} is a folder without config.json: not a vitaclip checkpoint, nor a training output with "
                "checkpoints (checkpoints/step-*/)"
            )
        if not Path(checkpoint).is_file():
            raise _missing_checkpoint(checkpoint)
        return format_model_id(config.name, file_sha256(checkpoint))
    from vitaclip.model import VitaClip  # random weights: their id is the hash of the initialised weights

    return VitaClip(config).model_id


def _labels_of(meta: dict[str, Any], checkpoint: str | Path) -> tuple[str, ...] | None:
    names = meta.get("default_labels") or meta.get("label_names")
    return tuple(names) if names else _label_set(checkpoint_config(meta, checkpoint).get("label_set"))


def _label_set(label_set: str | None) -> tuple[str, ...] | None:
    from vitaclip.labels import load_label_set

    return tuple(load_label_set(label_set)) if label_set else None


def model_id_for(name: str | None, checkpoint: str | Path | None) -> str:
    """The ``model_id`` a model would report, without loading its weights when a checkpoint file is given.

    Name + sha256 of the checkpoint (the recorded weights hash for a vitaclip folder); for random init, the hash of
    the initial weights (this builds the model).
    """
    found = _with_packaged(name, checkpoint)
    if found is not None and is_vitaclip_checkpoint(found):
        return _id_of(checkpoint_meta(found), found)
    return _id_of_named(_named_config(name), found)


def default_label_names(name: str | None, checkpoint: str | Path | None) -> tuple[str, ...] | None:
    """The labels a model scores by default: a vitaclip checkpoint's recorded labels, else the config's label set."""
    found = _with_packaged(name, checkpoint)
    if found is not None and is_vitaclip_checkpoint(found):
        return _labels_of(checkpoint_meta(found), found)
    return None if name is None else _label_set(get_model_config(name).label_set)


def resolve_config(name: str | None, checkpoint: str | Path | None) -> VitaClipConfig:
    """The config a run should plan with (frames, image size) without loading weights: a vitaclip checkpoint's own
    config, else the named one."""
    found = _with_packaged(name, checkpoint)
    if found is not None and is_vitaclip_checkpoint(found):
        return _config_of(checkpoint_meta(found), found)
    return _named_config(name)


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


def _missing_checkpoint(checkpoint: str | Path) -> CheckpointError:
    """The error for a checkpoint that is not on this machine; a URL says that only local paths are read."""
    text = str(checkpoint)
    if "://" in text:
        return CheckpointError(
            f"checkpoint {redact_url(text)} is a URL: checkpoints are read from this machine's files only; copy it "
            "here first (on Kubernetes, infra/k8s/base/fetch_checkpoint.py does so in an init container)"
        )
    return CheckpointError(f"checkpoint {checkpoint} does not exist")

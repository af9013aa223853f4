"""Training checkpoints that resume exactly: model, optimizer, scheduler, scaler, step, RNG states."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitaclip.checkpoint_folder import list_training_checkpoints
from vitaclip.checkpoints import (
    WEIGHTS_FILE,
    is_vitaclip_checkpoint,
    load_torch_file,
    save_checkpoint,
    umask_mode,
)
from vitaclip.model import VitaClip
from vitaclip.training.config import TRAINING_STATE_FILE


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
    os.chmod(tmp, umask_mode(folder=True))  # readable as any folder made here, not private as mkdtemp makes it
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

    from vitaclip.checkpoint_folder import check_folder

    folder = Path(folder)
    # The weights' recorded sha256 and safetensors header first: a damaged copy is refused, never trained on.
    meta = check_folder(folder)
    state = load_torch_file(folder / TRAINING_STATE_FILE)  # tensors and containers only, never TorchScript
    _check_training_state(state, folder / TRAINING_STATE_FILE)
    names = model.trainable_parameter_names()
    if list(state["trainable"]) != names:
        raise ValueError(f"{folder}: trained parameters {state['trainable']} do not match the model's {names}")
    weights = safetensors.torch.load_file(str(folder / meta.get("weights_file", WEIGHTS_FILE)), device="cpu")
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {missing[:5]}")
    _check_resumed_weights(weights, own, folder)  # all of them before any is copied
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


_STATE_KEYS = ("step", "samples_seen", "trainable", "optimizer", "scheduler", "scaler", "rng", "extra")


def _check_training_state(state: Any, path: Path) -> None:
    """The shape of what `save_training_checkpoint` writes, before any of it is used."""
    if not isinstance(state, dict) or state.get("format") != "vitaclip-training-state":
        raise ValueError(f"{path}: not a vitaclip training state (a dict with format 'vitaclip-training-state')")
    lacking = [key for key in _STATE_KEYS if key not in state]
    if lacking:
        raise ValueError(f"{path}: the training state lacks {lacking}")
    if not all(isinstance(state[key], int) and not isinstance(state[key], bool) and state[key] >= 0 for key in
               ("step", "samples_seen")):  # fmt: skip
        raise ValueError(f"{path}: step and samples_seen must be whole numbers >= 0")
    if not (isinstance(state["trainable"], list) and all(isinstance(n, str) for n in state["trainable"])):
        raise ValueError(f"{path}: trainable must be a list of parameter names")
    if not isinstance(state["extra"], str):
        raise ValueError(f"{path}: extra must be a JSON text")


def _check_resumed_weights(weights: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Each weight the model has: the model's exact shape (no broadcasting), a floating dtype where the model's is
    one, and finite values, as the checkpoint loader requires of any weights."""
    for name, mine in own.items():
        value = weights[name]
        if tuple(value.shape) != tuple(mine.shape):
            raise ValueError(f"{folder}: {name} has shape {tuple(value.shape)}, the model's is {tuple(mine.shape)}")
        if mine.is_floating_point() and not value.is_floating_point():
            raise ValueError(f"{folder}: {name} is {value.dtype}, the model's is {mine.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{folder}: {name} holds NaN or infinity")


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:09d}"


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

"""Checkpoint formats: the official Vita-CLIP release, OpenAI/open_clip CLIP weights, and our own.

Loading a checkpoint never runs code from it. ``.pth``/``.pt`` files written by ``torch.save`` go through
``torch.load(weights_only=True)``; our own format is safetensors. TorchScript archives (OpenAI's CLIP ``.pt`` files)
are never given to ``torch.jit.load``, which runs the archive's code (a scripted module's ``__setstate__``) while
loading, nor to ``torch.load``, which hands them to ``torch.jit.load``: any zip that is not exactly ``torch.save``'s
layout is read by `vitaclip._torchscript` as data (an allow-listed unpickler, storages copied from the zip), and
anything it cannot read that way is refused with a `CheckpointError`.

A small file must not make the loader allocate or compute without bound: every pickle is read as opcodes before it is
unpickled (`_torchscript.check_pickle`: nesting, objects shared through the memo), every tensor must fit its storage
(a stride of 0 declares any shape over 4 bytes), and a model whose sizes come from the file (the official format's
tensors, a folder's ``config.json``) is checked against the ``MAX_*`` bounds of `vitaclip.model` and built on the meta
device and compared with the file's tensors before any memory is allocated for it.

Formats:
    ``official``: the official trainer's ``checkpoint-N.pth`` (``{"model": state_dict}``, keys with a ``module.``
        prefix) and the released Vita-CLIP-B file: keys ``visual.*``, ``textual.*``, ``prompt_learner.*``,
        ``logit_scale``.
    ``openai``: OpenAI CLIP / open_clip state dicts (``visual.conv1.weight``, ``token_embedding.weight``, ...), also
        wrapped in ``{"state_dict": ...}`` as open_clip's trainer saves them; used as a frozen backbone.
    ``vitaclip``: a folder with ``model.safetensors`` and ``config.json`` (model config, label names, sha256).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

import safetensors
import safetensors.torch
import torch

from vitaclip import _torchscript
from vitaclip.checkpoint_folder import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    LABEL_NAMES_SHA256,
    MAX_HEADER_BYTES,
    WEIGHTS_FILE,
    CheckpointError,
    checkpoint_config,
    concrete_checkpoint,
    config_suffix,
    file_sha256,
    is_packaged_data_file,
    is_vitaclip_checkpoint,
    label_names_digest,
    read_folder_meta,
    recorded_labels,
    verified_weights,
)
from vitaclip.config import MAX_LAYERS, TextContextConfig, VitaClipConfig
from vitaclip.labels import list_label_sets
from vitaclip.model import VitaClip, backbone_model_config, check_backbone_config

CheckpointFormat = Literal["official", "openai", "vitaclip"]


# ---------------------------------------------------------------------------------------------- reading


_ZIP_MAGIC = b"PK\x03\x04"  # torch.load reads a file as a zip archive exactly when it starts with these bytes


def _zip_layout(f: BinaryIO, path: Path) -> Literal["pickle", "torch.save", "other"]:
    """How ``torch.load`` would read the open file: a legacy pickle, a ``torch.save`` zip, or some other zip.

    "other" covers TorchScript archives, which ``torch.load`` hands to ``torch.jit.load`` (even with
    ``weights_only=True`` before torch 2.6, CVE-2025-32434): only files that are "pickle" or "torch.save" may reach
    ``torch.load``. Raises `CheckpointError` for a zip that cannot be read.
    """
    f.seek(0)
    if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
        return "pickle"  # torch.load unpickles it (weights only), never as TorchScript
    try:
        f.seek(0)
        with zipfile.ZipFile(f) as zf:
            if not _torchscript.is_torch_save_layout(zf):
                return "other"
            compressed = [i.filename for i in zf.infolist() if i.compress_type != zipfile.ZIP_STORED]
            if compressed:  # torch.save stores entries as they are; a deflated pickle can expand to gigabytes
                raise CheckpointError(
                    f"{path}: refusing this zip archive: compressed entries {compressed[:3]} (torch.save writes none)"
                )
            seen = {i.filename.partition("/")[2]: i.file_size for i in zf.infolist()}
        # Python's zip reader saw torch.save's layout, stored; torch's own reader (the one torch.load uses) must see
        # the same entries of the same sizes, as a crafted zip can read differently to two readers (a directory
        # Python finds after bytes put before it, another at the offset torch reads): a TorchScript archive, or
        # deflated entries inflating to gigabytes from a file of a megabyte.
        f.seek(0)
        reader = torch._C.PyTorchFileReader(f)
        records = {name: reader.get_record_size(name) for name in reader.get_all_records()}
        if records != seen or sum(records.values()) > os.fstat(f.fileno()).st_size:
            raise CheckpointError(f"{path}: refusing this zip archive: its entries read differently to torch")
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile and torch's reader fail in many ways on damaged or crafted zips
        raise CheckpointError(f"{path}: refusing this zip archive: {exc}") from exc
    return "torch.save"


def _read_torchscript(f: BinaryIO, path: Path) -> dict[str, torch.Tensor]:
    try:
        f.seek(0)
        with zipfile.ZipFile(f) as zf:
            state = _torchscript.read_state_dict(zf, archive_bytes=os.fstat(f.fileno()).st_size)
    except Exception as exc:  # ArchiveError names what was refused; zipfile raises its own errors on damaged entries
        raise CheckpointError(f"{path}: refusing this zip archive: {exc}") from exc
    _check_tensors(iter(state.items()), path)
    return state


_LEGACY_PICKLES = 5  # torch.save's format before torch 1.6: magic number, version, system info, object, storage keys
_CONTAINERS = (Mapping, list, tuple, set, frozenset)
_SHARED_BYTES_ALLOWED = 16 << 20  # beyond twice the storages: small tensors shared many times (a module used twice)


# What a pickle written by torch.save of tensors and plain containers calls (tensors, parameters, ordered dicts, bytes
# in protocol 2, sets, sizes, devices), and the globals it names only as type tags (storage types, dtypes). torch's
# weights_only unpickler allows more: calling torch.Tensor, a storage type or bytearray with numbers makes a tensor
# or buffer of any size from a few bytes, and _rebuild_parameter_with_state, _rebuild_meta_tensor_no_storage and the
# other rebuild functions make tensors the checks below cannot trust (attributes set on them, no storage).
_TORCH_SAVE_CALLS = frozenset(
    {
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",  # dtypes without a typed storage (float8 kinds)
        "torch._utils._rebuild_parameter",
        "collections.OrderedDict",
        "_codecs.encode",
        "torch.Size",
        "torch.device",
        *(f"{module}.{kind}" for module in ("builtins", "__builtin__") for kind in ("set", "frozenset", "complex")),
    }
)
_DTYPE_NAMES = frozenset(n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))
_STORAGE_TAG = re.compile(r"torch\.(\w+Storage|storage\.(Untyped|Typed)Storage)")


# Reading a pickle as opcodes takes about 3 s per MB (pure Python): a state dict with its optimizer state pickles to
# about 150 bytes per tensor (ViT-L/14 with AdamW state: about 0.4 MB), so 4 MiB is some 25,000 tensors.
_MAX_TORCH_SAVE_PICKLE_BYTES = 4 << 20


def _torch_save_name(name: str) -> bool:
    """Whether a torch.save pickle may name the global `name` (calls are checked on their own: `_TORCH_SAVE_CALLS`)."""
    module, _, attr = name.rpartition(".")
    return (
        name in _TORCH_SAVE_CALLS
        or _STORAGE_TAG.fullmatch(name) is not None
        or (module == "torch" and attr in _DTYPE_NAMES)
    )


def _check_pickles(f: BinaryIO, path: Path) -> None:
    """`_torchscript.check_pickle` on every pickle ``torch.load`` will unpickle, before it does: the ``data.pkl`` of a
    ``torch.save`` zip, read through torch's own zip reader (the one torch.load uses), or the pickles at the start of
    a legacy file. A pickle of a few hundred bytes can otherwise keep the loader busy without end."""
    f.seek(0)
    is_zip = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    limit = _MAX_TORCH_SAVE_PICKLE_BYTES
    try:
        f.seek(0)
        if is_zip:
            reader = torch._C.PyTorchFileReader(f)
            if reader.get_record_size("data.pkl") > limit:
                raise CheckpointError(f"{path}: refusing to unpickle it: its data.pkl is larger than {limit} bytes")
            _torchscript.check_pickle(
                io.BytesIO(reader.get_record("data.pkl")), "data.pkl", calls=_TORCH_SAVE_CALLS, names=_torch_save_name
            )
        else:
            head = io.BytesIO(f.read(limit))
            for count in range(_LEGACY_PICKLES):
                if count and head.tell() == len(head.getbuffer()):
                    raise CheckpointError(
                        f"{path}: not a PyTorch checkpoint: {count} pickle(s) and nothing after (torch.save writes a "
                        f"zip archive, or before torch 1.6 {_LEGACY_PICKLES} pickles): refused, never unpickled"
                    )
                _torchscript.check_pickle(
                    head, f"the pickle at byte {head.tell()}", calls=_TORCH_SAVE_CALLS, names=_torch_save_name
                )
    except _torchscript.UnsafePickleError as exc:
        raise CheckpointError(f"{path}: refusing to unpickle it: {exc}") from None
    except CheckpointError:
        raise
    except Exception as exc:  # ArchiveError on malformed pickles; torch's zip reader fails in its own ways
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {_torch_reason(exc)}") from None


def _torch_load(f: BinaryIO, path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a legacy pickle or ``torch.save`` zip (see `_zip_layout`), its pickles
    checked first (`_check_pickles`) and its tensors after (`_check_tensors`)."""
    _check_pickles(f, path)
    try:
        f.seek(0)
        loaded = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Keep torch's diagnosis (which global was blocked) and drop its advice to load unsafely.
        blocked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        detail = [ln for ln in str(exc).splitlines() if ln.strip() and "weights_only" not in ln and "load" not in ln]
        reason = f"it names the global {blocked.group(1)}" if blocked else " ".join(detail[:1]) or "unsupported content"
        raise CheckpointError(
            f"{path}: refusing to unpickle it: not a plain tensor checkpoint, or it holds code or objects other "
            f"than tensors and containers ({reason})"
        ) from exc
    except Exception as exc:  # arbitrary bytes make the unpickler fail in arbitrary ways (KeyError, IndexError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {_torch_reason(exc)}") from exc
    if isinstance(loaded, (torch.Tensor, *_CONTAINERS)):
        _check_tensors(_loaded_tensors(loaded), path)
    return loaded


def _loaded_tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(where, tensor)`` for every tensor in the containers of a loaded object, each object visited once; ``where``
    is the path of keys and indices to it (cut to 200 characters: keys come from the file)."""
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [("", obj)]
    while todo:
        where, item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            yield where, item
            continue
        pairs = item.items() if isinstance(item, Mapping) else enumerate(item)
        for key, value in pairs:
            if isinstance(value, (torch.Tensor, *_CONTAINERS)):
                todo.append((f"{where}.{_key_name(key)}"[-200:] if where else _key_name(key), value))


def _key_name(key: Any) -> str:
    """A key of a loaded container for a message: a string or small integer as it is, anything else by its type."""
    if isinstance(key, str):
        return key[:200]
    return str(key) if isinstance(key, int) and key.bit_length() <= 64 else type(key).__name__


def _overlaps(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether two elements of a strided layout can be the same storage element (a stride of 0, or a stride smaller
    than the span of the dimensions inside it). Contiguous tensors, their transposes and slices never do."""
    span = 1
    for step, size in sorted((st, n) for n, st in zip(shape, stride, strict=True) if n > 1):
        if step < span:
            return True
        span += (size - 1) * step
    return False


def _tensor_problem(tensor: torch.Tensor) -> str | None:
    if tensor.layout != torch.strided:
        return f"is a {tensor.layout} tensor, not a dense one"
    if tensor.numel() == 0:
        return None
    nbytes = tensor.untyped_storage().nbytes()
    if tensor.numel() * tensor.element_size() > nbytes or _overlaps(tensor.shape, tensor.stride()):
        return (
            f"declares shape {list(tensor.shape)} with strides {list(tensor.stride())} over a storage of {nbytes} "
            "bytes: its elements would repeat storage elements"
        )
    return None


def _check_tensors(tensors: Iterator[tuple[str, torch.Tensor]], path: Path) -> None:
    """Refuses tensors that declare more elements than their storage holds (size and strides are the pickle's to
    choose: a stride of 0 makes 4 bytes of storage a tensor of any shape, and a model built to that shape allocates
    it), and tensors that together declare more than twice the bytes of their storages (one storage shared by every
    layer's weights: tied weights share one storage between two tensors)."""
    storages: dict[int, int] = {}
    declared = 0
    for where, tensor in tensors:
        # A plain CPU tensor with no attributes of its own (a pickle that sets some can shadow the methods below).
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.device.type != "cpu" or vars(tensor):
            raise CheckpointError(
                f"{path}: refusing tensor {where[:200]!r}: not a plain CPU tensor ({type(tensor).__name__} on "
                f"{tensor.device.type}{', with attributes of its own' if vars(tensor) else ''})"
            )
        problem = _tensor_problem(tensor)
        if problem is not None:
            raise CheckpointError(f"{path}: refusing tensor {where[:200]!r}: it {problem}")
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        declared += tensor.numel() * tensor.element_size()
    if declared > 2 * sum(storages.values()) + _SHARED_BYTES_ALLOWED:
        raise CheckpointError(
            f"{path}: refusing its tensors: they declare {declared} bytes over {sum(storages.values())} bytes of "
            "storage, sharing storages far more than tied weights do"
        )


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` for files written by ``torch.save``, refusing any other zip archive.

    Unlike a bare ``torch.load``, it never hands a TorchScript archive to ``torch.jit.load``, whatever the torch
    version. Raises `CheckpointError`.
    """
    path = Path(path)
    with open(path, "rb") as f:  # one open file for the checks and the load: the path cannot change in between
        if _zip_layout(f, path) == "other":
            raise CheckpointError(f"{path}: a TorchScript or other zip archive, not a file written by torch.save")
        return _torch_load(f, path)


_MAX_WRAPPING = 8  # {"model": {"state_dict": ...}} levels around a state dict


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Finds the state dict inside a loaded object and strips DDP's ``module.`` prefix."""
    for _ in range(_MAX_WRAPPING + 1):
        if not isinstance(obj, Mapping):
            break
        inner = [obj[k] for k in ("model", "state_dict", "module") if isinstance(obj.get(k), Mapping)]
        if not inner:
            break
        obj = inner[0]
    else:
        raise CheckpointError(f"{path}: no state dict within {_MAX_WRAPPING} levels of model/state_dict/module keys")
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: no state dict found (got {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the state dict holds no tensors")
    odd = next((k for k in tensors if not isinstance(k, str)), None)
    if odd is not None:  # named by its type only: formatting an untrusted key could walk it without end
        raise CheckpointError(f"{path}: the state dict holds a tensor under a {type(odd).__name__} key, not a name")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads tensors from a ``.pth``/``.pt``/``.bin``, TorchScript archive or ``.safetensors`` file, safely."""
    return _read_state_dict(Path(path), hashed=False)[0]


def _torch_reason(exc: BaseException) -> str:
    """The first line of torch's error, in words where torch garbles it: a legacy file whose storage declares more
    bytes than it holds says "storage has wrong byte size: expected %ld got %ld" with the numbers run together."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    if "storage has wrong byte size" in first:
        return "a tensor storage declares another size than the bytes it holds (damaged or truncated)"
    return first


def read_state_dict_and_sha256(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """`read_state_dict` and the sha256 of the very bytes read (one open file for both): a file replaced between a
    hash and a load by path gave a model id naming weights that were not the ones loaded."""
    state, sha = _read_state_dict(Path(path), hashed=True)
    assert sha is not None
    return state, sha


def _read_state_dict(path: Path, *, hashed: bool) -> tuple[dict[str, torch.Tensor], str | None]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    with open(path, "rb") as f:  # one open file for the hash, the checks and the load: the path cannot change
        sha = _sha256_of(f) if hashed else None
        if path.suffix == ".safetensors":
            f.seek(0)
            head = f.read(8)
            if len(head) == 8 and struct.unpack("<Q", head)[0] > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: refusing its safetensors header of {struct.unpack('<Q', head)[0]:,} bytes (at most "
                    f"{MAX_HEADER_BYTES:,}: a model's is a few hundred KB)"
                )
            # The same open file by its /proc name (Linux), else its bytes: never the path again.
            same = f"/proc/self/fd/{f.fileno()}"
            try:
                if os.path.exists(same):
                    return safetensors.torch.load_file(same, device="cpu"), sha
                f.seek(0)
                return safetensors.torch.load(f.read()), sha
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
        if _zip_layout(f, path) == "other":
            return _read_torchscript(f, path), sha
        obj = _torch_load(f, path)
    return _unwrap(obj, path), sha


def _sha256_of(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    f.seek(0)
    return digest.hexdigest()


def detect_format(state: Mapping[str, torch.Tensor], path: str | Path | None = None) -> CheckpointFormat:
    """The format of a state dict by its keys; `path` names the file in the error."""
    keys = set(state)
    if "visual.time_embed" in keys or "visual.patch_embed.proj.weight" in keys or "prompt_learner.ctx" in keys:
        return "official"
    if "visual.conv1.weight" in keys and "token_embedding.weight" in keys:
        return "openai"
    if any(k.startswith("clip.visual.") for k in keys):
        return "vitaclip"
    sample = sorted(keys)[:5]
    where = f"{path}: " if path is not None else ""
    raise CheckpointError(
        f"{where}unknown checkpoint format (first keys: {sample}); expected official Vita-CLIP, "
        "OpenAI/open_clip CLIP or a vitaclip checkpoint folder"
    )


# ---------------------------------------------------------------------------------------------- official

_BLOCK = re.compile(r"^visual\.blocks\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "norm1.": "ln_1.",
    "norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "attn.out_proj.": "attn.out_proj.",
}
_VISUAL_RENAMES = {
    "visual.patch_embed.proj.weight": "clip.visual.conv1.weight",
    "visual.patch_embed.proj.bias": "patch_bias",
    "visual.cls_token": "clip.visual.class_embedding",
    "visual.pos_embed": "clip.visual.positional_embedding",
    "visual.time_embed": "temporal.weight",
    "visual.proj": "clip.visual.proj",
    "visual.global_prompts": "global_prompts.tokens",
    "logit_scale": "logit_scale",
    "prompt_learner.ctx": "text_context.ctx",
    "prompt_learner.token_prefix": "text_context.token_prefix",
    "prompt_learner.token_suffix": "text_context.token_suffix",
}


def map_official_key(key: str) -> str:
    """Our parameter name for an official parameter name (q/k/v projections map to the fused ``in_proj``)."""
    if key in _VISUAL_RENAMES:
        return _VISUAL_RENAMES[key]
    for norm in ("ln_pre", "ln_post"):
        if key.startswith(f"visual.{norm}."):
            return "clip." + key
    if key.startswith("textual."):
        return "clip." + key[len("textual.") :]
    m = _BLOCK.match(key)
    if m:
        layer, rest = m.group(1), m.group(2)
        if rest == "local_prompts":
            return "local_prompts.tokens"
        if rest.startswith("cls_proj."):
            return f"cls_proj.{layer}.{rest[len('cls_proj.') :]}"
        if rest.startswith("summary_ln."):
            return f"summary.norms.{layer}.{rest[len('summary_ln.') :]}"
        if rest.startswith("summary_attn_layer."):
            return f"summary.attns.{layer}.{rest[len('summary_attn_layer.') :]}"
        if re.match(r"attn\.[qkv]_proj\.(weight|bias)$", rest):
            return f"clip.visual.transformer.resblocks.{layer}.attn.in_proj_{rest.rsplit('.', 1)[1]}"
        for old, new in _BLOCK_RENAMES.items():
            if rest.startswith(old):
                return f"clip.visual.transformer.resblocks.{layer}.{new}{rest[len(old) :]}"
    raise CheckpointError(f"official checkpoint key {key!r} is not part of Vita-CLIP")


def _count_layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state for m in [re.match(re.escape(prefix) + r"(\d{1,9})\.", k)] if m}
    if len(found) > MAX_LAYERS:
        raise CheckpointError(f"official checkpoint has {len(found)} layers under {prefix}, more than {MAX_LAYERS}")
    if found != set(range(len(found))):
        raise CheckpointError(f"layers under {prefix} are not numbered 0..N-1: {sorted(found)[:12]}")
    return len(found)


def _require(state: Mapping[str, torch.Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"official checkpoint is missing {missing}")


def _heads(base_part: Mapping[str, Any], width: int) -> int:
    """Head counts are not visible in tensors: the named config's when the widths agree, else CLIP's 64-wide heads."""
    if base_part.get("width") == width and "heads" in base_part:
        return int(base_part["heads"])
    if base_part.get("width") == width and "head_width" in base_part:
        return width // int(base_part["head_width"])
    return max(1, width // 64)


def _official_backbone(state: Mapping[str, torch.Tensor], base: VitaClipConfig) -> dict[str, Any]:
    """``backbone`` and ``backbone_config`` for official tensors: the named config's when the shapes agree, else an
    open_clip config inferred from the tensors (QuickGELU, as the official blocks)."""
    width = state["visual.cls_token"].shape[0]
    patch = state["visual.patch_embed.proj.weight"].shape[-1]
    grid = round((state["visual.pos_embed"].shape[0] - 1) ** 0.5)
    mlp_width = state["visual.blocks.0.mlp.fc1.weight"].shape[0]
    text_width = state["textual.ln_final.weight"].shape[0]
    base_cfg = backbone_model_config(base)
    base_vision, base_text = base_cfg["vision_cfg"], base_cfg["text_cfg"]
    vision_cfg: dict[str, Any] = {
        "image_size": int(grid * patch),
        "patch_size": int(patch),
        "width": int(width),
        "layers": _count_layers(state, "visual.blocks."),
        "head_width": int(width // _heads(base_vision, width)),
        "mlp_ratio": mlp_width / width,
    }
    text_cfg: dict[str, Any] = {
        "context_length": int(state["textual.positional_embedding"].shape[0]),
        "vocab_size": int(state["textual.token_embedding.weight"].shape[0]),
        "width": int(text_width),
        "heads": _heads(base_text, text_width),
        "layers": _count_layers(state, "textual.transformer.resblocks."),
    }
    embed_dim = int(state["visual.proj"].shape[1])
    same_backbone = (
        all(base_vision.get(k, v) == v for k, v in vision_cfg.items() if k not in ("head_width", "mlp_ratio"))
        and all(base_text.get(k, v) == v for k, v in text_cfg.items() if k != "heads")
        and base_cfg.get("embed_dim") == embed_dim
        and float(base_vision.get("mlp_ratio", 4.0)) == mlp_width / width
    )
    if same_backbone:
        return {"backbone": base.backbone, "backbone_config": base.backbone_config}
    inferred = {"embed_dim": embed_dim, "quick_gelu": True, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    return {"backbone": None, "backbone_config": inferred}


# What `config_from_official` reads the model's shape from, with the number of dimensions of each.
_OFFICIAL_SHAPE_KEYS: dict[str, int | tuple[int, ...]] = {
    "visual.patch_embed.proj.weight": 4,
    "visual.cls_token": 1,
    "visual.pos_embed": 2,
    "visual.proj": 2,
    "visual.time_embed": 2,
    "logit_scale": 0,
    "visual.blocks.0.mlp.fc1.weight": 2,
    "textual.ln_final.weight": 1,
    "textual.positional_embedding": 2,
    "textual.token_embedding.weight": 2,
}
_OFFICIAL_OPTIONAL_NDIMS: dict[str, int | tuple[int, ...]] = {
    "prompt_learner.ctx": (2, 3),
    "visual.global_prompts": 3,
    "visual.blocks.0.local_prompts": 3,
}


def config_from_official(state: Mapping[str, torch.Tensor], base: VitaClipConfig) -> VitaClipConfig:
    """Infers the backbone shape, T, G, local prompts, summary token and text context from official tensors.

    ``base`` supplies what tensors cannot tell: attention heads, the text context's name position, the label set.
    """
    if "textual.token_embedding.weight" not in state:
        raise CheckpointError(
            "official checkpoint has no text tower (textual.*): it was saved in zero-shot mode; Vita-CLIP needs the "
            "text tower stored with it"
        )
    _require(state, *_OFFICIAL_SHAPE_KEYS)
    odd = [
        f"{k} {tuple(state[k].shape)} (expected {ndim} dimensions)"
        for k, ndim in {**_OFFICIAL_SHAPE_KEYS, **_OFFICIAL_OPTIONAL_NDIMS}.items()
        if k in state and (state[k].ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)) or 0 in state[k].shape)
    ]
    if "visual.pos_embed" in state and not odd and state["visual.pos_embed"].shape[0] < 2:
        odd.append(f"visual.pos_embed {tuple(state['visual.pos_embed'].shape)} (expected a CLS row and patch rows)")
    if odd:
        raise CheckpointError(f"official checkpoint tensors of unexpected shapes: {odd[:6]}")
    ctx = state.get("prompt_learner.ctx")
    text_context = None
    if ctx is not None:
        base_ctx = base.text_context or TextContextConfig()
        text_context = TextContextConfig(
            num_tokens=int(ctx.shape[-2]),
            kind="class_specific" if ctx.ndim == 3 else "generic",
            position=base_ctx.position,
        )
    local = state.get("visual.blocks.0.local_prompts")
    return base.replace(
        **_official_backbone(state, base),
        num_frames=int(state["visual.time_embed"].shape[0]),
        temporal_embedding=True,
        num_global_prompts=int(state["visual.global_prompts"].shape[1]) if "visual.global_prompts" in state else 0,
        num_local_prompts=int(local.shape[1]) if local is not None else 0,
        summary_token="visual.blocks.0.summary_ln.weight" in state,
        text_context=text_context,
    )


def convert_official_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official state dict -> ours. Fuses q/k/v, stacks per-layer local prompts; every key must be used."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    local: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m and re.match(r"attn\.[qkv]_proj\.(weight|bias)$", m.group(2)):
            which, kind = m.group(2).split(".")[1][0], m.group(2).rsplit(".", 1)[1]
            qkv.setdefault((m.group(1), kind), {})[which] = value
            continue
        if m and m.group(2) == "local_prompts":
            if value.ndim != 3 or value.shape[0] != 1:
                raise CheckpointError(f"{key} must be [1, T, D], got {tuple(value.shape)}")
            local[int(m.group(1))] = value[0]
            continue
        out[map_official_key(key)] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"visual.blocks.{layer}.attn is missing {sorted({'q', 'k', 'v'} - set(parts))}_proj")
        out[f"clip.visual.transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    if local:
        if sorted(local) != list(range(len(local))):
            raise CheckpointError(f"local prompts found for layers {sorted(local)} only")
        shapes = {tuple(tokens.shape) for tokens in local.values()}
        if len(shapes) > 1:
            raise CheckpointError(
                f"not an official checkpoint of one shape: local prompts differ across layers {sorted(shapes)}"
            )
        out["local_prompts.tokens"] = torch.stack([local[i] for i in range(len(local))])
    # open_clip keeps its own logit_scale; keep it equal to the model's.
    out["clip.logit_scale"] = out["logit_scale"].clone()
    return out


# ---------------------------------------------------------------------------------------------- loading


def _shape_mismatches(own: Mapping[str, Sequence[int]], theirs: Mapping[str, Sequence[int]]) -> list[str]:
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    wrong = sorted(
        f"{k}: checkpoint {tuple(theirs[k])} vs model {tuple(own[k])}"
        for k in set(own) & set(theirs)
        if tuple(theirs[k]) != tuple(own[k])
    )
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors {missing[:6]}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensors {unexpected[:6]}")
    if wrong:
        parts.append(f"wrong shapes {wrong[:6]}")
    return parts


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.element_size() == 1:  # float8 kinds: no isfinite of their own; their values are exact in float32
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


def _value_problems(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """Tensors a cast would silently change (a complex, integer or boolean tensor for a float weight) or that hold
    NaN or infinity once cast to the model's type (1e300 in float64 is infinity in float32, 1e6 in float16): they
    load without an error and give NaN embeddings, written as ``ok`` rows."""
    wrong_dtype = sorted(
        f"{k}: {state[k].dtype} for {own[k].dtype}"
        for k in own
        if own[k].is_floating_point() and not state[k].is_floating_point()
    )
    not_finite = sorted(
        k
        for k in own
        if state[k].is_floating_point()
        and not _all_finite(state[k].to(own[k].dtype) if own[k].is_floating_point() else state[k])
    )
    parts = []
    if wrong_dtype:
        parts.append(f"tensors of another kind than the model's floats {wrong_dtype[:6]}")
    if not_finite:
        parts.append(f"{len(not_finite)} tensors holding NaN or infinity (in the model's type) {not_finite[:6]}")
    return parts


def _load_strict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, *, model_name: str | None = None
) -> None:
    own = model.state_dict()
    parts = _shape_mismatches({k: v.shape for k, v in own.items()}, {k: v.shape for k, v in state.items()})
    parts = parts or _value_problems(own, state)
    if parts:
        name = model_name or getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise CheckpointError(f"{source} does not match model {name}: " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=True)


def _check_fits(config: VitaClipConfig, label_names: Sequence[str] | None, weights: Path) -> None:
    """Compares the model a config builds with the weights file's header before anything is allocated: a config
    that does not match its tensors (``num_frames: 10**12``, a million layers) is refused instead of exhausting
    memory. The model is built on the meta device; its layers are counted first, as each costs Python objects."""
    try:
        with safetensors.safe_open(str(weights), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: not a readable safetensors file: {exc}") from exc
    backbone = backbone_model_config(config)
    check_backbone_config(backbone)
    for tower in ("vision_cfg", "text_cfg"):
        layers = backbone[tower].get("layers", 12)
        if layers > len(shapes):
            raise CheckpointError(
                f"checkpoint {weights} does not match model {config.name}: its config asks for {layers} "
                f"{tower.split('_')[0]} layers and the file holds {len(shapes)} tensors"
            )
    try:
        with torch.device("meta"):
            model = VitaClip(config, label_names=label_names)
    except (TypeError, AssertionError, ArithmeticError, RuntimeError, IndexError, KeyError) as exc:
        raise ValueError(f"model {config.name!r} cannot be built: {type(exc).__name__}: {exc}") from None
    parts = _shape_mismatches({k: v.shape for k, v in model.state_dict().items()}, shapes)
    if parts:
        raise CheckpointError(f"checkpoint {weights} does not match model {config.name}: " + "; ".join(parts))


def load_official(
    path: str | Path,
    base: VitaClipConfig,
    *,
    label_names: Sequence[str] | None,
    state: Mapping[str, torch.Tensor] | None = None,
    sha256: str | None = None,
) -> VitaClip:
    """A Vita-CLIP model from an official checkpoint; ``base`` is the named config it is read against.

    The model's sizes come from the file's tensors, so it is first built on the meta device and compared with them:
    nothing is allocated for a model the file does not hold. Every problem is a `CheckpointError` naming the file.
    """
    if state is None:
        state, sha256 = read_state_dict_and_sha256(path)
    if detect_format(state, path) != "official":
        raise CheckpointError(f"{path} is not an official Vita-CLIP checkpoint")
    try:
        config = config_from_official(state, base)
        names = _label_names_for(config, label_names, state.get("prompt_learner.ctx"))
        converted = convert_official_state(state)
        with torch.device("meta"):
            planned = _official_model(config, names, converted)
    except ValueError as exc:  # CheckpointError, or a config open_clip or VitaClip refuses (a size beyond the bounds)
        raise (exc if str(path) in str(exc) else CheckpointError(f"{path}: {exc}")) from None
    except (TypeError, AssertionError, ArithmeticError, RuntimeError, IndexError, KeyError) as exc:
        # Inconsistent tensors reach open_clip as inconsistent sizes (a width no head count divides, no text layers).
        raise CheckpointError(f"{path}: not a usable official checkpoint: {type(exc).__name__}: {exc}") from None
    parts = _shape_mismatches(_shapes(planned.state_dict()), _shapes(converted))
    if parts:
        raise CheckpointError(f"official checkpoint {path} does not match model {config.name}: " + "; ".join(parts))
    model = _official_model(config, names, converted)
    _load_strict(model, converted, f"official checkpoint {path}")
    model.source_sha256 = sha256 if sha256 is not None else file_sha256(path)
    return model


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, Sequence[int]]:
    return {k: v.shape for k, v in state.items()}


def _official_model(
    config: VitaClipConfig, names: Sequence[str] | None, converted: dict[str, torch.Tensor]
) -> VitaClip:
    """The model an official checkpoint loads into (random weights, on the current device). A generic context whose
    training label names were not given drops its stored label prompts, from the model and from ``converted``: they
    cannot be matched to names, and every name's prompt is built from the token embedding instead."""
    model = VitaClip(config, label_names=names)
    if model.text_context is not None and not model.text_context.label_names:
        converted.pop("text_context.token_prefix", None)
        converted.pop("text_context.token_suffix", None)
        model.text_context.register_buffer("token_prefix", None)
        model.text_context.register_buffer("token_suffix", None)
    return model


def _label_names_for(
    config: VitaClipConfig, label_names: Sequence[str] | None, ctx: torch.Tensor | None
) -> tuple[str, ...] | None:
    if label_names is not None:
        names = tuple(label_names)
    elif config.label_set is not None:
        from vitaclip.labels import load_label_set

        names = load_label_set(config.label_set)
    else:
        names = None
    if ctx is not None and ctx.ndim == 3 and (names is None or len(names) != ctx.shape[0]):
        if names is None:
            got = "no label names were given"
        elif label_names is None:  # the config's own label set: the config may be another model's
            got = (
                f"model {config.name!r} comes with {len(names)} label names (its label set {config.label_set!r}: is "
                "it the checkpoint's model?)"
            )
        else:
            got = f"{len(names)} label names were given"
        raise CheckpointError(
            f"the checkpoint's class-specific text context covers {ctx.shape[0]} labels but {got}: give its label "
            "names in training order (--label-names on the command line, label_names=[...] in Python; the official "
            "checkpoint stores none)"
        )
    return names


def load_backbone(
    path: str | Path,
    config: VitaClipConfig,
    *,
    label_names: Sequence[str] | None,
    state: Mapping[str, torch.Tensor] | None = None,
    sha256: str | None = None,
) -> VitaClip:
    """A fresh Vita-CLIP model (prompts initialised) on OpenAI/open_clip backbone weights."""
    if state is None:
        state, sha256 = read_state_dict_and_sha256(path)
    if detect_format(state, path) != "openai":
        raise CheckpointError(f"{path} is not an OpenAI/open_clip CLIP checkpoint")
    model = VitaClip(config, label_names=label_names)
    # Metadata scalars of OpenAI's files and the (recomputed) causal mask are not weights.
    skip = ("input_resolution", "context_length", "vocab_size")
    state = {k: v for k, v in state.items() if k not in skip and not k.endswith("attn_mask")}
    _load_strict(model.clip, state, f"CLIP checkpoint {path}", model_name=f"{config.name} backbone")
    with torch.no_grad():
        model.logit_scale.copy_(model.clip.logit_scale)
    model.refresh_label_prompts()
    model.source_sha256 = sha256 if sha256 is not None else file_sha256(path)
    return model


def _save_safetensors(state: Mapping[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, then the header written again with the metadata in the order given.

    The writer keeps the metadata in a hash map whose order changes from one call to the next, so the same weights
    and config gave files of different bytes, hence different sha256 and model ids. The header is JSON padded with
    spaces to a multiple of 8 bytes; the tensor data and its offsets are unchanged.
    """
    safetensors.torch.save_file(dict(state), path, metadata=metadata)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        data = f.read()
    header.pop("__metadata__", None)
    text = json.dumps({"__metadata__": dict(metadata), **header}, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


_COPIED_FILES = {"label_set": "label_set.txt", "tokenizer": "tokenizer.txt.gz"}


def _portable_config(config: VitaClipConfig, out_dir: Path) -> VitaClipConfig:
    """The config a folder records: a label set or tokenizer given as a path is copied into the folder and named by
    its file name there, as a checkpoint may name only packaged files or its own (`checkpoint_config`)."""
    changes = {}
    for key, target in _COPIED_FILES.items():
        value = getattr(config, key)
        packaged = value in list_label_sets() if key == "label_set" else is_packaged_data_file(value)
        if value is None or packaged:
            continue
        if Path(value).resolve() != (out_dir / target).resolve():
            _replace_file(out_dir, target, functools.partial(_copy_into, str(value)))
        changes[key] = target
    return config.replace(**changes) if changes else config


def umask_mode(*, folder: bool = False) -> int:
    """The mode a plain ``open`` or ``mkdir`` would give (0o666 or 0o777 less the umask), for files and folders made
    through `tempfile` (0o600 and 0o700: a checkpoint another account or a service reads would be unreadable)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def save_checkpoint(model: VitaClip, out_dir: str | Path) -> str:
    """Writes ``out_dir/model.safetensors`` and ``out_dir/config.json`` (last, atomically). Returns the sha256."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = _portable_config(model.config, out_dir)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        metadata = {"format": FORMAT_NAME, "config": config.to_json()}
        if model.text_context is not None and config.text_context is not None:
            if config.text_context.kind == "class_specific":  # which learned row is which label
                metadata[LABEL_NAMES_SHA256] = label_names_digest(list(model.text_context.label_names))
        _save_safetensors(state, tmp, metadata)
        sha = file_sha256(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, out_dir / WEIGHTS_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "label_names": list(model.text_context.label_names) if model.text_context is not None else None,
        "default_labels": list(model.label_names) if model.label_names is not None else None,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha,
    }
    text = json.dumps(meta, indent=2) + "\n"
    _replace_file(out_dir, CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return sha


def _copy_into(source: str, tmp: str) -> None:
    shutil.copyfile(source, tmp)


def _replace_file(out_dir: Path, name: str, write: Callable[[str], Any]) -> None:
    """``out_dir/name`` replaced atomically by what `write` puts in a new file of its own (`tempfile.mkstemp`:
    created, never opened through a link). A fixed temporary name, or writing to ``name`` itself, followed a symlink
    already in the folder: `vitaclip convert` into a folder holding ``config.json.tmp -> elsewhere`` wrote there."""
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, out_dir / name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_vitaclip(path: str | Path, *, label_names: Sequence[str] | None = None) -> VitaClip:
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    meta = read_folder_meta(folder)
    recorded, defaults = recorded_labels(meta, "label_names", folder), recorded_labels(meta, "default_labels", folder)
    weights, sha = verified_weights(folder, meta)
    try:
        config = VitaClipConfig.from_dict(checkpoint_config(meta, folder))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:  # wrong keys or types in a hand-edited config.json
        raise CheckpointError(f"{folder / CONFIG_FILE}: {exc}") from None
    names = recorded or label_names
    try:
        _check_fits(config, names, weights)
        model = VitaClip(config, label_names=names)
    except CheckpointError:
        raise
    except ValueError as exc:  # a tokenizer or label set the config names that cannot be read
        raise CheckpointError(f"{folder / CONFIG_FILE}: {exc}") from None
    if label_names is not None:
        model.label_names = tuple(label_names)
    elif defaults is not None:
        model.label_names = defaults
    state, loaded = read_state_dict_and_sha256(weights)
    if loaded != sha:
        raise CheckpointError(f"{weights}: the file changed while it was loaded (its sha256 is no longer {sha})")
    _load_strict(model, state, f"checkpoint {weights}")
    model.source_sha256 = sha
    model.id_suffix = config_suffix(meta, weights)  # config.json edited since the weights were saved: another model
    return model


def load_checkpoint(
    path: str | Path, *, config: VitaClipConfig | None, label_names: Sequence[str] | None = None
) -> VitaClip:
    """Loads any supported checkpoint; ``config`` is required for the official and OpenAI/open_clip formats. A
    training output folder loads its latest complete checkpoint."""
    path = concrete_checkpoint(path)
    if is_vitaclip_checkpoint(path):
        return load_vitaclip(path, label_names=label_names)
    if Path(path).is_dir():
        config_file = Path(path) / CONFIG_FILE
        if config_file.exists() or config_file.is_symlink():  # a FIFO, a device, a folder or a dangling link
            raise CheckpointError(f"{config_file} is not a regular file: not a vitaclip checkpoint")
        raise CheckpointError(
            f"{path} is a folder without {CONFIG_FILE}: not a vitaclip checkpoint, nor a training output with "
            f"checkpoints ({CHECKPOINTS_DIR}/step-*/)"
        )
    state, sha = read_state_dict_and_sha256(path)
    state_format = detect_format(state, path)
    if config is None:
        raise CheckpointError(f"{path} is a {state_format} checkpoint: name the model it belongs to")
    if state_format == "official":
        return load_official(path, config, label_names=label_names, state=state, sha256=sha)
    if state_format == "openai":
        return load_backbone(path, config, label_names=label_names, state=state, sha256=sha)
    raise CheckpointError(f"{path}: a bare vitaclip state dict needs its config.json beside it")

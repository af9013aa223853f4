"""Our checkpoint folder (``model.safetensors`` + ``config.json``) read without torch: what a job's driver needs.

A run's driver plans with the model's config, id and labels, and checks the checkpoint before any work. For a
vitaclip folder all of that is in ``config.json`` and the safetensors header, so the driver never imports torch or
open_clip (several seconds and a few hundred MB per driver). The strict load (every tensor's name and shape against
the model) is `vitaclip.checkpoints.load_vitaclip`, in the processes that build the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from importlib import resources
from pathlib import Path
from typing import Any

from vitaclip.labels import check_label_names, list_label_sets
from vitaclip.readable import read_small_text

FORMAT_NAME = "vitaclip-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"  # a training output's checkpoints: checkpoints/step-NNNNNNNNN/

# Every dtype of the safetensors format and its size in bits (the sub-byte float types pack several per byte).
_DTYPE_BITS = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 8),
    **dict.fromkeys(("U16", "I16", "F16", "BF16"), 16),
    **dict.fromkeys(("U32", "I32", "F32"), 32),
    **dict.fromkeys(("U64", "I64", "F64", "C64"), 64),
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
# safetensors' own limit is 100 MB: 1.6M entries, 34 s and 3 GB to load. ViT-L/14's whole header is about 80 KB.
MAX_HEADER_BYTES = 16 * 2**20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, of an unknown format, or not matching the model."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_vitaclip_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path.is_dir() and (path / CONFIG_FILE).is_file()) or (
        path.name == WEIGHTS_FILE and (path.parent / CONFIG_FILE).is_file()
    )


_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def concrete_checkpoint(checkpoint: str | Path) -> str | Path:
    """A checkpoint argument as the folder or file to load: a training output folder (no config.json of its own,
    ``checkpoints/step-*`` inside) stands for its latest complete checkpoint; anything else is returned as given."""
    path = Path(checkpoint)
    if "://" in str(checkpoint) or not path.is_dir() or (path / CONFIG_FILE).exists():
        return checkpoint
    found = list_training_checkpoints(path)
    return str(found[-1][1]) if found else checkpoint


def folder_of(path: str | Path) -> Path:
    return Path(path) if Path(path).is_dir() else Path(path).parent


def read_folder_meta(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a vitaclip checkpoint folder, its format and version checked.

    Raises:
        CheckpointError: unreadable, another format, or a format version this vitaclip does not read.
    """
    folder = folder_of(path)
    try:
        meta = json.loads(read_small_text(folder / CONFIG_FILE, "the checkpoint config"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: unreadable checkpoint config: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        format_name = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{folder}: not a vitaclip checkpoint (format={format_name!r})")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # JSON true equals 1 in Python
        raise CheckpointError(
            f"{folder}: checkpoint format version {version!r} is not supported (this vitaclip reads "
            f"version {FORMAT_VERSION})"
        )
    return meta


def folder_model_name(path: str | Path) -> str | None:
    """The model name a vitaclip checkpoint folder's ``config.json`` records (None when it records none)."""
    config = read_folder_meta(path).get("config")
    name = config.get("name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def verified_weights(path: str | Path, meta: dict[str, Any]) -> tuple[Path, str]:
    """The folder's weights file and its sha256, which must be the one ``config.json`` records.

    Raises:
        CheckpointError: the file is missing or its sha256 differs.
    """
    folder = folder_of(path)
    name = meta.get("weights_file", WEIGHTS_FILE)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"{folder / CONFIG_FILE}: weights_file must be a file name in the folder, got {name!r}")
    weights = folder / name
    if not weights.is_file():
        raise CheckpointError(f"{folder}: weights file {weights.name} is missing")
    try:
        inside = weights.resolve(strict=True).parent == folder.resolve(strict=True)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python < 3.13
        inside = False
    if not inside:
        # Its sha256, quoted by the refusal below, would tell anyone who can place a checkpoint what any file the
        # process can read holds (one guess at a time).
        raise CheckpointError(f"{folder}: weights file {weights.name} is a link to a file outside the folder")
    sha = file_sha256(weights)
    if sha != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights}: sha256 {sha} does not match the recorded {meta.get('weights_sha256')}")
    return weights, sha


def check_safetensors_header(path: Path) -> int:
    """Checks that ``path`` is a well-formed safetensors file (header, dtypes, every tensor's bytes inside the file
    and of its shape's size); returns the number of tensors.

    Raises:
        CheckpointError: naming the file and what is wrong.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {length}, file {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
            raise CheckpointError(f"{path}: unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header: not a mapping")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    spans = sorted(_span(path, name, entry) for name, entry in tensors.items())
    # The format's rule: the data is indexed whole, tensor after tensor, without holes or overlaps.
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin} of the data, not at {position}")
        position = end
    if position != size - 8 - length:
        raise CheckpointError(f"{path}: the tensors hold {position} bytes of the {size - 8 - length} in the file")
    return len(tensors)


def _span(path: Path, name: str, entry: Any) -> tuple[int, int, str]:
    """``(begin, end, name)`` of a well-formed header entry whose bytes are those of its dtype and shape."""
    shape = entry.get("shape") if isinstance(entry, dict) else None
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("dtype"), str)
        or entry["dtype"] not in _DTYPE_BITS
        or not isinstance(shape, list)
        or not all(type(d) is int and d >= 0 for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
    ):
        raise CheckpointError(f"{path}: tensor {name!r}: malformed entry {entry!r}"[:500])
    begin, end = offsets
    if not 0 <= begin <= end or (end - begin) * 8 != math.prod(shape) * _DTYPE_BITS[entry["dtype"]]:
        raise CheckpointError(f"{path}: tensor {name!r}: bytes {begin}-{end} do not hold its shape {shape}")
    return begin, end, name


# What a run's rows do not depend on beyond its model id: the name is in the id, the frames, top labels and label set
# are the rows' recorded settings (`index.row_settings`), the seed only draws weights that the file replaces.
_NOT_MODEL_FIELDS = frozenset({"name", "num_frames", "label_set", "seed"})


LABEL_NAMES_SHA256 = "label_names_sha256"
"""The weights header's record of a class-specific context's label names (which learned row is which label)."""


def label_names_digest(names: Any) -> str:
    return hashlib.sha256(json.dumps(names, ensure_ascii=False).encode()).hexdigest()


def recorded_config(weights: Path) -> dict[str, Any] | None:
    """The model config ``model.safetensors`` was saved with (its header's ``__metadata__``), or None where it
    records none (a file made elsewhere) or one this vitaclip cannot read. Reads the header only."""
    metadata = recorded_metadata(weights)
    try:
        config = json.loads(metadata["config"]) if isinstance(metadata.get("config"), str) else None
    except (ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def recorded_metadata(weights: Path) -> dict[str, Any]:
    """The ``__metadata__`` of the weights file's safetensors header (empty where it has none or cannot be read)."""
    try:
        if weights.resolve(strict=True).parent != weights.parent.resolve(strict=True):
            return {}  # a link out of the folder: never read (the load refuses it)
        # Never blocks: a FIFO or device named as the weights is no file to read (the load refuses it).
        fd = os.open(weights, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return {}
        with os.fdopen(fd, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 2 <= length <= MAX_HEADER_BYTES:
                return {}
            metadata = json.loads(f.read(length)).get("__metadata__") or {}
    except (OSError, ValueError, RecursionError, AttributeError, TypeError, RuntimeError):
        return {}  # TypeError: a read that would block gives None; RuntimeError: a symlink loop (Python < 3.13)
    return metadata if isinstance(metadata, dict) else {}


def model_fields(config: dict[str, Any]) -> str | None:
    """The fields of a model config that change what the weights compute (architecture options, normalisation,
    text context, tokenizer), as canonical JSON; None for a config that does not parse."""
    from vitaclip.config import VitaClipConfig

    try:
        full = VitaClipConfig.from_dict(config).to_dict()
        if isinstance(full.get("text_context"), dict):  # its init words only initialise what the weights replace
            full["text_context"] = {k: v for k, v in full["text_context"].items() if k != "init_words"}
        fields = {k: v for k, v in full.items() if k not in _NOT_MODEL_FIELDS}
        return json.dumps(_numbers_alike(fields), sort_keys=True, default=str)
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError, OverflowError):
        return None


def _numbers_alike(value: Any) -> Any:
    """`value` with every number as a float (``4`` and ``4.0`` are one setting) and tuples as lists."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _numbers_alike(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_numbers_alike(v) for v in value]
    return value


def config_suffix(meta: dict[str, Any], weights: Path) -> str:
    """What a folder's model id adds to ``NAME@sha256:WEIGHTS`` when ``config.json`` describes another model than the
    one the weights file was saved with: ``+config:<12 hex digits>`` of the fields that differ in effect (see
    `model_fields`), else nothing.

    The id names the weights file, whose header records the config it was saved with; a config.json edited since
    (another mean and std, tokenizer or tower option) makes other embeddings from the same weights, so it is another
    model, with rows and an index of its own, never mixed with the first one's under one id."""
    recorded = recorded_metadata(weights)
    saved = recorded_config(weights)
    current = meta.get("config")
    if saved is None or not isinstance(current, dict):
        return ""
    now, then = model_fields(current), model_fields(saved)
    if now is None or then is None:  # one that does not parse: refused at load, or not a record
        return ""
    # A class-specific context's label names say which learned row is which label: reordered or renamed in
    # config.json, the same weights score other labels (recorded at save time; older files record nothing).
    labels_then = recorded.get(LABEL_NAMES_SHA256)
    labels_now = label_names_digest(meta.get("label_names")) if isinstance(labels_then, str) else None
    if now == then and labels_now == labels_then:
        return ""
    key = now if labels_now == labels_then else f"{now}\0label_names:{labels_now}"
    return "+config:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def check_folder(path: str | Path) -> dict[str, Any]:
    """What a driver checks of a vitaclip checkpoint folder before any work, without torch: ``config.json`` (format,
    version), the weights' sha256 against the recorded one, and the safetensors header. Returns ``config.json``.

    Raises:
        CheckpointError: the first thing that is wrong, naming the file.
    """
    meta = read_folder_meta(path)
    weights, _ = verified_weights(path, meta)
    if check_safetensors_header(weights) == 0:
        raise CheckpointError(f"{weights}: holds no tensors")
    return meta


def is_plain_file_name(name: object) -> bool:
    """A name that stays in the folder it is joined to: no separators, not ``.``/``..``/hidden, no NUL."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not name.startswith(".")
        and not any(c in name for c in "/\\\0")
    )


def is_packaged_data_file(name: object) -> bool:
    """``name`` is a file shipped in ``vitaclip/data`` (tokenizers, label lists)."""
    return is_plain_file_name(name) and resources.files("vitaclip").joinpath("data").joinpath(str(name)).is_file()


def checkpoint_config(meta: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``config.json``'s model config with the files it names checked: ``label_set`` and ``tokenizer`` may name only
    a packaged label set or data file, or a file inside the checkpoint folder (returned as its path).

    A checkpoint is data: its config must not make the loader read other files of the machine (their lines would
    become labels written to the outputs and returned by the service).

    Raises:
        CheckpointError: a field naming anything else, with what is allowed.
    """
    folder = folder_of(path)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / CONFIG_FILE}: no model config in it (a 'config' mapping is expected)")
    config = dict(config)
    for key, packaged in (("label_set", list_label_sets()), ("tokenizer", None)):
        value = config.get(key)
        if value is None or (value in packaged if packaged is not None else is_packaged_data_file(value)):
            continue
        config[key] = str(_file_in_folder(folder, key, value, packaged))
    return config


def _file_in_folder(folder: Path, key: str, value: object, packaged: list[str] | None) -> Path:
    allowed = f"a packaged label set {packaged}" if packaged is not None else "a tokenizer packaged in vitaclip/data"
    where = f"{folder / CONFIG_FILE}: config.{key}"
    if not is_plain_file_name(value):
        raise CheckpointError(
            f"{where} must be {allowed} or the name of a file in the checkpoint folder, got {value!r}"
        )
    file = folder / str(value)
    try:
        resolved = file.resolve(strict=True)
        inside = resolved.parent == folder.resolve(strict=True) and resolved.is_file()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python < 3.13
        inside = False
    if not inside:
        raise CheckpointError(
            f"{where} names {value!r}, which is neither {allowed} nor a file in the checkpoint folder"
        )
    return resolved


def recorded_labels(meta: dict[str, Any], key: str, folder: Path) -> tuple[str, ...] | None:
    """``config.json``'s ``label_names`` or ``default_labels``: None or a list of names (a string is no list)."""
    names = meta.get(key)
    if names is None:
        return None
    odd = [type(n).__name__ for n in names if not isinstance(n, str)] if isinstance(names, list) else []
    if not isinstance(names, list) or odd:
        kind = f"a list holding a {odd[0]}" if odd else type(names).__name__
        raise CheckpointError(f"{folder / CONFIG_FILE}: '{key}' must be a list of label names (strings), got {kind}")
    try:  # default labels too: each is encoded with every template when the model loads
        check_label_names(names, f"{folder / CONFIG_FILE} '{key}'")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return tuple(names)

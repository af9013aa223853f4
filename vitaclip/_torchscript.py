"""Reads the weights of a TorchScript archive (OpenAI's CLIP ``.pt`` files) without running any of its code.

``torch.jit.load`` rebuilds an archive's modules with code stored in the archive (a scripted module's
``__setstate__`` runs while it loads), so an untrusted ``.pt`` file could do anything the process may do. Here the
archive is only data:

- ``data.pkl`` is unpickled with a strict allow-list: tensor rebuilding, the storage types, TorchScript's list and
  type-tag helpers and ``torch.device`` map to small functions of ours; every ``__torch__.*`` class maps to an inert
  `ScriptObject` that records its pickled state and nothing else; any other global is refused by name.
- Storages are copied out of the zip's ``data/<key>`` entries as the dtype the pickle names, honouring ``byteorder``.
- Which attributes are parameters or buffers is read, as text, from the ``__parameters__``/``__buffers__`` lines of
  the class declarations under ``code/``; that code is never compiled or run.

The state dict equals ``torch.jit.load(path).state_dict()`` for an archive whose modules pickle their attributes (all
``torch.jit.trace``/``torch.jit.script`` output without a custom ``__getstate__``). A module that pickles another
state for its own ``__setstate__`` to restore is refused: only its code could say what the state means.

Archive layout (``torch.jit.save``), every entry under one folder ``<name>/``: ``data.pkl`` (the module tree),
``data/<key>`` (raw storage bytes, stored uncompressed), ``byteorder`` (absent in old archives: little),
``code/__torch__/...py`` (TorchScript source), ``constants.pkl`` and ``constants/<key>`` (tensors the code uses as
constants; not weights, not read), ``version``, ``.data/...``. Hostile input is bounded: storages must fit their
entries and all of them together the file, memo indices must come in sequence, module trees have depth and size
limits.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

MAX_PICKLE_BYTES = 16 << 20
MAX_CODE_BYTES = 64 << 20  # all code files read, together
MAX_MODULE_DEPTH = 200
MAX_MODULE_VISITS = 200_000
MAX_TENSOR_DIMS = 64
_READ_CHUNK_BYTES = 16 << 20

# The entries torch.save writes; torch.load hands any zip with ``constants.pkl`` to torch.jit.load, and one with
# other entries is no plain torch.save archive either.
_TORCH_SAVE_ENTRY = re.compile(
    r"data\.pkl|data/\d+|byteorder|version|\.format_version|\.storage_alignment|\.data/version|\.data/serialization_id"
)
_SCRIPT_MODULE = re.compile(r"__torch__(\.[A-Za-z_]\w*)*")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_STORAGE_KEY = re.compile(r"\d{1,20}")
_CLASS_LINE = re.compile(r"^class ([A-Za-z_]\w*)(\(Module\))?:", re.MULTILINE)
_NAMES_LINE = re.compile(r'^  __(parameters|buffers)__ = \[((?:"[^"\n]*", )*)\]$', re.MULTILINE)
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
# Opcodes that reach globals or objects around find_class (extension registry) or that TorchScript never writes.
_REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4", "INST", "OBJ", "PERSID"}
_MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


class ArchiveError(ValueError):
    """A zip archive that is malformed, larger than its file allows, or that needs its own code to be loaded."""


class ScriptObject:
    """An inert stand-in for an instance of a TorchScript class (``__torch__.*``).

    It records the state the pickle hands it and has no other behaviour. Defining ``__setstate__`` keeps BUILD from
    writing pickle-chosen names into the instance (the default BUILD sets attributes, ``__class__`` included).
    """

    qualified_name: ClassVar[str] = "__torch__"
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    key: str
    data: torch.Tensor  # [numel], owned by us, in the stored dtype


@dataclass(frozen=True)
class _ClassDecl:
    is_module: bool
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]


def archive_prefix(zf: zipfile.ZipFile) -> str:
    """The one top-level folder (with its slash) that holds every entry, as torch writes archives."""
    names = zf.namelist()
    if not names:
        raise ArchiveError("the zip archive is empty")
    if len(set(names)) != len(names):
        raise ArchiveError("the zip archive lists an entry twice")
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) != 1 or any("/" not in name for name in names):
        raise ArchiveError("the zip entries are not all in one top-level folder, as torch writes them")
    return tops.pop() + "/"


def is_torch_save_layout(zf: zipfile.ZipFile) -> bool:
    """Whether the archive holds only what ``torch.save`` writes (no code, no constants, nothing else)."""
    prefix = archive_prefix(zf)
    return all(_TORCH_SAVE_ENTRY.fullmatch(name[len(prefix) :]) for name in zf.namelist())


def read_state_dict(zf: zipfile.ZipFile, *, archive_bytes: int) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, as ``{dotted.name: tensor}``, running none of its code.

    Args:
        zf: the open archive; nothing returned refers to it.
        archive_bytes: the archive's size on disk, the bound on all storages together.
    """
    prefix = archive_prefix(zf)
    data = _read_entry(zf, prefix + "data.pkl", MAX_PICKLE_BYTES)
    _check_opcodes(data)
    unpickler = _Unpickler(data, _StorageReader(zf, prefix, archive_bytes=archive_bytes))
    try:
        root = unpickler.load()
    except ArchiveError:
        raise
    except Exception as exc:  # hostile bytes make the unpickler fail in arbitrary ways
        raise ArchiveError(f"data.pkl cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(root, ScriptObject):
        raise ArchiveError(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
    decls = _Declarations(zf, prefix)
    if not decls.get(root.qualified_name).is_module:
        raise ArchiveError(f"data.pkl holds an instance of {root.qualified_name}, which is not a module")
    state: dict[str, torch.Tensor] = {}
    _collect(root, "", decls, state, ancestors=set(), visits=[0])
    return state


# ---------------------------------------------------------------------------------------------- unpickling


def _check_opcodes(data: bytes) -> None:
    """Refuses opcodes that bypass find_class, and memo indices out of sequence (the unpickler sizes its memo by them).

    Picklers number memo entries 0, 1, 2, ...; a pickle that puts or gets a larger index is refused before unpickling.
    """
    puts = 0
    try:
        for opcode, arg, pos in pickletools.genops(data):
            if opcode.name in _REFUSED_OPCODES:
                raise ArchiveError(f"data.pkl uses the {opcode.name} opcode (byte {pos}); TorchScript never writes it")
            if opcode.name in _MEMO_OPCODES:
                limit = puts if "PUT" in opcode.name else puts - 1
                if not isinstance(arg, int) or not 0 <= arg <= limit:
                    raise ArchiveError(f"data.pkl uses memo index {arg!r} (byte {pos}) out of sequence")
            puts += opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")
    except ArchiveError:
        raise
    except Exception as exc:  # pickletools raises ValueError and friends on malformed input
        raise ArchiveError(f"data.pkl is not a valid pickle: {exc}") from exc


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storages: _StorageReader) -> None:
        super().__init__(io.BytesIO(data))
        self._storages = storages
        self._classes: dict[str, type[ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if _SCRIPT_MODULE.fullmatch(module) and _IDENTIFIER.fullmatch(name):
            if qualified not in self._classes:
                self._classes[qualified] = type(name, (ScriptObject,), {"qualified_name": qualified})
            return self._classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if qualified in _ALLOWED_FUNCTIONS:
            return _ALLOWED_FUNCTIONS[qualified]
        raise ArchiveError(
            f"data.pkl names the global {qualified}, which a TorchScript archive of weights does not need (allowed: "
            "__torch__ classes, tensors, storages and TorchScript's list helpers); refusing it"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ArchiveError(f"data.pkl refers to {str(pid)[:80]!r}, not to a storage")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(location, str):
            raise ArchiveError(f"data.pkl refers to storage {str(key)[:40]!r} with a malformed type or location")
        return self._storages.get(key, storage_type, numel)


class _StorageReader:
    """Copies ``<prefix>data/<key>`` entries into tensors of ours, each read once."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, *, archive_bytes: int) -> None:
        self._zf = zf
        self._prefix = prefix
        self._archive_bytes = archive_bytes
        self._unread_bytes = archive_bytes  # all storages together cannot hold more bytes than the file
        self._byteorder = _read_byteorder(zf, prefix)
        self._read: dict[str, _Storage] = {}

    def get(self, key: Any, storage_type: _StorageType, numel: Any) -> _Storage:
        if not isinstance(key, str) or not _STORAGE_KEY.fullmatch(key):
            raise ArchiveError(f"data.pkl names storage {str(key)[:40]!r}; storage keys are numbers")
        if not _is_int(numel) or numel < 0:
            raise ArchiveError(f"storage {key} declares {str(numel)[:40]} elements")
        dtype = storage_type.dtype
        if key in self._read:
            seen = self._read[key]
            if seen.data.dtype != dtype or seen.data.numel() != numel:
                raise ArchiveError(f"storage {key} is declared twice, with different types or sizes")
            return seen
        name = f"{self._prefix}data/{key}"
        try:
            info = self._zf.getinfo(name)
        except KeyError:
            raise ArchiveError(f"storage entry {name} is missing") from None
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes:
            raise ArchiveError(
                f"storage entry {name} holds {info.file_size} bytes, but data.pkl declares {numel} x "
                f"{storage_type.name} ({nbytes} bytes)"
            )
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != nbytes:
            raise ArchiveError(f"storage entry {name} is compressed; torch stores storages uncompressed")
        self._unread_bytes -= nbytes
        if self._unread_bytes < 0 or info.header_offset + nbytes > self._archive_bytes:
            raise ArchiveError(f"storage entry {name} does not fit in the archive's file")
        raw = torch.empty(nbytes, dtype=torch.uint8)
        _read_into(self._zf, info, raw.numpy().data)
        if self._byteorder != sys.byteorder and dtype.itemsize > 1:
            word = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize
            raw.copy_(raw.view(-1, word).flip(1).reshape(-1))
        data = raw.ne(0) if dtype == torch.bool else raw.view(dtype)  # any nonzero byte is True, as a bool must be 0/1
        storage = _Storage(key, data)
        self._read[key] = storage
        return storage


def _read_into(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: memoryview) -> None:
    position = 0
    with zf.open(info) as src:  # checks the entry's CRC when it reaches the end
        while position < len(out):
            chunk = src.read(min(_READ_CHUNK_BYTES, len(out) - position))
            if not chunk:
                raise ArchiveError(f"storage entry {info.filename} ends after {position} of {len(out)} bytes")
            out[position : position + len(chunk)] = chunk
            position += len(chunk)
        if src.read(1):
            raise ArchiveError(f"storage entry {info.filename} is longer than its header says")


def _read_entry(zf: zipfile.ZipFile, name: str, max_bytes: int) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise ArchiveError(f"the archive has no {name}") from None
    if info.file_size > max_bytes:
        raise ArchiveError(f"{name} is {info.file_size} bytes, more than the {max_bytes} this reader accepts")
    data = zf.read(info)  # zipfile stops at file_size and checks the CRC
    if len(data) != info.file_size:
        raise ArchiveError(f"{name} holds {len(data)} bytes, its header says {info.file_size}")
    return data


def _read_byteorder(zf: zipfile.ZipFile, prefix: str) -> str:
    if prefix + "byteorder" not in zf.namelist():
        return "little"  # archives written before torch recorded it
    text = _read_entry(zf, prefix + "byteorder", 16).decode("ascii", errors="replace").strip()
    if text not in ("little", "big"):
        raise ArchiveError(f"byteorder is {text!r}, not 'little' or 'big'")
    return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` for a CPU tensor of ours: a checked strided view of a storage."""
    if not isinstance(storage, _Storage):
        raise ArchiveError("a tensor in data.pkl is built on something other than a storage")
    ok = (
        _is_int(storage_offset)
        and storage_offset >= 0
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride) <= MAX_TENSOR_DIMS
        and all(_is_int(n) and n >= 0 for n in size + stride)
        and isinstance(requires_grad, bool)
        and isinstance(backward_hooks, dict)
        and not backward_hooks
        and (metadata is None or (isinstance(metadata, dict) and not metadata))
    )
    if not ok:
        raise ArchiveError(f"a tensor on storage {storage.key} has a malformed size, stride, offset or hooks")
    available = storage.data.numel()
    end = storage_offset  # one past the last element, which must lie inside the storage
    if all(size):
        end += 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if end > available:
        raise ArchiveError(
            f"a tensor of size {list(size)} and stride {list(stride)} at offset {storage_offset} does not fit in "
            f"storage {storage.key} of {available} elements"
        )
    return storage.data.as_strided(size, stride, storage_offset)


def _as_list(data: Any) -> list[Any]:
    """``torch.jit._pickle.build_*list``: TorchScript's typed lists are plain lists here."""
    if not isinstance(data, list):
        raise ArchiveError(f"a TorchScript list in data.pkl is a {type(data).__name__}")
    return data


def _restore_type_tag(value: Any, type_str: Any) -> Any:
    """``torch.jit._pickle.restore_type_tag``: the TorchScript type of a dict or list is not needed here."""
    return value


def _device(kind: Any, index: Any = None) -> str:
    """``torch.device`` as the plain string it was built from; a device attribute is never a weight."""
    return f"{kind}:{index}" if index is not None else str(kind)


_ALLOWED_FUNCTIONS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "collections.OrderedDict": OrderedDict,  # the empty backward-hooks dict of every tensor
    "torch.jit._pickle.build_intlist": _as_list,
    "torch.jit._pickle.build_doublelist": _as_list,
    "torch.jit._pickle.build_boollist": _as_list,
    "torch.jit._pickle.build_tensorlist": _as_list,
    "torch.jit._pickle.restore_type_tag": _restore_type_tag,
    "torch.device": _device,
}


# ---------------------------------------------------------------------------------------------- module tree


class _Declarations:
    """The ``class`` declarations of ``code/``, read as text on demand, one file at a time."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str) -> None:
        self._zf = zf
        self._prefix = prefix
        self._names = set(zf.namelist())
        self._files: dict[str, dict[str, _ClassDecl]] = {}
        self._unread_bytes = MAX_CODE_BYTES

    def get(self, qualified_name: str) -> _ClassDecl:
        module, _, name = qualified_name.rpartition(".")
        path = f"{self._prefix}code/{module.replace('.', '/')}.py"
        if path not in self._files:
            if path not in self._names:
                raise ArchiveError(f"class {qualified_name} has no code file {path} in the archive")
            raw = _read_entry(self._zf, path, self._unread_bytes)
            self._unread_bytes -= len(raw)
            self._files[path] = _parse_classes(raw.decode("utf-8", errors="replace"))
        if name not in self._files[path]:
            raise ArchiveError(f"class {qualified_name} is not declared in {path}")
        return self._files[path][name]


def _parse_classes(text: str) -> dict[str, _ClassDecl]:
    headers = list(_CLASS_LINE.finditer(text))
    classes: dict[str, _ClassDecl] = {}
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        body = text[header.end() : following.start() if following else len(text)]
        names: dict[str, tuple[str, ...]] = {"parameters": (), "buffers": ()}
        for line in _NAMES_LINE.finditer(body):
            names[line.group(1)] = tuple(re.findall(r'"([^"\n]*)"', line.group(2)))
        classes[header.group(1)] = _ClassDecl(header.group(2) is not None, names["parameters"], names["buffers"])
    return classes


def _collect(
    obj: ScriptObject,
    prefix: str,
    decls: _Declarations,
    out: dict[str, torch.Tensor],
    *,
    ancestors: set[int],
    visits: list[int],
) -> None:
    """Adds a module's parameters, buffers and submodules' entries to ``out`` in ``nn.Module.state_dict`` order."""
    visits[0] += 1
    if len(ancestors) >= MAX_MODULE_DEPTH or visits[0] > MAX_MODULE_VISITS:
        raise ArchiveError(f"the module tree is deeper than {MAX_MODULE_DEPTH} or larger than {MAX_MODULE_VISITS}")
    if id(obj) in ancestors:
        raise ArchiveError(f"module {prefix.rstrip('.')} contains itself")
    attributes = obj.state
    if not isinstance(attributes, dict):
        raise ArchiveError(
            f"module {obj.qualified_name} pickles a {type(attributes).__name__} for its own __setstate__ code to "
            "restore; vitaclip never runs code from a checkpoint"
        )
    decl = decls.get(obj.qualified_name)
    for name in decl.parameters + decl.buffers:
        if name not in attributes:
            raise ArchiveError(f"module {obj.qualified_name} declares {name} but data.pkl holds no value for it")
        value = attributes[name]
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif value is not None:  # a None parameter (Linear without bias) is not in a state dict
            raise ArchiveError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
    ancestors.add(id(obj))
    for name, value in attributes.items():
        if isinstance(value, ScriptObject) and isinstance(name, str) and decls.get(value.qualified_name).is_module:
            _collect(value, f"{prefix}{name}.", decls, out, ancestors=ancestors, visits=visits)
    ancestors.discard(id(obj))

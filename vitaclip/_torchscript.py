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
entries and all of them together the file, memo indices must come in sequence, no object of the pickle may nest
too deep or hold far more elements than the pickle has bytes (`check_pickle`, which `vitaclip.checkpoints` runs on
``torch.save`` files too), module trees have depth and size limits.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar

import torch

MAX_PICKLE_BYTES = 16 << 20
MAX_PICKLE_DEPTH = 1000  # containers in containers; a state dict nests 5 deep, a TorchScript module 2 per submodule
# Tree size of any one object a pickle builds (see `check_pickle`): torch.save's state dicts and optimizer states
# measure 0.16-0.3 elements per pickle byte (ViT-L/14's state dict: 15k in 90 kB), TorchScript archives 0.2-0.3; a
# "billion laughs" makes 2**40 in 300 bytes.
MAX_TREE_NODES_BASE = 1 << 20
MAX_TREE_NODES_PER_BYTE = 2
MAX_CODE_BYTES = 64 << 20  # all code files read, together
MAX_MODULE_DEPTH = 200
MAX_MODULE_VISITS = 200_000
MAX_STATE_TENSORS = 100_000  # a state dict's entries (ViT-L/14: 742)
MAX_KEY_CHARS = 2000  # a state dict key ("transformer.resblocks.11.attn.in_proj_weight": 45)
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


class UnsafePickleError(ArchiveError):
    """A well-formed pickle whose objects nest too deep or, sharing memoized parts, are too large to walk."""


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
    check_pickle(io.BytesIO(data), "data.pkl", refused_opcodes=_REFUSED_OPCODES)
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


def check_pickle(
    stream: BinaryIO,
    name: str,
    *,
    refused_opcodes: Collection[str] = (),
    calls: Collection[str] | None = None,
    names: Callable[[str], bool] | None = None,
) -> None:
    """Reads one pickle from ``stream`` as opcodes, without unpickling it, and refuses what the unpickler or the code
    after it could not survive: ``refused_opcodes``; memo indices out of sequence (the C unpickler sizes its memo by
    them); objects nested deeper than `MAX_PICKLE_DEPTH`; and objects that are far larger as trees than the pickle.
    With `calls`, every object the pickle calls (REDUCE, NEWOBJ, OBJ, INST) must be a global named in it; with
    `names`, every global it names must pass it (globals it names but never calls: type tags such as a storage
    type). An unpickler that allows calling ``torch.Tensor`` or a storage type builds a tensor of any size from two
    numbers, and ``bytearray(3_000_000_000)`` is 3 GB from a few bytes.

    The last is the "billion laughs": a pickle may reuse a memoized object (GET) anywhere, so ``L1 = [L0, L0]``,
    ``L2 = [L1, L1]``, ... make 2**40 elements out of a few hundred bytes, and hashing such a dict key, comparing it
    or formatting it into a message walks every one of them. Each object's size as a tree (every use of a shared
    object counted again) must stay within `MAX_TREE_NODES_BASE` + `MAX_TREE_NODES_PER_BYTE` per pickle byte; real
    checkpoints reuse little (a memoized class, string or tensor per tensor) and stay far below it.

    Raises:
        ArchiveError: naming ``name`` and what was refused.
    """
    start = stream.tell()
    shape = _PickleShape(name, calls=calls, names=names)
    puts = 0
    try:
        for opcode, arg, pos in pickletools.genops(stream):
            if opcode.name in refused_opcodes:
                raise ArchiveError(f"{name} uses the {opcode.name} opcode (byte {pos}); TorchScript never writes it")
            if opcode.name in _MEMO_OPCODES:
                limit = puts if "PUT" in opcode.name else puts - 1
                if not isinstance(arg, int) or not 0 <= arg <= limit:
                    raise ArchiveError(f"{name} uses memo index {arg!r} (byte {pos}) out of sequence")
            puts += opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")
            shape.step(opcode, arg)
    except ArchiveError:
        raise
    except Exception as exc:  # pickletools raises ValueError and friends on malformed input
        raise ArchiveError(f"{name} is not a valid pickle: {exc}") from exc
    shape.check(MAX_TREE_NODES_BASE + MAX_TREE_NODES_PER_BYTE * (stream.tell() - start))


_MARK: Any = object()  # a stack entry: the MARK opcode's
_CALLING = {"REDUCE": 0, "NEWOBJ": 0, "NEWOBJ_EX": 0, "OBJ": 0}  # opcodes that call an object: its place in the items
_TEXT_OPCODES = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}


@dataclass(frozen=True)
class _Global:
    """A stack entry: a global the pickle named (``module.name``)."""

    name: str


@dataclass(frozen=True)
class _Text:
    """A stack entry: a string (the module and name of STACK_GLOBAL come from two of them)."""

    value: str


_LEAF = -1  # a stack entry: an object that holds no others (numbers, strings, globals, the empty tuple)
_NEW_CONTAINERS = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"}  # empty, and filled by the opcodes below
_FILL_FROM_STACK = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}  # items popped into the object under them
_FILL_TO_MARK = {"APPENDS", "SETITEMS", "ADDITEMS"}  # items down to the mark, popped into the object under it


class _PickleShape:
    """The objects a pickle builds, as a graph: each container or built object is a node that records its leaves
    and the nodes it holds (once per use), followed through the stack and the memo as the unpickler would."""

    def __init__(
        self, name: str, *, calls: Collection[str] | None = None, names: Callable[[str], bool] | None = None
    ) -> None:
        self._name = name
        self._calls = None if calls is None else frozenset(calls)
        self._names = names
        self._stack: list[Any] = []
        self._memo: dict[int, int] = {}
        self._leaves: list[int] = []  # per node: 1 (itself) + the leaves it holds
        self._held: dict[int, list[int]] = {}  # per node: the nodes it holds, one entry per use

    def step(self, opcode: pickletools.OpcodeInfo, arg: Any) -> None:
        name = opcode.name
        if name == "MARK":
            self._stack.append(_MARK)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            self._memo[len(self._memo) if name == "MEMOIZE" else arg] = self._top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in self._memo:
                raise ArchiveError(f"{self._name} reads memo index {arg} before it is set")
            self._stack.append(self._memo[arg])
        elif name == "DUP":
            self._stack.append(self._top())
        elif name in ("POP", "POP_MARK"):  # POP on an empty stack (above the last mark) pops the mark
            self._pop(1) if name == "POP" and self._stack and self._stack[-1] is not _MARK else self._pop_mark()
        elif name in _FILL_FROM_STACK or name in _FILL_TO_MARK:
            items = self._pop(_FILL_FROM_STACK[name]) if name in _FILL_FROM_STACK else self._pop_mark()
            self._add(self._top(), items)
        elif name in _TEXT_OPCODES:
            self._stack.append(_Text(str(arg)))
        elif name in ("GLOBAL", "STACK_GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ") if name != "STACK_GLOBAL" else self._stack_global()
            found = self._named(f"{module}.{attr}")
            if name == "INST":
                self._called(found)
                self._stack.append(self._new(self._pop_mark()))
            else:
                self._stack.append(found)
        elif name not in ("PROTO", "FRAME", "STOP"):
            marked = pickletools.markobject in opcode.stack_before
            items = self._pop_mark() if marked else self._pop(len(opcode.stack_before))
            if name in _CALLING:
                self._called(items[_CALLING[name]] if items else None)
            if opcode.stack_after:
                self._stack.append(self._new(items) if items or name in _NEW_CONTAINERS else _LEAF)

    def _stack_global(self) -> tuple[str, str, str]:
        module, attr = self._pop(2)
        if not (isinstance(module, _Text) and isinstance(attr, _Text)):
            raise ArchiveError(f"{self._name} names a global by objects that are not strings")
        return module.value, ".", attr.value

    def _named(self, full: str) -> _Global:
        if self._names is not None and not self._names(full):
            raise UnsafePickleError(f"{self._name} names the global {full[:200]}, which a tensor checkpoint never does")
        return _Global(full)

    def _called(self, target: Any) -> None:
        if self._calls is None:
            return
        if not isinstance(target, _Global) or target.name not in self._calls:
            what = target.name[:200] if isinstance(target, _Global) else "an object it built"
            raise UnsafePickleError(f"{self._name} calls {what}, which a tensor checkpoint never does")

    def _top(self) -> Any:
        if not self._stack or self._stack[-1] is _MARK:
            raise ArchiveError(f"{self._name} uses an object its stack does not hold")
        return self._stack[-1]

    def _pop(self, count: int) -> list[Any]:
        items = self._stack[len(self._stack) - count :]
        if len(items) != count or any(item is _MARK for item in items):
            raise ArchiveError(f"{self._name} uses an object its stack does not hold")
        del self._stack[len(self._stack) - count :]
        return items

    def _pop_mark(self) -> list[Any]:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i] is _MARK:
                items = self._stack[i + 1 :]
                del self._stack[i:]
                return items
        raise ArchiveError(f"{self._name} pops to a mark it never set")

    def _new(self, items: list[Any]) -> int:
        node = len(self._leaves)
        self._leaves.append(1)
        self._add(node, items)
        return node

    def _add(self, node: Any, items: list[Any]) -> None:
        if not isinstance(node, int) or node == _LEAF:
            return  # state set on a global or a number: walking containers never reaches it
        held = [item for item in items if isinstance(item, int) and item != _LEAF]
        self._leaves[node] += len(items) - len(held)
        if held:
            self._held.setdefault(node, []).extend(held)

    def check(self, max_nodes: int) -> None:
        """Refuses a node nested deeper than `MAX_PICKLE_DEPTH` or larger than ``max_nodes`` as a tree. A node that
        holds one of its own ancestors (a module that refers to itself) counts it once, not without end."""
        sizes = [0] * len(self._leaves)
        depths = [0] * len(self._leaves)
        state = bytearray(len(self._leaves))  # 0: not seen, 1: on the walk, 2: done
        for root in range(len(self._leaves)):
            if state[root]:
                continue
            state[root] = 1
            walk = [(root, iter(self._held.get(root, ())))]
            while walk:
                node, held = walk[-1]
                child = next((c for c in held if not state[c]), None)
                if child is not None:
                    state[child] = 1
                    walk.append((child, iter(self._held.get(child, ()))))
                    continue
                walk.pop()
                state[node] = 2
                done = [c for c in self._held.get(node, ()) if state[c] == 2]  # the others are its ancestors
                size = self._leaves[node] + len(self._held.get(node, ())) - len(done) + sum(sizes[c] for c in done)
                sizes[node] = min(size, max_nodes + 1)
                depths[node] = 1 + max((depths[c] for c in done), default=0)
                if depths[node] > MAX_PICKLE_DEPTH:
                    raise UnsafePickleError(f"{self._name} nests objects deeper than {MAX_PICKLE_DEPTH} levels")
                if sizes[node] > max_nodes:
                    raise UnsafePickleError(
                        f"{self._name} reuses memoized objects until one holds more than {max_nodes} elements"
                    )


class _Call:
    """An allowed function as a pickle sees it: a fresh object per global that calls it, whose state a pickle cannot
    set. BUILD on the function itself would set its attributes (its ``__defaults__``, say) for every later load of
    the process."""

    __slots__ = ("_function", "_name")
    _function: Callable[..., Any]
    _name: str

    def __init__(self, function: Callable[..., Any], name: str) -> None:
        object.__setattr__(self, "_function", function)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any) -> Any:
        return self._function(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise ArchiveError(f"data.pkl sets the state of {self._name}, a function; refusing it")

    def __setstate__(self, state: Any) -> None:
        raise ArchiveError(f"data.pkl sets the state of {self._name}, a function; refusing it")


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
            allowed = _ALLOWED_FUNCTIONS[qualified]
            return allowed if isinstance(allowed, type) else _Call(allowed, qualified)
        raise ArchiveError(
            f"data.pkl names the global {qualified}, which a TorchScript archive of weights does not need (allowed: "
            "__torch__ classes, tensors, storages and TorchScript's list helpers); refusing it"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ArchiveError(f"data.pkl refers to {_short(pid)}, not to a storage")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(location, str):
            raise ArchiveError(f"data.pkl refers to storage {_short(key)} with a malformed type or location")
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
            raise ArchiveError(f"data.pkl names storage {_short(key)}; storage keys are numbers")
        if not _is_int(numel) or numel < 0:
            raise ArchiveError(f"storage {key} declares {_short(numel)} elements")
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


def _short(value: Any) -> str:
    """A value from data.pkl for a message, cut before it is formatted: a container is named by its type only, as
    formatting one that shares its parts through the memo could take without end."""
    if isinstance(value, str):
        return repr(value[:40])
    if _is_int(value) and value.bit_length() <= 64:
        return str(value)
    return f"a {type(value).__name__}"


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
    if not isinstance(kind, str) or not (index is None or (_is_int(index) and index.bit_length() <= 64)):
        raise ArchiveError(f"data.pkl builds a torch.device of {_short(kind)}, not of a device name and index")
    return f"{kind[:40]}:{index}" if index is not None else kind[:40]


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
    if len(prefix) > MAX_KEY_CHARS or len(out) > MAX_STATE_TENSORS:
        # A name the memo shares across nested modules, or one dict of attributes shared by many modules, would make
        # keys or entries without end from a small pickle.
        raise ArchiveError(
            f"the module tree names more than {MAX_STATE_TENSORS} tensors or a path longer than "
            f"{MAX_KEY_CHARS} characters"
        )
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
            if len(prefix) + len(name) > MAX_KEY_CHARS:
                raise ArchiveError(f"a tensor of module {prefix[:80]}... has a name longer than {MAX_KEY_CHARS}")
            if value.requires_grad or getattr(value, "_backward_hooks", None):  # set by BUILD after it was rebuilt
                raise ArchiveError(f"{prefix}{name} is a tensor whose state data.pkl set after building it")
            out[prefix + name] = value
        elif value is not None:  # a None parameter (Linear without bias) is not in a state dict
            raise ArchiveError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
    ancestors.add(id(obj))
    for name, value in attributes.items():
        if isinstance(value, ScriptObject) and isinstance(name, str) and decls.get(value.qualified_name).is_module:
            _collect(value, f"{prefix}{name}.", decls, out, ancestors=ancestors, visits=visits)
    ancestors.discard(id(obj))

"""An index on disk: immutable FAISS segments plus deletions, described by ``index_info.json``.

A full build writes one base segment (flat, IVF, IVF-PQ or HNSW, chosen and tuned by `index.build`). Later runs
never rewrite it: each update adds a small exact segment holding the rows committed since, and records the ids
whose rows were removed or replaced in a deletions file (``row_id``, generation). A vector of a segment of
generation ``g`` is dead when its id was deleted at a generation after ``g``; searches skip dead vectors with a
FAISS ID selector and merge the segments' results. Small segments are merged now and then; when the segments added
since the base grow past a fraction of it, the next update rebuilds the base (`index.build.build_from_output`).

Files of index NAME (``videos`` or ``segments``) in the index folder, named by segment id (generation + random
suffix, so that two runs updating one output never write the same name)::

    NAME.<segment>.faiss        the FAISS index of the segment (ids are the tables' int64 row_id)
    NAME.<segment>.ids.npy      its row ids in insertion order
    NAME.<segment>.vectors.npy  its full vectors (re-ranked kinds only)
    NAME.<generation>-<x>.deleted.npy  [D, 2] int64: deleted row id, generation of the deletion
    index_info.json             per index: the segments, the deletions file, live count, kind of the base, search
                                parameters, measured recall and latency; the table versions the index reflects

Segment files never change once written and ``index_info.json`` is written last, so a reader opening the info
finds every file it names; an update deletes only files that neither the info it replaced nor the new one name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger("vitaclip.index")

INFO_FILE = "index_info.json"
INDEX_DIR = "index"
INDEX_FORMAT_VERSION = 4  # 4: segments and deletions; 3: one file per index, following the Delta logs
RERANK_FACTOR = 16  # candidates per result re-ranked with full vectors (at least RERANK_MIN)
RERANK_MIN = 100


class IndexUnusableError(ValueError):
    """An index that cannot serve a request: missing, another model, an unknown format."""


@dataclass(frozen=True)
class IndexPlan:
    kind: str
    factory: str
    nlist: int = 0
    rerank: bool = False


def ivf_of(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def hnsw_of(index: faiss.Index) -> Any:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if hasattr(inner, "hnsw") else None


def _search_parameters(index: faiss.Index, selector: Any) -> Any:
    """FAISS search parameters carrying `selector`, of the type the index expects, with its current settings."""
    ivf = ivf_of(index)
    hnsw = hnsw_of(index)
    params: Any
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = ivf.nprobe
    elif hnsw is not None:
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # in the module, not in its stubs
        params.efSearch = hnsw.hnsw.efSearch
    else:
        params = faiss.SearchParameters()
    params.sel = selector
    return params


@dataclass
class VectorIndex:
    """One FAISS index with its row ids and (optionally) full vectors for re-ranking.

    ``search(queries [Q, E], k) -> (scores [Q, k], ids [Q, k])``, id -1 where fewer than k exist; ``exclude``
    (a FAISS ID selector) leaves ids out.
    """

    index: faiss.Index
    ids: np.ndarray  # [N] int64, insertion order
    vectors: np.ndarray | None  # [N, E] float32 (memory-mapped when loaded), for re-ranking
    plan: IndexPlan
    params: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _pos: np.ndarray | None = None  # argsort of ids, for id -> position

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def set_params(self, **params: int) -> None:
        self.params.update(params)
        ivf = ivf_of(self.index)
        if ivf is not None and "nprobe" in params:
            ivf.nprobe = int(params["nprobe"])
        hnsw = hnsw_of(self.index)
        if hnsw is not None and "efSearch" in params:
            hnsw.hnsw.efSearch = int(params["efSearch"])

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        if self._pos is None:
            self._pos = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[self._pos]
        where = np.searchsorted(sorted_ids, ids)
        where = np.clip(where, 0, len(sorted_ids) - 1)
        return self._pos[where]

    def search(self, queries: np.ndarray, k: int, *, exclude: Any = None) -> tuple[np.ndarray, np.ndarray]:
        q = _queries(queries, self.dim, k)
        params = _search_parameters(self.index, exclude) if exclude is not None else None
        if not self.plan.rerank or self.vectors is None:
            return self.index.search(q, k, params=params)
        _, cand = self.index.search(q, max(k * RERANK_FACTOR, RERANK_MIN), params=params)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        for i in range(len(q)):
            c = cand[i][cand[i] >= 0]
            if not len(c):
                continue
            full = np.asarray(self.vectors[self._positions(c)], dtype=np.float32)  # [C, E] exact re-ranking
            s = full @ q[i]
            top = np.argsort(-s)[:k]
            scores[i, : len(top)] = s[top]
            ids[i, : len(top)] = c[top]
        return scores, ids

    def all_vectors(self) -> np.ndarray:
        """Every vector in insertion order ``[N, E]`` (read from the index; flat and re-ranked kinds)."""
        if self.vectors is not None:
            return np.asarray(self.vectors, dtype=np.float32)
        inner = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap) else self.index
        return inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, self.dim), np.float32)


def _queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if q.ndim != 2:
        raise ValueError(f"queries are one vector or a [n, {dim}] array, got shape {q.shape}")
    if q.shape[1] != dim:
        raise ValueError(f"queries have dimension {q.shape[1]}, the index {dim}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not np.isfinite(q).all():  # FAISS answers NaN with ids of -1, silently
        raise ValueError("queries hold NaN or infinity")
    return q


# ------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class Segment:
    """One immutable segment of an index, as ``index_info.json`` lists it."""

    id: str
    generation: int
    count: int
    kind: str
    factory: str
    rerank: bool = False
    search_params: dict[str, int] = field(default_factory=dict)

    def files(self, name: str) -> list[str]:
        names = [f"{name}.{self.id}.faiss", f"{name}.{self.id}.ids.npy"]
        return names + ([f"{name}.{self.id}.vectors.npy"] if self.rerank else [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "generation": self.generation,
            "count": self.count,
            "kind": self.kind,
            "factory": self.factory,
            "rerank": self.rerank,
            "search_params": dict(self.search_params),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        return cls(
            str(d["id"]),
            int(d["generation"]),
            int(d["count"]),
            str(d["kind"]),
            str(d["factory"]),
            bool(d.get("rerank")),
            dict(d.get("search_params") or {}),
        )


def new_file_id(generation: int) -> str:
    return f"{generation:06d}-{uuid.uuid4().hex[:8]}"


def write_segment(folder: Path, name: str, generation: int, vindex: VectorIndex) -> Segment:
    """Writes `vindex` as a new segment of index NAME; returns its description (files named by a fresh id)."""
    seg = Segment(
        new_file_id(generation),
        generation,
        vindex.count,
        vindex.plan.kind,
        vindex.plan.factory,
        bool(vindex.plan.rerank and vindex.vectors is not None),
        dict(vindex.params),
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f for f in seg.files(name)]
    faiss_path, ids_path, *vec = paths
    try:
        _write_faiss(vindex.index, faiss_path)
        np.save(ids_path, np.asarray(vindex.ids, dtype=np.int64))
        if vec:
            np.save(vec[0], np.asarray(vindex.vectors, dtype=np.float32))
    except BaseException:  # a full disk: no partial files of a segment no index names
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise
    return seg


def _write_faiss(index: Any, path: Path) -> None:
    """Writes a FAISS index through a Python file. `faiss.write_index` to a path fails silently where the system
    refuses the last buffered bytes (a full disk): its stdio stream is flushed in a destructor that ignores the error,
    and a file cut short would be published. A Python file raises at the write or the close that fails."""
    try:
        with open(path, "wb") as file:
            writer = faiss.PyCallbackIOWriter(file.write)  # type: ignore[attr-defined]  # not in its stubs
            try:
                faiss.write_index(index, writer)
            finally:
                del writer
    except OSError as exc:
        raise OSError(f"cannot write the index file {path}: {exc.strerror or exc}") from None
    except RuntimeError as exc:  # faiss's own refusal, inside a C++ trace
        raise OSError(f"cannot write the index file {path}: {str(exc).strip().splitlines()[-1][:300]}") from None


def read_segment(folder: Path, name: str, seg: Segment, *, gpu: bool = False) -> VectorIndex:
    """One segment's FAISS index, ids (and vectors to rerank with) from `folder`.

    Raises:
        IndexUnusableError: A file that is missing, unreadable or disagrees with the others (rebuild the index).
    """
    stem = _plain_file_name(f"{name}.{seg.id}")
    path = str(folder / f"{stem}.faiss")
    try:
        try:
            index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # kinds that cannot be memory-mapped are read whole
            index = faiss.read_index(path, faiss.IO_FLAG_READ_ONLY)
        ids = np.load(folder / f"{stem}.ids.npy")
    except RuntimeError:  # faiss's message is a C++ trace
        raise IndexUnusableError(
            f"index file {stem} cannot be read (not a FAISS index, or cut short); {_REBUILD}"
        ) from None
    except (OSError, ValueError) as exc:
        said = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise IndexUnusableError(f"index file {stem} cannot be read ({said}); {_REBUILD}") from None
    if ids.ndim != 1 or len(ids) != index.ntotal:
        raise IndexUnusableError(f"index file {stem}: {len(ids)} ids for {index.ntotal} vectors; {_REBUILD}")
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    vectors = np.load(folder / f"{stem}.vectors.npy", mmap_mode="r") if seg.rerank else None
    vindex = VectorIndex(index, ids, vectors, IndexPlan(seg.kind, seg.factory, rerank=seg.rerank))
    if seg.search_params:
        vindex.set_params(**seg.search_params)
    return vindex


def write_deleted(folder: Path, name: str, generation: int, deleted: np.ndarray) -> str | None:
    """Writes the deletions ``[D, 2]`` (row id, generation) of index NAME; None when there are none."""
    if not len(deleted):
        return None
    file = f"{name}.{new_file_id(generation)}.deleted.npy"
    np.save(folder / file, np.asarray(deleted, dtype=np.int64).reshape(-1, 2))
    return file


def read_deleted(folder: Path, entry: dict[str, Any]) -> np.ndarray:
    file = (entry.get("deleted") or {}).get("file")
    return np.load(folder / _plain_file_name(str(file))).reshape(-1, 2) if file else np.zeros((0, 2), np.int64)


_REBUILD = "rebuild the index with `vitaclip build-index OUT --rebuild`"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def _plain_file_name(name: str) -> str:
    """A file name from an ``index_info.json`` (written by whoever can write the output): a name in the index
    folder, never a path."""
    if not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise IndexUnusableError(f"index_info.json names a file {name[:80]!r} outside the index folder; {_REBUILD}")
    return name


def segments_of(entry: dict[str, Any]) -> list[Segment]:
    return [Segment.from_dict(s) for s in entry.get("segments", [])]


def referenced_files(info: dict[str, Any]) -> set[str]:
    """Files an ``index_info.json`` needs (for format 3: its one-file-per-index names)."""
    files: set[str] = set()
    for name, entry in (info.get("indexes") or {}).items():
        if "segments" not in entry:
            files |= {f"{name}.faiss", f"{name}.ids.npy", f"{name}.vectors.npy"}
            continue
        for seg in segments_of(entry):
            files.update(seg.files(name))
        if (entry.get("deleted") or {}).get("file"):
            files.add(entry["deleted"]["file"])
    return files


def not_an_output(folder: Path) -> str:
    """Why `folder` has no index to search: an output of the previous layout, or no output at all (the outputs in
    its subfolders named)."""
    if (folder / "_commits").is_dir():
        return f"{folder} is an output of the previous layout: convert it with `vitaclip migrate {folder}`"
    inside = sorted(sub.name for sub in folder.iterdir() if (sub / "videos" / "_delta_log").is_dir())[:5]
    where = f" (outputs in its subfolders: {', '.join(inside)})" if inside else ""
    return (
        f"{folder} is not an output of the indexing job (no videos table){where}: give the folder the job wrote "
        "(its --output)"
    )


def read_info(folder: str | Path, *, check_format: bool = True) -> dict[str, Any]:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        output = Path(folder).parent
        if Path(folder).name == INDEX_DIR and not output.is_dir():  # a mistyped output: not "build an index"
            raise IndexUnusableError(f"no output folder at {output}")
        if Path(folder).name == INDEX_DIR and not (output / "videos" / "_delta_log").is_dir():
            raise IndexUnusableError(not_an_output(output))
        raise IndexUnusableError(f"no index at {folder} ({INFO_FILE} missing): build it with `vitaclip build-index`")
    try:
        info = parse_info(path.read_bytes())
    except IndexUnusableError as exc:  # for the one who searches: what mends it
        raise IndexUnusableError(f"{exc}: {_REBUILD}") from None
    if check_format and info.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexUnusableError(
            f"index format version {info.get('format_version')} is not supported (this vitaclip reads "
            f"{INDEX_FORMAT_VERSION}): rebuild it with `vitaclip build-index`"
        )
    return dict(info)


def parse_info(data: bytes) -> dict[str, Any]:
    """An ``index_info.json``'s content. Raises IndexUnusableError when it is not a JSON object (empty, cut short)."""
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexUnusableError(f"{INFO_FILE} is damaged ({len(data)} bytes, not JSON: {exc})") from None
    if not isinstance(info, dict):
        raise IndexUnusableError(f"{INFO_FILE} is damaged (a JSON {type(info).__name__}, not an object)")
    wrong = _wrong_shape(info)
    if wrong:
        raise IndexUnusableError(f"{INFO_FILE} is damaged ({wrong})")
    return info


def _wrong_shape(info: dict[str, Any]) -> str | None:
    """What in a parsed ``index_info.json`` is not of the shape the index writes (an edit by hand, another tool)."""

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    expected: dict[str, tuple[type, ...]] = {"indexes": (dict,), "table_versions": (dict,), "table_ids": (dict,)}
    for key, types in expected.items():
        if key in info and not isinstance(info[key], types):
            return f"{key} is a JSON {type(info[key]).__name__}, not an object"
    if "generation" in info and not is_int(info["generation"]):
        return "generation is not an integer"
    if not all(is_int(v) for v in info.get("table_versions", {}).values()):
        return "table_versions holds a value that is not an integer"
    for name, entry in info.get("indexes", {}).items():
        if not isinstance(entry, dict):
            return f"indexes.{name} is not an object"
        if not isinstance(entry.get("segments", []), list) or not is_int(entry.get("count", 0)):
            return f"indexes.{name} has segments that are not a list or a count that is not an integer"
    return None


def write_info(folder: Path, info: dict[str, Any]) -> None:
    """Replaces ``index_info.json`` atomically (a reader sees the old or the new one, whole)."""
    tmp = folder / f".{INFO_FILE}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, folder / INFO_FILE)
    except BaseException:  # a full disk: the old info stays, whole, and no temporary is left
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def file_generation(name: str) -> int:
    """The generation in an index file's name (``NAME.<generation>-<x>...``); -1 for other names."""
    parts = name.split(".")
    head = parts[1].split("-", 1)[0] if len(parts) >= 3 else ""
    return int(head) if head.isdigit() else -1


def last_generation(info: dict[str, Any]) -> int:
    """The newest generation an ``index_info.json`` names (-1 for none)."""
    return max((int(e.get("generation", -1)) for e in (info.get("indexes") or {}).values()), default=-1)


def remove_unreferenced(names: list[str], keep: set[str], delete: Callable[[str], None], *, upto: int) -> int:
    """Deletes the index files among `names` that no info needs (`keep`) and that are of generation `upto` or older;
    returns how many.

    Newer files belong to an update running at the same time whose ``index_info.json`` is not written yet; the first
    update after theirs removes them if that info lost the race.
    """
    removed = 0
    for name in names:
        if name == INFO_FILE or name in keep or name.startswith(".") or not name.endswith((".faiss", ".npy")):
            continue
        if file_generation(name) <= upto:
            delete(name)
            removed += 1
    return removed


# ------------------------------------------------------------------------------------------- reading


class SegmentedIndex:
    """The segments of one index searched as one: dead vectors skipped, results merged by score.

    ``search(queries [Q, E], k) -> (scores [Q, k], ids [Q, k])``, id -1 where fewer than k live vectors exist.
    """

    def __init__(
        self, segments: list[tuple[Segment, VectorIndex]], deleted: np.ndarray, info: dict[str, Any], name: str
    ) -> None:
        if not segments:
            raise IndexUnusableError(f"the {name!r} index lists no segments")
        self.segments = segments
        self.info = info
        self.name = name
        self.plan = segments[0][1].plan
        self.deleted = deleted
        self._selectors: list[Any] = []
        self._dead: list[np.ndarray] = []
        for seg, _ in segments:
            dead = np.unique(deleted[deleted[:, 1] > seg.generation, 0]) if len(deleted) else deleted[:0, 0]
            self._dead.append(dead)
            if len(dead):
                batch = faiss.IDSelectorBatch(np.ascontiguousarray(dead, dtype=np.int64))
                self._selectors.append((faiss.IDSelectorNot(batch), batch))  # the batch must outlive its Not
            else:
                self._selectors.append(None)

    @property
    def count(self) -> int:
        """Live vectors."""
        return int(self.info["indexes"][self.name]["count"])

    @property
    def dim(self) -> int:
        return self.segments[0][1].dim

    @property
    def params(self) -> dict[str, int]:
        return self.segments[0][1].params

    @property
    def ids(self) -> np.ndarray:
        """Live row ids (reads every segment's ids)."""
        live = [v.ids[~np.isin(v.ids, dead)] for (_, v), dead in zip(self.segments, self._dead, strict=True)]
        return np.concatenate(live) if live else np.zeros(0, np.int64)

    def set_params(self, **params: int) -> None:
        self.segments[0][1].set_params(**params)  # the base; later segments are exact

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the `k` nearest live rows per query, best first: at most `count` columns (FAISS makes
        room for `k` per query: 10**9 asked of 15 vectors ended the process); ids of -1 where fewer are found."""
        q = _queries(queries, self.dim, k)
        k = min(k, max(1, self.count))
        all_scores, all_ids = [], []
        for (_, vindex), selector in zip(self.segments, self._selectors, strict=True):
            if vindex.count == 0:
                continue
            scores, ids = vindex.search(q, k, exclude=selector[0] if selector else None)
            all_scores.append(np.where(ids >= 0, scores, -np.inf))
            all_ids.append(ids)
        if len(all_ids) == 1:
            return all_scores[0].astype(np.float32), all_ids[0]
        if not all_ids:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        scores = np.concatenate(all_scores, axis=1)
        ids = np.concatenate(all_ids, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1).astype(np.float32), np.take_along_axis(ids, order, 1)


def open_index(
    out_dir: str | Path,
    *,
    name: str = "videos",
    model_id: str | None = None,
    gpu: bool = False,
    reuse: SegmentedIndex | None = None,
) -> SegmentedIndex:
    """Opens an index read-only (``OUT`` or ``OUT/index``); refuses one built with another model.

    ``gpu=True`` moves flat and IVF segments without deletions to the GPUs when faiss-gpu sees any (FAISS's GPU
    indexes take no ID selector: a segment with deletions is searched on the CPU until the next rebuild).
    `reuse`: an open earlier state of the same index (a service reloading it): segments it holds are taken from it
    instead of read again (segment files never change), so opening an update reads only what the update wrote.
    """
    folder = Path(out_dir)
    if (folder / INDEX_DIR / INFO_FILE).is_file():
        folder = folder / INDEX_DIR
    info = read_info(folder)
    if model_id is not None and info["model_id"] != model_id:
        raise IndexUnusableError(
            f"the index was built with {info['model_id']} but the queries use {model_id}: query with that model or "
            "rebuild the index"
        )
    if name not in info["indexes"]:
        raise IndexUnusableError(f"{out_dir} has no {name!r} index; it has {sorted(info['indexes'])}")
    entry = info["indexes"][name]
    deleted = read_deleted(folder, entry)
    use_gpu = gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    held = {}
    if reuse is not None and reuse.name == name and not gpu:
        held = {seg.id: vindex for seg, vindex in reuse.segments}
    segments = []
    for seg in segments_of(entry):
        if seg.id in held:
            if seg.search_params:
                held[seg.id].set_params(**seg.search_params)  # a later tuning of the same segment
            segments.append((seg, held[seg.id]))
            continue
        on_gpu = (
            use_gpu and seg.kind in ("flat", "ivf") and not (len(deleted) and (deleted[:, 1] > seg.generation).any())
        )
        segments.append((seg, read_segment(folder, name, seg, gpu=on_gpu)))
    return SegmentedIndex(segments, deleted, info, name)

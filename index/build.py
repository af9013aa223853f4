"""FAISS indexes over committed embeddings, following FAISS's own stages: choose, train, add, tune, save.

Inner product on L2-normalised vectors. The kind is chosen from the vector count and a memory budget (overridable):
exact search up to ``flat_max`` vectors, IVF beyond, compressed codes (IVF-PQ) only past the memory budget and then
with re-ranking from the stored full vectors (a memory-mapped ``.npy``), since compressed CLIP indexes lose recall
on text queries. Search parameters (``nprobe``, ``efSearch``) are tuned to a recall target measured with text-side
queries against exact search. A GPU (faiss-gpu) trains and adds when present.

Files of one index named NAME (``videos`` or ``segments``) in the index folder::

    NAME.faiss        the FAISS index (ids are the tables' int64 row_id)
    NAME.ids.npy      row ids in insertion order
    NAME.vectors.npy  full vectors in insertion order (kept for re-ranking and rebuilds)
    index_info.json   kind, factory, parameters, counts, model id, measured recall and latency, the table
                      versions it reflects (followed through the Delta log on updates) and why it was last rebuilt
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa

from index.delta_tables import OutputLocation

log = logging.getLogger("vitaclip.index")

INFO_FILE = "index_info.json"
INDEX_DIR = "index"
INDEX_FORMAT_VERSION = 3  # 3: follows the Delta tables' logs (table_versions)
IndexKind = Literal["auto", "flat", "ivf", "ivfpq", "hnsw"]

DEFAULT_FLAT_MAX = 100_000  # exact search of 100k x 512 stays within a few ms per query on 2 cores
DEFAULT_MEMORY_BUDGET_BYTES = 8 * 2**30
DEFAULT_RECALL_TARGET = 0.95
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


def plan_index(
    count: int,
    dim: int,
    *,
    kind: str = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    flat_max: int = DEFAULT_FLAT_MAX,
) -> IndexPlan:
    """Which index to build for ``count`` vectors of ``dim`` floats (``kind`` may also be a FAISS factory string)."""
    # About 2 * sqrt(N) lists: ~500 vectors per list at 1M, trainable on a CPU in minutes.
    nlist = max(1, min(int(2 * math.sqrt(max(count, 1))), max(1, count // 39)))
    m = next(m for m in (64, 48, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim // 2 or m == 1)
    if kind == "auto":
        if count <= flat_max:
            kind = "flat"
        elif count * dim * 4 <= memory_budget_bytes:
            kind = "ivf"
        else:
            kind = "ivfpq"
    if kind == "flat":
        return IndexPlan("flat", "IDMap2,Flat")
    if kind == "ivf":
        return IndexPlan("ivf", f"IVF{nlist},Flat", nlist=nlist)
    if kind == "ivfpq":
        return IndexPlan("ivfpq", f"IVF{nlist},PQ{m}x8", nlist=nlist, rerank=True)
    if kind == "hnsw":
        return IndexPlan("hnsw", "IDMap2,HNSW32,Flat")
    if "," in kind or kind.startswith(("IVF", "HNSW", "Flat", "PQ", "IDMap")):
        nl = int(kind[3:].split(",")[0].split("_")[0]) if kind.startswith("IVF") else 0
        return IndexPlan(
            "factory",
            kind if kind.startswith(("IVF", "IDMap")) else f"IDMap2,{kind}",
            nlist=nl,
            rerank="PQ" in kind or "SQ" in kind,
        )
    raise ValueError(f"unknown index kind {kind!r}; use auto, flat, ivf, ivfpq, hnsw or a FAISS factory string")


def _use_gpu() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions of the exact top-k by inner product, ``[Q, k]``."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, pos = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return pos


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k ids found in the returned top-k."""
    hits = [
        len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found_ids, true_ids, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0


@dataclass
class VectorIndex:
    """An index with its row ids and (optionally) full vectors for re-ranking.

    ``search(queries [Q, E], k) -> (scores [Q, k], ids [Q, k])``, id -1 where fewer than k exist.
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
        ivf = _ivf(self.index)
        if ivf is not None and "nprobe" in params:
            ivf.nprobe = int(params["nprobe"])
        hnsw = _hnsw(self.index)
        if hnsw is not None and "efSearch" in params:
            hnsw.hnsw.efSearch = int(params["efSearch"])

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        if self._pos is None:
            self._pos = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[self._pos]
        where = np.searchsorted(sorted_ids, ids)
        where = np.clip(where, 0, len(sorted_ids) - 1)
        return self._pos[where]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not self.plan.rerank or self.vectors is None:
            return self.index.search(q, k)
        _, cand = self.index.search(q, max(k * RERANK_FACTOR, RERANK_MIN))
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


def _ivf(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw(index: faiss.Index) -> Any:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if hasattr(inner, "hnsw") else None


def _train_and_add(plan: IndexPlan, vectors: np.ndarray, ids: np.ndarray, *, seed: int = 0) -> faiss.Index:
    dim = vectors.shape[1]
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample_size = min(len(vectors), max(64 * max(plan.nlist, 1), 50_000))
        sample = vectors[np.sort(rng.choice(len(vectors), sample_size, replace=False))]
        if _use_gpu() and plan.nlist:
            ivf = faiss.extract_index_ivf(index)
            clustering = faiss.Clustering(dim, ivf.nlist)
            clustering.seed = seed
            gpu_quantizer = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))
            clustering.train(np.ascontiguousarray(sample), gpu_quantizer)
            centroids = faiss.vector_float_to_array(clustering.centroids).reshape(ivf.nlist, dim)
            ivf.quantizer.add(centroids)
            index.train(np.ascontiguousarray(sample))  # trains the codes (PQ) on the fixed quantizer
        else:
            ivf = _ivf(index)
            if ivf is not None:
                ivf.cp.seed = seed
            index.train(np.ascontiguousarray(sample))
    for start in range(0, len(vectors), 65_536):
        index.add_with_ids(
            np.ascontiguousarray(vectors[start : start + 65_536]), np.ascontiguousarray(ids[start : start + 65_536])
        )
    return index


def tune(
    vindex: VectorIndex,
    vectors: np.ndarray,
    queries: np.ndarray,
    *,
    recall_target: float = DEFAULT_RECALL_TARGET,
    k: int = 10,
) -> dict[str, Any]:
    """Smallest ``nprobe``/``efSearch`` whose recall@k against exact search meets the target; measures latency."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, max(1, vindex.count))
    truth = vindex.ids[exact_search(vectors, queries, k)] if len(queries) else np.zeros((0, k), np.int64)
    if vindex.plan.nlist:
        grid = [("nprobe", v) for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if v <= vindex.plan.nlist]
        grid.append(("nprobe", vindex.plan.nlist))
    elif _hnsw(vindex.index) is not None:
        grid = [("efSearch", v) for v in (16, 32, 64, 128, 256, 512)]
    else:
        grid = [("exact", 0)]
    chosen: dict[str, Any] = {}
    for name, value in grid:
        if name != "exact":
            vindex.set_params(**{name: value})
        _, found = vindex.search(queries, k)
        recall = recall_at_k(found, truth) if len(queries) else 1.0
        chosen = {"param": name, "value": value, "recall_at_10": round(recall, 4)}
        if recall >= recall_target:
            break
    chosen.update(measure_latency(vindex, queries))
    return chosen


def measure_latency(
    vindex: VectorIndex, queries: np.ndarray, *, k: int = 10, max_queries: int = 200
) -> dict[str, float]:
    """Single-query latency percentiles (ms) and batch throughput (queries/s)."""
    if not len(queries):
        return {}
    qs = queries[:max_queries]
    times = []
    for q in qs:
        start = time.perf_counter()
        vindex.search(q[None], k)
        times.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    vindex.search(qs, k)
    batch = time.perf_counter() - start
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 4),
        "p99_ms": round(float(np.percentile(times, 99)), 4),
        "batch_queries_per_second": round(len(qs) / batch, 1) if batch > 0 else float("inf"),
    }


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    out_dir: str | Path,
    *,
    kind: str = "auto",
    model_id: str,
    name: str = "videos",
    tune_queries: np.ndarray | Callable[[], np.ndarray] | None = None,
    recall_target: float = DEFAULT_RECALL_TARGET,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    flat_max: int = DEFAULT_FLAT_MAX,
) -> dict[str, Any]:
    """Builds index NAME of ``vectors`` ``[N, E]`` (L2-normalised) with int64 ``ids`` into ``out_dir``.

    Returns this index's entry of ``index_info.json`` (also written, merged with other indexes of the folder).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"need vectors [N, E] and ids [N], got {vectors.shape} and {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique")
    plan = plan_index(
        len(vectors), vectors.shape[1], kind=kind, memory_budget_bytes=memory_budget_bytes, flat_max=flat_max
    )
    if plan.nlist and plan.nlist * 39 > len(vectors):
        plan = IndexPlan("flat", "IDMap2,Flat")  # too few vectors to train the clusters: exact is better anyway
    start = time.perf_counter()
    index = _train_and_add(plan, vectors, ids)
    build_seconds = time.perf_counter() - start
    vindex = VectorIndex(index, ids, vectors if plan.rerank else None, plan)
    approximate = plan.kind != "flat"
    if callable(tune_queries):  # text queries cost a model load: only when there is something to tune
        tune_queries = tune_queries() if approximate else None
    queries = tune_queries if tune_queries is not None else _default_queries(vectors)
    tuning = tune(vindex, vectors, queries, recall_target=recall_target)
    auto_note = None
    if kind == "auto" and plan.kind == "ivf" and 2 * int(tuning["value"]) >= plan.nlist:
        # The recall target needs most of the lists: the data has no cluster structure IVF can use (nearly
        # isotropic vectors), and scanning most lists is slower than exact search. Exact it is.
        auto_note = (
            f"IVF needed nprobe {tuning['value']} of {plan.nlist} lists for recall {recall_target}: exact search "
            f"chosen instead (IVF p50 {tuning.get('p50_ms')} ms)"
        )
        plan = IndexPlan("flat", "IDMap2,Flat")
        start = time.perf_counter()
        index = _train_and_add(plan, vectors, ids)
        build_seconds += time.perf_counter() - start
        vindex = VectorIndex(index, ids, None, plan)
        approximate = False
        tuning = tune(vindex, vectors, queries, recall_target=recall_target)
    entry = {
        "kind": plan.kind,
        "factory": plan.factory,
        "metric": "inner_product",
        "count": vindex.count,
        "dim": int(vectors.shape[1]),
        "rerank": plan.rerank,
        "search_params": {tuning["param"]: tuning["value"]} if tuning.get("param") not in (None, "exact") else {},
        "trained_count": len(vectors) if plan.nlist else 0,
        "train_quantization_error": _quantization_error(index, vectors) if plan.nlist else None,
        "measured": {k: v for k, v in tuning.items() if k not in ("param", "value")},
        "tuned_with": (
            "exact search"
            if not approximate
            else "text queries"
            if tune_queries is not None
            else "perturbed index vectors"
        ),
        "recall_target": recall_target,
        "build_seconds": round(build_seconds, 3),
        "gpu": _use_gpu(),
    }
    if auto_note:
        entry["auto_choice"] = auto_note
    _save(out_dir, name, vindex, entry, model_id)
    return entry


def _default_queries(vectors: np.ndarray, n: int = 200, seed: int = 0) -> np.ndarray:
    # Without text queries: index vectors pushed away from the data, as text embeddings sit apart from video ones.
    rng = np.random.default_rng(seed)
    base = vectors[rng.choice(len(vectors), min(n, len(vectors)), replace=False)]
    noisy = base + rng.normal(scale=0.6 / math.sqrt(vectors.shape[1]), size=base.shape).astype(np.float32) * 2
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def _quantization_error(index: faiss.Index, vectors: np.ndarray, n: int = 5000) -> float:
    ivf = _ivf(index)
    if ivf is None:
        return 0.0
    sample = vectors[:n]
    d, _ = ivf.quantizer.search(sample, 1)
    return float(np.mean(1.0 - d[:, 0]))  # 1 - cosine to the nearest centroid


def _save(out_dir: str | Path, name: str, vindex: VectorIndex, entry: dict[str, Any], model_id: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(vindex.index, str(out / f"{name}.faiss"))
    np.save(out / f"{name}.ids.npy", vindex.ids)
    if vindex.plan.rerank and vindex.vectors is not None:
        np.save(out / f"{name}.vectors.npy", np.asarray(vindex.vectors, dtype=np.float32))
    (out / f"{name}.stamps.npy").unlink(missing_ok=True)  # written by format version 2
    _set_entry(out, name, entry, model_id)


def _set_entry(folder: Path, name: str, entry: dict[str, Any], model_id: str) -> None:
    info_path = folder / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("model_id") not in (None, model_id):
        info = {}  # another model's index is replaced whole
    info.update({"format_version": INDEX_FORMAT_VERSION, "model_id": model_id})
    info.setdefault("indexes", {})[name] = entry
    info_path.write_text(json.dumps(info, indent=1))


def read_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise IndexUnusableError(f"no index at {folder} ({INFO_FILE} missing): build it with `vitaclip build-index`")
    info = json.loads(path.read_text())
    if info.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexUnusableError(
            f"index format version {info.get('format_version')} is not supported (this vitaclip reads "
            f"{INDEX_FORMAT_VERSION}): rebuild it with `vitaclip build-index`"
        )
    return dict(info)


def open_index(
    out_dir: str | Path, *, name: str = "videos", model_id: str | None = None, gpu: bool = False
) -> VectorIndex:
    """Opens an index read-only (``OUT`` or ``OUT/index``); refuses one built with another model.

    ``gpu=True`` moves flat and IVF indexes to the GPUs when faiss-gpu sees any (the CPU index otherwise).
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
    try:
        index = faiss.read_index(str(folder / f"{name}.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # kinds that cannot be memory-mapped are read whole
        index = faiss.read_index(str(folder / f"{name}.faiss"), faiss.IO_FLAG_READ_ONLY)
    if gpu and _use_gpu() and entry["kind"] in ("flat", "ivf"):
        # faiss-gpu: search on the GPUs (the memory-mapped CPU copy is the source); other kinds stay on the CPU.
        index = faiss.index_cpu_to_all_gpus(index)
    ids = np.load(folder / f"{name}.ids.npy")
    vec_path = folder / f"{name}.vectors.npy"
    vectors = np.load(vec_path, mmap_mode="r") if vec_path.is_file() else None
    plan = IndexPlan(entry["kind"], entry["factory"], rerank=bool(entry.get("rerank")))
    vindex = VectorIndex(index, ids, vectors, plan, info=info)
    if entry.get("search_params"):
        vindex.set_params(**entry["search_params"])
    return vindex


# ------------------------------------------------------------------------------------------- from job outputs


_ROW_COLUMNS = {
    "videos": ["row_id", "embedding", "status", "model_id"],
    "segments": ["row_id", "embedding", "model_id"],
}


class _FullBuild(Exception):
    """The index cannot follow the log from its recorded version; the message says why (recorded as the reason)."""


def _ok_rows(
    location: OutputLocation, table: str, model_id: str, *, version: int, files: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, row ids) of a table's rows with an embedding of one model: all at `version`, or of `files` only.

    Reads four columns, never thumbnails. A row id seen twice (not possible through the job's commits) keeps its
    last row rather than failing every later build.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from index.delta_tables import open_table, table_schema

    columns = _ROW_COLUMNS[table]
    condition = (pc.field("model_id") == model_id) & pc.field("embedding").is_valid()
    if table == "videos":
        condition = condition & (pc.field("status") == "ok")
    if files is None:
        dt = open_table(location, table, version=version)
        if dt is None:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        dataset = dt.to_pyarrow_dataset()
    else:
        if not files:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        filesystem, root = location.table_path(table)
        schema = pa.schema([f for f in table_schema(table, 1) if f.name in columns])
        dataset = pads.dataset([f"{root}/{f}" for f in files], schema=schema, format="parquet", filesystem=filesystem)
    rows = dataset.to_table(columns=["row_id", "embedding"], filter=condition)
    ids = rows.column("row_id").to_numpy().astype(np.int64)
    emb = rows.column("embedding").combine_chunks()
    if len(ids) == 0:
        return np.zeros((0, 0), np.float32), ids
    vectors = emb.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), -1)
    _, last = np.unique(ids[::-1], return_index=True)
    if len(last) != len(ids):
        keep = np.sort(len(ids) - 1 - last)
        vectors, ids = vectors[keep], ids[keep]
    return vectors, ids


def _removed_ids(location: OutputLocation, table: str, files: list[str]) -> np.ndarray:
    """Row ids in data files that commits removed (still on storage until vacuumed)."""
    import pyarrow.dataset as pads

    if not files:
        return np.zeros(0, np.int64)
    filesystem, root = location.table_path(table)
    dataset = pads.dataset([f"{root}/{f}" for f in files], format="parquet", filesystem=filesystem)
    try:
        return dataset.to_table(columns=["row_id"]).column("row_id").to_numpy().astype(np.int64)
    except (FileNotFoundError, OSError) as exc:
        raise _FullBuild(f"a data file removed since the index's table version is gone (vacuumed): {exc}") from exc


def _net_changes(location: OutputLocation, table: str, after: int, upto: int) -> tuple[list[str], list[str]]:
    """Data files added and removed between two table versions, from the log's JSON commits only."""
    from index.delta_tables import LogUnavailableError, log_changes

    try:
        commits = log_changes(location, table, after_version=after, upto_version=upto)
    except LogUnavailableError as exc:
        raise _FullBuild(str(exc)) from exc
    added: dict[str, None] = {}
    removed: dict[str, None] = {}
    for entry in commits:
        if entry.changes_metadata:
            raise _FullBuild(f"commit {entry.version} of the {table} table changed its metadata")
        for path in entry.removes:
            if path in added:
                del added[path]  # added and removed within the span: never indexed
            else:
                removed[path] = None
        for add in entry.adds:
            added[add.path] = None
    return list(added), list(removed)


def _follow_log(
    folder: Path, name: str, location: OutputLocation, model_id: str, *, after: int, upto: int
) -> dict[str, Any]:
    """Brings index NAME from table version `after` to `upto` by the log: removes the ids of removed files' rows,
    adds the rows of added files. Reads only those files.

    Raises:
        _FullBuild: the log or a removed file is gone, the table's metadata changed, the collection outgrew the
            trained clusters, or the new vectors fit them clearly worse.
    """
    old = open_index(folder, name=name, model_id=model_id)
    entry = dict(old.info["indexes"][name])
    if entry["kind"] == "hnsw":
        raise _FullBuild("an HNSW index cannot remove ids")
    added_files, removed_files = _net_changes(location, name, after, upto)
    new_vectors, new_ids = _ok_rows(location, name, model_id, version=upto, files=added_files)
    gone = np.union1d(_removed_ids(location, name, removed_files), new_ids)
    index = faiss.read_index(str(folder / f"{name}.faiss"))  # a writable copy
    kept = ~np.isin(old.ids, gone)
    count = int(kept.sum()) + len(new_ids)
    if entry.get("trained_count") and count > 2 * entry["trained_count"]:
        raise _FullBuild(f"{count} vectors outgrew the {entry['trained_count']} the clusters were trained on")
    if entry.get("train_quantization_error") and len(new_ids):
        err = _quantization_error(index, new_vectors)
        if err > 1.5 * entry["train_quantization_error"] + 1e-3:
            raise _FullBuild(
                f"new vectors fit the trained clusters worse ({err:.4f} vs {entry['train_quantization_error']:.4f})"
            )
    if len(gone):
        index.remove_ids(gone)  # type: ignore[arg-type]  # numpy ids are accepted; absent ids are ignored
    if len(new_ids):
        index.add_with_ids(np.ascontiguousarray(new_vectors), new_ids)
    ids = np.concatenate([old.ids[kept], new_ids]).astype(np.int64)
    plan = IndexPlan(
        entry["kind"],
        entry["factory"],
        nlist=_ivf(index).nlist if _ivf(index) is not None else 0,
        rerank=bool(entry.get("rerank")),
    )
    vectors = None
    if plan.rerank:
        if old.vectors is None:
            raise _FullBuild("the re-ranking vectors of the index are missing")
        vectors = np.concatenate([np.asarray(old.vectors)[kept], new_vectors.reshape(len(new_ids), -1)])
    vindex = VectorIndex(index, ids, vectors, plan)
    if entry.get("search_params"):
        vindex.set_params(**entry["search_params"])
    was_indexed = np.isin(new_ids, old.ids)
    entry.update(
        count=vindex.count,
        incremental={
            "added": int((~was_indexed).sum()),  # ids new to the index
            "updated": int(was_indexed.sum()),  # ids whose rows were committed again (new versions, rewritten files)
            "removed": int((~kept).sum() - was_indexed.sum()),
            "files_read": len(added_files) + len(removed_files),
        },
    )
    entry.pop("rebuild_reason", None)
    _save(folder, name, vindex, entry, model_id)
    return entry


def build_from_output(
    output: Any,
    *,
    model_id: str,
    kind: str = "auto",
    tune_queries: np.ndarray | Callable[[], np.ndarray] | None = None,
    recall_target: float = DEFAULT_RECALL_TARGET,
    rebuild: bool = False,
) -> dict[str, Any]:
    """Builds or updates ``OUT/index/`` from the committed ok rows of ``model_id``; returns ``index_info``.

    An existing index of the model follows the tables' logs from the versions recorded in ``index_info.json``
    (``table_versions``): only data files added or removed since are read. A full build, reading the embedding
    columns of the whole table, happens when asked (`rebuild`, another `kind`), when there is no index, or when
    the log cannot be followed; each index entry's ``rebuild_reason`` then says why.

    Args:
        output: The job's store (anything with ``location``, ``list``, ``get_file``, ``put_file``, ``local_path``).
    """
    from index.delta_tables import TABLES
    from index.tables import as_location, table_versions

    location = as_location(output)
    versions = table_versions(location)
    if versions is None:
        raise ValueError(f"{location.url} has no output tables: run the indexing job first")
    local = output.local_path(INDEX_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        folder = local if local is not None else Path(tmp)
        if local is None:  # object store: start from the current index files
            for rel in output.list(INDEX_DIR + "/"):
                output.get_file(rel, Path(tmp) / Path(rel).name)  # streamed: index files can be many GiB
        folder.mkdir(parents=True, exist_ok=True)
        info_path = folder / INFO_FILE
        try:
            previous = read_info(folder)
        except IndexUnusableError as exc:
            previous, why_full = {}, str(exc)
        else:
            why_full = ""
            if previous.get("model_id") != model_id:
                why_full = f"the index was built with {previous.get('model_id')}"
        built = []
        for table in TABLES:
            entry = None
            reason = (
                "asked for (--rebuild)" if rebuild else f"index kind {kind!r} asked for" if kind != "auto" else why_full
            )
            after = previous.get("table_versions", {}).get(table)
            if not reason and (after is None or table not in previous.get("indexes", {})):
                reason = f"no {table} index yet"
            if not reason:
                try:
                    entry = _follow_log(folder, table, location, model_id, after=int(after), upto=versions[table])
                except (_FullBuild, IndexUnusableError, FileNotFoundError, RuntimeError) as exc:
                    reason = str(exc)
            if entry is None:
                vectors, ids = _ok_rows(location, table, model_id, version=versions[table])
                if len(ids) == 0:
                    continue
                entry = build_index(
                    vectors,
                    ids,
                    folder,
                    kind=kind,
                    model_id=model_id,
                    name=table,
                    tune_queries=tune_queries,
                    recall_target=recall_target,
                )
                entry["rebuild_reason"] = reason
                _set_entry(folder, table, entry, model_id)
            log.info("index %s: %s, %d vectors", table, entry["kind"], entry["count"])
            built.append(table)
        info: dict[str, Any] = (
            json.loads(info_path.read_text())
            if info_path.is_file()
            else {"format_version": INDEX_FORMAT_VERSION, "model_id": model_id, "indexes": {}}
        )
        info["indexes"] = {k: v for k, v in info.get("indexes", {}).items() if k in built}
        info.update(table_versions=versions, built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        info_path.write_text(json.dumps(info, indent=1))
        if local is None:
            for path in sorted(folder.iterdir()):
                if path.name != INFO_FILE:
                    output.put_file(f"{INDEX_DIR}/{path.name}", path)  # multipart past 64 MiB
            output.put_file(f"{INDEX_DIR}/{INFO_FILE}", info_path)  # last: readers see whole indexes
        return info

"""FAISS indexes over committed embeddings, following FAISS's own stages: choose, train, add, tune, save; and their
updates from the output tables' logs.

Inner product on L2-normalised vectors. The kind is chosen from the vector count and a memory budget (overridable):
exact search up to ``flat_max`` vectors, IVF beyond, compressed codes (IVF-PQ) only past the memory budget and then
with re-ranking from the stored full vectors (a memory-mapped ``.npy``), since compressed CLIP indexes lose recall
on text queries. Search parameters (``nprobe``, ``efSearch``) are tuned to a recall target measured with text-side
queries against exact search. A GPU (faiss-gpu) trains and adds when present.

A full build writes the base segment of each index; `build_from_output` then follows the tables' Delta logs: each
update reads only the data files added or removed since the versions the index reflects, writes their rows as a
small exact segment and records the removed ids as deletions (the files on disk: `index.segments`). Segments of
similar size are merged; the base is rebuilt (and retrained) once the changes since it outgrow a fraction of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import faiss
import numpy as np
import pyarrow as pa

from index.delta_tables import OutputLocation
from index.segments import (
    INDEX_DIR,
    INDEX_FORMAT_VERSION,
    INFO_FILE,
    IndexPlan,
    IndexUnusableError,
    Segment,
    VectorIndex,
    file_generation,
    hnsw_of,
    ivf_of,
    last_generation,
    parse_info,
    read_deleted,
    read_info,
    read_segment,
    referenced_files,
    remove_unreferenced,
    segments_of,
    write_deleted,
    write_info,
    write_segment,
)

if TYPE_CHECKING:
    from index.stores import Store

log = logging.getLogger("vitaclip.index")

IndexKind = Literal["auto", "flat", "ivf", "ivfpq", "hnsw"]

DEFAULT_FLAT_MAX = 100_000  # exact search of 100k x 512 stays within a few ms per query on 2 cores
DEFAULT_MEMORY_BUDGET_BYTES = 8 * 2**30
DEFAULT_RECALL_TARGET = 0.95
# The base is rebuilt when the rows added and deleted since it was built pass this fraction of it (at least
# DELTA_MIN_ROWS, at most the flat limit: later segments are searched exactly).
DELTA_FRACTION = 0.25
DELTA_MIN_ROWS = 10_000
MAX_DELTA_SEGMENTS = 12  # past this many segments after the base, the newest are merged whatever their sizes


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
        # "np": no polysemous training, which reorders each codebook so that Hamming distances between codes
        # approximate real ones (for polysemous filtering, which search here never uses): 4x the training time.
        return IndexPlan("ivfpq", f"IVF{nlist},PQ{m}x8np", nlist=nlist, rerank=True)
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
            ivf = ivf_of(index)
            if ivf is not None:
                ivf.cp.seed = seed
            _warn_once_of_few_points(index, len(sample))
            index.train(np.ascontiguousarray(sample))
    for start in range(0, len(vectors), 65_536):
        index.add_with_ids(
            np.ascontiguousarray(vectors[start : start + 65_536]), np.ascontiguousarray(ids[start : start + 65_536])
        )
    return index


def _warn_once_of_few_points(index: faiss.Index, points: int) -> None:
    """One log line where `points` are few to train `index`'s clusterings, instead of FAISS's own warning printed
    once per clustering (32 identical lines for the codebooks of a product quantizer trained on 300 vectors)."""
    ivf = ivf_of(index)
    parts = [("coarse", ivf.cp, ivf.nlist)] if ivf is not None else []
    pq = getattr(faiss.downcast_index(ivf), "pq", None) if ivf is not None else getattr(index, "pq", None)
    if pq is not None:
        parts.append((f"{pq.M} product-quantizer", pq.cp, pq.ksub))
    few = [(name, cp.min_points_per_centroid * k, k) for name, cp, k in parts]
    few = [(name, need, k) for name, need, k in few if points < need]
    if few:
        said = ", ".join(
            f"{need:,} for the {name} clustering{'s' * (name != 'coarse')} of {k}" for name, need, k in few
        )
        log.warning("training the index on %s vectors, fewer than FAISS asks for (%s): recall may be low", points, said)
        for _, cp, _ in parts:
            cp.min_points_per_centroid = 1  # said once above


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
    elif hnsw_of(vindex.index) is not None:
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
    folder = Path(out_dir)
    previous = _info_or_empty(folder)
    generation = last_generation(previous) + 1
    entry = _build_base(
        vectors,
        ids,
        folder,
        generation=generation,
        kind=kind,
        name=name,
        tune_queries=tune_queries,
        recall_target=recall_target,
        memory_budget_bytes=memory_budget_bytes,
        flat_max=flat_max,
    )
    info = _with_entry(previous, name, entry, model_id)
    write_info(folder, info)
    remove_unreferenced(
        [p.name for p in folder.iterdir()],
        referenced_files(previous) | referenced_files(info),
        _unlink_in(folder),
        upto=generation - 1,
    )
    return entry


def _build_base(
    vectors: np.ndarray,
    ids: np.ndarray,
    folder: Path,
    *,
    generation: int,
    kind: str,
    name: str,
    tune_queries: np.ndarray | Callable[[], np.ndarray] | None,
    recall_target: float,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    flat_max: int = DEFAULT_FLAT_MAX,
) -> dict[str, Any]:
    """Chooses, trains, fills and tunes a base segment of index NAME and writes its files; returns its entry."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"need vectors [N, E] and ids [N], got {vectors.shape} and {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique")
    plan = plan_index(
        len(vectors), vectors.shape[1], kind=kind, memory_budget_bytes=memory_budget_bytes, flat_max=flat_max
    )
    auto_note = None
    if plan.nlist and (plan.nlist * 39 > len(vectors) or (plan.nlist < 2 and plan.kind in ("ivf", "ivfpq"))):
        # Too few vectors to train the clusters (one list is an exact scan with extra steps): exact is better
        # anyway (said when another kind was asked for).
        lists = f"{plan.nlist} list" + ("s" if plan.nlist != 1 else "")
        auto_note = f"{len(vectors)} vectors are too few to train {plan.kind} ({lists}): exact search"
        plan = IndexPlan("flat", "IDMap2,Flat")
    start = time.perf_counter()
    index = _train_and_add(plan, vectors, ids)
    build_seconds = time.perf_counter() - start
    vindex = VectorIndex(index, ids, vectors if plan.rerank else None, plan)
    approximate = plan.kind != "flat"
    if callable(tune_queries):  # text queries cost a model load: only when there is something to tune
        tune_queries = tune_queries() if approximate else None
    queries = tune_queries if tune_queries is not None else default_queries(vectors)
    tuning = tune(vindex, vectors, queries, recall_target=recall_target)
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
            else f"synthetic queries at cosine {DEFAULT_QUERY_COSINE} from a data vector (no text queries given)"
        ),
        "recall_target": recall_target,
        "build_seconds": round(build_seconds, 3),
        "gpu": _use_gpu(),
    }
    if auto_note:
        entry["auto_choice"] = auto_note
    base = write_segment(folder, name, generation, vindex)
    entry.update(generation=generation, segments=[base.to_dict()], deleted=None)
    return entry


DEFAULT_QUERY_COSINE = 0.3
"""How close the synthetic tuning queries sit to the data when no text queries are given: CLIP text embeddings are
typically at cosine 0.2-0.35 from the video embeddings they describe."""


def default_queries(
    vectors: np.ndarray, n: int = 200, *, seed: int = 0, cosine: float = DEFAULT_QUERY_COSINE
) -> np.ndarray:
    """Tuning queries for an index built without text queries: each at `cosine` from a random data vector, the rest
    of it a random direction orthogonal to that vector, so that recall tuned on them holds for text queries (queries
    close to the data need fewer probes than text does and overstate the recall text gets)."""
    rng = np.random.default_rng(seed)
    base = vectors[rng.choice(len(vectors), min(n, len(vectors)), replace=False)].astype(np.float32)
    base /= np.maximum(np.linalg.norm(base, axis=1, keepdims=True), 1e-12)
    noise = rng.normal(size=base.shape).astype(np.float32)
    noise -= (noise * base).sum(axis=1, keepdims=True) * base  # orthogonal to its base vector
    noise /= np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    queries = cosine * base + math.sqrt(1 - cosine**2) * noise
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def _quantization_error(index: faiss.Index, vectors: np.ndarray, n: int = 5000) -> float:
    ivf = ivf_of(index)
    if ivf is None:
        return 0.0
    sample = vectors[:n]
    d, _ = ivf.quantizer.search(sample, 1)
    return float(np.mean(1.0 - d[:, 0]))  # 1 - cosine to the nearest centroid


def _info_or_empty(folder: Path) -> dict[str, Any]:
    try:
        return read_info(folder, check_format=False)
    except IndexUnusableError:
        return {}


def _with_entry(info: dict[str, Any], name: str, entry: dict[str, Any], model_id: str) -> dict[str, Any]:
    """`info` with index NAME set to `entry` (another model's or format's indexes are dropped whole)."""
    if info.get("model_id") != model_id or info.get("format_version") != INDEX_FORMAT_VERSION:
        info = {}
    return {
        **info,
        "format_version": INDEX_FORMAT_VERSION,
        "model_id": model_id,
        "indexes": {**info.get("indexes", {}), name: entry},
    }


def _unlink_in(folder: Path) -> Callable[[str], None]:
    return lambda name: (folder / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- from job outputs


_ROW_COLUMNS = {
    "videos": ["row_id", "embedding", "status", "model_id", "run_id", "indexed_at"],
    "segments": ["row_id", "embedding", "model_id", "run_id", "indexed_at"],
}


class _FullBuild(Exception):
    """The index cannot follow the log from its recorded version; the message says why (recorded as the reason)."""


def _ok_rows(
    location: OutputLocation, table: str, model_id: str, *, version: int, files: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, row ids, row versions) of a table's rows with an embedding of one model: all at `version`, or of
    `files` only. A row's version is the run that committed it and when (`_versions`; only read for `files`).

    Reads a few small columns and the embeddings, never thumbnails. A row id seen twice (not possible through the
    job's commits) keeps its last row rather than failing every later build.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from index.delta_tables import open_table, pyarrow_dataset, scan, table_schema

    columns = _ROW_COLUMNS[table]
    condition = (pc.field("model_id") == model_id) & pc.field("embedding").is_valid()
    if table == "videos":
        condition = condition & (pc.field("status") == "ok")
    if files is None:
        dt = open_table(location, table, version=version)
        if dt is None:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, object)
        dataset = pyarrow_dataset(location, table, dt)
    else:
        if not files:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, object)
        filesystem, root = location.table_path(table)
        schema = pa.schema([f for f in table_schema(table, 1) if f.name in columns])
        dataset = pads.dataset([f"{root}/{f}" for f in files], schema=schema, format="parquet", filesystem=filesystem)
    versioned = files is not None  # a full build needs no versions (and should not read them for every row)
    wanted = ["row_id", "embedding", *(["run_id", "indexed_at"] if versioned else [])]
    rows = scan(dataset, wanted, condition, where_columns=["model_id", *(["status"] if table == "videos" else [])])
    ids = rows.column("row_id").to_numpy().astype(np.int64)
    stamps = _versions(rows) if versioned else np.zeros(len(ids), object)
    emb = rows.column("embedding").combine_chunks()
    if len(ids) == 0:
        return np.zeros((0, 0), np.float32), ids, stamps
    vectors = emb.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), -1)
    _, last = np.unique(ids[::-1], return_index=True)
    if len(last) != len(ids):
        keep = np.sort(len(ids) - 1 - last)
        vectors, ids, stamps = vectors[keep], ids[keep], stamps[keep]
    return vectors, ids, stamps


def _versions(rows: pa.Table) -> np.ndarray:
    """Each row's version: the run that committed it and when (``run_id|indexed_at`` in microseconds)."""
    import pyarrow.compute as pc

    micros = pc.fill_null(rows.column("indexed_at").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()), 0)
    runs = pc.fill_null(rows.column("run_id"), "")
    return np.asarray(pc.binary_join_element_wise(runs, micros.cast(pa.string()), "|").to_pylist(), dtype=object)


def _removed_rows(
    location: OutputLocation, table: str, model_id: str, files: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, row versions) of the indexed rows (ok rows of the model) in data files that commits removed (on
    storage until vacuumed). Reads five small columns of those files only."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from index.delta_tables import scan

    if not files:
        return np.zeros(0, np.int64), np.zeros(0, object)
    filesystem, root = location.table_path(table)
    condition = pc.field("model_id") == model_id
    if table == "videos":
        condition = condition & (pc.field("status") == "ok")
    # Storage failing after its retries (any other OSError) fails the update as it does on an added file: the
    # index stays at its version and the next update follows the log again, instead of a whole build now.
    try:  # the dataset's discovery already opens the files
        dataset = pads.dataset([f"{root}/{f}" for f in files], format="parquet", filesystem=filesystem)
        where = ["model_id", *(["status"] if table == "videos" else [])]
        rows = scan(dataset, ["row_id", "run_id", "indexed_at"], condition, where_columns=where)
    except FileNotFoundError as exc:
        raise _FullBuild(f"a data file removed since the index's table version is gone (vacuumed): {exc}") from exc
    except pa.ArrowInvalid as exc:  # damaged on storage: which ids it held is unknown, the live files are not
        raise _FullBuild(f"a data file removed since the index's table version is not readable Parquet: {exc}") from exc
    return rows.column("row_id").to_numpy().astype(np.int64), _versions(rows)


def _moved(new_ids: np.ndarray, new_versions: np.ndarray, old_ids: np.ndarray, old_versions: np.ndarray) -> np.ndarray:
    """Which new rows are old rows moved unchanged into a rewritten data file (same id, same version)."""
    old = dict(zip(old_ids.tolist(), old_versions.tolist(), strict=True))
    return np.asarray([old.get(i) == v for i, v in zip(new_ids.tolist(), new_versions.tolist(), strict=True)], bool)


def _net_changes(
    location: OutputLocation, table: str, after: int, upto: int
) -> tuple[list[str], list[str], dict[str, int]]:
    """Data files added and removed between two table versions, from the log's JSON commits only (and, when one
    changed the table's metadata, the metadata at `after`: a change of only other properties or of the protocol
    leaves the rows as they read), and of the added files those another writer than the job added (path -> the
    commit's version): an analyst's compaction, rewrite or append."""
    from index.commits import RUN_ID_KEY
    from index.delta_tables import LogUnavailableError, log_changes, metadata_of, open_table, rows_shape

    try:
        commits = log_changes(location, table, after_version=after, upto_version=upto)
    except LogUnavailableError as exc:
        raise _FullBuild(str(exc)) from exc
    added: dict[str, None] = {}
    removed: dict[str, None] = {}
    foreign: dict[str, int] = {}
    shape = None
    for entry in commits:
        if entry.metadata is not None:
            if shape is None:
                try:
                    before = open_table(location, table, version=after) if after >= 0 else None
                except (OSError, ValueError) as exc:
                    before, reason = None, f": {exc}"
                else:
                    reason = " (its log was cleaned up)"
                if before is None and after >= 0:
                    raise _FullBuild(
                        f"commit {entry.version} of the {table} table changed its metadata, and version {after} "
                        f"cannot be read to compare{reason}"
                    )
                shape = rows_shape(metadata_of(before)) if before is not None else ()
            if rows_shape(entry.metadata) != shape:
                raise _FullBuild(f"commit {entry.version} of the {table} table changed its columns or properties")
            shape = rows_shape(entry.metadata)
        for path in entry.removes:
            if path in added:
                del added[path]  # added and removed within the span: never indexed
                foreign.pop(path, None)
            else:
                removed[path] = None
        for add in entry.adds:
            added[add.path] = None
            if RUN_ID_KEY not in entry.commit_info:
                foreign[add.path] = entry.version
    return list(added), list(removed), foreign


def _follow_log(
    folder: Path,
    name: str,
    location: OutputLocation,
    model_id: str,
    *,
    after: int,
    upto: int,
    entry: dict[str, Any],
    generation: int,
    fetch: Callable[[str], None],
) -> dict[str, Any]:
    """Brings index NAME (its current `entry`) from table version `after` to `upto` by the log.

    The rows of added files become a new exact segment, the ids of removed files' indexed rows become deletions, and
    segments of similar size are merged. Reads only those files, the deletions and the segments merged; never the
    base. Returns the new entry (files written, ``index_info.json`` not).

    Raises:
        _FullBuild: the log or a removed file is gone, the table's metadata changed, or the changes since the base
            outgrew it.
    """
    entry = dict(entry)
    segments = segments_of(entry)
    if not segments:
        raise _FullBuild("the index lists no segments")
    base, deltas = segments[0], segments[1:]
    added_files, removed_files, foreign = _net_changes(location, name, after, upto)
    new_vectors, new_ids, new_stamps = _ok_rows(location, name, model_id, version=upto, files=added_files)
    old_ids, old_stamps = _removed_rows(location, name, model_id, removed_files)
    _refuse_appended_rows(location, name, model_id, upto, foreign, old_ids)
    # A data file rewritten without one video's row brings its other rows back unchanged: they stay where indexed.
    moved = _moved(new_ids, new_stamps, old_ids, old_stamps)
    removed = np.unique(old_ids[~np.isin(old_ids, new_ids[moved])])
    if moved.any():
        new_vectors, new_ids = new_vectors[~moved], new_ids[~moved]
    if entry.get("deleted"):
        fetch(entry["deleted"]["file"])
    deleted = read_deleted(folder, entry)
    if len(removed):
        deleted = np.concatenate([deleted, np.stack([removed, np.full_like(removed, generation)], 1)])
    changes = sum(d.count for d in deltas) + len(new_ids) + len(deleted)
    limit = int(min(max(DELTA_FRACTION * base.count, DELTA_MIN_ROWS), DEFAULT_FLAT_MAX))
    if changes > limit:
        raise _FullBuild(
            f"{changes} rows added or deleted since the base of {base.count} was built (more than {limit}): the base "
            "is rebuilt with them"
        )
    if len(new_ids):
        flat = IndexPlan("flat", "IDMap2,Flat")
        deltas.append(
            write_segment(
                folder, name, generation, VectorIndex(_train_and_add(flat, new_vectors, new_ids), new_ids, None, flat)
            )
        )
    merged = 0
    while len(deltas) >= 2 and (deltas[-2].count <= 2 * deltas[-1].count or len(deltas) > MAX_DELTA_SEGMENTS):
        deltas[-2:] = [_merge(folder, name, deltas[-2:], deleted, generation, fetch)]
        merged += 1
    updated = int(np.isin(new_ids, removed).sum())
    entry.update(
        count=int(entry["count"]) - len(removed) + len(new_ids),
        generation=generation,
        segments=[s.to_dict() for s in [base, *deltas]],
        deleted=(
            {"file": write_deleted(folder, name, generation, deleted), "count": len(deleted)}
            if len(removed)
            else entry.get("deleted")  # no new deletions: the same file
        ),
        incremental={
            "added": len(new_ids) - updated,  # ids new to the index
            "updated": updated,  # ids whose rows were committed again (new versions of their videos)
            "removed": len(removed) - updated,
            "moved": int(moved.sum()),  # unchanged rows of rewritten data files: left as indexed
            "files_read": len(added_files) + len(removed_files),
            "segments_merged": merged,
        },
    )
    entry.pop("rebuild_reason", None)
    return entry


def _refuse_appended_rows(
    location: OutputLocation, name: str, model_id: str, upto: int, foreign: Mapping[str, int], old_ids: np.ndarray
) -> None:
    """Another writer's data files may rewrite rows (a compaction, an analyst's delete or update: their ids come
    from the files it removed) or add rows (an append, copies of rows included): those ids may be indexed already,
    in a segment the update does not read, and would be indexed twice (and counted twice).

    Raises:
        _FullBuild: a row of such a file whose id none of the removed files held.
    """
    if not foreign:
        return
    _, ids, _ = _ok_rows(location, name, model_id, version=upto, files=list(foreign))
    appended = ~np.isin(ids, old_ids)
    if appended.any():
        raise _FullBuild(
            f"{int(appended.sum())} rows were added by another writer than the job (commit {min(foreign.values())} "
            f"of the {name} table): the index is rebuilt, so that no row is indexed twice"
        )


def _merge(
    folder: Path, name: str, parts: list[Segment], deleted: np.ndarray, generation: int, fetch: Callable[[str], None]
) -> Segment:
    """One exact segment holding the live vectors of `parts` (deletions up to `generation` applied)."""
    vectors, ids = [], []
    for seg in parts:
        for file in seg.files(name):
            fetch(file)
        vindex = read_segment(folder, name, seg)
        dead = deleted[deleted[:, 1] > seg.generation, 0] if len(deleted) else deleted[:0, 0]
        live = ~np.isin(vindex.ids, dead)
        vectors.append(vindex.all_vectors()[live])
        ids.append(np.asarray(vindex.ids)[live])
    all_ids = np.concatenate(ids).astype(np.int64)
    flat = IndexPlan("flat", "IDMap2,Flat")
    index = _train_and_add(flat, np.concatenate(vectors).astype(np.float32), all_ids)
    merged = write_segment(folder, name, generation, VectorIndex(index, all_ids, None, flat))
    for seg in parts:
        if seg.generation == generation:  # written by this update, never named by an info: gone at once
            for file in seg.files(name):
                (folder / file).unlink(missing_ok=True)
    return merged


def _full_build_reason(previous: dict[str, Any], model_id: str, *, kind: str, rebuild: bool) -> str:
    """Why every table is built whole this time ("" when the logs may be followed)."""
    if rebuild:
        return "asked for (--rebuild)"
    if kind != "auto":
        return f"index kind {kind!r} asked for"
    if not previous:
        return "no index yet"
    if previous.get("format_version") != INDEX_FORMAT_VERSION:
        return f"index format version {previous.get('format_version')} (this vitaclip writes {INDEX_FORMAT_VERSION})"
    if previous.get("model_id") != model_id:
        return f"the index was built with {previous.get('model_id')}"
    return ""


def _table_entry(
    folder: Path,
    table: str,
    location: Any,
    model_id: str,
    *,
    previous: dict[str, Any],
    reason: str,
    upto: int,
    table_id: str,
    generation: int,
    fetch: Callable[[str], None],
    **build: Any,
) -> dict[str, Any] | None:
    """One table's index entry: its log followed from the previous entry, else built whole (``rebuild_reason``
    says why); None when the table has no rows to index."""
    after = previous.get("table_versions", {}).get(table)
    indexed_id = previous.get("table_ids", {}).get(table)
    if not reason and (after is None or table not in previous.get("indexes", {})):
        reason = f"no {table} index yet"
    if not reason and indexed_id is not None and indexed_id != table_id:
        reason = f"the {table} table was created again (Delta table id {indexed_id} -> {table_id})"
    if not reason and int(after) > upto:
        reason = f"the {table} table is at version {upto}, behind the indexed version {after} (created again?)"
    if not reason:
        try:
            return _follow_log(
                folder,
                table,
                location,
                model_id,
                after=int(after),
                upto=upto,
                entry=previous["indexes"][table],
                generation=generation,
                fetch=fetch,
            )
        except (_FullBuild, IndexUnusableError, FileNotFoundError, RuntimeError) as exc:
            reason = str(exc)
    vectors, ids, _ = _ok_rows(location, table, model_id, version=upto)
    if len(ids) == 0:
        return None
    entry = _build_base(vectors, ids, folder, generation=generation, name=table, **build)
    entry["rebuild_reason"] = reason
    return entry


def _publish(
    output: Store,
    folder: Path,
    info: dict[str, Any],
    previous: dict[str, Any],
    *,
    generation: int,
    fetched: set[str] | None,
    token: str | None,
) -> int | None:
    """Writes ``index_info.json`` after the files it names (uploads them first on object stores, ``fetched``: the
    files downloaded there), only if it is still the one this update started from (`token`; see `Store.put_if`),
    then removes older files that neither the replaced info nor the new one needs, of generations older than this
    update's. Returns how many it removed, or None when another update published first (this one's new files are
    removed again: no info names them)."""
    needed = referenced_files(info)
    new = sorted(needed - referenced_files(previous))
    if fetched is not None:
        for name in sorted(needed - fetched):
            if (folder / name).is_file():  # written by this update; the others are on the store already
                output.put_file(f"{INDEX_DIR}/{name}", folder / name)  # multipart past 64 MiB
    if not output.put_if(f"{INDEX_DIR}/{INFO_FILE}", json.dumps(info, indent=1).encode(), token):  # last: whole
        for name in new:
            output.delete(f"{INDEX_DIR}/{name}")
        return None
    # An update publishing after this one started from this info: what it names is this info's or newer than this
    # generation; updates that lost to this one wrote files of this generation at the oldest. Neither is removed.
    names = [rel.rsplit("/", 1)[-1] for rel in output.list(INDEX_DIR + "/")]
    return remove_unreferenced(
        names, referenced_files(previous) | needed, lambda name: output.delete(f"{INDEX_DIR}/{name}"),
        upto=generation - 1,
    )  # fmt: skip


PUBLISH_ATTEMPTS = 3
"""Updates of one index that another update overtook (it published first) start again from its info this often."""


def build_from_output(
    output: Store,
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
    columns of the whole table, happens when asked (`rebuild`, another `kind`), when there is no index (or its info
    is damaged), or when the log cannot be followed; each index entry's ``rebuild_reason`` then says why.

    Updates running at once (overlapping runs) publish in turn: one that another overtook starts again from the
    other's index (`PUBLISH_ATTEMPTS` times, then leaves the index as the others made it, for the next update).

    Args:
        output: The output's store (`index.stores.Store`).
    """
    from index.tables import as_location

    location = as_location(output)
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        info = _update_once(
            output, location, model_id=model_id, kind=kind, rebuild=rebuild, tune_queries=tune_queries,
            recall_target=recall_target,
        )  # fmt: skip
        if info is not None:
            return info
        log.warning("index: another update published first (attempt %d of %d)", attempt, PUBLISH_ATTEMPTS)
    log.warning("index: left as the updates running at once made it; the next update catches up")
    current = output.get_versioned(f"{INDEX_DIR}/{INFO_FILE}")
    return {**(parse_info(current[0]) if current is not None else {}), "superseded": True}


_SCRATCH_PREFIX = "vitaclip-index-"
_ABANDONED_SCRATCH_SECONDS = 15 * 60


@contextlib.contextmanager
def _scratch_folder() -> Iterator[Path]:
    """A temporary folder for an object store output's index files on their way down and up (a base index of GiB,
    its vectors for re-ranked kinds), named for this process: those of processes that died in an update (kill -9, an
    OOM kill, a node's eviction) go at the next update on the machine, once untouched for 15 minutes."""
    root = Path(tempfile.gettempdir())
    for path in root.glob(f"{_SCRATCH_PREFIX}*"):
        pid = path.name[len(_SCRATCH_PREFIX) :].partition("-")[0]
        try:
            if (
                pid.isdigit()
                and not _running(int(pid))
                and path.stat().st_mtime < time.time() - _ABANDONED_SCRATCH_SECONDS
            ):
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # gone meanwhile
            continue
    with tempfile.TemporaryDirectory(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-") as folder:
        yield Path(folder)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _update_once(
    output: Store, location: OutputLocation, *, model_id: str, kind: str, rebuild: bool, **build: Any
) -> dict[str, Any] | None:
    """One update of every table's index from the info read now; None when another update published first."""
    from index.delta_tables import TABLES
    from index.tables import table_states

    states = table_states(location)
    if states is None:
        raise ValueError(f"{location.url} has no output tables: run the indexing job first")
    versions, table_ids = states
    local = output.local_path(INDEX_DIR)
    with _scratch_folder() as tmp:
        folder = local if local is not None else tmp
        folder.mkdir(parents=True, exist_ok=True)
        fetched: set[str] = set()

        def fetch(name: str) -> None:
            """Object stores: download one index file on first use (streamed: a base can be many GiB)."""
            if local is None and name not in fetched and not (folder / name).exists():
                output.get_file(f"{INDEX_DIR}/{name}", folder / name)
                fetched.add(name)

        read = output.get_versioned(f"{INDEX_DIR}/{INFO_FILE}")
        previous, reason = {}, ""
        if read is not None:
            try:
                previous = parse_info(read[0])
            except IndexUnusableError as exc:
                reason = f"{exc}: built whole"
        reason = reason or _full_build_reason(previous, model_id, kind=kind, rebuild=rebuild)
        generation = last_generation(previous) + 1  # one per update, growing over the index's life
        names = [rel.rsplit("/", 1)[-1] for rel in output.list(INDEX_DIR + "/")]
        if not previous:
            # No usable info (damaged, deleted): number this build past the files an earlier info named, so that
            # publishing it removes them as unreferenced instead of leaving them for good.
            generation = max([generation, *(file_generation(name) + 1 for name in names)])
        elif not reason and (missing := sorted(referenced_files(previous) - set(names))):
            # Deleted or never copied (an edit, a partial restore): following the log would keep naming them.
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            reason = f"index files that {INFO_FILE} names are missing ({shown}): built whole"
        entries: dict[str, Any] = {}
        for table in TABLES:
            entry = _table_entry(
                folder, table, location, model_id, previous=previous, reason=reason, upto=versions[table],
                table_id=table_ids[table], generation=generation, fetch=fetch, kind=kind, **build,
            )  # fmt: skip
            if entry is not None:
                log.info("index %s: %s, %d vectors in %d segments", table, entry["kind"], entry["count"],
                         len(entry["segments"]))  # fmt: skip
                entries[table] = entry
        info: dict[str, Any] = {
            "format_version": INDEX_FORMAT_VERSION,
            "model_id": model_id,
            "indexes": entries,
            "table_versions": versions,
            "table_ids": table_ids,  # a table created again (a new id) is indexed whole, never followed
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        removed = _publish(
            output, folder, info, previous, generation=generation, fetched=None if local is not None else fetched,
            token=None if read is None else read[1],
        )  # fmt: skip
        if removed is None:
            return None
        info["removed_files"] = removed
        return info

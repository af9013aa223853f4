"""FAISS index over committed embeddings: exact inner product on L2-normalised vectors.

``OUT/index/videos.faiss`` (and ``segments.faiss`` when segments exist) map int64 row ids (the tables' ``row_id``)
to vectors; ``OUT/index/index_info.json`` records what was built, from which commit, with which model.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
import pyarrow.compute as pc

from index.tables import TABLES, latest_commit, read_table

INDEX_DIR = "index"
INFO_FILE = "index_info.json"
INDEX_FORMAT_VERSION = 1


class IndexError_(ValueError):
    """An index that cannot be used (missing, another model, unknown version)."""


class WritableStore(Protocol):
    def get_bytes(self, rel_path: str) -> bytes: ...

    def list(self, rel_prefix: str) -> list[str]: ...

    def put_bytes(self, rel_path: str, data: bytes) -> None: ...


def _exact_index(vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    out_dir: str | Path,
    *,
    kind: str = "flat",
    model_id: str,
    name: str = "videos",
) -> dict[str, Any]:
    """Builds an index of ``vectors`` ``[N, E]`` with int64 ``ids`` ``[N]`` into ``out_dir``. Returns its info."""
    if kind not in ("flat", "auto"):
        raise ValueError(f"index kind {kind!r} is not available yet; available: flat")
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"need vectors [N, E] and ids [N], got {vectors.shape} and {np.shape(ids)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = _exact_index(vectors, ids)
    faiss.write_index(index, str(out / f"{name}.faiss"))
    info = {
        "format_version": INDEX_FORMAT_VERSION,
        "model_id": model_id,
        "embed_dim": int(vectors.shape[1]),
        "indexes": {
            name: {"kind": "flat", "factory": "IDMap2,Flat", "metric": "inner_product", "count": int(index.ntotal)}
        },
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return info


def build_from_output(store: WritableStore, *, model_id: str) -> dict[str, Any]:
    """Builds ``OUT/index/`` from the committed ok rows of ``model_id``."""
    state = latest_commit(store)
    info: dict[str, Any] = {
        "format_version": INDEX_FORMAT_VERSION,
        "model_id": model_id,
        "commit_seq": state.seq,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "indexes": {},
    }
    for table in TABLES:
        rows = read_table(store, table, ["row_id", "embedding", "model_id"] + (["status"] if table == "videos" else []))
        if rows is None:
            continue
        mask = pc.equal(rows.column("model_id"), model_id)
        if table == "videos":
            mask = pc.and_(mask, pc.equal(rows.column("status"), "ok"))
        rows = rows.filter(mask)
        if rows.num_rows == 0:
            continue
        emb = rows.column("embedding").combine_chunks()
        dim = emb.type.list_size
        vectors = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
        ids = rows.column("row_id").to_numpy()
        start = time.perf_counter()
        index = _exact_index(vectors, ids)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{table}.faiss"
            faiss.write_index(index, str(path))
            store.put_bytes(f"{INDEX_DIR}/{table}.faiss", path.read_bytes())
        info["embed_dim"] = int(dim)
        info["indexes"][table] = {
            "kind": "flat",
            "factory": "IDMap2,Flat",
            "metric": "inner_product",
            "count": int(index.ntotal),
            "build_seconds": round(time.perf_counter() - start, 4),
        }
    store.put_bytes(f"{INDEX_DIR}/{INFO_FILE}", json.dumps(info, indent=1).encode())
    return info


@dataclass
class OpenIndex:
    """A loaded index: ``search(queries [Q, E], k) -> (scores [Q, k], ids [Q, k])`` (id -1: no result)."""

    index: faiss.Index
    info: dict[str, Any]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.index.d:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.index.d}")
        scores, ids = self.index.search(q, k)
        return scores, ids


def open_index(out_dir: str | Path, *, name: str = "videos", model_id: str | None = None) -> OpenIndex:
    """Opens ``OUT/index`` (or an index folder) read-only; refuses an index built with another model."""
    folder = Path(out_dir)
    if (folder / INDEX_DIR / INFO_FILE).is_file():
        folder = folder / INDEX_DIR
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        raise IndexError_(f"no index at {out_dir} ({INFO_FILE} missing)")
    info = json.loads(info_path.read_text())
    if info.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexError_(f"index format version {info.get('format_version')} is not supported")
    if model_id is not None and info["model_id"] != model_id:
        raise IndexError_(f"index was built with {info['model_id']}, queries use {model_id}: rebuild or use that model")
    if name not in info["indexes"]:
        raise IndexError_(f"index {out_dir} has no {name!r} index; it has {sorted(info['indexes'])}")
    index = faiss.read_index(str(folder / f"{name}.faiss"), faiss.IO_FLAG_READ_ONLY)
    return OpenIndex(index=index, info=info)

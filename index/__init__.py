"""The output and its index: the Delta tables' contract (schemas, writing, commits, reading), the stores they live
in, the FAISS index built from them and the search over it (engine and HTTP service).

``index.build_index(vectors, ids, out_dir, kind="auto", model_id=...)`` builds; ``index.open_index(out_dir)``
opens read-only, and its ``.search(queries, k)`` returns ``(scores, ids)``.
"""

from index.build import build_index
from index.segments import open_index

__all__ = ["build_index", "open_index"]

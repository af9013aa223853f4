"""The output and its index: the Delta tables' contract (schemas, writing, commits, reading), the stores they live
in, the FAISS index built from them and the search over it (engine and HTTP service).

``index.build_index(vectors, ids, out_dir, kind="auto", model_id=...)`` builds; ``index.open_index(out_dir)``
opens read-only, and its ``.search(queries, k)`` returns ``(scores, ids)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vitaclip._lazy import lazy_exports

# Lazily: a decode worker importing `index.s3` would pay for FAISS, delta-rs and pandas otherwise (about 1 s of CPU).
_EXPORTS = {"build_index": "index.build", "open_index": "index.segments"}

__all__ = ["build_index", "open_index"]

if TYPE_CHECKING:
    from index.build import build_index
    from index.segments import open_index


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

"""The output and its index: the Delta tables' contract (schemas, writing, commits, reading), the stores they live
in, the FAISS index built from them and the search over it (engine and HTTP service).

``index.build_index(vectors, ids, out_dir, kind="auto", model_id=...)`` builds; ``index.open_index(out_dir)``
opens read-only, and its ``.search(queries, k)`` returns ``(scores, ids)``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {"build_index": "index.build", "open_index": "index.segments"}

__all__ = ["build_index", "open_index"]

if TYPE_CHECKING:
    from index.build import build_index
    from index.segments import open_index


def __getattr__(name: str) -> Any:
    # Lazily: a decode worker importing `index.s3` pays for FAISS, delta-rs and pandas otherwise (about 1 s of CPU).
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'index' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

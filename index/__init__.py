"""Text-to-video index: table schemas, FAISS build and query, search CLI and HTTP service.

``index.build_index(vectors, ids, out_dir, kind="auto", model_id=...)`` builds; ``index.open_index(out_dir)``
opens read-only, and its ``.search(queries, k)`` returns ``(scores, ids)``.
"""

from index.build import build_index
from index.segments import open_index

__all__ = ["build_index", "open_index"]

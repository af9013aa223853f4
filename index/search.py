"""Text-to-video search over a built index: text encoding, FAISS search, filters, one best result per video.

Works on a local output folder (``OUT`` with ``index/`` and the Delta tables ``videos/`` and ``segments/``); the CLI
copies an S3 output to a local cache first. A segment is found only while its video's current row is ok.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from index.delta_tables import OutputLocation
from index.media import RUNS_DIR, MediaFile, MediaRefused, open_media, recorded_roots
from index.segments import INDEX_DIR, IndexUnusableError, SegmentedIndex, open_index, read_info
from index.tables import data_files, read_table, table_versions

MAX_QUERY_CHARS = 500
MAX_K = 100


@dataclass(frozen=True)
class Hit:
    """One search result (a video, or a moment of one when searching segments)."""

    score: float
    video_id: str
    row_id: int
    uri: str
    start_seconds: float | None
    end_seconds: float | None
    duration_seconds: float | None
    labels: list[str]
    label_scores: list[float]
    segment_index: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "score": round(self.score, 6),
            "video_id": self.video_id,
            "row_id": self.row_id,
            "start_seconds": self.start_seconds,
            "end_seconds": self.end_seconds,
            "duration_seconds": self.duration_seconds,
            "segment_index": self.segment_index,
            "labels": self.labels,
            "label_scores": [round(s, 6) for s in self.label_scores],
        }


class SearchEngine:
    """Loads the index, the row metadata and the text encoder once; answers text queries.

    Args:
        out_dir: local output folder of the indexing job.
        model: model name for text encoding (default: the index's model name).
        checkpoint: that model's weights; its model id must equal the index's.
        device: torch device for the text encoder.
        text_encoder: any callable ``texts -> [Q, E]`` L2-normalised array, instead of a model (tests, services
            that encode elsewhere).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        model: str | None = None,
        checkpoint: str | None = None,
        device: str | None = None,
        text_encoder: Any = None,
    ) -> None:
        self.root = Path(out_dir)
        folder = self.root / INDEX_DIR
        self.info = read_info(folder)
        self.model_id = str(self.info["model_id"])
        self.location = OutputLocation.from_url(str(self.root))
        self.table_versions = table_versions(self.location)
        self.indexes: dict[str, SegmentedIndex] = {
            name: open_index(folder, name=name, model_id=self.model_id) for name in self.info["indexes"]
        }
        self._meta = {name: self._load_meta(name) for name in self.indexes}
        self._thumb_cache: OrderedDict[str, dict[int, bytes]] = OrderedDict()
        self._thumb_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._roots_lock = threading.Lock()
        self._roots: list[str] = []
        self._roots_stamp: int | None = None
        self.encode = text_encoder or self._model_encoder(model, checkpoint, device)

    # ------------------------------------------------------------------ loading

    def _model_encoder(self, model: str | None, checkpoint: str | None, device: str | None) -> Any:
        import torch

        import vitaclip
        from vitaclip.model import model_name_of

        name = model or model_name_of(self.model_id)
        try:
            encoder = vitaclip.create_model(name, checkpoint=checkpoint, device=device)
        except ValueError as exc:
            raise IndexUnusableError(
                f"cannot load the index's model {name!r} to encode queries ({exc}); pass --model and --checkpoint"
            ) from exc
        if encoder.model_id != self.model_id:
            raise IndexUnusableError(
                f"the index was built with {self.model_id} but the query model is {encoder.model_id}: pass the "
                "--checkpoint the index was built with"
            )
        self.text_model = encoder

        def encode(texts: Sequence[str]) -> np.ndarray:
            with self._encode_lock, torch.inference_mode():
                return encoder.encode_text(list(texts)).float().cpu().numpy()

        return encode

    def _load_meta(self, name: str) -> dict[str, Any]:
        cols = ["row_id", "video_id", "uri", "labels", "label_scores", "model_id"]
        cols += (
            ["duration_seconds", "status", "etag", "size_bytes"]
            if name == "videos"
            else ["segment_index", "start_seconds", "end_seconds"]
        )
        table = read_table(self.location, name, cols, model_id=self.model_id)
        if table is None:
            return {"row": {}}
        rows = table.to_pylist()
        meta: dict[str, Any] = {"row": {r["row_id"]: r for r in rows}}
        if name == "videos":
            meta["by_video"] = {r["video_id"]: r for r in rows}
        return meta

    # ------------------------------------------------------------------ queries

    @property
    def has_segments(self) -> bool:
        return "segments" in self.indexes

    def video(self, video_id: str) -> dict[str, Any] | None:
        row = self._meta.get("videos", {}).get("by_video", {}).get(video_id)
        if row is None:
            return None
        return {k: v for k, v in row.items() if k != "model_id"}

    def open_media(self, video_id: str) -> MediaFile:
        """The indexed file of a video, opened and checked (:func:`index.media.open_media`); the caller closes it.

        Raises:
            MediaRefused: no such video, or a file that must not be served (with a safe message and HTTP status).
        """
        row = self._meta.get("videos", {}).get("by_video", {}).get(video_id)
        if row is None:
            raise MediaRefused("not_indexed", "no such video")
        return open_media(row, self._media_roots())

    def _media_roots(self) -> list[str]:
        """Input roots recorded by the runs, re-read when a run has written since the last look."""
        runs = self.root / RUNS_DIR
        try:
            stamp = runs.stat().st_mtime_ns
        except OSError:
            return []
        with self._roots_lock:
            if self._roots_stamp != stamp:
                self._roots = recorded_roots(self.root)
                self._roots_stamp = stamp
            return self._roots

    def search(
        self,
        text: str,
        *,
        k: int = 10,
        segments: bool = False,
        label: str | None = None,
        min_duration: float | None = None,
        per_video: int = 1,
    ) -> list[Hit]:
        """Top ``k`` hits for ``text``; filters are applied while fetching more, so k results come back if they exist.

        Raises:
            ValueError: an empty or over-long query, k out of range, or segments asked of an index without them.
        """
        text = (text or "").strip()
        if not text:
            raise ValueError("the query is empty")
        if len(text) > MAX_QUERY_CHARS:
            raise ValueError(f"the query has {len(text)} characters; at most {MAX_QUERY_CHARS} are allowed")
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        if min_duration is not None and (not np.isfinite(min_duration) or min_duration < 0):
            raise ValueError(f"min_duration must be a number >= 0, got {min_duration}")
        name = "segments" if segments else "videos"
        if name not in self.indexes:
            raise ValueError(
                "this index has no segments: run the job with --segment-seconds"
                if segments
                else "this index has no videos"
            )
        query = np.asarray(self.encode([text]), dtype=np.float32)  # [1, E]
        return self.search_vector(query[0], k=k, name=name, label=label, min_duration=min_duration, per_video=per_video)

    def search_vector(
        self,
        query: np.ndarray,
        *,
        k: int = 10,
        name: str = "videos",
        label: str | None = None,
        min_duration: float | None = None,
        per_video: int = 1,
    ) -> list[Hit]:
        index = self.indexes[name]
        meta = self._meta[name]["row"]
        videos = self._meta.get("videos", {}).get("by_video", {})
        if index.count == 0:
            return []  # every indexed row was removed since
        fetch = min(max(4 * k, 16), index.count)
        while True:
            scores, ids = index.search(query[None], fetch)
            hits: list[Hit] = []
            per: dict[str, int] = {}
            for score, row_id in zip(scores[0], ids[0], strict=True):
                row = meta.get(int(row_id))
                if row_id < 0 or row is None:
                    continue
                video_row = videos.get(row["video_id"], {})
                if name == "segments" and video_row.get("status") != "ok":
                    continue  # stale segments of a video whose re-indexing failed
                duration = video_row.get("duration_seconds", row.get("duration_seconds"))
                if label is not None and label not in (row["labels"] or []):
                    continue
                if min_duration is not None and (duration is None or duration < min_duration):
                    continue
                if per.get(row["video_id"], 0) >= per_video:
                    continue
                per[row["video_id"]] = per.get(row["video_id"], 0) + 1
                seg = name == "segments"
                hits.append(
                    Hit(
                        score=float(score),
                        video_id=row["video_id"],
                        row_id=int(row_id),
                        uri=row["uri"],
                        start_seconds=row["start_seconds"] if seg else 0.0,
                        end_seconds=row["end_seconds"] if seg else duration,
                        duration_seconds=duration,
                        labels=list(row["labels"] or []),
                        label_scores=[float(s) for s in row["label_scores"] or []],
                        segment_index=row["segment_index"] if seg else None,
                    )
                )
                if len(hits) >= k:
                    return hits
            if fetch >= index.count:
                return hits
            fetch = min(fetch * 4, index.count)

    def thumbnail(self, row_id: int) -> bytes | None:
        """The JPEG thumbnail of a video or segment row, read from its Parquet part on first use."""
        with self._thumb_lock:
            for cache in self._thumb_cache.values():
                if row_id in cache:
                    return cache[row_id]
            for table in ("videos", "segments"):
                for name in data_files(self.location, table):
                    rel = f"{table}/{name}"
                    if rel in self._thumb_cache:
                        continue
                    t = pq.read_table(self.root / rel, columns=["row_id", "thumbnail_jpeg"])
                    cache = {
                        int(r): b
                        for r, b in zip(
                            t.column("row_id").to_pylist(), t.column("thumbnail_jpeg").to_pylist(), strict=True
                        )
                        if b
                    }
                    self._thumb_cache[rel] = cache
                    while len(self._thumb_cache) > 64:
                        self._thumb_cache.popitem(last=False)
                    if row_id in cache:
                        return cache[row_id]
        return None

    def stats(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "table_versions": self.table_versions,
            "indexes": {n: {"count": i.count, "kind": i.plan.kind} for n, i in self.indexes.items()},
        }


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start

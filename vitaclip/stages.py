"""Pipeline stages as plain callable classes: expensive setup in ``__init__``, ``__call__(batch) -> batch``.

Batches are dicts of equal-length numpy arrays (Ray Data's ``numpy`` batch format), so each stage runs the same
under Ray Data, in a test, or in a loop. A video that cannot be read or decoded becomes a row with a ``status`` and
an ``error_message``; only bugs raise.

Rows leaving :class:`DecodeStage` are clips: one whole-video clip per input video (``segment_index == -1``) and,
when segments are requested, one clip per segment. Every row carries fixed-shape frames (zeros when not ok) so the
batch stays a dense tensor column, and says which video it belongs to and how many rows that video made:
``decode_id`` (a hash of the object's URI and ETag, the same in every decode of it, so the replay of a retried
task completes what the first attempt delivered) and ``clip_count``. Ray Data cuts a stage's output into blocks by
size, so the clips of a long video may travel in several blocks (and through several embed actors); these two
columns let a consumer tell when it holds all of them (`index.writer.complete_videos`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitaclip.readable import check_readable
from vitaclip.redact import redact_text
from vitaclip.video import (
    DEFAULT_MAX_FRAME_BYTES,
    SamplingSpec,
    Uniform,
    VideoDecodeError,
    VideoDecoder,
    Windows,
    closing_source,
    normalize_frames,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

VideoSource = Any  # a path, bytes, or a seekable binary file object
Opener = Callable[[str, int, "str | None"], VideoSource]  # (uri, size_bytes, listed etag or None) -> source

READ_ERROR = "read_error"
NOT_FOUND = "not_found"
INTERNAL_ERROR = "error"
# Kinds of read failure an opener's exception may name in its ``reason`` (the job's storage errors do).
READ_REASONS = frozenset(
    {"not_found", "not_a_file", "broken_link", "changed", "read_error", "unavailable", "access_denied", "archived"}
    | {"s3_error", "outside_folder"}
)
# Columns a listing may set for entries it already knows are unreadable (e.g. "broken_link"): no read is tried.
LISTING_STATUS, LISTING_ERROR = "listing_status", "listing_error"
THUMBNAIL_SIZE = 160
# The columns of a clip row before decoding fills them in (NaN, -1 and empty mean unknown).
_BASE_ROW: dict[str, Any] = {
    "duration_seconds": np.nan,
    "fps": np.nan,
    "width": -1,
    "height": -1,
    "codec": "",
    "segment_index": -1,
    "start_seconds": 0.0,
    "end_seconds": 0.0,
    "thumbnail_jpeg": b"",
    "decode_seconds": 0.0,
    "decode_id": 0,
    "clip_count": 1,
}
# Also per clip: "pts_seconds", float64 [T], the timestamps of the frames taken (zeros when not ok).


def open_local(uri: str, size_bytes: int, etag: str | None = None) -> VideoSource:
    """The default opener: a local path as it is, once it is known to be a readable regular file.

    Raises:
        FileNotFoundError: no file at the path (removed, or never there).
        UnreadableSource: it cannot be read (permission denied).
        OSError: it is not a regular file (a FIFO would block the decoder) or cannot be inspected.
    """
    st = os.stat(uri)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"not a regular file: {uri}")
    check_readable(uri)
    return uri


def _thumbnail(frame: np.ndarray) -> bytes:
    from PIL import Image

    image = Image.fromarray(frame)
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()


class DecodeStage:
    """Reads and decodes videos: ``uri``, ``etag``, ``size_bytes`` in; one row per clip out.

    Args:
        num_frames: frames per clip (T).
        size: square frame size (the model's input size).
        segment_seconds: also emit one clip per consecutive segment of this length (None: whole videos only).
        timeout_seconds: per-video decode time limit.
        max_frame_bytes: most bytes of frames for one video's clips; a video that needs more (many segments of a
            long video) is a row with status ``too_long``, refused before decoding.
        opener: turns ``(uri, size_bytes, etag)`` into something the decoder reads (a path, bytes, a file object);
            ``etag`` is the listed one (None when unknown), for openers that check the object is still that one.
    """

    def __init__(
        self,
        *,
        num_frames: int,
        size: int,
        segment_seconds: float | None = None,
        timeout_seconds: float = 60.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        opener: Opener | None = None,
    ) -> None:
        if num_frames < 1 or size < 1:
            raise ValueError(f"num_frames and size must be >= 1, got {num_frames} and {size}")
        if segment_seconds is not None and segment_seconds <= 0:
            raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}")
        self.num_frames = num_frames
        self.size = size
        self.segment_seconds = segment_seconds
        self.timeout_seconds = timeout_seconds
        self.max_frame_bytes = max_frame_bytes
        self.opener = opener or open_local
        self.sampling: SamplingSpec = (
            Uniform(num_frames)
            if segment_seconds is None
            else Windows(segment_seconds, num_frames=num_frames, with_whole_video=True)
        )

    def _empty_frames(self) -> np.ndarray:
        return np.zeros((self.num_frames, self.size, self.size, 3), dtype=np.uint8)

    def failed_row(self, status: str, message: str, *, decode_seconds: float = 0.0) -> dict[str, Any]:
        """The one row of a video that could not be read or decoded (messages have credentials masked)."""
        return dict(
            _BASE_ROW,
            status=status,
            error_message=redact_text(message),
            frames=self._empty_frames(),
            pts_seconds=np.zeros(self.num_frames),
            decode_seconds=decode_seconds,
        )

    def _source_or_failed_row(self, uri: str, size_bytes: int, etag: str | None) -> VideoSource | dict[str, Any]:
        """The opener's source for a video, or the failed row of a video that cannot be read."""
        try:
            return self.opener(uri, size_bytes, etag)
        except FileNotFoundError:
            return self.failed_row(NOT_FOUND, "no file at this path (removed, or never there)")
        except Exception as exc:  # per-video boundary: any read failure becomes this video's status
            # Storage errors name their kind (not_found, changed, unavailable, ...): keep it as the status.
            reason = getattr(exc, "reason", None)
            if isinstance(reason, str) and reason in READ_REASONS:
                return self.failed_row(reason, str(exc))
            return self.failed_row(READ_ERROR, f"{type(exc).__name__}: {exc}")

    def decode_one(self, uri: str, size_bytes: int, etag: str | None = None) -> list[dict[str, Any]]:
        """Rows (whole video first, then segments) for one video, or one failed row. ``etag``: the listed one, which
        the opener may check (the job's does: a video changed since it was listed is a ``changed`` row)."""
        start = time.perf_counter()
        source = self._source_or_failed_row(uri, size_bytes, etag)
        if isinstance(source, dict):
            return [source]
        try:
            # One open and one time limit for the whole video: the whole clip and the segments share one scan and
            # decode the frames they share once; the metadata comes from what decoding learned.
            with (
                closing_source(source),
                VideoDecoder(
                    source, timeout_seconds=self.timeout_seconds, max_frame_bytes=self.max_frame_bytes
                ) as video,
            ):
                clip, *segments = video.clips(self.sampling, size=self.size)
                info = video.info
        except VideoDecodeError as exc:  # the status says the reason; the message says the rest
            return [self.failed_row(exc.reason, exc.message, decode_seconds=time.perf_counter() - start)]
        except Exception as exc:  # per-video boundary: record, never crash the job
            # A source read while decoding (S3 ranges) names its failure (changed, unavailable, ...): keep it.
            reason = getattr(exc, "reason", None)
            status, message = (
                (reason, str(exc))
                if isinstance(reason, str) and reason in READ_REASONS
                else (INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            )
            return [self.failed_row(status, message, decode_seconds=time.perf_counter() - start)]
        meta = dict(
            _BASE_ROW,
            duration_seconds=float(info.duration_seconds),
            fps=float(info.fps),
            width=int(info.width),
            height=int(info.height),
            codec=str(info.codec),
            status="ok",
            error_message="",
        )
        rows = [
            dict(
                meta,
                frames=clip.frames,
                pts_seconds=clip.pts_seconds,
                end_seconds=float(clip.end_seconds),
                thumbnail_jpeg=_thumbnail(clip.frames[len(clip.frames) // 2]),
            )
        ]
        for index, seg in enumerate(segments):
            rows.append(
                dict(
                    meta,
                    frames=seg.frames,
                    pts_seconds=seg.pts_seconds,
                    segment_index=index,
                    start_seconds=float(seg.start_seconds),
                    end_seconds=float(seg.end_seconds),
                    thumbnail_jpeg=_thumbnail(seg.frames[len(seg.frames) // 2]),
                )
            )
        rows[0]["decode_seconds"] = time.perf_counter() - start
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _columns([row for rows in self._videos(batch) for row in rows])

    def iter_batches(
        self, batch: dict[str, np.ndarray], *, max_bytes: int = 32 * 2**20
    ) -> Iterator[dict[str, np.ndarray]]:
        """The rows of `__call__` in several batches, each handed on once its frames pass `max_bytes` (a generator UDF
        for Ray Data): a decoder holds one video's clips and at most about `max_bytes` more, never a whole batch of
        long videos twice over (rows, then their stacked column). A long video's rows may span several batches."""
        held: list[dict[str, Any]] = []
        held_bytes = 0
        for rows in self._videos(batch):
            for row in rows:
                held.append(row)
                held_bytes += row["frames"].nbytes
                if held_bytes >= max_bytes:
                    yield _columns(held)
                    held, held_bytes = [], 0
        if held:
            yield _columns(held)

    def _videos(self, batch: dict[str, np.ndarray]) -> Iterator[list[dict[str, Any]]]:
        """Each input video's rows, decoded one video at a time."""
        passthrough = [k for k in batch if k not in ("frames", LISTING_STATUS, LISTING_ERROR)]
        listed = batch.get(LISTING_STATUS)
        etags = batch.get("etag")
        for i in range(len(batch["uri"])):
            if listed is not None and listed[i]:
                rows = [self.failed_row(str(listed[i]), str(batch[LISTING_ERROR][i]))]
            else:
                etag = None if etags is None or not etags[i] else str(etags[i])
                rows = self.decode_one(str(batch["uri"][i]), int(batch["size_bytes"][i]), etag)
            decode_id = decode_id_for(str(batch["uri"][i]), "" if etags is None else str(etags[i]))
            for row in rows:
                row.update(decode_id=decode_id, clip_count=len(rows))
                for key in passthrough:
                    row.setdefault(key, batch[key][i])
            yield rows


def decode_id_for(uri: str, etag: str) -> int:
    """The ``decode_id`` of an object's rows: 63 bits (an int64 column) of a hash of its URI and ETag."""
    digest = hashlib.blake2b(f"{uri}\0{etag}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "frames":
            out[key] = np.stack(values)  # [N, T, S, S, 3] uint8
        elif isinstance(values[0], (bytes, str)):
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[key] = arr
        else:
            out[key] = np.asarray(values)
    return out


@dataclass
class Launched:
    """A batch queued on the stage's device: its input (kept for a float32 recompute), its results' host copies
    (finite flag, features, top-k indices, top-k scores; being copied until `done`), and `done`, a CUDA event."""

    x: torch.Tensor
    host: list[torch.Tensor]
    done: Any


UNUSABLE_MODEL = "the model is unusable (its weights or config overflow in float32)"


class EmbedStage:
    """Embeds clips and labels them: ``frames`` in; ``embedding``, ``label_indices``, ``label_scores`` out.

    The model and the label features are built once. Rows whose ``status`` is not ``ok`` pass through with zero
    embeddings. On CUDA the video tower computes in float16 under autocast over float32 weights (``mixed``, the
    default), with label features and normalisation in float32, which keeps the float32 answers: vitaclip-demo on
    100 demo-world videos, top-1 label the same for 100% and cosine >= 0.99999 (bf16 weights: 98%, 0.999;
    benchmarks/RESULTS.md). A batch whose half-precision output overflows is recomputed in float32.

    Args:
        model: registered model name or JSON config.
        checkpoint: checkpoint path (None: the model's random init, for smoke runs).
        label_names: labels to score (None: the model's label set).
        top_k: labels kept per clip.
        device: torch device (None: cuda when available).
        batch_size: clips per forward pass.
        dtype: the video tower's compute dtype (None: float16 on CUDA, float32 elsewhere; half precision runs on CPUs
            too, for tests).
        mixed: with a bf16 or fp16 `dtype`, float32 weights under autocast, label features and normalisation in
            float32 (False: weights and everything else in `dtype`).
        torch_compile: run the video tower through `torch.compile` (the job decides per run: large runs on GPUs).
            It fuses the normalisations, activations and casts around the matrix products: vitaclip-b16 on an H200,
            this stage at batch 128 under float16 autocast, 699 -> 1,118 videos/s (benchmarks/RESULTS.md). The first
            forward pass compiles (about 35 s there); a partial batch is padded to `batch_size`, so nothing compiles
            again. If compiling fails (no compiler, no Triton), the stage warns and stays in eager mode.
    """

    def __init__(
        self,
        *,
        model: str,
        checkpoint: str | None = None,
        label_names: Sequence[str] | None = None,
        top_k: int = 5,
        device: str | None = None,
        batch_size: int = 32,
        dtype: torch.dtype | None = None,
        mixed: bool = True,
        torch_compile: bool = False,
    ) -> None:
        import torch

        import vitaclip

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        # Mixed: float32 weights, the video tower under `dtype` autocast (matrix products in half precision; norms,
        # softmax and the residual stream in float32), label features in float32. float16 is the CUDA default: its
        # 11-bit mantissa keeps the float32 labels where bf16's 8 bits flip near-ties, at the same tensor-core rate
        # on the GPUs the job targets (benchmarks/bf16_agreement.py).
        self.autocast = dtype if mixed and dtype in (torch.bfloat16, torch.float16) else None
        load_dtype = torch.float32 if self.autocast is not None else dtype
        self.model = vitaclip.create_model(model, checkpoint=checkpoint, device=self.device, dtype=load_dtype)
        names = list(label_names) if label_names is not None else list(self.model.label_names or ())
        if not names:
            raise ValueError(f"model {model!r} has no label set: give label names")
        self.label_names = names
        self.top_k = min(top_k, len(names))
        self.batch_size = batch_size
        with torch.inference_mode():
            self.label_features = self.model.encode_labels(names).float()  # [K, E]
            self.scale = float(self.model.logit_scale.float().exp())
        if not bool(torch.isfinite(self.label_features).all()) or not math.isfinite(self.scale):
            raise ValueError(f"{UNUSABLE_MODEL}: its label features or logit scale are not finite")
        self.staging: list[torch.Tensor] | None = None  # page-locked upload buffers (CUDA)
        self.compiled: Callable[..., Any] | None = None
        self.compiled_once = False
        if torch_compile:  # not by default: one file to label, or a small run, would wait for the compiler
            self.compiled = torch.compile(self.model.encode_video)  # compiles on its first call

    def _encode(self, x: Any) -> Any:
        """Video features ``[B, E]`` (unnormalised), compiled where the stage compiles; the first compiled call's
        failure leaves the stage in eager mode, with a warning."""
        if self.compiled is not None:
            try:
                features = self.compiled(x, normalize=False)
            except Exception as exc:
                if self.compiled_once:
                    raise
                log.warning("torch.compile of the video encoder failed, running it eagerly: %s", str(exc)[:500])
                self.compiled = None
            else:
                self.compiled_once = True
                return features
        return self.model.encode_video(x, normalize=False)

    @property
    def model_id(self) -> str:
        return self.model.model_id

    def _upload(self, frames: np.ndarray, idx: np.ndarray, slot: int) -> torch.Tensor:
        """The rows `idx` of `frames` on the stage's device, uint8 ``[B, T, S, S, 3]``; padded to the batch size when
        the model is compiled (one compiled shape: a second batch size would compile again). On CUDA the rows are
        gathered into one of two page-locked buffers and copied asynchronously (a pageable copy blocks the host,
        and gathering with a fancy index copies once more); the caller reuses a buffer only after the batch that
        used it is finished."""
        import torch

        pad = self.compiled is not None
        if self.device.type != "cuda":
            rows = frames[idx]
            if pad and len(idx) < self.batch_size:
                rows = np.concatenate([rows, np.zeros((self.batch_size - len(idx), *rows.shape[1:]), rows.dtype)])
            return torch.from_numpy(rows)
        shape = (self.batch_size, *frames.shape[1:])
        if self.staging is None or tuple(self.staging[0].shape) != shape:
            self.staging = [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        buffer = self.staging[slot]
        target = buffer[: len(idx)].numpy()
        if len(idx) and idx[-1] - idx[0] == len(idx) - 1:  # contiguous rows: one copy, no fancy index
            np.copyto(target, frames[idx[0] : idx[-1] + 1])
        else:
            np.take(frames, idx, axis=0, out=target)
        return (buffer if pad else buffer[: len(idx)]).to(self.device, non_blocking=True)

    def _launch(self, x: torch.Tensor, rows: int) -> Launched:
        """Queues a batch's forward pass and the copies of its first `rows` results (the rest is padding) to the
        host, without waiting for the device."""
        import torch
        import torch.nn.functional as F

        from vitaclip.zeroshot import top_k_scores

        x = normalize_frames(x, self.model.config.mean, self.model.config.std).to(self.model.dtype)  # [B, T, 3, S, S]
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            raw = self._encode(x)[:rows]  # [B, E]
        # Normalised in float32: in bf16 the stored vectors' lengths were off by up to 0.4%.
        feats = F.normalize(raw.float(), dim=-1)
        top_p, top_i = top_k_scores(feats, self.label_features, k=self.top_k, logit_scale=self.scale)
        cuda = self.device.type == "cuda"
        host = [t.to("cpu", non_blocking=cuda) for t in (torch.isfinite(raw).all(), feats, top_i, top_p)]
        done = torch.cuda.Event() if cuda else None
        if done is not None:
            done.record()
        return Launched(x[:rows], host, done)

    def _finish(self, launched: Launched) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Waits for a launched batch (only for it): its (embeddings, top-k indices, top-k scores). A batch whose
        half-precision output overflowed is recomputed in float32."""
        import torch

        from vitaclip.zeroshot import top_k_scores

        if launched.done is not None:
            launched.done.synchronize()
        finite, feats, top_i, top_p = launched.host
        if not bool(finite):
            if self.autocast is not None:  # half precision overflowed: float32
                raw = self.model.encode_video(launched.x, normalize=False).float()
                feats = torch.nn.functional.normalize(raw, dim=-1)
                top_p, top_i = top_k_scores(feats, self.label_features, k=self.top_k, logit_scale=self.scale)
            if self.autocast is None or not bool(torch.isfinite(raw).all()):
                # Pixels are finite whatever the video: weights or a config (mean, std) that overflow in float32.
                # Refused, never rows of NaN marked ok.
                raise ValueError(f"{UNUSABLE_MODEL}: its video embeddings are not finite (NaN or infinity)")
        return feats.cpu().numpy(), top_i.cpu().numpy(), top_p.cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames = batch["frames"]
        n = len(frames)
        ok = np.asarray([s == "ok" for s in batch["status"]], dtype=bool)
        embedding = np.zeros((n, self.model.embed_dim), dtype=np.float32)
        label_indices = np.full((n, self.top_k), -1, dtype=np.int32)
        label_scores = np.zeros((n, self.top_k), dtype=np.float32)
        rows = np.flatnonzero(ok)
        import torch

        def store(idx: np.ndarray, launched: Launched) -> None:
            embedding[idx], label_indices[idx], label_scores[idx] = self._finish(launched)

        # Batch j is gathered and queued while the device still computes batch j-1, whose results are read next:
        # the host's gathering and copying overlap the forward passes instead of adding to them.
        with torch.inference_mode():
            pending: tuple[np.ndarray, Launched] | None = None
            for j, start in enumerate(range(0, len(rows), self.batch_size)):
                idx = rows[start : start + self.batch_size]
                launched = (idx, self._launch(self._upload(frames, idx, j % 2), len(idx)))
                if pending is not None:
                    store(*pending)
                pending = launched
            if pending is not None:
                store(*pending)
        out = {k: v for k, v in batch.items() if k != "frames"}
        out.update(embedding=embedding, label_indices=label_indices, label_scores=label_scores)
        return out


def label_files(
    paths: Sequence[str],
    *,
    model: str,
    checkpoint: str | None = None,
    label_names: Sequence[str] | None = None,
    top_k: int = 5,
    num_frames: int | None = None,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Zero-shot labels for local video files, as the job makes them: `DecodeStage` then `EmbedStage`, one file at
    a time (the model loads once).

    Returns:
        Per file: ``uri``, ``status`` and, when ok, ``labels`` and ``label_scores`` (best first), ``pts_seconds``
        of the frames used, ``seconds`` spent and ``model_id``; otherwise ``error_message``.
    """
    embed = EmbedStage(model=model, checkpoint=checkpoint, label_names=label_names, top_k=top_k, device=device)
    decode = DecodeStage(num_frames=num_frames or embed.model.config.num_frames, size=embed.model.image_size)
    results: list[dict[str, Any]] = []
    for path in paths:
        start = time.perf_counter()
        row = embed(decode({"uri": np.asarray([path], dtype=object), "size_bytes": np.asarray([-1])}))
        if row["status"][0] != "ok":
            results.append({"uri": path, "status": str(row["status"][0]), "error_message": row["error_message"][0]})
            continue
        picked = [(int(j), float(p)) for j, p in zip(row["label_indices"][0], row["label_scores"][0], strict=True)]
        results.append(
            {
                "uri": path,
                "status": "ok",
                "labels": [embed.label_names[j] for j, _ in picked if j >= 0],
                "label_scores": [round(p, 6) for j, p in picked if j >= 0],
                "pts_seconds": [round(float(t), 4) for t in row["pts_seconds"][0]],
                "seconds": round(time.perf_counter() - start, 4),
                "model_id": embed.model_id,
            }
        )
    return results

"""Evaluation inference: decoding the views of a video (temporal x spatial), and a model's logits and
embeddings over many videos, decoded on a thread pool or by another source (Ray Data decoders).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from vitaclip.evaluation.metrics import average_view_probabilities, classification_metrics
from vitaclip.model import VitaClip
from vitaclip.video.transforms import normalize_frames


def spatial_crops(frames: np.ndarray, size: int, num_views: int) -> list[np.ndarray]:
    """``num_views`` square crops of side ``size`` from ``[T, H, W, 3]`` frames whose shorter side is ``size``.

    One view is the centre. Several are spread evenly along the longer side, from one end to the other (three: start,
    middle, end, as the official evaluation takes them); a square picture gives the same crop each time.
    """
    height, width = frames.shape[1:3]
    if min(height, width) != size:
        raise ValueError(f"frames must have their shorter side equal to {size}, got {height}x{width}")
    margin = max(height, width) - size
    offsets = [margin // 2] if num_views == 1 else [margin * i // (num_views - 1) for i in range(num_views)]
    if height > width:
        return [frames[:, o : o + size, :] for o in offsets]
    return [frames[:, :, o : o + size] for o in offsets]


def decode_views(
    source: Any,
    *,
    num_frames: int,
    size: int,
    sampling: Literal["dense", "uniform"] = "dense",
    stride: int = 16,
    temporal_views: int = 3,
    spatial_views: int = 1,
    timeout_seconds: float = 60.0,
) -> np.ndarray:
    """uint8 ``[temporal_views * spatial_views, T, size, size, 3]`` clips of one video (temporal-major).

    One spatial view is the decoder's centre crop. Several are decoded with the shorter side ``size`` and cropped
    along the longer side (``spatial_crops``), as the official multi-view evaluation does.
    """
    from vitaclip.video import decode_clips, sampling_spec

    if sampling == "uniform" and temporal_views != 1:
        raise ValueError("several temporal views need sampling='dense'")
    clips = decode_clips(
        source,
        sampling_spec(sampling, num_frames=num_frames, stride=stride, num_views=temporal_views),
        size=size,
        crop="center" if spatial_views == 1 else "none",
        timeout_seconds=timeout_seconds,
    )
    views = [crop for clip in clips for crop in spatial_crops(clip.frames, size, spatial_views)]
    return np.stack(views)  # [V, T, S, S, 3]


@dataclass(frozen=True)
class ViewSpec:
    """How evaluation samples a video."""

    num_frames: int
    size: int
    sampling: Literal["dense", "uniform"] = "dense"
    stride: int = 16
    temporal_views: int = 3
    spatial_views: int = 1
    timeout_seconds: float = 60.0

    @property
    def num_views(self) -> int:
        return self.temporal_views * self.spatial_views


def parse_views(text: str) -> tuple[int, int]:
    """``"3x1"`` -> (3 temporal, 1 spatial)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"views must look like 3x1 (temporal x spatial), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def decode_views_safely(
    uri: str, spec: ViewSpec, *, opener: Callable[[str], Any] | None = None
) -> tuple[np.ndarray | None, str]:
    """(views ``[V, T, S, S, 3]``, '') or (None, error message): the per-video boundary of evaluation."""
    return _decode_one(uri, spec, opener)


def _decode_all(
    uris: Sequence[str], spec: ViewSpec, *, opener: Callable[[str], Any] | None, threads: int
) -> Iterable[tuple[int, np.ndarray | None, str]]:
    def one(uri: str) -> tuple[np.ndarray | None, str]:
        return _decode_one(uri, spec, opener)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for i, (views, error) in enumerate(pool.map(one, uris)):
            yield i, views, error


def _decode_one(uri: str, spec: ViewSpec, opener: Callable[[str], Any] | None) -> tuple[np.ndarray | None, str]:
    from vitaclip.video import decode_or_error

    def views(source: Any) -> np.ndarray:
        return decode_views(
            source,
            num_frames=spec.num_frames,
            size=spec.size,
            sampling=spec.sampling,
            stride=spec.stride,
            temporal_views=spec.temporal_views,
            spatial_views=spec.spatial_views,
            timeout_seconds=spec.timeout_seconds,
        )

    return decode_or_error(uri, views, opener=opener)  # a failure is recorded and counted as a miss


@torch.inference_mode()
def video_logits(
    model: VitaClip,
    uris: Sequence[str],
    label_features: torch.Tensor,
    spec: ViewSpec,
    *,
    opener: Callable[[str], Any] | None = None,
    batch_size: int = 8,
    threads: int = 4,
    progress: Callable[[int], None] | None = None,
    decoded: Iterable[tuple[int, np.ndarray | None, str]] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Logits ``[N, V, K]`` of every view of every video, and the decode error of each video ('' when it decoded).

    A video that cannot be decoded gets all-zero logits (a uniform softmax: it counts as a miss, not a crash).
    ``decoded`` replaces the local thread-pool decoding with another source of ``(index, views, error)`` (the
    evaluation job's Ray Data decoders), in any order.
    """
    device = model.device
    mean, std = model.config.mean, model.config.std
    num_views = spec.num_views
    out = np.zeros((len(uris), num_views, label_features.shape[0]), dtype=np.float32)
    errors = [""] * len(uris)
    pending: list[tuple[int, np.ndarray]] = []
    scale = model.logit_scale.exp().float()

    def flush() -> None:
        if not pending:
            return
        clips = torch.from_numpy(np.concatenate([v for _, v in pending]))  # [b*V, T, S, S, 3]
        x = normalize_frames(clips.to(device), mean, std).to(model.dtype)  # [b*V, T, 3, S, S]
        feats = model.encode_video(x).float()  # [b*V, E]
        logits = scale * feats @ label_features.float().t()  # [b*V, K]
        per_video = logits.view(len(pending), num_views, -1).cpu().numpy()  # [b, V, K]
        for j, (i, _) in enumerate(pending):
            out[i] = per_video[j]
        if progress is not None:
            progress(len(pending))
        pending.clear()

    source = decoded if decoded is not None else _decode_all(uris, spec, opener=opener, threads=threads)
    for i, views, error in source:
        if views is None:
            errors[i] = error
            if progress is not None:
                progress(1)
            continue
        pending.append((i, views))
        if len(pending) >= batch_size:
            flush()
    flush()
    return out, errors


@torch.inference_mode()
def video_embeddings(
    model: VitaClip,
    uris: Sequence[str],
    spec: ViewSpec,
    *,
    opener: Callable[[str], Any] | None = None,
    batch_size: int = 8,
    threads: int = 4,
    decoded: Iterable[tuple[int, np.ndarray | None, str]] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """L2-normalised video embeddings ``[N, E]`` (mean over views, renormalised) and decode errors."""
    device = model.device
    out = torch.zeros(len(uris), model.embed_dim)
    errors = [""] * len(uris)
    source = decoded if decoded is not None else _decode_all(uris, spec, opener=opener, threads=threads)
    for i, views, error in source:
        if views is None:
            errors[i] = error
            continue
        x = normalize_frames(torch.from_numpy(views).to(device), model.config.mean, model.config.std)
        x = x.to(model.dtype)  # [V, T, 3, S, S]
        feats = torch.cat([model.encode_video(x[j : j + batch_size]) for j in range(0, len(x), batch_size)])
        out[i] = torch.nn.functional.normalize(feats.float().mean(dim=0), dim=-1).cpu()
    return out, errors


def evaluate_classification(
    model: VitaClip,
    entries: Sequence[tuple[str, int]],
    label_names: Sequence[str],
    spec: ViewSpec,
    *,
    opener: Callable[[str], Any] | None = None,
    batch_size: int = 8,
    threads: int = 4,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Top-1/top-5 (percent) of ``entries`` (``(uri, label index)``) over ``label_names``, views softmax-averaged.

    Returns:
        (metrics, probabilities ``[N, K]``); metrics also count ``decode_errors``.
    """
    with torch.inference_mode():
        label_features = model.encode_labels(list(label_names))  # [K, E]
    logits, errors = video_logits(
        model,
        [u for u, _ in entries],
        label_features,
        spec,
        opener=opener,
        batch_size=batch_size,
        threads=threads,
        progress=progress,
    )
    probs = average_view_probabilities(logits)
    metrics = classification_metrics(probs, [y for _, y in entries], label_names)
    metrics["decode_errors"] = sum(1 for e in errors if e)
    metrics["views"] = f"{spec.temporal_views}x{spec.spatial_views}"
    return metrics, probs


def frame_averaging_baseline(model: VitaClip) -> VitaClip:
    """The all-prompts-off model on the same frozen backbone: plain CLIP frame averaging with CLIP's own text prompts
    and CLIP's own ``logit_scale`` (the baseline a Vita-CLIP report compares with)."""
    config = model.config.replace(
        name=f"{model.config.name}-frames-baseline",
        temporal_embedding=False,
        num_global_prompts=0,
        num_local_prompts=0,
        summary_token=False,
        text_context=None,
    )
    baseline = VitaClip(config, label_names=model.label_names)
    baseline.clip.load_state_dict(model.clip.state_dict())
    with torch.no_grad():
        baseline.logit_scale.copy_(model.clip.logit_scale)
    baseline.to(device=model.device, dtype=model.dtype)
    return baseline.eval()

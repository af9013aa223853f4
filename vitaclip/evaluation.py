"""Evaluation protocols of Vita-CLIP and its peers: classification with several views, zero-shot splits, retrieval.

Metrics are percentages (0-100), as the paper reports them.

Classification: each video is decoded as ``temporal_views x spatial_views`` clips (the official default is 3 x 1:
three dense clips spread over the video, one centre crop); the softmax over the label logits is averaged over views.

Zero-shot protocols (the user brings the videos and the split files):
    HMDB51 and UCF101: the test list of each of the three official splits is scored against all 51 / 101 classes
    (packaged as the label sets ``hmdb51`` and ``ucf101``); the result is the mean and standard deviation over the
    three splits.
    Kinetics-600: the 220 classes of Kinetics-600 that are not in Kinetics-400 are split into three random subsets
    of 160 classes (seeded); the videos of each subset are scored against that subset's 160 names; mean and
    standard deviation over the three. No Kinetics-600 class list ships with vitaclip: pass the official one.

Retrieval (MSR-VTT style): recall@1/5/10, median and mean rank, text-to-video and video-to-text.

Reference numbers from the paper for the released Vita-CLIP-B (8 frames): Kinetics-400 supervised top-1 81.8;
zero-shot HMDB51 48.6 +/- 0.6, UCF101 75.0 +/- 0.6, Kinetics-600 67.4 +/- 0.5.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vitaclip.labels import load_label_set
from vitaclip.model import VitaClip
from vitaclip.video.transforms import normalize_frames

PAPER_REFERENCE = {
    "kinetics400_top1": 81.8,
    "hmdb51_zero_shot": (48.6, 0.6),
    "ucf101_zero_shot": (75.0, 0.6),
    "kinetics600_zero_shot": (67.4, 0.5),
}
PACKAGED_CLASS_LISTS = {"hmdb51": "hmdb51.txt", "ucf101": "ucf101.txt", "kinetics400": "kinetics400.txt"}
K600_NOVEL_CLASSES = 220
K600_SUBSET_SIZE = 160
CONFUSION_MAX_CLASSES = 60

# ------------------------------------------------------------------------------------------------ class lists


def load_class_list(name_or_path: str) -> tuple[str, ...]:
    """A packaged class list (``hmdb51``, ``ucf101``, ``kinetics400``) or a file with one name per line."""
    return load_label_set(name_or_path)


def normalize_class_name(name: str) -> str:
    """A comparable form of a class name: lower case, ``_`` as space, no quotes or brackets, single spaces."""
    text = name.lower().replace("_", " ")
    text = re.sub(r"[\"'()\[\]]", "", text)
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------ zero-shot splits


def kinetics600_novel_classes(
    k600_names: Sequence[str], k400_names: Sequence[str], *, expected: int | None = K600_NOVEL_CLASSES
) -> list[str]:
    """The Kinetics-600 classes not in Kinetics-400, in Kinetics-600 order (names compared normalised).

    Raises:
        ValueError: ``expected`` is set and the count differs (a class list that is not the official one).
    """
    known = {normalize_class_name(n) for n in k400_names}
    novel = [n for n in k600_names if normalize_class_name(n) not in known]
    if expected is not None and len(novel) != expected:
        raise ValueError(
            f"found {len(novel)} Kinetics-600 classes outside Kinetics-400, the protocol has {expected}: "
            "check the class lists (the official Kinetics-600 and Kinetics-400 names)"
        )
    return novel


def kinetics600_subsets(
    novel_classes: Sequence[str], *, seed: int = 0, num_subsets: int = 3, subset_size: int = K600_SUBSET_SIZE
) -> list[list[str]]:
    """``num_subsets`` random subsets of ``subset_size`` novel classes; subset ``i`` is drawn with seed ``seed + i``.

    Each subset keeps the classes' original order, so its label indices are stable.
    """
    if subset_size > len(novel_classes):
        raise ValueError(f"subset_size {subset_size} exceeds the {len(novel_classes)} novel classes")
    out = []
    for i in range(num_subsets):
        chosen = set(random.Random(seed + i).sample(range(len(novel_classes)), subset_size))
        out.append([novel_classes[j] for j in sorted(chosen)])
    return out


def read_hmdb51_split(
    split_folder: str | Path, split: int, *, class_names: Sequence[str] | None = None
) -> list[tuple[str, int]]:
    """Test videos of an official HMDB51 split: ``<class>_test_split<k>.txt`` files, lines ``video.avi 2`` (2 = test).

    Returns:
        ``[(relative path "<class>/<video>", label index)]`` with labels in ``class_names`` order (default: the
        packaged ``hmdb51`` list).
    """
    if split not in (1, 2, 3):
        raise ValueError(f"HMDB51 has splits 1, 2 and 3, got {split}")
    names = list(class_names or load_class_list("hmdb51"))
    folder = Path(split_folder)
    out = []
    for label, name in enumerate(names):
        path = folder / f"{name}_test_split{split}.txt"
        if not path.is_file():
            raise ValueError(f"missing HMDB51 split file {path}")
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == "2":
                out.append((f"{name}/{parts[0]}", label))
    return out


def read_ucf101_split(testlist: str | Path, *, class_names: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """Test videos of an official UCF101 split (``testlist0<k>.txt``, lines ``Class/v_Class_gXX_cYY.avi``)."""
    names = list(class_names or load_class_list("ucf101"))
    index = {n.lower(): i for i, n in enumerate(names)}
    out = []
    for line in Path(testlist).read_text().splitlines():
        rel = line.strip().split()[0] if line.strip() else ""
        if not rel:
            continue
        cls = rel.split("/", 1)[0].lower()
        if cls not in index:
            raise ValueError(f"{testlist}: class {cls!r} of {rel!r} is not a UCF101 class")
        out.append((rel, index[cls]))
    return out


def restrict_to_classes(
    entries: Sequence[tuple[str, int]], all_names: Sequence[str], subset: Sequence[str]
) -> list[tuple[str, int]]:
    """The entries whose class is in ``subset``, relabelled to indices into ``subset``."""
    position = {normalize_class_name(n): i for i, n in enumerate(subset)}
    out = []
    for uri, label in entries:
        j = position.get(normalize_class_name(all_names[label]))
        if j is not None:
            out.append((uri, j))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (as the zero-shot papers report over splits)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


# ------------------------------------------------------------------------------------------------ metrics


def average_view_probabilities(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Softmax over labels of each view, averaged over views: ``[N, V, K]`` logits -> ``[N, K]`` probabilities."""
    t = torch.as_tensor(logits, dtype=torch.float64)
    if t.ndim != 3:
        raise ValueError(f"logits must be [N, V, K], got shape {tuple(t.shape)}")
    return t.softmax(dim=-1).mean(dim=1).numpy()


def classification_metrics(
    probs: np.ndarray, labels: Sequence[int] | np.ndarray, label_names: Sequence[str]
) -> dict[str, Any]:
    """Top-1, top-5, per-class accuracy and mean class accuracy (percent) of scores ``[N, K]``."""
    probs = np.asarray(probs)
    y = np.asarray(labels, dtype=np.int64)
    n, k = probs.shape
    if y.shape != (n,):
        raise ValueError(f"labels must be [{n}], got {y.shape}")
    order = np.argsort(-probs, axis=1, kind="stable")
    top1 = order[:, 0] == y
    top5 = (order[:, : min(5, k)] == y[:, None]).any(axis=1)
    per_class: dict[str, float | None] = {}
    for c, name in enumerate(label_names):
        mask = y == c
        per_class[name] = float(100.0 * top1[mask].mean()) if mask.any() else None
    seen = [v for v in per_class.values() if v is not None]
    return {
        "top1": float(100.0 * top1.mean()) if n else 0.0,
        "top5": float(100.0 * top5.mean()) if n else 0.0,
        "mean_class_accuracy": float(np.mean(seen)) if seen else 0.0,
        "num_videos": int(n),
        "num_classes": int(k),
        "per_class": per_class,
    }


def confusion_matrix(
    predictions: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, num_classes: int
) -> np.ndarray:
    """``[K, K]`` counts, rows the true class, columns the prediction."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return m


def _ranks(sim: np.ndarray, targets: Sequence[Sequence[int]]) -> np.ndarray:
    """1-based rank, per query row, of the best-ranked of its target columns."""
    out = np.empty(sim.shape[0], dtype=np.int64)
    for i, cols in enumerate(targets):
        best = max(sim[i, c] for c in cols)
        # Ties count against the query: a target tied with others ranks after all of them.
        out[i] = (
            int((sim[i] > best).sum()) + int((sim[i] == best).sum()) - int(sum(sim[i, c] == best for c in cols)) + 1
        )
    return out


def _rank_summary(ranks: np.ndarray) -> dict[str, float]:
    return {
        "r1": float(100.0 * (ranks <= 1).mean()),
        "r5": float(100.0 * (ranks <= 5).mean()),
        "r10": float(100.0 * (ranks <= 10).mean()),
        "median_rank": float(np.median(ranks)),
        "mean_rank": float(ranks.mean()),
    }


def retrieval_metrics(
    similarity: np.ndarray | torch.Tensor, caption_video: Sequence[int] | np.ndarray
) -> dict[str, Any]:
    """Text-to-video and video-to-text retrieval metrics.

    Args:
        similarity: ``[num_captions, num_videos]`` scores (cosine similarities).
        caption_video: ``[num_captions]``: the video each caption describes. A video may have several captions.

    Returns:
        ``{"text_to_video": {...}, "video_to_text": {...}, "num_captions", "num_videos"}``; each direction has
        ``r1``, ``r5``, ``r10`` (percent), ``median_rank`` and ``mean_rank`` (1-based). Text-to-video ranks the
        caption's video among all videos; video-to-text ranks the best of the video's captions among all captions.
    """
    sim = np.asarray(torch.as_tensor(similarity, dtype=torch.float64))
    owner = np.asarray(caption_video, dtype=np.int64)
    nt, nv = sim.shape
    if owner.shape != (nt,):
        raise ValueError(f"caption_video must be [{nt}], got {owner.shape}")
    t2v = _ranks(sim, [[int(v)] for v in owner])
    captions_of = [np.flatnonzero(owner == v).tolist() for v in range(nv)]
    videos = [v for v in range(nv) if captions_of[v]]
    v2t = _ranks(sim.T[videos], [captions_of[v] for v in videos])
    return {
        "text_to_video": _rank_summary(t2v),
        "video_to_text": _rank_summary(v2t),
        "num_captions": int(nt),
        "num_videos": int(nv),
    }


# ------------------------------------------------------------------------------------------------ decoding views


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
    try:
        source = opener(uri) if opener is not None else uri
        try:
            return (
                decode_views(
                    source,
                    num_frames=spec.num_frames,
                    size=spec.size,
                    sampling=spec.sampling,
                    stride=spec.stride,
                    temporal_views=spec.temporal_views,
                    spatial_views=spec.spatial_views,
                    timeout_seconds=spec.timeout_seconds,
                ),
                "",
            )
        finally:
            close = getattr(source, "close", None)
            if callable(close):
                close()
    except Exception as exc:  # per-video boundary: recorded, counted as a miss
        return None, f"{type(exc).__name__}: {exc}"


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


# ------------------------------------------------------------------------------------------------ pictures


def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def save_confusion_png(matrix: np.ndarray, label_names: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """A row-normalised confusion matrix as a PNG heat map (for label sets up to 60 classes)."""
    from PIL import Image, ImageDraw

    k = matrix.shape[0]
    if k > CONFUSION_MAX_CLASSES:
        raise ValueError(f"confusion PNGs are drawn for up to {CONFUSION_MAX_CLASSES} classes, got {k}")
    cell = max(12, min(40, 600 // max(k, 1)))
    margin = 8 + 6 * max((len(n) for n in label_names), default=4)
    margin = min(margin, 220)
    width = margin + k * cell + 20
    height = 30 + margin + k * cell + 10
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    draw.text((10, 8), title or "confusion (rows: true class, columns: predicted)", fill="black", font=font)
    rows = matrix.sum(axis=1, keepdims=True).clip(min=1)
    norm = matrix / rows
    top = 30 + margin
    for i in range(k):
        draw.text((4, top + i * cell + cell // 2 - 5), str(label_names[i])[:36], fill="black", font=font)
        for j in range(k):
            v = float(norm[i, j])
            shade = (int(255 * (1 - v)), int(255 * (1 - 0.6 * v)), 255)
            x0, y0 = margin + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=shade, outline=(220, 220, 220))
            if cell >= 24 and matrix[i, j]:
                draw.text((x0 + 3, y0 + cell // 2 - 5), str(int(matrix[i, j])), fill="black", font=font)
    for j in range(k):
        draw.text((margin + j * cell + 2, 30 + margin - 14), str(j), fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def save_curves_png(records: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str | Path) -> Path:
    """Line plots of ``keys`` against ``step`` (one panel per key) as a PNG, drawn with Pillow."""
    from PIL import Image, ImageDraw

    panel_w, panel_h, pad = 420, 220, 40
    image = Image.new("RGB", (panel_w * len(keys) + 10, panel_h + 20), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    for p, key in enumerate(keys):
        pts = [
            (float(r["step"]), float(r[key]))
            for r in records
            if r.get(key) is not None and math.isfinite(float(r[key]))
        ]
        x0 = p * panel_w + pad
        x1, y0, y1 = x0 + panel_w - pad - 20, 20, panel_h - 20
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 4), key, fill="black", font=font)
        if not pts:
            continue
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        xmin, xmax = min(xs), max(xs)
        ymin, ymax = min(ys), max(ys)
        if xmax == xmin:
            xmax = xmin + 1
        if ymax == ymin:
            ymax = ymin + 1e-9 + abs(ymin) * 0.01
        draw.text((x0 - pad + 2, y0), f"{ymax:.3g}", fill="black", font=font)
        draw.text((x0 - pad + 2, y1 - 10), f"{ymin:.3g}", fill="black", font=font)
        draw.text((x1 - 30, y1 + 4), f"{int(xmax)}", fill="black", font=font)
        line = [
            (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)) for x, y in pts
        ]
        if len(line) == 1:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=(30, 90, 200))
        else:
            draw.line(line, fill=(30, 90, 200), width=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path

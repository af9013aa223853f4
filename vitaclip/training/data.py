"""Training data: ``path,label`` lists, the data order (a sample's position is a function of the step, so a
resumed run reads what it would have read) and the clip source that decodes and augments samples.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitaclip.training.augment import augment_clip
from vitaclip.training.config import TrainConfig


def position_for(local_index: int, *, rank: int, world_size: int, batch_size: int, start_step: int) -> tuple[int, int]:
    """(step, global data position) of the ``local_index``-th sample a worker reads when starting at ``start_step``.

    Step ``s`` consumes positions ``[s * batch_size, (s + 1) * batch_size)``; worker ``r`` takes the ``r``-th equal
    slice of them. The data position of a run is therefore a function of its step: resuming at step ``s`` reads
    exactly what the uninterrupted run would have read from there on.
    """
    per_worker = batch_size // world_size
    step = start_step + local_index // per_worker
    return step, step * batch_size + rank * per_worker + local_index % per_worker


class EpochOrder:
    """The sample index at a data position: epoch ``e`` reads the samples in a permutation seeded by ``(seed, e)``."""

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError("the training list is empty")
        self.num_samples = num_samples
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        perm = self._cache.get(epoch)
        if perm is None:
            if len(self._cache) > 2:
                self._cache.clear()
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._cache[epoch] = perm
        return int(perm[offset])


def sample_rng(seed: int, position: int) -> np.random.Generator:
    """The augmentation generator of the sample at a data position."""
    return np.random.default_rng([seed, 1_000_003, position])


@dataclass(frozen=True)
class LabelledVideo:
    """A training video: its location, its label (-1: none, caption-only training) and its captions (may be none)."""

    uri: str
    label: int
    captions: tuple[str, ...] = ()


_PATH_COLUMNS = ("path", "uri", "video")
_HEADER_COLUMNS = frozenset((*_PATH_COLUMNS, "label", "caption"))


def _header(cells: Sequence[str]) -> dict[str, int] | None:
    """Column name -> index when a CSV row is a header (names a path column and only known columns)."""
    names = [c.strip().lower() for c in cells]
    if not names or not set(names) <= _HEADER_COLUMNS or not set(names) & set(_PATH_COLUMNS):
        return None
    if len(set(names)) != len(names) or not {"label", "caption"} & set(names):
        return None
    return {n: i for i, n in enumerate(names)}


def entries_from_rows(
    rows: Sequence[tuple[str, Any, Any]], label_names: Sequence[str], *, data_root: str = "", where: str = "list"
) -> list[LabelledVideo]:
    """``(path, label or None, caption or None)`` rows -> entries, one per path (first appearance order): rows that
    repeat a path add captions (their labels must agree). A video needs a label or a caption."""
    index = label_lookup(label_names)
    order: dict[str, tuple[int, list[str]]] = {}
    for n, (path, label, caption) in enumerate(rows, start=1):
        key = str(path).strip()
        if not key:
            raise ValueError(f"{where}:{n}: empty path")
        has_label = label is not None and str(label).strip() != ""
        value = parse_label(label, index, where=f"{where}:{n}") if has_label else -1
        text = " ".join(str(caption).split()) if caption is not None else ""
        if key in order:
            if order[key][0] != value:
                raise ValueError(f"{where}:{n}: {key} is listed with two labels")
        else:
            order[key] = (value, [])
        if text and text not in order[key][1]:
            order[key][1].append(text)
    out = []
    for key, (label, captions) in order.items():
        if label < 0 and not captions:
            raise ValueError(f"{where}: {key} has neither a label nor a caption")
        out.append(LabelledVideo(join_root(data_root, key), label, tuple(captions)))
    if not out:
        raise ValueError(f"{where}: no entries")
    return out


def join_root(data_root: str, path: str) -> str:
    """A list entry's location: absolute paths and URIs as they are, relative ones under ``data_root``."""
    if not data_root or "://" in path or path.startswith("/"):
        return path
    return data_root.rstrip("/") + "/" + path


def parse_label(value: Any, label_index: Mapping[str, int], *, where: str) -> int:
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        label = int(text)
        if not 0 <= label < len(label_index):
            raise ValueError(f"{where}: label {label} is out of range for {len(label_index)} label names")
        return label
    key = text.replace("_", " ").strip().lower()
    if key not in label_index:
        raise UnknownLabel(f"{where}: label {text!r} is not one of the label names")
    return label_index[key]


class UnknownLabel(ValueError):
    """A training list's label that is not one of the run's label names."""


def label_lookup(label_names: Sequence[str]) -> dict[str, int]:
    """Name (``_`` read as a space, any case) -> index; also usable for range checks (its length)."""
    return {n.replace("_", " ").strip().lower(): i for i, n in enumerate(label_names)}


def parse_list_text(
    text: str, label_names: Sequence[str], *, data_root: str = "", where: str = "list"
) -> list[LabelledVideo]:
    """``path,label`` lines (the official trainer's list format; ``path label`` also works) -> entries.

    The label is an index into ``label_names`` or a name from it. Blank lines and ``#`` comments are skipped. A
    first line naming columns (``path``/``uri``/``video``, ``label``, ``caption``; CSV, captions may be quoted)
    reads the rest as CSV with those columns: see `entries_from_rows` for captions and rows repeating a path.
    """
    lines = [(n, raw.strip()) for n, raw in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    header = _header(next(csv.reader([lines[0][1]]))) if lines else None
    if header is not None:
        rows = []
        for n, cells in zip((n for n, _ in lines[1:]), csv.reader(line for _, line in lines[1:]), strict=True):
            if len(cells) != len(header):
                raise ValueError(f"{where}:{n}: expected {len(header)} columns ({', '.join(header)}), got {cells!r}")
            path = next(cells[header[c]] for c in _PATH_COLUMNS if c in header)
            label = cells[header["label"]] if "label" in header else None
            rows.append((path, label, cells[header["caption"]] if "caption" in header else None))
        return entries_from_rows(rows, label_names, data_root=data_root, where=where)
    index = label_lookup(label_names)
    out = []
    for n, line in lines:
        if "," in line:
            path, label = line.rsplit(",", 1)
        else:
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{where}:{n}: expected 'path,label', got {line!r}")
            path, label = parts
        out.append(LabelledVideo(join_root(data_root, path.strip()), parse_label(label, index, where=f"{where}:{n}")))
    if not out:
        raise ValueError(f"{where}: no entries")
    return out


class TrainClipSource:
    """Decodes and augments training clips by data position.

    In: ``{"index": int64 [B]}``, a worker's local sample counters (``id``, Ray Data's range column, also works).
    Out: ``{"video": uint8 [B, T, 3, S, S], "label": int64 [B], "position": int64 [B], "valid": bool [B]}``, and
    ``"caption"`` (str [B]; ``""``: none) when the list has captions: one of the video's captions, drawn by the
    sample's position.

    A callable class, so Ray Data can run it on decode actors; the same object runs in a plain loop. Each clip's
    sample and augmentation are functions of its data position only, so the stream is the same whichever process
    decodes it, and a resumed run reads exactly what an uninterrupted one would. A video that cannot be read or
    decoded yields zeros with ``valid=False`` (it does not count in the loss), never an exception.
    """

    def __init__(
        self,
        entries: Sequence[LabelledVideo] | Sequence[tuple[str, int]],
        *,
        config: TrainConfig,
        num_frames: int,
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        opener: Callable[[str], Any] | None = None,
    ) -> None:
        self.entries = [e if isinstance(e, LabelledVideo) else LabelledVideo(str(e[0]), int(e[1])) for e in entries]
        self.config = config
        self.num_frames = num_frames
        self.image_size = image_size
        self.decode_size = max(image_size, int(round(image_size * config.augment.decode_scale)))
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.order = EpochOrder(len(self.entries), config.seed)
        self.opener = opener
        self.with_captions = any(e.captions for e in self.entries)

    def position(self, local_index: int) -> int:
        return position_for(
            local_index,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.config.batch_size,
            start_step=self.start_step,
        )[1]

    def caption_at(self, position: int) -> str:
        """The caption of the sample at a data position (``""``: its video has none), drawn from the video's
        captions by a generator of its own, so adding captions changes no clip or augmentation."""
        captions = self.entries[self.order(position)].captions
        if len(captions) < 2:
            return captions[0] if captions else ""
        return captions[int(np.random.default_rng([self.config.seed, 2_000_003, position]).integers(len(captions)))]

    def clip_at(self, position: int) -> tuple[torch.Tensor, int, bool]:
        """(uint8 ``[T, 3, S, S]``, label, valid) of the sample at a data position."""
        from vitaclip.video import decode_clip, decode_or_error, sampling_spec

        entry = self.entries[self.order(position)]
        rng = sample_rng(self.config.seed, position)
        jitter = self.config.sampling == "dense" and self.config.temporal_jitter
        sampling = sampling_spec(
            self.config.sampling,
            num_frames=self.num_frames,
            stride=self.config.stride,
            start_fraction=float(rng.random()) if jitter else None,
        )
        clip, _ = decode_or_error(
            entry.uri,
            lambda source: decode_clip(
                source, sampling, size=self.decode_size, timeout_seconds=self.config.decode_timeout_seconds
            ),
            opener=self.opener,
        )
        if clip is None:  # a bad or unreadable video is skipped in the loss, never fatal
            empty = torch.zeros(self.num_frames, 3, self.image_size, self.image_size, dtype=torch.uint8)
            return empty, entry.label, False
        return augment_clip(clip.frames, self.config.augment, rng, size=self.image_size), entry.label, True

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        counters = batch["index"] if "index" in batch else batch["id"]  # "id": the column of ray.data.range
        positions = [self.position(int(i)) for i in np.asarray(counters).tolist()]
        videos, labels, valid = [], [], []
        for p in positions:
            video, label, ok = self.clip_at(p)
            videos.append(video.numpy())
            labels.append(label)
            valid.append(ok)
        out = {
            "video": np.stack(videos),  # [B, T, 3, S, S]
            "label": np.asarray(labels, dtype=np.int64),
            "position": np.asarray(positions, dtype=np.int64),
            "valid": np.asarray(valid, dtype=bool),
        }
        if self.with_captions:
            out["caption"] = np.asarray([self.caption_at(p) for p in positions], dtype=object)
        return out

"""Training data: ``path,label`` lists, the data order (a sample's position is a function of the step, so a
resumed run reads what it would have read) and the clip source that decodes and augments samples.
"""

from __future__ import annotations

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
    uri: str
    label: int


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
        raise ValueError(f"{where}: label {text!r} is not one of the label names")
    return label_index[key]


def label_lookup(label_names: Sequence[str]) -> dict[str, int]:
    """Name (``_`` read as a space, any case) -> index; also usable for range checks (its length)."""
    return {n.replace("_", " ").strip().lower(): i for i, n in enumerate(label_names)}


def parse_list_text(
    text: str, label_names: Sequence[str], *, data_root: str = "", where: str = "list"
) -> list[LabelledVideo]:
    """``path,label`` lines (the official trainer's list format; ``path label`` also works) -> entries.

    The label is an index into ``label_names`` or a name from it. Blank lines and ``#`` comments are skipped.
    """
    index = label_lookup(label_names)
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
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
    Out: ``{"video": uint8 [B, T, 3, S, S], "label": int64 [B], "position": int64 [B], "valid": bool [B]}``.

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

    def position(self, local_index: int) -> int:
        return position_for(
            local_index,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.config.batch_size,
            start_step=self.start_step,
        )[1]

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
        return {
            "video": np.stack(videos),  # [B, T, 3, S, S]
            "label": np.asarray(labels, dtype=np.int64),
            "position": np.asarray(positions, dtype=np.int64),
            "valid": np.asarray(valid, dtype=bool),
        }

"""Evaluation protocols: class lists, the zero-shot splits (HMDB51, UCF101, Kinetics-600 subsets) and
the paper's reference numbers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitaclip.labels import load_label_set

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


def load_class_list(name_or_path: str) -> tuple[str, ...]:
    """A packaged class list (``hmdb51``, ``ucf101``, ``kinetics400``) or a file with one name per line."""
    return load_label_set(name_or_path)


def normalize_class_name(name: str) -> str:
    """A comparable form of a class name: lower case, ``_`` as space, no quotes or brackets, single spaces."""
    text = name.lower().replace("_", " ")
    text = re.sub(r"[\"'()\[\]]", "", text)
    return " ".join(text.split())


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

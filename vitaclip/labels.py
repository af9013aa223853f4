"""Packaged label lists (one name per line, in the order a model was trained on)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path

from vitaclip.readable import read_small_text

_PACKAGED = {
    "kinetics400": "kinetics400.txt",
    "hmdb51": "hmdb51.txt",
    "ucf101": "ucf101.txt",
    "demo": "demo.txt",  # the demo world's colour-shape-motion combinations (vitaclip.demo.world)
}


MAX_LABEL_CHARS = 1000
"""Longest label name: a prompt is cut to the text encoder's 77 tokens (a few hundred characters) anyway, and the
BPE tokenizer's time grows with the square of a word's length (30,000 letters took 14 s; a 1 MB "label" in a
hostile checkpoint would hold every start for hours)."""
MAX_LABELS = 100_000


def check_label_names(names: Sequence[str], where: str) -> None:
    """Refuses more than `MAX_LABELS` names, or a name longer than `MAX_LABEL_CHARS` (ValueError naming `where`)."""
    if len(names) > MAX_LABELS:
        raise ValueError(f"{where}: {len(names):,} label names, more than {MAX_LABELS:,}")
    long = next((i for i, name in enumerate(names) if len(name) > MAX_LABEL_CHARS), None)
    if long is not None:
        raise ValueError(
            f"{where}: label name {long + 1} is {len(names[long]):,} characters long, more than {MAX_LABEL_CHARS:,}"
        )


def list_label_sets() -> list[str]:
    return sorted(_PACKAGED)


@cache
def load_label_set(name_or_path: str) -> tuple[str, ...]:
    """Label names of a packaged set (``kinetics400``) or of a text file with one name per line."""
    if name_or_path in _PACKAGED:
        text = (
            resources.files("vitaclip").joinpath("data").joinpath(_PACKAGED[name_or_path]).read_text(encoding="utf-8")
        )
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"label set {name_or_path!r} is neither a packaged set {list_label_sets()} nor a readable file"
            )
        try:
            text = read_small_text(path, f"label set {name_or_path!r}")
        except OSError as exc:
            raise ValueError(f"label set {name_or_path!r}: {exc.strerror or exc}") from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    check_label_names(names, f"label set {name_or_path!r}")
    if not names:
        raise ValueError(f"label set {name_or_path!r} has no names")
    dupes = sorted(n for n, seen in collections.Counter(names).items() if seen > 1)  # linear: sets may be large
    if dupes:
        raise ValueError(f"label set {name_or_path!r} repeats names: {dupes[:5]}")
    return names

"""A small BPE vocabulary for the demo model's text tower.

CLIP's BPE has 49,408 tokens; at a text width of 128 its embedding alone would be 25 MB, for a world that speaks a
few dozen words. :func:`learn_merges` learns byte-pair merges from a word list until every listed word is one token,
and :func:`write_merges` writes them in the gzip format open_clip's ``SimpleTokenizer(bpe_path=...)`` reads (a
version line, then one merge per line). The vocabulary is then the 512 byte tokens, the merges and the two special
tokens, so any other text still tokenizes (into smaller pieces).
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode

#: Words the demo world's captions, labels and query templates use, plus common query words.
DEMO_WORDS: tuple[str, ...] = tuple(
    """
    a an the of on in to is and with video photo clip showing frame from footage example demonstration person
    background moving move moves left right up down growing shrinking rotating spinning turning staying still static
    bouncing jumping red green blue yellow purple white orange pink black gray grey brown navy dark light circle square
    triangle star shape object ball box small large big bigger smaller fast slow middle center
    """.split()
)


def _word_symbols(word: str, encoder: dict[int, str]) -> tuple[str, ...]:
    chars = [encoder[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + "</w>")


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first (ties: lexicographic), until every word is a single token."""
    encoder = bytes_to_unicode()
    counts = Counter(w.lower() for w in words if w.strip())
    if not counts:
        raise ValueError("learn_merges needs at least one word")
    vocab = {_word_symbols(w, encoder): n for w, n in counts.items()}
    merges: list[tuple[str, str]] = []
    while any(len(symbols) > 1 for symbols in vocab):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in vocab.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += n
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_vocab: dict[tuple[str, ...], int] = {}
        for symbols, n in vocab.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_vocab[tuple(out)] = new_vocab.get(tuple(out), 0) + n
        vocab = new_vocab
    return merges


def write_merges(merges: Sequence[tuple[str, str]], path: str | Path) -> Path:
    """Writes merges as a gzip BPE file ``SimpleTokenizer`` reads; byte-identical for the same merges."""
    path = Path(path)
    text = "\n".join(["#version: 0.2 (vitaclip demo vocabulary)", *(f"{a} {b}" for a, b in merges)])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.encode("utf-8"))  # no trailing newline: SimpleTokenizer would read it as an empty merge
    os.replace(tmp, path)
    return path


def vocab_size(num_merges: int) -> int:
    """Token count of a BPE file with this many merges: 256 bytes, 256 word-final bytes, merges, 2 specials."""
    return 512 + num_merges + 2

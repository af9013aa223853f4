"""What a search engine holds and how fast it answers as the output grows: N committed rows, side by side.

For each N an output is built once (as `benchmarks/incremental_run.py` builds them: synthetic committed rows of
vitaclip-demo with ~5 KB JPEG thumbnails, data files of `--rows-per-file` rows, the index built), then, in a fresh
process per measurement, `index.search.SearchEngine` opens it with a stand-in text encoder (the query model's
memory is the same at every N). Measured per N, medians of `--repeats` processes:

- load seconds and resident memory the engine adds (``VmRSS`` after the load, less before it);
- a text search (k=10) after the first one, a thumbnail of a hit (read from its row group, first use), and a
  thumbnail of a row id that was never indexed (which reads nothing).

The growth per row between the sizes is what a service pays per indexed row; a reload holds two engines while the
new one loads. Linux only (/proc).

    python benchmarks/service_memory.py --sizes 200000 1000000 --work-dir /tmp/vitaclip-service
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def measure(out: str) -> dict[str, float]:
    """One engine load over `out` and its queries, in this process."""
    import numpy as np

    from index.search import SearchEngine

    def encode(texts: list[str]) -> np.ndarray:
        vectors = np.random.default_rng(len(texts)).normal(size=(len(texts), 64)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    before = _rss_mb()
    started = time.perf_counter()
    engine = SearchEngine(out, text_encoder=encode)
    result = {"load_s": time.perf_counter() - started, "rss_mb": _rss_mb() - before}
    engine.search("warm up", k=10)
    started = time.perf_counter()
    hits = engine.search("a query", k=10)
    result["search_ms"] = 1000 * (time.perf_counter() - started)
    started = time.perf_counter()
    assert engine.thumbnail(hits[0].row_id)
    result["thumbnail_ms"] = 1000 * (time.perf_counter() - started)
    started = time.perf_counter()
    assert engine.thumbnail(12345) is None
    result["unknown_thumbnail_ms"] = 1000 * (time.perf_counter() - started)
    result["rows"] = float(sum(len(c) for c in engine.catalogs.values()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows-per-file", type=int, default=50_000)
    parser.add_argument("--work-dir", default="/tmp/vitaclip-service")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from incremental_run import build_output

    outputs = {}
    for n in args.sizes:
        out = Path(args.work_dir) / f"rows-{n}"
        if not (out / "index" / "index_info.json").exists():
            started = time.perf_counter()
            build_output(out, n, rows_per_file=args.rows_per_file)
            print(f"built {n:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
        outputs[n] = out
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.sizes}
    for _ in range(args.repeats):
        for n, out in outputs.items():
            done = subprocess.run(
                [sys.executable, __file__, "--measure", str(out)], check=True, capture_output=True, text=True
            )
            runs[n].append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = ["load_s", "rss_mb", "search_ms", "thumbnail_ms", "unknown_thumbnail_ms"]
    print(f"\nmedians of {args.repeats} processes per size")
    print(f"{'rows':>10} " + " ".join(f"{k:>20}" for k in keys))
    med = {n: {k: statistics.median(r[k] for r in runs[n]) for k in keys} for n in args.sizes}
    for n in args.sizes:
        print(f"{n:>10,} " + " ".join(f"{med[n][k]:>20.2f}" for k in keys))
    small, large = min(args.sizes), max(args.sizes)
    if large > small:
        per_row = (med[large]["rss_mb"] - med[small]["rss_mb"]) * 2**20 / (large - small)
        print(f"\nresident memory per further row: {per_row:.0f} bytes (index and row catalog together)")


if __name__ == "__main__":
    main()

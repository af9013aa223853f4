"""Query latency of a segmented index against its base alone, side by side.

An exact base of ``--count`` random unit vectors of ``--dim`` dimensions is built with `index.build.build_index`;
then the same folder gets what later updates would add (three exact segments of 5%, 0.5% and 0.05% of the base, and
deletions of 10% of the base's ids) and both are opened with `index.segments.open_index`. Single-query latency,
p50 over 200 queries, measured alternately ``--repeats`` times.

    python benchmarks/segment_latency.py --count 100000 --dim 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.build import _train_and_add, build_index  # noqa: E402
from index.segments import (  # noqa: E402
    IndexPlan,
    VectorIndex,
    open_index,
    read_info,
    write_deleted,
    write_info,
    write_segment,
)


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def p50_ms(index: Any, queries: np.ndarray) -> float:
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], 10)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, dim = args.count, args.dim
    queries = _unit(rng, 200, dim)
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, seg_dir = Path(tmp) / "base", Path(tmp) / "segmented"
        for folder in (base_dir, seg_dir):
            build_index(_unit(np.random.default_rng(1), n, dim), np.arange(n), folder, kind="flat", model_id="bench")
        info = read_info(seg_dir)
        entry = info["indexes"]["videos"]
        flat = IndexPlan("flat", "IDMap2,Flat")
        added = 0
        for generation, size in ((1, n // 20), (2, n // 200), (3, n // 2000)):
            ids = np.arange(10 * n + generation * n, 10 * n + generation * n + size, dtype=np.int64)
            vindex = VectorIndex(_train_and_add(flat, _unit(rng, size, dim), ids), ids, None, flat)
            entry["segments"].append(write_segment(seg_dir, "videos", generation, vindex).to_dict())
            added += size
        dead = np.stack([rng.choice(n, n // 10, replace=False), np.full(n // 10, 3)], 1)
        entry.update(
            generation=3,
            deleted={"file": write_deleted(seg_dir, "videos", 3, dead), "count": len(dead)},
            count=n - len(dead) + added,
        )
        write_info(seg_dir, json.loads(json.dumps(info)))
        base, segmented = open_index(base_dir), open_index(seg_dir)
        results: dict[str, list[float]] = {"base alone": [], "base + 3 segments + deletions": []}
        for _ in range(args.repeats):
            results["base alone"].append(p50_ms(base, queries))
            results["base + 3 segments + deletions"].append(p50_ms(segmented, queries))
    print(f"{n} x {dim} exact base; {added} vectors in 3 later segments; {n // 10} ids deleted")
    for name, values in results.items():
        print(f"{name:>32}: p50 {statistics.median(values):.2f} ms (runs {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()

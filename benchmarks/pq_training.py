"""IVF-PQ training with and without polysemous training, side by side on the same sample.

The job's IVF-PQ indexes (``--kind ivfpq``, or the auto choice past the memory budget) are searched by asymmetric
distances and re-ranked with the stored full vectors; polysemous training, FAISS's default for 8-bit PQ codes,
only serves Hamming-distance filtering, which that search never uses. This measures what it costs and checks that
leaving it out changes neither the codes' quality nor recall.

    python benchmarks/pq_training.py                         # 100k x 512, 3 repeats (a few minutes on 2 cores)
    python benchmarks/pq_training.py --count 20000 --dim 64  # the test suite's size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
from index_recall import synthetic  # noqa: E402

from index.build import exact_search, plan_index, recall_at_k  # noqa: E402


def train(factory: str, dim: int, sample: np.ndarray) -> tuple[faiss.Index, float]:
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.seed = 0
    start = time.perf_counter()
    index.train(sample)
    return index, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    data = synthetic(args.count, args.dim)
    rng = np.random.default_rng(1)
    queries = data[rng.choice(len(data), 200, replace=False)]
    truth = exact_search(data, queries, 10)
    plan = plan_index(args.count, args.dim, kind="ivfpq")
    without = plan.factory
    with_polysemous = without.removesuffix("np")
    sample_size = min(len(data), max(64 * plan.nlist, 50_000))  # as index.build samples for training
    sample = np.ascontiguousarray(data[np.sort(rng.choice(len(data), sample_size, replace=False))])
    print(f"{args.count} x {args.dim}, training sample {sample_size}, {faiss.omp_get_max_threads()} threads")
    times: dict[str, list[float]] = {with_polysemous: [], without: []}
    recall: dict[str, float] = {}
    for _ in range(args.repeats):
        for factory in (with_polysemous, without):  # alternating
            index, seconds = train(factory, args.dim, sample)
            times[factory].append(seconds)
            index.add(data)
            faiss.extract_index_ivf(index).nprobe = 16
            _, found = index.search(queries, 10)
            recall[factory] = recall_at_k(found, truth)
    print("| factory | train s (median) | recall@10, nprobe 16, codes only |")
    print("|---|---|---|")
    for factory, values in times.items():
        print(f"| {factory} | {statistics.median(values):.2f} | {recall[factory]:.3f} |")
    ratio = statistics.median(times[with_polysemous]) / statistics.median(times[without])
    print(f"training time with polysemous / without: {ratio:.2f}")


if __name__ == "__main__":
    main()

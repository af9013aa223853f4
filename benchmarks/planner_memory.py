"""What the run's planner holds in memory while it plans a large listing (issue 13: memory bounded by a constant).

The planner actor (`jobs.planning.PlanActor`) turns listing pages into object store blocks of the videos that need
work. This plans synthetic S3 listing pages (4,096 objects each, none indexed yet: every object is planned) in this
process, at several listing sizes, and prints the Arrow memory the planner holds before it hands out its blocks, and
the Arrow pool's peak. The committed keys it also holds (about 21 bytes per committed row) are measured by
`incremental_run.py`; the blocks themselves live in Ray's object store, which spills to disk.

Also the Python heap it holds (tracemalloc, so the seconds are slower than a real run): mostly the ids of the
listed objects, kept to plan a video listed twice once, next to what a Python set of the same ids (the structure
before `index.commits._SeenIds`) holds, measured in the same run.

    python benchmarks/planner_memory.py --pages 12 50 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(pages: int, decode_workers: int) -> tuple[int, int, int, float, int, int]:
    """(planned videos, Arrow bytes held before `blocks`, blocks, seconds, Python heap bytes held, Python heap bytes
    of a set of the same ids) for one fresh planner."""
    import tracemalloc

    import pyarrow as pa

    from index.delta_tables import OutputLocation, create_tables
    from jobs import pipeline, planning
    from jobs.storage import VideoObject

    location = OutputLocation.from_url(tempfile.mkdtemp(prefix="vitaclip-plan-") + "/out")
    versions = create_tables(location, 4, model_id="m1")
    planner = planning.PlanActor(
        location, model_id="m1", versions=versions, folder_inputs=[], decode_workers=decode_workers
    )
    base = pa.total_allocated_bytes()
    tracemalloc.start()
    py_base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    for page in range(pages):
        objects = [
            VideoObject(uri=f"s3://bucket/videos/{page:05d}/{k:06d}.mp4", etag=f'"{k:032x}"', size_bytes=10**7)
            for k in range(pipeline._LISTING_BATCH)
        ]
        (table,) = pipeline._listing_tables(objects)
        planner.plan(table)
    held = pa.total_allocated_bytes() - base
    seconds = time.perf_counter() - start
    py_held = tracemalloc.get_traced_memory()[0] - py_base
    ids = planner.planner._seen.array()
    before_set = tracemalloc.get_traced_memory()[0]
    as_set = set(ids.tolist())
    set_bytes = tracemalloc.get_traced_memory()[0] - before_set
    del as_set
    tracemalloc.stop()
    blocks = planner.blocks()
    return pages * pipeline._LISTING_BATCH, held, len(blocks), seconds, py_held, set_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, nargs="+", default=[12, 50, 200], help="listing sizes, in pages of 4,096")
    p.add_argument("--decode-workers", type=int, default=2)
    args = p.parse_args(argv)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"planner with {args.decode_workers} decoders; every listed object needs work")
    header = f"{'planned':>9} {'held MB':>8} {'bytes/video':>12} {'blocks':>7} {'s':>6}"
    print(f"{header} {'heap B/video':>13} {'set B/video':>12}")
    for pages in sorted(args.pages):
        planned, held, blocks, seconds, heap, as_set = measure(pages, args.decode_workers)
        print(
            f"{planned:>9,} {held / 1e6:>8.2f} {held / planned:>12.2f} {blocks:>7,} {seconds:>6.1f}"
            f" {heap / planned:>13.1f} {as_set / planned:>12.1f}"
        )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

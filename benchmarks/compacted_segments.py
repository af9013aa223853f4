"""What planning costs once an analyst compacted the segments table (issue 13: a run costs what its new work costs).

A segments file without a videos file of its name (*unpartnered*: every file after ``optimize.compact()``) is
read by the planner for the (video_id, run_id) pairs it holds, so that a planned video's old segments are found
wherever they are. That read grows with the segments table, not with the run: this measures by how much.

Builds outputs of N committed videos with S segment rows each (synthetic rows of a 64-dimensional model, 5,000
videos per run, both tables compacted as delta-rs's ``optimize.compact()`` does), then times the planner's start
(`index.commits.Planner`, which reads the videos table's keys and the unpartnered segment files) on each, with the
two ways of reading a segments file side by side in one process, alternating: as runs of equal (video_id, run_id)
read from Parquet's dictionary codes (`index.commits._distinct_runs`, the job's way), and as one string per row
(`index.commits._read_columns`, the way before). Medians of the repeats; CPU seconds include Arrow's threads.

    python benchmarks/compacted_segments.py --videos 20000 200000 --segments 30 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "bench-model"
DIM = 64
VIDEOS_PER_RUN = 5000


def build(root: str, videos: int, segments: int) -> None:
    """An output of `videos` committed ok videos with `segments` segment rows each, both tables compacted."""
    import numpy as np
    import pyarrow as pa
    from deltalake import DeltaTable

    from index import delta_tables as dlt
    from index.schema import video_id_for

    location = dlt.OutputLocation.from_url(root)
    dlt.create_tables(location, DIM)
    when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    vector = np.full(DIM, 0.125, np.float32).tolist()
    for start in range(0, videos, VIDEOS_PER_RUN):
        keys = range(start, min(videos, start + VIDEOS_PER_RUN))
        uris = [f"s3://bucket/videos/{k:08d}.mp4" for k in keys]
        ids = [video_id_for(u) for u in uris]
        n, m, run_id = len(ids), len(ids) * segments, f"run-{start:08d}"
        common = {"labels": [["a"]], "label_scores": [[0.5]], "model_id": [MODEL], "run_id": [run_id]}
        rows = {
            "videos": {
                "video_id": ids,
                "row_id": list(range(n)),
                "uri": uris,
                "etag": [f'"{k:032x}"' for k in keys],
                "size_bytes": [10**7] * n,
                "duration_seconds": [2.0 * segments] * n,
                "fps": [30.0] * n,
                "width": [640] * n,
                "height": [360] * n,
                "codec": ["h264"] * n,
                "status": ["ok"] * n,
                "error_message": [None] * n,
                "embedding": [vector] * n,
                "thumbnail_jpeg": [b"\xff\xd8"] * n,
                "indexed_at": [when] * n,
                "attempts": pa.array([1] * n, pa.int32()),
                **{name: value * n for name, value in common.items()},
            },
            "segments": {
                "video_id": [v for v in ids for _ in range(segments)],
                "row_id": list(range(m)),
                "uri": [u for u in uris for _ in range(segments)],
                "segment_index": pa.array([j for _ in ids for j in range(segments)], pa.int32()),
                "start_seconds": [2.0 * j for _ in ids for j in range(segments)],
                "end_seconds": [2.0 * j + 2 for _ in ids for j in range(segments)],
                "embedding": [vector] * m,
                "thumbnail_jpeg": [b"\xff\xd8"] * m,
                "indexed_at": [when] * m,
                **{name: value * m for name, value in common.items()},
            },
        }
        name = f"part-{run_id}-{uuid.uuid4().hex}.parquet"
        for table in ("segments", "videos"):
            added = dlt.write_data_file(location, table, pa.table(rows[table]), name=name, embed_dim=DIM)
            version = DeltaTable(location.table_uri(table)).version()
            dlt.commit(location, table, adds=[added], removes=[], read_version=version, app_id="bench",
                       app_version=start + 1, metadata={})  # fmt: skip
    for table in dlt.TABLES:
        DeltaTable(location.table_uri(table)).optimize.compact()


def time_planner(root: str, way: str) -> tuple[float, float, int]:
    """(wall s, CPU s, unpartnered files) of one planner start with segment files read `way`."""
    from deltalake import DeltaTable

    from index import commits
    from index import delta_tables as dlt

    location = dlt.OutputLocation.from_url(root)
    versions = {table: DeltaTable(location.table_uri(table)).version() for table in dlt.TABLES}
    read = commits._distinct_runs
    if way == "per row":
        commits._distinct_runs = commits._read_columns  # type: ignore[assignment]
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        planner = commits.Planner(location, model_id=MODEL, versions=versions)
        return time.perf_counter() - wall, time.process_time() - cpu, len(planner.unpartnered_segment_files)
    finally:
        commits._distinct_runs = read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, nargs="+", default=[20000, 200000])
    parser.add_argument("--segments", type=int, default=30, help="segment rows per video")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ways = ("as runs", "per row")
    with tempfile.TemporaryDirectory(prefix="vitaclip-compacted-") as scratch:
        roots = {}
        for videos in args.videos:
            roots[videos] = f"{scratch}/out-{videos}"
            start = time.perf_counter()
            build(roots[videos], videos, args.segments)
            print(f"built {videos:,} videos x {args.segments} segments in {time.perf_counter() - start:.1f} s")
        results: dict[tuple[int, str], list[tuple[float, float]]] = {}
        files = {}
        for _ in range(args.repeats):
            for videos in args.videos:
                for way in ways:
                    wall, cpu, files[videos] = time_planner(roots[videos], way)
                    results.setdefault((videos, way), []).append((wall, cpu))
    print("\n| videos | segment rows | unpartnered files | way | planner s | CPU s | per row / as runs (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for videos in args.videos:
        cpu = {way: statistics.median(c for _, c in results[(videos, way)]) for way in ways}
        for way in ways:
            wall = statistics.median(w for w, _ in results[(videos, way)])
            ratio = f"{cpu['per row'] / cpu['as runs']:.2f}" if way == "per row" else ""
            print(
                f"| {videos:,} | {videos * args.segments:,} | {files[videos]} | {way} | {wall:.3f} | "
                f"{cpu[way]:.3f} | {ratio} |"
            )
    if len(args.videos) > 1:
        low, high = min(args.videos), max(args.videos)
        for way in ways:
            grow = (
                statistics.median(c for _, c in results[(high, way)])
                - statistics.median(c for _, c in results[(low, way)])
            ) / ((high - low) * args.segments / 1e6)
            print(f"{way}: {grow:.2f} CPU s per further 1M segment rows")


if __name__ == "__main__":
    main()

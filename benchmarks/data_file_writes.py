"""What writing one Delta data file costs a write task: CPU seconds and bytes, with the job's Parquet options against
dictionary encoding on every column (pyarrow's default, the options before `index.delta_tables.parquet_options`).

Rows as the job makes them: video rows of generated videos (thumbnails of their decoded frames, each different,
made by the job's own `vitaclip.stages._thumbnail`), unit-norm float32 embeddings of ``--dim`` values, five labels
and scores each, conformed to the table's schema by the job's own code. Both option sets write the same table in
memory, alternating, ``--repeats`` times; medians. Also the CPU seconds to read the file back whole, as an
analyst's scan or the index build would.

    python benchmarks/data_file_writes.py --rows 2048 --dim 512 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def thumbnails(count: int, work: Path) -> list[bytes]:
    """`count` different JPEG thumbnails of decoded frames of generated videos."""
    import av

    from vitaclip.samples import write_sample_video
    from vitaclip.stages import _thumbnail

    out: list[bytes] = []
    seed = 0
    while len(out) < count:
        path = work / f"thumbs-{seed}.mp4"
        write_sample_video(path, num_frames=96, fps=24, width=640, height=360, seed=seed)
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                out.append(_thumbnail(frame.to_ndarray(format="rgb24")))
        seed += 1
    return out[:count]


def video_rows(count: int, dim: int, work: Path) -> pa.Table:
    """`count` ok video rows in the videos table's schema (conformed by `index.delta_tables._conform`)."""
    from index.delta_tables import _conform
    from index.schema import row_id_for, video_id_for

    rng = np.random.default_rng(0)
    uris = [f"s3://videos/uploads/2026/12/{i:06d}/clip-{i}.mp4" for i in range(count)]
    ids = [video_id_for(uri) for uri in uris]
    embeddings = rng.normal(size=(count, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = ["walking the dog", "playing guitar", "cooking", "surfing", "juggling", "skiing", "dancing"]
    picks = [[labels[(i + j) % len(labels)] for j in range(5)] for i in range(count)]
    scores = np.sort(rng.dirichlet(np.ones(len(labels)), size=count)[:, :5], axis=1)[:, ::-1].astype(np.float32)
    data = {
        "video_id": ids,
        "row_id": [row_id_for(v) for v in ids],
        "uri": uris,
        "etag": [f'"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}"' for _ in range(count)],
        "size_bytes": rng.integers(100_000, 500_000_000, count),
        "duration_seconds": rng.uniform(2, 600, count).round(3),
        "fps": rng.choice([24.0, 25.0, 29.97, 30.0, 60.0], count),
        "width": rng.choice([640, 1280, 1920], count).astype(np.int32),
        "height": rng.choice([360, 720, 1080], count).astype(np.int32),
        "codec": rng.choice(["h264", "hevc", "vp9", "av1"], count).tolist(),
        "status": ["ok"] * count,
        "error_message": [None] * count,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), dim),
        "labels": picks,
        "label_scores": [list(row) for row in scores],
        "thumbnail_jpeg": thumbnails(count, work),
        "model_id": ["vitaclip-b16@sha256:" + "ab" * 32] * count,
        "run_id": ["20261205T000000Z-1a2b3c4d"] * count,
        "indexed_at": pa.array(np.full(count, 1_764_892_800_000) + np.arange(count), pa.timestamp("ms", tz="UTC")),
        "attempts": np.ones(count, dtype=np.int32),
    }
    from index.schema import videos_schema

    names = videos_schema(dim).names
    table = pa.table({name: data[name] for name in names if name in data})
    return _conform(table, "videos", dim)


def _cpu(action: object) -> float:
    start = time.process_time()
    action()  # type: ignore[operator]
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    from index.delta_tables import parquet_options

    with tempfile.TemporaryDirectory(prefix="vitaclip-writes-") as folder:
        table = video_rows(args.rows, args.dim, Path(folder))
    sides = {
        "dictionary on every column (before)": {"compression": "zstd"},
        "parquet_options (now)": parquet_options("videos", table.schema),
    }
    writes: dict[str, list[float]] = {name: [] for name in sides}
    reads: dict[str, list[float]] = {name: [] for name in sides}
    sizes: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, options in sides.items():
            sink = pa.BufferOutputStream()
            writes[name].append(_cpu(lambda: pq.write_table(table, sink, **options)))  # noqa: B023
            data = sink.getvalue()
            sizes[name] = data.size
            reads[name].append(_cpu(lambda: pq.read_table(pa.BufferReader(data), use_threads=False)))  # noqa: B023
    thumbs = np.mean([len(t) for t in table.column("thumbnail_jpeg").to_pylist()])
    print(f"{args.rows} video rows, {args.dim}-dim embeddings, thumbnails of {thumbs:.0f} bytes on average")
    print(f"medians of {args.repeats}, CPU seconds of this process")
    print(f"{'options':40s} {'write ms':>9s} {'read ms':>8s} {'MB':>7s}")
    for name in sides:
        write_ms, read_ms = statistics.median(writes[name]) * 1000, statistics.median(reads[name]) * 1000
        print(f"{name:40s} {write_ms:9.1f} {read_ms:8.1f} {sizes[name] / 1e6:7.2f}")
    before, now = list(sides)
    print(
        f"now / before: write CPU {statistics.median(writes[now]) / statistics.median(writes[before]):.2f}, "
        f"bytes {sizes[now] / sizes[before]:.3f}"
    )


if __name__ == "__main__":
    main()

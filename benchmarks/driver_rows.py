"""What the job's driver spends per row when rows come faster than this machine can embed them.

The job's driver never touches rows: it groups block references into write tasks and commits their file metadata
(`jobs.pipeline.drain`). Its CPU per row is what limits how many GPUs one driver can feed, but on a CPU-only
machine the pipeline makes rows so slowly (tens per second) that the driver's time-bound work (Ray Data's
scheduling loop) dominates any per-row figure. This benchmark feeds the same driver loop rows of real embed output
as fast as the write tasks take them, through a Dataset shaped like the job's:

1. The job's own stages (`ReadDecode`, `TimedEmbed`, vitaclip-demo, ``--segment-seconds 2``) process a few generated
   10 s videos once; their output rows (video and segment rows: embeddings, labels, JPEG thumbnails) are repeated
   under new URIs into input blocks of the planner's size (`jobs.pipeline._BLOCK_VIDEOS` videos), put in the object
   store before timing.
2. Timed: a Dataset over those blocks with two actor pools standing for the job's: two "decoders" that hand each
   input block on in blocks of ``--rows-per-block`` rows (whole videos), as the decode stage's output reaches the
   embed stage, and one "embedder" that passes each block through (one task per block, as the embed stage's
   bundles of at least ``--embed-batch-size`` clips are one decoded block each). Ray Data cuts the decode stage's
   output by size (the job's ``--decoded-block-mib``, 256 by default; Ray Data's own default is 128), so a block
   holds that many MiB of frames: a clip of 8 x 224 x 224 x 3 bytes (ViT-B/16 and ViT-L/14 at 8 frames) is 1.2 MB,
   111 clips per 128 MiB, 223 per 256 MiB and 446 per 512 MiB; a clip of the demo's 8 x 64 x 64 x 3 is 98 KB,
   1,365 per 128 MiB. The benchmark sets the block size so that its smaller rows make blocks of
   ``--rows-per-block`` rows. The embed output is drained by `jobs.pipeline.drain` into real write tasks and Delta
   commits on a fresh local output.

Measured per size, side by side, alternating, medians: rows/s through the driver loop (bounded here by this
machine's two cores) and the driver's CPU seconds (this process: all its threads, Ray Data's scheduling loop and
Ray's core worker included) per 1,000 rows; the growth between the two sizes per further 1,000 rows is the per-row
cost. Target (issue 13): <= 0.005 s per 1,000 rows.

    python benchmarks/driver_rows.py --rows 20000 80000 --rows-per-block 111 223 446 --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "vitaclip-demo"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sample_rows(work: Path, videos: int = 8) -> pa.Table:
    """Embed output rows of `videos` generated 10 s videos, from the job's own decode and embed stages."""
    from jobs.pipeline import ReadDecode, TimedEmbed
    from vitaclip.registry import resolve_model
    from vitaclip.samples import write_sample_video
    from vitaclip.stages import DecodeStage

    paths = []
    for i in range(videos):
        path = work / f"sample-{i}.mp4"
        write_sample_video(path, num_frames=120, fps=12, width=320, height=240, seed=i)
        paths.append(path)
    model = resolve_model(MODEL, None)
    batch = {
        "uri": np.asarray([str(p) for p in paths], dtype=object),
        "etag": np.asarray([f"e{i}" for i in range(videos)], dtype=object),
        "size_bytes": np.asarray([p.stat().st_size for p in paths]),
        "listing_status": np.asarray([""] * videos, dtype=object),  # "": listed fine (else the listing's failure)
        "listing_error": np.asarray([""] * videos, dtype=object),
        "current_video_file": np.asarray([""] * videos, dtype=object),
        "current_segment_files": np.asarray([""] * videos, dtype=object),
    }
    decode = ReadDecode(
        num_frames=model.num_frames,
        size=model.image_size,
        segment_seconds=2.0,
        s3_endpoint_url=None,
        whole_object_max_bytes=64 * 2**20,
    )
    embed = TimedEmbed(model=MODEL, label_names=list(model.label_names), device="cpu")
    from ray.data.block import BlockAccessor

    decoded = DecodeStage.__call__(decode, batch)  # all rows at once (the job's stage hands them on as they come)
    rows = BlockAccessor.batch_to_block(embed(decoded))  # as Ray Data makes the stage's output block
    statuses = set(rows.column("status").to_pylist())
    if statuses != {"ok"} or rows.num_rows != 6 * videos:  # the whole video and five 2 s segments each
        raise RuntimeError(f"the sample videos did not decode as expected: {rows.num_rows} rows, {statuses}")
    return rows


def blocks_of(sample: pa.Table, rows: int, videos_per_block: int) -> list[Any]:
    """Object refs of blocks of `videos_per_block` videos holding about `rows` rows: the sample under new URIs."""
    import ray

    uris = sample.column("uri").to_pylist()
    per_video = len(uris) / len(set(uris))
    videos_needed = max(1, int(rows / per_video))
    refs, done = [], 0
    while done < videos_needed:
        parts = []
        for start in range(done, min(done + videos_per_block, videos_needed), len(set(uris))):
            renamed = [f"s3://bench/{start + sorted(set(uris)).index(u):09d}.mp4" for u in uris]
            parts.append(sample.set_column(sample.schema.get_field_index("uri"), "uri", pa.array(renamed)))
        refs.append(ray.put(pa.concat_tables(parts)))
        done += videos_per_block
    return refs


class _Decoders:
    """Stands for the decode stage: hands an input block on in blocks of `rows_per_block` rows of whole videos."""

    def __init__(self, rows_per_block: int) -> None:
        self.rows_per_block = rows_per_block

    def __call__(self, table: pa.Table) -> Iterator[pa.Table]:
        uris = table.column("uri").to_pylist()
        start = 0
        while start < len(uris):
            end = min(start + self.rows_per_block, len(uris))
            while end < len(uris) and uris[end] == uris[end - 1]:
                end += 1  # the decode stage yields whole videos
            yield table.slice(start, end - start)
            start = end


class _Embedder:
    """Stands for the embed stage: one output block per input block."""

    def __call__(self, table: pa.Table) -> pa.Table:
        return table


def time_drain(
    refs: list[Any], out: Path, *, model: Any, rows_per_block: int, row_bytes: float
) -> tuple[float, float, int]:
    """(seconds, driver CPU seconds, rows committed) of the job's driver loop over `refs`."""
    import ray

    from index.commits import Committer
    from index.delta_tables import OutputLocation, create_tables
    from jobs.config import IndexJobConfig
    from jobs.pipeline import Commits, RunHooks, drain

    shutil.rmtree(out, ignore_errors=True)
    location = OutputLocation.from_url(str(out))
    versions = create_tables(location, model.embed_dim, model_id=model.model_id)
    config = IndexJobConfig(inputs=("unused",), output=str(out), model=MODEL)
    context = ray.data.DataContext.get_current()
    # Ray Data ends a task's output block once it passes this size (and cuts only past 1.5 times it): blocks of
    # `rows_per_block` of these rows, as 128 MiB of frames makes in the job.
    context.target_max_block_size = int(0.9 * rows_per_block * row_bytes)
    start, cpu = time.perf_counter(), _cpu_seconds()
    commits = Commits(
        Committer(location, model_id=model.model_id, run_id="bench", versions=versions),
        commit_seconds=config.commit_seconds,
        hooks=RunHooks(),
    )
    ds = (
        ray.data.from_arrow_refs(refs)
        .map_batches(
            _Decoders,
            fn_constructor_kwargs=dict(rows_per_block=rows_per_block),
            batch_format="pyarrow",
            zero_copy_batch=True,
            batch_size=None,
            compute=ray.data.ActorPoolStrategy(size=2),
            num_cpus=0.5,
        )
        .map_batches(
            _Embedder,
            batch_format="pyarrow",
            zero_copy_batch=True,
            batch_size=None,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
            num_cpus=0.5,
        )
    )
    drain(ds, commits, config, location=location, model=model, run_id="bench")
    commits.collect(wait=True)
    commits.commit()
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    rows = sum(r.videos_committed + r.segments_committed for r in commits.reports)
    return seconds, cpu, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[20_000, 80_000])
    parser.add_argument("--rows-per-block", type=int, nargs="+", default=[111, 223], help="clip rows per decoded block")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ray
    import ray.data  # noqa: F401  (imported before timing, as the job has by then)

    from jobs.pipeline import _BLOCK_VIDEOS
    from vitaclip.registry import resolve_model

    model = resolve_model(MODEL, None)
    from jobs.ray_resources import embedded_ray_options

    ray.init(**embedded_ray_options(None), log_to_driver=False)  # as the job starts its own
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sample = sample_rows(work)
        row_bytes = sample.nbytes / sample.num_rows
        print(f"sample: {sample.num_rows} rows from {len(set(sample.column('uri').to_pylist()))} videos", flush=True)
        results: dict[tuple[int, int], list[tuple[float, float, int]]] = {
            (b, n): [] for b in args.rows_per_block for n in args.rows
        }
        for repeat in range(args.repeats):
            for b, n in results:
                refs = blocks_of(sample, n, _BLOCK_VIDEOS)
                measured = time_drain(refs, work / "out", model=model, rows_per_block=b, row_bytes=row_bytes)
                del refs
                results[b, n].append(measured)
                s, c, r = measured
                print(
                    f"repeat {repeat + 1}, {b} rows per block: {r} rows in {s:.1f} s, driver {c:.2f} CPU-s", flush=True
                )
    print(f"\nmedians over {args.repeats} repeats")
    print(f"{'rows/block':>10} {'rows':>8} {'seconds':>8} {'rows/s':>8} {'driver CPU-s':>12} {'per 1,000 rows':>15}")
    for b in args.rows_per_block:
        med = {}
        for n in args.rows:
            s, c, r = (statistics.median(x[i] for x in results[b, n]) for i in range(3))
            med[n] = (c, r)
            print(f"{b:>10} {int(r):>8} {s:>8.1f} {r / s:>8.0f} {c:>12.2f} {1000 * c / r:>15.4f}")
        (c0, r0), (c1, r1) = med[args.rows[0]], med[args.rows[1]]
        print(f"{'':>10} per further 1,000 rows: {1000 * (c1 - c0) / (r1 - r0):.4f} driver CPU-s (target <= 0.005)")


if __name__ == "__main__":
    main()

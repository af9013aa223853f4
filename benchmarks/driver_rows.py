"""What the job's driver spends per row when rows come faster than this machine can embed them.

The job's driver never touches rows: it groups block references into write tasks and commits their file metadata
(`jobs.pipeline.drain`). Its CPU per row is what limits how many GPUs one driver can feed, but on a CPU-only
machine the pipeline makes rows so slowly (tens per second) that the driver's time-bound work (Ray Data's
scheduling loop) dominates any per-row figure. This benchmark feeds the same driver loop rows of real embed output
as fast as the write tasks take them, through a Dataset shaped like the job's:

1. The job's own stages (`ReadDecode`, `TimedEmbed`, vitaclip-demo, ``--segment-seconds 2``) process a few generated
   10 s videos once; their output rows (video and segment rows: embeddings, labels, JPEG thumbnails) are repeated
   under new URIs into blocks of ``--videos-per-block`` videos (the planner's `jobs.pipeline._BLOCK_VIDEOS`, 512;
   the end of a run is cut into blocks of 128), put in the object store before timing.
2. Timed: a Dataset over those blocks with one actor pool standing for the job's `jobs.decode_embed.DecodeEmbed`
   (same pool options: two calls at once per actor, a whole block per call), which hands each block on as its
   output. In the job that actor has the block's videos decoded by Ray tasks it submits and owns itself, so the
   frames never reach the driver or Ray Data's executor: what the driver sees per block is the same as here. The
   output is drained by `jobs.pipeline.drain` into real write tasks and Delta commits on a fresh local output.

Before the decode stage moved into the embed actors (two Ray Data stages), every block of decoded frames (223 clips
of 224 px in 256 MiB) cost the driver about 8 ms: 0.040 CPU-s per 1,000 clips (benchmarks/RESULTS.md).

Measured per size, side by side, alternating, medians: rows/s through the driver loop (bounded here by this
machine's two cores) and the driver's CPU seconds (this process: all its threads, Ray Data's scheduling loop and
Ray's core worker included) per 1,000 rows; the growth between the two sizes per further 1,000 rows is the per-row
cost. Target (issue 13): <= 0.005 s per 1,000 rows.

    python benchmarks/driver_rows.py --rows 20000 80000 --videos-per-block 128 512 --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "vitaclip-demo"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sample_rows(work: Path, videos: int = 8) -> pa.Table:
    """Embed output rows of `videos` generated 10 s videos, from the job's own decode and embed stages."""
    from jobs.decode_embed import ReadDecode, TimedEmbed
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


class _Embedder:
    """Stands for the job's decode and embed actor: a block of videos in, their output rows out."""

    def __call__(self, table: pa.Table) -> pa.Table:
        return table


def time_drain(refs: list[Any], out: Path, *, model: Any) -> tuple[float, float, int]:
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
    start, cpu = time.perf_counter(), _cpu_seconds()
    commits = Commits(
        Committer(location, model_id=model.model_id, run_id="bench", versions=versions),
        commit_seconds=config.commit_seconds,
        hooks=RunHooks(),
    )
    ds = ray.data.from_arrow_refs(refs).map_batches(
        _Embedder,
        batch_format="pyarrow",
        zero_copy_batch=True,
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=1, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True
        ),
        num_cpus=0.5,
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
    parser.add_argument("--videos-per-block", type=int, nargs="+", default=[128, 512], help="videos per input block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--whole-videos-only", action="store_true", help="one row per video (a run without --segment-seconds)"
    )
    args = parser.parse_args()
    import ray
    import ray.data  # noqa: F401  (imported before timing, as the job has by then)

    from vitaclip.registry import resolve_model

    model = resolve_model(MODEL, None)
    from jobs.ray_resources import embedded_ray_options

    ray.init(**embedded_ray_options(None), log_to_driver=False)  # as the job starts its own
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sample = sample_rows(work)
        if args.whole_videos_only:
            sample = sample.filter(pa.compute.equal(sample.column("segment_index"), -1))
            counts = pa.array([1] * sample.num_rows, sample.schema.field("clip_count").type)
            sample = sample.set_column(sample.schema.get_field_index("clip_count"), "clip_count", counts)
        print(f"sample: {sample.num_rows} rows from {len(set(sample.column('uri').to_pylist()))} videos", flush=True)
        results: dict[tuple[int, int], list[tuple[float, float, int]]] = {
            (b, n): [] for b in args.videos_per_block for n in args.rows
        }
        for repeat in range(args.repeats):
            for b, n in results:
                refs = blocks_of(sample, n, b)
                measured = time_drain(refs, work / "out", model=model)
                del refs
                results[b, n].append(measured)
                s, c, r = measured
                print(
                    f"repeat {repeat + 1}, {b} videos per block: {r} rows in {s:.1f} s, driver {c:.2f} CPU-s",
                    flush=True,
                )
    print(f"\nmedians over {args.repeats} repeats")
    print(f"{'videos/block':>12} {'rows':>8} {'seconds':>8} {'rows/s':>8} {'driver CPU-s':>12} {'per 1,000 rows':>15}")
    for b in args.videos_per_block:
        med = {}
        for n in args.rows:
            s, c, r = (statistics.median(x[i] for x in results[b, n]) for i in range(3))
            med[n] = (c, r)
            print(f"{b:>12} {int(r):>8} {s:>8.1f} {r / s:>8.0f} {c:>12.2f} {1000 * c / r:>15.4f}")
        (c0, r0), (c1, r1) = med[args.rows[0]], med[args.rows[1]]
        print(f"{'':>12} per further 1,000 rows: {1000 * (c1 - c0) / (r1 - r0):.4f} driver CPU-s (target <= 0.005)")


if __name__ == "__main__":
    main()

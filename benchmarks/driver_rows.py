"""What the job's driver spends per row when rows come faster than this machine can embed them.

The job's driver never touches rows: it groups block references into write tasks and commits their file metadata
(`jobs.pipeline.drain`). Its CPU per row is what limits how many GPUs one driver can feed, but on a CPU-only
machine the pipeline makes rows so slowly (tens per second) that the driver's time-bound work (Ray Data's
scheduling loop) dominates any per-row figure. This benchmark feeds the same driver loop rows of real embed output
as fast as the write tasks take them, through a Dataset shaped like the job's:

1. The job's own stages (`ReadDecode`, `TimedEmbed`, vitaclip-demo, ``--segment-seconds 2``) process a few generated
   10 s videos once; their output rows (video and segment rows: embeddings, labels, JPEG thumbnails) are repeated
   under new URIs into blocks of ``--videos-per-block`` videos (the planner's `jobs.planning._BLOCK_VIDEOS`,
   2,048; the end of a run is cut into blocks of 128), each one Arrow chunk per column as the job's stages make
   them, put in the object store before timing. (Until 2026-12-07 a block held one chunk per 8 sample videos, 256
   at 2,048 videos: Ray deserializes each chunk on its own, which cost the stand-in actor about 120 us of CPU per
   row, 5 times what it costs now, and held the rows/s, so the driver's time-bound work, to about 10,000.)
2. Timed: a Dataset over those blocks with one actor pool standing for the job's `jobs.decode_embed.DecodeEmbed`
   (same pool options: two blocks at once per actor, each in calls of `jobs.pipeline._CALL_VIDEOS` videos), which
   hands each call's rows on as its output. In the job that actor has the block's videos decoded by Ray tasks it
   submits and owns itself, so the frames never reach the driver or Ray Data's executor: what the driver sees per
   block is the same as here. The output is drained by `jobs.pipeline.drain` into real write tasks and Delta
   commits on a fresh local output.

Before the decode stage moved into the embed actors (two Ray Data stages), every block of decoded frames (223 clips
of 224 px in 256 MiB) cost the driver about 8 ms: 0.040 CPU-s per 1,000 clips (benchmarks/RESULTS.md).

Measured per size, side by side, alternating, medians: rows/s through the driver loop (bounded here by this
machine's two cores) and the driver's CPU seconds (this process: all its threads, Ray Data's scheduling loop and
Ray's core worker included) per 1,000 rows; the growth between the two sizes per further 1,000 rows is the per-row
cost. Target (issue 13): <= 0.005 s per 1,000 rows.

Part of the driver's CPU is bound to time, not rows (Ray Data's scheduling loop, the consumer's polls, Ray's own
threads), and on two cores the larger size also takes longer, so that part lands in the growth too. Each repeat
measures it first: a slowed pass (each call sleeps ``--slow-call-seconds``, rows are few) gives the driver's CPU-s
per second; the growth net of it (per further 1,000 rows, minus that rate times the extra seconds) is what rows
cost the driver when many machines make them.

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
    """Blocks (`jobs.planning.PlannedBlock`, as the planner makes them) of `videos_per_block` videos holding about
    `rows` rows: the sample under new URIs."""
    import ray

    from jobs.planning import PlannedBlock

    uris = sample.column("uri").to_pylist()
    per_video = len(uris) / len(set(uris))
    videos_needed = max(1, int(rows / per_video))
    refs, done = [], 0
    while done < videos_needed:
        parts = []
        for start in range(done, min(done + videos_per_block, videos_needed), len(set(uris))):
            renamed = [f"s3://bench/{start + sorted(set(uris)).index(u):09d}.mp4" for u in uris]
            parts.append(sample.set_column(sample.schema.get_field_index("uri"), "uri", pa.array(renamed)))
        block = pa.concat_tables(parts).combine_chunks()  # contiguous, as the job's rows are made
        refs.append(PlannedBlock.of(ray.put(block), block))
        done += videos_per_block
    return refs


class _Embedder:
    """Stands for the job's decode and embed actor: a block of videos in, their output rows out (after `delay`
    seconds: the slowed pass that measures the driver's time-bound work)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.delay:
            time.sleep(self.delay)
        return table


def time_drain(
    refs: list[Any], out: Path, *, model: Any, rows_per_video: int, delay: float = 0.0
) -> tuple[float, float, int]:
    """(seconds, driver CPU seconds, rows committed) of the job's driver loop over `refs` (each block handed on after
    `delay` seconds)."""
    import ray

    from index.commits import Committer
    from index.delta_tables import OutputLocation, create_tables
    from jobs.config import IndexJobConfig
    from jobs.pipeline import _CALL_VIDEOS, Commits, RunHooks, blocks_dataset, drain

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
    ds = blocks_dataset(refs).map_batches(
        _Embedder,
        fn_constructor_kwargs={"delay": delay},
        batch_format="pyarrow",
        zero_copy_batch=True,
        batch_size=rows_per_video * _CALL_VIDEOS,  # as the job's calls: of its block's videos, a few at a time
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
    parser.add_argument("--videos-per-block", type=int, nargs="+", default=[512, 2048], help="videos per input block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--whole-videos-only", action="store_true", help="one row per video (a run without --segment-seconds)"
    )
    parser.add_argument(
        "--slow-call-seconds", type=float, default=2.0, help="per call in the slowed pass (the time-bound work)"
    )
    parser.add_argument("--slow-blocks", type=int, default=4, help="blocks in the slowed pass")
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
        videos = len(set(sample.column("uri").to_pylist()))
        per_video = sample.num_rows // videos
        print(f"sample: {sample.num_rows} rows from {videos} videos", flush=True)
        results: dict[tuple[int, int], list[tuple[float, float, int]]] = {
            (b, n): [] for b in args.videos_per_block for n in args.rows
        }
        idle: list[float] = []  # driver CPU-s per second of the slowed pass
        for repeat in range(args.repeats):
            refs = blocks_of(
                sample, args.slow_blocks * args.videos_per_block[-1] * per_video, args.videos_per_block[-1]
            )
            s, c, _ = time_drain(
                refs, work / "out", model=model, rows_per_video=per_video, delay=args.slow_call_seconds
            )
            idle.append(c / s)
            print(f"repeat {repeat + 1}, slowed pass: {s:.1f} s, driver {c:.2f} CPU-s ({c / s:.3f} per s)", flush=True)
            for b, n in results:
                refs = blocks_of(sample, n, b)
                measured = time_drain(refs, work / "out", model=model, rows_per_video=per_video)
                del refs
                results[b, n].append(measured)
                s, c, r = measured
                print(
                    f"repeat {repeat + 1}, {b} videos per block: {r} rows in {s:.1f} s, driver {c:.2f} CPU-s",
                    flush=True,
                )
    report(args, results, statistics.median(idle))


def report(
    args: argparse.Namespace, results: dict[tuple[int, int], list[tuple[float, float, int]]], idle: float
) -> None:
    print(f"\nmedians over {args.repeats} repeats")
    print(f"driver's time-bound work (the slowed pass): {idle:.3f} CPU-s per second")
    print(f"{'videos/block':>12} {'rows':>8} {'seconds':>8} {'rows/s':>8} {'driver CPU-s':>12} {'per 1,000 rows':>15}")
    for b in args.videos_per_block:
        med = {}
        for n in args.rows:
            s, c, r = (statistics.median(x[i] for x in results[b, n]) for i in range(3))
            med[n] = (s, c, r)
            print(f"{b:>12} {int(r):>8} {s:>8.1f} {r / s:>8.0f} {c:>12.2f} {1000 * c / r:>15.4f}")
        (s0, c0, r0), (s1, c1, r1) = med[args.rows[0]], med[args.rows[1]]
        net = (c1 - c0) - idle * (s1 - s0)
        print(
            f"{'':>12} per further 1,000 rows: {1000 * (c1 - c0) / (r1 - r0):.4f} driver CPU-s, "
            f"{1000 * net / (r1 - r0):.4f} net of the time-bound work (target <= 0.005)"
        )


if __name__ == "__main__":
    main()

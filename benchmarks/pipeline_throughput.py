"""End-to-end indexing job throughput against decoding alone, on the same videos and the same cores.

Decode-only: one process per core running the job's own decode stage over the videos. Job: the real indexing run
(list, plan, decode on Ray actors, embed + label, write Parquet, commit, build the index) on an embedded Ray with
the same number of CPUs. Target: the job reaches >= 70% of decode-only throughput. Medians over repeats.

    python benchmarks/pipeline_throughput.py --num-videos 24 --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitaclip.samples import write_sample_video  # noqa: E402
from vitaclip.stages import DecodeStage  # noqa: E402

_STAGE: DecodeStage | None = None


def _init_worker(num_frames: int, size: int) -> None:
    global _STAGE
    _STAGE = DecodeStage(num_frames=num_frames, size=size)


def _decode(path: str) -> str:
    assert _STAGE is not None
    return str(_STAGE.decode_one(path, os.path.getsize(path))[0]["status"])


def make_videos(folder: Path, count: int, seconds: float, width: int, height: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    fps = 24
    paths = []
    for i in range(count):
        path = folder / f"bench-{i:03d}.mp4"
        if not path.exists():
            write_sample_video(
                path,
                num_frames=int(seconds * fps),
                fps=fps,
                width=width,
                height=height,
                gop=2 * fps,
                bframes=2,
                pattern="shape",
                seed=i,
            )
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-videos", type=int, default=24)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="vitaclip-tiny")
    p.add_argument("--videos-dir", default=None, help="reuse generated videos from here")
    args = p.parse_args(argv)

    import ray

    import vitaclip
    from jobs.config import IndexJobConfig
    from jobs.pipeline import run_index_job
    from vitaclip.model import backbone_model_config

    config = vitaclip.get_model_config(args.model)
    size = int(backbone_model_config(config)["vision_cfg"]["image_size"])
    work = Path(args.videos_dir or tempfile.mkdtemp(prefix="vitaclip-bench-"))
    videos = make_videos(work / "videos", args.num_videos, args.seconds, args.width, args.height)
    print(
        f"{len(videos)} videos, {args.seconds:g} s {args.width}x{args.height} H.264 (keyframe every 2 s, B-frames); "
        f"{args.cpus} CPUs; model {args.model} ({config.num_frames} frames at {size} px)"
    )

    decode_times = []
    ctx = mp.get_context("spawn")
    for _ in range(args.repeats):
        with ctx.Pool(args.cpus, initializer=_init_worker, initargs=(config.num_frames, size)) as pool:
            pool.map(_decode, [str(videos[0])] * args.cpus)  # warm up every worker
            start = time.perf_counter()
            statuses = pool.map(_decode, [str(v) for v in videos], chunksize=1)
            decode_times.append(time.perf_counter() - start)
        assert set(statuses) == {"ok"}, statuses

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    job_times = []
    for i in range(args.repeats + 1):  # the first run warms up Ray's workers and is not counted
        out = work / f"out-{i}"
        shutil.rmtree(out, ignore_errors=True)
        job = IndexJobConfig(inputs=(str(work / "videos"),), output=str(out), model=args.model, random_weights=True)
        start = time.perf_counter()
        summary = run_index_job(job)
        elapsed = time.perf_counter() - start
        assert summary["status"] == {"ok": len(videos)}, summary["status"]
        if i:
            job_times.append(elapsed)
    ray.shutdown()

    decode_vps = len(videos) / statistics.median(decode_times)
    job_vps = len(videos) / statistics.median(job_times)
    print(f"\n{'':28s} {'videos/s':>9s}  (median of {args.repeats})")
    print(f"{'decode only':28s} {decode_vps:9.2f}")
    print(f"{'indexing job end to end':28s} {job_vps:9.2f}")
    ratio = job_vps / decode_vps
    print(f"\njob / decode-only: {ratio:.2f} (target >= 0.70: {'met' if ratio >= 0.7 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU seconds and peak memory per video: ``vitaclip.video.decode_clip`` versus decoding every frame.

The naive way is what the official Vita-CLIP loader does: decode every frame of the video, convert each to an RGB
array at full resolution, then keep T of them and resize those. Both run single-threaded (one decoder per core is how
the indexing jobs are laid out), on generated 720p clips: H.264 with a keyframe every 2 s and B-frames, 10 s and 60 s
long (10 min with ``--long``), plus VP9 and HEVC.

CPU time is process time (medians over ``--repeats`` runs in this process). Peak memory is measured once per video
and method in a fresh subprocess: the resident-set high-water mark minus the resident set just before decoding
(FFmpeg's own buffers included), and tracemalloc's peak (Python-allocated memory only: arrays that wrap FFmpeg
frames are invisible to it).

Run from the repository root: ``python -m benchmarks.decode_throughput`` (``--long`` adds the 10-minute clip,
``--quick`` is a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from vitaclip.samples import write_sample_video
from vitaclip.video import DecodeStats, Uniform, decode_clip, probe

FPS = 30
WIDTH, HEIGHT = 1280, 720
NAIVE_KEEP_ALL_LIMIT_BYTES = 12 << 30  # beyond this the naive loader would not fit here: keep only the T frames
_EMPTY = np.zeros((0, 0, 3), dtype=np.uint8)


@dataclass(frozen=True)
class Video:
    codec: str
    seconds: int
    path: Path

    @property
    def label(self) -> str:
        return f"{self.codec} {self.seconds}s 720p"


@dataclass
class Result:
    cpu_seconds: float
    wall_seconds: float
    frames_decoded: int
    pts_seconds: list[float]
    kept_all_frames: bool = True


def _ensure_video(workdir: Path, codec: str, seconds: int) -> Video:
    ext = {"h264": "mp4", "hevc": "mkv", "vp9": "webm"}[codec]
    path = workdir / f"{codec}_{seconds}s_{HEIGHT}p.{ext}"
    if not path.exists():
        started = time.monotonic()
        tmp = path.with_name("tmp_" + path.name)
        write_sample_video(
            tmp,
            num_frames=seconds * FPS,
            fps=FPS,
            width=WIDTH,
            height=HEIGHT,
            codec=codec,  # type: ignore[arg-type]
            gop=2 * FPS,
            bframes=2,
            pattern="shape",
        )
        os.replace(tmp, path)
        print(f"  wrote {path.name} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return Video(codec, seconds, path)


def _uniform_positions(pts_seconds: list[float], duration: float, num_frames: int) -> list[int]:
    """The same rule as decode_clip: the frame on screen at the centre of each of T equal slices."""
    positions = []
    for i in range(num_frames):
        t = (i + 0.5) * duration / num_frames + 1e-6
        k = int(np.searchsorted(np.asarray(pts_seconds), t, side="right")) - 1
        positions.append(max(k, 0))
    return positions


def _resize_crop(frames: list[np.ndarray], size: int) -> np.ndarray:
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [T, size, size, 3]


def naive_clip(path: Path, *, num_frames: int, size: int) -> Result:
    """Decode every frame, convert every frame to RGB, then pick T (the official loader's approach)."""
    started_cpu, started_wall = time.process_time(), time.monotonic()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        stream.codec_context.thread_type = "SLICE"
        assert stream.time_base is not None and stream.average_rate is not None
        fps = float(stream.average_rate)
        count = stream.frames or round(float(container.duration or 0) / 1e6 * fps)
        keep_all = count * stream.codec_context.width * stream.codec_context.height * 3 <= NAIVE_KEEP_ALL_LIMIT_BYTES
        wanted: set[int] = set()
        if not keep_all:  # too big to hold here: positions from the nominal rate, convert all, keep T
            wanted = set(_uniform_positions([k / fps for k in range(count)], count / fps, num_frames))
        frames: list[np.ndarray] = []
        pts: list[float] = []
        first = None
        for k, frame in enumerate(container.decode(stream)):
            rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3], every frame
            seconds = float(frame.pts * stream.time_base) if frame.pts is not None else k / fps
            first = seconds if first is None else first
            pts.append(seconds - first)
            frames.append(rgb if keep_all or k in wanted else _EMPTY)
    duration = pts[-1] + 1 / fps
    positions = _uniform_positions(pts, duration, num_frames)
    _resize_crop([frames[k] for k in positions], size)
    cpu, wall = time.process_time() - started_cpu, time.monotonic() - started_wall
    return Result(cpu, wall, len(pts), [pts[k] for k in positions], keep_all)


def vitaclip_clip(path: Path, *, num_frames: int, size: int) -> Result:
    started_cpu, started_wall = time.process_time(), time.monotonic()
    stats = DecodeStats()
    clip = decode_clip(path, Uniform(num_frames), size=size, num_threads=1, stats=stats)
    return Result(
        time.process_time() - started_cpu,
        time.monotonic() - started_wall,
        stats.frames_decoded,
        clip.pts_seconds.tolist(),
    )


METHODS: dict[str, Callable[..., Result]] = {"naive": naive_clip, "vitaclip": vitaclip_clip}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(method: str, path: Path, num_frames: int, size: int) -> int:
    """Measure one run's memory in this fresh process and print it as JSON."""
    # VmHWM, not getrusage's ru_maxrss: the latter survives exec and can report the parent's peak.
    before = _status_bytes("VmRSS")
    tracemalloc.start()
    METHODS[method](path, num_frames=num_frames, size=size)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = _status_bytes("VmHWM")
    print(json.dumps({"rss_peak_delta_mb": max(0, peak - before) / 2**20, "traced_peak_mb": traced_peak / 2**20}))
    return 0


def _memory(method: str, video: Video, num_frames: int, size: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.decode_throughput", "--child", method, str(video.path)]
    cmd += ["--num-frames", str(num_frames), "--size", str(size)]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="also a 10-minute H.264 clip")
    parser.add_argument("--quick", action="store_true", help="10 s clips only, one repeat, no memory runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codecs", default="h264,vp9,hevc")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "vitaclip-bench")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        return _child(args.child[0], Path(args.child[1]), args.num_frames, args.size)

    args.workdir.mkdir(parents=True, exist_ok=True)
    durations = [10] if args.quick else [10, 60]
    repeats = 1 if args.quick else args.repeats
    videos = []
    for codec in args.codecs.split(","):
        for seconds in durations:
            videos.append(_ensure_video(args.workdir, codec, seconds))
    if args.long:
        videos.append(_ensure_video(args.workdir, "h264", 600))

    print(f"T={args.num_frames} uniform, size {args.size}, single-threaded decode, {repeats} repeats (median)")
    print(
        f"{'video':<18}{'Mbps':>6}{'frames':>8}  {'method':<9}{'cpu s':>8}{'wall s':>8}{'decoded':>9}"
        f"{'rss MB':>9}{'py MB':>9}"
    )
    ratios = []
    for video in videos:
        info = probe(video.path)
        mbps = video.path.stat().st_size * 8 / info.duration_seconds / 1e6
        rows = {}
        for method, run in METHODS.items():
            run(video.path, num_frames=args.num_frames, size=args.size)  # warm the page cache
            results = [run(video.path, num_frames=args.num_frames, size=args.size) for _ in range(repeats)]
            memory = {} if args.quick or args.no_memory else _memory(method, video, args.num_frames, args.size)
            rows[method] = (results, memory)
            cpu = statistics.median(r.cpu_seconds for r in results)
            wall = statistics.median(r.wall_seconds for r in results)
            rss = f"{memory['rss_peak_delta_mb']:9.0f}" if memory else f"{'-':>9}"
            traced = f"{memory['traced_peak_mb']:9.1f}" if memory else f"{'-':>9}"
            print(
                f"{video.label:<18}{mbps:6.1f}{info.num_frames:8d}  {method:<9}{cpu:8.3f}{wall:8.3f}"
                f"{results[0].frames_decoded:9d}{rss}{traced}"
            )
        if not rows["naive"][0][0].kept_all_frames:
            print(
                f"  (naive converted every frame but kept only T: all {info.num_frames} would not fit in memory here)"
            )
        naive_pts, ours_pts = rows["naive"][0][0].pts_seconds, rows["vitaclip"][0][0].pts_seconds
        if not np.allclose(naive_pts, ours_pts, atol=1e-6):
            print(f"  WARNING: the two methods picked different frames: {naive_pts} vs {ours_pts}")
        cpu_ratio = statistics.median(r.cpu_seconds for r in rows["naive"][0]) / statistics.median(
            r.cpu_seconds for r in rows["vitaclip"][0]
        )
        mem_ratio = None
        if rows["naive"][1] and rows["vitaclip"][1]:
            mem_ratio = rows["naive"][1]["rss_peak_delta_mb"] / max(rows["vitaclip"][1]["rss_peak_delta_mb"], 1.0)
        ratios.append((video, cpu_ratio, mem_ratio))

    print("\nnaive / vitaclip (higher is better for vitaclip)")
    failed = False
    for video, cpu_ratio, mem_ratio in ratios:
        target = 1.5 if video.seconds <= 10 else 5.0
        verdict = "meets" if cpu_ratio >= target else "MISSES"
        failed |= cpu_ratio < target
        mem = f", peak RSS {mem_ratio:.1f}x" if mem_ratio is not None else ""
        print(f"  {video.label:<18} CPU {cpu_ratio:5.1f}x (target {target}x: {verdict}){mem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

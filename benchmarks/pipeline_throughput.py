"""End-to-end indexing job throughput against decoding alone, on the same videos and the same cores.

Decode-only: one process per core running the job's own decode stage over the videos (the processes are started
and warmed up before timing). Job: the real indexing run (list, plan, decode tasks, embed + label actor, write
Parquet, commit, build the index) on an embedded Ray with the same number of CPUs, started before timing; one
untimed run warms Ray up. Target: the job reaches >= 80% of decode-only throughput.

Each run of the job pays a fixed cost whatever the number of videos (its actors' processes starting, the embed actor
importing torch and open_clip and building the model and the label features, commit, index build), so the ratio
grows with the number of videos. Given several ``--num-videos``, the benchmark fits ``job seconds = fixed + videos *
per_video`` through the smallest and the largest set and reports both ratios: end to end (fixed cost included) per
set, and steady state (fixed cost excluded, from the slopes).

The two sides are timed alternately, one decode-only pass then one job run per repeat. A job run starts once the
previous run's actors have exited (their teardown belongs to the previous run). On a shared machine, each timed pass
waits for other processes to go quiet and is repeated when they, or the host (a virtual machine's stolen time), kept
more than ``--max-other-cores`` busy during it; the cores they used are printed for every pass.

With ``--decode-stage`` each repeat also times the job's decoding alone on Ray Data (the run's Dataset with embed
actors that have no model: the blocks its planner cuts are decoded by the same tasks and the frames dropped;
planned before timing): decode-only against it is what Ray Data and the decode tasks cost, it against the job
what the model, planning, writes and commits cost.

    python benchmarks/pipeline_throughput.py --num-videos 96 384 --repeats 3 --videos-dir /tmp/vitaclip-bench
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from vitaclip.samples import write_sample_video
from vitaclip.stages import DecodeStage

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


def video_set(work: Path, videos: list[Path]) -> Path:
    """A folder holding exactly ``videos`` (hard links, copies where linking fails): the job's input."""
    folder = work / "sets" / str(len(videos))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for video in videos:
        try:
            os.link(video, folder / video.name)
        except OSError:
            shutil.copy2(video, folder / video.name)
    return folder


def _proc_table() -> dict[int, tuple[int, float, bytes]]:
    """``pid -> (parent pid, CPU seconds of the process and its reaped children, command line)`` from Linux /proc."""
    table: dict[int, tuple[int, float, bytes]] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        table[int(entry.name)] = (int(fields[1]), (utime + stime + cutime + cstime) / ticks, cmdline)
    return table


def _own_processes(table: dict[int, tuple[int, float, bytes]]) -> set[int]:
    """This process and its descendants: the decode pool, and Ray's processes and workers (embedded Ray)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    own, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        own.add(pid)
        todo.extend(children.get(pid, []))
    return own


def _steal_seconds() -> float:
    """CPU seconds the hypervisor gave to others while this machine's CPUs wanted to run (``steal`` in /proc/stat,
    all CPUs together; 0 on bare metal)."""
    # cpu user nice system idle iowait irq softirq steal ...
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


class _Snapshot:
    """CPU seconds of every process, which of them are ours, and the machine's stolen CPU time, at one moment."""

    def __init__(self) -> None:
        self.table = _proc_table()
        self.own = _own_processes(self.table)
        self.steal = _steal_seconds()


def _other_cpu_seconds(before: _Snapshot, after: _Snapshot) -> float:
    """CPU seconds that processes other than ours used between two snapshots, and that the host took from this
    virtual machine (steal: its other tenants, on a shared host).

    Processes are ours if they were descendants of this one at either moment (Ray's workers come and go, and the
    ones that exit take their CPU time with them, so ours are not counted by subtraction from the machine's total).
    """
    ours = before.own | after.own
    others = sum(
        cpu - before.table.get(pid, (0, 0.0, b""))[1] for pid, (_, cpu, _) in after.table.items() if pid not in ours
    )
    return others + max(0.0, after.steal - before.steal)


def _other_cores(seconds: float) -> float:
    """Cores that other processes (or the host) kept busy over the next ``seconds``."""
    before = _Snapshot()
    time.sleep(seconds)
    return _other_cpu_seconds(before, _Snapshot()) / seconds


def timed(run: Callable[[], float], *, max_other_cores: float, tries: int) -> tuple[float, float]:
    """Runs ``run`` (which returns the seconds it timed) on a quiet machine: ``(seconds, other processes' cores)``.

    This machine may be shared. Before each try it waits (up to a minute) until other processes use less than
    ``max_other_cores``; a try during which they used more is repeated, up to ``tries`` times, and the last is kept.
    Without Linux /proc, it just runs once (and reports NaN).
    """
    if not Path("/proc/stat").exists():
        return run(), float("nan")
    other = float("nan")
    for _ in range(tries):
        deadline = time.monotonic() + 60.0
        while _other_cores(1.0) > max_other_cores and time.monotonic() < deadline:
            pass
        before = _Snapshot()
        start = time.perf_counter()
        seconds = run()
        wall = time.perf_counter() - start
        other = _other_cpu_seconds(before, _Snapshot()) / wall
        if other <= max_other_cores:
            break
    return seconds, other


def wait_for_actors_to_exit(timeout_seconds: float = 30.0) -> None:
    """Waits until no Ray Data actor process of ours is left from the previous run.

    Ray Data drops its actors when a run's Dataset is released; they exit in the background, and the embed actor's
    interpreter teardown (torch loaded) costs about a CPU-second. Without this wait that cost would land in the next
    timed run. Linux only (reads /proc); elsewhere it sleeps a few seconds instead.
    """
    if not Path("/proc/stat").exists():
        time.sleep(3.0)
        return
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        table = _proc_table()
        if not any(table[pid][2].startswith(b"ray::MapWorker") for pid in _own_processes(table)):
            return
        time.sleep(0.1)


def time_decode_only(videos: list[Path], *, cpus: int, num_frames: int, size: int) -> float:
    ctx = mp.get_context("spawn")
    with ctx.Pool(cpus, initializer=_init_worker, initargs=(num_frames, size)) as pool:
        pool.map(_decode, [str(videos[0])] * cpus)  # warm up every worker
        start = time.perf_counter()
        statuses = pool.map(_decode, [str(v) for v in videos], chunksize=1)
        elapsed = time.perf_counter() - start
    assert set(statuses) == {"ok"}, statuses
    return elapsed


DRIVER_CPU: dict[int, list[tuple[float, int]]] = {}  # videos -> (driver CPU seconds, rows) per job run
PHASES: dict[int, list[dict[str, float]]] = {}  # videos -> the run record's phase_seconds per job run


def _cpu_seconds() -> float:
    """CPU seconds of this process (the driver: its threads, Ray's core worker included), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_job(folder: Path, out: Path, *, model: str, count: int) -> float:
    from jobs.config import IndexJobConfig
    from jobs.pipeline import run_index_job

    shutil.rmtree(out, ignore_errors=True)
    job = IndexJobConfig(inputs=(str(folder),), output=str(out), model=model, random_weights=True)
    start = time.perf_counter()
    cpu_start = _cpu_seconds()
    summary = run_index_job(job)
    elapsed = time.perf_counter() - start
    DRIVER_CPU.setdefault(count, []).append((_cpu_seconds() - cpu_start, int(summary["clips_embedded"])))
    PHASES.setdefault(count, []).append(summary["phase_seconds"])
    assert summary["status"] == {"ok": count}, summary["status"]
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def _decode_only_stage() -> type:
    """The job's `jobs.decode_embed.DecodeEmbed` with no model: its decode tasks' clips are dropped."""
    from jobs.decode_embed import DecodeEmbed

    class DecodeOnly(DecodeEmbed):
        def load_embed(self, embed: dict[str, Any]) -> Any:
            return None

        def _embed(self, clips: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in clips.items() if k != "frames"}

    return DecodeOnly


def time_decode_stage(folder: Path, out: Path, *, model: str, count: int) -> float:
    """The job's decode tasks alone on Ray Data (its Dataset with an actor that has the blocks the job's planner
    cuts for this set decoded by the same tasks, and drops the frames): the part of the job's cost that is Ray Data
    and decoding, with no model, writes or commits. Planning is done before timing."""
    import ray

    from index.delta_tables import create_tables
    from jobs.config import IndexJobConfig
    from jobs.pipeline import index_dataset, plan_index_pools_for, plan_run, resolve_run_model, run_listing
    from jobs.storage import open_store

    shutil.rmtree(out, ignore_errors=True)
    job = IndexJobConfig(inputs=(str(folder),), output=str(out), model=model, random_weights=True)
    resolved = resolve_run_model(job)
    location = open_store(job.output).location
    versions = create_tables(location, resolved.embed_dim, model_id=resolved.model_id)
    pools, _ = plan_index_pools_for(job)
    planner, blocks = plan_run(run_listing(job), location, resolved, versions, (str(folder),), pools)
    start = time.perf_counter()
    rows = sum(
        int(bundle.num_rows() or 0)
        for bundle in index_dataset(
            job, blocks, resolved, pools, stage=_decode_only_stage()
        ).iter_internal_ref_bundles()
    )
    elapsed = time.perf_counter() - start
    ray.kill(planner)  # after the Dataset: it owns the blocks, as in the job
    assert rows == count, (rows, count)
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def time_passes(
    args: argparse.Namespace,
    sets: dict[int, Path],
    videos: list[Path],
    *,
    num_frames: int,
    size: int,
    quiet: dict[str, Any],
) -> tuple[
    dict[int, list[float]], dict[int, list[float]], dict[int, list[float]], dict[int, list[tuple[float, float]]]
]:
    """Per set, ``--repeats`` times: a decode-only pass, a job run (and the decode stage alone with
    ``--decode-stage``), alternating. Returns their seconds and the cores other processes used meanwhile."""
    decode_times: dict[int, list[float]] = {n: [] for n in sets}
    job_times: dict[int, list[float]] = {n: [] for n in sets}
    stage_times: dict[int, list[float]] = {n: [] for n in sets}
    other_cores: dict[int, list[tuple[float, float]]] = {n: [] for n in sets}
    for n in sorted(sets):
        for _ in range(args.repeats):
            decode_pass = partial(time_decode_only, videos[:n], cpus=args.cpus, num_frames=num_frames, size=size)
            seconds, decode_other = timed(decode_pass, **quiet)
            decode_times[n].append(seconds)
            wait_for_actors_to_exit()
            seconds, job_other = timed(
                partial(time_job, sets[n], args.work / "out", model=args.model, count=n), **quiet
            )
            job_times[n].append(seconds)
            other_cores[n].append((decode_other, job_other))
            if args.decode_stage:
                wait_for_actors_to_exit()
                stage = partial(time_decode_stage, sets[n], args.work / "out", model=args.model, count=n)
                stage_times[n].append(timed(stage, **quiet)[0])
    return decode_times, job_times, stage_times, other_cores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--num-videos", type=int, nargs="+", default=[96, 384], help="set sizes; the verdict is on the largest"
    )
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="vitaclip-tiny")
    p.add_argument("--videos-dir", default=None, help="reuse generated videos from here")
    p.add_argument(
        "--max-other-cores",
        type=float,
        default=0.1,
        help="repeat a timed pass during which other processes kept more cores than this busy (shared machines)",
    )
    p.add_argument("--tries", type=int, default=4, help="most tries per timed pass")
    p.add_argument(
        "--decode-stage",
        action="store_true",
        help="also time the job's decoding alone on Ray Data (no model, writes or commits) in each repeat",
    )
    args = p.parse_args(argv)
    sizes = sorted(set(args.num_videos))
    if sizes[0] < 1 or args.repeats < 1:
        p.error("--num-videos and --repeats must be >= 1")

    import logging

    import ray

    import vitaclip

    config = vitaclip.get_model_config(args.model)
    size = config.image_size
    work = args.work = Path(args.videos_dir or tempfile.mkdtemp(prefix="vitaclip-bench-"))
    videos = make_videos(work / "videos", sizes[-1], args.seconds, args.width, args.height)
    sets = {n: video_set(work, videos[:n]) for n in sizes}
    print(
        f"{args.seconds:g} s {args.width}x{args.height} H.264 videos (keyframe every 2 s, B-frames); {args.cpus} CPUs; "
        f"model {args.model} ({config.num_frames} frames at {size} px); sets of {', '.join(map(str, sizes))} videos; "
        f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )

    start = time.perf_counter()
    from jobs.ray_resources import embedded_ray_options

    ray.init(**embedded_ray_options(args.cpus), log_to_driver=False)  # as the job starts its own
    ray_init_seconds = time.perf_counter() - start
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # progress lines: the job runs as usual, quieter
    start = time.perf_counter()
    time_job(sets[sizes[0]], work / "out", model=args.model, count=sizes[0])  # warm-up: not counted
    first_run_seconds = time.perf_counter() - start

    quiet: dict[str, Any] = dict(max_other_cores=args.max_other_cores, tries=args.tries)
    times = time_passes(args, sets, videos, num_frames=config.num_frames, size=size, quiet=quiet)
    decode_times, job_times, stage_times, other_cores = times
    wait_for_actors_to_exit()
    ray.shutdown()

    print(f"\nray.init {ray_init_seconds:.2f} s; warm-up run ({sizes[0]} videos) {first_run_seconds:.2f} s")
    report(sizes, decode_times, job_times, other_cores, repeats=args.repeats)
    if args.decode_stage:
        report_decode_stage(sizes, decode_times, job_times, stage_times)
    print("\nwhere a job run's time goes (median seconds per phase, the run record's phase_seconds):")
    for n in sizes:
        runs = PHASES[n][-args.repeats :]  # the timed runs, not the warm-up
        print(f"  {n:>5} videos: " + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0]))
    return 0


def report(
    sizes: list[int],
    decode_times: dict[int, list[float]],
    job_times: dict[int, list[float]],
    other_cores: dict[int, list[tuple[float, float]]],
    *,
    repeats: int,
) -> None:
    """Prints videos/s and the job / decode-only ratio per set, the driver's CPU per 1,000 rows and the fit."""
    header = f"{'videos':>6s} {'decode-only v/s':>16s} {'job v/s':>8s} {'job/decode':>11s}"
    print(f"\n{header}  (medians of {repeats})")
    medians: dict[int, tuple[float, float]] = {}
    for n in sizes:
        d, j = statistics.median(decode_times[n]), statistics.median(job_times[n])
        medians[n] = (d, j)
        print(f"{n:6d} {n / d:16.2f} {n / j:8.2f} {d / j:11.2f}")
    print("\nper repeat: decode-only s / job s (cores other processes or the host kept busy during each)")
    for n in sizes:
        passes = zip(decode_times[n], job_times[n], other_cores[n], strict=True)
        print(f"{n:6d}  " + "  ".join(f"{dt:.2f} ({do:.2f}) / {jt:.2f} ({jo:.2f})" for dt, jt, (do, jo) in passes))
    ratio = medians[sizes[-1]][0] / medians[sizes[-1]][1]
    verdict = "met" if ratio >= 0.8 else "NOT met"
    print(f"\nend to end, fixed cost included ({sizes[-1]} videos): job / decode-only = {ratio:.2f}")
    print(f"  target >= 0.80: {verdict}")
    print("\ndriver CPU seconds per 1,000 rows (the whole run on the driver: planning, commits, the index update)")
    for n in sizes:
        runs = DRIVER_CPU.get(n, [])[1:] if n == sizes[0] else DRIVER_CPU.get(n, [])  # the warm-up is not counted
        if runs:
            per_1000 = statistics.median(1000 * cpu / max(rows, 1) for cpu, rows in runs)
            print(f"{n:6d} videos: {per_1000:.4f} s (the run's fixed driver work included)")
    if len(sizes) > 1 and DRIVER_CPU.get(sizes[0]) and DRIVER_CPU.get(sizes[-1]):
        # The growth between the sets: what each further row costs the driver (target <= 0.005 s per 1,000).
        small = statistics.median(cpu for cpu, _ in DRIVER_CPU[sizes[0]][1:] or DRIVER_CPU[sizes[0]])
        large = statistics.median(cpu for cpu, _ in DRIVER_CPU[sizes[-1]])
        rows = statistics.median(r for _, r in DRIVER_CPU[sizes[-1]]) - statistics.median(
            r for _, r in DRIVER_CPU[sizes[0]]
        )
        print(f"  per further 1,000 rows: {1000 * (large - small) / max(rows, 1):.4f} s (target <= 0.005)")
        rate = statistics.median(r for _, r in DRIVER_CPU[sizes[-1]]) / statistics.median(job_times[sizes[-1]])
        print(
            f"  (at {rate:.0f} rows/s this is the time-bound part, Ray Data's scheduling loop;"
            " benchmarks/driver_rows.py measures the driver at full row rate)"
        )
    if len(sizes) > 1:
        fit = _fit(sizes[0], sizes[-1], medians)
        print(f"steady state, fixed cost excluded: job / decode-only = {fit['ratio']:.2f}")
        print(
            f"  job: {fit['fixed_seconds']:.2f} s fixed per run + {1000 * fit['job_per_video']:.1f} ms per video; "
            f"decode-only: {1000 * fit['decode_per_video']:.1f} ms per video (fit through {sizes[0]}, {sizes[-1]})"
        )


def report_decode_stage(
    sizes: list[int],
    decode_times: dict[int, list[float]],
    job_times: dict[int, list[float]],
    stage_times: dict[int, list[float]],
) -> None:
    """Splits the gap between decode-only and the job: Ray Data with the decoding alone, then the rest."""
    print("\nthe job's decode tasks alone on Ray Data (its embed actors without a model, no writes or commits)")
    print(f"{'videos':>6s} {'stage v/s':>10s} {'stage/decode-only':>18s} {'job/stage':>10s}  (medians)")
    for n in sizes:
        d, j, st = (statistics.median(t[n]) for t in (decode_times, job_times, stage_times))
        print(f"{n:6d} {n / st:10.2f} {d / st:18.2f} {st / j:10.2f}")


def _fit(small: int, large: int, medians: dict[int, tuple[float, float]]) -> dict[str, Any]:
    """Seconds per video (slope) and fixed seconds per run (intercept) through two set sizes."""
    (d_small, j_small), (d_large, j_large) = medians[small], medians[large]
    job_per_video = (j_large - j_small) / (large - small)
    decode_per_video = (d_large - d_small) / (large - small)
    return {
        "job_per_video": job_per_video,
        "decode_per_video": decode_per_video,
        "fixed_seconds": j_large - large * job_per_video,
        "ratio": decode_per_video / job_per_video if job_per_video > 0 else float("nan"),
    }


if __name__ == "__main__":
    sys.exit(main())

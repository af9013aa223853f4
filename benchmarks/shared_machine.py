"""The indexing job on a machine it shares: its embedded Ray's worker niceness (0) against Ray's default (15).

Each pass runs the job as a user does (its own process, `python -m jobs.index_videos` with its embedded Ray, every
default but the model) over the same videos, once with nothing else running and once beside ``--busy`` processes that
keep a core busy each at the usual niceness 0 (another program, a second job, the other test worker in CI). Ray starts
its workers at niceness 15 by default, which gives them about 1/28 of a contended core under Linux's CFS weights;
the job sets 0 (`jobs.ray_resources.EMBEDDED_WORKER_NICENESS`). A pass still running after ``--timeout`` seconds is
stopped and printed as such. One untimed run first; then passes alternate between the settings; medians over
``--repeats``.

    python benchmarks/shared_machine.py --num-videos 16 --busy 2 --repeats 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline_throughput import make_videos

ROOT = Path(__file__).resolve().parents[1]
_DRIVER = (
    "import sys, jobs.ray_resources as r; r.EMBEDDED_WORKER_NICENESS = int(sys.argv[1]); "
    "from jobs.index_videos import main; sys.exit(main(sys.argv[2:]))"
)


def _spin(stop: object) -> None:
    while not stop.is_set():  # type: ignore[attr-defined]
        for _ in range(100_000):
            pass


def run_job(folder: Path, out: Path, *, niceness: int, model: str, timeout: float) -> float | None:
    """Seconds the job took, or None when it was still running after `timeout` (then it is stopped)."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(folder), "--output", str(out), "--model", model, "--random-weights"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(niceness), *argv],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Its own process group (its embedded Ray's processes join it: stopped together), but this session: Linux
        # weighs niceness only between processes of one scheduling group (a session, under autogroup), where the
        # busy processes are too, as in one terminal, one container's session or one CI job.
        preexec_fn=os.setpgrp,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the job exited with {proc.returncode}:\n{err[-3000:]}")
    return time.perf_counter() - start


def timed_pass(folder: Path, out: Path, *, busy: int, niceness: int, model: str, timeout: float) -> float | None:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    spinners = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
    for p in spinners:
        p.start()
    try:
        return run_job(folder, out, niceness=niceness, model=model, timeout=timeout)
    finally:
        stop.set()
        for p in spinners:
            p.join(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-videos", type=int, default=16)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes beside the job (one per core)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds after which a pass is stopped")
    p.add_argument("--model", default="vitaclip-tiny")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vitaclip-shared-"))
    try:
        folder = work / "videos"
        make_videos(folder, args.num_videos, args.seconds, 640, 360)
        print(f"{args.num_videos} videos of {args.seconds:g} s, model {args.model}, {os.cpu_count()} cores")
        # Untimed: the first run of a session pays for reading the videos and the code from disk.
        run_job(folder, work / "out", niceness=0, model=args.model, timeout=args.timeout)
        cases = [(busy, nice) for busy in (0, args.busy) for nice in (0, 15)]
        seconds: dict[tuple[int, int], list[float | None]] = {case: [] for case in cases}
        for _ in range(args.repeats):
            for busy, nice in cases:
                took = timed_pass(
                    folder, work / "out", busy=busy, niceness=nice, model=args.model, timeout=args.timeout
                )
                seconds[busy, nice].append(took)
                shown = f"{took:.1f} s" if took is not None else f"stopped after {args.timeout:.0f} s"
                print(f"  {busy} busy processes, worker niceness {nice:>2}: {shown}", flush=True)
        print("\nmedians (a stopped pass counts as its timeout, so a ratio with one is a lower bound):")
        med = {case: statistics.median(args.timeout if t is None else t for t in ts) for case, ts in seconds.items()}
        for busy in (0, args.busy):
            ratio = med[busy, 15] / med[busy, 0]
            print(f"  {busy} busy: niceness 0 {med[busy, 0]:.1f} s, 15 {med[busy, 15]:.1f} s; 15 / 0 = {ratio:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a run with 10 new videos costs as the output grows: N = 0, 100k and 1M committed rows, side by side.

For each N, an output is built with N synthetic committed rows of the run's model (vitaclip-demo): realistic
thumbnails (JPEGs of generated frames, about 5 KB), L2-normalised embeddings, committed through the real Delta
layer in data files of `--rows-per-file` rows, and its index is built once, as earlier runs would have left it.
Then the real job (`python -m jobs.index_videos`, default flags, embedded Ray) indexes 10 new videos into it,
`--repeats` times on fresh copies of the output, alternating the sizes. Measured per run:

- wall time of the job process;
- bytes read from storage by the job's processes (the driver, the raylet and every Ray worker: the sum of their
  ``rchar`` in /proc, sampled every 0.1 s); the growth over N = 0 divided by N is the bytes read per committed row
  (the model, the videos and Python's own files are read in every run alike);
- the driver's peak resident memory (``VmHWM``).

Each size is run with default flags and with ``--no-index``, which separates the tables' cost (listing, planning,
writing, commits) from the index update's.

Targets (issue 13): time(1M) / time(0) <= 1.2; <= 100 bytes read per committed row; driver memory growth <= 200 MB
at 1M rows. Linux only (/proc).

    python benchmarks/incremental_run.py --sizes 0 100000 1000000 --repeats 3 --work-dir /tmp/vitaclip-incremental
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
MODEL = "vitaclip-demo"


def _thumbnails(count: int, seed: int = 0) -> list[bytes]:
    """JPEG thumbnails (160x120) of noisy gradients: the size real frames compress to."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    y, x = np.mgrid[0:120, 0:160]
    for _ in range(count):
        base = (np.stack([x * rng.uniform(0.5, 1.5), y * rng.uniform(0.5, 2), x + y], -1) % 256).astype(np.float32)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def build_output(out: Path, rows: int, *, rows_per_file: int) -> None:
    """An output with `rows` committed ok video rows of the demo model, and its index."""
    from index.build import build_from_output
    from index.delta_tables import OutputLocation, commit, create_tables, table_schema, write_data_file
    from index.schema import row_id_for, video_id_for
    from jobs.storage import open_store
    from vitaclip.model import backbone_model_config
    from vitaclip.registry import model_id_for, resolve_config

    dim = int(backbone_model_config(resolve_config(MODEL, None))["embed_dim"])
    model_id = model_id_for(MODEL, None)
    location = OutputLocation.from_url(str(out))
    versions = create_tables(location, dim, model_id=model_id)
    thumbs = _thumbnails(256)
    rng = np.random.default_rng(1)
    schema = table_schema("videos", dim)
    now = datetime.now(timezone.utc)
    done = 0
    while done < rows:
        n = min(rows_per_file, rows - done)
        uris = [f"s3://archive/videos/{i:09d}.mp4" for i in range(done, done + n)]
        ids = [video_id_for(u) for u in uris]
        emb = rng.normal(size=(n, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        data = pa.table(
            {
                "video_id": ids,
                "row_id": [row_id_for(v) for v in ids],
                "uri": uris,
                "etag": [uuid.uuid4().hex for _ in range(n)],
                "size_bytes": rng.integers(10**6, 10**8, n),
                "duration_seconds": rng.uniform(5, 600, n),
                "fps": np.full(n, 30.0),
                "width": np.full(n, 1280, np.int32),
                "height": np.full(n, 720, np.int32),
                "codec": ["h264"] * n,
                "status": ["ok"] * n,
                "error_message": pa.nulls(n, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
                "labels": [["a", "b", "c", "d", "e"]] * n,
                "label_scores": [[0.5, 0.2, 0.1, 0.1, 0.1]] * n,
                "thumbnail_jpeg": [thumbs[i % len(thumbs)] for i in rng.integers(0, len(thumbs), n)],
                "model_id": [model_id] * n,
                "run_id": ["synthetic"] * n,
                "indexed_at": [now] * n,
                "attempts": np.ones(n, np.int32),
            }
        )
        name = f"part-synthetic-{uuid.uuid4().hex}.parquet"
        written = write_data_file(location, "videos", data.cast(schema, safe=False), name=name, embed_dim=dim)
        versions["videos"] = commit(
            location,
            "videos",
            adds=[written],
            removes=[],
            read_version=versions["videos"],
            app_id="synthetic",
            app_version=versions["videos"] + 1,
            metadata={},
        )
        done += n
    if rows:
        build_from_output(open_store(str(out)), model_id=model_id)


def _current_index(out: Path) -> None:
    """An output kept from an earlier benchmark gets its index rebuilt when this vitaclip writes another format."""
    from index.build import build_from_output
    from index.segments import INDEX_FORMAT_VERSION, IndexUnusableError, read_info
    from jobs.storage import open_store
    from vitaclip.registry import model_id_for

    try:
        if read_info(out / "index")["format_version"] == INDEX_FORMAT_VERSION:
            return
    except IndexUnusableError:
        pass
    started = time.perf_counter()
    build_from_output(open_store(str(out)), model_id=model_id_for(MODEL, None), rebuild=True)
    print(f"rebuilt the index of {out} in {time.perf_counter() - started:.0f} s", flush=True)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _proc_number(pid: int, file: str, key: str) -> int | None:
    """The first number after ``key`` in ``/proc/<pid>/<file>`` (None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _link_or_copy(source: str, target: str) -> None:
    """Data files never change once written: hard links make a copy of a large output cheap. The rest is copied
    (the index files are rewritten in place)."""
    if source.endswith(".parquet"):
        os.link(source, target)
    else:
        shutil.copy2(source, target)


def run_job(videos: Path, out: Path, *extra: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "jobs.index_videos", str(videos), "--output", str(out), "--model", MODEL, *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    start = time.perf_counter()
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reads: dict[int, int] = {}
    hwm = 0
    while job.poll() is None:
        for pid in _tree(job.pid):
            value = _proc_number(pid, "io", "rchar:")
            if value is not None:
                reads[pid] = max(reads.get(pid, 0), value)
        hwm = max(hwm, _proc_number(job.pid, "status", "VmHWM:") or 0)  # kB
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    output = job.stdout.read() if job.stdout else ""
    if job.returncode != 0:
        raise RuntimeError(f"the job failed:\n{output[-3000:]}")
    return {"seconds": seconds, "bytes_read": float(sum(reads.values())), "driver_peak_mb": hwm / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-videos", type=int, default=10)
    parser.add_argument("--rows-per-file", type=int, default=50_000, help="rows per synthetic data file")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/vitaclip-incremental"))
    args = parser.parse_args()
    from vitaclip.samples import write_sample_video

    work = args.work_dir
    videos = work / "new-videos"
    if not videos.is_dir():
        videos.mkdir(parents=True)
        for i in range(args.new_videos):
            write_sample_video(videos / f"new-{i:02d}.mp4", num_frames=48, fps=12, width=160, height=120, seed=i)
    for size in args.sizes:
        base = work / f"base-{size}"
        if not (base / "videos" / "_delta_log").is_dir():
            started = time.perf_counter()
            shutil.rmtree(base, ignore_errors=True)
            build_output(base, size, rows_per_file=args.rows_per_file)
            print(f"built an output of {size} rows in {time.perf_counter() - started:.0f} s", flush=True)
        elif size:
            _current_index(base)
    variants = {"job (default flags)": (), "job --no-index (tables only)": ("--no-index",)}
    results = {(v, size): [] for v in variants for size in args.sizes}  # type: dict[tuple[str, int], list[dict[str, float]]]
    for repeat in range(args.repeats):
        for size in args.sizes:
            for variant, extra in variants.items():
                out = work / "run"
                shutil.rmtree(out, ignore_errors=True)
                shutil.copytree(work / f"base-{size}", out, copy_function=_link_or_copy)
                measured = run_job(videos, out, *extra)
                results[variant, size].append(measured)
                print(f"repeat {repeat + 1}, {size:>9} rows, {variant}: {measured}", flush=True)
    median = {key: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for key, runs in results.items()}
    print(f"\nmedians over {args.repeats} runs of a job with {args.new_videos} new videos")
    for variant in variants:
        base = median[variant, args.sizes[0]]
        print(f"\n{variant}")
        print(f"{'committed rows':>15} {'seconds':>8} {'x time(0)':>9} {'MB read':>8} {'B/row':>6} {'driver MB':>10}")
        for size in args.sizes:
            m = median[variant, size]
            per_row = (m["bytes_read"] - base["bytes_read"]) / size if size else 0.0
            print(
                f"{size:>15} {m['seconds']:>8.1f} {m['seconds'] / base['seconds']:>9.2f} "
                f"{m['bytes_read'] / 1e6:>8.0f} {per_row:>6.1f} {m['driver_peak_mb']:>10.0f}"
            )


if __name__ == "__main__":
    main()

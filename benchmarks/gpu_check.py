"""GPU numbers in one command: the video encoder, half-precision agreement, FAISS, training steps and the indexing
job, written to one JSON report and a short table. Made for a GPU machine lent for ~15 minutes.

    bash scripts/gpu_check.sh                       # on the GPU machine, after the wheel folder (scripts/gpu_wheels.sh)
    python benchmarks/gpu_check.py --dry-run        # the same code paths on CPU with tiny sizes (< 2 min; CI runs it)

Sections (each with its own time budget; a section that fails or is skipped says why in the report, the others
still run):

- ``model``: vitaclip-b16 ``encode_video`` videos/s over a batch sweep in the embed stage's precision (float16
  autocast over float32 weights, SDPA attention) and with bf16 weights, peak memory and MFU; ``--compile`` adds a
  torch.compile run; ``--official-src`` times the official implementation with identical weights;
- ``stage``: the job's embed stage (uint8 frames in, labels out) on 512 random videos at batch 32 and 128: videos/s
  eager and, with ``--compile``, compiled, and the first call's seconds;
- ``agreement``: the embed stage (float16 autocast) against float32 on vitaclip-demo demo-world videos (top-1 labels,
  cosine) and on vitaclip-b16 random inputs (cosine);
- ``faiss``: flat and IVF indexes at 1M and 10M x 512 (GPU when faiss has GPU support): build seconds, recall@10
  against exact, single-query latency, queries/s in batches;
- ``train``: vitaclip-b16 training steps/s at batch 32 in the training precision (bf16 autocast on CUDA);
- ``job``: the indexing job on ~2,000 generated short videos with one embed actor on the GPU and decode tasks on
  the CPU cores: videos/s, GPU utilisation sampled during the run, decode cores one GPU needs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Dense tensor-core peaks (vendor spec sheets, SXM parts); float16 and bf16 run at the same rate on these.
PEAK_HALF_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class Budget:
    """Seconds a section may still start new work in."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """Every size the sections use, full or dry-run."""
    if args.dry_run:
        return {
            "model": "vitaclip-tiny",
            "batches": [1, 2],
            "repeats": 2,
            "agreement_videos": 8,
            "faiss_counts": [2000],
            "faiss_dim": 32,
            "train_batch": 2,
            "train_steps": 2,
            "job_videos": 6,
            "stage_videos": 8,
            "stage_batches": [4],
        }
    return {
        "model": "vitaclip-b16",
        "batches": [32, 64, 128, 256],
        "repeats": 10,
        "agreement_videos": 100,
        "faiss_counts": [1_000_000, 10_000_000],
        "faiss_dim": 512,
        "train_batch": 32,
        "train_steps": 10,
        "job_videos": 2000,
        "stage_videos": 512,
        "stage_batches": [32, 128],
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn`."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------- model


def _flops_per_video(model: Any, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_video(x[:1])
    return float(counter.get_total_flops())


def section_model(args: argparse.Namespace, device: torch.device, budget: Budget) -> dict[str, Any]:
    import vitaclip

    s = sizes(args)
    model = vitaclip.create_model(s["model"], device=device).eval()
    T, S = model.config.num_frames, model.image_size
    flops = _flops_per_video(model, torch.randn(1, T, 3, S, S, device=device))
    peak = next(
        (v for k, v in PEAK_HALF_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None
    )
    half = torch.float16  # the embed stage's CUDA precision; the dry run takes the same dtype path on the CPU
    runs: list[dict[str, Any]] = []
    for mode in ("fp16-autocast", "bf16-weights"):
        if mode == "bf16-weights":
            model.to(torch.bfloat16)
        for batch in s["batches"]:
            if budget.left() <= 0:
                break
            runs.append(_encode_run(model, mode, half, batch, T, S, device, s["repeats"], flops, peak))
    if args.compile and budget.left() > 0:
        model.float()
        compiled = torch.compile(model.encode_video)
        best = max((r for r in runs if r["mode"] == "fp16-autocast"), key=lambda r: r["videos_per_second"])
        runs.append(
            _encode_run(
                model,
                "fp16-autocast+compile",
                half,
                best["batch"],
                T,
                S,
                device,
                s["repeats"],
                flops,
                peak,
                encode=compiled,
            )  # fmt: skip
        )
    out: dict[str, Any] = {
        "model": s["model"],
        "num_frames": T,
        "gflops_per_video": round(flops / 1e9, 2),
        "runs": runs,
    }
    if args.official_src and budget.left() > 0:
        try:
            out["official"] = _official(args, s, device)
        except Exception as exc:  # a checkout that does not build: the timings above still count
            out["official"] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    elif args.official_src:
        out["official"] = {"skipped": "out of the section's time"}
    return out


def _encode_run(
    model: Any,
    mode: str,
    half: torch.dtype,
    batch: int,
    T: int,
    S: int,
    device: torch.device,
    repeats: int,
    flops: float,
    peak: float | None,
    encode: Callable[..., torch.Tensor] | None = None,
) -> dict[str, Any]:
    encode = encode or model.encode_video
    x = torch.randn(batch, T, 3, S, S, device=device).to(model.dtype)
    autocast = mode.startswith("fp16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=half, enabled=autocast):
            return encode(x)

    seconds = _time(run, device, repeats)
    vps = batch / seconds
    result: dict[str, Any] = {"mode": mode, "batch": batch, "videos_per_second": round(vps, 1)}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if peak:
        result["mfu"] = round(vps * flops / peak, 3)
    return result


def _official(args: argparse.Namespace, s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The official encoder and ours with identical weights, side by side: their float32 agreement, then videos/s
    of each in the same precision (bf16 autocast on a GPU, float32 on the CPU), rounds alternating, medians."""
    import model_throughput

    import vitaclip
    from vitaclip.checkpoints import config_from_official, convert_official_state

    config = vitaclip.get_model_config(s["model"])
    labels = list(vitaclip.load_label_set(config.label_set)) if config.label_set else ["a", "b"]
    official = model_throughput.build_official(args.official_src, config, labels)
    state = official.state_dict()
    model = vitaclip.VitaClip(config_from_official(state, config), label_names=labels)
    model.load_state_dict(convert_official_state(state), strict=True)
    official.to(device).eval()
    model.to(device).eval()
    batch = s["batches"][-2] if len(s["batches"]) > 1 else s["batches"][0]
    x = torch.randn(batch, config.num_frames, 3, model.image_size, model.image_size, device=device)
    x_official = x.permute(0, 2, 1, 3, 4).contiguous()  # the official layout, [B, 3, T, H, W]
    cuda = device.type == "cuda"
    with torch.inference_mode(), _exact_float32():
        ours = model.encode_video(x[:4], normalize=False)
        theirs = official.visual(x_official[:4])
    relative_error = float((ours - theirs).norm() / theirs.norm())
    precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    times: dict[str, list[float]] = {"official": [], "vitaclip": []}
    calls = {"official": lambda: official.visual(x_official), "vitaclip": lambda: model.encode_video(x)}
    with torch.inference_mode(), precision:
        for _ in range(3):
            for name, call in calls.items():
                times[name] += model_throughput.time_calls(call, repeats=s["repeats"], warmup=2, cuda=cuda)
    official.cpu(), model.cpu()
    rates = {name: batch / statistics.median(seconds) for name, seconds in times.items()}
    return {
        "batch": batch,
        "precision": "bf16-autocast" if cuda else "float32",
        "float32_relative_error": relative_error,
        "official_videos_per_second": round(rates["official"], 1),
        "vitaclip_videos_per_second": round(rates["vitaclip"], 1),
        "ratio": round(rates["vitaclip"] / rates["official"], 3),
    }


@contextmanager
def _exact_float32() -> Iterator[None]:
    """float32 without TF32 in matrix products and convolutions (the agreement check compares exact arithmetic)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------- stage


def section_stage(args: argparse.Namespace, device: torch.device, budget: Budget) -> dict[str, Any]:
    """The embed stage as the job's actors run it (uint8 frames from the host to labels back), eager and, with
    ``--compile``, compiled: videos/s per batch size and the first call's seconds (compiling)."""
    from vitaclip.stages import EmbedStage

    s = sizes(args)
    runs: list[dict[str, Any]] = []
    frames: np.ndarray | None = None
    for compiled in (False, True) if args.compile else (False,):
        for batch in s["stage_batches"]:
            if budget.left() <= 0:
                break
            stage = EmbedStage(model=s["model"], device=str(device), batch_size=batch, torch_compile=compiled)
            if frames is None:
                T, S = stage.model.config.num_frames, stage.model.image_size
                frames = np.random.default_rng(0).integers(0, 256, (s["stage_videos"], T, S, S, 3), dtype=np.uint8)
            rows = {"frames": frames, "status": np.asarray(["ok"] * len(frames), dtype=object)}
            start = time.perf_counter()
            stage(rows)
            first = time.perf_counter() - start
            seconds = _time(functools.partial(stage, rows), torch.device("cpu"), repeats=3, warmup=0)  # it synchronises
            runs.append(
                {"compiled": compiled, "batch": batch, "videos_per_second": round(len(frames) / seconds, 1),
                 "first_call_seconds": round(first, 1), "dtype": str(stage.autocast or stage.model.dtype)}
            )  # fmt: skip
    return {"model": s["model"], "videos": s["stage_videos"], "runs": runs}


# ---------------------------------------------------------------------------------------------------- agreement


def section_agreement(args: argparse.Namespace, device: torch.device, budget: Budget) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpu-check-demo-") as folder:
        return _agreement(args, device, budget, Path(folder))


def _agreement(args: argparse.Namespace, device: torch.device, budget: Budget, folder: Path) -> dict[str, Any]:
    from vitaclip.demo.world import generate, world_labels
    from vitaclip.stages import EmbedStage
    from vitaclip.video import Uniform, decode_clip

    s = sizes(args)
    half = torch.float16  # the embed stage's CUDA default, on CPUs too in the dry run (same dtype path)
    generate(folder, s["agreement_videos"], seed=7, labels=world_labels())
    frames = np.stack([decode_clip(str(p), Uniform(8), size=64).frames for p in sorted(folder.rglob("*.mp4"))])
    out: dict[str, Any] = {"half_dtype": str(half).removeprefix("torch.")}
    for name, model_frames in (("vitaclip-demo", frames), (s["model"], None)):
        if budget.left() <= 0:
            break
        reference = EmbedStage(model=name, device=str(device), dtype=torch.float32)
        if model_frames is None:  # random frames at the model's size: the embedding's cosine only
            size = reference.model.image_size
            shape = (16, reference.model.config.num_frames, size, size, 3)
            model_frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        batch = {"frames": model_frames, "status": np.asarray(["ok"] * len(model_frames), dtype=object)}
        want = reference(batch)
        got = EmbedStage(model=name, device=str(device), dtype=half)(batch)
        cos = np.sum(want["embedding"] * got["embedding"], axis=1)
        out[name] = {
            "videos": len(model_frames),
            "cos_min": round(float(cos.min()), 6),
            "top1_same": round(float(np.mean(want["label_indices"][:, 0] == got["label_indices"][:, 0])), 4),
        }
    return out


# ---------------------------------------------------------------------------------------------------- faiss


def section_faiss(args: argparse.Namespace, device: torch.device, budget: Budget) -> dict[str, Any]:
    import faiss

    s = sizes(args)
    gpu = device.type == "cuda" and hasattr(faiss, "StandardGpuResources")
    resources = faiss.StandardGpuResources() if gpu else None
    out: dict[str, Any] = {"on_gpu": gpu, "runs": []}
    if device.type == "cuda" and not gpu:
        out["note"] = "faiss has no GPU support here (faiss-cpu carried): CPU numbers"
    rng = np.random.default_rng(0)
    dim = s["faiss_dim"]
    counts = s["faiss_counts"] if gpu or args.dry_run else s["faiss_counts"][:1]
    if counts != s["faiss_counts"]:
        out["skipped"] = f"{s['faiss_counts'][1:]}: IVF training at that size takes many minutes on CPUs"
    for count in counts:
        if budget.left() <= 0:
            out["skipped"] = f"{count} and beyond: out of time"
            break
        xb = rng.standard_normal((count, dim), dtype=np.float32)
        faiss.normalize_L2(xb)
        xq = xb[rng.choice(count, 1000, replace=False)] + 0.1 * rng.standard_normal((1000, dim), dtype=np.float32)
        faiss.normalize_L2(xq)
        exact_ids = None
        for kind in ("Flat", f"IVF{_nlist(count)},Flat"):
            index = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
            if gpu:
                index = faiss.index_cpu_to_gpu(resources, 0, index)
            start = time.perf_counter()
            index.train(xb[: min(count, 100 * _nlist(count))]) if kind != "Flat" else None
            index.add(xb)
            build = time.perf_counter() - start
            if kind != "Flat":
                faiss.ParameterSpace().set_index_parameter(index, "nprobe", 32)
            start = time.perf_counter()
            _, ids = index.search(xq, 10)
            batch_seconds = time.perf_counter() - start
            single = statistics.median(_single_query_seconds(index, xq[:50]))
            exact_ids = ids if kind == "Flat" else exact_ids
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids, strict=True)]))
            out["runs"].append(
                {"count": count, "dim": dim, "kind": kind, "build_seconds": round(build, 2), "recall_at_10": recall,
                 "latency_ms": round(1000 * single, 3), "queries_per_second": round(1000 / batch_seconds, 1)}
            )  # fmt: skip
            del index
        del xb
    return out


def _nlist(count: int) -> int:
    return int(max(16, min(16384, 4 * np.sqrt(count))))


def _single_query_seconds(index: Any, queries: np.ndarray) -> list[float]:
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], 10)
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------------- train


def section_train(args: argparse.Namespace, device: torch.device, budget: Budget) -> dict[str, Any]:
    import train_throughput

    s = sizes(args)
    ns = argparse.Namespace(
        model=s["model"], batch_size=s["train_batch"], num_frames=None, num_labels=400, steps=s["train_steps"],
        warmup=2, device=str(device),
    )  # fmt: skip
    result = train_throughput.measure(ns)
    result["steps_per_second"] = round(1 / float(result["seconds_per_step"]), 3)  # type: ignore[arg-type]
    return result


# ---------------------------------------------------------------------------------------------------- job


@contextmanager
def gpu_utilisation(device: torch.device, every_seconds: float = 0.5) -> Iterator[list[float]]:
    """Samples the GPU's utilisation (%) while the block runs (nothing on CPUs)."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no NVML here: no samples
            return
        while not stop.wait(every_seconds):
            samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

    thread = threading.Thread(target=sample, daemon=True)
    if device.type == "cuda":
        thread.start()
    try:
        yield samples
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(5)


def section_job(args: argparse.Namespace, device: torch.device, budget: Budget) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpu-check-job-") as work:
        return _job(args, device, Path(work))


def _job(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    from jobs.index_videos import main as job_main
    from vitaclip.demo.world import generate, world_labels

    s = sizes(args)
    generate(work / "in", s["job_videos"], seed=3, labels=world_labels())
    argv = [str(work / "in"), "--output", str(work / "out"), "--model", "vitaclip-demo", "--no-index"]
    argv += ["--embed-device", "gpu" if device.type == "cuda" else "cpu", "--embed-workers", "1"]
    with gpu_utilisation(device) as samples:
        start = time.perf_counter()
        rc = job_main(argv)
        wall = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"the job exited with {rc}")
    record = json.loads(sorted((work / "out" / "runs").glob("*.json"))[-1].read_text())
    throughput = record["throughput"]
    decode_rate = throughput.get("decode_videos_per_worker_second") or 0.0
    embed_rate = throughput.get("embed_clips_per_worker_second") or 0.0
    return {
        "videos": s["job_videos"],
        "wall_seconds": round(wall, 1),
        "videos_per_second": throughput.get("end_to_end_videos_per_second"),
        "decode_workers": throughput.get("decode_workers"),
        "embed_device": throughput.get("embed_device"),
        "decode_videos_per_core_second": decode_rate,
        "embed_clips_per_gpu_second": embed_rate,
        "decode_cores_one_gpu_needs": round(embed_rate / decode_rate, 1) if decode_rate else None,
        "gpu_utilisation_median": statistics.median(samples) if samples else None,
        "gpu_utilisation_samples": len(samples),
    }


# ---------------------------------------------------------------------------------------------------- main

SECTIONS: dict[str, tuple[Callable[[argparse.Namespace, torch.device, Budget], dict[str, Any]], float]] = {
    "model": (section_model, 180.0),
    "stage": (section_stage, 150.0),
    "agreement": (section_agreement, 60.0),
    "faiss": (section_faiss, 120.0),
    "train": (section_train, 60.0),
    "job": (section_job, 150.0),
}


def run_sections(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Runs the chosen sections in order; the report is rewritten after each one, so a machine taken back (or a
    command stopped at its time limit) still leaves the sections that finished, and each section's result is also
    printed as one JSON line."""
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "sections": {},
    }
    for name in args.sections:
        fn, seconds = SECTIONS[name]
        started = time.perf_counter()
        try:
            result = {"ok": True, **fn(args, device, Budget(seconds))}
        except Exception as exc:  # a section's failure is a result: the others still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.perf_counter() - started, 1)
        report["sections"][name] = result
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"{name}: {'ok' if result['ok'] else 'FAILED ' + result['error']} in {result['seconds']} s", flush=True)
        print(json.dumps({name: {k: v for k, v in result.items() if k != "trace"}}, default=str), flush=True)
    return report


def print_table(report: dict[str, Any]) -> None:
    sections = report["sections"]
    print(f"\nGPU check on {report['device']} (torch {report['torch']}){' [dry run]' if report['dry_run'] else ''}")
    for run in sections.get("model", {}).get("runs", []):
        mfu = f", MFU {run['mfu']:.1%}" if "mfu" in run else ""
        print(f"  encode_video {run['mode']:>22} batch {run['batch']:>4}: {run['videos_per_second']:>9} videos/s{mfu}")
    official = sections.get("model", {}).get("official")
    if official and "ratio" not in official:
        print(f"  official encoder: {official}")
    elif official:
        print(
            f"  official encoder batch {official['batch']} ({official['precision']}): "
            f"{official['official_videos_per_second']} videos/s, vitaclip {official['vitaclip_videos_per_second']}: "
            f"{official['ratio']}x; float32 relative error {official['float32_relative_error']:.1e}"
        )
    for run in sections.get("stage", {}).get("runs", []):
        mode = "compiled" if run["compiled"] else "eager"
        print(f"  embed stage {mode:>8} batch {run['batch']:>4}: {run['videos_per_second']:>9} videos/s")
    agreement = sections.get("agreement", {})
    for name, value in agreement.items():
        if isinstance(value, dict):
            print(f"  agreement {name}: top-1 same {value['top1_same']:.1%}, cos min {value['cos_min']}")
    for run in sections.get("faiss", {}).get("runs", []):
        print(
            f"  faiss {run['kind']:>14} {run['count']:>10} x {run['dim']}: recall@10 {run['recall_at_10']:.3f}, "
            f"{run['latency_ms']} ms/query, {run['queries_per_second']} q/s, build {run['build_seconds']} s"
        )
    train = sections.get("train", {})
    if train.get("ok"):
        print(f"  training: {train['steps_per_second']} steps/s at batch {train['batch_size']} ({train['precision']})")
    job = sections.get("job", {})
    if job.get("ok"):
        print(
            f"  job: {job['videos_per_second']} videos/s over {job['videos']} videos, GPU busy "
            f"{job['gpu_utilisation_median']}%, decode cores per GPU {job['decode_cores_one_gpu_needs']}"
        )
    failed = [name for name, result in sections.items() if not result.get("ok")]
    print(f"  sections failed: {failed or 'none'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code paths in under 2 minutes")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the encoder")
    p.add_argument("--official-src", default=None, help="a checkout of the official Vita-CLIP code, for the ratio")
    p.add_argument("--out", default="gpu_check.json", help="the JSON report")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if not args.dry_run and device.type != "cuda":
        print("no CUDA device: run with --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    report = run_sections(args, device)
    print_table(report)
    print(f"report: {args.out}")
    return 0 if all(r.get("ok") for r in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

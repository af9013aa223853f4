"""Video-encoder throughput: vitaclip against the official Vita-CLIP code, side by side in one run.

Both models hold the same weights (the official model's random weights, converted with vitaclip's own converter),
and the script checks they agree before timing. Prints videos/s, the ratio, and on a GPU the fraction of the card's
peak bf16 FLOP/s (MFU), with FLOPs counted by torch's FlopCounterMode.

    # CPU, float32, against the official code (a checkout of github.com/TalalWasim/Vita-CLIP; needs einops):
    python benchmarks/model_throughput.py --official-src /path/to/Vita-CLIP --batch-size 2 --repeats 5
    # GPU: bf16 weights, fused attention, torch.compile; official code under bf16 autocast as it runs in training
    python benchmarks/model_throughput.py --official-src /path/to/Vita-CLIP --batch-size 128 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vitaclip  # noqa: E402
from vitaclip.checkpoints import config_from_official, convert_official_state  # noqa: E402

# Dense bf16 tensor-core peak (vendor spec sheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def build_official(src: str, config: vitaclip.VitaClipConfig, label_names: list[str]) -> torch.nn.Module:
    """The official model for ``config`` (imported from a checkout; nothing of it is vendored here)."""
    sys.modules.setdefault("pkg_resources", types.SimpleNamespace(packaging=__import__("packaging.version")))
    sys.path.insert(0, str(Path(src) / "training"))
    from VitaCLIP_model import VitaCLIP  # type: ignore[import-not-found]

    from vitaclip.model import backbone_model_config

    cfg = backbone_model_config(config)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    width = v["width"]
    classes = Path("/tmp/vitaclip-bench-classes.txt")
    classes.write_text("\n".join(label_names))
    tc = config.text_context
    return VitaCLIP(
        input_size=(v["image_size"], v["image_size"]),
        num_frames=config.num_frames,
        feature_dim=width,
        patch_size=(v["patch_size"], v["patch_size"]),
        num_heads=width // v.get("head_width", 64),
        num_layers=v["layers"],
        mlp_factor=v.get("mlp_ratio", 4.0),
        embed_dim=cfg["embed_dim"],
        use_summary_token=config.summary_token,
        use_local_prompts=config.num_local_prompts > 0,
        use_global_prompts=config.num_global_prompts > 0,
        num_global_prompts=max(config.num_global_prompts, 1),
        use_text_prompt_learning=True,
        text_context_length=t["context_length"],
        text_vocab_size=t["vocab_size"],
        text_transformer_width=t["width"],
        text_transformer_heads=t["heads"],
        text_transformer_layers=t["layers"],
        text_num_prompts=tc.num_tokens if tc else 8,
        text_prompt_CSC=bool(tc and tc.kind == "class_specific"),
        text_prompt_classes_path=str(classes),
    ).eval()


def time_calls(fn: Callable[[], torch.Tensor], *, repeats: int, warmup: int, cuda: bool) -> list[float]:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def count_flops(fn: Callable[[], torch.Tensor]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def time_official(
    official: Any, model: vitaclip.VitaClip, x: torch.Tensor, *, repeats: int, cuda: bool
) -> dict[str, float]:
    """Checks the official encoder against ours in float32, then times it (bf16 autocast on GPUs): videos/s."""
    official.to(x.device)
    x_official = x.permute(0, 2, 1, 3, 4).contiguous()  # official layout [B, 3, T, H, W]
    model.to(x.device)
    check = model.encode_video(x[:2], normalize=False)
    ref = official.visual(x_official[:2])
    rel = float((check - ref).norm() / ref.norm())
    print(f"float32 agreement with the official code: relative error {rel:.2e}")

    def run_official() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            return official.visual(x_official)

    t = time_calls(run_official, repeats=repeats, warmup=2, cuda=cuda)
    official.cpu()
    if cuda:
        torch.cuda.empty_cache()
    return {"official" + (" (bf16 autocast)" if cuda else " (float32)"): x.shape[0] / statistics.median(t)}


def report(
    results: dict[str, float], flops_per_video: float, *, repeats: int, device_name: str | None, peak: float | None
) -> None:
    """Prints videos/s of each implementation, the speed-up, FLOPs per video and (on a known GPU) the MFU."""
    print(f"\n{'implementation':52s} {'videos/s':>10s}")
    for name, vps in results.items():
        print(f"{name:52s} {vps:10.2f}")
    names = list(results)
    if len(names) == 2:
        print(f"\nspeed-up vitaclip / official: {results[names[1]] / results[names[0]]:.2f}x (median of {repeats})")
    print(f"FLOPs per video (counted): {flops_per_video / 1e9:.3f} GFLOP")
    if device_name is None:
        return
    peak_flops = peak * 1e12 if peak else None
    for key, value in PEAK_BF16_FLOPS.items():
        if peak_flops is None and key in device_name:
            peak_flops = value
    if peak_flops:
        mfu = results[names[-1]] * flops_per_video / peak_flops
        print(f"MFU (vitaclip, against {peak_flops / 1e12:.0f} TFLOP/s bf16 peak): {100 * mfu:.1f}%")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vitaclip-b16")
    p.add_argument("--official-src", default=None, help="checkout of the official Vita-CLIP repository")
    p.add_argument("--batch-size", type=int, default=None, help="videos per batch (default: 128 GPU, 2 CPU)")
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the vitaclip encoder (GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the card's peak bf16 TFLOP/s")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    batch = args.batch_size or (128 if cuda else 2)
    repeats = args.repeats or (20 if cuda else 5)
    torch.manual_seed(0)
    config = vitaclip.get_model_config(args.model)
    T = args.num_frames or config.num_frames
    labels = list(vitaclip.load_label_set(config.label_set)) if config.label_set else ["a", "b"]
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; model {args.model}; batch {batch} videos x {T} frames; torch {torch.__version__}")

    official = None
    if args.official_src:
        official = build_official(args.official_src, config, labels)
        state = official.state_dict()
        model = vitaclip.VitaClip(config_from_official(state, config), label_names=labels)
        model.load_state_dict(convert_official_state(state), strict=True)
    else:
        model = vitaclip.VitaClip(config, label_names=labels)
    model.eval()

    size = model.image_size
    x = torch.randn(batch, T, 3, size, size, device=args.device)
    results: dict[str, float] = {}
    with torch.inference_mode():
        if official is not None:
            results.update(time_official(official, model, x, repeats=repeats, cuda=cuda))
        if cuda:
            model.to(args.device, dtype=torch.bfloat16)
            xm = x.to(torch.bfloat16)
        else:
            model.to(args.device)
            xm = x
        encode = torch.compile(model.encode_video) if args.compile else model.encode_video
        label = "vitaclip" + (" (bf16, fused attention" if cuda else " (float32, fused attention")
        label += ", torch.compile)" if args.compile else ")"
        t = time_calls(lambda: encode(xm), repeats=repeats, warmup=3 if args.compile else 2, cuda=cuda)
        results[label] = batch / statistics.median(t)
    with torch.no_grad():  # the FLOP counter's module hooks do not run under inference_mode
        flops_per_video = count_flops(lambda: model.encode_video(xm[:1]))

    report(results, flops_per_video, repeats=repeats, device_name=device_name if cuda else None, peak=args.peak_tflops)
    return 0


if __name__ == "__main__":
    sys.exit(main())

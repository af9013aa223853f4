"""Training throughput of Vita-CLIP prompt learning: optimizer steps on random clips (no decoding), videos/s.

bf16 autocast on a GPU (the recipe), float32 on CPU. It also checks that the frozen backbone costs no gradient or
optimizer memory: after a step every frozen parameter has ``grad is None`` and the optimizer holds state for the
trainable set only; ``--compare-unfrozen`` measures the same step with backbone gradients switched on, to show what
freezing saves; ``--compare-captions`` the same step with a caption per video (the video-text contrastive loss
added, captions of 12-20 words), to show what caption training costs.

    .venv/bin/python benchmarks/train_throughput.py --model vitaclip-b16 --batch-size 32 --steps 20
    .venv/bin/python benchmarks/train_throughput.py --model vitaclip-tiny --batch-size 8 --steps 10   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vitaclip.registry import create_model  # noqa: E402
from vitaclip.training import (  # noqa: E402
    TrainConfig,
    build_optimizer,
    build_scaler,
    build_scheduler,
    count_parameters,
    resolve_precision,
    train_step,
)


def _captions(n: int, generator: torch.Generator) -> list[str]:
    words = "a man woman dog car ball runs jumps rides down up the street park water red blue small big slowly".split()
    picks = torch.randint(0, len(words), (n, 20), generator=generator)
    lengths = torch.randint(12, 21, (n,), generator=generator)
    return [" ".join(words[int(w)] for w in row[: int(k)]) for row, k in zip(picks, lengths, strict=True)]


def measure(args: argparse.Namespace, *, unfrozen: bool = False, captions: bool = False) -> dict[str, object]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    labels = [f"class {i}" for i in range(args.num_labels)]
    model = create_model(args.model, label_names=labels).to(device)
    model.train()
    config = TrainConfig(
        train_list="-", output="-", model=args.model, batch_size=args.batch_size, micro_batch_size=args.batch_size
    )
    optimizer = build_optimizer(model, config)
    if unfrozen:  # what the step would cost if the backbone were trained too (for comparison only)
        model.clip.requires_grad_(True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optimizer.lr)
    scheduler = build_scheduler(optimizer, config)
    precision = resolve_precision("auto", device)
    scaler = build_scaler(precision, device)
    trainable, total = count_parameters(model)
    T, S = args.num_frames or model.config.num_frames, model.image_size
    generator = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (args.batch_size, T, 3, S, S), dtype=torch.uint8, generator=generator).to(device)
    target = torch.randint(0, args.num_labels, (args.batch_size,), generator=generator).to(device)
    valid = torch.ones(args.batch_size, dtype=torch.bool, device=device)
    micro: Any = (video, target, valid, _captions(args.batch_size, generator)) if captions else (video, target, valid)

    def step() -> None:
        train_step(
            model,
            optimizer,
            scheduler,
            scaler,
            [micro],
            precision=precision,
            mean=model.config.mean,
            std=model.config.std,
        )

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    state_params = len(optimizer.state)
    result: dict[str, object] = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision,
        "backbone_gradients": unfrozen,
        "captions": captions,
        "batch_size": args.batch_size,
        "num_frames": T,
        "num_labels": args.num_labels,
        "videos_per_second": round(args.steps * args.batch_size / seconds, 2),
        "seconds_per_step": round(seconds / args.steps, 4),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "optimizer_state_tensors": state_params,
        "frozen_parameters_with_grad": len(frozen_with_grad),
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    else:
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    if not unfrozen:
        assert not frozen_with_grad, f"frozen parameters got gradients: {frozen_with_grad[:5]}"
        assert state_params == len(model.trainable_parameter_names()), "optimizer state beyond the trainable set"
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vitaclip-b16")
    p.add_argument("--batch-size", type=int, default=16, help="videos per step (one micro-batch)")
    p.add_argument("--num-frames", type=int)
    p.add_argument("--num-labels", type=int, default=400, help="labels in the loss (Kinetics-400: 400)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device")
    p.add_argument("--compare-unfrozen", action="store_true", help="also time the step with backbone gradients on")
    p.add_argument("--compare-captions", action="store_true", help="also time the step with the caption loss")
    args = p.parse_args(argv)
    base = measure(args)
    print(json.dumps(base))
    if args.compare_unfrozen:
        print(json.dumps(measure(args, unfrozen=True)))
    if args.compare_captions:
        with_captions = measure(args, captions=True)
        print(json.dumps(with_captions))
        ratio = float(with_captions["seconds_per_step"]) / float(base["seconds_per_step"])  # type: ignore[arg-type]
        print(f"captions: {ratio:.2f}x the step time of labels alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())

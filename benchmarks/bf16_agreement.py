"""Does half precision keep the answers? Embeddings and zero-shot labels of the same videos in float32 and in
bf16/fp16 variants.

Decodes ``--videos`` demo-world videos (generated here, or ``--folder``) once, then embeds them with vitaclip-demo
(or ``--model``/``--checkpoint``) in float32 and in each bf16 variant, on the CPU or ``--device``:

- ``bf16-weights``: parameters in bfloat16 (the job's embed stage on CUDA before this comparison);
- ``bf16-mixed``: `vitaclip.stages.EmbedStage` with ``dtype=bfloat16`` (``mixed``: float32 weights under autocast,
  so matrix products run in bf16 and norms, softmax and the residual stream in float32; label features and the
  embeddings' normalisation in float32);
- ``fp16-mixed``: the same in float16, the embed stage's CUDA default.

Label features are computed the way the variant computes them. Prints per variant: the lowest and median cosine to
the float32 embedding, the share of videos whose top-1 label is the float32 one, and whose ordered top-5 is.

    python benchmarks/bf16_agreement.py --videos 300 --folder out/quickstart/videos/videos   # after the quickstart
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitaclip.stages import EmbedStage  # noqa: E402
from vitaclip.video import Uniform, decode_clip  # noqa: E402


def demo_frames(n: int, folder: Path | None, num_frames: int, size: int) -> np.ndarray:
    """Frames ``[N, T, S, S, 3]`` of `n` videos decoded as the job decodes whole videos."""
    if folder is None:
        from vitaclip.demo.world import generate, world_labels

        folder = Path(tempfile.mkdtemp(prefix="bf16-"))
        generate(folder, n, seed=7, labels=world_labels())
    paths = sorted(folder.rglob("*.mp4"))[:n]
    if len(paths) < n:
        raise SystemExit(f"found {len(paths)} videos under {folder}, asked for {n}")
    return np.stack([decode_clip(str(p), Uniform(num_frames), size=size).frames for p in paths])


def answers(stage: EmbedStage, frames: np.ndarray) -> dict[str, np.ndarray]:
    batch = {"frames": frames, "status": np.asarray(["ok"] * len(frames), dtype=object)}
    out = stage(batch)
    return {"embedding": out["embedding"], "top": out["label_indices"]}


def compare(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    cos = np.sum(reference["embedding"] * got["embedding"], axis=1)  # both unit length
    top1 = float(np.mean(reference["top"][:, 0] == got["top"][:, 0]))
    top5 = float(np.mean(np.all(reference["top"][:, :5] == got["top"][:, :5], axis=1)))
    return {"cos_min": float(cos.min()), "cos_median": float(np.median(cos)), "top1_same": top1, "top5_same": top5}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vitaclip-demo")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--videos", type=int, default=60)
    p.add_argument("--folder", type=Path, default=None, help="videos to use (default: generate demo-world videos)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    kwargs: dict[str, Any] = {"model": args.model, "checkpoint": args.checkpoint, "top_k": 5, "device": args.device}
    fp32 = EmbedStage(**kwargs, dtype=torch.float32)
    frames = demo_frames(args.videos, args.folder, fp32.model.config.num_frames, fp32.model.image_size)
    reference = answers(fp32, frames)
    variants: dict[str, Callable[[], dict[str, np.ndarray]]] = {
        "bf16-weights": lambda: answers(EmbedStage(**kwargs, dtype=torch.bfloat16, mixed=False), frames),
        "bf16-mixed": lambda: answers(EmbedStage(**kwargs, dtype=torch.bfloat16), frames),
        "fp16-mixed": lambda: answers(EmbedStage(**kwargs, dtype=torch.float16), frames),
    }
    print(f"{args.videos} videos, {args.model}, {args.device}; against float32")
    print(f"{'variant':>14} {'cos min':>9} {'cos median':>11} {'top-1 same':>11} {'top-5 same':>11}")
    for name, run in variants.items():
        got = compare(reference, run())
        print(
            f"{name:>14} {got['cos_min']:9.5f} {got['cos_median']:11.6f} {got['top1_same']:11.1%} "
            f"{got['top5_same']:11.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

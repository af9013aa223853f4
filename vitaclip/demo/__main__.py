"""``python -m vitaclip.demo``: the demo world's command line.

Each subcommand parses its arguments and calls a library function; nothing below ``main`` sees argparse.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vitaclip.demo import world

    start = time.perf_counter()
    with tqdm(total=args.num_videos, unit="video", desc=f"demo {args.split}") as bar:
        result = world.generate_split(
            args.out,
            args.split,
            args.num_videos,
            args.seed,
            workers=args.workers,
            size=args.size,
            num_frames=args.num_frames,
            fps=args.fps,
            on_video=lambda _spec: bar.update(),
        )
    seconds = time.perf_counter() - start
    print(
        f"wrote {result.num_videos} videos ({len(result.labels)} labels, split {args.split}) to "
        f"{result.out_dir / 'videos'} in {seconds:.1f} s"
    )
    for path in (result.list_path, result.captions_path, result.labels_path, result.manifest_path):
        print(f"wrote {path}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    import torch

    from vitaclip.demo.pretrain import PretrainConfig, run_pretraining, summarize
    from vitaclip.registry import get_model_config

    if args.threads:
        torch.set_num_threads(args.threads)
    given = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed") if getattr(args, k) is not None}
    train = PretrainConfig(**given)
    report = run_pretraining(args.world, get_model_config(args.model), args.out, train, eval_world_dir=args.eval_world)
    for line in summarize(report):
        print(line)
    print(f"wrote {args.out} (open_clip weights: use as --checkpoint of vitaclip train --model {args.model})")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    from vitaclip.demo.world import SPLITS

    parser = argparse.ArgumentParser(prog="python -m vitaclip.demo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("generate", help="write procedural demo videos with labels and captions")
    p.add_argument("out", help="output folder (videos/, list.csv, captions.csv, labels.txt, manifest.jsonl)")
    p.add_argument("--num-videos", type=int, required=True, help="how many videos to write")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; use the same one for every split (default: 0)")
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="all",
        help="train/val: seen label combinations, test: unseen ones, all: every label (default: all)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: min(4, CPU count))")
    p.add_argument("--size", type=int, default=128, help="frame side in pixels, even (default: 128)")
    p.add_argument("--num-frames", type=int, default=24, help="frames per video (default: 24)")
    p.add_argument("--fps", type=int, default=12, help="frames per second (default: 12)")
    p.set_defaults(func=_cmd_generate)

    p = commands.add_parser("pretrain", help="train the demo CLIP contrastively on frames and captions of a world")
    p.add_argument("world", help="a generated world folder (manifest.jsonl, videos/)")
    p.add_argument("out", help="output .safetensors file (open_clip state dict); a .json report is written beside it")
    p.add_argument("--model", default="vitaclip-demo", help="model whose backbone config is trained")
    p.add_argument("--eval-world", default=None, help="a held-out world to report frame accuracies on")
    # Defaults (None) are PretrainConfig's; importing it here would load torch for every subcommand.
    p.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, help="frame-caption pairs per step (default 256)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, help="initialisation and batch order seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.set_defaults(func=_cmd_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as error:
        parser.error(str(error))
        return 2  # not reached: parser.error exits


if __name__ == "__main__":
    sys.exit(main())

"""Rebuilds the demo world's model from nothing: ``python -m jobs.demo build`` (also ``vitaclip demo build``).

Steps, each a real component of the project, all on CPU:

1. the BPE vocabulary of the demo text tower (:mod:`vitaclip.demo.vocab`);
2. three generated worlds (:mod:`vitaclip.demo.world`): ``train`` (videos of the *seen* label combinations),
   ``val`` (held-out videos of seen combinations) and ``zeroshot`` (videos of combinations never seen in training);
3. contrastive pretraining of a small CLIP on single frames of ``train`` and their captions
   (:mod:`vitaclip.demo.pretrain`), saved as open_clip weights;
4. Vita-CLIP prompt training on top of the frozen CLIP with ``vitaclip train`` (:mod:`jobs.train`), labels = seen
   combinations, generic learned text context; then a cycle with the training world's captions (several phrasings
   per video) added through the video-text contrastive loss, so that free-text queries retrieve, not only labels;
5. evaluation against the frozen frame-averaging baseline (:mod:`jobs.evaluate`): supervised top-1 on ``val``,
   zero-shot top-1 on ``zeroshot`` (among the unseen labels only), text-to-video retrieval on ``val``'s captions;
6. the final checkpoint (default labels: every label of the world) with ``report.json`` and ``report.md``; with
   ``--install`` it replaces the packaged ``vitaclip/pretrained/vitaclip-demo``.

``python -m jobs.demo evaluate`` scores a checkpoint on freshly generated worlds of another seed (what the tests use to
check the shipped numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("vitaclip.demo")

MODEL_NAME = "vitaclip-demo"
PACKAGED_DIR = Path(__file__).resolve().parent.parent / "vitaclip" / "pretrained" / MODEL_NAME


@dataclass(frozen=True)
class DemoBuildConfig:
    """Sizes and seeds of a demo build (defaults: the shipped model).

    Attributes:
        seed: seed of the seen/unseen split and of every world (each world adds its own offset).
        unseen_fraction: share of label combinations held out for zero-shot evaluation.
        train_videos: videos of the training world (seen combinations).
        val_per_label: held-out videos per seen combination.
        zeroshot_per_label: videos per unseen combination.
        pretrain_steps: CLIP pretraining steps (batch 256 frames).
        prompt_steps: Vita-CLIP prompt training steps.
        prompt_batch_size: videos per prompt training step.
        prompt_lr: peak learning rate of prompt training.
        prompt_refine_steps: steps of a second cosine cycle from the first one's prompts, with another data order
            (0: none).
        prompt_refine_lr: peak learning rate of the second cycle.
        caption_steps: steps of a third cycle with the training world's captions (label loss + caption loss; 0:
            none).
        caption_lr: peak learning rate of the caption cycle.
        caption_loss_weight: weight of the caption loss in that cycle.
        workers: generator processes (None: up to 4).
        threads: torch threads for pretraining, training and evaluation (None: torch's default, one per core; use
            fewer when other work shares the cores: oversubscribed threads slow training down several times).
        evaluate: score the built checkpoint (the report's numbers; a third of a small build's time). Needed for
            ``--install``: the packaged model ships with its numbers.
    """

    seed: int = 0
    unseen_fraction: float = 0.25
    train_videos: int = 2400
    val_per_label: int = 2
    zeroshot_per_label: int = 4
    pretrain_steps: int = 1000
    prompt_steps: int = 3000
    prompt_batch_size: int = 32
    prompt_lr: float = 5e-3
    prompt_refine_steps: int = 1000
    prompt_refine_lr: float = 2e-3
    caption_steps: int = 600
    caption_lr: float = 1e-3
    caption_loss_weight: float = 0.5
    workers: int | None = None
    threads: int | None = None
    evaluate: bool = True


def _write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def generate_worlds(
    work: Path,
    *,
    split_seed: int,
    world_seed: int,
    unseen_fraction: float,
    train_videos: int,
    val_per_label: int,
    zeroshot_per_label: int,
    workers: int | None = None,
) -> list[str]:
    """Writes ``seen.txt``/``unseen.txt`` (the split of ``split_seed``) and the worlds ``train`` (when
    ``train_videos`` > 0), ``val`` and ``zeroshot`` under ``work``, each world with its own seed.

    Returns the names of the worlds generated (complete ones from an earlier build are kept)."""
    from vitaclip.demo.world import generate, split_labels

    seen, unseen = split_labels(seed=split_seed, unseen_fraction=unseen_fraction)
    _write_lines(work / "seen.txt", seen)
    _write_lines(work / "unseen.txt", unseen)
    plan = [("train", 1, seen, train_videos), ("val", 2, seen, len(seen) * val_per_label)]
    plan.append(("zeroshot", 3, unseen, len(unseen) * zeroshot_per_label))
    generated = []
    for name, offset, labels, count in plan:
        if count <= 0:
            continue
        seed = world_seed * 100 + offset
        # A finished world records what it holds; re-running a build skips worlds that are already complete.
        stamp = {"seed": seed, "num_videos": count, "labels": list(labels)}
        done = work / name / "world.json"
        if done.is_file() and json.loads(done.read_text()) == stamp:
            log.info("world %s is complete (%d videos); not regenerating", name, count)
            continue
        generate(work / name, count, seed=seed, labels=list(labels), workers=workers)
        done.write_text(json.dumps(stamp))
        generated.append(name)
    return generated


def evaluate_demo(
    checkpoint: str | Path, work: Path, *, threads: int = 4, recall_png: Path | None = None
) -> dict[str, Any]:
    """Supervised, zero-shot and retrieval scores of a checkpoint and its frame-averaging baseline on the worlds in
    ``work`` (``val``, ``zeroshot``, ``seen.txt``, ``unseen.txt``); ``recall_png``: where to draw recall at k."""
    from jobs.evaluate import EvalConfig, EvalSourceConfig, RetrievalConfig, run_eval, run_retrieval

    common = EvalSourceConfig(
        checkpoint=str(checkpoint), sampling="uniform", threads=threads, baseline=True, batch_size=32, device="cpu"
    )
    shared = {f.name: getattr(common, f.name) for f in dataclasses.fields(common)}
    report: dict[str, Any] = {}
    for key, world, labels, mode in (
        ("supervised", "val", "seen.txt", "supervised"),
        ("zero_shot", "zeroshot", "unseen.txt", "zero-shot"),
    ):
        for text in ("model", "class-only"):
            config = EvalConfig(
                **{**shared, "data_root": str(work / world)}, list=(str(work / world / "list.csv"),),
                label_names=str(work / labels), views="1x1", text=text,  # type: ignore[arg-type]
            )  # fmt: skip
            result = run_eval(config, mode)  # type: ignore[arg-type]
            if text == "model":
                report[key] = {"model": result["top1"], "baseline_templates": result["baseline"]["top1"]}
                report[key]["num_videos"] = result["num_videos"]
                report[key]["num_labels"] = len((work / labels).read_text().split("\n")) - 1
            else:
                report[key]["baseline_class_only"] = result["baseline"]["top1"]
    retrieval = RetrievalConfig(
        **{**shared, "data_root": str(work / "val")}, captions=str(work / "val" / "captions.csv"),
        plot=str(recall_png) if recall_png else None,
    )  # fmt: skip
    result = run_retrieval(retrieval)
    report["retrieval"] = {
        "model": {k: result["text_to_video"][k] for k in ("r1", "r5", "r10", "median_rank")},
        "baseline": {k: result["baseline"]["text_to_video"][k] for k in ("r1", "r5", "r10", "median_rank")},
        "num_videos": result["num_videos"],
        "num_captions": result["num_captions"],
    }
    return report


def motion_text_similarity(model: Any) -> dict[str, float]:
    """Mean cosine similarity between label features that differ only in motion (same colour and shape), with the
    model's own text (learned context) and with the plain text tower: how well each text side keeps motions apart
    (lower is better separated)."""
    import torch
    import torch.nn.functional as F

    from vitaclip.demo.world import MOTIONS, world_labels

    labels = world_labels()
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        motion = next(m for m in MOTIONS if label.endswith(m))
        groups.setdefault(label[: -len(motion)], []).append(i)
    with torch.inference_mode():
        own = model.encode_labels(list(labels)).float()
        plain = F.normalize(model.clip.encode_text(model.tokenize([f"a {label}" for label in labels])).float(), dim=-1)
    out = {}
    for key, feats in (("model_text", own), ("plain_text", plain)):
        sims = [float(feats[a] @ feats[b]) for idx in groups.values() for a in idx for b in idx if a < b]
        out[key] = sum(sims) / len(sims)
    return out


def report_markdown(report: dict[str, Any]) -> str:
    """The README table of a demo report."""
    sup, zs, ret = report["supervised"], report["zero_shot"], report["retrieval"]
    baseline_sup = max(sup["baseline_templates"], sup["baseline_class_only"])
    baseline_zs = max(zs["baseline_templates"], zs["baseline_class_only"])
    rows = [
        "| | Vita-CLIP prompts | frame averaging (frozen CLIP) |",
        "|---|---|---|",
        f"| supervised top-1, held-out videos of seen combinations ({sup['num_videos']} videos, "
        f"{sup['num_labels']} labels) | {sup['model']:.1f}% | {baseline_sup:.1f}% |",
        f"| zero-shot top-1, combinations never seen in training ({zs['num_videos']} videos, {zs['num_labels']} "
        f"labels) | {zs['model']:.1f}% | {baseline_zs:.1f}% |",
    ]
    for k in ("r1", "r5", "r10"):
        rows.append(
            f"| text-to-video R@{k[1:]}, held-out captions ({ret['num_captions']}) | {ret['model'][k]:.1f}% | "
            f"{ret['baseline'][k]:.1f}% |"
        )
    if "median_rank" in ret["model"]:
        rows.append(
            f"| text-to-video median rank of the captioned video (of {ret['num_videos']}) | "
            f"{ret['model']['median_rank']:g} | {ret['baseline']['median_rank']:g} |"
        )
    return "\n".join(rows) + "\n"


def _finished(output: Path, steps: int) -> bool:
    """Whether a training output already holds its last checkpoint (the trainer then only returns its summary)."""
    from jobs.train import Output

    return any(s >= steps for s in Output(str(output)).checkpoint_steps())


def _check_vocabulary(work: Path, config_model: Any) -> None:
    """The vocabulary must be the packaged one: the model config names it and sizes the embedding from it."""
    from vitaclip.demo.vocab import DEMO_WORDS, learn_merges, vocab_size, write_merges

    merges = learn_merges(DEMO_WORDS)
    write_merges(merges, work / "demo-bpe.txt.gz")
    packaged_bpe = Path(__file__).resolve().parent.parent / "vitaclip" / "data" / str(config_model.tokenizer)
    if packaged_bpe.read_bytes() != (work / "demo-bpe.txt.gz").read_bytes():
        raise ValueError(f"{packaged_bpe} differs from the vocabulary of DEMO_WORDS; rewrite it first")
    assert config_model.backbone_config is not None
    if config_model.backbone_config["text_cfg"]["vocab_size"] != vocab_size(len(merges)):
        raise ValueError(f"{MODEL_NAME}: text vocab_size must be {vocab_size(len(merges))}")


def _pretrain_clip(work: Path, config: DemoBuildConfig, config_model: Any, reused: list[str]) -> tuple[Path, Any]:
    """CLIP pretraining on frames of the training world; a CLIP pretrained from the same inputs is kept."""
    from vitaclip.demo.pretrain import PretrainConfig, run_pretraining, summarize

    clip_path = work / "clip" / "clip.safetensors"
    pretrain_config = PretrainConfig(steps=config.pretrain_steps, seed=config.seed)
    clip_stamp = {
        "pretrain": asdict(pretrain_config),
        "train_world": json.loads((work / "train" / "world.json").read_text()),
        "val_world": json.loads((work / "val" / "world.json").read_text()),
        "backbone": config_model.backbone_config,
    }  # not the thread count: it changes float rounding, not the recipe
    stamp_path = clip_path.with_name("stamp.json")
    if clip_path.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == clip_stamp:
        log.info("CLIP %s was pretrained with these settings; not pretraining again", clip_path)
        pretrain = json.loads(clip_path.with_suffix(".json").read_text())
        reused.append("pretrain")
    else:
        stamp_path.unlink(missing_ok=True)
        pretrain = run_pretraining(
            work / "train", config_model, clip_path, pretrain_config, eval_world_dir=work / "val"
        )
        stamp_path.write_text(json.dumps(clip_stamp, indent=2))
    for line in summarize(pretrain):
        print(line)
    return clip_path, pretrain


def _train(train_config: Any, step: str, reused: list[str]) -> None:
    """Runs (or resumes) one prompt training run with the project's trainer."""
    from jobs.train import RayTrainConfig, run_training

    if _finished(Path(train_config.output), train_config.steps):
        reused.append(step)
    summary = run_training(train_config, RayTrainConfig(local=True))
    last = summary.get("last") or {}
    log.info("%s: %s steps, loss %s, accuracy %s", step, summary.get("steps"), last.get("loss"), last.get("accuracy"))


def _train_prompts(
    work: Path, config: DemoBuildConfig, clip_path: Path, reused: list[str], timings: dict[str, float]
) -> Path:
    """Vita-CLIP prompts with the project's trainer, then (optionally) a second cosine cycle; the last output."""
    from jobs.train import resolve_checkpoint
    from vitaclip.training import AugmentConfig, OptimizerConfig, TrainConfig

    t = time.perf_counter()
    prompts = TrainConfig(
        model=MODEL_NAME, checkpoint=str(clip_path), train_list=str(work / "train" / "list.csv"),
        data_root=str(work / "train"), label_names=str(work / "seen.txt"), output=str(work / "prompts"),
        steps=config.prompt_steps, batch_size=config.prompt_batch_size, micro_batch_size=config.prompt_batch_size,
        optimizer=OptimizerConfig(lr=config.prompt_lr, warmup_steps=max(1, config.prompt_steps // 20)),
        augment=AugmentConfig(crop_scale=(0.6, 1.0), randaug_num_ops=0, decode_scale=1.0), sampling="uniform",
        save_every=min(config.prompt_steps, 500), eval_every=0, seed=config.seed,
    )  # fmt: skip
    _train(prompts, "prompt_training", reused)
    timings["prompt_training_seconds"] = time.perf_counter() - t
    if config.prompt_refine_steps <= 0:
        return Path(prompts.output)
    # A second cosine cycle (a warm restart) from the first cycle's prompts, in another data order: the motions that
    # change size or angle kept improving after the first schedule had decayed to zero.
    t = time.perf_counter()
    steps = config.prompt_refine_steps
    refine = dataclasses.replace(
        prompts,
        checkpoint=str(resolve_checkpoint(prompts.output)), output=str(work / "prompts-refine"), steps=steps,
        optimizer=dataclasses.replace(prompts.optimizer, lr=config.prompt_refine_lr, warmup_steps=max(1, steps // 20)),
        save_every=min(steps, 500), seed=config.seed + 1,
    )  # fmt: skip
    _train(refine, "prompt_refine", reused)
    timings["prompt_refine_seconds"] = time.perf_counter() - t
    return Path(refine.output)


def captioned_list(world: Path) -> Path:
    """``world/captioned.csv``: the world's ``list.csv`` labels joined with its ``captions.csv`` (a header
    ``path,label,caption``, one row per caption), the list `vitaclip train` reads captions from."""
    import csv
    import io

    labels = dict(line.rsplit(",", 1) for line in (world / "list.csv").read_text().splitlines() if line)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "caption"])
    with open(world / "captions.csv", newline="") as f:
        for video, caption in list(csv.reader(f))[1:]:
            writer.writerow([video, labels[video], caption])
    path = world / "captioned.csv"
    path.write_text(out.getvalue())
    return path


def _train_captions(
    work: Path, config: DemoBuildConfig, start: Path, reused: list[str], timings: dict[str, float]
) -> Path:
    """A cosine cycle from the prompts at ``start`` with the label loss and the caption loss; its output."""
    from jobs.train import resolve_checkpoint
    from vitaclip.training import AugmentConfig, OptimizerConfig, TrainConfig

    t = time.perf_counter()
    steps, train_list = config.caption_steps, captioned_list(work / "train")
    captions = TrainConfig(
        model=MODEL_NAME, checkpoint=str(resolve_checkpoint(str(start))), train_list=str(train_list),
        data_root=str(work / "train"), label_names=str(work / "seen.txt"), output=str(work / "prompts-captions"),
        steps=steps, batch_size=config.prompt_batch_size, micro_batch_size=config.prompt_batch_size,
        optimizer=OptimizerConfig(lr=config.caption_lr, warmup_steps=max(1, steps // 20)),
        augment=AugmentConfig(crop_scale=(0.6, 1.0), randaug_num_ops=0, decode_scale=1.0), sampling="uniform",
        save_every=min(steps, 500), eval_every=0, seed=config.seed + 2, caption_loss_weight=config.caption_loss_weight,
    )  # fmt: skip
    _train(captions, "caption_training", reused)
    timings["caption_training_seconds"] = time.perf_counter() - t
    return Path(captions.output)


def build(
    work: Path, config: DemoBuildConfig, *, install: bool = False, from_checkpoint: Path | None = None
) -> dict[str, Any]:
    """Runs every step; returns the report (also written to ``work/report.json`` and ``work/report.md``).

    Re-running on the same ``work`` folder resumes: complete worlds and a CLIP pretrained with the same settings are
    kept, and prompt training resumes from its latest checkpoint. ``from_checkpoint`` (a demo build's checkpoint,
    such as one of a build with ``caption_steps=0``) skips pretraining and the first two prompt cycles: the caption
    cycle starts from it.
    """
    from jobs.train import resolve_checkpoint
    from vitaclip.checkpoints import save_checkpoint
    from vitaclip.demo.world import world_labels
    from vitaclip.registry import create_model, get_model_config

    if install and not config.evaluate:
        raise ValueError("--install needs the evaluation (the packaged model ships its numbers): drop --no-evaluate")
    work.mkdir(parents=True, exist_ok=True)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    config_model = get_model_config(MODEL_NAME)
    _check_vocabulary(work, config_model)

    reused: list[str] = []  # steps whose results an earlier build left (their timings here are near zero)
    t = time.perf_counter()
    generated = generate_worlds(
        work, split_seed=config.seed, world_seed=config.seed, unseen_fraction=config.unseen_fraction,
        train_videos=config.train_videos, val_per_label=config.val_per_label,
        zeroshot_per_label=config.zeroshot_per_label, workers=config.workers,
    )  # fmt: skip
    timings["generate_seconds"] = time.perf_counter() - t
    if not generated:
        reused.append("generate")
    if from_checkpoint is None:
        t = time.perf_counter()
        clip_path, pretrain = _pretrain_clip(work, config, config_model, reused)
        timings["pretrain_seconds"] = time.perf_counter() - t
        prompts_out = _train_prompts(work, config, clip_path, reused, timings)
    else:
        started_from = json.loads((from_checkpoint / "report.json").read_text())
        pretrain, prompts_out = started_from["pretrain"], from_checkpoint
        reused += ["pretrain", "prompt_training", "prompt_refine"]
    if config.caption_steps > 0:
        prompts_out = _train_captions(work, config, prompts_out, reused, timings)

    # The shipped checkpoint: the trained weights, labelling every combination of the world by default.
    final = work / MODEL_NAME
    model = create_model(None, checkpoint=resolve_checkpoint(str(prompts_out)))
    model.label_names = world_labels()
    save_checkpoint(model, final)
    model = create_model(None, checkpoint=final)  # as users load it (its model id names the shipped weights)

    report: dict[str, Any] = {}
    if config.evaluate:
        t = time.perf_counter()
        report = evaluate_demo(final, work, recall_png=final / "recall.png")
        timings["evaluate_seconds"] = time.perf_counter() - t
    timings["total_seconds"] = time.perf_counter() - started
    report.update(
        motion_text_similarity=motion_text_similarity(model),
        build_config=asdict(config),
        model_id=model.model_id,
        pretrain={k: pretrain[k] for k in ("train_accuracy", "held_out_accuracy", "num_videos")},
        timings=timings,
        reused_steps=reused,
        started_from=None if from_checkpoint is None else started_from["model_id"],
    )
    _write_report(report, work, final)
    if install:
        if PACKAGED_DIR.exists():
            shutil.rmtree(PACKAGED_DIR)
        shutil.copytree(final, PACKAGED_DIR)
        print(f"installed {PACKAGED_DIR}")
    return report


def _write_report(report: dict[str, Any], work: Path, final: Path) -> None:
    """``report.json`` in ``work`` and the checkpoint ``final``; ``report.md`` when the build was evaluated."""
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if "supervised" in report:
        (work / "report.md").write_text(report_markdown(report))
    else:  # not evaluated: an earlier build's table and plot would describe other weights
        (work / "report.md").unlink(missing_ok=True)
        (final / "recall.png").unlink(missing_ok=True)
    shutil.copy(work / "report.json", final / "report.json")


def _build_parser(prog: str = "python -m jobs.demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="generate, pretrain, train prompts, evaluate (about 105 minutes on 2 CPUs)")
    b.add_argument("--work", default="out/demo-build", help="working folder (worlds, CLIP, prompts, report)")
    b.add_argument("--install", action="store_true", help="replace the packaged vitaclip-demo checkpoint")
    b.add_argument(
        "--from-checkpoint",
        help="a demo build's checkpoint to run only the caption cycle from, skipping pretraining and the first prompt "
        "cycles: one of a build with --caption-steps 0 (OUT/vitaclip-demo), as the packaged weights were made",
    )
    defaults = DemoBuildConfig()
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            b.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
            continue
        kind = type(value) if value is not None else int
        b.add_argument(flag, type=kind, default=value)
    e = sub.add_parser("evaluate", help="score a checkpoint on freshly generated worlds")
    e.add_argument("--checkpoint", default=str(PACKAGED_DIR))
    e.add_argument("--work", default="out/demo-eval")
    e.add_argument("--seed", type=int, default=7, help="seed of the fresh worlds (the split's seed is the build's)")
    e.add_argument("--val-per-label", type=int, default=1)
    e.add_argument("--zeroshot-per-label", type=int, default=2)
    e.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m jobs.demo") -> int:
    """``python -m jobs.demo build|evaluate``; 0 on success, 2 on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = _build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "build":
            fields = {k: getattr(args, k) for k in asdict(DemoBuildConfig())}
            start = Path(args.from_checkpoint) if args.from_checkpoint else None
            report = build(Path(args.work), DemoBuildConfig(**fields), install=args.install, from_checkpoint=start)
        else:
            report = evaluate_fresh(
                args.checkpoint, Path(args.work), seed=args.seed, val_per_label=args.val_per_label,
                zeroshot_per_label=args.zeroshot_per_label,
            )  # fmt: skip
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(report))
    elif "supervised" in report:
        print(report_markdown(report))
    else:
        print(f"built {report['model_id']} in {args.work} (not evaluated)")
    return 0


def evaluate_fresh(
    checkpoint: str | Path, work: Path, *, seed: int, val_per_label: int = 1, zeroshot_per_label: int = 2
) -> dict[str, Any]:
    """Scores a demo checkpoint on new worlds of ``seed`` with the seen/unseen split it was built with."""
    report_path = Path(checkpoint) / "report.json"
    if not report_path.is_file():
        raise ValueError(f"{checkpoint} has no report.json: not a demo build")
    built = json.loads(report_path.read_text())["build_config"]
    generate_worlds(
        work, split_seed=built["seed"], world_seed=seed, unseen_fraction=built["unseen_fraction"], train_videos=0,
        val_per_label=val_per_label, zeroshot_per_label=zeroshot_per_label,
    )  # fmt: skip
    return evaluate_demo(checkpoint, work)


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation entry points: ``vitaclip eval`` (classification, supervised or zero-shot) and ``vitaclip eval-retrieval``.

::

    vitaclip eval --checkpoint runs/k400 --list val.csv --data-root /data/k400 --label-names kinetics400 --views 3x1
    vitaclip eval --checkpoint vita_clip_b16.pth --model vitaclip-b16 --mode zero-shot --protocol hmdb51 \\
        --split-dir hmdb51_splits --data-root /data/hmdb51 --baseline --json
    vitaclip eval --checkpoint models/vitaclip-b16 --mode zero-shot --protocol k600 --list k600_val.csv \\
        --label-names kinetics600.txt --data-root s3://media/k600/
    vitaclip eval-retrieval --checkpoint models/vitaclip-b16 --captions msrvtt_1k.csv --data-root /data/msrvtt

``--checkpoint`` takes any checkpoint ``create_model`` reads, a training output folder (its latest checkpoint) local
or on S3. Lists are ``path,label`` lines or Parquet manifests, local or S3, as for training. Several ``--list`` flags
(or a protocol) are scored separately and summarised as mean and standard deviation. ``--baseline`` also scores the
frozen-CLIP frame-averaging model (every prompt off) on the same backbone, in the same run. Decoding runs on a local
thread pool, or with ``--ray`` on Ray Data CPU actors (local Ray or ``--ray-address``: by default one 1-CPU decoder
per CPU of the cluster, a fraction of a CPU on small machines); the model runs in this process (on its GPU when it
has one).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jobs.ray_resources import init_ray, plan_decode_pool
from vitaclip.redact import endpoint_without_userinfo, install_log_redaction, redact_text, redact_url

log = logging.getLogger("vitaclip.eval")

Mode = Literal["supervised", "zero-shot"]


@dataclass(frozen=True)
class EvalSourceConfig:
    """What both evaluations share: the model, where the videos are, how they are sampled and decoded. Each field
    is a flag of ``vitaclip eval`` and ``vitaclip eval-retrieval`` (see their ``--help``)."""

    checkpoint: str | None = None
    model: str | None = None
    random_weights: bool = False
    data_root: str = ""
    num_frames: int | None = None
    sampling: Literal["dense", "uniform"] = "dense"
    stride: int = 16
    batch_size: int = 8
    threads: int = 4
    device: str | None = None
    baseline: bool = False
    json: bool = False
    s3_endpoint_url: str | None = None
    ray: bool = False
    ray_address: str | None = None
    num_cpus: int | None = None
    decode_workers: int | None = None
    decode_cpus: float | None = None

    def __post_init__(self) -> None:
        if self.s3_endpoint_url:  # userinfo dropped here: never recorded, logged or sent
            object.__setattr__(self, "s3_endpoint_url", endpoint_without_userinfo(self.s3_endpoint_url))


@dataclass(frozen=True)
class EvalConfig(EvalSourceConfig):
    """``vitaclip eval``: classification accuracy of lists or a protocol (``mode`` None: zero-shot with a protocol,
    else supervised)."""

    list: tuple[str, ...] = ()
    label_names: str | None = None
    mode: Mode | None = None
    views: str = "3x1"
    protocol: Literal["hmdb51", "ucf101", "k600"] | None = None
    split_dir: str | None = None
    k400_names: str = "kinetics400"
    seed: int = 0
    text: Literal["model", "class-only", "templates"] | None = None
    confusion_png: str | None = None


@dataclass(frozen=True)
class RetrievalConfig(EvalSourceConfig):
    """``vitaclip eval-retrieval``: text-to-video and video-to-text recall on a captions file."""

    captions: str = ""
    views: str = "1x1"
    plot: str | None = None
    baseline: bool = True  # frame averaging on the same frozen CLIP, side by side


def eval_config_from_args(argv: Sequence[str]) -> EvalConfig:
    """``vitaclip eval`` flags -> `EvalConfig`."""
    values = vars(build_parser().parse_args(list(argv)))
    return EvalConfig(**{**values, "list": tuple(values["list"])})


def retrieval_config_from_args(argv: Sequence[str]) -> RetrievalConfig:
    """``vitaclip eval-retrieval`` flags -> `RetrievalConfig`."""
    return RetrievalConfig(**vars(build_retrieval_parser().parse_args(list(argv))))


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="checkpoint, or a training output folder (local or s3://): its latest one")
    p.add_argument("--model", help="model name for official/OpenAI checkpoints (default: vitaclip-b16)")
    p.add_argument("--random-weights", action="store_true", help="allow running without --checkpoint (smoke runs)")
    p.add_argument("--data-root", default="", help="prefix of relative paths in the lists (folder or s3://...)")
    p.add_argument("--num-frames", type=int, help="frames per view (default: the model's training T)")
    p.add_argument("--sampling", choices=["dense", "uniform"], default="dense")
    p.add_argument("--stride", type=int, default=16, help="frame stride of dense sampling (official: 16)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per forward pass")
    p.add_argument("--threads", type=int, default=4, help="decode threads")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--baseline", action="store_true", help="also score the all-prompts-off frame-averaging baseline")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint")
    p.add_argument("--ray", action="store_true", help="decode on Ray Data CPU actors (local Ray or --ray-address)")
    p.add_argument("--ray-address", help="existing Ray cluster (with --ray); default: an embedded local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray (default: all)")
    p.add_argument("--decode-workers", type=int, help="Ray decode actors, at most (with --ray; default: one per CPU)")
    p.add_argument("--decode-cpus", type=float, help="CPUs per Ray decode actor (default: 1, less on small machines)")


def build_parser(prog: str = "vitaclip eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Top-1/top-5 of a checkpoint, views softmax-averaged.")
    _common_arguments(p)
    p.add_argument("--list", action="append", default=[], help="path,label list or Parquet manifest (repeatable)")
    p.add_argument("--label-names", help="label set (kinetics400, hmdb51, ucf101) or a file with one name per line")
    p.add_argument("--mode", choices=["supervised", "zero-shot"], default=None)
    p.add_argument("--views", default="3x1", help="temporal x spatial views (official: 3x1)")
    p.add_argument(
        "--protocol",
        choices=["hmdb51", "ucf101", "k600"],
        help="zero-shot protocol: hmdb51/ucf101 read the 3 official splits from --split-dir; k600 scores 3 seeded "
        "subsets of 160 of the 220 Kinetics-600 classes not in Kinetics-400 (--list with K600 labels)",
    )
    p.add_argument("--split-dir", help="folder of the official HMDB51 (*_test_split<k>.txt) or UCF101 split files")
    p.add_argument("--k400-names", default="kinetics400", help="Kinetics-400 class names for --protocol k600")
    p.add_argument("--seed", type=int, default=0, help="seed of the Kinetics-600 subsets")
    p.add_argument(
        "--text",
        choices=["model", "class-only", "templates"],
        help="label text: the model's own (learned context; default for supervised), the bare class name through "
        "the CLIP text tower (default for zero-shot, as the official zero-shot features), or a template ensemble",
    )
    p.add_argument("--confusion-png", help="write a confusion matrix PNG here (label sets up to 60 classes)")
    return p


def build_retrieval_parser(prog: str = "vitaclip eval-retrieval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Text-to-video and video-to-text retrieval (recall@1/5/10).")
    _common_arguments(p)
    p.add_argument("--captions", required=True, help="video,caption lines (CSV; a video may have several captions)")
    p.add_argument("--views", default="1x1", help="temporal x spatial views, embeddings averaged (default 1x1)")
    p.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip frame averaging on the same frozen CLIP (scored beside the checkpoint by default)",
    )
    p.set_defaults(baseline=True)
    p.add_argument("--plot", metavar="PNG", help="write recall at k against k (checkpoint and baseline) to this PNG")
    return p


# ------------------------------------------------------------------------------------------------ helpers


def load_model(config: EvalSourceConfig, label_names: Sequence[str] | None) -> Any:
    import torch

    from jobs.train import checkpoint_on_disk
    from vitaclip.checkpoint_folder import is_vitaclip_checkpoint
    from vitaclip.registry import create_model, require_trained_weights

    require_trained_weights(config.model or "vitaclip-b16", config.checkpoint, random_weights=config.random_weights)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else None
    if config.checkpoint:
        with checkpoint_on_disk(config.checkpoint, s3_endpoint_url=config.s3_endpoint_url) as checkpoint:
            name = None if is_vitaclip_checkpoint(checkpoint) else (config.model or "vitaclip-b16")
            model = create_model(name, checkpoint=checkpoint, device=device, dtype=dtype)
    else:
        model = create_model(config.model or "vitaclip-b16", device=device, dtype=dtype)
    if label_names is not None:
        model.label_names = tuple(label_names)
    return model


def _clean(name: str) -> str:
    return name.replace("_", " ").strip()


def label_features(model: Any, names: Sequence[str], text: str) -> Any:
    """``[K, E]`` label features: the model's own, bare class names, or the template ensemble."""
    import torch
    import torch.nn.functional as F

    from vitaclip.zeroshot import TEMPLATES

    with torch.inference_mode():
        if text == "model":
            return model.encode_labels(list(names))
        if text == "class-only":
            return F.normalize(model.clip.encode_text(model.tokenize([_clean(n) for n in names])).float(), dim=-1)
        prompts = [t.format(_clean(n)) for n in names for t in TEMPLATES]
        feats = F.normalize(model.clip.encode_text(model.tokenize(prompts)).float(), dim=-1)
        return F.normalize(feats.view(len(names), len(TEMPLATES), -1).mean(dim=1), dim=-1)


def _read_entries(uri: str, names: Sequence[str], config: EvalSourceConfig) -> list[tuple[str, int]]:
    from jobs.train import load_entries

    return [
        (e.uri, e.label)
        for e in load_entries(uri, names, data_root=config.data_root, s3_endpoint_url=config.s3_endpoint_url)
    ]


def _splits(config: EvalConfig) -> tuple[list[tuple[str, list[tuple[str, int]], list[str]]], list[str]]:
    """(name, entries, label names) per split, and the full label list."""
    from jobs.train import load_label_names
    from vitaclip import evaluation as ev
    from vitaclip.training import join_root

    if config.protocol in ("hmdb51", "ucf101"):
        names = list(load_label_names(config.label_names or config.protocol, s3_endpoint_url=config.s3_endpoint_url))
        if not config.split_dir:
            raise ValueError(f"--protocol {config.protocol} needs --split-dir (the official split files)")
        out = []
        for k in (1, 2, 3):
            if config.protocol == "hmdb51":
                raw = ev.read_hmdb51_split(config.split_dir, k, class_names=names)
            else:
                raw = ev.read_ucf101_split(Path(config.split_dir) / f"testlist0{k}.txt", class_names=names)
            out.append((f"split{k}", [(join_root(config.data_root, p), y) for p, y in raw], names))
        return out, names
    if not config.list:
        raise ValueError("give --list (a path,label list or Parquet manifest) or a --protocol")
    if not config.label_names:
        raise ValueError("give --label-names (a label set or a file with one name per line)")
    names = list(load_label_names(config.label_names, s3_endpoint_url=config.s3_endpoint_url))
    lists = [(Path(u).name if len(config.list) > 1 else "all", _read_entries(u, names, config)) for u in config.list]
    if config.protocol == "k600":
        k400 = ev.load_class_list(config.k400_names)
        novel = ev.kinetics600_novel_classes(names, k400)
        out = []
        for i, subset in enumerate(ev.kinetics600_subsets(novel, seed=config.seed)):
            entries = [e for _, lst in lists for e in ev.restrict_to_classes(lst, names, subset)]
            out.append((f"subset{i + 1}", entries, subset))
        return out, names
    return [(n, entries, names) for n, entries in lists], names


def _summarise(splits: list[dict[str, Any]]) -> dict[str, Any]:
    from vitaclip.evaluation import mean_std

    if len(splits) == 1:
        return dict(splits[0])
    top1, top1_std = mean_std([s["top1"] for s in splits])
    top5, top5_std = mean_std([s["top5"] for s in splits])
    per_class: dict[str, float | None] = {}
    for s in splits:
        for name, acc in s["per_class"].items():
            if acc is not None:
                per_class.setdefault(name, 0.0)
    for name in per_class:
        vals = [s["per_class"][name] for s in splits if s["per_class"].get(name) is not None]
        per_class[name] = float(np.mean(vals))
    return {
        "top1": top1,
        "top1_std": top1_std,
        "top5": top5,
        "top5_std": top5_std,
        "num_videos": int(sum(s["num_videos"] for s in splits)),
        "per_class": per_class,
    }


def _opener(config: EvalSourceConfig) -> Any:
    from jobs.train import Opener

    return Opener(config.s3_endpoint_url)


class DecodeViewsStage:
    """Ray Data stage: ``{"i", "uri"}`` rows in, ``{"i", "views" uint8 [b, V, T, S, S, 3], "error"}`` out."""

    def __init__(self, spec: Any, s3_endpoint_url: str | None) -> None:
        from jobs.train import Opener

        self.spec = spec
        self.opener = Opener(s3_endpoint_url)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vitaclip.evaluation import decode_views_safely

        spec = self.spec
        empty = np.zeros((spec.num_views, spec.num_frames, spec.size, spec.size, 3), dtype=np.uint8)
        views, errors = [], []
        for uri in batch["uri"]:
            v, error = decode_views_safely(str(uri), spec, opener=self.opener)
            views.append(empty if v is None else v)
            errors.append(error)
        return {"i": batch["i"], "views": np.stack(views), "error": np.asarray(errors, dtype=object)}


_DECODE_BATCH = 4  # videos per Ray decode call


def _check_ray(config: EvalSourceConfig, num_videos: int) -> None:
    """With ``--ray``: starts or joins Ray and refuses a decode pool it cannot hold, before any model is loaded."""
    if config.ray:
        plan_decode_pool(
            config,
            init_ray(address=config.ray_address, num_cpus=config.num_cpus),
            num_videos,
            videos_per_batch=_DECODE_BATCH,
        )


def _decoded(uris: Sequence[str], spec: Any, config: EvalSourceConfig) -> Any:
    """``(index, views, error)`` of every video decoded on Ray Data CPU actors, or None without ``--ray``."""
    if not config.ray:
        return None
    import ray

    cluster = init_ray(address=config.ray_address, num_cpus=config.num_cpus)
    pool = plan_decode_pool(config, cluster, len(uris), videos_per_batch=_DECODE_BATCH)
    log.info("Ray cluster of %s: %s", cluster.describe(), pool.describe())
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = ray.data.from_items([{"i": i, "uri": u} for i, u in enumerate(uris)])
    ds = items.map_batches(
        DecodeViewsStage,
        fn_constructor_kwargs={"spec": spec, "s3_endpoint_url": config.s3_endpoint_url},
        batch_size=_DECODE_BATCH,
        **pool.map_batches_args(),
    )
    ds.context.execution_options = pool.execution_options()

    def rows() -> Any:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, views, error in zip(batch["i"], batch["views"], batch["error"], strict=True):
                yield int(i), (None if error else views), str(error)

    return rows()


# ------------------------------------------------------------------------------------------------ eval


def _check_model(config: EvalSourceConfig) -> None:
    """A misspelt model or missing weights is said before any list or video is read."""
    from vitaclip.checkpoint_folder import is_vitaclip_checkpoint
    from vitaclip.registry import require_trained_weights

    if config.checkpoint is not None and ("://" in config.checkpoint or is_vitaclip_checkpoint(config.checkpoint)):
        if config.model is not None and "://" not in config.checkpoint:
            from jobs.config import check_model

            check_model(config.model, config.checkpoint, given=True)  # not silently the folder's other model
        return  # a vitaclip folder carries its config; a remote one is checked once fetched
    require_trained_weights(config.model or "vitaclip-b16", config.checkpoint, random_weights=config.random_weights)


def run_eval(config: EvalConfig, mode: Mode) -> dict[str, Any]:
    from vitaclip import evaluation as ev

    _check_model(config)

    temporal, spatial = ev.parse_views(config.views)
    splits, names = _splits(config)
    _check_ray(config, max(len(entries) for _, entries, _ in splits))
    model = load_model(config, names)
    text = config.text or ("model" if mode == "supervised" else "class-only")
    if (
        mode == "supervised"
        and text == "model"
        and model.text_context is not None
        and model.text_context.class_specific
    ):
        trained = {_clean(n).lower() for n in model.text_context.label_names}
        unknown = [n for n in names if _clean(n).lower() not in trained]
        if unknown:
            raise ValueError(
                f"supervised evaluation: {len(unknown)} label names were not trained ({unknown[:3]}...); "
                "use --mode zero-shot"
            )
    spec = ev.ViewSpec(
        num_frames=config.num_frames or model.config.num_frames,
        size=model.image_size,
        sampling=config.sampling,
        stride=config.stride,
        temporal_views=temporal,
        spatial_views=spatial,
    )
    models = [("model", model, text)]
    if config.baseline:
        models.append(("baseline", ev.frame_averaging_baseline(model), "templates" if text == "model" else text))
    report: dict[str, Any] = {
        "checkpoint": config.checkpoint,
        "model_id": model.model_id,
        "mode": mode,
        "views": f"{temporal}x{spatial}",
        "num_frames": spec.num_frames,
        "sampling": spec.sampling,
    }
    for key, m, how in models:
        results = []
        for split_name, entries, split_names in splits:
            feats = label_features(m, split_names, how)
            uris = [u for u, _ in entries]
            logits, errors = ev.video_logits(
                m,
                uris,
                feats,
                spec,
                opener=_opener(config),
                batch_size=config.batch_size,
                threads=config.threads,
                decoded=_decoded(uris, spec, config),
            )
            probs = ev.average_view_probabilities(logits)
            labels = [y for _, y in entries]
            metrics = ev.classification_metrics(probs, labels, split_names)
            metrics["decode_errors"] = _warn_unread(uris, errors)
            metrics["split"] = split_name
            results.append(metrics)
            if key == "model" and config.confusion_png and len(split_names) <= ev.CONFUSION_MAX_CLASSES:
                matrix = ev.confusion_matrix(probs.argmax(axis=1), labels, len(split_names))
                path = Path(config.confusion_png)
                if len(splits) > 1:
                    path = path.with_name(f"{path.stem}-{split_name}{path.suffix}")
                ev.save_confusion_png(matrix, split_names, path, title=f"{m.config.name} {split_name}")
        summary = _summarise(results)
        if len(results) > 1:
            summary["splits"] = [{k: v for k, v in r.items() if k != "per_class"} for r in results]
        else:
            summary["decode_errors"] = results[0]["decode_errors"]
            summary["mean_class_accuracy"] = results[0]["mean_class_accuracy"]
        if key == "model":
            report.update(summary)
        else:
            report["baseline"] = summary
    return report


def _print_report(report: dict[str, Any]) -> None:
    def line(label: str, r: dict[str, Any]) -> str:
        std = f" +/- {r['top1_std']:.2f}" if "top1_std" in r else ""
        std5 = f" +/- {r['top5_std']:.2f}" if "top5_std" in r else ""
        return f"{label:<10} top-1 {r['top1']:6.2f}{std}   top-5 {r['top5']:6.2f}{std5}   ({r['num_videos']} videos)"

    print(f"{report['model_id']}  mode {report['mode']}  views {report['views']}  frames {report['num_frames']}")
    print(line("model", report))
    for s in report.get("splits", []):
        print(f"  {s['split']:<8} top-1 {s['top1']:6.2f}   top-5 {s['top5']:6.2f}   ({s['num_videos']} videos)")
    if "baseline" in report:
        print(line("baseline", report["baseline"]))
    _print_unread(report.get("decode_errors", sum(s.get("decode_errors", 0) for s in report.get("splits", []))))


def _warn_unread(uris: Sequence[str], errors: Sequence[str]) -> int:
    """Logs the videos that could not be read (the first five, with why); returns how many."""
    unread = [f"{redact_url(uri)}: {error}" for uri, error in zip(uris, errors, strict=True) if error]
    if unread:
        log.warning("%d of %d videos could not be read (scored as wrong): %s", len(unread), len(uris), unread[:5])
    return len(unread)


def _print_unread(count: int) -> None:
    """Says how many listed videos could not be read: they stay in the counts, scored as wrong answers."""
    if count:
        print(f"{count} listed video(s) could not be read or decoded: counted as wrong (logged above)")


def main(argv: Sequence[str] | None = None, mode: Mode | None = None) -> int:
    """``vitaclip eval``; 0 on success, 2 on bad input."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_log_redaction()  # the names of unreadable videos: credentials masked, terminal controls escaped
    try:
        config = eval_config_from_args(sys.argv[1:] if argv is None else argv)
        chosen: Mode = config.mode or mode or ("zero-shot" if config.protocol else "supervised")
        report = run_eval(config, chosen)
    except ValueError as exc:
        print(f"vitaclip eval: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # a list, label or caption file that is not there
        print(f"vitaclip eval: error: no such file: {exc.filename}", file=sys.stderr)
        return 2
    if config.json:
        print(json.dumps(report))
    else:
        _print_report(report)
    return 0


# ------------------------------------------------------------------------------------------------ retrieval


def read_captions(uri: str, *, data_root: str = "", s3_endpoint_url: str | None = None) -> list[tuple[str, str]]:
    """``video,caption`` rows (CSV; quoted captions may hold commas; a header ``video,caption`` is skipped)."""
    from jobs.train import read_bytes
    from vitaclip.training import join_root

    text = read_bytes(uri, s3_endpoint_url=s3_endpoint_url).decode("utf-8")
    rows = []
    for n, row in enumerate(csv.reader(io.StringIO(text))):
        if not row or not row[0].strip() or row[0].startswith("#"):
            continue
        if n == 0 and [c.strip().lower() for c in row[:2]] == ["video", "caption"]:
            continue
        if len(row) < 2:
            raise ValueError(f"{uri}:{n + 1}: expected video,caption, got {row!r}")
        rows.append((join_root(data_root, row[0].strip()), ",".join(row[1:]).strip()))
    if not rows:
        raise ValueError(f"{uri}: no captions")
    return rows


def run_retrieval(config: RetrievalConfig) -> dict[str, Any]:
    import torch

    _check_model(config)
    from vitaclip import evaluation as ev

    rows = read_captions(config.captions, data_root=config.data_root, s3_endpoint_url=config.s3_endpoint_url)
    videos = sorted({v for v, _ in rows}, key=[v for v, _ in rows].index)
    index = {v: i for i, v in enumerate(videos)}
    _check_ray(config, len(videos))
    model = load_model(config, None)
    temporal, spatial = ev.parse_views(config.views)
    spec = ev.ViewSpec(
        num_frames=config.num_frames or model.config.num_frames,
        size=model.image_size,
        sampling=config.sampling,
        stride=config.stride,
        temporal_views=temporal,
        spatial_views=spatial,
    )
    models = [("model", model)]
    if config.baseline:
        models.append(("baseline", ev.frame_averaging_baseline(model)))
    report: dict[str, Any] = {"checkpoint": config.checkpoint, "model_id": model.model_id, "views": config.views}
    for key, m in models:
        video_feats, errors = ev.video_embeddings(
            m,
            videos,
            spec,
            opener=_opener(config),
            batch_size=config.batch_size,
            threads=config.threads,
            decoded=_decoded(videos, spec, config),
        )
        with torch.inference_mode():
            texts = [c for _, c in rows]
            text_feats = torch.cat([m.encode_text(texts[i : i + 256]).float().cpu() for i in range(0, len(texts), 256)])
        sim = text_feats @ video_feats.t()  # [num_captions, num_videos]
        metrics = ev.retrieval_metrics(sim, [index[v] for v, _ in rows])
        metrics["decode_errors"] = _warn_unread(videos, errors)
        if key == "model":
            report.update(metrics)
        else:
            report["baseline"] = metrics
    if config.plot:
        curves = {"checkpoint (Vita-CLIP prompts)": report}
        if "baseline" in report:
            curves["frame averaging (same frozen CLIP)"] = report["baseline"]
        ev.save_recall_png(
            {name: {d: r[d]["recall_curve"] for d in ("text_to_video", "video_to_text")} for name, r in curves.items()},
            config.plot,
            title=f"{report['model_id']}: {report['num_captions']} captions, {report['num_videos']} videos",
        )
        report["plot"] = config.plot
    return report


def main_retrieval(argv: Sequence[str] | None = None) -> int:
    """``vitaclip eval-retrieval``; 0 on success, 2 on bad input."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_log_redaction()  # the names of unreadable videos: credentials masked, terminal controls escaped
    try:
        config = retrieval_config_from_args(sys.argv[1:] if argv is None else argv)
        report = run_retrieval(config)
    except ValueError as exc:
        print(f"vitaclip eval-retrieval: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # a list, label or caption file that is not there
        print(f"vitaclip eval-retrieval: error: no such file: {exc.filename}", file=sys.stderr)
        return 2
    if config.json:
        print(json.dumps(report))
        return 0
    print(f"{report['model_id']}  {report['num_captions']} captions, {report['num_videos']} videos")
    print(f"{'':<19} {'direction':<14} {'R@1':>6}  {'R@5':>6}  {'R@10':>6}  {'MdR':>5}  {'MnR':>6}")
    for key, name in (("model", "checkpoint"), ("baseline", "frame averaging")):
        r = report if key == "model" else report.get("baseline")
        if r is None:
            continue
        for direction in ("text_to_video", "video_to_text"):
            d = r[direction]
            print(
                f"{name:<19} {direction:<14} {d['r1']:6.2f}  {d['r5']:6.2f}  {d['r10']:6.2f}  "
                f"{d['median_rank']:5.1f}  {d['mean_rank']:6.1f}"
            )
    _print_unread(report.get("decode_errors", 0))
    if report.get("plot"):
        print(f"recall at k: {report['plot']}")
    return 0


if __name__ == "__main__":
    # python -m jobs.evaluate ARGS (classification) or python -m jobs.evaluate retrieval ARGS
    sys.exit(main_retrieval(sys.argv[2:]) if sys.argv[1:2] == ["retrieval"] else main())

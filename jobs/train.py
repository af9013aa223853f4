"""Vita-CLIP prompt learning on Ray Train: ``python -m jobs.train`` (also ``vitaclip train``)::

    python -m jobs.train --train-list train.csv --data-root s3://media/k400/ --label-names kinetics400 \\
        --checkpoint ViT-B-16.pt --output s3://media/runs/k400 --num-workers 8 --use-gpu
    python -m jobs.train --config train.yaml --steps 100        # YAML keys = flag names; flags override

Data: ``path,label`` list files (as the official trainer takes, with ``--data-root``) or Parquet manifests
(``path``/``uri`` and ``label`` columns), local or on S3. Each training worker gets its own Ray Data stream: a range
of sample counters mapped (by :class:`vitaclip.training.TrainClipSource` on CPU decode actors) to data positions,
decoded clips and augmentations, in order. A sample's content is a function of its data position, and a step's
positions are a function of the step, so a run resumed from a checkpoint reads exactly what it would have read.

Resources are sized to the Ray cluster the run finds (`jobs.ray_resources.plan_resources`): one training worker per
GPU with 1 CPU each, or one CPU worker with half the CPUs; the CPUs left feed each worker's pool of 1-CPU decoders (a
fraction of a CPU on small machines: 2 CPUs give 1 worker x 1 CPU and 1 decoder x 1 CPU). ``--num-workers``,
``--cpus-per-worker``, ``--decode-workers`` and ``--decode-cpus`` override; a request the cluster cannot hold fails at
once.

Outputs under ``--output`` (a folder or ``s3://bucket/prefix``): ``checkpoints/step-NNNNNNNNN/`` (the model in the
project's format plus ``training_state.pt``: optimizer, scheduler, scaler, step, data position, RNG states; the last
``--keep-last`` kept), ``metrics.jsonl``, ``curves.png``, ``train_config.json`` (the recipe), ``train_resources.json``
(the Ray sizes a run chose) and ``train_summary.json``. A run started on an output folder that holds checkpoints
resumes from the latest one. The output folder works wherever a checkpoint is expected (``vitaclip eval --checkpoint
OUT``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.ray_resources import DecodePool, plan_resources
from vitaclip.config import check_field_types, load_yaml_mapping
from vitaclip.redact import redact_text
from vitaclip.training import (
    CHECKPOINTS_DIR,
    TRAINING_STATE_FILE,
    LabelledVideo,
    TrainClipSource,
    TrainConfig,
    checkpoint_dir_name,
    entries_from_rows,
    parse_list_text,
)
from vitaclip.training.loop import TrainingParts, run_steps

log = logging.getLogger("vitaclip.train")

_CHECKPOINT_FILES = ("model.safetensors", TRAINING_STATE_FILE, "config.json")  # config.json last: the commit


# ------------------------------------------------------------------------------------------------ arguments


def build_parser(prog: str = "python -m jobs.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train Vita-CLIP prompts on a frozen CLIP backbone (Ray Train).")
    p.add_argument("--config", help="YAML file with the same keys as the flags (flags override)")
    p.add_argument("--model", help="registered model name or JSON config (default: vitaclip-b16)")
    p.add_argument("--checkpoint", help="start from: OpenAI/open_clip CLIP weights or a Vita-CLIP checkpoint")
    p.add_argument(
        "--train-list", help="path,label list, CSV with a header (captions) or Parquet manifest (local or s3://)"
    )
    p.add_argument("--val-list", help="held-out list, evaluated every --eval-every steps")
    p.add_argument(
        "--label-names",
        help="label set (kinetics400, hmdb51, ucf101, demo) or a file, training order (default: the model's own: "
        "kinetics400 for the Vita-CLIP models, demo for vitaclip-demo)",
    )
    p.add_argument("--data-root", help="prefix of relative list paths (folder or s3://bucket/prefix)")
    p.add_argument("--output", help="output folder or s3://bucket/prefix")
    for name, kind in (
        ("steps", int),
        ("batch-size", int),
        ("micro-batch-size", int),
        ("lr", float),
        ("weight-decay", float),
        ("warmup-steps", int),
        ("min-lr", float),
        ("max-grad-norm", float),
        ("num-frames", int),
        ("stride", int),
        ("decode-scale", float),
        ("randaug-num-ops", int),
        ("randaug-magnitude", float),
        ("randaug-magnitude-std", float),
        ("hflip-prob", float),
        ("seed", int),
        ("save-every", int),
        ("keep-last", int),
        ("eval-every", int),
        ("log-every", int),
        ("num-workers", int),
        ("cpus-per-worker", float),
        ("decode-workers", int),
        ("decode-cpus", float),
        ("num-cpus", int),
        ("decode-threads", int),
        ("decode-timeout-seconds", float),
        ("max-failures", int),
        ("caption-loss-weight", float),
    ):
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--sampling", choices=["dense", "uniform"])
    p.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--crop-ratio", type=float, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--use-gpu", dest="use_gpu", action="store_const", const=True, help="one GPU per worker")
    p.add_argument("--no-gpu", dest="use_gpu", action="store_const", const=False)
    p.add_argument(
        "--no-temporal-jitter",
        dest="temporal_jitter",
        action="store_const",
        const=False,
        help="train on the centre dense view (default: a random start per clip, as the official trainer)",
    )
    p.add_argument("--local", action="store_const", const=True, help="run in this process without Ray (one worker)")
    p.add_argument("--ray-address", help="existing Ray cluster; default: an embedded local Ray")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (MinIO, a local server)")
    return p


@dataclass(frozen=True)
class RayTrainConfig:
    """Where a training run runs and how widely; the recipe itself is a `TrainConfig`. Every field is a flag.

    Attributes:
        num_workers: Ray Train workers (DDP processes). None: one per GPU (the most that divide the batch), or one
            without GPUs.
        use_gpu: one GPU per worker (None: when the cluster has GPUs).
        cpus_per_worker: CPUs reserved by each training worker (None: 1 with a GPU, else half the cluster's CPUs;
            fractions under one CPU on small machines).
        decode_workers: Ray Data decode actors per training worker, at most (None: one per CPU left to it).
        decode_cpus: CPUs reserved by each decode actor (None: 1, or the fraction left on small machines).
        num_cpus: CPUs of the embedded local Ray (None: all); ignored with ``ray_address``.
        local: run the loop in this process without Ray (one worker, decoding on ``decode_threads`` threads).
        ray_address: an existing Ray cluster; None: an embedded local one.
        max_failures: Ray Train restarts after a worker failure (each resumes from the latest checkpoint).
    """

    num_workers: int | None = None
    use_gpu: bool | None = None
    cpus_per_worker: float | None = None
    decode_workers: int | None = None
    decode_cpus: float | None = None
    num_cpus: int | None = None
    local: bool = False
    ray_address: str | None = None
    max_failures: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("num_workers", "decode_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cpus_per_worker", "decode_cpus"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        """Training processes as far as the flags say (1 locally; the cluster decides when ``num_workers`` is None)."""
        return 1 if self.local or self.num_workers is None else self.num_workers


def config_from_args(argv: Sequence[str], *, prog: str = "python -m jobs.train") -> tuple[TrainConfig, RayTrainConfig]:
    """Flags (and ``--config`` YAML, flat keys) -> the recipe and where it runs; raises ValueError with a clear
    message."""
    args = build_parser(prog).parse_args(list(argv))
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_yaml_mapping(args.config))
    for name, value in vars(args).items():
        if name != "config" and value is not None:
            values[name] = value
    ray_names = {f.name for f in dataclasses.fields(RayTrainConfig)}
    try:
        ray = RayTrainConfig(**{k: values.pop(k) for k in list(values) if k in ray_names})
        config = TrainConfig.from_dict({**values, "world_size": ray.world_size})
    except ValueError as exc:
        raise ValueError(f"{args.config}: {exc}" if args.config else str(exc)) from None
    if not config.train_list:
        raise ValueError("give --train-list (a path,label list or a Parquet manifest)")
    if not config.output:
        raise ValueError("give --output (a folder or s3://bucket/prefix)")
    config = _local_paths_absolute(config)
    if config.label_names:  # left out: the model's, or a resumed run's (`with_label_names`, once the output is read)
        check_label_names_readable(config)
    return config, ray


def check_label_names_readable(config: TrainConfig) -> None:
    """Reads the run's label names once before any worker starts, to refuse a missing or unreadable file in one
    line."""
    try:
        load_label_names(config.label_names, s3_endpoint_url=config.s3_endpoint_url)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--label-names {config.label_names}: {getattr(exc, 'strerror', None) or exc}") from None


def with_label_names(config: TrainConfig, recorded_text: str | None) -> TrainConfig:
    """`config` with its label names when left out: those of the run it resumes (`recorded_text`, its
    ``train_config.json``), else the model's own label set (`model_label_set`)."""
    if config.label_names:
        return config
    recorded = json.loads(recorded_text).get("label_names") if recorded_text else None
    config = config.replace(label_names=recorded if isinstance(recorded, str) and recorded else model_label_set(config))
    check_label_names_readable(config)
    return config


def _local_paths_absolute(config: TrainConfig) -> TrainConfig:
    """The recipe with its local paths absolute: Ray's workers run in a folder of Ray's own, where a relative path
    names nothing (a relative --output put every checkpoint under Ray's session folder)."""

    def absolute(value: str) -> str:
        return os.path.abspath(value) if value and "://" not in value else value

    paths = ("train_list", "output", "data_root", "val_list")
    changes: dict[str, Any] = {name: absolute(getattr(config, name)) for name in paths if getattr(config, name)}
    for name in ("checkpoint", "label_names"):  # these also take names (a model tag, a packaged label set)
        value = getattr(config, name)
        if value and "://" not in value and (os.sep in value or os.path.exists(value)):
            changes[name] = absolute(value)
    return dataclasses.replace(config, **changes)


# ------------------------------------------------------------------------------------------------ reading inputs


class Opener:
    """Turns a list entry's URI into something the decoder reads: a local path, or S3 bytes / a ranged reader.

    Picklable (the S3 client is made lazily in the process that uses it), so Ray decode actors can hold one.
    """

    def __init__(self, s3_endpoint_url: str | None = None) -> None:
        self.s3_endpoint_url = s3_endpoint_url
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"s3_endpoint_url": self.s3_endpoint_url, "_client": None}

    def __call__(self, uri: str) -> Any:
        from jobs.storage import make_s3_client, open_video

        if uri.startswith("s3://") and self._client is None:
            self._client = make_s3_client(endpoint_url=self.s3_endpoint_url)
        return open_video(uri, size_bytes=None, s3_client=self._client)


def read_bytes(uri: str, *, s3_endpoint_url: str | None = None) -> bytes:
    """A whole local file or S3 object."""
    if uri.startswith("s3://"):
        from jobs.storage import make_s3_client, parse_s3_uri

        bucket, key = parse_s3_uri(uri)
        client = make_s3_client(endpoint_url=s3_endpoint_url)
        return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return Path(path).read_bytes()


def model_label_set(config: TrainConfig) -> str:
    """The label set the run's model labels with (its config's, or its checkpoint folder's): what a run trains on
    when ``--label-names`` is left out. Kinetics-400 was everyone's default: a caption-only run of vitaclip-demo
    saved a checkpoint labelling the demo's videos as "celebrating" and "sneezing".

    Raises:
        ValueError: The model has no label set of its own (give ``--label-names``).
    """
    from vitaclip.labels import list_label_sets, load_label_set
    from vitaclip.registry import default_label_names, resolve_config

    if config.checkpoint:
        with checkpoint_on_disk(config.checkpoint, s3_endpoint_url=config.s3_endpoint_url) as checkpoint:
            model_config = resolve_config(config.model, checkpoint)
            own = default_label_names(config.model, checkpoint)  # a vitaclip checkpoint's recorded labels
    else:
        model_config = resolve_config(config.model, None)
        own = None
    label_set = model_config.label_set
    if own is not None and (not label_set or load_label_set(label_set) != tuple(own)):
        label_set = next((name for name in list_label_sets() if load_label_set(name) == tuple(own)), None)
        if label_set is None:
            raise ValueError(
                f"the checkpoint was trained on {len(own)} labels of its own, not a packaged set: give --label-names "
                "(a file with its names, one per line, or another label set)"
            )
    if not label_set:
        raise ValueError(
            f"model {model_config.name!r} has no label set of its own: give --label-names (a packaged set, such as "
            "kinetics400, or a file with one name per line)"
        )
    log.info("training labels: %s, the model's label set (--label-names chooses others)", label_set)
    return label_set


def load_label_names(name_or_path: str, *, s3_endpoint_url: str | None = None) -> tuple[str, ...]:
    """A packaged label set (``kinetics400``, ``hmdb51``, ``ucf101``, ``demo``) or a local/S3 file with one name per
    line."""
    from vitaclip.evaluation import PACKAGED_CLASS_LISTS, load_class_list
    from vitaclip.labels import list_label_sets, load_label_set

    if not name_or_path:
        raise ValueError("no training label names: give a label set or a file (the train command uses the model's)")
    if name_or_path in PACKAGED_CLASS_LISTS:
        return load_class_list(name_or_path)
    if name_or_path in list_label_sets():
        return load_label_set(name_or_path)
    text = read_bytes(name_or_path, s3_endpoint_url=s3_endpoint_url).decode("utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names:
        raise ValueError(f"label names {name_or_path!r} are empty")
    return names


def load_entries(
    uri: str, label_names: Sequence[str], *, data_root: str = "", s3_endpoint_url: str | None = None
) -> list[LabelledVideo]:
    """Entries of a ``path,label`` list, a CSV with a header (``path``, ``label`` and/or ``caption``), or a Parquet
    manifest (``path`` or ``uri`` column; ``label`` and/or ``caption`` columns, a caption a string or a list of
    strings); rows repeating a path add captions to one video."""
    data = read_bytes(uri, s3_endpoint_url=s3_endpoint_url)
    if uri.endswith(".parquet") or data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        # On the calling thread: Arrow's scan threads would hold the Python bytes past the read, and a short
        # script that ends right after it aborts at exit ("terminate called without an active exception").
        table = pq.read_table(io.BytesIO(data), use_threads=False)
        column = "path" if "path" in table.column_names else "uri"
        has = {c for c in ("label", "caption") if c in table.column_names}
        if column not in table.column_names or not has:
            raise ValueError(
                f"{uri}: a manifest needs 'path' (or 'uri') and 'label' and/or 'caption' columns, has "
                f"{table.column_names}"
            )
        paths = table.column(column).to_pylist()
        labels = table.column("label").to_pylist() if "label" in has else [None] * len(paths)
        captions = table.column("caption").to_pylist() if "caption" in has else [None] * len(paths)
        rows = [
            (p, lbl, c)
            for p, lbl, cap in zip(paths, labels, captions, strict=True)
            for c in (cap if isinstance(cap, list) else [cap])
        ]
        return entries_from_rows(rows, label_names, data_root=data_root, where=uri)
    return parse_list_text(data.decode("utf-8"), label_names, data_root=data_root, where=uri)


def check_entries(entries: Sequence[LabelledVideo], config: TrainConfig, where: str) -> None:
    """A list with videos but no labels trains on captions only: that needs a caption loss; the caption loss
    contrasts the videos of one micro-batch: that needs two or more."""
    unlabelled = sum(1 for e in entries if e.label < 0)
    if unlabelled and config.caption_loss_weight <= 0:
        raise ValueError(
            f"{where}: {unlabelled} videos have captions but no label; caption-only training needs "
            "--caption-loss-weight > 0"
        )
    if config.caption_loss_weight > 0 and config.micro_batch_size < 2 and any(e.captions for e in entries):
        raise ValueError(
            f"{where} has captions: the caption loss contrasts the videos of one micro-batch, so "
            "--micro-batch-size must be 2 or more (8 or more works better)"
        )


# ------------------------------------------------------------------------------------------------ output


class Output:
    """The run's output location: checkpoints written atomically (a folder rename locally; on S3, whole objects with
    ``config.json`` last), the latest complete checkpoint found, old ones pruned, small files written whole."""

    def __init__(self, url: str, *, s3_endpoint_url: str | None = None) -> None:
        self.url = url.rstrip("/") if url.startswith("s3://") else url
        self.is_s3 = url.startswith("s3://")
        self._endpoint = s3_endpoint_url
        self._store: Any = None
        self._scratch: Path | None = None
        if not self.is_s3:
            Path(url).mkdir(parents=True, exist_ok=True)

    @property
    def store(self) -> Any:
        if self._store is None:
            from jobs.storage import open_store

            self._store = open_store(self.url, endpoint_url=self._endpoint)
        return self._store

    @property
    def scratch(self) -> Path:
        """A local folder for S3 checkpoints on their way up or down, removed by `close`."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="vitaclip-train-"))
        return self._scratch

    def close(self) -> None:
        """Removes the scratch folder: a checkpoint downloaded to resume or to evaluate (gigabytes for B/16 with its
        optimizer state) would otherwise stay in the node's temporary folder after every run."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def checkpoint_steps(self) -> list[int]:
        if not self.is_s3:
            from vitaclip.training import list_training_checkpoints

            return [s for s, _ in list_training_checkpoints(self.url)]
        files: dict[int, set[str]] = {}
        for rel in self.store.list(CHECKPOINTS_DIR + "/"):
            parts = rel.split("/")
            if len(parts) == 3 and parts[1].startswith("step-") and parts[1][5:].isdigit():
                files.setdefault(int(parts[1][5:]), set()).add(parts[2])
        return sorted(s for s, names in files.items() if set(_CHECKPOINT_FILES) <= names)

    def local_checkpoint(self, step: int) -> Path:
        """A local folder holding checkpoint ``step`` (downloaded from S3 when needed)."""
        name = checkpoint_dir_name(step)
        if not self.is_s3:
            return Path(self.url) / CHECKPOINTS_DIR / name
        folder = self.scratch / "download" / name
        if not (folder / "config.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            for file in _CHECKPOINT_FILES:
                (folder / file).write_bytes(self.store.get_bytes(f"{CHECKPOINTS_DIR}/{name}/{file}"))
        return folder

    def checkpoint_target(self, step: int) -> Path:
        """Where to write checkpoint ``step`` (its final place locally; a scratch folder for S3)."""
        if not self.is_s3:
            return Path(self.url) / CHECKPOINTS_DIR / checkpoint_dir_name(step)
        return self.scratch / "upload" / checkpoint_dir_name(step)

    def publish_checkpoint(self, step: int, keep_last: int) -> None:
        """Makes checkpoint ``step`` visible (uploads it on S3) and prunes the old ones."""
        if self.is_s3:
            folder = self.checkpoint_target(step)
            for file in _CHECKPOINT_FILES:  # config.json last: a checkpoint without it is incomplete
                self.store.put_bytes(f"{CHECKPOINTS_DIR}/{folder.name}/{file}", (folder / file).read_bytes())
            shutil.rmtree(folder, ignore_errors=True)
        steps = self.checkpoint_steps()
        for old in steps[: max(0, len(steps) - keep_last)]:
            if self.is_s3:
                for file in reversed(_CHECKPOINT_FILES):
                    self.store.delete(f"{CHECKPOINTS_DIR}/{checkpoint_dir_name(old)}/{file}")
            else:
                shutil.rmtree(Path(self.url) / CHECKPOINTS_DIR / checkpoint_dir_name(old), ignore_errors=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.is_s3:
            self.store.put_bytes(rel, data)
            return
        path = Path(self.url) / rel
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def read_text(self, rel: str) -> str | None:
        if self.is_s3:
            return self.store.get_bytes(rel).decode() if self.store.exists(rel) else None
        path = Path(self.url) / rel
        return path.read_text() if path.is_file() else None


@contextmanager
def checkpoint_on_disk(location: str, *, s3_endpoint_url: str | None = None) -> Iterator[str]:
    """A checkpoint argument as a local path while the block runs: an S3 training output's latest checkpoint is
    downloaded to a temporary folder, removed when the block ends; a local one is `resolve_checkpoint`'s."""
    if not location.startswith("s3://"):
        yield resolve_checkpoint(location)
        return
    with Output(location, s3_endpoint_url=s3_endpoint_url) as out:
        steps = out.checkpoint_steps()
        if not steps:
            raise ValueError(f"{location}: no complete checkpoint under {CHECKPOINTS_DIR}/")
        yield str(out.local_checkpoint(steps[-1]))


def resolve_checkpoint(location: str) -> str:
    """A local checkpoint argument as a path: a training output folder becomes its latest checkpoint; anything else
    is returned as given. (`checkpoint_on_disk` takes S3 outputs too.)"""
    from vitaclip.checkpoint_folder import is_vitaclip_checkpoint

    if location.startswith("s3://"):
        raise ValueError(f"{location}: an S3 checkpoint is downloaded by checkpoint_on_disk")
    path = Path(location)
    if path.is_dir() and not is_vitaclip_checkpoint(path):
        from vitaclip.training import resolve_checkpoint_path

        return str(resolve_checkpoint_path(path))
    return location


# ------------------------------------------------------------------------------------------------ the loop


def _local_micro_batches(
    source: TrainClipSource, *, num_samples: int, micro_batch_size: int, threads: int
) -> Iterator[dict[str, np.ndarray]]:
    """The same micro-batches as the Ray Data stream, decoded by a thread pool in this process (``--local``)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        window: deque[Future[Any]] = deque()
        positions: list[int] = []  # of the samples in the window, in order
        next_index = 0
        ahead = max(2 * threads, 2 * micro_batch_size)
        while next_index < num_samples or window:
            while next_index < num_samples and len(window) < ahead:
                positions.append(source.position(next_index))
                window.append(pool.submit(source.clip_at, positions[-1]))
                next_index += 1
            take = min(micro_batch_size, len(window))
            items = [window.popleft().result() for _ in range(take)]
            batch = {
                "video": np.stack([v.numpy() for v, _, _ in items]),
                "label": np.asarray([lbl for _, lbl, _ in items], dtype=np.int64),
                "valid": np.asarray([ok for _, _, ok in items], dtype=bool),
            }
            if source.with_captions:
                batch["caption"] = np.asarray([source.caption_at(p) for p in positions[:take]], dtype=object)
            del positions[:take]
            yield batch


def _model_for(config: TrainConfig, label_names: Sequence[str], s3_endpoint_url: str | None) -> Any:
    from vitaclip.checkpoint_folder import is_vitaclip_checkpoint
    from vitaclip.registry import create_model

    if config.checkpoint:
        with checkpoint_on_disk(config.checkpoint, s3_endpoint_url=s3_endpoint_url) as checkpoint:
            name = None if is_vitaclip_checkpoint(checkpoint) else config.model
            model = create_model(name, checkpoint=checkpoint, label_names=list(label_names))
    else:
        model = create_model(config.model, label_names=list(label_names))
    if model.text_context is not None and model.text_context.class_specific:
        trained = [n.replace("_", " ").strip() for n in model.text_context.label_names]
        wanted = [n.replace("_", " ").strip() for n in label_names]
        if trained != wanted:
            raise ValueError(
                "the checkpoint's class-specific text context was trained on other labels; start from CLIP weights "
                "or a checkpoint trained on these --label-names"
            )
    model.label_names = tuple(label_names)
    return model


@dataclass
class _Worker:
    """What one training worker holds: where it is, the model and its optimizer, and the step it starts from."""

    config: TrainConfig
    rank: int
    world_size: int
    device: Any
    output: Output
    label_names: tuple[str, ...]
    model: Any
    ddp_model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    precision: str
    start_step: int
    distributed: bool

    @property
    def num_frames(self) -> int:
        return self.config.num_frames or self.model.config.num_frames


def _has_captions(config: TrainConfig, label_names: Sequence[str]) -> bool:
    if config.caption_loss_weight <= 0:
        return False
    entries = load_entries(
        config.train_list, label_names, data_root=config.data_root, s3_endpoint_url=config.s3_endpoint_url
    )
    return any(e.captions for e in entries)


def _start_worker(config: TrainConfig, *, distributed: bool) -> _Worker:
    """This process's rank and device, the model on it, optimizer, scheduler and scaler, resumed from the latest
    checkpoint of the output when there is one; under Ray Train with DDP when there are several workers."""
    import torch

    from vitaclip.training import (
        build_optimizer,
        build_scaler,
        build_scheduler,
        load_training_checkpoint,
        resolve_precision,
    )

    if not distributed:
        rank, world_size = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        rank, world_size = context.get_world_rank(), context.get_world_size()
        device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    output = Output(config.output, s3_endpoint_url=config.s3_endpoint_url)
    label_names = load_label_names(config.label_names, s3_endpoint_url=config.s3_endpoint_url)
    model = _model_for(config, label_names, config.s3_endpoint_url)
    model.to(device)
    model.train()
    precision = resolve_precision(config.optimizer.precision, device)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    scaler = build_scaler(precision, device)
    start_step = 0
    steps_done = output.checkpoint_steps()
    if steps_done:
        state = load_training_checkpoint(output.local_checkpoint(steps_done[-1]), model, optimizer, scheduler, scaler)
        output.close()  # the download (on S3) is loaded
        start_step = state.step
        if rank == 0:
            log.info("resumed from step %d (%s)", start_step, output.url)
    ddp_model: Any = model
    if world_size > 1:
        import ray.train.torch

        # With captions a step may skip the label logits (a caption-only batch): parameters only they reach are
        # then unused, which DDP must be told about.
        strategy = {"broadcast_buffers": False, "find_unused_parameters": _has_captions(config, label_names)}
        ddp_model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=strategy)
    return _Worker(
        config, rank, world_size, device, output, tuple(label_names), model, ddp_model, optimizer, scheduler, scaler,
        precision, start_step, distributed,
    )  # fmt: skip


def _micro_batch_stream(worker: _Worker, data_start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """This worker's micro-batches from its start step: its Ray Data shard, or decoded here (``--local``)."""
    config = worker.config
    accumulation = config.accumulation_steps
    if worker.distributed:
        import ray.train

        shard = ray.train.get_dataset_shard(f"train_{worker.rank}")
        stream: Iterator[dict[str, np.ndarray]] = iter(
            shard.iter_batches(batch_size=config.micro_batch_size, batch_format="numpy", prefetch_batches=2)
        )
        # After a worker restart the stream starts where the driver planned, possibly before the checkpoint.
        for _ in range(max(0, worker.start_step - data_start_step) * accumulation):
            next(stream)
        return stream
    endpoint = config.s3_endpoint_url
    entries = load_entries(config.train_list, worker.label_names, data_root=config.data_root, s3_endpoint_url=endpoint)
    check_entries(entries, config, config.train_list)
    source = TrainClipSource(
        entries,
        config=config,
        num_frames=worker.num_frames,
        image_size=worker.model.image_size,
        start_step=worker.start_step,
        opener=Opener(endpoint),
    )
    return _local_micro_batches(
        source,
        num_samples=max(0, config.steps - worker.start_step) * config.per_worker_batch_size,
        micro_batch_size=config.micro_batch_size,
        threads=config.decode_threads,
    )


class _Recorder:
    """Rank 0's records of a run: ``metrics.jsonl`` (kept up to the resumed step), the progress bar, validation,
    checkpoints, ``curves.png`` and ``train_summary.json``."""

    def __init__(self, worker: _Worker, after_checkpoint: Callable[[int], None] | None) -> None:
        from tqdm import tqdm

        from vitaclip.training import count_parameters

        config, output = worker.config, worker.output
        self.worker = worker
        self.after_checkpoint = after_checkpoint
        text = output.read_text("metrics.jsonl") or ""
        self.lines = [ln for ln in text.splitlines() if ln.strip() and json.loads(ln)["step"] <= worker.start_step]
        output.write_bytes("train_config.json", json.dumps(config.to_dict(), indent=2).encode())
        self.path = None if output.is_s3 else Path(output.url) / "metrics.jsonl"
        if self.path is not None:
            self.path.write_text("".join(ln + "\n" for ln in self.lines))
        self.val_entries = None
        if config.val_list:
            self.val_entries = [
                (e.uri, e.label)
                for e in load_entries(
                    config.val_list, worker.label_names, data_root=config.data_root,
                    s3_endpoint_url=config.s3_endpoint_url,
                )
            ]  # fmt: skip
        self.progress = tqdm(
            total=config.steps, initial=worker.start_step, unit="step", dynamic_ncols=True, file=sys.stderr
        )
        self.trainable, self.total = count_parameters(worker.model)
        log.info(
            "training %d of %d parameters (%s); %d steps of %d videos, %d x %d per worker per step, %s",
            self.trainable, self.total, ", ".join(worker.model.trainable_parameter_names()), config.steps,
            config.batch_size, config.accumulation_steps, config.micro_batch_size, worker.precision,
        )  # fmt: skip

    def step(self, last: dict[str, Any]) -> None:
        """Progress, validation, metrics and checkpoint after the step ``last["step"]``."""
        config, done = self.worker.config, last["step"]
        self.progress.update(1)
        self.progress.set_postfix(
            loss=f"{last['loss']:.4f}",
            acc=f"{last['accuracy']:.3f}",
            lr=f"{last['lr']:.2e}",
            vid_s=f"{last['videos_per_second']:.1f}",
            **({"cap": f"{last['caption_loss']:.4f}"} if "caption_loss" in last else {}),
        )
        if config.eval_every and self.val_entries and (done % config.eval_every == 0 or done == config.steps):
            last["val_top1"], last["val_top5"] = self._validate()
        if done % config.log_every == 0 or done == config.steps or "val_top1" in last:
            line = json.dumps(last)
            self.lines.append(line)
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(line + "\n")
        if done % config.save_every == 0 or done == config.steps:
            self._checkpoint(done)

    def _validate(self) -> tuple[float, float]:
        from vitaclip.evaluation import ViewSpec, evaluate_classification

        worker, config = self.worker, self.worker.config
        assert self.val_entries is not None
        worker.model.eval()
        spec = ViewSpec(
            num_frames=worker.num_frames,
            size=worker.model.image_size,
            sampling=config.sampling,
            stride=config.stride,
            temporal_views=1,
            spatial_views=1,
        )
        val, _ = evaluate_classification(
            worker.model,
            self.val_entries,
            worker.label_names,
            spec,
            opener=Opener(config.s3_endpoint_url),
            threads=config.decode_threads,
        )
        worker.model.train()
        return val["top1"], val["top5"]

    def _checkpoint(self, done: int) -> None:
        from vitaclip.training import save_training_checkpoint

        worker, config, output = self.worker, self.worker.config, self.worker.output
        save_training_checkpoint(
            output.checkpoint_target(done),
            worker.model,
            worker.optimizer,
            worker.scheduler,
            worker.scaler,
            step=done,
            samples_seen=done * config.batch_size,
            extra={"train_config": config.to_dict()},
        )
        output.publish_checkpoint(done, config.keep_last)
        if output.is_s3:
            output.write_bytes("metrics.jsonl", "".join(ln + "\n" for ln in self.lines).encode())
        if self.after_checkpoint is not None:
            self.after_checkpoint(done)

    def finish(self, last: dict[str, Any], elapsed: float) -> None:
        """Closes the progress bar; writes the curves, the metrics (on S3) and ``train_summary.json``."""
        from vitaclip.evaluation import save_curves_png

        worker, output = self.worker, self.worker.output
        self.progress.close()
        records = [json.loads(ln) for ln in self.lines]
        scratch = Path(tempfile.mkdtemp(prefix="vitaclip-plot-"))
        png = save_curves_png(
            records,
            [k for k in ("loss", "accuracy", "caption_loss", "lr", "val_top1") if any(k in r for r in records)],
            scratch / "curves.png",
        )
        output.write_bytes("curves.png", png.read_bytes())
        shutil.rmtree(scratch, ignore_errors=True)
        if output.is_s3:
            output.write_bytes("metrics.jsonl", "".join(ln + "\n" for ln in self.lines).encode())
        summary = {
            "output": output.url,
            "steps": worker.config.steps,
            "resumed_from_step": worker.start_step,
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "trainable_parameter_names": worker.model.trainable_parameter_names(),
            "precision": worker.precision,
            "world_size": worker.world_size,
            "last": last,
            "elapsed_seconds": round(elapsed, 3),
        }
        output.write_bytes("train_summary.json", json.dumps(summary, indent=2).encode())


def train_loop(loop_config: dict[str, Any]) -> None:
    """One training worker: under Ray Train (DDP, a Ray Data stream per worker) or in this process (``--local``).

    ``loop_config``: ``config`` (a `TrainConfig` as a dict), ``data_start_step`` (where the driver started the data
    streams) and optionally ``after_checkpoint`` (called on rank 0 with the step of each checkpoint it published).
    """
    config = TrainConfig.from_dict(loop_config["config"])
    worker = _start_worker(config, distributed=bool(loop_config.get("distributed")))
    stream = _micro_batch_stream(worker, int(loop_config["data_start_step"]))
    recorder = _Recorder(worker, loop_config.get("after_checkpoint")) if worker.rank == 0 else None
    parts = TrainingParts(
        config, worker.model, worker.ddp_model, worker.optimizer, worker.scheduler, worker.scaler, worker.device,
        worker.precision, worker.world_size, worker.start_step,
    )  # fmt: skip
    try:
        last, seconds = run_steps(parts, stream, recorder.step if recorder is not None else None)
        if recorder is not None:
            recorder.finish(last, seconds)
    finally:
        worker.output.close()  # checkpoints on their way up to S3


# ------------------------------------------------------------------------------------------------ driver


def _counters(num_samples: int, num_blocks: int) -> Any:
    """A dataset of the sample counters ``0 .. num_samples - 1`` (column ``index``) in ``num_blocks`` blocks.

    Built from in-memory Arrow blocks rather than ``ray.data.range``: a range is read by 1-CPU read tasks, and on a
    small machine the decode actors and training workers hold every CPU, so the read would wait for ever.
    """
    import pyarrow as pa
    import ray.data

    bounds = np.linspace(0, num_samples, num_blocks + 1).round().astype(np.int64)
    tables = [
        pa.table({"index": np.arange(lo, hi, dtype=np.int64)})
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        if hi > lo
    ]
    return ray.data.from_arrow(tables)


def _rank_datasets(
    config: TrainConfig, start_step: int, model_config: Any, image_size: int, decode: DecodePool
) -> dict[str, Any]:
    """One ordered Ray Data stream per training worker: sample counters -> decoded, augmented clips."""
    label_names = load_label_names(config.label_names, s3_endpoint_url=config.s3_endpoint_url)
    entries = load_entries(
        config.train_list, label_names, data_root=config.data_root, s3_endpoint_url=config.s3_endpoint_url
    )
    check_entries(entries, config, config.train_list)
    per_worker = config.per_worker_batch_size
    num_samples = max(0, config.steps - start_step) * per_worker
    num_frames = config.num_frames or model_config.num_frames
    datasets = {}
    for rank in range(config.world_size):
        ds = _counters(max(num_samples, 1), max(1, min(64, num_samples // per_worker or 1)))
        datasets[f"train_{rank}"] = ds.map_batches(
            TrainClipSource,
            fn_constructor_kwargs=dict(
                entries=entries,
                config=config,
                num_frames=num_frames,
                image_size=image_size,
                rank=rank,
                world_size=config.world_size,
                start_step=start_step,
                opener=Opener(config.s3_endpoint_url),
            ),
            batch_size=config.micro_batch_size,
            **decode.map_batches_args(),
        )
    return datasets


def run_training(
    config: TrainConfig,
    ray: RayTrainConfig | None = None,
    *,
    after_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) a training run to its last step; returns the summary written to ``train_summary.json``.

    ``ray`` says where (default: an embedded local Ray sized to this machine). ``after_checkpoint`` is called by the
    first worker with the step of each checkpoint it published (a test kills the process there, as a preempted
    worker dies).
    """
    ray = ray or RayTrainConfig()
    output = Output(config.output, s3_endpoint_url=config.s3_endpoint_url)
    steps_done = output.checkpoint_steps()
    start_step = steps_done[-1] if steps_done else 0
    recorded = output.read_text("train_config.json") if start_step else None
    config = with_label_names(config, recorded)
    if start_step:
        _check_same_recipe(config, recorded, output.url)
    loop_config = {
        "config": config.to_dict(),
        "data_start_step": start_step,
        "after_checkpoint": after_checkpoint,
        "distributed": not ray.local,
    }
    if start_step < config.steps:
        from vitaclip.training.data import UnknownLabel

        try:
            if ray.local:
                train_loop({**loop_config, "config": config.replace(world_size=1).to_dict()})
            else:
                _run_ray(config, ray, loop_config, start_step)  # its driver reads the list first
        except UnknownLabel as exc:
            raise UnknownLabel(f"{exc} ({redact_text(config.label_names)}; --label-names chooses them)") from None
    text = output.read_text("train_summary.json")
    summary = (
        json.loads(text) if text else {"output": output.url, "steps": config.steps, "resumed_from_step": start_step}
    )
    return {**summary, "already_done": start_step >= config.steps}


# What a resumed run must share with the run it resumes: the schedule, the data order and what is trained. Paths may
# move (data copied elsewhere) and the operational knobs (logging, saving, decoding threads) may change.
_RECIPE_FIELDS = ("model", "steps", "batch_size", "num_frames", "sampling", "stride", "temporal_jitter", "seed",
                  "optimizer", "augment", "caption_loss_weight", "label_names")  # fmt: skip


def _check_same_recipe(config: TrainConfig, recorded_text: str | None, url: str) -> None:
    """Refuses to resume an output with another recipe: the learning-rate schedule and the data positions are
    functions of the step and of these fields, so a resumed run with other values would not be the run it claims."""
    if not recorded_text:
        return
    recorded, current = json.loads(recorded_text), config.to_dict()
    differ = [f"{name}: {recorded[name]!r} there, {current[name]!r} now" for name in _RECIPE_FIELDS
              if name in recorded and recorded[name] != current[name]]  # fmt: skip
    if differ:
        raise ValueError(
            f"{url} holds a run of another recipe ({'; '.join(differ)}): resuming it would change its schedule "
            "mid-run; give the same values, or start a new --output with --checkpoint naming this one"
        )


def _run_ray(config: TrainConfig, ray_config: RayTrainConfig, loop_config: dict[str, Any], start_step: int) -> None:
    import ray
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.ray_resources import init_ray
    from vitaclip.registry import resolve_config

    cluster = init_ray(address=ray_config.ray_address, num_cpus=ray_config.num_cpus)
    plan = plan_resources(config, ray_config, cluster)
    log.info("Ray cluster of %s: %s", cluster.describe(), plan.describe())
    # The world size travels to the workers (the loop splits the batch by it); the sizes chosen are recorded.
    config = config.replace(world_size=plan.num_workers)
    resources = {
        "num_workers": plan.num_workers,
        "use_gpu": plan.use_gpu,
        "cpus_per_worker": plan.cpus_per_worker,
        "decode_workers": plan.decode.max_workers,
        "decode_cpus": plan.decode.cpus_per_worker,
        "cluster": {"cpus": cluster.cpus, "gpus": cluster.gpus},
    }
    output = Output(config.output, s3_endpoint_url=config.s3_endpoint_url)
    output.write_bytes("train_resources.json", json.dumps(resources, indent=2).encode())
    loop_config = {**loop_config, "config": config.to_dict()}
    if config.checkpoint:
        with checkpoint_on_disk(config.checkpoint, s3_endpoint_url=config.s3_endpoint_url) as checkpoint:
            model_config = resolve_config(config.model, checkpoint)
    else:
        model_config = resolve_config(config.model, None)
    image_size = model_config.image_size
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = _rank_datasets(config, start_step, model_config, image_size, plan.decode)
    storage = tempfile.mkdtemp(prefix="vitaclip-ray-train-")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers, use_gpu=plan.use_gpu, resources_per_worker={"CPU": plan.cpus_per_worker}
        ),
        datasets=datasets,
        # Each worker's stream is budgeted to its own decoder pool: Ray Data would otherwise count on the CPUs the
        # training workers hold and wait for them.
        dataset_config=DataConfig(
            datasets_to_split=[],
            execution_options={name: plan.decode.execution_options(preserve_order=True) for name in datasets},
        ),
        run_config=RunConfig(
            name="vitaclip-train",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=ray_config.max_failures),
        ),
    )
    try:
        trainer.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m jobs.train") -> int:
    """Trains (or resumes) a run; 0 when it reached its last step, 2 on bad input, 130 when interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config, ray = config_from_args(sys.argv[1:] if argv is None else argv, prog=prog)
        summary = run_training(config, ray)
    except ValueError as exc:
        print(f"{prog}: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\n{prog}: interrupted: the same command resumes from the last step saved in the output",
            file=sys.stderr,
        )
        return 130
    last = summary.get("last") or {}
    if summary.get("already_done"):
        print(f"nothing to train: {summary.get('output')} has reached step {summary.get('steps')} already")
        return 0
    print(
        f"trained {summary.get('steps')} steps (resumed from {summary.get('resumed_from_step', 0)}); "
        f"loss {last.get('loss', float('nan')):.4f}, accuracy {last.get('accuracy', float('nan')):.3f}; "
        f"{summary.get('trainable_parameters', '?')} trainable parameters; output {summary.get('output')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

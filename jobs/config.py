"""Configuration of the indexing job: a frozen dataclass, from flags and an optional YAML file (flags override)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from index.delta_tables import MAX_RETENTION_HOURS
from jobs.storage import DEFAULT_VIDEO_EXTENSIONS
from vitaclip.config import check_field_types, load_yaml_mapping
from vitaclip.redact import endpoint_without_userinfo, redact_url, refuse_object_userinfo

DEFAULT_EXTENSIONS = tuple(sorted(DEFAULT_VIDEO_EXTENSIONS))


DEFAULT_MODEL = "vitaclip-b16"
DEFAULT_PRUNE_MAX = 0.1  # largest share of a scope's videos --prune-missing prunes in one run


def _has_packaged_weights(model: str) -> bool:
    from vitaclip.registry import packaged_checkpoint

    return packaged_checkpoint(model) is not None


def check_model(model: str, checkpoint: str | None, *, given: bool = False) -> None:
    """A misspelt model name says so (before any advice about checkpoints). `given`: the name was asked for (a flag,
    a YAML key), so even the default name must be the checkpoint folder's."""
    from vitaclip.checkpoint_folder import folder_model_name, is_vitaclip_checkpoint
    from vitaclip.registry import get_model_config

    if checkpoint is not None and is_vitaclip_checkpoint(checkpoint):
        # The folder carries its own config; a --model that names another model is a mistake worth a word (the
        # default name, unless given, stands for "the checkpoint's").
        name = folder_model_name(checkpoint)
        if model != name and (given or model != DEFAULT_MODEL):
            raise ValueError(
                f"--model {model!r} is not the model of checkpoint {checkpoint} ({name!r} in its config.json): give "
                f"{name!r} or leave --model out"
            )
        return
    get_model_config(model)  # ValueError: unknown model ...; registered models: ...


@dataclass(frozen=True)
class IndexJobConfig:
    """What one indexing run does.

    Attributes:
        inputs: ``s3://bucket/prefix``, local folders, or manifests (``.txt``, ``.csv``, ``.csv.gz``, ``.parquet``,
            or an S3 Inventory ``manifest.json``; see `jobs.storage.listing`).
        output: a local folder or an ``s3://bucket/prefix``.
        model: registered model name or JSON config.
        checkpoint: weights (official .pth, OpenAI/open_clip, vitaclip folder). Required unless ``random_weights`` or
            the model ships its own (``vitaclip-demo``).
        random_weights: allow a model without a checkpoint (smoke runs; labels mean nothing).
        labels: label set name or a file of names; None: the model's own label set.
        top_k: labels kept per video and segment.
        num_frames: frames per clip; None: the model's training T.
        segment_seconds: also embed consecutive segments of this length.
        replace_settings: when the output records other row settings for this model (``num_frames``,
            ``segment_seconds``, ``top_k``, labels; `index.row_settings`), record this run's instead of refusing the
            run. Rows indexed before keep theirs until their videos change.
        s3_endpoint_url: S3-compatible endpoint (MinIO, a local server); None: AWS.
        ray_address: an existing Ray cluster (``auto``, ``ray://...``); None: start an embedded local Ray.
        num_cpus: CPUs of the embedded local Ray (None: all).
        decode_workers: decode tasks running at once (None: the CPUs left after the embed actors).
        embed_workers: most embed actors (the pool autoscales from 1).
        gpus_per_embed_worker: GPUs per embed actor when the cluster has GPUs (0: embed on CPU actors).
        cpus_per_embed_worker: CPUs per embed actor when embedding on CPUs.
        embed_device: ``auto`` (GPUs when the cluster has some at start; on a cluster whose autoscaler can add GPU
            nodes but runs none yet, waits up to ``gpu_wait_seconds`` for one, then fails rather than embed on
            CPUs), ``gpu`` (always request GPUs, so an autoscaling cluster adds GPU nodes; up to ``embed_workers``
            actors), or ``cpu``.
        gpu_wait_seconds: how long ``auto`` waits for the autoscaler's first GPU node.
        embed_compile: ``auto`` (`torch.compile` the video tower on GPU embed actors when the run plans at least
            100,000 videos per actor: 1.6x the videos/s of ViT-B/16 on an H200 after about 35 s of compiling per
            actor), ``on`` (always, CPU actors too) or ``off``.
        decode_batch_size: videos per decode task.
        embed_batch_size: clips per embed forward pass.
        decode_piece_mib: MiB of decoded frames a decode task hands to its embed actor at a time (through the object
            store): what a decoder holds beyond one video's clips, and a unit of the embed actors' read-ahead.
        rows_per_file: clip rows (videos and segments) gathered into one pair of Delta data files by a write task
            (8,192: files of about 20-60 MB with thumbnails; each write task also costs the driver about 2 ms, so
            fewer, larger ones keep its CPU per row down at cluster row rates).
        commit_seconds: finished work is committed at least this often (and at the end): a killed run loses at
            most this much, and each embed actor's call in progress (up to 512 videos, handed on when it ends).
            Pending rows are written out at least every half of it.
        vacuum_retention_hours: at the end of a run, data files that no table version younger than this references
            are deleted (files replaced by re-indexing, files of killed runs). Keep it longer than any run lasts;
            0 turns vacuuming off. Whole hours (delta-rs vacuums by the hour).
        decode_timeout_seconds: per-video decode time limit.
        max_frames_mib: most MiB of decoded frames for one video's clips: a video that needs more (many segments of
            a long video) is a row with status ``too_long`` (refused before decoding; a later run with a higher
            limit or longer segments indexes it, within ``max_attempts``). A decode task holds up to about twice
            this for such a video.
        max_attempts: runs that may try one object (one ETag) whose row keeps failing with a retryable status
            (``timeout``, ``decoder_crashed``, ``too_long``, read errors); after that its row stands until the object
            changes or a run allows more. Tries the storage failed (``unavailable``, ``s3_error``, ...) do not
            count. 0: retry such rows in every run.
        whole_object_max_bytes: S3 objects up to this size are read with one GET; larger ones with ranged GETs.
        min_size_bytes: skip smaller objects.
        follow_outside_symlinks: read symlinks in input folders that lead to files outside them (by default such
            an entry is a row with status ``outside_folder``, never read; the search service serves no media of
            them either way).
        include_hidden: list hidden entries in input folders and under ``s3://`` prefixes too: files and folders
            whose name starts with ``.`` (a trash folder, a snapshot folder, macOS's ``._`` resource forks), left
            out by default. Inputs given by name and manifest entries are listed whatever their names.
        max_size_bytes: skip larger objects (None: no limit).
        extensions: video file extensions to list.
        prune_missing: once the listing has ended, replace the row of every indexed video under a folder or
            ``s3://`` prefix input that the listing no longer names (deleted, or left out by the filters) with a row
            of status ``deleted``, which leaves search and the index in the same commit. An input under which
            nothing was listed is left alone; manifest inputs need ``prune_scopes``.
        prune_scopes: with ``prune_missing``, the places (``s3://bucket/prefix`` or folders) that the run's listing
            covers whole, instead of its folder and prefix inputs: what a manifest such as an S3 Inventory report
            covers (its bucket, or the prefix its inventory is filtered on). Rows under them that the listing does
            not name are pruned.
        prune_max: with ``prune_missing``, the largest share of a scope's videos (those listed plus those no
            longer listed) that one run may mark ``deleted``. A scope past it is pruned not at all: the run commits
            the rest of its work, records the counts (``prune_held_back``) and exits 3, for a person to look (a
            subfolder unmounted under a listed folder, a prefix renamed). 1: no limit.
        build_index: build ``OUT/index`` after committing.
        switch_index: when ``OUT/index`` holds another model's rows, rebuild it from this model's (else it is left
            as it is: a run of a candidate model must not take the index searches use).
    """

    inputs: tuple[str, ...]
    output: str
    model: str = DEFAULT_MODEL
    checkpoint: str | None = None
    random_weights: bool = False
    labels: str | None = None
    top_k: int = 5
    num_frames: int | None = None
    segment_seconds: float | None = None
    replace_settings: bool = False
    s3_endpoint_url: str | None = None
    ray_address: str | None = None
    num_cpus: int | None = None
    decode_workers: int | None = None
    embed_workers: int = 1
    gpus_per_embed_worker: float = 1.0
    cpus_per_embed_worker: float = 1.0
    embed_device: str = "auto"
    gpu_wait_seconds: float = 600.0
    embed_compile: str = "auto"
    decode_batch_size: int = 4
    embed_batch_size: int = 32
    decode_piece_mib: float = 32.0
    rows_per_file: int = 8192
    commit_seconds: float = 300.0
    vacuum_retention_hours: float = 7 * 24.0
    decode_timeout_seconds: float = 120.0
    max_frames_mib: float = 2048.0
    max_attempts: int = 3
    whole_object_max_bytes: int = 32 * 2**20
    min_size_bytes: int = 0
    max_size_bytes: int | None = None
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    follow_outside_symlinks: bool = False
    include_hidden: bool = False
    prune_missing: bool = False
    prune_scopes: tuple[str, ...] = ()
    prune_max: float = DEFAULT_PRUNE_MAX
    build_index: bool = True
    switch_index: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        if not self.inputs:
            raise ValueError("give at least one input (s3://bucket/prefix, a folder or a manifest)")
        if not self.output:
            raise ValueError("give --output (a folder or s3://bucket/prefix)")
        for what, url in [("input", i) for i in self.inputs] + [("output", self.output)]:
            refuse_object_userinfo(url, what)
        if self.s3_endpoint_url:  # userinfo dropped here: never recorded, logged or sent
            object.__setattr__(self, "s3_endpoint_url", endpoint_without_userinfo(self.s3_endpoint_url))
        for name in ("top_k", "embed_workers", "decode_batch_size", "embed_batch_size", "rows_per_file"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.decode_piece_mib < 2**20:  # NaN and infinity too
            raise ValueError(f"decode_piece_mib must be > 0 and finite (MiB), got {self.decode_piece_mib}")
        if not 0 < self.max_frames_mib < 2**30:
            raise ValueError(f"max_frames_mib must be > 0 and finite (MiB), got {self.max_frames_mib}")
        if not 0 <= self.max_attempts <= 255:
            raise ValueError(f"max_attempts must be 0 (no limit) to 255, got {self.max_attempts}")
        # Written `not x > 0` so that NaN is refused too.
        for name in ("commit_seconds", "decode_timeout_seconds"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be > 0 and finite (seconds), got {getattr(self, name)}")
        if not 0 <= self.vacuum_retention_hours <= MAX_RETENTION_HOURS:
            raise ValueError(
                f"vacuum_retention_hours must be 0 (no vacuum) to {MAX_RETENTION_HOURS:,}, got "
                f"{self.vacuum_retention_hours}"
            )
        if self.vacuum_retention_hours != int(self.vacuum_retention_hours):
            # delta-rs vacuums by whole hours; a fraction would be rounded, silently keeping files longer.
            raise ValueError(f"vacuum_retention_hours must be whole hours, got {self.vacuum_retention_hours}")
        if self.whole_object_max_bytes < 0 or self.min_size_bytes < 0:
            raise ValueError(
                f"whole_object_max_bytes and min_size_bytes must be >= 0, got {self.whole_object_max_bytes} and "
                f"{self.min_size_bytes}"
            )
        if self.max_size_bytes is not None and self.max_size_bytes < self.min_size_bytes:
            raise ValueError(f"max_size_bytes ({self.max_size_bytes}) is below min_size_bytes ({self.min_size_bytes})")
        if self.embed_device not in ("auto", "gpu", "cpu"):
            raise ValueError(f"embed_device must be auto, gpu or cpu, got {self.embed_device!r}")
        if self.embed_compile not in ("auto", "on", "off"):
            raise ValueError(f"embed_compile must be auto, on or off, got {self.embed_compile!r}")
        if not 0 <= self.gpu_wait_seconds < math.inf:
            raise ValueError(f"gpu_wait_seconds must be >= 0, got {self.gpu_wait_seconds}")
        if not 0 < self.cpus_per_embed_worker < math.inf or not 0 <= self.gpus_per_embed_worker < math.inf:  # NaN
            raise ValueError(
                "cpus_per_embed_worker must be > 0 and gpus_per_embed_worker >= 0, both finite, got "
                f"{self.cpus_per_embed_worker} and {self.gpus_per_embed_worker}"
            )
        for name in ("num_cpus", "decode_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or left out: sized to the machine), got {getattr(self, name)}")
        if self.ray_address is not None:
            _check_ray_address(self.ray_address)
            self._absolute_paths()
        if self.num_frames is not None and not 1 <= self.num_frames <= MAX_NUM_FRAMES:
            raise ValueError(f"num_frames must be 1 to {MAX_NUM_FRAMES}, got {self.num_frames}")
        if self.segment_seconds is not None and not 0 < self.segment_seconds < math.inf:
            raise ValueError(f"segment_seconds must be > 0 and finite, got {self.segment_seconds}")
        if self.prune_scopes and not self.prune_missing:
            raise ValueError("prune_scopes are for --prune-missing runs: give --prune-missing too")
        if not 0 <= self.prune_max <= 1:  # NaN too
            raise ValueError(f"prune_max is a share of a scope's videos, 0 to 1, got {self.prune_max}")
        if self.prune_max != DEFAULT_PRUNE_MAX and not self.prune_missing:
            raise ValueError("prune_max is for --prune-missing runs: give --prune-missing too")
        for scope in self.prune_scopes:
            if not scope or ("://" in scope and not scope.startswith("s3://")):
                raise ValueError(f"a prune scope is an s3://bucket/prefix or a folder, got {redact_url(scope)!r}")
            refuse_object_userinfo(scope, "prune scope")
        if self.checkpoint is not None:  # a training output: its latest checkpoint, the same for every actor
            from vitaclip.checkpoint_folder import concrete_checkpoint

            object.__setattr__(self, "checkpoint", str(concrete_checkpoint(self.checkpoint)))
        check_model(self.model, self.checkpoint)
        if self.checkpoint is None and not self.random_weights and not _has_packaged_weights(self.model):
            raise ValueError(
                f"model {self.model!r} needs --checkpoint: without weights its embeddings and labels mean nothing "
                "(the packaged demo model is --model vitaclip-demo; pass --random-weights for a smoke run)"
            )

    def _absolute_paths(self) -> None:
        """Local paths made absolute for a cluster: its processes resolve a relative path against their own working
        folder, not this shell's (the rows went to ./out here and the index update, in an actor, looked for out/
        under the head's folder)."""
        object.__setattr__(self, "inputs", tuple(_absolute(i) for i in self.inputs))
        object.__setattr__(self, "output", _absolute(self.output))
        object.__setattr__(self, "prune_scopes", tuple(_absolute(s) for s in self.prune_scopes))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", _absolute(self.checkpoint))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MAX_NUM_FRAMES = 1024  # frames per clip: Vita-CLIP samples 8-32; more is a typo, refused before any work


def _absolute(path: str) -> str:
    """A local path made absolute (in this process's working folder); URIs (``s3://``, ``file://``) as they are."""
    return path if not path or "://" in path else os.path.abspath(path)  # an empty one is refused as it is


def _check_ray_address(address: str) -> None:
    """Refuses an address Ray would retry for minutes: an empty one, or a port outside 1-65535."""
    if address in ("auto", "local"):
        return
    rest = address.split("://", 1)[1] if "://" in address else address
    if rest.startswith("["):  # [v6 address]:port
        host, _, after = rest.partition("]")
        colon, port = after[:1], after[1:]
    else:
        host, colon, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host.strip("["):
        raise ValueError(f"ray_address must be auto, host:port or ray://host:port, got {address!r}")
    if colon and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"ray_address has no valid port (1-65535): {address!r}")


_FIELDS = {f.name: f for f in dataclasses.fields(IndexJobConfig)}


def build_parser(prog: str = "python -m jobs.index_videos") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Index videos: embeddings, labels, Delta tables, FAISS.")
    p.add_argument(
        "inputs",
        nargs="*",
        help="s3://bucket/prefix, local folders, or manifests (.txt, .csv, .csv.gz, .parquet, an S3 Inventory "
        "manifest.json)",
    )
    p.add_argument("--output", help="output folder, or s3://bucket/prefix (gs://, az:// too)")
    p.add_argument("--config", help="YAML file with the same keys as the flags (flags override)")
    p.add_argument("--model", help="registered model name or JSON config")
    p.add_argument("--checkpoint", help="model weights: official .pth, OpenAI/open_clip, or a vitaclip folder")
    p.add_argument("--random-weights", action="store_const", const=True, help="allow running without --checkpoint")
    p.add_argument("--labels", help="label set (kinetics400) or a file with one label per line")
    p.add_argument("--top-k", type=int)
    p.add_argument("--num-frames", type=int)
    p.add_argument("--segment-seconds", type=float, help="also embed consecutive segments of this many seconds")
    p.add_argument(
        "--replace-settings",
        action="store_const",
        const=True,
        help="record this run's frames, segments, top-k and labels over the output's (else a difference is refused)",
    )
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (MinIO, a local server)")
    p.add_argument("--ray-address", help="existing Ray cluster; default: start an embedded local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs for the embedded local Ray")
    p.add_argument("--decode-workers", type=int)
    p.add_argument("--embed-workers", type=int)
    p.add_argument("--gpus-per-embed-worker", type=float)
    p.add_argument("--cpus-per-embed-worker", type=float)
    p.add_argument("--embed-device", choices=["auto", "gpu", "cpu"], help="where the embed actors run")
    p.add_argument(
        "--gpu-wait-seconds",
        type=float,
        help="auto on a cluster that can add GPU nodes but runs none yet: how long to wait for one before failing",
    )
    p.add_argument(
        "--embed-compile",
        choices=["auto", "on", "off"],
        help="torch.compile the video tower (auto: on GPU embed actors, for runs of >= 100,000 videos per actor)",
    )
    p.add_argument("--decode-batch-size", type=int)
    p.add_argument("--embed-batch-size", type=int)
    p.add_argument(
        "--decode-piece-mib",
        type=float,
        help="MiB of decoded frames a decode task hands on at a time (decoder memory beyond one video's clips)",
    )
    p.add_argument("--rows-per-file", type=int, help="clip rows per written data file pair")
    p.add_argument("--commit-seconds", type=float, help="commit finished work at least this often")
    p.add_argument(
        "--vacuum-retention-hours", type=float, help="delete unreferenced data files older than this (0: no vacuum)"
    )
    p.add_argument("--decode-timeout-seconds", type=float)
    p.add_argument("--max-frames-mib", type=float, help="most MiB of frames per video (more: status too_long)")
    p.add_argument(
        "--max-attempts",
        type=int,
        help="runs that may try a video whose row keeps failing retryably (timeout, decoder_crashed...); 0: no limit",
    )
    _add_listing_options(p)
    p.add_argument(
        "--no-index",
        dest="build_index",
        action="store_const",
        const=False,
        help="skip the FAISS index (default: build it)",
    )
    p.add_argument(
        "--switch-index",
        action="store_const",
        const=True,
        help="when OUT/index holds another model's rows, make it this model's (else it is left as it is)",
    )
    _show_defaults(p)
    return p


def _add_listing_options(p: argparse.ArgumentParser) -> None:
    """What the job reads from its inputs, and which indexed videos it prunes."""
    p.add_argument("--whole-object-max-bytes", type=int, help="larger S3 objects are read with ranged GETs")
    p.add_argument("--min-size-bytes", type=int)
    p.add_argument("--max-size-bytes", type=int)
    p.add_argument("--extensions", help="comma-separated list")
    p.add_argument(
        "--follow-outside-symlinks",
        action="store_const",
        const=True,
        help="read symlinks in input folders to files outside them (else: status outside_folder, not read)",
    )
    p.add_argument(
        "--include-hidden",
        action="store_const",
        const=True,
        help="list files and folders whose name starts with '.' in input folders and prefixes (else left out)",
    )
    p.add_argument(
        "--prune-missing",
        action="store_const",
        const=True,
        help="rows of indexed videos no longer listed under the folder or s3:// inputs become status deleted",
    )
    p.add_argument(
        "--prune-scope",
        dest="prune_scopes",
        metavar="SCOPE",
        action="append",
        help="with --prune-missing: a place the listing covers whole (s3://bucket/prefix, a folder), instead of the "
        "inputs; needed for manifests (repeatable)",
    )
    p.add_argument(
        "--prune-max",
        type=float,
        help="with --prune-missing: the largest share (0-1) of a scope's videos one run may mark deleted; past it "
        "the scope is not pruned and the run exits 3 (1: no limit)",
    )


# What an option left unset means, where its config default is None or empty ("default: none" said nothing).
_UNSET_MEANS = {
    "checkpoint": "the model's packaged weights (vitaclip-demo); others need one",
    "labels": "the model's label set",
    "num_frames": "the model's",
    "segment_seconds": "whole videos only",
    "s3_endpoint_url": "AWS's, or AWS_ENDPOINT_URL",
    "num_cpus": "all of this machine's",
    "decode_workers": "one per CPU of the cluster",
    "max_size_bytes": "no limit",
    "prune_scopes": "the inputs",
}


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Appends each option's default (from the config dataclass: flags default to None so YAML can fill them)."""
    for action in parser._actions:
        field_ = _FIELDS.get(action.dest)
        if field_ is None or action.dest in ("inputs", "output", "build_index") or not action.option_strings:
            continue
        if "default" in (action.help or ""):  # its text says it
            continue
        default = field_.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        shown = _UNSET_MEANS.get(action.dest, "none") if default is None or default == "" else default
        action.help = f"{action.help or ''} (default: {shown})".strip()


def load_yaml(path: str) -> dict[str, Any]:
    """A ``--config`` file's options. Its keys are the flags' names (``top_k`` or ``top-k``, ``no_index: true``,
    ``prune_scope``) or the config's fields (``build_index: false``, ``prune_scopes``)."""
    out: dict[str, Any] = {}
    for key, value in load_yaml_mapping(path).items():
        name = str(key).replace("-", "_")
        if name == "no_index":
            if not isinstance(value, bool):
                raise ValueError(f"{path}: no_index must be true or false, got {value!r}")
            name, value = "build_index", not value
        name = "prune_scopes" if name == "prune_scope" else name
        if name not in _FIELDS and name != "inputs":
            raise ValueError(f"{path}: unknown option {key!r}; allowed: {sorted(_FIELDS)}")
        if name in out:
            raise ValueError(f"{path}: {key!r} repeats an option given under another name")
        out[name] = value
    return out


def config_from_args(argv: Sequence[str], *, prog: str = "python -m jobs.index_videos") -> IndexJobConfig:
    """Parses flags (and ``--config`` YAML) into a config; raises ValueError with a clear message."""
    args = build_parser(prog).parse_args(list(argv))
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for name in ("inputs", "extensions", "prune_scopes"):  # a YAML file's values come as any type
        value = values.get(name)
        if value is not None and not isinstance(value, (str, list, tuple)):
            kind = type(value).__name__
            raise ValueError(f"{args.config}: {name} must be a list of strings (or one string), got {kind}")
    for name, value in vars(args).items():
        if name in ("config", "inputs") or value is None:
            continue
        values[name] = value
    if args.inputs:
        values["inputs"] = args.inputs
    if isinstance(values.get("inputs"), str):
        values["inputs"] = [values["inputs"]]
    values["inputs"] = tuple(values.get("inputs") or ())
    if isinstance(values.get("extensions"), str):
        values["extensions"] = tuple(e.strip().lstrip(".").lower() for e in values["extensions"].split(",") if e)
    elif values.get("extensions") is not None:
        values["extensions"] = tuple(values["extensions"])
    if isinstance(values.get("prune_scopes"), str):
        values["prune_scopes"] = (values["prune_scopes"],)
    elif values.get("prune_scopes") is not None:
        values["prune_scopes"] = tuple(values["prune_scopes"])
    values.setdefault("output", "")
    if isinstance(values.get("inputs"), (list, tuple)):
        values["inputs"] = tuple(str(i) if isinstance(i, os.PathLike) else i for i in values["inputs"])
    try:
        config = IndexJobConfig(**values)
        if "model" in values:  # asked for: the checkpoint's model, whatever its name
            check_model(config.model, config.checkpoint, given=True)
        return config
    except ValueError as exc:
        raise ValueError(f"{args.config}: {exc}" if args.config else str(exc)) from None

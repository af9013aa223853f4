"""The indexing run: list -> plan -> read+decode (CPU actors) -> embed+label (GPU or CPU actors) -> stage -> commit.

Ray Data does the distributed part; this module only wires the stage classes of ``vitaclip.stages`` and writes the
results through ``jobs.tables`` (staging, commit, cleanup). The driver streams the listing in chunks of up to
``chunk_size`` videos, one Ray Dataset each, so memory stays bounded whatever the number of objects; staged parts are
written as rows accumulate (and at least every ``flush_seconds``), so a killed run loses little finished work.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from index.media import roots_of_inputs
from index.schema import STATUS_OK, row_id_for, schema_for, video_id_for
from jobs import tables
from jobs.config import IndexJobConfig
from jobs.ray_resources import Demand, read_cluster, require_fit
from jobs.storage import (
    Store,
    VideoObject,
    describe_listing,
    list_videos,
    make_s3_client,
    open_store,
    open_video,
    require_any,
)
from vitaclip.redact import redact_text, redact_url, redact_value
from vitaclip.stages import LISTING_ERROR, LISTING_STATUS, DecodeStage, EmbedStage

log = logging.getLogger("vitaclip.job")

# Statuses worth another try on the next run (the object may read fine later); decode failures are final.
RETRYABLE = frozenset(
    {"read_error", "timeout", "error", "unavailable", "truncated", "changed", "access_denied", "s3_error"}
)
CRASH_HOOK_ENV = "VITACLIP_TEST_CRASH_AFTER_PARTS"  # test hook: SIGKILL the driver after this many staged parts
ACTOR_KILL_HOOK_ENV = "VITACLIP_TEST_KILL_EMBED_ACTOR_ONCE"  # test hook: a marker path; the first embed call dies


class ReadDecode(DecodeStage):
    """DecodeStage reading from local files or S3 (ranged GETs for large objects)."""

    def __init__(self, *, s3_endpoint_url: str | None, whole_object_max_bytes: int, **kwargs: Any) -> None:
        self._endpoint = s3_endpoint_url
        self._whole_max = whole_object_max_bytes
        self._client: Any = None
        super().__init__(opener=self._open, **kwargs)

    def _open(self, uri: str, size_bytes: int) -> Any:
        if uri.startswith("s3://") and self._client is None:
            self._client = make_s3_client(endpoint_url=self._endpoint)
        return open_video(uri, size_bytes=size_bytes, s3_client=self._client, whole_object_max_bytes=self._whole_max)


class TimedEmbed(EmbedStage):
    """EmbedStage that records its own seconds per clip, for the run summary."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        marker = os.environ.get(ACTOR_KILL_HOOK_ENV)
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # die mid-batch like an OOM-killed worker; Ray restarts the actor and retries the batch
        start = time.perf_counter()
        out = super().__call__(batch)
        n = max(1, len(batch["status"]))
        out["embed_seconds"] = np.full(len(batch["status"]), (time.perf_counter() - start) / n)
        return out


def _chunks(items: Iterable[VideoObject], size: int) -> Iterator[list[VideoObject]]:
    chunk: list[VideoObject] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _init_ray(config: IndexJobConfig) -> tuple[int, float]:
    """Connects to (or starts) Ray; returns the cluster's CPUs and GPUs."""
    import ray

    if not ray.is_initialized():
        address = config.ray_address or os.environ.get("RAY_ADDRESS")
        if address:  # an existing cluster: also the case under `ray job submit`, which sets RAY_ADDRESS
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=True)
    resources = ray.cluster_resources()
    return int(resources.get("CPU", 1)), float(resources.get("GPU", 0))


class _Planner:
    """Streams the listing and keeps only videos that need work, counting the rest.

    It also notes the folders of local files that no folder input covers (manifest entries): with the folder
    inputs they are the run's input roots, the only places the search service may serve media from.
    """

    def __init__(
        self, committed: dict[str, tuple[str, str]], staged: dict[str, str], *, folder_inputs: Sequence[str] = ()
    ) -> None:
        self.committed, self.staged = committed, staged
        self.counts: Counter[str] = Counter()
        self._folders = tuple(os.path.abspath(f).rstrip(os.sep) + os.sep for f in folder_inputs)
        self.other_local_dirs: set[str] = set()
        self._planned: set[str] = set()  # a video listed twice (a folder given twice, folder + manifest) runs once

    def __call__(self, objects: Iterable[VideoObject]) -> Iterator[VideoObject]:
        for obj in objects:
            self.counts["listed"] += 1
            if "://" not in obj.uri and not obj.uri.startswith(self._folders):
                self.other_local_dirs.add(os.path.dirname(obj.uri))
            vid = video_id_for(obj.uri)
            if vid in self._planned:
                self.counts["duplicate_in_listing"] += 1
                continue
            done = self.committed.get(vid)
            if done is not None and done[0] == obj.etag and done[1] not in RETRYABLE:
                self.counts["already_indexed"] += 1
                continue
            if self.staged.get(vid) == obj.etag:
                self.counts["reused_from_killed_run"] += 1
                continue
            self.counts["planned"] += 1
            self._planned.add(vid)
            yield obj


def result_tables(
    batch: dict[str, np.ndarray],
    *,
    model_id: str,
    run_id: str,
    label_names: list[str],
    embed_dim: int,
    schemas: dict[str, pa.Schema] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """One embed output batch -> (video rows, segment rows) as Arrow tables of the given schemas.

    ``schemas`` maps ``videos``/``segments`` to their schema (default: the Parquet layout's, schema version 1); the
    embedding column takes its type from it (fixed-size in version 1, a plain list in the Delta tables).
    """
    schemas = schemas or {name: schema_for(name, embed_dim) for name in ("videos", "segments")}
    now = datetime.now(timezone.utc)
    n = len(batch["uri"])
    ok = np.asarray([s == STATUS_OK for s in batch["status"]])
    is_video = np.asarray(batch["segment_index"]) < 0
    labels = [
        [label_names[j] for j in row if j >= 0] if ok[i] else None for i, row in enumerate(batch["label_indices"])
    ]
    scores = [batch["label_scores"][i].tolist() if ok[i] else None for i in range(n)]
    embeddings = [batch["embedding"][i] if ok[i] else None for i in range(n)]
    video_ids = [video_id_for(str(u)) for u in batch["uri"]]
    emb_type = schemas["videos"].field("embedding").type

    def col(values: Any, mask: np.ndarray) -> list[Any]:
        return [v for v, m in zip(values, mask, strict=True) if m]

    def emb(mask: np.ndarray) -> pa.Array:
        vals = col(embeddings, mask)
        return pa.array([None if v is None else v.astype(np.float32) for v in vals], type=emb_type)

    vm = is_video
    videos = pa.table(
        {
            "video_id": col(video_ids, vm),
            "row_id": [row_id_for(v) for v in col(video_ids, vm)],
            "uri": [str(u) for u in col(batch["uri"], vm)],
            "etag": [str(e) for e in col(batch["etag"], vm)],
            "size_bytes": [int(s) for s in col(batch["size_bytes"], vm)],
            "duration_seconds": [None if np.isnan(d) else float(d) for d in col(batch["duration_seconds"], vm)],
            "fps": [None if np.isnan(f) else float(f) for f in col(batch["fps"], vm)],
            "width": [None if w < 0 else int(w) for w in col(batch["width"], vm)],
            "height": [None if h < 0 else int(h) for h in col(batch["height"], vm)],
            "codec": [c or None for c in col(batch["codec"], vm)],
            "status": [str(s) for s in col(batch["status"], vm)],
            "error_message": [m or None for m in col(batch["error_message"], vm)],
            "embedding": emb(vm),
            "labels": col(labels, vm),
            "label_scores": col(scores, vm),
            "thumbnail_jpeg": [t or None for t in col(batch["thumbnail_jpeg"], vm)],
            "model_id": [model_id] * int(vm.sum()),
            "run_id": [run_id] * int(vm.sum()),
            "indexed_at": [now] * int(vm.sum()),
        },
        schema=schemas["videos"],
    )
    sm = ~is_video
    seg_index = [int(i) for i in col(batch["segment_index"], sm)]
    segments = pa.table(
        {
            "video_id": col(video_ids, sm),
            "row_id": [row_id_for(v, i) for v, i in zip(col(video_ids, sm), seg_index, strict=True)],
            "uri": [str(u) for u in col(batch["uri"], sm)],
            "segment_index": seg_index,
            "start_seconds": [float(s) for s in col(batch["start_seconds"], sm)],
            "end_seconds": [float(s) for s in col(batch["end_seconds"], sm)],
            "embedding": emb(sm),
            "labels": col(labels, sm),
            "label_scores": col(scores, sm),
            "thumbnail_jpeg": [t or None for t in col(batch["thumbnail_jpeg"], sm)],
            "model_id": [model_id] * int(sm.sum()),
            "run_id": [run_id] * int(sm.sum()),
            "indexed_at": [now] * int(sm.sum()),
        },
        schema=schemas["segments"],
    )
    return videos, segments


def _versions() -> dict[str, str]:
    import open_clip
    import ray
    import torch

    import vitaclip

    return {
        "vitaclip": vitaclip.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "ray": ray.__version__,
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
    }


_BLOCK_VIDEOS = 128  # most videos per input block of the Dataset (a retried block repeats at most this much work)


def _crash_hook(stager: tables.RunStager, crash_after: int) -> None:
    if crash_after and stager.parts_written >= crash_after:
        os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like a preempted driver


def run_index_job(config: IndexJobConfig) -> dict[str, Any]:
    """Runs one indexing run to completion and returns its summary (also written to ``OUT/runs/<run_id>.json``)."""
    import ray

    import vitaclip
    from index.build import build_from_output
    from index.cli import label_queries
    from vitaclip.model import backbone_model_config
    from vitaclip.registry import default_label_names, model_id_for, resolve_config

    started = time.time()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    store: Store = open_store(config.output, endpoint_url=config.s3_endpoint_url)
    model_config = resolve_config(config.model, config.checkpoint)
    num_frames = config.num_frames or model_config.num_frames
    image_size = int(backbone_model_config(model_config)["vision_cfg"]["image_size"])
    if config.checkpoint is not None:
        # Fail here, with the loader's message, rather than in every embed actor.
        vitaclip.create_model(config.model, checkpoint=config.checkpoint)
    model_id = model_id_for(config.model, config.checkpoint)
    label_names = list(
        vitaclip.load_label_set(config.labels)
        if config.labels
        else default_label_names(config.model, config.checkpoint) or ()
    )
    if not label_names:
        raise ValueError(f"model {config.model!r} has no label set: pass --labels")
    log.info("run %s: model %s, output %s", run_id, model_id, redact_url(store.url_for("")))
    # One embedding size per output: a model of another size would commit rows no index or reader can mix.
    model_dim = int(backbone_model_config(model_config)["embed_dim"])
    output_dim = tables.committed_embed_dim(store)
    if output_dim is not None and output_dim != model_dim:
        raise ValueError(
            f"{redact_url(store.url_for(''))} holds {output_dim}-dim embeddings but model {model_id} makes "
            f"{model_dim}-dim ones: use another --output for this model"
        )

    folder_inputs = [i for i in config.inputs if "://" not in i and os.path.isdir(i)]
    safe_config = redact_value(config.to_dict())
    # Written first, so that a killed run still says what it was and where its inputs are (the search service
    # serves media only from recorded input roots); rewritten with the full summary at the end.
    start_record = {
        "run_id": run_id,
        "state": "running",
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "output": redact_url(store.url_for("")),
        "model_id": model_id,
        "input_roots": roots_of_inputs(folder_inputs),
        "config": safe_config,
    }
    store.put_bytes(f"runs/{run_id}.json", json.dumps(start_record, indent=1).encode())
    try:
        deleted = tables.cleanup(store)
        reusable = tables.staged_runs(store)
        planner = _Planner(
            tables.committed_keys(store, model_id),
            tables.staged_keys(store, reusable, model_id),
            folder_inputs=folder_inputs,
        )
        log.info(
            "cleanup removed %d stale files; %d killed runs have reusable staged work", len(deleted), len(reusable)
        )

        filters: dict[str, Any] = dict(
            extensions=config.extensions, min_size_bytes=config.min_size_bytes, max_size_bytes=config.max_size_bytes
        )
        # The first page is fetched here, before Ray starts: a wrong bucket, refused credentials or an empty prefix
        # fail fast with a clear message.
        listing = require_any(
            list_videos(config.inputs, endpoint_url=config.s3_endpoint_url, **filters),
            where=describe_listing(config.inputs, **filters),
        )

        cpus, gpus = _init_ray(config)
        # "auto" embeds on GPUs when the cluster has some now; "gpu" asks for them regardless, so an autoscaling
        # cluster adds GPU nodes for the embed pool as it grows.
        use_gpu = config.embed_device == "gpu" or (
            config.embed_device == "auto" and gpus > 0 and config.gpus_per_embed_worker > 0
        )
        if use_gpu and config.embed_device == "auto":
            embed_workers = max(1, min(config.embed_workers, int(gpus / config.gpus_per_embed_worker)))
        else:
            embed_workers = config.embed_workers
        # One decoder per core. Without GPUs the embed actors share the cores: the decoders' CPU request shrinks so that
        # decoders and embedders fit the cluster together, and the OS shares the cores by demand.
        cpus_per_embedder = min(config.cpus_per_embed_worker, cpus / (2 * embed_workers))  # leave half to decoding
        cpu_for_embed = 0.0 if use_gpu else embed_workers * cpus_per_embedder
        decode_workers = config.decode_workers or max(1, cpus)
        cpus_per_decoder = min(1.0, max(0.1, (cpus - cpu_for_embed) / decode_workers))
        # What must run at once (the decode pool and the embed pool's first actor) has to fit, or Ray Data waits for
        # ever. GPUs are checked on an embedded Ray only: an attached cluster may add GPU nodes as it scales.
        embedded = not (config.ray_address or os.environ.get("RAY_ADDRESS"))
        gpus_needed = config.gpus_per_embed_worker if use_gpu and embedded else 0.0
        require_fit(
            "the run",
            [
                Demand("decode actor", decode_workers, cpus_per_decoder),
                Demand("embed actor", 1, 0.0 if use_gpu else cpus_per_embedder, gpus_needed),
            ],
            read_cluster(),
            hint="lower --decode-workers, use --embed-device cpu or auto, or give the run a bigger cluster",
        )
        embed_dim: int | None = None

        stager: tables.RunStager | None = None
        status_counts: Counter[str] = Counter()
        decode_seconds = embed_seconds = 0.0
        clips = 0
        crash_after = int(os.environ.get(CRASH_HOOK_ENV, "0") or 0)

        # One Dataset (one start of the actor pools) per chunk of the plan; a chunk holds up to chunk_size videos, so
        # the driver never holds the whole listing. Blocks of at most _BLOCK_VIDEOS keep retries and memory small.
        for chunk in _chunks(planner(listing), config.chunk_size):
            ds: ray.data.Dataset = ray.data.from_items(
                [
                    {
                        "uri": o.uri,
                        "etag": o.etag,
                        "size_bytes": o.size_bytes,
                        LISTING_STATUS: o.status,
                        LISTING_ERROR: o.error_message,
                    }
                    for o in chunk
                ],
                override_num_blocks=min(len(chunk), max(decode_workers * 4, -(-len(chunk) // _BLOCK_VIDEOS))),
            )
            # Ray Data restarts crashed actors and retries their batches by default (max_restarts=-1,
            # max_task_retries=-1); a batch is written only once, by the driver, so retries cannot duplicate rows.
            ds = ds.map_batches(
                ReadDecode,
                fn_constructor_kwargs=dict(
                    num_frames=num_frames,
                    size=image_size,
                    segment_seconds=config.segment_seconds,
                    timeout_seconds=config.decode_timeout_seconds,
                    s3_endpoint_url=config.s3_endpoint_url,
                    whole_object_max_bytes=config.whole_object_max_bytes,
                ),
                batch_size=config.decode_batch_size,
                compute=ray.data.ActorPoolStrategy(size=decode_workers),
                num_cpus=cpus_per_decoder,
            )
            ds = ds.map_batches(
                TimedEmbed,
                fn_constructor_kwargs=dict(
                    model=config.model,
                    checkpoint=config.checkpoint,
                    label_names=label_names,
                    top_k=config.top_k,
                    batch_size=config.embed_batch_size,
                    device=None if use_gpu else "cpu",
                ),
                batch_size=config.embed_batch_size,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=embed_workers),
                num_gpus=config.gpus_per_embed_worker if use_gpu else 0,
                num_cpus=0 if use_gpu else cpus_per_embedder,
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if stager is None:
                    embed_dim = int(batch["embedding"].shape[1])
                    stager = tables.RunStager(
                        store,
                        run_id,
                        {name: schema_for(name, embed_dim) for name in tables.TABLES},
                        rows_per_part=config.rows_per_part,
                        flush_seconds=config.flush_seconds,
                    )
                assert embed_dim is not None
                videos, segments = result_tables(
                    batch, model_id=model_id, run_id=run_id, label_names=label_names, embed_dim=embed_dim
                )
                status_counts.update(videos.column("status").to_pylist())
                decode_seconds += float(np.sum(batch["decode_seconds"]))
                embed_seconds += float(np.sum(batch["embed_seconds"]))
                clips += len(batch["uri"])
                if stager.add(videos, segments):  # the staged videos survive a crash from here on
                    _crash_hook(stager, crash_after)
            if stager is not None and stager.flush():
                _crash_hook(stager, crash_after)
            log.info("chunk done: %d videos so far (%s)", sum(status_counts.values()), dict(status_counts))

        record = tables.commit(store, run_id=run_id, staged_run_ids=[*reusable, run_id])
        index_info = (
            build_from_output(store, model_id=model_id, tune_queries=label_queries(config.model, config.checkpoint))
            if config.build_index and status_counts.get(STATUS_OK, 0) + planner.counts["already_indexed"] > 0
            else None
        )
        elapsed = time.time() - started
        processed = sum(status_counts.values())
        summary = {
            "run_id": run_id,
            "state": "committed",
            "output": redact_url(store.url_for("")),
            "model_id": model_id,
            "input_roots": roots_of_inputs([*folder_inputs, *sorted(planner.other_local_dirs)]),
            "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "elapsed_seconds": round(elapsed, 3),
            "counts": {**planner.counts, "processed": processed},
            "status": dict(status_counts),
            "clips_embedded": clips,
            "throughput": {
                "end_to_end_videos_per_second": round(processed / elapsed, 3) if elapsed else None,
                "decode_videos_per_worker_second": round(processed / decode_seconds, 3) if decode_seconds else None,
                "embed_clips_per_worker_second": round(clips / embed_seconds, 3) if embed_seconds else None,
                "decode_workers": decode_workers,
                "embed_workers_max": embed_workers,
                "embed_device": "gpu" if use_gpu else "cpu",
            },
            "commit": {
                "seq": record["seq"],
                "files": {t: len(v) for t, v in record["files"].items()},
                "consumed_staging": record["consumed_staging"],
            },
            "index": index_info,
            "config": safe_config,  # credentials come from the AWS chain only; URL userinfo and secrets are masked
            "versions": _versions(),
        }
        store.put_bytes(f"runs/{run_id}.json", json.dumps(summary, indent=1, default=str).encode())
        return summary
    except ValueError as exc:  # refused or failed on bad input: the record says so instead of "running" for ever
        failed = dict(start_record, state="failed", error=redact_text(str(exc)))
        store.put_bytes(f"runs/{run_id}.json", json.dumps(failed, indent=1).encode())
        raise

"""The indexing run: list -> plan -> read+decode (CPU tasks) -> embed+label (GPU or CPU actors) -> write -> commit.

One streaming Ray Dataset per run, so the actor pools and the model start once whatever the run's size:

- The driver streams the listing (page by page) to a planner actor (`index.commits.Planner`, about 21 bytes of
  memory per committed row and 14 per listed object, on that actor), which puts the videos that need work into the
  object store as blocks while it plans them. When the listing ends, those blocks are the Dataset's input.
- Embed actors (a Ray Data actor pool) take whole blocks and have their videos decoded by Ray tasks on the CPUs,
  which hand the frames straight to them (`jobs.decode_embed`): decoded frames never pass through the driver.
- The driver takes the embed output as block references, never rows, and groups them into write tasks that turn
  them into a pair of Delta data files where the blocks are (`index.writer`). The tasks return metadata: file
  paths, row counts, the video keys.
- A `index.commits.Committer` on the driver adds the written files to the Delta log at least every
  ``commit_seconds`` and at the end: atomically, conditionally, reconciled with other runs on the same output.

Then the index follows the tables' logs (`index.build.build_from_output`), unreferenced files are vacuumed, and
``OUT/runs/<run_id>.json`` records the run (state, counts, table versions, config without secrets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import platform
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index.commits import CommitReport, Committer, WrittenBatch
from index.delta_tables import (
    NotAnOutputError,
    OutputLocation,
    RecordChangedError,
    create_tables,
    detect_old_layout,
    may_hold_model,
    old_layout_message,
    vacuum,
)
from index.media import roots_of_inputs
from index.row_settings import RowSettings, changed_during_run, check_row_settings, required_records
from index.schema import STATUS_OK, video_id_for
from index.segments import INDEX_DIR, INFO_FILE
from index.stores import sweep_write_temporaries
from jobs.config import IndexJobConfig
from jobs.decode_embed import DecodeEmbed, status_rows
from jobs.planning import PlanActor, PlannedBlock
from jobs.ray_resources import (
    Cluster,
    EmbedDevice,
    IndexPools,
    check_command_line,
    init_ray,
    plan_index_pools,
    read_cluster,
    resolve_embed_device,
    stopped_by_sigterm,
)
from jobs.runs import in_words
from jobs.storage import (
    EmptyInputError,
    Store,
    VideoObject,
    classify_inputs,
    current_etags,
    describe_listing,
    list_videos,
    listed_scopes,
    open_store,
    require_any,
)
from jobs.storage.listing import UNLISTED_FOLDER, absolute_path, live_scopes, manifests_made_at
from vitaclip.redact import error_line, redact_text, redact_url, redact_value
from vitaclip.stages import LISTING_ERROR, LISTING_STATUS

if TYPE_CHECKING:
    # Not at run time: the registry imports torch and open_clip, and every Ray worker that runs this module's
    # planner, decoders or write tasks imports this module; only the driver and the embed actors need the model.
    from vitaclip.registry import ResolvedModel

log = logging.getLogger("vitaclip.job")

_LISTING_BATCH = 4096  # listed objects per message to the planner actor
_PLANS_IN_FLIGHT = 4  # planner calls the driver lets run ahead of the listing
# Most videos per call of the embed actor (Ray Data's batch size): a block is decoded and embedded in calls of this
# many, one after the other; the run's end goes out in smaller blocks, which Ray Data bundles back up to this.
_CALL_VIDEOS = 512
_COMPILE_MIN_VIDEOS_PER_ACTOR = 100_000  # `--embed-compile auto`: see `compile_video_tower`
_PROGRESS_SECONDS = 60.0  # how often a run logs how far it is (`Progress`)


class IndexUpdateError(RuntimeError):
    """The run's rows are committed, but updating the index from them failed on storage."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            f"the run's rows are committed, but updating the index failed: {type(cause).__name__}: "
            f"{str(cause).rstrip('.')}. The "
            "index stays at its previous version; the next run (or vitaclip build-index) updates it from the "
            "tables' log"
        )


@dataclass(frozen=True)
class RunHooks:
    """Points where a test may act inside a run (crash the driver, hold two runs at the same moment).

    Attributes:
        after_write: Called with the number of finished write tasks the driver has received so far.
        before_commit: Called before each commit of the run.
        before_videos_commit: Called between a commit's segments commit and its videos commit.
        after_commit: Called after each commit of the run landed (before the run's record says so).
    """

    after_write: Callable[[int], None] | None = None
    before_commit: Callable[[], None] | None = None
    before_videos_commit: Callable[[], None] | None = None
    after_commit: Callable[[], None] | None = None


def blocks_dataset(blocks: Sequence[PlannedBlock]) -> Any:
    """The Dataset of the planner's blocks: `ray.data.from_arrow_refs` without its metadata tasks, as that function
    builds it from the metadata the planner computed (Ray Data internals; the public function where they differ)."""
    import ray

    refs = [b.ref for b in blocks]
    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators.from_operators import FromArrow
        from ray.data._internal.stats import DatasetStats
        from ray.data.block import BlockMetadataWithSchema
        from ray.data.context import DataContext
        from ray.data.dataset import MaterializedDataset
    except ImportError:
        return ray.data.from_arrow_refs(refs)
    if any(b.size_bytes is None or b.schema is None for b in blocks):
        return ray.data.from_arrow_refs(refs)
    context = DataContext.get_current().copy()
    try:
        metadata: list[Any] = [
            BlockMetadataWithSchema(
                num_rows=b.videos, size_bytes=b.size_bytes, exec_stats=None, input_files=None, schema=b.schema
            )
            for b in blocks
        ]
        plan = LogicalPlan(FromArrow(refs, metadata), context)
        return MaterializedDataset(plan, context, DatasetStats(metadata={"FromArrow": metadata}, parent=None))
    except TypeError:  # other signatures in another Ray
        return ray.data.from_arrow_refs(refs)


def _listing_tables(objects: Iterable[VideoObject], unlisted: list[str] | None = None) -> Iterator[pa.Table]:
    """The listing in tables of ``_LISTING_BATCH`` objects; folders it could not read go to `unlisted`."""
    unlisted = [] if unlisted is None else unlisted
    batch: list[VideoObject] = []

    def table() -> pa.Table:
        return pa.table(
            {
                "uri": pa.array([o.uri for o in batch], pa.string()),
                "etag": pa.array([o.etag for o in batch], pa.string()),
                "size_bytes": pa.array([o.size_bytes for o in batch], pa.int64()),
                LISTING_STATUS: pa.array([o.status for o in batch], pa.string()),
                LISTING_ERROR: pa.array([o.error_message for o in batch], pa.string()),
            }
        )

    for obj in objects:
        if obj.status == UNLISTED_FOLDER:
            unlisted.append(obj.uri)
            continue
        batch.append(obj)
        if len(batch) >= _LISTING_BATCH:
            yield table()
            batch = []
    if batch:
        yield table()


def write_blocks(
    location: OutputLocation,
    *blocks: Any,
    model_id: str,
    run_id: str,
    label_names: list[str],
    embed_dim: int,
    final: bool = False,
    drop_uris: Sequence[str] = (),
) -> tuple[tuple[WrittenBatch | None, dict[str, float], list[str]], pa.Table | None]:
    """A write task: embed output blocks -> one pair of Delta data files of the complete videos among them
    (`index.writer.complete_videos`; rows of `drop_uris`, written whole by another task, are copies).

    Returns:
        Two values (two objects, both owned by the driver): the files' metadata (None: no video was complete), the
        counts and the URIs of the videos not complete yet; and those videos' clips (None: none), which the driver
        passes to a later write task with the blocks that follow. With ``final`` nothing more is coming:
        incomplete videos are dropped and counted.
    """
    from ray.data.block import BlockAccessor

    from index.writer import ResultWriter, complete_videos

    table = pa.concat_tables([BlockAccessor.for_block(b).to_arrow() for b in blocks], promote_options="default")
    split = complete_videos(table, final=final, drop_uris=frozenset(drop_uris))
    left_uris = sorted(set(split.leftover.column("uri").to_pylist())) if split.leftover is not None else []
    stats = {
        "clips": float(split.rows.num_rows),
        "clips_left_over": float(split.leftover.num_rows if split.leftover is not None else 0),
        "clips_duplicate": float(split.duplicates),
        "clips_incomplete": float(split.incomplete),
        "decode_seconds": 0.0,
        "embed_seconds": 0.0,
    }
    written = None
    if split.rows.num_rows:
        batch = BlockAccessor.for_block(split.rows).to_batch_format("numpy")
        writer = ResultWriter(location, model_id=model_id, run_id=run_id, label_names=label_names, embed_dim=embed_dim)
        written = writer(batch)
        stats.update(
            decode_seconds=float(np.sum(batch["decode_seconds"])), embed_seconds=float(np.sum(batch["embed_seconds"]))
        )
    return (written, stats, left_uris), split.leftover


def warm_write_worker() -> None:
    """A no-op task that leaves an idle Ray worker with `write_blocks`' imports done."""
    import ray.data.block  # noqa: F401

    import index.writer  # noqa: F401


def _versions() -> dict[str, str]:
    """The versions that made the run's rows, from the installed distributions: the driver never imports torch or
    open_clip for them (seconds of CPU at the end of every run)."""
    from importlib.metadata import PackageNotFoundError, version

    import vitaclip

    found = {"vitaclip": vitaclip.__version__}
    for key, distribution in _DISTRIBUTIONS.items():
        try:
            found[key] = version(distribution)
        except PackageNotFoundError:
            found[key] = "unknown"
    found["torch"] = _torch_build_version() or found["torch"]
    return {**found, "python": platform.python_version()}


def _torch_build_version() -> str | None:
    """``torch.__version__`` with its build tag (``2.14.1+cu130``), read from ``torch/version.py`` unimported."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")
    for location in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(location) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        match = re.search(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if match:
            return match.group(1)
    return None


_DISTRIBUTIONS = {
    "torch": "torch",
    "open_clip": "open_clip_torch",
    "ray": "ray",
    "pyarrow": "pyarrow",
    "deltalake": "deltalake",
}


class Commits:
    """The driver's side of writing: write tasks in flight, the Committer, commit timing and the run's counts.

    A write task returns the clips of videos it did not hold whole (`write_blocks`); they wait in ``leftovers`` (an
    object reference, its row count and its videos' URIs) for the next write task, unless every one of their videos
    was written whole by another task meanwhile."""

    def __init__(
        self,
        committer: Committer,
        *,
        commit_seconds: float,
        hooks: RunHooks,
        settings_changed: Callable[[], Exception] | None = None,
        on_commit: Callable[[], None] | None = None,
        planned_videos: int = 0,
    ) -> None:
        self.committer = committer
        self.progress = Progress(planned_videos)  # logged as writes finish
        self.on_commit = on_commit  # the run record's sign of life
        self.commit_seconds = commit_seconds
        self.hooks = hooks
        self.settings_changed = settings_changed  # the error of a commit refused for other recorded row settings
        self.in_flight: dict[Any, Any] = {}  # a write's metadata reference -> its leftover clips' reference
        self.leftovers: list[tuple[Any, int, list[str]]] = []
        self.received = 0
        self.status: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.reports: list[CommitReport] = []
        self.last_commit = time.monotonic()

    def submit(self, task: Any, *args: Any, **kwargs: Any) -> None:
        """Starts a write task (a remote function returning `write_blocks`' two values)."""
        meta, leftover = task.remote(*args, **kwargs)
        self.in_flight[meta] = leftover

    def collect(self, *, wait: bool = False) -> None:
        """Hands finished write tasks to the Committer (all of them when `wait`)."""
        import ray

        if not self.in_flight:
            return
        refs = list(self.in_flight)
        done, _ = ray.wait(refs, num_returns=len(refs) if wait else 1, timeout=None if wait else 0)
        for meta_ref, (written, stats, left_uris) in zip(done, ray.get(done), strict=True):
            leftover = self.in_flight.pop(meta_ref)
            if written is not None:
                self.committer.add(written)
                counts = pc.value_counts(written.keys.column("status")).to_pylist()
                self.status.update({count["values"]: count["counts"] for count in counts})
            if left_uris:
                self.leftovers.append((leftover, int(stats["clips_left_over"]), left_uris))
            self.stats.update(stats)
            self.received += 1
            if self.hooks.after_write:
                self.hooks.after_write(self.received)
        self.progress.update(self.status)

    def abandon(self, seconds: float = 2.0) -> None:
        """After a failure: reads the outcome of each write that has ended within `seconds` (both values of a failed
        one), so that Ray does not print their errors as unhandled after the run's own message, and forgets the
        rest. Files written and not committed are removed by a later run's vacuum."""
        import ray

        refs, deadline = list(self.in_flight), time.monotonic() + seconds
        ended, _ = ray.wait(refs, num_returns=len(refs), timeout=seconds, fetch_local=False) if refs else ([], [])
        for meta_ref in ended:  # (a result lost with its node would be made again: the gets are bounded too)
            try:
                ray.get(meta_ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                continue
            except Exception:  # its second value holds the same error
                with contextlib.suppress(Exception):
                    ray.get(self.in_flight[meta_ref], timeout=max(0.0, deadline - time.monotonic()))
        self.in_flight.clear()

    def take_leftovers(self) -> tuple[list[tuple[Any, int]], list[str]]:
        """The leftover clips to pass on (references and row counts), and the URIs among them of videos written
        whole since (their rows are copies). A leftover whose videos were all written whole is dropped here."""
        taken, self.leftovers = self.leftovers, []
        passed: list[tuple[Any, int]] = []
        drop: list[str] = []
        for ref, rows, uris in taken:
            holds = self.committer.holds([video_id_for(uri) for uri in uris])
            written = [uri for uri, held in zip(uris, holds, strict=True) if held]
            if len(written) == len(uris):
                self.stats["clips_duplicate"] += rows
                continue
            passed.append((ref, rows))
            drop += written
        return passed, drop

    def maybe_commit(self) -> None:
        if time.monotonic() - self.last_commit >= self.commit_seconds:
            self.commit()

    def commit(self) -> None:
        self.last_commit = time.monotonic()
        if not self.committer.pending_videos and not self.committer.pending_clean_up:
            return
        if self.hooks.before_commit:
            self.hooks.before_commit()
        try:
            report = self.committer.commit()
        except RecordChangedError:
            if self.settings_changed is None:
                raise
            raise self.settings_changed() from None
        self.reports.append(report)
        log.info(
            "committed %d videos and %d segment rows: tables at versions %s",
            report.videos_committed,
            report.segments_committed,
            report.versions,
        )
        if self.on_commit is not None:
            self.on_commit()
        if self.hooks.after_commit:
            self.hooks.after_commit()


class Progress:
    """A run's progress line, logged every `every` seconds while it decodes, embeds and writes: videos finished
    (their rows written) of those planned, the rate since the run's writing started, the time left at that rate,
    the clips embedded so far (rows that reached the driver, written in batches: a run's first writes may come
    minutes after its first embeddings) and the statuses so far (a nightly run over millions of videos otherwise
    says nothing between its commits). `running` logs from a thread of its own, so a line comes on time even while
    the driver waits for the Dataset's next output."""

    def __init__(
        self, planned: int, *, every: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.planned = planned
        self.every = _PROGRESS_SECONDS if every is None else every
        self.clock = clock
        self.started = self.last = clock()
        self.clips = 0
        self._status: Counter[str] = Counter()
        self._lock = threading.Lock()
        # Videos and clips the embed actors have finished (`PlanActor.embedded`), asked for before each line: their
        # rows reach the driver only when a call's block is written, minutes apart on a small run.
        self.embedded_source: Callable[[], tuple[int, int]] | None = None
        self._embedded = (0, 0)

    def update(self, status: Counter[str] | None = None, *, clips: int = 0) -> None:
        """Takes the statuses of the rows written so far (a copy) and `clips` more embedded clips."""
        with self._lock:
            if status is not None:
                self._status = Counter(status)
            self.clips += clips

    def maybe_log(self, status: Counter[str] | None = None) -> str | None:
        """Logs and returns the line when `every` seconds have passed since the last one; None otherwise."""
        now = self.clock()
        if now - self.last < self.every:
            return None
        if self.embedded_source is not None:
            try:
                self._embedded = self.embedded_source()
            except Exception as exc:  # a line without it rather than none
                log.debug("embedded counts not available: %s", exc)
        with self._lock:
            if status is not None:
                self._status = Counter(status)
            if now - self.last < self.every:
                return None
            self.last = now
            line = self.line(self._status, now - self.started)
        log.info("%s", line)
        return line

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Logs the line every `every` seconds from a daemon thread while the block runs."""
        poll = max(0.05, min(1.0, self.every))
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(poll):
                self.maybe_log()

        thread = threading.Thread(target=run, name="vitaclip-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def line(self, status: Counter[str], seconds: float) -> str:
        written = sum(status.values())
        done = max(written, self._embedded[0])  # a video embedded is done but for its write
        rate = done / seconds if seconds > 0 else 0.0
        if self.planned:
            share = min(100.0, 100.0 * done / self.planned)
            text = f"progress: {done:,} of {self.planned:,} videos ({share:.1f} %) in {in_words(seconds)}"
        else:
            text = f"progress: {done:,} videos in {in_words(seconds)}"
        text += f", {rate:.1f} videos/s"
        left = self.planned - done
        if self.planned and left > 0 and rate > 0:
            text += f", about {in_words(left / rate)} left"
        clips = max(self.clips, self._embedded[1])
        if clips:
            text += f"; {clips:,} clips embedded"
        if done > written:
            text += f"; {written:,} written"
        if status:
            text += "; " + ", ".join(f"{name} {count:,}" for name, count in sorted(status.items()))
        return text


class RunRecord:
    """``OUT/runs/<run_id>.json``: written when the run starts, so that a killed run still says what it was and
    where its inputs are (the search service serves media only from recorded input roots); rewritten at the end with
    the run's summary, or with its failure."""

    def __init__(self, store: Store, config: IndexJobConfig, *, model_id: str, versions: dict[str, int]) -> None:
        self.store = store
        self.started = time.time()
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
        self.folder_inputs = [i for i in config.inputs if "://" not in i and os.path.isdir(i)]
        self.safe_config = redact_value(config.to_dict())
        self.embed_device: EmbedDevice | None = None  # decided once Ray is up
        self.start = {
            "run_id": self.run_id,
            "state": "running",
            "started_at": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
            "output": redact_url(store.location.url),
            "model_id": model_id,
            "input_roots": roots_of_inputs(self.folder_inputs),
            "planned_at_versions": versions,
            "config": self.safe_config,
        }
        self._write(self.start)
        log.info("run %s", self.run_id)

    def _write(self, record: dict[str, Any]) -> None:
        self.store.put_bytes(f"runs/{self.run_id}.json", json.dumps(record, indent=1, default=str).encode())

    def alive(self) -> None:
        """Records the time of the run's latest commit (``alive_at``): a record that says "running" long after it
        is one whose driver was most likely killed. A failure to write it is only logged."""
        try:
            self._write(dict(self.start, alive_at=datetime.now(timezone.utc).isoformat()))
        except Exception as write_error:
            log.warning("could not update runs/%s.json: %s", self.run_id, redact_text(str(write_error)))

    def fail(self, exc: BaseException, commits: Commits | None = None) -> None:
        """Records a run that was refused, failed or interrupted, instead of "running" for ever, with what it
        committed before (`commits`: its rows stay). A failure to write the record is logged: the run's own error is
        the one that propagates."""
        error = redact_text(error_line(exc))
        state = "failed"
        # Ctrl-C or SIGINT, or SIGTERM (Ray's handler in the driver exits; `stopped_by_sigterm`): not a failure
        if isinstance(exc, KeyboardInterrupt) or stopped_by_sigterm(exc):
            how = "SIGTERM" if isinstance(exc, SystemExit) else "Ctrl-C or SIGINT"
            state, error = "interrupted", f"interrupted ({how}); its commits stay"
        record = dict(self.start, state=state, error=error, elapsed_seconds=round(time.time() - self.started, 3))
        if commits is not None and commits.reports:  # what its commits landed (rows collected since are not)
            reports = commits.reports
            record["commit"] = {
                "versions": reports[-1].versions,
                "videos_committed": sum(r.videos_committed for r in reports),
                "segments_committed": sum(r.segments_committed for r in reports),
            }
        try:
            self._write(record)
        except Exception as write_error:  # the output may be what failed
            log.warning("could not record the failure in runs/%s.json: %s", self.run_id, redact_text(str(write_error)))

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        self._write(summary)
        return summary


def _embedded_ray(config: IndexJobConfig) -> bool:
    return not (config.ray_address or os.environ.get("RAY_ADDRESS"))


def start_index_ray(config: IndexJobConfig) -> tuple[Cluster, IndexPools]:
    """Starts or attaches to Ray and sizes the run's pools to the cluster as it is now, refusing at once what it
    cannot hold. The embed device is settled later (`settle_embed_device`), and only for a run with videos to embed:
    a run with nothing new never asks an autoscaler for a GPU node, nor waits for one."""
    cluster = init_ray(address=config.ray_address, num_cpus=config.num_cpus)
    return cluster, _size_pools(config, cluster, config.embed_device)


def settle_embed_device(config: IndexJobConfig, cluster: Cluster) -> tuple[IndexPools, EmbedDevice]:
    """Decides the embed device (``auto`` may wait for an autoscaler's first GPU node) and sizes the pools for it."""
    device = resolve_embed_device(
        config.embed_device,
        cluster,
        embedded=_embedded_ray(config),
        gpus_per_embed_worker=config.gpus_per_embed_worker,
        wait_seconds=config.gpu_wait_seconds,
    )
    log.info("embed device: %s (%s)", device.device, device.reason)
    return _size_pools(config, read_cluster() if device.waited_seconds else cluster, device.device), device


def plan_index_pools_for(config: IndexJobConfig) -> tuple[IndexPools, EmbedDevice]:
    """`start_index_ray`, then `settle_embed_device` at once (for a run known to embed, like the benchmarks')."""
    cluster, _ = start_index_ray(config)
    return settle_embed_device(config, cluster)


def _size_pools(config: IndexJobConfig, cluster: Cluster, embed_device: str) -> IndexPools:
    return plan_index_pools(
        cluster,
        embed_device=embed_device,
        embed_workers=config.embed_workers,
        gpus_per_embed_worker=config.gpus_per_embed_worker,
        cpus_per_embed_worker=config.cpus_per_embed_worker,
        decode_workers=config.decode_workers,
        embedded=_embedded_ray(config),
    )


def resolve_run_model(config: IndexJobConfig) -> ResolvedModel:
    """The run's model, resolved once; a checkpoint that cannot be loaded fails here, with the loader's message,
    rather than in every embed actor.

    A vitaclip checkpoint folder is checked without torch (its ``config.json``, the weights' recorded sha256, the
    safetensors header), so the driver never imports torch or open_clip for it; the embed actors' strict load
    (every tensor against the model) reports a mismatch as the run's `CheckpointError` (`model_load_error`). Other
    checkpoint files are loaded here once.

    Raises:
        ValueError: An unusable model or checkpoint, or a model without labels and no ``--labels``.
    """
    import vitaclip
    from vitaclip.checkpoint_folder import check_folder, is_vitaclip_checkpoint
    from vitaclip.registry import resolve_model

    if config.checkpoint is not None and is_vitaclip_checkpoint(config.checkpoint):
        check_folder(config.checkpoint)
    elif config.checkpoint is not None:
        vitaclip.create_model(config.model, checkpoint=config.checkpoint)
    labels = vitaclip.load_label_set(config.labels) if config.labels else None
    model = resolve_model(config.model, config.checkpoint, label_names=labels, num_frames=config.num_frames)
    if not model.label_names:
        raise ValueError(f"model {config.model!r} has no label set: pass --labels")
    clip_mib = model.num_frames * model.image_size**2 * 3 / 2**20
    if clip_mib > config.max_frames_mib:  # every video would be refused as too_long, each after its decode
        raise ValueError(
            f"{model.num_frames} frames at {model.image_size} px are {clip_mib:.3g} MiB per clip, over "
            f"--max-frames-mib {config.max_frames_mib:g}: lower --num-frames or raise --max-frames-mib"
        )
    return model


def run_index_job(config: IndexJobConfig, *, hooks: RunHooks | None = None) -> dict[str, Any]:
    """Runs one indexing run to completion and returns its summary (also written to ``OUT/runs/<run_id>.json``).

    Raises:
        ValueError: The run is refused before any work (an output in the previous layout, a table of another
            embedding size, other row settings than the output records for the model, a run that cannot fit the
            cluster, nothing listed) or a bad input; its run record then says ``failed`` (from the cluster on).
    """
    import ray

    hooks = hooks or RunHooks()
    prune_scopes, model = _refusals_before_output(config)
    store: Store = open_store(config.output, endpoint_url=config.s3_endpoint_url)
    store.check_writable()
    location = store.location
    log.info("model %s, output %s", model.model_id, redact_url(location.url))
    versions, settings, replaced = _prepare_output(config, store, model)
    record = RunRecord(store, config, model_id=model.model_id, versions=versions)  # logs the run's id
    phases = Phases()
    commits: Commits | None = None
    try:
        listing = run_listing(config)  # before Ray starts: a wrong bucket or an empty prefix fails fast
        manifest_made_at = prune_manifests_made_at(config)
        phases.done("prepare")
        cluster, pools = start_index_ray(config)
        phases.done("ray_start")
        try:
            planner, blocks = plan_run(
                listing, location, model, versions, record.folder_inputs, pools, max_attempts=config.max_attempts,
                prune_scopes=prune_scopes, prune_max=config.prune_max, prune_indexed_before=manifest_made_at,
                live_scopes=live_scopes(config.inputs), hidden_left_out=not config.include_hidden,
            )  # fmt: skip
        except ray.exceptions.RayTaskError as exc:  # the planner refused the output (data files gone): one line
            if isinstance(exc.cause, ValueError):
                raise ValueError(str(exc.cause)) from None
            raise
        phases.done("plan")
        if any(b.to_decode is None or b.to_decode for b in blocks):  # a GPU wait counts in decode_embed_write
            pools, record.embed_device = settle_embed_device(config, cluster)
        committer = Committer(
            location, model_id=model.model_id, run_id=record.run_id, versions=versions,
            before_videos_commit=hooks.before_videos_commit,
            current_etags=functools.partial(current_etags, endpoint_url=config.s3_endpoint_url),
            require=required_records(settings),
        )  # fmt: skip
        committer.clean_up_abandoned(ray.get(planner.abandoned_segments.remote()))
        commits = Commits(
            committer, commit_seconds=config.commit_seconds, hooks=hooks, on_commit=record.alive,
            settings_changed=lambda: changed_during_run(store, settings), planned_videos=sum(b.videos for b in blocks),
        )  # fmt: skip
        commits.progress.embedded_source = lambda: tuple(ray.get(planner.embedded.remote(), timeout=30))
        if blocks:
            ds = index_dataset(config, blocks, model, pools, progress=planner)
            try:
                with quiet_model_load_failure():
                    drain(ds, commits, config, location=location, model=model, run_id=record.run_id)
            except Exception as exc:
                load_error = model_load_error(exc)
                if load_error is None:
                    raise
                raise load_error from None
        del blocks
        phases.done("decode_embed_write")
        commits.collect(wait=True)
        commits.commit()
        phases.done("final_commit")
        plan_report: dict[str, Any] = ray.get(planner.report.remote())
        index_info = update_run_index(config, store, planner, commits, plan_report, model_id=model.model_id)
        ray.kill(planner)
        phases.done("index_update")
        vacuumed = _vacuum(location, config.vacuum_retention_hours)
        phases.done("vacuum")
        summary = run_summary(record, model, pools, commits, plan_report, index_info, vacuumed)
        if replaced is not None:
            summary["replaced_settings"] = dataclasses.asdict(replaced)
        return record.finish({**summary, "phase_seconds": phases.seconds})
    except BaseException as exc:  # a refusal, a failure or an interrupt: the record says so, the error propagates
        _failed(record, exc, commits)
        raise


def _failed(record: RunRecord, exc: BaseException, commits: Commits | None) -> None:
    """Records a run's failure, then reads its ended writes (`Commits.abandon`) without getting in the way of its
    error or of an interrupt: the record comes first (`ray job stop` sends SIGKILL 3 s after its SIGTERM)."""
    record.fail(exc, commits)
    if commits is not None:
        try:
            commits.abandon(0.0 if isinstance(exc, (KeyboardInterrupt, SystemExit)) else 2.0)
        except BaseException as abandon_error:  # a second Ctrl-C, Ray gone
            log.debug("reading the ended writes failed: %r", abandon_error)


def _prepare_output(
    config: IndexJobConfig, store: Store, model: ResolvedModel
) -> tuple[dict[str, int], RowSettings, RowSettings | None]:
    """The output's tables (created on the first run) at their current versions, this run's row settings and the
    recorded ones it replaced. A refusal (an output in the previous layout; a table of another embedding size, or
    other row settings than the rows of this model have) comes before any work; past the layout check it is
    recorded as a failed run, so that a nightly run refused every night shows in `vitaclip runs`."""
    location = store.location
    if detect_old_layout(location):
        raise ValueError(old_layout_message(location))
    try:
        # One embedding size per output (a table property): another model's size is refused before any work.
        versions = create_tables(location, model.embed_dim, model_id=model.model_id)
        # So are other frames, segments, top-k or labels than the rows of this model already there have.
        settings = row_settings(config, model)
        replaced = check_row_settings(
            store, settings, replace=config.replace_settings,
            has_rows=lambda: may_hold_model(location, "videos", model.model_id),
        )  # fmt: skip
    except ValueError as refusal:
        if isinstance(refusal, NotAnOutputError):  # the user's own folder (the videos'): nothing written in it
            raise
        try:
            RunRecord(store, config, model_id=model.model_id, versions={}).fail(refusal)
        except Exception as write_error:  # the refusal is what the operator must read
            log.warning("could not record the refused run: %s", redact_text(str(write_error)))
        raise
    return versions, settings, replaced


def _refusals_before_output(config: IndexJobConfig) -> tuple[list[str], ResolvedModel]:
    """The run's prune scopes and model, checked before the output is touched: inputs that name nothing (a
    mistyped folder), manifests without ``--prune-scope`` and unusable models or checkpoints are refused here."""
    import ray

    if not ray.is_initialized():
        check_command_line()  # before the run record: Ray could not start
    classify_inputs(config.inputs)
    prune_scopes = listed_scopes(config.inputs, config.prune_scopes) if config.prune_missing else []
    return prune_scopes, resolve_run_model(config)


def update_run_index(
    config: IndexJobConfig,
    store: Store,
    planner: Any,
    commits: Commits,
    plan_report: dict[str, Any],
    *,
    model_id: str,
) -> dict[str, Any] | None:
    """The index update at the end of a run (None when there is nothing to index or ``--no-index``), run in the
    planner's process, not on the driver: the index is held whole while it is updated.

    Raises:
        IndexUpdateError: The storage failed after its retries, the planner's process died (out of memory), or the
            update refused the output (a ValueError there).
    """
    import ray
    import ray.exceptions

    # Also after a run that only removed rows (new versions of indexed videos that failed): their ids go.
    changed = sum(commits.status.values()) > 0 and store.exists(f"{INDEX_DIR}/{INFO_FILE}")
    indexable = commits.status.get(STATUS_OK, 0) + plan_report["counts"]["already_indexed"] > 0
    if not config.build_index or not (indexable or changed):
        return None
    other = None if config.switch_index else _index_of_another_model(store, model_id)
    if other is not None:
        return {"left_as_it_is": f"the index holds {other}'s rows, not this run's model's"}
    try:
        info: dict[str, Any] = ray.get(planner.update_index.remote(config, model_id))
    except OSError as exc:  # storage failing after its retries (a Ray task error is also its cause's type)
        raise IndexUpdateError(getattr(exc, "cause", None) or exc) from exc
    except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as exc:  # killed, out of memory
        raise IndexUpdateError(exc) from exc
    except ray.exceptions.RayTaskError as exc:  # a refusal in the planner's process: its message, not its traceback
        if not isinstance(exc.cause, ValueError):
            raise
        raise IndexUpdateError(exc.cause) from exc
    return info


def _index_of_another_model(store: Store, model_id: str) -> str | None:
    """The model of ``OUT/index`` when it is not `model_id` (None otherwise). An output holds rows of several models
    (one row per video per model) and an index of one: a run of another model (a candidate checkpoint tried on the
    output) commits its rows and leaves the index alone, which a rebuild from that model's rows alone would have
    emptied of every video of the model searches use (and a schedule of each model rebuilt it whole every run)."""
    try:
        info = json.loads(store.get_bytes(f"{INDEX_DIR}/{INFO_FILE}"))
    except (FileNotFoundError, ValueError):  # no index, or one the update replaces (it says why)
        return None
    indexed = info.get("model_id") if isinstance(info, dict) else None
    if not isinstance(indexed, str) or indexed == model_id:
        return None
    log.warning(
        "the index holds the rows of %s, not of this run's model %s: left as it is (this run's rows are committed; "
        "a run with --switch-index, or `vitaclip build-index OUT --model ... --checkpoint ... --rebuild "
        "--switch-index`, makes it this model's index)",
        indexed,
        model_id,
    )
    return indexed


def row_settings(config: IndexJobConfig, model: ResolvedModel) -> RowSettings:
    """What this run's rows depend on besides the model: compared with the output's record before any work."""
    return RowSettings(
        model_id=model.model_id,
        num_frames=model.num_frames,
        segment_seconds=config.segment_seconds,
        top_k=min(config.top_k, len(model.label_names)),
        labels=tuple(model.label_names),
    )


class _ModelLoadFailureFilter(logging.Filter):
    """Drops console records of Ray Data from the first one about a model the embed actors could not load
    (`model_load_error`) on: that record and the next repeat the loader's traceback twice within Ray Data's own
    (over 150 lines, one of them asking for a Ray bug report), where the run reports the failure in one line."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if not self.seen and record.exc_info and record.exc_info[1] is not None:
            self.seen = model_load_error(record.exc_info[1]) is not None
        return not self.seen


@contextlib.contextmanager
def quiet_model_load_failure() -> Iterator[None]:
    """While the run's Dataset runs: Ray Data's console handlers leave a model load failure to the run's own
    message (its log file under the Ray session keeps every record)."""
    consoles = [
        handler
        for handler in logging.getLogger("ray.data").handlers
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    ]
    quiet = _ModelLoadFailureFilter()
    for handler in consoles:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)


def model_load_error(exc: BaseException) -> ValueError | None:
    """The `CheckpointError` that made the embed actors fail to build the model (their strict load of a checkpoint
    folder the driver only checked), from the error of the call that needed it (the actor loads its model in the
    background) or of the actor's death; None for any other failure."""
    import ray.exceptions

    from vitaclip.checkpoint_folder import CheckpointError

    marker = f"{CheckpointError.__module__}.{CheckpointError.__name__}: "
    seen: BaseException | None = exc
    for _ in range(32):  # the chain of causes (never a cycle, but bounded all the same)
        if seen is None:
            break
        if isinstance(seen, ray.exceptions.RayError):
            lines = [line for line in str(seen).splitlines() if line.startswith(marker)]
            if lines:
                return CheckpointError(lines[-1][len(marker) :])
        seen = seen.__cause__ or seen.__context__
    return None


def _vacuum(location: OutputLocation, retention_hours: float) -> dict[str, int] | None:
    """The end-of-run vacuum (None: turned off); a failure is a warning, as the run's work is committed already
    and the next run's vacuum deletes what this one could not."""
    if retention_hours <= 0:
        return None
    try:
        vacuumed = vacuum(location, retention_hours=retention_hours)
        temporaries = sweep_write_temporaries(location, retention_hours)
        return {**vacuumed, "write_temporaries": temporaries} if temporaries else vacuumed
    except Exception as exc:
        log.warning("vacuum failed (the run's commits stand): %s: %s", type(exc).__name__, redact_text(str(exc)))
        return None


class Phases:
    """Wall seconds of each phase of a run, in order (the run record's ``phase_seconds``; also logged)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now
        log.debug("phase %s: %.2f s", name, self.seconds[name])


def run_listing(config: IndexJobConfig) -> Iterator[VideoObject]:
    """The run's listing, its first page fetched already: a wrong bucket, refused credentials or an empty prefix
    raise here with a clear message."""
    filters: dict[str, Any] = dict(
        extensions=config.extensions, min_size_bytes=config.min_size_bytes, max_size_bytes=config.max_size_bytes
    )
    listing = list_videos(
        config.inputs, endpoint_url=config.s3_endpoint_url, follow_outside_symlinks=config.follow_outside_symlinks,
        include_hidden=config.include_hidden, **filters,
    )  # fmt: skip
    if config.prune_missing and config.prune_max >= 1:  # an input deleted or moved whole: its videos are pruned
        first = next(listing, None)
        return itertools.chain(() if first is None else (first,), listing)
    try:
        return require_any(listing, where=describe_listing(config.inputs, **filters))
    except EmptyInputError as exc:
        if not config.prune_missing:
            raise
        raise EmptyInputError(
            f"{exc}; if the videos indexed under it were deleted or moved whole, run once with --prune-missing "
            "--prune-max 1 to mark them deleted"
        ) from None


def prune_manifests_made_at(config: IndexJobConfig) -> float | None:
    """With `--prune-missing` and manifests among the inputs: when the oldest of them was made. A video indexed
    after that (by a run over a live listing, say, since yesterday's inventory report) is not pruned for being
    absent from it."""
    if not config.prune_missing:
        return None
    made_at = manifests_made_at(config.inputs, endpoint_url=config.s3_endpoint_url)
    if made_at is not None:
        log.info(
            "--prune-missing with a manifest made at %s: videos indexed since are not pruned (it cannot name them)",
            datetime.fromtimestamp(made_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        )
    return made_at


def plan_run(
    listing: Iterable[VideoObject],
    location: OutputLocation,
    model: ResolvedModel,
    versions: dict[str, int],
    folder_inputs: Sequence[str],
    pools: IndexPools,
    *,
    max_attempts: int = 0,
    prune_scopes: Sequence[str] = (),
    prune_max: float = 1.0,
    prune_indexed_before: float | None = None,
    live_scopes: Sequence[str] = (),
    hidden_left_out: bool = False,
) -> tuple[Any, list[PlannedBlock]]:
    """Streams the listing to a planner actor (`PlanActor`); returns it and the object store blocks of the videos
    that need work, small enough that every decoder gets some and at most ``_BLOCK_VIDEOS`` videos each.
    `max_attempts` is the config's (0: no limit); committed videos under `prune_scopes` that the listing does not
    name are planned as ``deleted`` rows, except under a scope where they are more than `prune_max` of its videos,
    and those indexed at or after `prune_indexed_before` (when a manifest among the inputs was made) outside the
    `live_scopes` (folder and prefix inputs); with `hidden_left_out`, those with a hidden name under a live scope
    outside the share (`PlanActor.prune_under`)."""
    import ray

    # The planner needs no CPU of its own: it mostly waits.
    planner: Any = (
        ray.remote(PlanActor)
        .options(num_cpus=0, max_restarts=0)
        .remote(
            location,
            model_id=model.model_id,
            versions=versions,
            folder_inputs=folder_inputs,
            decode_workers=pools.decode_workers,
            max_attempts=max_attempts or None,
        )
    )
    in_flight: list[Any] = []
    planned = 0
    if prune_scopes:
        in_flight.append(
            planner.prune_under.remote(
                prune_scopes,
                prune_max,
                indexed_before=prune_indexed_before,
                live=live_scopes,
                hidden_left_out=hidden_left_out,
            )  # fmt: skip
        )
    unlisted: list[str] = []  # subfolders that could not be read: no row, and nothing under them is pruned
    for listed in _listing_tables(listing, unlisted):
        in_flight.append(planner.plan.remote(listed))
        if len(in_flight) >= _PLANS_IN_FLIGHT:
            planned += ray.get(in_flight.pop(0)) or 0
    planned += sum(n or 0 for n in ray.get(in_flight))
    ray.get(planner.spare.remote(unlisted))
    if prune_scopes:
        planned += _plan_missing(planner, prune_max)
    blocks: list[PlannedBlock] = ray.get(planner.blocks.remote())
    log.info("planned %d videos in %d blocks", planned, len(blocks))
    return planner, blocks


def _plan_missing(planner: Any, prune_max: float) -> int:
    """The planner's ``deleted`` rows once the listing has ended (`PlanActor.plan_missing`), and what it left alone
    said in the log; returns how many it planned."""
    import ray

    pruned, left_alone = ray.get(planner.plan_missing.remote())
    for scope in left_alone:
        log.warning(
            "nothing listed under %s: its indexed videos are not pruned (if it was moved or deleted whole, run "
            "once with --prune-max 1)",
            redact_url(scope),
        )
    report = ray.get(planner.report.remote())
    if report["counts"].get("no_longer_listed_hidden"):
        log.info(
            "%d indexed videos with a hidden name (a part starting with '.') are marked deleted: the listing "
            "leaves such entries out (--include-hidden lists them)",
            report["counts"]["no_longer_listed_hidden"],
        )
    for held in report["prune_held_back"]:
        log.error(
            "%s: %d of its %d videos are no longer listed, more than --prune-max %g of them: none marked "
            "deleted (an unmounted subfolder, a renamed prefix?); if they were deleted, run once with a larger "
            "--prune-max",
            redact_url(held["scope"]), held["no_longer_listed"], held["no_longer_listed"] + held["listed"],
            prune_max,
        )  # fmt: skip
    return int(pruned)


def run_summary(
    record: RunRecord,
    model: ResolvedModel,
    pools: IndexPools,
    commits: Commits,
    plan_report: dict[str, Any],
    index_info: dict[str, Any] | None,
    vacuumed: Any,
) -> dict[str, Any]:
    """The run's record once committed: counts, throughput, commits, index and versions."""
    elapsed = time.time() - record.started
    processed = sum(commits.status.values())
    clips = int(commits.stats["clips"])
    decode_seconds, embed_seconds = commits.stats["decode_seconds"], commits.stats["embed_seconds"]
    reports = commits.reports
    return {
        **{key: record.start[key] for key in ("run_id", "output", "model_id", "started_at")},
        "state": "committed",
        "input_roots": roots_of_inputs(record.folder_inputs),
        "input_file_dirs": sorted({os.path.realpath(d) for d in plan_report["other_local_dirs"]}),
        "elapsed_seconds": round(elapsed, 3),
        "counts": {**plan_report["counts"], "processed": processed},
        "prune_held_back": [dict(held, scope=redact_url(held["scope"])) for held in plan_report["prune_held_back"]],
        "prune_left_alone": [redact_url(scope) for scope in plan_report.get("prune_left_alone", [])],
        "unlisted_folders": plan_report.get("unlisted_folders", []),
        "status": dict(commits.status),
        "clips_embedded": clips,
        "throughput": {
            "end_to_end_videos_per_second": round(processed / elapsed, 3) if elapsed else None,
            "decode_videos_per_worker_second": round(processed / decode_seconds, 3) if decode_seconds else None,
            "embed_clips_per_worker_second": round(clips / embed_seconds, 3) if embed_seconds else None,
            "decode_workers": pools.decode_workers,
            "embed_workers_max": pools.embed_workers,
            "embed_device": ("gpu" if pools.use_gpu else "cpu") if record.embed_device else None,
            "embed_device_reason": record.embed_device.reason if record.embed_device else "nothing to embed",
            "waited_for_gpu_seconds": round(record.embed_device.waited_seconds, 1) if record.embed_device else 0.0,
        },
        "commit": {
            "planned_at_versions": record.start["planned_at_versions"],
            "versions": reports[-1].versions if reports else record.start["planned_at_versions"],
            "commits": sum(r.wrote for r in reports),  # calls that committed to a table
            "commit_calls": len(reports),
            "write_tasks": commits.received,
            "videos_committed": sum(r.videos_committed for r in reports),
            "segments_committed": sum(r.segments_committed for r in reports),
            "replaced": sum(r.replaced for r in reports),
            "dropped_done_by_another_run": sum(r.dropped for r in reports),
            # of those, videos the other run committed of a newer version of the object than this run listed
            "superseded_by_a_newer_version": sum(r.superseded for r in reports),
            # read as changed since listed (a stale manifest or inventory): the video's committed row stays
            "changed_since_listed_rows_kept": sum(r.stale_listings for r in reports),
            "conflict_rounds": sum(r.rounds - 1 for r in reports),
            # Clips of videos cut across blocks, passed on to a later write (counted once per pass), and clips not
            # written: copies (a retried task's output) and, at the end, pieces of videos that never arrived whole.
            "clips_carried_over": int(commits.stats["clips_left_over"]),
            "duplicate_clips_dropped": int(commits.stats["clips_duplicate"]),
            "incomplete_clips_dropped": int(commits.stats["clips_incomplete"]),
        },
        "vacuumed_files": vacuumed,
        "index": index_info,
        "config": record.safe_config,  # credentials come from the AWS chain only; URL userinfo and secrets are masked
        "versions": _versions(),
    }


def _block_entries(bundle: Any) -> Iterator[tuple[Any, int]]:
    """(block reference, row count) of a Ray Data RefBundle (entries are objects or, in older Rays, pairs)."""
    for entry in bundle.blocks:
        ref, metadata = (entry.ref, entry.metadata) if hasattr(entry, "ref") else entry
        yield ref, int(metadata.num_rows or 0)


def index_dataset(
    config: IndexJobConfig,
    blocks: Sequence[PlannedBlock],
    model: ResolvedModel,
    pools: IndexPools,
    *,
    stage: type = DecodeEmbed,
    progress: Any = None,
) -> Any:
    """The run's one Dataset over the planned blocks: embed actors that have them decoded by CPU tasks
    (`jobs.decode_embed`); the driver drains it. Benchmarks pass a `stage` that only decodes. Blocks whose objects
    all carry a listing status (a prune-only run) go through plain tasks: no model, no embed actor. `progress`: an
    actor the embed actors tell what they finished (`PlanActor.note_embedded`), for the progress line.

    Ray Data's own progress lines are off: they count blocks, not videos, and took seven log lines every 10 s of a
    run; the driver logs its `Progress` line once a minute."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # its line saying they are off
    ds: ray.data.Dataset = blocks_dataset(blocks)
    if stage is DecodeEmbed and not any(b.to_decode is None or b.to_decode for b in blocks):
        return ds.map_batches(
            status_rows,  # type: ignore[arg-type]  # a generator of column dicts, as Ray Data takes
            fn_kwargs=dict(
                decoder=decoder_args(config, model),
                embed_dim=model.embed_dim,
                top_k=min(config.top_k, len(model.label_names)),
            ),
            batch_size=_CALL_VIDEOS,
            num_cpus=0.25,
        )
    # Each embed actor may keep every decoder busy, with half as many tasks again queued, so that one actor (the
    # pool's start, the run's end) feeds them all; more tasks than decoders wait in Ray's queue, where they hold no
    # memory. Its two calls at once share them: one block's decoding starts while the other's last videos finish.
    in_flight = max(2, math.ceil(1.5 * pools.decode_workers))
    return ds.map_batches(
        stage,
        fn_constructor_kwargs=dict(
            **({} if progress is None else {"progress": progress}),
            decoder=decoder_args(config, model),
            decode_cpus=pools.cpus_per_decoder,
            decode_batch_size=config.decode_batch_size,
            in_flight=in_flight,
            piece_mib=config.decode_piece_mib,
            cpu_threads=max(1, round(pools.cpus_per_embedder)),
            embed=dict(
                model=config.model,
                checkpoint=config.checkpoint,
                label_names=list(model.label_names),
                top_k=config.top_k,
                batch_size=config.embed_batch_size,
                device=None if pools.use_gpu else "cpu",
                torch_compile=compile_video_tower(config, pools, sum(b.videos for b in blocks)),
                # Checked by each actor once loaded: a checkpoint replaced during the run must not make rows.
                expected_model_id=model.model_id if config.checkpoint is not None else None,
            ),
        ),
        batch_size=_CALL_VIDEOS,  # a planned block in a few calls (the end's smaller blocks go together)
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=pools.embed_workers, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True
        ),
        num_gpus=pools.gpus_per_embedder,
        # Next to no CPU reservation, on CPUs either: an embed actor waits on decode tasks, which need CPUs, so
        # actors that held them (two runs' on one small cluster) could leave none to the tasks. Its share of the
        # cores is left free by the decoders' sizing (`plan_index_pools`). Not 0: a node without CPUs (a
        # Kubernetes head) takes no embed actor.
        num_cpus=0.0 if pools.use_gpu else 0.01,
    )


def compile_video_tower(config: IndexJobConfig, pools: IndexPools, planned_videos: int) -> bool:
    """Whether the embed actors `torch.compile` the video tower: ``--embed-compile on``/``off``, or for ``auto``
    GPU actors on a run whose planned videos give each actor at least ``_COMPILE_MIN_VIDEOS_PER_ACTOR``. Compiling
    costs each actor about 35 s before its first batch and saves about 0.5 ms per video of ViT-B/16 on an H200
    (benchmarks/RESULTS.md), so it pays back after about 65,000 videos per actor; a small nightly run stays eager."""
    if config.embed_compile != "auto":
        return config.embed_compile == "on"
    return pools.use_gpu and planned_videos >= _COMPILE_MIN_VIDEOS_PER_ACTOR * max(1, pools.embed_workers)


def decoder_args(config: IndexJobConfig, model: ResolvedModel) -> dict[str, Any]:
    """`jobs.decode_embed.ReadDecode`'s arguments for a run."""
    return dict(
        num_frames=model.num_frames,
        size=model.image_size,
        segment_seconds=config.segment_seconds,
        timeout_seconds=config.decode_timeout_seconds,
        max_frame_bytes=int(config.max_frames_mib * 2**20),
        s3_endpoint_url=config.s3_endpoint_url,
        whole_object_max_bytes=config.whole_object_max_bytes,
        # Files listed from these folders are read only while they resolve inside them (checked again when read).
        local_roots=None
        if config.follow_outside_symlinks
        else [absolute_path(i) for i in config.inputs if "://" not in i and os.path.isdir(i)],
    )


def drain(
    ds: Any,
    commits: Commits,
    config: IndexJobConfig,
    *,
    location: OutputLocation,
    model: ResolvedModel,
    run_id: str,
) -> None:
    """The driver's loop over a Dataset of embed output: block references grouped into write tasks (by
    ``rows_per_file`` rows or half of ``commit_seconds``), finished writes handed to the Committer, a commit every
    ``commit_seconds``. Clips of videos a write task did not hold in full (cut across blocks) go to the next one,
    and to a last one at the end. Rows never reach the driver."""
    import ray

    # Write tasks take no CPU reservation: the pools hold the cores, and a reserved write would wait for them to
    # finish. They are scheduled next to their blocks.
    # A write that fails on storage (after the filesystem's own retries) is tried again, into fresh file names.
    write: Any = ray.remote(write_blocks).options(  # type: ignore[arg-type]
        num_cpus=0, num_returns=2, max_retries=3, retry_exceptions=[OSError]
    )
    options = dict(
        model_id=model.model_id, run_id=run_id, label_names=list(model.label_names), embed_dim=model.embed_dim
    )
    pending: list[Any] = []
    pending_rows = 0
    first_pending = time.monotonic()
    flush_seconds = config.commit_seconds / 2

    drop_uris: set[str] = set()  # videos of pending leftovers that were written whole since

    def flush(*, final: bool = False) -> None:
        nonlocal pending, pending_rows
        if pending:
            commits.submit(write, location, *pending, **options, final=final, drop_uris=sorted(drop_uris))
        pending, pending_rows = [], 0
        drop_uris.clear()

    def take_leftovers() -> None:
        passed, drop = commits.take_leftovers()
        for leftover in passed:
            add(*leftover)
        drop_uris.update(drop)

    def add(block_ref: Any, num_rows: int) -> None:
        nonlocal pending_rows, first_pending
        if not pending:
            first_pending = time.monotonic()
        pending.append(block_ref)
        pending_rows += num_rows

    warm: Any = None
    with commits.progress.running():
        for bundle in ds.iter_internal_ref_bundles():
            if warm is None:  # the pools hold their workers now: an idle one with the write path imported is
                # ready for the first write (imports alone take seconds) at the end of a small run
                warm = ray.remote(warm_write_worker).options(num_cpus=0).remote()
            for block_ref, num_rows in _block_entries(bundle):
                add(block_ref, num_rows)
                commits.progress.update(clips=num_rows)
            if pending_rows >= config.rows_per_file or time.monotonic() - first_pending >= flush_seconds:
                flush()
            commits.collect()
            take_leftovers()
            if time.monotonic() - commits.last_commit >= config.commit_seconds:
                commits.collect(wait=True)
                commits.commit()
    flush()
    commits.collect(wait=True)
    take_leftovers()
    if pending:  # the last clips of videos cut across blocks: nothing more is coming
        flush(final=True)
        commits.collect(wait=True)
    if commits.stats["clips_incomplete"]:
        log.warning(
            "%d clips of videos that never arrived whole were not written (a task lost with its output); those "
            "videos have no row from this run and are planned again by the next one",
            commits.stats["clips_incomplete"],
        )

"""The run's planner: a Ray actor that turns listing pages into object store blocks of the videos that need work.

Its own module, so that the planner's worker process imports only what planning needs (the output tables' keys,
`index.commits`), not the rest of the run (`jobs.pipeline`: the decoders' PyAV, FAISS, Ray Data): its start is on
every run's critical path, before any video is decoded.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index.commits import Planner
from index.delta_tables import OutputLocation
from jobs.storage.listing import absolute_path, is_hidden_key, scope_prefixes

if TYPE_CHECKING:
    from jobs.config import IndexJobConfig

# Most videos per input block of the Dataset: one Ray Data task each, on one embed actor (a retried block repeats at
# most this much work). Every block costs the driver alike, about 3 ms (its Ray Data bookkeeping, its output's write
# task), whatever its rows: without segments (one row per video) blocks of 512 took 0.0067 driver CPU-s per further
# 1,000 rows, of 2,048 0.0012 (net of the time-bound work; benchmarks/driver_rows.py).
_BLOCK_VIDEOS = 2048
_LISTING_STATUS = "listing_status"  # `vitaclip.stages.LISTING_STATUS` (that module imports PyAV, not needed here)
_TAIL_BLOCK_VIDEOS = 128  # videos per block of the run's end (held back, cut finer so every decoder ends together)


class PlanActor:
    """The run's planner as a Ray actor: listed objects in, blocks of the videos to index out.

    Holds the committed keys (`index.commits.Planner`) and fewer than ``4 * decode_workers * _TAIL_BLOCK_VIDEOS +
    _BLOCK_VIDEOS`` planned objects: whole blocks go to the object store (which spills to disk) as soon as the rest
    is enough for the run's end, so neither the driver, this actor's memory nor the Dataset's input grows with the
    listing or with what is already indexed. The end (what is held when the listing ends) goes out in four blocks
    per decoder (of about ``_TAIL_BLOCK_VIDEOS`` videos on a large run), so the decoders finish together.
    """

    def __init__(
        self,
        location: OutputLocation,
        *,
        model_id: str,
        versions: dict[str, int],
        folder_inputs: Sequence[str],
        decode_workers: int,
        max_attempts: int | None = None,
    ) -> None:
        self._folders = tuple(absolute_path(f).rstrip(os.sep) + os.sep for f in folder_inputs)
        self._other_local_dirs: set[str] = set()
        self._spread = 4 * max(1, decode_workers)  # blocks of the run's end: four per decoder
        self._tail = self._spread * _TAIL_BLOCK_VIDEOS  # videos held back for the end
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._refs: list[Any] = []
        self._listed_under: Counter[str] = Counter()  # listed objects per `--prune-missing` scope
        self._scopes: tuple[str, ...] = ()
        self._prune_max = 1.0
        self._indexed_before: float | None = None
        self._live: tuple[str, ...] = ()
        self._hidden_left_out = False
        self._held_back: list[dict[str, Any]] = []
        self._unlisted: list[str] = []  # folders the listing could not read: nothing under them is pruned
        # A table the run cannot plan from (data files gone) is refused at the first call, as an error of that
        # call: an actor whose creation failed reports only that it died, with a traceback.
        self._refusal: ValueError | None = None
        self._embedded = [0, 0]  # videos and clips the embed actors have finished (`note_embedded`)
        try:
            self.planner = Planner(location, model_id=model_id, versions=versions, max_attempts=max_attempts)
        except ValueError as exc:
            self._refusal = exc

    def _usable(self) -> None:
        if self._refusal is not None:
            raise self._refusal

    def prune_under(
        self,
        scopes: Sequence[str],
        max_share: float = 1.0,
        *,
        indexed_before: float | None = None,
        live: Sequence[str] = (),
        hidden_left_out: bool = False,
    ) -> None:
        """Counts the objects listed under each of `scopes`, for `plan_missing`, which prunes no scope where more
        than `max_share` of its videos (listed, or no longer listed) would go, and no video indexed at or after
        `indexed_before` (when the oldest manifest among the inputs was made: it cannot name them) unless it is
        under one of the `live` scopes (folder and prefix inputs, listed as they are now). With `hidden_left_out`,
        videos with a hidden name below a live scope (which the listing leaves out) are pruned outside the share:
        an output indexed with them (``--include-hidden``, or before they were left out) is not held back."""
        self._usable()
        self._scopes = tuple(scopes)
        self._prune_max = max_share
        self._indexed_before = indexed_before
        self._live = tuple(live)
        self._hidden_left_out = hidden_left_out

    def spare(self, folders: Sequence[str]) -> None:
        """Folders the listing could not read (`UNLISTED_FOLDER`): `plan_missing` prunes no video under them, since
        the listing could not say whether they are still there."""
        self._unlisted = list(folders)

    def plan(self, listed: pa.Table) -> int:
        """Plans one batch of listed objects; returns how many need work."""
        self._usable()
        for uri in listed.column("uri").to_pylist():
            if "://" not in uri and "\x00" not in uri and not uri.startswith(self._folders):
                self._other_local_dirs.add(os.path.dirname(uri))
        for scope in self._scopes:
            self._listed_under[scope] += int(np.sum(_under(listed.column("uri"), scope)))
        batch = {name: listed.column(name).to_numpy(zero_copy_only=False) for name in listed.column_names}
        planned = self.planner(batch)
        table = pa.table({name: pa.array(list(values)) for name, values in planned.items()})
        if table.num_rows:
            self._pending.append(table.cast(_planned_schema(table.schema)))
            self._pending_rows += table.num_rows
            if self._pending_rows >= self._tail + _BLOCK_VIDEOS:
                self._put(_BLOCK_VIDEOS, (self._pending_rows - self._tail) // _BLOCK_VIDEOS * _BLOCK_VIDEOS)
        return table.num_rows

    def plan_missing(self) -> tuple[int, list[str]]:
        """Once the listing has ended: plans a ``deleted`` row for each committed video under the scopes given to
        `prune_under` that the listing did not name. A scope under which nothing was listed (an unmounted folder, a
        prefix emptied by mistake) is left alone, unless the prune share has no limit (1: a folder moved or deleted
        whole). Returns how many were planned, and the scopes left alone."""
        no_limit = self._prune_max >= 1.0
        scopes = [scope for scope in self._scopes if no_limit or self._listed_under[scope] > 0]
        missing = self.planner.missing(
            [prefix for scope in scopes for prefix in scope_prefixes(scope)],
            indexed_before=self._indexed_before,
            listed_live=[prefix for scope in self._live for prefix in scope_prefixes(scope)],
        )
        if self._unlisted:  # before the share: videos under a folder that could not be read are not missing
            unknown = np.logical_or.reduce([_under(missing.column("uri"), f) for f in self._unlisted])
            missing = missing.filter(pa.array(~unknown))
        hidden = self._hidden(missing.column("uri"))
        if self._hidden_left_out:
            self.planner.counts["no_longer_listed_hidden"] = int(hidden.sum())
        within = self._within_prune_max(missing.column("uri"), scopes, hidden)
        missing = missing.filter(pa.array(within | hidden))
        planned = self.plan(missing) if missing.num_rows else 0
        self.planner.counts["listed"] -= missing.num_rows
        self.planner.counts["no_longer_listed"] = missing.num_rows
        return planned, [scope for scope in self._scopes if scope not in scopes]

    def _hidden(self, uris: pa.ChunkedArray) -> np.ndarray:
        """Which no longer listed `uris` have a hidden name below a live scope, when the listing leaves those out."""
        mask = np.zeros(len(uris), dtype=bool)
        if not self._hidden_left_out:
            return mask
        for prefix in (prefix for scope in self._live for prefix in scope_prefixes(scope)):
            under = pc.starts_with(uris, prefix).to_numpy(zero_copy_only=False).astype(bool)
            for i in np.flatnonzero(under & ~mask):
                mask[i] = is_hidden_key(str(uris[int(i)]), prefix)
        return mask

    def _within_prune_max(self, uris: pa.ChunkedArray, scopes: Sequence[str], apart: np.ndarray) -> np.ndarray:
        """Which of the no longer listed `uris` may be pruned: none under a scope where they are more than the
        prune share of its videos (recorded in `_held_back` for the run record and the exit status). Those
        `apart` (hidden names) are not counted."""
        keep = np.ones(len(uris), dtype=bool)
        for scope in scopes:
            under = _under(uris, scope) & ~apart
            gone, listed = int(under.sum()), self._listed_under[scope]
            if gone > self._prune_max * (gone + listed):
                keep &= ~under
                self._held_back.append({"scope": scope, "no_longer_listed": gone, "listed": listed})
        return keep

    def _put(self, block_videos: int, videos: int) -> None:
        """The first `videos` held videos into the object store, in blocks of `block_videos`."""
        import ray

        pending = pa.concat_tables(self._pending)
        for i in range(0, videos, block_videos):
            block = pending.slice(i, min(block_videos, videos - i))
            self._refs.append(PlannedBlock.of(ray.put(block), block))
        rest = pending.slice(videos)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def blocks(self) -> list[PlannedBlock]:
        """The object store blocks of the planned objects, in listing order: whole blocks of ``_BLOCK_VIDEOS``
        videos, then the run's end (all of a small run) in at least four blocks per decoder."""
        if self._pending_rows:  # fewer than the tail and one whole block: cut in `_spread` blocks
            self._put(-(-self._pending_rows // self._spread), self._pending_rows)
        refs, self._refs = self._refs, []
        return refs

    def abandoned_segments(self) -> dict[str, tuple[list[str], list[str]]]:
        """`Planner.abandoned_segments`, once the listing is planned: for the run's clean-up commit."""
        self._usable()
        return self.planner.abandoned_segments()

    def note_embedded(self, videos: int, clips: int) -> None:
        """Counts videos and clips an embed actor finished (sent about once a second each, not awaited)."""
        self._embedded[0] += videos
        self._embedded[1] += clips

    def embedded(self) -> tuple[int, int]:
        """Videos and clips the embed actors have finished so far, for the driver's progress line."""
        return self._embedded[0], self._embedded[1]

    def report(self) -> dict[str, Any]:
        return {
            "counts": dict(self.planner.counts),
            "other_local_dirs": sorted(self._other_local_dirs),
            "prune_held_back": self._held_back,
            "prune_left_alone": [scope for scope in self._scopes if self._listed_under[scope] == 0]
            if self._prune_max < 1.0
            else [],
            "unlisted_folders": self._unlisted,
        }

    def update_index(self, config: IndexJobConfig, model_id: str) -> dict[str, Any]:
        """`update_index` in this already started process (saves a worker start); the keys are dropped first."""
        del self.planner
        return update_index(config, model_id)


@dataclass(frozen=True)
class PlannedBlock:
    """A block of planned objects in the object store, with what a Dataset's input block needs as metadata (its
    rows, bytes and schema), taken where the block is made: `ray.data.from_arrow_refs` computes them in a remote task
    per block, a worker process that imports Ray Data (about 2 s on the critical path of every run on two cores).
    The planner does not import Ray Data either (0.5-0.8 s more before its first block); the driver, which has it,
    builds Ray Data's metadata objects (`blocks_dataset`)."""

    ref: Any
    videos: int
    size_bytes: int | None = None
    schema: pa.Schema | None = None
    to_decode: int | None = None  # of `videos`, those without a listing status (None: not counted)

    @classmethod
    def of(cls, ref: Any, block: pa.Table) -> PlannedBlock:
        to_decode = block.num_rows
        if _LISTING_STATUS in block.column_names:
            to_decode = int(pc.sum(pc.equal(pc.fill_null(block.column(_LISTING_STATUS), ""), "")).as_py() or 0)
        return cls(ref, block.num_rows, block.nbytes, block.schema, to_decode)


def _planned_schema(schema: pa.Schema) -> pa.Schema:
    """Listing columns as they leave the planner, with null-only columns typed (strings) so blocks concatenate."""
    return pa.schema([pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in schema])


def update_index(config: IndexJobConfig, model_id: str) -> dict[str, Any]:
    """Brings ``OUT/index`` up to the tables' latest versions (`index.build.build_from_output`); run as a Ray task."""
    from index.build import build_from_output
    from index.refresh import label_queries
    from index.stores import open_store

    store = open_store(config.output, endpoint_url=config.s3_endpoint_url)
    return build_from_output(store, model_id=model_id, tune_queries=label_queries(config.model, config.checkpoint))


def _under(uris: pa.Array | pa.ChunkedArray, scope: str) -> np.ndarray:
    """Which `uris` are under a listed scope (`jobs.storage.listing.scope_prefixes`), as a bool mask."""
    prefixes = scope_prefixes(scope)
    mask = np.zeros(len(uris), dtype=bool)
    for prefix in prefixes:
        mask |= pc.starts_with(uris, prefix).to_numpy(zero_copy_only=False).astype(bool)
    return mask

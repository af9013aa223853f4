"""Planning a run against the output tables and committing its rows so that old rows are replaced, never doubled.

`Planner` decides which listed videos need work: it holds the committed keys of the videos table (about 21 bytes
a row, in numpy arrays, and 14 per listed object) and names, for each planned video, the data files holding its
current rows. Workers write data files; the driver hands them to a `Committer`, which reconciles with what other
writers committed meanwhile (from the Delta log), drops videos another run finished, removes the old rows of the rest
by rewriting their files, and commits the segments table, then the videos table, each at exactly the version it
reconciled against.

The table contract (kept by every writer):

- A committed video row for (video_id, model_id) is DONE when its etag equals the listed etag and its status is
  final (not in `RETRYABLE`). A row's ``attempts`` counts the runs that tried its etag and reached the video (a
  storage failure, `UNCOUNTED`, is not counted); the Planner leaves out a video whose row failed retryably on the
  listed etag after ``max_attempts`` such tries (not DONE: a run that allows more tries it again).
- A batch's video rows go to ``videos/<name>`` and its segment rows to ``segments/<name>``: the same name. A segment
  file without a videos file of its name is *unpartnered* (a run killed between its two commits, or a rewrite).
- A round commits segments first, then videos. A segments commit that adds segment rows of a video also removes all
  current segment rows of that video, so a video has at most one set of segment rows at any time. It removes no
  segment rows of the videos it adds none for: another run may have committed their segments and not yet their rows.
- After its videos commit, a run removes the stale segment rows of the videos it committed without any (failed, or
  ok and too short) in a clean-up commit on the segments table, reconciled and retried after conflicts like a round:
  only of videos whose committed row is still the run's own, and only rows that no videos commit can still point
  at: those of the partner files of the row the Planner saw, and those of runs whose rows the videos commit removed,
  wherever they are (a rewrite names its file apart from any videos file). A run's own unpartnered file may be a
  live run's between its two commits and is left alone, as are the segments a kill leaves (before the clean-up, or
  between a run's two commits): stale rows next to the video's row of another run. Search counts a segment only
  while its video's row is ok and of the segment's run, so none reaches a result (a reader of the segments table
  alone still sees them; a join on ``run_id`` leaves them out); the next commit of that video that adds segment
  rows removes them. A video no run will commit again (its row is final, or deleted) keeps them until a later run's
  clean-up commit removes those in unpartnered files whose video's row is not ok, made by runs whose record says
  they ended (`Planner.abandoned_segments`): a live run's, between its two commits, look the same but its record
  says "running" (a killed run's too, for ever: its rows stay).

Beyond these rules, the Committer closes a race around the gap between the two commits of a round, where another
run B commits video X too and our videos commit then conflicts: B's row of X is not DONE for our etag (B listed
another etag), so we replace it; if B's segments commit removed our X segments, we commit them again from our data
file. (If B's row is DONE we drop X: our segments commit removed B's X segments only if it added ours, of the same
etag, which stay as X's set; when B's row is a final failure no row has segments, and our clean-up commit removes
our landed segment rows of X.) Before our segments commit, a row of B with another etag that is the one the object
has now (`current_etags`) drops X as if DONE: B listed the object after it changed, we before. After it, our
segments have replaced B's, so our row replaces B's too, and the next run redoes X.

Assumptions: a data file written by a run holds the rows of one model and one run (rows carry the committing run's
``run_id``), but a file merged by other tools (``optimize.compact``) may hold rows of several, so every read and
rewrite picks rows by model; run ids are unique per `Committer`; files removed during a run are not vacuumed before
it ends.

Nothing here imports Ray: the job wraps `Planner` as a Ray Data actor and runs `Committer` on the driver.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index import delta_tables as dlt
from index.delta_tables import CommitConflict, DataFile, OutputLocation, RemovedFile, read_file
from index.schema import STATUS_DELETED, STATUS_OK, plain_types, video_id_for

RETRYABLE: frozenset[str] = frozenset(
    {
        "read_error",
        "timeout",
        "error",
        "unavailable",
        "changed",
        "access_denied",
        "archived",  # counted: tried --max-attempts runs, then left alone until restored and a run allows more
        "not_found",  # gone when read: moved away and back (same size and time), or re-uploaded with the same bytes
        "s3_error",
        "decoder_crashed",  # its decoder's process died: a lost node or a neighbour's memory as well as the video
        "too_long",  # its clips were over the run's --max-frames-mib: a later run's limit or segments may differ
    }
)
"""Statuses of a video row that a later run indexes again (up to the planner's ``max_attempts`` runs per ETag);
every other status is final: a verdict on the object's bytes (``truncated``, ``corrupt``, ``not_a_video``, ...) stands
until its ETag changes. A body that the storage kept cutting short is a ``read_error``, not ``truncated``."""

STATUS_CHANGED = "changed"  # the object's ETag (a file's size or time) was not the listed one when it was read

UNCOUNTED: frozenset[str] = frozenset({"unavailable", "s3_error", "access_denied", "read_error", STATUS_CHANGED})
"""Retryable statuses that do not count as an attempt: the storage failed, not the video. They cost a request, and
an outage that spans several runs must not use up the attempts of every video it touched."""

DEFAULT_MAX_ATTEMPTS = 3
"""Runs that may try one object (one ETag) before its retryable failure stands: a video that times out or crashes
its decoder every time must not cost every later run its time limit."""

_MAX_COUNTED_ATTEMPTS = 255  # attempts are held in a byte per committed row

RUN_ID_KEY = "vitaclip.run_id"
"""Custom commit metadata naming the run that made a commit."""

_T = TypeVar("_T")
_DONE_BIT = np.uint32(1 << 31)
_GONE_BIT = np.uint32(1 << 30)  # the row says the video was deleted (`STATUS_DELETED`)
_OK_BIT = np.uint32(1 << 29)  # the row's status is "ok"
_FILE_MASK = np.uint32((1 << 29) - 1)
FINISHED_STATES = frozenset({"committed", "failed", "interrupted"})
"""States of a run record (``OUT/runs/<run_id>.json``) written when its run ended: it commits nothing more."""
_RUN_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")


def finished_runs(location: OutputLocation, run_ids: Collection[str]) -> set[str]:
    """Those of `run_ids` whose run record says the run ended (`FINISHED_STATES`). A run without a readable record,
    or still "running" (live, or killed: it cannot say), is not."""
    filesystem, base = location.filesystem()
    found = set()
    for run_id in sorted(run_ids):
        if not _RUN_ID.fullmatch(run_id):
            continue
        try:
            with filesystem.open_input_stream(f"{base}/runs/{run_id}.json") as stream:
                record = json.loads(stream.read())
        except (OSError, ValueError, RecursionError):  # gone, not JSON, nested too deep: not known to have ended
            continue
        state = record.get("state") if isinstance(record, dict) and record.get("run_id") == run_id else None
        if isinstance(state, str) and state in FINISHED_STATES:
            found.add(run_id)
    return found


def recorded_attempts(attempt: Sequence[int] | np.ndarray, status: Sequence[Any] | np.ndarray) -> np.ndarray:
    """The ``attempts`` a row records: the planner's `attempt` (this run's try included), one less where the run
    failed in the storage (`UNCOUNTED`), so that only tries that reached the video count."""
    uncounted = np.fromiter((str(s) in UNCOUNTED for s in status), dtype=np.int64, count=len(status))
    return np.maximum(np.asarray(attempt, dtype=np.int64) - uncounted, 0).astype(np.int32)


def is_done(row_etag: str | None, row_status: str, etag: str | None) -> bool:
    """Whether a committed row with `row_etag` and `row_status` finishes a video whose object has `etag`."""
    return etag is not None and row_etag == etag and row_status not in RETRYABLE


# ----------------------------------------------------------------------------------------------------- hashing


_HEX = np.full(256, 255, dtype=np.uint8)
for _k, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _k


def _str_hash(values: Iterable[str | None]) -> np.ndarray:
    """64-bit blake2b of each string (0 for None)."""
    return np.fromiter(
        (
            0 if v is None else int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little")
            for v in values
        ),
        dtype=np.uint64,
    )


_WIDE = 64  # bytes of a string `_keyed_hash` mixes in numpy; longer strings (rare for ETags) go through blake2b
_ROWS_PER_PASS = 1 << 15  # strings per numpy pass: bounds the pass's scratch memory to a few MB
_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    h = (h ^ (h >> np.uint64(30))) * _M2
    h = (h ^ (h >> np.uint64(27))) * _M3
    return h ^ (h >> np.uint64(31))


def _keyed_hash(values: pa.Array | pa.ChunkedArray, key: int) -> np.ndarray:
    """A uint64 per string (0 for null), for equality tests inside one process: the string's length and its bytes,
    8 at a time, mixed into a state that starts from `key` (random per `Planner`, so that which strings collide
    cannot be worked out ahead). Reads the Arrow buffers directly: no Python object per row. Strings over
    ``_WIDE`` bytes are hashed with blake2b keyed by `key`."""
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    array = array.cast(pa.string())
    n = len(array)
    out = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return out
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + n + 1]
    lengths = np.diff(offsets)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    data_buffer = array.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data, np.zeros(_WIDE, np.uint8)])  # a string's padding may read past the last one
    seed = np.uint64(key & (2**64 - 1))
    short = np.flatnonzero(valid & (lengths <= _WIDE))
    for start in range(0, len(short), _ROWS_PER_PASS):
        rows = short[start : start + _ROWS_PER_PASS]
        width = int(-(-int(lengths[rows].max(initial=0)) // 8) * 8)
        h = _mix(seed ^ (lengths[rows].astype(np.uint64) * _M1))
        if width:
            columns = np.arange(width)
            raw = data[offsets[rows, None] + columns]
            raw[columns >= lengths[rows, None]] = 0
            words = np.ascontiguousarray(raw).view("<u8")
            for j in range(words.shape[1]):
                h = _mix((h ^ words[:, j]) * _M1)
        out[rows] = h | np.uint64(1)  # never 0, the null's value
    long = np.flatnonzero(valid & (lengths > _WIDE))
    if len(long):
        salt = (key & (2**64 - 1)).to_bytes(8, "little")
        out[long] = np.fromiter(
            (
                int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8, key=salt).digest(), "little") | 1
                for v in array.take(pa.array(long)).to_pylist()
            ),
            dtype=np.uint64,
            count=len(long),
        )
    return out


def _uniform_id_hash(array: pa.Array, offsets: np.ndarray) -> np.ndarray | None:
    """`_id_hash` of an array holding only `video_id_for` ids (the job's batches): their bytes are one (n, 24)
    matrix, read without gathering. None for any other array."""
    n = len(array)
    if array.null_count or int(offsets[-1] - offsets[0]) != 24 * n or not (np.diff(offsets) == 24).all():
        return None
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    nibbles = _HEX[data.reshape(n, 24)[:, :16]]
    if (nibbles == 255).any():
        return None
    pairs = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2])
    return pairs.view(">u8")[:, 0].astype(np.uint64)


def _id_hash(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A uint64 per video_id: the first 16 hex digits of a `video_id_for` id (24 hex digits), else a blake2b hash
    of it. Each id's hash depends on that id alone.

    The fast path reads the Arrow buffers directly, so hashing a whole table creates no Python object per row.
    """
    array = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    array = array.cast(pa.string())
    n = len(array)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + n + 1]
    uniform = _uniform_id_hash(array, offsets)
    if uniform is not None:
        return uniform
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    fast = valid & (np.diff(offsets) == 24)
    out = np.zeros(n, dtype=np.uint64)
    if fast.any():
        data = np.frombuffer(array.buffers()[2], dtype=np.uint8)
        candidates = np.flatnonzero(fast)
        for start in range(0, len(candidates), _ROWS_PER_PASS):
            rows = candidates[start : start + _ROWS_PER_PASS]
            nibbles = _HEX[data[offsets[rows, None] + np.arange(16)]]
            hexadecimal = ~np.any(nibbles == 255, axis=1)
            # Two hex digits per byte, the first the high one: 8 bytes read as a big-endian number.
            pairs = np.ascontiguousarray((nibbles[hexadecimal, 0::2] << 4) | nibbles[hexadecimal, 1::2])
            out[rows[hexadecimal]] = pairs.view(">u8")[:, 0]
            fast[rows[~hexadecimal]] = False
    slow = np.flatnonzero(~fast)
    if len(slow):
        out[slow] = _str_hash(array.take(pa.array(slow)).to_pylist())
    return out


# ----------------------------------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class _Snapshot:
    """The data files of one table at one version: size and model_id statistics of each."""

    version: int
    sizes: dict[str, int]
    model_range: dict[str, tuple[str | None, str | None]]
    transactions: dict[str, int | None]  # of the app ids asked for

    def may_hold(self, path: str, model_id: str) -> bool:
        low, high = self.model_range.get(path, (None, None))
        return (low is None or low <= model_id) and (high is None or model_id <= high)


def _snapshot(location: OutputLocation, table: str, version: int | None = None, apps: Iterable[str] = ()) -> _Snapshot:
    dt = dlt.open_table(location, table, version=version)
    if dt is None:
        raise FileNotFoundError(f"no Delta table at {location.table_uri(table)}; create_tables first")
    actions = pa.table(dt.get_add_actions(flatten=True))
    paths = [urllib.parse.unquote(p) for p in actions.column("path").to_pylist()]
    sizes = dict(zip(paths, actions.column("size_bytes").to_pylist(), strict=True))
    lows = actions.column("min.model_id").to_pylist() if "min.model_id" in actions.column_names else [None] * len(paths)
    highs = (
        actions.column("max.model_id").to_pylist() if "max.model_id" in actions.column_names else [None] * len(paths)
    )
    ranges = dict(zip(paths, zip(lows, highs, strict=True), strict=True))
    return _Snapshot(dt.version(), sizes, ranges, {app_id: dt.transaction_version(app_id) for app_id in apps})


def _stats_allow(stats: Mapping[str, Any], model_id: str) -> bool:
    low = stats.get("minValues", {}).get("model_id")
    high = stats.get("maxValues", {}).get("model_id")
    return (low is None or low <= model_id) and (high is None or model_id <= high)


def _read_columns(location: OutputLocation, table: str, path: str, columns: list[str], model_id: str) -> pa.Table:
    """Some columns of one data file (column projection), rows of `model_id` only."""
    filesystem, root = location.table_path(table)
    data = read_file(filesystem, f"{root}/{path}", [*columns, "model_id"])
    return data.filter(pc.equal(data.column("model_id"), model_id)).select(columns)


def _distinct_runs(location: OutputLocation, table: str, path: str, columns: list[str], model_id: str) -> pa.Table:
    """`_read_columns` with each run of consecutive rows of equal values cut to its first row: which values a file
    holds, for one row per video instead of one per segment (a video's segment rows lie together as written, and
    compaction keeps them so). The columns are read as Parquet's dictionaries and the runs found by comparing
    their integer codes: no string per row is made, hashed or compared."""
    filesystem, root = location.table_path(table)
    wanted = [*columns, "model_id"]
    data = read_file(filesystem, f"{root}/{path}", wanted, as_dictionary=wanted)
    pieces = []
    for batch in data.to_batches():
        coded = [_dictionary_of(batch.column(name)) for name in wanted]
        change = np.zeros(batch.num_rows, dtype=bool)
        change[:1] = True
        for column in coded:
            codes = column.indices.to_numpy(zero_copy_only=False)
            change[1:] |= codes[1:] != codes[:-1]
        starts = pa.array(np.flatnonzero(change))
        taken = [column.take(starts).cast(column.type.value_type) for column in coded]
        pieces.append(plain_types(pa.table(taken, names=wanted)))
    if not pieces:
        return pa.table({name: pa.array([], pa.string()) for name in columns})
    runs = pa.concat_tables(pieces)
    return runs.filter(pc.equal(runs.column("model_id"), model_id)).select(columns)


def _dictionary_of(column: pa.Array) -> pa.DictionaryArray:
    """A column as a dictionary array without nulls in its codes (a file written without dictionaries is encoded
    here)."""
    encoded = column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)
    if encoded.null_count:
        encoded = pc.dictionary_encode(encoded.dictionary_decode(), null_encoding="encode")
    return encoded


def _lines(joined: str) -> list[str]:
    return [line for line in joined.split("\n") if line]


# ----------------------------------------------------------------------------------------------------- planner


class _SeenIds:
    """The video id hashes a run has listed so far: a sorted array (8 bytes each) and a set of the latest ones, merged
    into the array when it holds `recent_max` (a Python set of ints costs about 70 bytes an entry, which at tens of
    millions of listed objects is gigabytes on the planner)."""

    def __init__(self, recent_max: int = 1 << 18) -> None:
        self._sorted = np.zeros(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._recent_max = recent_max

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def in_array(self, hashes: np.ndarray) -> np.ndarray:
        """Which of `hashes` were seen before the latest merge (the set holds the rest)."""
        if not len(self._sorted):
            return np.zeros(len(hashes), dtype=bool)
        at = np.minimum(np.searchsorted(self._sorted, hashes), len(self._sorted) - 1)
        return self._sorted[at] == hashes

    def add(self, key: int, *, in_array: bool) -> bool:
        """Adds `key`; False when it was seen already (`in_array`: what `in_array` said of it)."""
        if in_array or key in self._recent:
            return False
        self._recent.add(key)
        return True

    def merge(self) -> None:
        """Moves the set into the array when it is full (a linear merge)."""
        if len(self._recent) >= self._recent_max:
            self._sorted = self.array()
            self._recent = set()

    def array(self) -> np.ndarray:
        """Every hash seen, sorted."""
        recent = np.sort(np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent)))
        return np.insert(self._sorted, np.searchsorted(self._sorted, recent), recent)


class Planner:
    """Keeps the listed objects that need work: not DONE in the videos table, not given up on, each once.

    Holds the committed keys of one model at fixed table versions in numpy arrays sorted by video_id hash (8 bytes
    of id hash, 8 of etag hash, 4 of file index and done flag, 1 of attempts per row), the current file names of
    both tables and the video ids of unpartnered segment files. A usable Ray Data class UDF: setup in ``__init__``,
    work in ``__call__``.

    Args:
        max_attempts: Runs that may try one object (ETag) whose row keeps failing with a retryable status; None
            retries such rows in every run.

    Attributes:
        counts: ``listed``, ``already_indexed``, ``duplicate_in_listing``, ``attempts_exhausted`` and ``planned``
            objects so far, and ``no_longer_listed`` (set by the job's planner actor when it prunes).
        video_files: Current data files of the videos table at the planning version.
        segment_files: Current data files of the segments table at the planning version.
    """

    def __init__(
        self,
        location: OutputLocation,
        *,
        model_id: str,
        versions: Mapping[str, int],
        max_attempts: int | None = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if max_attempts is not None and not 1 <= max_attempts <= _MAX_COUNTED_ATTEMPTS:
            raise ValueError(
                f"max_attempts must be 1 to {_MAX_COUNTED_ATTEMPTS} (or None: no limit), got {max_attempts}"
            )
        self.location = location
        self.model_id = model_id
        self.versions = dict(versions)
        self.max_attempts = max_attempts
        keys = dlt.read_keys(location, version=versions["videos"], model_id=model_id)
        files = keys.column("file").combine_chunks().dictionary_encode()
        self._files: list[str] = files.dictionary.to_pylist()  # one entry per file, not per row
        file_index = files.indices.to_numpy(zero_copy_only=False).astype(np.uint32)
        final = pc.invert(pc.is_in(keys.column("status"), value_set=pa.array(sorted(RETRYABLE), pa.string())))
        done = pc.and_(final, pc.is_valid(keys.column("etag"))).to_numpy(zero_copy_only=False).astype(bool)
        gone = pc.equal(keys.column("status"), STATUS_DELETED).to_numpy(zero_copy_only=False).astype(bool)
        ok = pc.fill_null(pc.equal(keys.column("status"), STATUS_OK), False).to_numpy(zero_copy_only=False)
        # Rows written before schema version 3 have no count: one attempt.
        attempts = pc.fill_null(keys.column("attempts"), 1).to_numpy(zero_copy_only=False)
        attempts = np.clip(attempts, 0, _MAX_COUNTED_ATTEMPTS).astype(np.uint8)
        id_hash = _id_hash(keys.column("video_id"))
        self._etag_key = secrets.randbits(64)
        etag_hash = _keyed_hash(keys.column("etag"), self._etag_key)
        del keys
        order = np.argsort(id_hash, kind="stable")
        self._id_hash = id_hash[order]
        self._etag_hash = etag_hash[order]
        flags = np.where(done, _DONE_BIT, np.uint32(0)) | np.where(gone, _GONE_BIT, np.uint32(0))
        flags |= np.where(ok, _OK_BIT, np.uint32(0))
        self._file_code = (file_index | flags.astype(np.uint32))[order]
        self._attempts = attempts[order]

        videos = _snapshot(location, "videos", versions["videos"])
        segments = _snapshot(location, "segments", versions["segments"])
        self.video_files: frozenset[str] = frozenset(videos.sizes)
        self.segment_files: frozenset[str] = frozenset(segments.sizes)
        self._unpartnered: list[str] = sorted(
            path for path in segments.sizes if path not in videos.sizes and segments.may_hold(path, model_id)
        )
        hashes, owners = [], []
        # Segment rows in unpartnered files of videos whose current row is not ok (or that have none): left by a
        # run killed before its clean-up commit, or a live run's between its two commits (`abandoned_segments`).
        self._stale: dict[int, set[tuple[str, str, str]]] = {}  # id hash -> {(file, video id, run id)}
        for index, path in enumerate(self._unpartnered):
            rows = _distinct_runs(location, "segments", path, ["video_id", "run_id"], model_id)
            row_hashes = _id_hash(rows.column("video_id"))
            unique = np.unique(row_hashes)
            hashes.append(unique)
            owners.append(np.full(len(unique), index, dtype=np.uint32))
            self._note_stale(path, rows, row_hashes)
        seg_hash = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        seg_owner = np.concatenate(owners) if owners else np.zeros(0, np.uint32)
        order = np.argsort(seg_hash, kind="stable")
        self._seg_hash, self._seg_owner = seg_hash[order], seg_owner[order]
        self._seen = _SeenIds()
        self.counts = {
            "listed": 0,
            "already_indexed": 0,
            "duplicate_in_listing": 0,
            "attempts_exhausted": 0,
            "planned": 0,
            "no_longer_listed": 0,
        }

    def _note_stale(self, path: str, rows: pa.Table, row_hashes: np.ndarray) -> None:
        """Notes the segment rows of `path` (an unpartnered file) whose video's current row is not ok or missing."""
        lo = np.searchsorted(self._id_hash, row_hashes, side="left")
        hi = np.searchsorted(self._id_hash, row_hashes, side="right")
        ok = np.zeros(len(row_hashes), dtype=bool)
        found = lo < hi
        ok[found] = (self._file_code[lo[found]] & _OK_BIT) != 0
        for i in np.flatnonzero(hi - lo > 1).tolist():  # two rows of one video (a copy another writer appended)
            ok[i] = bool(np.any(self._file_code[lo[i] : hi[i]] & _OK_BIT))
        stale = pa.array(np.flatnonzero(~ok))
        video_ids = rows.column("video_id").take(stale).to_pylist()
        run_ids = rows.column("run_id").take(stale).to_pylist()
        for h, video_id, run_id in zip(row_hashes[~ok].tolist(), video_ids, run_ids, strict=True):
            self._stale.setdefault(int(h), set()).add((path, str(video_id), str(run_id)))

    def abandoned_segments(self) -> dict[str, tuple[list[str], list[str]]]:
        """Segment rows no run will remove, for the committing run's clean-up: video id -> (the unpartnered files
        holding them, the runs that made them), for videos this run did not plan whose current row (at the planning
        versions) is not ok or missing, and rows made by runs that ended (`finished_runs`). A run killed between
        its videos commit and its clean-up commit leaves such rows (of a video it pruned or found failed, made by
        the run before); rows of a run that may still be live are left alone."""
        found: dict[str, tuple[set[str], set[str]]] = {}
        for entries in self._stale.values():
            for path, video_id, run_id in entries:
                paths, runs = found.setdefault(video_id, (set(), set()))
                paths.add(path)
                runs.add(run_id)
        ended = finished_runs(self.location, set().union(*(runs for _, runs in found.values())))
        return {
            video_id: (sorted(paths), sorted(runs))
            for video_id, (paths, runs) in sorted(found.items())
            if runs <= ended  # all: a file's rows of the video go whole
        }

    def missing(
        self, scopes: Sequence[str], *, indexed_before: float | None = None, listed_live: Sequence[str] = ()
    ) -> pa.Table:
        """Listed objects for the committed videos of the model under `scopes` (URI prefixes) that the listing so
        far did not name and whose row does not say ``deleted`` already: ``uri``, a null ``etag``, an unknown
        ``size_bytes`` and the listing status ``deleted``, to plan like listed ones (their rows are replaced).
        With `indexed_before` (seconds since the epoch: when a manifest among the inputs was made), rows indexed
        at or after it are left out, and counted as ``indexed_after_manifest``: the manifest could not name them.
        Rows under `listed_live` (prefixes of folder and prefix inputs, listed whole as they are now) are not.

        Reads the ``video_id`` and ``uri`` (and ``indexed_at``) columns of only the files holding such rows.
        """
        unseen = ~np.isin(self._id_hash, self._seen.array()) & ((self._file_code & _GONE_BIT) == 0)
        hashes = self._id_hash[unseen]
        columns = ["video_id", "uri"] if indexed_before is None else ["video_id", "uri", "indexed_at"]
        uris: list[str] = []
        newer: set[str] = set()
        for index in np.unique(self._file_code[unseen] & _FILE_MASK) if scopes else ():
            rows = _read_columns(self.location, "videos", self._files[int(index)], columns, self.model_id)
            under = functools.reduce(pc.or_, [pc.starts_with(rows.column("uri"), scope) for scope in scopes])
            wanted = np.isin(_id_hash(rows.column("video_id")), hashes) & under.to_numpy(zero_copy_only=False)
            if indexed_before is not None:
                micros = rows.column("indexed_at").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
                later = pc.greater_equal(micros, int(indexed_before * 1e6)).to_numpy(zero_copy_only=False)
                for prefix in listed_live:
                    later &= ~pc.starts_with(rows.column("uri"), prefix).to_numpy(zero_copy_only=False)
                newer.update(rows.column("uri").filter(pa.array(wanted & later)).to_pylist())
                wanted &= ~later
            uris.extend(rows.column("uri").filter(pa.array(wanted)).to_pylist())
        if indexed_before is not None:
            self.counts["indexed_after_manifest"] = len(newer)
        uris = sorted(set(uris) - newer)
        message = "no longer listed under this run's inputs: deleted, or left out by the run's filters"
        return pa.table(
            {
                "uri": pa.array(uris, pa.string()),
                "etag": pa.array([None] * len(uris), pa.string()),  # planned even where the row's etag is empty
                "size_bytes": pa.array([-1] * len(uris), pa.int64()),
                "listing_status": pa.array([STATUS_DELETED] * len(uris), pa.string()),
                "listing_error": pa.array([message] * len(uris), pa.string()),
            }
        )

    @property
    def unpartnered_segment_files(self) -> list[str]:
        """Segment files without a videos file of their name at the planning versions."""
        return list(self._unpartnered)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Listed objects (``uri``, ``etag``, ``size_bytes``, ``listing_status``, ``listing_error``) -> those to index.

        Leaves out objects whose committed row is DONE, and objects whose row failed with a retryable status on
        the same ETag in `max_attempts` runs already (counted as ``attempts_exhausted``).

        Adds ``video_id``, ``attempt`` (the runs that will have tried the object, this one included: one more than
        its row's ``attempts`` when that row failed retryably on the same ETag, else 1), ``current_video_file``
        (the videos file holding its current row, or ""; several newline-joined if an old output holds more than
        one row) and ``current_segment_files`` (newline-joined segment files holding its segment rows).
        """
        uris = [str(u) for u in batch["uri"]]
        n = len(uris)
        etags = [
            None if e is None or (isinstance(e, (float, np.floating)) and np.isnan(e)) else str(e)
            for e in batch["etag"]
        ]
        video_ids = [video_id_for(u) for u in uris]
        id_hash = _id_hash(pa.array(video_ids, pa.string()))
        etag_hash = _keyed_hash(pa.array(etags, pa.string()), self._etag_key)
        lo = np.searchsorted(self._id_hash, id_hash, side="left")
        hi = np.searchsorted(self._id_hash, id_hash, side="right")
        seg_lo = np.searchsorted(self._seg_hash, id_hash, side="left")
        seg_hi = np.searchsorted(self._seg_hash, id_hash, side="right")
        keep = np.zeros(n, dtype=bool)
        attempt = np.ones(n, dtype=np.int32)
        video_files: list[str] = []
        segment_files: list[str] = []
        self.counts["listed"] += n
        seen_before = self._seen.in_array(id_hash)
        for i in range(n):
            if not self._seen.add(int(id_hash[i]), in_array=bool(seen_before[i])):
                self.counts["duplicate_in_listing"] += 1
                continue
            codes = self._file_code[lo[i] : hi[i]]
            if etags[i] is not None:
                same = self._etag_hash[lo[i] : hi[i]] == etag_hash[i]
                if np.any(((codes & _DONE_BIT) != 0) & same):
                    # Done, unless it has two rows (another writer appended a copy): indexed again, its commit
                    # replaces both.
                    if len(codes) == 1:
                        self.counts["already_indexed"] += 1
                        continue
                else:
                    tried = int(self._attempts[lo[i] : hi[i]][same].max(initial=0))
                    if self.max_attempts is not None and tried >= self.max_attempts:
                        self.counts["attempts_exhausted"] += 1
                        continue
                    attempt[i] = min(tried + 1, _MAX_COUNTED_ATTEMPTS)
            keep[i] = True
            current = sorted({self._files[int(c & _FILE_MASK)] for c in codes})
            segs = {path for path in current if path in self.segment_files}  # partners
            segs.update(self._unpartnered[int(k)] for k in self._seg_owner[seg_lo[i] : seg_hi[i]])
            video_files.append("\n".join(current))
            segment_files.append("\n".join(sorted(segs)))
        self.counts["planned"] += int(keep.sum())
        if self._stale and keep.any():  # planned videos' segments are this run's to replace
            for h in id_hash[keep].tolist():
                self._stale.pop(int(h), None)
        self._seen.merge()
        out = {name: np.asarray(column)[keep] for name, column in batch.items()}
        out["video_id"] = np.asarray(video_ids, dtype=object)[keep]
        out["attempt"] = attempt[keep]
        out["current_video_file"] = np.asarray(video_files, dtype=object)
        out["current_segment_files"] = np.asarray(segment_files, dtype=object)
        return out


# ----------------------------------------------------------------------------------------------------- committer


class Rewrite(Protocol):
    """How a committed data file is rewritten without some videos' rows (`delta_tables.rewrite_without`)."""

    def __call__(
        self,
        location: OutputLocation,
        table: str,
        path: str,
        video_ids: Collection[str],
        *,
        model_id: str,
        name: str,
        embed_dim: int | None = None,
    ) -> DataFile | None: ...


KEYS_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("current_video_file", pa.string(), nullable=False),
        pa.field("current_segment_files", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class WrittenBatch:
    """A batch written by a worker, not committed yet.

    Its keys are an Arrow table (`KEYS_SCHEMA`), so that the driver moves and checks them without a Python object
    per video.

    Attributes:
        videos: Its videos data file (None when it has no rows).
        segments: Its segments data file, of the same name (None when it has no segment rows).
        keys: One row per video row: ``video_id``, ``etag``, ``status``, and where the Planner saw its current rows
            (``current_video_file`` and ``current_segment_files``, newline-joined, "" for none).
        segment_video_ids: The videos with rows in `segments`, as the writer knew them (None: the Committer reads
            them from the file when it needs them).
    """

    videos: DataFile | None
    segments: DataFile | None
    keys: pa.Table
    segment_video_ids: pa.Array | None = None

    @classmethod
    def of(
        cls,
        videos: DataFile | None,
        segments: DataFile | None,
        keys: Iterable[tuple[str, str | None, str]],
        *,
        current_video_files: Mapping[str, str] | None = None,
        current_segment_files: Mapping[str, str] | None = None,
        segment_video_ids: Iterable[str] | None = None,
    ) -> WrittenBatch:
        """A batch from ``(video_id, etag, status)`` keys and the Planner's files by video id."""
        rows = list(keys)
        ids = [video_id for video_id, _, _ in rows]
        video_files, segment_files = current_video_files or {}, current_segment_files or {}
        table = pa.table(
            [
                ids,
                [etag for _, etag, _ in rows],
                [status for _, _, status in rows],
                [video_files.get(v, "") for v in ids],
                [segment_files.get(v, "") for v in ids],
            ],
            schema=KEYS_SCHEMA,
        )
        with_segments = None if segment_video_ids is None else pa.array(sorted(set(segment_video_ids)), pa.string())
        return cls(videos, segments, table, with_segments)


@dataclass(frozen=True)
class CommitReport:
    """What `Committer.commit` did.

    Attributes:
        versions: Table versions after the commit.
        videos_committed: New video rows committed.
        segments_committed: New segment rows committed (rows of dropped videos left in place included).
        dropped: Videos not committed because another writer committed them DONE meanwhile, or (`superseded`) of
            the version the object has now.
        superseded: Of `dropped`, the videos another writer committed of a newer version of the object than ours.
        stale_listings: Videos not committed because their read found the object changed since it was listed (a
            stale manifest or inventory) while an older row of the video exists: that row stays (it may well be of
            the object's current version), where a ``changed`` row would have taken its place.
        readded: Videos whose segment rows, committed by us in an earlier round, another writer removed before
            our videos commit landed: committed again from our data file.
        replaced: Old video rows removed.
        rounds: Commit rounds it took (1 without conflicts).
        duplicates: Video rows left out because the video was pending in another batch already.
        wrote: Whether this call made a table commit (False when another writer had committed all its videos).
    """

    versions: dict[str, int]
    videos_committed: int
    segments_committed: int
    dropped: int
    readded: int
    replaced: int
    rounds: int
    superseded: int = 0
    duplicates: int = 0
    stale_listings: int = 0
    wrote: bool = True


def _stale_listings(pending: pa.Table, video_rows: Mapping[str, Any]) -> set[str]:
    """The pending videos whose read found the object changed since it was listed and that have an older row (the
    Planner saw one, or another writer committed one): such a result says nothing of the video, only that the
    listing was stale, so it never replaces a row."""
    changed = pending.filter(pc.equal(pending.column("status"), STATUS_CHANGED))
    if changed.num_rows == 0:
        return set()
    ids = changed.column("video_id").to_pylist()
    seen = pc.not_equal(changed.column("current_video_file"), "").to_pylist()
    return {video_id for video_id, older in zip(ids, seen, strict=True) if older or video_id in video_rows}


@dataclass
class _Plan:
    video_adds: list[DataFile]
    video_removes: list[RemovedFile]
    segment_adds: list[DataFile]
    segment_removes: list[RemovedFile]
    # (table, old path, rewrite or None, ids removed): applied to what we know once that table's commit lands
    moves: list[tuple[str, str, DataFile | None, frozenset[str]]]
    pending_segments: dict[str, DataFile | None]  # original pending segments path -> what this round commits
    readd: DataFile | None  # our segment rows another writer removed after our segments commit, to commit again
    readded: set[str]
    dropped: set[str]
    dropped_not_ok: set[str]  # dropped videos whose winning row is a final failure (no segment set belongs to it)
    superseded: set[str]  # dropped videos whose winning row is of a newer version of the object (`_superseded`)
    stale_listings: set[str]  # dropped videos read as changed since listed, that have an older row (which stays)
    replaced: int
    video_rows: int
    # videos committed without segment rows -> (the Planner's segment files of their row, runs of rows replaced)
    bare: dict[str, tuple[frozenset[str], frozenset[str], frozenset[str]]]


class Committer:
    """Commits written batches of one run so that each video keeps one row and one set of segment rows.

    Args:
        location: The output.
        model_id: The model the run indexes.
        run_id: This run; stored in each commit's metadata (``vitaclip.run_id``) and in its app ids.
        versions: The table versions the run planned at (the `Planner`'s).
        rewrite: Rewrites a committed file without some videos' rows; `delta_tables.rewrite_without` by default.
        max_rounds: Commit rounds (conflicts included) before giving up.
        before_videos_commit: Called between the segments commit and the videos commit (tests kill a run there).
        current_etags: Looks up the ETags objects have now (``uris -> etags``, None where unknown). With it, a video
            whose row another run committed meanwhile, of another version of the object, is left out when that row
            is of the object as it is now and ours is not (our listing was the older): `superseded`.
        require: App transaction versions of the videos table every round needs (the run's row settings,
            `index.row_settings`): checked before its segments commit and, atomically, by its videos commit; another
            version raises `delta_tables.RecordChangedError` and the round commits nothing more.
    """

    def __init__(
        self,
        location: OutputLocation,
        *,
        model_id: str,
        run_id: str,
        versions: Mapping[str, int],
        rewrite: Rewrite | None = None,
        max_rounds: int = 20,
        before_videos_commit: Callable[[], None] | None = None,
        current_etags: Callable[[Sequence[str]], Sequence[str | None]] | None = None,
        require: Mapping[str, int] | None = None,
    ) -> None:
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.location = location
        self.model_id = model_id
        self.run_id = run_id
        self.max_rounds = max_rounds
        self._rewrite: Rewrite = rewrite or dlt.rewrite_without
        self._before_videos_commit = before_videos_commit
        self._current_etags = current_etags
        self._require = dict(require or {})
        self._embed_dim = dlt.table_embed_dim(location, "videos")
        self._reconciled = {table: int(versions[table]) for table in dlt.TABLES}
        self._round = 0
        self._pending: list[WrittenBatch] = []
        # Per pending batch, by key row: False for a video pending in an earlier batch or committed by an earlier call
        self._fresh: list[np.ndarray] = []
        self._committed_hashes = np.zeros(0, dtype=np.uint64)  # sorted id hashes of what earlier calls committed
        self._pending_hashes: set[int] = set()  # id hashes of the pending videos
        self._pending_count = 0
        # Files other writers added since `versions`, still current: their key columns (our model's rows).
        self._others: dict[str, dict[str, pa.Table]] = {table: {} for table in dlt.TABLES}
        # Our own rewrites of files the Planner knew: old path -> (new path or None, video ids left out).
        self._moved: dict[str, dict[str, tuple[str | None, frozenset[str]]]] = {table: {} for table in dlt.TABLES}
        self._rewrites: dict[tuple[str, str, frozenset[str]], DataFile | None] = {}
        self._names: dict[tuple[str, frozenset[str]], str] = {}
        self._committed_segments: dict[str, DataFile | None] | None = None  # set once our segments landed
        self._file_ids: dict[str, frozenset[str]] = {}  # segments file -> its video ids (`_ids_in`)
        self._written_ids: dict[str, pa.Array] = {}  # pending segments file -> its video ids, as the writer sent them
        self._bare: dict[str, tuple[frozenset[str], frozenset[str], frozenset[str]]] = {}  # stale segments to clean
        self._run_ids_of_segments: dict[str, dict[str, frozenset[str]]] = {}  # segments file -> video id -> runs
        # Videos another run finished with a final failure after our segments of them landed (dropped from our
        # videos commit): our segment rows of them belong to no row. Their files: our committed segments files.
        self._orphaned: set[str] = set()
        self._run_ids: dict[str, dict[str, frozenset[str]]] = {}  # videos file -> video id -> runs, for `_runs_in`
        self._orphaned_files: set[str] = set()
        # Other runs' segment rows no run will remove (`Planner.abandoned_segments`): video id -> (files, runs).
        self._abandoned: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        self._last_failure = ""

    def clean_up_abandoned(self, abandoned: Mapping[str, tuple[Collection[str], Collection[str]]]) -> None:
        """Has the next `commit` remove other runs' segment rows that no run will remove (from
        `Planner.abandoned_segments`: video id -> (files, the ended runs that made the rows)), in its clean-up
        commit: of each video that no other writer committed since the planning versions, the files that still hold
        its rows, made by those runs only."""
        for video_id, (paths, runs) in abandoned.items():
            self._abandoned[video_id] = (frozenset(paths), frozenset(runs))

    @property
    def pending_clean_up(self) -> bool:
        """Whether a `commit` has segment rows to clean up even with no video pending."""
        return bool(self._bare or self._orphaned or self._abandoned)

    def add(self, batch: WrittenBatch) -> None:
        """Queues a written batch for the next `commit`.

        A video already pending in another batch, or committed by an earlier `commit` of this Committer (two
        Planner actors each saw it listed), is left out of this one.

        Raises:
            ValueError: Keys not of `KEYS_SCHEMA`, a key without a video id, a batch naming one video twice.
        """
        if not batch.keys.schema.equals(KEYS_SCHEMA):
            raise ValueError(f"a batch's keys must have the schema {KEYS_SCHEMA}, got {batch.keys.schema}")
        ids = batch.keys.column("video_id")
        if ids.null_count:
            raise ValueError(f"a batch has {ids.null_count} keys without a video id")
        hashes = _id_hash(ids)
        # Distinct hashes are distinct ids; equal ones are a duplicate or (rarely) two ids of one hash.
        if len(np.unique(hashes)) != len(hashes) and pc.count_distinct(ids).as_py() != batch.keys.num_rows:
            counts = pc.value_counts(ids)
            twice = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
            raise ValueError(f"a batch names a video twice: {sorted(twice.to_pylist())}")
        fresh = ~self._held(hashes)
        self._pending_hashes.update(hashes[fresh].tolist())
        self._pending_count += int(fresh.sum())
        self._pending.append(batch)
        self._fresh.append(fresh)
        if batch.segments is not None and batch.segment_video_ids is not None:
            self._written_ids[batch.segments.path] = batch.segment_video_ids  # the driver reads no data file for them

    def holds(self, video_ids: Sequence[str]) -> list[bool]:
        """Per video: whether this Committer has it already, pending or committed by one of its `commit` calls."""
        if not video_ids:
            return []
        return [bool(held) for held in self._held(_id_hash(pa.array(list(video_ids), pa.string())))]

    def _held(self, hashes: np.ndarray) -> np.ndarray:
        committed = np.zeros(len(hashes), dtype=bool)
        if len(self._committed_hashes):
            at = np.searchsorted(self._committed_hashes, hashes).clip(max=len(self._committed_hashes) - 1)
            committed = self._committed_hashes[at] == hashes
        pending, values = self._pending_hashes, hashes.tolist()
        if pending.isdisjoint(values):  # the usual case, checked in C
            return committed
        return committed | np.fromiter((h in pending for h in values), dtype=bool, count=len(values))

    @property
    def pending_videos(self) -> int:
        return self._pending_count

    def _pending_keys(self) -> pa.Table:
        """The key rows of the pending videos, each once (the first batch's)."""
        parts = [batch.keys.filter(pa.array(fresh)) for batch, fresh in zip(self._pending, self._fresh, strict=True)]
        return pa.concat_tables(parts) if parts else KEYS_SCHEMA.empty_table()

    def _left_out(self, index: int, dropped: Collection[str]) -> frozenset[str]:
        """The videos of pending batch `index` that its commit leaves out: pending in an earlier batch, or in
        `dropped`."""
        ids = self._pending[index].keys.column("video_id")
        out = ~self._fresh[index]
        if dropped:
            value_set = pa.array(sorted(dropped), pa.string())
            out |= pc.is_in(ids, value_set=value_set).to_numpy(zero_copy_only=False)
        if not out.any():
            return frozenset()
        return frozenset(pc.filter(ids, pa.array(out)).to_pylist())

    def commit(self) -> CommitReport:
        """Commits the pending batches (segments, then videos), retrying after conflicts; see the module docstring.

        Raises:
            RuntimeError: Another writer kept committing for `max_rounds` rounds (after the videos commit, of the
                clean-up: the next call retries it).
        """
        if self._pending:
            report = self._retry(self._commit_round)
        else:  # a clean-up only
            versions = dict(self._reconciled)
            report = CommitReport(
                versions,
                videos_committed=0,
                segments_committed=0,
                dropped=0,
                readded=0,
                replaced=0,
                rounds=0,
                wrote=False,
            )
        if self.pending_clean_up:
            cleaned = self._retry(self._clean_up)
            if cleaned is not None:
                report.versions["segments"] = cleaned
                report = replace(report, wrote=True)
        return report

    def _retry(self, step: Callable[[int], _T]) -> _T:
        for attempt in range(1, self.max_rounds + 1):
            try:
                return step(attempt)
            except CommitConflict:
                time.sleep(random.uniform(0.005, 0.02) * min(attempt, 10))
        failure = f" (the last on storage: {self._last_failure})" if self._last_failure else ""
        raise RuntimeError(
            f"no commit to {self.location.url} succeeded in {self.max_rounds} rounds: other writers kept committing "
            f"or storage kept failing{failure}"
        )

    # ------------------------------------------------------------------------------------------------- a round

    def _commit_round(self, attempt: int) -> CommitReport:
        self._round += 1
        snapshots = {table: _snapshot(self.location, table, apps=self._require) for table in dlt.TABLES}
        for app_id, expected in self._require.items():  # early: the videos commit checks again, atomically
            found = snapshots["videos"].transactions[app_id]
            if found != expected:
                raise dlt.RecordChangedError(
                    f"the videos table records {app_id} version {found} at {snapshots['videos'].version}, not "
                    f"{expected}",
                    app_id=app_id, expected=expected, found=found,
                )  # fmt: skip
        for table in dlt.TABLES:
            self._follow_log(table, snapshots[table])
        pending = self._pending_keys()
        plan = self._plan(snapshots, pending)
        metadata = {RUN_ID_KEY: self.run_id}
        versions = {table: snapshots[table].version for table in dlt.TABLES}
        if plan.segment_adds or plan.segment_removes:
            versions["segments"] = self._commit_table(
                "segments",
                adds=plan.segment_adds,
                removes=plan.segment_removes,
                read_version=snapshots["segments"].version,
                app_id=f"vitaclip:{self.run_id}:segments",
                app_version=self._round,
                metadata={**metadata, "vitaclip.segment_files": str(len(plan.segment_adds))},
            )
            self._reconciled["segments"] = versions["segments"]
            self._apply_moves("segments", plan.moves)
            if plan.readd is not None and self._committed_segments is not None:
                self._committed_segments[plan.readd.path] = plan.readd
        if self._committed_segments is None:
            self._committed_segments = plan.pending_segments
        if self._before_videos_commit is not None:
            self._before_videos_commit()
        if plan.video_adds or plan.video_removes:
            versions["videos"] = self._commit_table(
                "videos",
                adds=plan.video_adds,
                removes=plan.video_removes,
                read_version=snapshots["videos"].version,
                app_id=f"vitaclip:{self.run_id}:videos",
                app_version=self._round,
                metadata={**metadata, "vitaclip.videos": str(plan.video_rows)},
                require=self._require,
            )
            self._reconciled["videos"] = versions["videos"]
            self._apply_moves("videos", plan.moves)
        segment_rows = sum(f.num_rows for f in (self._committed_segments or {}).values() if f is not None)
        duplicates = sum(int((~fresh).sum()) for fresh in self._fresh)
        if plan.dropped_not_ok and self._committed_segments:
            self._orphaned |= plan.dropped_not_ok
            self._orphaned_files |= {f.path for f in self._committed_segments.values() if f is not None}
        done = pending.column("video_id")
        if plan.dropped:
            done = pc.filter(done, pc.invert(pc.is_in(done, value_set=pa.array(sorted(plan.dropped), pa.string()))))
        self._committed_hashes = np.union1d(self._committed_hashes, _id_hash(done))
        self._pending, self._fresh, self._committed_segments = [], [], None
        self._pending_hashes, self._pending_count = set(), 0
        self._file_ids, self._written_ids = {}, {}
        self._bare.update(plan.bare)
        return CommitReport(
            versions=versions,
            videos_committed=plan.video_rows,
            segments_committed=segment_rows,
            dropped=len(plan.dropped) - len(plan.stale_listings),
            superseded=len(plan.superseded),
            stale_listings=len(plan.stale_listings),
            readded=len(plan.readded),
            replaced=plan.replaced,
            rounds=attempt,
            duplicates=duplicates,
            wrote=bool(plan.segment_adds or plan.segment_removes or plan.video_adds or plan.video_removes),
        )

    def _clean_up(self, attempt: int) -> int | None:
        """Removes the stale segment rows of videos we committed without any; the segments version (None: no commit).

        Only of videos whose current row is still ours, and only rows no live run can still need: those in the
        Planner's partner files of the row we replaced (through our own rewrites), and those of runs whose rows of
        the video we removed. Another run's segment rows that landed before its videos commit are left alone.
        """
        self._round += 1
        snapshots = {table: _snapshot(self.location, table) for table in dlt.TABLES}
        for table in dlt.TABLES:
            self._follow_log(table, snapshots[table])
        ids = sorted(set(self._bare) | self._orphaned | set(self._abandoned))
        video_rows, segment_rows = self._rows_of("videos", ids), self._rows_of("segments", ids)
        targets: dict[str, set[str]] = {}
        self._abandoned_targets(targets, video_rows, snapshots["segments"])
        for video_id in sorted(self._orphaned):
            rows = video_rows.get(video_id, [])
            if not rows or any(row["status"] == "ok" for _, row in rows):
                continue  # no row to go by, or an ok row now (same etag): our rows may be its set
            held: set[str | None] = {p for p, row in segment_rows.get(video_id, []) if row["run_id"] == self.run_id}
            held |= {self._resolve("segments", path, video_id) for path in self._orphaned_files}
            for path in held:
                if path is not None and path in snapshots["segments"].sizes and video_id in self._segment_ids(path):
                    targets.setdefault(path, set()).add(video_id)
        for video_id, (partners, seen, runs) in self._bare.items():
            if any(row["run_id"] != self.run_id for _, row in video_rows.get(video_id, [])):
                continue  # another run's row replaced ours: its commit took care of the segments
            held = {self._resolve("segments", path, video_id) for path in partners}
            held |= {path for path, row in segment_rows.get(video_id, []) if row["run_id"] in runs}
            for path in (self._resolve("segments", p, video_id) for p in seen):
                if path is not None and path in snapshots["segments"].sizes and self._holds(path, video_id, runs):
                    held.add(path)
            for path in held:
                if path is not None and path in snapshots["segments"].sizes and video_id in self._segment_ids(path):
                    targets.setdefault(path, set()).add(video_id)
        version = None
        if targets:
            moves = [
                ("segments", path, self._rewritten("segments", path, frozenset(v)), frozenset(v))
                for path, v in sorted(targets.items())
            ]
            version = self._commit_table(
                "segments",
                adds=[new for _, _, new, _ in moves if new is not None],
                removes=[RemovedFile(path, snapshots["segments"].sizes[path]) for _, path, _, _ in moves],
                read_version=snapshots["segments"].version,
                app_id=f"vitaclip:{self.run_id}:segments",
                app_version=self._round,
                metadata={RUN_ID_KEY: self.run_id, "vitaclip.cleaned_videos": str(sum(map(len, targets.values())))},
            )
            self._reconciled["segments"] = version
            self._apply_moves("segments", moves)
        self._bare, self._orphaned, self._orphaned_files, self._abandoned = {}, set(), set(), {}
        return version

    def _abandoned_targets(
        self,
        targets: dict[str, set[str]],
        video_rows: Mapping[str, list[tuple[str, dict[str, Any]]]],
        segments: _Snapshot,
    ) -> None:
        """Adds the files of `_abandoned` videos to clean up to `targets` (see `clean_up_abandoned`)."""
        ids = sorted(self._abandoned)
        ours = self._held(_id_hash(pa.array(ids, pa.string()))).tolist() if ids else []
        for video_id, committed_by_us in zip(ids, ours, strict=True):
            if committed_by_us or video_rows.get(video_id):
                continue  # a row committed since the planning: its commits see to the video's segments
            paths, runs = self._abandoned[video_id]
            for path in (self._resolve("segments", p, video_id) for p in paths):
                if path is None or path not in segments.sizes:
                    continue  # rewritten by another writer since: left for a later run
                if self._made_only_by(path, video_id, runs):
                    targets.setdefault(path, set()).add(video_id)

    def _made_only_by(self, path: str, video_id: str, runs: frozenset[str]) -> bool:
        """Whether a segments file holds rows of `video_id`, all made by `runs`."""
        made = self._segment_runs(path).get(video_id, frozenset())
        return bool(made) and made <= runs

    def _holds(self, path: str, video_id: str, runs: frozenset[str]) -> bool:
        """Whether a segments file holds rows of `video_id` made by one of `runs`."""
        return not self._segment_runs(path).get(video_id, frozenset()).isdisjoint(runs)

    def _segment_runs(self, path: str) -> dict[str, frozenset[str]]:
        return self._runs_by_video("segments", path)

    def _runs_by_video(self, table: str, path: str) -> dict[str, frozenset[str]]:
        """Video id -> the runs that made its rows, of one data file (two columns, read and grouped once: looked up
        per video, a filter of the whole file each time cost videos x rows)."""
        cache = self._run_ids_of_segments if table == "segments" else self._run_ids
        if path not in cache:
            held = _distinct_runs(self.location, table, path, ["video_id", "run_id"], self.model_id)
            pairs = held.group_by(["video_id", "run_id"]).aggregate([])
            grouped: dict[str, set[str]] = {}
            for video_id, run_id in zip(
                pairs.column("video_id").to_pylist(), pairs.column("run_id").to_pylist(), strict=True
            ):
                grouped.setdefault(video_id, set()).add(run_id)
            cache[path] = {v: frozenset(r) for v, r in grouped.items()}
        return cache[path]

    def _segment_ids(self, path: str) -> frozenset[str]:
        """Video ids in a segments file: ours read once (`_ids_in`), another writer's from what `_follow_log` read."""
        known = self._others["segments"].get(path)
        return frozenset(known.column("video_id").to_pylist()) if known is not None else self._ids_in(path)

    def _commit_table(self, table: str, *, app_id: str, app_version: int, read_version: int, **kwargs: Any) -> int:
        """`delta_tables.commit`; after an ambiguous failure (a timeout), checks whether the commit landed."""
        try:
            return dlt.commit(
                self.location, table, app_id=app_id, app_version=app_version, read_version=read_version, **kwargs
            )
        except ValueError:
            raise
        except CommitConflict:
            # A conditional write retried after a lost answer finds its own commit there and reports a conflict.
            if dlt.committed_app_version(self.location, table, app_id) == app_version:
                return read_version + 1
            raise
        except Exception as exc:
            if dlt.committed_app_version(self.location, table, app_id) == app_version:
                return read_version + 1  # it landed; a commit only ever lands at read_version + 1
            if isinstance(exc, OSError):  # a storage failure (throttling, a dropped connection): nothing landed
                self._last_failure = f"{type(exc).__name__}: {exc}"
                raise CommitConflict(f"the {table} commit failed on storage and is retried: {exc}") from exc
            raise

    def _follow_log(self, table: str, snapshot: _Snapshot) -> None:
        """Learns what other writers added and removed since the last reconciled version."""
        known = self._others[table]
        for change in dlt.log_changes(
            self.location, table, after_version=self._reconciled[table], upto_version=snapshot.version
        ):
            for path in change.removes:
                known.pop(path, None)
            if change.commit_info.get(RUN_ID_KEY) == self.run_id:
                continue
            for add in change.adds:
                if add.path not in snapshot.sizes or not _stats_allow(add.stats, self.model_id):
                    continue
                columns = ["video_id", "etag", "status", "run_id"] if table == "videos" else ["video_id", "run_id"]
                known[add.path] = _read_columns(self.location, table, add.path, columns, self.model_id)
        for path in [p for p in known if p not in snapshot.sizes]:
            del known[path]
        self._reconciled[table] = snapshot.version

    def _apply_moves(self, table: str, moves: list[tuple[str, str, DataFile | None, frozenset[str]]]) -> None:
        """Records our committed rewrites of one table, so later rounds find the rows that moved."""
        for moved_table, old, new, ids in moves:
            if moved_table != table:
                continue
            known = self._others[table].pop(old, None)
            if known is not None:
                if new is not None:
                    drop = pc.is_in(known.column("video_id"), value_set=pa.array(sorted(ids), pa.string()))
                    self._others[table][new.path] = known.filter(pc.invert(drop))
            else:
                self._moved[table][old] = (None if new is None else new.path, ids)

    def _resolve(self, table: str, path: str, video_id: str) -> str | None:
        """Where the Planner's `path` holding `video_id` went through our own rewrites (None: not held anymore)."""
        seen = 0
        while path in self._moved[table] and seen < 10_000:
            new, ids = self._moved[table][path]
            if new is None or video_id in ids:
                return None
            path, seen = new, seen + 1
        return path

    def _rows_of(
        self, table: str, ids: Sequence[str] | pa.Array | pa.ChunkedArray
    ) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Rows of `ids` in files other writers added: video_id -> [(file, row)]."""
        found: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        if not self._others[table]:
            return found
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        value_set = ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())
        for path, keys in self._others[table].items():
            hits = keys.filter(pc.is_in(keys.column("video_id"), value_set=value_set))
            for row in hits.to_pylist():
                found.setdefault(row["video_id"], []).append((path, row))
        return found

    def _superseded(
        self, video_rows: Mapping[str, list[tuple[str, dict[str, Any]]]], etags: Mapping[str, Any], done: set[str]
    ) -> set[str]:
        """Videos (not `done`) whose row another writer committed since we planned, of the ETag the object has now,
        while ours is of another: that writer listed the object after it changed, we before. Committing ours would
        put the older version back until the next run. Looked up only for rows other writers added with another ETag
        than ours (rare: the object changed between two overlapping runs' listings, or an older row another writer's
        rewrite carried along); an unknown ETag leaves ours to replace theirs. A ``deleted`` row (a prune) is the
        newest version of an object that is gone: ours is dropped while the object is still gone."""
        if self._current_etags is None:
            return set()
        theirs = {  # (video, file, the ETag their row says the object has now: None for gone)
            (video_id, path, None if row["status"] == STATUS_DELETED else row["etag"])
            for video_id, rows in video_rows.items()
            if video_id not in done
            for path, row in rows
            if (row["etag"] is not None and row["etag"] != etags[video_id]) or row["status"] == STATUS_DELETED
        }
        if not theirs:
            return set()
        uris: dict[str, str] = {}
        for path in sorted({path for _, path, _ in theirs}):
            held = _read_columns(self.location, "videos", path, ["video_id", "uri"], self.model_id)
            uris.update(zip(held.column("video_id").to_pylist(), held.column("uri").to_pylist(), strict=True))
        asked = sorted({uris[video_id] for video_id, _, _ in theirs if video_id in uris})
        now = dict(zip(asked, self._current_etags(asked), strict=True))
        # An ETag that cannot be found now (None) matches only a prune's row: it is unknown for any other.
        return {video_id for video_id, _, etag in theirs if video_id in uris and now[uris[video_id]] == etag}

    def _runs_in(self, video_id: str, paths: set[str | None], snapshot: _Snapshot) -> set[str]:
        """Run ids of `video_id`'s rows in current videos files (each file's two columns read once)."""
        runs: set[str] = set()
        for path in paths:
            if path is None or path not in snapshot.sizes:
                continue
            runs.update(self._runs_by_video("videos", path).get(video_id, ()))
        return runs

    def _ids_in(self, path: str) -> frozenset[str]:
        """Video ids of one of our own segments files (as its writer sent them, else read once)."""
        if path not in self._file_ids:
            ids = self._written_ids.get(path)
            if ids is None:
                ids = _distinct_runs(self.location, "segments", path, ["video_id"], self.model_id).column("video_id")
            self._file_ids[path] = frozenset(ids.to_pylist())
        return self._file_ids[path]

    def _rewritten(self, table: str, path: str, ids: frozenset[str]) -> DataFile | None:
        """`path` without the rows of `ids`, written once; a videos file and its partner rewritten alike share names."""
        key = (table, path, ids)
        if key not in self._rewrites:
            name = self._names.setdefault((path, ids), f"part-{self.run_id}-{uuid.uuid4().hex}.parquet")
            try:
                self._rewrites[key] = self._rewrite(
                    self.location, table, path, ids, model_id=self.model_id, name=name, embed_dim=self._embed_dim
                )
            except FileNotFoundError:
                # The file to rewrite (often this run's own, not yet committed, after another run committed some of
                # its videos) was deleted: by a vacuum whose retention is shorter than it waited for its commit.
                raise FileNotFoundError(
                    f"a data file of the {table} table to rewrite is gone before this run's commit (deleted by a "
                    f"vacuum with a retention shorter than the time since it was written?): {path}; nothing was "
                    "committed by this round, its videos are planned again by the next run"
                ) from None
        return self._rewrites[key]

    def _copy_segment_rows(self, wanted: Mapping[str, set[str]]) -> DataFile | None:
        """Copies the segment rows of some videos (data file -> video ids) into a new data file; None if none."""
        parts = []
        filesystem, root = self.location.table_path("segments")
        for path, keys in sorted(wanted.items()):
            data = read_file(filesystem, f"{root}/{path}")
            data = data.filter(pc.equal(data.column("model_id"), self.model_id))
            parts.append(data.filter(pc.is_in(data.column("video_id"), value_set=pa.array(sorted(keys), pa.string()))))
        rows = pa.concat_tables(parts) if parts else None
        if rows is None or rows.num_rows == 0:
            return None
        name = f"part-{self.run_id}-{uuid.uuid4().hex}.parquet"
        return dlt.write_data_file(self.location, "segments", rows, name=name, embed_dim=self._embed_dim)

    def _readd(
        self,
        committed: dict[str, DataFile | None],
        current: _Snapshot,
        segment_rows: dict[str, list[tuple[str, dict[str, Any]]]],
        dropped: set[str],
    ) -> tuple[DataFile | None, set[str]]:
        """Our segments landed in an earlier round of this call. Another writer may have removed some since (it
        re-indexed the video, then lost the videos race or not): those of videos we still commit go in again, as a
        new data file. Returns it (None: nothing to re-add) and their video ids."""
        still_ours = set().union(*(self._ids_in(f.path) for f in committed.values() if f and f.path in current.sizes))
        wanted: dict[str, set[str]] = {}
        for index, batch in enumerate(self._pending):
            if batch.segments is None:
                continue
            for video_id in self._ids_in(batch.segments.path) - self._left_out(index, dropped) - still_ours:
                if not any(r["run_id"] == self.run_id for _, r in segment_rows.get(video_id, [])):
                    wanted.setdefault(batch.segments.path, set()).add(video_id)
        readd_file = self._copy_segment_rows(wanted)
        return readd_file, (set().union(*wanted.values()) if readd_file is not None else set())

    def _targets(
        self,
        snapshots: Mapping[str, _Snapshot],
        own: set[str],
        video_rows: dict[str, list[tuple[str, dict[str, Any]]]],
        segment_rows: dict[str, list[tuple[str, dict[str, Any]]]],
        dropped: set[str],
    ) -> tuple[dict[str, dict[str, set[str]]], int, dict[str, tuple[frozenset[str], frozenset[str], frozenset[str]]]]:
        """The current files holding older rows of the videos we commit (table -> file -> video ids), how many
        video rows that replaces, and the videos committed without segment rows (their stale segment rows go after
        the videos commit: video id -> (the Planner's partner files, the other segments files it saw holding the
        video, the runs whose rows we remove))."""
        targets: dict[str, dict[str, set[str]]] = {table: {} for table in dlt.TABLES}
        replaced = 0
        bare: dict[str, tuple[frozenset[str], frozenset[str], frozenset[str]]] = {}
        known = pa.array(sorted(set(video_rows) | set(segment_rows)), pa.string())
        for index, batch in enumerate(self._pending):
            replacing = self._replacing(index, dropped, known)
            if replacing.num_rows == 0:
                continue  # new videos only (the common case): nothing to replace, no stale segment rows
            with_segments = self._ids_in(batch.segments.path) if batch.segments else frozenset()
            for video_id, video_lines, segment_lines in zip(
                *(replacing.column(c).to_pylist() for c in ("video_id", "current_video_file", "current_segment_files")),
                strict=True,
            ):
                planned_videos, planned_segments = _lines(video_lines or ""), _lines(segment_lines or "")
                if not (planned_videos or planned_segments or video_id in video_rows or video_id in segment_rows):
                    continue
                video_files = {self._resolve("videos", p, video_id) for p in planned_videos}
                video_files |= {path for path, _ in video_rows.get(video_id, [])}
                segment_files = {self._resolve("segments", p, video_id) for p in planned_segments}
                segment_files |= {path for path, row in segment_rows.get(video_id, []) if row["run_id"] != self.run_id}
                if video_id not in with_segments:
                    runs = {row["run_id"] for _, row in video_rows.get(video_id, [])}
                    # The run of the row the Planner saw, which this commit removes too: its segment rows may have
                    # moved out of the partner file (another run's rewrite for other videos) where only it finds them.
                    runs |= self._runs_in(video_id, video_files, snapshots["videos"])
                    # The partner of the row the Planner saw, and the other segments files it saw holding the video:
                    # rewrites (named apart from any videos file), where only the replaced runs' rows are stale; a
                    # run's own unpartnered file may be a live run's between its two commits, and is left alone.
                    partners = set(planned_videos) & set(planned_segments)
                    bare[video_id] = (
                        frozenset(partners),
                        frozenset(set(planned_segments) - partners),
                        frozenset(runs - {self.run_id}),
                    )
                    segment_files = set()
                found = False
                for table, files in (("videos", video_files), ("segments", segment_files)):
                    for held in files:
                        if held is None or held in own or held not in snapshots[table].sizes:
                            continue
                        targets[table].setdefault(held, set()).add(video_id)
                        found = found or table == "videos"
                replaced += found
        return targets, replaced, bare

    def _replacing(self, index: int, dropped: Collection[str], known: pa.Array) -> pa.Table:
        """The key rows of pending batch `index` that its commit takes and that may have older rows: the Planner saw
        some, or another writer's (`known`)."""
        keys = self._pending[index].keys
        take = self._fresh[index].copy()
        if dropped:
            take &= ~pc.is_in(keys.column("video_id"), value_set=pa.array(sorted(dropped), pa.string())).to_numpy(
                zero_copy_only=False
            )
        older = pc.or_(
            pc.not_equal(keys.column("current_video_file"), ""), pc.not_equal(keys.column("current_segment_files"), "")
        )
        if len(known):
            older = pc.or_(older, pc.is_in(keys.column("video_id"), value_set=known))
        older = pc.fill_null(older, True)  # no file names given: looked at as if the Planner had seen some
        return keys.filter(pa.array(take & older.to_numpy(zero_copy_only=False)))

    def _plan(self, snapshots: Mapping[str, _Snapshot], pending: pa.Table) -> _Plan:
        ids = pending.column("video_id")
        video_rows = self._rows_of("videos", ids)
        segment_rows = self._rows_of("segments", ids)
        found = pending.filter(pc.is_in(ids, value_set=pa.array(sorted(video_rows), pa.string())))
        etags = dict(zip(found.column("video_id").to_pylist(), found.column("etag").to_pylist(), strict=True))
        dropped = {
            video_id
            for video_id, rows in video_rows.items()
            if any(is_done(row["etag"], row["status"], etags[video_id]) for _, row in rows)
        }
        superseded = self._superseded(video_rows, etags, dropped) if self._committed_segments is None else set()
        dropped |= superseded
        dropped_not_ok = {
            video_id for video_id in dropped if all(row["status"] != "ok" for _, row in video_rows[video_id])
        }
        stale_listings = _stale_listings(pending, video_rows) - dropped
        dropped |= stale_listings
        committed = self._committed_segments
        readd_file, readded = (
            self._readd(committed, snapshots["segments"], segment_rows, dropped)
            if committed is not None
            else (None, set())
        )
        own = {b.videos.path for b in self._pending if b.videos} | {
            b.segments.path for b in self._pending if b.segments
        }
        own |= {f.path for f in (committed or {}).values() if f is not None}
        targets, replaced, bare = self._targets(snapshots, own, video_rows, segment_rows, dropped)

        moves: list[tuple[str, str, DataFile | None, frozenset[str]]] = []
        removes: dict[str, list[RemovedFile]] = {table: [] for table in dlt.TABLES}
        adds: dict[str, list[DataFile]] = {table: [] for table in dlt.TABLES}
        if readd_file is not None:
            adds["segments"].append(readd_file)
        for table in dlt.TABLES:
            for path, ids in sorted(targets[table].items()):
                new = self._rewritten(table, path, frozenset(ids))
                removes[table].append(RemovedFile(path, snapshots[table].sizes[path]))
                if new is not None:
                    adds[table].append(new)
                moves.append((table, path, new, frozenset(ids)))

        pending_segments: dict[str, DataFile | None] = {}
        new_video_rows = 0
        for index, batch in enumerate(self._pending):
            leave = self._left_out(index, dropped)
            if batch.videos is not None:
                videos = self._rewritten("videos", batch.videos.path, leave) if leave else batch.videos
                if videos is not None:
                    adds["videos"].append(videos)
                    new_video_rows += videos.num_rows
            if batch.segments is not None and committed is None:
                segments = self._rewritten("segments", batch.segments.path, leave) if leave else batch.segments
                pending_segments[batch.segments.path] = segments
                if segments is not None:
                    adds["segments"].append(segments)
        return _Plan(
            video_adds=adds["videos"],
            video_removes=removes["videos"],
            segment_adds=adds["segments"],
            segment_removes=removes["segments"],
            moves=moves,
            pending_segments=pending_segments,
            readd=readd_file,
            readded=readded,
            dropped=dropped,
            dropped_not_ok=dropped_not_ok,
            superseded=superseded,
            stale_listings=stale_listings,
            replaced=replaced,
            video_rows=new_video_rows,
            bare=bare,
        )

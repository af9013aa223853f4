"""The run's one heavy stage: embed actors that have their input blocks decoded by Ray tasks on the CPUs.

Decoded frames never pass through Ray Data's executor. Ray Data's driver-side scheduling costs about 8 ms of the
driver's CPU per block it moves (benchmarks/driver_rows.py), and a block of decoded frames holds few clips: a clip of
8 x 224 x 224 x 3 bytes is 1.2 MB, so a 256 MiB block holds about 220 of them. Two stages (decode, then embed)
therefore cost the driver about 0.04 CPU-s per 1,000 clips, enough to make one driver core the limit of a cluster
of about 20 GPUs. Here the Dataset moves the planner's blocks of listed videos in and blocks of embed output (small
rows: an embedding, labels, a thumbnail) out:

- `DecodeEmbed` (a Ray Data actor, one per GPU) takes a planned block of listed videos, in calls of a few hundred
  (Ray Data's batch size), and for each call submits `decode_chunk` tasks for ``decode_batch_size`` videos at a
  time, keeping a bounded number in flight. Each task is a streaming generator: it hands its clips on every
  ``piece_mib`` of frames, through the object store, straight to the actor.
- The actor embeds clips as they come (``embed_batch_size`` at a time, one thread on the model) and yields the
  rows; Ray Data gathers a block's output into blocks of its target size (most often one). Its model loads in
  the background while the first blocks decode: a call holds their frames (up to ``hold_mib``) until it is ready.
- Two blocks run at once in each actor, so one call's decoding starts while the other's last videos finish.

A decode task that dies (its worker killed, out of memory, a crash in a codec) is retried by Ray, which hands on
only the pieces after those already received. A retry may decode a video differently (a time limit or a storage
error on one try only makes one failed row instead of its clips), so the pieces it hands on may not complete what
the first try did: every task's videos are checked when it ends, and those not received whole are decoded again,
one per task. A video whose task keeps dying, or that is still incomplete after that, becomes a row with status
``decoder_crashed`` (retried by the next run).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from jobs.storage import make_s3_client, open_video
from vitaclip.stages import DecodeStage, EmbedStage, decode_id_for

DECODER_CRASHED = "decoder_crashed"
_DECODE_RETRIES = 3  # Ray's own retries of a decode task whose worker died (a chunk, then each of its videos once)
_PIECES_AHEAD = 2  # pieces a decode task may run ahead of the actor that takes them
_PROGRESS_SECONDS = 1.0  # how often an embed actor tells the run's progress line what it finished
# Decoded frames a call holds while the model loads (two calls at once: twice this per actor). The load takes
# seconds (torch and open_clip imports, the weights, the label features; about 35 s more with torch.compile), long
# enough for the decoders to finish the first blocks: without a hold they would wait for the model.
_HOLD_MIB = 256.0


class ReadDecode(DecodeStage):
    """DecodeStage reading from local files or S3 (ranged GETs for large objects)."""

    def __init__(
        self,
        *,
        s3_endpoint_url: str | None,
        whole_object_max_bytes: int,
        local_roots: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self._endpoint = s3_endpoint_url
        self._whole_max = whole_object_max_bytes
        self._roots = local_roots
        self._client: Any = None
        super().__init__(opener=self._open, **kwargs)

    def _open(self, uri: str, size_bytes: int, etag: str | None) -> Any:
        if uri.startswith("s3://") and self._client is None:
            self._client = make_s3_client(endpoint_url=self._endpoint)
        # The listed ETag: an object replaced since it was listed (or named by a stale manifest) is a `changed` row,
        # never indexed under an ETag it does not have.
        return open_video(
            uri,
            size_bytes=size_bytes,
            etag=etag,
            s3_client=self._client,
            whole_object_max_bytes=self._whole_max,
            local_roots=self._roots,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:  # type: ignore[override]
        # A generator: rows are handed on as they are decoded, so a decoder never holds a whole batch of long
        # videos' frames (twice: the rows, then their stacked column).
        yield from self.iter_batches(batch)


def status_rows(batch: dict[str, np.ndarray], *, decoder: dict[str, Any], embed_dim: int, top_k: int) -> Any:
    """A Ray Data task for a run whose planned objects all carry a listing status (a prune's ``deleted`` rows,
    objects the listing refused): their rows as `DecodeEmbed` gives them, with no decode task, no embed actor, no
    model load and no GPU asked for (a prune-only run started the embed pool and loaded the model for them)."""
    for rows in DecodeStage(num_frames=decoder["num_frames"], size=decoder["size"]).iter_batches(batch):
        if len(rows["status"]) and any(status == "ok" for status in rows["status"]):
            raise ValueError("status_rows takes objects the listing gave a status only")
        out = {key: value for key, value in rows.items() if key != "frames"}
        n = len(out["status"])
        out.update(
            embedding=np.zeros((n, embed_dim), dtype=np.float32),
            label_indices=np.full((n, top_k), -1, dtype=np.int32),
            label_scores=np.zeros((n, top_k), dtype=np.float32),
            embed_seconds=np.zeros(n),
        )
        yield out


class TimedEmbed(EmbedStage):
    """EmbedStage that records its own seconds per clip, for the run summary."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = super().__call__(batch)
        n = max(1, len(batch["status"]))
        out["embed_seconds"] = np.full(len(batch["status"]), (time.perf_counter() - start) / n)
        return out


_DECODERS: dict[str, ReadDecode] = {}  # this worker process's decoder (its S3 client is reused across tasks)


def decode_chunk(batch: dict[str, np.ndarray], decoder: dict[str, Any], piece_bytes: int) -> Iterator[Any]:
    """A decode task (a Ray streaming generator): the clip rows of a few listed videos, in pieces of about
    `piece_bytes` of frames (`vitaclip.stages.DecodeStage.iter_batches`)."""
    key = json.dumps(decoder, sort_keys=True)
    stage = _DECODERS.get(key)
    if stage is None:
        _DECODERS.clear()
        stage = _DECODERS[key] = ReadDecode(**decoder)
    yield from stage.iter_batches(batch, max_bytes=piece_bytes)


def _rows(batch: dict[str, np.ndarray], index: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {key: value[index] for key, value in batch.items()}


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(batches) == 1:
        return batches[0]
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


class _Chunk:
    """A decode task in flight: its videos (rows of the input block) and the clips received of each decode."""

    def __init__(self, videos: dict[str, np.ndarray], *, single: bool) -> None:
        self.videos = videos
        self.single = single
        # decode id -> clip count -> the segment indices received (a retry may repeat rows, or count differently)
        self.received: dict[int, dict[int, set[int]]] = {}

    def add(self, piece: dict[str, np.ndarray]) -> None:
        for decode_id, count, index in zip(
            piece["decode_id"].tolist(), piece["clip_count"].tolist(), piece["segment_index"].tolist(), strict=True
        ):
            self.received.setdefault(decode_id, {}).setdefault(count, set()).add(index)

    def unfinished(self) -> np.ndarray:
        """Indices of its videos no decode of which was received whole."""
        etags = self.videos.get("etag")
        keep = []
        for i, uri in enumerate(self.videos["uri"].tolist()):
            decode_id = decode_id_for(str(uri), "" if etags is None else str(etags[i]))
            counts = self.received.get(decode_id, {})
            if not any(len(indices) == count for count, indices in counts.items()):
                keep.append(i)
        return np.asarray(keep, dtype=np.int64)


class DecodeEmbed:
    """A Ray Data UDF over blocks of listed videos: decodes them in Ray tasks, embeds and labels their clips.

    Args:
        decoder: `ReadDecode`'s arguments.
        decode_cpus: CPUs each decode task asks for.
        decode_batch_size: videos per decode task.
        in_flight: decode tasks this actor keeps running (its calls share them).
        piece_mib: MiB of frames per object a decode task hands on.
        embed: `TimedEmbed`'s arguments.
        cpu_threads: torch threads when the model runs on CPUs (the actor reserves no CPU, so Ray sets one).
        decode: the decode task's function (`decode_chunk`; tests wrap it).
        hold_mib: MiB of decoded frames each call holds while the model loads (decoding goes on meanwhile; at
            this bound the call waits for the model).
        progress: an actor told the videos and clips embedded (`PlanActor.note_embedded`) about once a second.
    """

    def __init__(
        self,
        *,
        decoder: dict[str, Any],
        decode_cpus: float,
        decode_batch_size: int,
        in_flight: int,
        piece_mib: float,
        embed: dict[str, Any],
        cpu_threads: int = 1,
        decode: Callable[..., Iterator[Any]] = decode_chunk,
        hold_mib: float = _HOLD_MIB,
        progress: Any = None,
    ) -> None:
        import ray

        self.progress = progress
        self.unreported = [0, 0]  # videos and clips embedded since the last `progress` message
        self.reported_at = time.monotonic()

        # The model loads in the background (torch, open_clip, weights, label features: seconds), so that the first
        # block's decode tasks start as soon as Ray Data hands it over.
        self.embed: Any = None
        self.embed_failure: BaseException | None = None
        self.embed_ready = threading.Event()
        threading.Thread(target=self._load, args=(embed, cpu_threads), name="vitaclip-load-model", daemon=True).start()
        self.embed_batch_size = int(embed.get("batch_size", 32))
        self.embed_lock = threading.Lock()  # one forward pass at a time; the other call waits on its decoders
        self.decoder = decoder
        self.batch_size = decode_batch_size
        self.free_slots = in_flight
        self.slots = threading.Condition()
        self.piece_bytes = int(piece_mib * 2**20)
        self.hold_bytes = int(hold_mib * 2**20)
        task = ray.remote(decode)
        options = dict(num_cpus=decode_cpus, num_returns="streaming", _generator_backpressure_num_objects=_PIECES_AHEAD)
        self.chunk_task = task.options(**options, max_retries=_DECODE_RETRIES)
        self.video_task = task.options(**options, max_retries=1)  # a video alone, after its chunk's last retry

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        # Ray Data gathers what the calls on one input block yield into blocks of its target size (most often one).
        # Whole embed batches go to the model as they fill up, the rest waits for the next piece: a compiled model
        # runs one batch size, which a partial batch is padded to. While the model loads, decoding goes on: the
        # call holds up to `hold_bytes` of decoded frames rather than wait for the model with its decoders idle.
        waiting: deque[dict[str, np.ndarray]] = deque()
        clips = held = 0
        for piece in itertools.chain(self._decoded(batch), [None]):  # None: the block's last piece has come
            if piece is not None:
                waiting.append(piece)
                clips += len(piece["decode_id"])
                held += piece["frames"].nbytes
            while clips >= self.embed_batch_size and (
                piece is None or self.embed_ready.is_set() or held >= self.hold_bytes
            ):
                rows = self._whole_batches(waiting)
                clips -= len(rows["decode_id"])
                held -= rows["frames"].nbytes
                yield self._embed(rows)
        if waiting:
            yield self._embed(_concat(list(waiting)))

    def _whole_batches(self, waiting: deque[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Whole embed batches made of the fewest pieces at the front of `waiting` (what is left of the last piece
        goes back to the front): what a call holds is never copied whole at once."""
        taken: list[dict[str, np.ndarray]] = []
        clips = 0
        while clips < self.embed_batch_size:
            taken.append(waiting.popleft())
            clips += len(taken[-1]["decode_id"])
        ready = _concat(taken)
        whole = clips - clips % self.embed_batch_size
        if whole < clips:
            waiting.appendleft(_rows(ready, slice(whole, clips)))
        return _rows(ready, slice(0, whole))

    def load_embed(self, embed: dict[str, Any]) -> Any:
        return TimedEmbed(**embed)

    def _load(self, embed: dict[str, Any], cpu_threads: int) -> None:
        try:
            embed = dict(embed)
            expected = embed.pop("expected_model_id", None)
            if embed.get("device") == "cpu":
                import torch

                torch.set_num_threads(max(1, cpu_threads))
            self.embed = self.load_embed(embed)
            loaded = getattr(self.embed, "model_id", expected)
            if expected is not None and loaded != expected:
                # The rows are written as the run's model: weights the checkpoint holds now must not be theirs.
                from vitaclip.checkpoint_folder import CheckpointError

                raise CheckpointError(
                    f"the checkpoint changed since the run began: it now holds {loaded}, the run's rows are of "
                    f"{expected}; run again"
                )
        except BaseException as exc:  # raised by the first call that needs the model
            self.embed_failure = exc
        finally:
            self.embed_ready.set()

    def _embed(self, clips: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.embed_ready.wait()
        if self.embed_failure is not None:
            raise self.embed_failure  # as the model's loader raised it (the driver reports a bad checkpoint as such)
        with self.embed_lock:
            out: dict[str, np.ndarray] = self.embed(clips)
            if self.progress is not None:
                self.unreported[0] += int(np.count_nonzero(np.asarray(clips["segment_index"]) < 0))  # whole videos
                self.unreported[1] += len(clips["segment_index"])
                if time.monotonic() - self.reported_at >= _PROGRESS_SECONDS:
                    self.progress.note_embedded.remote(*self.unreported)
                    self.unreported = [0, 0]
                    self.reported_at = time.monotonic()
            return out

    def _submit(self, videos: dict[str, np.ndarray], *, single: bool) -> tuple[Any, _Chunk]:
        gen = (self.video_task if single else self.chunk_task).remote(videos, self.decoder, self.piece_bytes)
        return gen, _Chunk(videos, single=single)

    def _take_slot(self, *, wait: bool) -> bool:
        """One of the actor's decode task slots (waiting for one with `wait`, when this call runs none)."""
        with self.slots:
            while not self.free_slots:
                if not wait:
                    return False
                self.slots.wait()
            self.free_slots -= 1
            return True

    def _give_slots(self, n: int) -> None:
        with self.slots:
            self.free_slots += n
            self.slots.notify_all()

    def _decoded(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Clip rows of the block's videos, as decode tasks hand them on (any order between tasks)."""
        n = len(batch["uri"])
        todo: deque[tuple[dict[str, np.ndarray], bool]] = deque(
            (_rows(batch, slice(i, i + self.batch_size)), False) for i in range(0, n, self.batch_size)
        )
        running: dict[Any, _Chunk] = {}
        try:
            while todo or running:
                while todo and self._take_slot(wait=not running):
                    videos, single = todo.popleft()
                    try:
                        submitted, chunk = self._submit(videos, single=single)
                    except BaseException:
                        self._give_slots(1)
                        raise
                    running[submitted] = chunk
                yield from self._next_piece(running, todo)
        finally:
            for gen in running:  # a call that raised, or that Ray Data closed: its tasks' output is not wanted
                _cancel(gen)
            self._give_slots(len(running))

    def _next_piece(
        self, running: dict[Any, _Chunk], todo: deque[tuple[dict[str, np.ndarray], bool]]
    ) -> Iterator[dict[str, np.ndarray]]:
        """The next piece any running task hands on (nothing when a task ends instead)."""
        import ray

        ready, _ = ray.wait(list(running), num_returns=1)
        gen: Any = ready[0]
        chunk = running[gen]
        try:
            piece: dict[str, np.ndarray] = ray.get(next(gen))
        except StopIteration:
            del running[gen]
            self._give_slots(1)
            yield from self._ended(chunk, None, todo)
            return
        except ray.exceptions.RayTaskError:
            raise  # the decode code raised: a bug (a bad video is a row, never an exception)
        except ray.exceptions.RayError as exc:  # its worker died, again and again (or a piece was lost)
            del running[gen]
            _cancel(gen)
            self._give_slots(1)
            yield from self._ended(chunk, exc, todo)
            return
        chunk.add(piece)
        # The columns that go on to the output, copied: views would keep the whole piece (its frames) in the object
        # store until Ray Data seals the call's output.
        yield {key: value if key == "frames" else np.array(value, copy=True) for key, value in piece.items()}

    def _ended(
        self, chunk: _Chunk, exc: BaseException | None, todo: deque[tuple[dict[str, np.ndarray], bool]]
    ) -> Iterator[dict[str, np.ndarray]]:
        """After a task's end (`exc`: its last retry died): its videos not received whole are decoded again one per
        task; a video that was alone in its task gets a ``decoder_crashed`` row instead."""
        unfinished = chunk.unfinished()
        if not len(unfinished):
            return
        if not chunk.single:
            todo.extendleft((_rows(chunk.videos, np.asarray([i])), True) for i in unfinished[::-1])
            return
        stage = DecodeStage(num_frames=self.decoder["num_frames"], size=self.decoder["size"])
        yield next(
            stage.iter_batches(
                {
                    **chunk.videos,
                    "listing_status": np.asarray([DECODER_CRASHED], dtype=object),
                    "listing_error": np.asarray([_ended_message(exc)], dtype=object),
                }
            )
        )


def _ended_message(exc: BaseException | None) -> str:
    if exc is None:
        return "its decode task ended without all of its clips (a retry decoded it differently)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"every process that decoded this video died ({type(exc).__name__}: {first[:200]})"


def _cancel(gen: Any) -> None:
    """Stops a decode task whose output is no longer wanted (best effort: it may be done or gone)."""
    import ray

    try:
        ray.cancel(gen, force=False)
    except Exception:  # noqa: BLE001  (already finished, its worker gone: nothing to stop)
        pass

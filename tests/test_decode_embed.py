"""The embed actor's own decoding (`jobs.decode_embed.DecodeEmbed`): decode tasks it submits, and what it does when
they die or raise. Run here in the test process (the actor's code, not an actor), against a real local Ray."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from jobs.decode_embed import DECODER_CRASHED, DecodeEmbed, decode_chunk
from vitaclip.samples import write_sample_video

NUM_FRAMES, SIZE = 8, 64  # vitaclip-tiny's clips


def _videos(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        write_sample_video(path, num_frames=36, fps=12, width=96, height=64, seed=i)  # 3 s
        paths.append(str(path))
    return {
        "uri": np.asarray(paths, dtype=object),
        "etag": np.asarray([f"e{i}" for i in range(len(paths))], dtype=object),
        "size_bytes": np.asarray([os.path.getsize(p) for p in paths]),
    }


def _stage_args() -> dict[str, Any]:
    return dict(
        decoder=dict(
            num_frames=NUM_FRAMES,
            size=SIZE,
            segment_seconds=1.0,
            timeout_seconds=60.0,
            s3_endpoint_url=None,
            whole_object_max_bytes=1 << 20,
        ),
        decode_cpus=0.5,
        decode_batch_size=2,
        in_flight=2,
        piece_mib=0.05,  # 52 KB: every clip (8 x 64 x 64 x 3 = 98 KB) is its own piece
        embed=dict(model="vitaclip-tiny", label_names=["a", "b", "c"], top_k=2, device="cpu", batch_size=4),
    )


def _stage(decode: Any, **kwargs: Any) -> DecodeEmbed:
    return DecodeEmbed(**{**_stage_args(), "decode": decode, **kwargs})


def _rows(stage: DecodeEmbed, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    outputs = list(stage(batch))
    return {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}


def test_every_clip_of_every_video_once(local_ray, tmp_path: Path) -> None:
    batch = _videos(tmp_path, [f"v{i}.mp4" for i in range(5)])
    rows = _rows(_stage(decode_chunk), batch)
    keys = list(zip(rows["uri"].tolist(), rows["segment_index"].tolist(), strict=True))
    assert len(keys) == len(set(keys))
    per_video = Counter(rows["uri"].tolist())
    assert set(per_video) == set(batch["uri"].tolist())
    assert all(n == 4 for n in per_video.values())  # the whole video and three 1 s segments
    assert set(rows["status"].tolist()) == {"ok"}
    assert (rows["clip_count"] == 4).all() and "frames" not in rows
    assert rows["embedding"].shape[0] == len(keys) and np.isfinite(rows["embedding"]).all()
    assert np.allclose(np.linalg.norm(rows["embedding"], axis=1), 1.0, atol=1e-4)


def test_the_actor_tells_the_progress_line_what_it_embedded(local_ray, tmp_path: Path, monkeypatch) -> None:
    """A call's rows reach the driver when its whole block is written (512 videos a call: minutes on a small run,
    where the line said 0 % throughout): the actor tells the run's planner what it finished as it goes."""
    import ray

    from jobs import decode_embed

    @ray.remote
    class Tally:
        def __init__(self) -> None:
            self.counts = [0, 0]

        def note_embedded(self, videos: int, clips: int) -> None:
            self.counts = [self.counts[0] + videos, self.counts[1] + clips]

        def embedded(self) -> tuple[int, int]:
            return self.counts[0], self.counts[1]

    monkeypatch.setattr(decode_embed, "_PROGRESS_SECONDS", 0.0)  # a message after every embed batch
    tally = Tally.remote()  # type: ignore[attr-defined]
    batch = _videos(tmp_path, [f"v{i}.mp4" for i in range(5)])
    stage = _stage(decode_chunk, progress=tally)
    outputs = stage(batch)
    first = next(outputs)  # one embed batch: told before the call has ended
    assert ray.get(tally.embedded.remote()) == (int((first["segment_index"] < 0).sum()), len(first["segment_index"]))
    list(outputs)
    assert ray.get(tally.embedded.remote()) == (5, 20)  # the whole videos and their three segments each


def test_a_video_that_kills_its_decoder_becomes_a_row(local_ray, tmp_path: Path) -> None:
    """Its task dies on every retry; the chunk's other video (already handed on) is kept once, and the video that
    still kills a decoder alone gets a ``decoder_crashed`` row. The other chunks are untouched."""
    batch = _videos(tmp_path, ["a.mp4", "crash.mp4", "b.mp4", "c.mp4"])

    def crashing(videos: dict[str, np.ndarray], decoder: dict[str, Any], piece_bytes: int) -> Any:
        for i, uri in enumerate(videos["uri"].tolist()):
            if uri.endswith("crash.mp4"):
                os._exit(1)  # a codec crash, an OOM kill
            one = {key: value[i : i + 1] for key, value in videos.items()}
            yield from decode_chunk(one, decoder, piece_bytes)

    rows = _rows(_stage(crashing), batch)
    by_uri: dict[str, list[int]] = {}
    for i, uri in enumerate(rows["uri"].tolist()):
        by_uri.setdefault(Path(uri).name, []).append(i)
    assert sorted(by_uri) == ["a.mp4", "b.mp4", "c.mp4", "crash.mp4"]
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        assert sorted(rows["segment_index"][by_uri[name]].tolist()) == [-1, 0, 1, 2], name
        assert set(rows["status"][by_uri[name]].tolist()) == {"ok"}
    (crash,) = by_uri["crash.mp4"]
    assert rows["status"][crash] == DECODER_CRASHED and rows["clip_count"][crash] == 1
    assert "died" in rows["error_message"][crash]
    assert not rows["embedding"][crash].any()


def test_a_decode_task_that_raises_is_a_bug(local_ray, tmp_path: Path) -> None:
    batch = _videos(tmp_path, ["a.mp4"])

    def broken(videos: dict[str, np.ndarray], decoder: dict[str, Any], piece_bytes: int) -> Any:
        raise ValueError("a bug in the decode task")
        yield  # a generator

    with pytest.raises(ray.exceptions.RayTaskError, match="a bug in the decode task"):
        _rows(_stage(broken), batch)


def test_a_retry_that_decodes_differently_is_completed(local_ray, tmp_path: Path) -> None:
    """Ray hands on a retried streaming task's pieces from the number it had reached. Here the retry makes one
    failed row for the first video (a time limit hit on this try only) instead of its four clips, so the pieces
    after that number skip most of the second video's clips: the task ends cleanly with that video incomplete, and
    it is decoded again on its own."""
    batch = _videos(tmp_path / "in", ["a.mp4", "b.mp4"])
    marker = tmp_path / "first-try-done"

    def flaky(videos: dict[str, np.ndarray], decoder: dict[str, Any], piece_bytes: int) -> Any:
        if len(videos["uri"]) == 1:  # a video on its own: decoded as it is
            yield from decode_chunk(videos, decoder, piece_bytes)
            return
        if not marker.exists():  # the first try: all of a.mp4's clips and b.mp4's first, then the process dies
            pieces = decode_chunk(videos, decoder, piece_bytes)
            for _ in range(5):
                yield next(pieces)
            marker.touch()
            os._exit(1)
        listed = dict(videos)  # the retry: a.mp4 times out this time
        listed["listing_status"] = np.asarray(["timeout", ""], dtype=object)
        listed["listing_error"] = np.asarray(["the time limit, this time", ""], dtype=object)
        yield from decode_chunk(listed, decoder, piece_bytes)

    rows = _rows(_stage(flaky, decode_batch_size=2), batch)
    assert marker.exists()
    for uri in batch["uri"].tolist():
        mine = rows["uri"] == uri
        assert set(rows["segment_index"][mine].tolist()) == {-1, 0, 1, 2}, uri  # every clip of one decode
        assert set(rows["status"][mine].tolist()) == {"ok"}, uri


def test_decode_chunk_hands_on_pieces_of_the_given_size(tmp_path: Path) -> None:
    batch = _videos(tmp_path, ["a.mp4", "b.mp4"])
    decoder = dict(_stage_args()["decoder"])
    clip = NUM_FRAMES * SIZE * SIZE * 3
    pieces = list(decode_chunk(batch, decoder, 3 * clip))  # 8 clips: 3 + 3 + 2, cut inside the second video
    assert [len(p["uri"]) for p in pieces] == [3, 3, 2]
    assert [len(p["uri"]) for p in decode_chunk(batch, decoder, 32 * 2**20)] == [8]


def _loads_after_decoding(
    markers: Path, chunks: int, wait_seconds: float, seen: list[int], embedded: list[int] | None = None
) -> type[DecodeEmbed]:
    """A DecodeEmbed whose model is ready only once `chunks` decode tasks have ended (or `wait_seconds` passed);
    `seen` gets how many had ended by then, `embedded` the clips of each call to the model."""

    class SlowModel(DecodeEmbed):
        def load_embed(self, embed: dict[str, Any]) -> Any:
            deadline = time.monotonic() + wait_seconds
            while len(list(markers.iterdir())) < chunks and time.monotonic() < deadline:
                time.sleep(0.05)
            seen.append(len(list(markers.iterdir())))
            return super().load_embed(embed)

        def _embed(self, clips: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if embedded is not None:
                embedded.append(len(clips["decode_id"]))
            return super()._embed(clips)

    return SlowModel


def _marking(markers: Path) -> Any:
    def decode(videos: dict[str, np.ndarray], decoder: dict[str, Any], piece_bytes: int) -> Any:
        yield from decode_chunk(videos, decoder, piece_bytes)
        (markers / uuid.uuid4().hex).touch()  # this task's pieces were all taken

    return decode


def test_decoding_goes_on_while_the_model_loads(local_ray, tmp_path: Path) -> None:
    """Three decode tasks of two, two and one videos, two at a time, every clip a piece of its own, batches of 4
    clips: a call that waited for the model at its first full batch would never start the third task (nor take
    the second's pieces), so the model (which waits for all three) would be ready only at its deadline."""
    batch = _videos(tmp_path / "in", [f"v{i}.mp4" for i in range(5)])
    markers = tmp_path / "ended"
    markers.mkdir()
    seen: list[int] = []
    embedded: list[int] = []
    stage = _loads_after_decoding(markers, 3, 60.0, seen, embedded)(**{**_stage_args(), "decode": _marking(markers)})
    rows = _rows(stage, batch)
    assert seen == [3]
    # What the call held (all 20 clips) went to the model a batch at a time, never copied together.
    assert sum(embedded) == 20 and max(embedded) == 4
    assert Counter(rows["uri"].tolist()) == {uri: 4 for uri in batch["uri"].tolist()}
    assert set(rows["status"].tolist()) == {"ok"} and np.isfinite(rows["embedding"]).all()


def test_what_a_call_holds_while_the_model_loads_is_bounded(local_ray, tmp_path: Path) -> None:
    """With no frames to hold, a call waits for the model at its first full batch: the decode tasks stop there
    (two pieces ahead at most) and the third is never started before the model is ready."""
    batch = _videos(tmp_path / "in", [f"v{i}.mp4" for i in range(5)])
    markers = tmp_path / "ended"
    markers.mkdir()
    seen: list[int] = []
    args = {**_stage_args(), "decode": _marking(markers), "hold_mib": 0.0}
    rows = _rows(_loads_after_decoding(markers, 3, 3.0, seen)(**args), batch)
    assert len(seen) == 1 and seen[0] < 3
    assert Counter(rows["uri"].tolist()) == {uri: 4 for uri in batch["uri"].tolist()}  # then all of it, as ever


def test_an_actor_refuses_weights_other_than_the_runs(tmp_path: Path) -> None:
    """The driver names the run's model from the checkpoint's bytes when it plans; the actors load the checkpoint
    later (minutes, on other nodes). A checkpoint replaced in between made rows stamped with the run's model id
    from other weights: each actor now checks the model it loaded against the run's."""
    import vitaclip
    from vitaclip.checkpoint_folder import CheckpointError
    from vitaclip.registry import model_id_for

    vitaclip.save_checkpoint(vitaclip.create_model("vitaclip-tiny"), tmp_path / "ckpt")
    run_model = model_id_for("vitaclip-tiny", str(tmp_path / "ckpt"))
    embed = dict(_stage_args()["embed"], checkpoint=str(tmp_path / "ckpt"))
    for expected, refused in ((run_model, False), ("vitaclip-tiny@sha256:" + "0" * 64, True)):
        stage = DecodeEmbed(**{**_stage_args(), "embed": dict(embed, expected_model_id=expected)})
        assert stage.embed_ready.wait(120)
        failure = stage.embed_failure
        assert isinstance(failure, CheckpointError) == refused, failure
        if refused:
            assert "the checkpoint changed since the run began" in str(failure) and run_model in str(failure)

"""The planner's blocks: every decoder gets some of a small run, whole blocks of a large one and its end cut finer, in
listing order, and the planner's own memory holds fewer than a few blocks per decoder whatever the listing's size."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from index.delta_tables import OutputLocation, create_tables
from jobs import pipeline, planning
from jobs.storage import VideoObject

pytestmark = pytest.mark.usefixtures("local_ray")


def _planner(tmp_path: Path, decode_workers: int) -> planning.PlanActor:
    location = OutputLocation.from_url(str(tmp_path / "out"))
    versions = create_tables(location, 4, model_id="m1")
    return planning.PlanActor(
        location, model_id="m1", versions=versions, folder_inputs=[], decode_workers=decode_workers
    )


def _page(start: int, count: int) -> Any:
    objects = [VideoObject(uri=f"/v/{k:06d}.mp4", etag=f"e{k}", size_bytes=1000) for k in range(start, start + count)]
    (table,) = pipeline._listing_tables(objects)
    return table


def _blocks(planner: planning.PlanActor) -> list[list[str]]:
    import ray

    return [ray.get(block.ref).column("uri").to_pylist() for block in planner.blocks()]


def test_a_small_run_is_spread_over_every_decoder(tmp_path: Path) -> None:
    planner = _planner(tmp_path, decode_workers=2)
    assert planner.plan(_page(0, 100)) == 100
    blocks = _blocks(planner)
    assert [len(b) for b in blocks] == [13] * 7 + [9]  # 4 blocks per decoder at least
    assert [u for b in blocks for u in b] == [f"/v/{k:06d}.mp4" for k in range(100)]


def test_a_large_run_goes_out_in_whole_blocks_as_it_is_planned_and_ends_finer(tmp_path: Path) -> None:
    planner = _planner(tmp_path, decode_workers=2)  # the end: 8 blocks of 128 = 1,024 videos held back
    tail, block = 8 * planning._TAIL_BLOCK_VIDEOS, planning._BLOCK_VIDEOS
    held = []
    for start in range(0, 7000, 700):
        planner.plan(_page(start, 700))
        held.append(planner._pending_rows)
    assert max(held) < tail + block and min(held) >= min(tail, 700)  # the end held back, whole blocks gone
    assert len(planner._refs) >= (7000 - tail - block) // block
    blocks = _blocks(planner)
    whole = [len(b) for b in blocks if len(b) == block]
    end = [len(b) for b in blocks[len(whole) :]]
    assert len(whole) * block + sum(end) == 7000 and len(end) == 8  # four per decoder at the end
    assert tail // 8 <= max(end) <= (tail + block) // 8 + 1 and max(end) - min(end) <= max(end) // 2
    assert [u for b in blocks for u in b] == [f"/v/{k:06d}.mp4" for k in range(7000)]
    assert planner.blocks() == []  # handed out once


def test_the_dataset_of_the_blocks_needs_no_metadata_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's Dataset is built from the metadata the planner computed with each block: `ray.data.from_arrow_refs`
    (a remote task per block, in a worker that must import Ray Data first) is not used with this Ray, and the
    Dataset holds the blocks' rows in listing order."""
    import ray.data

    planner = _planner(tmp_path, decode_workers=2)
    planner.plan(_page(0, 100))
    blocks = planner.blocks()
    for block in blocks:
        table = ray.get(block.ref)
        assert (block.videos, block.size_bytes, block.schema) == (table.num_rows, table.nbytes, table.schema)

    def public_path(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("ray.data.from_arrow_refs was used: Ray Data's internals changed")

    monkeypatch.setattr(ray.data, "from_arrow_refs", public_path)
    ds = pipeline.blocks_dataset(blocks)
    assert ds.num_blocks() == len(blocks) and ds.count() == 100
    assert ds.schema().names == ray.get(blocks[0].ref).schema.names
    assert [row["uri"] for row in ds.iter_rows()] == [f"/v/{k:06d}.mp4" for k in range(100)]


def test_the_planner_process_plans_without_importing_ray_data(tmp_path: Path) -> None:
    """The planner's start is on every run's critical path (one core idle on a small machine): Ray Data's import
    (0.5-0.8 s of CPU there) stays in the driver and the embed actors, the rest of the run's modules (PyAV, FAISS:
    0.3 s more) in theirs."""
    import ray

    location = OutputLocation.from_url(str(tmp_path / "out"))
    versions = create_tables(location, 4, model_id="m1")
    actor = (
        ray.remote(planning.PlanActor)
        .options(num_cpus=0)
        .remote(location, model_id="m1", versions=versions, folder_inputs=[], decode_workers=2)
    )
    try:
        assert ray.get(actor.plan.remote(_page(0, 100))) == 100
        blocks = ray.get(actor.blocks.remote())
        assert sum(b.videos for b in blocks) == 100
        heavy = ("ray.data", "jobs.pipeline", "jobs.decode_embed", "av", "faiss", "torch")
        imported = ray.get(actor.__ray_call__.remote(lambda self: [m for m in heavy if m in sys.modules]))
        assert imported == []
        assert pipeline.blocks_dataset(blocks).count() == 100
    finally:
        ray.kill(actor)

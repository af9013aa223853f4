"""The planner's blocks: every decoder gets some of a small run, at most 128 videos each of a large one, in listing
order, and the planner's own memory holds fewer than a few blocks per decoder whatever the listing's size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from index.delta_tables import OutputLocation, create_tables
from jobs import pipeline
from jobs.storage import VideoObject

pytestmark = pytest.mark.usefixtures("local_ray")


def _planner(tmp_path: Path, decode_workers: int) -> pipeline.PlanActor:
    location = OutputLocation.from_url(str(tmp_path / "out"))
    versions = create_tables(location, 4, model_id="m1")
    return pipeline.PlanActor(
        location, model_id="m1", versions=versions, folder_inputs=[], decode_workers=decode_workers
    )


def _page(start: int, count: int) -> Any:
    objects = [VideoObject(uri=f"/v/{k:06d}.mp4", etag=f"e{k}", size_bytes=1000) for k in range(start, start + count)]
    (table,) = pipeline._listing_tables(objects)
    return table


def _blocks(planner: pipeline.PlanActor) -> list[list[str]]:
    import ray

    return [ray.get(ref).column("uri").to_pylist() for ref in planner.blocks()]


def test_a_small_run_is_spread_over_every_decoder(tmp_path: Path) -> None:
    planner = _planner(tmp_path, decode_workers=2)
    assert planner.plan(_page(0, 100)) == 100
    blocks = _blocks(planner)
    assert [len(b) for b in blocks] == [13] * 7 + [9]  # 4 blocks per decoder at least
    assert [u for b in blocks for u in b] == [f"/v/{k:06d}.mp4" for k in range(100)]


def test_a_large_run_goes_out_in_blocks_of_128_as_it_is_planned(tmp_path: Path) -> None:
    planner = _planner(tmp_path, decode_workers=2)  # 8 blocks of 128 = 1,024 videos before any go out
    held = []
    for start in range(0, 7000, 700):
        planner.plan(_page(start, 700))
        held.append(planner._pending_rows)
    assert max(held) < 1024 and min(held) < 128  # whole blocks left as soon as there were 1,024
    assert len(planner._refs) >= 40
    blocks = _blocks(planner)
    assert all(len(b) == 128 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 128
    assert [u for b in blocks for u in b] == [f"/v/{k:06d}.mp4" for k in range(7000)]
    assert planner.blocks() == []  # handed out once

"""A running job's progress line (jobs.pipeline.Progress) and durations in words (jobs.runs.in_words)."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from jobs.pipeline import Progress
from jobs.runs import in_words


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (0, "0 s"),
        (59.9, "59 s"),
        (60, "1 min"),
        (3599, "59 min"),
        (3600 + 5 * 60 + 30, "1 h 5 min"),
        (47 * 3600 + 59 * 60, "47 h 59 min"),
        (5 * 86400, "5 days"),
        (-3, "0 s"),  # a clock that stepped back
        (float("inf"), "0 s"),
        (float("nan"), "0 s"),
    ],
)
def test_in_words(seconds: float, words: str) -> None:
    assert in_words(seconds) == words


def test_progress_is_logged_every_interval_with_the_rate_and_the_time_left(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    progress = Progress(1000, every=60, clock=lambda: now[0])
    status: Counter[str] = Counter()
    caplog.set_level(logging.INFO, logger="vitaclip.job")
    now[0] += 59
    status.update(ok=100)
    assert progress.maybe_log(status) is None  # not a minute yet
    now[0] += 1
    status.update(ok=190, corrupt=10)
    line = progress.maybe_log(status)
    assert line == "progress: 300 of 1,000 videos (30.0 %) in 1 min, 5.0 videos/s, about 2 min left; corrupt 10, ok 290"
    assert line in caplog.text
    now[0] += 30
    assert progress.maybe_log(status) is None  # half a minute since the last line
    now[0] += 30
    status.update(ok=700)
    last = "progress: 1,000 of 1,000 videos (100.0 %) in 2 min, 8.3 videos/s; corrupt 10, ok 990"  # none left
    assert progress.maybe_log(status) == last


def test_progress_without_a_planned_count_or_time() -> None:
    assert Progress(0).line(Counter(ok=3), 2.0) == "progress: 3 videos in 2 s, 1.5 videos/s; ok 3"
    assert Progress(10).line(Counter(), 0.0) == "progress: 0 of 10 videos (0.0 %) in 0 s, 0.0 videos/s"
    # More rows than planned (a video another planner also handed out): never past 100 %, no time left.
    assert Progress(2).line(Counter(ok=3), 3.0) == "progress: 3 of 2 videos (100.0 %) in 3 s, 1.0 videos/s; ok 3"


def test_the_line_comes_on_time_while_the_driver_waits_and_counts_embedded_clips(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Writes go in batches (minutes apart on a large run): the line says what was embedded meanwhile, and is
    logged from a thread of its own, not only when the driver's loop gets an output."""
    import time

    caplog.set_level(logging.INFO, logger="vitaclip.job")
    progress = Progress(1200, every=0.2)
    progress.update(clips=7500)
    with progress.running():
        deadline = time.monotonic() + 10
        while "progress:" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)  # the driver, waiting on the Dataset: nothing calls the progress here
    assert "progress: 0 of 1,200 videos (0.0 %) in 0 s, 0.0 videos/s; 7,500 clips embedded" in caplog.text
    progress.update(Counter(ok=2), clips=10)
    assert (
        progress.line(Counter(ok=2), 4.0)
        == "progress: 2 of 1,200 videos (0.2 %) in 4 s, 0.5 videos/s, about 39 min left; 7,510 clips embedded; ok 2"
    )
    caplog.clear()
    time.sleep(0.5)
    assert "progress:" not in caplog.text  # the thread ended with the block


def test_the_line_counts_what_the_embed_actors_finished_before_it_is_written(caplog: pytest.LogCaptureFixture) -> None:
    """Rows reach the driver a call's block at a time: the line counts the videos the actors say they embedded."""
    now = [0.0]
    progress = Progress(1200, every=60, clock=lambda: now[0])
    embedded = [(0, 0)]
    progress.embedded_source = lambda: embedded[0]
    caplog.set_level(logging.INFO, logger="vitaclip.job")
    now[0], embedded[0] = 120.0, (812, 9744)
    line = progress.maybe_log(Counter(ok=500, corrupt=12))
    assert line == (
        "progress: 812 of 1,200 videos (67.7 %) in 2 min, 6.8 videos/s, about 57 s left; 9,744 clips embedded; "
        "512 written; corrupt 12, ok 500"
    )

    def unreachable() -> tuple[int, int]:
        raise TimeoutError("the planner did not answer")

    progress.embedded_source = unreachable  # the last counts stand; a line all the same
    now[0] = 180.0
    assert progress.maybe_log(Counter(ok=900)) == (
        "progress: 900 of 1,200 videos (75.0 %) in 3 min, 5.0 videos/s, about 1 min left; 9,744 clips embedded; ok 900"
    )

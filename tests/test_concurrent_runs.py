"""Several indexing runs on one S3 output at once, and a run that loses a worker node; input and output on S3.

The runs are separate driver processes (as a scheduler starts them) on one `ray start --head` cluster or on a
multi-node `ray.cluster_utils.Cluster`. Afterwards: one row per video, the tables readable, a further run plans
nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ray_head import ROOT, ray_head
from test_index_job import make_videos
from test_index_job_s3 import upload_folder

from index import tables
from index.delta_tables import OutputLocation

HOOKED = str(ROOT / "tests" / "run_job_with_hooks.py")


def _upload(client: Any, bucket: str, folder: Path, prefix: str) -> list[str]:
    return [uri for uri in upload_folder(client, bucket, folder, prefix) if uri.endswith(".mp4")]


def _argv(bucket: str, endpoint: str, address: str, checkpoint: Path, *extra: str) -> list[str]:
    return [
        f"s3://{bucket}/raw/",
        "--output",
        f"s3://{bucket}/out",
        "--s3-endpoint-url",
        endpoint,
        "--ray-address",
        address,
        "--checkpoint",
        str(checkpoint),
        "--segment-seconds",
        "1",
        *extra,
    ]


def _start(action: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, HOOKED, action, "--", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(job: subprocess.Popen[str]) -> str:
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-4000:]
    return out.strip().splitlines()[-1]  # the run id


def _check_once(location: OutputLocation, uris: list[str]) -> None:
    videos = tables.read_table(location, "videos", ["video_id", "uri", "status"])
    assert videos is not None
    assert sorted(videos.column("uri").to_pylist()) == sorted(uris)  # one row per video
    segments = tables.read_table(location, "segments", ["video_id", "segment_index"])
    assert segments is not None
    keys = list(zip(segments.column("video_id").to_pylist(), segments.column("segment_index").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) and {v for v, _ in keys} <= set(videos.column("video_id").to_pylist())


def _summary(client: Any, bucket: str, run_id: str) -> dict[str, Any]:
    return dict(json.loads(client.get_object(Bucket=bucket, Key=f"out/runs/{run_id}.json")["Body"].read()))


def _wait_until_both_hold(jobs: list[subprocess.Popen[str]], folder: Path, pattern: str) -> None:
    """Waits until both runs wait at their commit; otherwise stops them and fails with the end of their logs."""
    deadline = time.monotonic() + 240
    while len(list(folder.glob(pattern))) < len(jobs):
        if all(job.poll() is None for job in jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
            continue
        held = len(list(folder.glob(pattern)))
        for job in jobs:
            job.kill()
        logs = "\n\n".join(f"run {i}:\n{job.communicate(timeout=60)[1][-3000:]}" for i, job in enumerate(jobs))
        pytest.fail(f"{held} of {len(jobs)} runs reached their commits:\n{logs}")


def test_two_runs_committing_at_the_same_moment_and_started_together(
    s3_server: str,
    s3_bucket: tuple[Any, str],
    tmp_path: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from jobs.index_videos import print_summary
    from jobs.runs import format_runs

    client, bucket = s3_bucket
    location = OutputLocation.from_url(f"s3://{bucket}/out", s3_endpoint_url=s3_server)
    uris: list[str] = []
    with ray_head(dashboard=False) as head:
        one_decoder = ("--decode-workers", "1")  # 2 new videos per run: a second decoder would only be a process more
        argv = _argv(bucket, s3_server, head.address, tiny_checkpoint, "--no-index", *one_decoder)
        for round_ in range(3):
            # New videos each round, so both runs have work to commit; both are held just before their commit and
            # released together.
            folder = tmp_path / f"in{round_}"
            make_videos(folder, 2, start=2 * round_, broken=False)
            uris += _upload(client, bucket, folder, f"raw/r{round_}")
            gate = tmp_path / f"gate{round_}"
            jobs = [_start(f"hold-before-commit:{gate}", argv, head.env) for _ in range(2)]
            _wait_until_both_hold(jobs, tmp_path, f"gate{round_}.ready.*")
            Path(f"{gate}.go").touch()
            run_ids = [_finish(job) for job in jobs]
            _check_once(location, uris)
            summaries = [_summary(client, bucket, run_id) for run_id in run_ids]
            # Both planned the new videos; between them they committed each once, the loser dropped what the winner
            # had committed.
            assert all(s["counts"]["planned"] == 2 for s in summaries)
            assert sum(s["commit"]["videos_committed"] for s in summaries) == 2
            assert sum(s["commit"]["dropped_done_by_another_run"] for s in summaries) == 2
            # The loser's call committed nothing: its record says so.
            assert sorted((s["commit"]["commits"], s["commit"]["commit_calls"]) for s in summaries) == [(0, 1), (1, 1)]
            # What the loser prints and what `vitaclip runs` shows of it say that another run committed its videos.
            loser = min(summaries, key=lambda s: s["commit"]["videos_committed"])
            print_summary(loser)
            printed = capsys.readouterr().out
            assert "; 0 video rows committed, 2 left out: another run committed them first;" in printed, printed
            shown = format_runs(summaries, [], url=location.url).splitlines()
            assert sum("2 left out, another run committed them first" in line for line in shown) == 1, shown

        # Two runs started together end to end, over new videos, with the index.
        folder = tmp_path / "in-last"
        make_videos(folder, 2, start=10, broken=False)
        uris += _upload(client, bucket, folder, "raw/last")
        with_index = _argv(bucket, s3_server, head.address, tiny_checkpoint, *one_decoder)
        both = [_start("none", with_index, head.env) for _ in range(2)]
        for job in both:
            _finish(job)
        _check_once(location, uris)
        third = _summary(client, bucket, _finish(_start("none", argv, head.env)))
        assert third["counts"]["planned"] == 0 and third["counts"]["already_indexed"] == len(uris)


@pytest.mark.serial
def test_a_worker_node_removed_mid_run(
    s3_server: str, s3_bucket: tuple[Any, str], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from ray.cluster_utils import Cluster

    client, bucket = s3_bucket
    make_videos(tmp_path / "in", 8, broken=False)
    uris = _upload(client, bucket, tmp_path / "in", "raw")
    location = OutputLocation.from_url(f"s3://{bucket}/out", s3_endpoint_url=s3_server)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        cluster.wait_for_nodes()
        argv = _argv(
            bucket, s3_server, cluster.address, tiny_checkpoint, "--decode-batch-size", "1", "--commit-seconds", "2"
        )
        env = dict(__import__("os").environ, PYTHONPATH=str(ROOT))
        job = _start("none", argv, env)
        # Wait until the run has committed some work, then take a worker node (and its actors and blocks) away.
        deadline = time.monotonic() + 240
        while not client.list_objects_v2(Bucket=bucket, Prefix="out/videos/_delta_log/00000000000000000001").get(
            "KeyCount"
        ):
            assert job.poll() is None or job.returncode == 0, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run committed nothing"
            if job.poll() is not None:
                break
            time.sleep(0.1)
        cluster.remove_node(workers[0])
        job.communicate(timeout=300)
        # That run completes, or fails and the next one finishes the work.
        rerun = _start("none", argv, env)
        _finish(rerun)
        _check_once(location, uris)
    finally:
        cluster.shutdown()

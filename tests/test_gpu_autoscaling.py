"""``--embed-device auto`` on a cluster that can add GPU nodes but runs none yet: the run waits (bounded) for the
first GPU node and embeds there, or fails with what to do; it never quietly embeds on CPUs.

The cluster is a `ray start --head` of this machine; a configuration with a GPU node group is reported to its GCS
as Ray's autoscaler (v2, KubeRay) reports one, and the test stands in for the autoscaler by starting the GPU node
(logical GPUs: the embed actor lands on that node and computes on its CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pytest
from ray_head import ROOT, RayHead, ray_head
from test_index_job import job_args, make_videos

from index import tables
from jobs.ray_resources import Cluster, resolve_embed_device


def _report_gpu_group(head: RayHead, max_nodes: int) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "report_gpu_group.py"), head.address, str(max_nodes)],
        env=head.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _job(argv: list[str], head: RayHead) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "jobs.index_videos", *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.serial
def test_auto_waits_for_the_first_gpu_node_or_fails_saying_so(tmp_path: Path, tiny_checkpoint: Path) -> None:
    make_videos(tmp_path / "in", 2, broken=False)
    out = tmp_path / "out"
    with ray_head(2) as head:
        _report_gpu_group(head, max_nodes=1)
        argv = job_args(
            [str(tmp_path / "in")], out, "--ray-address", head.address, "--no-index", checkpoint=tiny_checkpoint
        )
        # No GPU node comes: the run fails after the wait, before any work, and says what to do.
        refused = _job([*argv, "--gpu-wait-seconds", "3"], head)
        _, err = refused.communicate(timeout=300)
        assert refused.returncode != 0
        assert "none joined within 3 s" in err and "--embed-device cpu" in err, err[-3000:]
        (failed,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
        assert failed["state"] == "failed" and "none joined within 3 s" in failed["error"]
        assert (tables.read_table(out, "videos", ["video_id"]) or pa.table({"video_id": []})).num_rows == 0
        # --embed-device gpu on the cluster without GPUs: the same bounded wait, not an embed actor waiting for ever.
        asked = _job([*argv, "--embed-device", "gpu", "--gpu-wait-seconds", "3"], head)
        _, err = asked.communicate(timeout=300)
        assert asked.returncode != 0
        assert "--embed-device gpu: the cluster has no GPU and none joined within 3 s" in err, err[-3000:]
        # The GPU node joins while the run waits: the run embeds on it.
        job = _job([*argv, "--gpu-wait-seconds", "240"], head)
        assert job.stderr is not None
        seen: list[str] = []

        def read_stderr() -> None:
            assert job.stderr is not None
            for line in job.stderr:
                seen.append(line)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        while not any("waiting up to 240 s" in line for line in seen):
            assert job.poll() is None, "".join(seen)[-3000:]
            reader.join(0.2)
        head.add_node(num_cpus=1, num_gpus=1)  # what the autoscaler would do
        assert job.wait(timeout=300) == 0, "".join(seen)[-3000:]
        reader.join(10)
    (record_path,) = [p for p in (out / "runs").glob("*.json") if json.loads(p.read_text())["state"] == "committed"]
    record = json.loads(record_path.read_text())
    throughput = record["throughput"]
    assert throughput["embed_device"] == "gpu" and "a GPU node joined after" in throughput["embed_device_reason"]
    assert throughput["waited_for_gpu_seconds"] > 0
    assert record["status"] == {"ok": 2}


def test_a_run_with_nothing_to_embed_neither_asks_for_a_gpu_nor_waits(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """The device is settled after planning: a run whose listed objects need no decoding (nothing new, only
    deletions or listing statuses to record; here a dangling symbolic link) never asks the autoscaler for a GPU
    node, so a nightly run with nothing new costs no GPU node start and cannot fail for the lack of one."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "gone.mp4").symlink_to(tmp_path / "missing.mp4")
    out = tmp_path / "out"
    with ray_head(2, dashboard=False) as head:
        _report_gpu_group(head, max_nodes=1)
        argv = job_args(
            [str(tmp_path / "in")], out, "--ray-address", head.address, "--no-index", checkpoint=tiny_checkpoint
        )
        run = _job([*argv, "--gpu-wait-seconds", "3"], head)
        _, err = run.communicate(timeout=300)
    assert run.returncode == 0 and "waiting up to" not in err, err[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert record["status"] == {"broken_link": 1}
    assert (record["throughput"]["embed_device"], record["throughput"]["embed_device_reason"]) == (
        None, "nothing to embed"
    )  # fmt: skip


def test_auto_without_gpus_to_add_embeds_on_cpus_at_once() -> None:
    no_gpus = Cluster(cpus=2, gpus=0, free_cpus=2, node_cpus=2, node_gpus=0)
    # Not connected to a cluster that reports GPU node groups: nothing to wait for.
    device = resolve_embed_device("auto", no_gpus, embedded=False, gpus_per_embed_worker=1.0, wait_seconds=600)
    assert device.device == "cpu" and "declares no GPU nodes" in device.reason and device.waited_seconds == 0
    assert resolve_embed_device("auto", no_gpus, embedded=True, gpus_per_embed_worker=1.0, wait_seconds=600).device == (
        "cpu"
    )
    with_gpu = Cluster(cpus=2, gpus=1, free_cpus=2, node_cpus=2, node_gpus=1)
    assert resolve_embed_device("auto", with_gpu, embedded=False, gpus_per_embed_worker=1.0, wait_seconds=0).device == (
        "gpu"
    )
    assert resolve_embed_device("auto", with_gpu, embedded=False, gpus_per_embed_worker=0, wait_seconds=0).device == (
        "cpu"
    )
    for explicit in ("gpu", "cpu"):
        assert resolve_embed_device(
            explicit, no_gpus, embedded=True, gpus_per_embed_worker=1, wait_seconds=0
        ).device == (explicit)

"""`ray job submit` of the indexing job to a `ray start --head` cluster started by the test."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from ray_head import ROOT, ray_head
from test_index_job import job_command, make_videos

from index import tables


def test_ray_job_submit_to_a_head_node(tmp_path: Path, tiny_checkpoint: Path) -> None:
    videos = make_videos(tmp_path / "in", 2, broken=False)
    with ray_head() as head:
        out = tmp_path / "out"
        cmd = [
            head.ray_bin,
            "job",
            "submit",
            f"--address={head.dashboard}",
            f"--working-dir={ROOT}",
            "--",
            *job_command([str(tmp_path / "in")], out, checkpoint=tiny_checkpoint),
        ]
        # The head's job agent comes up some seconds after `ray start` returns (a minute or more on a loaded
        # 2-core machine): retry "no agent yet" for up to 3 minutes, any other failure fails at once.
        deadline = time.monotonic() + 180
        while True:
            submit = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=420, cwd=ROOT)
            if "No available agent" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, (submit.stdout[-3000:], submit.stderr[-3000:])
        assert "succeeded" in (submit.stdout + submit.stderr).lower()
        table = tables.read_table(out, "videos")
        assert table is not None and sorted(table.column("uri").to_pylist()) == sorted(map(str, videos))

"""`ray job submit` of the indexing job to a `ray start --head` cluster started by the test."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from test_index_job import job_command, make_videos

from jobs import tables
from jobs.storage import open_store

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_to_a_head_node(tmp_path: Path) -> None:
    videos = make_videos(tmp_path / "in", 2, broken=False)
    ray_bin = str(Path(sys.executable).parent / "ray")
    # Every port the head opens is a free one: defaults (the agent's 52365) may be held by another Ray on the host.
    port, dash, agent, agent_grpc, env_agent, metrics, client = (_free_port() for _ in range(7))
    temp_dir = Path("/tmp") / f"vc-ray-{os.getpid()}"
    # Ray 2.5x clusters require a token; the test's own token, shared by the head and the submitting client.
    env = dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(ROOT),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
    )
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        out = tmp_path / "out"
        cmd = [
            ray_bin,
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dash}",
            f"--working-dir={ROOT}",
            "--",
            *job_command([str(tmp_path / "in")], out),
        ]
        # The head's job agent comes up some seconds after `ray start` returns (a minute or more on a loaded
        # 2-core machine): retry "no agent yet" for up to 3 minutes, any other failure fails at once.
        deadline = time.monotonic() + 180
        while True:
            submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=ROOT)
            if "No available agent" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, (submit.stdout[-3000:], submit.stderr[-3000:])
        assert "succeeded" in (submit.stdout + submit.stderr).lower()
        table = tables.read_table(open_store(str(out)), "videos")
        assert table is not None and sorted(table.column("uri").to_pylist()) == sorted(map(str, videos))
    finally:
        # Stop this head only (not other Ray instances on the host): its processes hold its temp dir's session.
        subprocess.run(["pkill", "-9", "-f", str(temp_dir)], capture_output=True, timeout=60)
        time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)

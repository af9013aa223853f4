"""A `ray start --head` cluster of this machine for one test: free ports, its own temp dir and token."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RayHead:
    address: str  # for `ray.init(address=...)` and the job's --ray-address
    dashboard: str  # for `ray job submit --address`
    env: dict[str, str]  # the environment its clients need (token, PYTHONPATH)
    ray_bin: str
    temp_dir: Path

    def add_node(self, *, num_cpus: int = 1, num_gpus: int = 0) -> None:
        """Starts a worker node on this machine (GPUs are logical only); stopped with the head."""
        ports = [free_port() for _ in range(6)]
        done = subprocess.run(
            [
                self.ray_bin,
                "start",
                f"--address={self.address}",
                f"--num-cpus={num_cpus}",
                f"--num-gpus={num_gpus}",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.temp_dir}",
                f"--dashboard-agent-listen-port={ports[0]}",
                f"--dashboard-agent-grpc-port={ports[1]}",
                f"--runtime-env-agent-port={ports[2]}",
                f"--metrics-export-port={ports[3]}",
                f"--node-manager-port={ports[4]}",
                f"--object-manager-port={ports[5]}",
                "--disable-usage-stats",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-3000:]


@contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[RayHead]:
    """Starts a head node with `num_cpus` CPUs; stops exactly its processes afterwards."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    # Every port the head opens is a free one: defaults (the agent's 52365) may be held by another Ray on the host.
    port, dash, agent, agent_grpc, env_agent, metrics, client = (free_port() for _ in range(7))
    temp_dir = Path("/tmp") / f"vc-ray-{os.getpid()}-{port}"
    # Ray 2.5x clusters require a token; the test's own token, shared by the head and its clients.
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
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
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
        yield RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env, ray_bin, temp_dir)
    finally:
        # Stop this head only (not other Ray instances on the host): its processes hold its temp dir's session.
        subprocess.run(["pkill", "-9", "-f", str(temp_dir)], capture_output=True, timeout=60)
        time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)

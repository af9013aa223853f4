"""A `ray start --head` cluster of this machine for one test: free ports, its own temp dir and token."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
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
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different free ports: each socket stays bound until all are picked (ports picked one after another
    can repeat, and Ray refuses a head whose components share one)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def _processes_holding(marker: bytes) -> list[int]:
    """Processes other than this one whose environment contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
    return pids


def _processes_with_files_under(folder: Path) -> list[int]:
    """Processes other than this one with a file open under ``folder`` (a Ray process's logs in its temp dir)."""
    prefix, pids = f"{folder}/", []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd).startswith(prefix) for fd in (entry / "fd").iterdir()):
                    pids.append(int(entry.name))
    return pids


@dataclass(frozen=True)
class RayHead:
    address: str  # for `ray.init(address=...)` and the job's --ray-address
    dashboard: str  # for `ray job submit --address`
    env: dict[str, str]  # the environment its clients need (token, PYTHONPATH)
    ray_bin: str
    temp_dir: Path

    def pids_titled(self, title: str) -> list[int]:
        """This cluster's processes whose title (a Ray actor's ``ray::Class...``) contains ``title``; other clusters
        on the host (tests running in parallel) are never matched."""
        found = []
        for pid in _processes_holding(f"RAY_AUTH_TOKEN={self.env['RAY_AUTH_TOKEN']}".encode()):
            with contextlib.suppress(OSError):
                if title.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    def add_node(self, *, num_cpus: int = 1, num_gpus: int = 0) -> None:
        """Starts a worker node on this machine (GPUs are logical only); stopped with the head."""
        ports = free_ports(6)
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


_START_ATTEMPTS = 2
"""`ray start --head` tries: Ray gives a node a fixed 30 s to register with its GCS, which a CI machine busy with
the other test worker's Ray cluster has missed ("The current node timed out during startup"); a second start on
fresh ports follows, as the job's own embedded Ray does (`jobs.ray_resources.start_embedded_ray`)."""


@contextmanager
def ray_head(num_cpus: int = 2, *, dashboard: bool = True) -> Iterator[RayHead]:
    """Starts a head node with `num_cpus` CPUs; stops exactly its processes afterwards. Without ``dashboard`` (only
    `ray job submit` needs it) the head starts sooner and its processes use less CPU while the test runs."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        head, error = _start_head(num_cpus, dashboard=dashboard)
        if head is not None:
            break
        assert attempt < _START_ATTEMPTS and "timed out during startup" in error, error
    assert head is not None
    try:
        yield head
    finally:
        _stop_head(head.temp_dir, head.env["RAY_AUTH_TOKEN"])


def _start_head(num_cpus: int, *, dashboard: bool) -> tuple[RayHead | None, str]:
    """The started head, or None and `ray start`'s error (after stopping what that start left running)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    # Every port the head opens is a free one: defaults (the agent's 52365) may be held by another Ray on the host.
    port, dash, agent, agent_grpc, env_agent, metrics, client = free_ports(7)
    temp_dir = Path("/tmp") / f"vc-ray-{os.getpid()}-{port}"
    # Ray 2.5x clusters require a token; the test's own token, shared by the head and its clients.
    token = secrets.token_hex(32)
    env = dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(ROOT),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        # Idle workers stay until their job ends. By default a node keeps at most as many worker processes as it has
        # CPUs and kills the idle rest after 1 s; a run's actors alone are more than 2, so each new task of the run
        # (its write tasks after the Dataset's metadata tasks) waited for a fresh worker: ~1 s per run.
        RAY_num_workers_soft_limit="16",
    )
    env.pop("RAY_ADDRESS", None)
    no_dashboard = ["--include-dashboard=false"]
    dashboard_flags = ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"] if dashboard else no_dashboard
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--node-ip-address=127.0.0.1",
            *dashboard_flags,
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
    if start.returncode != 0:
        _stop_head(temp_dir, token)
        return None, start.stderr[-3000:]
    return RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env, ray_bin, temp_dir), ""


def _stop_head(temp_dir: Path, token: str) -> None:
    # Stop this head only (not other Ray instances on the host): its processes hold its temp dir's session, and
    # those whose command line does not name it (the client server, the dashboard and runtime env agents) hold
    # its token; left running they use CPU during the tests that follow.
    subprocess.run(["pkill", "-9", "-f", str(temp_dir)], capture_output=True, timeout=60)
    # A node's dashboard agent can have neither (its title replaces its command line, and its environment has no
    # token): left running once its raylet is gone, it spun on a core for the rest of a CI run. Its logs are open.
    held = {*_processes_holding(f"RAY_AUTH_TOKEN={token}".encode()), *_processes_with_files_under(temp_dir)}
    for pid in held:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    shutil.rmtree(temp_dir, ignore_errors=True)

"""The job's own Ray settings, checked against a real embedded Ray."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.serial
@pytest.mark.parametrize("keep", [True, False])
def test_embedded_ray_keeps_idle_workers_beside_full_actor_pools(keep: bool) -> None:
    """Actors that fill every CPU make Ray end idle task workers beyond one per CPU after a second; the job's
    embedded Ray keeps them (`worker_soft_limit`), so a run's write tasks reuse workers instead of starting and
    importing new processes. The second case checks that the first would fail without the setting."""
    import ray

    from jobs.ray_resources import embedded_ray_options

    options = embedded_ray_options(1)
    if not keep:
        options = {k: v for k, v in options.items() if k != "_system_config"}
    ray.init(**options, log_to_driver=False)
    try:

        @ray.remote(num_cpus=0.5)
        class PoolActor:
            def pid(self) -> int:
                return os.getpid()

        @ray.remote(num_cpus=0)
        class Barrier:
            def __init__(self) -> None:
                self.arrived = 0

            def arrive(self) -> None:
                self.arrived += 1

            def count(self) -> int:
                return self.arrived

        @ray.remote(num_cpus=0)
        def write_task(barrier: object, parties: int) -> int:
            ray.get(barrier.arrive.remote())  # type: ignore[attr-defined]
            deadline = time.monotonic() + 60
            while ray.get(barrier.count.remote()) < parties and time.monotonic() < deadline:  # type: ignore[attr-defined]
                time.sleep(0.05)  # all three at once: three workers
            return os.getpid()

        actors = [PoolActor.remote() for _ in range(2)]
        ray.get([a.pid.remote() for a in actors])

        def round_of_three() -> set[int]:
            barrier = Barrier.remote()
            return set(ray.get([write_task.remote(barrier, 3) for _ in range(3)]))

        first = round_of_three()
        time.sleep(4)  # Ray's idle-worker check ends workers idle for over a second beyond its limit
        again = round_of_three()
    finally:
        ray.shutdown()
    assert len(first) == 3
    kept = again == first  # the second round ran on the first round's three workers
    assert kept == keep, (first, again)


@pytest.mark.parametrize("ours", [True, False])
def test_embedded_ray_workers_run_at_the_drivers_priority(ours: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded Ray's tasks and actors run at the driver's niceness; Ray's own default (the second case, which
    shows that the first would fail without the setting) is 15, under which any busy process beside the job starves
    its decoders."""
    import ray

    from jobs.ray_resources import embedded_ray_options

    monkeypatch.delenv("RAY_worker_niceness", raising=False)  # the test session's own setting (conftest.py)
    options = embedded_ray_options(1)
    if not ours:
        options["_system_config"] = {k: v for k, v in options["_system_config"].items() if k != "worker_niceness"}
    ray.init(**options, log_to_driver=False)
    try:

        @ray.remote(num_cpus=0.5)
        def niceness() -> int:
            return os.nice(0)

        @ray.remote(num_cpus=0.5)
        class Actor:
            def niceness(self) -> int:
                return os.nice(0)

        seen = {ray.get(niceness.remote()), ray.get(Actor.remote().niceness.remote())}  # type: ignore[attr-defined]
    finally:
        ray.shutdown()
    assert seen == ({os.nice(0)} if ours else {15})


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"  # a zombie has ended


def test_an_embedded_ray_that_misses_rays_startup_wait_starts_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ray gives a new node 30 s to register with its GCS, then raises. The embedded start tries once more, after
    stopping what the failed attempt started. Here the first attempt's GCS never finds its node, and node.py's
    clock jumps past the 30 s at the first lookup."""
    import ray
    import ray._private.node as node_module
    import ray._private.services as services

    from jobs.ray_resources import _descendant_pids, start_embedded_ray

    real_time, real_get_node = node_module.time, services.get_node
    skipped = [0.0]
    first: dict[str, Any] = {}

    class Clock:
        def __getattr__(self, name: str) -> Any:
            return getattr(real_time, name)

        def monotonic(self) -> float:
            return real_time.monotonic() + skipped[0]

    def get_node(gcs_address: str, node_id: str) -> Any:
        first.setdefault("gcs", gcs_address)
        if gcs_address != first["gcs"]:
            return real_get_node(gcs_address, node_id)
        first.setdefault("processes", _descendant_pids() - others)
        skipped[0] += 31
        raise RuntimeError("node not found (as when the raylet is slow to register)")

    others = _descendant_pids()  # started by earlier tests of this process (servers of session fixtures)
    monkeypatch.setattr(node_module, "time", Clock())
    monkeypatch.setattr(services, "get_node", get_node)
    try:
        start_embedded_ray(1, log_to_driver=False)
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 1
    finally:
        ray.shutdown()
    assert "the embedded Ray did not start in time" in caplog.text
    assert len(first["processes"]) >= 3  # its GCS, raylet and the raylet's agent at least
    assert not [pid for pid in first["processes"] if _alive(pid)]


def test_the_embedded_ray_is_new_where_another_cluster_is_announced() -> None:
    """`ray start` and `ray.cluster_utils` announce their cluster in <temp>/ray/ray_current_cluster, which a bare
    `ray.init()` joins (and refuses the job's settings there). The job's embedded Ray (no --ray-address, no
    RAY_ADDRESS) is its own all the same."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from ray_head import ROOT, free_port

    temp = Path(tempfile.mkdtemp(prefix="vc-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nothing answers there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        code = "from jobs.ray_resources import init_ray; print(init_ray(num_cpus=1).cpus)"
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env={**env, "RAY_TMPDIR": str(temp)}, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split()[-1] == "1.0"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_sigterm_after_ray_init_reaches_python_without_an_abort() -> None:
    """Ray's core worker puts Abseil's failure handler on SIGTERM in the driver: it passes the signal on to Python
    but arms a 3 s alarm that aborts the process, so a driver that takes longer to end its run dies with -6, not
    the 143 a supervisor reads. After `init_ray` SIGTERM goes to Python alone: the process outlives the alarm."""
    import subprocess
    import sys

    from ray_head import ROOT

    code = """
import os, signal, time
from jobs.ray_resources import init_ray
init_ray(num_cpus=1)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)
except SystemExit as exc:  # Ray's Python handler
    print("exit", exc.code, flush=True)
time.sleep(5)  # past Abseil's 3 s alarm, which aborts a process it armed
print("alive", flush=True)
os._exit(143)
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 143, done.stdout + done.stderr[-3000:]
    assert done.stdout.split() == ["exit", "15", "alive"]
    assert "SIGTERM received" not in done.stderr  # Abseil's stack dump: its handler never ran


def test_sigterm_during_a_blocking_ray_get_is_still_a_sigterm() -> None:
    """Ray turns the ``SystemExit(15)`` its handler raises inside a blocking ``ray.get`` into ``SystemExit(1)``: a
    driver stopped while it waited on the planner exited with 1 and recorded a failed run. `stopped_by_sigterm`
    tells it apart from any other exit of 1 once SIGTERM came."""
    import subprocess
    import sys

    from ray_head import ROOT

    code = """
import os, signal, threading, time
import ray
from jobs.ray_resources import init_ray, stopped_by_sigterm
print("before", stopped_by_sigterm(SystemExit(1)), stopped_by_sigterm(SystemExit(15)), flush=True)
init_ray(num_cpus=1)
slow = ray.remote(lambda: time.sleep(60))
threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
try:
    ray.get(slow.remote())
except BaseException as exc:
    print("after", type(exc).__name__, stopped_by_sigterm(exc), flush=True)
os._exit(0)
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.split() == ["before", "False", "True", "after", "SystemExit", "True"], done.stdout


def test_the_video_tower_is_compiled_for_large_gpu_runs_only() -> None:
    """`--embed-compile auto` compiles on GPU actors when every actor's share of the planned videos pays back the
    compile; `on` and `off` are kept as given."""
    from jobs.config import IndexJobConfig
    from jobs.pipeline import _COMPILE_MIN_VIDEOS_PER_ACTOR, compile_video_tower
    from jobs.ray_resources import IndexPools

    gpu = IndexPools(decode_workers=16, cpus_per_decoder=1, embed_workers=4, cpus_per_embedder=0, gpus_per_embedder=1)
    cpu = IndexPools(decode_workers=1, cpus_per_decoder=1, embed_workers=1, cpus_per_embedder=1, gpus_per_embedder=0)
    auto = IndexJobConfig(inputs=["in"], output="out", model="vitaclip-demo")
    enough = 4 * _COMPILE_MIN_VIDEOS_PER_ACTOR
    assert compile_video_tower(auto, gpu, enough)
    assert not compile_video_tower(auto, gpu, enough - 1)  # one actor's share short of paying back
    assert not compile_video_tower(auto, cpu, 10 * enough)  # CPU actors: eager unless asked
    assert compile_video_tower(
        IndexJobConfig(inputs=["in"], output="out", model="vitaclip-demo", embed_compile="on"), cpu, 1
    )
    assert not compile_video_tower(
        IndexJobConfig(inputs=["in"], output="out", model="vitaclip-demo", embed_compile="off"), gpu, 10 * enough
    )
    with pytest.raises(ValueError, match="embed_compile must be auto, on or off"):
        IndexJobConfig(inputs=["in"], output="out", model="vitaclip-demo", embed_compile="sometimes")


def test_a_ray_address_is_checked_for_an_answer_before_ray_retries_it() -> None:
    """`check_ray_answers`: an address where something listens passes at once; one where nothing does is
    refused after the wait (tried again within it: a head that comes up in time is found); forms Ray resolves
    itself are left to it."""
    import socket
    import threading

    from jobs.ray_resources import RayUnreachableError, check_ray_answers

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", f" RAY://127.0.0.1:{port}/"):
            check_ray_answers(address, wait_seconds=0)
    for address in ("auto", "local", "head-without-port", "127.0.0.1:notaport", "http://127.0.0.1:1/x"):
        check_ray_answers(address, wait_seconds=0)  # nothing tried

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RayUnreachableError, match=rf"127\.0\.0\.1:{port}: nothing answered there for 0 s"):
        check_ray_answers(f"127.0.0.1:{port}", wait_seconds=0)

    late = socket.socket()
    late.bind(("127.0.0.1", port))
    threading.Timer(1.5, late.listen).start()  # the head comes up while the run waits
    try:
        check_ray_answers(f"127.0.0.1:{port}", wait_seconds=10)
    finally:
        late.close()


def test_a_command_line_that_is_not_utf8_is_refused_before_ray_starts(tmp_path: Path) -> None:
    """Ray sends the process's command line to its GCS as UTF-8: a folder named with other bytes made `ray.init`
    fail with a codec error that named nothing (after the run record was written)."""
    import subprocess
    import sys

    (tmp_path / "odd\udcffin").mkdir()
    code = (
        "import sys\nfrom jobs.index_videos import main\n"
        "sys.exit(main([sys.argv[1], '--output', sys.argv[2], '--model', 'vitaclip-tiny', '--random-weights']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, os.fsencode(str(tmp_path / "odd\udcffin")), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "not UTF-8 (" in done.stderr and "odd\\xffin" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "runs").exists()  # refused before any work: no failed run recorded

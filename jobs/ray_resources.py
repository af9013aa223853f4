"""Sizing Ray work to the cluster it runs on: the one place that decides the pools of the indexing job
(`plan_index_pools`), training (`plan_resources`) and evaluation (`plan_decode_pool`).

Starts (or attaches to) Ray, reads its CPUs and GPUs, sizes decoders and embed actors from them, and refuses at once a
request the cluster cannot hold: Ray and Ray Data would otherwise wait forever for resources that never come (a run
that sits at step 0 with ``backpressured:tasks(ResourceBudget)`` in the log).

Requests may be fractions of a CPU (``num_cpus=0.5``): Ray schedules by these logical numbers and the operating
system shares the cores by demand, so every default fits a 1- or 2-core machine and grows with the cluster.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitaclip.redact import redact_url

if TYPE_CHECKING:
    from jobs.evaluate import EvalSourceConfig
    from jobs.train import RayTrainConfig
    from vitaclip.training import TrainConfig

logger = logging.getLogger(__name__)

MIN_DECODE_CPUS = 0.1  # the smallest CPU share a decoder (task or actor) is given when CPUs are scarce


@dataclass(frozen=True)
class Cluster:
    """Logical resources of a Ray cluster.

    Attributes:
        cpus: CPUs of all alive nodes.
        gpus: GPUs of all alive nodes.
        free_cpus: CPUs not held by other work when it was read.
        node_cpus: CPUs of the largest node (one actor or bundle cannot span nodes).
        node_gpus: GPUs of the node with the most.
    """

    cpus: float
    gpus: float
    free_cpus: float
    node_cpus: float
    node_gpus: float

    @property
    def usable_cpus(self) -> float:
        """CPUs to size work by: the free ones (others may hold some), or all of them when none is free now."""
        free = min(self.free_cpus, self.cpus)
        return free if free > 0 else self.cpus

    def describe(self) -> str:
        return f"{count(self.cpus, 'CPU')} and {count(self.gpus, 'GPU')}"


EMBEDDED_IDLE_WORKERS = 8
"""Workers a Ray node keeps beyond one per CPU before it ends idle ones, so write tasks find them ready (the embedded
Ray, the local stack and the cluster manifests under ``infra/`` all use `worker_soft_limit`)."""


EMBEDDED_WORKER_NICENESS = 0
"""Niceness of the embedded Ray's workers, which decode and embed. Ray starts workers at 15 so that on a node of
its own they yield to its raylet and GCS. Linux weighs niceness between the processes of one scheduling group (a
session under autogroup, a cgroup): there any process at the usual 0 that keeps a core busy (a build started from
the same shell, the other worker of a CI test run) takes about 28 times their share of it (CFS weights 1024
against 36). Measured on 2 cores beside two busy processes of its session: an 8-video run took 32 s with workers
at 0 and had not finished after 280 s at 15 (20 s alone; `benchmarks/shared_machine.py`). Clusters started with
``ray start`` keep Ray's default (dedicated nodes); ``infra/local/stack.py``, one machine shared with its user,
sets 0 too."""


def worker_soft_limit(cpus: int) -> int:
    """Ray's ``num_workers_soft_limit`` for a node of `cpus` CPUs: one worker per CPU, which the decode and embed
    actors fill, plus `EMBEDDED_IDLE_WORKERS` for write tasks and the planner."""
    return max(1, cpus) + EMBEDDED_IDLE_WORKERS


class RayUnreachableError(ConnectionError):
    """The Ray cluster a run was given (``--ray-address``, ``RAY_ADDRESS``) could not be reached."""


RAY_ANSWER_WAIT_SECONDS = 15.0  # how long a cluster's address may refuse connections before a run gives up


def check_ray_answers(address: str, *, wait_seconds: float = RAY_ANSWER_WAIT_SECONDS) -> None:
    """Raises `RayUnreachableError` when nothing accepts a TCP connection at a ``host:port`` or ``ray://host:port``
    address within `wait_seconds` (tried once a second: a head that is restarting gets that long). Ray itself
    would retry a GCS address with nothing behind it for minutes before failing. Other forms (``auto``, a bare
    host) are left to Ray."""
    target = address.strip()
    target = target[len("ray://") :] if target.lower().startswith("ray://") else target
    host, sep, port = target.rstrip("/").rpartition(":")
    if not sep or not host or "/" in target.rstrip("/") or not port.isdigit() or not 0 < int(port) < 65536:
        return
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(1.0, min(5.0, wait_seconds))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                reason = exc.strerror or type(exc).__name__
                raise RayUnreachableError(
                    f"cannot connect to the Ray cluster at {redact_url(address)}: nothing answered there for "
                    f"{wait_seconds:g} s ({reason})"
                ) from None
        time.sleep(1.0)


def check_command_line() -> None:
    """Refuses, before Ray starts, a process whose command line is not UTF-8 (a folder named with other bytes):
    Ray sends the command line to its GCS as UTF-8 text and its start fails with a codec error naming nothing.

    Raises:
        ValueError: Naming the argument."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            arguments = f.read().split(b"\0")
    except OSError:  # not Linux: what Python decoded
        arguments = [os.fsencode(a) for a in sys.argv]
    for argument in arguments:
        try:
            argument.decode("utf-8")
        except UnicodeDecodeError:
            shown = argument.decode("utf-8", "backslashreplace")
            raise ValueError(
                f"the command line holds an argument that is not UTF-8 ({shown}), which Ray cannot start with: give "
                "a parent folder, or a symbolic link to it with a UTF-8 name (files inside with such names are rows "
                "as usual)"
            ) from None


def connect_ray(address: str, **init_args: Any) -> None:
    """``ray.init`` of the cluster at `address`; one that does not answer is a `RayUnreachableError` (one line,
    not Ray's traceback or its minutes of retries)."""
    import ray

    check_command_line()
    check_ray_answers(address)
    try:
        ray.init(address=address, **init_args)
    except ConnectionError as exc:  # a timeout or no cluster there: one line, not Ray's traceback
        # Its port answered (`check_ray_answers`): a cluster with token authentication (`ray start --head` turns it
        # on) refuses a process that has no token, which Ray reports as a failed connection.
        if not os.environ.get("RAY_AUTH_MODE"):
            hint = (
                "; if the cluster uses token authentication (as `ray start --head` does by default), set "
                "RAY_AUTH_MODE=token (the token is read from ~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH)"
            )
        else:  # Ray reports a token the cluster refuses (its log: InvalidAuthToken) as a failed connection too
            hint = (
                "; its port answers: if Ray logged InvalidAuthToken above, the token is not the cluster's (check "
                "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
            )
        raise RayUnreachableError(f"cannot connect to the Ray cluster at {redact_url(address)}: {exc}{hint}") from None


def init_ray(*, address: str | None = None, num_cpus: int | None = None) -> Cluster:
    """Connects to Ray (``address``, else ``RAY_ADDRESS`` as set by ``ray job submit``) or starts an embedded local
    one with ``num_cpus`` CPUs (None: all cores); an already initialised Ray is used as it is. Returns its size."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            connect_ray(address, log_to_driver=True)
        else:
            start_embedded_ray(num_cpus, log_to_driver=True)
        sigterm_to_python()
    return read_cluster()


EMBEDDED_START_ATTEMPTS = 2


def start_embedded_ray(num_cpus: int | None, **init_args: Any) -> None:
    """``ray.init`` of the embedded Ray (`embedded_ray_options`), tried again once when its node misses Ray's
    startup wait. Ray gives a new node's raylet a fixed 30 s to register with its GCS and then raises "The current
    node timed out during startup"; on a machine briefly starved of CPU or disk (seen in CI beside another test
    run) that happens to a start that would have taken a little longer. The processes the failed attempt started
    (GCS, raylet and their helpers: this process's new descendants) are stopped before the second attempt."""
    import ray

    check_command_line()
    for attempt in range(1, EMBEDDED_START_ATTEMPTS + 1):
        before = _descendant_pids()
        try:
            ray.init(**embedded_ray_options(num_cpus), **init_args)
            return
        except Exception as exc:
            if attempt == EMBEDDED_START_ATTEMPTS or "timed out during startup" not in str(exc):
                raise
            stopped = _stop_new_descendants(before)
            logger.warning(
                "the embedded Ray did not start in time (%s); stopped %d processes, trying again", exc, stopped
            )


def _stop_new_descendants(before: set[int]) -> int:
    """Kills this process's descendants that are not in `before`; returns how many. They are frozen first (SIGSTOP)
    until no new one appears, so none forks a child that the kill of its parent would orphan and leave running."""
    frozen: set[int] = set()
    while new := _descendant_pids() - before - frozen:
        for pid in new:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= new
    for pid in frozen:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(frozen)


def _descendant_pids() -> set[int]:
    """This process's children, their children and so on (Linux; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after its last ')'
        children.setdefault(int(stat[stat.rindex(b")") + 2 :].split()[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def sigterm_to_python() -> None:
    """Gives SIGTERM back to Python's handler after ``ray.init``, in the main thread.

    Ray's core worker installs Abseil's failure signal handler in the driver for SIGTERM too. It prints a stack, passes
    the signal on to Python's handler (Ray's, which raises ``SystemExit(15)``) and arms a 3 s alarm that aborts the
    process: a driver that takes longer to end its run (record it as interrupted, stop its actors) dies with SIGABRT
    (-6) instead of the 143 a supervisor reads. Crash signals (SIGSEGV, SIGABRT, ...) keep Abseil's stack dumps.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread can set handlers; ray.init installed none there either
    handler = signal.getsignal(signal.SIGTERM)
    if handler is None:  # set outside Python: left alone
        return
    if not callable(handler):  # the default action or ignored: installed again at the C level as it is
        signal.signal(signal.SIGTERM, handler)
        return
    python_handler = handler

    def on_sigterm(signum: int, frame: Any) -> None:
        _SIGTERM_RECEIVED.set()
        python_handler(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)  # Python's handler again at the C level, noting that SIGTERM came


_SIGTERM_RECEIVED = threading.Event()


def stopped_by_sigterm(exc: BaseException) -> bool:
    """Whether `exc` is how SIGTERM ends this driver. Ray's handler raises ``SystemExit(15)``, but one that lands in a
    blocking ``ray.get`` or ``ray.wait`` comes out of it as ``SystemExit(1)``; after `sigterm_to_python`, that one
    counts too once SIGTERM was received."""
    return isinstance(exc, SystemExit) and (exc.code == signal.SIGTERM or _SIGTERM_RECEIVED.is_set())


def embedded_ray_options(num_cpus: int | None) -> dict[str, Any]:
    """`ray.init` arguments of the job's embedded local Ray with ``num_cpus`` CPUs (None: all cores).

    Ray ends idle workers after a second once a node runs more workers than it has CPUs, which the actor pools
    always do: every write task would then start (and import into) a new worker process. The embedded Ray keeps
    `EMBEDDED_IDLE_WORKERS` more (`worker_soft_limit`).

    Its workers run at the driver's priority (`EMBEDDED_WORKER_NICENESS`), not at Ray's default niceness of 15.
    """
    soft_limit = worker_soft_limit(num_cpus or os.cpu_count() or 1)
    return {
        # A new local Ray even where `ray start` or `ray.cluster_utils` announced another one on this machine (in
        # <temp>/ray/ray_current_cluster), which a bare `ray.init()` would join: embedded means this run's own.
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "_system_config": {"num_workers_soft_limit": soft_limit, "worker_niceness": EMBEDDED_WORKER_NICENESS},
    }


def read_cluster() -> Cluster:
    """The size of the Ray cluster this process is connected to."""
    import ray

    total = ray.cluster_resources()
    free = ray.available_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return Cluster(
        cpus=float(total.get("CPU", 0)),
        gpus=float(total.get("GPU", 0)),
        free_cpus=float(free.get("CPU", 0)),
        node_cpus=max((float(n.get("CPU", 0)) for n in nodes), default=float(total.get("CPU", 0))),
        node_gpus=max((float(n.get("GPU", 0)) for n in nodes), default=float(total.get("GPU", 0))),
    )


def cpu_request(cpus: float) -> float:
    """A CPU request Ray accepts, rounded down so that the parts still fit: whole above one, 4 decimals below."""
    if cpus >= 1:
        return float(math.floor(cpus + 1e-9))
    return math.floor(cpus * 10_000 + 1e-6) / 10_000


def count(n: float, noun: str) -> str:
    """``1 CPU``, ``0.5 CPUs``, ``3 decoders``."""
    return f"{n:g} {noun}" if n == 1 else f"{n:g} {noun}s"


@dataclass(frozen=True)
class Demand:
    """``number`` actors (or bundles) of ``cpus`` CPUs and ``gpus`` GPUs each; ``name`` (singular) for messages."""

    name: str
    number: int
    cpus: float
    gpus: float = 0.0

    def describe(self) -> str:
        each = f"({count(self.cpus, 'CPU')}, {count(self.gpus, 'GPU')})" if self.gpus else count(self.cpus, "CPU")
        return f"{count(self.number, self.name)} x {each}"


def require_fit(job: str, demands: Sequence[Demand], cluster: Cluster, *, hint: str = "") -> None:
    """Raises ValueError (one line, needed against available) when ``demands`` cannot all run on ``cluster`` at once:
    in total, or one of them on its largest node. ``job`` names what needs them (``"the run"``)."""
    cpus = sum(d.number * d.cpus for d in demands)
    gpus = sum(d.number * d.gpus for d in demands)
    detail = ", ".join(d.describe() for d in demands if d.number)
    suffix = f"; {hint}" if hint else ""
    if cpus > cluster.cpus + 1e-6 or gpus > cluster.gpus + 1e-6:
        raise ValueError(
            f"{job} needs {count(cpus, 'CPU')} and {count(gpus, 'GPU')} ({detail}) but the Ray cluster has "
            f"{cluster.describe()}{suffix}"
        )
    for d in demands:
        if d.number and (d.cpus > cluster.node_cpus + 1e-6 or d.gpus > cluster.node_gpus + 1e-6):
            raise ValueError(
                f"{job}: a {d.name} needs {count(d.cpus, 'CPU')} and {count(d.gpus, 'GPU')} on one node but the "
                f"largest node has {count(cluster.node_cpus, 'CPU')} and {count(cluster.node_gpus, 'GPU')}{suffix}"
            )


@dataclass(frozen=True)
class DecodePool:
    """A Ray Data actor pool of CPU decoders: 1 to ``max_workers`` actors of ``cpus_per_worker`` CPUs each."""

    max_workers: int
    cpus_per_worker: float

    @property
    def cpus(self) -> float:
        """CPUs of the whole pool at its largest: the Ray Data budget of the dataset it runs in."""
        return self.max_workers * self.cpus_per_worker

    def demand(self, *, pools: int = 1) -> Demand:
        """Every actor of ``pools`` such pools (one per training worker)."""
        return Demand("decoder", pools * self.max_workers, self.cpus_per_worker)

    def map_batches_args(self) -> dict[str, Any]:
        """``compute`` and ``num_cpus`` for ``Dataset.map_batches``: the pool starts with one actor and grows."""
        import ray.data

        return {
            "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=self.max_workers),
            "num_cpus": self.cpus_per_worker,
        }

    def execution_options(self, *, preserve_order: bool = False) -> Any:
        """Ray Data options that budget the dataset to this pool (no GPUs), so that its scheduler never counts on
        CPUs that training workers or other datasets hold."""
        from ray.data import ExecutionOptions, ExecutionResources

        return ExecutionOptions(resource_limits=ExecutionResources(cpu=self.cpus, gpu=0), preserve_order=preserve_order)

    def describe(self) -> str:
        return f"up to {count(self.max_workers, 'decoder')} x {count(self.cpus_per_worker, 'CPU')}"


def plan_decoders(
    cpus: float,
    *,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    max_workers: int | None = None,
) -> DecodePool:
    """Decode actors for a share of ``cpus``.

    By default one actor per CPU at 1 CPU each (at most ``max_workers``); a share under one CPU gets one actor of that
    share (at least :data:`MIN_DECODE_CPUS`). Given ``workers``, they split the share; given ``cpus_per_worker``, it
    is used as it is (the caller checks the fit).
    """
    if workers is not None and workers < 1:
        raise ValueError(f"decode workers must be >= 1, got {workers}")
    if cpus_per_worker is not None and cpus_per_worker <= 0:
        raise ValueError(f"decode CPUs per worker must be > 0, got {cpus_per_worker}")
    if workers is None:
        each = cpus_per_worker if cpus_per_worker is not None else cpu_request(min(1.0, max(MIN_DECODE_CPUS, cpus)))
        workers = max(1, int(cpus / each + 1e-6))
        if max_workers is not None:
            workers = max(1, min(workers, max_workers))
    elif cpus_per_worker is not None:
        each = cpus_per_worker
    else:
        each = cpu_request(min(1.0, max(MIN_DECODE_CPUS, cpus / workers)))
    return DecodePool(workers, each)


def gpus_the_cluster_can_add() -> float:
    """GPUs the cluster's autoscaler could add (its node groups' GPUs times their most nodes), 0 when it declares
    none or no autoscaler reports a configuration (a fixed cluster, an embedded Ray)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()  # what the autoscaler (v2, KubeRay) reported
    except Exception:  # a private API: treat anything unexpected as "no autoscaler"
        return 0.0
    if config is None:
        return 0.0
    total = 0.0
    for group in config.node_group_configs:
        gpus = float(group.resources.get("GPU", 0))
        if gpus > 0 and group.max_count != 0:
            total += math.inf if group.max_count < 0 else gpus * group.max_count
    return total


@dataclass(frozen=True)
class EmbedDevice:
    """Where the embed actors run, and why (recorded in the run record)."""

    device: str  # "gpu" or "cpu"
    reason: str
    waited_seconds: float = 0.0


def resolve_embed_device(
    requested: str,
    cluster: Cluster,
    *,
    embedded: bool,
    gpus_per_embed_worker: float,
    wait_seconds: float,
    poll_seconds: float = 1.0,
) -> EmbedDevice:
    """Turns ``--embed-device`` into "gpu" or "cpu" for this cluster.

    ``auto`` takes GPUs when the cluster has some now, and the CPUs of an embedded Ray or of a cluster that cannot
    add GPUs. On a cluster whose autoscaler can add GPU nodes but has none running yet (a KubeRay GPU group scaled
    to zero), it asks the autoscaler for one embed actor's GPUs and waits up to `wait_seconds` for them: a job meant
    for GPUs never quietly embeds on CPUs.

    ``gpu`` on a cluster (not an embedded Ray, whose size is checked by `plan_index_pools`) without a GPU now asks
    the autoscaler the same way and waits as long: without one, the embed actor would wait for a GPU for ever.

    Raises:
        ValueError: ``auto`` or ``gpu`` waited `wait_seconds` and no GPU joined (with what to do instead).
    """
    if requested == "gpu" and not embedded and 0 < gpus_per_embed_worker and cluster.gpus < gpus_per_embed_worker:
        return _wait_for_gpus(gpus_per_embed_worker, wait_seconds=wait_seconds, poll_seconds=poll_seconds, asked="gpu")
    if requested in ("gpu", "cpu"):
        return EmbedDevice(requested, f"--embed-device {requested}")
    if gpus_per_embed_worker <= 0:
        return EmbedDevice("cpu", "auto: --gpus-per-embed-worker 0")
    if cluster.gpus > 0:
        return EmbedDevice("gpu", f"auto: the cluster has {count(cluster.gpus, 'GPU')}")
    if embedded:
        return EmbedDevice("cpu", "auto: no GPU on this machine")
    can_add = gpus_the_cluster_can_add()
    if can_add <= 0:
        return EmbedDevice("cpu", "auto: no GPU in the cluster and its autoscaler declares no GPU nodes")
    return _wait_for_gpus(gpus_per_embed_worker, wait_seconds=wait_seconds, poll_seconds=poll_seconds)


def _wait_for_gpus(gpus: float, *, wait_seconds: float, poll_seconds: float, asked: str = "auto") -> EmbedDevice:
    import logging
    import time

    import ray
    from ray.autoscaler.sdk import request_resources

    log = logging.getLogger("vitaclip.job")
    why = "the autoscaler can add GPU nodes" if asked == "auto" else "--embed-device gpu and no GPU in the cluster"
    log.info("%s: %s; asking for %s and waiting up to %.0f s", asked, why, count(gpus, "GPU"), wait_seconds)
    started = time.monotonic()
    request_resources(bundles=[{"GPU": gpus}])
    try:
        while time.monotonic() - started < wait_seconds:
            if float(ray.cluster_resources().get("GPU", 0)) >= gpus:
                waited = time.monotonic() - started
                return EmbedDevice("gpu", f"{asked}: a GPU node joined after {waited:.0f} s", waited_seconds=waited)
            time.sleep(poll_seconds)
    finally:
        request_resources(bundles=[])  # the embed pool's own requests keep what it needs from here on
    if asked == "auto":
        raise ValueError(
            f"--embed-device auto: the cluster's autoscaler can add GPU nodes, but none joined within "
            f"{wait_seconds:g} s; check the GPU node group (quota, image, node selectors), raise --gpu-wait-seconds, "
            "or embed on CPUs with --embed-device cpu"
        )
    raise ValueError(
        f"--embed-device gpu: the cluster has no GPU and none joined within {wait_seconds:g} s (no autoscaler added "
        "one); give it GPU nodes (or a GPU node group), raise --gpu-wait-seconds, or embed on CPUs with "
        "--embed-device cpu or auto"
    )


@dataclass(frozen=True)
class IndexPools:
    """The actor pools of an indexing run: decoders on CPUs, embedders on GPUs or sharing the CPUs.

    Attributes:
        decode_workers: Decode tasks running at once (`jobs.decode_embed`).
        cpus_per_decoder: CPUs each decode task asks for.
        embed_workers: Most embed actors (the pool starts with one and grows).
        cpus_per_embedder: CPUs left free for each embed actor when it embeds on CPUs (0 on GPUs); it reserves none
            (it waits on decode tasks, which need CPUs: `jobs.pipeline.index_dataset`).
        gpus_per_embedder: GPUs each embed actor asks for (0 on CPUs).
    """

    decode_workers: int
    cpus_per_decoder: float
    embed_workers: int
    cpus_per_embedder: float
    gpus_per_embedder: float

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_embedder > 0


def plan_index_pools(
    cluster: Cluster,
    *,
    embed_device: str,
    embed_workers: int,
    gpus_per_embed_worker: float,
    cpus_per_embed_worker: float,
    decode_workers: int | None,
    embedded: bool,
) -> IndexPools:
    """Sizes an indexing run's pools to `cluster` and refuses at once what it cannot hold.

    ``embed_device`` is "gpu" or "cpu" (`resolve_embed_device` turns "auto" into one of them; "auto" here means GPUs
    when the cluster has some now); "gpu" asks for them regardless, so an autoscaling cluster adds GPU nodes for
    the embed pool as it grows. One decoder per CPU by default; without GPUs
    the embedders share the cores: the decoders' CPU request shrinks so that both pools fit together, and the
    operating system shares the cores by demand. GPUs are checked on an `embedded` Ray only (an attached cluster may
    add GPU nodes as it scales).

    Raises:
        ValueError: The decode pool and the first embed actor cannot run at once (Ray Data would wait for ever).
    """
    cpus, gpus = max(1, int(cluster.cpus)), cluster.gpus
    use_gpu = embed_device == "gpu" or (embed_device == "auto" and gpus > 0 and gpus_per_embed_worker > 0)
    if use_gpu and embed_device == "auto":
        embed_workers = max(1, min(embed_workers, int(gpus / gpus_per_embed_worker)))
    cpus_per_embedder = 0.0 if use_gpu else min(cpus_per_embed_worker, cpus / (2 * embed_workers))
    decode_workers = decode_workers or max(1, cpus)
    cpus_per_decoder = min(1.0, max(MIN_DECODE_CPUS, (cpus - embed_workers * cpus_per_embedder) / decode_workers))
    pools = IndexPools(
        decode_workers=decode_workers,
        cpus_per_decoder=cpus_per_decoder,
        embed_workers=embed_workers,
        cpus_per_embedder=cpus_per_embedder,
        gpus_per_embedder=gpus_per_embed_worker if use_gpu else 0.0,
    )
    require_fit(
        "the run",
        [
            Demand("decode task", decode_workers, cpus_per_decoder),
            Demand("embed actor", 1, cpus_per_embedder, pools.gpus_per_embedder if embedded else 0.0),
        ],
        read_cluster(),
        hint="lower --decode-workers, use --embed-device cpu or auto, or give the run a bigger cluster",
    )
    return pools


@dataclass(frozen=True)
class TrainResources:
    """What a Ray run asks for: ``num_workers`` training workers, each with its own pool of CPU decode actors."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    decode: DecodePool  # per training worker

    def describe(self) -> str:
        each = count(self.cpus_per_worker, "CPU")
        return (
            f"{count(self.num_workers, 'training worker')} x {f'({each}, 1 GPU)' if self.use_gpu else each}, each "
            f"fed by {self.decode.describe()}"
        )


def plan_resources(config: TrainConfig, ray: RayTrainConfig, cluster: Cluster) -> TrainResources:
    """Training workers and decode actors for ``cluster``; options the config sets are taken as they are.

    Defaults: with GPUs, one worker per GPU (the most that divide the batch) with 1 CPU each; without, one worker
    with half the CPUs. The CPUs left are split between the workers' decoder pools, one 1-CPU decoder per CPU (one
    decoder with the fraction left when that is under one CPU). Raises ValueError when the request cannot fit.
    """
    use_gpu = ray.use_gpu if ray.use_gpu is not None else cluster.gpus >= 1
    if ray.num_workers is not None:
        workers = ray.num_workers
    elif use_gpu:
        fits = [w for w in range(1, int(cluster.gpus) + 1) if config.batch_size % (w * config.micro_batch_size) == 0]
        workers = max(fits, default=1)
    else:
        workers = 1
    cpus = cluster.usable_cpus
    if ray.cpus_per_worker is not None:
        cpus_per_worker = ray.cpus_per_worker
    else:
        half = cpus / (2 * workers)
        cpus_per_worker = cpu_request(min(1.0, half) if use_gpu else half)
    share = max(0.0, (cpus - workers * cpus_per_worker) / workers)
    decode = plan_decoders(share, workers=ray.decode_workers, cpus_per_worker=ray.decode_cpus)
    require_fit(
        "the run",
        [Demand("training worker", workers, cpus_per_worker, 1.0 if use_gpu else 0.0), decode.demand(pools=workers)],
        cluster,
        hint="lower --num-workers, --cpus-per-worker, --decode-workers or --decode-cpus (or drop --use-gpu), or use a "
        "bigger cluster",
    )
    return TrainResources(workers, use_gpu, cpus_per_worker, decode)


def plan_decode_pool(
    config: EvalSourceConfig, cluster: Cluster, num_videos: int, *, videos_per_batch: int
) -> DecodePool:
    """The Ray decode actors of an evaluation: one per CPU (at most one per batch of videos) unless the flags say;
    the model runs in the driver, outside Ray's accounting. Raises ValueError when the request cannot fit."""
    pool = plan_decoders(
        cluster.usable_cpus,
        workers=config.decode_workers,
        cpus_per_worker=config.decode_cpus,
        max_workers=max(1, -(-num_videos // videos_per_batch)),
    )
    require_fit(
        "the evaluation",
        [pool.demand()],
        cluster,
        hint="lower --decode-workers or --decode-cpus, or use a bigger cluster",
    )
    return pool

"""Shared fixtures: a local S3 server (moto) with fresh buckets, S3 fault injection, and a small generated video."""

from __future__ import annotations

import fcntl
import gc
import io
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import ray  # imported before any test captures output: see below
from local_ray import start_local_ray

# Ray sets up its loggers' stream handlers when first imported, on the sys.stderr of that moment: first imported
# inside a test that captures output (capsys), they wrote to that test's closed capture ever after ("--- Logging
# error ---" in a later test's stderr, in one process: VITACLIP_TEST_WORKERS=0). Imported here, they write to the
# session's stream.

# Every Ray the tests start (in-process `ray.init`, `ray start` heads, `ray.cluster_utils` nodes; each inherits the
# environment) runs its workers at niceness 0, as the job's embedded Ray does (jobs.ray_resources). At Ray's default
# of 15 they stand in badly for a cluster's dedicated nodes: the other pytest-xdist worker, at 0 in the same session,
# would take about 28 times their share of a core whenever it is busy, and a 20 s run would not finish in minutes.
os.environ["RAY_worker_niceness"] = "0"

FAULT_KINDS: tuple[str, ...] = ("500", "503", "throttle", "reset", "truncate")
"""Faults `inject_s3_faults` injects by default. Also available: "incomplete" (a body that errors when read short)."""

_STATUS_FAULTS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "throttle": (503, "SlowDown", "Please reduce your request rate."),
}
_BODY_FAULTS = ("truncate", "incomplete")  # only for GetObject


# ----------------------------------------------------------------------------------------------------- S3 server


_LONG_FILES = (
    "test_concurrent_runs.py",
    "test_index_job.py",
    "test_training.py",
    "test_gcs_output.py",
    "test_azure_output.py",
    "test_demo_model.py",
    "test_index_job_s3.py",
    "test_redaction.py",
    "test_gpu_autoscaling.py",
    "test_ray_job_submit.py",
    "test_gpu_check.py",
    "test_infra.py",
    "test_evaluation.py",
    "test_hostile_inputs.py",
)
"""Test files of whole job runs (Ray clusters, many processes), those holding the longest tests first."""

_LONG_TESTS = frozenset({"test_drivers_killed_at_random_points_leave_every_video_once"})
"""Tests that go first in their file (one file's tests stay together: its module fixtures start once)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files of `_LONG_FILES` first, in that order, `_LONG_TESTS` first in theirs, the rest in their order.
    With pytest-xdist's `worksteal` (`scripts/run-tests.sh`) the first worker starts on the longest job runs while
    the other runs the short tests, then takes over queued job runs: fewer job runs at once on two cores, and no
    long one left alone at the end."""
    rank = {name: i for i, name in enumerate(_LONG_FILES)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.name not in _LONG_TESTS))


_SESSION_START = time.monotonic()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Names a failure the moment it happens, with the minutes since the session started: `-q` output otherwise
    names failures only at the end, which a run cut short by its time limit never reaches. Under pytest-xdist this
    runs in the controller, which receives every worker's reports (and a report for a worker that died)."""
    if not report.failed:
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    reason = crash.message.splitlines()[0] if crash is not None and crash.message else str(report.longrepr)[-300:]
    minutes = (time.monotonic() - _SESSION_START) / 60
    print(f"\n[{minutes:.1f} min] FAILED ({report.when}) {report.nodeid}: {reason}", flush=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """With pytest-xdist workers (`scripts/run-tests.sh` runs two), a test marked ``serial`` runs alone: it holds
    an exclusive lock while every other test holds a shared one, from its setup (fixtures of any scope that it
    starts) to its teardown. Such tests time something (a timeout, Ray's idle-worker reaping, node failure
    detection) that the other worker's CPU load would change. Without workers, nothing is locked."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return (yield)
    with open(f"/tmp/vitaclip-tests-{run}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if item.get_closest_marker("serial") else fcntl.LOCK_SH)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_MOTO_PROCESS = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test session closes the pipe (or ends)
server.stop()
"""


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL (`http://127.0.0.1:<port>`) of a moto S3 server that runs for the whole session.

    The server runs in a process of its own, as a real S3 endpoint does: a client call that holds the GIL while it
    waits for an answer (delta-rs's table alterations do) would otherwise stop the server it waits for.

    While it runs, the environment holds dummy credentials (`testing`) and region (`us-east-1`), `AWS_ENDPOINT_URL`
    points at the server so that even a client made without `endpoint_url` cannot reach AWS, shared AWS config
    files and the instance metadata service are out of reach, and every other `AWS_*` variable is unset. All of it
    is restored when the session ends.
    """
    patch = pytest.MonkeyPatch()
    for name in list(os.environ):
        if name.startswith("AWS_"):
            patch.delenv(name)
    patch.setenv("AWS_ACCESS_KEY_ID", "testing")
    patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    patch.setenv("AWS_CONFIG_FILE", os.devnull)
    patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("NO_PROXY", "no_proxy"):  # a configured HTTP proxy must not see loopback traffic
        patch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"])))
    server = subprocess.Popen(
        [sys.executable, "-c", _MOTO_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the moto server did not start (exit code {server.poll()})")
        endpoint = f"http://127.0.0.1:{int(port)}"
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        yield endpoint
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        patch.undo()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[tuple[Any, str]]:
    """`(client, bucket_name)`: a new, uniquely named, empty bucket on `s3_server` and a client for it.

    The client comes from `jobs.storage.make_s3_client` (3 attempts per request). The bucket and what the test
    left in it are deleted afterwards.
    """
    from jobs.storage import make_s3_client

    client = make_s3_client(endpoint_url=s3_server, max_attempts=3)
    bucket = f"test-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=bucket)
    yield client, bucket
    _delete_bucket(client, bucket)


def _delete_bucket(client: Any, bucket: str) -> None:
    import botocore.exceptions

    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": entry["Key"]} for entry in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError:
        pass  # a test that broke the bucket on purpose; the server goes away with the session


class AwsKeys(NamedTuple):
    """An access key pair known to the moto server."""

    access_key_id: str
    secret_access_key: str


def _set_auth_enforcement(endpoint: str, free_requests: str) -> str:
    """Sets how many requests moto serves before it checks signatures and IAM policies; returns the old setting."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=free_requests.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])


@pytest.fixture
def s3_strict_auth(s3_server: str) -> Iterator[AwsKeys]:
    """Turns on moto's signature and IAM checks for one test; yields the keys of an IAM user with no permissions.

    While it is on, unknown keys (including the session's `testing` keys) get `InvalidAccessKeyId` and the yielded
    user gets `AccessDenied`. Put the keys in the environment (monkeypatch) to exercise the standard credential
    chain. Checks are off again after the test.
    """
    import boto3

    iam = boto3.session.Session().client("iam", endpoint_url=s3_server, region_name="us-east-1")
    user = f"nobody-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    previous = _set_auth_enforcement(s3_server, "0")
    try:
        yield AwsKeys(key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        _set_auth_enforcement(s3_server, previous)


# ----------------------------------------------------------------------------------------------------- fault injection


@dataclass
class FaultLog:
    """What `inject_s3_faults` saw and did: requests counted and faults injected by kind."""

    requests: int = 0
    injected: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.injected.values())


class _ErrorBody:
    """Just enough of a urllib3 response for botocore to read an error body."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


class _FaultInjector:
    """The botocore event handlers of `inject_s3_faults`."""

    def __init__(self, log: FaultLog, *, every_nth: int, kinds: Sequence[str], operations: Sequence[str] | None):
        self.log = log
        self.every_nth = every_nth
        self.kinds = kinds
        self.operations = operations
        self.lock = threading.Lock()
        self.cycle = itertools.cycle(kinds)
        self.pending = threading.local()  # body fault waiting for this thread's GetObject response

    def _next_kind(self, operation: str) -> str | None:
        """The fault for this request, if it is an every_nth one: the next kind in turn that applies to it."""
        with self.lock:
            self.log.requests += 1
            if self.log.requests % self.every_nth:
                return None
            for _turn in range(len(self.kinds)):
                kind = next(self.cycle)
                if operation == "GetObject" or kind not in _BODY_FAULTS:
                    break
            else:
                return None
            if kind not in _BODY_FAULTS:
                self.log.injected[kind] += 1
            return kind

    def before_send(self, request: Any, event_name: str, **_: Any) -> Any:
        import botocore.awsrequest
        import botocore.exceptions

        operation = event_name.rsplit(".", 1)[-1]
        if self.operations is not None and operation not in self.operations:
            return None
        kind = self._next_kind(operation)
        if kind is None:
            return None
        if kind == "reset":
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)
        if kind in _STATUS_FAULTS:
            status, code, message = _STATUS_FAULTS[kind]
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                "<RequestId>injected-fault</RequestId></Error>"
            ).encode()
            headers = {"Content-Type": "application/xml", "Content-Length": str(len(body))}
            return botocore.awsrequest.AWSResponse(request.url, status, headers, _ErrorBody(body))
        self.pending.kind = kind
        return None

    def after_get(self, parsed: dict[str, Any], **_: Any) -> None:
        import botocore.response

        kind = getattr(self.pending, "kind", None)
        self.pending.kind = None
        body = parsed.get("Body")
        if kind is None or body is None:
            return
        data = body.read()
        body.close()
        if not data:
            parsed["Body"] = botocore.response.StreamingBody(io.BytesIO(data), 0)
            return
        cut = len(data) // 2
        announced = cut if kind == "truncate" else len(data)
        parsed["Body"] = botocore.response.StreamingBody(io.BytesIO(data[:cut]), announced)
        with self.lock:
            self.log.injected[kind] += 1


@contextmanager
def inject_s3_faults(
    client: Any,
    *,
    every_nth: int = 3,
    kinds: Sequence[str] = FAULT_KINDS,
    operations: Sequence[str] | None = None,
) -> Iterator[FaultLog]:
    """Makes every `every_nth` request of `client` fail, cycling through `kinds`, while the block runs.

    Requests still go to the real server otherwise. Kinds: "500", "503" and "throttle" (503 SlowDown) answer with
    that error instead of sending; "reset" raises `ConnectionClosedError` as a dropped connection would;
    "truncate" lets a GetObject through but hands back half its body with the original ContentLength (a short
    read nobody noticed); "incomplete" does the same but the body raises `IncompleteReadError` when read. Body
    faults apply only to GetObject: other operations skip them. Retries count as requests. Thread-safe.

    Args:
        operations: Operation names (such as "GetObject") to count and fault; None for all.

    Yields:
        A `FaultLog` updated as requests go by.
    """
    if every_nth < 1:
        raise ValueError(f"every_nth must be >= 1, got {every_nth}")
    unknown = set(kinds) - set(_STATUS_FAULTS) - {"reset", *_BODY_FAULTS}
    if unknown or not kinds:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; allowed: {FAULT_KINDS + ('incomplete',)}")
    log = FaultLog()
    injector = _FaultInjector(log, every_nth=every_nth, kinds=kinds, operations=operations)
    before_send, after_get = injector.before_send, injector.after_get
    events = client.meta.events
    events.register("before-send.s3", before_send, unique_id=f"fault-send-{id(log)}")
    events.register("after-call.s3.GetObject", after_get, unique_id=f"fault-body-{id(log)}")
    try:
        yield log
    finally:
        events.unregister("before-send.s3", unique_id=f"fault-send-{id(log)}")
        events.unregister("after-call.s3.GetObject", unique_id=f"fault-body-{id(log)}")


@pytest.fixture
def s3_faults() -> Callable[..., Any]:
    """The `inject_s3_faults(client, *, every_nth=3, kinds=FAULT_KINDS, operations=None)` context manager."""
    return inject_s3_faults


# ----------------------------------------------------------------------------------------------------- videos


@pytest.fixture(scope="session")
def noise_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a small MPEG-4 video (24 frames of random noise, 64x48, 12 fps) made once per session."""
    import av
    import numpy as np

    path = tmp_path_factory.mktemp("videos") / "noise.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(24):
            image = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)  # [H, W, 3]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vitaclip checkpoint folder of `vitaclip-tiny` (its seeded random weights), saved once per session.

    Job processes given it as ``--checkpoint`` plan with its ``config.json`` and never import torch in the driver,
    as with any trained model; with ``--random-weights`` every driver would build the model to hash its weights.
    """
    import vitaclip

    folder = tmp_path_factory.mktemp("checkpoints") / "vitaclip-tiny"
    vitaclip.save_checkpoint(vitaclip.create_model("vitaclip-tiny"), folder)
    return folder


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """An embedded local Ray with 2 CPUs (the CI machine's), for tests that run the job in this process."""

    start_local_ray()
    yield
    gc.collect()  # object references a test left in cycles (a kept traceback) go while Ray is still up
    ray.shutdown()


PADDED_EXTRA_BYTES = 300 * 2**20


@pytest.fixture(scope="session")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder indexed by the real job: 6 videos (3 to 5.5 s) with 1 s segments, and broken files.

    The first video is padded with 300 MiB of zeros after its last box (a sparse file: no disk used), so media
    requests have a large indexed file to stream.
    """
    from test_index_job import make_videos

    from jobs.index_videos import main as job_main

    root = tmp_path_factory.mktemp("search")
    videos = make_videos(root / "in", 6)
    first = sorted(p for p in videos if p.suffix == ".mp4")[0]
    with open(first, "r+b") as f:
        f.truncate(first.stat().st_size + PADDED_EXTRA_BYTES)
    start_local_ray()
    try:
        rc = job_main(
            [str(root / "in"), "--output", str(root / "out"), "--model", "vitaclip-tiny", "--random-weights"]
            + ["--segment-seconds", "1", "--top-k", "5"]
        )
    finally:
        ray.shutdown()
    assert rc == 0
    return root / "out"


@pytest.fixture(scope="session")
def engine(indexed: Path) -> Any:
    from index.search import SearchEngine

    return SearchEngine(indexed)

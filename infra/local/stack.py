"""A local stack for trying the indexing job as it runs on a cluster: an S3 server and a Ray head on this machine.

    python infra/local/stack.py up      # S3 server + Ray head, a bucket with sample videos; prints what to run
    python infra/local/stack.py status  # what runs, on which ports
    python infra/local/stack.py down    # stops both

(``infra/local/up.sh`` and ``down.sh`` wrap the first and last; run with the project's Python, ``.venv/bin/python``.)

The S3 server is MinIO when a ``minio`` binary is on PATH, else moto's server (``--s3-server`` picks one). The Ray
head runs with token authentication; the token is written to ``STATE_DIR/auth_token`` (mode 0600) and never
printed. Ports, process ids and paths go to ``STATE_DIR/state.json``. The S3 server and Ray's dashboard listen on
127.0.0.1 only; Ray's own servers (GCS, raylet, object manager, the metrics export port and the agents) listen on every
interface of the machine, as Ray offers no setting to bind them to one: the GCS and raylets refuse callers without the
token, but the metrics port answers anyone who reaches it. Run the stack where a firewall keeps those ports in.

``down`` stops exactly the processes ``up`` started (by process id and their process group): it never runs
``ray stop``, which would also stop every other Ray instance of this user on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = REPO_ROOT / "out" / "local-stack"
BIN_DIR = Path(sys.executable).parent
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
"""moto accepts any keys; these are its documented dummies, safe to print."""
REGION = "us-east-1"
START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 30.0


# ----------------------------------------------------------------------------------------------------- helpers


def _log(message: str) -> None:
    print(message, flush=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pick_port(preferred: int, taken: set[int]) -> int:
    """``preferred`` when it is free (0: any), else a free port chosen by the OS."""
    if preferred and preferred not in taken and _port_free(preferred):
        taken.add(preferred)
        return preferred
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        # Ray hands out worker ports from 10002-19999 by default: keep its other ports out of that range.
        if port not in taken and port not in _WORKER_PORTS:
            taken.add(port)
            return port


def _write_private(path: Path, text: str) -> None:
    """Writes a file only its owner can read (the Ray token, S3 credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _group_alive(pgid: int) -> bool:
    """Whether any process of a process group is still running (zombies waiting to be reaped do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # no /proc (macOS): ask the kernel about the group as a whole
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, _ppid, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state != "Z":
            return True
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        text = stat.read_text()
        return text[text.rindex(")") + 2 :].split()[0] != "Z"
    return True


def _stop_group(name: str, pid: int, *, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM to the leader ``pid`` (it stops its children), then SIGKILL to whatever of its group is left."""
    if not _group_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.25)
    if _group_alive(pid):
        _log(f"{name}: still running after {timeout_seconds:.0f} s, killing process group {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.25)


def _spawn(cmd: list[str], *, env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Starts a background process in its own session (its own process group, detached from this terminal)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _binary(name: str) -> str | None:
    beside = BIN_DIR / name  # the venv's own copy first
    return str(beside) if beside.exists() else shutil.which(name)


def _s3_client(endpoint: str, credentials: dict[str, str]) -> Any:
    import boto3
    import botocore.config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
        config=botocore.config.Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=2),
    )


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.removeprefix("export ").partition("=")
            values[key.strip()] = shlex.split(value)[0] if value.strip() else ""
    return values


# ----------------------------------------------------------------------------------------------------- state


class Stack:
    """Files of one stack under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()
        self.state_file = self.state_dir / "state.json"
        self.token_file = self.state_dir / "auth_token"
        self.s3_env_file = self.state_dir / "s3.env"
        self.videos_dir = self.state_dir / "videos"
        self.logs_dir = self.state_dir / "logs"
        digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:10]
        # Ray's temp dir holds Unix sockets whose paths must stay short: /tmp, not the state dir.
        self.ray_temp_dir = Path("/tmp") / f"vitaclip-stack-{digest}"

    def load(self) -> dict[str, Any] | None:
        if not self.state_file.exists():
            return None
        return dict(json.loads(self.state_file.read_text()))

    def save(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.state_file, state)


def _processes(state: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """name -> (pid, port) of the stack's servers."""
    out = {}
    if state.get("s3"):
        out["s3"] = (int(state["s3"]["pid"]), int(state["s3"]["port"]))
    if state.get("ray"):
        out["ray"] = (int(state["ray"]["pid"]), int(state["ray"]["dashboard_port"]))
    return out


# ----------------------------------------------------------------------------------------------------- up


def _start_s3(stack: Stack, kind: str, port: int, console_port: int) -> dict[str, Any]:
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    if kind == "minio":
        minio = _binary("minio")
        if minio is None:
            raise RuntimeError("--s3-server minio: no minio binary on PATH")
        credentials = {"AWS_ACCESS_KEY_ID": "vitaclip", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)}
        env.update(MINIO_ROOT_USER=credentials["AWS_ACCESS_KEY_ID"])
        env.update(MINIO_ROOT_PASSWORD=credentials["AWS_SECRET_ACCESS_KEY"])
        data_dir = stack.state_dir / "minio-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            minio,
            "server",
            str(data_dir),
            "--address",
            f"127.0.0.1:{port}",
            "--console-address",
            f"127.0.0.1:{console_port}",
        ]
    else:
        moto = _binary("moto_server")
        if moto is None:
            raise RuntimeError("no moto_server found: install the dev extra (pip install -e '.[dev]')")
        credentials = dict(MOTO_CREDENTIALS)
        cmd = [moto, "-H", "127.0.0.1", "-p", str(port)]
    _write_private(
        stack.s3_env_file,
        "".join(f"export {k}={shlex.quote(v)}\n" for k, v in {**credentials, "AWS_DEFAULT_REGION": REGION}.items()),
    )
    log_path = stack.logs_dir / f"{kind}.log"
    proc = _spawn(cmd, env=env, log_path=log_path, cwd=stack.state_dir)
    client = _s3_client(endpoint, credentials)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            client.list_buckets()
            break
        except Exception:  # not listening yet
            if time.monotonic() > deadline:
                _stop_group(kind, proc.pid)
                raise RuntimeError(f"{kind} did not answer on {endpoint}:\n{_tail(log_path)}") from None
            time.sleep(0.25)
    _log(f"S3 server ({kind}) up: {endpoint} (pid {proc.pid})")
    return {"kind": kind, "pid": proc.pid, "port": port, "endpoint": endpoint, "log": str(log_path)}


def _ray_env(stack: Stack, credentials: dict[str, str], endpoint: str) -> dict[str, str]:
    """The Ray head's environment, inherited by its jobs and workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    env.update(credentials)
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    env.update(
        AWS_DEFAULT_REGION=REGION,
        AWS_ENDPOINT_URL=endpoint,  # jobs on this head reach the local S3 server even without --s3-endpoint-url
        AWS_EC2_METADATA_DISABLED="true",
        NO_PROXY=no_proxy,
        no_proxy=no_proxy,
        PATH=f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in a job is this environment's
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(stack.token_file),
        RAY_USAGE_STATS_ENABLED="0",
        # On SIGTERM stop at once, as `ray stop` does (the default drain waits up to 30 s, for Serve replicas).
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    return env


def _start_ray(stack: Stack, env: dict[str, str], ports: dict[str, int], num_cpus: int | None) -> dict[str, Any]:
    ray = _binary("ray")
    if ray is None:
        raise RuntimeError("no ray command found: run with the project's Python (.venv/bin/python)")
    _write_private(stack.token_file, secrets.token_hex(32) + "\n")
    cmd = [
        ray,
        "start",
        "--head",
        "--block",  # stays in the foreground as the parent of Ray's processes: `down` stops it by pid
        f"--port={ports['gcs']}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        f"--dashboard-agent-listen-port={ports['agent']}",
        f"--ray-client-server-port={ports['client']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--temp-dir={stack.ray_temp_dir}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    # Idle workers kept for write tasks beside the actor pools: CPUs + 8, as the embedded Ray and the cluster
    # manifests keep (jobs.ray_resources.worker_soft_limit; this script imports nothing of the project).
    env = {**env, "RAY_num_workers_soft_limit": str((num_cpus or os.cpu_count() or 1) + 8)}
    # Workers at the priority of everything else on this machine, not Ray's 15, under which any busy process of the
    # user's starves the job's decoders (jobs.ray_resources.EMBEDDED_WORKER_NICENESS).
    env["RAY_worker_niceness"] = "0"
    log_path = stack.logs_dir / "ray.log"
    log_path.unlink(missing_ok=True)
    proc = _spawn(cmd, env=env, log_path=log_path, cwd=stack.state_dir)
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    token = stack.token_file.read_text().strip()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    retried = False
    while True:
        if proc.poll() is not None:
            # Ray gives the node a fixed 30 s to register with its GCS, which a busy machine can miss: once more.
            if not retried and "timed out during startup" in _tail(log_path):
                _stop_group("ray", proc.pid)
                _log("the Ray head missed Ray's startup wait (a busy machine?): starting it again")
                proc, retried = _spawn(cmd, env=env, log_path=log_path, cwd=stack.state_dir), True
                deadline = time.monotonic() + START_TIMEOUT_SECONDS
                continue
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{_tail(log_path)}")
        try:  # the Jobs API answers once the dashboard is up and accepts the token
            request = urllib.request.Request(f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            _stop_group("ray", proc.pid)
            raise RuntimeError(f"the Ray head did not come up:\n{_tail(log_path)}")
        time.sleep(0.5)
    _log(f"Ray head up: 127.0.0.1:{ports['gcs']}, dashboard {dashboard} (pid {proc.pid})")
    return {
        "pid": proc.pid,
        "port": ports["gcs"],
        "address": f"127.0.0.1:{ports['gcs']}",
        "dashboard_port": ports["dashboard"],
        "dashboard_url": dashboard,
        "temp_dir": str(stack.ray_temp_dir),
        "log": str(log_path),
    }


def _upload_samples(stack: Stack, endpoint: str, credentials: dict[str, str], bucket: str, count: int) -> list[str]:
    try:
        from vitaclip.samples import write_sample_video
    except ImportError as exc:
        raise RuntimeError(f"cannot import vitaclip ({exc}): run with the project's Python (.venv/bin/python)") from exc
    client = _s3_client(endpoint, credentials)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    keys = []
    for i in range(count):
        path = stack.videos_dir / f"sample-{i:02d}.mp4"
        if not path.exists():
            write_sample_video(path, num_frames=48, fps=12, width=160, height=120, pattern="shape", seed=i)
        key = f"videos/{path.name}"
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    _log(f"bucket s3://{bucket}/: {len(keys)} sample videos under videos/")
    return keys


def usage_text(stack: Stack, state: dict[str, Any]) -> str:
    """What to run against the stack (no secret in it: MinIO's generated keys stay in s3.env)."""
    s3, bucket = state["s3"], state["bucket"]
    endpoint = s3["endpoint"]
    inputs, output = f"s3://{bucket}/videos/", f"s3://{bucket}/index/"
    job_flags = f"{inputs} --output {output} --s3-endpoint-url {endpoint} --model vitaclip-tiny --random-weights"
    py = shlex.quote(sys.executable)
    if s3["kind"] == "moto":
        creds = "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1"
    else:
        creds = f"set -a; . {shlex.quote(str(stack.s3_env_file))}; set +a   # MinIO keys, generated by up"
    lines = [
        f"local stack is up (state: {stack.state_file})",
        f"  S3 ({s3['kind']}): {endpoint}, bucket s3://{bucket}/ with {len(state.get('videos', []))} videos",
    ]
    if state.get("ray"):
        ray = state["ray"]
        lines.append(f"  Ray head: {ray['address']}, dashboard {ray['dashboard_url']} (token auth)")
    lines += [
        "",
        "In your shell, the S3 credentials:",
        f"  {creds}",
        "",
        "Index the sample videos (embedded Ray, S3 on the stack):",
        f"  {shlex.quote(str(BIN_DIR / 'vitaclip'))} index {job_flags}",
    ]
    if state.get("ray"):
        ray = state["ray"]
        lines += [
            "",
            "The same job on the stack's Ray head (the token stays in the file):",
            f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={shlex.quote(str(stack.token_file))}",
            f"  {shlex.quote(str(BIN_DIR / 'ray'))} job submit --address {ray['dashboard_url']} "
            f"--working-dir {shlex.quote(str(REPO_ROOT))} -- python -m jobs.index_videos {job_flags}",
            f"  {py} -m jobs.submit --address {ray['dashboard_url']} --wait -- {job_flags}",
            "",
            f"Ray dashboard: {ray['dashboard_url']} (sign in with the token from {stack.token_file})",
        ]
    lines += ["", f"Stop it: {py} {shlex.quote(str(Path(__file__).resolve()))} down --state-dir {stack.state_dir}"]
    return "\n".join(lines)


def up(args: argparse.Namespace) -> int:
    stack = Stack(Path(args.state_dir))
    previous = stack.load()
    if previous is not None:
        alive = {name: _pid_alive(pid) for name, (pid, _) in _processes(previous).items()}
        if alive and all(alive.values()):
            _log("the stack is already up")
            _log(usage_text(stack, previous))
            return 0
        if any(alive.values()):
            _log("a previous stack is partly running: stopping it first")
        down_state(stack, previous, quiet=True)
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    kind = args.s3_server if args.s3_server != "auto" else ("minio" if shutil.which("minio") else "moto")
    taken: set[int] = set()
    s3_port = _pick_port(args.s3_port, taken)
    console_port = _pick_port(0, taken)
    state: dict[str, Any] = {"state_dir": str(stack.state_dir), "bucket": args.bucket, "started_at": time.time()}
    try:
        state["s3"] = _start_s3(stack, kind, s3_port, console_port)
        stack.save(state)
        credentials = _read_env_file(stack.s3_env_file)
        state["videos"] = _upload_samples(stack, state["s3"]["endpoint"], credentials, args.bucket, args.num_videos)
        stack.save(state)
        if not args.no_ray:
            ports = {
                "gcs": _pick_port(args.ray_port, taken),
                "dashboard": _pick_port(args.dashboard_port, taken),
                "agent": _pick_port(0, taken),
                "client": _pick_port(0, taken),
                "metrics": _pick_port(0, taken),
            }
            env = _ray_env(stack, credentials, state["s3"]["endpoint"])
            state["ray"] = _start_ray(stack, env, ports, args.ray_num_cpus)
            state["token_file"] = str(stack.token_file)
            stack.save(state)
    except Exception as exc:
        print(f"stack up failed: {exc}", file=sys.stderr)
        down_state(stack, state, quiet=True)
        return 1
    _log("")
    _log(usage_text(stack, state))
    return 0


# ----------------------------------------------------------------------------------------------------- down, status


def down_state(stack: Stack, state: dict[str, Any] | None, *, quiet: bool = False) -> None:
    if state:
        for name, (pid, _) in sorted(_processes(state).items()):  # "ray" before "s3": jobs may still be writing
            _stop_group(name, pid)
            if not quiet:
                _log(f"stopped {name} (pid {pid})")
        temp_dir = (state.get("ray") or {}).get("temp_dir")
        if temp_dir and Path(temp_dir).name.startswith("vitaclip-stack-"):
            shutil.rmtree(temp_dir, ignore_errors=True)
    stack.state_file.unlink(missing_ok=True)
    stack.token_file.unlink(missing_ok=True)


def down(args: argparse.Namespace) -> int:
    stack = Stack(Path(args.state_dir))
    state = stack.load()
    if state is None:
        _log(f"no stack state in {stack.state_dir}: nothing to stop")
        return 0
    down_state(stack, state)
    _log("local stack stopped")
    return 0


def status(args: argparse.Namespace) -> int:
    stack = Stack(Path(args.state_dir))
    state = stack.load()
    if state is None:
        _log(f"down (no state in {stack.state_dir})")
        return 3
    healthy = True
    for name, (pid, port) in sorted(_processes(state).items()):
        alive, listening = _pid_alive(pid), _port_open(port)
        healthy &= alive and listening
        _log(f"{name}: pid {pid} {'running' if alive else 'GONE'}, port {port} {'open' if listening else 'CLOSED'}")
    if healthy:
        _log("")
        _log(usage_text(stack, state))
    return 0 if healthy else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stack.py", description="Local S3 server + Ray head for vitaclip.")
    p.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="state, logs, token (default: out/local-stack)")
    sub = p.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the stack")
    p_up.add_argument("--s3-server", choices=("auto", "moto", "minio"), default="auto")
    p_up.add_argument("--s3-port", type=int, default=9000, help="preferred port (another when taken; 0: any)")
    p_up.add_argument("--ray-port", type=int, default=6379, help="preferred GCS port")
    p_up.add_argument("--dashboard-port", type=int, default=8265, help="preferred dashboard / Jobs API port")
    p_up.add_argument("--ray-num-cpus", type=int, help="CPUs the Ray head offers (default: all)")
    p_up.add_argument("--no-ray", action="store_true", help="S3 server and sample videos only")
    p_up.add_argument("--bucket", default="vitaclip-local")
    p_up.add_argument("--num-videos", type=int, default=4)
    sub.add_parser("down", help="stop the stack")
    sub.add_parser("status", help="show what runs")
    for name in ("down", "status"):  # --state-dir also after the command
        sub.choices[name].add_argument("--state-dir", default=argparse.SUPPRESS)
    p_up.add_argument("--state-dir", default=argparse.SUPPRESS)
    return p


_WORKER_PORTS = range(10002, 20000)  # Ray hands these to workers by default; its other ports must stay out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("ray_port", "dashboard_port"):
        if getattr(args, flag, 0) in _WORKER_PORTS:
            parser.error(
                f"--{flag.replace('_', '-')} {getattr(args, flag)} is in the range Ray gives its workers "
                f"({_WORKER_PORTS.start}-{_WORKER_PORTS.stop - 1}): choose a port outside it"
            )
    return {"up": up, "down": down, "status": status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

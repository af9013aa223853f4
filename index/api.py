"""The search service's HTTP API: one FastAPI app, served by `vitaclip serve` (uvicorn) and by Ray Serve replicas.

Routes (OpenAPI at ``/docs`` and ``/openapi.json``):

    GET  /search?q=TEXT&k=10&segments=false&label=&min_duration=&max_duration=&index=   text query
    POST /search            {"text" | "video_id" (+ "segment_index") | "embedding", "k", filters, "index"}
    POST /search/upload?k=..  body: a picture (JPEG, PNG, ...) or a short clip, embedded with the index's model
    GET  /indexes            the outputs this service holds
    GET  /videos/{video_id}, GET /thumbnails/{row_id}.jpg, GET /media/{video_id}   (?index=NAME)
    GET  /healthz, GET /metrics (Prometheus), GET / (the page; `index.web`: its headers and the docs' assets)

Every GET route answers HEAD too (the same status and headers, no body: load balancers check health with HEAD).

The request models are the one place input is checked: a request they refuse gets 422 with ``error`` (one line)
and ``detail`` (pydantic's list, inputs left out and names cut short). Every other refusal is ``{"error": ...}``
with a fixed message. Answers never carry credentials, internals or what the client sent, and no server path but
one: an indexed video's ``uri`` (in each hit and in ``/videos/{video_id}``), which for a local video is the absolute
path of its file on the server (an object store URI for others; credentials masked in both).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from index.http_media import ResponseAbandoned, media_answer, send_media
from index.media import MediaFile, MediaRefused
from index.queries import QueryError, StorageUnavailable, UploadTimeout
from index.search import MAX_K, MAX_QUERY_CHARS, Filters, Hit, SearchEngine, unknown_label_note
from index.service import Busy, QueryTimeout, SearchService, UnknownIndex
from index.web import SECURITY_HEADERS, SecurityHeaders, add_docs_routes, add_page_route
from vitaclip.redact import has_object_userinfo, redact_text, redact_url

log = logging.getLogger("vitaclip.serve")

MAX_EMBEDDING_DIM = 4096
UPLOAD_PATH = "/search/upload"
MEDIA_PREFIX = "/media/"
IndexParam = Annotated[str | None, Query(max_length=64, description="which output (default: the first)")]
CLIENT_CLOSED = 499  # nginx's status for a client that went away: nothing is sent, the metrics count it apart
PARSE_ON_LOOP_BYTES = 16 << 10  # JSON bodies larger than this are parsed on a thread
MAX_REPORTED_ERRORS = 10  # of a 422: a body with 10,000 unknown keys gets the first ten
MAX_ECHOED_NAME = 40  # characters of a key name a 422 repeats (a key may be 1 MB long)
_ROW_FILE = re.compile(r"([0-9]{1,19})\.jpg")  # ASCII digits only: str.isdigit() takes '²'
_DECLARED_LENGTH = re.compile(rb"[0-9]{1,19}")


# ---------------------------------------------------------------------------------------------------- models


class FilterFields(BaseModel):
    """Filters applied inside the search: k results come back whenever k rows pass them."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, le=MAX_K, description="results wanted")
    segments: bool = Field(False, description="search moments (segments) instead of whole videos")
    label: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="only rows whose stored labels (the top-k) include this exact name",
    )
    min_duration: float | None = Field(None, ge=0, allow_inf_nan=False, description="seconds, whole video")
    max_duration: float | None = Field(None, ge=0, allow_inf_nan=False, description="seconds, whole video")
    index: str | None = Field(None, max_length=64, description="which output (see /indexes); default: the first")

    def filters(self) -> Filters:
        return Filters(label=self.label, min_duration=self.min_duration, max_duration=self.max_duration)

    @field_validator("k", mode="before")
    @classmethod
    def _k_digits(cls, value: Any) -> Any:
        # From a query string: digits only (lax parsing took "5_0" for 50 and " 5 " for 5).
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise ValueError("must be a whole number written in digits")
        if isinstance(value, str):
            digits = value.lstrip("0") or "0"  # "0000005" is 5, as int() reads it
            if len(digits) > 6:  # not parsed: int() of a long string is slow
                raise ValueError(f"Input should be less than or equal to {MAX_K}")
            return digits
        return value

    @model_validator(mode="after")
    def _durations_in_order(self) -> FilterFields:
        if self.min_duration is not None and self.max_duration is not None and self.min_duration > self.max_duration:
            raise ValueError("min_duration must not be above max_duration")
        return self


class TextQuery(FilterFields):
    """``GET /search`` parameters."""

    q: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="the text to search for")

    @model_validator(mode="after")
    def _not_blank(self) -> TextQuery:
        if not self.q.strip():
            raise ValueError("q is empty")
        return self


class SearchRequest(FilterFields):
    """``POST /search``: exactly one of ``text``, ``video_id`` ("more like this") or ``embedding``."""

    # JSON numbers only: lax parsing would take `true` for 1 (query strings, in `FilterFields`, must be parsed).
    k: int = Field(10, ge=1, le=MAX_K, strict=True, description="results wanted")
    text: str | None = Field(None, min_length=1, max_length=MAX_QUERY_CHARS)
    video_id: str | None = Field(None, min_length=1, max_length=128, description="more like this indexed video")
    segment_index: int | None = Field(None, ge=0, strict=True, description="with video_id: more like this moment of it")
    embedding: list[Annotated[float, Strict()]] | None = Field(  # JSON numbers only: not true, not "1"
        None, min_length=1, max_length=MAX_EMBEDDING_DIM, description="a raw query vector of the index's dimension"
    )

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        given = [name for name in ("text", "video_id", "embedding") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, video_id, embedding (got {given or 'none'})")
        if self.segment_index is not None and self.video_id is None:
            raise ValueError("segment_index goes with video_id")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty")
        return self


class UploadQuery(FilterFields):
    """``POST /search/upload`` parameters (the body is the picture or clip)."""


class HitOut(BaseModel):
    uri: str = Field(
        description="the indexed object: an object store URI, or a local file's absolute path on the server "
        "(credentials masked)"
    )
    score: float
    video_id: str
    row_id: int
    start_seconds: float | None
    end_seconds: float | None
    duration_seconds: float | None
    segment_index: int | None
    labels: list[str]
    label_scores: list[float]
    thumbnail_url: str
    media_url: str = Field(description="the video; with #t=start,end a player starts at the matched moment")


class SearchResponse(BaseModel):
    kind: Literal["text", "video", "embedding", "upload"]
    query: str | None = Field(description="the text, or the video id of a 'more like this' query")
    index: str
    results: list[HitOut]
    took_ms: float
    notes: list[str] = Field(
        default_factory=list, description="why there are no results where it can be told: a label no row has"
    )


class IndexOut(BaseModel):
    name: str
    model_id: str
    table_versions: dict[str, int] | None
    indexes: dict[str, dict[str, Any]]
    encodes_media: bool
    loaded_at: str  # when this process loaded the output's index (UTC); a run's update is loaded within a minute


class Health(BaseModel):
    status: Literal["ok"]
    indexes: dict[str, dict[str, Any]]


class ErrorOut(BaseModel):
    error: str
    reason: str | None = None


# ---------------------------------------------------------------------------------------------------- helpers


def row_uri(uri: str) -> str:
    """A row's URI as answered. An ``s3://`` or ``gs://`` URI names a key, in which "?" and "#" are characters, not a
    query: masking "secret-looking" parameters there answered another key (``v/q?token=***.mp4``). Only
    credentials before a bucket are masked in those (rows never hold them unmasked); other URIs as `redact_url`."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("s3", "s3a", "gs", "gcs"):
        return redact_url(uri) if has_object_userinfo(uri) else uri
    return redact_url(uri)


def _hit_out(hit: Hit, name: str) -> HitOut:
    suffix = f"?index={quote(name)}"
    media = f"/media/{quote(hit.video_id, safe='')}{suffix}"
    if hit.start_seconds is not None and hit.end_seconds is not None:
        media += f"#t={hit.start_seconds:g},{hit.end_seconds:g}"
    return HitOut(
        **dict(hit.to_dict(), uri=row_uri(hit.uri)),
        thumbnail_url=f"/thumbnails/{hit.row_id}.jpg{suffix}",
        media_url=media,
    )


def _error(status: int, message: str, reason: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if reason is not None:
        body["reason"] = reason
    return JSONResponse(body, status_code=status, headers=headers)


def _no_repeated_parameters(request: Request) -> None:
    counts = Counter(key for key, _ in request.query_params.multi_items())  # linear: 12,000 keys took 2 s with count()
    repeated = sorted(key for key, count in counts.items() if count > 1)[:MAX_REPORTED_ERRORS]
    if repeated:  # one error per name (their names joined read as one dotted path); an empty name said as such
        raise RequestValidationError(
            [
                {"loc": ["query", key or "(empty name)"], "msg": "given more than once", "type": "repeated"}
                for key in repeated
            ]
        )


def _only_parameters(*names: str) -> Callable[[Request], None]:
    """A route dependency refusing query parameters other than `names` (422): a misspelt ``?indx=news`` answered
    from the default output, and ``POST /search?index=news`` (whose output is named in the body) quietly too."""
    allowed = frozenset(names)

    def check(request: Request) -> None:
        unknown = sorted({key for key in request.query_params if key not in allowed})[:MAX_REPORTED_ERRORS]
        if unknown:
            where = f"takes only {', '.join(sorted(allowed))}" if allowed else "takes none (the body holds the query)"
            raise RequestValidationError(
                [
                    {"loc": ["query", key or "(empty name)"], "msg": f"unknown query parameter: this route {where}",
                     "type": "extra_forbidden"}
                    for key in unknown
                ]
            )  # fmt: skip

    return check


MAX_BODY_KEYS = 32  # a search request has a dozen fields


class _BodyRefused(ValueError):
    pass


def _pairs_checked(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_BODY_KEYS:
        raise _BodyRefused(f"an object of {len(pairs)} keys, more than the {MAX_BODY_KEYS} a search request may have")
    counts = Counter(key for key, _ in pairs)
    repeated = sorted(key for key, count in counts.items() if count > 1)
    if repeated:
        raise _BodyRefused(f"{_short(repeated[0])!r} given more than once")
    return dict(pairs)


async def _plain_json_body(request: Request) -> None:
    """Refuses, before pydantic sees it, a body that is not JSON by its Content-Type, or a JSON object with repeated
    keys (JSON parsers keep the last) or with more keys than a request has: pydantic builds an error per unknown key,
    and 80,000 of them in a 1 MiB body held the event loop for seconds."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise RequestValidationError(
            [{"loc": ["header", "content-type"], "msg": "send the query as JSON with Content-Type: application/json",
              "type": "content_type"}]
        )  # fmt: skip
    body = await request.body()
    try:
        if len(body) > PARSE_ON_LOOP_BYTES:  # parsing 256 KiB of nested lists takes tens of ms: off the event loop
            parsed = await run_in_threadpool(json.loads, body, object_pairs_hook=_pairs_checked)
        else:
            parsed = json.loads(body, object_pairs_hook=_pairs_checked)
    except _BodyRefused as exc:
        raise RequestValidationError([{"loc": ["body"], "msg": str(exc), "type": "body_shape"}]) from None
    except RecursionError:  # thousands of nested brackets: the parser's recursion limit (no request nests so)
        msg = "the JSON body nests too deeply"
        raise RequestValidationError([{"loc": ["body"], "msg": msg, "type": "body_shape"}]) from None
    except UnicodeDecodeError:  # FastAPI's parse would answer 400 "could not be read": a body that is not JSON is 422
        msg = "the JSON body is not UTF-8 text"
        raise RequestValidationError([{"loc": ["body"], "msg": msg, "type": "json_invalid"}]) from None
    except json.JSONDecodeError:
        return  # not JSON: FastAPI's own parse says so
    except ValueError:  # valid JSON Python will not read: an integer of more digits than int() converts (4,300)
        msg = "the JSON body holds a number too long to read"
        raise RequestValidationError([{"loc": ["body"], "msg": msg, "type": "json_invalid"}]) from None
    request._json = parsed  # what Starlette's `Request.json()` keeps: FastAPI takes it instead of parsing again


class _JsonBodyRoute(APIRoute):
    """A route whose JSON body `_plain_json_body` checks and parses once, before FastAPI reads it (a dependency
    runs only after FastAPI has parsed the body: every body was parsed twice on the event loop)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            await _plain_json_body(request)
            return await handler(request)

        return checked


def _same_site_or_navigation(request: Request) -> None:
    """Refuses what a page on another site makes a browser send here (Fetch Metadata: ``Sec-Fetch-Site:
    cross-site``), except a top-level GET navigation (a link to a video or to the page). An ``<img>`` or a
    ``fetch()`` on any site a user opens could otherwise run searches through the user's browser, from where it
    reaches (127.0.0.1, a company network), and take the query slots: it cannot read the answers (no CORS), but
    the work is done. Clients other than browsers send no such header; same-site pages (another port of this
    host, a sibling subdomain) are not refused."""
    headers = request.headers
    if headers.get("sec-fetch-site") != "cross-site":
        return
    navigation = headers.get("sec-fetch-mode") == "navigate" and headers.get("sec-fetch-dest") == "document"
    if not (navigation and request.method in ("GET", "HEAD")):
        raise _CrossSiteRefused


class _CrossSiteRefused(Exception):
    pass


UPLOAD_TYPES = ("image/", "video/", "application/octet-stream")


def _upload_content_type(request: Request) -> None:
    """Refuses an upload not typed as a picture, a video or bytes. A page on another site may POST a body without
    asking (a "simple" request: no type, text/plain, a form) and, though it cannot read the answer, keep the upload
    slots and decoders busy; the types accepted here make the browser ask first, and this service never consents."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not content_type.startswith(UPLOAD_TYPES):
        shown = f"Content-Type {_short(content_type)!r}" if content_type else "no Content-Type"
        raise _UploadTypeRefused(
            f"an upload with {shown}: send the picture or clip as image/..., video/... or application/octet-stream "
            "(curl: -H 'Content-Type: image/jpeg')"
        )


class _UploadTypeRefused(Exception):
    pass


def _short(part: Any) -> Any:
    """A location part as a 422 may repeat it: a key name the client chose, cut to `MAX_ECHOED_NAME` characters."""
    if isinstance(part, str) and len(part) > MAX_ECHOED_NAME:
        return part[:MAX_ECHOED_NAME] + "..."
    return part


def _reported_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic's errors as plain JSON without what was sent: no input, no context, at most `MAX_REPORTED_ERRORS`,
    key names cut short."""
    # Built from the three fields kept: each error holds what was sent (`input`, maybe a 256 KiB list), which must
    # not be serialised only to be dropped.
    return [
        {
            "type": str(error.get("type", "")),
            "loc": [_short(part) if isinstance(part, str | int) else str(part) for part in error.get("loc", ())[:8]],
            "msg": str(error.get("msg", "")),
        }
        for error in list(errors)[:MAX_REPORTED_ERRORS]
    ]


def _validation_message(errors: Any) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body"))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


def _status_message(status: int) -> str:
    """A fixed message for a status the framework answered (its own texts are fixed too, but need not stay so)."""
    if status == 400:
        return "the request body could not be read"
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "refused"


class _MediaResponse(Response):
    """Streams a checked media file (Range, conditional requests); the file is closed whatever happens."""

    def __init__(self, media: MediaFile, request: Request) -> None:
        super().__init__()
        self.media = media
        self.answer = media_answer(media, request.headers, method=request.method)
        self.status_code = self.answer.status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_media(self.media, self.answer, receive, send)


# ---------------------------------------------------------------------------------------------------- the app


CONNECTION_CLOSING = "vitaclip.connection_closing"  # scope key: the request's connection is closing (set by
# `guarded_protocol`)


class ClientGone(ResponseAbandoned):
    """An answer whose connection closed while it was sent (the client left, or read nothing for the send timeout):
    nothing to log, nothing more to send (uvloop raises a RuntimeError on a write to a closed transport)."""


class RequestLimits:
    """ASGI middleware: body size (413), stalled-body and slow-body (408) limits, and request counts by route and
    status.

    A body must arrive whole within the request timeout, and may stall at most the body timeout between chunks (a
    byte every few seconds would otherwise hold a connection for ever).
    """

    def __init__(self, app: ASGIApp, service: SearchService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.service.limits
        cap = limits.max_upload_bytes if scope["path"] == UPLOAD_PATH else limits.max_json_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        state: dict[str, Any] = {"status": 500, "answered": False, "received": 0, "body_done": False}
        body_deadline = time.monotonic() + limits.request_timeout_seconds

        async def answer(status: int, message: str) -> None:
            if not state["answered"]:
                state["answered"], state["status"] = True, status
                await _error(status, message)(scope, receive, send)

        if declared is not None and (not _DECLARED_LENGTH.fullmatch(declared) or int(declared) > cap):
            await answer(413, f"the request body is larger than {cap} bytes")
            self._count(scope, state["status"])
            return

        async def limited_receive() -> Message:
            if state["body_done"]:
                return await receive()
            left = body_deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(limits.body_timeout_seconds, left)))
            except TimeoutError:
                if left < limits.body_timeout_seconds:
                    await answer(408, f"the request body took longer than {limits.request_timeout_seconds:g} s")
                else:
                    await answer(408, f"the request body stalled for {limits.body_timeout_seconds:g} s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["body_done"] = not message.get("more_body", False)
                if state["received"] > cap:
                    await answer(413, f"the request body is larger than {cap} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            if state["answered"]:
                return  # a limit already answered this request
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            try:
                await send(message)
            except Exception as exc:
                closing = scope.get(CONNECTION_CLOSING)
                if closing is None or not closing():
                    raise  # a bug in the answer, not a client gone
                state["status"] = CLIENT_CLOSED
                raise ClientGone() from exc

        try:
            await self.app(scope, limited_receive, tracked_send)
        finally:
            self._count(scope, state["status"])

    def _count(self, scope: Scope, status: int) -> None:
        endpoint = scope.get("endpoint")
        route = getattr(endpoint, "__name__", "unknown") if endpoint is not None else "unknown"
        self.service.metrics.requests.labels(route=route, status=str(status)).inc()


class HeadAsGet:
    """ASGI middleware: a HEAD request is answered as its GET would be, without the body (RFC 9110 9.3.2).

    FastAPI's routes take only the methods they declare, so every GET route answered HEAD with 405, and load
    balancers check health with HEAD. ``/media`` declares HEAD itself: there HEAD never reads the file.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or scope["path"].startswith(MEDIA_PREFIX):
            await self.app(scope, receive, send)
            return
        ended = False

        async def without_body(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.body":
                if ended:
                    return
                ended = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


def create_app(service: SearchService) -> FastAPI:
    """The ASGI app for `service` (uvicorn: `index.service.serve`; Ray Serve: `jobs.ray_serve`)."""
    app = FastAPI(
        title="vitaclip search",
        summary="Text, video, picture and embedding search over videos indexed with Vita-CLIP.",
        version="1",
        docs_url=None,  # `add_docs_routes`: the same docs, assets served here rather than from a CDN
        redoc_url=None,
        dependencies=[Depends(_same_site_or_navigation)],
    )
    app.add_middleware(RequestLimits, service=service)
    app.add_middleware(HeadAsGet)  # outside the limits: they count the route the GET found
    app.add_middleware(SecurityHeaders)  # outermost: the limits' own answers carry the headers too
    add_page_route(app)
    add_docs_routes(app, title="vitaclip search")
    _add_error_handlers(app)
    _add_search_routes(app, service)
    _add_object_routes(app, service)

    @app.get("/indexes", response_model=list[IndexOut])
    async def indexes() -> list[dict[str, Any]]:
        return service.describe()

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, Any]:
        engines = service.engines.items()
        stats = {name: {**engine.stats(), "output_gone": name in service.gone} for name, engine in engines}
        return {"status": "ok", "indexes": stats}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _reported_errors(exc.errors())
        return JSONResponse({"error": _validation_message(errors), "detail": errors}, status_code=422)

    @app.exception_handler(_CrossSiteRefused)
    async def cross_site(_request: Request, _exc: _CrossSiteRefused) -> JSONResponse:
        return _error(403, "a request a page on another site made: refused (open this service's own page)")

    @app.exception_handler(_UploadTypeRefused)
    async def upload_type(_request: Request, exc: _UploadTypeRefused) -> JSONResponse:
        return _error(415, str(exc))

    @app.exception_handler(UnknownIndex)
    async def unknown(_request: Request, exc: UnknownIndex) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(QueryError)
    async def bad_query(_request: Request, exc: QueryError) -> JSONResponse:
        return _error(400 if "no such" not in str(exc) else 404, str(exc))

    @app.exception_handler(UploadTimeout)
    async def upload_too_slow(_request: Request, exc: UploadTimeout) -> JSONResponse:
        return _error(503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(StorageUnavailable)
    async def storage_failed(_request: Request, exc: StorageUnavailable) -> JSONResponse:
        log.warning("a read of the output failed: %s", redact_text(str(exc.__cause__ or exc)))
        return _error(503, "the output's storage did not answer: try again", headers={"Retry-After": "5"})

    @app.exception_handler(Busy)
    async def busy(_request: Request, _exc: Busy) -> JSONResponse:
        return _error(503, "the service is busy: every query slot stayed taken", headers={"Retry-After": "1"})

    @app.exception_handler(QueryTimeout)
    async def too_slow(_request: Request, _exc: QueryTimeout) -> JSONResponse:
        return _error(504, "the query took longer than the service's request timeout")

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> JSONResponse:
        # Deliberate refusals are QueryError (above) or the models' 422; any other ValueError's text may quote
        # the input or internals, so it stays in the log (cut short: it may be long) and the client gets a fixed one.
        text = redact_text(str(exc))
        log.warning("request %s %s refused: %s: %.200s", request.method, request.url.path, type(exc).__name__, text)
        return _error(400, "the request could not be answered")

    @app.exception_handler(ClientDisconnect)
    async def client_left(_request: Request, _exc: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # a limit answered already, or the client left: nothing to log

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # Starlette's and FastAPI's own refusals (404, 405, a body that could not be read) in this API's shape.
        if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI turns a body cut short into a 400
            return Response(status_code=CLIENT_CLOSED)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(app, request)
        return _error(exc.status_code, _status_message(exc.status_code), headers=headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, ResponseAbandoned):  # logged where it happened; too late to answer anyway
            log.exception("request %s %s failed", request.method, request.url.path)
        return _error(500, "internal error")


def _allowed_methods(app: FastAPI, request: Request) -> str:
    """Every method some route takes at this path (Starlette's 405 names only the first route's), HEAD wherever GET
    is (`HeadAsGet`)."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE:  # the path matches
            methods |= route.methods or set()
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


_NO_SEGMENTS = "this index has no segments: run the job with --segment-seconds"


async def _answer(
    service: SearchService,
    params: FilterFields,
    kind: Literal["text", "video", "embedding", "upload"],
    query: str | None,
    run: Callable[[SearchEngine], list[Hit]],
) -> SearchResponse:
    name, engine = service.engine(params.index)
    table = "segments" if params.segments else "videos"
    if table not in engine.indexes:  # said here: the engine's own ValueError would reach the client as a fixed text
        raise QueryError(
            _NO_SEGMENTS
            if params.segments
            else "this index has no videos: no row has status ok yet (see `vitaclip runs OUT`)"
        )
    started = asyncio.get_running_loop().time()
    hits = await service.run_query(lambda: run(engine), kind="upload" if kind == "upload" else "query")
    took = asyncio.get_running_loop().time() - started
    service.metrics.search_seconds.labels(index=name, kind=kind).observe(took)
    note = unknown_label_note(engine, params.label, segments=params.segments) if not hits else None
    return SearchResponse(
        kind=kind,
        query=query,
        index=name,
        results=[_hit_out(h, name) for h in hits],
        took_ms=round(took * 1000, 2),
        notes=[note] if note else [],
    )


async def _more_like(service: SearchService, body: SearchRequest, video_id: str) -> SearchResponse:
    """``POST /search`` with ``video_id``: its stored vector is read on the media threads (`run_storage`), and only
    the search takes a query slot."""
    filters, k, segments, segment_index = body.filters(), body.k, body.segments, body.segment_index
    name, engine = service.engine(body.index)
    if (segment_index is not None or segments) and "segments" not in engine.indexes:
        raise QueryError(_NO_SEGMENTS)  # not "no such segment": no segment of any video was indexed
    stored = await service.run_storage(name, lambda: engine.row_vector(video_id, segment_index))
    return await _answer(
        service,
        body,
        "video",
        video_id,
        lambda e: e.more_like(
            video_id, segment_index=segment_index, k=k, segments=segments, filters=filters, vector=stored
        ),
    )


def _add_search_routes(app: FastAPI, service: SearchService) -> None:
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 404, 413, 503, 504)}

    @app.get(
        "/search", response_model=SearchResponse, responses=errors, dependencies=[Depends(_no_repeated_parameters)]
    )
    async def search(params: Annotated[TextQuery, Query()]) -> SearchResponse:
        """Text to video (or to moments, with ``segments=true``)."""
        return await _answer(
            service,
            params,
            "text",
            params.q,
            lambda e: e.search(params.q, k=params.k, segments=params.segments, **_filter_kwargs(params)),
        )

    async def search_post(body: SearchRequest) -> SearchResponse:
        """Text, "more like this" (an indexed video or one of its segments) or a raw embedding."""
        filters, k, segments = body.filters(), body.k, body.segments
        if body.text is not None:
            text = body.text
            return await _answer(
                service, body, "text", text, lambda e: e.search(text, k=k, segments=segments, **_filter_kwargs(body))
            )
        if body.video_id is not None:
            return await _more_like(service, body, body.video_id)
        vector = body.embedding
        return await _answer(
            service,
            body,
            "embedding",
            None,
            lambda e: e.search_embedding(vector, k=k, segments=segments, filters=filters),
        )

    app.router.add_api_route(
        "/search", search_post, methods=["POST"], response_model=SearchResponse, responses=errors,
        route_class_override=_JsonBodyRoute, dependencies=[Depends(_only_parameters())],
    )  # fmt: skip

    @app.post(
        UPLOAD_PATH,
        response_model=SearchResponse,
        responses=errors,
        dependencies=[Depends(_upload_content_type), Depends(_no_repeated_parameters)],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    m: {"schema": {"type": "string", "format": "binary"}}
                    for m in ("image/*", "video/*", "application/octet-stream")
                },
            }
        },
    )
    async def upload(request: Request, params: Annotated[UploadQuery, Query()]) -> SearchResponse | Response:
        """A picture or a short clip (the request body, up to the service's upload limit) as the query."""
        async with service.upload_body():  # bodies held at once are bounded before one is read
            chunks = [chunk async for chunk in request.stream()]
            if await request.is_disconnected():
                return Response(status_code=CLIENT_CLOSED)  # a limit answered already, or the client left
            data = b"".join(chunks)
            del chunks
            return await _answer(
                service,
                params,
                "upload",
                None,
                lambda e: e.search_upload(data, k=params.k, segments=params.segments, filters=params.filters()),
            )


def _filter_kwargs(params: FilterFields) -> dict[str, Any]:
    return {"label": params.label, "min_duration": params.min_duration, "max_duration": params.max_duration}


def _add_object_routes(app: FastAPI, service: SearchService) -> None:
    not_found: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut}}

    # Which output is meant must not depend on which copy a reader takes, nor on a misspelt name being ignored.
    once = [Depends(_no_repeated_parameters), Depends(_only_parameters("index"))]

    @app.get("/videos/{video_id}", responses=not_found, dependencies=once)
    async def video(video_id: str, index: IndexParam = None) -> JSONResponse:
        """An indexed video's row (no embedding, credentials masked)."""
        name, engine = service.engine(index)
        row = engine.video(video_id)
        if row is None or row.get("status") != "ok":  # rows of files that failed were never indexed
            return _error(404, "no such video")
        safe = dict(row, uri=row_uri(str(row["uri"])), thumbnail_url=f"/thumbnails/{row['row_id']}.jpg?index={name}")
        return JSONResponse(json.loads(json.dumps(safe, default=str)))

    @app.get("/thumbnails/{filename}", response_class=Response, responses=not_found, dependencies=once)
    async def thumbnail(request: Request, filename: str, index: IndexParam = None) -> Response:
        """The JPEG thumbnail of a video or segment row (``{row_id}.jpg``)."""
        found = _ROW_FILE.fullmatch(filename)
        if found is None or int(found.group(1)) >= 2**63:
            return _error(404, "thumbnails are /thumbnails/{row_id}.jpg")
        name, engine = service.engine(index)
        row_id = int(found.group(1))
        data = await service.run_storage(name, lambda: engine.thumbnail(row_id))  # a read: on the media threads
        if data is None:
            return _error(404, "no thumbnail")
        # A browser may keep it, a shared cache (a proxy in front, maybe authenticating) must not; the URL stays
        # when a new version of the video replaces the row, so the browser asks again each time (304 if the same).
        tag = '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'
        headers = {"Cache-Control": "private, no-cache", "ETag": tag}
        if tag in (t.strip() for t in request.headers.get("if-none-match", "").split(",")):
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.head(
        "/media/{video_id}", response_class=Response, responses=not_found, operation_id="media_head", dependencies=once
    )
    @app.get(
        "/media/{video_id}", response_class=Response, responses=not_found, operation_id="media_get", dependencies=once
    )
    async def media(request: Request, video_id: str, index: IndexParam = None) -> Response:
        """The indexed video: streamed with Range (206) and conditional requests (304) for local files, a
        presigned URL (307) for ``s3://`` objects. Only indexed, unchanged objects inside the recorded inputs."""
        name, engine = service.engine(index)
        try:
            target = await service.media(name, engine, video_id)
        except MediaRefused as refused:
            return _error(refused.http_status, refused.message, refused.reason)
        if isinstance(target, str):
            return RedirectResponse(target, status_code=307, headers={"Cache-Control": "no-store"})
        return _MediaResponse(target, request)


# ------------------------------------------------------------------------------------------ uvicorn protocol


def is_loopback_name(host: str) -> bool:
    """``localhost``, ``*.localhost`` (RFC 6761: always this machine) or a loopback address (``127.0.0.1``, ``::1``)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# A Host header: a name (RFC 3986 reg-name characters), an IPv4 address or a bracketed IPv6 one, and a port.
_HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+)(?::([0-9]{0,5}))?")


class HostCheck:
    """Answers 400 to a request whose ``Host`` names none of the allowed hosts (compared without the port).

    A service on a loopback address is reachable from any web page its user opens through DNS rebinding: the page's
    own host name is re-pointed to 127.0.0.1 and its scripts then read the service as same-origin. The browser
    still sends that host name, which is refused here. ``loopback`` allows every loopback name and address.
    """

    def __init__(self, app: ASGIApp, *, allowed: tuple[str, ...], loopback: bool) -> None:
        self.app = app
        self.allowed = frozenset(h.strip("[]").lower() for h in allowed)
        self.loopback = loopback

    def allows(self, host_header: str) -> bool:
        authority = _HOST_HEADER.fullmatch(host_header)  # RFC 9110 7.2: uri-host [":" port], nothing else
        if authority is None or (authority.group(2) and int(authority.group(2)) > 65535):
            return False  # "127.0.0.1:80@evil.example", "localhost:99999"
        host = authority.group(1).strip("[]").lower()
        return host in self.allowed or (self.loopback and is_loopback_name(host))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            found = [v for k, v in scope["headers"] if k == b"host"]
            refusal = None
            if len(found) > 1:  # RFC 9112 3.2: a server must answer 400 (a proxy may read another one than we check)
                refusal = "a request may have only one Host header"
            elif not found and scope.get("http_version") == "1.1":  # RFC 9112 3.2: 400 too (HTTP/1.0 may omit it)
                refusal = "an HTTP/1.1 request must name its host (the Host header)"
            elif found and not self.allows(found[0].decode("latin-1")):
                refusal = "this host name is not served here (see vitaclip serve --allowed-host)"
            if refusal is not None:
                response = JSONResponse({"error": refusal}, status_code=400)
                await SecurityHeaders(response)(scope, receive, send)  # the app's own headers sit inside this check
                return
        await self.app(scope, receive, send)


def host_checked(app: ASGIApp, *, bind_host: str | None, allowed_hosts: tuple[str, ...]) -> ASGIApp:
    """`app` behind a `HostCheck` where one is needed: a server on a loopback address answers loopback names and
    `allowed_hosts`; one on another address (None: not known here) answers only `allowed_hosts` when some are given,
    any name otherwise."""
    loopback = bind_host is not None and is_loopback_name(bind_host)
    if not loopback and not allowed_hosts:
        return app
    return HostCheck(app, allowed=allowed_hosts, loopback=loopback)


def _head_part(tail: bytes, data: bytes) -> int:
    """How many bytes of `data` belong to a request head, given the last bytes of the head before it (`tail`): up
    to the blank line that ends the head, or all of them."""
    joined = tail + data
    ends = [found + len(mark) for mark in (b"\r\n\r\n", b"\n\n") if (found := joined.find(mark)) >= 0]
    return max(0, min(ends) - len(tail)) if ends else len(data)


class _HeadSize:
    """A uvicorn protocol's part that answers 431 to a request head past ``head_limit_bytes`` (None: no limit), for
    httptools' protocol: its parser callbacks say where a head ends (``on_headers_complete``)."""

    head_limit_bytes: int | None = None
    head_refusal = b""
    refusal_hooks: tuple[Callable[[str], None], ...] = ()  # `guarded_protocol`'s ``on_refusal``
    transport: asyncio.Transport
    _in_head = True  # between requests or inside a request head: what arrives counts against the head size
    _head_bytes = 0
    _head_tail = b""  # the head's last bytes so far: its blank line may come split over two reads

    def data_received(self, data: bytes) -> None:
        if self.head_limit_bytes is None or not self._in_head or self.transport.is_closing():
            super().data_received(data)  # type: ignore[misc]
            return
        # Counted before parsing, up to the head's end: a head's bytes and nothing of the body that follows.
        counted = _head_part(self._head_tail, data)
        self._head_tail = (self._head_tail + data[:counted])[-3:]
        if not self._count_head(counted, self.head_limit_bytes):
            return
        super().data_received(data)  # type: ignore[misc]
        if self._in_head:  # no head ended there after all (blank lines before a request line): all of it counts
            self._count_head(len(data) - counted, self.head_limit_bytes)

    def _count_head(self, size: int, limit: int) -> bool:
        """Adds `size` bytes to the head; past `limit` answers 431 and closes (False)."""
        self._head_bytes += size
        if self._head_bytes <= limit:
            return True
        if not self.transport.is_closing():
            self._refused("head_too_large")
            self.transport.write(self.head_refusal)
            self.transport.close()
        return False

    def _refused(self, reason: str) -> None:
        """Counted for the operator: what never reaches the app."""
        for hook in self.refusal_hooks:
            hook(reason)


class _LingeringTransport:
    """A transport whose ``close()``, while the client may still be sending a request body the answer came before
    (413, a busy upload slot, on a connection the client asked to close), ends the answer with a FIN and reads on
    for up to `linger_seconds`, dropping what comes, before it closes: closing at once with unread data makes the
    kernel send a reset, and most clients (urllib, requests) then report the reset instead of the answer."""

    def __init__(self, transport: asyncio.Transport, protocol: Any, linger_seconds: float) -> None:
        self._transport = transport
        self._protocol = protocol
        self._linger_seconds = linger_seconds
        self._timer: asyncio.TimerHandle | None = None
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        cycle = self._protocol.cycle
        body_unread = cycle is not None and cycle.response_complete and cycle.more_body
        if self.lingering or not body_unread or self._transport.is_closing() or not self._transport.can_write_eof():
            self.cancel()
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()
        self._transport.resume_reading()
        self._timer = self._protocol.loop.call_later(self._linger_seconds, self._transport.close)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()


class _HeadTimer:
    """A uvicorn protocol's part closing a connection that has not sent a whole request head within
    ``head_timeout_seconds`` of connecting or of the previous answer (`_HeadSize` counts the head's bytes)."""

    head_timeout_seconds = 10.0
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any
    _head_timer: asyncio.TimerHandle | None = None
    _in_head: bool
    _head_bytes: int
    _head_tail: bytes
    _refused: Callable[[str], None]  # `_HeadSize`'s

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_seconds, self._head_timeout)

    def _head_timeout(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            if self._head_bytes or self.cycle is None:  # a head begun or never sent; not an idle keep-alive
                self._refused("head_timeout")
            self.transport.close()  # no request in progress: the head never came

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.cycle is not None and self.cycle.more_body:
            # Answered before its body was read (413, a busy upload slot): the rest of the body is read and
            # dropped by the parser, not counted as the next head (it was: 431 and a close, so the client,
            # still sending, got a reset instead of the answer). The head timer bounds how long that takes.
            self._in_head = False
        else:
            self._in_head, self._head_bytes, self._head_tail = True, 0, b""
        self._arm()

    def on_message_complete(self) -> None:  # httptools: a request's body has ended
        super().on_message_complete()  # type: ignore[misc]
        if self.cycle is not None and self.cycle.response_complete and not self._in_head:
            self._in_head, self._head_bytes, self._head_tail = True, 0, b""  # the next request's head
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]


class _LingerOnClose:
    """A uvicorn protocol's part: its connection closes through a `_LingeringTransport` (the rest of a body the
    answer came before is read and dropped unparsed, then the connection closes), and each request's scope holds
    whether its connection is closing (`CONNECTION_CLOSING`: the app's send then tells a client gone from a bug)."""

    linger_seconds = 10.0
    cycle: Any
    transport: asyncio.Transport
    _linger: _LingeringTransport

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._linger = _LingeringTransport(transport, self, linger_seconds=self.linger_seconds)
        self.transport = self._linger  # type: ignore[assignment]  # uvicorn's cycles write through it

    def _start_request(self, start: Callable[[], None]) -> None:
        super()._start_request(start)  # type: ignore[misc]
        if self.cycle is not None:
            self.cycle.scope[CONNECTION_CLOSING] = self.transport.is_closing

    def data_received(self, data: bytes) -> None:
        if not self._linger.lingering:
            super().data_received(data)  # type: ignore[misc]  # while lingering: dropped unparsed

    def eof_received(self) -> bool | None:
        if self._linger.lingering:
            self._linger.close()  # the client has sent all it will
            return None
        return super().eof_received()  # type: ignore[misc,no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self._linger.cancel()
        super().connection_lost(exc)  # type: ignore[misc]


class _SendTimeout:
    """A uvicorn protocol's part that closes a connection whose client reads nothing of an answer for
    ``send_limit_seconds``: the transport's buffer stays full (the transport paused writing) that long."""

    send_limit_seconds = 30.0
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _send_timer: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_limit_seconds, self._send_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self._cancel_send_timer()

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timeout(self) -> None:
        self._send_timer = None
        self.transport.abort()  # close() would wait for the client to read what is buffered: maybe never

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_send_timer()
        super().connection_lost(exc)  # type: ignore[misc]


def _parser_refusal(status: HTTPStatus, message: str) -> bytes:
    """A whole HTTP answer to a request the parser refused before the app saw it (malformed, head too large): JSON
    ``{"error": ...}`` with the headers every answer carries (`index.web.SecurityHeaders`), then the connection
    closes."""
    body = json.dumps({"error": message}).encode()
    head = [
        f"HTTP/1.1 {status.value} {status.phrase}".encode(),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
        *(name + b": " + value for name, value in SECURITY_HEADERS),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_BUSY_BODY = json.dumps(
    {"error": "the service is at its connection limit (--max-connections): try again shortly"}
).encode()


async def _busy(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer past the connection limit, in place of uvicorn's plain-text one: JSON with the security headers,
    ``retry-after``, and the connection closed."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_BUSY_BODY)).encode()),
        (b"connection", b"close"),
        (b"retry-after", b"1"),
        *SECURITY_HEADERS,
    ]
    await send({"type": "http.response.start", "status": HTTPStatus.SERVICE_UNAVAILABLE.value, "headers": headers})
    await send({"type": "http.response.body", "body": _BUSY_BODY})


class _ConnectionLimit:
    """A uvicorn protocol's part that answers requests past the server's ``limit_concurrency`` with `_busy`.
    uvicorn's own check answers them with plain text and none of the security headers, without the app; the same
    check is made here instead, and uvicorn's is turned off."""

    app: Any
    connections: set[Any]
    tasks: set[Any]
    logger: logging.Logger
    limit_concurrency: int | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None

    def _busy_now(self) -> bool:
        limit = self.max_connections
        return limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)

    def _start_request(self, start: Callable[[], None]) -> None:
        """Runs uvicorn's request start (`start`) with `_busy` as the app while past the limit."""
        if not self._busy_now():
            start()
            return
        self.logger.warning("Exceeded concurrency limit.")
        self._refused("max_connections")  # type: ignore[attr-defined]
        app, self.app = self.app, _busy
        try:
            start()
        finally:
            self.app = app

    def handle_events(self) -> None:  # h11's request start
        self._start_request(super().handle_events)  # type: ignore[misc]


def guarded_protocol(
    header_timeout_seconds: float,
    parser: Literal["auto", "httptools", "h11"] = "auto",
    *,
    max_head_bytes: int = 64 << 10,
    send_timeout_seconds: float = 30.0,
    on_refusal: Callable[[str], None] | None = None,
) -> type:
    """uvicorn's HTTP protocol (`parser`; auto: httptools when installed, else h11), closing connections that have
    not sent a whole request head within the timeout, answering 431 to a head past ``max_head_bytes``, and closing
    connections whose client reads nothing of an answer for ``send_timeout_seconds``.

    uvicorn limits idle keep-alive connections but not a request head that never ends; such connections would
    hold service slots forever. httptools sets no size on a head either: one header of 10 MB, or 100,000 headers,
    were read whole, and a few connections sending such heads held hundreds of MB. (h11 has its own limit, which
    `_server` sets to the same size.) Nor does uvicorn limit a client that stops reading: a few hundred of them,
    each in the middle of a video, held every connection slot for good (`/healthz` answered 503).

    `on_refusal` is called with the reason of each request or connection turned away before the app sees it
    (``max_connections``, ``bad_request``, ``head_too_large``, ``head_timeout``), for the service's metrics: a flood
    of such connections shows there, not only as other clients' 503s.
    """
    Base: Any
    try:
        if parser == "h11":
            raise ImportError("h11 asked for")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional: the pure-Python parser
        if parser == "httptools":
            raise
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base
    counts_head = hasattr(Base, "on_headers_complete")  # httptools' parser callbacks; h11 bounds heads itself
    refusal = _parser_refusal(
        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head larger than {max_head_bytes} bytes"
    )

    class GuardedProtocol(_HeadTimer, _LingerOnClose, _ConnectionLimit, _SendTimeout, _HeadSize, Base):  # type: ignore[misc]
        send_limit_seconds = send_timeout_seconds
        head_limit_bytes = max_head_bytes if counts_head else None
        head_refusal = refusal
        refusal_hooks = (on_refusal,) if on_refusal is not None else ()
        linger_seconds = head_timeout_seconds = header_timeout_seconds

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:  # httptools' request start
            self._in_head = False
            self._start_request(super().on_headers_complete)

        def send_400_response(self, msg: str) -> None:  # the parser's refusals, answered as the app's are
            self._refused("bad_request")
            self.transport.write(_parser_refusal(HTTPStatus.BAD_REQUEST, msg))
            self.transport.close()

    return GuardedProtocol

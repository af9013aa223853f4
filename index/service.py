"""The search service's core, independent of the web framework: outputs by name, limits, metrics, media targets.

`index.api.create_app` turns a `SearchService` into the ASGI app; `serve` runs that app with uvicorn, and
`jobs.ray_serve` runs the same app in Ray Serve replicas. Needs the ``serve`` extra (fastapi, uvicorn,
prometheus_client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from index.media import MediaFile, MediaRefused, content_type
from index.queries import QueryError
from index.search import SearchEngine
from vitaclip.redact import install_log_redaction, redact_text

log = logging.getLogger("vitaclip.serve")

T = TypeVar("T")
HttpParser = Literal["auto", "httptools", "h11"]
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PRESIGN_SECONDS = 900
RELOAD_RETRY_SECONDS = 600.0  # a reload that failed is tried again on the same index_info.json after this
_MEDIA_THREADS = 8
"""Media lookups (a file's checks, or an object store's HEAD before a presigned link) at once per service."""


def _close_late_file(future: asyncio.Future[MediaFile | str]) -> None:
    """Closes what a media lookup opened after its request had already been answered 504."""
    if future.cancelled() or future.exception() is not None:
        return
    target = future.result()
    if isinstance(target, MediaFile):
        target.close()


@dataclass(frozen=True)
class ServiceLimits:
    """What one service process accepts. Defaults suit a small machine; raise them behind a proxy on a big one.

    Attributes:
        max_json_bytes: largest JSON request body.
        max_upload_bytes: largest picture or clip uploaded as a query.
        request_timeout_seconds: a query that takes longer gets 504 (its thread finishes on its own).
        header_timeout_seconds: a connection that has not sent a whole request head by then is closed.
        max_head_bytes: largest request head (request line and headers); a larger one gets 431.
        body_timeout_seconds: a request body that stalls for this long between chunks gets 408.
        send_timeout_seconds: an answer the client reads nothing of for this long (the server's send buffer stays
            full) is abandoned and its connection closed; the client gets a cut-off body. Without it, clients that
            stop reading a video held their connections for good, and a few hundred of them every connection slot.
        max_concurrent_queries: queries computed at once; more wait. Text queries computed together are encoded in
            one batch (`index.search.QueryBatcher`), so the default (twice the cores, 4 to 16) keeps batches
            forming: on 2 cores 1.2 ms of CPU per query with 4 or 8 at once against 2.2 ms one at a time.
        max_concurrent_uploads: of those, how many may be uploads (None: half, at least 1; at most all of them).
            An upload decodes for up to 10 s: uploads alone could otherwise hold every slot and text searches get
            503.
        queue_timeout_seconds: a query that waited this long for a slot gets 503 with Retry-After.
        max_connections: open connections and requests before a new request gets 503 (JSON, with Retry-After).
        allowed_hosts: host names (``Host`` header, without the port) answered besides loopback names when the service
            listens on a loopback address; on any other address, when given, the only names answered. Others get
            400: a loopback service must not answer a page whose host name was re-pointed to it (DNS rebinding).
        media_roots: folders of this host that ``/media`` may serve local files from (resolved when the service
            starts), on top of the folders the runs recorded. None: a local output serves from what its runs
            recorded; an object-store output serves no local file (its run records are written by whoever can write
            the bucket, and name folders of the machines that ran the job).
    """

    max_json_bytes: int = 256 << 10  # the largest request (4,096 floats, pretty-printed) is about 130 KB
    max_upload_bytes: int = 20 << 20
    request_timeout_seconds: float = 30.0
    header_timeout_seconds: float = 10.0
    max_head_bytes: int = 64 << 10
    body_timeout_seconds: float = 10.0
    send_timeout_seconds: float = 30.0
    max_concurrent_queries: int = field(default_factory=lambda: max(4, min(16, 2 * (os.cpu_count() or 2))))
    max_concurrent_uploads: int | None = None
    queue_timeout_seconds: float = 10.0
    max_connections: int = 256
    allowed_hosts: tuple[str, ...] = ()
    media_roots: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        roots = self.media_roots
        if roots is not None:  # from a Serve config's YAML: a bare string made a root of every character, '/' first
            if isinstance(roots, (str, bytes)) or not all(isinstance(r, str) for r in roots):
                raise ValueError(f"media_roots must be a list of folders, got {roots!r}")
            for root in roots:
                if not os.path.isabs(root) or not os.path.isdir(root):
                    raise ValueError(f"media root {root!r} is not an absolute path to a folder of this host")
            object.__setattr__(self, "media_roots", tuple(roots))
        sizes = ("max_json_bytes", "max_upload_bytes", "max_head_bytes", "max_concurrent_queries", "max_connections")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "request_timeout_seconds",
            "header_timeout_seconds",
            "body_timeout_seconds",
            "send_timeout_seconds",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        uploads = self.max_concurrent_uploads
        if uploads is not None and not 1 <= uploads <= self.max_concurrent_queries:
            raise ValueError(
                f"max_concurrent_uploads must be 1 to {self.max_concurrent_queries} (max_concurrent_queries), "
                f"got {uploads}"
            )

    @property
    def upload_slots(self) -> int:
        """How many queries at once may be uploads."""
        if self.max_concurrent_uploads is not None:
            return self.max_concurrent_uploads
        return max(1, self.max_concurrent_queries // 2)


class Busy(Exception):
    """Every query slot stayed taken for the queue timeout (answered 503)."""


class QueryTimeout(Exception):
    """A query ran past the request timeout (answered 504)."""


class UnknownIndex(LookupError):
    """A request named an output this service does not hold (answered 404)."""


REFUSAL_REASONS = ("max_connections", "bad_request", "head_too_large", "head_timeout")


class Metrics:
    """Prometheus metrics of one service, in a registry of its own (several services can share a process)."""

    def __init__(self, service: SearchService) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vitaclip_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=self.registry
        )
        self.search_seconds = Histogram(
            "vitaclip_search_seconds",
            "Query latency (encoding and search), by output and query kind.",
            ["index", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refused = Counter(
            "vitaclip_http_refused",
            "Requests and connections turned away before the app (not in vitaclip_http_requests_total), by reason: "
            "max_connections (answered 503), bad_request (400), head_too_large (431), head_timeout (closed).",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason=reason)  # shown at 0 from the start
        self.in_flight = Gauge("vitaclip_queries_in_flight", "Queries computing now.", registry=self.registry)
        self.waiting = Gauge("vitaclip_queries_waiting", "Queries waiting for a slot.", registry=self.registry)
        vectors = Gauge(
            "vitaclip_index_vectors", "Vectors in each loaded index.", ["index", "table"], registry=self.registry
        )
        for name in service.engines:
            for table in ("videos", "segments"):  # a reload may bring an index the first load had not
                vectors.labels(index=name, table=table).set_function(_counter(service, name, table))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _counter(service: SearchService, name: str, table: str) -> Callable[[], float]:
    """The vector count of an output's index as it is loaded now (a reload replaces the engine)."""

    def count() -> float:
        index = service.engines[name].indexes.get(table)
        return float(index.count) if index is not None else 0.0

    return count


class OutputSource:
    """Where a served output lives, to notice that a run updated its index and to load it again.

    A local output is read in place. Of an object-store output (``s3://``, ``gs://``, ``az://``) the index and the
    run records are copied to a local cache (`index.tables.local_copy`, refreshed before each load) and the tables
    are read where they are: the columns search answers with, then a thumbnail's or a stored embedding's row group
    when asked (thumbnails are most of a table's bytes). A change is noticed from ``index/index_info.json`` (a few
    KB read per check), which an index update writes last, and from the tables' latest versions.
    """

    def __init__(self, output: str, *, s3_endpoint_url: str | None = None, cache_root: str | None = None) -> None:
        self.output = output
        self.s3_endpoint_url = s3_endpoint_url
        self.cache_root = cache_root
        self.loaded_stamp: str | None = None  # the stamp taken before the last successful `open`

    def stamp(self) -> str | None:
        """A digest of the output's ``index_info.json`` (a few KB; modification times on object stores have one
        second's resolution, too coarse to tell two updates apart) and of its tables' latest versions (their logs: a
        run's commits change the rows search answers with before its index update, and without one after a
        ``--no-index`` run or a failed update); None when there is no index."""
        import hashlib

        from index.delta_tables import TABLES, OutputLocation, latest_version
        from index.segments import INDEX_DIR, INFO_FILE

        local = "://" not in self.output or self.output.startswith("file://")
        # As `open` reads it: a local output's tables with no endpoint (given one, `vitaclip search` kept working).
        location = OutputLocation.from_url(self.output, s3_endpoint_url=None if local else self.s3_endpoint_url)
        try:
            if local:
                with open(os.path.join(self.output.removeprefix("file://"), INDEX_DIR, INFO_FILE), "rb") as f:
                    data = f.read()
            else:
                filesystem, base = location.filesystem()
                with filesystem.open_input_stream(f"{base}/{INDEX_DIR}/{INFO_FILE}") as f:
                    data = f.read()
        except (FileNotFoundError, NotADirectoryError):  # no index, or an output path that is a file: said by `open`
            return None
        versions = ",".join(str(latest_version(location, table)) for table in TABLES)
        return hashlib.sha256(data + b"\0" + versions.encode()).hexdigest()

    def open(self, **engine_options: Any) -> SearchEngine:
        """A search engine over the output as it is now (an update that lands while it loads is noticed by the
        next `stamp`, taken before loading)."""
        from index.delta_tables import OutputLocation
        from index.tables import local_copy

        stamp = self.stamp()
        remote = "://" in self.output and not self.output.startswith("file://")
        folder = local_copy(
            self.output, s3_endpoint_url=self.s3_endpoint_url, cache_root=self.cache_root, tables=not remote
        )
        if remote:
            engine_options["tables"] = OutputLocation.from_url(self.output, s3_endpoint_url=self.s3_endpoint_url)
        engine = SearchEngine(folder, **engine_options)
        self.loaded_stamp = stamp
        return engine


class SearchService:
    """Search engines by output name, the limits they are served under, and the metrics they report.

    Args:
        engines: output name -> engine; the first is the default for requests that name none.
        limits: request limits (`ServiceLimits`).
        s3_endpoint_url: S3-compatible server for presigning media URLs of ``s3://`` inputs (None: AWS).
        sources: output name -> where it lives, for the outputs to load again when a run updates their index
            (`reload_changed`, `start_reloading`).
    """

    def __init__(
        self,
        engines: Mapping[str, SearchEngine],
        *,
        limits: ServiceLimits | None = None,
        s3_endpoint_url: str | None = None,
        sources: Mapping[str, OutputSource] | None = None,
    ) -> None:
        if not engines:
            raise ValueError("a search service needs at least one output")
        for name in engines:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"output name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        self.engines = dict(engines)
        self.default = next(iter(self.engines))
        self.limits = limits or ServiceLimits()
        roots = self.limits.media_roots
        self._media_roots = None if roots is None else tuple(os.path.realpath(r) for r in roots)
        self.s3_endpoint_url = s3_endpoint_url
        self._s3: Any = None
        self._media_pools: dict[str, ThreadPoolExecutor] = {}  # per output: a store that hangs holds its own only
        self._slots: tuple[asyncio.Semaphore, asyncio.Semaphore] | None = None  # (queries, uploads among them)
        self._upload_bodies: asyncio.Semaphore | None = None
        self.sources = dict(sources or {})
        self._stamps = {name: source.loaded_stamp for name, source in self.sources.items()}
        self._failed: dict[str, tuple[str, float]] = {}  # (stamp, when) of a failed reload: retried only later
        self.gone: set[str] = set()  # outputs whose index was loaded and is no longer there (deleted, moved)
        self._reload_locks = {name: threading.Lock() for name in self.sources}  # one reload of an output at a time
        self._stop_reloading = threading.Event()
        self._reloaders: list[threading.Thread] = []
        self.metrics = Metrics(self)

    def _stamp(self, name: str) -> str | None:
        try:
            return self.sources[name].stamp()
        except OSError as exc:
            log.warning("output %s: cannot check its index (%s)", name, redact_text(str(exc)))
            return self._stamps[name]

    def reload_changed(self) -> list[str]:
        """Loads again every output whose index changed since it was loaded; returns their names.

        The new engine shares the old one's query model and replaces it whole once loaded: queries running
        meanwhile finish on the old one. An output that fails to load (an update still being written, files
        vacuumed under it, another model) keeps its loaded index; the same update is tried again after
        ``RELOAD_RETRY_SECONDS`` (a transient failure), a newer one at once.
        """
        return [name for name, source in self.sources.items() if self._reload(name, source)]

    def _reload(self, name: str, source: OutputSource) -> bool:
        with self._reload_locks[name]:
            return self._reload_one(name, source)

    def _reload_one(self, name: str, source: OutputSource) -> bool:
        stamp = self._stamp(name)
        self._note_gone(name, gone=stamp is None and self._stamps.get(name) is not None)
        if stamp is None or stamp == self._stamps.get(name):
            return False
        failed_stamp, failed_at = self._failed.get(name, ("", 0.0))
        if stamp == failed_stamp and time.monotonic() - failed_at < RELOAD_RETRY_SECONDS:
            return False
        started = time.perf_counter()
        try:
            engine = source.open(queries_from=self.engines[name])
        except Exception as exc:  # noqa: BLE001 - any failure keeps the loaded index until index_info.json changes
            self._failed[name] = (stamp, time.monotonic())
            log.warning(
                "output %s: keeping the index loaded at %s: reloading failed (%s: %s)",
                name,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.engines[name].loaded_at)),
                type(exc).__name__,
                redact_text(str(exc)),
            )
            return False
        self.engines[name] = engine
        self._stamps[name] = source.loaded_stamp
        count = sum(i.count for i in engine.indexes.values())
        log.info("output %s: reloaded (%d vectors) in %.1f s", name, count, time.perf_counter() - started)
        return True

    def _note_gone(self, name: str, *, gone: bool) -> None:
        """Says once when a loaded output's index disappears (the output deleted or moved: searches go on from the
        loaded index, its media and files cannot be served) and once when it is back; `/healthz` lists it."""
        if gone and name not in self.gone:
            self.gone.add(name)
            log.warning(
                "output %s: its index is no longer there (the output deleted or moved?): answering from the index "
                "loaded at %s",
                name,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.engines[name].loaded_at)),
            )
        elif not gone and name in self.gone:
            self.gone.discard(name)
            log.info("output %s: its index is there again", name)

    def start_reloading(self, seconds: float) -> None:
        """Checks every `seconds` for outputs whose index changed and loads them again: a daemon thread per output,
        so that a store that does not answer (its check waits out the client's retries, a minute or more) delays
        that output's reloads only."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"reload seconds must be a number >= 0 (0: never), got {seconds}")
        if seconds == 0 or not self.sources or self._reloaders:
            return

        def loop(name: str, source: OutputSource) -> None:
            while not self._stop_reloading.wait(seconds):
                try:
                    self._reload(name, source)
                except Exception as exc:  # noqa: BLE001 - a bug here must not end reloading for good
                    log.error("checking output %s for updates failed: %s: %s", name, type(exc).__name__,
                              redact_text(str(exc)))  # fmt: skip

        for name, source in self.sources.items():
            thread = threading.Thread(target=loop, args=(name, source), daemon=True, name=f"vitaclip-reload-{name}")
            thread.start()
            self._reloaders.append(thread)

    def stop_reloading(self) -> None:
        self._stop_reloading.set()
        for thread in self._reloaders:
            thread.join(timeout=60)

    def engine(self, name: str | None) -> tuple[str, SearchEngine]:
        chosen = name or self.default
        engine = self.engines.get(chosen)
        if engine is None:
            # The name is repeated only when it could be one (a few safe characters): a client's text is not echoed.
            named = f"named {chosen!r}" if NAME_PATTERN.fullmatch(chosen) else "by that name"
            raise UnknownIndex(f"no output {named}; this service holds {sorted(self.engines)}")
        return chosen, engine

    @contextlib.asynccontextmanager
    async def upload_body(self) -> AsyncIterator[None]:
        """Held from before an upload's body is read until its answer: at most twice the upload slots at once, so
        that the uploads received or waiting for a slot hold at most that many bodies (each up to
        `ServiceLimits.max_upload_bytes`; bodies were read whole first, and 256 connections could hold 5 GiB).
        Others wait within the queue timeout, then get 503 (`Busy`) before their body is read."""
        if self._upload_bodies is None:  # made on first use, inside the serving event loop
            self._upload_bodies = asyncio.Semaphore(2 * self.limits.upload_slots)
        bodies = self._upload_bodies
        try:
            await asyncio.wait_for(bodies.acquire(), self.limits.queue_timeout_seconds)
        except TimeoutError:
            raise Busy() from None
        try:
            yield
        finally:
            bodies.release()

    async def run_query(self, work: Callable[[], T], *, kind: Literal["query", "upload"] = "query") -> T:
        """Runs `work` in a thread once a query slot is free, within the queue and request time limits.

        An upload takes one of the fewer upload slots first (`ServiceLimits.max_concurrent_uploads`), so that
        uploads, which decode for seconds, leave query slots to other queries.
        """
        if self._slots is None:  # made on first use, inside the serving event loop
            limits = self.limits
            self._slots = (asyncio.Semaphore(limits.max_concurrent_queries), asyncio.Semaphore(limits.upload_slots))
        queries, uploads = self._slots
        held = [uploads, queries] if kind == "upload" else [queries]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.queue_timeout_seconds
        taken: list[asyncio.Semaphore] = []
        self.metrics.waiting.inc()
        try:
            for slots in held:  # one queue timeout for both
                await asyncio.wait_for(slots.acquire(), max(0.001, deadline - loop.time()))
                taken.append(slots)
        except BaseException as exc:  # a timeout, or the request cancelled while it waited for its second slot
            for slots in taken:
                slots.release()
            if isinstance(exc, TimeoutError):
                raise Busy() from None
            raise
        finally:
            self.metrics.waiting.dec()

        def in_thread() -> T:
            self.metrics.in_flight.inc()
            try:
                return work()
            finally:
                self.metrics.in_flight.dec()
                for slots in held:  # held until the work ends, even after a timeout
                    loop.call_soon_threadsafe(slots.release)

        future = loop.run_in_executor(None, in_thread)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.limits.request_timeout_seconds)
        except TimeoutError:
            # Answered 504 already: what the work raises later is the client's problem (a refused query) or logged
            # once here, never asyncio's "Future exception was never retrieved" error with a traceback.
            future.add_done_callback(_late_outcome)
            raise QueryTimeout() from None

    def describe(self) -> list[dict[str, Any]]:
        """What `/indexes` lists: per output its model, tables' versions and indexes (count, kind, recall)."""
        out = []
        for name, engine in self.engines.items():
            indexes = {}
            for table, entry in engine.info.get("indexes", {}).items():
                index = engine.indexes[table]
                measured = entry.get("measured") or {}
                indexes[table] = {
                    "count": index.count,
                    "dim": index.dim,
                    "kind": index.plan.kind,
                    "recall_at_10": measured.get("recall_at_10"),
                    "tuned_with": entry.get("tuned_with"),
                }
            out.append(
                {
                    "name": name,
                    "model_id": engine.model_id,
                    "table_versions": engine.table_versions,
                    "indexes": indexes,
                    "encodes_media": getattr(engine, "text_model", None) is not None,
                    "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(engine.loaded_at)),
                }
            )
        return out

    def _media_threads(self, output: str) -> ThreadPoolExecutor:
        """The media threads of one output: an object store that does not answer holds its own output's media
        requests only (with one pool for all, a hung bucket kept a local output's videos waiting for seconds)."""
        pool = self._media_pools.get(output)
        if pool is None:
            pool = self._media_pools.setdefault(
                output, ThreadPoolExecutor(_MEDIA_THREADS, thread_name_prefix=f"vitaclip-media-{output}")
            )
        return pool

    async def run_storage(self, output: str, work: Callable[[], T]) -> T:
        """`work`, a read of the output's files a request needs (a thumbnail, a stored vector), on the output's
        media threads, never in a query slot: an object store that does not answer holds such requests of its
        output only (each until the request timeout: 504), and text searches go on (it held every slot, and
        searches of every output got 503)."""
        future = asyncio.get_running_loop().run_in_executor(self._media_threads(output), work)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.limits.request_timeout_seconds)
        except TimeoutError:
            future.add_done_callback(_late_outcome)
            raise QueryTimeout() from None

    async def media(self, output: str, engine: SearchEngine, video_id: str) -> MediaFile | str:
        """`media_target` on the output's own media threads, never the query threads: an object store that does
        not answer holds media requests of its output only, and text searches go on. A lookup that takes longer
        than the request timeout is refused with 504 (a file it opens afterwards is closed)."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._media_threads(output), self.media_target, engine, video_id)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.limits.request_timeout_seconds)
        except TimeoutError:
            future.add_done_callback(_close_late_file)
            raise MediaRefused("unavailable", "the storage did not answer in time", http_status=504) from None

    def media_target(self, engine: SearchEngine, video_id: str) -> MediaFile | str:
        """The opened local file of an indexed video, or a presigned URL for an indexed ``s3://`` object that is
        still the version indexed.

        Raises:
            MediaRefused: anything that must not be served (with a safe message and status).
        """
        row = engine.video(video_id)
        if row is not None and str(row.get("uri", "")).startswith("s3://") and row.get("status") == "ok":
            return self._presign(row)
        return engine.open_media(video_id, only_under=self._media_roots)

    def _presign(self, row: Mapping[str, Any]) -> str:
        import botocore.exceptions

        from index.s3 import is_transient, make_s3_client, parse_s3_uri

        if self._s3 is None:
            # A request waits on this check: seconds, not the job's minutes of retries (at most 2 x (3 + 5) s).
            self._s3 = make_s3_client(
                endpoint_url=self.s3_endpoint_url, max_attempts=2, connect_timeout_seconds=3, read_timeout_seconds=5
            )
        bucket, key = parse_s3_uri(str(row["uri"]))
        if any(segment in (".", "..") for segment in key.split("/")):
            # Browsers and HTTP clients collapse dot segments (escaped ones too) before sending: the link would ask
            # for another key (a 403 on S3's signature, or another object on a server that checks none).
            raise MediaRefused(
                "unservable", "this object's key has '.' or '..' segments, which no URL can carry", http_status=409
            )
        try:
            head = self._s3.head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # any failure to confirm the object: refuse, without the storage's message
            if is_transient(exc) or not isinstance(exc, botocore.exceptions.ClientError):
                # No answer, a timeout, a 5xx or throttling: the store's trouble, maybe for a moment, not a verdict
                # on the object (a 404 is one clients keep).
                log.warning("media: the object store did not answer the check of an object (%s)", type(exc).__name__)
                raise MediaRefused("unavailable", "the storage did not answer", http_status=503) from None
            raise MediaRefused("missing", "the object is gone or unreadable") from None
        if str(head.get("ETag", "")).strip('"') != row.get("etag"):  # listings store ETags unquoted
            raise MediaRefused("changed", "the object changed since it was indexed", http_status=410)
        # The answer's type is part of the signature: the object's stored Content-Type (text/html on an HTML and
        # MP4 polyglot, which decodes as a video) would have the link open it as a page on the store's origin.
        params = {
            "Bucket": bucket,
            "Key": key,
            "ResponseContentType": content_type(key),
            "ResponseContentDisposition": "inline",
        }
        return str(self._s3.generate_presigned_url("get_object", Params=params, ExpiresIn=PRESIGN_SECONDS))


def _late_outcome(future: asyncio.Future[Any]) -> None:
    """Takes the outcome of a query that finished after its 504 (an unexpected error is logged as a warning)."""
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None and not isinstance(exc, (QueryError, ValueError)):
        log.warning("a query that timed out failed later: %s: %s", type(exc).__name__, redact_text(str(exc)))


def single_query_threads(*, torch_threads: int | None = None) -> None:
    """One FAISS thread per query: a service answers one query per search call, and concurrency comes from its
    query slots. FAISS's and torch's OpenMP pools spin while waiting for work; on a small machine they take turns
    stealing each other's cores: on 2 cores a 300-vector exact search took 2.4 ms with FAISS's default threads and
    26 ms after a text encoding, 0.08 ms and 0.95 ms (encoding included) with one (benchmarks/RESULTS.md).

    Args:
        torch_threads: also set torch's intra-op threads (the service uses 1: its parallelism is its query slots,
            and under load more threads only spin; Ray Serve replicas get 1 from Ray already).
    """
    import faiss

    faiss.omp_set_num_threads(1)
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)


def parse_index_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=OUT`` pairs from ``--index`` values; a bare ``OUT`` is named ``default`` (when it is the only one).

    Raises:
        ValueError: a malformed or repeated name, or several bare outputs.
    """
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, out = spec.partition("=")
        if not sep or "://" in name or "/" in name:  # a bare output (its path may hold '=')
            name, out = "default", spec
        if not NAME_PATTERN.match(name):
            raise ValueError(f"--index {spec!r}: the name must be 1-64 letters, digits, '.', '_' or '-'")
        if not out:
            raise ValueError(f"--index {spec!r}: no output after '='")
        if any(name == seen for seen, _ in pairs):
            raise ValueError(f"--index: the name {name!r} is given twice (use NAME=OUT for each output)")
        pairs.append((name, out))
    if not pairs:
        raise ValueError("give at least one --index")
    return pairs


def open_service(
    specs: Sequence[str],
    *,
    model: str | None = None,
    checkpoint: str | None = None,
    device: str | None = None,
    s3_endpoint_url: str | None = None,
    limits: ServiceLimits | None = None,
    reload_seconds: float = 60.0,
) -> SearchService:
    """A service over the outputs named by ``--index`` values (local folders or object-store prefixes, cached).

    Every `reload_seconds` (0: never) it checks whether a run updated an output's index and loads that output
    again (`SearchService.reload_changed`).
    """
    if not math.isfinite(reload_seconds) or reload_seconds < 0:
        raise ValueError(f"reload seconds must be a number >= 0 (0: never), got {reload_seconds}")
    engines, sources = {}, {}
    for name, out in parse_index_specs(specs):
        started = time.perf_counter()
        # The endpoint is for the s3:// outputs among several (and for the media links of s3:// inputs), not the rest.
        endpoint = s3_endpoint_url if out.lower().startswith("s3://") else None
        sources[name] = OutputSource(out, s3_endpoint_url=endpoint)
        engines[name] = sources[name].open(model=model, checkpoint=checkpoint, device=device)
        log.info("loaded output %s in %.1f s", name, time.perf_counter() - started)
    service = SearchService(engines, limits=limits, s3_endpoint_url=s3_endpoint_url, sources=sources)
    service.start_reloading(reload_seconds)
    return service


def _not_abandoned(record: logging.LogRecord) -> bool:
    """Leaves out uvicorn's traceback for a response the app abandoned on purpose (`ResponseAbandoned`: logged
    already, as one warning); uvicorn closes the connection, which is all that is left to do."""
    from index.http_media import ResponseAbandoned

    return not (record.exc_info and isinstance(record.exc_info[1], ResponseAbandoned))


def _server(service: SearchService, host: str, port: int, parser: HttpParser = "auto") -> Any:
    import uvicorn

    from index.api import create_app, guarded_protocol, host_checked

    limits = service.limits
    app = host_checked(create_app(service), bind_host=host, allowed_hosts=limits.allowed_hosts)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(
            limits.header_timeout_seconds,
            parser,
            max_head_bytes=limits.max_head_bytes,
            send_timeout_seconds=limits.send_timeout_seconds,
            on_refusal=lambda reason: service.metrics.refused.labels(reason=reason).inc(),
        ),
        h11_max_incomplete_event_size=limits.max_head_bytes,
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=5,
        # No WebSocket routes: a handshake is a plain request (404 with the browser headers), not uvicorn's
        # WebSocket layer answering on its own (403, without them).
        ws="none",
        log_level="warning",
    )
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # configured by `uvicorn.Config` just now
        install_log_redaction(name)  # a traceback may hold a URL with credentials
    logging.getLogger("uvicorn.error").addFilter(_not_abandoned)  # added once: the same function each time
    return uvicorn.Server(config)


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` (0: a free port), for `serve` to listen on. Raises ValueError saying why it
    cannot be bound (in use, no such address, a port that needs privileges), before anything slow is loaded."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:  # gaierror too: a host name that does not resolve
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(
    service: SearchService, *, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None
) -> None:
    """Serves `service` with uvicorn until interrupted (a header timeout guards against half-sent requests), on
    `sock` when given (`listen_socket`, bound before the service loaded), else on `host`:`port`."""
    single_query_threads(torch_threads=1)  # this process serves; see the function for why
    sock = sock if sock is not None else listen_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    names = ", ".join(f"{n} ({sum(i.count for i in e.indexes.values())} vectors)" for n, e in service.engines.items())
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"vitaclip search service on http://{shown}:{bound_port}/ (API at /docs): {names}", flush=True)
    _server(service, host, bound_port).run(sockets=[sock])


@contextlib.contextmanager
def serving(
    service: SearchService, *, host: str = "127.0.0.1", port: int = 0, parser: HttpParser = "auto"
) -> Iterator[str]:
    """Serves `service` from a background thread for the block (notebooks, tests, benchmarks); yields its base URL.

    `port` 0 takes a free port; `parser` picks uvicorn's HTTP parser (auto: httptools when installed, else h11).
    """
    sock = listen_socket(host, port)
    server = _server(service, host, sock.getsockname()[1], parser)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="vitaclip-serve")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the search service did not start")
        time.sleep(0.01)
    try:
        yield f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

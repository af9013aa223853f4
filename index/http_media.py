"""Serving an opened media file over HTTP: byte ranges (206/416), conditional requests (304) and streaming.

Framework-free apart from the ASGI messages it sends: the file is one that `index.media.open_media` opened and
checked, read with positional reads in chunks, so memory stays at one chunk per response whatever the file's size,
and HEAD never reads it. Only single ranges are honoured; a request for several gets the whole file (RFC 9110
lets a server ignore Range), a malformed Range is ignored, and one that starts past the end gets 416.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

import anyio

from index.media import MediaFile

log = logging.getLogger("vitaclip.serve")

CHUNK_BYTES = 256 * 1024
# A byte position as a Range may give it: ASCII digits only (str.isdigit() takes '²', which int() refuses), or nothing
# (an open end). RFC 9110 sets no length: a longer number than 18 digits (leading zeros aside) is past any file.
_POSITION = re.compile(r"[0-9]*")
_PAST_ANY_FILE = 2**63


def _position(text: str) -> int:
    digits = text.lstrip("0")
    return int(digits or "0") if len(digits) <= 18 else _PAST_ANY_FILE  # int() of 4,300 digits or more raises


class ResponseAbandoned(Exception):
    """A response given up after it started (its file became shorter while it was sent). The cause is logged as one
    warning where it happened; the server closes the connection (the client sees a body cut short), and
    `index.service` keeps uvicorn from logging it again as an error with a traceback."""


class RangeNotSatisfiable(Exception):
    """A Range that selects nothing in a file of `size_bytes` bytes (answered with 416)."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(f"the range selects nothing in {size_bytes} bytes")
        self.size_bytes = size_bytes


def parse_range(header: str | None, size_bytes: int) -> tuple[int, int] | None:
    """The ``(first, last)`` byte positions (inclusive) a ``Range`` header asks for, or None for the whole file.

    Raises:
        RangeNotSatisfiable: a well-formed single range that selects no byte of the file.
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # another unit, or several ranges: the whole file
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash or not _POSITION.fullmatch(first_text) or not _POSITION.fullmatch(last_text):
        return None  # malformed (or a position past any file): ignored
    if first_text == "":
        if last_text == "":
            return None
        suffix = _position(last_text)  # the last N bytes
        if suffix == 0 or size_bytes == 0:
            raise RangeNotSatisfiable(size_bytes)
        return max(0, size_bytes - suffix), size_bytes - 1
    first = _position(first_text)
    if last_text and _position(last_text) < first:
        return None  # malformed
    if first >= size_bytes:
        raise RangeNotSatisfiable(size_bytes)
    return first, min(_position(last_text) if last_text else size_bytes - 1, size_bytes - 1)


def _not_modified_since(value: str, mtime_seconds: float) -> bool:
    try:
        since = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    return int(mtime_seconds) <= since


@dataclass(frozen=True)
class MediaAnswer:
    """What to send for a media request: status, headers and the byte span to read (None: no body)."""

    status: int
    headers: dict[str, str]
    span: tuple[int, int] | None


def media_answer(media: MediaFile, request_headers: Mapping[str, str], *, method: str) -> MediaAnswer:
    """Status, headers and byte span for a GET or HEAD of an opened media file.

    Honours ``If-None-Match`` / ``If-Modified-Since`` (304), ``Range`` with ``If-Range`` (206, 416).
    """
    mtime = media.mtime_ns / 1e9
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": media.etag,
        "Last-Modified": formatdate(mtime, usegmt=True),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    match = request_headers.get("if-none-match")
    if match is not None:
        # Weak comparison (RFC 9110 13.1.2): W/"x" matches "x".
        if match.strip() == "*" or media.etag in [tag.strip().removeprefix("W/") for tag in match.split(",")]:
            return MediaAnswer(304, headers, None)
    elif "if-modified-since" in request_headers and _not_modified_since(request_headers["if-modified-since"], mtime):
        return MediaAnswer(304, headers, None)
    headers["Content-Type"] = media.content_type
    condition = request_headers.get("if-range")
    honour_range = condition is None or condition.strip() in (media.etag, headers["Last-Modified"])
    try:
        wanted = parse_range(request_headers.get("range"), media.size_bytes) if honour_range else None
    except RangeNotSatisfiable:
        headers.pop("Content-Type")
        headers["Content-Range"] = f"bytes */{media.size_bytes}"
        headers["Content-Length"] = "0"
        return MediaAnswer(416, headers, None)
    first, last = wanted if wanted is not None else (0, media.size_bytes - 1)
    headers["Content-Length"] = str(max(0, last - first + 1))
    if wanted is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{media.size_bytes}"
    span = (first, last) if method != "HEAD" and last >= first else None
    return MediaAnswer(206 if wanted is not None else 200, headers, span)


async def send_media(media: MediaFile, answer: MediaAnswer, receive: Any, send: Any) -> None:
    """Sends `answer` over ASGI, reading the span from the file a chunk at a time; stops when the client goes away
    and closes the file in every case.

    Raises:
        ResponseAbandoned: the file became shorter while it was sent (after the status and headers were).
    """
    cut_short: list[int] = []  # the bytes sent, when the file ended before the span did

    async def stream(scope: anyio.CancelScope) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()],
            }
        )
        if answer.span is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            position, last = answer.span
            fd = media.file.fileno()
            while position <= last:
                size = min(CHUNK_BYTES, last - position + 1)
                chunk = await anyio.to_thread.run_sync(os.pread, fd, size, position)
                if not chunk:
                    cut_short.append(position - answer.span[0])
                    break
                position += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": position <= last})
        scope.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()  # the client left: stop reading the file

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(watch, group.cancel_scope)
            await stream(group.cancel_scope)
    finally:
        media.close()
    if cut_short:
        log.warning(
            "a media file became shorter while it was sent (%d of %s bytes sent): connection closed",
            cut_short[0],
            answer.headers.get("Content-Length"),
        )
        raise ResponseAbandoned()

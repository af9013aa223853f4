"""Credentials never reach logs, outputs or messages: URL userinfo and secret-looking query values are masked.

``redact_url("http://user:PASS@minio:9000/?X-Amz-Signature=abc")`` -> ``"http://***@minio:9000/?X-Amz-Signature=***"``.
Every place the project writes or prints a URL (run summaries, logs, errors, ``index_info.json``, the service's
answers) passes it through here; :class:`RedactingFormatter` covers log records, tracebacks included.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

MASK = "***"

# Query parameter names whose values are secrets (AWS presigned URLs, SAS tokens, API keys, OAuth tokens).
_SECRET_PARAM = re.compile(
    r"(^|[-_.])(signature|sig|credential|security-token|token|access[-_]?token|api[-_]?key|apikey|key|password|passwd"
    r"|pwd|pass|secret|auth|authorization|session[-_]?token|code)$|^(se|sp|sv|st|spr|sks|skoid|sktid)$",
    re.IGNORECASE,
)
# A URL inside free text: scheme://... up to whitespace or a quote/bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# userinfo without a scheme in front, e.g. "user:secret@host" in a netloc printed on its own (the secret may hold
# "/", as AWS secret keys do).
_BARE_USERINFO = re.compile(r"(?<![\w/@:])[^\s/@:'\"<>`]+:(?!//)[^\s@'\"<>`]+@(?=[\w.\-\[\]]+)")
# Schemes whose URLs name bucket objects: any character may be part of a key, "@" and ":" included, and these URLs
# carry no userinfo in this project, so a key such as "a:b@c.mp4" stays as it is.
_OBJECT_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "file"})


def redact_url(url: str) -> str:
    """``url`` with its userinfo and secret-looking query values replaced by ``***``; other strings unchanged."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # an unparsable "URL" (e.g. a bad IPv6 literal): mask everything after the scheme
        return url.split("://", 1)[0] + "://" + MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    elif _raw_userinfo(parts.scheme, url):
        # A password written without percent-encoding that holds "/", "?" or "#" ends the netloc early, so the
        # parser sees no userinfo: everything up to the last "@" is masked (a path "@" then masks too much).
        return redact_url(url.split("://", 1)[0] + "://" + MASK + "@" + url.rsplit("@", 1)[1])
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = "&".join(
                f"{quote(k, safe='-_.~')}={MASK if _SECRET_PARAM.search(k) else quote(v, safe='-_.~/')}"
                for k, v in pairs
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _raw_userinfo(scheme: str, url: str) -> bool:
    """True when ``url`` has an unencoded ``user:password@`` whose password holds a character that ends a netloc."""
    rest = url.split("://", 1)[1]
    return scheme.lower() not in _OBJECT_SCHEMES and "@" in rest and ":" in rest.rsplit("@", 1)[0]


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted with :func:`redact_url` (for error messages and log lines)."""
    if "@" not in text and "=" not in text:
        return text
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _BARE_USERINFO.sub(MASK + "@", text) if "@" in text else text


def redact_value(value: Any) -> Any:
    """A JSON-like value with every string redacted (for configs and summaries written to outputs)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return type(value)(redact_value(v) for v in value) if isinstance(value, (list, tuple)) else value
    return value


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output, traceback included, has credentials in URLs masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Makes every handler of ``logger`` (default: the root logger) redact what it writes."""
    for handler in (logger or logging.getLogger()).handlers:
        current = handler.formatter
        if isinstance(current, RedactingFormatter):
            continue
        fmt = current._fmt if current is not None else None
        datefmt = current.datefmt if current is not None else None
        handler.setFormatter(RedactingFormatter(fmt, datefmt))

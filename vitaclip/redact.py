"""Credentials never reach logs, outputs or messages: URL userinfo and secret-looking query values are masked.

``redact_url("http://user:PASS@minio:9000/?X-Amz-Signature=abc")`` -> ``"http://***@minio:9000/?X-Amz-Signature=***"``;
the same for fragments (``#access_token=``), ``;`` parameters and object-store URLs (``s3://KEY:SECRET@bucket/k``).
Every place the project writes or prints a URL (run summaries, logs, errors, ``index_info.json``, the service's
answers) passes it through here; :class:`RedactingFormatter` covers log records, tracebacks included.
"""

from __future__ import annotations

import logging
import re
import traceback
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

MASK = "***"

# Parameter names whose values are secrets (AWS presigned URLs, SAS tokens, API keys, OAuth tokens, JWTs), matched
# after camelCase words are split with "_" ("accessKey" -> "access_Key"), so "monkey" is not a secret.
_SECRET_PARAM = re.compile(
    r"(^|[-_.]|aws)(signature|sig|credentials?|security-token|token|access[-_]?token|api[-_]?key|apikey|key|password"
    r"|pass[-_]?word|passwd|passphrase|pwd|pw|pass|secret|auth|authorization|bearer|session[-_]?token|code|jwt|assertion"
    r"|hmac|ticket|j?session[-_]?id"
    r"|secret[-_]?key|access[-_]?key([-_]?id)?|private[-_]?key|auth[-_]?token|client[-_]?secret)$"
    r"|^(se|sp|sv|st|spr|sks|skoid|sktid)$",
    re.IGNORECASE,
)
_CAMEL_WORD = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# name=value pairs of a query or fragment, separated by "&" or ";" (and path parameters after ";").
_QUERY_PAIR = re.compile(r"([^&;=]*)=([^&;]*)")
_PATH_PARAM = re.compile(r";([^/;=]*)=([^/;]*)")
# A URL inside free text: scheme://... up to whitespace or a quote/bracket. A scheme starts where a word does: tried
# at every letter of a long word, the search would take time quadratic in its length.
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# "://user:password@" inside free text, whatever stands before it ("1http://u:pw@h" too): the password may hold
# quotes and "/" (AWS secret keys do), which end a URL above. The user part holds no "/", so
# "s3://bucket/a:b@c.mp4" (an object key) is not userinfo. A literal start: searched for, never tried everywhere.
_USERINFO_IN_TEXT = re.compile(r"(://)[^\s/@]*:[^\s@]*@")
# A secret pair of a %-encoded query inside a URL's query ("?next=...%3FX-Amz-Signature%3D<secret>"): the name up
# to an encoded "=", the value up to an encoded "&" or ";" (or a plain one).
_ENCODED_PAIR = re.compile(
    r"((?:[^&;=%]|%(?!3[Dd]|26|3[Bb])[0-9A-Fa-f]{2})*)%3[Dd]((?:[^&;%]|%(?!26|3[Bb])[0-9A-Fa-f]{2})*)"
)
# userinfo without a scheme in front, e.g. "user:secret@host" in a netloc printed on its own (the secret may hold
# "/", as AWS secret keys do).
_BARE_USERINFO = re.compile(r"(?<![\w/@:])[^\s/@:'\"<>`]+:(?!//)[^\s@'\"<>`]+@(?=[\w.\-\[\]]+)")
# Schemes whose URLs name bucket objects: any character may be part of a key, "@" and ":" included, so only an
# authority with a ":" (never in a bucket name) up to the first "@" is userinfo: "s3://AKIA:se/cret@bucket/k" is
# masked, "s3://bucket/videos/a:b@c.mp4" stays as it is.
_OBJECT_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "file"})
_OBJECT_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*:[^@]*@")


# Elements of a storage server's XML error body that quote credentials or what was signed with them (S3's
# SignatureDoesNotMatch names the access key id and echoes the signature, the string to sign and the canonical
# request, whose query holds X-Amz-Credential); storage clients put such bodies into their error messages.
_XML_SECRET = re.compile(
    r"<((?:AWS)?AccessKeyId|SignatureProvided|StringToSign(?:Bytes)?|CanonicalRequest(?:Bytes)?"
    r"|[A-Za-z]*(?:Token|Secret|Password|Signature|Credential)s?)>[^<]*</\1>"
)


def _is_secret_name(name: str) -> bool:
    return _SECRET_PARAM.search(_CAMEL_WORD.sub("_", unquote_plus(name))) is not None


def _mask_pairs(text: str, pairs: re.Pattern[str] = _QUERY_PAIR) -> str:
    """`text` with the value of every secret-looking ``name=value`` pair replaced by ``***`` (the rest as written)."""
    if "=" not in text:
        return text

    def mask(found: re.Match[str]) -> str:
        if not _is_secret_name(found.group(1)):
            return found.group(0)
        return found.group(0)[: found.start(2) - found.start(0)] + MASK

    if pairs is _QUERY_PAIR and "%3" in text.upper():
        text = _ENCODED_PAIR.sub(mask, text)
    return pairs.sub(mask, text)


def redact_url(url: str) -> str:
    """``url`` with its userinfo and the values of secret-looking query, fragment and path parameters replaced by
    ``***``; other strings unchanged."""
    if "://" not in url:
        return url
    if url[:1].isspace():  # blanks before a URL (a manifest cell as written): the URL after them, masked
        bare = url.lstrip()
        return url[: len(url) - len(bare)] + redact_url(bare)
    scheme = url.split("://", 1)[0]
    if scheme.lower() in _OBJECT_SCHEMES and _OBJECT_USERINFO.match(url):
        url = _OBJECT_USERINFO.sub(lambda m: m.group(1) + MASK + "@", url, count=1)
    try:
        parts = urlsplit(url)
    except ValueError:  # an unparsable "URL" (e.g. a bad IPv6 literal): mask everything after the scheme
        return scheme + "://" + MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    elif _raw_userinfo(parts.scheme, url):
        # A password written without percent-encoding that holds "/", "?" or "#" ends the netloc early, so the
        # parser sees no userinfo: everything up to the last "@" is masked (a path "@" then masks too much).
        return redact_url(scheme + "://" + MASK + "@" + url.rsplit("@", 1)[1])
    path = _mask_pairs(parts.path, _PATH_PARAM) if ";" in parts.path else parts.path
    query, fragment = _mask_pairs(parts.query), _mask_pairs(parts.fragment)
    if (netloc, path, query, fragment) == (parts.netloc, parts.path, parts.query, parts.fragment):
        return url
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


def has_object_userinfo(url: str) -> bool:
    """Whether an object-store URL carries credentials before its bucket (``s3://KEY:SECRET@bucket/...``, the
    secret possibly holding "/"): no bucket or container name holds ":" or "@"."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return scheme in _OBJECT_SCHEMES and scheme != "file" and _OBJECT_USERINFO.match(url) is not None


def refuse_object_userinfo(url: str, what: str) -> None:
    """Raises ValueError (the URL masked) for an object-store URL with credentials in it: they would reach the
    storage client's error messages as a bucket name, and vitaclip takes credentials from the standard chain only."""
    if has_object_userinfo(url):
        raise ValueError(
            f"{what} {redact_url(url)} has credentials in it: give them through the standard chain of the store "
            "(for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role), never in the URL"
        )


def _raw_userinfo(scheme: str, url: str) -> bool:
    """True when ``url`` has an unencoded ``user:password@`` whose password holds a character that ends a netloc."""
    rest = url.split("://", 1)[1]
    return scheme.lower() not in _OBJECT_SCHEMES and "@" in rest and ":" in rest.rsplit("@", 1)[0]


def _redact_found_url(found: re.Match[str]) -> str:
    # Punctuation that ends a sentence around a URL ("..., retrying") is text, not part of its last value.
    url = found.group(0)
    core = url.rstrip(",.;:!?)")
    return redact_url(core) + url[len(core) :]


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted with :func:`redact_url`, and credentials quoted in a storage server's
    XML error body masked (for error messages and log lines)."""
    if "</" in text:
        text = _XML_SECRET.sub(lambda m: f"<{m.group(1)}>{MASK}</{m.group(1)}>", text)
    if "@" not in text and "=" not in text:
        return text
    if "@" in text:
        text = _USERINFO_IN_TEXT.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _URL_IN_TEXT.sub(_redact_found_url, text)
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


# Control characters a terminal acts on (escape sequences, carriage returns, bells): a file name holding them, printed
# as it is, could rewrite what an operator sees. Newlines and tabs stay where text spans lines (tracebacks). The
# bidirectional marks, embeddings, overrides and isolates and the Unicode line separators are escaped too: they reorder
# or break what follows them ("clip\u202egpj.exe" reads "clipexe.jpg"); so are the invisible ones (zero-width spaces
# and joiners, word joiners, the byte order mark, soft hyphens, tag characters), which make two names print alike.
_FORMATTING = (
    "\u00ad\u061c\u180e\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\U000e0000-\U000e007f"
)
_CONTROLS = re.compile(f"[\x00-\x1f\x7f-\x9f{_FORMATTING}]")
_CONTROLS_BUT_LINES = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_FORMATTING}]")
# What `printable_name` escapes besides: the backslash its escapes start with, and lone surrogates (the bytes of a
# file name that are not UTF-8, as Python keeps them).
_NAME_ESCAPES = re.compile(f"[\\\\\ud800-\udfff\x00-\x1f\x7f-\x9f{_FORMATTING}]")


def _escaped(found: re.Match[str]) -> str:
    code = ord(found.group())
    if code == 0x5C:
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:  # \xNN above 0x7f is kept for the bytes that are not UTF-8: U+0085 and the byte 0x85 differ
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def terminal_text(text: str, *, lines: bool = False) -> str:
    """`text` with the control characters a terminal would act on written as ``\\xNN``, and the bidirectional, line
    separator and invisible characters as ``\\uNNNN`` (with `lines`, newlines and tabs kept: tracebacks only, as
    a name quoted in a one-line message could otherwise forge a line of its own): for what the project prints of
    text that may quote names it did not choose (messages). Names themselves go through `printable_name`."""
    pattern = _CONTROLS_BUT_LINES if lines else _CONTROLS
    return pattern.sub(_escaped, text)


def printable_name(name: str) -> str:
    """A file name, key or URI as one line of valid UTF-8 that no other name prints as: `terminal_text`'s escapes
    (newlines and tabs included), bytes that are not UTF-8 as ``\\xNN``, and the backslash itself doubled, so that a
    name spelling ``\\x1b`` and one holding the escape character, or ``\\xff`` and the byte 0xff, stay apart. A name
    not in Unicode's NFC form (as macOS writes names: "e" and a combining accent) also has the characters NFC would
    change or combine written out (``cafe\\u0301``), so it never prints as the NFC name it looks like."""
    printed = _NAME_ESCAPES.sub(_escaped, name)
    if printed.isascii() or unicodedata.is_normalized("NFC", name):
        return printed
    return "".join(
        _NAME_ESCAPES.sub(_escaped, c) if _NAME_ESCAPES.match(c) else (_escape_char(c) if _composes(c) else c)
        for c in name
    )


def _escape_char(c: str) -> str:
    code = ord(c)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _composes(c: str) -> bool:
    """Whether NFC may change `c` or combine it with the character before it: a combining mark, a character with
    a decomposition of its own (the Angstrom sign), a conjoining Hangul jamo."""
    code = ord(c)
    if 0x1100 <= code <= 0x11FF or 0xA960 <= code <= 0xA97F or 0xD7B0 <= code <= 0xD7FF:
        return True
    return unicodedata.category(c).startswith("M") or unicodedata.normalize("NFC", c) != c


def error_line(exc: BaseException) -> str:
    """An error as one line for an operator (a run's record, a command's last line): ``Type: message``, a
    `ValueError`'s message alone, and a Ray task's error as the task's own exception and where it was raised (Ray
    renders its message as the task's whole traceback, with terminal colours). Control characters are escaped;
    credentials are not redacted here (`redact_text`)."""
    cause = getattr(exc, "cause", None)
    if type(exc).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        # The task's name: kept by a RayTaskError, lost by the copy Ray raises as the cause's type (its message
        # still starts "ray::<name>()").
        named = _RAY_TASK_NAME.search(str(exc)[:500])
        where = getattr(exc, "function_name", None) or (named.group(1) if named else "a Ray task")
        return terminal_text(f"{type(cause).__name__} in {where}: {cause}")
    return terminal_text(str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")


_RAY_TASK_NAME = re.compile(r"ray::([A-Za-z_][\w.]*)\(")


def traceback_text(exc_info: Any) -> str:
    """A formatted traceback (`logging.Formatter.formatException`'s ``exc_info``) for a terminal or a log: lines kept,
    but each exception's message on one line (`terminal_text`), so that a name quoted in one forges no line."""
    text = "".join(traceback.format_exception(*exc_info))
    pending, seen = [exc_info[1]], set()
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        try:
            message = str(exc)
        except Exception:  # a broken __str__: the traceback says so as it is
            message = ""
        if "\n" in message or "\r" in message:
            text = text.replace(message, terminal_text(message))
        pending.extend([exc.__cause__, exc.__context__, *getattr(exc, "exceptions", ())])
    return terminal_text(text, lines=True)


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output, traceback included, has credentials in URLs masked and the control characters
    a terminal acts on escaped (`terminal_text`; a file name cannot rewrite the log's screen).

    Args:
        inner: a formatter whose output is redacted (uvicorn's adds fields of its own); None: this one formats, with
            the usual `logging.Formatter` arguments.
    """

    def __init__(self, *args: Any, inner: logging.Formatter | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        # Escaped in the message and the traceback only: a formatter's own colours (uvicorn's on a terminal) stay.
        safe = logging.makeLogRecord(record.__dict__)
        safe.msg, safe.args = terminal_text(record.getMessage()), None  # one line: a quoted name forges none
        safe.__dict__.pop("color_message", None)  # uvicorn's coloured copy of the message, formatted from the args
        if record.exc_info and record.exc_info[0] is not None:
            safe.exc_text = traceback_text(record.exc_info)
        formatted = self.inner.format(safe) if self.inner is not None else super().format(safe)
        return redact_text(formatted)


def endpoint_without_userinfo(endpoint: str) -> str:
    """An S3-compatible endpoint URL as ``scheme://host[:port][/path]``: no user, password, query or fragment.
    Credentials come from the AWS chain; userinfo in an endpoint would travel in every presigned URL.

    Raises:
        ValueError: Not an http(s) URL with a host (the message never quotes it).
    """
    # The messages never quote the URL: what looks like a bad port may be an unencoded password.
    shape = "s3_endpoint_url must look like http(s)://host[:port] (credentials come from the AWS chain)"
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        raise ValueError(shape) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(shape)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def install_log_redaction(logger: logging.Logger | str | None = None) -> None:
    """Makes every handler of ``logger`` (a logger or its name; default: the root logger) redact what it writes,
    formatted as before."""
    if not isinstance(logger, logging.Logger):
        logger = logging.getLogger(logger)
    for handler in logger.handlers:
        current = handler.formatter
        if isinstance(current, RedactingFormatter):
            continue
        handler.setFormatter(RedactingFormatter(inner=current) if current is not None else RedactingFormatter())

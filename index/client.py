"""A small Python client for the search service's JSON API (standard library only).

from index.client import SearchClient

client = SearchClient("http://127.0.0.1:8000")
for hit in client.search("a red circle moving left", k=5):
    print(hit["score"], hit["uri"], hit["start_seconds"], hit["end_seconds"])
client.more_like(hit["video_id"], k=5)          # other videos like this one
client.search_file("query.jpg", k=5)             # a picture or a short clip as the query
client.search_embedding([0.1] * 512, k=5)        # a raw vector of the index's dimension
"""

from __future__ import annotations

import base64
import json
import os
import stat
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vitaclip.redact import printable_name, redact_url


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects come back as errors: urllib follows them with every header of the request (``Authorization``
    included, to any host, https to http too) and turns a POST into a GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


class SearchError(Exception):
    """The service refused or failed a request; `status` is the HTTP status, the message the service's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class NoAnswer(SearchError):
    """No HTTP answer came: the service could not be reached, or the connection broke or timed out (`status` 0)."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.status = 0
        self.message = message


class SearchClient:
    """Queries one search service.

    Args:
        url: the service's base URL (``http://host:port``); a user and password in it
            (``https://user:password@host``) are sent as HTTP Basic authentication, never as part of the address.
        index: the output to search when the service holds several (None: the service's default).
        timeout_seconds: per request.
        headers: sent with every request, such as ``{"Authorization": "Bearer ..."}`` for the authenticating proxy
            the service is put behind.
    """

    def __init__(
        self,
        url: str,
        *,
        index: str | None = None,
        timeout_seconds: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the service URL must start with http:// or https://, got {redact_url(url)!r}")
        parts = urllib.parse.urlsplit(url)
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise ValueError(
                f"the service URL is its base address (http://host:port[/path]), with no query or fragment: got "
                f"{redact_url(url)!r}"
            )
        self.headers = dict(headers or {})
        if parts.username is not None or parts.password is not None:
            user = urllib.parse.unquote(parts.username or "")
            secret = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{secret}".encode()).decode()
            self.headers.setdefault("Authorization", f"Basic {token}")
            parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
        self.url = urllib.parse.urlunsplit(parts).rstrip("/")
        self.index = index
        self.timeout_seconds = timeout_seconds

    def _request(self, method: str, path: str, *, body: bytes | None = None, content_type: str | None = None) -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=self.headers)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with _OPENER.open(request, timeout=self.timeout_seconds) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            if 300 <= err.code < 400:
                where = redact_url(err.headers.get("Location", "") or "")
                raise SearchError(
                    err.code,
                    f"the service answered with a redirect to {where!r}, which is not followed (it would take this "
                    "client's credentials and query there); give the address it names as the URL",
                ) from None
            try:
                answer = json.loads(err.read())
                message = answer.get("error", err.reason) if isinstance(answer, dict) else err.reason
            except ValueError:
                message = str(err.reason)
            raise SearchError(err.code, str(message)) from None
        except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out: no answer to report
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            raise NoAnswer(
                f"no answer from {redact_url(self.url)} to {method} {path.split('?')[0]}: {reason}"
            ) from None

    def _params(self, k: int, segments: bool, filters: dict[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = {"k": k, "segments": segments}
        params.update({key: value for key, value in filters.items() if value is not None})
        if self.index is not None:
            params["index"] = self.index
        return params

    def _post(self, query: dict[str, Any], k: int, segments: bool, filters: dict[str, Any]) -> list[dict[str, Any]]:
        body = json.dumps({**query, **self._params(k, segments, filters)}).encode()
        return _results(self._request("POST", "/search", body=body, content_type="application/json"))

    def search(self, text: str, *, k: int = 10, segments: bool = False, **filters: Any) -> list[dict[str, Any]]:
        """Hits for a text query; filters: ``label``, ``min_duration``, ``max_duration``."""
        return self._post({"text": text}, k, segments, filters)

    def more_like(
        self, video_id: str, *, segment_index: int | None = None, k: int = 10, segments: bool = False, **filters: Any
    ) -> list[dict[str, Any]]:
        """Other videos (or moments) like an indexed video, or like one of its segments."""
        query: dict[str, Any] = {"video_id": video_id}
        if segment_index is not None:
            query["segment_index"] = segment_index
        return self._post(query, k, segments, filters)

    def search_embedding(
        self, vector: Sequence[float], *, k: int = 10, segments: bool = False, **filters: Any
    ) -> list[dict[str, Any]]:
        """Hits for a raw query vector (its length must be the index's dimension)."""
        return self._post({"embedding": [float(x) for x in vector]}, k, segments, filters)

    def search_file(
        self, path: str | Path, *, k: int = 10, segments: bool = False, **filters: Any
    ) -> list[dict[str, Any]]:
        """Hits for a picture or a short clip, embedded by the service with the index's model.

        Raises:
            ValueError: `path` is not a regular file (a FIFO would block, ``/dev/zero`` never end)."""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open would wait for a writer
        with open(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"{printable_name(str(path))} is not a regular file: nothing to send as a query")
            data = file.read()
        params = self._params(k, segments, filters)
        query = urllib.parse.urlencode({key: str(v).lower() if isinstance(v, bool) else v for key, v in params.items()})
        return _results(
            self._request("POST", f"/search/upload?{query}", body=data, content_type="application/octet-stream")
        )

    def indexes(self) -> list[dict[str, Any]]:
        """The outputs the service holds (model, counts, index kinds, recall)."""
        return list(self._request("GET", "/indexes"))

    def health(self) -> dict[str, Any]:
        return dict(self._request("GET", "/healthz"))


def _results(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """A search answer's hits; its notes (a label no row has) as warnings, which say why there are none."""
    for note in answer.get("notes") or ():
        warnings.warn(f"vitaclip search: {note}", UserWarning, stacklevel=3)
    return list(answer["results"])

"""Which file a media request may read: the indexed object, unchanged, inside the inputs it was listed from.

A row's ``uri`` is data from the listing, and the file system under it can change after indexing (a video replaced
by a symlink to ``/etc/passwd``, a symlink that always pointed outside the input folder). :func:`open_media` is the
one gate, independent of any web framework: it opens the file only when

- the row's status is ``ok`` (a row that failed to decode was never shown to be a video);
- the URI is a local path (``s3://`` objects are not served from here);
- its resolved path lies inside one of the input folders recorded at index time (``runs/<run_id>.json``,
  ``input_roots``), or directly in the folder of a file that a manifest or an argument listed (``input_file_dirs``:
  not its subfolders, so a manifest naming ``/x.mp4`` does not open the whole machine), so no symlink leads out;
- and inside one of the service's own ``--media-root`` folders when it has them (`MediaRoots.only_under`): the
  run records are the output's, so whoever can write the output chooses the recorded folders; of an object-store
  output, which machines other than the service's host write, no local file is served without them;
- the opened object is a regular file, is the path that was checked, and its size and modification time still
  match the row's ETag.

Refusals carry a short ``reason`` and an HTTP status; their messages never contain paths, so they are safe to send.
"""

from __future__ import annotations

import json
import mimetypes
import os
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from index.schema import STATUS_OK, local_etag

RUNS_DIR = "runs"


class MediaRefused(Exception):
    """A media request that must not be served; ``message`` is safe to show to the client."""

    def __init__(self, reason: str, message: str, *, http_status: int = 404) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.http_status = http_status


@dataclass(frozen=True)
class MediaFile:
    """An opened, checked media file. ``file`` is positioned at 0; the caller closes it."""

    file: BinaryIO
    size_bytes: int
    mtime_ns: int
    content_type: str
    etag: str  # an HTTP entity tag made of safe characters only

    def close(self) -> None:
        self.file.close()


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def content_type(path: str) -> str:
    kind = mimetypes.guess_type(path, strict=False)[0]
    return kind if kind and kind.startswith("video/") else "application/octet-stream"


def _opened_path(fd: int) -> str | None:
    """The path the kernel has for an open descriptor (Linux), or None where it cannot tell."""
    if sys.platform.startswith("linux"):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class MediaRoots:
    """Where indexed files may resolve to: inside a listed folder (``folders``, resolved) or directly in the folder of
    a file listed on its own (``file_dirs``, resolved; their subfolders are not included)."""

    folders: tuple[str, ...] = ()
    file_dirs: tuple[str, ...] = ()
    only_under: tuple[str, ...] | None = None  # the service's --media-root folders (resolved); None: no such limit

    def allow(self, resolved: str) -> bool:
        return any(_inside(resolved, root) for root in self.folders) or os.path.dirname(resolved) in self.file_dirs

    def allowed_by_service(self, resolved: str) -> bool:
        return self.only_under is None or any(_inside(resolved, root) for root in self.only_under)


def open_media(row: Mapping[str, Any], roots: MediaRoots) -> MediaFile:
    """Opens the file of an indexed row for serving, or raises :class:`MediaRefused`.

    Args:
        row: the row's ``uri``, ``status``, ``etag`` and ``size_bytes``.
        roots: what the runs recorded at index time (:func:`recorded_roots`).
    """
    if row.get("status") != STATUS_OK:
        raise MediaRefused("not_ok", "this row is not a decoded video")
    uri = str(row.get("uri") or "")
    if "://" in uri:
        raise MediaRefused("remote", "media of remote objects are not served")
    if not os.path.isabs(uri) or "\x00" in uri:
        raise MediaRefused("not_local", "the row does not name a local file")
    try:
        resolved = os.path.realpath(uri)  # raises while a folder on the path is being swapped for a link
    except (OSError, ValueError):
        raise MediaRefused("changed", "the file's folder changed while it was looked up", http_status=409) from None
    if not roots.allow(resolved):
        raise MediaRefused("outside_roots", "the file is not inside the indexed input folders", http_status=403)
    if not roots.allowed_by_service(resolved):
        message = "local files of this output are served only inside the service's --media-root folders"
        raise MediaRefused("outside_media_roots", message, http_status=403)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(resolved, flags)
    except OSError:
        raise MediaRefused("missing", "the file is gone or unreadable") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MediaRefused("not_a_file", "the indexed path is not a regular file", http_status=403)
        opened = _opened_path(fd)
        if opened is not None and opened != resolved:
            raise MediaRefused("changed", "the file moved while it was opened", http_status=409)
        if row.get("etag") != local_etag(st) or int(row.get("size_bytes") or -1) != st.st_size:
            raise MediaRefused("changed", "the file changed since it was indexed", http_status=410)
        os.set_blocking(fd, True)
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return MediaFile(
        file=file,
        size_bytes=st.st_size,
        mtime_ns=st.st_mtime_ns,
        content_type=content_type(resolved),
        etag=f'"{st.st_size:x}-{st.st_mtime_ns:x}"',
    )


def roots_of_inputs(local_paths: Iterable[str]) -> list[str]:
    """Resolved, de-duplicated roots for folders (themselves) and listed files (their folders)."""
    out: set[str] = set()
    for path in local_paths:
        if "://" in path:
            continue
        target = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        out.add(os.path.realpath(target))
    return sorted(out)


def recorded_roots(out_dir: str | Path) -> MediaRoots:
    """The input folders and file folders every run recorded in ``OUT/runs/*.json`` (a run writes them when it starts
    and ends)."""
    folder = Path(out_dir) / RUNS_DIR
    found: dict[str, set[str]] = {"input_roots": set(), "input_file_dirs": set()}
    if not folder.is_dir():
        return MediaRoots()
    for path in folder.glob("*.json"):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key, roots in found.items():
            listed = summary.get(key) if isinstance(summary, dict) else None
            if isinstance(listed, list):
                roots.update(r for r in listed if isinstance(r, str) and os.path.isabs(r))
    return MediaRoots(folders=tuple(sorted(found["input_roots"])), file_dirs=tuple(sorted(found["input_file_dirs"])))

"""Whether a listed local file can be opened, without importing a decoder (the job's driver-side modules use it)."""

from __future__ import annotations

import os
from typing import Any


class UnreadableSource(OSError):
    """A file that exists but cannot be read; ``reason`` (``access_denied``) becomes the row's retryable status."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.reason))


def check_readable(path: str) -> None:
    """Opens and closes ``path``: a file the decoder could not open must fail here with a retryable status, not
    reach the decoder, whose open error would read as a damaged (final) video.

    Raises:
        UnreadableSource: permission denied (``access_denied``: fixed permissions make the next run read it).
        OSError: any other failure to open it (a read error, also retried).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        os.close(os.open(path, flags))
    except PermissionError:
        raise UnreadableSource("permission denied: the file cannot be read", "access_denied") from None


MAX_SMALL_FILE_BYTES = 64 << 20  # a checkpoint's config.json (its label names included) or a label file


def read_small_text(path: str | os.PathLike[str], what: str, *, limit: int = MAX_SMALL_FILE_BYTES) -> str:
    """The UTF-8 text of a small regular file (a config, a label list), refused past `limit` bytes before it is read:
    a 1 GB sparse ``config.json`` took 2 GB of memory to refuse. A FIFO or device is refused without blocking.

    Raises:
        OSError: it cannot be opened or read.
        ValueError: not a regular file, larger than `limit`, or not UTF-8 (naming `what`).
    """
    import stat

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise ValueError(f"{what} is not a regular file")
        if found.st_size > limit:
            raise ValueError(f"{what} is {found.st_size:,} bytes, more than {limit:,}")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} is more than {limit:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8 text (byte {exc.start})") from None

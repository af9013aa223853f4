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

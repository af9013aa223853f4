"""Reading one listed video: a local path as it is, a small S3 object whole, a large one through ranged GETs
(`S3RangeReader`), each checked against the ETag it was listed with so that a changed object is reported, never
mixed."""

from __future__ import annotations

import collections
import errno
import io
import os
import stat
from collections.abc import Sequence
from typing import Any

from index.s3 import (
    MiB,
    S3Client,
    StorageError,
    if_match,
    make_s3_client,
    parse_s3_uri,
    read_body,
    read_whole,
    with_retries,
)
from index.schema import LOCAL_ETAG_PREFIX, local_etag
from jobs.storage.listing import UNKNOWN_SIZE, is_kernel_file, printable_path
from vitaclip.readable import UnreadableSource, check_readable


def open_video(
    uri: str,
    *,
    size_bytes: int | None,
    etag: str | None = None,
    s3_client: S3Client | None = None,
    whole_object_max_bytes: int = 32 * MiB,
    block_size_bytes: int = 2 * MiB,
    max_cached_blocks: int = 4,
    max_attempts: int = 5,
    backoff_seconds: float = 0.2,
    local_roots: Sequence[str] | None = None,
) -> str | bytes | S3RangeReader:
    """A source the decoder can open: a local path as given, a small S3 object's bytes, or a ranged reader.

    Args:
        size_bytes: The listed size; None (or UNKNOWN_SIZE) looks it up first.
        etag: When given, S3 reads require this ETag, so an object replaced mid-read fails with reason "changed"
            instead of mixing two versions.
        whole_object_max_bytes: S3 objects up to this size are read in one GET; larger ones are read in ranges.
        block_size_bytes: Bytes per ranged GET (the read-ahead) of the ranged reader.
        max_attempts: Tries per GET, against resets, 5xx, throttling and short bodies, with exponential backoff.
        local_roots: The run's input folders whose symlinks to files outside them are not read (None: any file):
            a path under one of them must still resolve inside it when read, not only when listed (a listed file
            swapped for a link to another file, between the listing and the read, hours apart on a large run).

    Raises:
        StorageError: The object is missing, refused, changed, or could not be read whole after retries.
    """
    if not uri.startswith("s3://"):
        return _open_local(uri, etag, local_roots)
    bucket, key = parse_s3_uri(uri)
    client = s3_client if s3_client is not None else make_s3_client()
    if size_bytes is None or size_bytes == UNKNOWN_SIZE:
        head = with_retries(
            lambda: client.head_object(Bucket=bucket, Key=key, **if_match(etag)),
            uri=uri,
            action="look up",
            max_attempts=max_attempts,
            backoff_seconds=backoff_seconds,
        )
        size_bytes = int(head["ContentLength"])
    if size_bytes <= whole_object_max_bytes:
        return read_whole(client, bucket, key, etag=etag, max_attempts=max_attempts, backoff_seconds=backoff_seconds)
    return S3RangeReader(
        uri,
        s3_client=client,
        size_bytes=size_bytes,
        etag=etag,
        block_size_bytes=block_size_bytes,
        max_cached_blocks=max_cached_blocks,
        max_attempts=max_attempts,
        backoff_seconds=backoff_seconds,
    )


def _open_local(uri: str, etag: str | None, roots: Sequence[str] | None = None) -> str:
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    for root in roots or ():
        folder = os.path.abspath(root)
        if path.startswith(folder.rstrip(os.sep) + os.sep):  # listed from this folder: read only inside it
            resolved, inside = os.path.realpath(path), os.path.realpath(folder)
            if not (resolved == inside or resolved.startswith(inside.rstrip(os.sep) + os.sep)):
                raise StorageError(
                    f"{printable_path(path)} is a symbolic link to a file outside {printable_path(folder)}, a listed "
                    "folder it is in: not read (--follow-outside-symlinks reads it)",
                    reason="outside_folder",
                    uri=uri,
                )
    try:
        st = os.stat(path)
    except OSError as exc:  # statuses as a folder listing gives them
        if exc.errno == errno.ELOOP:
            raise StorageError(f"symbolic link loop: {printable_path(path)}", reason="broken_link", uri=uri) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise StorageError(
                f"cannot reach {printable_path(path)}: permission denied", reason="access_denied", uri=uri
            ) from None
        raise StorageError(f"no file at {printable_path(path)}", reason="not_found", uri=uri) from None
    if not stat.S_ISREG(st.st_mode):  # a folder; a FIFO or device would block the decoder
        raise StorageError(f"not a regular file: {printable_path(path)}", reason="not_a_file", uri=uri)
    if is_kernel_file(path, st):
        why = f"a file of the kernel's /proc or /sys: {printable_path(path)}"
        raise StorageError(why, reason="not_a_file", uri=uri)
    if etag is not None and etag.startswith(LOCAL_ETAG_PREFIX) and local_etag(st) != etag:
        raise StorageError(
            f"{printable_path(path)} changed since it was listed (size or modification time)", reason="changed", uri=uri
        )
    try:
        check_readable(path)
    except UnreadableSource as exc:
        raise StorageError(f"cannot read {printable_path(path)}: {exc}", reason="access_denied", uri=uri) from None
    return path


class S3RangeReader(io.RawIOBase):
    """A seekable, read-only file over one S3 object, read in ranged GETs of `block_size_bytes`.

    Recently used blocks are kept (least recently used first out), so a demuxer that jumps between the header and
    the data does not fetch the same bytes twice. Each GET is retried on resets, 5xx, throttling and short bodies.
    Not safe to share between threads; open one per reader.
    """

    def __init__(
        self,
        uri: str,
        *,
        s3_client: S3Client,
        size_bytes: int,
        etag: str | None = None,
        block_size_bytes: int = 2 * MiB,
        max_cached_blocks: int = 4,
        max_attempts: int = 5,
        backoff_seconds: float = 0.2,
    ) -> None:
        super().__init__()
        if size_bytes < 0:
            raise ValueError(f"size_bytes must be >= 0, got {size_bytes}")
        if block_size_bytes < 1 or max_cached_blocks < 1:
            raise ValueError(
                f"block_size_bytes and max_cached_blocks must be >= 1, got {block_size_bytes}, {max_cached_blocks}"
            )
        self.uri = uri
        self.bucket, self.key = parse_s3_uri(uri)
        self.size_bytes = size_bytes
        self.etag = etag
        self.block_size_bytes = block_size_bytes
        self.max_cached_blocks = max_cached_blocks
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.requests_made = 0
        """GET attempts so far, retries included."""
        self._client = s3_client
        self._position = 0
        self._blocks: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"S3RangeReader({self.uri!r}, size_bytes={self.size_bytes})"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = self.size_bytes + offset
        else:
            raise ValueError(f"whence must be SEEK_SET, SEEK_CUR or SEEK_END, got {whence}")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def read(self, size: int | None = -1) -> bytes:
        self._check_open()
        end = self.size_bytes if size is None or size < 0 else min(self.size_bytes, self._position + size)
        parts: list[memoryview] = []
        position = self._position
        while position < end:
            index, offset = divmod(position, self.block_size_bytes)
            block = self._block(index)
            chunk = memoryview(block)[offset : offset + (end - position)]
            parts.append(chunk)
            position += len(chunk)
        self._position = max(self._position, position)
        return b"".join(parts)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._blocks.clear()
        super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on a closed reader ({self.uri})")

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is not None:
            self._blocks.move_to_end(index)
            return block
        start = index * self.block_size_bytes
        last = min(self.size_bytes, start + self.block_size_bytes) - 1
        block = with_retries(
            lambda: self._get_range(start, last),
            uri=self.uri,
            action=f"read bytes {start}-{last} of",
            max_attempts=self.max_attempts,
            backoff_seconds=self.backoff_seconds,
        )
        self._blocks[index] = block
        while len(self._blocks) > self.max_cached_blocks:
            self._blocks.popitem(last=False)
        return block

    def _get_range(self, start: int, last: int) -> bytes:
        self.requests_made += 1
        response = self._client.get_object(
            Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{last}", **if_match(self.etag)
        )
        return read_body(response, expected=last - start + 1)

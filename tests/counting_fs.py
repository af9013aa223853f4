"""A local pyarrow filesystem that counts the bytes read from each file: tests that reads stay column projections."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs


class CountingHandler(pafs.FileSystemHandler):
    """A local filesystem that counts the bytes read from each file opened for reading."""

    def __init__(self) -> None:
        self.inner = pafs.LocalFileSystem()
        self.bytes_read: dict[str, int] = {}

    def get_type_name(self) -> str:
        return "counting"

    def equals(self, other: Any) -> bool:
        return other is self

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(selector)

    def open_input_file(self, path: str) -> Any:
        self.bytes_read.setdefault(path, 0)
        return pa.PythonFile(CountingReader(self, path, self.inner.open_input_file(path)), mode="r")

    def open_input_stream(self, path: str) -> Any:
        return self.open_input_file(path)

    def _unsupported(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _unsupported
    move = copy_file = open_output_stream = open_append_stream = _unsupported


class CountingReader:
    def __init__(self, handler: CountingHandler, path: str, inner: Any) -> None:
        self.handler, self.path, self.inner, self.closed = handler, path, inner, False

    def read(self, nbytes: int = -1) -> bytes:
        data = self.inner.read() if nbytes is None or nbytes < 0 else self.inner.read(nbytes)
        self.handler.bytes_read[self.path] += len(data)
        return bytes(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self.inner.seek(offset, whence))

    def tell(self) -> int:
        return int(self.inner.tell())

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self.inner.close()

"""The output store: a local folder, an S3 prefix, or a GCS/Azure container (through pyarrow.fs), addressed by
relative paths such as ``runs/x.json``. The job writes run records and index files through it; the index's reading
side and the search service read through it."""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3.exceptions
import boto3.s3.transfer
import botocore.exceptions

from index.delta_tables import OutputLocation, refuse_odd_key_prefix, refuse_percent
from index.s3 import (
    NOT_FOUND_CODES,
    MiB,
    S3Client,
    StorageError,
    StorageErrorReason,
    client_error_fields,
    make_s3_client,
    parse_s3_uri,
    read_body,
    read_whole,
    storage_error,
)
from vitaclip.redact import redact_url

_COPY_CHUNK_BYTES = 8 * MiB
_TMP_SUFFIX = ".tmp-write"

T = TypeVar("T")

_WRITE_TEMPORARY = re.compile(r"^\.?[^/]+\.[0-9a-f]{32}" + re.escape(_TMP_SUFFIX) + "$")
_STORE_FOLDERS = ("index", "runs", "settings")


def sweep_write_temporaries(location: OutputLocation, hours: float) -> int:
    """Deletes the temporary files of `Store` writes killed before their rename (a local folder's hidden
    ``.<name>.<hex>.tmp-write``, an object store's ``<name>.<hex>.tmp-write``) in the output's index, run and
    settings folders, older than `hours`; returns how many. No reader lists them, so nothing else ever removed them.
    S3 writes whole objects and leaves none: not listed."""
    import pyarrow.fs as pafs

    if location.scheme == "s3":
        return 0
    filesystem, base = location.filesystem()
    cutoff_ns = time.time_ns() - int(hours * 3600 * 1_000_000_000)
    swept = 0
    for folder in _STORE_FOLDERS:
        found = filesystem.get_file_info(pafs.FileSelector(f"{base}/{folder}", recursive=True, allow_not_found=True))
        for info in found:
            old = (info.mtime_ns or 0) < cutoff_ns
            if info.type == pafs.FileType.File and old and _WRITE_TEMPORARY.match(info.base_name):
                with contextlib.suppress(FileNotFoundError):  # another run's sweep took it
                    filesystem.delete_file(info.path)
                    swept += 1
    return swept


def check_rel_path(rel_path: str, *, prefix: bool = False) -> str:
    """A relative path with forward slashes and no `.`, `..` or empty parts (a prefix may end in `/` or be empty)."""
    if prefix and rel_path == "":
        return rel_path
    parts = rel_path.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]
    if not rel_path or rel_path.startswith("/") or "\\" in rel_path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"expected a relative path with '/' separators and no '.', '..' or empty parts, got {rel_path!r}"
        )
    return rel_path


class Store(abc.ABC):
    """The job's output location, a local folder or an S3 prefix, addressed by relative paths such as `runs/x.json`."""

    url: str

    @abc.abstractmethod
    def put_bytes(self, rel_path: str, data: bytes) -> None:
        """Writes a whole file at once: readers see the old content or the new one, never a part."""

    @abc.abstractmethod
    def put_file(self, rel_path: str, source: Path) -> None:
        """Writes a local file, streamed (never read whole into memory), as atomically as `put_bytes`."""

    @abc.abstractmethod
    def get_bytes(self, rel_path: str) -> bytes:
        """The file's content. Raises FileNotFoundError when there is none."""

    @abc.abstractmethod
    def get_file(self, rel_path: str, target: Path) -> None:
        """Copies the file to a local path, streamed. Raises FileNotFoundError when there is none."""

    @abc.abstractmethod
    def exists(self, rel_path: str) -> bool:
        """Whether a file is at `rel_path`."""

    @abc.abstractmethod
    def list(self, rel_prefix: str = "") -> list[str]:
        """Sorted relative paths of all files whose path starts with `rel_prefix` (a folder ends with `/`)."""

    def check_writable(self) -> None:
        """Raises `StorageError` when a run could not write here (checked before any work); a no-op where a write
        itself is the only test (object stores)."""
        return None

    @abc.abstractmethod
    def delete(self, rel_path: str) -> None:
        """Removes the file; a missing one is not an error."""

    @abc.abstractmethod
    def url_for(self, rel_path: str) -> str:
        """The absolute location of `rel_path` (of the store itself for ""): a path or an s3:// URI."""

    @abc.abstractmethod
    def local_path(self, rel_path: str) -> Path | None:
        """The file's path on this machine, or None for a remote store."""

    def get_versioned(self, rel_path: str) -> tuple[bytes, str] | None:
        """The file's content and a token naming this content for `put_if` (None when there is no file)."""
        try:
            data = self.get_bytes(rel_path)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put_if(self, rel_path: str, data: bytes, token: str | None) -> bool:
        """Writes `data` only if the file is still the one `token` came with (None: only if there is none); False
        when another writer changed it first. Atomic on local folders (a lock) and S3 (conditional writes); on stores
        without conditional writes (``gs://``, ``az://`` through pyarrow.fs) a check just before the write."""
        current = self.get_versioned(rel_path)
        if (None if current is None else current[1]) != token:
            return False
        self.put_bytes(rel_path, data)
        return True

    @property
    def location(self) -> OutputLocation:
        """The same output for the Delta tables (`index.delta_tables`): URL and endpoint, never credentials."""
        return OutputLocation.from_url(self.url, s3_endpoint_url=getattr(self, "endpoint_url", None))


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in `folder` durable; a best effort where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _os_reason(exc: OSError) -> StorageErrorReason:
    return "access_denied" if isinstance(exc, PermissionError) else "invalid_input"


class LocalStore(Store):
    """A folder; writes go to a temporary file beside the target, then `os.replace`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        refuse_percent(str(self.root))
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"output location {self.root} exists and is not a folder", reason="invalid_input")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"output location {self.root} cannot be made: {exc.strerror or exc}", reason=_os_reason(exc)
            ) from None
        self.url = str(self.root)

    def check_writable(self) -> None:
        try:
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".vitaclip-write-check-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StorageError(
                f"output location {self.root} is not writable: {exc.strerror or exc}", reason=_os_reason(exc)
            ) from None

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    def _path(self, rel_path: str) -> Path:
        return self.root / check_rel_path(rel_path)

    def put_bytes(self, rel_path: str, data: bytes) -> None:
        self._write(rel_path, lambda handle: handle.write(data))

    def put_file(self, rel_path: str, source: Path) -> None:
        def copy(handle: Any) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, handle, _COPY_CHUNK_BYTES)

        self._write(rel_path, copy)

    def _write(self, rel_path: str, fill: Callable[[Any], Any]) -> None:
        path = self._path(rel_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            # os.open with 0o666 honours the umask, unlike mkstemp's private 0o600.
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(descriptor, "wb") as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_folder(path.parent)

    def get_bytes(self, rel_path: str) -> bytes:
        return self._path(rel_path).read_bytes()

    def put_if(self, rel_path: str, data: bytes, token: str | None) -> bool:
        path = self._path(rel_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Writers of one file take turns on a lock file beside it; readers need none (the write is a rename).
        with open(path.parent / f".{path.name}.lock", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return super().put_if(rel_path, data, token)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def get_file(self, rel_path: str, target: Path) -> None:
        shutil.copyfile(self._path(rel_path), target)

    def exists(self, rel_path: str) -> bool:
        return self._path(rel_path).is_file()

    def list(self, rel_prefix: str = "") -> list[str]:
        check_rel_path(rel_prefix, prefix=True)
        folder = rel_prefix.rsplit("/", 1)[0] if "/" in rel_prefix else ""
        start = self.root / folder if folder else self.root
        if not start.is_dir():
            return []
        found = []
        for path in _regular_files(start):
            rel = path.relative_to(self.root).as_posix()
            if rel.startswith(rel_prefix) and not rel.endswith(_TMP_SUFFIX):
                found.append(rel)
        return sorted(found)

    def delete(self, rel_path: str) -> None:
        self._path(rel_path).unlink(missing_ok=True)

    def url_for(self, rel_path: str) -> str:
        return str(self._path(rel_path)) if rel_path else self.url

    def local_path(self, rel_path: str) -> Path | None:
        return self._path(rel_path) if rel_path else self.root


class S3Store(Store):
    """An S3 prefix; each write is one whole object (a PUT, or a multipart upload completed at once for large files:
    a single PUT stops at 5 GiB), so readers never see a partial file."""

    def __init__(
        self,
        url: str,
        *,
        s3_client: S3Client,
        multipart_threshold_bytes: int = 64 * MiB,
        endpoint_url: str | None = None,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.bucket, prefix = parse_s3_uri(url)
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        refuse_percent(self.url)
        refuse_odd_key_prefix(self.url, prefix)
        refuse_odd_key_prefix(self.url, self.bucket)  # '?' or '#' in it: the tables are read from the bare bucket
        self._client = s3_client
        # Parts of the threshold's size: S3 allows 10,000 parts, so 64 MiB parts reach 625 GiB per object.
        self._transfer = boto3.s3.transfer.TransferConfig(
            multipart_threshold=multipart_threshold_bytes, multipart_chunksize=max(5 * MiB, multipart_threshold_bytes)
        )

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    def check_writable(self) -> None:
        """A missing bucket, or a prefix this run may not list or write to, fails here, before any work: one listing
        call, then an empty probe object written and deleted (a run that could not write would otherwise fail at
        its first table write, after the decoding)."""
        prefix = self.prefix
        self._call("list", "", lambda: self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1))
        probe = f".vitaclip-write-check-{uuid.uuid4().hex}"
        self.put_bytes(probe, b"")
        with contextlib.suppress(StorageError):  # a store that may write but not delete: vacuum warns later
            self.delete(probe)

    def _key(self, rel_path: str) -> str:
        return self.prefix + check_rel_path(rel_path)

    def _call(self, action: str, rel_path: str, call: Callable[[], T]) -> T:
        uri = f"s3://{self.bucket}/{self.prefix}{rel_path}"
        try:
            return call()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            raise storage_error(error, uri=uri, action=action) from error
        except (boto3.exceptions.S3UploadFailedError, boto3.exceptions.RetriesExceededError) as error:
            # The transfer manager wraps what S3 said (a ClientError: no such bucket, access denied, a failed part).
            cause = getattr(error, "last_exception", None) or error.__context__ or error
            raise storage_error(cause, uri=uri, action=action) from error

    def put_bytes(self, rel_path: str, data: bytes) -> None:
        key = self._key(rel_path)
        self._call("write", rel_path, lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data)))

    def put_file(self, rel_path: str, source: Path) -> None:
        key = self._key(rel_path)
        self._call(
            "write",
            rel_path,
            lambda: self._client.upload_file(str(source), self.bucket, key, Config=self._transfer),
        )

    def get_file(self, rel_path: str, target: Path) -> None:
        key = self._key(rel_path)
        try:
            self._call(
                "read",
                rel_path,
                lambda: self._client.download_file(self.bucket, key, str(target), Config=self._transfer),
            )
        except StorageError as error:
            self._raise_missing(error, rel_path)
            raise

    def get_bytes(self, rel_path: str) -> bytes:
        key = self._key(rel_path)
        try:
            return read_whole(self._client, self.bucket, key)
        except StorageError as error:
            self._raise_missing(error, rel_path)
            raise

    def get_versioned(self, rel_path: str) -> tuple[bytes, str] | None:
        key = self._key(rel_path)

        def read() -> tuple[bytes, str]:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            return read_body(response, expected=response.get("ContentLength")), str(response["ETag"])

        try:
            return self._call("read", rel_path, read)
        except StorageError as error:
            if error.reason == "not_found":
                return None
            raise

    def put_if(self, rel_path: str, data: bytes, token: str | None) -> bool:
        key = self._key(rel_path)
        condition = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data), **condition)
        except botocore.exceptions.ClientError as error:
            code, _, status = client_error_fields(error)
            # 412: changed since (or there is one now); 409: a concurrent conditional write; 404: deleted since.
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            if token is not None and (code in NOT_FOUND_CODES or status == 404):
                return False
            raise storage_error(error, uri=self.url_for(rel_path), action="write") from error
        except botocore.exceptions.BotoCoreError as error:
            raise storage_error(error, uri=self.url_for(rel_path), action="write") from error
        return True

    def _raise_missing(self, error: StorageError, rel_path: str) -> None:
        """A read of no object raises FileNotFoundError, as the store's contract says (other errors: the caller's)."""
        if error.reason == "not_found":
            raise FileNotFoundError(errno.ENOENT, "no such object", self.url_for(rel_path)) from error

    def exists(self, rel_path: str) -> bool:
        key = self._key(rel_path)
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as error:
            code, _, status = client_error_fields(error)
            if code in NOT_FOUND_CODES or status == 404:
                return False
            raise storage_error(error, uri=self.url_for(rel_path), action="look up") from error
        except botocore.exceptions.BotoCoreError as error:
            raise storage_error(error, uri=self.url_for(rel_path), action="look up") from error
        return True

    def list(self, rel_prefix: str = "") -> list[str]:
        check_rel_path(rel_prefix, prefix=True)
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + rel_prefix
        )

        def collect() -> list[str]:
            return [
                entry["Key"][len(self.prefix) :]
                for page in pages
                for entry in page.get("Contents", ())
                if not entry["Key"].endswith("/")
            ]

        return sorted(self._call("list", rel_prefix, collect))

    def delete(self, rel_path: str) -> None:
        key = self._key(rel_path)
        self._call("delete", rel_path, lambda: self._client.delete_object(Bucket=self.bucket, Key=key))

    def url_for(self, rel_path: str) -> str:
        return f"s3://{self.bucket}/{self._key(rel_path)}" if rel_path else self.url

    def local_path(self, rel_path: str) -> Path | None:
        if rel_path:
            self._key(rel_path)
        return None


class ObjectFsStore(Store):
    """A ``gs://`` or ``az://`` (``abfss://``) prefix through ``pyarrow.fs``, credentials from the environment (see
    `index.delta_tables.OutputLocation.filesystem`). Blob stores write an object whole when its stream closes, so
    readers never see a partial file."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        refuse_percent(self.url)
        refuse_odd_key_prefix(self.url, self.url.split("://", 1)[1].partition("/")[2])
        self._fs, self._base = OutputLocation.from_url(self.url).filesystem()

    def __repr__(self) -> str:
        return f"ObjectFsStore({redact_url(self.url)!r})"

    def _path(self, rel_path: str) -> str:
        return f"{self._base}/{check_rel_path(rel_path)}"

    def put_bytes(self, rel_path: str, data: bytes) -> None:
        # Azure's output stream makes an empty blob at once and its content only at close: readers (and a kill in
        # between) would see an empty file. Written under another name, then copied whole onto the target.
        temporary = f"{self._path(rel_path)}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            with self._fs.open_output_stream(temporary) as out:
                out.write(data)
            self._fs.copy_file(temporary, self._path(rel_path))
        finally:
            try:
                self._fs.delete_file(temporary)
            except FileNotFoundError:
                pass

    def put_file(self, rel_path: str, source: Path) -> None:
        with open(source, "rb") as src, self._fs.open_output_stream(self._path(rel_path)) as out:
            shutil.copyfileobj(src, out, _COPY_CHUNK_BYTES)

    def get_bytes(self, rel_path: str) -> bytes:
        with self._fs.open_input_stream(self._path(rel_path)) as src:
            return src.read()

    def get_file(self, rel_path: str, target: Path) -> None:
        with self._fs.open_input_stream(self._path(rel_path)) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, _COPY_CHUNK_BYTES)

    def exists(self, rel_path: str) -> bool:
        import pyarrow.fs as pafs

        return self._fs.get_file_info(self._path(rel_path)).type == pafs.FileType.File

    def list(self, rel_prefix: str = "") -> list[str]:
        import pyarrow.fs as pafs

        check_rel_path(rel_prefix, prefix=True)
        folder = rel_prefix.rsplit("/", 1)[0] if "/" in rel_prefix else ""
        start = f"{self._base}/{folder}" if folder else self._base
        infos = self._fs.get_file_info(pafs.FileSelector(start, recursive=True, allow_not_found=True))
        found = [i.path[len(self._base) + 1 :] for i in infos if i.type == pafs.FileType.File]
        return sorted(rel for rel in found if rel.startswith(rel_prefix) and not rel.endswith(_TMP_SUFFIX))

    def delete(self, rel_path: str) -> None:
        try:
            self._fs.delete_file(self._path(rel_path))
        except FileNotFoundError:
            pass

    def url_for(self, rel_path: str) -> str:
        return f"{self.url}/{check_rel_path(rel_path)}" if rel_path else self.url

    def local_path(self, rel_path: str) -> Path | None:
        return None


def open_store(url: str, *, s3_client: S3Client | None = None, endpoint_url: str | None = None) -> Store:
    """The output store at `url`: a local folder (created when missing), `s3://bucket/prefix`, or a ``gs://`` or
    ``az://`` prefix (through ``pyarrow.fs``)."""
    if url.startswith("s3://"):
        client = s3_client if s3_client is not None else make_s3_client(endpoint_url=endpoint_url)
        return S3Store(url, s3_client=client, endpoint_url=endpoint_url)
    if url.startswith(("gs://", "az://", "abfss://")):
        if endpoint_url is not None:
            raise StorageError("--s3-endpoint-url is only for s3:// outputs", reason="invalid_input", uri=url)
        return ObjectFsStore(url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        raise StorageError(
            f"unsupported output location {url!r}: use a local folder, s3://, gs://, az:// or abfss://",
            reason="invalid_input",
            uri=url,
        )
    return LocalStore(url)


def _regular_files(folder: Path) -> list[Path]:
    """Regular files under `folder` (symlinks and special files are not files a store wrote; folders removed while
    walking are skipped)."""
    found = []
    for directory, folders, files in os.walk(folder):
        folders.sort()
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink() and path.is_file():
                found.append(path)
    return found

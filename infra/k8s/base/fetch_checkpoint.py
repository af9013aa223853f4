"""Copies a model checkpoint from S3 into a local folder: the init container of the Ray head and GPU worker pods.

    python fetch_checkpoint.py SRC DEST

SRC is ``s3://bucket/key`` (one file, such as an official ``.pth``) or ``s3://bucket/prefix/`` (a vitaclip
checkpoint folder: ``model.safetensors`` + ``config.json``). An empty SRC does nothing: random-weight smoke runs, or
a checkpoint on a mounted volume. A single file lands as ``DEST/<file name>``; a prefix's objects keep their paths
relative to the prefix. Files already there with the same size are skipped, and each file is written under a
temporary name and renamed, so a restarted pod never sees half a checkpoint.

Credentials come from the standard AWS chain only (on EKS the pod's IAM role through IRSA); ``AWS_ENDPOINT_URL``
points it at an S3-compatible store.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any


def _split(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"expected s3://bucket/key or s3://bucket/prefix/, got {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, key


def _local_path(dest: Path, relative: str, key: str) -> Path:
    """Where an object lands: ``relative`` (a key's part after the prefix) under ``dest``. Keys with ``..``, ``.`` or
    empty parts are refused: whoever writes to the bucket must not place files outside ``dest``."""
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"object key {key!r} has '.', '..' or empty path parts: refusing to copy it under {dest}")
    return dest.joinpath(*parts)


def _client() -> Any:
    import boto3
    import botocore.config

    config = botocore.config.Config(retries={"max_attempts": 10, "mode": "standard"})
    return boto3.session.Session().client("s3", config=config)


def _download(client: Any, bucket: str, key: str, size_bytes: int, path: Path) -> bool:
    """Downloads one object unless ``path`` already has its size; True when it downloaded."""
    if path.is_file() and path.stat().st_size == size_bytes:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    client.download_file(bucket, key, str(tmp))
    os.replace(tmp, path)
    return True


def fetch(src: str, dest: Path, *, client: Any | None = None) -> list[Path]:
    """Copies ``src`` (an object or a prefix) under ``dest``; returns the local files."""
    import botocore.exceptions

    bucket, key = _split(src)
    client = client or _client()
    objects: list[tuple[str, int, Path]] = []
    if key and not key.endswith("/"):
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            objects.append((key, int(head["ContentLength"]), _local_path(dest, PurePosixPath(key).name, key)))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
            key += "/"  # not an object: read it as a folder
    if not objects:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for entry in page.get("Contents", ()):
                relative = entry["Key"][len(key) :]
                if relative and not relative.endswith("/"):
                    objects.append((entry["Key"], int(entry["Size"]), _local_path(dest, relative, entry["Key"])))
    if not objects:
        raise FileNotFoundError(f"nothing at {src}")
    for obj_key, size_bytes, path in objects:
        done = _download(client, bucket, obj_key, size_bytes, path)
        print(f"{'fetched' if done else 'present'} s3://{bucket}/{obj_key} -> {path} ({size_bytes} bytes)", flush=True)
    return [path for _, _, path in objects]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: fetch_checkpoint.py SRC DEST  (SRC: s3://bucket/key, s3://bucket/prefix/ or '')", file=sys.stderr)
        return 2
    src, dest = args[0].strip(), Path(args[1])
    if not src:
        print("no checkpoint to fetch (empty source)")
        return 0
    try:
        fetch(src, dest)
    except Exception as exc:  # the init container's one job: say what failed and stop the pod from starting
        print(f"fetch_checkpoint: error: {src}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Test helper: deletes rows of a Delta table through a deletion vector, as another engine (Spark) would.

delta-rs reads deletion vectors but never writes them, so tests that need a table whose data files have some call
`add_deletion_vector`. It writes a real deletion vector and commits what Spark's ``DELETE`` commits on a table with
``delta.enableDeletionVectors``: a ``remove`` of the data file and an ``add`` of the same file with the vector's
descriptor. Formats (delta-io/delta PROTOCOL.md): "Deletion Vectors" for the descriptor, appendix "Deletion Vector
Format" for the bytes.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
import uuid
import zlib
from typing import Any
from urllib.parse import unquote

from deltalake import DeltaTable

_MAGIC = 1681511377  # a RoaringBitmapArray in the portable format follows
_NO_RUNS_COOKIE = 12346  # a 32-bit Roaring bitmap with no run containers (RoaringFormatSpec)
_ARRAY_MAX = 4096  # more values in a 65536-value block would make it a bitmap container, which is not written here
# Z85 and Python's base85 both write each 4-byte big-endian word as 5 digits; only the alphabets differ.
_B85_TO_Z85 = str.maketrans(
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~",
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#",
)


def _z85(data: bytes) -> str:
    """Z85 of `data`, whose length must be a multiple of 4."""
    return base64.b85encode(data).decode("ascii").translate(_B85_TO_Z85)


def _roaring32(values: list[int]) -> bytes:
    """A 32-bit Roaring bitmap of sorted distinct `values` (< 2**32) in the portable format, array containers only."""
    blocks: dict[int, list[int]] = {}
    for value in values:
        blocks.setdefault(value >> 16, []).append(value & 0xFFFF)
    if any(len(low) > _ARRAY_MAX for low in blocks.values()):
        raise ValueError(f"at most {_ARRAY_MAX} deleted rows per block of 65536 rows (array containers only)")
    header = struct.pack("<II", _NO_RUNS_COOKIE, len(blocks))
    header += b"".join(struct.pack("<HH", key, len(low) - 1) for key, low in blocks.items())
    offset = len(header) + 4 * len(blocks)  # the offsets (from the bitmap's start) of each container's values
    for low in blocks.values():
        header += struct.pack("<I", offset)
        offset += 2 * len(low)
    return header + b"".join(struct.pack(f"<{len(low)}H", *low) for low in blocks.values())


def serialize_rows(rows: list[int]) -> bytes:
    """Row indexes as Delta's RoaringBitmapArray: the magic number, then a 64-bit Roaring bitmap in the portable
    format (the bucket count, then each bucket's high 32 bits and a 32-bit bitmap of the low 32 bits)."""
    buckets: dict[int, list[int]] = {}
    for row in sorted(set(rows)):
        if not 0 <= row < 2**63:
            raise ValueError(f"row index {row} is out of range")
        buckets.setdefault(row >> 32, []).append(row & 0xFFFFFFFF)
    body = b"".join(struct.pack("<I", key) + _roaring32(low) for key, low in buckets.items())
    return struct.pack("<IQ", _MAGIC, len(buckets)) + body


def _current_add(log: str, latest: int, target: str, table: str) -> dict[str, Any]:
    """The table's add action for the data file `target` (an absolute path), from the JSON commits (newest first;
    checkpoints are not read: the helper is for small test tables, whose logs start at version 0)."""
    for version in range(latest, -1, -1):
        try:
            with open(os.path.join(log, f"{version:020d}.json"), encoding="utf-8") as f:
                actions = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            break
        for kind in ("add", "remove"):  # a commit may remove a file and add it back (a deletion vector's commit)
            for action in actions:
                if kind in action and os.path.join(table, unquote(action[kind]["path"])) == target:
                    if kind == "remove":
                        raise ValueError(f"{target} was removed from the table at version {version}")
                    return dict(action["add"])
    raise ValueError(f"{target} is not in the table's JSON commits")


def add_deletion_vector(table_uri: str, data_file: str, deleted_rows: list[int], *, inline: bool = False) -> int:
    """Deletes rows `deleted_rows` (0-based row indexes) of `data_file` (its path relative to the table, or absolute)
    through a new deletion vector, stored in a ``deletion_vector_<uuid>.bin`` file in the table folder or, with
    `inline`, in the log; commits it as the next version, which is returned. The local table must support deletion
    vectors and the file must not have one yet (merging with an existing vector is not implemented)."""
    table = os.path.abspath(table_uri.removeprefix("file://"))
    dt = DeltaTable(table)
    if "deletionVectors" not in (dt.protocol().writer_features or []):
        raise ValueError(f"{table} does not support deletion vectors (set delta.enableDeletionVectors first)")
    log, latest = os.path.join(table, "_delta_log"), dt.version()
    add = _current_add(log, latest, os.path.join(table, unquote(data_file.removeprefix("file://"))), table)
    if add.get("deletionVector"):
        raise ValueError(f"{data_file} already has a deletion vector")
    stats = json.loads(add.get("stats") or "{}")
    rows = sorted(set(deleted_rows))
    if not rows or ("numRecords" in stats and rows[-1] >= stats["numRecords"]):
        raise ValueError(f"row indexes {deleted_rows} are not rows of {data_file} ({stats.get('numRecords')} rows)")

    data = serialize_rows(rows)
    descriptor: dict[str, Any]
    if inline:  # Z85 needs whole 4-byte words: pad with zeros, sizeInBytes keeps the unpadded size
        padded = data + bytes(-len(data) % 4)
        descriptor = {"storageType": "i", "pathOrInlineDv": _z85(padded)}
    else:  # file format version 1, then per vector: its size and a CRC-32 of it, both big-endian
        dv_id = uuid.uuid4()
        with open(os.path.join(table, f"deletion_vector_{dv_id}.bin"), "xb") as f:
            f.write(b"\x01" + struct.pack(">I", len(data)) + data + struct.pack(">I", zlib.crc32(data)))
        descriptor = {"storageType": "u", "pathOrInlineDv": _z85(dv_id.bytes), "offset": 1}
    descriptor |= {"sizeInBytes": len(data), "cardinality": len(rows)}

    now = int(time.time() * 1000)
    # numRecords stays the file's physical row count; the min/max/null counts may now be wider than the rows left.
    new_stats = json.dumps({**stats, "tightBounds": False}, separators=(",", ":")) if stats else add.get("stats")
    actions = [
        {
            "commitInfo": {
                "timestamp": now,
                "operation": "DELETE",
                "operationParameters": {"predicate": "[]"},
                "readVersion": latest,
                "isolationLevel": "WriteSerializable",
                "isBlindAppend": False,
                "operationMetrics": {"numDeletionVectorsAdded": "1", "numDeletedRows": str(len(rows))},
                "engineInfo": "tests/deletion_vectors.py (as Spark)",
            }
        },
        {
            "remove": {
                "path": add["path"],
                "deletionTimestamp": now,
                "dataChange": True,
                "extendedFileMetadata": True,
                "partitionValues": add.get("partitionValues", {}),
                "size": add["size"],
            }
        },
        {"add": {**add, "dataChange": True, "stats": new_stats, "deletionVector": descriptor}},
    ]
    with open(os.path.join(log, f"{latest + 1:020d}.json"), "x", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(action, separators=(",", ":")) for action in actions) + "\n")
    return latest + 1

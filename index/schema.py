"""Row ids, video ids, ETags of local files, and the column layout of the tables at schema version 1.

Version 1 is the previous output layout (plain Parquet parts whose schema metadata names the table and version),
read by ``vitaclip migrate``. The Delta tables of today (`index.delta_tables`, schema versions 2 and 3) take their
columns from it with two types changed (version 3 adds one column); their version and embedding size are table
properties.
"""

from __future__ import annotations

import hashlib
import os
from typing import TypeVar

import pyarrow as pa

SCHEMA_VERSION = 1
_TABLE_KEY = b"vitaclip.table"
_VERSION_KEY = b"vitaclip.schema_version"

# Failure kinds of the `status` column besides "ok" (decode reasons from vitaclip.video plus I/O failures).
STATUS_OK = "ok"
STATUS_DELETED = "deleted"
"""A video no longer listed under its run's inputs (``--prune-missing``): its row stays, without embedding."""


class SchemaError(ValueError):
    """A table written by an unknown or incompatible version of vitaclip."""


LOCAL_ETAG_PREFIX = "local-"


def local_etag(stat: os.stat_result) -> str:
    """The ``etag`` of a local file: changes when its size or modification time does."""
    return f"{LOCAL_ETAG_PREFIX}{stat.st_size}-{stat.st_mtime_ns}"


def video_id_for(uri: str) -> str:
    """Stable id of a video: derived from its URI only, so re-runs and changed objects keep it."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:24]


def row_id_for(video_id: str, segment_index: int = -1) -> int:
    """Stable non-negative int64 id of a row (a whole video: -1; a segment: its index): the FAISS id."""
    digest = hashlib.sha256(f"{video_id}/{segment_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def _with_meta(name: str, fields: list[pa.Field], embed_dim: int) -> pa.Schema:
    meta = {
        _TABLE_KEY: name.encode(),
        _VERSION_KEY: str(SCHEMA_VERSION).encode(),
        b"vitaclip.embed_dim": str(embed_dim).encode(),
    }
    return pa.schema(fields, metadata=meta)


def _result_fields(embed_dim: int) -> list[pa.Field]:
    """The columns every embedded row ends with (videos and segments alike)."""
    return [
        pa.field("embedding", pa.list_(pa.float32(), embed_dim)),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("label_scores", pa.list_(pa.float32())),
        pa.field("thumbnail_jpeg", pa.binary()),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("indexed_at", pa.timestamp("ms", tz="UTC"), nullable=False),
    ]


def videos_schema(embed_dim: int) -> pa.Schema:
    """One row per input video per model id."""
    return _with_meta(
        "videos",
        [
            pa.field("video_id", pa.string(), nullable=False),
            pa.field("row_id", pa.int64(), nullable=False),
            pa.field("uri", pa.string(), nullable=False),
            pa.field("etag", pa.string()),
            pa.field("size_bytes", pa.int64()),
            pa.field("duration_seconds", pa.float64()),
            pa.field("fps", pa.float64()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("codec", pa.string()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error_message", pa.string()),
            *_result_fields(embed_dim),
        ],
        embed_dim,
    )


def segments_schema(embed_dim: int) -> pa.Schema:
    """One row per segment of a video when the job embeds segments."""
    return _with_meta(
        "segments",
        [
            pa.field("video_id", pa.string(), nullable=False),
            pa.field("row_id", pa.int64(), nullable=False),
            pa.field("uri", pa.string(), nullable=False),
            pa.field("segment_index", pa.int32(), nullable=False),
            pa.field("start_seconds", pa.float64(), nullable=False),
            pa.field("end_seconds", pa.float64(), nullable=False),
            *_result_fields(embed_dim),
        ],
        embed_dim,
    )


def schema_for(table: str, embed_dim: int) -> pa.Schema:
    if table == "videos":
        return videos_schema(embed_dim)
    if table == "segments":
        return segments_schema(embed_dim)
    raise ValueError(f"unknown table {table!r}; tables: videos, segments")


def check_schema(schema: pa.Schema, table: str) -> int:
    """Checks a file's schema is a version of ``table`` this vitaclip reads; returns its embedding dimension."""
    meta = schema.metadata or {}
    name = meta.get(_TABLE_KEY, b"").decode()
    version = meta.get(_VERSION_KEY, b"").decode()
    if name != table:
        raise SchemaError(f"expected a {table!r} table, found {name or 'a file without vitaclip metadata'}")
    if version != str(SCHEMA_VERSION):
        raise SchemaError(
            f"{table} table has schema version {version or '?'}; this vitaclip reads version {SCHEMA_VERSION}"
        )
    embed_dim = int(meta.get(b"vitaclip.embed_dim", b"0"))
    expected = schema_for(table, embed_dim)
    if not schema.remove_metadata().equals(expected.remove_metadata()):
        raise SchemaError(f"{table} table columns differ from schema version {SCHEMA_VERSION}")
    return embed_dim


def plain_type(kind: pa.DataType) -> pa.DataType:
    """`kind` with Arrow's view types (``string_view``, ``binary_view``, ``list_view``), also nested, replaced by
    the plain ones the tables' schemas use."""
    if kind == pa.string_view():
        return pa.string()
    if kind == pa.binary_view():
        return pa.binary()
    if pa.types.is_list_view(kind) or pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(plain_type(kind.value_type)))
    if pa.types.is_large_list_view(kind) or pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(plain_type(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(plain_type(field.type)) for field in kind])
    return kind


def plain_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with view types replaced by plain ones (`plain_type`)."""
    return pa.schema([field.with_type(plain_type(field.type)) for field in schema], metadata=schema.metadata)


_Columns = TypeVar("_Columns", pa.Table, pa.RecordBatch)


def plain_types(table: _Columns) -> _Columns:
    """`table` with its view-typed columns cast to the plain types. Other writers of a table (delta-rs's delete,
    update and merge; polars) write ``string_view`` and ``binary_view`` columns, which Arrow's compute functions
    and concatenation do not mix with the plain ones."""
    schema = plain_schema(table.schema)
    return table if schema.equals(table.schema) else table.cast(schema)

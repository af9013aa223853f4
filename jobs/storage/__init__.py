"""The indexing job's inputs: streamed video listings (`listing`) and reads of one video (`reading`).

S3 clients and storage errors come from `index.s3`, the output store from `index.stores`; both are re-exported here
for the job's callers. A problem with a whole input (a missing bucket, refused credentials, a location that names
nothing) raises `StorageError` with the location in the message; a single unreadable object raises it too, with a
`reason` the job records on that video's row instead of stopping the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vitaclip._lazy import lazy_exports

# Names load lazily: a decode task needs `reading` only, not the output stores (delta-rs, pandas, FAISS).
_EXPORTS = {
    "EmptyInputError": "index.s3",
    "S3Client": "index.s3",
    "StorageError": "index.s3",
    "StorageErrorReason": "index.s3",
    "make_s3_client": "index.s3",
    "parse_s3_uri": "index.s3",
    "LocalStore": "index.stores",
    "ObjectFsStore": "index.stores",
    "S3Store": "index.stores",
    "Store": "index.stores",
    "open_store": "index.stores",
    "DEFAULT_VIDEO_EXTENSIONS": "jobs.storage.listing",
    "MANIFEST_SUFFIXES": "jobs.storage.listing",
    "UNKNOWN_SIZE": "jobs.storage.listing",
    "VideoObject": "jobs.storage.listing",
    "current_etags": "jobs.storage.listing",
    "absolute_path": "jobs.storage.listing",
    "classify_inputs": "jobs.storage.listing",
    "describe_listing": "jobs.storage.listing",
    "list_videos": "jobs.storage.listing",
    "listed_scopes": "jobs.storage.listing",
    "printable_path": "jobs.storage.listing",
    "require_any": "jobs.storage.listing",
    "S3RangeReader": "jobs.storage.reading",
    "open_video": "jobs.storage.reading",
}

__all__ = [
    "DEFAULT_VIDEO_EXTENSIONS",
    "MANIFEST_SUFFIXES",
    "UNKNOWN_SIZE",
    "EmptyInputError",
    "LocalStore",
    "ObjectFsStore",
    "S3Client",
    "S3RangeReader",
    "S3Store",
    "StorageError",
    "StorageErrorReason",
    "Store",
    "VideoObject",
    "absolute_path",
    "classify_inputs",
    "current_etags",
    "describe_listing",
    "list_videos",
    "listed_scopes",
    "make_s3_client",
    "open_store",
    "open_video",
    "parse_s3_uri",
    "printable_path",
    "require_any",
]

if TYPE_CHECKING:
    from index.s3 import EmptyInputError, S3Client, StorageError, StorageErrorReason, make_s3_client, parse_s3_uri
    from index.stores import LocalStore, ObjectFsStore, S3Store, Store, open_store
    from jobs.storage.listing import (
        DEFAULT_VIDEO_EXTENSIONS,
        MANIFEST_SUFFIXES,
        UNKNOWN_SIZE,
        VideoObject,
        absolute_path,
        classify_inputs,
        current_etags,
        describe_listing,
        list_videos,
        listed_scopes,
        printable_path,
        require_any,
    )
    from jobs.storage.reading import S3RangeReader, open_video


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

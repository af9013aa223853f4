"""The indexing job's inputs: streamed video listings (`listing`) and reads of one video (`reading`).

S3 clients and storage errors come from `index.s3`, the output store from `index.stores`; both are re-exported here
for the job's callers. A problem with a whole input (a missing bucket, refused credentials, a location that names
nothing) raises `StorageError` with the location in the message; a single unreadable object raises it too, with a
`reason` the job records on that video's row instead of stopping the run.
"""

from index.s3 import EmptyInputError, S3Client, StorageError, StorageErrorReason, make_s3_client, parse_s3_uri
from index.stores import LocalStore, ObjectFsStore, S3Store, Store, open_store
from jobs.storage.listing import (
    DEFAULT_VIDEO_EXTENSIONS,
    MANIFEST_SUFFIXES,
    UNKNOWN_SIZE,
    VideoObject,
    absolute_path,
    describe_listing,
    list_videos,
    listed_scopes,
    printable_path,
    require_any,
)
from jobs.storage.reading import S3RangeReader, open_video

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

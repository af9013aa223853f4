"""Delta Lake output tables (index.delta_tables): locations, schemas, data files, conditional commits, the log."""

from __future__ import annotations

import dataclasses
import datetime as dt_
import json
import os
import pickle
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from counting_fs import CountingHandler
from delta_readers import duckdb_connection
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema

from index import delta_tables as dlt
from index.delta_tables import (
    SCHEMA_VERSION,
    CommitConflict,
    DataFile,
    LogUnavailableError,
    OutputLocation,
    RemovedFile,
    TableMismatchError,
)
from index.schema import schema_for

DIM = 4
T0 = dt_.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt_.timezone.utc)


def video_rows(
    ids: list[str], *, model_id: str = "m1", dim: int = DIM, thumb_bytes: int = 3, run_id: str = "r1"
) -> pa.Table:
    """Rows of the videos table: one per id, microsecond timestamps (truncated on write), one failed row per call."""
    n = len(ids)
    return pa.table(
        {
            "video_id": ids,
            "row_id": list(range(n)),
            "uri": [f"s3://in/{i}.mp4" for i in ids],
            "etag": [f"etag-{i}" for i in ids],
            "size_bytes": [1000 + k for k in range(n)],
            "duration_seconds": [1.5] * n,
            "fps": [30.0] * n,
            "width": [640] * n,
            "height": [360] * n,
            "codec": ["h264"] * n,
            "status": ["ok"] * (n - 1) + ["decode_error"],
            "error_message": [None] * (n - 1) + ["bad frame"],
            "embedding": [[float(k)] * dim for k in range(n - 1)] + [None],
            "labels": [["cat", "dog"]] * n,
            "label_scores": [[0.7, 0.3]] * n,
            "thumbnail_jpeg": [os.urandom(thumb_bytes) for _ in range(n)],
            "model_id": [model_id] * n,
            "run_id": [run_id] * n,
            "indexed_at": [T0 + dt_.timedelta(seconds=k, microseconds=123_999) for k in range(n)],
        }
    )


def segment_rows(video_id: str, count: int, *, model_id: str = "m1") -> pa.Table:
    return pa.table(
        {
            "video_id": [video_id] * count,
            "row_id": list(range(count)),
            "uri": [f"s3://in/{video_id}.mp4"] * count,
            "segment_index": list(range(count)),
            "start_seconds": [float(k) for k in range(count)],
            "end_seconds": [float(k + 1) for k in range(count)],
            "embedding": [[0.5] * DIM] * count,
            "labels": [None] * count,
            "label_scores": [None] * count,
            "thumbnail_jpeg": [None] * count,
            "model_id": [model_id] * count,
            "run_id": ["r1"] * count,
            "indexed_at": [T0] * count,
        }
    )


def fresh_name() -> str:
    return f"part-{uuid.uuid4().hex}.parquet"


def add_files(location: OutputLocation, table: str, files: list[DataFile], **kwargs: Any) -> int:
    read_version = DeltaTable(location.table_uri(table), storage_options=location.storage_options()).version()
    options: dict[str, Any] = {"app_id": "test", "app_version": read_version + 1, "metadata": {}}
    options.update(kwargs)
    return dlt.commit(location, table, adds=files, removes=[], read_version=read_version, **options)


@pytest.fixture
def local(tmp_path: Path) -> OutputLocation:
    location = OutputLocation.from_url(str(tmp_path / "out"))
    dlt.create_tables(location, DIM)
    return location


@pytest.fixture
def s3_location(s3_server: str, s3_bucket: tuple[Any, str]) -> OutputLocation:
    location = OutputLocation.from_url(f"s3://{s3_bucket[1]}/out", s3_endpoint_url=s3_server)
    return location


# ----------------------------------------------------------------------------------------------------- location


def test_output_location_local_is_absolute_and_picklable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    location = OutputLocation.from_url("rel/out/")
    assert location.url == str(tmp_path / "rel" / "out")
    assert location.table_uri("videos") == str(tmp_path / "rel" / "out" / "videos")
    assert location.storage_options() == {}
    assert pickle.loads(pickle.dumps(location)) == location
    filesystem, base = location.filesystem()
    assert isinstance(filesystem, pafs.LocalFileSystem) and base == location.url
    with pytest.raises(ValueError, match="unknown table"):
        location.table_uri("frames")


def test_output_location_s3_strips_userinfo_and_sets_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    location = OutputLocation.from_url("s3://bkt/a/b/", s3_endpoint_url="http://key:secret@minio.local:9000/")
    assert location == OutputLocation("s3://bkt/a/b", "http://minio.local:9000")
    assert "secret" not in repr(location) and b"secret" not in pickle.dumps(location)
    assert location.table_uri("segments") == "s3://bkt/a/b/segments"
    assert location.storage_options() == {
        "AWS_REGION": "eu-west-3",
        "AWS_ENDPOINT_URL": "http://minio.local:9000",
        "AWS_ALLOW_HTTP": "true",
    }
    filesystem, base = location.filesystem()
    assert isinstance(filesystem, pafs.S3FileSystem) and base == "bkt/a/b"
    assert filesystem.region == "eu-west-3"
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    aws = OutputLocation.from_url("s3://bkt/out")
    assert aws.s3_endpoint_url is None and aws.storage_options() == {"AWS_REGION": "us-east-1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://u:p@s3.example.com")
    assert OutputLocation.from_url("s3://bkt/out").s3_endpoint_url == "https://s3.example.com"
    assert OutputLocation.from_url("gs://bkt/out/").url == "gs://bkt/out"
    assert OutputLocation.from_url("az://container/out").table_uri("videos") == "az://container/out/videos"
    with pytest.raises(ValueError, match="unsupported"):
        OutputLocation.from_url("ftp://host/out")
    with pytest.raises(ValueError, match="only for s3"):
        OutputLocation.from_url("gs://bkt/out", s3_endpoint_url="http://x:1")


# ----------------------------------------------------------------------------------------------------- schemas, tables


@pytest.mark.parametrize("table", dlt.TABLES)
def test_table_schema_is_version_1_with_delta_types(table: str) -> None:
    schema = dlt.table_schema(table, 512, version=2)
    old = schema_for(table, 512)
    assert schema.names == old.names and not schema.metadata
    for new_field, old_field in zip(schema, old, strict=True):
        assert new_field.nullable == old_field.nullable, new_field.name
        if new_field.name == "embedding":
            assert new_field.type == pa.list_(pa.float32())
        elif new_field.name == "indexed_at":
            assert new_field.type == pa.timestamp("us", tz="UTC")
        else:
            assert new_field.type == old_field.type, new_field.name
    delta = DeltaSchema.from_arrow(schema)  # Delta accepts it and keeps the non-nullable fields non-nullable
    assert {f.name for f in delta.fields if not f.nullable} == {f.name for f in schema if not f.nullable}
    assert pa.schema(delta.to_arrow()).names == schema.names


def test_schema_version_3_adds_attempts_to_videos_only() -> None:
    videos_2, videos_3 = dlt.table_schema("videos", 8, version=2), dlt.table_schema("videos", 8)
    at = videos_3.get_field_index("attempts")
    assert at == len(videos_3) - 1 and videos_3.field("attempts") == pa.field("attempts", pa.int32())
    assert videos_3.remove(at) == videos_2
    assert dlt.table_schema("segments", 8) == dlt.table_schema("segments", 8, version=2)
    with pytest.raises(ValueError, match="unknown schema version 1"):
        dlt.table_schema("videos", 8, version=1)


def version_2_output(location: OutputLocation, rows: pa.Table) -> DataFile:
    """An output as vitaclip wrote it at schema version 2: tables of that schema and one videos file of `rows`
    written without the ``attempts`` column, committed."""
    for table in dlt.TABLES:
        DeltaTable.create(
            location.table_uri(table),
            schema=dlt.table_schema(table, DIM, version=2),
            configuration={"vitaclip.table": table, "vitaclip.schema_version": "2", "vitaclip.embed_dim": str(DIM)},
            raise_if_key_not_exists=False,
            storage_options=location.storage_options(),
        )
    old = rows.cast(dlt.table_schema("videos", DIM, version=2))
    name = fresh_name()
    filesystem, root = location.table_path("videos")
    pq.write_table(old, f"{root}/{name}", filesystem=filesystem)
    stats = json.dumps(dlt.file_stats(old))
    size = filesystem.get_file_info(f"{root}/{name}").size
    data_file = DataFile("videos", name, size, old.num_rows, stats, int(time.time() * 1000))
    add_files(location, "videos", [data_file])
    return data_file


def test_a_version_2_output_is_read_as_it_is_and_upgraded_by_the_first_writer(
    tmp_path: Path, duckdb_delta: Any
) -> None:
    location = OutputLocation.from_url(str(tmp_path / "out"))
    old_rows = video_rows(["a", "b", "c"])
    old_file = version_2_output(location, old_rows)
    videos = dlt.open_table(location, "videos")
    assert videos is not None and dlt.check_table(videos, "videos") == DIM and dlt.schema_version(videos) == 2
    keys = dlt.read_keys(location, version=1, model_id="m1")  # readers take version 2 as it is
    assert keys.column("attempts").to_pylist() == [None] * 3

    versions = dlt.create_tables(location, DIM)  # a writer upgrades: the column, then the version property
    assert versions == {"videos": 3, "segments": 1}
    for table in dlt.TABLES:
        dt = dlt.open_table(location, table)
        assert dt is not None and dlt.schema_version(dt) == 3 and dlt.check_table(dt, table, embed_dim=DIM) == DIM
        assert dlt.data_file_paths(dt) == ([old_file.path] if table == "videos" else [])  # no data file rewritten
    assert dlt.create_tables(location, DIM) == versions  # once

    new = dlt.write_data_file(
        location, "videos", video_rows(["d"]).append_column("attempts", pa.array([2], pa.int32())), name=fresh_name()
    )
    kept = dlt.rewrite_without(
        location, "videos", old_file.path, ["a"], model_id="m1", name=fresh_name()
    )  # an old file's copy
    assert kept is not None
    dlt.commit(
        location, "videos", adds=[new, kept], removes=[RemovedFile(old_file.path, old_file.size_bytes)],
        read_version=3, app_id="test", app_version=1, metadata={},
    )  # fmt: skip
    read = DeltaTable(location.table_uri("videos")).to_pyarrow_table().sort_by("video_id")
    assert read.schema.names == dlt.table_schema("videos", DIM).names
    assert read.column("video_id").to_pylist() == ["b", "c", "d"]
    assert read.column("attempts").to_pylist() == [None, None, 2]
    keys = dlt.read_keys(location, version=4, model_id="m1")
    assert dict(zip(keys.column("video_id").to_pylist(), keys.column("attempts").to_pylist(), strict=True)) == {
        "b": None,
        "c": None,
        "d": 2,
    }
    rows = duckdb_delta.execute(
        f"SELECT video_id, attempts FROM delta_scan('{location.table_uri('videos')}') ORDER BY video_id"
    ).fetchall()
    assert rows == [("b", None), ("c", None), ("d", 2)]


_UPGRADE_SCRIPT = """
import json, sys, time
from index import delta_tables as dlt
from index.delta_tables import OutputLocation
url, endpoint, start_at = sys.argv[1], sys.argv[2] or None, float(sys.argv[3])
location = OutputLocation.from_url(url, s3_endpoint_url=endpoint)
time.sleep(max(0.0, start_at - time.time()))
print(json.dumps(dlt.create_tables(location, int(sys.argv[4]))))
"""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_writers_upgrading_one_version_2_output_at_once_agree(where: str, tmp_path: Path, request: Any) -> None:
    """Three runs (processes) start on one version 2 output at the same moment: each upgrades or finds it upgraded."""
    import subprocess
    import sys

    location = (
        OutputLocation.from_url(str(tmp_path / "out")) if where == "local" else request.getfixturevalue("s3_location")
    )
    version_2_output(location, video_rows(["a", "b"]))
    start_at = str(time.time() + 4)  # after the imports of all three
    args = [location.url, location.s3_endpoint_url or "", start_at, str(DIM)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _UPGRADE_SCRIPT, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    results = [writer.communicate(timeout=120) for writer in writers]
    assert [w.returncode for w in writers] == [0, 0, 0], [err[-2000:] for _, err in results]
    versions = [json.loads(out) for out, _ in results]
    videos = dlt.open_table(location, "videos")
    assert videos is not None and dlt.schema_version(videos) == 3
    assert {v["videos"] for v in versions} == {videos.version()} == {3}  # one column commit, one property commit
    assert pa.schema(videos.schema().to_arrow()).names == dlt.table_schema("videos", DIM).names
    assert videos.to_pyarrow_table().num_rows == 2


def test_an_upgrade_stopped_between_its_two_commits_is_read_and_finished_by_the_next_writer(tmp_path: Path) -> None:
    """The state every reader and writer can meet while another writer upgrades (or after it was killed): the new
    version's columns are committed, its version property not yet."""
    from deltalake.schema import Field as DeltaField

    location = OutputLocation.from_url(str(tmp_path / "out"))
    version_2_output(location, video_rows(["a", "b"]))
    videos = dlt.open_table(location, "videos")
    assert videos is not None
    videos.alter.add_columns([DeltaField.from_arrow(pa.field("attempts", pa.int32()))])  # `_upgrade`'s first step
    videos = dlt.open_table(location, "videos")
    assert videos is not None and dlt.schema_version(videos) == 2
    assert dlt.check_table(videos, "videos", embed_dim=DIM) == DIM
    keys = dlt.read_keys(location, version=videos.version(), model_id="m1")
    assert keys.column("attempts").to_pylist() == [None, None]
    assert dlt.create_tables(location, DIM) == {"videos": 3, "segments": 1}  # only the property commit is left
    videos = dlt.open_table(location, "videos")
    assert videos is not None and dlt.schema_version(videos) == 3 and dlt.check_table(videos, "videos") == DIM
    # Columns of no version stay refused, in the same state.
    other = OutputLocation.from_url(str(tmp_path / "other"))
    version_2_output(other, video_rows(["a"]))
    table = dlt.open_table(other, "videos")
    assert table is not None
    table.alter.add_columns([DeltaField.from_arrow(pa.field("retries", pa.int32()))])
    with pytest.raises(TableMismatchError, match=r"columns differ from videos schema version 2 \(added: retries\)"):
        dlt.create_tables(other, DIM)


def test_a_table_with_deletion_vectors_on_is_used_until_a_file_has_one(local: OutputLocation) -> None:
    """Turning deletion vectors on upgrades the protocol for good, and every reader and writer refused the output
    with nothing to undo. Such a table is used while no data file has a deletion vector; a real one (written as
    Spark writes it) is refused with the purge to run, by the job and by the index's reads; a delete by delta-rs
    rewrites the file, and the table is usable again."""
    from deletion_vectors import add_deletion_vector

    from index.build import _ok_rows

    dlt.create_tables(local, DIM)
    first = dlt.write_data_file(local, "videos", video_rows(["a", "b", "c"]), name=fresh_name())
    add_files(local, "videos", [first])
    DeltaTable(local.table_uri("videos")).alter.set_table_properties({"delta.enableDeletionVectors": "true"})
    assert dlt.create_tables(local, DIM)["videos"] == 2  # accepted: read and written
    later = dlt.write_data_file(local, "videos", video_rows(["d", "e"]), name=fresh_name())
    version = add_files(local, "videos", [later])
    vectors, ids, _ = _ok_rows(local, "videos", "m1", version=version)
    assert sorted(ids.tolist()) == [0, 1] and vectors.shape == (2, DIM)  # the ok rows, read without delta-rs's check

    version = add_deletion_vector(local.table_uri("videos"), first.path, [0])  # a, deleted as Spark would
    with pytest.raises(TableMismatchError, match=r"deleted through deletion vectors.*REORG TABLE"):
        dlt.create_tables(local, DIM)
    with pytest.raises(TableMismatchError, match="deleted through deletion vectors"):
        _ok_rows(local, "videos", "m1", version=version)
    DeltaTable(local.table_uri("videos")).delete("video_id = 'b'")  # delta-rs rewrites the file, without its vector
    assert dlt.check_table(DeltaTable(local.table_uri("videos")), "videos") == DIM
    rows = DeltaTable(local.table_uri("videos")).scan(columns=["video_id"]).read_all()
    assert sorted(pa.table(rows).column("video_id").to_pylist()) == ["c", "d", "e"]


def test_a_partitioned_table_is_refused_saying_so(local: OutputLocation) -> None:
    """A table rewritten with ``partition_by`` (the partition values move from the data files to folder names): the
    job said data files were gone and pointed at repair(), search failed on a missing column."""
    from deltalake import write_deltalake

    dlt.create_tables(local, DIM)
    add_files(local, "videos", [dlt.write_data_file(local, "videos", video_rows(["a", "b"]), name=fresh_name())])
    rows = DeltaTable(local.table_uri("videos")).to_pyarrow_table()
    write_deltalake(
        local.table_uri("videos"), rows, mode="overwrite", partition_by=["model_id"], schema_mode="overwrite"
    )
    dt = dlt.open_table(local, "videos")
    assert dt is not None and dt.metadata().partition_columns == ["model_id"]
    for call in (lambda: dlt.check_table(dt, "videos"), lambda: dlt.create_tables(local, DIM)):
        with pytest.raises(TableMismatchError, match=r"is partitioned by model_id, .*\.restore\(version\)"):
            call()


def test_create_tables_is_idempotent_and_sets_properties(tmp_path: Path) -> None:
    location = OutputLocation.from_url(str(tmp_path / "out"))
    assert dlt.open_table(location, "videos") is None
    assert dlt.create_tables(location, DIM) == {"videos": 0, "segments": 0}
    assert dlt.create_tables(location, DIM) == {"videos": 0, "segments": 0}
    for table in dlt.TABLES:
        dt = dlt.open_table(location, table)
        assert dt is not None and dt.version() == 0
        config = dt.metadata().configuration
        assert config["vitaclip.table"] == table
        assert config["vitaclip.schema_version"] == str(SCHEMA_VERSION) == "3"
        assert config["vitaclip.embed_dim"] == str(DIM)
        assert dlt.check_table(dt, table, embed_dim=DIM) == DIM


def test_mismatched_tables_are_refused_naming_both_values(tmp_path: Path) -> None:
    location = OutputLocation.from_url(str(tmp_path / "out"))
    dlt.create_tables(location, 512)
    with pytest.raises(TableMismatchError, match="holds 512-dim embeddings but model X makes 256-dim ones") as info:
        dlt.create_tables(location, 256, model_id="X")
    assert "use another --output" in str(info.value) and "videos" in str(info.value)
    videos = dlt.open_table(location, "videos")
    assert videos is not None
    with pytest.raises(TableMismatchError, match="'videos' table; expected vitaclip's 'segments'"):
        dlt.check_table(videos, "segments")

    future = OutputLocation.from_url(str(tmp_path / "future"))
    DeltaTable.create(
        future.table_uri("videos"),
        schema=dlt.table_schema("videos", 8),
        configuration={"vitaclip.table": "videos", "vitaclip.schema_version": "4", "vitaclip.embed_dim": "8"},
        raise_if_key_not_exists=False,
    )
    with pytest.raises(TableMismatchError, match="schema version 4; this vitaclip reads versions 2, 3"):
        dlt.create_tables(future, 8)

    foreign = OutputLocation.from_url(str(tmp_path / "foreign"))
    DeltaTable.create(foreign.table_uri("videos"), schema=pa.schema([pa.field("a", pa.int64())]))
    with pytest.raises(TableMismatchError, match="without vitaclip properties; expected vitaclip's 'videos'"):
        dlt.create_tables(foreign, 8)


def test_old_layout_is_detected(tmp_path: Path) -> None:
    location = OutputLocation.from_url(str(tmp_path / "out"))
    assert not dlt.detect_old_layout(location)  # nothing there yet
    (tmp_path / "out" / "_commits").mkdir(parents=True)
    assert not dlt.detect_old_layout(location)
    (tmp_path / "out" / "_commits" / "00000001.json").write_text("{}")
    assert dlt.detect_old_layout(location)
    message = dlt.old_layout_message(location)
    assert "older vitaclip (commit records under _commits/" in message
    assert f"run `vitaclip migrate {location.url}` first" in message
    dlt.create_tables(location, DIM)  # tables next to the records: a migration that did not finish
    assert dlt.detect_old_layout(location)
    (tmp_path / "out" / "_commits" / "00000001.json").unlink()  # the migration deletes the records last
    assert not dlt.detect_old_layout(location)


# ----------------------------------------------------------------------------------------------------- data files


def test_written_and_committed_rows_read_back_equal(local: OutputLocation) -> None:
    rows = video_rows(["a", "b", "c"])
    data_file = dlt.write_data_file(local, "videos", rows, name="part-0001.parquet")
    assert data_file.num_rows == 3 and data_file.table == "videos" and data_file.path == "part-0001.parquet"
    assert data_file.size_bytes == os.path.getsize(os.path.join(local.table_uri("videos"), "part-0001.parquet"))
    assert add_files(local, "videos", [data_file]) == 1

    got = DeltaTable(local.table_uri("videos")).to_pyarrow_table()
    assert got.schema.names == dlt.table_schema("videos", DIM).names
    got_rows = got.sort_by("video_id").to_pylist()
    want_rows = rows.to_pylist()
    for row in want_rows:  # truncated to milliseconds on write
        row["indexed_at"] = row["indexed_at"].replace(microsecond=123_000)
    assert got_rows == pa.Table.from_pylist(want_rows, schema=dlt.table_schema("videos", DIM)).to_pylist()
    assert [len(e) for e in got.column("embedding").to_pylist() if e is not None] == [DIM, DIM]

    segments = dlt.write_data_file(local, "segments", segment_rows("a", 3), name=fresh_name(), embed_dim=DIM)
    add_files(local, "segments", [segments])
    assert DeltaTable(local.table_uri("segments")).to_pyarrow_table().num_rows == 3


@pytest.mark.parametrize("table", ["videos", "segments"])
def test_data_files_dictionary_encode_only_columns_whose_values_repeat(local: OutputLocation, table: str) -> None:
    rows = video_rows([f"v{k}" for k in range(40)]) if table == "videos" else segment_rows("a", 40)
    data_file = dlt.write_data_file(local, table, rows, name=fresh_name(), embed_dim=DIM)
    metadata = pq.read_metadata(os.path.join(local.table_uri(table), data_file.path))
    encodings = {
        metadata.schema.column(i).path: metadata.row_group(0).column(i).encodings for i in range(metadata.num_columns)
    }
    assert set(encodings) == {
        f"{f.name}.list.element" if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type) else f.name
        for f in dlt.table_schema(table, DIM)
    }  # every column named as Parquet names it, so none falls back to the default
    dictionary = {path for path, kinds in encodings.items() if "RLE_DICTIONARY" in kinds}
    plain = {"video_id", "row_id", "uri", "embedding.list.element", "label_scores.list.element", "thumbnail_jpeg"}
    repeated = {"labels.list.element", "model_id", "run_id", "indexed_at"}
    if table == "videos":
        plain |= {"etag", "size_bytes", "duration_seconds"}
        repeated |= {"status", "codec", "width", "height", "fps"}
    else:
        plain |= {"start_seconds", "end_seconds"}
        plain -= {"video_id", "uri"}  # one video's segments: these repeat
        repeated |= {"video_id", "uri", "segment_index"}
    assert not plain & dictionary and repeated <= dictionary and plain | repeated <= set(encodings)
    assert DeltaTable(local.table_uri(table)).version() == 0  # written, not committed
    assert pq.read_table(os.path.join(local.table_uri(table), data_file.path)).num_rows == 40


class _FramingHandler(CountingHandler):
    """A local store that keeps an upload with a chunk header in front (as a server keeps an unsigned
    ``aws-chunked`` upload): what it holds is not what was sent."""

    def open_output_stream(self, path: str, metadata: Any = None) -> Any:
        stream = self.inner.open_output_stream(path)
        stream.write(b"78AC\r\n")
        sent = [0]

        class Framed:
            closed = False

            def write(self, data: Any) -> int:
                sent[0] += len(data)
                return int(stream.write(data))

            def tell(self) -> int:
                return sent[0]

            def flush(self) -> None:
                stream.flush()

            def close(self) -> None:
                self.closed = True
                stream.close()

        return pa.PythonFile(Framed(), mode="w")

    def delete_file(self, path: str) -> None:
        self.inner.delete_file(path)


def test_a_data_file_the_store_did_not_keep_as_written_is_refused(
    local: OutputLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OutputLocation, "filesystem", lambda self: (pafs.PyFileSystem(_FramingHandler()), self.url))
    with pytest.raises(OSError, match=r"holds (\d+) bytes where (?!\1)\d+ were written: the store did not keep it"):
        dlt.write_data_file(local, "videos", video_rows(["a", "b"]), name="part-framed.parquet", embed_dim=DIM)
    assert not os.path.exists(os.path.join(local.table_uri("videos"), "part-framed.parquet"))  # removed again


def test_write_data_file_refuses_bad_data_and_names(local: OutputLocation) -> None:
    with pytest.raises(ValueError, match=r"embeddings have \[3\] values; the table holds 4-dim"):
        dlt.write_data_file(local, "videos", video_rows(["a", "b"], dim=3), name=fresh_name())
    with pytest.raises(ValueError, match="must not be null"):
        rows = video_rows(["a", "b"])
        rows = rows.set_column(rows.schema.get_field_index("status"), "status", pa.array([None, "ok"], pa.string()))
        dlt.write_data_file(local, "videos", rows, name=fresh_name())
    with pytest.raises(ValueError, match=r"missing \['segment_index'"):
        dlt.write_data_file(local, "segments", segment_rows("a", 1).drop_columns(["segment_index"]), name=fresh_name())
    for name in ("../x.parquet", "sub/x.parquet", "x..parquet", "_x.parquet", "x.json", ""):
        with pytest.raises(ValueError, match="data file name"):
            dlt.write_data_file(local, "videos", video_rows(["a"]), name=name)
    dlt.write_data_file(local, "videos", video_rows(["a"]), name="part-same.parquet")
    with pytest.raises(FileExistsError):
        dlt.write_data_file(local, "videos", video_rows(["a"]), name="part-same.parquet")
    assert sorted(os.listdir(local.table_uri("videos"))) == ["_delta_log", "part-same.parquet"]  # no temp files left


_FULL_DISK_SCRIPT = """
import resource, signal, sys, os
from index import delta_tables as dlt
from index.delta_tables import OutputLocation
import test_delta_tables as t
location = OutputLocation.from_url(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # as a full disk or a quota: no file grows past 4 KiB
try:
    dlt.write_data_file(location, "videos", t.video_rows([f"v{i}" for i in range(400)]), name="part-big.parquet")
except OSError as exc:
    print(type(exc).__name__, exc)
"""


def test_a_data_file_that_cannot_be_written_whole_leaves_no_temporary_file(local: OutputLocation) -> None:
    """A write that fails part way (a full disk, a quota; here the kernel's file size limit) raises, and its hidden
    temporary file goes with it: Ray retries a failed write task, and each attempt left one behind."""
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}"}
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, local.url], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("OSError") and "File too large" in done.stdout, done.stdout
    assert sorted(os.listdir(local.table_uri("videos"))) == ["_delta_log"]


def test_file_stats_are_exact(local: OutputLocation) -> None:
    rows = video_rows(["b", "a", "c"], model_id="m-7")
    long_uri = "s3://in/" + "x" * 300
    rows = rows.set_column(rows.schema.get_field_index("uri"), "uri", pa.array(["s3://in/a", long_uri, "s3://in/c"]))
    data_file = dlt.write_data_file(local, "videos", rows, name=fresh_name())
    stats = json.loads(data_file.stats)
    assert stats["numRecords"] == 3
    assert stats["minValues"]["video_id"] == "a" and stats["maxValues"]["video_id"] == "c"
    assert stats["minValues"]["model_id"] == stats["maxValues"]["model_id"] == "m-7"
    assert stats["minValues"]["indexed_at"] == "2025-03-01T12:00:00.123Z"
    assert stats["maxValues"]["indexed_at"] == "2025-03-01T12:00:02.123Z"  # the values were truncated: exact
    assert stats["minValues"]["width"] == 640 and stats["maxValues"]["size_bytes"] == 1002
    assert stats["minValues"]["uri"] == "s3://in/a" and "uri" not in stats["maxValues"]  # 308 chars: left out
    assert stats["nullCount"]["error_message"] == 2 and stats["nullCount"]["etag"] == 0
    assert stats["nullCount"]["thumbnail_jpeg"] == 0
    assert not {"embedding", "labels", "label_scores"} & set(stats["nullCount"])  # nested: no stats
    assert not {"embedding", "thumbnail_jpeg"} & set(stats["minValues"])
    add_files(local, "videos", [data_file])
    # delta-rs skips files with these stats: the exact maximum keeps the file, another model's id drops it
    dt = DeltaTable(local.table_uri("videos"))
    assert len(dt.file_uris(file_pruning_predicate=[("model_id", "=", "m-7")])) == 1
    assert dt.file_uris(file_pruning_predicate=[("model_id", "=", "m-8")]) == []
    assert len(dt.file_uris(file_pruning_predicate="indexed_at >= '2025-03-01T12:00:02.123Z'")) == 1
    assert dt.file_uris(file_pruning_predicate="indexed_at > '2025-03-01T12:00:02.124Z'") == []


def test_other_readers_read_the_tables(local: OutputLocation) -> None:
    polars = pytest.importorskip("polars")
    add_files(local, "videos", [dlt.write_data_file(local, "videos", video_rows(["a", "b"]), name=fresh_name())])
    add_files(local, "videos", [dlt.write_data_file(local, "videos", video_rows(["c"]), name=fresh_name())])
    frame = polars.read_delta(local.table_uri("videos"))
    assert sorted(frame["video_id"].to_list()) == ["a", "b", "c"] and frame.columns[-1] == "attempts"
    pandas_frame = DeltaTable(local.table_uri("videos")).to_pandas()
    assert sorted(pandas_frame["video_id"]) == ["a", "b", "c"]
    assert str(pandas_frame["indexed_at"].dt.tz) == "UTC"


# ----------------------------------------------------------------------------------------------------- commits


def test_commit_is_conditional_and_records_the_app_transaction(local: OutputLocation) -> None:
    first = dlt.write_data_file(local, "videos", video_rows(["a"]), name=fresh_name())
    assert dlt.committed_app_version(local, "videos", "job") is None
    version = dlt.commit(
        local, "videos", adds=[first], removes=[], read_version=0, app_id="job", app_version=7, metadata={"run": "r1"}
    )
    assert version == 1 and dlt.committed_app_version(local, "videos", "job") == 7
    second = dlt.write_data_file(local, "videos", video_rows(["b"]), name=fresh_name())
    with pytest.raises(CommitConflict, match="version 1, the commit was planned at 0"):  # a stale plan
        dlt.commit(local, "videos", adds=[second], removes=[], read_version=0, app_id="job", app_version=8, metadata={})
    with pytest.raises(ValueError, match="does not hold"):
        dlt.commit(
            local,
            "videos",
            adds=[],
            removes=[RemovedFile("part-nope.parquet", 1)],
            read_version=1,
            app_id="job",
            app_version=8,
            metadata={},
        )
    with pytest.raises(ValueError, match="cannot add videos file"):
        dlt.commit(local, "segments", adds=[second], removes=[], read_version=0, app_id="j", app_version=1, metadata={})
    assert DeltaTable(local.table_uri("videos")).version() == 1


def _race(location: OutputLocation, commits: list[dict[str, Any]]) -> list[int | CommitConflict]:
    """Runs `dlt.commit` calls in threads released at once; returns each one's version or CommitConflict."""
    barrier = threading.Barrier(len(commits))
    results: list[int | CommitConflict] = [CommitConflict("not run")] * len(commits)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = dlt.commit(location, "videos", **commits[index])
        except CommitConflict as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(commits))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_the_readme_readers_read_an_output_on_s3(s3_server: str, s3_location: OutputLocation) -> None:
    import polars as pl

    from index.stores import open_store
    from index.tables import read_table

    dlt.create_tables(s3_location, DIM)
    add_files(
        s3_location, "videos", [dlt.write_data_file(s3_location, "videos", video_rows(["a", "b"]), name=fresh_name())]
    )
    want = {"s3://in/a.mp4": "ok", "s3://in/b.mp4": "decode_error"}
    options = {"AWS_ENDPOINT_URL": s3_server, "AWS_ALLOW_HTTP": "true"}  # as the README shows them
    url = s3_location.table_uri("videos")
    frame = DeltaTable(url, storage_options=options).to_pandas(columns=["uri", "status"])
    assert dict(zip(frame["uri"], frame["status"], strict=True)) == want
    assert dict(pl.read_delta(url, storage_options=options).select("uri", "status").iter_rows()) == want
    rows = read_table(open_store(s3_location.url, endpoint_url=s3_server), "videos", ["uri", "status"])
    assert rows is not None and dict(zip(*rows.to_pydict().values(), strict=True)) == want


def test_concurrent_commits_on_s3_exactly_one_wins(s3_location: OutputLocation) -> None:
    assert dlt.create_tables(s3_location, DIM) == {"videos": 0, "segments": 0}
    writers = 4
    files = [
        dlt.write_data_file(s3_location, "videos", video_rows([f"w{k}-a", f"w{k}-b"]), name=fresh_name())
        for k in range(writers)
    ]
    results = _race(
        s3_location,
        [
            {"adds": [f], "removes": [], "read_version": 0, "app_id": f"w{k}", "app_version": 1, "metadata": {}}
            for k, f in enumerate(files)
        ],
    )
    winners = [k for k, result in enumerate(results) if result == 1]
    assert len(winners) == 1, results
    assert all(isinstance(result, CommitConflict) for k, result in enumerate(results) if k not in winners)
    dt = DeltaTable(s3_location.table_uri("videos"), storage_options=s3_location.storage_options())
    assert dt.version() == 1
    assert sorted(dt.to_pyarrow_table().column("video_id").to_pylist()) == [f"w{winners[0]}-a", f"w{winners[0]}-b"]
    # reading back through pyarrow's S3 filesystem: the log and the planning keys
    (logged,) = dlt.log_changes(s3_location, "videos", after_version=0, upto_version=1)
    assert [a.path for a in logged.adds] == [files[winners[0]].path]
    assert logged.app_transactions == {f"w{winners[0]}": 1}
    keys = dlt.read_keys(s3_location, version=1, model_id="m1")
    assert sorted(keys.column("video_id").to_pylist()) == [f"w{winners[0]}-a", f"w{winners[0]}-b"]
    assert set(keys.column("file").to_pylist()) == {files[winners[0]].path}


def test_concurrent_removals_of_one_file_on_s3_conflict(s3_location: OutputLocation) -> None:
    dlt.create_tables(s3_location, DIM)
    old = dlt.write_data_file(s3_location, "videos", video_rows(["a", "b"]), name=fresh_name())
    add_files(s3_location, "videos", [old])
    removed = RemovedFile(old.path, old.size_bytes)
    rewrites = [
        dlt.rewrite_without(s3_location, "videos", old.path, [drop], model_id="m1", name=fresh_name(), embed_dim=DIM)
        for drop in ("a", "b")
    ]
    results = _race(
        s3_location,
        [
            {"adds": [f], "removes": [removed], "read_version": 1, "app_id": "w", "app_version": 2, "metadata": {}}
            for f in rewrites
            if f is not None
        ],
    )
    assert sorted(map(type, results), key=str) == sorted([int, CommitConflict], key=str), results
    # and the same removal committed after the other one landed: refused too
    loser = rewrites[[isinstance(r, CommitConflict) for r in results].index(True)]
    assert loser is not None
    with pytest.raises(CommitConflict):
        dlt.commit(
            s3_location,
            "videos",
            adds=[loser],
            removes=[removed],
            read_version=1,
            app_id="w",
            app_version=3,
            metadata={},
        )
    dt = DeltaTable(s3_location.table_uri("videos"), storage_options=s3_location.storage_options())
    assert dt.version() == 2 and dt.to_pyarrow_table().num_rows == 1


def test_concurrent_create_tables_on_s3(s3_location: OutputLocation) -> None:
    barrier = threading.Barrier(3)
    results: list[Any] = [None] * 3

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = dlt.create_tables(s3_location, DIM)
        except Exception as exc:  # reported below
            results[index] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [{"videos": 0, "segments": 0}] * 3
    assert not dlt.detect_old_layout(s3_location)


# ----------------------------------------------------------------------------------------------------- the log


def test_log_changes_lists_exactly_what_was_committed(local: OutputLocation) -> None:
    first = dlt.write_data_file(local, "videos", video_rows(["a", "b"]), name=fresh_name())
    dlt.commit(local, "videos", adds=[first], removes=[], read_version=0, app_id="job", app_version=1, metadata={})
    rewrite = dlt.rewrite_without(local, "videos", first.path, ["a"], model_id="m1", name=fresh_name(), embed_dim=DIM)
    newer = dlt.write_data_file(local, "videos", video_rows(["a"], run_id="r2"), name=fresh_name())
    assert rewrite is not None
    dlt.commit(
        local,
        "videos",
        adds=[rewrite, newer],
        removes=[RemovedFile(first.path, first.size_bytes)],
        read_version=1,
        app_id="job",
        app_version=2,
        metadata={"vitaclip.run_id": "r2", "vitaclip.videos": "1"},
    )
    commits = dlt.log_changes(local, "videos", after_version=0, upto_version=2)
    assert [c.version for c in commits] == [1, 2]
    assert [(a.path, a.size_bytes) for a in commits[0].adds] == [(first.path, first.size_bytes)]
    assert commits[0].adds[0].stats == json.loads(first.stats) and commits[0].removes == ()
    assert commits[0].app_transactions == {"job": 1}
    assert {a.path for a in commits[1].adds} == {rewrite.path, newer.path}
    assert commits[1].removes == (first.path,)
    assert commits[1].commit_info["vitaclip.run_id"] == "r2" and commits[1].commit_info["vitaclip.videos"] == "1"
    assert commits[1].app_transactions == {"job": 2} and not commits[1].changes_metadata
    assert dlt.log_changes(local, "videos", after_version=2, upto_version=2) == []
    creation = dlt.log_changes(local, "videos", after_version=-1, upto_version=0)[0]
    assert creation.changes_metadata and creation.adds == ()

    os.remove(os.path.join(local.table_uri("videos"), "_delta_log", f"{1:020d}.json"))
    with pytest.raises(LogUnavailableError, match="commit 1 of"):
        dlt.log_changes(local, "videos", after_version=0, upto_version=2)
    with pytest.raises(LogUnavailableError, match="commit 3 of"):
        dlt.log_changes(local, "videos", after_version=2, upto_version=3)


# ----------------------------------------------------------------------------------------------------- reading


def test_read_keys_reads_only_key_columns_of_the_model(local: OutputLocation, monkeypatch: pytest.MonkeyPatch) -> None:
    thumbs = 256 * 1024  # big thumbnails: reading them would show in the byte count
    m1_a = dlt.write_data_file(local, "videos", video_rows(["a", "b"], thumb_bytes=thumbs), name=fresh_name())
    m1_b = dlt.write_data_file(local, "videos", video_rows(["c"] * 6, thumb_bytes=thumbs), name=fresh_name())
    m2 = dlt.write_data_file(
        local, "videos", video_rows(["a", "z"], model_id="m2", thumb_bytes=thumbs), name=fresh_name()
    )
    add_files(local, "videos", [m1_a, m1_b])
    version = add_files(local, "videos", [m2])

    counting = CountingHandler()
    monkeypatch.setattr(OutputLocation, "filesystem", lambda self: (pafs.PyFileSystem(counting), self.url))
    keys = dlt.read_keys(local, version=version, model_id="m1")
    assert keys.schema.names == ["video_id", "etag", "status", "attempts", "file"]
    assert keys.schema.field("file").type == pa.dictionary(pa.int32(), pa.string())  # 4 bytes a row, not a path
    got = sorted(zip(*(keys.column(n).to_pylist() for n in keys.schema.names), strict=True))
    want = [("a", "etag-a", "ok", None, m1_a.path), ("b", "etag-b", "decode_error", None, m1_a.path)]
    want += [("c", "etag-c", "ok", None, m1_b.path)] * 5 + [("c", "etag-c", "decode_error", None, m1_b.path)]
    assert got == sorted(want)
    root = local.table_uri("videos")
    assert set(counting.bytes_read) == {f"{root}/{m1_a.path}", f"{root}/{m1_b.path}"}  # m2's file: skipped by stats
    for data_file in (m1_a, m1_b):  # pyarrow's 64 KiB footer read and the key and model_id columns; no thumbnails
        assert counting.bytes_read[f"{root}/{data_file.path}"] < 80 * 1024 < data_file.size_bytes / 6

    m2_keys = dlt.read_keys(local, version=version, model_id="m2")
    assert sorted(m2_keys.column("video_id").to_pylist()) == ["a", "z"]
    assert set(m2_keys.column("file").to_pylist()) == {m2.path}
    assert dlt.read_keys(local, version=version - 1, model_id="m2").num_rows == 0  # time travel
    assert dlt.read_keys(local, version=version, model_id="m3").num_rows == 0


@pytest.mark.parametrize("name", ["my out", "out#1", "outü", "a+b;c"])
def test_read_keys_under_a_root_whose_characters_delta_rs_encodes(tmp_path: Path, name: str) -> None:
    location = OutputLocation.from_url(str(tmp_path / name / "out"))
    dlt.create_tables(location, DIM)
    data_file = dlt.write_data_file(location, "videos", video_rows(["a", "b"]), name=fresh_name())
    version = add_files(location, "videos", [data_file])
    keys = dlt.read_keys(location, version=version, model_id="m1")
    assert sorted(keys.column("video_id").to_pylist()) == ["a", "b"]
    assert set(keys.column("file").to_pylist()) == {data_file.path}


def test_files_other_writers_make_with_view_types_are_read(local: OutputLocation) -> None:
    """delta-rs's delete, update and merge (also polars) rewrite data files with string_view and binary_view
    columns. Arrow pushed the readers' model_id filter into them and failed ("no kernel matching (string,
    string_view)"): the job's planning, search and index updates all crashed. They read them as the plain types."""
    from index.build import _ok_rows, _removed_rows
    from index.catalog import RowCatalog
    from index.tables import read_table

    first = dlt.write_data_file(local, "videos", video_rows(["a", "b", "c", "d"]), name=fresh_name())
    add_files(local, "videos", [first])
    table = DeltaTable(local.table_uri("videos"))
    table.delete("video_id = 'b'")  # an analyst's delete: the file is rewritten without b
    version = table.version()
    (rewritten,) = dlt.data_file_paths(DeltaTable(local.table_uri("videos")))
    kinds = pq.read_schema(f"{local.table_uri('videos')}/{rewritten}")
    assert kinds.field("model_id").type == pa.string_view() and kinds.field("thumbnail_jpeg").type == pa.binary_view()

    keys = dlt.read_keys(local, version=version, model_id="m1")
    assert sorted(keys.column("video_id").to_pylist()) == ["a", "c", "d"]
    assert keys.schema.field("video_id").type == pa.string()
    assert set(keys.column("file").to_pylist()) == {rewritten}
    rows = read_table(local, "videos", ["video_id", "thumbnail_jpeg"], model_id="m1")
    assert rows is not None and sorted(rows.column("video_id").to_pylist()) == ["a", "c", "d"]
    assert rows.schema.field("thumbnail_jpeg").type == pa.binary()
    assert read_table(local, "videos", ["video_id"], model_id="m1", where=pc.field("status") == "ok").num_rows == 2
    vectors, ids, _ = _ok_rows(local, "videos", "m1", version=version, files=[rewritten])
    assert sorted(ids.tolist()) == [0, 2] and vectors.shape == (2, DIM)  # d failed: no embedding
    removed, _ = _removed_rows(local, "videos", "m1", [first.path])
    assert sorted(removed.tolist()) == [0, 1, 2]  # the ok rows of the file the delete removed
    catalog = RowCatalog(local, "videos", "m1", ["row_id", "video_id", "status"], version=version)
    assert sorted(catalog.rows.column("video_id").to_pylist()) == ["a", "c", "d"]
    later = dlt.write_data_file(local, "videos", video_rows(["e"]), name=fresh_name())
    both = dict(
        zip(
            *(
                dlt.read_keys(local, version=add_files(local, "videos", [later]), model_id="m1").column(n).to_pylist()
                for n in ("video_id", "file")
            ),
            strict=True,
        )
    )
    assert both == {"a": rewritten, "c": rewritten, "d": rewritten, "e": later.path}  # each row's own file


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.alter.set_table_properties({"delta.appendOnly": "true"}), "is append-only"),
        (lambda t: t.alter.add_constraint({"no_deleted": "status <> 'deleted'"}), r"CHECK constraints \(no_deleted\)"),
        (lambda t: t.alter.set_table_properties({"delta.enableChangeDataFeed": "true"}), "the change data feed on"),
        (
            lambda t: t.alter.set_table_properties({"delta.setTransactionRetentionDuration": "interval 1 days"}),
            "expires app transactions",
        ),
    ],
)
def test_tables_set_up_so_that_a_run_would_break_them_are_refused_before_writing(
    local: OutputLocation, change: Any, message: str
) -> None:
    """Writer settings an analyst's tool puts on a table: refused when a run starts (`create_tables`) and at a
    commit planned before they appeared, as a `TableMismatchError` (one line, no retries), committing nothing. An
    append-only table made every commit fail as a lost race, retried for half a minute, after the other table had
    committed; rows breaking a CHECK constraint were committed."""
    versions = dlt.create_tables(local, DIM)
    data_file = dlt.write_data_file(local, "videos", video_rows(["a", "b"]), name=fresh_name())
    change(DeltaTable(local.table_uri("videos")))
    changed = DeltaTable(local.table_uri("videos")).version()
    with pytest.raises(TableMismatchError, match=message):
        dlt.create_tables(local, DIM)
    with pytest.raises(TableMismatchError, match=message):
        dlt.commit(
            local, "videos", adds=[data_file], removes=[], read_version=changed, app_id="t", app_version=1, metadata={}
        )
    assert DeltaTable(local.table_uri("videos")).version() == changed > versions["videos"]


def test_rewrite_without_drops_exactly_the_given_ids(local: OutputLocation) -> None:
    original = dlt.write_data_file(local, "videos", video_rows(["a", "b", "c", "d"]), name=fresh_name())
    rewrite = dlt.rewrite_without(
        local, "videos", original.path, {"b", "d", "not-there"}, model_id="m1", name=fresh_name()
    )
    assert rewrite is not None and rewrite.num_rows == 2 and rewrite.path != original.path
    data = pq.read_table(os.path.join(local.table_uri("videos"), rewrite.path))
    kept = pq.read_table(os.path.join(local.table_uri("videos"), original.path)).filter(
        pc.is_in(pc.field("video_id"), pa.array(["a", "c"]))
    )
    assert data.equals(kept)
    assert json.loads(rewrite.stats)["maxValues"]["video_id"] == "c"
    assert (
        dlt.rewrite_without(local, "videos", original.path, ["a", "b", "c", "d"], model_id="m1", name=fresh_name())
        is None
    )


def test_rewrite_without_keeps_the_rows_of_other_models(local: OutputLocation) -> None:
    """A file holding rows of two models (a compaction merged them): only the given model's rows of the videos go."""
    mixed = pa.concat_tables([video_rows(["a", "b"]), video_rows(["a", "b"], model_id="m2")])
    original = dlt.write_data_file(local, "videos", mixed, name=fresh_name())
    rewrite = dlt.rewrite_without(local, "videos", original.path, {"a"}, model_id="m1", name=fresh_name())
    assert rewrite is not None
    data = pq.read_table(os.path.join(local.table_uri("videos"), rewrite.path))
    kept = sorted(zip(data.column("video_id").to_pylist(), data.column("model_id").to_pylist(), strict=True))
    assert kept == [("a", "m2"), ("b", "m1"), ("b", "m2")]


def test_vacuum_deletes_removed_and_orphaned_files(local: OutputLocation) -> None:
    old = dlt.write_data_file(local, "videos", video_rows(["a", "b"]), name=fresh_name())
    add_files(local, "videos", [old])
    new = dlt.rewrite_without(local, "videos", old.path, ["a"], model_id="m1", name=fresh_name(), embed_dim=DIM)
    assert new is not None
    dlt.commit(
        local,
        "videos",
        adds=[new],
        removes=[RemovedFile(old.path, old.size_bytes)],
        read_version=1,
        app_id="t",
        app_version=2,
        metadata={},
    )
    orphan = dlt.write_data_file(local, "videos", video_rows(["x"]), name=fresh_name())  # a killed run's file
    assert dlt.vacuum(local, retention_hours=24 * 30) == {"videos": 0, "segments": 0}  # all too young
    assert dlt.vacuum(local, retention_hours=0) == {"videos": 2, "segments": 0}
    root = local.table_uri("videos")
    assert sorted(p for p in os.listdir(root) if p.endswith(".parquet")) == [new.path]
    assert not os.path.exists(os.path.join(root, orphan.path))
    assert DeltaTable(root).to_pyarrow_table().column("video_id").to_pylist() == ["b"]


def test_a_commit_never_names_a_file_that_is_gone(local: OutputLocation) -> None:
    """A vacuum with a retention shorter than a writer's commit interval deletes files written but not committed
    yet: the commit that would add them fails before writing anything, and the table stays readable."""
    kept = dlt.write_data_file(local, "videos", video_rows(["a"]), name=fresh_name())
    add_files(local, "videos", [kept])
    pending = dlt.write_data_file(local, "videos", video_rows(["b"]), name=fresh_name())
    two_hours_ago = time.time() - 7200
    os.utime(os.path.join(local.table_uri("videos"), pending.path), (two_hours_ago, two_hours_ago))
    pending = dataclasses.replace(pending, modification_time_ms=int(two_hours_ago * 1000))  # as if written then
    assert dlt.vacuum(local, retention_hours=1) == {"videos": 1, "segments": 0}
    version = DeltaTable(local.table_uri("videos")).version()  # vacuum records its own commits
    with pytest.raises(FileNotFoundError, match="gone before their commit"):
        add_files(local, "videos", [pending])
    assert DeltaTable(local.table_uri("videos")).version() == version
    young = dlt.write_data_file(local, "videos", video_rows(["c"]), name=fresh_name())
    looked_up: list[str] = []
    real_path = OutputLocation.table_path
    with pytest.MonkeyPatch.context() as patch:  # files younger than any retention are not looked up
        patch.setattr(OutputLocation, "table_path", lambda loc, t: looked_up.append(t) or real_path(loc, t))
        dlt._check_added_files_exist(local, "videos", [young])
        assert not looked_up
        # Written 40 minutes ago by this clock: a storage clock 20 minutes ahead makes it an hour old to a vacuum.
        older = dataclasses.replace(young, modification_time_ms=int((time.time() - 2400) * 1000))
        dlt._check_added_files_exist(local, "videos", [older])
        assert looked_up == ["videos"]
        with pytest.raises(FileNotFoundError):
            dlt._check_added_files_exist(local, "videos", [pending])  # an old one is
    assert looked_up == ["videos", "videos"]
    assert DeltaTable(local.table_uri("videos")).to_pyarrow_table().column("video_id").to_pylist() == ["a"]


def test_vacuum_deletes_only_data_files(local: OutputLocation, caplog: pytest.LogCaptureFixture) -> None:
    """delta-rs's full vacuum deletes every file of the table folder that no commit names: videos kept in the
    folder given as the output's ``videos`` (``index media/videos --output media``) went with the first run."""
    root = Path(local.table_uri("videos"))
    others = [root / "holiday.mp4", root / "2025" / "wedding.mp4", root / "notes.txt", root / "part-1.mp4"]
    orphan = root / dlt.write_data_file(local, "videos", video_rows(["x"]), name=fresh_name()).path
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a user's file")
    for path in [*others, orphan]:
        os.utime(path, (time.time() - 30 * 86400, time.time() - 30 * 86400))
    assert dlt.vacuum(local, retention_hours=24) == {"videos": 1, "segments": 0}
    assert not orphan.exists() and all(path.read_bytes() == b"a user's file" for path in others)
    assert any("4 files that are not data files" in r.getMessage() and "holiday.mp4" in r.getMessage()
               for r in caplog.records)  # fmt: skip


@pytest.mark.parametrize("where", ["local", "s3"])
def test_tables_are_not_made_in_a_folder_holding_other_files(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    if where == "s3":
        location: OutputLocation = request.getfixturevalue("s3_location")
    else:
        location = OutputLocation.from_url(str(tmp_path / "media"))
    filesystem, root = location.table_path("videos")
    filesystem.create_dir(root)
    with filesystem.open_output_stream(f"{root}/clip.mp4") as f:
        f.write(b"a video")
    with pytest.raises(dlt.TableMismatchError, match=r"holds files and no Delta table \('clip.mp4'\)"):
        dlt.create_tables(location, DIM)
    assert dlt.open_table(location, "videos") is None
    assert filesystem.get_file_info(f"{root}/_delta_log").type == pafs.FileType.NotFound
    assert dlt.create_tables(OutputLocation.from_url(str(tmp_path / "empty")), DIM) == {"videos": 0, "segments": 0}
    (tmp_path / "finder" / "videos").mkdir(parents=True)
    (tmp_path / "finder" / "videos" / ".DS_Store").write_bytes(b"\0")  # hidden: never deleted, not refused
    assert dlt.create_tables(OutputLocation.from_url(str(tmp_path / "finder")), DIM) == {"videos": 0, "segments": 0}


def test_vacuum_sweeps_temporaries_of_killed_local_writes(local: OutputLocation) -> None:
    root = local.table_uri("videos")
    old, young = (os.path.join(root, f".{fresh_name()}.{uuid.uuid4().hex}.tmp") for _ in range(2))
    for path in (old, young):
        with open(path, "wb") as f:
            f.write(b"PAR1 half written")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    other = os.path.join(root, ".keep-me.tmp")  # not a name write_data_file makes
    open(other, "wb").close()
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    assert dlt.vacuum(local, retention_hours=1) == {"videos": 1, "segments": 0}
    assert not os.path.exists(old) and os.path.exists(young) and os.path.exists(other)


# ----------------------------------------------------------------------------------------------------- DuckDB


@pytest.fixture
def duckdb_delta() -> Iterator[Any]:
    """A DuckDB connection with the delta extension loaded from the wheel, never downloaded."""
    connection = duckdb_connection()
    yield connection
    connection.close()


def test_duckdb_delta_scan_reads_both_tables(local: OutputLocation, duckdb_delta: Any) -> None:
    add_files(local, "videos", [dlt.write_data_file(local, "videos", video_rows(["a", "b"]), name=fresh_name())])
    add_files(local, "videos", [dlt.write_data_file(local, "videos", video_rows(["c"]), name=fresh_name())])
    add_files(local, "segments", [dlt.write_data_file(local, "segments", segment_rows("a", 3), name=fresh_name())])
    videos = duckdb_delta.execute(
        "SELECT video_id, count(*), max(len(embedding)), strftime(max(indexed_at), '%Y-%m-%d %H:%M:%S.%g') "
        "FROM delta_scan(?) GROUP BY video_id ORDER BY video_id",
        [local.table_uri("videos")],
    ).fetchall()
    assert videos == [
        ("a", 1, DIM, "2025-03-01 12:00:00.123"),
        ("b", 1, None, "2025-03-01 12:00:01.123"),
        ("c", 1, None, "2025-03-01 12:00:00.123"),
    ]
    segments = duckdb_delta.execute(
        "SELECT video_id, count(*), count(DISTINCT segment_index) FROM delta_scan(?) GROUP BY video_id",
        [local.table_uri("segments")],
    ).fetchall()
    assert segments == [("a", 3, 3)]
    skipped = duckdb_delta.execute(
        "SELECT count(*) FROM delta_scan(?) WHERE model_id = 'm2'", [local.table_uri("videos")]
    ).fetchone()
    assert skipped == (0,)


def test_a_script_that_reads_a_table_exits_cleanly(local: OutputLocation) -> None:
    """Read through deltalake's own filesystem handler, about half of such scripts died at exit with "terminate
    called without an active exception" (status 134), whatever they had done."""
    import subprocess
    import sys

    add_files(local, "videos", [dlt.write_data_file(local, "videos", video_rows(["a", "b", "c"]), name=fresh_name())])
    script = f"from index import tables; print(tables.read_table({local.url!r}, 'videos', ['uri']).num_rows)"
    for _ in range(12):  # it came at random, in one run of five to one of two
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stdout.strip()) == (0, "3"), done.stderr[-2000:]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_latest_version_lists_the_log_and_reads_no_entry(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    location = (
        OutputLocation.from_url(str(tmp_path / "out")) if where == "local" else request.getfixturevalue("s3_location")
    )
    assert dlt.latest_version(location, "videos") is None  # no table yet
    dlt.create_tables(location, DIM)
    for k in range(3):
        add_files(
            location,
            "videos",
            [dlt.write_data_file(location, "videos", video_rows([f"v{k}", f"w{k}"]), name=fresh_name())],
        )
    table = DeltaTable(location.table_uri("videos"), storage_options=location.storage_options())
    table.create_checkpoint()  # a checkpoint (and its _last_checkpoint) beside the entries is no version
    add_files(location, "videos", [dlt.write_data_file(location, "videos", video_rows(["x", "y"]), name=fresh_name())])
    table.update_incremental()
    assert dlt.latest_version(location, "videos") == table.version() == 4
    assert dlt.latest_version(location, "segments") == 0
    filesystem, root = location.table_path("videos")
    for info in filesystem.get_file_info(pafs.FileSelector(f"{root}/_delta_log")):
        if info.base_name.endswith(".json"):  # the listing decides: an entry's content is never read
            with filesystem.open_output_stream(info.path) as f:
                f.write(b"not json")
    assert dlt.latest_version(location, "videos") == 4

"""Manifests as listing inputs: .txt lines taken verbatim, CSV cells as written, comments, file:// URIs and other
schemes, normalised local paths, text encodings, and S3 Inventory reports (manifest.json with CSV or Parquet data
files, a lone inventory Parquet file, gzipped CSV), local and on a (moto) S3 server."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.storage import UNKNOWN_SIZE, StorageError, VideoObject, list_videos
from jobs.storage.listing import manifests_made_at

Bucket = tuple[Any, str]


class NoS3:
    """An S3 client that fails the test when the listing sends it anything (no lookups expected)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected S3 call: {name}")


def videos(tmp_path: Path, *names: str) -> dict[str, VideoObject]:
    """Creates each file (its content: its name) and returns what a folder listing gives for it, by name."""
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    listed = list_videos([str(tmp_path)], extensions=None)
    return {os.path.relpath(v.uri, tmp_path): v for v in listed}


def listed(manifest: Path | str, **options: Any) -> list[VideoObject]:
    options.setdefault("s3_client", NoS3())
    return list(list_videos([str(manifest)], **options))


# ----------------------------------------------------------------------------------------------- .txt and CSV


def test_txt_lines_are_taken_verbatim(tmp_path: Path) -> None:
    names = ["a,b.mp4", 'say "hi".mp4', " lead.mp4", "trail.mp4 ", "#1.mp4", "#tag,x.mp4", "q'uote.mp4"]
    found = videos(tmp_path / "in", *names, "# spaced.mp4")
    manifest = tmp_path / "in" / "list.txt"
    manifest.write_text(
        "# a comment, as is a lone hash:\n#\n\n   \n"
        + "\n".join(names)
        + "\r\n./# spaced.mp4\r\n"  # a name that starts with "# " is written with ./ in front
        + "\t# an indented hash is a name, not a comment\n"
    )
    # extensions=None: "trail.mp4 " has the extension "mp4 ", which a folder listing would leave out too
    indented = VideoObject(str(tmp_path / "in" / "\t# an indented hash is a name, not a comment"), "", UNKNOWN_SIZE)
    assert listed(manifest, extensions=None) == [*(found[name] for name in [*names, "# spaced.mp4"]), indented]


def test_entries_left_out_by_the_extension_filter_are_reported(tmp_path: Path, caplog) -> None:
    found = videos(tmp_path / "in", "a.mp4", "trail.mp4 ", "notes.txt")
    manifest = tmp_path / "in" / "list.txt"
    manifest.write_text("a.mp4\ntrail.mp4 \nnotes.txt\n")
    with caplog.at_level(logging.INFO, logger="jobs.storage.listing"):
        assert listed(manifest) == [found["a.mp4"]]
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"{manifest}: 2 entries left out: not named with a video extension (--extensions), such as "
        "'trail.mp4 ' (line 2)"  # as written there
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jobs.storage.listing"):
        assert len(listed(manifest, extensions=None)) == 3
    assert not caplog.records
    # A folder's files left out are said once too, as an info line (a folder holds other files as a rule): they
    # went without a trace (found by review).
    with caplog.at_level(logging.INFO, logger="jobs.storage.listing"):
        assert listed(tmp_path / "in") == [found["a.mp4"]]
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        f"{tmp_path / 'in'}: 3 files left out: not named with a video extension (--extensions), such as "
        f"{tmp_path / 'in' / 'list.txt'}"
    )


def test_csv_cells_are_names_as_written(tmp_path: Path) -> None:
    """Cells are not stripped (header names are), "#" starts a comment only unquoted and before a space, tab,
    comma or the line's end, and a quoted cell may hold commas, quotes and line breaks."""
    names = [" sp.mp4", "tab.mp4 ", "#1.mp4", "#quoted.mp4", "# quoted too.mp4", "a,b.mp4", 'q"q.mp4', "two\nlines.mp4"]
    found = videos(tmp_path / "in", *names)
    manifest = tmp_path / "in" / "list.csv"
    manifest.write_text(
        " URI ,  Size_Bytes \n"
        "# a comment line\n"
        "#,also a comment\n"
        " sp.mp4,\n"
        "tab.mp4 ,\n"
        "#1.mp4,\n"
        '"#quoted.mp4",\n'
        '"# quoted too.mp4",\n'
        '"a,b.mp4",\n'
        '"q""q.mp4",\n'
        '"two\nlines.mp4",\n'
        ",\n"  # a blank row
    )
    assert listed(manifest, extensions=None) == [found[name] for name in names]

    plain = tmp_path / "in" / "plain.csv"  # no header: the first cell of each row
    plain.write_text('# comment\n" sp.mp4"\n#1.mp4,extra\ntab.mp4 \n')
    assert listed(plain, extensions=None) == [found[name] for name in [" sp.mp4", "#1.mp4", "tab.mp4 "]]


def test_a_csv_without_uri_header_lists_first_cells(tmp_path: Path, s3_bucket: Bucket) -> None:
    """A header that names no ``uri`` column is a first entry like any other (not taken for inventory data)."""
    found = videos(tmp_path / "in", "a.mp4")
    manifest = tmp_path / "in" / "list.csv"
    manifest.write_text("path,label\na.mp4,cat\n")
    assert listed(manifest) == [found["a.mp4"]]
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="m/v.mp4", Body=b"12")
    local = found["a.mp4"].uri
    client.put_object(Bucket=bucket, Key="m/list.txt", Body=f"./v.mp4\n{local}\nfile://{local}\n".encode())
    rows = listed(f"s3://{bucket}/m/list.txt", s3_client=client)
    # Keys beside an S3 manifest are objects; files of the machines are not named by what is written to a bucket.
    assert [(v.uri, v.size_bytes, v.status) for v in rows] == [
        (f"s3://{bucket}/m/v.mp4", 2, ""),
        (local, UNKNOWN_SIZE, "unsupported_uri"),
        (f"file://{local}", UNKNOWN_SIZE, "unsupported_uri"),
    ]
    assert "names objects" in rows[1].error_message


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.csv"
    manifest.write_text("uri,size_bytes\nok.mp4,1\n\nx.mp4,big\n")
    with pytest.raises(StorageError, match=r"bad.csv line 4: size_bytes 'big' is not an integer"):
        listed(manifest)
    manifest.write_text("uri,etag\nok.mp4,1\n,abc\n")
    with pytest.raises(StorageError, match=r"bad.csv line 3: a row has no uri"):
        listed(manifest)
    manifest.write_text("uri,size_bytes\nok.mp4,1\nx.mp4,99999999999999999999\n")  # past int64: was an OverflowError
    with pytest.raises(StorageError, match=r"bad.csv line 3: size_bytes 99999999999999999999 is too large"):
        listed(manifest)


def test_a_local_files_etag_and_size_are_its_own_whatever_the_manifest_says(tmp_path: Path) -> None:
    """A manifest's ETag for a local file that is not the file's own kind (size and modification time) could never
    be checked on read: the file was indexed under it, and once replaced, the same manifest's next run said "already
    indexed" and kept the old row for ever. Such an entry, or a size that is not its ETag's, is looked up; a
    file's own ETag is taken as given (the read checks it: a stale one is a `changed` row)."""
    found = videos(tmp_path / "in", "a.mp4", "b.mp4", "c.mp4", "d.mp4")
    own = found["c.mp4"].etag
    stale = f"local-{found['d.mp4'].size_bytes}-1"
    manifest = tmp_path / "in" / "list.csv"
    manifest.write_text(
        "uri,etag,size_bytes\n"
        "a.mp4,bogus-etag,5\n"  # another kind of ETag: looked up
        "a.mp4,local-\u00b2-5,\n"  # not digits as int() reads them (it raised, naming nothing): looked up
        f"b.mp4,{own},1000\n"  # a size that is not its ETag's: looked up
        f"c.mp4,{own},5\n"  # c.mp4's own ETag (a copy of the same size) and size: taken
        f"d.mp4,{stale},5\n"  # its own kind, stale: taken, and refused on read as changed
    )
    assert listed(manifest) == [found["a.mp4"], found["a.mp4"], found["b.mp4"], VideoObject(found["c.mp4"].uri, own, 5),
                                VideoObject(found["d.mp4"].uri, stale, 5)]  # fmt: skip

    from jobs.storage import open_video

    with pytest.raises(StorageError, match="changed since it was listed") as caught:
        open_video(found["d.mp4"].uri, size_bytes=5, etag=stale)
    assert caught.value.reason == "changed"


def test_a_path_with_a_nul_is_an_unsupported_row(tmp_path: Path) -> None:
    """A Parquet (or quoted CSV) cell may hold a NUL, which no file name does: it stopped the run with "embedded
    null byte", naming neither the manifest nor the row."""
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": ["ok.mp4", "nul\x00x.mp4"]}), manifest)
    (tmp_path / "ok.mp4").write_bytes(b"1")
    ok, nul = listed(manifest)
    assert (ok.uri, ok.status) == (str(tmp_path / "ok.mp4"), "")
    assert nul.status == "unsupported_uri" and "NUL" in nul.error_message and "list.parquet" in nul.error_message
    # Named by a file:// URI of its bytes, as a name that is not UTF-8 is: its raw path failed the run's summary
    # (os.path.realpath of its folder) after everything was committed.
    assert nul.uri == f"file://{tmp_path}/nul%00x.mp4"


def test_uris_with_blanks_before_them_are_rows_not_paths(tmp_path: Path) -> None:
    """Cells and lines are taken as written, so " https://user:pw@host/v.mp4" (a space after a CSV comma) is no
    URI by its first character: it was a relative local path, with the password in the row's uri."""
    (tmp_path / "list.txt").write_text(" https://user:s3cr3t@example.com/v.mp4\n\ts3://AKIAKEY:s3/cr3t@media/w.mp4\n")
    (tmp_path / "list.csv").write_text("size_bytes,uri\n100, https://user:s3cr3t@example.com/v.mp4\n")
    rows = listed(tmp_path / "list.txt") + listed(tmp_path / "list.csv")
    assert [(v.status, v.uri) for v in rows] == [
        ("unsupported_uri", " https://***@example.com/v.mp4"),
        ("unsupported_uri", "\ts3://***@media/w.mp4"),
        ("unsupported_uri", " https://***@example.com/v.mp4"),
    ]
    assert all("blanks before it" in v.error_message for v in rows)
    assert not any("s3cr3t" in v.uri + v.error_message or "AKIAKEY" in v.uri + v.error_message for v in rows)


# ----------------------------------------------------------------------------------------------- locations


def test_file_uris_are_local_paths_and_other_schemes_are_rows(tmp_path: Path) -> None:
    found = videos(tmp_path / "in", "a b.mp4", "c%d.mp4", "é.mp4")
    folder = tmp_path / "in"
    manifest = tmp_path / "list.txt"
    manifest.write_text(
        f"file://{quote(str(folder / 'a b.mp4'))}\n"
        f"file://localhost{quote(str(folder / 'c%d.mp4'))}\n"
        f"FILE://{quote(str(folder / 'é.mp4'))}\n"
        f"file://{folder}/sub/../missing.mp4\n"
        "file://otherhost/share/v.mp4\n"
        f"file://{folder}/odd?.mp4\n"
        "gs://bucket/v.mp4\n"
        "http://user:s3cr3t@example.com/v.mp4\n"
        "gs://bucket/notes.txt\n"  # filtered by extension like any other entry
        "s3://AKIAKEY:s3cr3t@media/v.mp4\n"  # never kept as a row's uri (the table would hold the secret)
        "https://media.example.com/v.mp4?X-Amz-Signature=s3cr3t\n"  # a row, not dropped for its query
        "s3:///v.mp4\ns3://Bad Bucket/v.mp4\n"  # no read could succeed: a final status, not a read_error every run
    )
    rows = listed(manifest)
    assert rows[:4] == [
        found["a b.mp4"],
        found["c%d.mp4"],
        found["é.mp4"],
        VideoObject(str(folder / "missing.mp4"), "", UNKNOWN_SIZE),
    ]
    odd = rows[4:]
    assert [(v.uri, v.status, v.size_bytes) for v in odd] == [
        ("file://otherhost/share/v.mp4", "unsupported_uri", UNKNOWN_SIZE),
        (f"file://{folder}/odd?.mp4", "unsupported_uri", UNKNOWN_SIZE),
        ("gs://bucket/v.mp4", "unsupported_uri", UNKNOWN_SIZE),
        ("http://***@example.com/v.mp4", "unsupported_uri", UNKNOWN_SIZE),
        ("s3://***@media/v.mp4", "unsupported_uri", UNKNOWN_SIZE),
        ("https://media.example.com/v.mp4?X-Amz-Signature=***", "unsupported_uri", UNKNOWN_SIZE),
        ("s3:///v.mp4", "unsupported_uri", UNKNOWN_SIZE),
        ("s3://Bad Bucket/v.mp4", "unsupported_uri", UNKNOWN_SIZE),
    ]
    assert "without a valid bucket name" in odd[-1].error_message
    assert "credentials" in odd[4].error_message and "line 10 of" in odd[4].error_message
    assert "host 'otherhost'" in odd[0].error_message and "line 5 of" in odd[0].error_message
    assert "%3F" in odd[1].error_message
    assert "gs://" in odd[2].error_message and "s3://" in odd[2].error_message
    assert str(manifest) in odd[2].error_message and "line 7" in odd[2].error_message
    assert not any("s3cr3t" in v.uri + v.error_message or "AKIAKEY" in v.uri + v.error_message for v in rows)


def test_absolute_paths_are_normalised_like_relative_ones(tmp_path: Path) -> None:
    found = videos(tmp_path / "in", "b/v.mp4")
    root = tmp_path / "in"
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{root}//b/v.mp4\n{root}/./b/v.mp4\n{root}/x/../b/v.mp4\n/{root}/b/v.mp4\nin/b/../b/v.mp4\n")
    assert listed(manifest) == [found["b/v.mp4"]] * 5
    # The folder and the manifest name the same video with the same URI, so it is planned once.
    assert list(list_videos([str(root), str(manifest)], s3_client=NoS3()))[0] == found["b/v.mp4"]


# ----------------------------------------------------------------------------------------------- encodings


def test_manifests_in_utf8_and_utf16_with_a_bom(tmp_path: Path) -> None:
    found = videos(tmp_path, "é.mp4", "日本.mp4")
    for encoding in ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"):
        bom = "\ufeff" if encoding in ("utf-16-le", "utf-16-be") else ""
        for name, text in [("list.txt", "é.mp4\r\n日本.mp4\r\n"), ("list.csv", 'uri\n"é.mp4"\n日本.mp4\n')]:
            (tmp_path / name).write_bytes((bom + text).encode(encoding))
            assert listed(tmp_path / name) == [found["é.mp4"], found["日本.mp4"]], (encoding, name)


def test_undecodable_manifests_name_the_file_and_line(tmp_path: Path) -> None:
    manifest = tmp_path / "latin1.csv"
    manifest.write_bytes("uri\nok.mp4\ncaf\xe9.mp4\n".encode("latin-1"))
    with pytest.raises(StorageError, match=r"latin1.csv line 3: not valid UTF-8.*UTF-16 with a byte order mark"):
        listed(manifest)
    text = tmp_path / "big.txt"  # the bad byte far into the file, past the first chunk read
    text.write_bytes(b"a.txt\n" * 200_000 + b"\xff.mp4\n")
    with pytest.raises(StorageError, match=r"big.txt line 200001: not valid UTF-8") as caught:
        listed(text)
    assert caught.value.reason == "invalid_input"
    no_bom = tmp_path / "nobom.txt"
    no_bom.write_bytes("a.mp4\n".encode("utf-16-le"))
    with pytest.raises(StorageError, match=r"nobom.txt line 1: .*NUL.*byte order mark"):
        listed(no_bom)
    odd = tmp_path / "odd16.txt"
    odd.write_bytes("\ufeffa.mp4\nb.mp4\n".encode("utf-16-le") + b"\x00\xd8x\x00\n\x00")  # a lone surrogate
    with pytest.raises(StorageError, match=r"odd16.txt line 3: not valid UTF-16"):
        listed(odd)


def test_s3_manifest_decode_errors_name_the_object(s3_bucket: Bucket) -> None:
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="m/list.txt", Body=b"ok.mp4\nx\xe9.mp4\n")
    with pytest.raises(StorageError, match=rf"s3://{bucket}/m/list.txt line 2: not valid UTF-8"):
        list(list_videos([f"s3://{bucket}/m/list.txt"], s3_client=client))


# ----------------------------------------------------------------------------------------------- S3 Inventory

SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
# (key, version id, is latest, is delete marker, size, etag) of the inventoried objects
OBJECTS = [
    ("videos/a.mp4", "v1", True, False, 10, "e-a"),
    ("videos/my clip.mp4", "v1", True, False, 11, "e-b"),
    ("videos/a+b (1).mp4", "v1", True, False, 12, "e-c"),
    ("videos/old.mp4", "v0", False, False, 13, "e-old"),  # a non-current version
    ("videos/gone.mp4", "v2", True, True, None, None),  # a delete marker
    ("videos/folder/", "v1", True, False, 0, "e-dir"),  # a folder marker
    ("videos/notes.txt", "v1", True, False, 14, "e-txt"),
    ("videos/é/multi.mkv", "v1", True, False, 15, "0123-2"),
]
EXPECTED = [
    VideoObject("s3://src-bucket/videos/a.mp4", "e-a", 10),
    VideoObject("s3://src-bucket/videos/my clip.mp4", "e-b", 11),
    VideoObject("s3://src-bucket/videos/a+b (1).mp4", "e-c", 12),
    VideoObject("s3://src-bucket/videos/é/multi.mkv", "0123-2", 15),
]


def inventory_csv(objects: list[tuple[Any, ...]]) -> bytes:
    """A gzipped inventory CSV data file: no header, every value quoted, keys URL-encoded as S3 writes them."""
    lines = []
    for key, version, latest, deleted, size, etag in objects:
        values = ["src-bucket", quote_plus(key, safe="/"), version, str(latest).lower(), str(deleted).lower()]
        values += ["" if size is None else str(size), "2026-01-01T00:00:00.000Z", etag or "", "STANDARD"]
        lines.append(",".join(f'"{value}"' for value in values))
    return gzip.compress(("\n".join(lines) + "\n").encode())


def inventory_parquet(objects: list[tuple[Any, ...]]) -> bytes:
    table = pa.table(
        {
            "bucket": ["src-bucket"] * len(objects),
            "key": [o[0] for o in objects],
            "version_id": [o[1] for o in objects],
            "is_latest": [o[2] for o in objects],
            "is_delete_marker": [o[3] for o in objects],
            "size": pa.array([o[4] for o in objects], pa.int64()),
            "e_tag": [o[5] for o in objects],
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def inventory_files(file_format: str, *, parts: int = 2, destination: str = "dest-bucket") -> dict[str, bytes]:
    """An inventory as S3 publishes it, by key in its destination bucket: manifest.json and its data files."""
    prefix = "inv/src-bucket/daily"
    suffix, write = (".csv.gz", inventory_csv) if file_format == "CSV" else (".parquet", inventory_parquet)
    half = len(OBJECTS) // parts
    chunks = [OBJECTS[i * half : (i + 1) * half if i < parts - 1 else None] for i in range(parts)]
    files = {f"{prefix}/data/part-{i}{suffix}": write(chunk) for i, chunk in enumerate(chunks)}
    manifest = {
        "sourceBucket": "src-bucket",
        "destinationBucket": f"arn:aws:s3:::{destination}",
        "version": "2016-11-30",
        "creationTimestamp": "1767225600000",
        "fileFormat": file_format,
        "fileSchema": SCHEMA if file_format == "CSV" else "message s3.inventory { required binary bucket (UTF8); }",
        "files": [{"key": key, "size": len(data), "MD5checksum": "0" * 32} for key, data in files.items()],
    }
    return {f"{prefix}/2026-01-01T01-00Z/manifest.json": json.dumps(manifest).encode(), **files}


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_local_inventory_manifests(tmp_path: Path, file_format: str) -> None:
    files = inventory_files(file_format)
    write_tree(tmp_path / "mirror", files)  # a copy of the destination bucket
    manifest = tmp_path / "mirror" / next(iter(files))
    assert listed(manifest) == EXPECTED  # sizes and ETags from the inventory: no lookups
    assert [v.uri for v in listed(manifest, extensions=None)][-2:] == [
        "s3://src-bucket/videos/notes.txt",
        "s3://src-bucket/videos/é/multi.mkv",
    ]
    # Only the report's folder copied, or everything in one folder: the data files are found next to it.
    for name, data in files.items():
        flat = tmp_path / "flat" / os.path.basename(name)
        flat.parent.mkdir(exist_ok=True)
        flat.write_bytes(data)
    assert listed(tmp_path / "flat" / "manifest.json") == EXPECTED


def test_lone_inventory_files_and_gzipped_csv_manifests(tmp_path: Path) -> None:
    (tmp_path / "part.parquet").write_bytes(inventory_parquet(OBJECTS))
    assert listed(tmp_path / "part.parquet") == EXPECTED
    (tmp_path / "list.csv.gz").write_bytes(gzip.compress(b"uri,size_bytes,etag\ns3://b/k.mp4,5,e\nlocal.mp4,6,f\n"))
    assert listed(tmp_path / "list.csv.gz") == [
        VideoObject("s3://b/k.mp4", "e", 5),
        VideoObject(str(tmp_path / "local.mp4"), "", UNKNOWN_SIZE),  # a file's ETag is its own: looked up (none)
    ]
    # An inventory CSV data file alone does not say which column is which: its manifest.json does.
    (tmp_path / "part.csv.gz").write_bytes(inventory_csv(OBJECTS))
    with pytest.raises(StorageError, match="S3 Inventory CSV data file.*manifest.json"):
        listed(tmp_path / "part.csv.gz")
    (tmp_path / "broken.csv.gz").write_bytes(b"not gzip")
    with pytest.raises(StorageError, match="broken.csv.gz"):
        listed(tmp_path / "broken.csv.gz")


def test_inventory_manifests_that_cannot_be_read(tmp_path: Path) -> None:
    files = inventory_files("CSV")
    manifest_key = next(iter(files))
    manifest = json.loads(files[manifest_key])
    cases = [
        ({**manifest, "fileFormat": "ORC"}, "ORC inventories are not read"),
        ({**manifest, "fileSchema": "Size, ETag"}, "no Bucket and Key"),
        ({"files": "x"}, "not an S3 Inventory manifest"),
        ({**manifest, "destinationBucket": None}, "data file .*part-0.csv.gz.* not found"),
    ]
    for content, match in cases:
        path = tmp_path / "manifest.json"
        path.write_text(json.dumps(content))
        with pytest.raises(StorageError, match=match):
            listed(path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StorageError, match="manifest.json is not valid JSON"):
        listed(tmp_path / "manifest.json")


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_inventory_on_s3_is_streamed(s3_bucket: Bucket, tmp_path: Path, file_format: str) -> None:
    client, bucket = s3_bucket
    files = inventory_files(file_format, parts=4, destination=bucket)
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    gets: list[str] = []
    client.meta.events.register(
        "before-parameter-build.s3.GetObject", lambda **kwargs: gets.append(kwargs["params"]["Key"])
    )

    listing = list_videos([f"s3://{bucket}/{next(iter(files))}"], s3_client=client)
    assert next(listing) == EXPECTED[0]
    data_gets = [key for key in gets if "/data/" in key]
    assert data_gets and set(data_gets) == {data_gets[0]}  # the later data files are not read yet
    assert [next(listing), *listing] == EXPECTED[1:]

    # A local manifest.json whose data files are not here reads them from its destination bucket.
    (tmp_path / "manifest.json").write_bytes(next(iter(files.values())))
    assert listed(tmp_path / "manifest.json", s3_client=client) == EXPECTED


def test_listed_scopes_are_what_a_listing_covers_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--prune-missing prunes only under these: every listed URI of a folder or prefix starts with its scope."""
    from jobs.storage import listed_scopes

    found = videos(tmp_path / "in", "a.mp4", "sub/b.mp4")
    monkeypatch.chdir(tmp_path)
    scopes = listed_scopes(["in/", "s3://bucket/videos/2026"])
    assert scopes == [f"{tmp_path / 'in'}/", "s3://bucket/videos/2026"]
    assert all(v.uri.startswith(scopes[0]) for v in found.values()) and len(found) == 2
    assert not f"{tmp_path / 'in2'}/x.mp4".startswith(scopes[0])  # a sibling folder with a longer name
    assert listed_scopes(["s3://bucket"]) == ["s3://bucket/"]  # the whole bucket, not s3://bucket2/
    (tmp_path / "list.txt").write_text("in/a.mp4\n")
    for manifest in ("list.txt", "s3://bucket/inventory/manifest.json"):
        with pytest.raises(ValueError, match="--prune-missing needs folder or s3:// prefix inputs, or --prune-scope"):
            listed_scopes(["in", manifest])
    # What a manifest covers, declared: it replaces the inputs' scopes.
    assert listed_scopes(["list.txt"], ["s3://media", "in"]) == ["s3://media/", f"{tmp_path / 'in'}/"]
    # s3://media/in as a scope for the input s3://media/in/ marked the indexed videos of s3://media/in2/ deleted (a
    # raw key prefix; found by review). Other scopes are as declared: a moved folder's old place, a manifest's bucket.
    for inputs, scope in (
        (["s3://media/in/", "in"], "s3://media/in"),
        (["s3://media/in/"], "s3://media/i"),
        (["s3://media/in/clips/"], "s3://media/in/cl"),
    ):
        with pytest.raises(ValueError, match=rf"--prune-scope {scope} is a raw key prefix: .* give the input's"):
            listed_scopes(inputs, [scope])
    assert listed_scopes(["s3://media/in/", "s3://media/in"], ["s3://media/in"]) == ["s3://media/in"]  # an input's
    assert listed_scopes(["s3://media/in/"], ["s3://media/in/", "s3://media/old", "in"]) == [
        "s3://media/in/",
        "s3://media/old",
        f"{tmp_path / 'in'}/",
    ]
    assert listed_scopes(["list.txt", "s3://media/in/"], ["s3://media/in"]) == ["s3://media/in"]  # a manifest's


def test_current_etags_are_what_a_listing_gives_now(tmp_path: Path, s3_bucket: Bucket) -> None:
    """The lookups a commit makes for a video another run committed with another ETag: local files and S3 objects
    as a listing of them would give them now; a missing one is None (not an error)."""
    from jobs.storage import current_etags

    found = videos(tmp_path / "in", "a.mp4", "b.mp4")
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="v/c.mp4", Body=b"first")
    first = client.head_object(Bucket=bucket, Key="v/c.mp4")["ETag"].strip('"')
    client.put_object(Bucket=bucket, Key="v/c.mp4", Body=b"second, changed since it was listed")
    (tmp_path / "in" / "b.mp4").write_bytes(b"changed")
    os.utime(tmp_path / "in" / "b.mp4", ns=(1, 1))  # another size and time: another local ETag
    uris = [found["a.mp4"].uri, found["b.mp4"].uri, f"s3://{bucket}/v/c.mp4", f"s3://{bucket}/v/gone.mp4"]
    now = current_etags([*uris, str(tmp_path / "in" / "gone.mp4")], s3_client=client)
    assert now[0] == found["a.mp4"].etag
    assert now[1] is not None and now[1] != found["b.mp4"].etag
    assert now[1] == list(list_videos([str(tmp_path / "in")], extensions=None))[1].etag
    assert now[2] is not None and now[2] != first
    assert now[2] == next(iter(list_videos([f"s3://{bucket}/v/"], s3_client=client, extensions=None))).etag
    assert now[3:] == [None, None]


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"uri": pa.array([b"/tmp/x.mp4"], pa.binary())}, "column 'uri' holds binary, not text"),
        ({"uri": pa.array([123], pa.int64())}, "column 'uri' holds int64, not text"),
        ({"uri": ["/tmp/x.mp4"], "size_bytes": pa.array([1.5])}, "column 'size_bytes' holds double, not whole numbers"),
    ],
)
def test_parquet_manifest_columns_of_another_type_are_refused(tmp_path: Path, columns: dict, message: str) -> None:
    """A binary uri became the path "b'/tmp/x.mp4'" (a not_found row), an integer one a file named by the number, a
    size of 1.5 the size 1: the manifest is refused, naming the column."""
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table(columns), manifest)
    with pytest.raises(StorageError, match=message) as caught:
        list(list_videos([str(manifest)]))
    assert caught.value.reason == "invalid_input" and "list.parquet" in str(caught.value)


def test_parquet_manifest_text_that_is_not_utf8_names_the_manifest(tmp_path: Path) -> None:
    data = b"/tmp/ok.mp4/tmp/bad\xff.mp4"
    offsets = pa.py_buffer(pa.array([0, 11, len(data)], pa.int32()).buffers()[1])
    uris = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(data)])  # as another writer made it
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": uris}), manifest)
    with pytest.raises(StorageError, match=r"list.parquet rows 1-2: cannot be read as text") as caught:
        list(list_videos([str(manifest)]))
    assert caught.value.reason == "invalid_input"


def test_manifests_made_at_is_the_oldest_manifests_time(tmp_path: Path, s3_bucket: Any) -> None:
    """What `--prune-missing` spares rows indexed after: an inventory report's creationTimestamp, else the
    manifest's modification time (a local file's, an S3 object's LastModified); None with no manifest."""
    client, bucket = s3_bucket
    listing = tmp_path / "list.txt"
    listing.write_text("a.mp4\n")
    os.utime(listing, (1_700_000_000, 1_700_000_000))
    inventory = tmp_path / "manifest.json"
    inventory.write_text(json.dumps({"fileFormat": "CSV", "files": [], "creationTimestamp": "1600000000000"}))
    (tmp_path / "folder").mkdir()
    assert manifests_made_at([str(tmp_path / "folder")]) is None
    assert manifests_made_at([str(listing)]) == 1_700_000_000
    assert manifests_made_at([str(tmp_path / "folder"), str(listing), str(inventory)]) == 1_600_000_000
    inventory.write_text(json.dumps({"fileFormat": "CSV", "files": []}))  # no creationTimestamp: the file's time
    os.utime(inventory, (1_650_000_000, 1_650_000_000))
    assert manifests_made_at([str(inventory)]) == 1_650_000_000
    before = time.time() - 5
    client.put_object(Bucket=bucket, Key="m/list.txt", Body=b"v.mp4\n")
    client.put_object(Bucket=bucket, Key="m/manifest.json", Body=json.dumps(
        {"fileFormat": "Parquet", "files": [], "creationTimestamp": "1500000000000"}
    ).encode())  # fmt: skip
    assert before <= manifests_made_at([f"s3://{bucket}/m/list.txt"], s3_client=client) <= time.time() + 5
    assert manifests_made_at([f"s3://{bucket}/m/list.txt", f"s3://{bucket}/m/manifest.json"], s3_client=client) == (
        1_500_000_000
    )


def test_a_manifest_time_that_cannot_be_when_it_was_made_bounds_nothing(tmp_path: Path, caplog: Any) -> None:
    """A creationTimestamp written in seconds (1970-01-20 as milliseconds) falls back to the file's time; a file
    time before 2006 or in the future (a build that reset it) bounds no pruning, with a warning: read as it is, it
    would spare every video (found by review)."""
    inventory = tmp_path / "manifest.json"
    inventory.write_text(json.dumps({"fileFormat": "CSV", "files": [], "creationTimestamp": "1700000000"}))
    os.utime(inventory, (1_650_000_000, 1_650_000_000))
    assert manifests_made_at([str(inventory)]) == 1_650_000_000
    listing = tmp_path / "list.txt"
    listing.write_text("a.mp4\n")
    for bad in (1.0, time.time() + 10 * 86_400):
        os.utime(listing, (bad, bad))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="jobs.storage.listing"):
            assert manifests_made_at([str(listing)]) is None
            assert manifests_made_at([str(listing), str(inventory)]) == 1_650_000_000
        assert "cannot be when it was made" in caplog.text
    # A number past Python's 4,300 digits is a clear error naming the manifest, not a bare ValueError.
    inventory.write_text('{"fileFormat": "CSV", "files": [], "creationTimestamp": ' + "9" * 5000 + "}")
    with pytest.raises(StorageError, match="manifest.json is not valid JSON"):
        manifests_made_at([str(inventory)])

"""The indexing job against a real S3 API (moto's server), with faults injected by a proxy."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import ray
from fault_proxy import FaultProxy
from local_ray import start_local_ray
from test_index_job import BROKEN, job_args, make_videos

from index import tables
from index.schema import row_id_for
from jobs.cli import main as cli_main
from jobs.index_videos import main
from jobs.storage import make_s3_client, open_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_with_s3(s3_server: str):
    """An embedded Ray started after the S3 fixture set its dummy credentials, so workers inherit them."""
    ray.shutdown()
    start_local_ray()
    yield s3_server
    ray.shutdown()


def upload_folder(client, bucket: str, folder: Path, prefix: str) -> list[str]:
    uris = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            uris.append(f"s3://{bucket}/{key}")
    return uris


def test_s3_in_and_out_with_faults(ray_with_s3: str, s3_bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    videos = make_videos(tmp_path / "in", 4)
    upload_folder(client, bucket, tmp_path / "in", "raw")
    with FaultProxy(ray_with_s3, every_nth=5) as proxy:
        rc = main(
            [
                f"s3://{bucket}/raw/",
                "--output",
                f"s3://{bucket}/out",
                "--s3-endpoint-url",
                proxy.url,
                "--model",
                "vitaclip-tiny",
                "--random-weights",
                "--decode-batch-size",
                "2",
                "--whole-object-max-bytes",
                "2048",
                "--segment-seconds",
                "2",
            ]
        )
        assert rc == 0
        assert sum(proxy.injected.values()) >= 5, proxy.injected  # faults really happened, and were survived
        assert {"503", "500", "reset"} <= set(proxy.injected)

    store = open_store(f"s3://{bucket}/out", s3_client=make_s3_client(endpoint_url=ray_with_s3))
    table = tables.read_table(store, "videos")
    assert table is not None
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == len(videos) + len(BROKEN)
    for path in videos:
        row = rows[path.name]
        assert row["status"] == "ok", row["error_message"]
        assert row["etag"] and row["size_bytes"] == path.stat().st_size
    assert rows["empty.mp4"]["status"] == "empty"
    assert all(rows[name]["status"] != "ok" for name in BROKEN)
    # The tables on S3 are Delta tables of the declared schema, readable as analysts would.
    from deltalake import DeltaTable

    videos_table = DeltaTable(f"s3://{bucket}/out/videos", storage_options=store.location.storage_options())
    assert videos_table.metadata().configuration["vitaclip.table"] == "videos"
    assert videos_table.to_pyarrow_table(columns=["video_id"]).num_rows == len(rows)
    segs = tables.read_table(store, "segments")
    assert segs is not None and segs.num_rows >= len(videos)
    info = json.loads(store.get_bytes("index/index_info.json"))
    assert info["indexes"]["videos"]["count"] == len(videos)
    summary_rel = [p for p in store.list("runs/") if p.endswith(".json")]
    assert len(summary_rel) == 1
    text = store.get_bytes(summary_rel[0]).decode()
    assert "testing" not in text.replace('"testing', "")  # the dummy secret never lands in the summary

    _served_from_s3(client, bucket, rows, videos[0], endpoint=ray_with_s3, cache=tmp_path / "cache")


def _served_from_s3(client: Any, bucket: str, rows: dict[str, Any], video: Path, *, endpoint: str, cache: Path) -> None:
    """The search service over the job's output on S3: an S3 video is served as a presigned URL while it is the
    version indexed."""
    from fastapi.testclient import TestClient

    from index.api import create_app
    from index.service import OutputSource, SearchService

    source = OutputSource(f"s3://{bucket}/out", s3_endpoint_url=endpoint, cache_root=str(cache))
    service = SearchService({"s3": source.open()}, s3_endpoint_url=endpoint)
    client_http = TestClient(create_app(service))
    row = rows[video.name]
    thumbnail = client_http.get(f"/thumbnails/{row_id_for(row['video_id'])}.jpg")  # from the table on S3
    assert thumbnail.status_code == 200 and thumbnail.content[:2] == b"\xff\xd8"
    assert not list(cache.rglob("*.parquet"))  # only the index and run records are copied
    answer = client_http.get(f"/media/{row['video_id']}", follow_redirects=False)
    assert answer.status_code == 307 and answer.headers["cache-control"] == "no-store"
    location = answer.headers["location"]
    # Signed with SigV4 (S3 refuses SigV2 links, botocore's choice in us-east-1, for buckets made since 2020).
    assert location.startswith(endpoint) and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in location
    assert "X-Amz-Signature=" in location and "AWSAccessKeyId=" not in location
    with urllib.request.urlopen(location, timeout=30) as fetched:
        assert fetched.read() == video.read_bytes()
        # The type the link answers with is signed in it, whatever type the object was stored with (text/html
        # on a polyglot that decodes as a video would open as a page on the store's origin).
        assert fetched.headers["Content-Type"] == "video/mp4"
    # An endpoint given with a user and password (which S3 never reads): the link a client gets carries neither.
    with_userinfo = endpoint.replace("://", "://user:PASSW0RD@", 1)
    answer = TestClient(create_app(SearchService({"s3": source.open()}, s3_endpoint_url=with_userinfo))).get(
        f"/media/{row['video_id']}", follow_redirects=False
    )
    assert answer.status_code == 307 and answer.headers["location"].startswith(endpoint)
    assert "PASSW0RD" not in answer.headers["location"] and "user" not in answer.headers["location"]
    key = row["uri"].split("/", 3)[3]
    client.put_object(Bucket=bucket, Key=key, Body=b"replaced after indexing")
    answer = client_http.get(f"/media/{row['video_id']}", follow_redirects=False)
    assert answer.status_code == 410 and answer.json()["reason"] == "changed"
    client.delete_object(Bucket=bucket, Key=key)
    answer = client_http.get(f"/media/{row['video_id']}", follow_redirects=False)
    assert answer.status_code == 404 and answer.json()["reason"] == "missing" and bucket not in answer.text
    assert client_http.get(f"/media/{rows['empty.mp4']['video_id']}").status_code == 404  # not a decoded video


def test_s3_errors_are_clear(ray_with_s3: str, s3_bucket, tmp_path: Path, capsys) -> None:
    client, bucket = s3_bucket
    rc = main(job_args([f"s3://{bucket}-missing/raw/"], tmp_path / "out", "--s3-endpoint-url", ray_with_s3))
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bucket}-missing" in err and "bucket" in err.lower()
    rc = main(job_args([f"s3://{bucket}/nothing-here/"], tmp_path / "out", "--s3-endpoint-url", ray_with_s3))
    assert rc == 2
    assert "no videos under" in capsys.readouterr().err
    # Outputs: a missing bucket, or a prefix delta-rs would decode, are one line before any work.
    (tmp_path / "in").mkdir()
    for output, message in [
        (f"s3://{bucket}-missing/out", f"bucket '{bucket}-missing' does not exist"),
        (f"s3://{bucket}/o%41", "holding '%'"),
        # delta-rs reads these as another place than the key written (the tables went to o, the index to o#1).
        (f"s3://{bucket}/o#1", "need a prefix without '?', '#'"),
        (f"s3://{bucket}/o?x=1", "need a prefix without '?', '#'"),
        (f"s3://{bucket}/op/../oq", "need a prefix without '?', '#'"),
        (f"s3://{bucket}//o", "need a prefix without '?', '#'"),
        (f"s3://{bucket}/o//", "need a prefix without '?', '#'"),  # tables went to o, runs and index to o//
        (f"s3://{bucket}/o\tp", "need a prefix without '?', '#'"),  # urlsplit drops the tab, the key keeps it
    ]:
        rc = main(job_args([str(tmp_path / "in")], output, "--s3-endpoint-url", ray_with_s3))  # type: ignore[arg-type]
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err
    assert client.list_objects_v2(Bucket=bucket, Prefix="o").get("KeyCount", 0) == 0
    # The commands that read an output: the same line (build-index read the tables with delta-rs, which retried
    # for 16 s and printed its error chain, exit 1).
    missing = f"s3://{bucket}-missing/out"
    for argv in (["build-index", missing], ["runs", missing], ["search", "--index", missing, "a circle"]):
        assert cli_main([*argv, "--s3-endpoint-url", ray_with_s3]) == 2, argv
        err = capsys.readouterr().err
        assert f"{bucket}-missing" in err and "Traceback" not in err and "\x1b" not in err, err
    # Read as another place (search answered from s3://bucket/o for o?x=1, o#1 and x/../o): refused as the job does.
    odd_outputs = (f"s3://{bucket}/o?x=1", f"s3://{bucket}/o#1", f"s3://{bucket}/x/../o", f"s3://{bucket}//o")
    for odd in (*odd_outputs, f"s3://{bucket}/o//", f"s3://{bucket}#x"):
        for argv in (["build-index", odd], ["runs", odd], ["search", "--index", odd, "a circle"]):
            assert cli_main([*argv, "--s3-endpoint-url", ray_with_s3]) == 2, argv
            err = capsys.readouterr().err
            assert "need a prefix without '?', '#'" in err and "Traceback" not in err, (argv, err)


def test_archived_objects_are_a_status_of_their_own_tried_max_attempts_times(
    ray_with_s3: str, s3_bucket, tmp_path: Path
) -> None:
    """An object in Glacier or Deep Archive cannot be read before it is restored (S3's InvalidObjectState, a 403):
    not a credentials problem, and not worth a read every night for ever."""
    client, bucket = s3_bucket
    videos = make_videos(tmp_path / "in", 2, broken=False)
    client.put_object(Bucket=bucket, Key="cold/ok.mp4", Body=videos[0].read_bytes())
    for key, storage_class in (("cold/glacier.mp4", "GLACIER"), ("cold/deep.mp4", "DEEP_ARCHIVE")):
        client.put_object(Bucket=bucket, Key=key, Body=videos[1].read_bytes(), StorageClass=storage_class)
    out = f"s3://{bucket}/cold-out"
    args = [f"s3://{bucket}/cold/", "--output", out, "--s3-endpoint-url", ray_with_s3, "--model", "vitaclip-tiny"]
    args += ["--random-weights", "--max-attempts", "2"]
    store = open_store(out, s3_client=make_s3_client(endpoint_url=ray_with_s3))

    def rows() -> dict[str, dict[str, Any]]:
        table = tables.read_table(store, "videos")
        assert table is not None
        return {r["uri"].rsplit("/", 1)[1]: r for r in table.to_pylist()}

    for attempt in (1, 2):
        assert main(args) == 0
        found = rows()
        assert found["ok.mp4"]["status"] == "ok"
        for name in ("glacier.mp4", "deep.mp4"):
            assert found[name]["status"] == "archived" and found[name]["attempts"] == attempt, found[name]
            assert "restore it" in found[name]["error_message"]
            assert "credentials" not in found[name]["error_message"]
    assert main(args) == 0  # both tried --max-attempts times: left alone, and counted as such
    runs = sorted(p for p in store.list("runs/") if p.endswith(".json"))
    record = json.loads(store.get_bytes(runs[-1]))
    assert record["counts"]["attempts_exhausted"] == 2 and record["counts"]["processed"] == 0
    assert rows()["glacier.mp4"]["attempts"] == 2

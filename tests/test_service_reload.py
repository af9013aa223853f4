"""A running search service and the runs that update its outputs: changed indexes are loaded again, a failed load
keeps the loaded index, and the rows it answers with are read by row group, never by scanning the table.

Outputs are copies of the session's `indexed` fixture (the real job over generated videos), updated as a later run
would: a committed row for a new video, then the incremental index update.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

import index.service as service_module
from index import tables
from index.api import create_app
from index.build import build_from_output
from index.catalog import RowCatalog
from index.commits import Committer, Planner, WrittenBatch
from index.delta_tables import OutputLocation, create_tables, table_schema, write_data_file
from index.schema import row_id_for, video_id_for
from index.search import SearchEngine
from index.segments import INDEX_DIR, INFO_FILE, Segment
from index.service import SearchService, ServiceLimits, open_service
from index.tables import _drop_superseded
from jobs.storage import open_store


def ok_video(out: Path) -> dict[str, Any]:
    found = tables.read_table(out, "videos")
    assert found is not None
    return next(r for r in found.to_pylist() if r["status"] == "ok")


def add_video(
    out: Path, like: dict[str, Any], uri: str, etag: str = "later", *, status: str = "ok", update_index: bool = True
) -> str:
    """Commits a row for the video at `uri` (with `like`'s embedding; a new version of it when it is indexed
    already) as a run does, then updates the index (unless not asked to); returns the video's id."""
    store = open_store(str(out))
    versions = tables.table_versions(out)
    assert versions is not None
    video_id = video_id_for(uri)
    row = dict(like, uri=uri, video_id=video_id, row_id=row_id_for(video_id), etag=etag, run_id="later", status=status)
    schema = table_schema("videos", len(row["embedding"]))
    written = write_data_file(
        store.location, "videos", pa.Table.from_pylist([row], schema=schema), name=f"part-later-{uuid.uuid4()}.parquet"
    )
    planned = Planner(store.location, model_id=row["model_id"], versions=versions)(
        {"uri": np.asarray([uri], dtype=object), "etag": np.asarray([etag], dtype=object)}
    )
    committer = Committer(store.location, model_id=row["model_id"], run_id="later", versions=versions)
    committer.add(
        WrittenBatch.of(
            written,
            None,
            ((video_id, etag, status),),
            current_video_files={video_id: str(planned["current_video_file"][0])},
        )
    )
    committer.commit()
    if update_index:
        build_from_output(store, model_id=row["model_id"])
    return video_id


def same_rows(engine: SearchEngine, root: Path) -> None:
    """The engine's rows (taken over from its predecessor, plus the update's) are those a fresh load reads."""
    for name, catalog in engine.catalogs.items():
        fresh = RowCatalog(OutputLocation.from_url(str(root)), name, engine.model_id)
        assert catalog.row_ids.tolist() == fresh.row_ids.tolist()
        assert catalog.rows_of(fresh.row_ids) == fresh.rows_of(fresh.row_ids)
        for row_id in fresh.row_ids[:5]:
            assert catalog.cell(int(row_id), "thumbnail_jpeg") == fresh.cell(int(row_id), "thumbnail_jpeg")


def vectors(client: TestClient) -> int:
    return int(client.get("/indexes").json()[0]["indexes"]["videos"]["count"])


def test_a_running_service_loads_the_index_a_run_updated(indexed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(indexed, out)
    service = open_service([f"main={out}"], reload_seconds=0)
    client = TestClient(create_app(service))
    first = service.engines["main"]
    like = ok_video(out)
    before = vectors(client)
    assert service.reload_changed() == []  # nothing changed yet

    added = add_video(out, like, str(tmp_path / "elsewhere" / "later.mp4"))
    assert client.get(f"/videos/{added}").status_code == 404  # still the index it loaded
    assert service.reload_changed() == ["main"]
    assert client.get(f"/videos/{added}").status_code == 200
    assert vectors(client) == before + 1
    found = client.post("/search", json={"embedding": like["embedding"], "k": 2}).json()["results"]
    assert {h["video_id"] for h in found} == {like["video_id"], added}
    reloaded = service.engines["main"]
    assert reloaded.encode is first.encode  # the query model is shared, not loaded again
    base = first.indexes["videos"].segments[0][1]
    assert reloaded.indexes["videos"].segments[0][1] is base  # segments already open are not read again
    same_rows(reloaded, out)
    assert service.reload_changed() == []

    # A new version of an indexed video replaces its row: the old one's file leaves the table.
    replaced = add_video(out, like, like["uri"], etag="changed")
    assert replaced == like["video_id"] and service.reload_changed() == ["main"]
    assert client.get(f"/videos/{replaced}").json()["etag"] == "changed"
    assert vectors(client) == before + 1
    same_rows(service.engines["main"], out)

    # Engines replaced are freed (nothing the new ones share holds on to them).
    gone = weakref.ref(first)
    del first, reloaded
    gc.collect()
    assert gone() is None

    # The same from the service's own thread, as `vitaclip serve` runs it.
    second = service.engines["main"]
    service.start_reloading(0.1)
    try:
        again = add_video(out, like, str(tmp_path / "elsewhere" / "even-later.mp4"))
        deadline = time.monotonic() + 60
        # A check between the run's commit and its index update loads the new rows with the index before them;
        # the index update (written last) is then noticed in turn.
        while service.engines["main"] is second or vectors(client) != before + 2:
            assert time.monotonic() < deadline, "the service did not load the updated index"
            time.sleep(0.05)
    finally:
        service.stop_reloading()
    assert client.get(f"/videos/{again}").status_code == 200
    assert vectors(client) == before + 2
    same_rows(service.engines["main"], out)
    loaded = client.get("/indexes").json()[0]["loaded_at"]
    assert loaded.endswith("Z") and loaded >= time.strftime("%Y-%m-%dT%H:%M", time.gmtime(second.loaded_at))


def test_a_running_service_follows_commits_without_an_index_update(indexed: Path, tmp_path: Path) -> None:
    """After a ``--no-index`` run (or one whose index update failed) the tables are ahead of the index: a running
    service notices their new versions, so a video whose new version failed is no hit any more, as in a new one."""
    out = tmp_path / "out"
    shutil.copytree(indexed, out)
    service = open_service([f"main={out}"], reload_seconds=0)
    client = TestClient(create_app(service))
    like = ok_video(out)
    query = {"embedding": like["embedding"], "k": 3}
    assert like["video_id"] in {h["video_id"] for h in client.post("/search", json=query).json()["results"]}
    info = (out / INDEX_DIR / INFO_FILE).read_bytes()

    add_video(out, like, like["uri"], etag="broken", status="corrupt", update_index=False)
    assert (out / INDEX_DIR / INFO_FILE).read_bytes() == info  # the index did not change
    assert service.reload_changed() == ["main"]
    assert client.get(f"/videos/{like['video_id']}").status_code == 404  # its row now says it failed: not indexed
    assert like["video_id"] not in {h["video_id"] for h in client.post("/search", json=query).json()["results"]}
    versions = client.get("/indexes").json()[0]["table_versions"]
    assert versions == tables.table_versions(out)
    fresh = TestClient(create_app(open_service([f"main={out}"], reload_seconds=0)))
    answer = client.post("/search", json=query).json()["results"]
    assert fresh.post("/search", json=query).json()["results"] == answer
    assert service.reload_changed() == []


def test_thumbnails_and_more_like_this_follow_the_rows_search_answers_with(indexed: Path, tmp_path: Path) -> None:
    """A video whose row no longer says ok (deleted with another tool, here delta-rs) is no search hit, no media and
    no video: its thumbnails and "more like this" of it, or of one of its moments, answered still (row ids come
    from the URI, so an old link or a known path reached the frames of a video taken down)."""
    from deltalake import DeltaTable

    out = tmp_path / "out"
    shutil.copytree(indexed, out)
    service = open_service([f"main={out}"], reload_seconds=0)
    client = TestClient(create_app(service))
    like, other = [r for r in tables.read_table(out, "videos").to_pylist() if r["status"] == "ok"][:2]
    video_id = like["video_id"]
    moment = {"video_id": video_id, "segment_index": 0, "segments": True, "k": 3}
    urls = [f"/thumbnails/{row_id_for(video_id)}.jpg", f"/thumbnails/{row_id_for(video_id, 0)}.jpg"]
    assert [client.get(url).status_code for url in urls] == [200, 200]
    assert client.post("/search", json={"video_id": video_id, "k": 3}).status_code == 200
    assert client.post("/search", json=moment).status_code == 200

    DeltaTable(str(out / "videos")).update(predicate=f"video_id = '{video_id}'", updates={"status": "'deleted'"})
    assert service.reload_changed() == ["main"]
    assert client.get(f"/videos/{video_id}").status_code == 404
    assert [client.get(url).status_code for url in urls] == [404, 404]
    assert client.post("/search", json={"video_id": video_id, "k": 3}).status_code == 404
    assert client.post("/search", json=moment).status_code == 404
    # Another video's thumbnails and moments are served as before.
    assert client.get(f"/thumbnails/{row_id_for(other['video_id'], 0)}.jpg").status_code == 200
    assert client.post("/search", json=dict(moment, video_id=other["video_id"])).status_code == 200

    # Segment rows of an older version of a video (its row now of another run) are not served either.
    DeltaTable(str(out / "videos")).update(
        predicate=f"video_id = '{other['video_id']}'", updates={"run_id": "'a-later-run'"}
    )
    assert service.reload_changed() == ["main"]
    assert client.get(f"/thumbnails/{row_id_for(other['video_id'])}.jpg").status_code == 200
    assert client.get(f"/thumbnails/{row_id_for(other['video_id'], 0)}.jpg").status_code == 404
    assert client.post("/search", json=dict(moment, video_id=other["video_id"])).status_code == 404


def test_a_failed_reload_keeps_the_loaded_index(
    indexed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    shutil.copytree(indexed, out)
    service = open_service([f"main={out}"], reload_seconds=0)
    client = TestClient(create_app(service))
    like = ok_video(out)
    before = client.post("/search", json={"embedding": like["embedding"], "k": 3}).json()["results"]
    info_path = out / INDEX_DIR / INFO_FILE
    info = json.loads(info_path.read_text())
    for entry in info["indexes"].values():
        for segment in entry.get("segments", []):
            segment["id"] = "missing-" + str(segment["id"])
    info_path.write_text(json.dumps(info))  # names files that are not there, as a half-copied update would
    with caplog.at_level(logging.WARNING, logger="vitaclip.serve"):
        assert service.reload_changed() == []
        assert service.reload_changed() == []  # not tried again at once (nor its files fetched again)
        assert caplog.text.count("keeping the index loaded at") == 1
        monkeypatch.setattr(service_module, "RELOAD_RETRY_SECONDS", 0.0)
        assert service.reload_changed() == []  # later, in case the failure was transient
    assert caplog.text.count("keeping the index loaded at") == 2
    after = client.post("/search", json={"embedding": like["embedding"], "k": 3}).json()["results"]
    assert after == before


def test_an_output_moved_away_while_served_is_said_once(
    indexed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An output deleted or moved while served went unnoticed: searches answered from memory, /healthz said ok,
    /media refused with a misleading message, nothing was logged."""
    out = tmp_path / "out"
    shutil.copytree(indexed, out)
    service = open_service([f"main={out}"], reload_seconds=0)
    client = TestClient(create_app(service))
    assert client.get("/healthz").json()["indexes"]["main"]["output_gone"] is False
    out.rename(tmp_path / "moved")
    with caplog.at_level(logging.INFO, logger="vitaclip.serve"):
        assert service.reload_changed() == [] and service.reload_changed() == []
        assert caplog.text.count("its index is no longer there") == 1
        assert client.get("/healthz").json()["indexes"]["main"]["output_gone"] is True
        (tmp_path / "moved").rename(out)
        assert service.reload_changed() == []  # the same index: nothing to load again
        assert "its index is there again" in caplog.text
    assert client.get("/healthz").json()["indexes"]["main"]["output_gone"] is False


def test_an_output_whose_store_does_not_answer_delays_no_other_reload(
    indexed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One loop checked every output in turn: the check of an object store that did not answer (70 s of the
    client's retries) held every other output's reloads as long. Each output has its own loop now."""
    import threading

    for name in ("a", "b"):
        shutil.copytree(indexed, tmp_path / name)
    service = open_service([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], reload_seconds=0)
    release, checked = threading.Event(), []
    monkeypatch.setattr(service.sources["a"], "stamp", lambda: release.wait(30) and None)
    real_stamp = service.sources["b"].stamp
    monkeypatch.setattr(service.sources["b"], "stamp", lambda: checked.append(1) or real_stamp())
    service.start_reloading(0.1)
    try:
        deadline = time.monotonic() + 20
        while len(checked) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(checked) >= 3  # b is checked again and again while a's check hangs
    finally:
        release.set()
        service.stop_reloading()


def test_an_output_indexed_after_the_service_started_empty(indexed: Path, tmp_path: Path) -> None:
    like = ok_video(indexed)
    out = tmp_path / "out"
    store = open_store(str(out))
    create_tables(store.location, len(like["embedding"]), model_id=like["model_id"])
    build_from_output(store, model_id=like["model_id"])  # an index of nothing yet
    service = open_service([f"main={out}"], reload_seconds=0)
    client = TestClient(create_app(service))
    added = add_video(out, like, str(tmp_path / "first.mp4"))
    assert service.reload_changed() == ["main"]
    assert client.get(f"/videos/{added}").status_code == 200
    same_rows(service.engines["main"], out)


def test_cached_index_files_in_use_or_being_copied_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    folder.mkdir()
    segment = Segment("000001-0a0b0c0d", 1, 3, "flat", "Flat")
    (folder / INFO_FILE).write_text(json.dumps({"indexes": {"videos": {"segments": [segment.to_dict()]}}}))
    for name in [*segment.files("videos"), "videos.000000-aaaaaaaa.faiss", ".videos.x.faiss.123.partial"]:
        (folder / name).write_bytes(b"x")
    _drop_superseded(folder, listed={INFO_FILE, "videos.000002-99999999.faiss"})
    left = {p.name for p in folder.iterdir()}
    assert left == {INFO_FILE, *segment.files("videos"), ".videos.x.faiss.123.partial"}


def test_reload_interval_is_checked(indexed: Path) -> None:
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="reload seconds"):
            open_service([f"main={indexed}"], reload_seconds=bad)


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_thumbnails_and_stored_vectors_read_one_row_group(engine: SearchEngine) -> None:
    videos = engine.catalogs["videos"]
    row_id = next(int(r) for r in videos.row_ids if (videos.row(int(r)) or {}).get("status") == "ok")
    smallest = min((engine.root / c.table_name / f).stat().st_size for c in engine.catalogs.values() for f in c.files)
    start = _read_bytes()
    for unknown in np.random.default_rng(0).integers(0, 2**62, 50):
        assert engine.thumbnail(int(unknown)) is None
    assert _read_bytes() - start < smallest // 2  # a row id that was never indexed reads no data file
    assert engine.thumbnail(2**64) is None and engine.video("") is None  # out of range, not an error
    client = TestClient(create_app(SearchService({"main": engine})))
    assert client.get(f"/thumbnails/{2**64 - 1}.jpg").status_code == 404
    query = {"embedding": [1.0] * engine.indexes["videos"].dim}
    for impossible in ({"label": "no such"}, {"min_duration": 1e9}, {"max_duration": 0.001}):
        assert client.post("/search", json={**query, **impossible}).json()["results"] == []
    low, high = engine.catalogs["videos"].duration_range
    assert client.post("/search", json={**query, "min_duration": low, "max_duration": high}).json()["results"]
    thumb = engine.thumbnail(row_id)
    assert thumb is not None and thumb[:2] == b"\xff\xd8"  # a JPEG
    row = videos.row(row_id)
    assert row is not None and row["row_id"] == row_id and engine.video(row["video_id"]) == row
    stored = engine.row_vector(row["video_id"])
    assert stored.shape == (engine.indexes["videos"].dim,) and abs(float(np.linalg.norm(stored)) - 1) < 1e-4


def test_one_service_serves_local_and_s3_outputs_with_one_endpoint(
    indexed: Path, s3_server: str, s3_bucket: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vitaclip serve --index a=LOCAL --index b=s3://... --s3-endpoint-url URL``: the endpoint is the S3 output's
    (and the media links'), not a mistake made about the local one."""
    client, bucket = s3_bucket
    for path in indexed.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"copy/{path.relative_to(indexed).as_posix()}", Body=path.read_bytes())
    monkeypatch.setenv("HOME", str(tmp_path))  # the object store output's cache
    service = open_service(
        [f"local={indexed}", f"remote=s3://{bucket}/copy"], s3_endpoint_url=s3_server, reload_seconds=0
    )
    http = TestClient(create_app(service))
    like = ok_video(indexed)
    query = {"embedding": like["embedding"], "k": 3}
    # The output is named in the body: a ?index= on a POST was ignored (both went to the first output)
    local = http.post("/search", json={**query, "index": "local"}).json()
    remote = http.post("/search", json={**query, "index": "remote"}).json()
    assert (local["index"], remote["index"]) == ("local", "remote")
    local, remote = local["results"], remote["results"]
    assert [h["video_id"] for h in local] == [h["video_id"] for h in remote]
    assert local[0]["video_id"] == like["video_id"]

    # The run records of an object-store output are written by whoever can write the bucket and name folders of
    # the machines that ran the job: its local files are served only inside the service's --media-root folders.
    head = {"Range": "bytes=0-15"}
    media = f"/media/{like['video_id']}"
    assert http.get(media + "?index=local", headers=head).status_code == 206
    refused = http.get(media + "?index=remote", headers=head)
    assert refused.status_code == 403 and "--media-root" in refused.json()["error"], refused.text
    folder = os.path.dirname(like["uri"])
    limits = ServiceLimits(media_roots=(folder,))
    rooted = TestClient(
        create_app(
            open_service(
                [f"local={indexed}", f"remote=s3://{bucket}/copy"],
                s3_endpoint_url=s3_server,
                reload_seconds=0,
                limits=limits,
            )
        )
    )
    assert rooted.get(media + "?index=remote", headers=head).status_code == 206
    assert rooted.get(media + "?index=local", headers=head).status_code == 206
    elsewhere = TestClient(
        create_app(
            open_service([f"local={indexed}"], reload_seconds=0, limits=ServiceLimits(media_roots=(str(tmp_path),)))
        )
    )
    outside = elsewhere.get(media, headers=head)  # a local output's recorded folders, outside its --media-root
    assert outside.status_code == 403 and "--media-root" in outside.json()["error"], outside.text


def test_a_local_output_given_an_s3_endpoint_still_opens(indexed: Path) -> None:
    """`vitaclip search --index LOCAL --s3-endpoint-url URL` (the endpoint of its inputs, say) opens the output."""
    from index.service import OutputSource

    source = OutputSource(str(indexed), s3_endpoint_url="http://127.0.0.1:9")
    assert source.stamp() is not None and source.open().info["indexes"]

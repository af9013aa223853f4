"""The index follows the tables' logs in segments: each update writes a small exact segment and deletions, never
reads or rewrites the base, merges segments of similar size and rebuilds the base when the changes outgrow it.
After every update a search equals exact search over the table's current ok rows."""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import index.build as build
from index.build import build_from_output, exact_search
from index.commits import Committer, Planner, WrittenBatch
from index.delta_tables import OutputLocation, create_tables, table_schema, write_data_file
from index.schema import row_id_for, video_id_for
from index.segments import (
    INFO_FILE,
    IndexUnusableError,
    file_generation,
    open_index,
    parse_info,
    read_info,
    referenced_files,
    segments_of,
)
from index.service import OutputSource
from index.tables import data_files, local_copy, read_table, table_versions
from jobs.storage import open_store

DIM = 16
MODEL = "m@sha256:test"


def _rows(uris: list[str], rng: np.random.Generator, *, failed: bool = False) -> pa.Table:
    n = len(uris)
    ids = [video_id_for(u) for u in uris]
    emb = rng.normal(size=(n, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM)
    return pa.table(
        {
            "video_id": ids,
            "row_id": [row_id_for(v) for v in ids],
            "uri": uris,
            "etag": [uuid.uuid4().hex for _ in range(n)],
            "size_bytes": np.full(n, 1000),
            "duration_seconds": np.full(n, 3.0),
            "fps": np.full(n, 25.0),
            "width": np.full(n, 64, np.int32),
            "height": np.full(n, 48, np.int32),
            "codec": ["h264"] * n,
            "status": ["failed" if failed else "ok"] * n,
            "error_message": pa.array(["cannot decode" if failed else None] * n, pa.string()),
            "embedding": pa.nulls(n, embedding.type) if failed else embedding,
            "labels": [["a"]] * n,
            "label_scores": [[1.0]] * n,
            "thumbnail_jpeg": pa.nulls(n, pa.binary()),
            "model_id": [MODEL] * n,
            "run_id": ["test"] * n,
            "indexed_at": [datetime.now(timezone.utc)] * n,
            "attempts": np.ones(n, np.int32),
        }
    ).cast(table_schema("videos", DIM), safe=False)


def _commit(location: OutputLocation, data: pa.Table) -> None:
    """Commits video rows as a run does: planned against the table, old rows of the same videos replaced."""
    versions = table_versions(location)
    assert versions is not None
    uris = data.column("uri").to_pylist()
    etags = data.column("etag").to_pylist()
    planned = Planner(location, model_id=MODEL, versions=versions)(
        {"uri": np.asarray(uris, dtype=object), "etag": np.asarray(etags, dtype=object)}
    )
    assert len(planned["video_id"]) == len(uris)
    written = write_data_file(location, "videos", data, name=f"part-{uuid.uuid4().hex}.parquet", embed_dim=DIM)
    committer = Committer(location, model_id=MODEL, run_id=uuid.uuid4().hex, versions=versions)
    keys = tuple(zip(data.column("video_id").to_pylist(), etags, data.column("status").to_pylist(), strict=True))
    current = dict(zip(planned["video_id"].tolist(), planned["current_video_file"].tolist(), strict=True))
    committer.add(WrittenBatch.of(written, None, keys, current_video_files=current))
    committer.commit()


def _live(location: OutputLocation) -> tuple[np.ndarray, np.ndarray]:
    table = read_table(location, "videos", ["row_id", "embedding", "status"], model_id=MODEL)
    assert table is not None
    ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
    ids = ok.column("row_id").to_numpy()
    vectors = ok.column("embedding").combine_chunks().values.to_numpy().reshape(len(ids), DIM)
    return vectors, ids


def _check_search_is_exact(out: str | Path, location: OutputLocation, rng: np.random.Generator) -> None:
    vectors, ids = _live(location)
    index = open_index(out)
    assert index.count == len(ids)
    assert sorted(index.ids.tolist()) == sorted(ids.tolist())  # every live row once, nothing dead
    queries = rng.normal(size=(20, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = 10
    truth = ids[exact_search(vectors, queries, k)]
    scores, found = index.search(queries, k)
    assert found.tolist() == truth.tolist()
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # merged across segments by score


def _uris(start: int, count: int) -> list[str]:
    return [f"s3://archive/v/{i:06d}.mp4" for i in range(start, start + count)]


def _indexed_output(
    url: str, rows: int, rng: np.random.Generator, **store_options: Any
) -> tuple[OutputLocation, Any, dict[str, Any]]:
    """An output at `url` with `rows` committed videos and its index: (location, store, index_info)."""
    location = OutputLocation.from_url(url, s3_endpoint_url=store_options.get("endpoint_url"))
    create_tables(location, DIM, model_id=MODEL)
    _commit(location, _rows(_uris(0, rows), rng))
    store = open_store(url, **store_options)
    return location, store, build_from_output(store, model_id=MODEL)


def test_updates_add_segments_and_deletions_without_reading_the_base(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    out = tmp_path / "out"
    location, store, info = _indexed_output(str(out), 300, rng)
    entry = info["indexes"]["videos"]
    assert entry["rebuild_reason"] == "no index yet" and len(entry["segments"]) == 1
    base = entry["segments"][0]
    base_file = out / "index" / f"videos.{base['id']}.faiss"
    _check_search_is_exact(out, location, rng)

    next_uri, merged, previous, failed = 300, 0, info, set()
    for _step in range(10):
        new = _uris(next_uri, 5)
        next_uri += 5
        changed = [f"s3://archive/v/{i:06d}.mp4" for i in rng.choice(next_uri - 5, 3, replace=False)]
        _commit(location, pa.concat_tables([_rows(new, rng), _rows(changed[:2], rng)]))  # 5 new, 2 new versions
        _commit(location, _rows(changed[2:], rng, failed=True))  # a new version that failed: out of the index
        kept = base_file.read_bytes()
        base_file.write_bytes(b"not a FAISS index")  # the update must not read the base (it may see it is there)
        try:
            info = build_from_output(store, model_id=MODEL)
        finally:
            base_file.write_bytes(kept)
        entry = info["indexes"]["videos"]
        assert "rebuild_reason" not in entry, entry.get("rebuild_reason")
        assert entry["segments"][0] == base
        inc = entry["incremental"]
        back = len(set(changed[:2]) & failed)  # failed before, ok now: new to the index
        gone = len(set(changed[2:]) - failed)
        failed = (failed - set(changed[:2])) | set(changed[2:])
        assert (inc["added"], inc["removed"]) == (5 + back, gone) and inc["files_read"] >= 3, inc
        assert inc["updated"] == 2 - back and inc["moved"] > 0, inc  # the rewritten files' other rows stay put
        merged += inc["segments_merged"]
        assert len(entry["segments"]) <= 1 + 4, [s["count"] for s in entry["segments"]]  # merged, not piled up
        assert entry["deleted"]["count"] >= 1
        _check_search_is_exact(out, location, rng)
        present = {p.name for p in (out / "index").iterdir() if not p.name.startswith(".")}  # not the lock
        assert present - {INFO_FILE} <= referenced_files(info) | referenced_files(previous)  # superseded: deleted
        previous = info
    assert merged >= 3


def test_changes_past_a_fraction_of_the_base_rebuild_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    out = tmp_path / "out"
    location, store, previous = _indexed_output(str(out), 200, rng)
    monkeypatch.setattr(build, "DELTA_MIN_ROWS", 30)  # 25% of 200 = 50 changes allowed; 30 would be the floor
    _commit(location, _rows(_uris(200, 40), rng))
    previous = build_from_output(store, model_id=MODEL)
    entry = previous["indexes"]["videos"]
    assert "rebuild_reason" not in entry and len(entry["segments"]) == 2
    _commit(location, _rows(_uris(240, 20), rng))  # 60 rows since the base: more than 50
    info = build_from_output(store, model_id=MODEL)
    entry = info["indexes"]["videos"]
    assert "rows added or deleted since the base of 200" in entry["rebuild_reason"]
    assert len(entry["segments"]) == 1 and entry["segments"][0]["count"] == 260 and entry["deleted"] is None
    _check_search_is_exact(out, location, rng)
    present = {p.name for p in (out / "index").iterdir() if not p.name.startswith(".")}  # not the lock
    assert present - {INFO_FILE} <= referenced_files(info) | referenced_files(previous)


class _Watched:
    """A real store whose downloads are recorded."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.downloaded: list[str] = []

    def get_file(self, rel_path: str, target: Path) -> None:
        self.downloaded.append(rel_path)
        self._store.get_file(rel_path, target)

    def get_versioned(self, rel_path: str) -> Any:
        self.downloaded.append(rel_path)
        return self._store.get_versioned(rel_path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_s3_update_downloads_no_segment_it_does_not_merge(
    s3_server: str, s3_bucket: tuple[Any, str], tmp_path: Path
) -> None:
    rng = np.random.default_rng(2)
    client, bucket = s3_bucket
    url = f"s3://{bucket}/out"
    location, plain, info = _indexed_output(url, 100, rng, endpoint_url=s3_server)
    store = _Watched(plain)
    base_files = previous = referenced_files(info)
    for step in range(4):
        _commit(location, _rows(_uris(100 + 5 * step, 5), rng))
        store.downloaded.clear()
        info = build_from_output(store, model_id=MODEL)
        assert "rebuild_reason" not in info["indexes"]["videos"], info["indexes"]["videos"]["rebuild_reason"]
        names = {rel.rsplit("/", 1)[-1] for rel in store.downloaded}
        assert not names & base_files, names
        assert INFO_FILE in names
        listed = client.list_objects_v2(Bucket=bucket, Prefix="out/index/")["Contents"]
        keys = {o["Key"].rsplit("/", 1)[-1] for o in listed}
        assert keys - {INFO_FILE} <= referenced_files(info) | previous  # superseded files deleted
        previous = referenced_files(info)
    # The uploaded index opens and answers exactly from the readers' local copy of the output.
    folder = local_copy(url, s3_endpoint_url=s3_server, cache_root=str(tmp_path / "cache"))
    assert {p.name for p in (folder / "index").iterdir()} == referenced_files(info) | {INFO_FILE}  # not superseded
    assert read_info(folder / "index")["indexes"]["videos"]["count"] == 120
    _check_search_is_exact(folder, location, rng)
    # A later update: the copy follows it and drops the files it superseded; a service notices it.
    source = OutputSource(url, s3_endpoint_url=s3_server)
    before = source.stamp()
    _commit(location, _rows(_uris(200, 5), rng))
    info = build_from_output(store, model_id=MODEL)
    assert before is not None and source.stamp() not in (None, before)
    folder = local_copy(url, s3_endpoint_url=s3_server, cache_root=str(tmp_path / "cache"))
    assert read_info(folder / "index") == parse_info(plain.get_bytes(f"index/{INFO_FILE}"))
    assert all((folder / "index" / name).is_file() for name in referenced_files(info))
    _check_search_is_exact(folder, location, rng)
    # An output with no index (a missing bucket, a prefix never indexed) is named as such, not as the cache folder.
    for missing in (f"s3://{bucket}-missing/out", f"s3://{bucket}/never-indexed"):
        with pytest.raises(IndexUnusableError, match=f"no index at {missing} "):
            local_copy(missing, s3_endpoint_url=s3_server, cache_root=str(tmp_path / "cache"))


@pytest.mark.parametrize("updates", [1, 2])
def test_a_copy_made_while_updates_publish_is_one_whole_index(
    updates: int, s3_server: str, s3_bucket: tuple[Any, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service starting (or `vitaclip search`) while a nightly run publishes: the cache never pairs one update's
    info with another's files. With two updates during the copy, the first one's files are already removed."""
    import index.tables as tables_module

    rng = np.random.default_rng(8)
    url = f"s3://{s3_bucket[1]}/out"
    location, store, _ = _indexed_output(url, 60, rng, endpoint_url=s3_server)
    fetch, published = tables_module._fetch, []

    def publishing_meanwhile(filesystem: Any, path: str, target: Path) -> None:
        if "/index/" in path and not published:
            for step in range(updates):  # after the copy read the info it started from: rebuilds, new files
                _commit(location, _rows(_uris(60 + 5 * step, 5), rng))
                published.append(build_from_output(store, model_id=MODEL, rebuild=True))
        fetch(filesystem, path, target)

    monkeypatch.setattr(tables_module, "_fetch", publishing_meanwhile)
    folder = local_copy(url, s3_endpoint_url=s3_server, cache_root=str(tmp_path / "cache"))
    assert len(published) == updates
    copied = read_info(folder / "index")
    assert all((folder / "index" / name).is_file() for name in referenced_files(copied))
    # One update: the files of the info read first are still there (removed one update later): that index, whole.
    # Two: they were removed, and the copy started again from the newest.
    assert copied["indexes"]["videos"]["count"] == (60 if updates == 1 else 70)
    index = open_index(folder / "index", name="videos", model_id=MODEL)
    assert index.count == copied["indexes"]["videos"]["count"]
    if updates == 2:
        _check_search_is_exact(folder, location, rng)


def test_the_cache_follows_the_output_s_run_records_and_endpoint(
    s3_server: str, s3_bucket: tuple[Any, str], tmp_path: Path
) -> None:
    """Run records name the folders whose files the service serves: one deleted from the output leaves the cache
    too, and a bucket of the same name on another server never shares a cache folder with this one."""
    client, bucket = s3_bucket
    info = {"format_version": 4, "indexes": {}}
    client.put_object(Bucket=bucket, Key="out/index/index_info.json", Body=json.dumps(info).encode())
    for run in ("r1", "r2"):
        client.put_object(Bucket=bucket, Key=f"out/runs/{run}.json", Body=b'{"input_roots": ["/srv/videos"]}')
    url, cache = f"s3://{bucket}/out", str(tmp_path / "cache")
    folder = local_copy(url, s3_endpoint_url=s3_server, cache_root=cache, tables=False)
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["r1.json", "r2.json"]
    client.delete_object(Bucket=bucket, Key="out/runs/r1.json")
    assert local_copy(url, s3_endpoint_url=s3_server, cache_root=cache, tables=False) == folder
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["r2.json"]
    other = local_copy(url, s3_endpoint_url=s3_server.replace("127.0.0.1", "localhost"), cache_root=cache, tables=False)
    assert other != folder


def test_an_update_on_an_object_store_clears_the_scratch_of_updates_that_died(
    s3_server: str, s3_bucket: tuple[Any, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3 output's index files pass through a local folder; an update killed there (kill -9, an OOM kill) left it
    in the temporary folder for good, a whole base index for a rebuild. The next update on the machine removes those
    of processes no longer running, once untouched for 15 minutes, and its own when it ends."""
    import subprocess
    import sys
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    (tmp_path / "tmp").mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    folders = {
        "dead, old": tmp_path / "tmp" / f"vitaclip-index-{dead}-abc",
        "dead, fresh": tmp_path / "tmp" / f"vitaclip-index-{dead}-def",
        "running, old": tmp_path / "tmp" / f"vitaclip-index-{os.getpid()}-ghi",
    }
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "videos.000000-a.faiss").write_bytes(b"x" * 100)
        if name.endswith("old"):
            old = folder.stat().st_mtime - 16 * 60
            os.utime(folder, (old, old))
    _indexed_output(f"s3://{s3_bucket[1]}/out", 20, np.random.default_rng(5), endpoint_url=s3_server)
    assert {name: folder.exists() for name, folder in folders.items()} == {
        "dead, old": False, "dead, fresh": True, "running, old": True
    }  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == sorted(f.name for f in list(folders.values())[1:])


def test_partial_copies_abandoned_by_a_killed_copier_leave_the_cache(
    s3_server: str, s3_bucket: tuple[Any, str], tmp_path: Path
) -> None:
    """A service stopped mid-copy (SIGTERM while its reload thread copies a base index of GiB, or kill -9) left
    ``.NAME.<pid>.<x>.partial`` for ever: no later copy has its name. Untouched for 15 minutes, it goes at the next
    copy; one being written (touched at every 8 MiB) stays, whichever process writes it."""
    client, bucket = s3_bucket
    info = {"format_version": 4, "indexes": {}}
    client.put_object(Bucket=bucket, Key="out/index/index_info.json", Body=json.dumps(info).encode())
    client.put_object(Bucket=bucket, Key="out/runs/r1.json", Body=b'{"input_roots": ["/srv/videos"]}')
    url, cache = f"s3://{bucket}/out", str(tmp_path / "cache")
    folder = local_copy(url, s3_endpoint_url=s3_server, cache_root=cache, tables=False)
    partials = {}
    for sub in ("index", "runs"):
        for age in ("old", "fresh"):
            partial = folder / sub / f".videos.000000-{age}.faiss.4242.0123abcd.partial"
            partial.write_bytes(b"cut short")
            partials[sub, age] = partial
        old = partials[sub, "old"].stat().st_mtime - 16 * 60
        os.utime(partials[sub, "old"], (old, old))
    assert local_copy(url, s3_endpoint_url=s3_server, cache_root=cache, tables=False) == folder
    assert {key: path.exists() for key, path in partials.items()} == {
        ("index", "old"): False, ("index", "fresh"): True, ("runs", "old"): False, ("runs", "fresh"): True
    }  # fmt: skip


def test_a_key_with_dot_segments_never_leaves_the_cache(
    s3_server: str, s3_bucket: tuple[Any, str], tmp_path: Path, caplog
) -> None:
    """Whoever can write to the output's bucket can make a key such as ``out/index/../../x``; copied as it is named,
    it would land outside the output's cache folder (clients collapse the dots, so it reads the bucket's ``x``)."""
    client, bucket = s3_bucket
    info = {"format_version": 4, "indexes": {"videos": {"segments": [], "deleted": {"file": "../../escaped"}}}}
    client.put_object(Bucket=bucket, Key="out/index/index_info.json", Body=json.dumps(info).encode())
    client.put_object(Bucket=bucket, Key="out/index/../../escaped", Body=b"outside")
    client.put_object(Bucket=bucket, Key="escaped", Body=b"outside")
    with caplog.at_level("WARNING", logger="index.tables"):
        folder = local_copy(f"s3://{bucket}/out", s3_endpoint_url=s3_server, cache_root=str(tmp_path), tables=False)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        f"{folder.name}/index/index_info.json"
    ]
    assert "index/../../escaped" in caplog.text  # named by the info: left out, and said


def test_index_files_that_are_broken_or_named_outside_say_so(tmp_path: Path) -> None:
    """Whoever can write to an output can break its index files or point ``index_info.json`` elsewhere: opening it
    says which file and how to rebuild, never a FAISS trace, and never reads outside the index folder."""
    out = tmp_path / "out"
    _indexed_output(str(out), 30, np.random.default_rng(3))
    info_path = out / "index" / INFO_FILE
    info = json.loads(info_path.read_text())
    (faiss_file,) = (out / "index").glob("videos.*.faiss")
    saved = faiss_file.read_bytes()
    for broken in (b"", b"not an index" * 10, saved[: len(saved) // 2]):
        faiss_file.write_bytes(broken)
        with pytest.raises(IndexUnusableError, match=rf"index file {faiss_file.stem} cannot be read .*--rebuild"):
            open_index(out)
    faiss_file.write_bytes(saved)
    assert open_index(out).count == 30
    outside = tmp_path / "elsewhere.npy"
    np.save(outside, np.zeros((0, 2), np.int64))
    for bad in (str(outside), "../elsewhere.npy"):
        info["indexes"]["videos"]["deleted"] = {"file": bad}
        info_path.write_text(json.dumps(info))
        with pytest.raises(IndexUnusableError, match="outside the index folder"):
            open_index(out)


def test_two_updates_at_once_leave_a_whole_index(tmp_path: Path) -> None:
    """Two runs finishing together update one index: whichever info lands last, every file it names exists."""
    import threading

    rng = np.random.default_rng(3)
    out = tmp_path / "out"
    location, _, _ = _indexed_output(str(out), 100, rng)
    for round_ in range(6):
        _commit(location, _rows(_uris(100 + 4 * round_, 4), rng))
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def update(barrier: threading.Barrier = barrier, errors: list[BaseException] = errors) -> None:
            barrier.wait()
            try:
                build_from_output(open_store(str(out)), model_id=MODEL)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=update) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        info = read_info(out / "index")
        assert all((out / "index" / f).is_file() for f in referenced_files(info))
        _check_search_is_exact(out, location, rng)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_update_overtaken_by_two_others_starts_again_from_theirs(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """A slow update A (read generation g) publishes after B (g+1) and C (g+2, which removed what neither it nor B
    names: A's new files among them). A gives way and updates again from C's index: nothing it names is missing."""
    rng = np.random.default_rng(5)
    if where == "s3":
        endpoint = request.getfixturevalue("s3_server")
        _, bucket = request.getfixturevalue("s3_bucket")
        url, options = f"s3://{bucket}/out", {"endpoint_url": endpoint}
    else:
        url, options = str(tmp_path / "out"), {}
    location, _, _ = _indexed_output(url, 200, rng, **options)
    _commit(location, _rows(_uris(200, 5), rng))
    publish, published = build._publish, []

    def overtaken(*args: Any, **kwargs: Any) -> int | None:
        if not published:
            published.append("A waits")
            build_from_output(open_store(url, **options), model_id=MODEL)  # B
            _commit(location, _rows(_uris(205, 5), rng))
            build_from_output(open_store(url, **options), model_id=MODEL)  # C
        result = publish(*args, **kwargs)
        published.append(result)
        return result

    monkeypatch.setattr(build, "_publish", overtaken)
    info = build_from_output(open_store(url, **options), model_id=MODEL)  # A
    # B and C published; A gave way once, then published from C's index.
    assert [r is None for r in published[1:]] == [False, False, True, False]
    store = open_store(url, **options)
    assert parse_info(store.get_bytes(f"index/{INFO_FILE}")) == {k: v for k, v in info.items() if k != "removed_files"}
    assert all(store.exists(f"index/{name}") for name in referenced_files(info))
    assert info["indexes"]["videos"]["count"] == 210 and "rebuild_reason" not in info["indexes"]["videos"]
    folder = local_copy(url, s3_endpoint_url=options.get("endpoint_url"), cache_root=str(tmp_path / "cache"))
    _check_search_is_exact(folder, location, rng)


def _index_files(out: Path) -> set[str]:
    """The index files in an output's index folder (not the info, nor the hidden lock)."""
    return {p.name for p in (out / "index").iterdir() if p.name != INFO_FILE and not p.name.startswith(".")}


def test_a_damaged_info_file_is_rebuilt_whole_with_the_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    out = tmp_path / "out"
    location, store, _ = _indexed_output(str(out), 50, rng)
    good = json.loads((out / "index" / INFO_FILE).read_bytes())
    # A writer killed mid-write on a store without atomic writes; JSON of another shape (edited by hand).
    damaged: list[Any] = [b"", {"indexes": None}, {"indexes": {"videos": None}}, {"table_versions": None}]
    damaged += [{"table_ids": []}, {"generation": "x"}, {"table_versions": {"videos": "1"}}]
    for damage in damaged:
        data = damage if isinstance(damage, bytes) else json.dumps({**good, **damage}).encode()
        (out / "index" / INFO_FILE).write_bytes(data)
        with pytest.raises(IndexUnusableError, match="damaged"):
            read_info(out / "index")
        files_before = _index_files(out)
        info = build_from_output(store, model_id=MODEL)
        entry = info["indexes"]["videos"]
        assert "damaged" in entry["rebuild_reason"] and entry["count"] == 50, damage
        # The files the damaged info named are gone (numbered past them, the new ones are newer): none pile up.
        assert _index_files(out) == referenced_files(info), damage
        assert min(file_generation(name) for name in referenced_files(info)) > max(
            file_generation(name) for name in files_before
        )
    (out / "index" / INFO_FILE).unlink()  # deleted by hand: the same
    info = build_from_output(store, model_id=MODEL)
    assert _index_files(out) == referenced_files(info)
    _check_search_is_exact(out, location, rng)


def test_index_files_gone_from_under_the_info_are_rebuilt_not_followed(tmp_path: Path) -> None:
    """A segment file deleted by hand or lost in a partial restore: an update that followed the log would publish
    an info naming it again (every search failing while runs succeed); it builds whole instead, and says why."""
    rng = np.random.default_rng(7)
    out = tmp_path / "out"
    location, store, _ = _indexed_output(str(out), 40, rng)
    _commit(location, _rows(_uris(40, 5), rng))
    build_from_output(store, model_id=MODEL)  # a base and one delta segment
    info = read_info(out / "index")
    lost = f"videos.{segments_of(info['indexes']['videos'])[-1].id}.faiss"
    (out / "index" / lost).unlink()
    _commit(location, _rows(_uris(45, 5), rng))
    info = build_from_output(store, model_id=MODEL)
    entry = info["indexes"]["videos"]
    assert f"index files that {INFO_FILE} names are missing ({lost})" in entry["rebuild_reason"]
    assert entry["count"] == 50 and all((out / "index" / name).is_file() for name in referenced_files(info))
    _check_search_is_exact(out, location, rng)
    info = build_from_output(store, model_id=MODEL)  # whole again: the next update follows the log
    assert "rebuild_reason" not in info["indexes"]["videos"]


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_deleted_ids_never_come_back_from_any_kind(tmp_path: Path, kind: str) -> None:
    """Each base kind takes the deletions through search parameters of its own type (IVF keeps its nprobe, HNSW its
    efSearch), so deleted ids are skipped and recall over the live ones holds."""
    from index.segments import write_deleted, write_info

    rng = np.random.default_rng(4)
    data = rng.normal(size=(3000, 32)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    ids = np.arange(10**9, 10**9 + 3000, dtype=np.int64)
    build.build_index(data, ids, tmp_path, kind=kind, model_id=MODEL, tune_queries=data[:50])
    info = read_info(tmp_path)
    entry = info["indexes"]["videos"]
    dead = ids[::3]
    entry.update(
        generation=1,
        deleted={"file": write_deleted(tmp_path, "videos", 1, np.stack([dead, np.ones_like(dead)], 1)), "count": 1000},
        count=2000,
    )
    write_info(tmp_path, info)
    index = open_index(tmp_path)
    _, found = index.search(data[:200], 10)
    assert not np.isin(found, dead).any()
    live = ~np.isin(ids, dead)
    truth = ids[live][exact_search(data[live], data[:200], 10)]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.9, (kind, recall)


def test_tables_created_again_are_indexed_whole_never_followed(tmp_path: Path) -> None:
    """Tables deleted and created again (the index kept) start their versions over: an index that followed the new
    log from the old version numbers would keep the old rows for ever. The table's Delta id says it is new."""
    import shutil

    rng = np.random.default_rng(3)
    out = tmp_path / "out"
    location, store, _ = _indexed_output(str(out), 40, rng)
    for i in range(3):
        _commit(location, _rows(_uris(100 + 10 * i, 5), rng))
    assert build_from_output(store, model_id=MODEL)["table_versions"]["videos"] == 4
    for table in ("videos", "segments"):
        shutil.rmtree(out / table)
    create_tables(location, DIM, model_id=MODEL)
    _commit(location, _rows(_uris(500, 12), rng))  # version 1: behind the indexed version 4
    entry = build_from_output(store, model_id=MODEL)["indexes"]["videos"]
    assert "created again" in entry["rebuild_reason"] and entry["count"] == 12
    _check_search_is_exact(out, location, rng)
    for i in range(5):  # past the old version numbers: still the new table's rows only
        _commit(location, _rows(_uris(600 + 10 * i, 3), rng))
    entry = build_from_output(store, model_id=MODEL)["indexes"]["videos"]
    assert "rebuild_reason" not in entry and entry["count"] == 27
    _check_search_is_exact(out, location, rng)


def test_an_analysts_table_settings_are_followed_and_a_column_change_is_refused(tmp_path: Path) -> None:
    """Every metadata commit made the next update build whole (and train again), even one that only set
    ``delta.checkpointInterval`` or turned deletion vectors on. Only the columns, partitioning, the table's id and
    vitaclip's properties decide how rows read."""
    from deltalake import DeltaTable
    from deltalake.schema import Field as DeltaField

    rng = np.random.default_rng(11)
    out = tmp_path / "out"
    location, store, first = _indexed_output(str(out), 40, rng)
    videos = DeltaTable(location.table_uri("videos"))
    videos.alter.set_table_properties({"delta.checkpointInterval": "5", "delta.dataSkippingNumIndexedCols": "8"})
    videos.alter.set_table_properties({"delta.enableDeletionVectors": "true"})  # a protocol upgrade too
    _commit(location, _rows(_uris(100, 6), rng))
    entry = build_from_output(store, model_id=MODEL)["indexes"]["videos"]
    assert "rebuild_reason" not in entry, entry.get("rebuild_reason")
    assert entry["count"] == first["indexes"]["videos"]["count"] + 6
    _check_search_is_exact(out, location, rng)

    # A property change whose table version before it is no longer in the log (a checkpoint, then log cleanup):
    # nothing to compare with, built whole saying why.
    videos = DeltaTable(location.table_uri("videos"))
    videos.alter.set_table_properties({"delta.logRetentionDuration": "interval 0 days"})
    DeltaTable(location.table_uri("videos")).create_checkpoint()
    DeltaTable(location.table_uri("videos")).cleanup_metadata()
    _commit(location, _rows(_uris(200, 2), rng))
    entry = build_from_output(store, model_id=MODEL)["indexes"]["videos"]
    assert "cannot be read to compare (its log was cleaned up)" in entry["rebuild_reason"]
    assert entry["count"] == first["indexes"]["videos"]["count"] + 8
    _check_search_is_exact(out, location, rng)

    DeltaTable(location.table_uri("videos")).alter.add_columns([DeltaField.from_arrow(pa.field("note", pa.string()))])
    with pytest.raises(ValueError, match=r"columns differ .*\(added: note\)"):
        build_from_output(store, model_id=MODEL)  # refused before anything is built; the index stays as it was


def test_rows_another_writer_appends_are_never_indexed_twice(tmp_path: Path) -> None:
    """An analyst's compaction or delete rewrites rows: the update follows it. An append may hold copies of indexed
    rows (in segments the update does not read): each id was indexed twice and the count overstated the vectors
    until a rebuild. The update builds whole, saying why."""
    from deltalake import DeltaTable, write_deltalake

    rng = np.random.default_rng(12)
    out = tmp_path / "out"
    location, store, first = _indexed_output(str(out), 40, rng)
    table = DeltaTable(location.table_uri("videos"))
    table.optimize.compact()
    table.delete(f"video_id = '{video_id_for(_uris(0, 1)[0])}'")
    entry = build_from_output(store, model_id=MODEL)["indexes"]["videos"]
    assert "rebuild_reason" not in entry and entry["count"] == 39, entry
    rows = DeltaTable(location.table_uri("videos")).to_pyarrow_table()
    write_deltalake(location.table_uri("videos"), rows.slice(0, 10), mode="append")  # copies of 10 indexed rows
    entry = build_from_output(store, model_id=MODEL)["indexes"]["videos"]
    assert "10 rows were added by another writer than the job" in entry["rebuild_reason"], entry
    assert entry["count"] == 39
    index = open_index(out)
    assert index.count == 39
    _, ids = index.search(np.asarray(rows.column("embedding")[0].as_py(), dtype=np.float32), 39)
    assert len(set(ids[0].tolist())) == 39  # every id once


def test_storage_failing_on_a_removed_file_fails_the_update_and_the_next_one_follows_the_log(tmp_path: Path) -> None:
    """Only a file that is gone (vacuumed) makes the update build whole; storage failing after its retries fails
    this update, leaves the index as it was, and the next update follows the log as if nothing had happened."""
    rng = np.random.default_rng(8)
    out = tmp_path / "out"
    location, store, first = _indexed_output(str(out), 40, rng)
    replaced = _rows(_uris(0, 5), rng)  # new versions of five indexed videos: their old file is rewritten
    _commit(location, replaced)
    referenced = set(data_files(location, "videos"))
    removed = [p for p in (out / "videos").glob("*.parquet") if p.name not in referenced]
    assert len(removed) == 1
    kept = removed[0].read_bytes()
    removed[0].unlink()
    removed[0].mkdir()  # read as a file: an OSError that is not FileNotFoundError, as from a store failing
    info_before = (out / "index" / INFO_FILE).read_bytes()

    with pytest.raises(OSError, match="directory"):
        build_from_output(store, model_id=MODEL)
    assert (out / "index" / INFO_FILE).read_bytes() == info_before  # the index is as it was

    removed[0].rmdir()
    removed[0].write_bytes(kept)
    info = build_from_output(store, model_id=MODEL)
    entry = info["indexes"]["videos"]
    assert "rebuild_reason" not in entry, entry.get("rebuild_reason")
    assert entry["incremental"]["updated"] == 5 and entry["count"] == first["indexes"]["videos"]["count"]
    _check_search_is_exact(out, location, rng)


def test_a_damaged_removed_file_makes_the_update_build_whole_with_the_reason(tmp_path: Path) -> None:
    """A removed data file that is no Parquet any more (damaged on storage) cannot say which ids it held: the update
    builds whole from the live files instead of failing every run until vacuum removes it."""
    rng = np.random.default_rng(9)
    out = tmp_path / "out"
    location, store, first = _indexed_output(str(out), 40, rng)
    _commit(location, _rows(_uris(0, 5), rng))
    referenced = set(data_files(location, "videos"))
    removed = [p for p in (out / "videos").glob("*.parquet") if p.name not in referenced]
    assert len(removed) == 1
    removed[0].write_bytes(b"not parquet any more" * 50)

    info = build_from_output(store, model_id=MODEL)
    entry = info["indexes"]["videos"]
    assert "is not readable Parquet" in entry["rebuild_reason"] and "incremental" not in entry
    assert entry["count"] == first["indexes"]["videos"]["count"]
    _check_search_is_exact(out, location, rng)


def test_an_index_file_that_cannot_be_written_is_an_os_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """faiss reports a failed write as a RuntimeError with a C++ location; the update says which file and why, as
    an OSError (one line from the CLI), and the published index stays as it was."""
    from index import segments

    rng = np.random.default_rng(8)
    out = tmp_path / "out"
    location, store, before = _indexed_output(str(out), 20, rng)
    _commit(location, _rows(_uris(100, 3), rng))
    monkeypatch.setattr(segments, "new_file_id", lambda generation: f"{generation:06d}-blocked")
    for generation in range(10):
        (out / "index" / f"videos.{generation:06d}-blocked.faiss").mkdir()  # where the new segment would go
    with pytest.raises(OSError, match=r"cannot write the index file .*videos\.0+\d-blocked\.faiss: .*directory"):
        build_from_output(store, model_id=MODEL)
    assert read_info(out / "index") == {k: v for k, v in before.items() if k != "removed_files"}


_FULL_DISK_BUILD = """
import resource, signal, sys
from index.build import build_from_output
from jobs.storage import open_store
store = open_store(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # as a full disk: no file grows past 4 KiB
try:
    build_from_output(store, model_id=sys.argv[2])
except OSError as exc:
    print(exc)
"""


def test_an_index_file_cut_short_by_a_full_disk_is_removed_and_said_in_one_line(tmp_path: Path) -> None:
    """A segment whose FAISS file cannot be written whole (a full disk; here the kernel's file size limit) leaves no
    partial file, the error is the system's reason rather than faiss's C++ trace, and the index stays as it was."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(9)
    out = tmp_path / "out"
    location, _, before = _indexed_output(str(out), 20, rng)
    _commit(location, _rows(_uris(100, 100), rng))  # 100 vectors of 16 floats: a 6.4 kB segment
    files_before = sorted(p.name for p in (out / "index").iterdir())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_BUILD, str(out), MODEL], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout.strip()
    assert said.startswith("cannot write the index file ") and said.endswith(": File too large"), said
    assert sorted(p.name for p in (out / "index").iterdir()) == files_before
    assert read_info(out / "index") == {k: v for k, v in before.items() if k != "removed_files"}


def test_searching_the_index_in_process_refuses_what_faiss_would_not(tmp_path: Path) -> None:
    """`open_index(OUT).search` asked FAISS for k results per query whatever the count (k=10**9 on 15 vectors
    ended the process), took a 3-D array as the wrong dimension and answered NaN queries with ids of -1."""
    _indexed_output(str(tmp_path / "out"), 15, np.random.default_rng(3))
    index = open_index(tmp_path / "out")
    query = np.ones((1, DIM), np.float32) / np.sqrt(DIM)
    scores, ids = index.search(query, 10**9)
    assert scores.shape == ids.shape == (1, 15) and sorted(ids[0].tolist()) == sorted(index.ids.tolist())
    assert index.search(query, 3)[1].shape == (1, 3)
    with pytest.raises(ValueError, match="one vector or a"):
        index.search(np.ones((2, 1, DIM), np.float32), 3)
    with pytest.raises(ValueError, match="NaN or infinity"):
        index.search(np.full((1, DIM), np.nan, np.float32), 3)

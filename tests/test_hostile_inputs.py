"""Odd and hostile inputs, end to end: a folder full of traps through the real job, then the search service.

One job run (tiny model, embedded Ray) covers the listing traps (each becomes a row with a status, the run commits)
and gives the service an output whose media requests are attacked: symlinks out of the input folder, files replaced
after indexing, header injection through file names.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from local_ray import start_local_ray

from index import tables
from index.media import MediaRefused, MediaRoots, open_media, recorded_roots
from index.schema import local_etag, video_id_for
from index.search import SearchEngine
from index.service import SearchService, serving
from jobs.decode_embed import ReadDecode
from jobs.index_videos import main as job_main
from jobs.storage import list_videos
from vitaclip.samples import write_sample_video

LONG_NAME = "l" * 251 + ".mp4"  # 255 bytes, the most most file systems allow
CRLF_NAME = "crlf\r\nX-Injected: yes.mp4"
BAD_NAME = os.fsdecode(b"bad\xff\xfename.mp4")  # not valid UTF-8


def _local_path(uri: str) -> str:
    """A row's local path; a name that is not UTF-8 is in a ``file://`` URI, its bytes %-escaped."""
    return os.fsdecode(urllib.parse.unquote_to_bytes(uri.removeprefix("file://"))) if uri.startswith("file:") else uri


def _video(path: Path, seed: int) -> Path:
    return write_sample_video(path, num_frames=24, fps=12, width=64, height=48, pattern="shape", seed=seed)


@pytest.fixture(scope="module")
def traps(tmp_path_factory) -> dict[str, Any]:
    """A folder of traps, indexed once by the real job; returns paths and the committed rows by file name."""
    root = tmp_path_factory.mktemp("traps")
    src = root / "in"
    src.mkdir()
    _video(src / "plain.mp4", 1)
    _video(src / "later.mp4", 2)
    _video(src / "swapped.mp4", 3)
    _video(src / "-dash.mp4", 4)
    _video(src / LONG_NAME, 5)
    _video(src / CRLF_NAME, 6)
    (src / "x.mp4").mkdir()  # a folder with a video name: walked, not read
    _video(src / "x.mp4" / "inner.mp4", 7)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    _video(elsewhere / "real.mp4", 8)
    os.symlink(elsewhere / "real.mp4", src / "outside.mp4")  # would decode fine, but lies outside the input folder
    os.symlink("/etc/passwd", src / "passwd.mp4")
    os.symlink(src / "plain.mp4", src / "alias.mp4")  # a link inside the folder is followed
    os.symlink("loop.mp4", src / "loop.mp4")
    os.symlink("missing.mp4", src / "dangling.mp4")
    os.mkfifo(src / "fifo.mp4")  # a decoder would block on it forever
    _video(root / "tmp.mp4", 9)
    os.rename(root / "tmp.mp4", os.fsencode(src) + b"/bad\xff\xfename.mp4")  # not valid UTF-8

    out = root / "out"
    start_local_ray()
    try:
        rc = job_main([str(src), "--output", str(out), "--model", "vitaclip-tiny", "--random-weights"])
    finally:
        ray.shutdown()
    assert rc == 0
    table = tables.read_table(out, "videos")
    assert table is not None
    rows = {os.path.relpath(_local_path(r["uri"]), src): r for r in table.to_pylist()}
    return {"root": root, "src": src, "out": out, "rows": rows, "elsewhere": elsewhere}


def test_every_odd_entry_is_a_row_with_a_status_and_the_run_commits(traps: dict[str, Any]) -> None:
    rows = traps["rows"]
    expected = {
        "plain.mp4": "ok",
        "later.mp4": "ok",
        "swapped.mp4": "ok",
        "-dash.mp4": "ok",
        LONG_NAME: "ok",
        CRLF_NAME: "ok",
        "x.mp4/inner.mp4": "ok",
        "outside.mp4": "outside_folder",
        "alias.mp4": "ok",
        "passwd.mp4": "outside_folder",
        "loop.mp4": "broken_link",
        "dangling.mp4": "broken_link",
        "fifo.mp4": "not_a_file",
        BAD_NAME: "invalid_name",
    }
    assert {name: r["status"] for name, r in rows.items()} == expected
    for name, row in rows.items():
        if row["status"] != "ok":
            assert row["error_message"] and row["embedding"] is None, name
    assert "symbolic link loop" in rows["loop.mp4"]["error_message"]
    assert "not valid UTF-8: " in rows[BAD_NAME]["error_message"]
    assert rows[BAD_NAME]["uri"] == f"file://{traps['src']}/bad%FF%FEname.mp4"
    summary_files = list((traps["out"] / "runs").glob("*.json"))
    summary = json.loads(summary_files[0].read_text())
    assert summary["state"] == "committed" and summary["status"]["ok"] == 8
    assert summary["input_roots"] == [os.path.realpath(traps["src"])] and summary["input_file_dirs"] == []


def test_a_file_deleted_between_listing_and_reading_is_a_row(tmp_path: Path) -> None:
    _video(tmp_path / "gone.mp4", 1)
    listed = list(list_videos([str(tmp_path)]))
    (tmp_path / "gone.mp4").unlink()
    stage = ReadDecode(num_frames=2, size=32, s3_endpoint_url=None, whole_object_max_bytes=1 << 20)
    import numpy as np

    batch = {
        "uri": np.asarray([v.uri for v in listed], dtype=object),
        "etag": np.asarray([v.etag for v in listed], dtype=object),
        "size_bytes": np.asarray([v.size_bytes for v in listed]),
    }
    (out,) = stage(batch)  # the job's stage yields its rows in batches of whole videos
    assert list(out["status"]) == ["not_found"]
    assert str(out["error_message"][0]) == f"no file at {tmp_path / 'gone.mp4'}"


# ----------------------------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def service(traps: dict[str, Any]) -> Iterator[tuple[str, int]]:
    with serving(SearchService({"traps": SearchEngine(traps["out"])})) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


def _request(service: tuple[str, int], path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*service, timeout=30)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _media(traps: dict[str, Any], name: str) -> str:
    return "/media/" + traps["rows"][name]["video_id"]


def test_media_serves_the_indexed_file_streamed(traps: dict[str, Any], service: tuple[str, int]) -> None:
    status, headers, body = _request(service, _media(traps, "plain.mp4"))
    data = (traps["src"] / "plain.mp4").read_bytes()
    assert status == 200 and body == data and headers["content-length"] == str(len(data))
    assert headers["content-type"] == "video/mp4" and headers["etag"] and headers["last-modified"]
    status, headers, body = _request(service, _media(traps, "plain.mp4"), method="HEAD")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(data))


def test_media_refuses_what_was_not_indexed_as_a_video(traps: dict[str, Any], service: tuple[str, int]) -> None:
    status, headers, body = _request(service, _media(traps, "passwd.mp4"))
    # Answered as an id that names nothing: whether a guessed path was listed is not told (ids are URI hashes).
    assert status == 404 and b"root:" not in body and json.loads(body)["reason"] == "not_indexed"
    status, _, body = _request(service, _media(traps, "passwd.mp4").replace("/media/", "/videos/"))
    assert status == 404 and b"passwd" not in body  # nor is its row (path, size, time) given out
    assert _request(service, "/media/" + video_id_for("/etc/passwd"))[0] == 404
    assert _request(service, "/media/..%2F..%2Fetc%2Fpasswd")[0] == 404


def test_symlinks_out_of_the_input_folder_are_never_read(traps: dict[str, Any], service: tuple[str, int]) -> None:
    """Whoever can write a link into an input folder cannot have other files indexed, or their thumbnails served."""
    rows = traps["rows"]
    for name in ("outside.mp4", "passwd.mp4"):
        row = rows[name]
        assert row["thumbnail_jpeg"] is None and row["duration_seconds"] is None and row["size_bytes"] < 0, name
        assert "--follow-outside-symlinks" in row["error_message"]
        assert _request(service, f"/thumbnails/{row['row_id']}.jpg")[0] == 404
    status, _, body = _request(service, _media(traps, "outside.mp4"))
    assert status == 404 and json.loads(body)["reason"] == "not_indexed"
    assert str(traps["elsewhere"]).encode() not in body  # no server paths in refusals
    assert _request(service, _media(traps, "alias.mp4"))[0] == 200


def test_media_refuses_a_video_replaced_after_indexing(traps: dict[str, Any], service: tuple[str, int]) -> None:
    later = traps["src"] / "later.mp4"
    later.unlink()
    os.symlink("/etc/passwd", later)  # replaced by a symlink out of the folder
    status, _, body = _request(service, _media(traps, "later.mp4"))
    assert status == 403 and b"root:" not in body
    swapped = traps["src"] / "swapped.mp4"
    swapped.unlink()
    os.symlink(traps["src"] / "plain.mp4", swapped)  # replaced by another file inside the folder
    status, _, body = _request(service, _media(traps, "swapped.mp4"))
    assert status == 410 and json.loads(body)["reason"] == "changed"


def test_file_names_never_reach_headers(traps: dict[str, Any], service: tuple[str, int]) -> None:
    status, headers, body = _request(service, _media(traps, CRLF_NAME))
    assert status == 200 and body == (traps["src"] / CRLF_NAME).read_bytes()
    assert "x-injected" not in headers and "location" not in headers
    for name in (LONG_NAME, "-dash.mp4", "x.mp4/inner.mp4"):
        assert _request(service, _media(traps, name))[0] == 200


# ----------------------------------------------------------------------------------------- the check itself


def _row(path: Path, status: str = "ok") -> dict[str, Any]:
    st = path.stat()
    return {"uri": str(path), "status": status, "etag": local_etag(st), "size_bytes": st.st_size}


def test_open_media_rules(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    video = _video(root / "v.mp4", 1)
    roots = MediaRoots(folders=(os.path.realpath(root),))
    media = open_media(_row(video), roots)
    with media.file as f:
        assert f.read() == video.read_bytes() and media.size_bytes == video.stat().st_size

    def refused(row: dict[str, Any], which: MediaRoots = roots) -> MediaRefused:
        with pytest.raises(MediaRefused) as info:
            open_media(row, which).close()
        return info.value

    assert refused(_row(video), MediaRoots()).reason == "outside_roots"  # nothing recorded: nothing served
    assert refused(_row(video, "not_a_video")).reason == "not_ok"
    assert refused({"uri": "s3://bucket/v.mp4", "status": "ok", "etag": "x", "size_bytes": 1}).reason == "remote"
    assert refused({"uri": "relative/v.mp4", "status": "ok"}).reason == "not_local"
    row = _row(video)
    video.write_bytes(video.read_bytes() + b"\0")  # changed since indexing
    assert refused(row).reason == "changed" and refused(row).http_status == 410
    fifo = root / "f.mp4"
    os.mkfifo(fifo)
    fifo_row = {"uri": str(fifo), "status": "ok", "etag": local_etag(fifo.stat()), "size_bytes": 0}
    assert refused(fifo_row).reason == "not_a_file"  # refused at once, not blocked on
    assert refused(_row(video) | {"uri": str(root / "missing.mp4")}).reason == "missing"
    # A root recorded through a symlinked folder still matches the resolved file.
    link_root = tmp_path / "link"
    os.symlink(root, link_root)
    open_media(_row(link_root / "v.mp4"), MediaRoots(folders=(os.path.realpath(link_root),))).close()
    # A file listed on its own allows its folder, not the folder's subfolders.
    (root / "sub").mkdir()
    deeper = _video(root / "sub" / "w.mp4", 2)
    flat = MediaRoots(file_dirs=(os.path.realpath(root),))
    open_media(_row(video), flat).close()
    assert refused(_row(deeper), flat).reason == "outside_roots"


def test_a_folder_swapped_for_a_link_while_media_is_looked_up_is_a_refusal(tmp_path: Path) -> None:
    """A deploy that swaps a folder on an indexed path for a symlink (``mv -T``), over and over while ``/media`` is
    asked for the file: each request is served or refused (`MediaRefused`), never an OSError (a 500) from resolving
    the path halfway through the swap, and never the other folder's file."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    video = _video(root / "sub" / "x.mp4", 1)
    _video(elsewhere / "x.mp4", 2)
    row, roots = _row(video), MediaRoots(folders=(os.path.realpath(root),))
    expected = video.read_bytes()
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(root / "sub", root / "sub.real")
            os.symlink(elsewhere, root / "sub")
            os.unlink(root / "sub")
            os.rename(root / "sub.real", root / "sub")

    swapping = threading.Thread(target=swap)
    swapping.start()
    outcomes: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                with open_media(row, roots).file as f:
                    assert f.read() == expected  # the indexed file, never the other folder's
                outcome = "served"
            except MediaRefused as refused:
                outcome = refused.reason
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        stop.set()
        swapping.join()
    assert set(outcomes) <= {"served", "outside_roots", "missing", "changed"}, outcomes
    assert outcomes.get("served", 0) > 0 and sum(outcomes.values()) > outcomes["served"]


def test_recorded_roots_read_every_run(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text(json.dumps({"input_roots": ["/data/a"]}))
    (tmp_path / "runs" / "b.json").write_text(json.dumps({"input_roots": ["/data/b", "relative/ignored"]}))
    (tmp_path / "runs" / "c.json").write_text("{not json")
    (tmp_path / "runs" / "d.json").write_text(json.dumps({"input_roots": [], "input_file_dirs": ["/"]}))
    roots = recorded_roots(tmp_path)
    assert roots == MediaRoots(folders=("/data/a", "/data/b"), file_dirs=("/",))
    # A manifest that named /x.mp4 allows files directly in /, not the machine.
    assert roots.allow("/x.mp4") and roots.allow("/data/a/deep/v.mp4")
    assert not roots.allow("/etc/passwd") and not roots.allow("/root/.ssh/id_rsa")
    shutil.rmtree(tmp_path / "runs")
    assert recorded_roots(tmp_path) == MediaRoots()


def _decoded_status(stage: ReadDecode, uri: str, etag: str, size: int) -> tuple[str, str]:
    import numpy as np

    batch = {
        "uri": np.asarray([uri], dtype=object),
        "etag": np.asarray([etag], dtype=object),
        "size_bytes": np.asarray([size]),
    }
    (out,) = stage(batch)
    return str(out["status"][0]), str(out["error_message"][0])


def test_a_video_changed_since_it_was_listed_is_a_changed_row(tmp_path: Path, s3_bucket: tuple[Any, str]) -> None:
    """Never indexed under an ETag it does not have: a local file or an S3 object replaced after listing, or named by
    a stale manifest (an old S3 Inventory), is `changed` (retried, not counted), not an ok row of other content."""
    video = _video(tmp_path / "v.mp4", 1)
    (listed,) = list(list_videos([str(tmp_path)]))
    stage = ReadDecode(num_frames=2, size=32, s3_endpoint_url=None, whole_object_max_bytes=1 << 20)
    assert _decoded_status(stage, listed.uri, listed.etag, listed.size_bytes)[0] == "ok"
    _video(tmp_path / "other.mp4", 2)
    os.replace(tmp_path / "other.mp4", video)  # replaced after listing
    status, message = _decoded_status(stage, listed.uri, listed.etag, listed.size_bytes)
    assert status == "changed" and "changed since it was listed" in message

    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="v.mp4", Body=video.read_bytes())
    size, etag = video.stat().st_size, client.head_object(Bucket=bucket, Key="v.mp4")["ETag"]
    endpoint = client.meta.endpoint_url
    for whole_max in (1 << 20, 1024):  # one GET, then ranged GETs
        s3_stage = ReadDecode(num_frames=2, size=32, s3_endpoint_url=endpoint, whole_object_max_bytes=whole_max)
        assert _decoded_status(s3_stage, f"s3://{bucket}/v.mp4", etag, size)[0] == "ok"
        stale = _decoded_status(s3_stage, f"s3://{bucket}/v.mp4", '"' + "0" * 32 + '"', size)
        assert stale[0] == "changed" and "changed while reading" in stale[1], (whole_max, stale)


_READ_AS_USER = """
import json, sys
from jobs.decode_embed import ReadDecode
stage = ReadDecode(num_frames=2, size=32, s3_endpoint_url=None, whole_object_max_bytes=1 << 20)
(row,) = stage.decode_one(sys.argv[1], int(sys.argv[2]), sys.argv[3])
print(json.dumps({"status": row["status"], "message": row["error_message"]}))
"""


def test_a_folder_that_can_be_read_but_not_searched_lists_its_files_as_access_denied(tmp_path: Path) -> None:
    """A folder without its x bit: its names can be read, its files not inspected. Permission, as for a file that
    cannot be read (retried once fixed), not a read error."""
    import subprocess
    import sys

    folder = tmp_path / "no-search"
    folder.mkdir()
    _video(folder / "a.mp4", 3)
    folder.chmod(0o444)
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    root = Path(__file__).resolve().parents[1]
    script = "import sys; from jobs.storage import list_videos; print([v.status for v in list_videos([sys.argv[1]])])"
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-c", script, str(folder)],
            capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, check=True,
        )  # fmt: skip
    finally:
        folder.chmod(0o755)
    assert done.stdout.strip().splitlines()[-1] == "['access_denied']", done.stdout


def test_an_unreadable_file_is_access_denied_which_the_next_run_retries(tmp_path: Path) -> None:
    """Permission denied is the storage's failure, not a damaged video: it was a final `corrupt` row, so fixing the
    permission never got the video indexed."""
    import subprocess
    import sys

    from index.commits import RETRYABLE, UNCOUNTED

    video = _video(tmp_path / "locked.mp4", 3)
    (listed,) = list(list_videos([str(tmp_path)]))
    video.chmod(0)
    # As root, drop the capabilities that skip permission checks, so the mode applies as to any other user.
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [*prefix, sys.executable, "-c", _READ_AS_USER, listed.uri, str(listed.size_bytes), listed.etag],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["status"] == "access_denied" and "permission denied" in row["message"]
    assert "access_denied" in RETRYABLE and "access_denied" in UNCOUNTED

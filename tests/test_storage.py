"""The job's I/O layer against a real (moto) S3 server and local folders: listing, reading, retries, stores."""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.storage import (
    DEFAULT_VIDEO_EXTENSIONS,
    UNKNOWN_SIZE,
    EmptyInputError,
    LocalStore,
    S3RangeReader,
    S3Store,
    StorageError,
    VideoObject,
    describe_listing,
    list_videos,
    make_s3_client,
    open_store,
    open_video,
    require_any,
)
from jobs.storage.listing import is_hidden_key

Bucket = tuple[Any, str]


def put(client: Any, bucket: str, key: str, data: bytes) -> str:
    """Uploads `data` and returns its ETag without quotes."""
    return str(client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]).strip('"')


def count_requests(client: Any, operation: str) -> list[int]:
    """A one-item list counting `operation` requests sent by `client` from now on."""
    counter = [0]

    def seen(**_: Any) -> None:
        counter[0] += 1

    client.meta.events.register(f"before-send.s3.{operation}", seen)
    return counter


def decode_all(source: Any) -> list[np.ndarray]:
    with av.open(source) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]  # each [H, W, 3]


# ----------------------------------------------------------------------------------------------------- client


def test_client_retries_timeouts_and_path_style() -> None:
    client = make_s3_client(endpoint_url="http://127.0.0.1:9", max_attempts=4, retry_mode="adaptive")
    config = client.meta.config
    assert config.retries == {"total_max_attempts": 4, "mode": "adaptive"}
    assert config.connect_timeout == 10.0 and config.read_timeout == 60.0
    assert config.s3 == {"addressing_style": "path"}
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="max_attempts"):
        make_s3_client(max_attempts=0)


# ----------------------------------------------------------------------------------------------------- listing S3


def test_s3_listing_streams_page_by_page(s3_bucket: Bucket) -> None:
    client, bucket = s3_bucket
    keys = [f"videos/{i:02d}.mp4" for i in range(23)]
    etags = {key: put(client, bucket, key, b"x" * (i + 1)) for i, key in enumerate(keys)}
    lists = count_requests(client, "ListObjectsV2")

    listing = list_videos([f"s3://{bucket}/videos/"], page_size=5, s3_client=client)
    assert lists[0] == 0  # nothing is requested before iterating
    first = next(listing)
    assert lists[0] == 1  # the first video comes before the later pages are fetched
    rest = list(listing)
    assert lists[0] == 5

    assert [first, *rest] == [
        VideoObject(f"s3://{bucket}/{key}", etags[key], i + 1) for i, key in enumerate(sorted(keys))
    ]


def test_s3_listing_filters_by_extension_and_size(s3_bucket: Bucket) -> None:
    client, bucket = s3_bucket
    sizes = {"a.MP4": 10, "b.mov": 200, "c.txt": 10, "noext": 10, "d.webm": 0, "e.tar.mkv": 50, "dir/": 0}
    for key, size in sizes.items():
        put(client, bucket, f"p/{key}", b"v" * size)
    put(client, bucket, "other/f.mp4", b"v")

    def names(**options: Any) -> list[str]:
        return [video.uri.rsplit("/", 1)[1] for video in list_videos([f"s3://{bucket}/p"], s3_client=client, **options)]

    assert names() == ["a.MP4", "b.mov", "d.webm", "e.tar.mkv"]  # zero-byte objects stay, folder markers go
    assert names(min_size_bytes=1) == ["a.MP4", "b.mov", "e.tar.mkv"]
    assert names(max_size_bytes=50) == ["a.MP4", "d.webm", "e.tar.mkv"]
    assert names(extensions=[".TXT", "mov"]) == ["b.mov", "c.txt"]
    assert names(extensions=None) == ["a.MP4", "b.mov", "c.txt", "d.webm", "e.tar.mkv", "noext"]
    with pytest.raises(ValueError, match="max_size_bytes"):
        list_videos([f"s3://{bucket}/p"], min_size_bytes=10, max_size_bytes=5, s3_client=client)
    with pytest.raises(TypeError):
        list_videos(f"s3://{bucket}/p", s3_client=client)


def test_empty_prefix_lists_nothing_and_require_any_says_where(s3_bucket: Bucket) -> None:
    client, bucket = s3_bucket
    inputs = [f"s3://{bucket}/nothing/here/"]
    assert list(list_videos(inputs, s3_client=client)) == []

    where = describe_listing(inputs, min_size_bytes=1)
    with pytest.raises(EmptyInputError, match="no videos under s3://.*/nothing/here/ .*filters: extensions 3gp,avi"):
        require_any(list_videos(inputs, s3_client=client), where=where)
    assert "size >= 1 bytes" in where

    put(client, bucket, "nothing/here/v.mp4", b"1")
    assert [v.uri for v in require_any(list_videos(inputs, s3_client=client), where=where)] == [
        f"s3://{bucket}/nothing/here/v.mp4"
    ]


def test_missing_bucket_is_named(s3_server: str) -> None:
    listing = list_videos(["s3://no-such-bucket-here/some/prefix"], endpoint_url=s3_server)
    with pytest.raises(
        StorageError, match="bucket 'no-such-bucket-here' does not exist.*s3://no-such-bucket-here/some/p"
    ):
        next(listing)
    with pytest.raises(StorageError) as caught:
        list(list_videos(["s3://no-such-bucket-here/x"], endpoint_url=s3_server))
    assert caught.value.reason == "no_such_bucket" and caught.value.uri == "s3://no-such-bucket-here/x"


def test_inputs_that_name_nothing_fail_at_once(tmp_path: Path) -> None:
    (tmp_path / "clip.mp4").write_bytes(b"")
    for location, match in [
        (str(tmp_path / "missing"), "neither an s3:// URI nor an existing folder or manifest"),
        (str(tmp_path / "clip.mp4"), "is a file but not a manifest"),
        ("gs://bucket/prefix", "unsupported input"),
        ("s3:///prefix", "no bucket"),
    ]:
        with pytest.raises(StorageError, match=match) as caught:
            list_videos([location])  # raised by the call, before iterating
        assert caught.value.reason == "invalid_input"


def test_an_input_whose_dotdot_follows_a_link_is_refused(tmp_path: Path) -> None:
    """``hop/..`` where hop links elsewhere: the system opens the link target's parent, the listing (which spells
    paths without ``..``) would have walked the folder holding the link, and checked links against the other."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "videos").mkdir()
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"x")
    (tmp_path / "hop").symlink_to(tmp_path / "real" / "sub")
    with pytest.raises(StorageError, match=r"'\.\.' after a symbolic link leads to .*real/videos") as caught:
        list_videos([str(tmp_path / "hop" / ".." / "videos")])
    assert caught.value.reason == "invalid_input"
    (tmp_path / "plain").mkdir()  # '..' without a link: the same place either way, listed as before
    (listed,) = list_videos([str(tmp_path / "plain" / ".." / "videos")])
    assert listed.uri == str(tmp_path / "videos" / "a.mp4")


def test_a_manifest_line_longer_than_any_path_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    """A 100 MiB file without a line break took a minute and 800 MB (each chunk searched the whole line again)."""
    from jobs.storage.listing import MAX_MANIFEST_LINE_CHARS

    manifest = tmp_path / "list.txt"
    with manifest.open("w") as f:
        f.write(str(tmp_path / "a.mp4") + "\n")
        f.write("x" * (64 << 20))
    with pytest.raises(StorageError, match=f"line 2 is longer than {MAX_MANIFEST_LINE_CHARS} characters") as caught:
        list(list_videos([str(manifest)]))
    assert caught.value.reason == "invalid_input"


def test_refused_credentials_say_access_denied_without_secrets(
    s3_bucket: Bucket, s3_strict_auth: Any, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto accepts any keys by default; s3_strict_auth turns its signature and IAM checks on.
    _, bucket = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-do-not-print")
    with pytest.raises(StorageError, match=f"access denied: cannot list s3://{bucket}/p.*InvalidAccessKeyId") as caught:
        next(list_videos([f"s3://{bucket}/p"], endpoint_url=s3_server))
    assert caught.value.reason == "access_denied"
    assert "wrong-secret" not in str(caught.value) and "AKIAWRONG" not in str(caught.value)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_strict_auth.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_strict_auth.secret_access_key)
    with pytest.raises(StorageError, match="access denied.*AccessDenied") as caught:
        next(list_videos([f"s3://{bucket}/p"], endpoint_url=s3_server))
    assert s3_strict_auth.secret_access_key not in str(caught.value)


def test_an_output_prefix_that_may_be_read_but_not_written_is_refused_before_any_work(
    s3_bucket: Bucket, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import uuid

    import boto3
    from conftest import _set_auth_enforcement

    from index.stores import open_store

    _, bucket = s3_bucket
    iam = boto3.session.Session().client("iam", endpoint_url=s3_server, region_name="us-east-1")
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    allow = [{"Effect": "Allow", "Action": ["s3:List*", "s3:Get*"], "Resource": ["*"]}]
    policy = json.dumps({"Version": "2012-10-17", "Statement": allow})
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=policy)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    previous = _set_auth_enforcement(s3_server, "0")
    try:
        store = open_store(f"s3://{bucket}/out", endpoint_url=s3_server)
        with pytest.raises(StorageError, match=f"access denied: cannot write s3://{bucket}/out/") as caught:
            store.check_writable()  # the listing is allowed; the write probe is not
        assert caught.value.reason == "access_denied" and key["SecretAccessKey"] not in str(caught.value)
    finally:
        _set_auth_enforcement(s3_server, previous)


def test_missing_credentials_say_so(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no usable AWS credentials") as caught:
        next(list_videos(["s3://any-bucket/p"], endpoint_url=s3_server))
    assert caught.value.reason == "access_denied"


def test_storage_errors_survive_pickling() -> None:
    for error in (StorageError("gone", reason="not_found", uri="s3://b/k"), EmptyInputError("none", uri="s3://b/")):
        copy = pickle.loads(pickle.dumps(error))
        assert (type(copy), str(copy), copy.reason, copy.uri) == (type(error), str(error), error.reason, error.uri)


# ----------------------------------------------------------------------------------------------- local and manifests


def test_local_folder_walk_is_recursive_sorted_and_fingerprinted(tmp_path: Path) -> None:
    files = {"a.mp4": b"12", "a/x.MOV": b"123", "a/sub/y.mkv": b"", "b.txt": b"1", "B.avi": b"1", "c/z.webm": b"1"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "linked").symlink_to(tmp_path / "c")  # symlinked folders are not followed

    videos = list(list_videos([str(tmp_path)]))
    # Same order as S3 gives for these keys: plain sorted relative paths ("a.mp4" < "a/...").
    assert [v.uri for v in videos] == [
        str(tmp_path / rel) for rel in ["B.avi", "a.mp4", "a/sub/y.mkv", "a/x.MOV", "c/z.webm"]
    ]
    stat = os.stat(tmp_path / "a.mp4")
    assert videos[1] == VideoObject(str(tmp_path / "a.mp4"), f"local-2-{stat.st_mtime_ns}", 2)
    assert videos[2].size_bytes == 0

    os.utime(tmp_path / "a.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert list(list_videos([str(tmp_path)]))[1].etag != videos[1].etag  # a touched file looks changed


def test_a_subfolder_past_the_path_limit_is_one_unlisted_entry(tmp_path: Path) -> None:
    """A folder whose path is longer than PATH_MAX (4,096 bytes) cannot be listed by path: it failed the whole run
    (OSError ENAMETOOLONG) with nothing indexed; it is an unlisted folder now, like one that permission hides."""
    from jobs.storage.listing import UNLISTED_FOLDER

    (tmp_path / "ok.mp4").write_bytes(b"1")
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(22):  # 22 folders of 200 characters, made relative to their parent (no path is that long)
            os.mkdir("d" * 200, dir_fd=fd)
            deeper = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = deeper
    finally:
        os.close(fd)
    listed = list(list_videos([str(tmp_path)]))
    assert [(v.uri, v.status) for v in listed if v.status != UNLISTED_FOLDER] == [(str(tmp_path / "ok.mp4"), "")]
    (unlisted,) = [v for v in listed if v.status == UNLISTED_FOLDER]
    assert unlisted.uri.startswith(str(tmp_path / ("d" * 200))) and len(unlisted.uri) > 4096
    assert "File name too long" in unlisted.error_message


def test_a_folder_tree_deeper_than_pythons_recursion_limit_is_listed(tmp_path: Path) -> None:
    """A folder per level, 1,500 levels (paths of 3,000 bytes, within PATH_MAX): a walk that recursed once per level
    failed the run with a RecursionError at about 985 levels (Python's default limit, 1,000, set here: a test
    worker may run with a higher one), and nothing was indexed. Anyone who could make folders in an input share
    could stop every nightly run."""
    import sys

    (tmp_path / "top.mp4").write_bytes(b"1")
    levels = 1500
    assert len(str(tmp_path)) + 2 * levels + 10 < 4096, tmp_path  # within PATH_MAX: listed, not unlisted
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir("a", dir_fd=fd)
            deeper = os.open("a", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        os.close(os.open("deep.mp4", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
        os.close(os.open("z.mp4", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    (tmp_path / "b.mp4").write_bytes(b"2")
    deep = str(tmp_path / os.path.join(*["a"] * levels))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        listed = [(v.uri, v.status) for v in list_videos([str(tmp_path)])]
    finally:  # shutil.rmtree (pytest's clean-up of old temporary folders) recurses once per level too
        sys.setrecursionlimit(limit)
        subprocess.run(["rm", "-rf", str(tmp_path / "a")], check=True)
    assert listed == [
        (f"{deep}/deep.mp4", ""),
        (f"{deep}/z.mp4", ""),
        (str(tmp_path / "b.mp4"), ""),
        (str(tmp_path / "top.mp4"), ""),
    ]


def test_a_name_that_is_not_utf8_never_shares_a_uri_with_another_file(tmp_path: Path) -> None:
    """A file whose name holds the byte 0xff and one whose name spells that byte as the text ``\\xff``: two rows.
    With ``\\x`` escapes both had the URI of the second, and the planner dropped one as listed twice. Its URI is a
    ``file://`` URI with the bytes %-escaped; a manifest naming that URI names the same file."""
    (tmp_path / "bad\\xff%FF.mp4").write_bytes(b"1")
    with open(os.fsencode(tmp_path) + b"/bad\xff%FF.mp4", "wb") as f:
        f.write(b"2")
    videos = list(list_videos([str(tmp_path)]))
    assert sorted((v.uri, v.status) for v in videos) == [
        (str(tmp_path / "bad\\xff%FF.mp4"), ""),
        (f"file://{tmp_path}/bad%FF%25FF.mp4", "invalid_name"),
    ]
    assert "not valid UTF-8: " in videos[1].error_message and "bad\\xff%FF.mp4" in videos[1].error_message
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"file://{tmp_path}/bad%FF%25FF.mp4\n")
    (named,) = list_videos([str(manifest)])
    assert named.uri == videos[1].uri  # the same file, the same row (refused: its %-escapes are not UTF-8)


def test_a_file_swapped_for_a_link_out_of_its_folder_after_listing_is_not_read(tmp_path: Path) -> None:
    """The listing refuses links out of an input folder, but a listed file replaced by such a link (with the size
    and time of the file it names: a `stat` gives them) before its read had that file indexed and its thumbnail
    stored. Reads check again where a path under an input folder resolves."""
    (tmp_path / "in").mkdir()
    (tmp_path / "private").mkdir()
    secret = tmp_path / "private" / "secret.mp4"
    secret.write_bytes(b"someone else's video")
    listed = tmp_path / "in" / "decoy.mp4"
    listed.write_bytes(b"\0" * len(secret.read_bytes()))
    os.utime(listed, ns=(secret.stat().st_atime_ns, secret.stat().st_mtime_ns))
    (video,) = list_videos([str(tmp_path / "in")])
    (tmp_path / "in" / "swap.tmp").symlink_to(secret)
    os.replace(tmp_path / "in" / "swap.tmp", listed)  # after the listing: same size and time as listed
    roots = [str(tmp_path / "in")]
    with pytest.raises(StorageError, match="is a symbolic link to a file outside .*in, a listed folder") as caught:
        open_video(video.uri, size_bytes=video.size_bytes, etag=video.etag, local_roots=roots)
    assert caught.value.reason == "outside_folder"
    # ... and its row says so, as the listing's would: a final status, not a storage failure tried every run
    from jobs.decode_embed import ReadDecode

    decoder = ReadDecode(num_frames=2, size=32, s3_endpoint_url=None, whole_object_max_bytes=1 << 20, local_roots=roots)
    (row,) = decoder.decode_one(video.uri, video.size_bytes, video.etag)
    assert row["status"] == "outside_folder", row
    assert open_video(video.uri, size_bytes=video.size_bytes, etag=video.etag) == video.uri  # --follow-outside-symlinks
    inside = tmp_path / "in" / "alias.mp4"
    inside.symlink_to(tmp_path / "in" / "decoy.mp4")
    (tmp_path / "in" / "real.mp4").write_bytes(b"x")
    os.replace(tmp_path / "in" / "decoy.mp4", tmp_path / "in" / "old-link")
    (tmp_path / "in" / "decoy.mp4").symlink_to(tmp_path / "in" / "real.mp4")  # a link inside the folder: read
    assert open_video(str(inside), size_bytes=None, local_roots=roots) == str(inside)


def test_symlinks_to_files_outside_a_listed_folder_are_not_read(tmp_path: Path) -> None:
    """A link inside the folder is followed; one out of it (a sibling whose name extends the folder's included) is a
    row with a status unless the listing is told to follow it. The folder may itself be reached through a link."""
    inside, sibling = tmp_path / "in", tmp_path / "in2"
    (inside / "sub").mkdir(parents=True)
    sibling.mkdir()
    (inside / "sub" / "real.mp4").write_bytes(b"123")
    (sibling / "other.mp4").write_bytes(b"1234")
    (inside / "a-in.mp4").symlink_to(inside / "sub" / "real.mp4")
    (inside / "b-relative.mp4").symlink_to(Path("sub") / "real.mp4")
    (inside / "c-out.mp4").symlink_to(sibling / "other.mp4")
    (inside / "d-up.mp4").symlink_to(Path("..") / "in2" / "other.mp4")
    (inside / "e-chain.mp4").symlink_to(inside / "c-out.mp4")  # inside, to a link that leads out
    (tmp_path / "via").symlink_to(inside)

    def listed(folder: Path, **options: Any) -> dict[str, tuple[str, int]]:
        found = list_videos([str(folder)], **options)
        return {Path(v.uri).name: (v.status, v.size_bytes) for v in found}

    for folder in (inside, tmp_path / "via"):
        rows = listed(folder)
        assert {name: status for name, (status, _) in rows.items()} == {
            "a-in.mp4": "",
            "b-relative.mp4": "",
            "c-out.mp4": "outside_folder",
            "d-up.mp4": "outside_folder",
            "e-chain.mp4": "outside_folder",
            "real.mp4": "",
        }
        assert rows["a-in.mp4"][1] == rows["b-relative.mp4"][1] == 3
    followed = listed(inside, follow_outside_symlinks=True)
    assert {name: followed[name] for name in ("c-out.mp4", "d-up.mp4")} == {
        "c-out.mp4": ("", 4),
        "d-up.mp4": ("", 4),
    }
    assert not any(status for status, _ in followed.values())
    # The kernel's files say size 0 and read something else each time (the reader's environment): a listed one
    # became `changed`, retried every run.
    (inside / "f-environ.mp4").symlink_to("/proc/self/environ")
    assert listed(inside, follow_outside_symlinks=True)["f-environ.mp4"][0] == "not_a_file"
    kernel = [inside / "f-environ.mp4", Path("/proc/self/environ")]
    if os.path.ismount("/sys") and Path("/sys/kernel/uevent_seqnum").is_file():  # sysfs files say 4096 bytes
        (inside / "g-sys.mp4").symlink_to("/sys/kernel/uevent_seqnum")
        assert listed(inside, follow_outside_symlinks=True)["g-sys.mp4"][0] == "not_a_file"
        kernel.append(inside / "g-sys.mp4")
    for path in kernel:  # as a manifest names it, or swapped in
        with pytest.raises(StorageError, match="kernel's /proc or /sys") as caught:
            open_video(str(path), size_bytes=None)
        assert caught.value.reason == "not_a_file"


def test_csv_manifests_with_header_or_plain_lines(s3_bucket: Bucket, s3_server: str, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    etag = put(client, bucket, "m/remote.mp4", b"remote")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "local.mp4").write_bytes(b"local!!")
    header = tmp_path / "with_header.csv"
    header.write_text(
        "\ufeffuri,etag,size_bytes,notes\n"
        "clips/local.mp4,,,relative to the manifest\n"
        f"s3://{bucket}/m/remote.mp4,,,size and etag looked up\n"
        f's3://{bucket}/m/given.mp4,abc,"42",taken as given\n'
        f"s3://{bucket}/m/gone.mp4,,,missing\n"
        "skip.txt,,,not a video\n"
    )
    videos = list(list_videos([str(header)], s3_client=client))
    local_stat = os.stat(tmp_path / "clips" / "local.mp4")
    assert videos == [
        VideoObject(str(tmp_path / "clips" / "local.mp4"), f"local-7-{local_stat.st_mtime_ns}", 7),
        VideoObject(f"s3://{bucket}/m/remote.mp4", etag, 6),
        VideoObject(f"s3://{bucket}/m/given.mp4", "abc", 42),
        VideoObject(f"s3://{bucket}/m/gone.mp4", "", UNKNOWN_SIZE),  # reading it will record why
    ]

    plain = tmp_path / "plain.txt"
    plain.write_text(f"# one per line\n\ns3://{bucket}/m/remote.mp4\n{tmp_path}/clips/local.mp4\n")
    # A local manifest naming S3 objects gets a client of its own for the lookups.
    assert [(v.uri, v.size_bytes) for v in list_videos([str(plain)], endpoint_url=s3_server)] == [
        (f"s3://{bucket}/m/remote.mp4", 6),
        (str(tmp_path / "clips" / "local.mp4"), 7),
    ]

    bad = tmp_path / "bad.csv"
    bad.write_text("uri,size_bytes\nx.mp4,big\n")
    with pytest.raises(StorageError, match="size_bytes 'big' is not an integer"):
        list(list_videos([str(bad)]))


def test_parquet_manifests_local_and_on_s3(s3_bucket: Bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    etag = put(client, bucket, "v/one.mp4", b"one")
    table = pa.table(
        {
            "uri": [f"s3://{bucket}/v/one.mp4", f"s3://{bucket}/v/two.mkv", f"s3://{bucket}/v/three.jpg"],
            "size_bytes": pa.array([None, 9, 1], pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "list.parquet")
    expected = [VideoObject(f"s3://{bucket}/v/one.mp4", etag, 3), VideoObject(f"s3://{bucket}/v/two.mkv", "", 9)]
    assert list(list_videos([str(tmp_path / "list.parquet")], s3_client=client)) == expected

    sink = io.BytesIO()
    pq.write_table(table, sink)
    put(client, bucket, "manifests/list.parquet", sink.getvalue())
    put(client, bucket, "manifests/list.csv", f"uri\ns3://{bucket}/v/one.mp4\nrelative.mp4\n".encode())
    assert list(list_videos([f"s3://{bucket}/manifests/list.parquet"], s3_client=client)) == expected
    assert list(list_videos([f"s3://{bucket}/manifests/list.csv"], s3_client=client)) == [
        expected[0],
        VideoObject(f"s3://{bucket}/manifests/relative.mp4", "", UNKNOWN_SIZE),
    ]

    pq.write_table(pa.table({"path": ["a.mp4"]}), tmp_path / "no_uri.parquet")
    with pytest.raises(StorageError, match="no 'uri' column"):
        list(list_videos([str(tmp_path / "no_uri.parquet")]))


# ----------------------------------------------------------------------------------------------------- reading


def test_whole_and_ranged_reads_are_byte_exact(s3_bucket: Bucket) -> None:
    client, bucket = s3_bucket
    data = random.Random(0).randbytes(300_001)
    etag = put(client, bucket, "big.bin", data)
    uri = f"s3://{bucket}/big.bin"

    assert open_video(uri, size_bytes=len(data), s3_client=client) == data
    assert open_video(uri, size_bytes=None, s3_client=client) == data  # size looked up first
    put(client, bucket, "empty.mp4", b"")
    assert open_video(f"s3://{bucket}/empty.mp4", size_bytes=0, s3_client=client) == b""

    reader = open_video(
        uri, size_bytes=len(data), etag=etag, s3_client=client, whole_object_max_bytes=1000, block_size_bytes=16_384
    )
    assert isinstance(reader, S3RangeReader)
    expected = io.BytesIO(data)
    rng = random.Random(1)
    with reader:
        for _ in range(200):
            whence = rng.choice([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END])
            offset = {
                io.SEEK_SET: rng.randrange(len(data) + 10),
                io.SEEK_CUR: rng.randrange(-100, 100),
                io.SEEK_END: -rng.randrange(1, 5000),
            }[whence]
            if expected.tell() + offset < 0 and whence == io.SEEK_CUR:
                offset = -expected.tell()
            assert reader.seek(offset, whence) == expected.seek(offset, whence)
            size = rng.choice([0, 1, 100, 16_384, 40_000, -1])
            assert reader.read(size) == expected.read(size)
            assert reader.tell() == expected.tell()
        buffer = bytearray(50_000)
        reader.seek(123)
        assert reader.readinto(buffer) == 50_000 and bytes(buffer) == data[123:50_123]
        reader.seek(len(data) - 10)
        assert reader.read(100) == data[-10:] and reader.read(100) == b""
        with pytest.raises(ValueError):
            reader.seek(-1)
    with pytest.raises(ValueError, match="closed"):
        reader.read(1)

    cached = S3RangeReader(uri, s3_client=client, size_bytes=len(data), block_size_bytes=65_536, max_cached_blocks=2)
    for _ in range(3):
        cached.seek(0)
        cached.read(70_000)  # blocks 0 and 1, fetched once
    assert cached.requests_made == 2


def test_pyav_decodes_through_the_ranged_reader(s3_bucket: Bucket, noise_video: Path) -> None:
    client, bucket = s3_bucket
    data = noise_video.read_bytes()
    put(client, bucket, "clips/noise.mp4", data)
    reader = open_video(
        f"s3://{bucket}/clips/noise.mp4",
        size_bytes=len(data),
        s3_client=client,
        whole_object_max_bytes=0,
        block_size_bytes=4096,
    )
    assert isinstance(reader, S3RangeReader)
    frames = decode_all(reader)
    reference = decode_all(str(noise_video))
    assert len(frames) == len(reference) == 24
    assert all(np.array_equal(a, b) for a, b in zip(frames, reference, strict=True))
    assert open_video(str(noise_video), size_bytes=len(data)) == str(noise_video)  # local files go by path


def test_missing_and_changed_objects(s3_bucket: Bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    put(client, bucket, "k.mp4", b"content")
    for size in (7, None, 10**9):
        with pytest.raises(StorageError, match=f"no object at s3://{bucket}/gone.mp4") as caught:
            reader = open_video(f"s3://{bucket}/gone.mp4", size_bytes=size, s3_client=client)
            assert isinstance(reader, S3RangeReader)
            reader.read(1)
        assert caught.value.reason == "not_found"
    for size in (7, 10**9):  # replaced after listing: the ETag no longer matches
        with pytest.raises(StorageError) as caught:
            reader = open_video(f"s3://{bucket}/k.mp4", size_bytes=size, etag="0" * 32, s3_client=client)
            assert isinstance(reader, S3RangeReader)
            reader.read(1)
        assert caught.value.reason == "changed"
    with pytest.raises(StorageError, match="no file") as caught:
        open_video(str(tmp_path / "nope.mp4"), size_bytes=1)
    assert caught.value.reason == "not_found"


def test_reads_survive_injected_faults_on_our_retries(
    s3_bucket: Bucket, s3_server: str, s3_faults: Callable[..., Any]
) -> None:
    """With botocore's retries off, every fault reaches our retry loop, body faults included."""
    _, bucket = s3_bucket
    client = make_s3_client(endpoint_url=s3_server, max_attempts=1)
    data = random.Random(2).randbytes(100_000)
    put(client, bucket, "f.bin", data)
    uri = f"s3://{bucket}/f.bin"
    kinds = ("500", "503", "throttle", "reset", "truncate", "incomplete")
    with s3_faults(client, every_nth=2, kinds=kinds, operations=["GetObject"]) as faults:
        for _ in range(3):
            assert open_video(uri, size_bytes=len(data), s3_client=client, backoff_seconds=0.001) == data
        reader = open_video(
            uri,
            size_bytes=len(data),
            s3_client=client,
            whole_object_max_bytes=0,
            block_size_bytes=8192,
            backoff_seconds=0.001,
        )
        assert isinstance(reader, S3RangeReader)
        order = list(range(0, len(data), 5000))
        random.Random(3).shuffle(order)
        for start in order:
            reader.seek(start)
            assert reader.read(5000) == data[start : start + 5000]
    assert set(faults.injected) == set(kinds), faults
    assert reader.requests_made > len(range(0, len(data), 8192))  # retries happened


def test_listing_and_reads_survive_faults_on_botocore_retries(s3_bucket: Bucket, s3_faults: Callable[..., Any]) -> None:
    client, bucket = s3_bucket  # 3 attempts per request
    for i in range(6):
        put(client, bucket, f"p/{i}.mp4", bytes([i]) * (i + 1))
    with s3_faults(client, every_nth=3, kinds=("503", "reset", "throttle")) as faults:
        videos = list(list_videos([f"s3://{bucket}/p/"], page_size=2, s3_client=client))
        contents = [open_video(v.uri, size_bytes=v.size_bytes, s3_client=client) for v in videos]
    assert [v.size_bytes for v in videos] == [1, 2, 3, 4, 5, 6]
    assert contents == [bytes([i]) * (i + 1) for i in range(6)]
    assert faults.total >= 3


def test_bodies_that_stay_truncated_give_up(s3_bucket: Bucket, s3_faults: Callable[..., Any]) -> None:
    client, bucket = s3_bucket
    put(client, bucket, "t.bin", b"0123456789")
    with s3_faults(client, every_nth=1, kinds=("truncate",), operations=["GetObject"]):
        with pytest.raises(StorageError, match="truncated.*got 5 of 10 bytes") as caught:
            open_video(f"s3://{bucket}/t.bin", size_bytes=10, s3_client=client, max_attempts=3, backoff_seconds=0.001)
    assert caught.value.reason == "read_error"  # the storage failed, not the video: retried, not counted


# ----------------------------------------------------------------------------------------------------- stores


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "local":
        return open_store(str(tmp_path / "out"))
    client, bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/out", s3_client=client)


def test_store_round_trip(store: Any) -> None:
    assert store.list() == [] and not store.exists("runs/a.json")
    store.put_bytes("runs/a.json", b"1")
    store.put_bytes("runs/b.json", b"2")
    store.put_bytes("runs2/c.json", b"3")
    store.put_bytes("_staging/r1/videos/part-0.parquet", b"")
    store.put_bytes("runs/a.json", b"one")  # overwrite

    assert store.get_bytes("runs/a.json") == b"one" and store.get_bytes("_staging/r1/videos/part-0.parquet") == b""
    assert store.exists("runs/a.json") and not store.exists("runs")
    assert store.list() == ["_staging/r1/videos/part-0.parquet", "runs/a.json", "runs/b.json", "runs2/c.json"]
    assert store.list("runs/") == ["runs/a.json", "runs/b.json"]
    assert store.list("runs") == ["runs/a.json", "runs/b.json", "runs2/c.json"]
    assert store.list("_staging/r1/") == ["_staging/r1/videos/part-0.parquet"]
    assert store.list("nothing/") == []

    store.delete("runs/a.json")
    store.delete("runs/a.json")  # already gone: fine
    assert not store.exists("runs/a.json")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("runs/a.json")
    for bad in ("/abs", "a/../b", "a//b", "", "./a"):
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"")

    if isinstance(store, LocalStore):
        assert store.local_path("runs/b.json") == store.root / "runs" / "b.json"
        assert store.url_for("runs/b.json") == str(store.root / "runs" / "b.json")
    else:
        assert isinstance(store, S3Store)
        assert store.local_path("runs/b.json") is None
        assert store.url_for("runs/b.json") == f"s3://{store.bucket}/out/runs/b.json"
        assert store.url_for("") == f"s3://{store.bucket}/out"


def test_files_are_streamed_both_ways(store: Any, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 << 20))
    store.put_file("index/videos.faiss", source)
    target = tmp_path / "copy.bin"
    store.get_file("index/videos.faiss", target)
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(FileNotFoundError):
        store.get_file("index/missing.faiss", tmp_path / "x")


def test_large_files_go_up_as_multipart_uploads(s3_bucket: tuple[Any, str], tmp_path: Path) -> None:
    """A single PUT stops at 5 GiB: past the threshold a file is uploaded in parts (small threshold here)."""
    client, bucket = s3_bucket
    store = S3Store(f"s3://{bucket}/out", s3_client=client, multipart_threshold_bytes=5 << 20)
    source = tmp_path / "index.faiss"
    source.write_bytes(os.urandom(12 << 20))
    store.put_file("index/videos.faiss", source)
    etag = client.head_object(Bucket=bucket, Key="out/index/videos.faiss")["ETag"].strip('"')
    assert etag.endswith("-3")  # three parts of 5 MiB, 5 MiB and 2 MiB
    assert store.get_bytes("index/videos.faiss") == source.read_bytes()


def test_file_uploads_to_a_missing_bucket_fail_as_storage_errors(s3_bucket: tuple[Any, str], tmp_path: Path) -> None:
    """boto3's transfer manager wraps what S3 said (S3UploadFailedError): it still reads as the store's own error,
    for small files and multipart uploads alike."""
    client, _ = s3_bucket
    for size, threshold in ((1 << 10, 8 << 20), (12 << 20, 5 << 20)):
        store = S3Store("s3://no-such-bucket-here/out", s3_client=client, multipart_threshold_bytes=threshold)
        source = tmp_path / f"{size}.bin"
        source.write_bytes(os.urandom(size))
        with pytest.raises(StorageError) as info:
            store.put_file("index/videos.faiss", source)
        assert info.value.reason == "no_such_bucket" and "no-such-bucket-here" in str(info.value)


def test_local_put_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(str(tmp_path))
    store.put_bytes("a/file.bin", b"old")

    def crash(*_: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.put_bytes("a/file.bin", b"new")
    monkeypatch.undo()
    assert store.get_bytes("a/file.bin") == b"old"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["file.bin"]  # no temporary left behind

    (tmp_path / "a" / ".file.bin.123.tmp-write").write_bytes(b"half")  # a writer killed mid-way
    assert store.list() == ["a/file.bin"]


def test_store_locations(s3_server: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="not a folder"):
        open_store(str(tmp_path / "file"))
    with pytest.raises(StorageError, match="unsupported output location"):
        open_store("ftp://host/out")
    with pytest.raises(StorageError, match="only for s3:// outputs"):
        open_store("az://container/out", endpoint_url=s3_server)
    missing = open_store("s3://no-such-out-bucket/out", endpoint_url=s3_server)
    with pytest.raises(StorageError, match="bucket 'no-such-out-bucket' does not exist") as caught:
        missing.put_bytes("runs/x.json", b"{}")
    assert caught.value.reason == "no_such_bucket"
    assert open_store(f"file://{tmp_path}/new").local_path("x") == tmp_path / "new" / "x"


def test_default_extensions_cover_common_containers() -> None:
    assert {
        "mp4",
        "mov",
        "mkv",
        "webm",
        "avi",
        "m4v",
        "mpg",
        "mpeg",
        "ts",
        "flv",
        "wmv",
        "3gp",
        "mts",
        "m2ts",
        "vob",
        "ogv",
        "mxf",
    } == DEFAULT_VIDEO_EXTENSIONS


def test_the_job_flag_reaches_the_listing(tmp_path: Path) -> None:
    from jobs.config import config_from_args
    from jobs.pipeline import run_listing

    (tmp_path / "in").mkdir()
    (tmp_path / "elsewhere.mp4").write_bytes(b"12")
    (tmp_path / "in" / "link.mp4").symlink_to(tmp_path / "elsewhere.mp4")
    argv = [str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--random-weights"]
    for flags, status in (([], "outside_folder"), (["--follow-outside-symlinks"], "")):
        config = config_from_args([*argv, *flags])
        assert config.follow_outside_symlinks == bool(flags)
        assert [v.status for v in run_listing(config)] == [status]


def test_local_paths_that_name_no_file_say_what_they_name(tmp_path: Path) -> None:
    """A manifest may name any local path: a folder is `not_a_file` and a link loop `broken_link`, as a folder
    listing says of them, and the decode stage keeps those statuses."""
    from jobs.decode_embed import ReadDecode

    (tmp_path / "folder.mp4").mkdir()
    os.symlink(tmp_path / "loop-b.mp4", tmp_path / "loop-a.mp4")
    os.symlink(tmp_path / "loop-a.mp4", tmp_path / "loop-b.mp4")
    expected = {"folder.mp4": "not_a_file", "loop-a.mp4": "broken_link", "missing.mp4": "not_found"}
    stage = ReadDecode(num_frames=2, size=32, s3_endpoint_url=None, whole_object_max_bytes=1 << 20)
    for name, reason in expected.items():
        with pytest.raises(StorageError) as caught:
            open_video(str(tmp_path / name), size_bytes=None)
        assert caught.value.reason == reason, (name, str(caught.value))
        (row,) = stage.decode_one(str(tmp_path / name), 0)
        assert row["status"] == reason, (name, row["error_message"])


def test_the_run_s_vacuum_sweeps_writes_killed_before_their_rename(tmp_path: Path) -> None:
    """A write of the index info, a run record or a settings file killed before its rename left a temporary that no
    reader lists and nothing removed; the end-of-run vacuum deletes those older than its retention."""
    import time
    import uuid

    from index.delta_tables import OutputLocation, create_tables
    from jobs.pipeline import _vacuum
    from jobs.storage import LocalStore

    out = tmp_path / "out"
    location = OutputLocation.from_url(str(out))
    create_tables(location, 4, model_id="m@sha256:test")
    LocalStore(out).put_bytes("index/index_info.json", b"{}")
    LocalStore(out).put_bytes("runs/r1.json", b"{}")
    killed = {
        "index": out / "index" / f".index_info.json.{uuid.uuid4().hex}.tmp-write",
        "runs": out / "runs" / f".r2.json.{uuid.uuid4().hex}.tmp-write",
        "settings": out / "settings" / "abc" / f".def.json.{uuid.uuid4().hex}.tmp-write",
    }
    fresh = out / "runs" / f".r3.json.{uuid.uuid4().hex}.tmp-write"  # a write under way
    kept = [out / "runs" / "r1.json", out / "index" / "index_info.json", out / "runs" / ".r1.json.lock", fresh]
    for path in [*killed.values(), *kept[2:]]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{")
    two_hours_ago = time.time() - 2 * 3600
    for path in [*killed.values(), out / "runs" / ".r1.json.lock"]:
        os.utime(path, (two_hours_ago, two_hours_ago))
    vacuumed = _vacuum(location, 1)
    assert vacuumed is not None and vacuumed["write_temporaries"] == 3
    assert not any(path.exists() for path in killed.values())
    assert all(path.exists() for path in kept)


def test_hidden_entries_are_left_out_of_folders_and_said_once(tmp_path: Path, caplog: Any) -> None:
    # macOS's resource forks (`._clip.mp4`, copied beside every video on exFAT or SMB), a desktop trash and a
    # snapshot folder: a name starting with "." is not listed below an input, as Spark and pyarrow leave it out.
    root = tmp_path / ".videos"  # the input itself is named: listed whatever its name
    for name in ("a.mp4", "._a.mp4", ".Trash-1000/files/b.mp4", "sub/c.mp4", "sub/.snapshot/hourly.0/c.mp4"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"v")

    def names(**options: Any) -> list[str]:
        return [os.path.relpath(v.uri, root) for v in list_videos([str(root)], **options)]

    with caplog.at_level(logging.INFO, logger="jobs.storage.listing"):
        assert names() == ["a.mp4", "sub/c.mp4"]
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{root}: 3 hidden entries left out (a name starting with '.'), such as {root / '.Trash-1000'}; "
        "--include-hidden lists them"
    )
    assert names(include_hidden=True) == [
        ".Trash-1000/files/b.mp4", "._a.mp4", "a.mp4", "sub/.snapshot/hourly.0/c.mp4", "sub/c.mp4"
    ]  # fmt: skip
    # A manifest's entries are named one by one: listed whatever their names.
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{root / '._a.mp4'}\n{root / 'a.mp4'}\n")
    assert [Path(v.uri).name for v in list_videos([str(manifest)])] == ["._a.mp4", "a.mp4"]


def test_keys_ending_in_a_slash_with_data_are_files_not_folder_markers(s3_bucket: Bucket, caplog: Any) -> None:
    """An object named ``clip.mp4/`` that holds data was dropped with the empty folder markers, without a trace; it
    is a name now, which the extension filter leaves out and counts (all files are listed without it)."""
    client, bucket = s3_bucket
    put(client, bucket, "p/dir/", b"")
    put(client, bucket, "p/data.mp4/", b"v" * 10)
    put(client, bucket, "p/a.mp4", b"v")

    def keys(**options: Any) -> list[str]:
        listed = list_videos([f"s3://{bucket}/p/"], s3_client=client, **options)
        return [video.uri.split("/", 3)[3] for video in listed]

    with caplog.at_level(logging.INFO, logger="jobs.storage.listing"):
        assert keys() == ["p/a.mp4"]
    (record,) = caplog.records
    assert "1 file left out: not named with a video extension" in record.getMessage()
    assert record.getMessage().endswith("such as p/data.mp4/")
    assert keys(extensions=None) == ["p/a.mp4", "p/data.mp4/"]


def test_symbolic_links_to_folders_are_counted_not_followed(tmp_path: Path, caplog: Any) -> None:
    """A link to a folder is not walked (a loop, or a tree listed twice, is one link away): it was left out without a
    word, or counted as a file not named with a video extension."""
    root = tmp_path / "in"
    (root / "real").mkdir(parents=True)
    (root / "real" / "a.mp4").write_bytes(b"v")
    (root / "linked.mp4").symlink_to(root / "real")
    (root / "linked").symlink_to(tmp_path)
    with caplog.at_level(logging.INFO, logger="jobs.storage.listing"):
        assert [v.uri for v in list_videos([str(root)])] == [str(root / "real" / "a.mp4")]
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{root}: 2 symbolic links to folders not followed, such as {root / 'linked'}; give the folder itself as an "
        "input to list it"
    )


def test_hidden_keys_are_left_out_under_s3_prefixes(s3_bucket: Bucket) -> None:
    client, bucket = s3_bucket
    for key in ("in/a.mp4", "in/._a.mp4", "in/.trash/b.mp4", "in/x/.c.mp4", "in/x/c.mp4", "in.mp4"):
        put(client, bucket, key, b"v")

    def keys(prefix: str, **options: Any) -> list[str]:
        listed = list_videos([f"s3://{bucket}/{prefix}"], s3_client=client, **options)
        return [video.uri.split("/", 3)[3] for video in listed]

    assert keys("in/") == ["in/a.mp4", "in/x/c.mp4"]
    assert keys("in") == ["in.mp4", "in/a.mp4", "in/x/c.mp4"]  # a raw prefix: "in.mp4" is under it, not hidden
    assert keys("") == ["in.mp4", "in/a.mp4", "in/x/c.mp4"]
    assert keys("in/.trash/") == ["in/.trash/b.mp4"]  # named by the input
    assert keys("in/.") == ["in/._a.mp4", "in/.trash/b.mp4"]  # the prefix begins these names: named too
    everything = ["in/._a.mp4", "in/.trash/b.mp4", "in/a.mp4", "in/x/.c.mp4", "in/x/c.mp4"]
    assert keys("in/", include_hidden=True) == everything


@pytest.mark.parametrize(
    ("key", "prefix", "hidden"),
    [
        ("v/.a.mp4", "v/", True),
        ("v/.a.mp4", "v", True),
        ("v/.a.mp4", "v/.", False),
        ("v/.a.mp4", "v/.a", False),
        (".a/b.mp4", "", True),
        ("v/a.b/c.mp4", "v/", False),
        ("v/a/./c.mp4", "v/", True),  # a key is a name, not a path: "." is a part whose name starts with "."
        ("v/x.mp4", "v/", False),
    ],
)
def test_is_hidden_key(key: str, prefix: str, hidden: bool) -> None:
    assert is_hidden_key(key, prefix) is hidden

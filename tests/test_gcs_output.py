"""The output on Google Cloud Storage (gs://), against fake-gcs-server on a loopback port (see `fake_gcs`): the job's
Delta tables (pyarrow.fs data files over the JSON API, delta-rs commits over the XML API), conditional commits, ranged
reads, run records, the segmented index and the search cache, all through ``STORAGE_EMULATOR_HOST``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest
from fake_gcs import FakeGcs, create_bucket, fake_gcs
from object_store_runs import check_two_runs
from test_delta_tables import DIM, _race, add_files, fresh_name, video_rows

from index import delta_tables as dlt
from index import tables
from index.delta_tables import CommitConflict, OutputLocation


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcs]:
    with fake_gcs(tmp_path_factory.mktemp("fake-gcs")) as server:
        yield server


@pytest.fixture
def gcs_env(gcs: FakeGcs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """``STORAGE_EMULATOR_HOST`` for this process and the job's; the search cache under a fresh home."""
    env = {"STORAGE_EMULATOR_HOST": gcs.endpoint, "HOME": str(tmp_path / "home")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def bucket(gcs: FakeGcs, gcs_env: dict[str, str]) -> str:
    name = f"b{os.urandom(6).hex()}"
    create_bucket(gcs.endpoint, name)
    return name


def test_storage_emulator_host_configures_both_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.fs as pafs

    location = OutputLocation.from_url("gs://bkt/out")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert location.storage_options() == {}  # real GCS: delta-rs reads GOOGLE_* itself
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    account = json.loads(location.storage_options()["google_service_account_key"])
    assert account["gcs_base_url"] == "http://127.0.0.1:4443" and account["disable_oauth"] is True
    filesystem, base = location.filesystem()
    assert isinstance(filesystem, pafs.PyFileSystem) and base == "bkt/out"
    for bad in ("ftp://h:1", "http://user:secret@h:1", "http://h:1/path"):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", bad)
        with pytest.raises(ValueError, match="STORAGE_EMULATOR_HOST must look like") as caught:
            location.storage_options()
        assert "secret" not in str(caught.value)


def test_job_on_a_gcs_output(gcs_env: dict[str, str], bucket: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    check_two_runs(OutputLocation.from_url(f"gs://{bucket}/out"), gcs_env, tmp_path, tiny_checkpoint)


def test_concurrent_commits_on_gcs_exactly_one_wins(bucket: str) -> None:
    location = OutputLocation.from_url(f"gs://{bucket}/out")
    assert dlt.create_tables(location, DIM) == {"videos": 0, "segments": 0}
    writers = 4
    files = [
        dlt.write_data_file(location, "videos", video_rows([f"w{k}-a", f"w{k}-b"]), name=fresh_name())
        for k in range(writers)
    ]
    commits = [
        {"adds": [f], "removes": [], "read_version": 0, "app_id": f"w{k}", "app_version": 1, "metadata": {}}
        for k, f in enumerate(files)
    ]
    results = _race(location, commits)
    winners = [k for k, result in enumerate(results) if result == 1]
    assert len(winners) == 1, results
    assert all(isinstance(result, CommitConflict) for k, result in enumerate(results) if k not in winners)
    keys = dlt.read_keys(location, version=1, model_id="m1")
    assert sorted(keys.column("video_id").to_pylist()) == [f"w{winners[0]}-a", f"w{winners[0]}-b"]


def test_reading_keys_on_gcs_reads_ranges_not_whole_files(gcs: FakeGcs, bucket: str) -> None:
    location = OutputLocation.from_url(f"gs://{bucket}/out")
    dlt.create_tables(location, DIM)
    big = dlt.write_data_file(location, "videos", video_rows(list("abcdef"), thumb_bytes=512 * 1024), name=fresh_name())
    version = add_files(location, "videos", [big])
    before = gcs.bytes_served
    keys = dlt.read_keys(location, version=version, model_id="m1")
    served = gcs.bytes_served - before
    assert sorted(keys.column("video_id").to_pylist()) == list("abcdef")
    assert served < big.size_bytes / 6, (served, big.size_bytes)  # the footer and key columns, not the thumbnails


def test_scripts_that_read_a_gcs_table_exit_cleanly(gcs_env: dict[str, str], bucket: str) -> None:
    """Read through the Python filesystem that gs:// outputs use, 11 to 15 of 20 such scripts died at exit with
    "terminate called without an active exception" (status 134): Arrow's threads still held buffers of the Python
    files when the interpreter ended."""
    import subprocess
    import sys

    location = OutputLocation.from_url(f"gs://{bucket}/out")
    dlt.create_tables(location, DIM)
    names = [[f"v{k}-{i}" for i in range(3)] for k in range(3)]
    files = [dlt.write_data_file(location, "videos", video_rows(n), name=fresh_name()) for n in names]
    add_files(location, "videos", files)
    script = f"from index import tables; print(tables.read_table({location.url!r}, 'videos', ['video_id']).num_rows)"
    env = {**os.environ, **gcs_env}
    for _ in range(8):  # at the rate before, all eight exit cleanly one time in 500 or fewer
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
        assert (done.returncode, done.stdout.strip()) == (0, "9"), done.stderr[-2000:]
    read = tables.read_table(location, "videos", ["video_id"], where=pc.field("video_id") != "v1-1")
    assert sorted(read.column("video_id").to_pylist()) == sorted(v for n in names for v in n if v != "v1-1")

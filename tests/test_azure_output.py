"""The job with its output on Azure Blob Storage (az://), against Azurite, Microsoft's storage emulator, on a loopback
port: the Delta tables (pyarrow.fs data files, delta-rs commits), run records, the segmented index and the search
cache all go through the Azure API."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_index_job import BROKEN, job_command, make_videos

from index.delta_tables import OutputLocation
from index.search import SearchEngine
from index.tables import read_table
from jobs.storage import ObjectFsStore, open_store

ROOT = Path(__file__).resolve().parents[1]
AZURITE = ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's documented development account and key (public, emulator only).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Blob endpoint URL of an Azurite server started for this module (installed by scripts/run-tests.sh)."""
    if not AZURITE.is_file():
        pytest.fail(f"{AZURITE} is missing: scripts/run-tests.sh installs Azurite from npm")
    port = _free_port()
    data = tmp_path_factory.mktemp("azurite")
    log = open(data / "azurite.log", "wb")  # noqa: SIM115  (closed below; a pipe could fill up)
    process = subprocess.Popen(
        [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data), "--silent",
         "--skipApiVersionCheck"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Azurite did not start: {(data / 'azurite.log').read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it waits for idle keep-alive connections of this process's clients
            process.kill()
            process.wait(timeout=30)
        log.close()


@pytest.fixture
def azure_env(azurite: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The standard Azure variables pointing at Azurite, for this process and the job's; a fresh container."""
    env = {
        "AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT,
        "AZURE_STORAGE_ACCOUNT_KEY": KEY,
        "AZURE_STORAGE_USE_EMULATOR": "true",
        "AZURITE_BLOB_STORAGE_URL": azurite,
        "HOME": str(tmp_path / "home"),  # the search cache of remote outputs lives under ~/.cache
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_job_on_an_azure_output(azure_env: dict[str, str], tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    container = f"c{os.urandom(6).hex()}"
    location = OutputLocation.from_url(f"az://{container}/out")
    filesystem, _ = location.filesystem()
    filesystem.create_dir(container)
    url = location.url
    videos = make_videos(tmp_path / "in", 4)
    _run(job_command([str(tmp_path / "in")], url, "--segment-seconds", "2"), azure_env)

    store = open_store(url)
    assert isinstance(store, ObjectFsStore)
    table = read_table(location, "videos", ["video_id", "uri", "status", "embedding"])
    assert table is not None and table.num_rows == len(videos) + len(BROKEN)
    assert len(set(table.column("video_id").to_pylist())) == table.num_rows
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    assert {Path(r["uri"]).name for r in ok} == {p.name for p in videos}
    segments = read_table(location, "segments", ["video_id", "segment_index"])
    assert segments is not None and segments.num_rows > len(videos)
    (record,) = [json.loads(store.get_bytes(rel)) for rel in store.list("runs/")]
    assert record["state"] == "committed" and record["commit"]["versions"]["videos"] >= 1
    info = json.loads(store.get_bytes("index/index_info.json"))
    assert info["indexes"]["videos"]["count"] == len(videos)

    # A second run finds everything done; a changed video is re-indexed, replacing its row.
    make_videos(tmp_path / "other", 1, start=7, broken=False)
    shutil.copyfile(next((tmp_path / "other").rglob("*.mp4")), videos[0])  # same name, new content
    _run(job_command([str(tmp_path / "in")], url, "--segment-seconds", "2"), azure_env)
    table = read_table(location, "videos", ["video_id", "uri", "status", "embedding"])
    assert table is not None and table.num_rows == len(videos) + len(BROKEN)  # replaced, not added
    records = [json.loads(store.get_bytes(rel)) for rel in store.list("runs/")]
    second = max(records, key=lambda r: r["started_at"])
    assert second["counts"]["already_indexed"] >= len(videos) - 1 and second["commit"]["replaced"] >= 1, second
    info = json.loads(store.get_bytes("index/index_info.json"))
    entry = info["indexes"]["videos"]
    assert entry["count"] == len(videos) and entry["incremental"]["updated"] >= 1 and "rebuild_reason" not in entry

    # Search from the cached copy finds a video by its own embedding.
    from index.tables import local_copy

    row = next(r for r in table.to_pylist() if r["status"] == "ok")
    target = np.asarray(row["embedding"], dtype=np.float32)
    engine = SearchEngine(local_copy(url), text_encoder=lambda texts: np.stack([target] * len(texts)))
    (hit,) = engine.search("anything", k=1)
    assert hit.video_id == row["video_id"]
    # Nothing of the output is left on local disk outside the cache; the container holds both tables' logs.
    names = {info.path for info in filesystem.get_file_info(pafs.FileSelector(container, recursive=True))}
    assert f"{container}/out/videos/_delta_log/00000000000000000000.json" in names

"""The job with its output on Azure Blob Storage (az://), against Azurite, Microsoft's storage emulator, on a loopback
port: the Delta tables (pyarrow.fs data files, delta-rs commits), run records, the segmented index and the search
cache all go through the Azure API."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from local_servers import free_port, stop, wait_for_port
from object_store_runs import check_two_runs

from index.delta_tables import OutputLocation

ROOT = Path(__file__).resolve().parents[1]
AZURITE = ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's documented development account and key (public, emulator only).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Blob endpoint URL of an Azurite server started for this module (installed by scripts/run-tests.sh)."""
    if not AZURITE.is_file():
        pytest.fail(f"{AZURITE} is missing: scripts/run-tests.sh installs Azurite from npm")
    port = free_port()
    data = tmp_path_factory.mktemp("azurite")
    log = open(data / "azurite.log", "wb")  # noqa: SIM115  (closed below; a pipe could fill up)
    process = subprocess.Popen(
        [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data), "--silent",
         "--skipApiVersionCheck"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(port, process, name="Azurite", log=data / "azurite.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
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


def test_job_on_an_azure_output(azure_env: dict[str, str], tmp_path: Path, tiny_checkpoint: Path) -> None:
    container = f"c{os.urandom(6).hex()}"
    location = OutputLocation.from_url(f"az://{container}/out")
    filesystem, _ = location.filesystem()
    filesystem.create_dir(container)
    check_two_runs(location, azure_env, tmp_path, tiny_checkpoint)


def test_a_container_that_does_not_exist_is_one_line_and_exit_2(
    azure_env: dict[str, str], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """As a bucket missing on S3: a configuration error (exit 2) in one line, not delta-rs's chain of Azure errors
    with its XML answer and terminal colours."""
    from test_index_job import job_command, make_videos

    make_videos(tmp_path / "in", 1, broken=False)
    container = f"c{os.urandom(6).hex()}"  # never created
    command = job_command([str(tmp_path / "in")], f"az://{container}/out", checkpoint=tiny_checkpoint)
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **azure_env}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith(f"error: container {container!r} does not exist (cannot read az://{container}/out/videos): "
                         "create it first"), last  # fmt: skip
    assert "Traceback" not in done.stderr and "<Code>" not in done.stderr


def test_small_writes_on_azure_are_whole_and_conditional(azure_env: dict[str, str]) -> None:
    """Azure's output stream makes an empty blob at once: an info file written through it would read empty until its
    stream closes (and forever after a kill). Writes go under another name, then are copied whole."""
    from index.stores import open_store

    container = f"c{os.urandom(6).hex()}"
    location = OutputLocation.from_url(f"az://{container}/out")
    filesystem, base = location.filesystem()
    filesystem.create_dir(container)
    store = open_store(location.url)
    store.put_bytes("index/index_info.json", b'{"v": 1}')
    seen: list[bytes] = []

    class Peeking:
        """The store's filesystem, reading the target while a write's stream is open."""

        def __getattr__(self, name: str) -> Any:
            return getattr(filesystem, name)

        def open_output_stream(self, path: str, *args: Any, **kwargs: Any) -> Any:
            stream = filesystem.open_output_stream(path, *args, **kwargs)
            with filesystem.open_input_stream(f"{base}/index/index_info.json") as current:
                seen.append(current.read())
            return stream

    store._fs = Peeking()  # type: ignore[attr-defined]
    versioned = store.get_versioned("index/index_info.json")
    assert versioned is not None and versioned[0] == b'{"v": 1}'
    assert store.put_if("index/index_info.json", b'{"v": 2}', versioned[1])
    assert seen == [b'{"v": 1}']  # never empty while the new content was being written
    assert not store.put_if("index/index_info.json", b'{"v": 3}', versioned[1])  # changed since that token
    assert not store.put_if("index/index_info.json", b'{"v": 3}', None)  # there is one
    assert store.get_bytes("index/index_info.json") == b'{"v": 2}'
    assert store.list("index/") == ["index/index_info.json"]  # no temporary names left or listed

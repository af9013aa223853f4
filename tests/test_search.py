"""Search end to end: generated videos -> the job -> index -> CLI, HTTP API and the page in headless Chromium."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
from test_index_job import make_videos

from index import tables
from index.build import build_from_output
from index.search import SearchEngine
from index.segments import open_index
from index.service import make_server
from jobs.cli import main as cli_main
from jobs.index_videos import main as job_main
from jobs.storage import open_store


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> Path:
    """An output folder indexed by the real job: 6 videos (3 to 5.5 s) with 1 s segments, and broken files."""
    root = tmp_path_factory.mktemp("search")
    make_videos(root / "in", 6)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        rc = job_main(
            [
                str(root / "in"),
                "--output",
                str(root / "out"),
                "--model",
                "vitaclip-tiny",
                "--random-weights",
                "--segment-seconds",
                "1",
                "--top-k",
                "5",
            ]
        )
    finally:
        ray.shutdown()
    assert rc == 0
    return root / "out"


@pytest.fixture(scope="module")
def engine(indexed: Path) -> SearchEngine:
    return SearchEngine(indexed)


def committed(indexed: Path, table: str) -> list[dict]:
    t = tables.read_table(indexed, table)
    assert t is not None
    return [r for r in t.to_pylist() if table != "videos" or r["status"] == "ok"]


def test_text_query_matches_exact_search(indexed: Path, engine: SearchEngine) -> None:
    rows = committed(indexed, "videos")
    vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
    for text in ("a red circle moving left", "a person juggling", "blue square"):
        q = engine.encode([text])[0]
        best = rows[int(np.argmax(vectors @ q))]
        hits = engine.search(text, k=3)
        assert hits[0].video_id == best["video_id"] and hits[0].score == pytest.approx(
            float(np.max(vectors @ q)), abs=1e-4
        )
        assert len({h.video_id for h in hits}) == len(hits) == 3
    # A video's own embedding finds that video first.
    for row in rows[:3]:
        assert engine.search_vector(np.asarray(row["embedding"], np.float32), k=1)[0].video_id == row["video_id"]


def test_segments_one_best_moment_per_video(indexed: Path, engine: SearchEngine) -> None:
    hits = engine.search("something moving", k=10, segments=True)
    videos = {r["video_id"] for r in committed(indexed, "videos")}
    assert len(hits) == len(videos) and len({h.video_id for h in hits}) == len(hits)
    for h in hits:
        assert h.segment_index is not None and h.end_seconds > h.start_seconds >= 0
    many = engine.search("something moving", k=100, segments=True, per_video=100)
    assert len(many) == len(committed(indexed, "segments"))


def test_filters_keep_k_results(indexed: Path, engine: SearchEngine) -> None:
    rows = committed(indexed, "videos")
    label = rows[0]["labels"][-1]
    with_label = {r["video_id"] for r in rows if label in r["labels"]}
    hits = engine.search("anything", k=10, label=label)
    assert {h.video_id for h in hits} == with_label
    long_ones = {r["video_id"] for r in rows if r["duration_seconds"] >= 3.75}
    assert 0 < len(long_ones) < len(rows)
    hits = engine.search("anything", k=2, min_duration=3.75)
    assert len(hits) == min(2, len(long_ones)) and {h.video_id for h in hits} <= long_ones
    with pytest.raises(ValueError, match="empty"):
        engine.search("   ")
    with pytest.raises(ValueError, match="between 1 and 100"):
        engine.search("x", k=0)


def test_incremental_index_after_replaced_rows(indexed: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    from index.commits import Committer, Planner, WrittenBatch
    from index.delta_tables import table_schema, write_data_file

    out = tmp_path / "out"
    shutil.copytree(indexed, out)
    store = open_store(str(out))
    rows = committed(out, "videos")
    model_id = rows[0]["model_id"]
    info = build_from_output(store, model_id=model_id)
    assert info["indexes"]["videos"]["incremental"] == {
        "added": 0,
        "updated": 0,
        "removed": 0,
        "moved": 0,
        "files_read": 0,
        "segments_merged": 0,
    }
    # Commit a new version of one video (another etag) as a run would: the index follows the log and replaces it.
    versions = tables.table_versions(out)
    assert versions is not None
    row = dict(rows[0], run_id="rerun", etag="changed")
    schema = table_schema("videos", len(row["embedding"]))
    written = write_data_file(
        store.location, "videos", pa.Table.from_pylist([row], schema=schema), name="part-rerun-1.parquet"
    )
    planned = Planner(store.location, model_id=model_id, versions=versions)(
        {"uri": np.asarray([row["uri"]], dtype=object), "etag": np.asarray(["changed"], dtype=object)}
    )
    current = {row["video_id"]: str(planned["current_video_file"][0])}
    committer = Committer(store.location, model_id=model_id, run_id="rerun", versions=versions)
    committer.add(
        WrittenBatch(
            videos=written, segments=None, keys=((row["video_id"], "changed", "ok"),), current_video_files=current
        )
    )
    assert committer.commit().replaced == 1
    info = build_from_output(store, model_id=model_id)
    incremental = info["indexes"]["videos"]["incremental"]
    assert incremental["added"] == 0 and incremental["removed"] == 0 and incremental["updated"] == 1
    assert "rebuild_reason" not in info["indexes"]["videos"]
    index = open_index(out)
    assert index.count == len(rows) and len(set(index.ids.tolist())) == len(rows)


def test_cli_build_index_says_how_it_built(indexed: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(indexed, out)
    assert cli_main(["build-index", str(out), "--rebuild"]) == 0
    printed = capsys.readouterr().out
    assert "videos: flat (IDMap2,Flat)" in printed and "in 1 segment(s) (0 deleted ids)" in printed
    assert "built whole: asked for (--rebuild)" in printed
    assert cli_main(["build-index", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "followed the tables' log: 0 added, 0 replaced, 0 removed, 0 data files read" in printed, printed


def test_cli_search_json(indexed: Path, capsys) -> None:
    assert cli_main(["search", "--index", str(indexed), "a", "red", "circle", "-k", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2
    for r in results:
        assert {"uri", "score", "video_id", "start_seconds", "end_seconds", "labels"} <= set(r)
    assert cli_main(["search", "--index", str(indexed), "x", "--segments", "-k", "1"]) == 0
    assert "s]" in capsys.readouterr().out
    assert cli_main(["search", "--index", str(indexed), "x", "--model", "vitaclip-b16"]) == 2
    assert "built with vitaclip-tiny" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(engine: SearchEngine):
    srv = make_server(engine, host="127.0.0.1", port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("q=", "empty"),
        ("q=" + "x" * 501, "at most 500"),
        ("q=cat&k=0", "between 1 and 100"),
        ("q=cat&k=abc", "integer"),
        ("q=cat&k=101", "between 1 and 100"),
        ("q=cat&colour=red", "unknown parameters"),
        ("q=cat&min_duration=long", "number of seconds"),
        ("k=3", "missing q"),
        ("q=cat&segments=maybe", "segments must be"),
        ("q=a&q=b", "more than once"),
    ],
)
def test_http_bad_inputs_are_4xx_with_a_message(server: str, query: str, message: str) -> None:
    status, body, kind = get(f"{server}/search?{query}")
    assert status == 400 and kind == "application/json"
    assert message in json.loads(body)["error"]
    assert b"Traceback" not in body


def test_http_api(server: str, indexed: Path) -> None:
    status, body, _ = get(f"{server}/search?q=a%20red%20circle&k=3")
    data = json.loads(body)
    assert status == 200 and len(data["results"]) == 3 and data["took_ms"] > 0
    first = data["results"][0]
    status, body, kind = get(server + first["thumbnail_url"])
    assert status == 200 and kind == "image/jpeg" and body[:2] == b"\xff\xd8"
    status, body, _ = get(f"{server}/videos/{first['video_id']}")
    assert status == 200 and json.loads(body)["uri"] == first["uri"] and "embedding" not in json.loads(body)
    status, body, _ = get(server + first["media_url"])
    assert status == 200 and body == Path(first["uri"]).read_bytes()
    assert get(f"{server}/videos/nope")[0] == 404
    assert get(f"{server}/thumbnails/123.jpg")[0] == 404
    assert get(f"{server}/nothing")[0] == 404
    status, body, _ = get(f"{server}/healthz")
    assert status == 200 and json.loads(body)["indexes"]["videos"]["count"] == 6
    with ThreadPoolExecutor(8) as pool:  # concurrent requests
        statuses = list(pool.map(lambda i: get(f"{server}/search?q=query{i}&k=2")[0], range(24)))
    assert statuses == [200] * 24
    status, body, kind = get(f"{server}/metrics")
    text = body.decode()
    assert status == 200 and kind.startswith("text/plain")
    assert 'vitaclip_http_requests_total{route="search",status="200"}' in text
    assert "vitaclip_search_seconds_count" in text and 'vitaclip_index_vectors{index="videos"} 6' in text


def _chromium() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def test_page_in_headless_chromium(server: str, tmp_path: Path) -> None:
    found = _chromium()
    assert found is not None, "Debian's chromium and chromium-driver are needed (scripts/setup.sh installs them)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        browser.get(server + "/")
        box = browser.find_element(By.ID, "q")
        box.send_keys("a red circle moving left")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".result")))
        cards = browser.find_elements(By.CSS_SELECTOR, ".result")
        assert len(cards) == 6
        assert "score" in cards[0].text and cards[0].find_element(By.TAG_NAME, "a").get_attribute("href")
        img = cards[0].find_element(By.TAG_NAME, "img")
        WebDriverWait(browser, 10).until(lambda b: b.execute_script("return arguments[0].naturalWidth", img) > 0)
        assert "results in" in browser.find_element(By.ID, "status").text
    finally:
        browser.quit()

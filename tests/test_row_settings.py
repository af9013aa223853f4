"""The row settings recorded per model on an output: first run records, later runs match or are refused.

Stores are real: a local folder, and an S3 prefix on the local moto server (conditional writes). The job's own
refusal (exit code, nothing committed) is in tests/test_index_job.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from index.row_settings import RowSettings, SettingsMismatchError, check_row_settings, settings_path
from index.stores import LocalStore, S3Store, Store

MODEL = "vitaclip-tiny@sha256:" + "ab" * 32
LABELS = ("walking", "running", "jumping", "swimming", "dancing")


def settings(**changes: Any) -> RowSettings:
    values: dict[str, Any] = dict(model_id=MODEL, num_frames=8, segment_seconds=None, top_k=5, labels=LABELS)
    return RowSettings(**{**values, **changes})


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "out")
    client, bucket = request.getfixturevalue("s3_bucket")
    return S3Store(f"s3://{bucket}/out", s3_client=client)


def test_the_first_run_records_and_the_same_settings_pass(store: Store) -> None:
    assert check_row_settings(store, settings()) is None
    recorded = json.loads(store.get_bytes(settings_path(MODEL)))
    assert recorded["model_id"] == MODEL and recorded["num_frames"] == 8 and recorded["labels"] == list(LABELS)
    assert check_row_settings(store, settings()) is None
    assert check_row_settings(store, settings(model_id=MODEL[:-2] + "cd", top_k=1)) is None  # another model: its own


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (dict(num_frames=16), "num_frames: 8 (this run: 16)"),
        (dict(segment_seconds=2.0), "segment_seconds: none (this run: 2)"),
        (dict(top_k=3), "top_k: 5 (this run: 3)"),
        (dict(labels=(*LABELS, "cooking")), "5 recorded, 6 in this run; this run adds 'cooking'"),
        (dict(labels=LABELS[1:]), "drops 'walking'"),
        (dict(labels=tuple(reversed(LABELS))), "the same 5 names in another order"),
    ],
)
def test_other_settings_are_refused_naming_both_values(store: Store, change: dict[str, Any], expected: str) -> None:
    check_row_settings(store, settings())
    before = store.get_bytes(settings_path(MODEL))
    with pytest.raises(SettingsMismatchError) as refused:
        check_row_settings(store, settings(**change))
    message = str(refused.value)
    assert expected in message and MODEL in message and "--replace-settings" in message, message
    assert store.get_bytes(settings_path(MODEL)) == before


def test_many_label_changes_are_summed_up() -> None:
    many = tuple(f"label {i}" for i in range(40))
    found = settings(labels=many).differences(settings())
    assert found == [
        "labels: 5 recorded, 40 in this run; this run adds 'label 0', 'label 1', 'label 2' and 37 more and drops "
        "'walking', 'running', 'jumping' and 2 more"
    ]


def test_replace_records_the_new_settings_and_returns_the_old(store: Store) -> None:
    check_row_settings(store, settings())
    replaced = check_row_settings(store, settings(num_frames=16), replace=True)
    assert replaced == settings()
    assert check_row_settings(store, settings(num_frames=16)) is None
    with pytest.raises(SettingsMismatchError, match="num_frames: 16 \\(this run: 8\\)"):
        check_row_settings(store, settings())


def test_a_damaged_record_is_a_clear_error(store: Store) -> None:
    store.put_bytes(settings_path(MODEL), b'{"format": 1, "model_id": ')
    with pytest.raises(ValueError, match="not a settings record this vitaclip reads") as refused:
        check_row_settings(store, settings())
    assert settings_path(MODEL) in str(refused.value)
    store.put_bytes(settings_path(MODEL), json.dumps({"format": 99}).encode())
    with pytest.raises(ValueError, match="unknown format 99"):
        check_row_settings(store, settings())


def test_first_runs_with_different_settings_racing_record_one(store: Store) -> None:
    """Runs starting together on a new output: one records its settings, every other one compares with them."""
    candidates = [settings(num_frames=n) for n in (4, 8, 12, 16)] * 2
    barrier = threading.Barrier(len(candidates))
    outcomes: list[str] = [""] * len(candidates)

    def start(i: int) -> None:
        barrier.wait()
        try:
            check_row_settings(store, candidates[i])
            outcomes[i] = "recorded or matched"
        except SettingsMismatchError:
            outcomes[i] = "refused"

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(candidates))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winner = json.loads(store.get_bytes(settings_path(MODEL)))["num_frames"]
    for candidate, outcome in zip(candidates, outcomes, strict=True):
        assert outcome == ("recorded or matched" if candidate.num_frames == winner else "refused")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        settings(top_k=0)
    with pytest.raises(ValueError):
        settings(labels=())
    with pytest.raises(ValueError):
        settings(segment_seconds=float("nan"))

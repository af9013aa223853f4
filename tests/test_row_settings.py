"""The row settings recorded per model on an output: first run records, later runs match or are refused.

Stores are real: a local folder, and an S3 prefix on the local moto server (conditional writes), each with the
output's Delta tables, whose videos table property is the record. The job's own refusal (exit code, nothing
committed) and a run that another run's replaced settings stop are in tests/test_index_job.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from index import delta_tables as dlt
from index.row_settings import (
    RowSettings,
    SettingsMismatchError,
    check_row_settings,
    legacy_settings_path,
    recorded_per_model,
    settings_app_id,
    settings_path,
)
from index.stores import Store, open_store

MODEL = "vitaclip-tiny@sha256:" + "ab" * 32
LABELS = ("walking", "running", "jumping", "swimming", "dancing")


def settings(**changes: Any) -> RowSettings:
    values: dict[str, Any] = dict(model_id=MODEL, num_frames=8, segment_seconds=None, top_k=5, labels=LABELS)
    return RowSettings(**{**values, **changes})


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        opened = open_store(str(tmp_path / "out"))
    else:
        _, bucket = request.getfixturevalue("s3_bucket")
        opened = open_store(f"s3://{bucket}/out", endpoint_url=request.getfixturevalue("s3_server"))
    dlt.create_tables(opened.location, 4)
    return opened


def recorded_digest(store: Store, model_id: str = MODEL) -> int | None:
    """The digest the videos table records for the model (what every videos commit requires)."""
    table = dlt.open_table(store.location, "videos")
    assert table is not None
    return table.transaction_version(settings_app_id(model_id))


def test_the_first_run_records_and_the_same_settings_pass(store: Store) -> None:
    assert check_row_settings(store, settings()) is None
    assert recorded_digest(store) == settings().digest()
    recorded = json.loads(store.get_bytes(settings_path(MODEL, settings().digest())))
    assert recorded["model_id"] == MODEL and recorded["num_frames"] == 8 and recorded["labels"] == list(LABELS)
    version = dlt.latest_version(store.location, "videos")
    assert check_row_settings(store, settings()) is None
    assert dlt.latest_version(store.location, "videos") == version  # the same settings commit nothing
    other = settings(model_id=MODEL[:-2] + "cd", top_k=1)
    assert check_row_settings(store, other) is None  # another model: its own record
    assert recorded_digest(store, other.model_id) == other.digest() and recorded_digest(store) == settings().digest()
    assert sorted(s.model_id for s in recorded_per_model(store)) == sorted([MODEL, other.model_id])


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
    with pytest.raises(SettingsMismatchError) as refused:
        check_row_settings(store, settings(**change))
    message = str(refused.value)
    assert expected in message and MODEL in message and "--replace-settings" in message, message
    assert recorded_digest(store) == settings().digest()


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
    assert recorded_digest(store) == settings(num_frames=16).digest()
    assert check_row_settings(store, settings(num_frames=16)) is None
    with pytest.raises(SettingsMismatchError, match="num_frames: 16 \\(this run: 8\\)"):
        check_row_settings(store, settings())


def test_settings_that_describe_no_rows_are_replaced_and_rows_make_them_stand(store: Store) -> None:
    check_row_settings(store, settings())
    assert check_row_settings(store, settings(top_k=3), has_rows=lambda: False) is None
    assert recorded_digest(store) == settings(top_k=3).digest()
    with pytest.raises(SettingsMismatchError, match="top_k: 3 \\(this run: 4\\)"):
        check_row_settings(store, settings(top_k=4), has_rows=lambda: True)


def test_a_damaged_record_is_a_clear_error_and_replace_replaces_it(store: Store) -> None:
    check_row_settings(store, settings())
    path = settings_path(MODEL, settings().digest())
    store.put_bytes(path, b'{"format": 1, "model_id": ')
    with pytest.raises(ValueError, match="not a settings record this vitaclip reads") as refused:
        check_row_settings(store, settings(top_k=3))
    assert path in str(refused.value)
    store.put_bytes(path, json.dumps({"format": 99}).encode())
    with pytest.raises(ValueError, match="unknown format 99"):
        check_row_settings(store, settings(top_k=3))
    store.put_bytes(path, settings(num_frames=2).to_json())  # readable, but not the settings the table names
    with pytest.raises(ValueError, match="not the settings of its name"):
        check_row_settings(store, settings(top_k=3))
    store.delete(path)
    with pytest.raises(ValueError, match="is missing; restore it, or pass --replace-settings"):
        check_row_settings(store, settings(top_k=3))
    assert check_row_settings(store, settings(top_k=3), replace=True) is None  # nothing readable was replaced
    assert recorded_digest(store) == settings(top_k=3).digest()


def test_an_output_recorded_before_the_table_property_is_read_and_taken_over(store: Store) -> None:
    """Outputs of earlier versions recorded ``settings/<hash>.json`` alone: compared like the property's record,
    and the first run that matches it records the property."""
    store.put_bytes(legacy_settings_path(MODEL), settings().to_json())
    with pytest.raises(SettingsMismatchError, match="num_frames: 8 \\(this run: 16\\)"):
        check_row_settings(store, settings(num_frames=16))
    assert recorded_digest(store) is None
    assert [s.num_frames for s in recorded_per_model(store)] == [8]
    assert check_row_settings(store, settings()) is None
    assert recorded_digest(store) == settings().digest()
    assert recorded_per_model(store) == [settings()]  # the old file is not listed twice


def test_a_settings_record_changes_no_row_and_no_metadata(store: Store) -> None:
    """The record is a commit of its own that adds and removes no file and leaves the table's metadata alone, so
    the index follows the log past it (a metadata change would make it rebuild) and readers see the same rows."""
    before = dlt.latest_version(store.location, "videos")
    assert before is not None
    check_row_settings(store, settings())
    check_row_settings(store, settings(top_k=2), replace=True)
    after = dlt.latest_version(store.location, "videos")
    changes = dlt.log_changes(store.location, "videos", after_version=before, upto_version=after)
    assert len(changes) == 2
    assert all(not c.adds and not c.removes and not c.changes_metadata for c in changes)
    assert [c.app_transactions for c in changes] == [
        {settings_app_id(MODEL): settings().digest()},
        {settings_app_id(MODEL): settings(top_k=2).digest()},
    ]


def test_one_value_from_a_config_file_or_a_flag_is_one_setting(store: Store) -> None:
    """`segment_seconds: 2` in a YAML file is an int, `--segment-seconds 2` a float: the same settings, one record
    (the int's digest named a file whose float content no longer matched it: a false "edited?" refusal)."""
    assert settings(segment_seconds=2) == settings(segment_seconds=2.0)
    assert settings(segment_seconds=2).digest() == settings(segment_seconds=2.0).digest()
    check_row_settings(store, settings(segment_seconds=2))
    version = dlt.latest_version(store.location, "videos")
    assert check_row_settings(store, settings(segment_seconds=2.0)) is None
    assert dlt.latest_version(store.location, "videos") == version


def test_earlier_versions_find_a_file_they_refuse(store: Store) -> None:
    """Versions before the table's record read ``settings/<hash>.json`` only: had it stayed theirs, they would
    commit rows of their own settings under another run's record. Each record writes it in a format they refuse
    (theirs: format 1 only), over an earlier version's file too."""
    store.put_bytes(legacy_settings_path(MODEL), settings().to_json())  # an output of an earlier version
    check_row_settings(store, settings())
    fence = json.loads(store.get_bytes(legacy_settings_path(MODEL)))
    assert fence["format"] == 2 and fence["top_k"] == settings().top_k
    check_row_settings(store, settings(top_k=2), replace=True)
    assert json.loads(store.get_bytes(legacy_settings_path(MODEL)))["top_k"] == 2
    store.put_bytes(legacy_settings_path(MODEL), settings(top_k=2).to_json())  # an earlier version wrote it back
    check_row_settings(store, settings(top_k=2))
    assert json.loads(store.get_bytes(legacy_settings_path(MODEL)))["format"] == 2


def test_a_run_writes_its_own_record_file_again_when_it_was_lost_or_edited(store: Store) -> None:
    check_row_settings(store, settings())
    path = settings_path(MODEL, settings().digest())
    store.delete(path)
    assert recorded_per_model(store) == []  # nothing readable to show
    check_row_settings(store, settings())
    assert RowSettings.from_json(store.get_bytes(path), where=path) == settings()
    store.put_bytes(path, settings(top_k=3).to_json())  # edited by hand
    assert recorded_per_model(store) == []  # not shown as if it were the record
    check_row_settings(store, settings())
    assert recorded_per_model(store) == [settings()]


def test_a_file_left_at_the_name_of_new_settings_is_replaced_by_them(store: Store) -> None:
    """A file already at the name a replacement records (edited by hand, or left from a write cut short) must not
    stand for the new settings."""
    check_row_settings(store, settings())
    store.put_bytes(settings_path(MODEL, settings(top_k=2).digest()), settings(top_k=4).to_json())
    check_row_settings(store, settings(top_k=2), replace=True)
    assert recorded_per_model(store) == [settings(top_k=2)]
    assert check_row_settings(store, settings(top_k=2)) is None


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
    winner = next(c for c in candidates if c.digest() == recorded_digest(store))
    for candidate, outcome in zip(candidates, outcomes, strict=True):
        assert outcome == ("recorded or matched" if candidate == winner else "refused")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        settings(top_k=0)
    with pytest.raises(ValueError):
        settings(labels=())
    with pytest.raises(ValueError):
        settings(segment_seconds=float("nan"))

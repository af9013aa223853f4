"""The settings a model's rows were made with, recorded once per output and checked by every commit.

A row's embedding depends on the frames sampled (``num_frames``) and, for the segments table, on the segment length;
its labels on the label set and ``top_k``. Planning skips every video already indexed under the model id, so a run
with other settings would add rows unlike the ones already there, and search and the tables would mix the two
silently. The first run on an output records its settings; every later run with the same model compares its own
before any work and is refused on a difference (`SettingsMismatchError`), naming both values, unless it is told to
make its settings the recorded ones (``--replace-settings``: rows indexed before keep theirs until their videos
change).

Where they are recorded: an app transaction of the videos table, ``vitaclip.row_settings.<hash of model_id>``, whose
version is a digest of the settings (Delta keeps each app id's last version in the table's state), and
``OUT/settings/<hash of model_id>/<digest>.json`` what they are. The transaction is the record: it is set by a
conditional commit of its own (`delta_tables.record`), and each of a run's videos commits requires it to be the
run's at the version it commits on (`delta_tables.commit`'s ``require``). A run that replaced the settings while
another was running is thus ordered in the table's log like any commit: the other run's rows committed before it
stand, and every commit after it fails (the other run stops, saying so) instead of adding rows of the old kind.
Outputs written before this record existed hold ``OUT/settings/<hash of model_id>.json`` alone; it is read while
the table records nothing for the model, and the first run that checks it records it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import operator
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from index import delta_tables as dlt
from index.delta_tables import CommitConflict
from index.stores import Store
from vitaclip.redact import redact_url

log = logging.getLogger(__name__)

SETTINGS_DIR = "settings"
APP_PREFIX = "vitaclip.row_settings."
"""App ids ``APP_PREFIX + <hash of model_id>`` of the videos table: the digest of the model's recorded settings."""
_FORMAT = 1
_FENCE_FORMAT = 2  # the same fields at the legacy path: versions before the table's record refuse the output
_MAX_TRIES = 8  # conditional commits lost to other writers, after each of which the record is read again
_NAMES_SHOWN = 3


class SettingsMismatchError(ValueError):
    """A run whose row settings differ from those recorded on its output for the same model."""


@dataclass(frozen=True)
class RowSettings:
    """What a model's rows on one output depend on, besides the model itself (its id)."""

    model_id: str
    num_frames: int
    segment_seconds: float | None
    top_k: int
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        # One value, one digest: `segment_seconds: 2` from a config file and `--segment-seconds 2` are one setting.
        object.__setattr__(self, "num_frames", operator.index(self.num_frames))
        object.__setattr__(self, "top_k", operator.index(self.top_k))
        if self.segment_seconds is not None:
            object.__setattr__(self, "segment_seconds", float(self.segment_seconds))
        object.__setattr__(self, "labels", tuple(str(name) for name in self.labels))
        if self.num_frames < 1 or self.top_k < 1 or not self.labels:
            raise ValueError(f"bad row settings: {self}")
        if self.segment_seconds is not None and not 0 < self.segment_seconds < math.inf:
            raise ValueError(f"segment_seconds must be > 0 and finite, got {self.segment_seconds}")

    def _record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"format": _FORMAT, **dataclasses.asdict(self)}
        record["labels"] = list(self.labels)
        return record

    def digest(self) -> int:
        """60 bits naming these settings: the version of the table's record, and (in hex) its file's name."""
        canonical = json.dumps(self._record(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return int(hashlib.sha256(canonical.encode()).hexdigest()[:15], 16)

    def to_json(self, *, fence: bool = False) -> bytes:
        """The record's file; `fence`: the file at the legacy path, in a format earlier versions refuse."""
        record = self._record()
        if fence:
            record["format"] = _FENCE_FORMAT
            record["note"] = (
                "recorded in the videos table's log (app transaction vitaclip.row_settings.*); this file stops "
                "vitaclip versions that do not read that record from writing to this output"
            )
        record["recorded_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return json.dumps(record, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> RowSettings:
        """Parses a recorded file; a damaged or unknown one is a ValueError naming `where`."""
        try:
            record = json.loads(data)
            if record.get("format") not in (_FORMAT, _FENCE_FORMAT):
                raise ValueError(f"unknown format {record.get('format')!r} (this vitaclip writes {_FORMAT})")
            segment = record["segment_seconds"]
            return cls(
                model_id=str(record["model_id"]),
                num_frames=int(record["num_frames"]),
                segment_seconds=None if segment is None else float(segment),
                top_k=int(record["top_k"]),
                labels=tuple(str(name) for name in record["labels"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(
                f"{where}: not a settings record this vitaclip reads ({type(exc).__name__}: {exc}); it records the "
                "settings of the rows on this output: restore it, or delete it to record this run's"
            ) from None

    def differences(self, recorded: RowSettings) -> list[str]:
        """One phrase per setting that differs from `recorded`, as "name: recorded (this run: ours)"."""
        found = [
            f"{name}: {_shown(getattr(recorded, name))} (this run: {_shown(getattr(self, name))})"
            for name in ("num_frames", "segment_seconds", "top_k")
            if getattr(self, name) != getattr(recorded, name)
        ]
        if self.labels != recorded.labels:
            found.append(f"labels: {_label_change(recorded.labels, self.labels)}")
        return found


def _shown(value: float | int | None) -> str:
    return "none" if value is None else f"{value:g}"


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _label_change(recorded: tuple[str, ...], ours: tuple[str, ...]) -> str:
    known = set(recorded)
    added = [name for name in ours if name not in known]
    mine = set(ours)
    dropped = [name for name in recorded if name not in mine]
    parts = [f"this run adds {_names(added)}"] if added else []
    parts += [f"drops {_names(dropped)}"] if dropped else []
    if not parts:  # same names, another order: the stored label indices would mean other names
        return f"the same {len(ours)} names in another order"
    return f"{len(recorded)} recorded, {len(ours)} in this run; " + " and ".join(parts)


def _model_hash(model_id: str) -> str:
    return hashlib.sha256(model_id.encode()).hexdigest()[:24]  # model ids hold ``:``, kept out of names and keys


def settings_app_id(model_id: str) -> str:
    """The videos table's app id whose transaction version is the digest of a model's settings."""
    return APP_PREFIX + _model_hash(model_id)


def settings_path(model_id: str, digest: int) -> str:
    """Where the settings of `digest` are written, relative to the output."""
    return f"{SETTINGS_DIR}/{_model_hash(model_id)}/{digest:015x}.json"


def legacy_settings_path(model_id: str) -> str:
    """Where outputs written before the table's record recorded a model's settings."""
    return f"{SETTINGS_DIR}/{_model_hash(model_id)}.json"


def required_records(settings: RowSettings) -> dict[str, int]:
    """What each videos commit of a run with `settings` requires of the table (`delta_tables.commit`)."""
    return {settings_app_id(settings.model_id): settings.digest()}


def recorded_settings(store: Store, model_id: str, digest: int | None) -> RowSettings | None:
    """The settings recorded for `model_id` on an output whose videos table records `digest` for it (None: none,
    or only in the file of earlier versions).

    Raises:
        ValueError: The record the table names is missing or damaged (the message names its file).
    """
    if digest is None:
        path = legacy_settings_path(model_id)
        try:
            data = store.get_bytes(path)
        except FileNotFoundError:
            return None
        recorded = RowSettings.from_json(data, where=redact_url(store.url_for(path)))
    else:
        path = settings_path(model_id, digest)
        where = redact_url(store.url_for(path))
        try:
            recorded = RowSettings.from_json(store.get_bytes(path), where=where)
        except FileNotFoundError:
            raise ValueError(
                f"{where}: the record of the row settings the videos table names for {model_id} is missing; restore "
                "it, or pass --replace-settings to record this run's"
            ) from None
        if recorded.digest() != digest:
            raise ValueError(f"{where}: not the settings of its name (edited?); restore it or pass --replace-settings")
    if recorded.model_id != model_id:
        raise ValueError(f"{redact_url(store.url_for(path))} records model {recorded.model_id!r}, not {model_id!r}")
    return recorded


def check_row_settings(
    store: Store,
    settings: RowSettings,
    *,
    replace: bool = False,
    has_rows: Callable[[], bool] | None = None,
) -> RowSettings | None:
    """Records `settings` for the output's first run with this model; later runs must match them.

    Args:
        store: The run's output; its tables exist (`delta_tables.create_tables`).
        settings: This run's settings.
        replace: Record `settings` over different (or unreadable) recorded ones instead of refusing the run.
        has_rows: Whether the output may hold rows of the model: when it holds none, different recorded settings
            describe nothing (a run refused or failed before its first commit recorded them) and are replaced
            without `replace`. A run that recorded them and commits later fails then (its commits require them).

    Returns:
        The settings recorded before this run when `replace` replaced them, else None.

    Raises:
        SettingsMismatchError: Recorded settings differ and `replace` is false; the message names each difference.
        ValueError: The record is damaged or from an unknown version (and `replace` is false).
    """
    app_id, ours = settings_app_id(settings.model_id), settings.digest()
    replaced: RowSettings | None = None
    for attempt in range(_MAX_TRIES):
        dt = dlt.open_table(store.location, "videos")
        if dt is None:
            raise FileNotFoundError(f"no videos table at {redact_url(store.url)}: create the tables first")
        digest = dt.transaction_version(app_id)
        if digest == ours:
            _write_files(store, settings)  # a file lost or edited since is written again (it is this run's)
            return replaced  # recorded (by this call's commit that lost its answer, or by a run like this one)

        def unused() -> bool:  # asked only when the record differs: it reads the table's file statistics
            return not replace and has_rows is not None and not has_rows()

        try:
            recorded = recorded_settings(store, settings.model_id, digest)
        except ValueError as damaged:
            if not (replace or unused()):
                raise
            log.warning("the recorded row settings cannot be read and are replaced by this run's: %s", damaged)
            recorded = None
        found = [] if recorded is None else settings.differences(recorded)
        if found and not replace and not unused():
            raise SettingsMismatchError(_mismatch_message(store, settings.model_id, found))
        _write_files(store, settings, fence=False)  # before the record names it
        try:
            dlt.record(dt, app_id, ours, metadata={"vitaclip.row_settings_of": settings.model_id})
        except CommitConflict:
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
            continue  # another writer committed first: read the record again
        _write_files(store, settings)
        replaced = recorded if found and replace else None
        if not found:
            log.info("recorded the row settings of %s (%s)", settings.model_id, app_id)
        elif replace:
            log.warning(
                "row settings of %s replaced (%s); rows indexed before keep the old ones until their videos change",
                settings.model_id, "; ".join(found),
            )  # fmt: skip
        else:
            log.info(
                "the recorded row settings of %s describe no committed rows (a run stopped before its first commit "
                "recorded them): this run's replace them (%s)",
                settings.model_id, "; ".join(found),
            )  # fmt: skip
        return replaced
    raise RuntimeError(f"the videos table of {redact_url(store.url)} kept changing under {_MAX_TRIES} tries; run again")


def _write_files(store: Store, settings: RowSettings, *, fence: bool = True) -> None:
    """Writes the settings' file where it is missing or does not hold them, and with `fence` the legacy path's file
    that earlier versions refuse (they would otherwise record and commit their own settings, unaware of the table's
    record). Two reads when both are in place, as in every run after the first."""
    paths = [(settings_path(settings.model_id, settings.digest()), False)]
    paths += [(legacy_settings_path(settings.model_id), True)] if fence else []
    for path, fenced in paths:
        current = store.get_versioned(path)
        if current is not None:
            try:
                held = RowSettings.from_json(current[0], where=path)
                if held.digest() == settings.digest() and (json.loads(current[0])["format"] == _FENCE_FORMAT) == fenced:
                    continue
            except (ValueError, KeyError, TypeError):
                pass  # damaged: written again
        store.put_bytes(path, settings.to_json(fence=fenced))


def changed_during_run(store: Store, settings: RowSettings) -> SettingsMismatchError:
    """The error of a run whose commit found another run's settings recorded (`delta_tables.RecordChangedError`)."""
    try:
        dt = dlt.open_table(store.location, "videos")
        digest = dt.transaction_version(settings_app_id(settings.model_id)) if dt is not None else None
        recorded = recorded_settings(store, settings.model_id, digest)
        found = [] if recorded is None else settings.differences(recorded)
        detail = (
            _mismatch_message(store, settings.model_id, found)
            if found
            else "the record changed during this run (replaced, then set back?): run again"
        )
    except (ValueError, OSError) as exc:
        detail = f"their record cannot be read ({exc}); run again once it is fixed"
    return SettingsMismatchError(
        f"another run recorded other row settings during this run, whose uncommitted rows are dropped: {detail}"
    )


def recorded_per_model(store: Store) -> list[RowSettings]:
    """The row settings recorded per model on an output (for ``vitaclip runs``); unreadable records are left out."""
    try:
        dt = dlt.open_table(store.location, "videos")
    except (ValueError, OSError):
        dt = None
    model_ids: dict[str, str] = {}  # hash of the model id -> the id, from any of its files
    for name in store.list(f"{SETTINGS_DIR}/"):
        model_hash = name.removeprefix(f"{SETTINGS_DIR}/").split("/")[0].removesuffix(".json")
        if name.endswith(".json") and model_hash not in model_ids:
            try:
                model_id = RowSettings.from_json(store.get_bytes(name), where=name).model_id
            except (ValueError, FileNotFoundError):
                continue
            if _model_hash(model_id) == model_hash:
                model_ids[model_hash] = model_id
    found = []
    for model_id in model_ids.values():
        digest = dt.transaction_version(settings_app_id(model_id)) if dt is not None else None
        try:
            recorded = recorded_settings(store, model_id, digest)
        except ValueError:
            continue
        if recorded is not None:
            found.append(recorded)
    return found


def _mismatch_message(store: Store, model_id: str, found: list[str]) -> str:
    return (
        f"the rows of {model_id} on {redact_url(store.url)} were made with other settings: {'; '.join(found)}. "
        "Already indexed videos are not indexed again, so this run would mix rows of both kinds. Run with the "
        "recorded settings, write to another --output, or pass --replace-settings to make this run's the recorded "
        "ones (rows indexed before keep theirs until their videos change)"
    )

"""The settings a model's rows were made with, recorded once per output: ``OUT/settings/<hash of model_id>.json``.

A row's embedding depends on the frames sampled (``num_frames``) and, for the segments table, on the segment length;
its labels on the label set and ``top_k``. Planning skips every video already indexed under the model id, so a run
with other settings would add rows unlike the ones already there, and search and the tables would mix the two
silently. The first run on an output records its settings; every later run with the same model compares its own
before any work and is refused on a difference (`SettingsMismatchError`), naming both values, unless it is told to
make its settings the recorded ones (``--replace-settings``: rows indexed before keep theirs until their videos
change).

The record is written with a conditional write (`index.stores.Store.put_if`), so two first runs with different
settings on one new output cannot both record theirs: the second sees the first's and is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from index.stores import Store
from vitaclip.redact import redact_url

log = logging.getLogger(__name__)

SETTINGS_DIR = "settings"
_FORMAT = 1
_MAX_TRIES = 8  # conditional writes lost to other runs, each of which then recorded settings to compare with
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
        if self.num_frames < 1 or self.top_k < 1 or not self.labels:
            raise ValueError(f"bad row settings: {self}")
        if self.segment_seconds is not None and not 0 < self.segment_seconds < math.inf:
            raise ValueError(f"segment_seconds must be > 0 and finite, got {self.segment_seconds}")

    def to_json(self) -> bytes:
        record: dict[str, Any] = {"format": _FORMAT, **dataclasses.asdict(self)}
        record["labels"] = list(self.labels)
        record["recorded_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return json.dumps(record, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> RowSettings:
        """Parses a recorded file; a damaged or unknown one is a ValueError naming `where`."""
        try:
            record = json.loads(data)
            if record.get("format") != _FORMAT:
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


def settings_path(model_id: str) -> str:
    """Where a model's settings are recorded, relative to the output (model ids hold ``:``, kept out of names)."""
    return f"{SETTINGS_DIR}/{hashlib.sha256(model_id.encode()).hexdigest()[:24]}.json"


def check_row_settings(
    store: Store,
    settings: RowSettings,
    *,
    replace: bool = False,
    has_rows: Callable[[], bool] | None = None,
) -> RowSettings | None:
    """Records `settings` for the output's first run with this model; later runs must match them.

    Args:
        store: The run's output.
        settings: This run's settings.
        replace: Record `settings` over different recorded ones instead of refusing the run.
        has_rows: Whether the output may hold rows of the model: when it holds none, different recorded settings
            describe nothing (a run refused or failed before its first commit recorded them) and are replaced
            without `replace`. Not for a running run's checks: a run that has not committed yet would take over
            the settings of another one that is about to.

    Returns:
        The settings recorded before this run when `replace` replaced them, else None.

    Raises:
        SettingsMismatchError: Recorded settings differ and `replace` is false; the message names each difference.
        ValueError: The record is damaged or from an unknown version.
    """
    path = settings_path(settings.model_id)
    for _ in range(_MAX_TRIES):
        current = store.get_versioned(path)
        if current is None:
            if store.put_if(path, settings.to_json(), None):
                log.info("recorded the row settings of %s in %s", settings.model_id, path)
                return None
            continue  # another run recorded first: compare with theirs
        data, token = current
        recorded = RowSettings.from_json(data, where=redact_url(store.url_for(path)))
        if recorded.model_id != settings.model_id:
            raise ValueError(
                f"{redact_url(store.url_for(path))} records model {recorded.model_id!r}, not {settings.model_id!r}"
            )
        found = settings.differences(recorded)
        if not found:
            return None
        unused = not replace and has_rows is not None and not has_rows()
        if not replace and not unused:
            raise SettingsMismatchError(_mismatch_message(store, settings.model_id, found))
        if unused:
            if store.put_if(path, settings.to_json(), token):
                log.info(
                    "the recorded row settings of %s describe no committed rows (a run stopped before its first "
                    "commit recorded them): this run's replace them (%s)",
                    settings.model_id, "; ".join(found),
                )  # fmt: skip
                return None
            continue  # changed meanwhile: compare again
        if store.put_if(path, settings.to_json(), token):
            log.warning(
                "row settings of %s replaced (%s); rows indexed before keep the old ones until their videos change",
                settings.model_id, "; ".join(found),
            )  # fmt: skip
            return recorded
    raise RuntimeError(f"{redact_url(store.url_for(path))} kept changing under {_MAX_TRIES} tries; run again")


def _mismatch_message(store: Store, model_id: str, found: list[str]) -> str:
    return (
        f"the rows of {model_id} on {redact_url(store.url)} were made with other settings: {'; '.join(found)}. "
        "Already indexed videos are not indexed again, so this run would mix rows of both kinds. Run with the "
        "recorded settings, write to another --output, or pass --replace-settings to make this run's the recorded "
        "ones (rows indexed before keep theirs until their videos change)"
    )

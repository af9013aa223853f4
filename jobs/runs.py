"""``vitaclip runs OUT``: the latest runs on an output (from ``OUT/runs/<run_id>.json``) and its recorded settings.

What an operator checks after a night: did the run commit, how much did it do, what failed, and how long it took;
a run whose record still says ``running`` either runs now or lost its driver (a kill leaves the record as it was).
Reads only the last `last` records (run ids sort by start time), the settings files and the videos table's state
(its log: which settings are recorded), never a data file.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

from index.row_settings import RowSettings, recorded_per_model
from index.stores import Store
from vitaclip.redact import redact_text, redact_url, terminal_text

RUNS_DIR = "runs"
_ERROR_CHARS = 400  # of a failed run's error in the table (the last column: it wraps); --json has all
_MODEL_CHARS = 64  # the settings lines below the table give whole ids


def read_runs(store: Store, *, last: int = 20) -> list[dict[str, Any]]:
    """The last `last` run records, oldest first; one that cannot be read is ``{"run_id", "state": "unreadable"}``."""
    if last < 1:
        raise ValueError(f"last must be >= 1, got {last}")
    names = [name for name in store.list(f"{RUNS_DIR}/") if name.endswith(".json") and name.count("/") == 1]
    records = []
    for name in names[-last:]:
        run_id = name.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            record = json.loads(store.get_bytes(name), parse_constant=_no_constant)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError, FileNotFoundError) as exc:
            record = {"run_id": run_id, "state": "unreadable", "error": f"{name}: {type(exc).__name__}: {exc}"}
        record.setdefault("run_id", run_id)
        records.append(record)
    return records


def _no_constant(name: str) -> None:
    """NaN and Infinity (which Python writes, but strict JSON readers such as jq refuse) read as null."""
    return None


def read_settings(store: Store) -> list[RowSettings]:
    """The row settings recorded per model on the output (`index.row_settings`); damaged records are left out."""
    return recorded_per_model(store)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _statuses(record: dict[str, Any]) -> str:
    status = {str(k): v for k, v in _mapping(record.get("status")).items() if isinstance(v, int)}
    return ", ".join(f"{name} {count}" for name, count in sorted(status.items(), key=lambda kv: (-kv[1], kv[0])))


def in_words(seconds: float) -> str:
    """A duration in words: "40 s", "12 min", "3 h 12 min", "4 days" (rounded down)."""
    whole = max(0, int(seconds)) if math.isfinite(seconds) else 0
    if whole < 60:
        return f"{whole} s"
    minutes = whole // 60
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min" if minutes < 48 * 60 else f"{minutes // (24 * 60)} days"


def _age(stamp: Any) -> str | None:
    """How long ago an ISO time was, in words ("3 h 12 min"); None for anything else."""
    try:
        then = datetime.fromisoformat(str(stamp))
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    return in_words((datetime.now(timezone.utc) - then).total_seconds())


def _model(model_id: Any) -> str:
    """A model id as a column: its name and the first 8 hex digits of its weights' sha256 (``vitaclip-demo@1f2e3d4c``),
    enough to tell two checkpoints of one config apart; the settings lines below the table give whole ids."""
    if not isinstance(model_id, str):
        return "-"
    name, _, digest = model_id.partition("@sha256:")
    weights, plus, config = digest.partition("+")  # "+config:..." (`vitaclip.checkpoint_folder.config_suffix`)
    cell = f"{name}@{weights[:8]}{plus}{config}" if digest else model_id
    return cell if len(cell) <= _MODEL_CHARS else cell[: _MODEL_CHARS - 3] + "..."


def _row(record: dict[str, Any]) -> list[str]:
    """One run's cells; a record of another shape (edited by hand, another version) shows what it has."""
    counts = _mapping(record.get("counts"))
    started = str(record.get("started_at") or "")[:19].replace("T", " ")
    seconds = record.get("elapsed_seconds")
    seconds = seconds if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None
    state = str(record.get("state", "?"))
    if state == "committed":
        what = _statuses(record) or "nothing to do"
        exhausted = counts.get("attempts_exhausted")
        if isinstance(exhausted, int) and not isinstance(exhausted, bool) and exhausted > 0:
            # Not planned any more (`--max-attempts`): unindexed, though the run had nothing to do for them.
            what += f"; {exhausted} failed in every allowed attempt (--max-attempts)"
        listed_back = record.get("prune_held_back")
        held = [h for h in listed_back if isinstance(h, dict)] if isinstance(listed_back, list) else []
        if held:
            gone = sum(h["no_longer_listed"] for h in held if isinstance(h.get("no_longer_listed"), int))
            what += f"; pruning held back ({gone} no longer listed, --prune-max)"
        dropped = _mapping(record.get("commit")).get("dropped_done_by_another_run")
        if isinstance(dropped, int) and dropped > 0:
            what += f"; {dropped} left out, another run committed them first"
        unlisted = record.get("unlisted_folders")
        if isinstance(unlisted, list) and unlisted:
            what += f"; {len(unlisted)} folder(s) not readable, left as they are"
        left_alone = record.get("prune_left_alone")
        if isinstance(left_alone, list) and left_alone:
            what += f"; {len(left_alone)} scope(s) listed nothing, not pruned"
    elif state == "running":
        what = "no end recorded: running now, or its driver was killed"
        heard = _age(record.get("alive_at") or record.get("started_at"))
        if heard is not None:
            what += f" (last heard of {heard} ago, at its {'last commit' if record.get('alive_at') else 'start'})"
    else:
        what = redact_text(str(record.get("error") or ""))
        if len(what) > _ERROR_CHARS:
            what = what[: _ERROR_CHARS - 1] + "…"  # the rest with --json
        landed = _mapping(record.get("commit")).get("videos_committed")
        if isinstance(landed, int) and not isinstance(landed, bool) and landed > 0:  # those rows stay
            what = f"{landed} video rows committed, then: {what}"
    return [
        str(record.get("run_id", "?")),
        state,
        _model(record.get("model_id")),
        started,
        "-" if seconds is None else f"{seconds:.1f}",
        str(counts.get("listed", "-")),
        str(counts.get("processed", "-")),
        what,
    ]


def format_runs(records: list[dict[str, Any]], settings: list[RowSettings], *, url: str) -> str:
    """The runs as a table, then the recorded settings per model."""
    if not records:
        lines = [f"no runs recorded under {redact_url(url)}/{RUNS_DIR}/"]
    else:
        header = ["run", "state", "model", "started (UTC)", "seconds", "listed", "processed", "rows by status / error"]
        rows = [header, *(_row(record) for record in records)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]) for row in rows]
        lines = [line.rstrip() for line in lines]
    for recorded in settings:
        segments = "none" if recorded.segment_seconds is None else f"{recorded.segment_seconds:g} s"
        lines.append(
            f"settings of {recorded.model_id}: num_frames {recorded.num_frames}, segments {segments}, "
            f"top_k {recorded.top_k}, {len(recorded.labels)} labels"
        )
    return "\n".join(terminal_text(line) for line in lines)  # names and messages hold no terminal controls

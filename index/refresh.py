"""Building or refreshing an output's index for its model (behind ``vitaclip build-index`` and the job's last step)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from index.build import build_from_output
from index.segments import INDEX_DIR, INFO_FILE
from index.tables import read_table

if TYPE_CHECKING:
    from index.stores import Store


def committed_model_ids(store: Store) -> list[str]:
    table = read_table(store, "videos", ["model_id"])
    return sorted(set(table.column("model_id").to_pylist())) if table is not None else []


def label_queries(model: str | None, checkpoint: str | None) -> Callable[[], np.ndarray]:
    """Text-side tuning queries: the label names' text features of the index's model (loaded when called)."""

    def make() -> np.ndarray:
        import torch

        import vitaclip

        encoder = vitaclip.create_model(model, checkpoint=checkpoint)
        names = list(encoder.label_names or [])[:400] or ["a video"]
        with torch.inference_mode():
            return encoder.encode_labels(names).float().numpy()

    return make


def build_index_for_output(
    store: Store,
    *,
    model: str | None,
    checkpoint: str | None,
    kind: str = "auto",
    recall_target: float = 0.95,
    rebuild: bool = False,
    switch: bool = False,
) -> dict[str, Any]:
    """Builds ``OUT/index`` for the output's model: the one named, else the index's own (``index_info.json``), else
    the only one in its rows. An index of another model that still has rows is replaced only with `switch` (a
    ``--model`` without ``--checkpoint`` names the packaged weights, which may not be the index's checkpoint)."""
    from vitaclip.model import model_name_of
    from vitaclip.registry import model_id_for

    ids = committed_model_ids(store)
    if not ids:
        raise ValueError("the output has no committed rows: run the indexing job first")
    indexed = indexed_model_id(store)
    if model is None and checkpoint is None:
        if indexed in ids:
            model_id = str(indexed)
        elif len(ids) > 1:
            raise ValueError(f"the output holds rows of several models {ids}: name one with --model/--checkpoint")
        else:
            model_id = ids[0]
        model = model_name_of(model_id)
    else:
        model_id = model_id_for(model, checkpoint)
        if model_id not in ids:
            raise ValueError(f"no committed rows of {model_id}; the output has {ids}")
    if indexed in ids and indexed != model_id and not switch:
        raise ValueError(
            f"OUT/index holds the rows of {indexed}, not of {model_id} (a --model without --checkpoint names its "
            "packaged weights): name the index's model and checkpoint, or pass --switch-index to make it "
            f"{model_id}'s index"
        )
    # Text queries only from the weights that made the rows: without them (rows of a checkpoint not given here),
    # approximate kinds are tuned with synthetic queries instead, and the index says so.
    try:
        same_weights = model_id_for(model, checkpoint) == model_id
    except ValueError:  # a model known only by its checkpoint folder, which was not given: no text queries
        same_weights = False
    return build_from_output(
        store,
        model_id=model_id,
        kind=kind,
        recall_target=recall_target,
        rebuild=rebuild,
        tune_queries=label_queries(model, checkpoint) if same_weights else None,
    )


def indexed_model_id(store: Store) -> str | None:
    """The model of ``OUT/index`` (``index_info.json``'s ``model_id``), or None when there is no readable index."""
    try:
        info = json.loads(store.get_bytes(f"{INDEX_DIR}/{INFO_FILE}"))
    except (FileNotFoundError, ValueError):
        return None
    indexed = info.get("model_id") if isinstance(info, dict) else None
    return indexed if isinstance(indexed, str) else None

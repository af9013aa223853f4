"""Building or refreshing an output's index for its model (behind ``vitaclip build-index`` and the job's last step)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from index.build import build_from_output
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
) -> dict[str, Any]:
    """Builds ``OUT/index`` for the output's model (the only one in its rows, or the one named)."""
    from vitaclip.model import model_name_of
    from vitaclip.registry import model_id_for

    ids = committed_model_ids(store)
    if not ids:
        raise ValueError("the output has no committed rows: run the indexing job first")
    if model is None and checkpoint is None:
        if len(ids) > 1:
            raise ValueError(f"the output holds rows of several models {ids}: name one with --model/--checkpoint")
        model_id = ids[0]
        model = model_name_of(model_id)
    else:
        model_id = model_id_for(model, checkpoint)
        if model_id not in ids:
            raise ValueError(f"no committed rows of {model_id}; the output has {ids}")
    # Text queries only from the weights that made the rows: without them (rows of a checkpoint not given here),
    # approximate kinds are tuned with synthetic queries instead, and the index says so.
    same_weights = model_id_for(model, checkpoint) == model_id
    return build_from_output(
        store,
        model_id=model_id,
        kind=kind,
        recall_target=recall_target,
        rebuild=rebuild,
        tune_queries=label_queries(model, checkpoint) if same_weights else None,
    )

"""FAISS index kinds, tuning, id mapping, incremental builds and model-id checks, on synthetic CLIP-like data."""

from __future__ import annotations

import numpy as np
import pytest

from index.build import build_index, exact_search, plan_index, recall_at_k
from index.segments import IndexUnusableError, open_index


def clustered(n: int, dim: int = 64, clusters: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def text_like_queries(data: np.ndarray, n: int = 100, seed: int = 1) -> np.ndarray:
    """Queries offset from the data: a shared direction plus noise, as text embeddings sit apart from video ones."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(size=data.shape[1])
    q = data[rng.choice(len(data), n, replace=False)] + 0.5 * offset / np.linalg.norm(offset)
    q += 0.3 * rng.normal(size=q.shape) / np.sqrt(data.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_plan_follows_count_and_memory_budget() -> None:
    assert plan_index(50_000, 512).kind == "flat"
    assert plan_index(1_000_000, 512).kind == "ivf"
    assert plan_index(1_000_000, 512).nlist == 2000
    compressed = plan_index(10_000_000, 512, memory_budget_bytes=2**30)
    assert compressed.kind == "ivfpq" and compressed.rerank
    assert plan_index(10, 8, kind="hnsw").factory == "IDMap2,HNSW32,Flat"
    assert plan_index(10, 8, kind="IVF16,SQ8").rerank
    with pytest.raises(ValueError, match="unknown index kind"):
        plan_index(10, 8, kind="lsh-forest")


@pytest.mark.parametrize(("kind", "threshold"), [("flat", 1.0), ("ivf", 0.95), ("ivfpq", 0.9), ("hnsw", 0.9)])
def test_recall_of_each_kind_against_exact(tmp_path, kind: str, threshold: float) -> None:
    data = clustered(20_000)
    ids = np.arange(10**12, 10**12 + len(data), dtype=np.int64)[::-1].copy()  # arbitrary int64 ids
    queries = text_like_queries(data)
    entry = build_index(data, ids, tmp_path, kind=kind, model_id="m@1", tune_queries=queries)
    index = open_index(tmp_path, model_id="m@1")
    truth = ids[exact_search(data, queries, 10)]
    _, found = index.search(queries, 10)
    recall = recall_at_k(found, truth)
    assert recall >= threshold, (kind, recall, entry)
    assert entry["measured"]["recall_at_10"] >= min(threshold, 0.95) - 1e-9
    assert entry["measured"]["p50_ms"] > 0
    if kind == "ivfpq":
        (base,) = entry["segments"]
        assert entry["rerank"] and (tmp_path / f"videos.{base['id']}.vectors.npy").is_file()


def test_auto_takes_exact_search_when_ivf_would_scan_most_lists(tmp_path) -> None:
    rng = np.random.default_rng(5)
    clustered_data = clustered(12_000)
    entry = build_index(
        clustered_data, np.arange(12_000), tmp_path / "c", model_id="m", flat_max=5_000,
        tune_queries=text_like_queries(clustered_data),
    )  # fmt: skip
    assert entry["kind"] == "ivf" and "auto_choice" not in entry  # clusters: IVF reaches the target cheaply
    isotropic = rng.standard_normal((12_000, 64)).astype(np.float32)
    isotropic /= np.linalg.norm(isotropic, axis=1, keepdims=True)
    queries = rng.standard_normal((100, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    entry = build_index(
        isotropic, np.arange(12_000), tmp_path / "i", model_id="m", flat_max=5_000, tune_queries=queries
    )
    assert entry["kind"] == "flat" and "exact search chosen" in entry["auto_choice"], entry
    assert entry["measured"]["recall_at_10"] == 1.0
    forced = build_index(isotropic, np.arange(12_000), tmp_path / "f", kind="ivf", model_id="m", tune_queries=queries)
    assert forced["kind"] == "ivf"  # an explicit kind is kept


@pytest.mark.parametrize("count", [20, 40, 77])
def test_too_few_vectors_for_two_lists_are_searched_exactly(tmp_path, count: int) -> None:
    """One IVF list is an exact scan with extra steps: as few vectors as that get exact search, and say why."""
    data = clustered(count)
    entry = build_index(data, np.arange(count), tmp_path, kind="ivf", model_id="m")
    assert entry["kind"] == "flat" and "too few to train ivf (1 list)" in entry["auto_choice"], entry


def test_a_factory_string_asked_for_is_kept(tmp_path) -> None:
    """Kept as given, its compression with it, even at one list. ("np": FAISS's default polysemous training of PQ
    codes, which search here never uses, took 12 s of CPU on these 500 vectors.)"""
    chosen = build_index(clustered(500), np.arange(500), tmp_path, kind="IVF1,PQ8np", model_id="m")
    assert chosen["factory"] == "IVF1,PQ8np"


def test_training_on_few_vectors_is_said_once(tmp_path, capfd, caplog) -> None:
    """FAISS printed its warning once per clustering: 32 identical lines for the codebooks of ivfpq on 300 vectors."""
    with caplog.at_level("WARNING", logger="vitaclip.index"):
        build_index(clustered(300), np.arange(300), tmp_path, kind="ivfpq", model_id="m")
    assert "WARNING clustering" not in capfd.readouterr().err
    (said,) = [r.getMessage() for r in caplog.records if "fewer than FAISS asks for" in r.getMessage()]
    assert said.startswith("training the index on 300 vectors") and "product-quantizer clusterings of 256" in said


def test_ids_map_back_and_model_mismatch_is_refused(tmp_path) -> None:
    data = clustered(500)
    ids = np.random.default_rng(3).choice(2**62, 500, replace=False).astype(np.int64)
    build_index(data, ids, tmp_path, kind="flat", model_id="vitaclip-b16@sha256:aa")
    index = open_index(tmp_path, gpu=True)  # without faiss-gpu or a GPU: the CPU index, same results
    scores, found = index.search(data[[7, 42]], 1)
    assert found[:, 0].tolist() == [ids[7], ids[42]] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    with pytest.raises(IndexUnusableError, match="built with vitaclip-b16@sha256:aa"):
        open_index(tmp_path, model_id="vitaclip-b16@sha256:bb")
    with pytest.raises(IndexUnusableError, match="no index"):
        open_index(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="unique"):
        build_index(data[:2], np.array([1, 1]), tmp_path, model_id="x")


def test_without_text_queries_recall_holds_for_queries_as_far_as_text(tmp_path) -> None:
    from index.build import DEFAULT_QUERY_COSINE, default_queries

    data = clustered(20_000)
    ids = np.arange(len(data), dtype=np.int64)
    far = default_queries(data, 200, seed=7)  # other queries than the tuning ones, as far from the data as text
    nearest = (far @ data.T).max(axis=1)
    # As far from their nearest data vector as text sits from its nearest video (0.3-0.45 measured for CLIP text).
    assert DEFAULT_QUERY_COSINE <= float(np.median(nearest)) <= 0.5
    entry = build_index(data, ids, tmp_path, kind="ivf", model_id="m")
    assert entry["tuned_with"].startswith(f"synthetic queries at cosine {DEFAULT_QUERY_COSINE}")
    _, found = open_index(tmp_path).search(far, 10)
    recall = recall_at_k(found, ids[exact_search(data, far, 10)])
    assert recall >= 0.93, (recall, entry["search_params"])  # the 0.95 target, on queries the tuning never saw


def test_build_index_tunes_with_text_only_from_the_weights_that_made_the_rows(monkeypatch) -> None:
    """Rows of a checkpoint not given to `vitaclip build-index`: its label texts would come from other weights, so
    approximate kinds are tuned with synthetic queries (the index's ``tuned_with`` says which)."""
    import index.refresh as refresh
    from vitaclip.registry import model_id_for

    seen: dict[str, object] = {}
    monkeypatch.setattr(refresh, "build_from_output", lambda store, **options: seen.update(options) or {})
    monkeypatch.setattr(refresh, "indexed_model_id", lambda store: None)  # no index yet
    for model_id, text in (("vitaclip-tiny@sha256:" + "0" * 64, False), (model_id_for("vitaclip-tiny", None), True)):
        monkeypatch.setattr(refresh, "committed_model_ids", lambda store, ids=[model_id]: ids)
        refresh.build_index_for_output(None, model=None, checkpoint=None, kind="ivf")  # type: ignore[arg-type]
        assert seen["model_id"] == model_id and callable(seen["tune_queries"]) is text

"""Training with captions: the video-text contrastive loss, captioned lists, and `vitaclip eval-retrieval` against a
brute-force computation."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from jobs import evaluate as eval_job
from jobs import train as train_job
from vitaclip.registry import create_model
from vitaclip.training import (
    OptimizerConfig,
    TrainConfig,
    build_scaler,
    build_scheduler,
    parse_list_text,
    train_step,
    video_text_contrastive_loss,
)

LABELS = ["moving towards the camera", "moving away from the camera"]


def test_contrastive_loss_is_symmetric_infonce_by_hand() -> None:
    logits = [[2.0, 0.5, -1.0], [0.0, 1.5, 0.3], [1.0, -0.5, 0.7]]
    expected = 0.0
    for i in range(3):
        row = logits[i]
        column = [logits[j][i] for j in range(3)]
        video_to_text = -math.log(math.exp(row[i]) / sum(math.exp(v) for v in row))
        text_to_video = -math.log(math.exp(column[i]) / sum(math.exp(v) for v in column))
        expected += (video_to_text + text_to_video) / 2
    got = video_text_contrastive_loss(torch.tensor(logits), ["a", "b", "c"])
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # CLIP's loss (mean over the batch) times the batch size.
    t = torch.tensor(logits)
    clip = (F.cross_entropy(t, torch.arange(3)) + F.cross_entropy(t.t(), torch.arange(3))) / 2
    assert float(got) == pytest.approx(3 * float(clip), rel=1e-6)


def test_contrastive_loss_shares_the_target_between_identical_captions() -> None:
    logits = torch.tensor([[1.0, 3.0, 0.0], [3.0, 1.0, 0.0], [0.2, 0.1, 2.0]])
    # Videos 0 and 1 have the same caption: either caption is right for either video, so swapping them is free.
    same = video_text_contrastive_loss(logits, ["red", "red", "blue"])
    swapped = video_text_contrastive_loss(logits[[1, 0, 2]], ["red", "red", "blue"])
    assert float(same) == pytest.approx(float(swapped))
    assert float(video_text_contrastive_loss(logits, ["red", "green", "blue"])) > float(same)
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        video_text_contrastive_loss(logits, ["a", "b"])


def test_captioned_lists_csv_and_parquet(tmp_path: Path) -> None:
    text = (
        "path,label,caption\n"
        'a.mp4,0,"a square, growing"\n'
        "a.mp4,0,the square comes closer\n"
        "b.mp4,moving away from the camera,\n"
        "c.mp4,,a square going away\n"
    )
    entries = parse_list_text(text, LABELS, data_root="s3://bucket/v")
    assert [(e.uri, e.label, e.captions) for e in entries] == [
        ("s3://bucket/v/a.mp4", 0, ("a square, growing", "the square comes closer")),
        ("s3://bucket/v/b.mp4", 1, ()),
        ("s3://bucket/v/c.mp4", -1, ("a square going away",)),
    ]
    # A WebVid-style list: path and caption only.
    only = parse_list_text("video,caption\nx.mp4,one\nx.mp4,two\ny.mp4,three\n", LABELS)
    assert [(e.label, e.captions) for e in only] == [(-1, ("one", "two")), (-1, ("three",))]
    with pytest.raises(ValueError, match="two labels"):
        parse_list_text("path,label,caption\na.mp4,0,x\na.mp4,1,y\n", LABELS)
    with pytest.raises(ValueError, match="neither a label nor a caption"):
        parse_list_text("path,label,caption\na.mp4,,\n", LABELS)
    with pytest.raises(ValueError, match="expected 3 columns"):
        parse_list_text("path,label,caption\na.mp4,0\n", LABELS)
    # Headerless path,label lines are read as before.
    assert [(e.label, e.captions) for e in parse_list_text("a.mp4,1\n", LABELS)] == [(1, ())]

    table = pa.table({"path": ["p.mp4", "q.mp4"], "caption": [["first", "second"], ["third"]]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    manifest = tmp_path / "m.parquet"
    manifest.write_bytes(buffer.getvalue())
    parquet = train_job.load_entries(str(manifest), LABELS, data_root=str(tmp_path))
    assert [(Path(e.uri).name, e.label, e.captions) for e in parquet] == [
        ("p.mp4", -1, ("first", "second")),
        ("q.mp4", -1, ("third",)),
    ]
    config = TrainConfig(train_list=str(manifest), output="x", caption_loss_weight=0.0)
    with pytest.raises(ValueError, match="caption-loss-weight"):
        train_job.check_entries(parquet, config, str(manifest))
    single = TrainConfig(train_list=str(manifest), output="x", batch_size=4, micro_batch_size=1)
    with pytest.raises(ValueError, match="micro-batch-size must be 2 or more"):
        train_job.check_entries(parquet, single, str(manifest))


def _one_step(micro: list[Any], *, weight: float = 1.0) -> tuple[Any, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = create_model("vitaclip-tiny", label_names=LABELS)
    model.train()
    config = TrainConfig(train_list="x", output="x", batch_size=4, micro_batch_size=2, optimizer=OptimizerConfig(lr=1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    stats = train_step(
        model, optimizer, build_scheduler(optimizer, config), build_scaler("fp32", torch.device("cpu")), micro,
        precision="fp32", mean=model.config.mean, std=model.config.std, caption_loss_weight=weight,
    )  # fmt: skip
    return stats, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_captions_change_training_only_when_given() -> None:
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (4, 8, 3, 64, 64), dtype=torch.uint8, generator=g)
    labels, valid = torch.tensor([0, 1, 1, 0]), torch.tensor([True, True, False, True])
    plain = [(video[:2], labels[:2], valid[:2]), (video[2:], labels[2:], valid[2:])]
    no_text = [(*m, ["", ""]) for m in plain]
    texts = [["a square growing", "a square shrinking"], ["unused: invalid video", "a big square"]]
    captioned = [(*m, t) for m, t in zip(plain, texts, strict=True)]
    base_stats, base = _one_step(plain)
    for micro, weight in ((no_text, 1.0), (captioned, 0.0)):
        stats, weights = _one_step(micro, weight=weight)
        assert stats.loss == base_stats.loss and stats.caption_loss == 0.0
        for name in base:
            assert torch.equal(weights[name], base[name]), name
    stats, weights = _one_step(captioned)
    assert stats.num_captioned == 3 and stats.num_labelled == 3 and stats.caption_loss > 0
    assert any(not torch.equal(weights[n], base[n]) for n in base)

    # The caption term is the weighted InfoNCE of each micro-batch's captioned videos, over all captioned videos.
    model = create_model("vitaclip-tiny", label_names=LABELS)
    model.train()
    from vitaclip.training import normalize_video

    with torch.no_grad():
        total = 0.0
        for (v, _, ok), t in zip(plain, texts, strict=True):
            keep = [j for j in range(2) if ok[j]]
            _, logits = model(normalize_video(v, model.config.mean, model.config.std), texts=[t[j] for j in keep])
            total += float(video_text_contrastive_loss(logits[keep], [t[j] for j in keep]))
    assert stats.caption_loss == pytest.approx(total / 3, rel=1e-5)

    # Caption-only micro-batches (no labels): the label logits are skipped, the captions still train.
    unlabelled = [(m[0], torch.full_like(m[1], -1), m[2], m[3]) for m in captioned]
    only, moved = _one_step(unlabelled)
    assert only.num_labelled == 0 and only.caption_loss == pytest.approx(stats.caption_loss, rel=1e-5)
    assert any(not torch.equal(moved[n], base[n]) for n in base)


def _write_world(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    from vitaclip.demo.world import generate

    result = generate(tmp_path / "world", 12, seed=3, workers=1, size=64, num_frames=12)
    rows = [(r[0], r[1]) for r in list(csv.reader(io.StringIO(result.captions_path.read_text())))[1:]]
    assert any("," in caption for _, caption in rows)  # quoted in the CSV
    return result.captions_path, rows


def test_eval_retrieval_matches_brute_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitaclip.evaluation import ViewSpec, frame_averaging_baseline, video_embeddings

    captions_path, rows = _write_world(tmp_path)
    model = create_model("vitaclip-tiny", label_names=LABELS)
    from vitaclip.checkpoints import save_checkpoint

    save_checkpoint(model, tmp_path / "ckpt")
    plot = tmp_path / "recall.png"
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--captions", str(captions_path), "--data-root"]
    args += [str(captions_path.parent), "--num-frames", "8", "--sampling", "uniform", "--plot", str(plot)]
    capsys.readouterr()
    assert eval_job.main_retrieval([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    videos = list(dict.fromkeys(str(captions_path.parent / v) for v, _ in rows))
    spec = ViewSpec(num_frames=8, size=model.image_size, sampling="uniform", stride=16, temporal_views=1)
    for key, m in (("model", model), ("baseline", frame_averaging_baseline(model))):
        feats, errors = video_embeddings(m, videos, spec)
        assert not any(errors)
        with torch.inference_mode():
            text = m.encode_text([c for _, c in rows]).float()
        sim = (text @ feats.float().t()).numpy()  # [captions, videos]
        owner = np.array([videos.index(str(captions_path.parent / v)) for v, _ in rows])
        t2v = [1 + int((sim[i] > sim[i, owner[i]]).sum()) for i in range(len(rows))]
        v2t = [1 + int((sim[:, v] > sim[owner == v, v].max()).sum()) for v in range(len(videos))]
        got = report if key == "model" else report["baseline"]
        for name, ranks in (("text_to_video", t2v), ("video_to_text", v2t)):
            ranks_np = np.array(ranks)
            for k in (1, 5, 10):
                assert got[name][f"r{k}"] == pytest.approx(100 * float((ranks_np <= k).mean()), abs=1e-6), (key, name)
            assert got[name]["median_rank"] == pytest.approx(float(np.median(ranks_np)))
            curve = got[name]["recall_curve"]
            assert curve[0] == got[name]["r1"] and curve[-1] == 100.0 and curve == sorted(curve)

    capsys.readouterr()
    assert eval_job.main_retrieval(args) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "frame averaging" in out and str(plot) in out


def test_caption_only_fine_tune_from_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A WebVid-style list (path, caption; no labels) fine-tunes a checkpoint with the same command."""
    from vitaclip.checkpoints import save_checkpoint

    captions_path, _ = _write_world(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    save_checkpoint(create_model("vitaclip-tiny", label_names=LABELS), tmp_path / "start")
    output = tmp_path / "out"
    args = ["--local", "--model", "vitaclip-tiny", "--checkpoint", str(tmp_path / "start"), "--train-list"]
    args += [str(captions_path), "--data-root", str(captions_path.parent), "--label-names", str(labels)]
    args += ["--output", str(output), "--steps", "3", "--batch-size", "4", "--micro-batch-size", "4"]
    args += ["--num-frames", "4", "--sampling", "uniform", "--log-every", "1", "--decode-threads", "2"]
    assert train_job.main(args) == 0
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["captioned_videos"] == 4 and r["caption_loss"] > 0 for r in records)
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["last"]["step"] == 3
    # The trained prompts moved; the frozen CLIP did not.
    before = create_model(None, checkpoint=tmp_path / "start")
    after = create_model(None, checkpoint=train_job.resolve_checkpoint(str(output)))
    moved = [n for n, p in after.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])]
    assert moved and all(not n.startswith("clip.") for n in moved)
    capsys.readouterr()
    assert train_job.main([*args, "--caption-loss-weight", "0", "--output", str(tmp_path / "o2")]) == 2
    assert "caption-only training needs --caption-loss-weight > 0" in capsys.readouterr().err

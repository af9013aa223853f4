"""Evaluation: metrics computed by hand, views softmax-averaged, zero-shot split logic, retrieval, the CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import evaluate as eval_job
from vitaclip import evaluation as ev
from vitaclip.registry import create_model
from vitaclip.samples import write_sample_video

# ------------------------------------------------------------------------------------------------ metrics


def test_views_are_softmax_averaged() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 4.0]]])  # [N=1, V=2, K=3]
    p1 = np.exp([2.0, 0, 0]) / np.exp([2.0, 0, 0]).sum()
    p2 = np.exp([0, 0, 4.0]) / np.exp([0, 0, 4.0]).sum()
    np.testing.assert_allclose(ev.average_view_probabilities(logits)[0], (p1 + p2) / 2)
    # Averaging logits would pick class 2 as well, but with another margin: check the softmax is per view.
    assert not np.allclose(ev.average_view_probabilities(logits)[0], torch.tensor([1.0, 0, 2.0]).softmax(0).numpy())


def test_classification_metrics_by_hand() -> None:
    names = ["a", "b", "c", "d", "e", "f"]
    probs = np.array(
        [
            [0.9, 0.1, 0, 0, 0, 0],  # label 0: top-1 right
            [0.5, 0.4, 0.1, 0, 0, 0],  # label 1: 2nd -> top-5 only
            [0.3, 0.2, 0.15, 0.14, 0.12, 0.09],  # label 5: 6th -> missed by top-5
            [0, 0, 0.2, 0.8, 0, 0],  # label 3: right
        ]
    )
    m = ev.classification_metrics(probs, [0, 1, 5, 3], names)
    assert m["top1"] == pytest.approx(50.0)
    assert m["top5"] == pytest.approx(75.0)
    assert m["num_videos"] == 4
    assert m["per_class"] == {"a": 100.0, "b": 0.0, "c": None, "d": 100.0, "e": None, "f": 0.0}
    assert m["mean_class_accuracy"] == pytest.approx(50.0)
    matrix = ev.confusion_matrix(probs.argmax(axis=1), [0, 1, 5, 3], 6)
    assert matrix[1, 0] == 1 and matrix[5, 0] == 1 and matrix[0, 0] == 1 and matrix.sum() == 4


def test_retrieval_metrics_by_hand() -> None:
    # 3 videos; captions 0,1 describe video 0, caption 2 video 1, caption 3 video 2.
    sim = np.array(
        [
            [0.9, 0.1, 0.2],  # caption 0 -> video 0 ranks 1st
            [0.1, 0.5, 0.3],  # caption 1 -> video 0 ranks 3rd
            [0.8, 0.7, 0.1],  # caption 2 -> video 1 ranks 2nd
            [0.0, 0.1, 0.6],  # caption 3 -> video 2 ranks 1st
        ]
    )
    m = ev.retrieval_metrics(sim, [0, 0, 1, 2])
    t2v = m["text_to_video"]
    assert (t2v["r1"], t2v["r5"], t2v["r10"]) == (50.0, 100.0, 100.0)
    assert t2v["median_rank"] == 1.5 and t2v["mean_rank"] == pytest.approx(7 / 4)
    # Video 0: captions by score 0(0.9), 2(0.8), 1(0.1), 3(0.0): its best caption (0) is 1st.
    # Video 1: 2(0.7), 1(0.5), 0(0.1), 3(0.1): its caption 2 is 1st.
    # Video 2: 3(0.6), 1(0.3), 0(0.2), 2(0.1): its caption 3 is 1st.
    v2t = m["video_to_text"]
    assert v2t["r1"] == 100.0 and v2t["median_rank"] == 1.0
    m2 = ev.retrieval_metrics(np.array([[0.1, 0.9], [0.8, 0.2]]), [0, 1])
    assert m2["text_to_video"]["r1"] == 0.0 and m2["text_to_video"]["median_rank"] == 2.0
    assert m2["video_to_text"]["mean_rank"] == 2.0


# ------------------------------------------------------------------------------------------------ zero-shot splits


def test_packaged_class_lists() -> None:
    hmdb, ucf = ev.load_class_list("hmdb51"), ev.load_class_list("ucf101")
    assert len(hmdb) == 51 and len(set(hmdb)) == 51 and hmdb[0] == "brush_hair"
    assert len(ucf) == 101 and len(set(ucf)) == 101 and ucf[0] == "ApplyEyeMakeup"


def test_kinetics600_novel_classes_and_seeded_subsets() -> None:
    k400 = [f"action {i}" for i in range(400)]
    # K600 holds the K400 names (written differently) and 220 new ones.
    k600 = [f"Action_{i}" for i in range(0, 400, 2)] + [f"new (thing) {i}" for i in range(220)]
    k600 += [f"action {i}" for i in range(1, 400, 2)]
    novel = ev.kinetics600_novel_classes(k600, k400)
    assert novel == [f"new (thing) {i}" for i in range(220)]
    subsets = ev.kinetics600_subsets(novel, seed=0)
    assert len(subsets) == 3 and all(len(s) == 160 and len(set(s)) == 160 for s in subsets)
    assert all(set(s) <= set(novel) for s in subsets)
    assert all(s == sorted(s, key=novel.index) for s in subsets)  # original order kept
    assert len({tuple(s) for s in subsets}) == 3
    assert ev.kinetics600_subsets(novel, seed=0) == subsets
    assert ev.kinetics600_subsets(novel, seed=1)[0] == subsets[1]  # subset i uses seed + i
    with pytest.raises(ValueError, match="220"):
        ev.kinetics600_novel_classes([n for n in k600 if n != "new (thing) 0"], k400)  # a wrong class file
    entries = [("v0", 400), ("v1", 0), ("v2", 619)]
    restricted = ev.restrict_to_classes(entries, k600, subsets[0])
    assert all(subsets[0][y] in novel for _, y in restricted)
    assert ("v1", 0) not in restricted


def test_hmdb51_and_ucf101_split_files(tmp_path: Path) -> None:
    names = ["brush_hair", "cartwheel"]
    (tmp_path / "brush_hair_test_split1.txt").write_text("a.avi 1\nb.avi 2\nc.avi 0\n")
    (tmp_path / "cartwheel_test_split1.txt").write_text("d.avi 2 \ne.avi 1\n")
    assert ev.read_hmdb51_split(tmp_path, 1, class_names=names) == [("brush_hair/b.avi", 0), ("cartwheel/d.avi", 1)]
    with pytest.raises(ValueError, match="missing"):
        ev.read_hmdb51_split(tmp_path, 2, class_names=names)
    testlist = tmp_path / "testlist01.txt"
    testlist.write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nArchery/v_Archery_g01_c01.avi\n")
    assert ev.read_ucf101_split(testlist) == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", 0),
        ("Archery/v_Archery_g01_c01.avi", 2),
    ]
    mean, std = ev.mean_std([48.0, 49.0, 48.8])
    assert mean == pytest.approx(48.6) and std == pytest.approx(np.std([48.0, 49.0, 48.8]))


# ------------------------------------------------------------------------------------------------ views and CLIs


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_training import growing_square_frames, write_lossless

    root = tmp_path_factory.mktemp("eval-videos")
    for i in range(3):
        frames = growing_square_frames(200 + i, num_frames=40)
        write_lossless(root / f"v{i}.mkv", frames)
    (root / "labels.txt").write_text("red\ngreen\nblue\n")
    (root / "list.csv").write_text("v0.mkv,0\nv1.mkv,1\nv2.mkv,2\n")
    (root / "captions.csv").write_text('video,caption\nv0.mkv,a square\nv1.mkv,"grows, fast"\nv2.mkv,a box\n')
    return {"root": root}


def test_several_views_are_decoded_and_softmax_averaged(videos: dict[str, Path]) -> None:
    model = create_model("vitaclip-tiny", label_names=["red", "green", "blue"])
    spec = ev.ViewSpec(num_frames=4, size=64, sampling="dense", stride=4, temporal_views=3, spatial_views=1)
    views = ev.decode_views(str(videos["root"] / "v0.mkv"), num_frames=4, size=64, stride=4, temporal_views=3)
    assert views.shape == (3, 4, 64, 64, 3)
    assert not np.array_equal(views[0], views[2])  # three different stretches of the video
    uris = [str(videos["root"] / f"v{i}.mkv") for i in range(3)]
    with torch.inference_mode():
        feats = model.encode_labels(["red", "green", "blue"])
        logits, errors = ev.video_logits(model, uris, feats, spec, batch_size=2, threads=2)
        assert logits.shape == (3, 3, 3) and errors == ["", "", ""]
        x = (
            (torch.from_numpy(views).permute(0, 1, 4, 2, 3).float() / 255)
            - torch.tensor(model.config.mean).view(1, 1, 3, 1, 1)
        ) / torch.tensor(model.config.std).view(1, 1, 3, 1, 1)
        direct = model.logit_scale.exp() * model.encode_video(x) @ feats.t()  # [V, K]
    np.testing.assert_allclose(logits[0], direct.numpy(), rtol=1e-4, atol=1e-4)
    metrics, probs = ev.evaluate_classification(
        model, list(zip(uris, [0, 1, 2], strict=True)), ["red", "green", "blue"], spec
    )
    np.testing.assert_allclose(probs, ev.average_view_probabilities(logits), rtol=1e-5, atol=1e-6)
    assert metrics["views"] == "3x1" and metrics["num_videos"] == 3
    two_by_two = ev.decode_views(uris[0], num_frames=4, size=64, stride=4, temporal_views=2, spatial_views=2)
    assert two_by_two.shape == (4, 4, 64, 64, 3)


def test_spatial_views_are_crops_along_the_longer_side() -> None:
    wide = np.random.default_rng(0).integers(0, 256, size=(2, 64, 113, 3), dtype=np.uint8)  # [T, H, W, 3]
    left, middle, right = ev.spatial_crops(wide, 64, 3)
    np.testing.assert_array_equal(left, wide[:, :, 0:64])
    np.testing.assert_array_equal(middle, wide[:, :, 24:88])  # margin 49: 49 // 2
    np.testing.assert_array_equal(right, wide[:, :, 49:113])
    (centre,) = ev.spatial_crops(wide, 64, 1)
    np.testing.assert_array_equal(centre, middle)
    tall = wide.transpose(0, 2, 1, 3)  # [T, 113, 64, 3]
    np.testing.assert_array_equal(ev.spatial_crops(tall, 64, 3)[2], tall[:, 49:113])
    with pytest.raises(ValueError, match="shorter side"):
        ev.spatial_crops(wide, 48, 3)


def test_three_spatial_views_of_a_wide_video_cover_it_end_to_end(tmp_path: Path) -> None:
    from vitaclip.video import Dense, decode_clips

    path = write_sample_video(tmp_path / "wide.mp4", num_frames=24, fps=12, width=160, height=90, seed=2)
    views = ev.decode_views(str(path), num_frames=4, size=64, stride=2, temporal_views=1, spatial_views=3)
    assert views.shape == (3, 4, 64, 64, 3)
    (whole,) = decode_clips(str(path), Dense(4, stride=2), size=64, crop="none")
    assert whole.frames.shape == (4, 64, 114, 3)  # 160x90 with the shorter side at 64
    for view, offset in zip(views, (0, 25, 50), strict=True):
        np.testing.assert_array_equal(view, whole.frames[:, :, offset : offset + 64])


def test_eval_cli_json_baseline_and_confusion_png(
    videos: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from vitaclip.checkpoints import save_checkpoint

    model = create_model("vitaclip-tiny", label_names=["red", "green", "blue"])
    save_checkpoint(model, tmp_path / "ckpt")
    root = videos["root"]
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--list", str(root / "list.csv"), "--data-root", str(root)]
    args += ["--label-names", str(root / "labels.txt"), "--num-frames", "4", "--stride", "4", "--views", "3x1"]
    png = tmp_path / "confusion.png"
    assert eval_job.main([*args, "--json", "--baseline", "--confusion-png", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"top1", "top5", "num_videos", "per_class", "baseline"} <= set(report)
    assert report["num_videos"] == 3 and report["top5"] == 100.0 and report["views"] == "3x1"
    assert set(report["per_class"]) == {"red", "green", "blue"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert eval_job.main([*args, "--list", str(root / "list.csv"), "--mode", "zero-shot"]) == 0
    out = capsys.readouterr().out
    assert "+/-" in out
    assert eval_job.main([*args[:-2], "--views", "3y1"]) == 2
    # A listed video that is not there counts as a wrong answer, and the text report says so.
    (tmp_path / "with-missing.csv").write_text("v0.mkv,0\nnope.mkv,1\n")
    assert eval_job.main([*args, "--list", str(tmp_path / "with-missing.csv")]) == 0
    out = capsys.readouterr().out
    assert "1 listed video(s) could not be read or decoded: counted as wrong" in out, out
    assert "nope.mkv" in caplog.text and "1 of 2 videos could not be read" in caplog.text, caplog.text


def test_eval_retrieval_cli(videos: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = videos["root"]
    rows = eval_job.read_captions(str(root / "captions.csv"), data_root=str(root))
    assert rows[1] == (str(root / "v1.mkv"), "grows, fast")
    args = ["--model", "vitaclip-tiny", "--random-weights", "--captions", str(root / "captions.csv")]
    args += ["--data-root", str(root), "--num-frames", "4", "--sampling", "uniform", "--json", "--baseline"]
    assert eval_job.main_retrieval(args) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("text_to_video", "video_to_text"):
        assert 1.0 <= report[key]["median_rank"] <= 3.0
        assert report[key]["r10"] == 100.0
    assert report["num_captions"] == 3 and report["num_videos"] == 3 and "baseline" in report


def test_eval_on_ray_with_default_resources_finishes(videos: dict[str, Path], tmp_path: Path) -> None:
    """``--ray`` with no resource flag: decoders sized to this machine (2 CPUs in CI), run in a guarded subprocess."""
    from test_training import run_guarded

    from vitaclip.checkpoints import save_checkpoint

    save_checkpoint(create_model("vitaclip-tiny", label_names=["red", "green", "blue"]), tmp_path / "ckpt")
    root = videos["root"]
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--list", str(root / "list.csv"), "--data-root", str(root)]
    args += ["--label-names", str(root / "labels.txt"), "--num-frames", "4", "--stride", "4", "--views", "1x1"]
    proc = run_guarded(["-m", "jobs.evaluate", *args, "--ray", "--json"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert report["num_videos"] == 3 and report["decode_errors"] == 0


def test_eval_decoders_are_sized_to_the_cluster_or_refused() -> None:
    from jobs.ray_resources import Cluster, plan_decode_pool

    def plan(cpus: float, num_videos: int, workers: int | None = None, cpus_each: float | None = None) -> str:
        args = eval_job.EvalConfig(decode_workers=workers, decode_cpus=cpus_each)
        cluster = Cluster(cpus=cpus, gpus=0, free_cpus=cpus, node_cpus=cpus, node_gpus=0)
        return plan_decode_pool(args, cluster, num_videos, videos_per_batch=4).describe()

    assert plan(2, 100) == "up to 2 decoders x 1 CPU"
    assert plan(16, 100) == "up to 16 decoders x 1 CPU"
    assert plan(16, 10) == "up to 3 decoders x 1 CPU"  # one per batch of 4 videos at most
    assert plan(0.5, 100) == "up to 1 decoder x 0.5 CPUs"
    assert plan(2, 100, workers=4) == "up to 4 decoders x 0.5 CPUs"
    with pytest.raises(ValueError, match=r"the evaluation needs 3 CPUs .*\(3 decoders x 1 CPU\) but the Ray cluster"):
        plan(2, 100, workers=3, cpus_each=1)

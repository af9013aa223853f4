"""Training: recipe pieces, a short run that learns what frame averaging cannot, exact resume after SIGKILL, Ray Train.

The videos: a square that grows (moving towards the camera) or shrinks (moving away). Each "away" video is the exact
time reverse of a "towards" video (lossless FFV1, so the decoded frames are identical), so the two classes have the
same set of frames and only their order tells them apart: a frame-averaging model scores every pair identically and
is at exactly 50% on the held-out pairs, whatever it learns. (A randomly initialised tiny ViT barely sees where a
small shape is, so a left/right motion would not reach the prompts through its frozen features; the size of the
shape does.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

import vitaclip
from jobs import evaluate as eval_job
from jobs import train as train_job
from vitaclip.checkpoints import save_checkpoint
from vitaclip.labels import load_label_set
from vitaclip.registry import create_model, get_model_config
from vitaclip.training import (
    AugmentConfig,
    EpochOrder,
    OptimizerConfig,
    TrainClipSource,
    TrainConfig,
    augment_clip,
    build_optimizer,
    latest_checkpoint,
    position_for,
    sample_rng,
)

LABELS = ["moving towards the camera", "moving away from the camera"]
REPO = Path(__file__).resolve().parents[1]


def growing_square_frames(seed: int, *, num_frames: int = 15, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 60, size=3).astype(np.uint8)
    colour = rng.integers(150, 256, size=3).astype(np.uint8)
    cy, cx = (int(v) for v in rng.integers(24, 41, size=2))
    frames = []
    for t in range(num_frames):
        half = 3 + 25 * t // (num_frames - 1)
        image = np.empty((size, size, 3), np.uint8)
        image[:] = background
        image[max(0, cy - half) : cy + half, max(0, cx - half) : cx + half] = colour
        frames.append(image)
    return frames


def write_lossless(path: Path, frames: list[np.ndarray], fps: int = 15) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv444p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def write_pairs(folder: Path, seeds: range, list_name: str) -> Path:
    lines = []
    for seed in seeds:
        frames = growing_square_frames(seed)
        write_lossless(folder / f"towards-{seed}.mkv", frames)
        write_lossless(folder / f"away-{seed}.mkv", frames[::-1])
        lines += [f"towards-{seed}.mkv,0", f"away-{seed}.mkv,1"]
    path = folder / list_name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def motion_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("motion")
    labels = root / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    return {
        "root": root,
        "labels": labels,
        "train": write_pairs(root, range(0, 16), "train.csv"),
        "heldout": write_pairs(root, range(100, 110), "heldout.csv"),
    }


def train_args(data: dict[str, Path], output: Path, *extra: str) -> list[str]:
    return [
        "--local",
        "--model",
        "vitaclip-tiny",
        "--train-list",
        str(data["train"]),
        "--data-root",
        str(data["root"]),
        "--label-names",
        str(data["labels"]),
        "--output",
        str(output),
        "--num-frames",
        "8",
        "--stride",
        "2",
        "--crop-scale",
        "0.6",
        "1.0",
        "--randaug-num-ops",
        "1",
        "--randaug-magnitude",
        "3",
        "--decode-threads",
        "2",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(motion_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """vitaclip-tiny and its all-prompts-off twin, trained the same way (the baseline can only learn logit_scale)."""
    out: dict[str, Path] = {}
    for name in ("vitaclip-tiny", "clip-tiny-frames"):
        output = tmp_path_factory.mktemp(name)
        args = train_args(motion_data, output, "--steps", "70", "--batch-size", "16", "--micro-batch-size", "8")
        args[args.index("vitaclip-tiny")] = name
        args += ["--lr", "1e-2", "--save-every", "35", "--keep-last", "1", "--log-every", "5"]
        if name == "vitaclip-tiny":
            args += ["--val-list", str(motion_data["heldout"]), "--eval-every", "35"]
        assert train_job.main(args) == 0
        out[name] = output
    return out


def evaluate_json(capsys: pytest.CaptureFixture[str], args: list[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert eval_job.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_training_learns_what_frame_averaging_cannot(
    trained: dict[str, Path], motion_data: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--list", str(motion_data["heldout"]), "--data-root", str(motion_data["root"])]
    common += ["--label-names", str(motion_data["labels"]), "--num-frames", "8", "--stride", "2", "--views", "3x1"]
    vita = evaluate_json(capsys, ["--checkpoint", str(trained["vitaclip-tiny"]), *common, "--baseline"])
    base = evaluate_json(capsys, ["--checkpoint", str(trained["clip-tiny-frames"]), *common])
    assert vita["num_videos"] == base["num_videos"] == 20
    assert vita["views"] == "3x1"
    assert set(vita["per_class"]) == set(LABELS)
    # Frame averaging gives a video and its time reverse the same scores: exactly one of each pair is right.
    assert base["top1"] == pytest.approx(50.0)
    assert vita["baseline"]["top1"] == pytest.approx(50.0)
    assert vita["top1"] >= 85.0, vita
    assert vita["top1"] - base["top1"] >= 30.0


def test_training_updates_only_the_trainable_set(trained: dict[str, Path]) -> None:
    output = trained["vitaclip-tiny"]
    start = create_model("vitaclip-tiny", label_names=LABELS)
    final = latest_checkpoint(output)
    assert final is not None and final.name == "step-000000070"
    weights = safetensors.torch.load_file(str(final / "model.safetensors"))
    trainable = set(start.trainable_parameter_names())
    assert "logit_scale" in trainable and "temporal.weight" in trainable
    assert not any(n.startswith(("clip.", "cls_proj.")) for n in trainable)
    for name, before in start.state_dict().items():
        if name in trainable:
            assert not torch.equal(before, weights[name]), f"{name} did not train"
        else:
            assert torch.equal(before, weights[name]), f"frozen {name} changed"
    state = torch.load(final / "training_state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == len(trainable)  # no optimizer state for frozen weights
    assert state["step"] == 70 and state["samples_seen"] == 70 * 16
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["trainable_parameters"] == sum(p.numel() for n, p in start.named_parameters() if n in trainable)
    assert summary["trainable_parameters"] < summary["total_parameters"] / 10
    lines = [json.loads(ln) for ln in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(5, 75, 5))
    assert {"loss", "accuracy", "lr", "videos_per_second"} <= set(lines[-1])
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert [r["step"] for r in lines if "val_top1" in r] == [35, 70]
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["step-000000070"]  # keep_last=1


def test_optimizer_refuses_frozen_weights() -> None:
    model = create_model("vitaclip-tiny", label_names=LABELS)
    config = TrainConfig(train_list="x", output="x")
    optimizer = build_optimizer(model, config)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(not p.requires_grad for p in model.clip.parameters())
    assert not in_optimizer & {id(p) for p in model.clip.parameters()}
    model.clip.visual.conv1.weight.requires_grad_(True)  # a backbone weight slipping into the trainable set
    with pytest.raises(AssertionError, match="frozen backbone"):
        build_optimizer(model, config)


def test_resume_refuses_damaged_weights(tmp_path: Path) -> None:
    """Resuming checks the weights' recorded sha256: a damaged copy (same size, other bytes) is refused."""
    from vitaclip.checkpoints import CheckpointError
    from vitaclip.training import load_training_checkpoint, save_training_checkpoint
    from vitaclip.training.optim import build_scaler, build_scheduler

    model = create_model("vitaclip-tiny", label_names=LABELS)
    config = TrainConfig(train_list="x", output="x")
    optimizer = build_optimizer(model, config)
    scheduler, scaler = build_scheduler(optimizer, config), build_scaler("fp32", torch.device("cpu"))
    folder = save_training_checkpoint(tmp_path / "step", model, optimizer, scheduler, scaler, step=3, samples_seen=6)
    assert load_training_checkpoint(folder, model, optimizer, scheduler, scaler).step == 3
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor: still a well-formed safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_training_checkpoint(folder, model, optimizer, scheduler, scaler)


def test_resume_refuses_a_malformed_state_and_weights_the_loader_would_refuse(tmp_path: Path) -> None:
    """A training state of another shape, and weights that would broadcast, change dtype class or hold NaN, are
    refused naming the file, before anything is copied into the model."""
    from vitaclip.training import load_training_checkpoint, save_training_checkpoint
    from vitaclip.training.optim import build_scaler, build_scheduler
    from vitaclip.training.state import _check_resumed_weights

    model = create_model("vitaclip-tiny", label_names=LABELS)
    config = TrainConfig(train_list="x", output="x")
    optimizer = build_optimizer(model, config)
    scheduler, scaler = build_scheduler(optimizer, config), build_scaler("fp32", torch.device("cpu"))
    folder = save_training_checkpoint(tmp_path / "step", model, optimizer, scheduler, scaler, step=3, samples_seen=6)
    state_file = folder / "training_state.pt"
    saved = torch.load(state_file, weights_only=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for state, said in (
        ([1, 2], "not a vitaclip training state"),
        ({k: v for k, v in saved.items() if k != "rng"}, "lacks ['rng']"),
        ({**saved, "step": -1}, "whole numbers"),
        ({**saved, "trainable": "temporal"}, "list of parameter names"),
    ):
        torch.save(state, state_file)
        with pytest.raises(ValueError, match=re.escape(said)) as refused:
            load_training_checkpoint(folder, model, optimizer, scheduler, scaler)
        assert str(state_file) in str(refused.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    own = model.state_dict()
    name = next(n for n, v in own.items() if v.ndim == 2)
    for value, said in (
        (torch.ones(1), "has shape (1,)"),
        (torch.zeros(own[name].shape, dtype=torch.int64), "torch.int64"),
        (torch.full(own[name].shape, float("nan")), "NaN"),
    ):
        with pytest.raises(ValueError, match=re.escape(said)):
            _check_resumed_weights({**own, name: value}, own, folder)


def test_resume_after_sigkill_matches_an_uninterrupted_run(
    motion_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = ["--steps", "8", "--batch-size", "8", "--micro-batch-size", "4", "--lr", "5e-3", "--warmup-steps", "2"]
    recipe += ["--save-every", "3", "--keep-last", "5", "--log-every", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train_job.main(train_args(motion_data, straight, *recipe)) == 0

    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "run_train_with_crash.py"),
            "3",
            "--",
            *train_args(motion_data, killed, *recipe),
        ],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step-000000003"]
    assert not (killed / "train_summary.json").exists()

    # The state at the kill equals the uninterrupted run's at the same step: step, optimizer, scheduler, position.
    at_kill = torch.load(killed / "checkpoints/step-000000003/training_state.pt", weights_only=True)
    reference = torch.load(straight / "checkpoints/step-000000003/training_state.pt", weights_only=True)
    assert at_kill["step"] == reference["step"] == 3
    assert at_kill["samples_seen"] == reference["samples_seen"] == 24
    assert at_kill["scheduler"] == reference["scheduler"]
    for key, value in reference["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(at_kill["optimizer"]["state"][key][name], tensor), (key, name)

    # Another schedule is refused (it would change the learning rate mid-run), before anything is trained.
    other = [*recipe[:1], "12", *recipe[2:]]
    capsys.readouterr()
    assert train_job.main(train_args(motion_data, killed, *other)) == 2
    assert "steps: 8 there, 12 now" in capsys.readouterr().err
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step-000000003"]
    assert train_job.main(train_args(motion_data, killed, *recipe)) == 0
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 3
    capsys.readouterr()
    assert train_job.main(train_args(motion_data, killed, *recipe)) == 0  # finished: says so, trains nothing
    assert f"nothing to train: {killed} has reached step 8 already" in capsys.readouterr().out
    final_a = safetensors.torch.load_file(str(straight / "checkpoints/step-000000008/model.safetensors"))
    final_b = safetensors.torch.load_file(str(killed / "checkpoints/step-000000008/model.safetensors"))
    for name, tensor in final_a.items():
        assert torch.equal(tensor, final_b[name]), name
    state_a = torch.load(straight / "checkpoints/step-000000008/training_state.pt", weights_only=True)
    state_b = torch.load(killed / "checkpoints/step-000000008/training_state.pt", weights_only=True)
    assert state_a["scheduler"] == state_b["scheduler"]
    metrics_a = [json.loads(ln)["loss"] for ln in (straight / "metrics.jsonl").read_text().splitlines()]
    metrics_b = [json.loads(ln)["loss"] for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert metrics_a == metrics_b  # one line per step, no duplicates from the killed attempt


def test_ray_train_two_workers_on_s3(
    motion_data: dict[str, Path], s3_bucket: tuple[Any, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DDP on two CPU workers, data streamed by Ray Data from S3, checkpoints written to S3 and resumed from there."""
    import ray

    client, bucket = s3_bucket
    for path in motion_data["root"].iterdir():
        client.put_object(Bucket=bucket, Key=f"data/{path.name}", Body=path.read_bytes())
    endpoint = client.meta.endpoint_url
    output = f"s3://{bucket}/run"
    args = train_args(motion_data, tmp_path, "--steps", "4", "--batch-size", "8", "--micro-batch-size", "2")
    args.remove("--local")
    args[args.index("--train-list") + 1] = f"s3://{bucket}/data/train.csv"
    args[args.index("--data-root") + 1] = f"s3://{bucket}/data"
    args[args.index("--output") + 1] = output
    args += ["--num-workers", "2", "--save-every", "2", "--keep-last", "1"]  # CPUs and decoders: sized to the machine
    args += ["--s3-endpoint-url", endpoint, "--log-every", "1"]
    scratch_before = _scratch_folders()
    try:
        assert train_job.main(args) == 0
        _check_s3_outputs(client, bucket, output, endpoint, capsys)
        # Checkpoints on their way up, and those downloaded to evaluate, leave nothing in the temporary folder.
        assert _scratch_folders() - scratch_before == set()
    finally:
        ray.shutdown()


def _scratch_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("vitaclip-train-*"))


def _check_s3_outputs(client: Any, bucket: str, output: str, endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]}
    assert "run/checkpoints/step-000000004/config.json" in keys
    assert not any(k.startswith("run/checkpoints/step-000000002/") for k in keys)  # keep_last=1
    summary = json.loads(client.get_object(Bucket=bucket, Key="run/train_summary.json")["Body"].read())
    assert summary["world_size"] == 2 and summary["last"]["step"] == 4 and summary["last"]["valid_videos"] == 8
    # The S3 output folder is a checkpoint for evaluation (its latest one), on disk while it is used.
    with train_job.checkpoint_on_disk(output, s3_endpoint_url=endpoint) as local:
        model = create_model(None, checkpoint=local)
    assert model.label_names == tuple(LABELS)
    assert Path(local).name == "step-000000004" and not Path(local).exists()
    # Evaluation straight from S3: the run's output folder as the checkpoint, list and videos on S3.
    capsys.readouterr()
    eval_args = [
        "--checkpoint",
        output,
        "--list",
        f"s3://{bucket}/data/heldout.csv",
        "--data-root",
        f"s3://{bucket}/data",
    ]
    eval_args += ["--label-names", f"s3://{bucket}/data/labels.txt", "--num-frames", "8", "--stride", "2"]
    eval_args += ["--views", "1x1", "--s3-endpoint-url", endpoint, "--ray", "--json"]
    assert eval_job.main(eval_args) == 0  # decoded on Ray Data actors, read from S3
    report = json.loads(capsys.readouterr().out)
    assert report["num_videos"] == 20 and report["decode_errors"] == 0


# ------------------------------------------------------------------------------------------------ Ray resources

RAY_RUN_TIMEOUT_SECONDS = 300  # a Ray job that waits for resources never ends; this fails it instead of the suite


def run_guarded(argv: list[str], *, timeout: float = RAY_RUN_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
    """``python argv`` from the repository in its own process group, without ``RAY_ADDRESS`` (an embedded Ray of this
    machine's CPUs). Past ``timeout`` the whole group is stopped and the test fails with the end of the log."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the driver stops its embedded Ray on SIGTERM
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out, err = "", ""
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes share the driver's group
        except ProcessLookupError:
            pass
        try:
            proc.communicate(timeout=30)  # a process that left the group may hold the pipes open
        except subprocess.TimeoutExpired:
            pass
        pytest.fail(
            f"{' '.join(argv[:2])} still running after {timeout:.0f} s (waiting for resources?):\n{err[-4000:]}"
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ray_train_with_default_resources_finishes(motion_data: dict[str, Path], tmp_path: Path) -> None:
    """The Ray path with no resource flag, on the machine running the tests (2 CPUs in CI). The old fixed defaults (a
    1-CPU worker, two 1-CPU decoders and a 1-CPU read task) needed 4 CPUs and sat at step 0 for ever on 2."""
    output = tmp_path / "out"
    # A captioned list (several captions for some videos): captions travel through the Ray Data stream too.
    captioned = tmp_path / "captioned.csv"
    rows = [line.split(",") for line in motion_data["train"].read_text().split()]
    words = {"0": ["a square growing", "the square comes closer"], "1": ["a square shrinking"]}
    captioned.write_text("path,label,caption\n" + "".join(f"{p},{lbl},{c}\n" for p, lbl in rows for c in words[lbl]))
    args = train_args(motion_data, output, "--steps", "2", "--batch-size", "4", "--micro-batch-size", "2")
    args[args.index("--train-list") + 1] = str(captioned)
    args.remove("--local")
    args += ["--num-frames", "4", "--log-every", "1"]
    # Paths relative to where the command runs: Ray's workers run elsewhere, so the driver makes them absolute (a
    # relative --output put the checkpoints under Ray's session folder; a relative label file crashed the worker).
    for flag in ("--output", "--label-names"):
        args[args.index(flag) + 1] = os.path.relpath(args[args.index(flag) + 1], REPO)
    proc = run_guarded(["-m", "jobs.train", *args])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["world_size"] == 1 and summary["last"]["step"] == 2 and summary["last"]["valid_videos"] == 4
    assert summary["last"]["captioned_videos"] == 4 and summary["last"]["caption_loss"] > 0
    # The sizes the driver chose are recorded, and they fit the cluster it reported.
    used = json.loads((output / "train_resources.json").read_text())
    cluster = re.search(r"Ray cluster of ([\d.]+) CPUs? and ([\d.]+) GPUs?", proc.stderr)
    assert cluster is not None, proc.stderr[-4000:]
    assert used["num_workers"] == 1 and used["decode_workers"] >= 1
    assert used["cpus_per_worker"] + used["decode_workers"] * used["decode_cpus"] <= float(cluster.group(1))


def test_ray_train_refuses_at_once_what_the_cluster_cannot_hold(motion_data: dict[str, Path], tmp_path: Path) -> None:
    args = train_args(motion_data, tmp_path / "out", "--steps", "2", "--batch-size", "8", "--micro-batch-size", "2")
    args.remove("--local")
    args += ["--num-cpus", "2", "--num-workers", "4", "--cpus-per-worker", "2"]
    proc = run_guarded(["-m", "jobs.train", *args], timeout=120)
    assert proc.returncode == 2, proc.stderr[-4000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "python -m jobs.train: error: the run needs 8.4 CPUs and 0 GPUs (4 training workers x 2 CPUs, "
    )
    assert "but the Ray cluster has 2 CPUs and" in line and "--num-workers" in line
    assert not (tmp_path / "out" / "train_config.json").exists()  # refused before anything started


def test_resources_are_sized_to_the_cluster() -> None:
    from jobs.ray_resources import Cluster, plan_resources

    def plan(cpus: float, gpus: float = 0, *, node_cpus: float | None = None, **options: Any) -> str:
        cluster = Cluster(cpus=cpus, gpus=gpus, free_cpus=cpus, node_cpus=node_cpus or cpus, node_gpus=gpus)
        recipe = {k: options.pop(k) for k in ("batch_size", "micro_batch_size") if k in options}
        ray = train_job.RayTrainConfig(**options)
        config = TrainConfig(train_list="x", output="y", world_size=ray.world_size, **recipe)
        return plan_resources(config, ray, cluster).describe()

    assert plan(1) == "1 training worker x 0.5 CPUs, each fed by up to 1 decoder x 0.5 CPUs"
    assert plan(2) == "1 training worker x 1 CPU, each fed by up to 1 decoder x 1 CPU"
    assert plan(16) == "1 training worker x 8 CPUs, each fed by up to 8 decoders x 1 CPU"
    assert plan(2, 1) == "1 training worker x (1 CPU, 1 GPU), each fed by up to 1 decoder x 1 CPU"
    assert plan(96, 8) == "8 training workers x (1 CPU, 1 GPU), each fed by up to 11 decoders x 1 CPU"
    # One worker per GPU, as many as divide the batch (256 / 16 per micro-batch: 1, 2, 4, 8, 16 workers).
    assert plan(12, 6).startswith("4 training workers x (1 CPU, 1 GPU), each fed by up to 2 decoders")
    # Options given are used as they are; the rest fills what they leave.
    assert plan(2, num_workers=2, batch_size=8, micro_batch_size=2) == (
        "2 training workers x 0.5 CPUs, each fed by up to 1 decoder x 0.5 CPUs"
    )
    assert plan(4, decode_workers=4) == "1 training worker x 2 CPUs, each fed by up to 4 decoders x 0.5 CPUs"
    with pytest.raises(ValueError, match=r"needs 4 CPUs and 0 GPUs \(1 training worker x 1 CPU, 3 decoders x 1 CPU\)"):
        plan(2, decode_workers=3, decode_cpus=1)
    with pytest.raises(ValueError, match=r"needs 2 CPUs and 1 GPU .* has 2 CPUs and 0 GPUs"):
        plan(2, use_gpu=True)
    with pytest.raises(ValueError, match="a training worker needs 4 CPUs and 0 GPUs on one node but the largest node"):
        plan(8, node_cpus=2, cpus_per_worker=4)


# ------------------------------------------------------------------------------------------------ unit pieces


def test_augmentation_is_identical_across_frames_and_repeatable() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    clip = np.stack([frame] * 6)  # [T, H, W, 3]
    config = AugmentConfig(randaug_num_ops=4, randaug_magnitude=9, hflip_prob=0.5)
    for position in range(20):
        out = augment_clip(clip, config, sample_rng(0, position), size=32)
        assert out.shape == (6, 3, 32, 32) and out.dtype == torch.uint8
        assert all(torch.equal(out[0], out[t]) for t in range(1, 6)), position
        assert torch.equal(out, augment_clip(clip, config, sample_rng(0, position), size=32))


def test_data_positions_are_a_function_of_the_step() -> None:
    batch, world = 12, 3
    seen = []
    for rank in range(world):
        seen += [position_for(i, rank=rank, world_size=world, batch_size=batch, start_step=0) for i in range(40)]
    by_step: dict[int, set[int]] = {}
    for step, pos in seen:
        by_step.setdefault(step, set()).add(pos)
    for step in range(10):
        assert by_step[step] == set(range(step * batch, (step + 1) * batch))
    resumed = [position_for(i, rank=1, world_size=world, batch_size=batch, start_step=5) for i in range(8)]
    assert resumed == [position_for(i + 20, rank=1, world_size=world, batch_size=batch, start_step=0) for i in range(8)]
    order = EpochOrder(7, seed=3)
    epoch0 = [order(p) for p in range(7)]
    assert sorted(epoch0) == list(range(7))
    assert [EpochOrder(7, seed=3)(p) for p in range(14)] == [order(p) for p in range(14)]


def test_config_defaults_are_the_official_recipe_and_yaml_flags_override(tmp_path: Path) -> None:
    c = TrainConfig(train_list="x", output="y")
    assert (c.model, c.num_frames, c.sampling, c.stride) == ("vitaclip-b16", None, "dense", 16)
    o, a = c.optimizer, c.augment
    assert (o.lr, o.weight_decay, c.steps, c.batch_size, o.warmup_steps) == (4e-4, 0.05, 30000, 256, 0)
    assert (a.randaug_num_ops, a.randaug_magnitude, a.randaug_magnitude_std, o.precision) == (4, 7.0, 0.5, "auto")
    assert TrainConfig.from_dict(c.to_dict()) == c  # the nested form written to train_config.json reads back
    assert TrainConfig.from_dict({"train_list": "x", "output": "y", "lr": 0.1, "crop_scale": [0.5, 1]}) == c.replace(
        optimizer=dataclasses.replace(o, lr=0.1), augment=dataclasses.replace(a, crop_scale=(0.5, 1.0))
    )  # the flat form of flags and YAML files
    with pytest.raises(ValueError, match="unknown training options \\['num_workers'\\]"):
        TrainConfig.from_dict({"num_workers": 2})  # where a run runs is the job's, not the recipe's
    config_b16 = get_model_config("vitaclip-b16")
    assert config_b16.num_frames == 8 and config_b16.num_global_prompts == 8 and config_b16.summary_token
    assert config_b16.text_context is not None and config_b16.text_context.num_tokens == 8
    assert config_b16.text_context.kind == "class_specific" and config_b16.num_local_prompts > 0
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("train_list: a.csv\noutput: out\nsteps: 10\nbatch-size: 32\nlr: 0.001\n")
    config, ray = train_job.config_from_args(["--config", str(yaml_file), "--steps", "20", "--local"])
    assert (config.train_list, config.steps, config.batch_size, config.optimizer.lr, ray.local) == (
        os.path.abspath("a.csv"),  # workers run in another folder
        20,
        32,
        1e-3,
        True,
    )
    with pytest.raises(ValueError, match="--label-names missing-labels.txt: No such file"):
        train_job.config_from_args(["--config", str(yaml_file), "--label-names", "missing-labels.txt"])
    # Without --label-names, the model's own label set (a resumed run's: those it recorded): Kinetics-400 was every
    # model's default, and a caption-only run of vitaclip-demo saved a checkpoint that labelled the demo's videos with
    # Kinetics' names.
    assert config.label_names == "" and train_job.with_label_names(config, None).label_names == "kinetics400"
    recorded = json.dumps({**config.to_dict(), "label_names": "hmdb51"})
    assert train_job.with_label_names(config, recorded).label_names == "hmdb51"
    demo = Path(vitaclip.__file__).parent / "pretrained" / "vitaclip-demo"
    for flags in (["--model", "vitaclip-demo"], ["--model", "vitaclip-demo", "--checkpoint", str(demo)]):
        config, _ = train_job.config_from_args(["--config", str(yaml_file), *flags])
        assert train_job.with_label_names(config, None).label_names == "demo"
    assert train_job.load_label_names("demo")[0] == "red circle moving left"
    # A checkpoint trained here records its labels: those, when they are a packaged set; else --label-names.
    for names, expected in ((load_label_set("hmdb51"), "hmdb51"), (LABELS, None)):
        saved = tmp_path / f"ck-{len(names)}"
        save_checkpoint(create_model("vitaclip-tiny", label_names=list(names)), saved)
        config, _ = train_job.config_from_args(["--config", str(yaml_file), "--checkpoint", str(saved)])
        if expected is not None:
            assert train_job.with_label_names(config, None).label_names == expected
        else:
            with pytest.raises(ValueError, match=f"trained on {len(LABELS)} labels of its own.*give --label-names"):
                train_job.with_label_names(config, None)
    labelless = tmp_path / "labelless.json"
    labelless.write_text(json.dumps({**json.loads(get_model_config("vitaclip-tiny").to_json()), "label_set": None}))
    config, _ = train_job.config_from_args(["--config", str(yaml_file), "--model", str(labelless)])
    with pytest.raises(ValueError, match="has no label set of its own: give --label-names"):
        train_job.with_label_names(config, None)
    with pytest.raises(ValueError, match="multiple"):
        TrainConfig(train_list="x", output="y", batch_size=10, micro_batch_size=4)
    assert train_job.main(["--config", str(yaml_file), "--batch-size", "30", "--micro-batch-size", "7"]) == 2


def test_latest_checkpoint_and_list_parsing(tmp_path: Path) -> None:
    from vitaclip.checkpoints import save_checkpoint
    from vitaclip.training import parse_list_text

    assert latest_checkpoint(tmp_path) is None
    model = create_model("vitaclip-tiny", label_names=LABELS)
    for step in (5, 10):
        save_checkpoint(model, tmp_path / "checkpoints" / f"step-{step:09d}")
    (tmp_path / "checkpoints" / "step-000000020").mkdir()  # incomplete: no config.json
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000000010"
    assert latest_checkpoint(tmp_path / "checkpoints" / "step-000000005") == tmp_path / "checkpoints/step-000000005"
    entries = parse_list_text(
        "a.mp4,1\n# comment\n\nsub/b.mp4,moving towards the camera\n/abs/c.mp4,moving_away_from_the_camera\n",
        LABELS,
        data_root="s3://bucket/videos/",
    )
    assert [(e.uri, e.label) for e in entries] == [
        ("s3://bucket/videos/a.mp4", 1),
        ("s3://bucket/videos/sub/b.mp4", 0),
        ("/abs/c.mp4", 1),
    ]
    with pytest.raises(ValueError, match="out of range"):
        parse_list_text("a.mp4,2\n", LABELS)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_skips_undecodable_videos_and_accumulates(precision: str) -> None:
    from vitaclip.training import build_scaler, build_scheduler, train_step

    def run(micro: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        model = create_model("vitaclip-tiny", label_names=LABELS)
        model.train()
        config = TrainConfig(
            train_list="x", output="x", batch_size=4, micro_batch_size=2, optimizer=OptimizerConfig(lr=1.0)
        )
        # Plain SGD: the update is the gradient itself, so the comparison below compares gradients.
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        stats = train_step(
            model,
            optimizer,
            build_scheduler(optimizer, config),
            build_scaler(precision, torch.device("cpu")),
            micro,
            precision=precision,
            mean=model.config.mean,
            std=model.config.std,
        )
        assert stats.num_videos == 2
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (4, 8, 3, 64, 64), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 1, 0])
    # Two micro-batches, one video each invalid (a failed decode), against one micro-batch of the two valid videos.
    split = [
        (video[:2], labels[:2], torch.tensor([True, False])),
        (video[2:], labels[2:], torch.tensor([False, True])),
    ]
    together = [(video[[0, 3]], labels[[0, 3]], torch.tensor([True, True]))]
    a, b = run(split), run(together)
    for name in a:
        if precision == "fp32":
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
        else:  # bf16 autocast (the GPU recipe, here on CPU): too coarse to compare gradients, but it must train
            assert torch.isfinite(a[name]).all() and torch.isfinite(b[name]).all()


@pytest.mark.gpu
def test_train_throughput_on_gpu_has_no_frozen_gradients() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_throughput

    args = train_throughput.argparse.Namespace(
        model="vitaclip-tiny", batch_size=4, num_frames=None, num_labels=10, steps=2, warmup=1, device="cuda"
    )
    result = train_throughput.measure(args)
    assert result["precision"] == "bf16" and result["frozen_parameters_with_grad"] == 0


def test_training_clips_start_at_random_frames_as_the_official_trainer(tmp_path: Path) -> None:
    from vitaclip.samples import read_frame_index, write_sample_video

    path = write_sample_video(tmp_path / "v.mp4", num_frames=60, fps=24, width=64, height=64, seed=1)
    plain = dict(
        augment=AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), randaug_num_ops=0, decode_scale=1.0)
    )

    def first_frames(config: TrainConfig) -> list[int]:
        source = TrainClipSource([(str(path), 0)], config=config, num_frames=4, image_size=64)
        firsts = []
        for position in range(40):
            video, _, valid = source.clip_at(position)  # uint8 [T, 3, S, S]
            assert valid
            indices = [read_frame_index(f.permute(1, 2, 0).numpy()) for f in video]
            assert np.diff(indices).tolist() == [4, 4, 4]  # stride 4 from wherever it starts
            firsts.append(indices[0])
        return firsts

    jittered = first_frames(TrainConfig(sampling="dense", stride=4, **plain))  # type: ignore[arg-type]
    assert len(set(jittered)) >= 20 and min(jittered) >= 0 and max(jittered) <= 47  # starts 0 .. 47 possible
    assert jittered == first_frames(TrainConfig(sampling="dense", stride=4, **plain))  # type: ignore[arg-type]
    centre = first_frames(TrainConfig(sampling="dense", stride=4, temporal_jitter=False, **plain))  # type: ignore[arg-type]
    assert set(centre) == {23}

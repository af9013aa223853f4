"""The procedural demo world: labels and their split, determinism, file formats, and labels that are true on screen.

Truth is measured from pixels, independently of the generator's geometry: a pixel belongs to the shape when it is
farther from the background's base colour than half the colour distance, and per frame we take the mask's area and
centroid. Videos are real H.264 files written and decoded with PyAV.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from vitaclip.demo import world
from vitaclip.demo.__main__ import main
from vitaclip.demo.world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, DemoVideo

REPO = Path(__file__).resolve().parents[1]
NUM_WORLD_LABELS = 6 * 4 * 9 - 6


def _one_label_per_motion() -> list[str]:
    """Nine labels: every motion once, every shape and colour at least once, no rotating circle."""
    colours = list(COLOURS)
    return [f"{colours[i % 6]} {SHAPES[(i + 1) % 4]} {motion}" for i, motion in enumerate(MOTIONS)]


# ------------------------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Track:
    masks: np.ndarray  # [T, H, W] bool
    area: np.ndarray  # [T] pixels
    x: np.ndarray  # [T] centroid column
    y: np.ndarray  # [T] centroid row
    rgb: np.ndarray  # [3] median colour of the masks' interior pixels


def _track(frames: np.ndarray, spec: DemoVideo) -> Track:
    """Segment the shape in ``frames``.  # frames: [T, H, W, 3] uint8"""
    shape_rgb = np.asarray(COLOURS[spec.colour], dtype=np.float32)
    background_rgb = np.asarray(BACKGROUNDS[spec.background], dtype=np.float32)
    threshold = 0.5 * float(np.linalg.norm(shape_rgb - background_rgb))
    distance = np.linalg.norm(frames.astype(np.float32) - background_rgb, axis=-1)  # [T, H, W]
    masks = distance > threshold
    area = masks.sum(axis=(1, 2)).astype(np.float64)
    assert area.min() > 20, f"{spec.name}: shape not found ({area.min()} pixels)"
    rows = np.arange(frames.shape[1], dtype=np.float64)
    cols = np.arange(frames.shape[2], dtype=np.float64)
    y = (masks.sum(axis=2) * rows).sum(axis=1) / area
    x = (masks.sum(axis=1) * cols).sum(axis=1) / area
    interior = masks.copy()  # erode by one pixel: edges mix in the background (and chroma is subsampled)
    interior[:, 1:, :] &= masks[:, :-1, :]
    interior[:, :-1, :] &= masks[:, 1:, :]
    interior[:, :, 1:] &= masks[:, :, :-1]
    interior[:, :, :-1] &= masks[:, :, 1:]
    rgb = np.median(frames[interior].astype(np.float64), axis=0)
    return Track(masks=masks, area=area, x=x, y=y, rgb=rgb)


def _direction_changes(values: np.ndarray, *, min_step: float) -> int:
    steps = np.diff(values)
    signs = np.sign(steps[np.abs(steps) >= min_step])
    return int(np.count_nonzero(signs[1:] != signs[:-1]))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a & b) / np.count_nonzero(a | b))


def _check_label_is_true(frames: np.ndarray, spec: DemoVideo) -> None:
    """Assert that the pixels of ``frames`` show ``spec.label``.  # frames: [T, H, W, 3] uint8"""
    side = frames.shape[1]
    track = _track(frames, spec)
    where = f"{spec.name} ({spec.caption}, {spec.texture})"

    colour_error = float(np.linalg.norm(track.rgb - np.asarray(COLOURS[spec.colour])))
    assert colour_error < 30, f"{where}: shape colour {track.rgb} is {colour_error:.0f} from {spec.colour}"
    border = track.masks.copy()
    border[:, 1:-1, 1:-1] = False
    assert not border.any(), f"{where}: the shape touches the frame edge"

    drift = max(np.ptp(track.x), np.ptp(track.y))
    area_ratio = track.area[-1] / track.area[0]
    clear_move = 0.25 * side  # generated moves are 35-55% of the side
    if spec.motion.startswith("moving"):
        along, across = (track.x, track.y) if spec.motion in ("moving left", "moving right") else (track.y, track.x)
        sign = -1.0 if spec.motion in ("moving left", "moving up") else 1.0
        assert sign * (along[-1] - along[0]) > clear_move, f"{where}: moved {along[-1] - along[0]:+.1f} px"
        assert (sign * np.diff(along) > -0.5).all(), f"{where}: not monotonic: {np.round(along, 1)}"
        assert np.ptp(across) < 0.03 * side, f"{where}: drifted {np.ptp(across):.1f} px across the motion"
        assert abs(area_ratio - 1) < 0.1, f"{where}: area changed by {area_ratio:.2f}"
    elif spec.motion in ("growing", "shrinking"):
        expected = area_ratio if spec.motion == "growing" else 1 / area_ratio
        assert expected > 2.0, f"{where}: area ratio last/first {area_ratio:.2f}"
        assert drift < 1.5, f"{where}: centre moved {drift:.2f} px"
    elif spec.motion == "staying still":
        assert drift < 0.5, f"{where}: centre moved {drift:.2f} px"
        assert np.ptp(track.area) / track.area.mean() < 0.03, f"{where}: area varied {np.ptp(track.area)} px"
    elif spec.motion == "bouncing":
        assert _direction_changes(track.y, min_step=0.3) >= 2, f"{where}: vertical path {np.round(track.y, 1)}"
        assert np.ptp(track.y) > 0.2 * side, f"{where}: bounced only {np.ptp(track.y):.1f} px"
        assert np.ptp(track.x) < 1.0, f"{where}: moved sideways {np.ptp(track.x):.2f} px"
    elif spec.motion == "rotating":
        assert np.ptp(track.area) / track.area.mean() < 0.15, f"{where}: area varied {np.ptp(track.area)} px"
        assert drift < 1.5, f"{where}: centre moved {drift:.2f} px"
        t = len(frames)
        middle = range(t // 3, 2 * t // 3 + 1)
        least = min(_iou(track.masks[0], track.masks[i]) for i in middle)
        assert least < 0.9, f"{where}: mask hardly changed (IoU {least:.2f})"
    else:
        raise AssertionError(f"untested motion {spec.motion!r}")


def _decode(path: Path) -> np.ndarray:
    """Every frame of ``path`` as RGB.  # [T, H, W, 3] uint8"""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------- labels


def test_world_labels() -> None:
    labels = world.world_labels()
    assert len(labels) == NUM_WORLD_LABELS == len(set(labels))
    assert labels[0] == "red circle moving left"
    assert labels[-1] == "white star bouncing"
    assert labels[7:9] == ("red circle bouncing", "red square moving left")  # no "red circle rotating" between
    assert not [label for label in labels if "circle rotating" in label]
    assert world.world_labels() == labels
    for label in labels:
        colour, shape, motion = world.parse_label(label)
        assert f"{colour} {shape} {motion}" == label
        assert colour in COLOURS and shape in SHAPES and motion in MOTIONS
    with pytest.raises(ValueError, match="not a demo world label"):
        world.parse_label("red circle rotating")


def _pairs(labels: tuple[str, ...]) -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for label in labels:
        colour, shape, motion = world.parse_label(label)
        out |= {("cs", colour, shape), ("sm", shape, motion), ("cm", colour, motion)}
    return out


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_split_labels_covers_every_part_and_pair(seed: int) -> None:
    seen, unseen = world.split_labels(seed)
    assert (seen, unseen) == world.split_labels(seed)
    assert not set(seen) & set(unseen)
    assert sorted(seen + unseen) == sorted(world.world_labels())
    assert len(unseen) == round(0.25 * NUM_WORLD_LABELS)
    order = {label: i for i, label in enumerate(world.world_labels())}
    assert list(seen) == sorted(seen, key=order.__getitem__)
    assert list(unseen) == sorted(unseen, key=order.__getitem__)
    assert _pairs(seen) == _pairs(world.world_labels())  # every possible pair, hence every part, is seen
    parts = [set(world.parse_label(label)[k] for label in seen) for k in range(3)]
    assert parts == [set(COLOURS), set(SHAPES), set(MOTIONS)]


def test_split_labels_seed_and_fraction() -> None:
    assert world.split_labels(0)[1] != world.split_labels(1)[1]
    assert world.split_labels(0, 0.0) == (world.world_labels(), ())
    seen, unseen = world.split_labels(3, 0.9)  # infeasible: stops where the pairs would run out
    assert 0 < len(unseen) < round(0.9 * NUM_WORLD_LABELS)
    assert _pairs(seen) == _pairs(world.world_labels())
    with pytest.raises(ValueError, match="unseen_fraction"):
        world.split_labels(0, 1.0)
    assert world.labels_for_split("test", seed=4) == world.split_labels(4)[1]
    assert world.labels_for_split("train", seed=4) == world.labels_for_split("val", seed=4) == world.split_labels(4)[0]
    assert world.labels_for_split("all") == world.world_labels()


# ----------------------------------------------------------------------------------------------------------- specs


def test_video_specs_are_balanced_and_deterministic() -> None:
    specs = world.video_specs(2 * NUM_WORLD_LABELS + 5, seed=0)
    counts = Counter(spec.label for spec in specs)
    assert set(counts) == set(world.world_labels())
    assert set(counts.values()) == {2, 3}
    assert specs == world.video_specs(len(specs), seed=0)
    assert specs[:7] == world.video_specs(7, seed=0)  # a spec depends on (seed, index), not on how many
    assert specs[:7] != world.video_specs(7, seed=1)

    subset = world.world_labels()[::21]  # 10 labels
    few = world.video_specs(25, seed=3, labels=reversed(subset))
    assert sorted(Counter(spec.label for spec in few).values()) == [2] * 5 + [3] * 5
    assert few == world.video_specs(25, seed=3, labels=subset)  # order of the list does not matter

    for spec in specs:
        assert spec.name == f"demo-{spec.index:06d}"
        assert spec.label == f"{spec.colour} {spec.shape} {spec.motion}"
        assert spec.caption == f"a {spec.label} on a {spec.background} background"
        assert_captions_describe(spec)
        assert spec.background in world.backgrounds_for(spec.colour)
        assert not (spec.colour == "blue" and spec.background == "navy")
        assert spec.texture in world.TEXTURES
    assert {spec.background for spec in specs} == set(BACKGROUNDS)
    assert {spec.texture for spec in specs} == set(world.TEXTURES)
    assert world.video_specs(1, seed=0, prefix="train-")[0].name == "train-demo-000000"


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="not a demo world label"):
        world.video_specs(3, 0, labels=["red circle dancing"])
    with pytest.raises(ValueError, match="empty"):
        world.video_specs(3, 0, labels=[])
    with pytest.raises(ValueError, match="seed"):
        world.video_specs(3, -1)
    with pytest.raises(ValueError, match="prefix"):
        world.video_specs(3, 0, prefix="../x")
    spec = world.video_specs(1, 0)[0]
    with pytest.raises(ValueError, match="even"):
        world.render_frames(spec, size=127)


# --------------------------------------------------------------------------------------------- labels are true


def test_rendered_frames_show_their_labels() -> None:
    """Every motion and shape, on many backgrounds and textures, straight from the renderer."""
    specs = world.video_specs(72, seed=7, labels=[*_one_label_per_motion(), *world.world_labels()[::7]])
    assert {spec.motion for spec in specs} == set(MOTIONS)
    assert {spec.shape for spec in specs} == set(SHAPES)
    for spec in specs:
        frames = world.render_frames(spec)
        assert frames.shape == (24, 128, 128, 3) and frames.dtype == np.uint8
        _check_label_is_true(frames, spec)
    small = world.render_frames(specs[0], size=64, num_frames=8)
    assert small.shape == (8, 64, 64, 3)
    _check_label_is_true(small, specs[0])


@pytest.fixture(scope="module")
def labelled_videos(tmp_path_factory: pytest.TempPathFactory) -> tuple[world.GeneratedDemo, list[DemoVideo]]:
    out = tmp_path_factory.mktemp("labelled")
    labels = _one_label_per_motion()
    result = world.generate(out, len(labels), seed=11, labels=labels, workers=1)
    return result, world.video_specs(len(labels), seed=11, labels=labels)


def test_decoded_videos_show_their_labels(labelled_videos: tuple[world.GeneratedDemo, list[DemoVideo]]) -> None:
    result, specs = labelled_videos
    assert {spec.motion for spec in specs} == set(MOTIONS)
    assert {spec.shape for spec in specs} == set(SHAPES)
    assert {spec.colour for spec in specs} == set(COLOURS)
    for spec, path in zip(specs, result.video_paths, strict=True):
        assert path.name == f"{spec.name}.mp4"
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.codec_context.pix_fmt == "yuv420p"
            assert (stream.codec_context.width, stream.codec_context.height) == (128, 128)
            assert stream.average_rate == 12
        frames = _decode(path)
        assert frames.shape == (24, 128, 128, 3)
        _check_label_is_true(frames, spec)


# ----------------------------------------------------------------------------------------------------------- files


def test_output_files(labelled_videos: tuple[world.GeneratedDemo, list[DemoVideo]]) -> None:
    result, specs = labelled_videos
    out = result.out_dir
    assert result.num_videos == len(specs) == 9
    assert sorted(p.name for p in out.iterdir()) == [
        "captions.csv",
        "labels.txt",
        "list.csv",
        "manifest.jsonl",
        "videos",
    ]
    assert sorted(p.name for p in (out / "videos").iterdir()) == [f"{spec.name}.mp4" for spec in specs]

    list_lines = result.list_path.read_text().splitlines()
    assert list_lines == [f"videos/{spec.name}.mp4,{spec.label}" for spec in specs]  # no header
    for line in list_lines:
        assert re.fullmatch(r"videos/demo-\d{6}\.mp4,[a-z]+ [a-z]+ [a-z ]+", line)

    with result.captions_path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["video", "caption"]
    assert rows[1:] == [[f"videos/{spec.name}.mp4", c] for spec in specs for c in spec.captions]
    for spec in specs:
        assert len(set(spec.captions)) == world.CAPTIONS_PER_VIDEO  # several phrasings of one video

    order = {label: i for i, label in enumerate(world.world_labels())}
    labels = result.labels_path.read_text().splitlines()
    assert labels == sorted({spec.label for spec in specs}, key=order.__getitem__) == list(result.labels)

    records = [json.loads(line) for line in result.manifest_path.read_text().splitlines()]
    for record, spec in zip(records, specs, strict=True):
        assert record["path"] == f"videos/{spec.name}.mp4"
        assert world.spec_from_manifest(record) == spec
        assert (record["width"], record["height"], record["num_frames"], record["fps"]) == (128, 128, 24, 12)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    first = world.generate(tmp_path / "a", 5, seed=3, workers=1)
    assert first.num_videos == 5
    world.generate(tmp_path / "b", 5, seed=3, workers=1)
    world.generate(tmp_path / "c", 5, seed=3, workers=2)
    world.generate(tmp_path / "d", 5, seed=4, workers=1)
    a, b, c, d = (_folder_bytes(tmp_path / name) for name in "abcd")
    assert len(a) == 5 + 4
    assert a == b, "same seed, different bytes"
    assert a == c, "the worker count changed the output"
    assert a.keys() == d.keys()
    for key in a:
        assert a[key] != d[key], f"{key} is the same for seeds 3 and 4"

    files = sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file())
    os.utime(files[0], ns=(0, 0))  # an old copy of the same bytes: kept too
    (tmp_path / "a" / "videos" / first.video_paths[1].name).write_bytes(b"damaged")
    before = {p: p.stat().st_mtime_ns for p in files}
    world.generate(tmp_path / "a", 5, seed=3, workers=2)  # a re-run overwrites in place
    assert _folder_bytes(tmp_path / "a") == a
    # What holds its bytes already is left alone, modification time included (a local listing's ETag follows it:
    # the quickstart run again re-embedded all its videos); the damaged file is written again.
    changed = {p for p in files if p.stat().st_mtime_ns != before[p]}
    assert changed == {tmp_path / "a" / "videos" / first.video_paths[1].name}
    assert files[0].stat().st_mtime_ns == 0


def test_generate_split_keeps_splits_apart(tmp_path: Path) -> None:
    seen, unseen = world.split_labels(5)
    seeds = {split: world.split_video_seed(split, 5) for split in world.SPLITS}
    assert seeds["all"] == 5 and len(set(seeds.values())) == 4
    result = world.generate_split(tmp_path, "test", 4, seed=5, workers=1)
    assert set(result.labels) <= set(unseen)
    assert [p.name for p in result.video_paths] == [f"test-demo-{i:06d}.mp4" for i in range(4)]
    train = world.video_specs(3, seeds["train"], seen)
    val = world.video_specs(3, seeds["val"], seen)
    assert [s.video_seed for s in train] != [s.video_seed for s in val]


# ------------------------------------------------------------------------------------------------- command line


def test_cli_generate_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "vitaclip.demo", "generate", str(out), "--num-videos", "3", "--seed", "2"]
    done = subprocess.run(
        [*args, "--split", "train", "--workers", "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 3 videos" in done.stdout
    assert str(out / "list.csv") in done.stdout
    assert "3/3" in done.stderr  # the progress bar
    lines = (out / "list.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"videos/train-demo-{i:06d}.mp4" for i in range(3)]
    assert {line.split(",")[1] for line in lines} <= set(world.split_labels(2)[0])
    for name in ("captions.csv", "labels.txt", "manifest.jsonl"):
        assert (out / name).stat().st_size > 0
    assert _decode(out / "videos" / "train-demo-000000.mp4").shape == (24, 128, 128, 3)


def test_cli_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", str(tmp_path), "--num-videos", "2", "--workers", "1", "--size", "64", "--num-frames", "8"]
    assert main(argv) == 0
    assert "wrote 2 videos" in capsys.readouterr().out
    assert _decode(tmp_path / "videos" / "demo-000001.mp4").shape == (8, 64, 64, 3)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--size", "63"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main([])


def test_generator_does_not_import_torch() -> None:
    code = "import sys, vitaclip.demo.world, vitaclip.demo.__main__; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_frame_captions_follow_the_shape_and_never_name_the_motion() -> None:
    from dataclasses import asdict

    squares = [label for label in world.world_labels() if " square " in label]
    specs = {s.motion: s for s in world.video_specs(18, seed=4, labels=squares)}
    left = specs["moving left"]
    first, last = world.frame_caption(left, 0.0), world.frame_caption(left, 1.0)
    assert "left" in last.split() and "left" not in first.split(), (first, last)

    def size_rank(caption: str) -> int:  # small < (unnamed) medium < large
        words = caption.split()
        return 0 if "small" in words else 2 if "large" in words else 1

    for motion, sign in (("growing", 1), ("shrinking", -1)):
        spec = specs[motion]
        change = size_rank(world.frame_caption(spec, 1.0)) - size_rank(world.frame_caption(spec, 0.0))
        assert change * sign > 0, motion
    still = specs["staying still"]
    assert world.frame_caption(still, 0.0) == world.frame_caption(still, 1.0)
    for spec in specs.values():
        caption = world.frame_caption(spec, 0.5)
        assert caption.endswith(f"on a {spec.background} background")
        assert not {"moving", "growing", "shrinking", "rotating", "staying", "bouncing"} & set(caption.split())
    record = {"path": "videos/x.mp4", "fps": 12, "num_frames": 24, **asdict(left)}
    assert world.spec_from_manifest(record) == left


def assert_captions_describe(spec: world.DemoVideo) -> None:
    """Each caption names the video's colour, one word of its shape, motion and background, in demo words only."""
    from vitaclip.demo.vocab import DEMO_WORDS

    for caption in spec.captions:
        assert set(re.findall(r"[a-z]+", caption)) <= set(DEMO_WORDS), caption
        assert spec.colour in caption.split()
        assert any(re.search(rf"\b{w}\b", caption) for w in world.SHAPE_WORDS[spec.shape]), caption
        assert any(re.search(rf"\b{p}\b", caption) for p in world.MOTION_PHRASES[spec.motion]), caption
        assert any(re.search(rf"\b{w}\b", caption) for w in world.BACKGROUND_WORDS[spec.background]), caption


def test_captions_vary_in_phrasing_and_leave_the_pixels_alone() -> None:
    specs = world.video_specs(200, seed=5)
    captions = [c for spec in specs for c in spec.captions]
    starts = Counter(" ".join(c.split()[:2]) for c in captions)
    assert len(starts) >= 8  # no single template
    assert max(starts.values()) < 0.35 * len(captions)
    words = Counter(w for c in captions for w in c.split())
    for synonym in ("spinning", "ball", "box", "grey", "jumping"):
        assert words[synonym] > 0, synonym
    # Captions come from a stream of their own: every other field is what it was without them.
    spec = specs[17]
    assert spec.captions == world.captions_for(spec.label, spec.background, seed=5, index=17)
    assert world.video_specs(18, seed=5)[17] == spec

"""Deterministic procedural videos: one coloured shape doing one thing on a textured background, with a caption.

A video is described by a frozen `DemoVideo` spec drawn from ``(seed, index)`` alone (plus the label list it is drawn
from). Rendering is a pure function of the spec and the frame size, and encoding runs libx264 on one thread, so the
same seed writes byte-identical MP4 files whatever the number of worker processes.

Conventions: positions and sizes are fractions of the frame side, x to the right and y down; angles are degrees,
positive turning clockwise on screen. A shape's size is the diameter of its circumscribed circle, so "inside the
frame" holds at any rotation.

Only numpy, Pillow and PyAV are imported here: generator workers never load torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, get_args

import av
import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------- world

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 240),
    "yellow": (250, 220, 40),
    "purple": (170, 60, 220),
    "white": (245, 245, 245),
}
"""Shape colours in world order (name -> RGB)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
"""Shapes in world order."""

MOTIONS: tuple[str, ...] = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "growing",
    "shrinking",
    "rotating",
    "staying still",
    "bouncing",
)
"""Motions in world order; each is the exact phrase used in labels and captions."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (110, 70, 35),
    "navy": (20, 30, 110),
}
"""Background base colours (name -> RGB); the name is the one used in captions."""

Texture = Literal["solid", "gradient", "noise"]
TEXTURES: tuple[Texture, ...] = get_args(Texture)
"""Background textures: flat, a linear gradient, or static low-amplitude noise (fixed for the whole video)."""

MIN_CONTRAST = 150.0
"""Smallest RGB distance between a shape colour and its background's base colour.

Textures move a background pixel by at most ``_TEXTURE_STRENGTH_RANGE[1]`` (22) from its base, far below half of this,
so a shape stays separable from any textured background. The pairs it rules out are red/brown, green/gray,
green/brown, blue/gray, blue/navy and purple/gray; every colour keeps at least two backgrounds.
"""

Split = Literal["train", "val", "test", "all"]
SPLITS: tuple[Split, ...] = get_args(Split)
"""Dataset splits of `generate_split`: train and val use the seen labels, test the unseen ones, all every label."""

_SHAPE_SIZE_RANGE = (0.20, 0.34)  # circumscribed diameter at scale 1 (the mid-clip size when growing or shrinking)
_MOVE_DISTANCE_RANGE = (0.35, 0.55)  # translation over the clip
_SCALE_FACTOR_RANGE = (1.7, 2.0)  # last/first size ratio when growing (first/last when shrinking)
_ROTATION_DEGREES_RANGE = (90.0, 180.0)
_BOUNCE_HEIGHT_RANGE = (0.30, 0.42)
_BOUNCES_PER_CLIP_RANGE = (2.0, 2.5)  # floor contacts per clip; kept low so 8 sampled frames still see each bounce
_TEXTURE_STRENGTH_RANGE = (8.0, 22.0)  # largest offset from the base colour, 0-255 units
_TILT_DEGREES = 15.0  # non-rotating shapes start tilted by up to this much either way
_CENTRE_RANGE = (0.3, 0.7)  # where a centre is drawn along an axis the motion leaves free
_EDGE_MARGIN = 0.02  # gap kept between the shape's circumscribed circle and the frame edge
_STAR_INNER_RATIO = 0.45  # radius of a star's inner corners relative to its points
_SUPERSAMPLE = 4  # the shape mask is drawn at this many times the frame size, then box-filtered (anti-aliasing)
_CRF = 20

# Separate random streams; each key is a fixed-length list (trailing zeros would alias keys of different length).
_STREAM_VIDEO = 1
_STREAM_LABEL_ORDER = 2
_STREAM_TEXTURE = 3
_STREAM_CAPTION = 4

_NAME_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]*")


def _unit_polygon(shape: str) -> np.ndarray:
    """Corners of ``shape`` with circumradius 1, centred on the origin, upright at angle 0.  # [K, 2] (x, y)"""
    if shape == "square":
        angles = np.deg2rad(45.0 + 90.0 * np.arange(4))
        radii = np.ones(4)
    elif shape == "triangle":
        angles = np.deg2rad(-90.0 + 120.0 * np.arange(3))  # -90 degrees points up (y is down)
        radii = np.ones(3)
    elif shape == "star":
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER_RATIO)
    else:
        raise ValueError(f"no polygon for shape {shape!r}; polygons exist for square, triangle and star")
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_UNIT_POLYGONS: dict[str, np.ndarray] = {shape: _unit_polygon(shape) for shape in SHAPES if shape != "circle"}


def _is_world_combination(shape: str, motion: str) -> bool:
    # A spinning circle looks exactly like a still one, so that combination is left out of the world.
    return not (shape == "circle" and motion == "rotating")


def world_labels() -> tuple[str, ...]:
    """Every label of the world, ``"{colour} {shape} {motion}"``, in world order.

    The order is colour-major, then shape, then motion, each in the order of `COLOURS`, `SHAPES` and `MOTIONS`,
    skipping "circle ... rotating": 6 * 4 * 9 - 6 = 210 labels.
    """
    return tuple(
        f"{colour} {shape} {motion}"
        for colour in COLOURS
        for shape in SHAPES
        for motion in MOTIONS
        if _is_world_combination(shape, motion)
    )


_WORLD_LABELS = world_labels()
_WORLD_RANK = {label: rank for rank, label in enumerate(_WORLD_LABELS)}


def parse_label(label: str) -> tuple[str, str, str]:
    """Split a world label into ``(colour, shape, motion)``; raises ValueError for a label outside the world."""
    if label not in _WORLD_RANK:
        raise ValueError(f"{label!r} is not a demo world label; see world_labels() for the {len(_WORLD_LABELS)}")
    colour, shape, motion = label.split(" ", 2)
    return colour, shape, motion


def caption_for(label: str, background: str) -> str:
    """The caption of a video: ``"a {colour} {shape} {motion} on a {background} background"``."""
    parse_label(label)
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; allowed: {', '.join(BACKGROUNDS)}")
    return f"a {label} on a {background} background"


CAPTIONS_PER_VIDEO = 3
"""Captions written per video (``captions.csv``), each in another phrasing."""

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} {motion} on a {background} background",
    "video of a {colour} {shape} {motion} on a {background} background",
    "the {colour} {shape} is {motion} on a {background} background",
    "a {background} background with a {colour} {shape} {motion}",
    "clip showing a {colour} {shape} {motion} on {background}",
    "{colour} {shape} {motion}, {background} background",
    "a {colour} {shape} on a {background} background, {motion}",
    "footage of a {colour} {shape} {motion} with a {background} background",
)
"""How a video's captions are phrased; ``{motion}`` follows "is" in one of them, so motion phrases are participles.
Every word is in the demo vocabulary."""

MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "moving left": ("moving left", "moving to the left"),
    "moving right": ("moving right", "moving to the right"),
    "moving up": ("moving up",),
    "moving down": ("moving down",),
    "growing": ("growing", "growing bigger"),
    "shrinking": ("shrinking", "shrinking smaller"),
    "rotating": ("rotating", "spinning", "turning"),
    "staying still": ("staying still", "static", "still"),
    "bouncing": ("bouncing", "jumping"),
}
"""The ways a caption may say each motion (the first is the label's phrase)."""

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black",),
    "gray": ("gray", "grey"),
    "brown": ("brown",),
    "navy": ("navy", "dark navy"),
}


def captions_for(
    label: str, background: str, *, seed: int, index: int, count: int = CAPTIONS_PER_VIDEO
) -> tuple[str, ...]:
    """``count`` captions of one video, each from another template with its own choice of words for the motion,
    shape and background (a random stream of their own: captions never change a video's pixels)."""
    colour, shape, motion = parse_label(label)
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; allowed: {', '.join(BACKGROUNDS)}")
    if not 1 <= count <= len(CAPTION_TEMPLATES):
        raise ValueError(f"count must be in 1..{len(CAPTION_TEMPLATES)}, got {count}")
    rng = np.random.default_rng([_STREAM_CAPTION, seed, index])
    templates = rng.permutation(len(CAPTION_TEMPLATES))[:count]

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    return tuple(
        CAPTION_TEMPLATES[int(t)].format(
            colour=colour,
            shape=pick(SHAPE_WORDS[shape]),
            motion=pick(MOTION_PHRASES[motion]),
            background=pick(BACKGROUND_WORDS[background]),
        )  # fmt: skip
        for t in templates
    )


def backgrounds_for(colour: str) -> tuple[str, ...]:
    """The backgrounds a shape of ``colour`` may be drawn on (RGB distance at least `MIN_CONTRAST`), in world order."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; allowed: {', '.join(COLOURS)}")
    rgb = np.asarray(COLOURS[colour], dtype=np.float64)
    return tuple(
        name
        for name, base in BACKGROUNDS.items()
        if float(np.linalg.norm(rgb - np.asarray(base, dtype=np.float64))) >= MIN_CONTRAST
    )


def _label_pairs(label: str) -> tuple[tuple[str, str, str], ...]:
    colour, shape, motion = parse_label(label)
    return (("colour-shape", colour, shape), ("shape-motion", shape, motion), ("colour-motion", colour, motion))


def split_labels(seed: int = 0, unseen_fraction: float = 0.25) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split the world labels into ``(seen, unseen)`` so that unseen labels are new combinations of known parts.

    The labels are shuffled with ``seed``; walking that order, a label moves to the unseen side only while fewer
    than ``round(unseen_fraction * 210)`` are there and each of its three pairs (colour-shape, shape-motion,
    colour-motion) still appears in some other seen label. So every possible pair, and with it every colour, shape
    and motion, stays in the seen set. If the pair constraint stops the walk early the unseen side is smaller than
    asked (with the default fraction it is not). Both tuples are in world order and together hold every label once.
    """
    if not 0.0 <= unseen_fraction < 1.0:
        raise ValueError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
    _check_seed(seed)
    target = round(unseen_fraction * len(_WORLD_LABELS))
    seen_count: dict[tuple[str, str, str], int] = {}
    for label in _WORLD_LABELS:
        for pair in _label_pairs(label):
            seen_count[pair] = seen_count.get(pair, 0) + 1
    unseen: set[str] = set()
    order = np.random.default_rng(seed).permutation(len(_WORLD_LABELS))
    for position in order:
        if len(unseen) >= target:
            break
        label = _WORLD_LABELS[int(position)]
        pairs = _label_pairs(label)
        if all(seen_count[pair] > 1 for pair in pairs):
            unseen.add(label)
            for pair in pairs:
                seen_count[pair] -= 1
    seen = tuple(label for label in _WORLD_LABELS if label not in unseen)
    return seen, tuple(label for label in _WORLD_LABELS if label in unseen)


def labels_for_split(split: Split, *, seed: int = 0, unseen_fraction: float = 0.25) -> tuple[str, ...]:
    """The labels of a split: seen labels for train and val, unseen ones for test, every label for all."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if split == "all":
        return _WORLD_LABELS
    seen, unseen = split_labels(seed, unseen_fraction)
    return unseen if split == "test" else seen


# ---------------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class DemoVideo:
    """Everything needed to render one demo video; drawn by `video_specs` from ``(seed, index)``.

    Positions and sizes are fractions of the frame side (x right, y down); angles are degrees, positive clockwise.
    Parameters that a motion does not use hold neutral values (0, or 1 for ``scale_factor``).
    """

    name: str  # file stem, e.g. "demo-000123"
    index: int
    seed: int  # the dataset seed the spec was drawn from
    video_seed: int  # per-video seed of the noise texture
    colour: str
    shape: str
    motion: str
    background: str
    texture: Texture
    texture_strength: float  # largest offset of a background pixel from the base colour, 0-255 units
    gradient_degrees: float  # direction in which a gradient background gets brighter
    shape_size: float  # circumscribed diameter at scale 1 (mid-clip when growing or shrinking)
    start_x: float  # centre of the shape on the first frame
    start_y: float
    start_degrees: float
    move_distance: float  # moving: translation over the clip
    scale_factor: float  # growing: last/first size; shrinking: first/last size
    rotation_degrees: float  # rotating: signed turn over the clip
    bounce_height: float  # bouncing: rise of the centre above the floor at the top of a bounce
    bounces_per_clip: float  # bouncing: periods of |sin| over the clip
    bounce_phase: float  # bouncing: where in a period the clip starts, in [0, 1)
    label: str
    caption: str  # the canonical form, `caption_for`
    captions: tuple[str, ...] = ()  # the captions written to captions.csv, `captions_for`


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _normalise_labels(labels: Iterable[str] | None) -> tuple[str, ...]:
    if labels is None:
        return _WORLD_LABELS
    if isinstance(labels, str):
        raise ValueError(f"labels must be a sequence of labels, not the string {labels!r}")
    unique = set(labels)
    for label in unique:
        parse_label(label)
    if not unique:
        raise ValueError("labels is empty; give at least one world label")
    return tuple(sorted(unique, key=_WORLD_RANK.__getitem__))


def video_specs(
    num_videos: int, seed: int, labels: Iterable[str] | None = None, *, prefix: str = ""
) -> list[DemoVideo]:
    """Specs of videos ``0 .. num_videos - 1``, each a function of ``(seed, index)`` and the label list.

    Labels are dealt in rounds: round ``r`` covers every label once, in a permutation seeded by ``(seed, r)``, so
    any ``num_videos`` covers the labels as evenly as possible (counts differ by at most one). ``labels`` is
    de-duplicated and taken in world order, so its order does not matter; the default is every world label.
    Names are ``f"{prefix}demo-{index:06d}"``.
    """
    _check_seed(seed)
    if num_videos < 0:
        raise ValueError(f"num_videos must be >= 0, got {num_videos}")
    if not _NAME_PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r} may only hold letters, digits, '.', '_' and '-'")
    pool = _normalise_labels(labels)
    specs: list[DemoVideo] = []
    order: np.ndarray = np.arange(0)
    for index in range(num_videos):
        round_index, position = divmod(index, len(pool))
        if position == 0:
            order = np.random.default_rng([_STREAM_LABEL_ORDER, seed, round_index]).permutation(len(pool))
        specs.append(_draw_spec(seed, index, pool[int(order[position])], f"{prefix}demo-{index:06d}"))
    return specs


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high)) if high > low else float(low)


def _draw_spec(seed: int, index: int, label: str, name: str) -> DemoVideo:
    colour, shape, motion = parse_label(label)
    rng = np.random.default_rng([_STREAM_VIDEO, seed, index])
    allowed = backgrounds_for(colour)
    background = allowed[int(rng.integers(len(allowed)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    texture_strength = 0.0 if texture == "solid" else _uniform(rng, *_TEXTURE_STRENGTH_RANGE)
    gradient_degrees = _uniform(rng, 0.0, 360.0) if texture == "gradient" else 0.0
    video_seed = int(rng.integers(2**31))
    shape_size = _uniform(rng, *_SHAPE_SIZE_RANGE)
    radius = shape_size / 2

    move_distance = rotation_degrees = bounce_height = bounces_per_clip = bounce_phase = 0.0
    scale_factor = 1.0
    if motion == "rotating":
        start_degrees = _uniform(rng, 0.0, 360.0)
        rotation_degrees = _uniform(rng, *_ROTATION_DEGREES_RANGE) * (1.0 if rng.integers(2) else -1.0)
    elif shape == "circle":
        start_degrees = 0.0
    else:
        start_degrees = _uniform(rng, -_TILT_DEGREES, _TILT_DEGREES)

    if motion in ("growing", "shrinking"):
        scale_factor = _uniform(rng, *_SCALE_FACTOR_RANGE)
    reach = radius * math.sqrt(scale_factor) + _EDGE_MARGIN  # the largest circumradius over the clip, plus margin
    free_low, free_high = max(reach, _CENTRE_RANGE[0]), min(1.0 - reach, _CENTRE_RANGE[1])

    if motion.startswith("moving"):
        move_distance = _uniform(rng, *_MOVE_DISTANCE_RANGE)
        along = (
            _uniform(rng, reach + move_distance, 1.0 - reach)
            if motion in ("moving left", "moving up")
            else _uniform(rng, reach, 1.0 - reach - move_distance)
        )
        across = _uniform(rng, free_low, free_high)
        start_x, start_y = (along, across) if motion in ("moving left", "moving right") else (across, along)
    elif motion == "bouncing":
        bounce_height = _uniform(rng, *_BOUNCE_HEIGHT_RANGE)
        bounces_per_clip = _uniform(rng, *_BOUNCES_PER_CLIP_RANGE)
        bounce_phase = _uniform(rng, 0.0, 1.0)
        floor_y = 1.0 - reach - _uniform(rng, 0.0, 0.05)
        start_x = _uniform(rng, free_low, free_high)
        start_y = floor_y - bounce_height * abs(math.sin(math.pi * bounce_phase))
    else:
        start_x = _uniform(rng, free_low, free_high)
        start_y = _uniform(rng, free_low, free_high)

    return DemoVideo(
        name=name,
        index=index,
        seed=int(seed),
        video_seed=video_seed,
        colour=colour,
        shape=shape,
        motion=motion,
        background=background,
        texture=texture,
        texture_strength=texture_strength,
        gradient_degrees=gradient_degrees,
        shape_size=shape_size,
        start_x=start_x,
        start_y=start_y,
        start_degrees=start_degrees,
        move_distance=move_distance,
        scale_factor=scale_factor,
        rotation_degrees=rotation_degrees,
        bounce_height=bounce_height,
        bounces_per_clip=bounces_per_clip,
        bounce_phase=bounce_phase,
        label=label,
        caption=caption_for(label, background),
        captions=captions_for(label, background, seed=seed, index=index),
    )


# ------------------------------------------------------------------------------------------------------ rendering


def _pose(spec: DemoVideo, progress: float) -> tuple[float, float, float, float]:
    """``(x, y, scale, degrees)`` of the shape at ``progress`` in [0, 1] through the clip."""
    x, y, scale, degrees = spec.start_x, spec.start_y, 1.0, spec.start_degrees
    step = spec.move_distance * progress
    if spec.motion == "moving left":
        x -= step
    elif spec.motion == "moving right":
        x += step
    elif spec.motion == "moving up":
        y -= step
    elif spec.motion == "moving down":
        y += step
    elif spec.motion == "growing":
        scale = spec.scale_factor ** (progress - 0.5)
    elif spec.motion == "shrinking":
        scale = spec.scale_factor ** (0.5 - progress)
    elif spec.motion == "rotating":
        degrees += spec.rotation_degrees * progress
    elif spec.motion == "bouncing":
        floor_y = spec.start_y + spec.bounce_height * abs(math.sin(math.pi * spec.bounce_phase))
        y = floor_y - spec.bounce_height * abs(
            math.sin(math.pi * (spec.bounces_per_clip * progress + spec.bounce_phase))
        )
    return x, y, scale, degrees


_THIRDS = (1 / 3, 2 / 3)  # frame captions name the third of the frame the shape's centre is in
_SMALL_BELOW, _LARGE_ABOVE = 0.21, 0.33  # circumscribed diameters frame captions call small / large


def frame_caption(spec: DemoVideo, progress: float) -> str:
    """What one frame shows, in words: size, colour, shape, where it is and the background, e.g. ``"a small red
    circle up left on a black background"``. No motion: a single frame cannot show it (the demo CLIP learns from
    these; Vita-CLIP's prompts must learn motion from several frames)."""
    x, y, scale, _ = _pose(spec, progress)
    vertical = "up" if y < _THIRDS[0] else "down" if y > _THIRDS[1] else ""
    horizontal = "left" if x < _THIRDS[0] else "right" if x > _THIRDS[1] else ""
    where = " ".join(w for w in (vertical, horizontal) if w) or "middle"
    diameter = spec.shape_size * scale
    size = "small " if diameter < _SMALL_BELOW else "large " if diameter > _LARGE_ABOVE else ""
    return f"a {size}{spec.colour} {spec.shape} {where} on a {spec.background} background"


def spec_from_manifest(record: dict[str, Any]) -> DemoVideo:
    """The spec of one ``manifest.jsonl`` record (which also holds the path and the encoding settings)."""
    names = {f.name for f in fields(DemoVideo)}
    values = {k: v for k, v in record.items() if k in names}
    if "captions" in values:
        values["captions"] = tuple(values["captions"])
    return DemoVideo(**values)


def _background(spec: DemoVideo, size: int) -> np.ndarray:
    """The static background of a video.  # [H, W, 3] float32, 0-255"""
    base = np.asarray(BACKGROUNDS[spec.background], dtype=np.float32)
    offset: np.ndarray = np.zeros((size, size), dtype=np.float32)  # [H, W] brightness offset, same on all channels
    if spec.texture == "gradient":
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        theta = math.radians(spec.gradient_degrees)
        along = coords[None, :] * math.cos(theta) + coords[:, None] * math.sin(theta)  # [H, W]
        offset = spec.texture_strength * along / float(np.abs(along).max())
    elif spec.texture == "noise":
        rng = np.random.default_rng([_STREAM_TEXTURE, spec.video_seed, size])
        coarse = rng.standard_normal((6, 6)).astype(np.float32)
        blobs = np.array(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        blobs /= max(float(np.abs(blobs).max()), 1e-6)
        grain = rng.uniform(-1.0, 1.0, (size, size)).astype(np.float32)
        offset = spec.texture_strength * (0.75 * blobs + 0.25 * grain)
    return np.clip(base[None, None, :] + offset[:, :, None], 0.0, 255.0)


def _shape_alpha(spec: DemoVideo, pose: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Anti-aliased coverage of the shape in ``pose``.  # [H, W] float32 in [0, 1]"""
    x, y, scale, degrees = pose
    ss = size * _SUPERSAMPLE
    # PIL fills a pixel when its corner (integer) coordinate lies inside; shift by half a pixel to sample centres.
    cx, cy = x * ss - 0.5, y * ss - 0.5
    radius = spec.shape_size / 2 * scale * ss
    canvas = Image.new("L", (ss, ss), 0)
    draw = ImageDraw.Draw(canvas)
    if spec.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        theta = math.radians(degrees)
        rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        corners = _UNIT_POLYGONS[spec.shape] @ rotation.T * radius + np.array([cx, cy])  # [K, 2]
        draw.polygon([(float(px), float(py)) for px, py in corners], fill=255)
    return np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0


def _check_frame_args(size: int, num_frames: int) -> None:
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number of pixels >= 16 (yuv420p needs even sides), got {size}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")


def render_frames(spec: DemoVideo, *, size: int = 128, num_frames: int = 24) -> np.ndarray:
    """Render a video's frames (square, ``size`` pixels a side).  # [T, H, W, 3] uint8 RGB

    Frame ``i`` shows the shape at progress ``i / (num_frames - 1)``, so the first and last frames show the start
    and end of the motion whatever ``num_frames`` is.
    """
    _check_frame_args(size, num_frames)
    background = _background(spec, size)  # [H, W, 3]
    colour = np.asarray(COLOURS[spec.colour], dtype=np.float32)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for i in range(num_frames):
        progress = i / (num_frames - 1) if num_frames > 1 else 0.0
        alpha = _shape_alpha(spec, _pose(spec, progress), size)[:, :, None]  # [H, W, 1]
        frames[i] = np.clip(np.rint(background + alpha * (colour - background)), 0, 255).astype(np.uint8)
    return frames


def write_video(
    spec: DemoVideo, path: str | os.PathLike[str], *, size: int = 128, num_frames: int = 24, fps: int = 12
) -> Path:
    """Render ``spec`` and write it as an H.264 MP4 (libx264, yuv420p, CRF 20) at ``path``; returns the path.

    The encoder runs on one thread, which makes the bytes a function of the inputs alone; the file is written
    to a temporary name next to ``path`` and renamed into place, so a reader never sees a partial video.
    """
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    frames = render_frames(spec, size=size, num_frames=num_frames)  # [T, H, W, 3]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = size
        stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # several threads may split work differently from run to run
        stream.options = {"crf": str(_CRF), "preset": "medium"}
        time_base = Fraction(1, fps)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    target = Path(path)
    _write_bytes_atomic(target, buffer.getvalue())
    return target


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` in one step; a file that holds `data` already is left as it is (its modification
    time, which a local listing's ETag follows, too: a demo written again is not indexed again)."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass  # not there (or not readable): written
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class GeneratedDemo:
    """What `generate` wrote; paths are absolute or relative as ``out_dir`` was given."""

    out_dir: Path
    video_paths: tuple[Path, ...]  # in index order
    list_path: Path  # list.csv: "path,label" rows, no header
    captions_path: Path  # captions.csv: header "video,caption", a row per caption
    labels_path: Path  # labels.txt: the labels used, one a line, in world order
    manifest_path: Path  # manifest.jsonl: one spec a line, written last
    labels: tuple[str, ...]

    @property
    def num_videos(self) -> int:
        """How many videos were written."""
        return len(self.video_paths)


_Job = tuple[DemoVideo, str, int, int, int]


def _write_job(job: _Job) -> str:
    spec, path, size, num_frames, fps = job
    write_video(spec, path, size=size, num_frames=num_frames, fps=fps)
    return spec.name


def _csv_text(rows: Iterable[Sequence[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerows(rows)
    return out.getvalue()


def generate(
    out_dir: str | os.PathLike[str],
    num_videos: int,
    seed: int = 0,
    *,
    labels: Iterable[str] | None = None,
    workers: int | None = None,
    prefix: str = "",
    size: int = 128,
    num_frames: int = 24,
    fps: int = 12,
    on_video: Callable[[DemoVideo], None] | None = None,
) -> GeneratedDemo:
    """Write ``num_videos`` demo videos and their label, caption and manifest files under ``out_dir``.

    Layout: ``videos/<name>.mp4``; ``list.csv`` (``videos/<name>.mp4,<label>`` rows, no header); ``captions.csv``
    (header ``video,caption``, same paths, `CAPTIONS_PER_VIDEO` rows per video); ``labels.txt`` (the labels used,
    world order); ``manifest.jsonl`` (the path, every spec field and the frame geometry, one video a line), written
    last. Every file is replaced atomically, and the bytes depend only on the arguments, not on ``workers`` (default
    ``min(4, cpu count)`` processes; 1 renders in this process). ``on_video`` is called in this process after each
    video, in index order. Workers are spawned, so a calling script must be importable and guard its entry point
    with ``if __name__ == "__main__":`` (code piped to ``python -`` can only use ``workers=1``).
    """
    _check_frame_args(size, num_frames)
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    specs = video_specs(num_videos, seed, labels, prefix=prefix)
    out = Path(out_dir)
    videos_dir = out / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    relative = [f"videos/{spec.name}.mp4" for spec in specs]
    jobs: list[_Job] = [
        (spec, str(out / rel), size, num_frames, fps) for spec, rel in zip(specs, relative, strict=True)
    ]

    for spec in _run_jobs(jobs, workers):
        if on_video is not None:
            on_video(spec)

    used = {spec.label for spec in specs}
    used_labels = tuple(label for label in _WORLD_LABELS if label in used)
    result = GeneratedDemo(
        out_dir=out,
        video_paths=tuple(out / rel for rel in relative),
        list_path=out / "list.csv",
        captions_path=out / "captions.csv",
        labels_path=out / "labels.txt",
        manifest_path=out / "manifest.jsonl",
        labels=used_labels,
    )
    rows = list(zip(relative, specs, strict=True))
    _write_bytes_atomic(result.list_path, _csv_text((rel, spec.label) for rel, spec in rows).encode())
    captions = _csv_text([("video", "caption"), *((rel, c) for rel, spec in rows for c in spec.captions)])
    _write_bytes_atomic(result.captions_path, captions.encode())
    _write_bytes_atomic(result.labels_path, "".join(f"{label}\n" for label in used_labels).encode())
    manifest = "".join(
        json.dumps({"path": rel, **asdict(spec), "width": size, "height": size, "num_frames": num_frames, "fps": fps})
        + "\n"
        for rel, spec in rows
    )
    _write_bytes_atomic(result.manifest_path, manifest.encode())
    return result


def _run_jobs(jobs: list[_Job], workers: int) -> Iterator[DemoVideo]:
    """Write every job's video, yielding each spec once its file is in place, in job order."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            _write_job(job)
            yield job[0]
        return
    # spawn: workers start clean, whatever threads (progress bars, servers) the parent process runs.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        for job, _ in zip(jobs, pool.map(_write_job, jobs), strict=True):
            yield job[0]


def split_video_seed(split: Split, seed: int) -> int:
    """The video seed `generate_split` uses: ``seed`` itself for "all", a value derived from both otherwise.

    Deriving it keeps train, val and test videos apart when every split is generated with the same ``seed``.
    """
    _check_seed(seed)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if split == "all":
        return int(seed)
    return int(np.random.SeedSequence([int(seed), SPLITS.index(split) + 1]).generate_state(1)[0])


def generate_split(
    out_dir: str | os.PathLike[str],
    split: Split,
    num_videos: int,
    seed: int = 0,
    *,
    workers: int | None = None,
    size: int = 128,
    num_frames: int = 24,
    fps: int = 12,
    on_video: Callable[[DemoVideo], None] | None = None,
) -> GeneratedDemo:
    """`generate` one split of a dataset: the labels of `labels_for_split`, `split_video_seed` and names
    prefixed ``"{split}-"`` (no prefix for "all"). Use the same ``seed`` for every split of one dataset: it also
    seeds the seen/unseen label split."""
    return generate(
        out_dir,
        num_videos,
        split_video_seed(split, seed),
        labels=labels_for_split(split, seed=seed),
        workers=workers,
        prefix="" if split == "all" else f"{split}-",
        size=size,
        num_frames=num_frames,
        fps=fps,
        on_video=on_video,
    )

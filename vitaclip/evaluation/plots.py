"""Pictures of an evaluation or a training run: confusion matrices and curves (PNG)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitaclip.evaluation.protocols import CONFUSION_MAX_CLASSES


def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def save_confusion_png(matrix: np.ndarray, label_names: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """A row-normalised confusion matrix as a PNG heat map (for label sets up to 60 classes)."""
    from PIL import Image, ImageDraw

    k = matrix.shape[0]
    if k > CONFUSION_MAX_CLASSES:
        raise ValueError(f"confusion PNGs are drawn for up to {CONFUSION_MAX_CLASSES} classes, got {k}")
    cell = max(12, min(40, 600 // max(k, 1)))
    margin = 8 + 6 * max((len(n) for n in label_names), default=4)
    margin = min(margin, 220)
    width = margin + k * cell + 20
    height = 30 + margin + k * cell + 10
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    draw.text((10, 8), title or "confusion (rows: true class, columns: predicted)", fill="black", font=font)
    rows = matrix.sum(axis=1, keepdims=True).clip(min=1)
    norm = matrix / rows
    top = 30 + margin
    for i in range(k):
        draw.text((4, top + i * cell + cell // 2 - 5), str(label_names[i])[:36], fill="black", font=font)
        for j in range(k):
            v = float(norm[i, j])
            shade = (int(255 * (1 - v)), int(255 * (1 - 0.6 * v)), 255)
            x0, y0 = margin + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=shade, outline=(220, 220, 220))
            if cell >= 24 and matrix[i, j]:
                draw.text((x0 + 3, y0 + cell // 2 - 5), str(int(matrix[i, j])), fill="black", font=font)
    for j in range(k):
        draw.text((margin + j * cell + 2, 30 + margin - 14), str(j), fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def save_curves_png(records: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str | Path) -> Path:
    """Line plots of ``keys`` against ``step`` (one panel per key) as a PNG, drawn with Pillow."""
    from PIL import Image, ImageDraw

    panel_w, panel_h, pad = 420, 220, 40
    image = Image.new("RGB", (panel_w * len(keys) + 10, panel_h + 20), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    for p, key in enumerate(keys):
        pts = [
            (float(r["step"]), float(r[key]))
            for r in records
            if r.get(key) is not None and math.isfinite(float(r[key]))
        ]
        x0 = p * panel_w + pad
        x1, y0, y1 = x0 + panel_w - pad - 20, 20, panel_h - 20
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 4), key, fill="black", font=font)
        if not pts:
            continue
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        xmin, xmax = min(xs), max(xs)
        ymin, ymax = min(ys), max(ys)
        if xmax == xmin:
            xmax = xmin + 1
        if ymax == ymin:
            ymax = ymin + 1e-9 + abs(ymin) * 0.01
        draw.text((x0 - pad + 2, y0), f"{ymax:.3g}", fill="black", font=font)
        draw.text((x0 - pad + 2, y1 - 10), f"{ymin:.3g}", fill="black", font=font)
        draw.text((x1 - 30, y1 + 4), f"{int(xmax)}", fill="black", font=font)
        line = [
            (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)) for x, y in pts
        ]
        if len(line) == 1:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=(30, 90, 200))
        else:
            draw.line(line, fill=(30, 90, 200), width=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


_SERIES_COLOURS = ((30, 90, 200), (230, 120, 20), (40, 160, 60), (180, 40, 160))


def save_recall_png(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, *, title: str = "") -> Path:
    """Recall at k against k, one panel per direction, one line per model, as a PNG drawn with Pillow.

    Args:
        curves: model name -> direction (``text_to_video``, ``video_to_text``) -> R@k in percent for k = 1, 2, ...
            (the ``recall_curve`` of `retrieval_metrics`).
    """
    from PIL import Image, ImageDraw

    directions = [d for d in ("text_to_video", "video_to_text") if any(d in c for c in curves.values())]
    panel_w, panel_h, pad, top = 440, 300, 44, 34
    image = Image.new("RGB", (panel_w * max(len(directions), 1) + 10, panel_h + top + 24 + 16 * len(curves)), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    draw.text((10, 6), title or "recall at k (percent of queries whose match is in the top k)", fill="black", font=font)
    for p, direction in enumerate(directions):
        x0, x1 = p * panel_w + pad, (p + 1) * panel_w - 20
        y0, y1 = top, top + panel_h - 30
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, y0 - 14), direction.replace("_", " "), fill="black", font=font)
        kmax = max((len(c.get(direction, ())) for c in curves.values()), default=1)
        for value in (0, 25, 50, 75, 100):
            y = y1 - value / 100 * (y1 - y0)
            draw.line([(x0, y), (x0 + 4, y)], fill="black")
            draw.text((x0 - pad + 6, y - 5), f"{value}%", fill="black", font=font)
        for k in sorted({1, 5, 10, kmax}):
            x = x0 + (k - 1) / max(kmax - 1, 1) * (x1 - x0)
            draw.line([(x, y1), (x, y1 - 4)], fill="black")
            draw.text((x - 4, y1 + 4), f"{k}", fill="black", font=font)
        draw.text((x1 - 10, y1 + 16), "k", fill="black", font=font)
        for s, curve in enumerate(curves.values()):
            values = list(curve.get(direction, ()))
            if not values:
                continue
            colour = _SERIES_COLOURS[s % len(_SERIES_COLOURS)]
            line = [
                (x0 + i / max(kmax - 1, 1) * (x1 - x0), y1 - float(v) / 100 * (y1 - y0)) for i, v in enumerate(values)
            ]
            if len(line) == 1:
                draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
            else:
                draw.line(line, fill=colour, width=2)
    for s, name in enumerate(curves):
        y = top + panel_h + 4 + 16 * s
        colour = _SERIES_COLOURS[s % len(_SERIES_COLOURS)]
        draw.line([(pad, y + 6), (pad + 24, y + 6)], fill=colour, width=3)
        draw.text((pad + 30, y), name, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path

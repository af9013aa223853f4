"""The quickstart (``vitaclip quickstart``): demo-world videos plus one broken file, the real indexing job on them
with the packaged ``vitaclip-demo`` model, its labels scored against the generator's truth, and a few text searches.

Everything runs locally (an embedded Ray, a local output folder) and needs no credentials or downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Queries the quickstart runs: label combinations of the demo world, so the reader can check every hit.
QUICKSTART_QUERIES = (
    "blue square moving up",
    "red circle moving left",
    "yellow star rotating",
    "white triangle growing",
    "video of a blue star moving to the left on a black background",
    "the red box is jumping on a navy background",
)
"""Label-phrased queries, then caption-phrased ones (free text, as users type it)."""


@dataclass(frozen=True)
class QuickstartConfig:
    """What the quickstart generates and runs.

    Attributes:
        output: Folder for the videos (``videos/``) and the job's output (``index-output/``).
        num_videos: Demo videos to generate (one broken file is added).
        seed: Seed of the generated videos.
        show: Table rows to print.
        num_cpus: CPUs of the embedded local Ray (None: all).
        top_k: Labels kept per video.
        model, checkpoint, random_weights: The model, as for ``vitaclip index``.
        replace_settings: Make this run's row settings (``top_k``) the output's recorded ones, as for ``vitaclip
            index``; without it a re-run with another ``top_k`` on the same output is refused.
    """

    output: str = "out/quickstart"
    num_videos: int = 300
    seed: int = 2026
    show: int = 8
    num_cpus: int | None = None
    top_k: int = 3
    model: str = "vitaclip-demo"
    checkpoint: str | None = None
    random_weights: bool = False
    replace_settings: bool = False

    def __post_init__(self) -> None:
        if self.num_videos < 1:
            raise ValueError(f"--num-videos must be >= 1, got {self.num_videos}")
        if self.show < 0:
            raise ValueError(f"--show must be >= 0, got {self.show}")


def generate_inputs(folder: Path, num_videos: int, *, seed: int) -> dict[str, dict[str, Any]]:
    """Writes demo videos and one broken file under `folder`; returns each video's spec by its absolute path (the
    output may hold other videos of the same file names: a later `vitaclip index` into it)."""
    from vitaclip.demo.world import generate, world_labels

    generated = generate(folder, num_videos, seed=seed, labels=world_labels())
    paths = {path.stem: path for path in generated.video_paths}
    truth = {}
    for line in generated.manifest_path.read_text(encoding="utf-8").splitlines():
        spec = json.loads(line)
        truth[_key(paths[spec["name"]])] = spec
    broken, content = folder / "broken.mp4", b"not a video, to show how failures are recorded\n"
    if not broken.is_file() or broken.read_bytes() != content:  # unchanged: not listed as a new version
        broken.write_bytes(content)
    return truth


def _key(path_or_uri: str | Path) -> str:
    """A local video's absolute path, as the job's listing spells it in ``uri`` (``//tmp/x`` is ``/tmp/x``)."""
    from jobs.storage.listing import absolute_path

    return absolute_path(str(path_or_uri))


def label_agreement(rows: Sequence[dict[str, Any]], truth: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """How the rows' labels agree with the generator's truth: top-1 and top-k hit rates, and how often the top-1
    label has the right colour, shape and motion (None when no labelled row has a truth)."""
    from vitaclip.demo.world import parse_label

    scored = [(truth[_key(r["uri"])]["label"], r["labels"]) for r in rows if _key(r["uri"]) in truth]
    scored = [(t, labels) for t, labels in scored if labels]
    if not scored:
        return None
    parts = [(parse_label(t), parse_label(labels[0])) for t, labels in scored]
    return {
        "videos": len(scored),
        "top1": sum(labels[0] == t for t, labels in scored) / len(scored),
        "topk": sum(t in labels for t, labels in scored) / len(scored),
        **{
            part: sum(a[i] == b[i] for a, b in parts) / len(parts)
            for i, part in enumerate(("colour", "shape", "motion"))
        },
    }


def run_quickstart(config: QuickstartConfig) -> dict[str, Any]:
    """Generates, indexes, scores and searches, printing as it goes; returns the job's summary and the agreement.

    Raises:
        ValueError: The job refused the run (a model without weights, ...).
    """
    from jobs.config import IndexJobConfig
    from jobs.index_videos import print_summary, setup_logging
    from jobs.pipeline import run_index_job

    out = Path(config.output)
    videos, output = out / "videos", out / "index-output"
    job = IndexJobConfig(  # checked before hundreds of videos are written (--top-k 0 failed after them)
        inputs=(str(videos),),
        output=str(output),
        model=config.model,
        checkpoint=config.checkpoint,
        random_weights=config.random_weights,
        num_cpus=config.num_cpus,
        top_k=config.top_k,
        replace_settings=config.replace_settings,
        switch_index=True,  # a re-run after a model update searches with that model
    )
    for folder in (out, videos, videos / "videos", output):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} exists and is not a folder: move it away, or give another --output")
    try:
        truth = generate_inputs(videos, config.num_videos, seed=config.seed)
    except OSError as exc:  # a read-only folder, a full disk
        raise ValueError(f"cannot write the demo videos under {videos}: {exc.strerror or exc}") from None
    print(f"wrote {config.num_videos} demo videos (and one broken file) under {videos}")
    setup_logging()
    summary = run_index_job(job)
    print_summary(summary)
    agreement = _print_rows(output, videos, truth, config, model_id=summary["model_id"])
    _print_searches(output, truth, config)
    return {"summary": summary, "agreement": agreement}


def _print_rows(
    output: Path, videos: Path, truth: dict[str, dict[str, Any]], config: QuickstartConfig, *, model_id: str
) -> dict[str, Any] | None:
    import pyarrow.compute as pc

    from index.tables import read_table
    from vitaclip.demo.world import world_labels

    table = read_table(output, "videos")
    assert table is not None
    # An output keeps one row per video and model: a re-run after a model update shows this model's rows only.
    table = table.filter(pc.equal(table.column("model_id"), model_id))
    everything = table.num_rows
    # Its own videos (and broken file) only: a later `vitaclip index` into this output adds others.
    table = table.filter(pc.starts_with(table.column("uri"), _key(videos) + os.sep))
    rows = table.sort_by("uri").select(["uri", "status", "labels", "label_scores"]).to_pylist()
    ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
    others = f"; {everything - table.num_rows} rows of other videos not shown" if everything > table.num_rows else ""
    print(f"\n{table.num_rows} rows in {output / 'videos'} (a Delta Lake table, {ok} ok{others}); the first few:")
    print(f"  {'file':16s} {'status':12s} {'truth':30s} top labels (probability)")
    for row in rows[: config.show]:
        name = Path(row["uri"]).name
        spec = truth.get(_key(row["uri"]))
        true_label = spec["label"] if spec else "-"
        if row["status"] == "ok":
            tops = ", ".join(f"{n} ({p:.2f})" for n, p in zip(row["labels"], row["label_scores"], strict=True))
        else:
            tops = "(no embedding)"
        print(f"  {name:16s} {row['status']:12s} {true_label:30s} {tops}")
    agreement = label_agreement(rows, truth)
    if agreement is not None:
        print(
            f"top-1 label is the generator's truth for {agreement['top1']:.0%} of {agreement['videos']} videos, "
            f"top-{config.top_k} for {agreement['topk']:.0%} (chance: {1 / len(world_labels()):.1%}); the top-1 label "
            f"has the right colour for {agreement['colour']:.0%}, shape {agreement['shape']:.0%}, motion "
            f"{agreement['motion']:.0%}"
        )
    return agreement


def _describes(query: str, spec: dict[str, Any]) -> bool:
    """Whether a quickstart query names this video's colour, shape, motion (and background, when it names one)."""
    from vitaclip.demo.world import BACKGROUND_WORDS, MOTION_PHRASES, SHAPE_WORDS

    words = f" {query} "
    shape = any(f" {w} " in words for w in SHAPE_WORDS[spec["shape"]])
    motion = any(f" {p} " in words for p in MOTION_PHRASES[spec["motion"]])
    named = [b for b, ws in BACKGROUND_WORDS.items() if any(f" {w} background " in words for w in ws)]
    background = not named or spec["background"] in named
    return f" {spec['colour']} " in words and shape and motion and background


def _print_searches(output: Path, truth: dict[str, dict[str, Any]], config: QuickstartConfig) -> None:
    from index.search import SearchEngine

    engine = SearchEngine(output, model=config.model, checkpoint=config.checkpoint)
    for query in QUICKSTART_QUERIES:
        print(f'\nsearch "{query}":')
        for rank, hit in enumerate(engine.search(query, k=3), start=1):
            spec = truth.get(_key(hit.uri))
            caption = spec["caption"] if spec else "?"
            mark = "match" if spec and _describes(query, spec) else ""
            print(f"  {rank}. {hit.score:.3f}  {Path(hit.uri).name:16s} {caption:55s} {mark}")
    vitaclip = command_name()
    print(f"\nmore: {vitaclip} search --index {output} 'green star bouncing'")
    print(f"      {vitaclip} serve --index {output}   (a search page on http://127.0.0.1:8000)")
    print(f"      DuckDB: SELECT uri, status, labels FROM delta_scan('{output / 'videos'}')")
    print(f"      {vitaclip} runs {output}   (the runs on this output and its recorded settings)")


def command_name() -> str:
    """How to type the ``vitaclip`` command here: its bare name when the shell finds this environment's, else its
    path (``.venv/bin/vitaclip`` after the README's setup, whose environment is not activated)."""
    installed = Path(sys.prefix) / "bin" / "vitaclip"
    found = shutil.which("vitaclip")
    if not installed.exists() or (found is not None and Path(found).resolve() == installed.resolve()):
        return "vitaclip"  # installed elsewhere (pip --user, a system package): on the PATH
    try:
        return str(installed.relative_to(Path.cwd()))
    except ValueError:
        return str(installed)

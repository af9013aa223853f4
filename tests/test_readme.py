"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

from local_ray import start_local_ray


def test_readme_python_example_runs(capsys) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "vitaclip-tiny@sha256:" in out


def test_readme_table_readers_run_offline(tmp_path: Path, monkeypatch, capsys) -> None:
    """The README's readers (DuckDB with the wheel's extension, pandas, polars, Ray Data) on a real output at the
    path the README names, as written: one row per video, the failed file's row among them."""
    import ray

    from jobs.index_videos import main
    from vitaclip.samples import write_sample_video

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "delta_scan" in b]
    for i in range(2):
        write_sample_video(tmp_path / "in" / f"v{i}.mp4", num_frames=24, fps=12, width=64, height=48, seed=i)
    (tmp_path / "in" / "broken.mp4").write_bytes(b"not a video" * 10)
    work = tmp_path / "my work #1 été"  # a home folder's space (and more) in the output's absolute path
    work.mkdir()
    (tmp_path / "in").rename(work / "in")
    monkeypatch.chdir(work)
    out = "out/quickstart/index-output"
    start_local_ray()
    try:
        assert main(["in", "--output", out, "--model", "vitaclip-tiny", "--random-weights", "--no-index"]) == 0
        capsys.readouterr()
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
        (reader,) = re.findall(r"`(from index\.tables import read_table; [^`]+)`", readme)  # the exit-safe reader
        exec(compile(reader.replace("; ", "\n__frame = ", 1), "README.md", "exec"), scope)
        frame = scope["__frame"]
    finally:
        ray.shutdown()
    said = capsys.readouterr().out
    assert "│ ok" in said and "not_a_video" in said and "v0.mp4" in said, said
    assert scope["pl"].read_delta(f"{out}/videos", use_pyarrow=True).height == 3
    assert sorted(frame["status"]) == ["not_a_video", "ok", "ok"] and list(frame.columns) == ["uri", "status"]

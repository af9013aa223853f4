"""The command line as users run it: models, label, index (the quickstart is tested in test_demo_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

from vitaclip.cli import main
from vitaclip.samples import write_sample_video


def test_models_lists_registry(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vitaclip-b16" in out and "clip-b16-frames" in out and "vitaclip-tiny" in out


def test_label_prints_json_and_status_for_bad_files(tmp_path: Path, capsys) -> None:
    video = write_sample_video(tmp_path / "v.mp4", num_frames=24, fps=12, width=96, height=72, pattern="shape")
    (tmp_path / "bad.mp4").write_bytes(b"")
    rc = main(["label", str(video), str(tmp_path / "bad.mp4"), "--top-k", "2", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert rc == 1  # one input failed
    assert results[0]["status"] == "ok" and len(results[0]["labels"]) == 2 and len(results[0]["pts_seconds"]) == 8
    assert results[1]["status"] == "empty"


def test_unknown_model_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["label", str(tmp_path / "x.mp4"), "--model", "vitaclip-b99"]) == 2
    assert "unknown model 'vitaclip-b99'" in capsys.readouterr().err


def test_index_subcommand_passes_flags_to_the_job(tmp_path: Path, capsys) -> None:
    assert main(["index", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "vitaclip-b16"]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err

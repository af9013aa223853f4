"""The command line as users run it: models, label, index (the quickstart is tested in test_demo_model.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from jobs.cli import main
from vitaclip.samples import write_sample_video


def test_models_lists_registry(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vitaclip-b16" in out and "clip-b16-frames" in out and "vitaclip-tiny" in out


def test_label_prints_json_and_status_for_bad_files(tmp_path: Path, capsys) -> None:
    video = write_sample_video(tmp_path / "v.mp4", num_frames=24, fps=12, width=96, height=72, pattern="shape")
    (tmp_path / "bad.mp4").write_bytes(b"")
    inputs = [str(video), str(tmp_path / "bad.mp4"), str(tmp_path / "never-there.mp4")]
    rc = main(["label", *inputs, "--model", "vitaclip-tiny", "--random-weights", "--top-k", "2", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert rc == 1  # one input failed
    assert results[0]["status"] == "ok" and len(results[0]["labels"]) == 2 and len(results[0]["pts_seconds"]) == 8
    assert results[1]["status"] == "empty"
    assert results[2]["status"] == "not_found" and "never there" in results[2]["error_message"]


def test_unknown_model_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["label", str(tmp_path / "x.mp4"), "--model", "vitaclip-b99"]) == 2
    assert "unknown model 'vitaclip-b99'" in capsys.readouterr().err


def test_label_refuses_a_model_that_is_not_the_checkpoint_folders(tmp_path: Path, tiny_checkpoint, capsys) -> None:
    """A checkpoint folder carries its config, which won over --model without a word (labels of another model)."""
    video = write_sample_video(tmp_path / "v.mp4", num_frames=12, fps=12, width=64, height=64, pattern="shape")
    for model in ("vitaclip-demo", "vitaclip-b16"):  # the default's name too, when given
        assert main(["label", str(video), "--model", model, "--checkpoint", str(tiny_checkpoint)]) == 2
        line = _one_line_error(capsys)
        assert f"--model {model!r} is not the model of checkpoint" in line and "'vitaclip-tiny'" in line, line
    for given in ([], ["--model", "vitaclip-tiny"]):  # the folder's own name, or none
        assert main(["label", str(video), *given, "--checkpoint", str(tiny_checkpoint), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["status"] == "ok"


def test_index_subcommand_passes_flags_to_the_job(tmp_path: Path, capsys) -> None:
    assert main(["index", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "vitaclip-b16"]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- newcomer traps


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["quickstart", "--bogus"],
        ["models", "--bogus"],
        ["search", "--index", "o", "--bogus", "q"],
        ["runs", "o", "--bogus"],
    ],
)
def test_an_unknown_flag_is_refused_by_the_command_that_was_given_it(argv: list[str], capsys) -> None:
    """Said with the command's usage and name (the top-level parser said "vitaclip: error" with the list of
    commands), exit 2 as argparse does."""
    command = argv[0]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"vitaclip {command}: error: unrecognized arguments: --bogus" in err, err
    assert err.startswith(f"usage: vitaclip {command}"), err


def test_label_refuses_random_weights_unless_asked(tmp_path: Path, capsys) -> None:
    video = write_sample_video(tmp_path / "v.mp4", num_frames=12, fps=12, width=64, height=64, pattern="shape")
    assert main(["label", str(video)]) == 2  # the default model has no packaged weights
    line = _one_line_error(capsys)
    assert "needs --checkpoint" in line and "--random-weights" in line and "vitaclip-demo" in line
    assert main(["label", str(video), "--model", "vitaclip-tiny"]) == 2
    assert "needs --checkpoint" in _one_line_error(capsys)
    assert main(["label", str(video), "--model", "vitaclip-tiny", "--random-weights", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "ok"
    assert main(["label", str(video), "--model", "vitaclip-demo", "--json"]) == 0  # packaged weights: no flag


def test_broken_file_says_its_reason_once(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all, just some text to look at\n" * 4)
    assert main(["label", str(bad), "--model", "vitaclip-demo"]) == 1
    line = [ln for ln in capsys.readouterr().out.splitlines() if "bad.mp4" in ln][0]
    assert line.count("not_a_video") == 1, line


def test_misspelt_model_is_named_before_checkpoint_advice(tmp_path: Path, capsys) -> None:
    assert main(["index", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "vitaclip-dmeo"]) == 2
    line = _one_line_error(capsys)
    assert "unknown model 'vitaclip-dmeo'" in line and "vitaclip-demo" in line and "checkpoint" not in line
    assert main(["label", str(tmp_path / "x.mp4"), "--model", "vitaclip-dmeo"]) == 2
    assert "unknown model 'vitaclip-dmeo'" in _one_line_error(capsys)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("top_k: [1, 2\nmodel: x\n", "not valid YAML"),
        ('top_k: "three"\n', "top_k must be an integer, got 'three'"),
        ("- just\n- a list\n", "a YAML mapping"),
        ("embed_batch_size: 1.5\n", "embed_batch_size must be an integer"),
        ("segment_seconds: ten\n", "segment_seconds must be a number or null"),
        ("top_kk: 3\n", "unknown option 'top_kk'"),
        ("inputs: 5\n", "inputs must be a list of strings (or one string), got int"),
        ("extensions: {mp4: 1}\n", "extensions must be a list of strings (or one string), got dict"),
        ("prune_missing: true\nprune_scopes: 5\n", "prune_scopes must be a list of strings (or one string), got int"),
        ("no_index: 1\n", "no_index must be true or false, got 1"),
        ("no_index: true\nbuild_index: true\n", "'build_index' repeats an option"),
    ],
)
def test_bad_config_files_are_one_clear_line(tmp_path: Path, capsys, yaml_text: str, expected: str) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml_text)
    argv = ["index", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "vitaclip-demo", "--config"]
    assert main([*argv, str(config)]) == 2
    line = _one_line_error(capsys)
    assert expected in line and str(config) in line


def test_config_file_keys_may_be_the_flags_names(tmp_path: Path) -> None:
    """`--config` takes the flags' names as keys (`no-index`, `prune_scope`, `top-k`), as `--help` says, as well
    as the config's own fields."""
    from jobs.config import config_from_args

    config = tmp_path / "job.yaml"
    argv = [str(tmp_path), "--output", str(tmp_path / "o"), "--model", "vitaclip-demo", "--config", str(config)]
    config.write_text("no_index: true\nprune-missing: true\nprune_scope: [s3://b/p]\ntop-k: 4\n")
    made = config_from_args(argv)
    assert (made.build_index, made.prune_missing, made.prune_scopes, made.top_k) == (False, True, ("s3://b/p",), 4)
    config.write_text("build_index: false\nprune_missing: true\nprune_scopes: s3://b/p\n")
    made = config_from_args(argv)
    assert (made.build_index, made.prune_scopes) == (False, ("s3://b/p",))
    config.write_text("no-index: false\n")
    assert config_from_args(argv).build_index is True
    assert config_from_args([*argv, "--no-index"]).build_index is False  # flags override the file
    assert config_from_args(argv).include_hidden is False  # hidden entries are left out by default
    assert config_from_args([*argv, "--include-hidden"]).include_hidden is True
    config.write_text("include-hidden: true\n")
    assert config_from_args(argv).include_hidden is True


def test_missing_config_file_is_one_clear_line(tmp_path: Path, capsys) -> None:
    argv = ["index", str(tmp_path), "--output", str(tmp_path / "o"), "--config", str(tmp_path / "nope.yaml")]
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert "does not exist" in line and "nope.yaml" in line and "FileNotFoundError" not in line


def test_checkpoint_config_with_wrong_types_is_one_clear_line(tmp_path: Path, capsys) -> None:
    import vitaclip

    folder = tmp_path / "ckpt"
    vitaclip.save_checkpoint(vitaclip.create_model("vitaclip-tiny"), folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["num_frames"] = "eight"
    (folder / "config.json").write_text(json.dumps(meta))
    video = write_sample_video(tmp_path / "v.mp4", num_frames=12, fps=12, width=64, height=64, pattern="shape")
    assert main(["label", str(video), "--checkpoint", str(folder)]) == 2
    line = _one_line_error(capsys)
    assert "num_frames must be an integer, got 'eight'" in line and "config.json" in line
    assert main(["index", str(tmp_path), "--output", str(tmp_path / "o"), "--checkpoint", str(folder)]) == 2
    line = _one_line_error(capsys)
    assert "num_frames must be an integer, got 'eight'" in line


def test_help_names_the_command_typed_and_its_defaults(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["index", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vitaclip index") and "jobs.index_videos" not in out
    flat = " ".join(out.split())  # argparse wraps help lines at the terminal width
    assert "(default: 5)" in flat and "(default: vitaclip-b16)" in flat and flat.count("(default: vitaclip-b16)") == 1
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"vitaclip {vitaclip_version()}"


def vitaclip_version() -> str:
    import vitaclip

    return vitaclip.__version__


@pytest.mark.parametrize(("command", "usage"), [("train", "vitaclip train"), ("demo", "vitaclip demo")])
def test_job_commands_show_the_command_typed(capsys, command: str, usage: str) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert capsys.readouterr().out.startswith(f"usage: {usage}")


def test_submit_help_names_the_command_typed(capsys) -> None:
    from jobs.submit import main as submit_main

    assert main(["submit", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: vitaclip submit")
    assert submit_main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m jobs.submit")
    assert submit_main(["--metadata", "novalue", "--", "in", "--output", "o"]) == 2
    assert capsys.readouterr().err.startswith("python -m jobs.submit: error:")


def test_eval_of_the_packaged_model_needs_no_checkpoint(tmp_path: Path, capsys) -> None:
    """The packaged model has weights: eval must not ask for --checkpoint (it fails later, on the missing list)."""
    rc = main(["eval", "--model", "vitaclip-demo", "--list", str(tmp_path / "missing.csv"), "--label-names", "demo"])
    err = capsys.readouterr().err
    # "demo" is the packaged model's label set, by name (it was read as a file named demo)
    assert rc == 2 and "--checkpoint" not in err and f"no such file: {tmp_path / 'missing.csv'}" in err
    assert "Traceback" not in err
    known = ["--list", str(tmp_path / "missing.csv"), "--label-names", "kinetics400"]
    assert main(["eval", "--model", "vitaclip-dmeo", *known]) == 2
    assert "unknown model 'vitaclip-dmeo'" in capsys.readouterr().err
    assert main(["eval", "--model", "vitaclip-tiny", *known]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


def test_eval_refuses_a_model_that_is_not_the_checkpoint_folders(tmp_path: Path, tiny_checkpoint, capsys) -> None:
    known = ["--list", str(tmp_path / "missing.csv"), "--label-names", "kinetics400"]
    assert main(["eval", "--model", "vitaclip-b16", "--checkpoint", str(tiny_checkpoint), *known]) == 2
    assert "--model 'vitaclip-b16' is not the model of checkpoint" in _one_line_error(capsys)
    assert main(["eval", "--model", "vitaclip-tiny", "--checkpoint", str(tiny_checkpoint), *known]) == 2
    assert "missing.csv" in _one_line_error(capsys)  # the model is right: on to the missing list


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [("steps: [1, 2\n", "not valid YAML (line 2"), ('steps: "three"\n', "steps must be an integer, got 'three'")],
)
def test_bad_training_config_files_are_one_clear_line(tmp_path: Path, capsys, yaml_text: str, expected: str) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(yaml_text)
    argv = ["train", "--config", str(config), "--train-list", str(tmp_path / "x.csv"), "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert expected in line and str(config) in line
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--train-list", "x.csv", "--output", "o"]) == 2
    assert "config file" in _one_line_error(capsys)


def _model_cell(model_id: str) -> str:
    from jobs.runs import _model

    return _model(model_id)


def test_runs_of_a_folder_that_is_no_output_is_an_error(tmp_path: Path, capsys) -> None:
    """The parent folder of an output answered "no runs recorded", exit 0, as if it were an empty output."""
    (tmp_path / "out" / "videos" / "_delta_log").mkdir(parents=True)  # an output, as far as the check goes
    assert main(["runs", str(tmp_path)]) == 2
    assert f"{tmp_path} is not an output of the indexing job" in (err := _one_line_error(capsys))
    assert "outputs in its subfolders: out" in err
    assert main(["runs", str(tmp_path / "empty")]) == 2  # missing: as before
    _one_line_error(capsys)


def test_runs_shows_running_failed_and_unreadable_records(tmp_path: Path, capsys) -> None:
    from jobs.config import IndexJobConfig
    from jobs.pipeline import RunRecord
    from jobs.storage import LocalStore

    store = LocalStore(tmp_path / "out")
    config = IndexJobConfig(inputs=(str(tmp_path),), output=str(tmp_path / "out"), model="vitaclip-tiny",
                            random_weights=True)  # fmt: skip
    model_id = "vitaclip-tiny@sha256:" + "0123456789abcdef" * 4
    running = RunRecord(store, config, model_id=model_id, versions={"videos": 0, "segments": 0})
    failed = RunRecord(store, config, model_id="m", versions={"videos": 0, "segments": 0})
    failed.fail(RuntimeError("the store at https://user:hunter2@minio.example/x went away"))
    stopped = RunRecord(store, config, model_id="m", versions={"videos": 0, "segments": 0})
    stopped.fail(KeyboardInterrupt())
    terminated = RunRecord(store, config, model_id="m", versions={"videos": 0, "segments": 0})
    terminated.fail(SystemExit(signal.SIGTERM))
    from ray.exceptions import RayTaskError

    rendered = '\x1b[36mray::write_blocks()\x1b[39m (pid=1, ip=127.0.0.1)\n  File "pipeline.py", line 1\nOSError: x'
    task_failed = RunRecord(store, config, model_id="m", versions={"videos": 0, "segments": 0})
    task_failed.fail(RayTaskError("write_blocks", rendered, OSError("upload body lost")).as_instanceof_cause())
    long_failed = RunRecord(store, config, model_id="m", versions={"videos": 0, "segments": 0})
    long_failed.fail(ValueError("rows were made with other settings: " + "x" * 500 + " top_k: 3 (this run: 5)"))
    (tmp_path / "out" / "runs" / "zz-damaged.json").write_text("{not json")
    # Of another shape: no run_id (the file names it), NaN (not JSON to strict readers), prune_held_back not a list.
    odd = {"state": "committed", "elapsed_seconds": float("nan"), "counts": [1], "status": {"ok": "x"}}
    (tmp_path / "out" / "runs" / "yy-odd.json").write_text(json.dumps({**odd, "prune_held_back": 5}))
    (tmp_path / "out" / "runs" / "sub").mkdir()
    (tmp_path / "out" / "runs" / "sub" / "not-a-run.json").write_text("{}")  # not a run record: not listed
    held = {"run_id": "xx-held", "state": "committed", "status": {"ok": 2}, "prune_left_alone": ["/w/"],
            "prune_held_back": [{"scope": "/v/", "no_longer_listed": 40, "listed": 60}, "odd"]}  # fmt: skip
    (tmp_path / "out" / "runs" / "xx-held.json").write_text(json.dumps(held))
    spent = {"run_id": "vv-spent", "state": "committed", "status": {}, "counts": {"listed": 3, "attempts_exhausted": 3}}
    (tmp_path / "out" / "runs" / "vv-spent.json").write_text(json.dumps(spent))  # nothing planned: all failed before
    running.alive()  # after a commit
    started = (datetime.now(timezone.utc) - timedelta(hours=3, minutes=5, seconds=30)).isoformat()
    (tmp_path / "out" / "runs" / "ww-lost.json").write_text(json.dumps({"state": "running", "started_at": started}))
    assert main(["runs", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "state", "model", "started"] and len(lines) == 12
    by_id = {line.split()[0]: line for line in lines[1:]}
    assert by_id[running.run_id].split()[2] == "vitaclip-tiny@01234567"  # two checkpoints of one config differ here
    assert _model_cell(model_id + "+config:0a1b2c3d4e5f") == "vitaclip-tiny@01234567+config:0a1b2c3d4e5f"
    assert len(_model_cell("x" * 3000 + "@sha256:" + "0" * 64)) == 64  # the settings lines give whole ids
    assert "no end recorded: running now, or its driver was killed" in by_id[running.run_id]
    assert re.search(r"\(last heard of \d+ s ago, at its last commit\)", by_id[running.run_id])
    assert by_id["ww-lost"].endswith("(last heard of 3 h 5 min ago, at its start)")  # a killed run, most likely
    assert "RuntimeError: the store at" in by_id[failed.run_id] and "hunter2" not in by_id[failed.run_id]
    assert by_id[long_failed.run_id].endswith("x…")  # cut, and saying so (--json has it whole)
    assert by_id["zz-damaged"].split()[1] == "unreadable"
    assert by_id[stopped.run_id].split()[1] == "interrupted" and "(Ctrl-C or SIGINT)" in by_id[stopped.run_id]
    assert by_id[terminated.run_id].split()[1] == "interrupted" and "(SIGTERM)" in by_id[terminated.run_id]
    # A Ray task's error: the task's own exception in one line, not Ray's coloured traceback of it.
    error = json.loads((tmp_path / "out" / "runs" / f"{task_failed.run_id}.json").read_text())["error"]
    assert error == "OSError in write_blocks: upload body lost", error
    assert by_id["yy-odd"].split()[1:] == ["committed", "-", "-", "-", "-", "nothing", "to", "do"]
    assert by_id["xx-held"].endswith(
        "ok 2; pruning held back (40 no longer listed, --prune-max); 1 scope(s) listed nothing, not pruned"
    )
    assert by_id["vv-spent"].endswith("nothing to do; 3 failed in every allowed attempt (--max-attempts)")
    assert main(["runs", str(tmp_path / "out"), "--last", "1", "--json"]) == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["run_id"] == "zz-damaged" and only["state"] == "unreadable"
    assert main(["runs", str(tmp_path / "out"), "--json"]) == 0
    strict = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"{name} in --json"))
    assert [r["run_id"] for r in strict if r["run_id"] == "yy-odd"] == ["yy-odd"] and len(strict) == 11
    for command in ("runs", "build-index", "migrate"):  # commands that read an output never make one
        for nowhere in (str(tmp_path / "nowhere"), ""):
            assert main([command, nowhere]) == 2, command
            assert "no output folder at" in capsys.readouterr().err, command
        assert not (tmp_path / "nowhere").exists(), command


def test_an_interrupted_run_or_training_says_what_stays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C is one line and exit 130, not a traceback (the run's record says "interrupted": above)."""
    from jobs import pipeline, train

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_index_job", interrupted)
    monkeypatch.setattr(train, "config_from_args", interrupted)  # Ctrl-C while Ray starts
    job = [str(tmp_path), "--output", str(tmp_path / "out"), "--model", "vitaclip-tiny", "--random-weights"]
    assert main(["index", *job]) == 130
    err = capsys.readouterr().err
    assert "interrupted: what this run committed stays" in err and "Traceback" not in err, err

    # A real Ctrl-C during a run, in this process: the first is the run's (recorded, one line), and once the run
    # has returned Python's own handler is back, so a later run gets its own first interrupt too (the handler that
    # ends the process on a second Ctrl-C stayed, and ended the next run at its first; found by review).
    def ctrl_c(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        raise AssertionError("SIGINT did not interrupt the run")

    monkeypatch.setattr(pipeline, "run_index_job", ctrl_c)
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest-xdist's workers ignore SIGINT
    try:
        for _ in range(2):
            assert main(["index", *job]) == 130
            assert "interrupted: what this run committed stays" in capsys.readouterr().err
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, ignored)
    # SIGTERM (ray job stop, a pod's end): Ray's handler in the driver raises SystemExit(15).
    monkeypatch.setattr(pipeline, "run_index_job", lambda *a, **k: sys.exit(signal.SIGTERM))
    assert main(["index", *job]) == 143
    assert "interrupted: what this run committed stays" in capsys.readouterr().err
    monkeypatch.setattr(pipeline, "run_index_job", lambda *a, **k: sys.exit(4))
    with pytest.raises(SystemExit):  # another exit is not an interruption
        main(["index", *job])
    (tmp_path / "train.csv").write_text("path,label\n")
    assert main(["train", "--train-list", str(tmp_path / "train.csv"), "--output", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "interrupted: the same command resumes" in err and "Traceback" not in err, err


def test_a_write_task_that_fails_on_a_full_disk_is_one_line_naming_the_task_and_its_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray task's OSError (a full disk under the output) reaches the driver as RayTaskError(OSError), whose message
    is the task's whole rendered traceback: the command's last line is the task's own error, once, and exit 1."""
    from ray.exceptions import RayTaskError

    from jobs import pipeline

    cause = OSError(28, "No space left on device")
    rendered = '\x1b[36mray::write_blocks()\x1b[39m (pid=1, ip=127.0.0.1)\n  File "index/writer.py", line 1\n' + str(
        cause
    )

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise RayTaskError("write_blocks", rendered, cause).as_instanceof_cause()

    monkeypatch.setattr(pipeline, "run_index_job", full_disk)
    job = [str(tmp_path), "--output", str(tmp_path / "out"), "--model", "vitaclip-tiny", "--random-weights"]
    assert main(["index", *job]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "vitaclip index: error: OSError in write_blocks: [Errno 28] No space left on device", err


def test_serve_and_search_refuse_what_they_cannot_use_before_loading(tmp_path: Path, capsys) -> None:
    """A port out of range or in use, or an output that is not there, is one line (exit 2), said before any index
    or model loads (the port is checked first: here the output does not even exist)."""
    import socket

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--index", str(tmp_path), "--port", "70000"])
    assert exited.value.code == 2 and "a port is 1-65535 (0: any free one), got '70000'" in capsys.readouterr().err
    for value in ("inf", "nan", "0", "1e300"):  # inf crashed, nan was a raw message, 1e300 lifted the limit
        with pytest.raises(SystemExit) as exited:
            main(["serve", "--index", str(tmp_path), "--max-upload-mb", value])
        assert exited.value.code == 2 and "an upload limit is above 0 and at most 4096 MiB" in capsys.readouterr().err
    for value in ("nan", "inf", "-1", "5", "0"):  # written into index_info.json as NaN, or used as the extremes
        with pytest.raises(SystemExit) as exited:
            main(["build-index", str(tmp_path), "--recall-target", value])
        assert exited.value.code == 2 and "a recall target is above 0 and at most 1" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--index", str(tmp_path / "nowhere"), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    for output in (tmp_path / "nowhere", tmp_path / "a-file"):
        for command in (["search", "--index", str(output), "red"], ["serve", "--index", str(output), "--port", "0"]):
            assert main(command) == 2, command
            err = capsys.readouterr().err
            assert f"no output folder at {output}" in err and "Traceback" not in err, err
    # A folder that is not an output says so (naming outputs inside it), not "build it with build-index", which then
    # found no rows; one of the previous layout points at migrate; an output with tables and no index at build-index.
    parent = tmp_path / "quickstart"
    (parent / "index-output" / "videos" / "_delta_log").mkdir(parents=True)
    (tmp_path / "old" / "_commits").mkdir(parents=True)
    for output, hint in (
        (parent, f"{parent} is not an output of the indexing job (no videos table) (outputs in its subfolders: "
                 "index-output)"),
        (tmp_path / "old", f"convert it with `vitaclip migrate {tmp_path / 'old'}`"),
        (parent / "index-output", "build it with `vitaclip build-index`"),
    ):  # fmt: skip
        assert main(["search", "--index", str(output), "red"]) == 2
        assert hint in capsys.readouterr().err, output


@pytest.mark.parametrize("where", ["input", "output", "runs", "search"])
def test_object_urls_with_credentials_are_refused_before_any_request(
    tmp_path: Path, capsys, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``s3://KEY:SE/CRET@bucket/...``: the secret's "/" ends the authority, so a client would take "KEY:SE" for a
    bucket and print it in its "invalid bucket name" error (stderr, the run record). Refused up front, masked."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: no request may be needed
    url = "s3://AKIAEXAMPLEKEY:wJalr/XUtnFEMI+K7MDENG@media/videos/"
    argv = {
        "input": ["index", url, "--output", str(tmp_path / "o"), "--model", "vitaclip-demo"],
        "output": ["index", str(tmp_path), "--output", url, "--model", "vitaclip-demo"],
        "runs": ["runs", url],
        "search": ["search", "--index", url, "a red circle"],
    }[where]
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert "has credentials in it" in line and "s3://***@media/videos" in line
    assert "AKIAEXAMPLEKEY" not in line and "wJalr" not in line
    assert not (tmp_path / "o").exists()


def test_storage_configuration_errors_say_what_to_check(
    s3_server: str, s3_bucket: Any, s3_strict_auth: Any, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from jobs.cli import storage_hint

    # What pyarrow's S3 client and delta-rs say (quoted from runs against a wrong endpoint and a wrong secret).
    unreachable = "When reading information for key 'x': AWS Error NETWORK_CONNECTION during HeadObject: curlCode: 7"
    assert "check --s3-endpoint-url" in storage_hint(unreachable)
    assert "check the credentials" in storage_hint("AWS Error ACCESS_DENIED during HeadObject operation")
    assert storage_hint("No such file or directory: /out/index/x.faiss") == ""  # not a configuration problem
    _, bucket = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-do-not-print")
    assert main(["search", "--index", f"s3://{bucket}/out", "a red car", "--s3-endpoint-url", s3_server]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitaclip search: error: ") and len(err.strip().splitlines()) == 1, err
    assert "check the credentials" in err and "wrong-secret" not in err and "AKIAWRONG" not in err


def _reader_command(command: str, out: str) -> list[str]:
    """The arguments of a command that reads output `out`."""
    return {
        "search": ["search", "--index", out, "a red car"],
        "runs": ["runs", out],
        "build-index": ["build-index", out],
        "serve": ["serve", "--index", f"main={out}", "--port", "0"],
    }[command]


@pytest.mark.parametrize("command", ["search", "runs", "build-index", "serve"])
def test_no_credentials_at_all_are_said_as_the_job_says_them(
    command: str, s3_server: str, s3_bucket: Any, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """With no credentials in the standard chain the readers said the store's ACCESS_DENIED (exit 1 or 2 by
    command); they say what the job says, before any request, exit 2."""
    _, bucket = s3_bucket
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    out = f"s3://{bucket}/out"
    argv = _reader_command(command, out)
    assert main([*argv, "--s3-endpoint-url", s3_server]) == 2
    line = _one_line_error(capsys)
    assert f"cannot read {out}: no usable AWS credentials in the standard chain" in line, line


@pytest.mark.parametrize("command", ["search", "runs", "build-index", "serve"])
def test_an_endpoint_that_takes_no_connection_fails_at_once(
    command: str, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object store clients retry a refused connection for over a minute; the commands try one connection first
    and stop with what to check (the clients' own message names no endpoint)."""
    import socket

    with socket.socket() as free:  # a loopback port nothing listens on once this socket is closed
        free.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{free.getsockname()[1]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    out = "s3://media/nightly"
    argv = _reader_command(command, out)
    assert main([*argv, "--s3-endpoint-url", endpoint]) == 2
    line = _one_line_error(capsys)
    assert f"Could not connect to the endpoint URL {endpoint}" in line and "check --s3-endpoint-url" in line, line


def test_ray_serve_refuses_replicas_the_cluster_cannot_hold(local_ray, tmp_path: Path, capsys) -> None:
    """The replicas that fit would answer while the others waited for ever (and Serve warned every 30 s)."""
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    argv = ["serve", "--index", str(tmp_path), "--ray-serve", "--replicas", str(cpus + 1), "--port", "0"]
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert f"the service needs {cpus + 1} CPUs and 0 GPUs ({cpus + 1} replicas x 1 CPU) but the Ray cluster" in line
    assert "lower --replicas or --num-cpus-per-replica" in line


def test_the_quickstart_names_the_command_as_it_can_be_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the README's setup the environment is not activated: the hints it prints must run as shown."""
    import os

    from jobs.quickstart import command_name

    installed = Path(sys.prefix) / "bin" / "vitaclip"
    monkeypatch.setenv("PATH", str(tmp_path))  # no vitaclip found by the shell
    monkeypatch.chdir(Path(sys.prefix).parent)
    assert command_name() == str(installed.relative_to(Path(sys.prefix).parent))
    monkeypatch.chdir(tmp_path)
    assert command_name() == str(installed)
    monkeypatch.setenv("PATH", f"{installed.parent}{os.pathsep}{tmp_path}")  # activated
    assert command_name() == "vitaclip"


def test_the_quickstart_refuses_bad_flags_before_writing_any_video(tmp_path: Path, capsys) -> None:
    """--top-k 0 failed after 300 videos were written; --num-videos 0 ran the job, then advised a build-index that
    had nothing to index; an --output that is a file was a NotADirectoryError with exit 1 (a bug's)."""
    out = tmp_path / "qs"
    assert main(["quickstart", "--output", str(out), "--top-k", "0"]) == 2
    assert "top_k must be >= 1" in _one_line_error(capsys)
    assert main(["quickstart", "--output", str(out), "--num-videos", "0"]) == 2
    assert "--num-videos must be >= 1, got 0" in _one_line_error(capsys)
    assert not out.exists()
    (tmp_path / "afile").write_text("x")
    assert main(["quickstart", "--output", str(tmp_path / "afile"), "--num-videos", "1"]) == 2
    assert f"{tmp_path / 'afile'} exists and is not a folder" in _one_line_error(capsys)


def test_an_index_run_refused_for_its_checkpoint_leaves_no_output(tmp_path: Path, capsys) -> None:
    (tmp_path / "in").mkdir()
    argv = ["index", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "nope")]
    assert main(argv) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_the_endpoint_probe_stands_aside_for_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the endpoint is reached through a proxy, a direct connection says nothing about it."""
    import socket

    from index.s3 import check_endpoint_reachable

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{free.getsockname()[1]}"
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(OSError, match="Could not connect to the endpoint URL"):
        check_endpoint_reachable(endpoint)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    check_endpoint_reachable(endpoint)  # the clients go through the proxy: not probed
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(OSError, match="Could not connect"):
        check_endpoint_reachable(endpoint)


def test_local_paths_given_to_a_cluster_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster's processes resolve relative paths in their own working folders: with --ray-address, the rows
    were committed to ./out and the index update (an actor) looked for out/ under the head's folder. URIs stay."""
    from jobs.config import config_from_args

    monkeypatch.chdir(tmp_path)
    common = ["--model", "vitaclip-tiny", "--random-weights"]
    config = config_from_args(
        ["videos", "s3://bucket/raw/", "--output", "out", "--prune-missing", "--prune-scope", "videos", *common]
        + ["--ray-address", "127.0.0.1:6379"]
    )
    assert config.inputs == (str(tmp_path / "videos"), "s3://bucket/raw/")
    assert config.output == str(tmp_path / "out") and config.prune_scopes == (str(tmp_path / "videos"),)
    embedded = config_from_args(["videos", "--output", "out", *common])  # the job's own Ray works in this folder
    assert embedded.inputs == ("videos",) and embedded.output == "out"

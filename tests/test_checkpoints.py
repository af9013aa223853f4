"""Checkpoint formats: our own (safetensors + JSON + sha256), OpenAI/open_clip backbones, conversion, bad files."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import vitaclip
from jobs.cli import main as cli_main
from vitaclip.checkpoints import CheckpointError, load_torch_file, read_state_dict
from vitaclip.model import build_backbone
from vitaclip.registry import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from test_official_golden import GOLDEN, base_config, write_official_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def video(T: int = 8, size: int = 64) -> torch.Tensor:
    return torch.randn(2, T, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_own_format_round_trip_is_exact(tmp_path: Path) -> None:
    model = vitaclip.create_model("vitaclip-tiny")
    with torch.no_grad():  # make the prompts differ from a fresh init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    sha = vitaclip.save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["weights_sha256"] == sha and meta["format_version"] == 1
    loaded = vitaclip.create_model(None, checkpoint=tmp_path / "ckpt")
    assert loaded.config == model.config
    assert loaded.model_id == f"vitaclip-tiny@sha256:{sha}"
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(model.encode_video(video()), loaded.encode_video(video()))
        assert torch.equal(model.encode_labels(["yoga", "new label"]), loaded.encode_labels(["yoga", "new label"]))
    # The weights file alone, inside its folder, works too.
    assert vitaclip.create_model(None, checkpoint=tmp_path / "ckpt" / "model.safetensors").model_id == loaded.model_id


def test_saved_checkpoints_are_readable_as_the_umask_allows(tmp_path: Path) -> None:
    """Written through temporary files, the weights were private (0600) and training step folders 0700: another
    account, or a service reading the checkpoint, could not. They get the mode a plain write gives."""
    from vitaclip.training.state import save_training_checkpoint

    old = os.umask(0o022)
    try:
        model = vitaclip.create_model("clip-tiny-frames")
        vitaclip.save_checkpoint(model, tmp_path / "c")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad] or [torch.zeros(1)], lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        save_training_checkpoint(tmp_path / "step", model, optimizer, scheduler, scaler, step=1, samples_seen=2)
    finally:
        os.umask(old)
    assert (tmp_path / "c" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "step").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "step" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_own_format_detects_tampering_and_versions(tmp_path: Path) -> None:
    model = vitaclip.create_model("clip-tiny-frames")
    vitaclip.save_checkpoint(model, tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        vitaclip.create_model(None, checkpoint=tmp_path / "c")
    vitaclip.save_checkpoint(model, tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "config.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "d" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="version 99"):
        vitaclip.create_model(None, checkpoint=tmp_path / "d")


def _resign(folder: Path, weights: bytes) -> None:
    """Writes ``weights`` into a vitaclip folder and records their sha256, as a hand-made folder would."""
    (folder / "model.safetensors").write_bytes(weights)
    meta = json.loads((folder / "config.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    (folder / "config.json").write_text(json.dumps(meta))


def test_the_torch_free_folder_check_refuses_what_the_loader_refuses(tmp_path: Path) -> None:
    from vitaclip.checkpoint_folder import check_folder

    vitaclip.save_checkpoint(vitaclip.create_model("clip-tiny-frames"), tmp_path / "good")
    good = (tmp_path / "good" / "model.safetensors").read_bytes()
    assert check_folder(tmp_path / "good")["weights_sha256"] == hashlib.sha256(good).hexdigest()
    (length,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + length])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])  # not at 0

    def with_header(change: dict[str, object]) -> bytes:
        text = json.dumps({**header, **change}).encode()
        return struct.pack("<Q", len(text)) + text + good[8 + length :]

    begin, end = header[name]["data_offsets"]
    cases = [
        ("not a safetensors file", b"\xff" * 8 + good[8:]),
        ("unreadable safetensors header", struct.pack("<Q", 9) + b"{not json" + good[17:]),
        ("malformed entry", with_header({name: {**header[name], "dtype": "F128"}})),
        ("malformed entry", with_header({name: {**header[name], "dtype": ["F32"]}})),
        ("do not hold its shape", with_header({name: {**header[name], "data_offsets": [begin, end + 4]}})),
        ("holds no tensors", struct.pack("<Q", 2) + b"{}"),
        ("recursion", struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000 + good[8 + length :]),
        # two tensors over the same bytes (each of the right size), or bytes no tensor holds
        ("starts at byte", with_header({name: {**header[name], "data_offsets": [0, end - begin]}})),
        ("bytes of the", good + b"\0" * 8),
    ]
    for i, (match, weights) in enumerate(cases):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
        _resign(folder, weights)
        with pytest.raises(CheckpointError, match=match):
            check_folder(folder)
    # Any dtype of the format passes (the loader decides what the model takes), sub-byte ones included.
    import safetensors.torch

    state = safetensors.torch.load_file(tmp_path / "good" / "model.safetensors")
    state[name] = state[name].to(torch.float8_e4m3fn)
    state["packed"] = torch.zeros(3, dtype=torch.uint32)
    folder = tmp_path / "dtypes"
    shutil.copytree(tmp_path / "good", folder)
    _resign(folder, safetensors.torch.save(state))
    assert check_folder(folder)
    meta = json.loads((tmp_path / "good" / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**json.loads((folder / "config.json").read_text()), "default_labels": 5})
    )
    with pytest.raises(CheckpointError, match="'default_labels' must be a list of label names"):
        vitaclip.registry.resolve_model(None, folder)
    for weights_file in ("../good/model.safetensors", "/etc/passwd", ".."):
        (tmp_path / "good" / "config.json").write_text(json.dumps({**meta, "weights_file": weights_file}))
        with pytest.raises(CheckpointError, match="weights_file must be a file name"):
            check_folder(tmp_path / "good")
        with pytest.raises(CheckpointError, match="weights_file must be a file name"):
            vitaclip.create_model(None, checkpoint=tmp_path / "good")


def test_the_driver_plans_a_folder_model_without_torch(tmp_path: Path) -> None:
    """A job's driver resolves the packaged model and a checkpoint folder (id, config, labels, embedding size,
    checks) without importing torch or open_clip; the values match the loaded models'."""
    vitaclip.save_checkpoint(vitaclip.create_model("vitaclip-tiny"), tmp_path / "tiny")
    script = (
        "import json, sys\n"
        "from jobs.config import config_from_args\n"
        "from jobs.pipeline import resolve_run_model\n"
        "out = []\n"
        "for extra in (['--model', 'vitaclip-demo'], ['--checkpoint', sys.argv[1]]):\n"
        "    m = resolve_run_model(config_from_args(['in', '--output', 'out', *extra]))\n"
        "    out.append([m.model_id, m.embed_dim, m.image_size, len(m.label_names)])\n"
        "print(json.dumps([out, sorted({'torch', 'open_clip', 'torchvision'} & set(sys.modules))]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "tiny")], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resolved, imported = json.loads(done.stdout)
    assert imported == []
    models = [vitaclip.create_model("vitaclip-demo"), vitaclip.create_model(None, checkpoint=tmp_path / "tiny")]
    loaded = [[m.model_id, m.embed_dim, m.image_size, len(m.label_names)] for m in models]
    assert resolved == loaded


def test_backbone_configs_are_open_clips_own() -> None:
    """The config of a named backbone, read from open_clip's files without importing it, is what open_clip gives."""
    import open_clip

    from vitaclip.config import backbone_model_config

    configs = [vitaclip.get_model_config(name) for name in vitaclip.list_models()]
    named = [config for config in configs if config.backbone is not None and config.backbone_config is None]
    assert named, "no preset names an open_clip backbone"
    for config in named:
        assert backbone_model_config(config) == open_clip.get_model_config(config.backbone)


def test_convert_official_to_own_format_keeps_outputs(tmp_path: Path) -> None:
    meta = json.loads((GOLDEN / "official_full.json").read_text())
    src = write_official_checkpoint(meta, tmp_path / "official.pth")
    official = vitaclip.create_model(base_config(meta), checkpoint=src, label_names=meta["class_names"])
    config_file = tmp_path / "official-tiny.json"
    config_file.write_text(base_config(meta).to_json())
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(meta["class_names"]) + "\n")
    rc = cli_main(
        ["convert", str(src), str(tmp_path / "out"), "--model", str(config_file), "--label-names", str(labels_file)]
    )
    assert rc == 0
    converted = vitaclip.create_model(None, checkpoint=tmp_path / "out")
    x = torch.randn(1, 8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(official.encode_video(x), converted.encode_video(x))
        assert torch.equal(official.encode_labels(meta["class_names"]), converted.encode_labels(meta["class_names"]))
    assert converted.label_names == tuple(meta["class_names"])


def test_saving_into_a_folder_never_writes_through_its_links(tmp_path: Path) -> None:
    """`save_checkpoint` (and `vitaclip convert`) wrote config.json through a fixed temporary name and copied a label
    set onto its final name: links already in the folder (``config.json.tmp``, ``label_set.txt``) had it write the
    files they name, outside the folder."""
    labels = tmp_path / "labels.txt"
    labels.write_text("walking\nrunning\n")
    model = vitaclip.create_model("vitaclip-tiny", label_names=None)
    model.config = model.config.replace(label_set=str(labels))
    out = tmp_path / "out"
    out.mkdir()
    victims = {name: tmp_path / f"victim-{name}" for name in ("config.json.tmp", "label_set.txt", "config.json")}
    for name, victim in victims.items():
        victim.write_text("untouched")
        (out / name).symlink_to(victim)
    vitaclip.save_checkpoint(model, out)
    assert all(victim.read_text() == "untouched" for victim in victims.values())
    assert not (out / "config.json").is_symlink() and not (out / "label_set.txt").is_symlink()
    assert (out / "label_set.txt").read_text() == "walking\nrunning\n"
    assert vitaclip.create_model(None, checkpoint=out).config.label_set == str(out / "label_set.txt")


def test_a_label_name_too_long_to_tokenize_is_refused_at_once(tmp_path: Path) -> None:
    """The BPE tokenizer's time grows with the square of a word's length: a checkpoint whose config.json holds a
    label name of 30,000 letters took 14 s to load (a 1 MB one would take hours at every start). Names past
    1,000 characters are refused before any tokenizing, in config.json and in label files alike."""
    from vitaclip.labels import MAX_LABEL_CHARS

    vitaclip.save_checkpoint(vitaclip.create_model("vitaclip-tiny"), tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    long = "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(30_000))
    meta["label_names"] = ["walking", long]
    meta["default_labels"] = ["walking", long]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="label name 2 is 30,000 characters long"):
        vitaclip.create_model(None, checkpoint=tmp_path / "ckpt")
    assert time.perf_counter() - start < 5
    # The default labels alone (what the model scores when no label set is given) are held to the same limits
    from vitaclip.labels import MAX_LABELS

    for defaults, match in [
        (["walking", long], "'default_labels': label name 2"),
        ([f"l{i}" for i in range(MAX_LABELS + 1)], "more than"),
    ]:
        meta["label_names"], meta["default_labels"] = None, defaults
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=match):
            vitaclip.create_model(None, checkpoint=tmp_path / "ckpt")
        with pytest.raises(CheckpointError, match=match):
            vitaclip.registry.resolve_model(None, checkpoint=tmp_path / "ckpt")  # the torch-free driver's read
    labels = tmp_path / "labels.txt"
    labels.write_text("walking\n" + "x" * (MAX_LABEL_CHARS + 1) + "\n")
    with pytest.raises(ValueError, match="more than 1,000"):
        vitaclip.load_label_set(str(labels))


def test_weights_that_overflow_are_refused_not_written_as_nan(tmp_path: Path) -> None:
    """Finite weights that overflow in float32 (3e38 in the first convolution) gave NaN embeddings and labels
    scored "nan" with exit 0: a run would write NaN rows marked ok. The embed stage refuses the model instead."""
    from vitaclip.samples import write_sample_video
    from vitaclip.stages import label_files

    model = vitaclip.create_model("vitaclip-tiny")
    with torch.no_grad():
        model.clip.visual.conv1.weight.fill_(3e38)
    vitaclip.save_checkpoint(model, tmp_path / "huge")
    video = write_sample_video(tmp_path / "v.mp4", num_frames=24, fps=12, width=64, height=48)
    with pytest.raises(ValueError, match="the model is unusable.*video embeddings are not finite"):
        label_files([str(video)], model=None, checkpoint=str(tmp_path / "huge"), device="cpu")
    assert label_files([str(video)], model="vitaclip-tiny", checkpoint=None, device="cpu")[0]["status"] == "ok"


def _two_faced_zip(tmp_path: Path, elements: int) -> Path:
    """A torch.save zip that reads two ways: Python's zip reader finds a directory of stored entries (bytes put
    before an archive are allowed for), torch's reader the one the end record points at, whose storage entry is
    deflated and inflates to `elements` float32 values (its data.pkl declares that many)."""
    ok = tmp_path / "ok.pt"
    torch.save({"visual.conv1.weight": torch.arange(4, dtype=torch.float32)}, ok)
    with zipfile.ZipFile(ok) as src:
        entries = {name.replace("ok/", "x/"): src.read(name) for name in src.namelist()}
    size = b"J" + struct.pack("<i", elements)
    entries["x/data.pkl"] = (
        entries["x/data.pkl"].replace(b"K\x04t", size + b"t", 1).replace(b"K\x04\x85", size + b"\x85", 1)
    )

    def build(deflated: bool) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            for name, data in entries.items():
                info = zipfile.ZipInfo(name)
                if deflated and name == "x/data/0":
                    info.compress_type = zipfile.ZIP_DEFLATED
                    archive.writestr(info, bytes(elements * 4))
                else:
                    archive.writestr(info, data)
        return out.getvalue()

    def split(archive: bytes) -> tuple[bytes, bytes, bytes]:
        size, offset = struct.unpack("<II", archive[-22:][12:20])
        return archive[:offset], archive[offset : offset + size], archive[-22:]

    (t_body, t_dir, t_end), (p_body, p_dir, _) = split(build(True)), split(build(False))
    path = tmp_path / "two-faced.pt"
    path.write_bytes(t_body + t_dir + p_body.ljust(len(t_body), b"\0") + p_dir + t_end)
    return path


def test_a_zip_that_reads_two_ways_is_refused_before_anything_inflates(tmp_path: Path) -> None:
    """Python's zip reader checked that entries are stored, torch's reader (which torch.load uses) read another
    directory: a 1 MB file inflated 512 MB. Both readers must see the same entries of the same sizes."""
    path = _two_faced_zip(tmp_path, 4 << 20)  # 16 MB from a file of tens of KB
    assert path.stat().st_size < 200_000
    with zipfile.ZipFile(path) as python_view:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in python_view.infolist())
    with open(path, "rb") as f:
        assert torch._C.PyTorchFileReader(f).get_record_size("data/0") == 16 << 20  # what torch.load would inflate
    with pytest.raises(CheckpointError, match="read differently to torch"):
        read_state_dict(path)


def test_the_weights_loaded_are_the_weights_hashed(tmp_path: Path) -> None:
    """The folder's weights were hashed by one open and loaded by another: with the file swapped between them, 142
    of 346 loads named the good file's sha256 as their model id and held the other weights. Hash and load now read
    one open file; a load either holds the recorded weights or fails."""
    import threading

    model = vitaclip.create_model("vitaclip-tiny")
    vitaclip.save_checkpoint(model, tmp_path / "ckpt")
    good = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.clip.visual.conv1.weight.add_(1.0)
    vitaclip.save_checkpoint(model, tmp_path / "other")
    other = (tmp_path / "other" / "model.safetensors").read_bytes()
    expected = vitaclip.create_model(None, checkpoint=tmp_path / "ckpt").clip.visual.conv1.weight.detach().clone()
    stop = threading.Event()

    def swap() -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            staged = tmp_path / "ckpt" / f".staged{i % 2}"
            staged.write_bytes(other if i % 2 else good)
            os.replace(staged, tmp_path / "ckpt" / "model.safetensors")

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    wrong = loaded = 0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                weights = vitaclip.create_model(None, checkpoint=tmp_path / "ckpt").clip.visual.conv1.weight
            except CheckpointError:
                continue
            loaded += 1
            wrong += not torch.equal(weights, expected)
    finally:
        stop.set()
        swapper.join()
    assert wrong == 0, f"{wrong} of {loaded} loads held other weights than their model id names"


def test_a_weights_file_linked_out_of_its_folder_is_refused_without_its_hash(tmp_path: Path) -> None:
    """model.safetensors as a link to another file of the machine was hashed and the refusal quoted that hash: an
    oracle for what any readable file holds. A weights file must be a file of the folder."""
    folder = tmp_path / "ckpt"
    vitaclip.save_checkpoint(vitaclip.create_model("vitaclip-tiny"), folder)
    secret = tmp_path / "secret"
    secret.write_text("hunter2\n")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(secret)
    with pytest.raises(CheckpointError, match="a link to a file outside the folder") as refused:
        vitaclip.create_model(None, checkpoint=folder)
    assert hashlib.sha256(b"hunter2\n").hexdigest() not in str(refused.value)


def test_a_folder_whose_config_json_is_no_regular_file_says_so(tmp_path: Path) -> None:
    """A FIFO (or a folder) named config.json was reported as "a folder without config.json"; never opened."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.mkfifo(folder / "config.json")  # opening it would block: the check must not read it
    with pytest.raises(CheckpointError, match=r"config\.json is not a regular file"):
        vitaclip.create_model("vitaclip-tiny", checkpoint=folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="a folder without config.json"):
        vitaclip.create_model("vitaclip-tiny", checkpoint=folder)


def test_a_legacy_file_whose_storage_declares_more_than_it_holds_is_refused_in_words(tmp_path: Path) -> None:
    """torch's own message ran its numbers into an unformatted "expected %ld got %ld"."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf, _use_new_zipfile_serialization=False)  # before torch 1.6: pickles
    data = bytearray(buf.getvalue())
    at = data.rfind((4).to_bytes(8, "little"))  # the storage's element count, just before its bytes
    data[at : at + 8] = (2**31).to_bytes(8, "little")
    path = tmp_path / "legacy.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="declares another size than the bytes it holds") as refused:
        read_state_dict(path)
    assert "%ld" not in str(refused.value)


def test_a_config_json_edited_since_the_weights_were_saved_is_another_model(tmp_path: Path) -> None:
    """The model id names the weights file; config.json beside it decides what they compute. Another mean and std
    (or tower option, tokenizer, text context) made other embeddings under the same id, mixed into one table and
    one index: such a folder is a model of its own (``+config:``), for the driver and the loaded model alike."""
    folder = tmp_path / "ckpt"
    vitaclip.save_checkpoint(vitaclip.create_model("vitaclip-tiny"), folder)
    saved = json.loads((folder / "config.json").read_text())
    original = resolve_model(None, folder).model_id
    assert "+config:" not in original and vitaclip.create_model(None, checkpoint=folder).model_id == original

    def edit(**change: object) -> tuple[str, vitaclip.VitaClip]:
        (folder / "config.json").write_text(json.dumps({**saved, "config": {**saved["config"], **change}}))
        model = vitaclip.create_model(None, checkpoint=folder)
        assert model.model_id == resolve_model(None, folder).model_id  # what the driver plans = what actors load
        return model.model_id, model

    edited, model = edit(mean=[0.2, 0.3, 0.4])
    assert edited.startswith(original + "+config:")
    assert model.config.mean == (0.2, 0.3, 0.4)  # frames are normalised with it: other embeddings
    assert edit(mean=[0.2, 0.3, 0.4])[0] == edited  # the same edit, the same id
    assert edit(std=[0.5, 0.5, 0.5])[0] not in (original, edited)
    # The seed only draws weights that the file replaces: not the model.
    assert edit(seed=7)[0] == original
    context = {**saved["config"]["text_context"], "init_words": "a video of a person doing this now"}  # init
    assert edit(text_context=context)[0] == original
    assert edit(mean=[0, 0, 0])[0] == edit(mean=[0.0, 0.0, 0.0])[0] != original  # numbers by value
    # A class-specific context's label names say which learned row is which label: reordered, the same weights
    # score other labels (the weights header records them since this was found; older files record nothing)
    assert saved["config"]["text_context"]["kind"] == "class_specific" and len(set(saved["label_names"])) > 1
    (folder / "config.json").write_text(json.dumps({**saved, "label_names": saved["label_names"][::-1]}))
    relabelled = vitaclip.create_model(None, checkpoint=folder).model_id
    assert relabelled.startswith(original + "+config:") and relabelled == resolve_model(None, folder).model_id
    (folder / "config.json").write_text(json.dumps(saved))
    assert resolve_model(None, folder).model_id == original
    # Reading the saved config never blocks: weights replaced by a FIFO are refused at load, not waited on.
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    resolved = concurrent.futures.ThreadPoolExecutor(1).submit(resolve_model, None, folder)
    try:
        assert resolved.result(timeout=30).model_id == original
    finally:
        with contextlib.suppress(OSError):  # a reader stuck on it (the bug) gets an end of file, so the test ends
            os.close(os.open(folder / "model.safetensors", os.O_WRONLY | os.O_NONBLOCK))


def test_a_training_output_folder_is_accepted_wherever_a_checkpoint_is(tmp_path: Path, capsys) -> None:
    """index, label, search and build-index said "a folder without config.json" (build-index: "does not exist")
    for the folder `vitaclip train --output` wrote; it stands for its latest complete checkpoint."""
    from jobs.config import IndexJobConfig

    output = tmp_path / "train"
    for step, seed in ((4, 0), (8, 1)):
        model = vitaclip.VitaClip(vitaclip.get_model_config("vitaclip-tiny").replace(seed=seed))
        vitaclip.save_checkpoint(model, output / "checkpoints" / f"step-{step:09d}")
    (output / "checkpoints" / "step-000000012").mkdir()  # one being written: not complete, not taken
    latest = output / "checkpoints" / "step-000000008"
    want = vitaclip.create_model(None, checkpoint=latest).model_id
    assert vitaclip.create_model(None, checkpoint=output).model_id == want
    assert resolve_model(None, output).model_id == want
    config = IndexJobConfig(inputs=(str(tmp_path),), output=str(tmp_path / "out"), model="vitaclip-tiny",
                            checkpoint=str(output))  # fmt: skip
    assert config.checkpoint == str(latest)  # every embed actor loads that one, whatever training writes meanwhile
    empty = tmp_path / "empty"
    empty.mkdir()
    for call in (lambda: vitaclip.create_model("vitaclip-tiny", checkpoint=empty),
                 lambda: resolve_model("vitaclip-tiny", empty)):  # fmt: skip
        with pytest.raises(CheckpointError, match="folder without config.json: not a vitaclip checkpoint, nor a"):
            call()


def tiny_clip_state() -> dict[str, torch.Tensor]:
    clip = build_backbone(vitaclip.get_model_config("vitaclip-tiny"))
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() % 97)))
    return clip.state_dict()


@pytest.mark.parametrize("layout", ["openai", "open_clip_trainer", "openai_fp16"])
def test_clip_backbone_weights_load_as_frozen_backbone(layout: str, tmp_path: Path) -> None:
    state = tiny_clip_state()
    if layout == "openai":
        saved = dict(
            state, input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408)
        )
    elif layout == "open_clip_trainer":
        saved = {"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in state.items()}}
    else:
        saved = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(saved, tmp_path / "clip.pt")
    model = vitaclip.create_model("vitaclip-tiny", checkpoint=tmp_path / "clip.pt")
    tol = 1e-3 if layout == "openai_fp16" else 0.0
    for key, value in state.items():
        assert torch.allclose(model.clip.state_dict()[key].float(), value.float(), atol=tol), key
    # Label prompts are rebuilt from the loaded token embedding (the start token's row).
    assert model.text_context is not None and model.text_context.token_prefix is not None
    sot = model.clip.token_embedding.weight[49406]
    assert torch.allclose(model.text_context.token_prefix[0, 0], sot)
    assert model.model_id.startswith("vitaclip-tiny@sha256:")


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_openai_torchscript_archive_loads(tmp_path: Path) -> None:
    clip = build_backbone(vitaclip.get_model_config("vitaclip-tiny")).eval()
    traced = torch.jit.trace_module(clip, {"encode_image": torch.randn(1, 3, 64, 64)}, check_trace=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    state = read_state_dict(tmp_path / "ViT-tiny.pt")
    assert set(clip.state_dict()) <= set(state)
    model = vitaclip.create_model("vitaclip-tiny", checkpoint=tmp_path / "ViT-tiny.pt")
    assert torch.equal(model.clip.visual.conv1.weight, clip.visual.conv1.weight)


class Payload:
    def __reduce__(self):  # noqa: D105
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    torch.save({"model": {"x": torch.zeros(1)}, "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        vitaclip.create_model("vitaclip-tiny", checkpoint=tmp_path / "evil.pth")
    # A bare pickle (pickle.dump, not torch.save) was refused as "not a valid pickle": it is one, of the wrong kind.
    marker = tmp_path / "pwned"
    with open(tmp_path / "bare.pth", "wb") as f:
        pickle.dump({"model": Touch(str(marker))}, f)
    with pytest.raises(CheckpointError, match=r"the pickle at byte 0 names the global io.open"):
        vitaclip.create_model("vitaclip-tiny", checkpoint=tmp_path / "bare.pth")
    assert not marker.exists()
    with open(tmp_path / "bare.pth", "wb") as f:  # one of the right kind: still no checkpoint
        pickle.dump({"model": {"x": 1.0}}, f)
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint: 1 pickle\(s\) and nothing after"):
        vitaclip.create_model("vitaclip-tiny", checkpoint=tmp_path / "bare.pth")


class _Call:
    """What a pickle calls, with the arguments it chooses (torch's weights_only unpickler allows these)."""

    def __init__(self, target: Any, *args: Any) -> None:
        self.target, self.args = target, args

    def __reduce__(self):  # noqa: D105
        return (self.target, self.args)


@pytest.mark.parametrize(
    ("payload", "refusal"),
    [
        # 1.2 KB that torch.load turns into a 3.6 GB uninitialised tensor (its storage as large as it says)
        (_Call(torch.Tensor, 30000, 30000), "names the global torch.Tensor"),
        (_Call(bytearray, 3_000_000_000), "names the global __builtin__.bytearray"),
        (_Call(torch.FloatStorage, 1 << 30), "calls torch.FloatStorage"),  # a storage type: a tag, never called
        # a meta tensor has no storage: the storage checks passed it, and the model was built at its size
        (torch.empty(1 << 40, device="meta"), "names the global torch._utils._rebuild_meta_tensor_no_storage"),
    ],
)
def test_pickles_that_build_large_objects_from_a_few_bytes_are_refused(
    tmp_path: Path, payload: Any, refusal: str
) -> None:
    """torch's weights_only unpickler runs no code, but lets a pickle call tensor and buffer constructors with its
    own numbers: a few bytes of checkpoint took gigabytes before any check of the tensors. Only the calls torch.save
    writes for tensors and plain containers are allowed, before torch.load runs (found by review)."""
    for legacy in (False, True):
        torch.save({"model": {"x": payload}}, tmp_path / "big.pth", _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match=refusal):
            read_state_dict(tmp_path / "big.pth")


def test_what_torch_save_writes_for_tensors_and_containers_loads(tmp_path: Path) -> None:
    """The calls and globals allowed are those of torch.save's pickles of tensors (every dtype), parameters, views,
    ordered dicts, bytes, sets, sizes, devices and dtypes: a training state and the official layout load."""
    layer = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]
    saved = {
        "model": {f"t{i}": torch.ones(2, 3, dtype=dtype) for i, dtype in enumerate(dtypes)},
        "parameters": dict(layer.named_parameters()),
        "view": torch.arange(16.0).reshape(4, 4)[1:, ::2],
        "optimizer": optimizer.state_dict(),
        "other": {"bytes": b"\x00\xff", "set": {1, 2}, "size": torch.Size([2, 3]), "device": torch.device("cpu")},
        "dtype": torch.float16,
        "numbers": (1, 2.5, 1 + 2j, None, True, "text"),
    }
    for legacy in (False, True):  # float8 (`_rebuild_tensor_v3`): torch's legacy format cannot hold it
        torch.save(
            saved if legacy else {**saved, "float8": torch.zeros(2, dtype=torch.float8_e4m3fn)},
            tmp_path / "state.pt",
            _use_new_zipfile_serialization=not legacy,
        )
        loaded = load_torch_file(tmp_path / "state.pt")
        assert loaded["other"] == saved["other"] and loaded["numbers"] == saved["numbers"]
        assert torch.equal(loaded["view"], saved["view"]) and loaded["model"]["t3"].dtype == torch.float64


class Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: D105
        return (open, (self.path, "w"))


def test_official_checkpoint_errors(tmp_path: Path) -> None:
    meta = json.loads((GOLDEN / "official_full.json").read_text())
    config = base_config(meta)
    from synthetic import official_state_dict

    state = official_state_dict(meta["shapes"])
    missing = {k: v for k, v in state.items() if k != "visual.blocks.1.mlp.fc1.bias"}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing .*resblocks\.1\.mlp\.c_fc\.bias"):
        vitaclip.create_model(config, checkpoint=tmp_path / "missing.pth", label_names=meta["class_names"])

    wrong = dict(state)
    wrong["visual.blocks.0.summary_ln.weight"] = torch.ones(7)
    torch.save({"model": wrong}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="wrong shapes"):
        vitaclip.create_model(config, checkpoint=tmp_path / "wrong.pth", label_names=meta["class_names"])

    extra = dict(state, **{"visual.blocks.0.adapter.weight": torch.ones(3)})
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="not part of Vita-CLIP"):
        vitaclip.create_model(config, checkpoint=tmp_path / "extra.pth", label_names=meta["class_names"])

    torch.save({"model": state}, tmp_path / "ok.pth")
    with pytest.raises(CheckpointError, match="covers 5 labels but 2 label names were given: .*--label-names"):
        vitaclip.create_model(config, checkpoint=tmp_path / "ok.pth", label_names=["a", "b"])
    with pytest.raises(CheckpointError, match="covers 5 labels but no label names were given"):
        vitaclip.create_model(config, checkpoint=tmp_path / "ok.pth")
    # The default model's label set does not fit: the model named is the suspect, not the labels.
    with pytest.raises(CheckpointError, match=r"but model 'vitaclip-b16' comes with 400 label names .*model\?"):
        vitaclip.create_model("vitaclip-b16", checkpoint=tmp_path / "ok.pth")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (bytes(random.Random(5).getrandbits(8) for _ in range(4096)), "not a readable|refusing to unpickle"),
        (bytes(random.Random(6).getrandbits(8) for _ in range(4096)), "not a readable|refusing to unpickle"),
        (b"hello, I am text\n" * 10, "not a readable"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        vitaclip.create_model("vitaclip-tiny", checkpoint=path)


def test_unknown_layout_and_missing_file(tmp_path: Path) -> None:
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth: unknown checkpoint format"):  # which file: named
        vitaclip.create_model("vitaclip-tiny", checkpoint=tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        vitaclip.create_model("vitaclip-tiny", checkpoint=tmp_path / "nope.pth")
    # A URL is not "missing": it says checkpoints are local files (and shows no credentials).
    for url in ("s3://AKIA:se/cret@media/models/demo/", "https://host/m.pt?X-Amz-Signature=abc"):
        with pytest.raises(CheckpointError, match="is a URL: checkpoints are read from this machine's files") as caught:
            vitaclip.create_model("vitaclip-tiny", checkpoint=url)
        assert "cret" not in str(caught.value) and "abc" not in str(caught.value)
    from vitaclip.registry import model_id_for

    with pytest.raises(CheckpointError, match="is a URL"):
        model_id_for("vitaclip-tiny", "s3://media/models/m.pt")
    with pytest.raises(ValueError, match="model name"):
        vitaclip.create_model(None)


# ---------------------------------------------------------------------------------------------- TorchScript archives
# torch.jit.load runs code from the archive (a scripted module's __setstate__); vitaclip reads archives as data only.


class _Writer(torch.nn.Module):
    """A module with one weight and a ``target`` file that its subclasses' ``__setstate__`` overwrites."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))
        self.target = target
        self.written = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class TupleStateWriter(_Writer):
    """Pickles a tuple that its own ``__setstate__`` restores; restoring it overwrites ``target``."""

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight, self.target, self.training = state
        # Keep the result: TorchScript drops an in-place write whose tensor is never used again.
        self.written = int(torch.from_file(self.target, shared=True, size=8, dtype=torch.uint8).fill_(88).sum())


class DictStateWriter(_Writer):
    """Pickles its weights as a plain dict, so they can be read, but its ``__setstate__`` overwrites ``target``."""

    __constants__ = ["target"]  # compiled into the archive's code

    @torch.jit.export
    def __getstate__(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    @torch.jit.export
    def __setstate__(self, state: dict[str, torch.Tensor]) -> None:
        self.weight = state["weight"]
        self.training = False
        self.written = int(torch.from_file(self.target, shared=True, size=8, dtype=torch.uint8).fill_(88).sum())


def hostile_archive(tmp_path: Path, writer: type[torch.nn.Module]) -> tuple[Path, Path]:
    """A scripted archive of ``writer`` and the canary file its ``__setstate__`` overwrites, checked to be hostile."""
    canary = tmp_path / "canary.bin"
    canary.write_bytes(bytes(8))
    archive = tmp_path / "evil.pt"
    torch.jit.script(writer(str(canary))).save(str(archive))
    assert canary.read_bytes() == bytes(8)
    torch.jit.load(str(archive))  # the one deliberate load: proves the archive runs its code when torch loads it
    assert canary.read_bytes() == b"X" * 8
    canary.write_bytes(bytes(8))
    return archive, canary


def forbid_code_loading(monkeypatch: pytest.MonkeyPatch, *archives: Path) -> None:
    """Fails the test if torch.jit.load runs at all, or torch.load sees one of ``archives``."""

    def jit_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.jit.load was called")

    torch_load = torch.load

    def checked_load(f: object, *args: object, **kwargs: object) -> object:
        name = getattr(f, "name", f)
        assert not any(Path(str(name)).resolve() == a.resolve() for a in archives), f"torch.load({name})"
        return torch_load(f, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", jit_load)
    monkeypatch.setattr(torch, "load", checked_load)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("writer", [TupleStateWriter, DictStateWriter])
def test_torchscript_archive_code_never_runs(
    writer: type[torch.nn.Module], tmp_path: Path, noise_video: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, canary = hostile_archive(tmp_path, writer)
    forbid_code_loading(monkeypatch, archive)
    if writer is TupleStateWriter:  # only its __setstate__ could say what the tuple means: refused
        with pytest.raises(CheckpointError, match=r"__torch__\..*TupleStateWriter pickles a tuple .*__setstate__"):
            read_state_dict(archive)
        model_error = "__setstate__"
    else:  # the weights are plain data: read without the code
        state = read_state_dict(archive)
        assert list(state) == ["weight"] and torch.equal(state["weight"], torch.ones(4))
        model_error = "unknown checkpoint format"
    assert canary.read_bytes() == bytes(8)
    with pytest.raises(CheckpointError, match=model_error):
        vitaclip.create_model("vitaclip-tiny", checkpoint=archive)
    assert canary.read_bytes() == bytes(8)
    rc = cli_main(["label", str(noise_video), "--model", "vitaclip-tiny", "--checkpoint", str(archive)])
    assert rc == 2 and canary.read_bytes() == bytes(8)
    assert cli_main(["convert", str(archive), str(tmp_path / "out"), "--model", "vitaclip-tiny"]) == 2
    assert canary.read_bytes() == bytes(8) and not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_load_torch_file_refuses_torchscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, canary = hostile_archive(tmp_path, TupleStateWriter)
    forbid_code_loading(monkeypatch, archive)
    with pytest.raises(CheckpointError, match="TorchScript or other zip archive"):
        load_torch_file(archive)
    assert canary.read_bytes() == bytes(8)
    torch.save({"step": 3, "rng": torch.arange(3)}, tmp_path / "state.pt")
    loaded = load_torch_file(tmp_path / "state.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["rng"], torch.arange(3))


def rewrite_zip(src: Path, dst: Path, *, replace: dict[str, bytes] | None = None, drop: str | None = None) -> Path:
    """A copy of the zip ``src`` with entries replaced (by name suffix) or dropped (names matching ``drop``)."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if drop is not None and re.search(drop, info.filename):
                continue
            suffix = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, replace.get(suffix, zin.read(info)))
    return dst


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize(
    ("drop", "match"),
    [
        # Not TorchScript to torch.load any more, but its code is still there: read as data, refused.
        (r"/constants\.pkl$", "pickles a tuple"),
        # torch.save's layout: torch.load with weights only, which refuses the __torch__ class.
        (r"/constants\.pkl$|/code/", r"refusing to unpickle.*global __torch__\..*TupleStateWriter"),
    ],
)
def test_torchscript_archive_without_its_markers_is_refused(
    drop: str, match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, canary = hostile_archive(tmp_path, TupleStateWriter)
    stripped = rewrite_zip(archive, tmp_path / "stripped.pt", drop=drop)
    forbid_code_loading(monkeypatch)
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(stripped)
    assert canary.read_bytes() == bytes(8)


class GlobalPayload:
    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (self.func, (self.arg,))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize(
    ("func", "name"), [(os.system, r"(posix|nt)\.system"), (eval, r"(__builtin__|builtins)\.eval")]
)
def test_torchscript_pickle_naming_a_dangerous_global_is_refused(func: object, name: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "linear.pt"))
    for protocol in (0, 2, 4):  # GLOBAL, and STACK_GLOBAL from protocol 4
        evil = rewrite_zip(
            tmp_path / "linear.pt",
            tmp_path / f"evil{protocol}.pt",
            replace={"data.pkl": pickle.dumps(GlobalPayload(func, arg), protocol=protocol)},
        )
        with pytest.raises(CheckpointError, match=rf"names the global {name}\b"):
            read_state_dict(evil)
        assert not marker.exists()


@pytest.fixture(scope="module")
def traced_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``torch.jit.trace_module`` of the tiny open_clip backbone, saved once, as OpenAI's CLIP files are made."""
    clip = build_backbone(vitaclip.get_model_config("vitaclip-tiny")).eval()
    path = tmp_path_factory.mktemp("torchscript") / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace_module(clip, {"encode_image": torch.randn(1, 3, 64, 64)}, check_trace=False).save(str(path))
    return path


def tensor_bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


class Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2, bias=False)
        self.register_buffer("steps", torch.arange(4))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.plain = torch.zeros(5)  # a tensor attribute, neither parameter nor buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.plain.sum() + self.scratch.sum()


class ManyAttributes(torch.nn.Module):
    """Shared submodules, non-persistent buffers, odd dtypes and strides, and attributes of most TorchScript types."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Holder()
        self.b = self.a
        self.names = {"k": 1}
        self.words = ["x"]
        self.tensors = [torch.ones(1)]
        self.pair = (1, 2.5)
        self.nothing = None
        self.device = torch.device("cpu")
        g = torch.Generator().manual_seed(0)
        self.transposed = torch.nn.Parameter(torch.randn(2, 3, generator=g).t())
        self.brain = torch.nn.Parameter(torch.randn(3, generator=g).to(torch.bfloat16))
        self.complex = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64, generator=g))
        self.mask = torch.nn.Parameter(torch.randn(3, generator=g) > 0, requires_grad=False)
        self.seq = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 2).half())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.seq(x.half()).float()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("kind", ["traced", "scripted", "attributes"])
def test_torchscript_reader_matches_torch_jit_load(kind: str, traced_archive: Path, tmp_path: Path) -> None:
    path = traced_archive if kind == "traced" else tmp_path / f"{kind}.pt"
    if kind == "attributes":
        torch.jit.script(ManyAttributes()).save(str(path))
    elif kind == "scripted":
        torch.jit.script(build_backbone(vitaclip.get_model_config("vitaclip-tiny")).eval()).save(str(path))
    expected = torch.jit.load(str(path), map_location="cpu").state_dict()  # benign archives only
    state = read_state_dict(path)
    assert list(state) == list(expected)
    for key, value in expected.items():
        got = state[key]
        assert (got.dtype, got.shape, got.stride()) == (value.dtype, value.shape, value.stride()), key
        assert torch.equal(tensor_bits(got), tensor_bits(value)), key
        assert not got.requires_grad


# A minimal TorchScript archive written by hand: protocol-2 opcodes for a module M with one parameter "weight".
M_CODE = 'class M(Module):\n  __parameters__ = ["weight", ]\n  __buffers__ = []\n  weight : Tensor\n'


def p_global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def p_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def p_int(n: int) -> bytes:
    if -(1 << 31) <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)  # BININT
    return b"\x8a\x08" + n.to_bytes(8, "little", signed=True)  # LONG1


def p_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def p_tensor(numel: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
    storage = p_tuple(p_str("storage"), p_global("torch", "FloatStorage"), p_str("0"), p_str("cpu"), p_int(numel))
    hooks = p_global("collections", "OrderedDict") + b")R"
    args = (storage + b"Q", p_int(offset), p_tuple(*map(p_int, size)), p_tuple(*map(p_int, stride)), b"\x89", hooks)
    return p_global("torch._utils", "_rebuild_tensor_v2") + p_tuple(*args) + b"R"


def p_module(**attributes: bytes) -> bytes:
    items = b"".join(p_str(name) + value for name, value in attributes.items())
    return p_global("__torch__", "M") + b")\x81}(" + items + b"ub"


def hand_archive(path: Path, data_pkl: bytes, *, storage: bytes = bytes(24)) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data.pkl", b"\x80\x02" + data_pkl + b".")
        zf.writestr("m/data/0", storage)
        zf.writestr("m/code/__torch__.py", M_CODE)
        zf.writestr("m/constants.pkl", b"\x80\x02).")
        zf.writestr("m/byteorder", "little")
    return path


# NEWOBJ M, memo it as 0, then BUILD it with {"weight": None, "me": <memo 0>}.
SELF_CONTAINING = p_global("__torch__", "M") + b")\x81q\x00}(" + p_str("weight") + b"N" + p_str("me") + b"h\x00ub"


def nested_modules(depth: int) -> bytes:
    data = p_module(weight=b"N")
    for _ in range(depth):
        data = p_module(weight=b"N", inner=data)
    return data


def test_hand_written_torchscript_archive_reads(tmp_path: Path) -> None:
    values = torch.arange(6, dtype=torch.float32)
    path = hand_archive(
        tmp_path / "ok.pt", p_module(weight=p_tensor(6, (3, 2), (1, 3))), storage=values.numpy().tobytes()
    )
    state = read_state_dict(path)
    assert list(state) == ["weight"] and torch.equal(state["weight"], values.view(2, 3).t())
    big_endian = rewrite_zip(
        path, tmp_path / "big.pt", replace={"byteorder": b"big", "data/0": values.numpy().astype(">f4").tobytes()}
    )
    assert torch.equal(read_state_dict(big_endian)["weight"], values.view(2, 3).t())


@pytest.mark.parametrize(
    ("data_pkl", "storage", "match"),
    [
        (p_module(weight=p_tensor(6, (3, 3), (3, 1))), bytes(24), "does not fit in storage 0 of 6"),
        (p_module(weight=p_tensor(6, (2, 3), (3, 1), offset=1)), bytes(24), "does not fit"),
        (p_module(weight=p_tensor(6, (-1,), (1,))), bytes(24), "malformed size"),
        (p_module(weight=p_tensor(6, (2, 3), (3, 1))), bytes(20), "holds 20 bytes, but data.pkl declares 6"),
        (p_module(weight=p_tensor(1 << 40, (1,), (1,))), bytes(24), r"declares 1099511627776 x FloatStorage"),
        (p_module(weight=p_global("builtins", "eval") + p_tuple(p_str("1")) + b"R"), bytes(24), "global builtins.eval"),
        (p_module(weight=p_global("torch", "load") + p_tuple(p_str("x")) + b"R"), bytes(24), "global torch.load"),
        (SELF_CONTAINING, bytes(24), "contains itself"),
        (b"r\xf0\xff\xff\xff" + p_module(weight=b"N"), bytes(24), "memo index 4294967280"),
        (b"\x82\x01", bytes(24), "EXT1 opcode"),
        (b"h\x05", bytes(24), "memo index 5"),
        (nested_modules(300), bytes(24), "deeper than 200"),
        (p_module(weight=p_str("not a tensor")), bytes(24), "weight is a str"),
        (p_str("just a string"), bytes(24), "holds a str, not a TorchScript module"),
        (bytes(random.Random(7).getrandbits(8) for _ in range(512)), bytes(24), "data.pkl"),
    ],
)
def test_malformed_torchscript_archives_are_refused(
    data_pkl: bytes, storage: bytes, match: str, tmp_path: Path
) -> None:
    path = hand_archive(tmp_path / "bad.pt", data_pkl, storage=storage)
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(path)


def p_set_state(target: bytes, name: str, value: bytes) -> bytes:
    """``target``, then BUILD with the slot state ``(None, {name: value})`` (setattr on it), then POP."""
    return target + b"N}" + p_str(name) + value + b"s\x86b0"


REBUILD = p_global("torch._utils", "_rebuild_tensor_v2")


def test_a_torchscript_pickle_cannot_set_the_state_of_a_tensor_it_built(tmp_path: Path) -> None:
    """BUILD on a rebuilt tensor runs torch's own ``__setstate__``: requires_grad and backward hooks (which the
    rebuild refuses) came back set."""
    tensor = p_tensor(6, (3, 2), (1, 3))
    state = p_tuple(b"\x88", b"N", p_global("torch", "device"))  # (requires_grad=True, None, hooks=a callable)
    path = hand_archive(tmp_path / "hooked.pt", p_module(weight=tensor + state + b"b"))
    with pytest.raises(CheckpointError, match="whose state data.pkl set after building it"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "prefix",
    [
        p_set_state(REBUILD, "__defaults__", p_tuple(p_int(7))),  # the function the global names
        # The same function handed back by an allowed call that returns its argument.
        p_set_state(
            p_global("torch.jit._pickle", "restore_type_tag") + p_tuple(REBUILD, p_str("x")) + b"R",
            "__defaults__",
            p_tuple(p_int(7)),
        ),
        p_set_state(p_global("torch.jit._pickle", "build_intlist"), "__code__", b"N"),
    ],
)
def test_a_torchscript_pickle_cannot_change_the_readers_functions(prefix: bytes, tmp_path: Path) -> None:
    """BUILD on an allowed global set attributes of the reader's own functions, for every later load of the
    process (its defaults, say: genuine archives then failed with 'malformed size')."""
    from vitaclip import _torchscript

    values = torch.arange(6, dtype=torch.float32)
    module = p_module(weight=p_tensor(6, (3, 2), (1, 3)))
    hostile = hand_archive(tmp_path / "hostile.pt", prefix + module, storage=values.numpy().tobytes())
    with pytest.raises(CheckpointError, match="sets the state of"):
        read_state_dict(hostile)
    assert _torchscript._rebuild_tensor.__defaults__ == (None,)
    genuine = hand_archive(tmp_path / "ok.pt", module, storage=values.numpy().tobytes())
    assert torch.equal(read_state_dict(genuine)["weight"], values.view(2, 3).t())


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncated", "refusing this zip archive|not a readable"),
        ("tail cut", "refusing this zip archive|not a readable"),
        ("short storage", r"data/0 holds 100 bytes"),
        ("garbage data.pkl", "data.pkl"),
        ("no data.pkl", "has no traced/data.pkl"),
        ("no code", "has no code file"),
    ],
)
def test_damaged_traced_archives_are_refused(damage: str, match: str, traced_archive: Path, tmp_path: Path) -> None:
    raw = traced_archive.read_bytes()
    path = tmp_path / "damaged.pt"
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "tail cut":
        path.write_bytes(raw[:-100])
    elif damage == "short storage":
        rewrite_zip(traced_archive, path, replace={"data/0": bytes(100)})
    elif damage == "garbage data.pkl":
        rewrite_zip(traced_archive, path, replace={"data.pkl": random.Random(8).randbytes(4096)})
    elif damage == "no data.pkl":
        rewrite_zip(traced_archive, path, drop=r"/data\.pkl$")
    else:
        rewrite_zip(traced_archive, path, drop=r"/code/.*transformer")
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(path)


def test_saving_the_same_weights_gives_the_same_bytes(tmp_path: Path) -> None:
    """A checkpoint's sha256 is the model id: it must follow from the weights and config alone. (The safetensors
    writer ordered the header's metadata differently from one call to the next.)"""
    import hashlib

    from vitaclip.checkpoints import save_checkpoint
    from vitaclip.registry import create_model, packaged_checkpoint

    shipped = packaged_checkpoint("vitaclip-demo")
    assert shipped is not None
    model = create_model(None, checkpoint=shipped)
    digests = {save_checkpoint(model, tmp_path / f"copy-{i}") for i in range(6)}
    assert digests == {hashlib.sha256((Path(shipped) / "model.safetensors").read_bytes()).hexdigest()}
    again = create_model(None, checkpoint=tmp_path / "copy-0")
    assert again.model_id == model.model_id


def _edit_meta(folder: Path, config: dict | None = None, **top: object) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta["config"].update(config or {})
    meta.update(top)
    (folder / "config.json").write_text(json.dumps(meta))


def test_a_checkpoint_config_names_only_packaged_files_or_files_of_its_folder(tmp_path: Path) -> None:
    """config.json is data: its label_set and tokenizer must not make the loader read other files of the machine
    (their lines would become the labels written to the tables and returned by the service)."""
    from vitaclip.registry import default_label_names, resolve_model

    secret = tmp_path / "credentials"
    secret.write_text("aws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = not-for-labels\n")
    folder = tmp_path / "ckpt"
    vitaclip.save_checkpoint(vitaclip.create_model("clip-tiny-frames"), folder)
    _edit_meta(folder, label_names=None, default_labels=None)
    (folder / "inside-link.txt").symlink_to(secret)
    for key, value in [
        ("label_set", str(secret)),
        ("label_set", "../credentials"),
        ("label_set", "inside-link.txt"),  # a link in the folder to a file outside it
        ("tokenizer", str(secret)),
        ("tokenizer", "../../vitaclip/model.py"),
    ]:
        _edit_meta(folder, {"label_set": None, "tokenizer": None, key: value})
        for load in (
            lambda: vitaclip.create_model(None, checkpoint=folder),
            lambda: resolve_model(None, folder),
            lambda: default_label_names(None, folder),
        ):
            with pytest.raises(CheckpointError, match=rf"config\.{key}"):
                load()

    # A file of the folder is read; one that is no gzip BPE file is a CheckpointError, not a gzip error.
    (folder / "my-labels.txt").write_text("jumping\nswimming\n")
    _edit_meta(folder, {"label_set": "my-labels.txt", "tokenizer": None})
    assert vitaclip.create_model(None, checkpoint=folder).label_names == ("jumping", "swimming")
    assert resolve_model(None, folder).label_names == ("jumping", "swimming")
    (folder / "words.txt.gz").write_text("not gzip")
    _edit_meta(folder, {"tokenizer": "words.txt.gz"})
    with pytest.raises(CheckpointError, match="not a gzip-compressed BPE merges file"):
        vitaclip.create_model(None, checkpoint=folder)


def test_a_checkpoint_config_cannot_load_towers_from_elsewhere(tmp_path: Path) -> None:
    """timm_* and hf_* tower options make open_clip load a model from a local folder (``local-dir:``) or the
    network (``hf-hub:``): a checkpoint's config is refused before anything is opened or fetched."""
    from vitaclip.registry import resolve_model

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    folder = tmp_path / "ckpt"
    vitaclip.save_checkpoint(vitaclip.create_model("vitaclip-tiny"), folder)
    good = json.loads((folder / "config.json").read_text())
    opened: list[str] = []
    watched = str(outside)  # an audit hook stays for the whole process: it keeps only what this test looks for
    sys.addaudithook(
        lambda event, args: opened.append(str(args[0])) if event == "open" and watched in str(args[0]) else None
    )
    for tower, options in [
        ("vision_cfg", {"timm_model_name": f"local-dir:{outside}", "timm_model_pretrained": True}),
        ("vision_cfg", {"timm_model_name": "hf-hub:someone/model"}),
        ("text_cfg", {"hf_model_name": "someone/model", "hf_tokenizer_name": "someone/model"}),
    ]:
        meta = json.loads(json.dumps(good))
        meta["config"]["backbone_config"][tower].update(options)
        (folder / "config.json").write_text(json.dumps(meta))
        opened.clear()
        for load in (lambda: vitaclip.create_model(None, checkpoint=folder), lambda: resolve_model(None, folder)):
            with pytest.raises((CheckpointError, ValueError), match=rf"backbone_config\.{tower} sets .*not supported"):
                load()
        assert not opened, opened
    # Options left at their defaults are fine.
    meta = json.loads(json.dumps(good))
    meta["config"]["backbone_config"]["vision_cfg"].update(timm_model_name=None, timm_model_pretrained=False)
    (folder / "config.json").write_text(json.dumps(meta))
    assert vitaclip.create_model(None, checkpoint=folder).model_id == resolve_model(None, folder).model_id


def test_saving_copies_a_label_file_given_as_a_path_into_the_folder(tmp_path: Path) -> None:
    labels = tmp_path / "mine.txt"
    labels.write_text("cooking\ndancing\nrowing\n")
    model = vitaclip.create_model(vitaclip.get_model_config("clip-tiny-frames").replace(label_set=str(labels)))
    vitaclip.save_checkpoint(model, tmp_path / "ckpt")
    labels.unlink()
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["config"]["label_set"] == "label_set.txt"
    _edit_meta(tmp_path / "ckpt", label_names=None, default_labels=None)
    loaded = vitaclip.create_model(None, checkpoint=tmp_path / "ckpt")
    assert loaded.label_names == ("cooking", "dancing", "rowing")
    # Saving the loaded model again, into its own folder, keeps the file.
    vitaclip.save_checkpoint(loaded, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "label_set.txt").read_text() == "cooking\ndancing\nrowing\n"


def test_a_config_that_does_not_fit_its_weights_is_refused_before_allocating(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    vitaclip.save_checkpoint(vitaclip.create_model("vitaclip-tiny"), folder)
    good = json.loads((folder / "config.json").read_text())
    backbone = good["config"]["backbone_config"]
    for change, match in [
        ({"num_frames": 1000}, r"wrong shapes .*temporal"),
        (
            {"backbone_config": {**backbone, "vision_cfg": {**backbone["vision_cfg"], "layers": 200}}},
            "200 vision layers",
        ),
        ({"backbone_config": {**backbone, "vision_cfg": {**backbone["vision_cfg"], "width": 4096}}}, "wrong shapes"),
        # beyond any CLIP: refused by the bounds before the model is even planned
        ({"num_frames": 10**12}, r"num_frames must be at most 1024, got 1000000000000"),
        ({"backbone_config": {**backbone, "vision_cfg": {**backbone["vision_cfg"], "layers": 10**7}}}, "10000000"),
        ({"backbone_config": {**backbone, "vision_cfg": {**backbone["vision_cfg"], "width": 10**6}}}, "width must be"),
    ]:
        (folder / "config.json").write_text(json.dumps({**good, "config": {**good["config"], **change}}))
        with pytest.raises(CheckpointError, match=match):
            vitaclip.create_model(None, checkpoint=folder)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (float("nan"), "NaN or infinity"),
        (float("inf"), "NaN or infinity"),
        (torch.int32, "another kind than the model's floats"),
        (torch.bool, "another kind than the model's floats"),
        (torch.complex64, "another kind than the model's floats"),
        ("float8-nan", "NaN or infinity"),  # float8 has no isfinite of its own: was a NotImplementedError
        ("float64-huge", "NaN or infinity"),  # finite in float64, infinity in the model's float32: loaded before
    ],
)
def test_weights_a_cast_would_change_or_that_are_not_finite_are_refused(
    value: object, match: str, tmp_path: Path
) -> None:
    model = vitaclip.create_model("clip-tiny-frames")
    state = {k: v.clone() for k, v in model.clip.state_dict().items()}
    key = "visual.conv1.weight"
    if isinstance(value, float):
        state[key][0, 0, 0, 0] = value
    elif value == "float8-nan":
        state[key] = state[key].to(torch.float8_e4m3fn)
        state[key][0, 0, 0, 0] = float("nan")
    elif value == "float64-huge":
        state[key] = state[key].to(torch.float64)
        state[key][0, 0, 0, 0] = 1e300
    else:
        state[key] = state[key].to(value)
    torch.save(state, tmp_path / "clip.pth")
    with pytest.raises(CheckpointError, match=match):
        vitaclip.create_model("clip-tiny-frames", checkpoint=tmp_path / "clip.pth")


def test_weights_past_the_range_of_a_half_precision_model_are_refused(tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in vitaclip.create_model("clip-tiny-frames").clip.state_dict().items()}
    state["visual.conv1.weight"][0, 0, 0, 0] = 1e6  # float32; float16 ends at 65504
    torch.save(state, tmp_path / "clip.pth")
    assert vitaclip.create_model("clip-tiny-frames", checkpoint=tmp_path / "clip.pth") is not None
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        vitaclip.create_model("clip-tiny-frames", checkpoint=tmp_path / "clip.pth", dtype=torch.float16)


def test_deeply_wrapped_and_odd_official_checkpoints_are_checkpoint_errors(tmp_path: Path) -> None:
    state = {k: v for k, v in vitaclip.create_model("clip-tiny-frames").clip.state_dict().items()}
    nested: dict = {"state_dict": state}
    for _ in range(20):  # deeper than the loader looks (torch.save itself recurses: it cannot write thousands)
        nested = {"model": nested}
    torch.save(nested, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match="no state dict within"):
        vitaclip.create_model("clip-tiny-frames", checkpoint=tmp_path / "nested.pth")

    meta = json.loads((GOLDEN / "official_full.json").read_text())
    from synthetic import official_state_dict

    official = official_state_dict(meta["shapes"])
    for name, change in [
        ("no-fc1", {"visual.blocks.0.mlp.fc1.weight": None}),
        ("no-ln-final", {"textual.ln_final.weight": None}),
        ("cls-0d", {"visual.cls_token": torch.tensor(1.0)}),
        ("cls-empty", {"visual.cls_token": torch.zeros(0)}),
        ("pos-empty", {"visual.pos_embed": torch.zeros(0, 64)}),
        ("ctx-1d", {"prompt_learner.ctx": torch.zeros(4)}),
        ("local-prompts-differ", {"visual.blocks.1.local_prompts": torch.zeros(1, 4, 64)}),  # was a stack error
    ]:
        damaged = {k: v for k, v in {**official, **change}.items() if v is not None}
        torch.save({"model": damaged}, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match="official checkpoint"):
            vitaclip.create_model(
                base_config(meta), checkpoint=tmp_path / f"{name}.pth", label_names=meta["class_names"]
            )


def test_a_torch_save_zip_with_compressed_entries_is_refused_before_unpickling(tmp_path: Path) -> None:
    """torch.save stores its entries; a deflated pickle of a few KB expanded to gigabytes while it was read (a zip
    bomb): such an archive is refused from its directory, in no time, before anything is inflated."""
    import zipfile

    torch.save(vitaclip.create_model("clip-tiny-frames").clip.state_dict(), tmp_path / "clip.pth")
    with zipfile.ZipFile(tmp_path / "clip.pth") as src:
        with zipfile.ZipFile(tmp_path / "bomb.pth", "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                data = src.read(info)
                dst.writestr(info.filename, data + b"\0" * (64 << 20) if info.filename.endswith("data.pkl") else data)
    # 64 MiB more pickle in less than 1 MiB more file.
    assert (tmp_path / "bomb.pth").stat().st_size < (tmp_path / "clip.pth").stat().st_size + (1 << 20)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="compressed entries"):
        vitaclip.create_model("clip-tiny-frames", checkpoint=tmp_path / "bomb.pth")
    assert time.monotonic() - started < 5
    vitaclip.create_model("clip-tiny-frames", checkpoint=tmp_path / "clip.pth")  # as torch.save wrote it: loads


def test_a_format_version_of_true_is_no_version(tmp_path: Path) -> None:
    vitaclip.save_checkpoint(vitaclip.create_model("clip-tiny-frames"), tmp_path / "c")
    _edit_meta(tmp_path / "c", format_version=True)
    with pytest.raises(CheckpointError, match="format version True is not supported"):
        vitaclip.create_model(None, checkpoint=tmp_path / "c")


# ---------------------------------------------------------------------------------------------- hostile files
# Small files that made the loader allocate or compute without bound, or end in a raw traceback.


def _official(tmp_path: Path, name: str, change: dict[str, torch.Tensor | None]) -> Path:
    """The golden tiny official checkpoint with tensors replaced (None: removed), saved as torch.save writes it."""
    from synthetic import official_state_dict

    meta = json.loads((GOLDEN / "official_full.json").read_text())
    state = {k: v for k, v in {**official_state_dict(meta["shapes"]), **change}.items() if v is not None}
    torch.save({"model": state}, tmp_path / name)
    return tmp_path / name


def _load_official(path: Path) -> vitaclip.VitaClip:
    meta = json.loads((GOLDEN / "official_full.json").read_text())
    return vitaclip.create_model(base_config(meta), checkpoint=path, label_names=meta["class_names"])


def test_tensors_that_repeat_their_storage_are_refused(tmp_path: Path) -> None:
    """torch.load rebuilds a tensor with the size and strides its pickle declares: a stride of 0 makes one stored
    float a tensor of any shape, and an official checkpoint's model is built to its tensors' shapes (a 4-byte storage
    declaring width 32768 made the loader allocate 13 GB per block). Such tensors are refused as they are read."""
    path = _official(tmp_path, "expanded.pth", {"visual.blocks.0.mlp.fc1.weight": torch.zeros(1).expand(256, 64)})
    with pytest.raises(CheckpointError, match=r"expanded\.pth: refusing tensor .*fc1\.weight.*strides \[0, 0\]"):
        _load_official(path)
    torch.save({"a": torch.zeros(1).expand(1 << 20, 1 << 20)}, tmp_path / "huge_view.pth")
    with pytest.raises(CheckpointError, match=r"refusing tensor 'a'.*\[1048576, 1048576\]"):
        load_torch_file(tmp_path / "huge_view.pth")
    # Many tensors viewing one storage: each fits it, together they declare 40 MB over 4 MB.
    shared = torch.zeros(1 << 20)
    torch.save({f"visual.blocks.{i}.x": shared[:] for i in range(10)}, tmp_path / "shared.pth")
    with pytest.raises(CheckpointError, match="declare 41943040 bytes over 4194304 bytes of storage"):
        read_state_dict(tmp_path / "shared.pth")
    # Transposed, sliced and tied tensors, as real checkpoints hold them, load.
    base = torch.arange(24.0).view(4, 6)
    torch.save({"t": base.t(), "s": base[1:3, 2:], "tied": base, "tied_again": base}, tmp_path / "ok.pth")
    assert torch.equal(read_state_dict(tmp_path / "ok.pth")["t"], base.t())


def test_an_official_model_is_planned_on_the_meta_device_before_it_is_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The official format's model size comes from its tensors: a model that does not fit them is refused from a
    meta-device copy, before memory is allocated for it."""
    from vitaclip import checkpoints

    built: list[str] = []
    real_model = checkpoints.VitaClip

    def spy(*args: object, **kwargs: object) -> vitaclip.VitaClip:
        model = real_model(*args, **kwargs)
        built.append(model.device.type)
        return model

    monkeypatch.setattr(checkpoints, "VitaClip", spy)
    path = _official(tmp_path, "wide_text.pth", {"textual.ln_final.weight": torch.ones(128)})  # text width 32 elsewhere
    with pytest.raises(CheckpointError, match=r"wide_text\.pth does not match .*wrong shapes .*token_embedding"):
        _load_official(path)
    assert built == ["meta"]
    _load_official(_official(tmp_path, "ok.pth", {}))
    assert built == ["meta", "meta", "cpu"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        # no textual.transformer.resblocks.*: 0 text layers (was a ZeroDivisionError in open_clip)
        ("no_text_layers", r"text_cfg\.layers must be an integer from 1 to 256, got 0"),
        # width 129 has no whole number of 64-wide heads (was an AssertionError in torch's attention)
        ("width_129", r"vision_cfg\.width 129 is not a multiple of head_width 64"),
        # layers named by keys only, far more than any CLIP
        ("260_layers", r"260 layers under visual\.blocks\., more than 256"),
    ],
)
def test_inconsistent_official_checkpoints_are_checkpoint_errors_naming_the_file(
    change: str, match: str, tmp_path: Path
) -> None:
    from synthetic import official_state_dict

    meta = json.loads((GOLDEN / "official_full.json").read_text())
    state = official_state_dict(meta["shapes"])
    if change == "no_text_layers":
        edit: dict[str, torch.Tensor | None] = {k: None for k in state if k.startswith("textual.transformer.")}
    elif change == "width_129":
        edit = {"visual.cls_token": torch.zeros(129)}
    else:
        edit = {f"visual.blocks.{i}.norm1.weight": torch.ones(64) for i in range(2, 260)}
    path = _official(tmp_path, f"{change}.pth", edit)
    with pytest.raises(CheckpointError, match=match) as raised:
        _load_official(path)
    assert str(path) in str(raised.value)
    config_file = tmp_path / "official-tiny.json"
    config_file.write_text(base_config(meta).to_json())
    assert cli_main(["convert", str(path), str(tmp_path / "out"), "--model", str(config_file)]) == 2


def _laughs(depth: int, *, kind: str) -> bytes:
    """Protocol-2 opcodes of ``T[depth]`` with ``T[i] = (T[i-1], T[i-1])`` (tuples) or ``[T[i-1], T[i-1]]`` (lists),
    the halves shared through the memo (index i): a few bytes per level, 2**depth leaves as a tree."""
    out = b")q\x00" if kind == "tuple" else b"]q\x00"
    for i in range(1, depth + 1):
        get = b"h" + bytes([i - 1])
        out += (get + get + b"\x86" if kind == "tuple" else b"(" + get + get + b"l") + b"q" + bytes([i])
    return out


def _torch_save_with_pickle(path: Path, data_pkl: bytes) -> Path:
    """torch.save's zip layout around a hand-written data.pkl (no storages)."""
    buffer = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return path


def _legacy_with_pickle(path: Path, data_pkl: bytes) -> Path:
    """torch.save's format before torch 1.6 (consecutive pickles, no zip) around a hand-written object pickle."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    head = [pickle.dumps(v, protocol=2) for v in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True})]
    path.write_bytes(b"".join(head) + data_pkl + pickle.dumps([], protocol=2))
    return path


DEPTH = 22  # 4 million leaves: beyond the bound, yet the old loader got through it in seconds (40 levels: forever)


@pytest.mark.parametrize(
    "case", ["torch.save dict key", "legacy dict key", "torchscript dict key", "torchscript device", "torchscript pid"]
)
def test_pickle_billion_laughs_are_refused_before_unpickling(case: str, tmp_path: Path) -> None:
    """A pickle of a few hundred bytes shares halves through its memo, 2**depth elements as a tree: hashing it as a
    dict key, or formatting it into torch.device or an error message, walked every one (40 levels: a hang). Refused
    from the opcodes, before anything is unpickled, in torch.load's path and the TorchScript reader alike."""
    path = tmp_path / "laughs.pt"
    tuples, lists = _laughs(DEPTH, kind="tuple"), _laughs(DEPTH, kind="list")
    top = b"h" + bytes([DEPTH])
    if case == "torch.save dict key":
        _torch_save_with_pickle(path, b"\x80\x02" + tuples + b"}" + top + b"K\x00s.")
    elif case == "legacy dict key":
        _legacy_with_pickle(path, b"\x80\x02" + tuples + b"}" + top + b"K\x00s.")
    elif case == "torchscript dict key":
        hand_archive(path, tuples + b"}" + top + b"Ns")
    elif case == "torchscript device":
        device = p_global("torch", "device") + b"(" + top + b"tR"
        hand_archive(path, lists + p_module(weight=p_tensor(6, (6,), (1,)), where=device))
    else:
        hand_archive(path, lists + top + b"Q")  # BINPERSID: the tree as a persistent id
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"laughs\.pt: .* reuses memoized objects until one holds"):
        read_state_dict(path)
    assert time.monotonic() - started < 5


def test_deeply_nested_pickles_are_refused(tmp_path: Path) -> None:
    nested = b"\x80\x02" + b"]" * 2000 + b"a" * 1999 + b"."  # a list in a list ... 2000 deep
    with pytest.raises(CheckpointError, match="nests objects deeper than 1000 levels"):
        read_state_dict(_torch_save_with_pickle(tmp_path / "deep.pth", nested))


def test_values_from_a_torchscript_pickle_are_checked_before_they_are_formatted(tmp_path: Path) -> None:
    """Under the bound, a shared tree is still no persistent id or device: named by its type, not formatted whole."""
    lists, top = _laughs(10, kind="list"), b"h" + bytes([10])
    with pytest.raises(CheckpointError, match=r"refers to a list, not to a storage"):
        read_state_dict(hand_archive(tmp_path / "pid.pt", lists + top + b"Q"))
    device = p_global("torch", "device") + b"(" + top + b"tR"
    archive = hand_archive(tmp_path / "device.pt", lists + p_module(weight=p_tensor(6, (6,), (1,)), where=device))
    with pytest.raises(CheckpointError, match=r"builds a torch\.device of a list"):
        read_state_dict(archive)


def test_torchscript_state_dict_keys_are_bounded(tmp_path: Path) -> None:
    """A module name is memoized once and can be reused at every level of a module tree: keys (and the work to make
    them) grew with the square of the depth from a small pickle."""
    long_name = "n" * 700
    nested = p_module(weight=p_tensor(6, (6,), (1,)))
    for _ in range(3):
        nested = p_module(weight=b"N", **{long_name: nested})
    with pytest.raises(CheckpointError, match="a path longer than 2000 characters"):
        read_state_dict(hand_archive(tmp_path / "long.pt", nested))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_real_checkpoints_pass_the_pickle_checks(tmp_path: Path) -> None:
    """The bounds leave a wide margin over real files: state dicts (zip and legacy format), tied weights, shared
    modules and an optimizer's state."""

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(10, 4)
            self.out = torch.nn.Linear(4, 10, bias=False)
            self.out.weight = self.embedding.weight
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)] * 20)  # one module, 20 times

    tied = Tied()
    state = tiny_clip_state()
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        loaded = read_state_dict(tmp_path / name)
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), name
    torch.save(tied.state_dict(), tmp_path / "tied.pt")
    assert torch.equal(read_state_dict(tmp_path / "tied.pt")["out.weight"], tied.embedding.weight)
    optimizer = torch.optim.AdamW(tied.parameters())
    tied.embedding.weight.grad = torch.ones(10, 4)
    optimizer.step()
    torch.save({"optimizer": optimizer.state_dict(), "step": 1}, tmp_path / "train.pt")
    assert load_torch_file(tmp_path / "train.pt")["optimizer"]["state"][0]["step"] == 1


def test_a_gzip_bomb_tokenizer_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    """open_clip's SimpleTokenizer reads its merges file whole: 1.5e9 newlines gzip to 1.5 MB and took > 15 GB. A
    folder's tokenizer is read in chunks first, up to 16 MiB decompressed."""
    import gzip

    import open_clip

    folder = tmp_path / "ckpt"
    vitaclip.save_checkpoint(vitaclip.create_model("clip-tiny-frames"), folder)
    (folder / "tokenizer.txt.gz").write_bytes(gzip.compress(b"a" * (17 << 20), compresslevel=1))
    _edit_meta(folder, {"tokenizer": "tokenizer.txt.gz"})
    with pytest.raises(CheckpointError, match=r"config\.json: tokenizer .*tokenizer\.txt\.gz decompresses to more"):
        vitaclip.create_model(None, checkpoint=folder)
    assert cli_main(["convert", str(folder), str(tmp_path / "out")]) == 2
    # A real merges file (open_clip's, 1.3 MB decompressed) in the folder loads.
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    shutil.copyfile(bpe, folder / "tokenizer.txt.gz")
    assert vitaclip.create_model(None, checkpoint=folder).config.tokenizer == str(
        (folder / "tokenizer.txt.gz").resolve()
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("folder") / "ckpt"
    vitaclip.save_checkpoint(vitaclip.create_model("clip-tiny-frames"), folder)
    return folder


@pytest.mark.parametrize(
    ("where", "value", "match"),
    [
        ("label_names", 5, r"'label_names' must be a list of label names \(strings\), got int"),
        ("label_names", list(range(5)), "'label_names' must be a list of label names .*got a list holding a int"),
        ("label_names", ["a", None], "'label_names' must be a list of label names .*got a list holding a NoneType"),
        ("default_labels", 5, "'default_labels' must be a list of label names"),
        ("default_labels", "abc", "'default_labels' must be a list of label names .*got str"),  # not ('a', 'b', 'c')
        ("vision_cfg", [1], r"backbone_config\.vision_cfg must be a mapping of open_clip options, got list"),
        ("text_cfg", None, r"backbone_config\.text_cfg must be a mapping of open_clip options, got null"),
        ("embed_dim", "32", r"backbone_config\.embed_dim must be an integer from 1 to 8192, got '32'"),
        ("vision_cfg.layers", "2", r"vision_cfg\.layers must be an integer from 1 to 256, got '2'"),
        ("vision_cfg.patch_size", 0, r"vision_cfg\.patch_size must be an integer from 1 to 64, got 0"),
        ("vision_cfg.head_width", 0, r"vision_cfg\.head_width must be an integer from 1 to 64, got 0"),
        ("vision_cfg.width", 10**9, r"vision_cfg\.width must be an integer from 1 to 8192, got 1000000000"),
        ("vision_cfg.bogus", 1, r"vision_cfg has options open_clip does not know: \['bogus'\]"),
        ("vision_cfg.act_kwargs", {"x": 1}, r"vision_cfg\.act_kwargs must be null or \{\}"),
        # Built, then failed at the first forward pass (a string eps), or silently built another model (any string
        # is true to Python: "false" turned QuickGELU on).
        ("text_cfg.norm_kwargs", {"eps": "x"}, r'text_cfg\.norm_kwargs must be null or \{"eps": a number'),
        ("quick_gelu", "false", r'backbone_config\.quick_gelu must be true or false, got "false"'),
        ("vision_cfg.attentional_pool", "no", r"vision_cfg\.attentional_pool must be true or false"),
        ("vision_cfg.output_tokens", True, r"vision_cfg\.output_tokens must be false"),
        ("vision_cfg.patch_dropout", 2, r"vision_cfg\.patch_dropout must be a number from 0 to below 1"),
        ("backbone_config", {"embed_dim": 32}, r"backbone_config\.vision_cfg must be a mapping .*got null"),
        ("config.mean", 5, r"mean must be a list of 3 numbers, got '5'"),
        ("config.std", [0.2, 0.0, 0.2], "std 3 above 0"),  # frames are divided by it: NaN embeddings
        ("config.std", [0.2, float("nan"), 0.2], "std 3 above 0"),
        ("config.mean", [0.5, float("inf"), 0.5], "mean must be 3 finite numbers"),
    ],
)
def test_malformed_folder_configs_are_checkpoint_errors(
    where: str, value: object, match: str, tiny_folder: Path, tmp_path: Path
) -> None:
    """Hand-edited config.json fields of a wrong type or size: one CheckpointError naming the file (exit 2 from the
    command line), not a TypeError, KeyError, ZeroDivisionError or an allocation inside open_clip. All but the two
    that needs open_clip to tell is refused where the job's torch-free driver reads the config, before any work."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_folder, folder)
    meta = json.loads((folder / "config.json").read_text())
    if where in ("label_names", "default_labels"):
        meta[where] = value
    elif where == "backbone_config":
        meta["config"][where] = value
    elif where.startswith("config."):
        meta["config"][where.removeprefix("config.")] = value
    else:
        tower, _, key = where.rpartition(".")
        target = meta["config"]["backbone_config"]
        (target[tower] if tower else target)[key] = value
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=match) as raised:
        vitaclip.create_model(None, checkpoint=folder)
    assert str(folder / "config.json") in str(raised.value)
    assert str(raised.value).count(str(folder)) == 1  # the file named once
    assert cli_main(["convert", str(folder), str(tmp_path / "out")]) == 2
    if where != "vision_cfg.bogus":
        with pytest.raises(CheckpointError, match=match) as raised:
            resolve_model(None, str(folder))  # what the job's driver plans with (no torch, no open_clip)
        assert str(raised.value).count(str(folder)) == 1


def test_a_config_name_that_would_forge_or_bloat_the_model_id_is_refused(tmp_path: Path) -> None:
    """The name starts every row's model id: one holding ``@sha256:`` made `vitaclip runs` show a forged hash, a
    10 MB one was copied into every row, and one ending in .json was read back as a config file's path."""
    vitaclip.save_checkpoint(vitaclip.create_model("vitaclip-tiny"), tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    for name in ["vitaclip-b16@sha256:" + "0" * 64, "x" * 129, "a\nb", "other.json", "-flag", "a/b", ""]:
        meta["config"]["name"] = name
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="letters, digits"):
            vitaclip.registry.resolve_model(None, checkpoint=tmp_path / "ckpt")
        with pytest.raises(ValueError, match="letters, digits"):
            vitaclip.create_model(None, checkpoint=tmp_path / "ckpt")
    meta["config"]["name"] = "my-model_v2.1"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    assert vitaclip.registry.resolve_model(None, checkpoint=tmp_path / "ckpt").model_id.startswith("my-model_v2.1@")


def test_a_json_config_named_like_a_registered_model_but_other_is_another_model(tmp_path: Path) -> None:
    """``--model edited.json`` keeping the registered name with other mean and std: the same weights file gave
    other embeddings under the registered model's id (rows of two models in one table and one index)."""
    config = vitaclip.get_model_config("vitaclip-tiny")
    weights = tmp_path / "clip.pt"
    torch.save(vitaclip.create_model(config).clip.state_dict(), weights)
    edited = tmp_path / "tiny-mean.json"
    edited.write_text(json.dumps({**config.to_dict(), "mean": [0.9, 0.1, 0.1]}))
    same = tmp_path / "tiny-same.json"
    same.write_text(json.dumps({**config.to_dict(), "num_frames": 4}))  # frames are a row setting, not the model
    plain = resolve_model("vitaclip-tiny", weights).model_id
    other = resolve_model(str(edited), weights).model_id
    assert "+config:" not in plain and other.startswith(plain + "+config:")
    assert vitaclip.create_model(str(edited), checkpoint=weights).model_id == other  # what the actors load
    assert vitaclip.create_model("vitaclip-tiny", checkpoint=weights).model_id == plain
    assert resolve_model(str(same), weights).model_id == plain
    renamed = tmp_path / "mine.json"  # a name of its own is its own model: no suffix needed
    renamed.write_text(json.dumps({**config.to_dict(), "name": "mine", "mean": [0.9, 0.1, 0.1]}))
    assert resolve_model(str(renamed), weights).model_id.startswith("mine@sha256:")


def test_configs_and_label_files_are_read_only_when_small_and_regular(tmp_path: Path) -> None:
    """A 1 GB sparse config.json (no disk used) took 2 GB of memory to refuse, and a FIFO put there in place of the
    file would have blocked the load: both are refused from their size or kind, before any read (found by review)."""
    from vitaclip.labels import load_label_set

    model = vitaclip.create_model("vitaclip-tiny")
    vitaclip.save_checkpoint(model, tmp_path / "c")
    config = tmp_path / "c" / "config.json"
    config.unlink()
    with open(config, "wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(CheckpointError, match=r"the checkpoint config is 1,073,741,824 bytes, more than 67,108,864"):
        vitaclip.create_model("vitaclip-tiny", checkpoint=tmp_path / "c")
    config.unlink()
    os.mkfifo(config)
    with pytest.raises(CheckpointError, match="not a regular file"):  # never opened for reading: no wait
        vitaclip.create_model("vitaclip-tiny", checkpoint=tmp_path / "c")
    labels = tmp_path / "labels.txt"
    with open(labels, "wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(ValueError, match=r"label set .* is 1,073,741,824 bytes, more than 67,108,864"):
        load_label_set(str(labels))
    labels.write_bytes(b"dog\ncat\xff\n")
    with pytest.raises(ValueError, match=r"label set .*labels.txt' is not UTF-8 text \(byte 7\)"):
        load_label_set(str(labels))


def test_a_safetensors_header_past_16_mib_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """safetensors parses headers up to 100 MB: 1.6M empty entries took 34 s and 3 GB before any check."""
    path = tmp_path / "many.safetensors"
    header = b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'.ljust(17 << 20)
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=r"refusing its safetensors header of 17,825,792 bytes"):
        read_state_dict(path)


def test_a_torch_save_pickle_past_4_mib_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """Reading a pickle as opcodes costs about 3 s per MB: a 16.6 MB data.pkl of nested lists took 85 s to refuse.
    A state dict with its optimizer state pickles to about 150 bytes per tensor."""
    torch.save({"model": {"x": torch.zeros(1)}, "junk": list(range(1_000_000))}, tmp_path / "big.pth")
    with pytest.raises(CheckpointError, match=r"its data.pkl is larger than 4194304 bytes"):
        read_state_dict(tmp_path / "big.pth")

"""Checkpoint formats: our own (safetensors + JSON + sha256), OpenAI/open_clip backbones, conversion, bad files."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

import vitaclip
from vitaclip.checkpoints import CheckpointError, read_state_dict
from vitaclip.cli import main as cli_main
from vitaclip.model import build_backbone

sys.path.insert(0, str(Path(__file__).parent))
from test_official_golden import GOLDEN, base_config, write_official_checkpoint  # noqa: E402


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
    with pytest.raises(CheckpointError, match="covers 5 labels but 2"):
        vitaclip.create_model(config, checkpoint=tmp_path / "ok.pth", label_names=["a", "b"])


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
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        vitaclip.create_model("vitaclip-tiny", checkpoint=tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        vitaclip.create_model("vitaclip-tiny", checkpoint=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="model name"):
        vitaclip.create_model(None)

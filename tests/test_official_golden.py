"""Official-format checkpoints load strictly and reproduce the official code's outputs.

The golden files come from tests/golden/make_official_reference.py, run once against the official code: every
tensor of a small official model set to non-zero deterministic values, then its outputs recorded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import vitaclip
from vitaclip.checkpoints import map_official_key

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from synthetic import official_state_dict, video  # noqa: E402

VARIANTS = ["full", "generic_middle", "summary_front"]


def base_config(meta: dict) -> vitaclip.VitaClipConfig:
    o = meta["options"]
    return vitaclip.VitaClipConfig(
        name="official-tiny",
        backbone_config={
            "embed_dim": o["embed_dim"],
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": o["input_size"][0],
                "patch_size": o["patch_size"][0],
                "width": o["feature_dim"],
                "layers": o["num_layers"],
                "head_width": o["feature_dim"] // o["num_heads"],
            },
            "text_cfg": {
                "context_length": o["text_context_length"],
                "vocab_size": o["text_vocab_size"],
                "width": o["text_transformer_width"],
                "heads": o["text_transformer_heads"],
                "layers": o["text_transformer_layers"],
            },
        },
        # Only the name position cannot be read from tensors; everything else is inferred from the checkpoint.
        text_context=vitaclip.TextContextConfig(position=o["text_prompt_pos"]),
    )


def write_official_checkpoint(meta: dict, path: Path) -> Path:
    state = official_state_dict(meta["shapes"])
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "next_step": 5000}, path)
    return path


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_checkpoint_reproduces_official_outputs(variant: str, tmp_path: Path) -> None:
    meta = json.loads((GOLDEN / f"official_{variant}.json").read_text())
    expected = safetensors.torch.load_file(str(GOLDEN / f"official_{variant}.safetensors"))
    ckpt = write_official_checkpoint(meta, tmp_path / "checkpoint-5000.pth")
    model = vitaclip.create_model(base_config(meta), checkpoint=ckpt, label_names=meta["class_names"])

    o = meta["options"]
    cfg = model.config
    assert cfg.num_frames == o["num_frames"]
    assert cfg.num_global_prompts == (o.get("num_global_prompts", 8) if o["use_global_prompts"] else 0)
    assert (cfg.num_local_prompts > 0) == o["use_local_prompts"]
    assert cfg.summary_token == o["use_summary_token"]
    assert cfg.text_context is not None
    assert cfg.text_context.kind == ("class_specific" if o["text_prompt_CSC"] else "generic")
    assert cfg.text_context.num_tokens == o["text_num_prompts"]

    x = video(f"video-{variant}", (meta["batch"], o["num_frames"], 3, 32, 32))
    with torch.no_grad():
        video_features = model.encode_video(x, normalize=False)
        label_features = model.encode_labels(meta["class_names"], normalize=False)
        logits = model(x)
    assert relative_error(video_features, expected["video_features"]) <= 1e-4
    assert relative_error(label_features, expected["text_features"]) <= 1e-4
    assert relative_error(logits, expected["logits"]) <= 1e-4
    # Per-row check too: a single wrong video or label must not hide in the batch norm.
    for got, want in ((video_features, expected["video_features"]), (label_features, expected["text_features"])):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_set_equals_official(variant: str) -> None:
    meta = json.loads((GOLDEN / f"official_{variant}.json").read_text())
    o = meta["options"]
    config = base_config(meta).replace(
        num_frames=o["num_frames"],
        num_global_prompts=o.get("num_global_prompts", 8) if o["use_global_prompts"] else 0,
        num_local_prompts=o["num_frames"] if o["use_local_prompts"] else 0,
        summary_token=o["use_summary_token"],
        text_context=vitaclip.TextContextConfig(
            num_tokens=o["text_num_prompts"],
            kind="class_specific" if o["text_prompt_CSC"] else "generic",
            position=o["text_prompt_pos"],
        ),
    )
    model = vitaclip.VitaClip(config, label_names=meta["class_names"])
    ours = set(model.trainable_parameter_names())
    official = {map_official_key(k) for k in meta["trainable"]}
    assert ours == official
    # Every stored official tensor has a home in our state dict, frozen ones included (cls_proj, patch bias).
    assert {map_official_key(k) for k in meta["shapes"]} <= set(model.state_dict())

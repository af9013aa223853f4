"""Recipe for the golden files of tests/test_official_golden.py (run once, by hand, outside CI).

It builds small Vita-CLIP models with the official code (GitHub TalalWasim/Vita-CLIP, folder ``training/``), fills
every tensor with the deterministic values of ``synthetic.py``, and records the key list with shapes, the trainable
parameter names, and the official outputs (video features, label features, logits) for deterministic inputs. The
official code itself is not part of this repository.

Usage:
    git clone https://github.com/TalalWasim/Vita-CLIP /tmp/Vita-CLIP   # commit c858299 was used
    pip install einops
    python tests/golden/make_official_reference.py /tmp/Vita-CLIP tests/golden
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import official_state_dict, video  # noqa: E402

# Small official models: (name, official constructor options, class names).
VARIANTS = {
    "full": dict(
        num_frames=8,
        use_summary_token=True,
        use_local_prompts=True,
        use_global_prompts=True,
        num_global_prompts=8,
        text_num_prompts=4,
        text_prompt_CSC=True,
        text_prompt_pos="end",
    ),
    "generic_middle": dict(
        num_frames=4,
        use_summary_token=False,
        use_local_prompts=True,
        use_global_prompts=True,
        num_global_prompts=2,
        text_num_prompts=4,
        text_prompt_CSC=False,
        text_prompt_pos="middle",
    ),
    "summary_front": dict(
        num_frames=3,
        use_summary_token=True,
        use_local_prompts=False,
        use_global_prompts=False,
        text_num_prompts=2,
        text_prompt_CSC=True,
        text_prompt_pos="front",
    ),
}
CLASS_NAMES = ["abseiling", "playing_guitar", "riding a bike", "dancing macarena", "tying knot (not on a tie)"]
BACKBONE = dict(
    input_size=(32, 32),
    feature_dim=64,
    patch_size=(8, 8),
    num_heads=4,
    num_layers=2,
    mlp_factor=4.0,
    embed_dim=32,
    text_context_length=77,
    text_vocab_size=49408,
    text_transformer_width=32,
    text_transformer_heads=4,
    text_transformer_layers=2,
)
BATCH = 2


def main(official_repo: str, out_dir: str) -> None:
    sys.modules.setdefault("pkg_resources", types.SimpleNamespace(packaging=__import__("packaging.version")))
    sys.path.insert(0, str(Path(official_repo) / "training"))
    from VitaCLIP_model import VitaCLIP  # the official model class

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        classes_file = Path(tmp) / "classes.txt"
        classes_file.write_text("\n".join(CLASS_NAMES))
        for name, options in VARIANTS.items():
            model = VitaCLIP(
                use_text_prompt_learning=True, text_prompt_classes_path=str(classes_file), **BACKBONE, **options
            ).eval()
            trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
            shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
            state = official_state_dict(shapes)
            model.load_state_dict(state, strict=True)
            T = options["num_frames"]
            x = video(f"video-{name}", (BATCH, T, 3, 32, 32))  # [B, T, 3, H, W]
            with torch.no_grad():
                video_features = model.visual(x.permute(0, 2, 1, 3, 4))  # official layout [B, 3, T, H, W]
                text_features = model.textual(model.prompt_learner(), model.tokenized_prompts)
                logits = model(x.permute(0, 2, 1, 3, 4))
            safetensors.torch.save_file(
                {"video_features": video_features, "text_features": text_features, "logits": logits},
                str(out / f"official_{name}.safetensors"),
            )
            meta = {
                "options": {**BACKBONE, **options},
                "class_names": CLASS_NAMES,
                "batch": BATCH,
                "shapes": shapes,
                "trainable": trainable,
                "checkpoint_layout": "{'model': {'module.' + key: tensor}}",
            }
            (out / f"official_{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
            print(name, "video", tuple(video_features.shape), "text", tuple(text_features.shape))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""The model on tiny configs: token bookkeeping, the CLIP baseline, variable T, text side, config."""

from __future__ import annotations

import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

import vitaclip
from vitaclip.zeroshot import TEMPLATES


@pytest.fixture(scope="module")
def tiny() -> vitaclip.VitaClip:
    return vitaclip.create_model("vitaclip-tiny")


def random_video(B: int, T: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, size, size, generator=g)


def test_prompt_tokens_enter_and_leave_each_block(tiny: vitaclip.VitaClip) -> None:
    """Attention sees CLS + T local + G global + patches + summary; so does the MLP (per token: the slots' results
    are overwritten by the next block); the output is pooled from CLS."""
    B, T = 2, 5  # T differs from the training T (8) on purpose
    G = tiny.config.num_global_prompts
    N = (tiny.image_size // tiny.clip.visual.patch_size[0]) ** 2
    seen: dict[str, list[tuple[int, ...]]] = {"attn": [], "mlp": [], "out": []}
    hooks = []
    for block in tiny.clip.visual.transformer.resblocks:
        hooks.append(block.attn.register_forward_hook(lambda m, i, o: seen["attn"].append(tuple(i[0].shape))))
        hooks.append(block.mlp.register_forward_hook(lambda m, i, o: seen["mlp"].append(tuple(i[0].shape))))
    try:
        with torch.no_grad():
            out = tiny.encode_video(random_video(B, T))
    finally:
        for h in hooks:
            h.remove()
    D = tiny.clip.visual.conv1.out_channels
    layers = len(tiny.clip.visual.transformer.resblocks)
    assert seen["attn"] == [(B * T, 1 + T + G + N + 1, D)] * layers
    assert seen["mlp"] == [(B * T, 1 + T + G + N + 1, D)] * layers
    assert out.shape == (B, tiny.embed_dim)


def _reference_encode_video(model: vitaclip.VitaClip, video: torch.Tensor) -> torch.Tensor:
    """The official block structure, written out: each block concatenates its prompts and summary around the
    activation, attends, strips the frame-level tokens, runs the MLP over CLS + global prompts + patches only and
    strips the global prompts again."""
    visual = model.clip.visual
    B, T, _, H, W = video.shape
    x = visual.conv1(video.reshape(B * T, 3, H, W)).flatten(2).transpose(1, 2) + model.patch_bias
    x = torch.cat([visual.class_embedding.expand(B * T, 1, -1), x], dim=1) + visual.positional_embedding
    assert model.temporal is not None and model.global_prompts is not None and model.cls_proj is not None
    assert model.summary is not None and model.local_prompts is not None
    x = visual.ln_pre((x.view(B, T, *x.shape[1:]) + model.temporal(T)[None, :, None, :]).flatten(0, 1))
    for layer, block in enumerate(visual.transformer.resblocks):
        g = model.global_prompts.tokens[layer]
        x = torch.cat([x[:, :1], g.expand(B * T, -1, -1), x[:, 1:]], dim=1)
        cls_projected = model.cls_proj[layer](x[:, 0].view(B, T, -1))
        local = model.local_prompts(layer, cls_projected).repeat_interleave(T, dim=0)
        summary = model.summary(layer, cls_projected).reshape(B * T, 1, -1)
        h = torch.cat([x[:, :1], local, x[:, 1:], summary], dim=1)
        h = h + block.attention(block.ln_1(h))
        x = torch.cat([h[:, :1], h[:, 1 + T : -1]], dim=1)
        x = x + block.mlp(block.ln_2(x))
        x = torch.cat([x[:, :1], x[:, 1 + g.shape[0] :]], dim=1)
    return F.normalize((visual.ln_post(x[:, 0]) @ visual.proj).view(B, T, -1).mean(dim=1), dim=-1)


@pytest.mark.parametrize("T", [1, 3, 8])
def test_token_slots_give_the_official_block_structure_and_gradients(T: int) -> None:
    """Prompts written into slots of one layout (no per-block concatenation) compute what concatenating and
    stripping them around every block computes: the same features, and the same gradients for every trainable
    parameter (the slot writes are in place, under autograd)."""
    model = vitaclip.create_model("vitaclip-tiny")
    video = random_video(2, T, seed=T)
    grads = []
    for encode in (model.encode_video, lambda v: _reference_encode_video(model, v)):
        model.zero_grad(set_to_none=True)
        out = encode(video)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        grads[-1]["<out>"] = out.detach()
    ours, reference = grads
    assert set(ours) == set(reference) and len(ours) > 4  # the prompts, summary and temporal weights got gradients
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_all_prompts_off_is_clip_frame_averaging() -> None:
    model = vitaclip.create_model("clip-tiny-frames")
    assert not model.config.has_prompts
    assert model.trainable_parameter_names() == ["logit_scale"]
    frame = random_video(3, 1)[:, 0]  # [B, 3, H, W]
    for T in (1, 4, 8):
        video = frame.unsqueeze(1).expand(-1, T, -1, -1, -1)  # T identical frames
        with torch.no_grad():
            ours = model.encode_video(video, normalize=False)
            clip = model.clip.encode_image(frame)
        torch.testing.assert_close(ours, clip, rtol=1e-5, atol=1e-5)
    # Different frames: the mean of per-frame CLIP features.
    video = random_video(2, 3)
    with torch.no_grad():
        per_frame = model.clip.encode_image(video.flatten(0, 1)).view(2, 3, -1).mean(1)
        torch.testing.assert_close(model.encode_video(video, normalize=False), per_frame, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 2, 3, 8, 16])
def test_any_number_of_frames(tiny: vitaclip.VitaClip, T: int) -> None:
    with torch.no_grad():
        out = tiny.encode_video(random_video(2, T))
    assert out.shape == (2, tiny.embed_dim)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_videos_in_a_batch_are_independent(tiny: vitaclip.VitaClip) -> None:
    """Cross-frame tokens (local prompts, summary) must mix frames of one video only."""
    video = random_video(3, 8)
    with torch.no_grad():
        batched = tiny.encode_video(video)
        single = torch.cat([tiny.encode_video(video[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_frame_order_matters_with_prompts(tiny: vitaclip.VitaClip) -> None:
    video = random_video(1, 8)
    with torch.no_grad():
        forward = tiny.encode_video(video)
        backward = tiny.encode_video(video.flip(1))
    assert not torch.allclose(forward, backward, atol=1e-4)


def test_bad_video_shapes_raise(tiny: vitaclip.VitaClip) -> None:
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        tiny.encode_video(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="64x64"):
        tiny.encode_video(torch.zeros(1, 8, 3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        tiny.encode_video(torch.zeros(1, 8, 3, 64, 64, dtype=torch.uint8))


def test_trainable_parameters_only_prompts(tiny: vitaclip.VitaClip) -> None:
    names = tiny.trainable_parameter_names()
    assert not any(n.startswith("clip.") or n.startswith("cls_proj") or n == "patch_bias" for n in names)
    roots = {n.split(".")[0] for n in names}
    assert roots == {"logit_scale", "temporal", "global_prompts", "local_prompts", "summary", "text_context"}
    # A backward pass leaves no gradient on the frozen backbone.
    loss = tiny(random_video(2, 8)).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is None for p in tiny.clip.parameters())
    assert tiny.text_context is not None and tiny.text_context.ctx.grad is not None
    tiny.zero_grad(set_to_none=True)


def test_learned_labels_use_their_own_context_row() -> None:
    model = vitaclip.create_model("vitaclip-tiny")
    assert model.text_context is not None and model.label_names is not None
    names = ["abseiling", "air drumming", "yoga"]
    with torch.no_grad():
        before = model.encode_labels(names)
        row = model.label_names.index("air drumming")
        model.text_context.ctx[row] += torch.linspace(-1, 1, model.text_context.ctx.shape[-1])
        after = model.encode_labels(names)
    assert torch.allclose(before[0], after[0]) and torch.allclose(before[2], after[2])
    assert not torch.allclose(before[1], after[1])
    # Underscored spellings match the same learned row.
    with torch.no_grad():
        torch.testing.assert_close(model.encode_labels(["air_drumming"]), after[1:2])
        torch.testing.assert_close(model.encode_labels("air drumming"), after[1:2])  # one name, not 12 letters


def test_unknown_labels_fall_back_to_template_ensemble(tiny: vitaclip.VitaClip) -> None:
    name = "juggling fire on a unicycle"
    assert tiny.label_names is not None and name not in tiny.label_names
    with torch.no_grad():
        got = tiny.encode_labels([name])
        texts = [t.format(name) for t in TEMPLATES]
        feats = F.normalize(tiny.clip.encode_text(open_clip.tokenize(texts)), dim=-1).mean(0, keepdim=True)
    torch.testing.assert_close(got, F.normalize(feats, dim=-1))


def test_generic_context_serves_any_name_and_free_text() -> None:
    config = vitaclip.get_model_config("vitaclip-tiny").replace(
        name="tiny-generic", text_context=vitaclip.TextContextConfig(num_tokens=4, kind="generic"), label_set=None
    )
    model = vitaclip.create_model(config)
    with torch.no_grad():
        labels = model.encode_labels(["a red circle", "a blue square"])
        text = model.encode_text(["a red circle"])
        plain = F.normalize(model.clip.encode_text(open_clip.tokenize(["a red circle"])), dim=-1)
        assert model.text_context is not None
        model.text_context.ctx += 0.3 * torch.randn(
            model.text_context.ctx.shape, generator=torch.Generator().manual_seed(1)
        )
        moved = model.encode_text(["a red circle"])
    assert labels.shape == (2, model.embed_dim)
    assert torch.allclose(text[0], labels[0], atol=1e-6)  # free text takes the label prompt's form
    assert not torch.allclose(text, plain, atol=1e-4)  # the context is used
    assert not torch.allclose(text, moved, atol=1e-4)


def test_top_k_labels() -> None:
    names = ["a", "b", "c", "d"]
    labels = torch.eye(4, 8)
    videos = F.normalize(torch.tensor([[0.1, 0.9, 0.0, 0.2, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0, 0, 0]]), dim=-1)
    out = vitaclip.top_k_labels(videos, labels, names, k=2, logit_scale=torch.tensor(4.0))
    assert [s.name for s in out[0]] == ["b", "d"] and [s.name for s in out[1]][0] == "a"
    assert out[0][0].probability > out[0][1].probability
    full = vitaclip.top_k_labels(videos, labels, names, k=10, logit_scale=10.0)
    assert len(full[0]) == 4 and abs(sum(s.probability for s in full[0]) - 1) < 1e-5
    with pytest.raises(ValueError):
        vitaclip.top_k_labels(videos, labels, names[:3])


def test_config_json_round_trip_and_errors() -> None:
    for name in vitaclip.list_models():
        config = vitaclip.get_model_config(name)
        assert vitaclip.VitaClipConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        vitaclip.VitaClipConfig.from_dict({"name": "x", "backbone": "ViT-B-16", "num_globl_prompts": 3})
    with pytest.raises(ValueError, match=">= 0"):
        vitaclip.VitaClipConfig(name="x", backbone="ViT-B-16", num_global_prompts=-1)
    with pytest.raises(ValueError, match="unknown model"):
        vitaclip.create_model("vitaclip-b15")
    with pytest.raises(ValueError, match="position"):
        vitaclip.TextContextConfig(position="left")  # type: ignore[arg-type]


def test_a_backbone_is_a_registered_name_built_here(tmp_path) -> None:
    """A checkpoint's config names its backbone; open_clip would also take a folder anywhere (``local-dir:``) or a
    Hugging Face repository (``hf-hub:``), and its registered timm or Hugging Face towers load from elsewhere."""
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {}}')
    for name in (f"local-dir:{tmp_path}", "hf-hub:org/repo", "../ViT-B-16", "", "ViT-B-16 "):
        with pytest.raises(ValueError, match="registered open_clip model name"):
            vitaclip.VitaClipConfig(name="x", backbone=name)
    with pytest.raises(ValueError, match="timm"):
        _ = vitaclip.VitaClipConfig(name="x", backbone="EVA02-B-16").embed_dim  # registered, on a timm tower
    assert vitaclip.VitaClipConfig(name="x", backbone="ViT-B-16").embed_dim == 512


def test_registered_recipe_matches_the_release() -> None:
    config = vitaclip.get_model_config("vitaclip-b16")
    assert config.backbone == "ViT-B-16-quickgelu"
    assert (config.num_frames, config.num_global_prompts, config.num_local_prompts) == (8, 8, 8)
    assert config.summary_token and config.temporal_embedding
    assert config.text_context == vitaclip.TextContextConfig(num_tokens=8, kind="class_specific", position="end")
    assert len(vitaclip.load_label_set("kinetics400")) == 400


def test_class_specific_needs_matching_label_count() -> None:
    with pytest.raises(ValueError, match="label"):
        vitaclip.create_model(vitaclip.get_model_config("vitaclip-tiny").replace(label_set=None))


def test_bfloat16_runs_close_to_float32(tiny: vitaclip.VitaClip) -> None:
    model = vitaclip.create_model("vitaclip-tiny", dtype=torch.bfloat16)
    video = random_video(2, 8)
    with torch.no_grad():
        low = model.encode_video(video).float()
        full = tiny.encode_video(video)
    assert F.cosine_similarity(low, full).min() > 0.98


def test_import_does_not_load_ray_or_boto3() -> None:
    code = "import sys, vitaclip, vitaclip.model; print('ray' in sys.modules, 'boto3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_frozen_label_features_are_computed_once_per_training_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    config = vitaclip.get_model_config("vitaclip-tiny").replace(text_context=None)
    model = vitaclip.create_model(config, label_names=["red circle", "blue square"])
    calls = []
    original = model.encode_labels
    monkeypatch.setattr(model, "encode_labels", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.train()
    video = random_video(2, 8)
    first = model(video)
    second = model(video)
    assert len(calls) == 1 and torch.allclose(first, second)
    model.eval()  # a new phase (weights may have been loaded): recomputed, and never cached outside training
    model(video)
    model(video)
    assert len(calls) == 3

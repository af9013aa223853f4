"""Vita-CLIP on an unmodified open_clip ViT.

The backbone is an open_clip ``CLIP`` model, kept frozen and never subclassed. :class:`VitaClip` drives the
backbone's own pieces (``conv1``, ``ln_pre``, each block's ``ln_1``/``attention``/``ln_2``/``mlp``, ``ln_post``,
``proj``, and the text tower) and adds the learned modules of :mod:`vitaclip.prompts` around them.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, overload

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from vitaclip.checkpoint_folder import is_packaged_data_file
from vitaclip.config import (
    VitaClipConfig,
    backbone_model_config,
    backbone_tower,
    check_backbone_sizes,
    format_model_id,
    model_name_of,
)
from vitaclip.labels import check_label_names, load_label_set
from vitaclip.prompts import GlobalPrompts, LocalPrompts, SummaryToken, TemporalEmbedding, TextContext
from vitaclip.zeroshot import TEMPLATES

__all__ = [
    "VitaClip",
    "backbone_model_config",
    "build_backbone",
    "format_model_id",
    "model_name_of",
]

MAX_TOKENIZER_BYTES = 16 << 20  # a BPE merges file, decompressed (CLIP's is 1.3 MB)


@lru_cache(maxsize=8)
def get_tokenizer(bpe: str | None = None) -> SimpleTokenizer:
    """The tokenizer of a config's ``tokenizer`` field: CLIP's own for None, else the named BPE merges file (a file
    packaged in ``vitaclip/data`` or a path)."""
    if bpe is None:
        return SimpleTokenizer()
    packaged = resources.files("vitaclip").joinpath("data").joinpath(bpe)
    path = Path(str(packaged)) if is_packaged_data_file(bpe) else Path(bpe)
    if not path.is_file():
        raise ValueError(f"tokenizer {bpe!r} is neither a file packaged in vitaclip/data nor an existing path")
    try:
        too_large = _decompresses_beyond(path, MAX_TOKENIZER_BYTES)
        tokenizer = None if too_large else SimpleTokenizer(bpe_path=str(path))
    except (OSError, EOFError, ValueError, IndexError) as exc:  # gzip, UTF-8 and merges-line errors
        raise ValueError(f"tokenizer {bpe!r} is not a gzip-compressed BPE merges file: {exc}") from None
    if tokenizer is None:
        raise ValueError(
            f"tokenizer {path} decompresses to more than {MAX_TOKENIZER_BYTES} bytes; a BPE merges file is a few MB "
            "(refused)"
        )
    return tokenizer


def _decompresses_beyond(path: Path, limit: int) -> bool:
    """Whether a gzip file decompresses to more than ``limit`` bytes, read in chunks up to there: ``SimpleTokenizer``
    reads the whole file into memory, and a gzip bomb of a few MB expands to gigabytes."""
    size = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            if size > limit:
                return True
    return False


def _clean_name(name: str) -> str:
    # The official prompt learner turns underscores into spaces; names are matched in that form.
    return name.replace("_", " ").strip()


def _as_sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else f"{text}."


def check_backbone_config(cfg: Mapping[str, Any], *, where: str = "backbone_config") -> None:
    """Checks an open_clip ViT config (`backbone_model_config`) before anything is built: its sizes
    (`vitaclip.config.check_backbone_sizes`) and no tower option open_clip does not know."""
    check_backbone_sizes(cfg, where=where)
    for key, fields_of in (("vision_cfg", open_clip.model.CLIPVisionCfg), ("text_cfg", open_clip.model.CLIPTextCfg)):
        tower = backbone_tower(cfg, key, where)
        unknown = sorted(str(k)[:40] for k in set(tower) - {f.name for f in dataclasses.fields(fields_of)})
        if unknown:
            raise ValueError(f"{where}.{key} has options open_clip does not know: {unknown[:6]}")


def build_backbone(config: VitaClipConfig) -> open_clip.CLIP:
    """Builds the open_clip model of a config (random weights) and checks it is a ViT CLIP we can drive."""
    cfg = backbone_model_config(config)
    where = f"backbone {config.backbone}" if config.backbone else "backbone_config"
    check_backbone_config(cfg, where=where)
    try:
        clip = open_clip.model.CLIP(
            embed_dim=cfg["embed_dim"],
            vision_cfg=cfg["vision_cfg"],
            text_cfg=cfg["text_cfg"],
            quick_gelu=bool(cfg.get("quick_gelu", False)),
        )
    except (TypeError, ValueError, AssertionError, ArithmeticError) as exc:  # an option's value open_clip rejects
        raise ValueError(f"{where}: open_clip cannot build this model: {type(exc).__name__}: {exc}") from None
    visual = clip.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise ValueError(
            f"backbone {config.backbone!r}: Vita-CLIP needs a ViT image tower, got {type(visual).__name__}"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError(f"backbone {config.backbone!r}: Vita-CLIP needs CLS-token pooling (pool_type='tok')")
    if visual.proj is None or not isinstance(clip.text_projection, torch.Tensor):
        raise ValueError(f"backbone {config.backbone!r}: image and text projections must be matrices")
    if clip.text_pool_type != "argmax":
        raise ValueError(f"backbone {config.backbone!r}: text pooling must be 'argmax' (CLIP's end token)")
    return clip


class VitaClip(nn.Module):
    """A video-text model: frozen CLIP ViT + Vita-CLIP prompts.

    Args:
        config: what to build.
        label_names: names of the labels a class-specific text context was trained on, in training order. When
            omitted, the packaged list ``config.label_set`` is used.

    Attributes:
        clip: the unmodified open_clip backbone (frozen).
        label_names: the default label set of :meth:`encode_labels` users (the zero-shot helper, the job).
    """

    def __init__(self, config: VitaClipConfig, *, label_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.config = config
        if label_names is None and config.label_set is not None:
            label_names = load_label_set(config.label_set)
        if label_names is not None:
            check_label_names(list(label_names), f"model {config.name!r}")
        self.label_names: tuple[str, ...] | None = tuple(label_names) if label_names is not None else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self._build(config)
        self.source_sha256: str | None = None  # sha256 of the checkpoint file the weights came from
        self.id_suffix = ""  # a folder whose config.json describes another model than its weights were saved as
        # Label features of a model without learned text context depend on frozen weights only: forward() computes
        # them once per training phase instead of running the text tower on every step.
        self._frozen_label_features: torch.Tensor | None = None

    def _build(self, config: VitaClipConfig) -> None:
        self.clip = build_backbone(config)
        self._tokenizer = get_tokenizer(config.tokenizer)
        vocab_size = self.clip.token_embedding.num_embeddings
        if self._tokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"model {config.name!r}: tokenizer {config.tokenizer or 'CLIP BPE'} has {self._tokenizer.vocab_size} "
                f"tokens but the text tower's vocab_size is {vocab_size}"
            )
        visual = self.clip.visual
        width = visual.conv1.out_channels
        num_layers = len(visual.transformer.resblocks)
        num_heads = visual.transformer.resblocks[0].attn.num_heads
        patch_size = visual.patch_size[0]

        # The official patch embedding is a convolution with a bias (open_clip's has none); a zero bias is exact CLIP.
        self.patch_bias = nn.Parameter(torch.zeros(width), requires_grad=False)
        self.temporal = TemporalEmbedding(config.num_frames, width) if config.temporal_embedding else None
        self.global_prompts = (
            GlobalPrompts(num_layers, config.num_global_prompts, width, patch_size=patch_size)
            if config.num_global_prompts > 0
            else None
        )
        # One projection of the CLS token per layer, shared by local prompts and the summary token. It stays at its
        # random initial value (frozen), as in the official recipe, and is stored in checkpoints.
        uses_cls = config.num_local_prompts > 0 or config.summary_token
        self.cls_proj = nn.ModuleList([nn.Linear(width, width) for _ in range(num_layers)]) if uses_cls else None
        self.local_prompts = (
            LocalPrompts(num_layers, config.num_local_prompts, width, patch_size=patch_size)
            if config.num_local_prompts > 0
            else None
        )
        self.summary = SummaryToken(num_layers, width, num_heads) if config.summary_token else None
        self.logit_scale = nn.Parameter(self.clip.logit_scale.detach().clone())

        self.text_context: TextContext | None = None
        if config.text_context is not None:
            tc = config.text_context
            text_width = self.clip.ln_final.weight.shape[0]
            names = self.label_names or ()
            if tc.kind == "class_specific":
                if not names:
                    raise ValueError(
                        f"model {config.name!r} has a class-specific text context: give label_names (training order)"
                    )
                ctx = torch.empty(len(names), tc.num_tokens, text_width)
                nn.init.normal_(ctx, std=0.02)
            elif tc.init_words:
                tokens = self._tokenizer([_clean_name(tc.init_words)], context_length=self.clip.context_length)
                with torch.no_grad():
                    ctx = self.clip.token_embedding(tokens)[0, 1 : 1 + tc.num_tokens].clone()
            else:
                ctx = torch.empty(tc.num_tokens, text_width)
                nn.init.normal_(ctx, std=0.02)
            self.text_context = TextContext(
                ctx, token_prefix=None, token_suffix=None, label_names=tuple(names), position=tc.position
            )
            if names:
                self.refresh_label_prompts()

        # Freeze by module, not by parameter-name matching: the backbone and the CLS projections stay fixed.
        self.clip.requires_grad_(False)
        if self.cls_proj is not None:
            self.cls_proj.requires_grad_(False)

    # ------------------------------------------------------------------ properties

    @property
    def image_size(self) -> int:
        return int(self.clip.visual.image_size[0])

    @property
    def embed_dim(self) -> int:
        return int(self.clip.visual.proj.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    @property
    def model_id(self) -> str:
        """Model name + sha256 of the weights' source: the id every output row carries (with ``+config:...`` for a
        checkpoint folder whose config.json was edited since its weights were saved)."""
        if self.source_sha256 is None:
            self.source_sha256 = self.weights_sha256()
        return format_model_id(self.config.name, self.source_sha256) + self.id_suffix

    def weights_sha256(self) -> str:
        """sha256 over the state dict (names, dtypes, shapes, bytes): identifies randomly initialised models."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    def trainable_parameter_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ video

    def encode_video(self, video: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Video features.

        Args:
            video: float ``[B, T, 3, H, W]``, CLIP-normalised frames, H = W = ``image_size``; any T >= 1.
            normalize: L2-normalise the output.

        Returns:
            ``[B, E]``: the mean over frames of each frame's projected CLS token.
        """
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be [B, T, 3, H, W], got shape {tuple(video.shape)}")
        B, T, _, H, W = video.shape
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"frames must be {self.image_size}x{self.image_size} for {self.config.name}, got {H}x{W}")
        if not video.is_floating_point():
            raise ValueError(f"video must be a float tensor (CLIP-normalised), got {video.dtype}")
        visual = self.clip.visual
        x = visual.conv1(video.reshape(B * T, 3, H, W).to(self.dtype))  # [B*T, D, g, g]
        x = x.flatten(2).transpose(1, 2) + self.patch_bias.to(x.dtype)  # [B*T, N, D]
        cls = visual.class_embedding.to(x.dtype).expand(B * T, 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # [B*T, 1+N, D]
        if self.temporal is not None:
            x = (x.view(B, T, *x.shape[1:]) + self.temporal(T).to(x.dtype)[None, :, None, :]).flatten(0, 1)
        x = self._with_token_slots(visual.ln_pre(x), T)  # [B*T, 1+L+G+N+S, D]
        for layer, block in enumerate(visual.transformer.resblocks):
            x = self._video_block(layer, block, x, B, T)
        cls_out = visual.ln_post(x[:, 0]) @ visual.proj  # [B*T, E]
        features = cls_out.view(B, T, -1).mean(dim=1)  # [B, E]
        return F.normalize(features, dim=-1) if normalize else features

    def _slot_counts(self, T: int) -> tuple[int, int, int]:
        """Tokens each block adds around a frame's CLS and patches: local prompts (one per frame of the video),
        global prompts, summary token."""
        num_local = T if self.local_prompts is not None else 0
        num_global = self.global_prompts.num_prompts if self.global_prompts is not None else 0
        return num_local, num_global, int(self.summary is not None)

    def _with_token_slots(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """``[B*T, 1+N, D]`` -> ``[B*T, 1+L+G+N+S, D]``: the layout every block attends over, [CLS | local prompts |
        global prompts | patches | summary], made once per video batch. Each block writes its own prompt and summary
        tokens into the slots in place (a few tokens per frame) instead of concatenating and slicing the whole
        activation around them (four full copies per block: a quarter of the encoder's GPU time)."""
        num_local, num_global, num_summary = self._slot_counts(T)
        if not (num_local or num_global or num_summary):
            return x
        before = x.new_zeros(x.shape[0], num_local + num_global, x.shape[2])
        after = x.new_zeros(x.shape[0], num_summary, x.shape[2])
        return torch.cat([x[:, :1], before, x[:, 1:], after], dim=1)

    def _video_block(self, layer: int, block: Any, x: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """One backbone block with Vita-CLIP's tokens, on the layout of :meth:`_with_token_slots` (same shape out).

        Attention sees every token. The MLP, a per-token map, runs over the prompt and summary slots too; what it
        makes of them is overwritten by the next block's tokens and never reaches the CLS token, so the result is
        the official block's, which feeds only CLS, global prompts and patches to the MLP."""
        num_local, num_global, num_summary = self._slot_counts(T)
        if num_global:
            assert self.global_prompts is not None
            x[:, 1 + num_local : 1 + num_local + num_global] = self.global_prompts.tokens[layer].to(x.dtype)
        if self.cls_proj is not None and (num_local or num_summary):
            # A copy of the CLS tokens under autograd: the slot writes below change x in place.
            cls = x[:, 0].clone() if torch.is_grad_enabled() else x[:, 0]
            cls_projected = self.cls_proj[layer](cls.view(B, T, -1))  # [B, T, D]
            if self.summary is not None:
                x[:, -1] = self.summary(layer, cls_projected).reshape(B * T, -1)  # frame t sees summary t
            if self.local_prompts is not None:
                local = self.local_prompts(layer, cls_projected)  # [B, T, D]
                frames = x.view(B, T, *x.shape[1:])
                frames[:, :, 1 : 1 + num_local] = local[:, None]  # every frame of a video sees all T
        x = x + block.ls_1(block.attention(block.ln_1(x)))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    # ------------------------------------------------------------------ text

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts), context_length=self.clip.context_length).to(self.device)

    def _context_words(self) -> str:
        assert self.text_context is not None
        tc = self.config.text_context
        if tc is not None and tc.init_words:
            return _clean_name(tc.init_words)
        return " ".join(["X"] * self.text_context.num_tokens)

    def _label_prompt_tokens(self, names: Sequence[str]) -> torch.Tensor:
        words = self._context_words()
        return self.tokenize([f"{words} {_clean_name(n)}." for n in names])  # [K, L]

    def _encode_embedded(self, x: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
        """Runs the text tower on prompt embeddings ``[K, L, W]``; features at ``end_index`` ``[K]`` -> ``[K, E]``."""
        clip = self.clip
        x = x + clip.positional_embedding.to(x.dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), end_index]  # [K, W]
        return x @ clip.text_projection

    @torch.no_grad()
    def refresh_label_prompts(self) -> None:
        """Recomputes the stored label prompt embeddings from the current token embedding (after a backbone load)."""
        tc = self.text_context
        if tc is None or not tc.label_names:
            return
        tokens = self._label_prompt_tokens(tc.label_names)
        emb = self.clip.token_embedding(tokens).to(self.dtype)  # [K, L, W]
        tc.register_buffer("token_prefix", emb[:, :1].clone())
        tc.register_buffer("token_suffix", emb[:, 1 + tc.num_tokens :].clone())

    def _encode_with_context(self, names: Sequence[str], rows: torch.Tensor | None, stored: bool) -> torch.Tensor:
        tc = self.text_context
        assert tc is not None
        tokens = self._label_prompt_tokens(names)
        if stored:
            assert rows is not None and tc.token_prefix is not None and tc.token_suffix is not None
            prefix, suffix = tc.token_prefix[rows], tc.token_suffix[rows]
        else:
            emb = self.clip.token_embedding(tokens).to(self.dtype)
            prefix, suffix = emb[:, :1], emb[:, 1 + tc.num_tokens :]
        name_lengths = [len(self._tokenizer.encode(_clean_name(n))) for n in names]
        prompts = tc.assemble(prefix, suffix, tc.context_for(rows, len(names)), name_lengths)
        return self._encode_embedded(prompts, tokens.argmax(dim=-1))

    def _encode_templates(self, names: Sequence[str]) -> torch.Tensor:
        """CLIP-style zero-shot prompt ensemble: the mean of normalised template features, per name."""
        texts = [t.format(_clean_name(n)) for n in names for t in TEMPLATES]
        feats = F.normalize(self.clip.encode_text(self.tokenize(texts)), dim=-1)
        return feats.view(len(names), len(TEMPLATES), -1).mean(dim=1)

    def encode_labels(self, label_names: Sequence[str] | None = None, normalize: bool = True) -> torch.Tensor:
        """Label features ``[K, E]``.

        A name the class-specific context was trained on uses its learned context (exactly as the official prompt
        learner builds it); with a generic context every name gets ``<context> <name>.``; any other name falls back to
        the zero-shot prompt ensemble of the plain CLIP text tower.
        """
        if isinstance(label_names, str):  # one name, not its characters
            label_names = [label_names]
        names = list(label_names) if label_names is not None else list(self.label_names or ())
        if not names:
            raise ValueError("no label names: pass label_names or create the model with a label set")
        out: list[torch.Tensor | None] = [None] * len(names)
        tc = self.text_context
        learned = {_clean_name(n): i for i, n in enumerate(tc.label_names)} if tc is not None else {}
        known = [i for i, n in enumerate(names) if _clean_name(n) in learned]
        if tc is not None and known:
            rows = torch.tensor([learned[_clean_name(names[i])] for i in known], device=self.device)
            feats = self._encode_with_context([names[i] for i in known], rows, stored=tc.token_prefix is not None)
            for j, i in enumerate(known):
                out[i] = feats[j]
        rest = [i for i in range(len(names)) if out[i] is None]
        if rest and tc is not None and not tc.class_specific:
            feats = self._encode_with_context([names[i] for i in rest], None, stored=False)
            for j, i in enumerate(rest):
                out[i] = feats[j]
            rest = []
        if rest:
            feats = self._encode_templates([names[i] for i in rest])
            for j, i in enumerate(rest):
                out[i] = feats[j]
        features = torch.stack([f for f in out if f is not None])
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, texts: Sequence[str] | str, normalize: bool = True) -> torch.Tensor:
        """Free-text features ``[K, E]``: ``<generic context> <text>.`` (the label prompt's form, so a label name as
        text gets exactly its label feature) when the model learned a generic context, else the plain CLIP text
        tower."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("encode_text needs at least one text")
        tc = self.text_context
        if tc is not None and not tc.class_specific:
            words = self._context_words()
            # The same template as a label prompt ("<context> name."): the context was learned on that form.
            tokens = self.tokenize([f"{words} {_as_sentence(t)}" for t in texts])
            emb = self.clip.token_embedding(tokens).to(self.dtype)
            # Free text has no separate name: the context always follows the start token.
            ctx = tc.context_for(None, len(texts)).to(emb.dtype)
            prompts = torch.cat([emb[:, :1], ctx, emb[:, 1 + tc.num_tokens :]], dim=1)  # [K, L, W]
            features = self._encode_embedded(prompts, tokens.argmax(dim=-1))
        else:
            features = self.clip.encode_text(self.tokenize(texts))
        return F.normalize(features, dim=-1) if normalize else features

    def train(self, mode: bool = True) -> VitaClip:
        self._frozen_label_features = None  # weights may have been loaded since: recompute on the next step
        return super().train(mode)

    @overload
    def forward(self, video: torch.Tensor, label_features: torch.Tensor | None = None) -> torch.Tensor: ...

    @overload
    def forward(
        self,
        video: torch.Tensor,
        label_features: torch.Tensor | None = None,
        *,
        texts: Sequence[str],
        labels: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor]: ...

    def forward(
        self,
        video: torch.Tensor,
        label_features: torch.Tensor | None = None,
        *,
        texts: Sequence[str] | None = None,
        labels: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]:
        """Logits ``[B, K]`` = ``exp(logit_scale) * cos(video, label)`` over the model's labels (training loss).

        With ``texts`` (captions, ``N`` of them) it returns ``(label logits or None when not labels, text logits
        [B, N])``, the text logits ``exp(logit_scale) * cos(video, encode_text(text))``: one forward pass for the
        label loss and the video-text contrastive loss (under DDP every trained parameter is reached through it).
        """
        video_features = self.encode_video(video, normalize=True)
        if texts is None:
            return self._label_logits(video_features, label_features)
        text_features = self.encode_text(list(texts), normalize=True)
        text_logits = self.logit_scale.exp() * video_features @ text_features.to(video_features.dtype).t()
        return (self._label_logits(video_features, label_features) if labels else None), text_logits

    def _label_logits(self, video_features: torch.Tensor, label_features: torch.Tensor | None) -> torch.Tensor:
        if label_features is None and self.text_context is None and self.training:
            if self._frozen_label_features is None or self._frozen_label_features.device != video_features.device:
                with torch.no_grad():
                    self._frozen_label_features = self.encode_labels(normalize=True)
            label_features = self._frozen_label_features
        if label_features is None:
            label_features = self.encode_labels(normalize=True)
        return self.logit_scale.exp() * video_features @ label_features.to(video_features.dtype).t()

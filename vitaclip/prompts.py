"""Vita-CLIP's learned additions to a frozen CLIP backbone.

Wasim et al., "Vita-CLIP: Video and text adaptive CLIP via Multimodal Prompting", CVPR 2023 (arXiv 2304.03307):
- global video-level prompts (Sec. 3.2, "global prompts"),
- local frame-level prompts conditioned on each frame's CLS token (Sec. 3.2, "local prompts"),
- a summary token from attention across the frames' CLS tokens (Sec. 3.2, "summary prompt"),
- a learned temporal embedding, and
- CoOp-style learned text context (Sec. 3.3).

Each module holds only its own parameters; :mod:`vitaclip.model` decides where their tokens enter the backbone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def resample_frames(table: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Resamples a per-frame table ``[P, D]`` to ``[num_frames, D]`` by nearest neighbour.

    This is the rule the official code applies to its temporal embedding when the clip length differs from training;
    the local prompts follow the same rule here, so any T works.
    """
    if table.shape[0] == num_frames:
        return table
    # F.interpolate wants [N, C, L].
    out = F.interpolate(table.t().unsqueeze(0), size=num_frames, mode="nearest")  # [1, D, T]
    return out.squeeze(0).t()


def _prompt_init_bound(patch_size: int, width: int) -> float:
    # Xavier-uniform bound with the fan of a 3-channel patch and the token width, as in the paper's code (VPT-style).
    return math.sqrt(6.0 / float(3 * patch_size * patch_size + width))


class TemporalEmbedding(nn.Module):
    """A learned embedding per frame position, added to every token of that frame before ``ln_pre``."""

    def __init__(self, num_frames: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_frames, width))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, num_frames: int) -> torch.Tensor:
        return resample_frames(self.weight, num_frames)  # [T, D]


class GlobalPrompts(nn.Module):
    """G video-level tokens per layer, inserted after CLS for the whole block and dropped after it."""

    def __init__(self, num_layers: int, num_prompts: int, width: int, *, patch_size: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_layers, num_prompts, width))
        bound = _prompt_init_bound(patch_size, width)
        nn.init.uniform_(self.tokens, -bound, bound)

    @property
    def num_prompts(self) -> int:
        return int(self.tokens.shape[1])


class LocalPrompts(nn.Module):
    """P frame-level tokens per layer; token t is conditioned on frame t's projected CLS token.

    All T conditioned tokens of a video are visible to every frame of it, inside attention only.
    """

    def __init__(self, num_layers: int, num_prompts: int, width: int, *, patch_size: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_layers, num_prompts, width))
        bound = _prompt_init_bound(patch_size, width)
        nn.init.uniform_(self.tokens, -bound, bound)

    def forward(self, layer: int, cls_projected: torch.Tensor) -> torch.Tensor:
        """Conditioned prompts of one layer.

        Args:
            layer: block index.
            cls_projected: ``[B, T, D]`` projected CLS tokens of the frames.

        Returns:
            ``[B, T, D]``: prompt t plus frame t's projected CLS.
        """
        prompts = resample_frames(self.tokens[layer], cls_projected.shape[1])  # [T, D]
        return cls_projected + prompts.to(cls_projected.dtype)


class FrameAttention(nn.Module):
    """Multi-head self-attention across the frames of a video, with separate q/k/v projections."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        for m in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape  # [B, T, D]
        H = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, H, D // H).transpose(1, 2)  # [B, H, T, D/H]

        mixed = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(mixed.transpose(1, 2).reshape(B, T, D))  # [B, T, D]


class SummaryToken(nn.Module):
    """Per layer: LayerNorm and attention across the frames' projected CLS tokens, with a residual.

    Frame t's block attends to the t-th result, inside attention only.
    """

    def __init__(self, num_layers: int, width: int, num_heads: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(num_layers)])
        self.attns = nn.ModuleList([FrameAttention(width, num_heads) for _ in range(num_layers)])

    def forward(self, layer: int, cls_projected: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` projected CLS tokens -> ``[B, T, D]`` summary tokens."""
        norm = self.norms[layer]
        assert isinstance(norm, nn.LayerNorm)
        # LayerNorm in float32, as CLIP does, then back to the activation dtype.
        normed = F.layer_norm(
            cls_projected.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
        ).to(cls_projected.dtype)
        return cls_projected + self.attns[layer](normed)


class TextContext(nn.Module):
    """Learned text context (CoOp): ``num_tokens`` embeddings placed around a label name's tokens.

    A generic context is one ``[n_ctx, W]`` table shared by every label; a class-specific one is ``[n_cls, n_ctx, W]``
    with one row per training label. ``token_prefix``/``token_suffix`` hold the start token and the name, period, end
    and padding embeddings of the training labels, as the official checkpoint stores them.
    """

    def __init__(
        self,
        ctx: torch.Tensor,
        *,
        token_prefix: torch.Tensor | None,
        token_suffix: torch.Tensor | None,
        label_names: tuple[str, ...],
        position: str,
    ) -> None:
        super().__init__()
        if ctx.ndim not in (2, 3):
            raise ValueError(f"text context must be [n_ctx, W] or [n_cls, n_ctx, W], got shape {tuple(ctx.shape)}")
        self.ctx = nn.Parameter(ctx)
        self.token_prefix: torch.Tensor | None
        self.token_suffix: torch.Tensor | None
        if (token_prefix is None) != (token_suffix is None):
            raise ValueError("token_prefix and token_suffix come together")
        if token_prefix is not None and token_suffix is not None:
            if token_prefix.shape[0] != len(label_names) or token_suffix.shape[0] != len(label_names):
                raise ValueError(
                    f"stored label prompts cover {token_prefix.shape[0]} labels but {len(label_names)} names given"
                )
            self.register_buffer("token_prefix", token_prefix)
            self.register_buffer("token_suffix", token_suffix)
        else:
            self.register_buffer("token_prefix", None)
            self.register_buffer("token_suffix", None)
        if self.class_specific and ctx.shape[0] != len(label_names):
            raise ValueError(
                f"the class-specific text context has {ctx.shape[0]} rows but {len(label_names)} label names were "
                "given; pass the training label names in training order"
            )
        self.label_names = tuple(label_names)
        self.position = position

    @property
    def class_specific(self) -> bool:
        return self.ctx.ndim == 3

    @property
    def num_tokens(self) -> int:
        return int(self.ctx.shape[-2])

    def context_for(self, rows: torch.Tensor | None, count: int) -> torch.Tensor:
        """``[count, n_ctx, W]`` context: the stored rows for class-specific, the shared table otherwise."""
        if self.class_specific:
            assert rows is not None
            return self.ctx[rows]
        return self.ctx.unsqueeze(0).expand(count, -1, -1)

    def assemble(
        self, prefix: torch.Tensor, suffix: torch.Tensor, ctx: torch.Tensor, name_lengths: list[int]
    ) -> torch.Tensor:
        """Builds prompt embeddings ``[K, L, W]`` from start token ``[K, 1, W]``, context ``[K, n, W]`` and the
        name-and-rest suffix ``[K, L-1-n, W]``, placing the name at ``self.position``."""
        ctx = ctx.to(prefix.dtype)
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        out = []
        half = self.num_tokens // 2
        for i, n in enumerate(name_lengths):
            name, rest = suffix[i : i + 1, :n], suffix[i : i + 1, n:]
            if self.position == "middle":
                parts = [prefix[i : i + 1], ctx[i : i + 1, :half], name, ctx[i : i + 1, half:], rest]
            else:  # front
                parts = [prefix[i : i + 1], name, ctx[i : i + 1], rest]
            out.append(torch.cat(parts, dim=1))
        return torch.cat(out, dim=0)

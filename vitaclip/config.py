"""Model configuration: frozen dataclasses with a JSON twin.

A :class:`VitaClipConfig` names an open_clip backbone (a registered open_clip model name or an inline open_clip
model config) and the Vita-CLIP additions on top of it. Every addition is a count or an optional sub-config, so the
all-off config is plain CLIP frame averaging.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

ContextPosition = Literal["end", "middle", "front"]
ContextKind = Literal["generic", "class_specific"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Bounds on a config's sizes, far above any CLIP (ViT-bigG: width 1664, 48 layers; multilingual vocabularies: 250k
# tokens). Configs come with checkpoints, which are data: a size beyond these is refused when the config is read,
# before anything is planned or built (the job's torch-free driver included).
MAX_WIDTH = 8192
MAX_LAYERS = 256
MAX_IMAGE_SIZE = 4096
MAX_CONTEXT_LENGTH = 4096
MAX_VOCAB_SIZE = 1 << 20
MAX_MLP_RATIO = 16
MAX_NUM_FRAMES = 1024
MAX_PROMPTS = 1024  # global or local prompt tokens per layer, text context tokens


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return _FIELD_TYPES[cls]


def _matches(value: Any, tp: Any) -> bool:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    if origin is not None and isinstance(origin, type):
        return isinstance(value, origin)
    return not isinstance(tp, type) or isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])} values"
        return f"a list of {len(args)} values"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file of option names to values; every problem is a ValueError naming the file (and line)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a YAML mapping of option names to values is expected")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def check_field_types(instance: Any, *, where: str = "") -> None:
    """Raises ValueError naming the first field of a dataclass instance whose value does not fit its annotation.

    Configs come from JSON, YAML and flags; a wrong type (``num_frames: "eight"``) must be one clear message, not a
    TypeError deep inside the model.
    """
    for name, tp in _field_types(type(instance)).items():
        value = getattr(instance, name)
        if not _matches(value, tp):
            raise ValueError(f"{where}{name} must be {_describe(tp)}, got {value!r}")


@dataclass(frozen=True)
class TextContextConfig:
    """CoOp-style learned text context (Vita-CLIP's text-side prompts).

    Attributes:
        num_tokens: learned context tokens per prompt.
        kind: one context shared by every label (``generic``) or one per training label (``class_specific``).
        position: where the label name sits relative to the context.
        init_words: words whose token embeddings initialise a generic context (empty: random init); their count
            must equal ``num_tokens``.
    """

    num_tokens: int = 8
    kind: ContextKind = "class_specific"
    position: ContextPosition = "end"
    init_words: str = ""

    def __post_init__(self) -> None:
        check_field_types(self, where="text_context.")
        if self.num_tokens < 1:
            raise ValueError(f"text_context.num_tokens must be >= 1, got {self.num_tokens}")
        if self.kind not in ("generic", "class_specific"):
            raise ValueError(f"text_context.kind must be 'generic' or 'class_specific', got {self.kind!r}")
        if self.position not in ("end", "middle", "front"):
            raise ValueError(f"text_context.position must be 'end', 'middle' or 'front', got {self.position!r}")
        if self.init_words and len(self.init_words.replace("_", " ").split()) != self.num_tokens:
            raise ValueError(
                f"text_context.init_words has {len(self.init_words.split())} words but num_tokens={self.num_tokens}"
            )


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class VitaClipConfig:
    """A Vita-CLIP model: an open_clip ViT backbone plus learned video and text prompts.

    Attributes:
        name: the registry name (part of every output row's model id).
        backbone: an open_clip model name (``ViT-B-16-quickgelu``), or None when ``backbone_config`` is given.
        backbone_config: an inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``,
            ``quick_gelu``), used for models open_clip does not register (tests, the demo model).
        num_frames: frames per video at training time (T); inference accepts any T >= 1.
        temporal_embedding: a learned per-frame embedding added after the positional embedding.
        num_global_prompts: video-level prompt tokens per layer (G), 0 for none.
        num_local_prompts: frame-conditioned prompt tokens per layer, 0 for none. The official recipe uses one per
            training frame; at another T they are resampled to T by nearest neighbour.
        summary_token: a per-layer summary token from attention across the frames' CLS tokens.
        text_context: learned text context, or None for CLIP's own text prompts.
        label_set: the packaged label list a class-specific context was trained on, when it is one of ours.
        tokenizer: the text tower's BPE merges file (open_clip's ``SimpleTokenizer`` format, gzip): a file name
            packaged in ``vitaclip/data`` or a path; None for CLIP's own 49,408-token vocabulary. Small models (the
            demo model) use a small vocabulary to keep their token embedding small.
        mean: per-channel normalisation mean of input frames (RGB in [0, 1]).
        std: per-channel normalisation std.
        seed: seed for the random initialisation of everything not loaded from a checkpoint.
    """

    name: str
    backbone: str | None = None
    backbone_config: Mapping[str, Any] | None = None
    num_frames: int = 8
    temporal_embedding: bool = True
    num_global_prompts: int = 8
    num_local_prompts: int = 8
    summary_token: bool = True
    text_context: TextContextConfig | None = field(default_factory=TextContextConfig)
    label_set: str | None = None
    tokenizer: str | None = None
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self, where=f"model config {self.name[:60]!r}: " if isinstance(self.name, str) else "")
        if not _MODEL_NAME.fullmatch(self.name) or self.name.endswith(".json"):
            # It starts every row's model id (NAME@sha256:...+config:...) and names the config to load back.
            shown = repr(self.name[:60]) + ("..." if len(self.name) > 60 else "")
            raise ValueError(
                f"model config name {shown}: letters, digits, '.', '_' and '-' only, at most 128 characters, starting "
                "with a letter or digit and not ending in .json (it is the start of every row's model id)"
            )
        if (self.backbone is None) == (self.backbone_config is None):
            raise ValueError(f"config {self.name!r}: give exactly one of backbone (a name) or backbone_config")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.num_global_prompts < 0 or self.num_local_prompts < 0:
            raise ValueError(
                f"prompt counts must be >= 0, got num_global_prompts={self.num_global_prompts}, "
                f"num_local_prompts={self.num_local_prompts}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            # frames are divided by std: a zero or NaN would make every embedding NaN, silently
            raise ValueError(f"mean must be 3 finite numbers and std 3 above 0, got {self.mean} and {self.std}")
        self._check_sizes()
        if self.backbone_config is not None:
            object.__setattr__(self, "backbone_config", json.loads(json.dumps(dict(self.backbone_config))))
            _check_towers_are_built_here(self.name, self.backbone_config)
            check_backbone_sizes(self.backbone_config, where=f"config {self.name!r}: backbone_config")
        elif not _BACKBONE_NAME.fullmatch(self.backbone or ""):
            # open_clip also takes "local-dir:PATH" (a folder anywhere) and "hf-hub:ORG/REPO" (the network)
            raise ValueError(
                f"config {self.name!r}: backbone must be a registered open_clip model name such as "
                f"'ViT-B-16-quickgelu' (letters, digits, '.', '_', '-'), got {str(self.backbone)[:80]!r}"
            )

    def _check_sizes(self) -> None:
        """Bounds the Vita-CLIP additions' sizes, as `check_backbone_sizes` bounds the backbone's."""
        tokens = self.text_context.num_tokens if self.text_context is not None else 0
        for name, value, high in (
            ("num_frames", self.num_frames, MAX_NUM_FRAMES),
            ("num_global_prompts", self.num_global_prompts, MAX_PROMPTS),
            ("num_local_prompts", self.num_local_prompts, MAX_PROMPTS),
            ("text_context.num_tokens", tokens, MAX_PROMPTS),
        ):
            if value > high:
                raise ValueError(f"model {self.name!r}: {name} must be at most {high}, got {value}")
        if not -(1 << 63) <= self.seed < 1 << 64:  # torch.manual_seed's range
            raise ValueError(f"model {self.name!r}: seed must fit in 64 bits, got {self.seed}")

    @property
    def image_size(self) -> int:
        """The backbone's input resolution, pixels per side (from its open_clip config)."""
        return int(backbone_model_config(self)["vision_cfg"]["image_size"])

    @property
    def embed_dim(self) -> int:
        """The size of the embeddings the model makes (from its open_clip config)."""
        return int(backbone_model_config(self)["embed_dim"])

    @property
    def has_prompts(self) -> bool:
        """Whether anything beyond plain CLIP frame averaging is configured."""
        return (
            self.temporal_embedding
            or self.num_global_prompts > 0
            or self.num_local_prompts > 0
            or self.summary_token
            or self.text_context is not None
        )

    def replace(self, **changes: Any) -> VitaClipConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VitaClipConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values and not isinstance(values[key], (list, tuple)):
                raise ValueError(f"{key} must be a list of 3 numbers, got {str(values[key])[:40]!r}")
        ctx = values.get("text_context")
        if isinstance(ctx, Mapping):
            ctx_known = {f.name for f in dataclasses.fields(TextContextConfig)}
            bad = sorted(set(ctx) - ctx_known)
            if bad:
                raise ValueError(f"unknown text_context keys {bad}; allowed: {sorted(ctx_known)}")
            values["text_context"] = TextContextConfig(**ctx)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> VitaClipConfig:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


def _size(tower: Mapping[str, Any], key: str, where: str, low: int, high: int, default: int | None) -> int:
    """``tower[key]`` (open_clip's ``default`` when absent; None: required), an integer from ``low`` to ``high``."""
    value = tower.get(key, default)
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        got = "nothing" if key not in tower else repr(value)[:40]
        raise ValueError(f"{where}.{key} must be an integer from {low} to {high}, got {got}")
    return value


def backbone_tower(cfg: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    """``cfg[key]`` (``vision_cfg`` or ``text_cfg``), which must be a mapping with a sane ``mlp_ratio``."""
    tower = cfg.get(key)
    if not isinstance(tower, Mapping):
        got = "null" if tower is None else type(tower).__name__
        raise ValueError(f"{where}.{key} must be a mapping of open_clip options, got {got}")
    ratio = tower.get("mlp_ratio", 4.0)
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= MAX_MLP_RATIO):
        raise ValueError(f"{where}.{key}.mlp_ratio must be a number above 0, at most {MAX_MLP_RATIO}")
    return tower


# Each tower's sizes in the order they are checked: (option, its largest value or the option it may not exceed,
# open_clip's default when absent).
_VISION_SIZES = (
    ("image_size", MAX_IMAGE_SIZE, 224),
    ("patch_size", "image_size", 16),
    ("layers", MAX_LAYERS, 12),
    ("width", MAX_WIDTH, 768),
    ("head_width", "width", 64),
)
_TEXT_SIZES = (
    ("context_length", MAX_CONTEXT_LENGTH, 77),
    ("vocab_size", MAX_VOCAB_SIZE, 49408),
    ("layers", MAX_LAYERS, 12),
    ("width", MAX_WIDTH, 512),
    ("heads", "width", 8),
)


def _tower_sizes(cfg: Mapping[str, Any], tower_key: str, where: str) -> dict[str, int]:
    """A tower's sizes, each checked by `_size` against its row of the tower's table."""
    tower = backbone_tower(cfg, tower_key, where)
    sizes: dict[str, int] = {}
    for key, high, default in _VISION_SIZES if tower_key == "vision_cfg" else _TEXT_SIZES:
        limit = sizes[high] if isinstance(high, str) else high
        sizes[key] = _size(tower, key, f"{where}.{tower_key}", 1, limit, default)
    return sizes


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The other options of open_clip's towers (CLIPVisionCfg, CLIPTextCfg) and the values they may take: open_clip hands
# them to its layers without checking, so a wrong type built a model that failed at its first forward pass (a
# string LayerNorm eps) or silently did something else (a truthy string). Options open_clip does not know are
# refused where open_clip is at hand (`vitaclip.model.check_backbone_config`); the ``timm_*`` and ``hf_*`` ones by
# `_check_towers_are_built_here`.
_TOWER_OPTIONS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{
        key: ("true or false", lambda v: isinstance(v, bool))
        for key in (
            "attentional_pool",
            "no_ln_pre",
            "final_ln_after_pool",
            "qk_norm",
            "scaled_cosine_attn",
            "scale_heads",
            "scale_attn_inner",
            "scale_attn",
            "scale_fc",
            "embed_cls",
            "no_causal_mask",
            "proj_bias",
        )
    },  # fmt: skip
    **{
        key: (
            "a whole number from 0 to 2**31",
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31,
        )
        for key in ("attn_pooler_queries", "attn_pooler_heads", "pad_id", "eos_id")
    },
    **{key: ("text", lambda v: isinstance(v, str)) for key in ("pos_embed_type", "pool_type", "proj_type")},
    **{key: ("text or null", lambda v: v is None or isinstance(v, str)) for key in ("block_type", "tokenizer_mode")},
    "ls_init_value": ("a number or null", lambda v: v is None or _is_number(v)),
    "patch_dropout": ("a number from 0 to below 1", lambda v: _is_number(v) and 0 <= v < 1),
    "output_tokens": ("false (Vita-CLIP takes the pooled features)", lambda v: v is False),
    "act_kwargs": ("null or {} (the activation takes no options)", lambda v: v is None or v == {}),
    "tokenizer_kwargs": ("null or {} (vitaclip's tokenizer takes no options)", lambda v: v is None or v == {}),
    "norm_kwargs": (
        'null or {"eps": a number above 0, below 1}',
        lambda v: (
            v is None
            or (isinstance(v, Mapping) and set(v) <= {"eps"} and all(_is_number(e) and 0 < e < 1 for e in v.values()))
        ),
    ),
}


def _check_tower_options(tower: Mapping[str, Any], where: str) -> None:
    for key, value in tower.items():
        if key in _TOWER_OPTIONS and not _TOWER_OPTIONS[key][1](value):
            raise ValueError(
                f"{where}.{key} must be {_TOWER_OPTIONS[key][0]}, got {json.dumps(value, default=str)[:40]}"
            )


def check_backbone_sizes(cfg: Mapping[str, Any], *, where: str = "backbone_config") -> None:
    """Checks an open_clip ViT config's shape without open_clip: known top-level options, each size an integer within
    the ``MAX_*`` bounds, widths that split into whole heads, the types of the towers' other options. A checkpoint's
    config is data; a wrong one must be one clear ValueError when it is read, not a KeyError in the planner, an
    allocation of terabytes in open_clip or a model that fails (or computes something else) once it runs."""
    unknown = set(cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "custom_text"}
    if unknown or cfg.get("custom_text"):
        raise ValueError(f"{where}: unsupported open_clip options {sorted(str(k)[:40] for k in unknown)[:6]}")
    if not isinstance(cfg.get("quick_gelu", False), bool):  # bool("false") is True: the other activation
        raise ValueError(
            f"{where}.quick_gelu must be true or false, got {json.dumps(cfg['quick_gelu'], default=str)[:40]}"
        )
    if not _is_number(cfg.get("init_logit_scale", 1.0)):
        raise ValueError(f"{where}.init_logit_scale must be a number")
    _size(cfg, "embed_dim", where, 1, MAX_WIDTH, None)
    for tower_key in ("vision_cfg", "text_cfg"):
        _check_tower_options(backbone_tower(cfg, tower_key, where), f"{where}.{tower_key}")
    vision = _tower_sizes(cfg, "vision_cfg", where)
    if vision["width"] % vision["head_width"]:
        raise ValueError(
            f"{where}.vision_cfg.width {vision['width']} is not a multiple of head_width {vision['head_width']}"
        )
    text = _tower_sizes(cfg, "text_cfg", where)
    if text["width"] % text["heads"]:
        raise ValueError(f"{where}.text_cfg.width {text['width']} is not a multiple of {text['heads']} heads")


_BACKBONE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""An open_clip model name: no scheme (``local-dir:``, ``hf-hub:``), no path."""


def _check_towers_are_built_here(name: object, backbone_config: Mapping[str, Any]) -> None:
    """Refuses an inline backbone config whose towers open_clip would load from elsewhere: ``timm_*`` (a timm model,
    which reads ``local-dir:`` folders and fetches ``hf-hub:`` names) and ``hf_*`` (a Hugging Face model) options.
    Such a config comes with a checkpoint, which is data: it must not make the loader read other files or the
    network. Vita-CLIP drives open_clip's own ViT and text transformer, which need neither."""
    for tower in ("vision_cfg", "text_cfg"):
        cfg = backbone_config.get(tower)
        if not isinstance(cfg, Mapping):
            continue
        loaded = sorted(k for k, v in cfg.items() if k.startswith(("timm_", "hf_")) and v not in (None, False, ""))
        if loaded:
            raise ValueError(
                f"config {name!r}: backbone_config.{tower} sets {loaded}: towers loaded through timm or Hugging Face "
                "are not supported (Vita-CLIP uses open_clip's ViT and text transformer)"
            )


def backbone_model_config(config: VitaClipConfig) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``) of a config.

    A named backbone's config is open_clip's own JSON file, read without importing open_clip (a job's driver plans
    with the config and never builds the model).
    """
    if config.backbone_config is not None:
        return dict(config.backbone_config)
    assert config.backbone is not None and _BACKBONE_NAME.fullmatch(config.backbone)
    text = _open_clip_config_text(config.backbone)
    if text is not None:
        cfg = json.loads(text)
    else:
        import open_clip  # a layout without the JSON files: ask open_clip itself

        cfg = open_clip.get_model_config(config.backbone)
        if cfg is None:
            raise ValueError(f"open_clip has no model config named {config.backbone!r}")
    _check_towers_are_built_here(config.name, cfg)  # a registered timm or Hugging Face model is not built either
    return dict(cfg)


@functools.lru_cache(maxsize=64)
def _open_clip_config_text(name: str) -> str | None:
    """open_clip's ``model_configs/NAME.json`` found through its package spec (which does not import it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations or Path(name).name != name:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "model_configs" / f"{name}.json"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


def format_model_id(name: str, sha256: str) -> str:
    """The ``model_id`` of a model's weights: ``NAME@sha256:HEX`` (the config name and the weights' source hash)."""
    return f"{name}@sha256:{sha256}"


def model_name_of(model_id: str) -> str:
    """The config name in a ``model_id`` (see `format_model_id`)."""
    return model_id.split("@", 1)[0]

"""Model configurations: frozen dataclasses built from and written back to HF ``config.json``.

Each family has one dataclass with exactly the fields its forward pass uses. ``from_hf`` reads an
HF config dict (both the transformers 4.x ``rope_theta``/``rope_scaling`` form and the 5.x
``rope_parameters`` form), ``to_hf`` writes one back: the original dict is kept (outside equality
and hashing) and the fields the model uses are written over it, so a round trip is lossless.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from typing import Any

from jaxarith.errors import ConfigError, UnsupportedArchitectureError


class Arch(enum.StrEnum):
    LLAMA = "llama"
    GPT2 = "gpt2"


# model_type values served by each family (Mistral's dense configs are Llama-shaped; sliding
# windows are not implemented and are refused below).
_MODEL_TYPES = {"llama": Arch.LLAMA, "mistral": Arch.LLAMA, "gpt2": Arch.GPT2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling, as HF's ``rope_scaling`` / ``rope_parameters``."""

    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported "
                "(supported: default, linear, llama3)"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Llama 1/2/3.x (and Mistral-style dense) decoder configuration."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    hf_extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    arch = Arch.LLAMA

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        d = dict(d)
        heads = _req(d, "num_attention_heads")
        hidden = _req(d, "hidden_size")
        if d.get("sliding_window") not in (None, 0) and d.get("model_type") == "mistral":
            # Sliding-window attention only changes results past the window; refuse rather
            # than silently differ from transformers.
            if d["sliding_window"] < d.get("max_position_embeddings", 0):
                raise ConfigError(
                    f"sliding_window={d['sliding_window']} is not supported (set it to null)"
                )
        theta, scaling = _read_rope(d)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported for llama (expected 'silu')")
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=_req(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_req(d, "intermediate_size"),
            num_hidden_layers=_req(d, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
            model_type=d.get("model_type", "llama"),
            hf_extra=d,
        )

    def to_hf(self) -> dict[str, Any]:
        d = dict(self.hf_extra)
        for key in ("rope_parameters", "rope_scaling", "rope_theta"):
            d.pop(key, None)
        d.update(
            model_type=self.model_type,
            architectures=d.get("architectures")
            or ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act="silu",
            rope_theta=self.rope_theta,
            rope_scaling=None
            if self.rope_scaling.rope_type == "default"
            else _rope_to_dict(self.rope_scaling),
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        return d

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """GPT-2 decoder configuration (HF names: n_embd, n_layer, n_head, n_positions)."""

    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "gpt2"
    hf_extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    arch = Arch.GPT2

    def __post_init__(self):
        _positive(self, "vocab_size", "n_embd", "n_layer", "n_head")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if not self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=False is not supported for gpt2")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> GPT2Config:
        d = dict(d)
        act = d.get("activation_function", "gelu_new")
        if act != "gelu_new":
            raise ConfigError(f"activation_function={act!r} is not supported (expected gelu_new)")
        return cls(
            vocab_size=_req(d, "vocab_size"),
            n_embd=_req(d, "n_embd"),
            n_layer=_req(d, "n_layer"),
            n_head=_req(d, "n_head"),
            n_positions=d.get("n_positions", 1024),
            n_inner=d.get("n_inner"),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            scale_attn_weights=bool(d.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
            reorder_and_upcast_attn=bool(d.get("reorder_and_upcast_attn", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            hf_extra=d,
        )

    def to_hf(self) -> dict[str, Any]:
        d = dict(self.hf_extra)
        d.update(
            model_type="gpt2",
            architectures=d.get("architectures") or ["GPT2LMHeadModel"],
            vocab_size=self.vocab_size,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_positions=self.n_positions,
            n_inner=self.n_inner,
            layer_norm_epsilon=self.layer_norm_epsilon,
            activation_function="gelu_new",
            scale_attn_weights=self.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
            reorder_and_upcast_attn=self.reorder_and_upcast_attn,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        return d

    # Family-independent names used by the shared code.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def context_length(self) -> int:
        return self.n_positions


ModelConfig = LlamaConfig | GPT2Config


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Build the family config for an HF ``config.json`` dict.

    Raises:
        UnsupportedArchitectureError: ``model_type`` is missing or not implemented.
    """
    model_type = d.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} is not supported; jaxarith implements "
            f"{sorted(_MODEL_TYPES)}"
        )
    family = _MODEL_TYPES[model_type]
    return LlamaConfig.from_hf(d) if family is Arch.LLAMA else GPT2Config.from_hf(d)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read ``config.json`` (a file or the directory holding it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return config_from_hf(d)


def save_config(config: ModelConfig, directory: str | os.PathLike) -> None:
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_hf(), f, indent=2, sort_keys=True)


def rope_inv_freq(config: LlamaConfig):
    """Inverse RoPE frequencies [head_dim // 2], float32, exactly as transformers computes them."""
    import numpy as np

    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    s = config.rope_scaling
    if s.rope_type == "linear":
        inv_freq = inv_freq / np.float32(s.factor)
    elif s.rope_type == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def _read_rope(d: dict[str, Any]) -> tuple[float, RopeScaling]:
    params = d.get("rope_parameters") or {}
    legacy = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    src = legacy or params
    rope_type = src.get("rope_type", src.get("type", "default"))
    if rope_type == "default" or not src:
        return float(theta), RopeScaling()
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    kwargs = {k: v for k, v in src.items() if k in fields}
    kwargs["rope_type"] = rope_type
    return float(theta), RopeScaling(**kwargs)


def _rope_to_dict(s: RopeScaling) -> dict[str, Any]:
    if s.rope_type == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    return dataclasses.asdict(s)


def _req(d: dict[str, Any], key: str) -> Any:
    if key not in d:
        raise ConfigError(f"config.json has no {key!r}")
    return d[key]


def _positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}={value!r} must be a positive integer")

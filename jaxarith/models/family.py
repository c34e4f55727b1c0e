"""The model-family interface: what one architecture (Llama, GPT-2, ...) gives the shared code.

A family is one module (``llama.py``, ``gpt2.py``) that defines a frozen config class and a
:class:`Family` object, listed once in :mod:`jaxarith.models.registry`. The shared code (the
decoder driver in ``transformer.py``, the HF converters, the sharding and init rules) only ever
calls through the :class:`Family`, so adding an architecture never edits an ``if`` elsewhere.

What a family provides:

- ``config_class``: a frozen, keyword-only dataclass with ``from_hf(dict)`` / ``to_hf()``, the
  family-independent names of :class:`ModelConfig` (``hidden_size``, ``head_dim``, ...) and the
  class attributes ``arch``, ``HF_KEYS_READ`` and ``HF_KEYS_IGNORED`` (unknown keys are errors).
- ``param_specs(cfg)``: the canonical parameter tree of :class:`ParamSpec` (shape, logical axes,
  initialiser); the one init rule (``transformer.init_params``) and the shardings follow it.
- ``embed`` / ``block`` / ``unembed``: the forward pass, as pure functions of the parameter tree
  (``head``, optional: ``unembed`` split into the head's input and weight, for the fused loss).
  The driver scans ``block`` over the stacked layers and hands it a :class:`BlockContext` with the
  attention to call (causal, padded, with or without a KV cache: the driver's choice).
- ``hf_rules(cfg)``: the conversion table, one :class:`Rule` per HF tensor (a name map plus value
  hooks), with ``hf_buffers`` (HF tensors that hold no parameter) and ``normalize_hf_key``.
- optional: ``attention_windows`` (each layer's sliding window, applied by the driver),
  ``logit_softcap`` (Gemma 2's final soft-cap, for the fused loss), ``with_depth`` /
  ``depth_sensitive`` (layer inheritance), ``routed``, ``checkpoint_layout``, ``upcycles_to``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import numpy as np

from jaxarith.errors import ConfigError


class Arch(enum.StrEnum):
    """Registered model families (one member per module listed in ``registry.py``)."""

    LLAMA = "llama"
    GPT2 = "gpt2"
    MIXTRAL = "mixtral"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    QWEN3_MOE = "qwen3_moe"
    GEMMA2 = "gemma2"
    GEMMA3 = "gemma3_text"


class DType(enum.StrEnum):
    """Compute dtypes of the forward pass (parameters are cast per block)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


def parse_enum(kind: type[enum.Enum], value: Any, what: str) -> Any:
    """``kind(value)``, or a :class:`ConfigError` naming ``what`` and the valid values."""
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(str(m.value) for m in kind)
        raise ConfigError(f"{what}={value!r} is not supported (expected one of: {valid})") from None


class ModelConfig(Protocol):
    """What the shared code reads from any family's config (HF names where HF has one)."""

    arch: ClassVar[Arch]
    model_type: str
    vocab_size: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    pad_token_id: int | None

    @property
    def hidden_size(self) -> int: ...
    @property
    def num_hidden_layers(self) -> int: ...
    @property
    def num_attention_heads(self) -> int: ...
    @property
    def num_key_value_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    def to_hf(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, logical axes and initialiser of one canonical parameter."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # normal | zeros | ones
    std: float = 0.02


class Inputs(NamedTuple):
    """What ``Family.embed`` reads: token ids [B, T], their positions [B, T], and the compute
    dtype (the driver casts ``embed``'s output to it; Gemma scales its embeddings in it, as
    transformers does)."""

    tokens: jax.Array
    positions: jax.Array
    dtype: Any = None


class BlockContext(NamedTuple):
    """What the driver gives ``Family.block`` besides the layer's parameters and activations.

    Attributes:
      positions: [B, T] int32 positions of the tokens (RoPE).
      layer: int32 scalar, the index of this block in the stack.
      attention: ``attention(q [B,T,N,H], k [B,T,K,H], v [B,T,K,H], *, scale,
        softcap=None) -> [B,T,N,H]``: causal, key-padding masked, with the KV cache when there
        is one, within this layer's sliding window (``Family.attention_windows``) if it has one;
        ``softcap``: scaled scores soft-capped, ``softcap * tanh(s / softcap)`` (Gemma 2).
    """

    positions: jax.Array
    layer: jax.Array
    attention: Callable[..., jax.Array]


Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor (``{i}`` = layer index) <-> one or more canonical leaves.

    ``to_canon`` maps the HF array to the canonical per-layer arrays (a tuple, one per target);
    ``to_hf`` is its inverse. Hooks only transpose, reshape, split and concatenate, so a round trip
    is bit-exact.

    ``experts > 0``: one HF tensor per layer *and expert* (``{j}`` = expert index, e.g. Mixtral's
    ``...experts.{j}.w1.weight``); the canonical leaves are ``[L, E, ...]`` and the hooks map one
    expert's slice. Such a rule's index (see :func:`jaxarith.io.convert.keymap.expand`) is the
    tuple ``(layer, expert)``, so ``leaf[index]`` is the slice either way.
    """

    hf_key: str
    targets: tuple[Path, ...]
    hf_shape: tuple[int, ...]
    to_canon: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    experts: int = 0

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_key

    def key(self, index: int | tuple[int, int] | None) -> str:
        """The HF tensor name at ``index`` (None, a layer, or ``(layer, expert)``)."""
        if index is None:
            return self.hf_key
        if isinstance(index, tuple):
            return self.hf_key.format(i=index[0], j=index[1])
        return self.hf_key.format(i=index)


def copy_rule(hf_key: str, target: Path, hf_shape: tuple[int, ...]) -> Rule:
    """A tensor stored identically on both sides."""
    return Rule(hf_key, (target,), hf_shape, lambda x: (x,), lambda x: x)


def transpose_rule(hf_key: str, target: Path, hf_shape: tuple[int, ...]) -> Rule:
    """A matrix stored transposed by HF (``nn.Linear`` keeps ``[out, in]``)."""
    return Rule(hf_key, (target,), hf_shape, lambda x: (x.T,), lambda x: x.T)


def _same_key(key: str) -> str:
    return key


def with_num_hidden_layers(cfg, n: int):
    """``cfg`` with ``n`` layers (``num_hidden_layers``; HF extras follow)."""
    extra = dict(cfg.hf_extra)
    extra["num_hidden_layers"] = n
    for key in ("layer_types", "mlp_only_layers"):  # per-layer lists would now be wrong
        extra.pop(key, None)
    return dataclasses.replace(cfg, num_hidden_layers=n, hf_extra=extra)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """One architecture, as the shared code sees it (see the module docstring)."""

    arch: Arch | str
    config_class: type
    model_types: tuple[str, ...]
    param_specs: Callable[[Any], dict]
    embed: Callable[[Any, dict, Inputs], jax.Array]
    block: Callable[[Any, dict, jax.Array, BlockContext], jax.Array]
    unembed: Callable[[Any, dict, jax.Array], jax.Array]
    hf_rules: Callable[[Any], list[Rule]]
    # Optional: ``(cfg, params, x) -> (h, w, vocab_major)``, the output head as its input (after
    # the final norm) and weight (``[D, V]``, or ``[V, D]`` when ``vocab_major``), such that
    # ``unembed == dense(h, w)``; lets the training loss fuse the head with the cross-entropy
    # (jaxarith.models.fused_ce). None: the loss goes through ``unembed``'s logits.
    head: Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, bool]] | None = None
    hf_buffers: tuple[str, ...] = ()
    normalize_hf_key: Callable[[str], str] = _same_key
    # Whether the blocks return per-layer router logits as ``forward``'s aux (a mixture of
    # experts, e.g. Mixtral); the training program then adds the router losses (train/losses.py).
    routed: bool = False
    # Optional: ``(cfg, directory) -> cfg`` adjusted to the tensor layout a checkpoint directory
    # stores when a family has two (Mixtral: per-expert or fused experts); called by load_config.
    checkpoint_layout: Callable[[Any, str], Any] | None = None
    # ``cfg -> (window or None per layer) or None``: each layer's sliding window, a query
    # attending only the keys less than ``window`` positions back (itself and window - 1
    # before, as transformers' sliding_window_overlay); None: global. The driver applies it in
    # every path (XLA, kernels, the KV cache); the table is static: kernels get static masks.
    attention_windows: Callable[[Any], tuple[int | None, ...] | None] = lambda cfg: None
    # ``cfg -> cap or None``: the logits ``unembed`` returns are ``cap * tanh(z / cap)`` of the
    # head's ``z`` (Gemma 2's final_logit_softcapping); the fused loss applies the same cap.
    logit_softcap: Callable[[Any], float | None] = lambda cfg: None
    # ``(cfg, n) -> cfg`` with n layers (layer inheritance); the default sets
    # ``num_hidden_layers`` and drops per-layer HF lists that would no longer fit.
    with_depth: Callable[[Any, int], Any] = with_num_hidden_layers
    # ``cfg -> reason | None``: why a block computes differently at another depth (GPT-2's
    # ``scale_attn_by_inverse_layer_idx``), so that inheritance warns when layers move.
    depth_sensitive: Callable[[Any], str | None] = lambda cfg: None
    # The ``model_type`` of the mixture-of-experts family this one upcycles to (sparse
    # upcycling: that family's ``config_class.from_dense`` builds the config). None: cannot.
    upcycles_to: str | None = None


# ----------------------------------------------------------------------------- HF config keys

# Keys every transformers ``PretrainedConfig`` may write that carry nothing a forward pass uses
# (bookkeeping, generation and fine-tuning defaults, dropout, init ranges).
HF_COMMON_IGNORED = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "architectures", "dtype",
    "torch_dtype", "transformers_version", "use_cache", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "id2label", "label2id", "num_labels",
    "problem_type", "finetuning_task", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "initializer_range", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})


def check_hf_keys(cls, d: dict[str, Any], where: str = "config") -> None:
    """Raise :class:`ConfigError` for a key ``cls`` neither reads nor knowingly ignores.

    Valid keys are ``cls.HF_KEYS_READ`` (what the forward pass uses), ``cls.HF_KEYS_IGNORED``
    (family-specific HF keys that change nothing here, e.g. dropout) and the transformers
    bookkeeping keys of :data:`HF_COMMON_IGNORED`. The message names the key, the closest valid
    one and the keys the family reads.
    """
    valid = set(cls.HF_KEYS_READ) | set(cls.HF_KEYS_IGNORED) | HF_COMMON_IGNORED
    unknown = sorted(k for k in d if k not in valid)
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, sorted(valid), n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(
        f"{where}: unknown {cls.arch} config key{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(hints)}; valid keys: {', '.join(sorted(cls.HF_KEYS_READ))} (and the HF "
        f"keys ignored here: {', '.join(sorted(valid - set(cls.HF_KEYS_READ)))})")


def require(d: dict[str, Any], key: str) -> Any:
    """``d[key]`` or a :class:`ConfigError` naming the missing key."""
    if key not in d:
        raise ConfigError(f"config.json has no {key!r}")
    return d[key]


def check_positive(cfg, names: Iterable[str]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}={value!r} must be a positive integer")

"""Qwen2 / Qwen2.5 family (HF ``model_type: qwen2``): a Llama with biases on q, k and v.

The tree is Llama's (see ``llama.py``) with ``q_bias`` [L, N, H], ``k_bias`` and ``v_bias``
[L, K, H] and no ``o_bias`` (HF's ``Qwen2Attention``: ``bias=True`` on q/k/v_proj, none on
o_proj); no MLP biases. The forward pass, parameter table and conversion rules are Llama's.

Sliding-window attention: released Qwen2 / Qwen2.5 checkpoints set ``use_sliding_window:
false`` (their ``sliding_window`` and ``max_window_layers`` then change nothing), which is what
is implemented here; ``use_sliding_window: true`` (or a ``layer_types`` entry
``sliding_attention``) is refused with a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jaxarith.errors import ConfigError
from jaxarith.models import llama
from jaxarith.models.family import Arch, Family

# HF keys of a Qwen2 / Qwen3 config about sliding windows (see check_no_sliding_window).
SLIDING_WINDOW_KEYS = frozenset({"use_sliding_window", "sliding_window", "max_window_layers",
                                 "layer_types"})


def check_no_sliding_window(d: dict[str, Any], model_type: str) -> None:
    """Refuse a Qwen config whose attention uses sliding windows (not implemented here).

    With ``use_sliding_window`` false, transformers attends over the full context whatever
    ``sliding_window`` and ``max_window_layers`` say, so those are accepted.

    Raises:
      ConfigError: ``use_sliding_window`` is true, ``layer_types`` names a layer type other
        than ``full_attention``, or ``use_mrope`` (Qwen2-VL's RoPE) is true.
    """
    if d.get("use_sliding_window"):
        raise ConfigError(
            f"{model_type}: use_sliding_window={d['use_sliding_window']!r} is not supported "
            f"(sliding-window attention, sliding_window={d.get('sliding_window')!r}); released "
            f"checkpoints set it to false")
    if d.get("use_mrope"):
        raise ConfigError(f"{model_type}: use_mrope={d['use_mrope']!r} is not supported "
                          f"(multimodal RoPE of the vision-language models)")
    types = d.get("layer_types") or []
    other = sorted({t for t in types if t != "full_attention"})
    if other:
        raise ConfigError(f"{model_type}: layer_types has {other}; only 'full_attention' "
                          f"layers are supported (no sliding-window attention)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2Config(llama.LlamaConfig):
    """Qwen2 / Qwen2.5 decoder configuration (HF names): Llama's fields, q/k/v biases always.

    ``attention_bias`` and ``mlp_bias`` are not Qwen2 keys and stay False; the biases are
    :attr:`biased_projections`.
    """

    rms_norm_eps: float = 1e-6
    model_type: str = "qwen2"

    arch: ClassVar[Arch] = Arch.QWEN2
    HF_KEYS_READ: ClassVar[frozenset[str]] = (
        llama.LlamaConfig.HF_KEYS_READ - {"attention_bias", "mlp_bias"}) | SLIDING_WINDOW_KEYS \
        | {"use_mrope"}
    HF_KEYS_IGNORED: ClassVar[frozenset[str]] = frozenset({"attention_dropout"})

    def __post_init__(self):
        super().__post_init__()
        if self.attention_bias or self.mlp_bias:
            raise ConfigError("qwen2 has biases on q, k and v only (attention_bias and mlp_bias "
                              "must be false)")

    @property
    def biased_projections(self) -> tuple[str, ...]:
        return ("q", "k", "v")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Qwen2Config:
        cls.check_keys(d)
        check_no_sliding_window(d, "qwen2")
        return super().from_hf(d)  # Llama's reader; sliding_window is only read for Mistral

    def to_hf(self) -> dict[str, Any]:
        d = super().to_hf()
        for key in ("attention_bias", "mlp_bias"):
            d.pop(key, None)
        d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
        return d


FAMILY = Family(
    arch=Arch.QWEN2,
    config_class=Qwen2Config,
    model_types=("qwen2",),
    param_specs=llama.param_specs,
    embed=llama.embed,
    block=llama.block,
    unembed=llama.unembed,
    head=llama.head,
    hf_rules=llama.hf_rules,
    hf_buffers=("rotary_emb.inv_freq",),
)

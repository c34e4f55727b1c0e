"""HF tensor names <-> canonical paths: each family's table (a name map plus value hooks).

Each :class:`Rule` ties one HF tensor (``{i}`` = layer index) to one or more canonical leaves and
gives the two value hooks: ``to_canon`` (HF array -> canonical per-layer arrays) and ``to_hf`` (the
inverse). Hooks only transpose, reshape, split and concatenate, so a round trip is bit-exact. The
tables live with their family (``Family.hf_rules``); this module is what the converters call.
"""

from __future__ import annotations

from jaxarith.models.family import ModelConfig, Path, Rule, copy_rule, transpose_rule
from jaxarith.models.registry import family

__all__ = ["Path", "Rule", "copy_rule", "transpose_rule", "rules_for", "ignorable",
           "normalize_key", "expand"]



def rules_for(cfg: ModelConfig) -> list[Rule]:
    """The family's conversion table for ``cfg`` (see ``Family.hf_rules``)."""
    return family(cfg).hf_rules(cfg)


def ignorable(cfg: ModelConfig, key: str) -> bool:
    """HF tensors that carry no parameters of ours (buffers, a saved copy of a tied head)."""
    if key.endswith(family(cfg).hf_buffers):
        return True
    return key == "lm_head.weight" and cfg.tie_word_embeddings


def normalize_key(cfg: ModelConfig, key: str) -> str:
    """The HF tensor name as the family's rules spell it (e.g. GPT-2's ``transformer.`` prefix,
    which original checkpoints omit)."""
    return family(cfg).normalize_hf_key(key)


def expand(rule: Rule, num_layers: int) -> list[tuple[str, int | tuple[int, int] | None]]:
    """(hf key, index) for every HF tensor a rule covers: the index is None (a whole leaf), the
    layer, or ``(layer, expert)`` for per-expert rules; ``leaf[index]`` is that tensor's slice."""
    if not rule.per_layer:
        return [(rule.hf_key, None)]
    if rule.experts:
        return [(rule.key((i, j)), (i, j)) for i in range(num_layers)
                for j in range(rule.experts)]
    return [(rule.hf_key.format(i=i), i) for i in range(num_layers)]

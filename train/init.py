"""The ``init:`` train-config section: start training from another model's transformed weights.

::

    init:
      ref: runs/reference/hf      # any model reference (hub id, HF dir, Orbax dir)
      method: inherit             # how REF's weights become the start weights
      layers: first:6             # inherit: layer spec (empty: all of REF's layers)
      parts: [attn, mlp, norms]   # inherit: block parts taken from REF (the rest fresh)
      embeddings: inherit         # inherit | fresh
      head: ""                    # inherit | fresh (empty: inherit; tied models follow embeddings)
      final_norm: inherit
      pos_embed: ""               # GPT-2 wpe: inherit | fresh (empty: inherit)
      allow_repeat: false

With ``init.ref`` set, ``model.ref`` and ``model.arch`` stay empty: the architecture and config come
from REF with the new depth, the tokenizer (unless ``model.tokenizer``) from REF's directory, and
fresh tensors from ``init_params`` seeded by the run's ``seed``. One section serves every way of
starting from other weights: a new ``method`` (e.g. MoE upcycling) adds its options here and a
branch in :func:`start_config` / :func:`start_params`; the loop reaches those two through the
training extension in ``train/plugins/init.py`` (its ``model`` and ``init_params``).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from jaxarith.errors import ConfigError
from jaxarith.models.config import ModelConfig, load_config

METHODS = ("inherit",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitConfig:
    """Start weights taken from ``ref`` and transformed by ``method`` (see the module doc)."""

    ref: str = ""
    method: str = "inherit"
    layers: str = ""
    parts: tuple | list | str = ("attn", "mlp", "norms")
    embeddings: str = "inherit"
    head: str = ""
    final_norm: str = "inherit"
    pos_embed: str = ""
    allow_repeat: bool = False

    def __post_init__(self):
        from jaxarith import inherit as inherit_lib

        if self.method not in METHODS:
            raise ConfigError(f"init.method={self.method!r}: expected one of {', '.join(METHODS)}")
        try:
            parts = inherit_lib.parse_parts(self.parts)
        except ConfigError as e:
            raise ConfigError(f"init.parts: {e}") from None
        object.__setattr__(self, "parts", tuple(parts))
        for name in ("embeddings", "final_norm", "head", "pos_embed"):
            value = getattr(self, name)
            if value and value not in ("inherit", "fresh"):
                raise ConfigError(f"init.{name}={value!r}: expected inherit or fresh")
        if self.layers:
            form = self.layers.partition(":")[0].strip()
            if form not in inherit_lib.SPEC_FORMS:
                raise ConfigError(f"init.layers={self.layers!r}: unknown layer spec form "
                                  f"(expected first:N, last:N, spread:N or list:i,j,...)")

    @property
    def enabled(self) -> bool:
        return bool(self.ref)


def _ref_dir(ref: str) -> str:
    from jaxarith.refs import RefKind, ref_kind

    if ref_kind(ref) is RefKind.ORBAX:
        return os.fspath(ref)
    from jaxarith.convert.hf import resolve_hf_dir

    return resolve_hf_dir(ref)


def plan(init: InitConfig, src_cfg: ModelConfig):
    """The :class:`jaxarith.inherit.Plan` of ``init`` over a source of config ``src_cfg``."""
    from jaxarith import inherit as inherit_lib

    layers = init.layers or f"first:{src_cfg.num_hidden_layers}"
    try:
        return inherit_lib.plan(src_cfg, layers, parts=init.parts, embeddings=init.embeddings,
                                head=init.head or None, final_norm=init.final_norm,
                                pos_embed=init.pos_embed or None,
                                allow_repeat=init.allow_repeat)
    except ConfigError as e:
        raise type(e)(f"init: {e}") from None


def start_config(init: InitConfig) -> tuple[ModelConfig, str]:
    """The student's model config (REF's with the new depth) and REF's directory.

    Validates the whole section against REF's config (layer indices, parts, tied head) before
    any weight is read.
    """
    directory = _ref_dir(init.ref)
    return plan(init, load_config(directory)).config, directory


def start_params(init: InitConfig, mesh, seed: int, *, progress: bool = False) -> dict:
    """The student's start weights on ``mesh``: REF loaded there, transformed under jit."""
    from jaxarith import inherit as inherit_lib
    from jaxarith.refs import load_model

    src = load_model(init.ref, mesh=mesh, dtype=jnp.float32, progress=progress)
    p = plan(init, src.config)
    return inherit_lib.apply_plan(src.params, p, jax.random.PRNGKey(seed), mesh)

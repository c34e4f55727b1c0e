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

Sparse upcycling (a dense Llama/Mistral REF becomes a Mixtral whose experts copy its MLPs, see
:mod:`jaxarith.arith.upcycle`; ``method`` may be left out, the section implies it)::

    init:
      ref: runs/dense/hf
      upcycle: {experts: 8, top_k: 2, noise: 0.0, router: random}

With ``init.ref`` set, ``model.ref`` and ``model.arch`` stay empty: the architecture and config come
from REF with the new depth, the tokenizer (unless ``model.tokenizer``) from REF's directory, and
fresh tensors from ``init_params`` seeded by the run's ``seed``. One section serves every way of
starting from other weights: a new ``method`` (e.g. MoE upcycling) adds its options here and a
branch in :func:`start_config` / :func:`start_params`; the loop reaches those two through the
training extension in ``train/plugins/init.py`` (its ``model`` and ``init_params``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxarith.arith import inherit as inherit_lib
from jaxarith.arith.upcycle import upcycle_config, upcycle_params
from jaxarith.errors import ConfigError
from jaxarith.io import refs
from jaxarith.io.refs import load_model
from jaxarith.models.config import ModelConfig, load_config

METHODS = ("inherit", "upcycle")


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpcycleSection:
    """``init.upcycle``: experts per layer, experts per token, noise std, router init."""

    experts: int = 0
    top_k: int = 2
    noise: float = 0.0
    router: str = "random"

    def __post_init__(self):
        if self.experts < 0 or self.noise < 0:
            raise ConfigError(f"init.upcycle: experts={self.experts} and noise={self.noise} "
                              "must be >= 0")
        if self.experts and not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"init.upcycle.top_k={self.top_k} must be between 1 and "
                              f"experts={self.experts}")
        if self.router not in ("random", "zeros"):
            raise ConfigError(f"init.upcycle.router={self.router!r}: expected random or zeros")

    @property
    def enabled(self) -> bool:
        return self.experts > 0


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
    upcycle: UpcycleSection = UpcycleSection()

    def __post_init__(self):
        if self.upcycle.enabled and self.method == "inherit":  # the section implies the method
            object.__setattr__(self, "method", "upcycle")
        if self.method == "upcycle":
            if not self.upcycle.enabled:
                raise ConfigError("init.method=upcycle needs init.upcycle.experts")
            if self.layers:
                raise ConfigError("init.layers does not apply to init.upcycle (all of REF's "
                                  "layers are upcycled)")

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


def plan(init: InitConfig, src_cfg: ModelConfig):
    """The :class:`jaxarith.arith.inherit.Plan` of ``init`` over a source of config ``src_cfg``."""
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
    directory = refs.resolve(init.ref).dir
    if init.method == "upcycle":
        u = init.upcycle
        return upcycle_config(load_config(directory), u.experts, u.top_k), directory
    return plan(init, load_config(directory)).config, directory


def start_params(init: InitConfig, mesh, seed: int, *, progress: bool = False) -> dict:
    """The student's start weights on ``mesh``: REF loaded there, transformed under jit."""
    src = load_model(init.ref, mesh=mesh, dtype=jnp.float32, progress=progress)
    if init.method == "upcycle":
        u = init.upcycle
        cfg = upcycle_config(src.config, u.experts, u.top_k)
        return upcycle_params(src.params, cfg, jax.random.PRNGKey(seed), noise=u.noise,
                              router=u.router, mesh=mesh)
    p = plan(init, src.config)
    return inherit_lib.apply_plan(src.params, p, jax.random.PRNGKey(seed), mesh)

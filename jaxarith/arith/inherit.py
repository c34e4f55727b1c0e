"""Layer inheritance (Inheritune, mergekit-style layer slicing): a model from another's blocks.

Blocks are stacked on the canonical tree's leading ``layers`` axis, so taking layers is one
``take`` per block tensor. A *layer spec* names which source layers, in which order:

    first:N       layers 0 .. N-1 (Inheritune: the first N blocks)
    last:N        layers K-N .. K-1
    spread:N      N layers evenly spaced over depth, always the first and the last
                  (round(i * (K-1) / (N-1)), i = 0..N-1; ``spread:1`` is layer 0)
    list:0,3,5    exactly these, in the order given; a repeated index needs ``allow_repeat``
                  (depth up-scaling / "stacking", e.g. ``list:0,1,2,1,2,3``)

Parts of a block (``attn``, ``mlp``, ``norms``; a mixture of experts' router and experts are its
``mlp``) and the non-block tensors (token ``embeddings``, ``head`` = ``lm_head``, ``final_norm``,
GPT-2 ``pos_embed``) are each either inherited or freshly initialised. Fresh tensors come from
:func:`jaxarith.models.transformer.init_params` of the new config with ``key`` (the same
initialiser as training from scratch): a fresh leaf equals that leaf of
``init_params(new_cfg, key)``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Sequence

import jax
import numpy as np

from jaxarith.errors import ConfigError
from jaxarith.models import transformer
from jaxarith.models.config import ModelConfig

PARTS = ("attn", "mlp", "norms")
SPEC_FORMS = ("first", "last", "spread", "list")


class LayerSpecError(ConfigError):
    """A layer spec is malformed or names layers the source does not have."""


class Source(enum.StrEnum):
    INHERIT = "inherit"
    FRESH = "fresh"


class InverseLayerIdxWarning(UserWarning):
    """A GPT-2 block with ``scale_attn_by_inverse_layer_idx`` moves to another depth."""


# ----------------------------------------------------------------------------- layer specs


def select_layers(spec: str, num_layers: int, *, allow_repeat: bool = False) -> tuple[int, ...]:
    """The source layer indices a spec names, in the new model's order.

    Args:
      spec: ``first:N`` | ``last:N`` | ``spread:N`` | ``list:i,j,...``.
      num_layers: K, the source's depth.
      allow_repeat: let ``list`` repeat an index (depth up-scaling).
    Returns:
      The indices (0-based, each in [0, K)).
    Raises:
      LayerSpecError: unknown form, N = 0 or N > K, an index out of range, a repeat without
        ``allow_repeat``.
    """
    K = num_layers
    form, sep, arg = str(spec).strip().partition(":")
    form = form.strip().lower()
    if not sep or form not in SPEC_FORMS:
        raise LayerSpecError(
            f"layer spec {spec!r}: unknown form (expected first:N, last:N, spread:N or "
            f"list:i,j,...)")
    if form == "list":
        try:
            idx = tuple(int(x) for x in arg.split(","))
        except ValueError:
            raise LayerSpecError(f"layer spec {spec!r}: list takes comma-separated integers") \
                from None
        bad = [i for i in idx if not 0 <= i < K]
        if bad:
            raise LayerSpecError(f"layer spec {spec!r}: layer index {bad[0]} is out of range "
                                 f"(the source has {K} layers: 0..{K - 1})")
        if not allow_repeat and len(set(idx)) != len(idx):
            rep = next(i for i in idx if idx.count(i) > 1)
            raise LayerSpecError(f"layer spec {spec!r}: layer {rep} is repeated (pass "
                                 f"--allow-repeat / allow_repeat=True to stack layers)")
        return idx
    try:
        n = int(arg)
    except ValueError:
        raise LayerSpecError(f"layer spec {spec!r}: {form} takes an integer N") from None
    if not 1 <= n <= K:
        raise LayerSpecError(f"layer spec {spec!r}: N={n} must be between 1 and the source's "
                             f"{K} layers")
    if form == "first":
        return tuple(range(n))
    if form == "last":
        return tuple(range(K - n, K))
    if n == 1:
        return (0,)
    # floor(x + 0.5): round half up, not numpy's half-to-even; distinct since (K-1)/(n-1) >= 1.
    return tuple(int(math.floor(i * (K - 1) / (n - 1) + 0.5)) for i in range(n))


def parse_parts(parts: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"attn,mlp"`` or ``["attn"]`` -> validated part names.

    None means all parts; an empty list (or ``""``) means none: every block is fresh and only
    the non-block tensors chosen as ``inherit`` come from the source.
    """
    if parts is None:
        return PARTS
    if isinstance(parts, str):
        parts = [p for p in (s.strip() for s in parts.split(",")) if p]
    out = tuple(parts)
    for p in out:
        if p not in PARTS:
            raise ConfigError(f"unknown part {p!r} (parts of a block: {', '.join(PARTS)})")
    if len(set(out)) != len(out):
        raise ConfigError(f"parts {list(out)}: a part is named twice")
    return out


def _source(name: str, value) -> Source | None:
    if value is None:
        return None
    try:
        return Source(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected inherit or fresh") from None


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`inherit` will do, computed from configs alone (no weights needed).

    Attributes:
      config: the new model's config (depth ``len(layers)``).
      layers: source layer per new layer.
      inherit: canonical path -> True (taken from the source) / False (fresh).
    """

    config: ModelConfig
    layers: tuple[int, ...]
    inherit: dict[tuple[str, ...], bool]

    @property
    def inherited_params(self) -> int:
        specs = _flat_specs(self.config)
        return sum(int(np.prod(specs[p].shape)) for p, keep in self.inherit.items() if keep)

    @property
    def params(self) -> int:
        return transformer.num_params(self.config)


def with_depth(cfg: ModelConfig, n: int) -> ModelConfig:
    """``cfg`` with ``n`` layers (the family's ``with_depth``; HF extras follow)."""
    return transformer.family(cfg).with_depth(cfg, n)


def _flat_specs(cfg: ModelConfig) -> dict[tuple[str, ...], object]:
    flat = jax.tree_util.tree_flatten_with_path(
        transformer.param_specs(cfg), is_leaf=lambda x: hasattr(x, "axes"))[0]
    return {tuple(k.key for k in path): s for path, s in flat}


def _block_part(name: str) -> str:
    if name.endswith("norm"):
        return "norms"
    if name in ("attn", "mlp"):
        return name
    if name == "moe":  # a mixture-of-experts MLP (router and experts) is the block's MLP part
        return "mlp"
    raise ConfigError(f"layers/{name}: no inheritance part for this block tensor "
                      f"(known parts: {', '.join(PARTS)})")


def plan(cfg: ModelConfig, layers: str | Sequence[int], *, parts=None,
         embeddings: str = "inherit", head: str | None = None, final_norm: str = "inherit",
         pos_embed: str | None = None, allow_repeat: bool = False) -> Plan:
    """Validate the options against ``cfg`` and decide every tensor's origin (see inherit)."""
    idx = (select_layers(layers, cfg.num_hidden_layers, allow_repeat=allow_repeat)
           if isinstance(layers, str) else tuple(int(i) for i in layers))
    if not isinstance(layers, str):
        select_layers("list:" + ",".join(map(str, idx)), cfg.num_hidden_layers,
                      allow_repeat=allow_repeat)
    parts = parse_parts(parts)
    emb = _source("embeddings", embeddings)
    fin = _source("final_norm", final_norm)
    hd = _source("head", head)
    pos = _source("pos_embed", pos_embed)
    tied = bool(cfg.tie_word_embeddings)
    if tied and hd is not None and hd is not emb:
        raise ConfigError(f"head={hd} but embeddings={emb}: this model ties lm_head to the "
                          f"token embeddings, so both must be inherited or both fresh")
    if pos is Source.FRESH and ("pos_embed",) not in _flat_specs(cfg):
        raise ConfigError(f"pos_embed=fresh: a {cfg.arch} model has no position embeddings")
    top = {"embed": emb, "lm_head": hd or Source.INHERIT, "final_norm": fin,
           "pos_embed": pos or Source.INHERIT}
    new_cfg = with_depth(cfg, len(idx))
    decide = {}
    for path in _flat_specs(new_cfg):
        if path[0] == "layers":
            decide[path] = _block_part(path[1]) in parts
        elif path[0] in top:
            decide[path] = top[path[0]] is Source.INHERIT
        else:
            raise ConfigError(f"{'/'.join(path)}: no inheritance option for this tensor")
    reason = transformer.family(cfg).depth_sensitive(cfg)
    if reason and "attn" in parts and idx != tuple(range(len(idx))):
        moved = [(i, j) for j, i in enumerate(idx) if i != j]
        warnings.warn(
            f"{reason}, so a block moved to another depth computes differently there (source "
            f"layer {moved[0][0]} -> new layer {moved[0][1]}, ...); only first:N is exact",
            InverseLayerIdxWarning, stacklevel=3)
    return Plan(config=new_cfg, layers=idx, inherit=decide)


# ----------------------------------------------------------------------------- inherit


def _mesh_of(params) -> jax.sharding.Mesh | None:
    shd = getattr(jax.tree.leaves(params)[0], "sharding", None)
    mesh = getattr(shd, "mesh", None)
    return mesh if isinstance(mesh, jax.sharding.Mesh) and mesh.size > 1 else None


def apply_plan(params: dict, p: Plan, key: jax.Array, mesh=None) -> dict:
    """The new tree of a :class:`Plan`, computed under one jit with the rules' shardings.

    Inherited block leaves are ``take(source, layers, axis=0)``; fresh leaves come from
    ``transformer.init_params(p.config, key)`` (unused ones are dead code XLA drops). Each leaf
    keeps the source leaf's dtype. On a mesh (given, or that of the source arrays) the output
    carries ``transformer.param_shardings(p.config, mesh)``.
    """
    mesh = mesh if mesh is not None else _mesh_of(params)
    idx = np.asarray(p.layers, np.int32)
    src_flat = _flat_specs(p.config)

    def get(tree, path):
        for k in path:
            if not isinstance(tree, dict) or k not in tree:
                raise ConfigError(f"the source parameters have no {'/'.join(path)}")
            tree = tree[k]
        return tree

    sources = {path: get(params, path) for path, keep in p.inherit.items() if keep}
    dtypes = {path: get(params, path).dtype if path in sources else None for path in src_flat}
    dtype = next(iter({x.dtype for x in jax.tree.leaves(params)}))

    def build(sources, key):
        fresh = transformer.init_params(p.config, key, dtype)
        out: dict = {}
        for path in src_flat:
            if p.inherit[path]:
                x = sources[path]
                x = x[idx] if path[0] == "layers" else x  # static indices: a gather
                x = x.astype(dtypes[path])
            else:
                x = fresh
                for k in path:
                    x = x[k]
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = x
        return out

    shardings = None if mesh is None else transformer.param_shardings(p.config, mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # donation/sharding notes on 1-device CPU
        return jax.jit(build, out_shardings=shardings)(sources, key)


def inherit(
    params: dict,
    cfg: ModelConfig,
    layers: str | Sequence[int],
    *,
    parts: str | Sequence[str] | None = None,
    embeddings: str = "inherit",
    head: str | None = None,
    final_norm: str = "inherit",
    pos_embed: str | None = None,
    allow_repeat: bool = False,
    key: jax.Array | None = None,
    mesh=None,
) -> tuple[ModelConfig, dict]:
    """A model of ``len(layers)`` blocks taken from ``params`` (see the module docstring).

    Args:
      params: the source's canonical tree (on one device or sharded over a mesh).
      cfg: the source's config (K layers).
      layers: a layer spec (``first:N``, ``last:N``, ``spread:N``, ``list:i,j``) or indices.
      parts: block parts to inherit, of ``attn``, ``mlp``, ``norms`` (default all; ``[]``:
        none); the others are fresh.
      embeddings, final_norm: ``inherit`` or ``fresh``.
      head: ``lm_head``: ``inherit`` or ``fresh``; default: inherit (with tied embeddings it is
        the embedding matrix and follows ``embeddings``).
      pos_embed: GPT-2 position embeddings, ``inherit`` (default) or ``fresh``.
      allow_repeat: allow a ``list`` spec to repeat layers.
      key: PRNG key of fresh tensors (default ``PRNGKey(0)``).
      mesh: output mesh (default: the source arrays' mesh, or one device).
    Returns:
      ``(new_cfg, new_params)``.
    """
    p = plan(cfg, layers, parts=parts, embeddings=embeddings, head=head, final_norm=final_norm,
             pos_embed=pos_embed, allow_repeat=allow_repeat)
    key = jax.random.PRNGKey(0) if key is None else key
    return p.config, apply_plan(params, p, key, mesh)

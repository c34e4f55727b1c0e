"""In-memory executor: one ``jax.jit`` over whole canonical trees of (sharded) arrays.

Stacked leaves (``layers/...``) are vmapped over their leading layer axis (and mixture-of-experts
leaves ``[L, E, ...]`` over their expert axis too: each expert is its own tensor, as in the HF
checkpoint and the streaming executor), so per-layer schedules
and selections are just ``[L]`` arrays and compile time does not grow with depth. Outputs keep the
first input's shardings; ``donate=True`` donates the first tree's buffers (e.g. the model in
``apply_delta``) so the result can reuse them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith.arith.check import check_trees, leaf_names
from jaxarith.arith.kernel import NO_LAYER, tensor_step
from jaxarith.arith.layout import hf_layouts
from jaxarith.arith.select import MergeSpec, expert_seed, path_seed
from jaxarith.models.config import ModelConfig


def _leaf_plan(spec: MergeSpec, path: tuple[str, ...], hf_key: str | None,
               shape: tuple[int, ...], n_inputs: int):
    """(params, seeds, layers, selection mode, selection array) of one canonical leaf."""
    canon = "/".join(path)
    seed = path_seed(spec.seed, canon)
    if path[0] != "layers":
        numel = int(np.prod(shape))
        names = (canon,) if hf_key is None else (canon, hf_key)
        p, sel = spec.tensor_params(names, None, 1, numel, n_inputs)
        return p, seed, NO_LAYER, bool(sel), None
    L = shape[0]
    if hf_key is not None and "{j}" in hf_key:  # [L, E, ...]: each expert its own tensor
        E = shape[1]
        numel = int(np.prod(shape[2:]))
        per = [spec.tensor_params((canon, hf_key.format(i=i, j=j)), i, L, numel, n_inputs)
               for i in range(L) for j in range(E)]
        p = {k: np.stack([q[k] for q, _ in per]).reshape(L, E, *np.shape(per[0][0][k]))
             for k in per[0][0]}
        sels = np.array([s for _, s in per]).reshape(L, E)
        mode = bool(sels.flat[0]) if sels.all() or not sels.any() else None
        seeds = np.stack([expert_seed(spec.seed, canon, j) for j in range(E)])
        layers = np.repeat(np.arange(L, dtype=np.uint32)[:, None], E, axis=1)
        return p, np.broadcast_to(seeds, (L, E, 2)).copy(), layers, mode, sels
    numel = int(np.prod(shape[1:]))
    per = [spec.tensor_params((canon,) if hf_key is None else (canon, hf_key.format(i=i)), i, L,
                              numel, n_inputs) for i in range(L)]
    p = {k: np.stack([q[k] for q, _ in per]) for k in per[0][0]}
    sels = np.array([s for _, s in per])
    mode = bool(sels[0]) if sels.all() or not sels.any() else None
    return p, np.broadcast_to(seed, (L, 2)).copy(), np.arange(L, dtype=np.uint32), mode, sels


def _step_traced_sel(method, dtype, layout, xs, p, seed, layer, sel):
    return tensor_step(method, xs, p, seed, layer, sel, dtype, layout)


def _step_static_sel(method, dtype, layout, mode, xs, p, seed, layer):
    return tensor_step(method, xs, p, seed, layer, mode, dtype, layout)


def _apply(method, statics, leaves, params, seeds, layers, sels):
    """Jitted body: ``leaves[j]`` is the tuple of inputs of leaf j."""
    out = []
    for (stacked, mode, dtype, layout), xs, p, seed, layer, sel in zip(
            statics, leaves, params, seeds, layers, sels, strict=True):
        selected = mode if mode is not None else sel
        # stacked: the number of leading axes vmapped over (1: layers, 2: layers and experts)
        if stacked and mode is None:
            f = functools.partial(_step_traced_sel, method, dtype, layout)
            out.append(_vmapped(f, stacked)(xs, p, seed, layer, selected))
        elif stacked:
            f = functools.partial(_step_static_sel, method, dtype, layout, mode)
            out.append(_vmapped(f, stacked)(xs, p, seed, layer))
        else:
            out.append(tensor_step(method, xs, p, seed, layer, selected, dtype, layout))
    return out


def _vmapped(f, levels: int):
    for _ in range(levels):
        f = jax.vmap(f)
    return f


@functools.lru_cache(maxsize=64)
def _compiled(method, statics, out_shardings):
    return jax.jit(functools.partial(_apply, method, statics), out_shardings=list(out_shardings))


def run(
    spec: MergeSpec,
    cfg: ModelConfig | None,
    trees: Sequence[dict],
    *,
    dtype=None,
    donate: bool = False,
) -> dict:
    """Apply ``spec`` to canonical parameter trees in memory; returns a tree like ``trees[0]``.

    Args:
      spec: method, parameter settings, selection and seed.
      cfg: the model config, for HF names in patterns (None: canonical paths only). Leaves
        under ``layers`` are stacked on their leading axis.
      trees: the inputs, in the method's order (for merges: base first).
      dtype: output dtype (default: the first input's per leaf; float32 for ``delta``).
      donate: donate the first tree's buffers to the output (it must not be used afterwards).
    Returns:
      The result tree, each leaf with the sharding of the first input's leaf.
    Raises:
      ArchitectureMismatchError: the trees' tensor names or shapes differ (nothing computed).
    """
    spec.check_inputs(len(trees))
    check_trees(trees)
    names = leaf_names(cfg) if cfg is not None else {}
    layouts = hf_layouts(cfg)
    flat0, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
    flats = [jax.tree.leaves(t) for t in trees]
    statics, leaves, params, seeds, layers, sels, shardings = [], [], [], [], [], [], []
    for j, (kp, leaf) in enumerate(flat0):
        path = tuple(str(k.key) for k in kp)
        p, seed, layer, mode, sel = _leaf_plan(spec, path, names.get(path), leaf.shape,
                                               len(trees))
        out_dtype = jnp.dtype(dtype) if dtype is not None else (
            jnp.dtype(jnp.float32) if spec.method.keeps_float32 else leaf.dtype)
        levels = 0 if path[0] != "layers" else np.ndim(layer)
        statics.append((levels, mode, out_dtype, layouts.get(path)))
        leaves.append(tuple(f[j] for f in flats))
        params.append(p)
        seeds.append(seed)
        layers.append(layer)
        sels.append(sel if mode is None else None)
        shardings.append(getattr(leaf, "sharding", None))
    with spec.method.precision():
        if donate:  # donate only the first input: its leaves go in a separate argument
            fn = _compiled_donating(spec.method, tuple(statics), tuple(shardings))
            out = fn([x[0] for x in leaves], [x[1:] for x in leaves], params, seeds, layers,
                     sels)
        else:
            fn = _compiled(spec.method, tuple(statics), tuple(shardings))
            out = fn(leaves, params, seeds, layers, sels)
    return jax.tree.unflatten(treedef, out)


def _apply_split(method, statics, firsts, rests, params, seeds, layers, sels):
    leaves = [(a, *r) for a, r in zip(firsts, rests, strict=True)]
    return _apply(method, statics, leaves, params, seeds, layers, sels)


@functools.lru_cache(maxsize=16)
def _compiled_donating(method, statics, out_shardings):
    fn = functools.partial(_apply_split, method, statics)
    return jax.jit(fn, out_shardings=list(out_shardings), donate_argnums=(0,))

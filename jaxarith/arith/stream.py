"""Streamed executor: HF safetensors checkpoints in, one HF checkpoint out, tensor by tensor.

For each HF tensor name (e.g. ``model.layers.3.mlp.up_proj.weight``) the tensor is read from
every input checkpoint, turned into its canonical per-layer form with the keymap's ``to_canon``
hook (transposes / splits, exact), run through :func:`kernel.tensor_step` (float32 math, the same
formula objects as the in-memory executor), turned back with ``to_hf``, cast, and written into the
output shard being filled. The layer index (for schedules and DARE keys) comes from
``keymap.expand``. The next tensor is read by a background thread while this one is computed.

Host memory stays near two tensors of each input plus one output tensor, whatever the number of
layers; the output is written by the one HF writer (``convert.export.write_hf``: shards, index,
config, atomically).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxarith.arith.check import check_shapes
from jaxarith.arith.kernel import NO_LAYER, tensor_step
from jaxarith.arith.layout import rule_layout
from jaxarith.arith.select import MergeSpec, expert_seed, path_seed
from jaxarith.convert.export import write_hf
from jaxarith.convert.hf import HFCheckpoint, check_checkpoint
from jaxarith.convert.keymap import expand, rules_for
from jaxarith.errors import ArchitectureMismatchError, ConfigError
from jaxarith.models.config import load_config

_step = jax.jit(tensor_step, static_argnums=(0, 5, 6, 7))


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _layer_step(method, xs, p, seed, layer, selected, out_dtype, layout):
    """One layer run as a batch of one through the same vmap as the in-memory executor, so both
    compile the same per-layer program (XLA's fusion and FMA choices then agree)."""
    f = lambda xs, p, s, l: tensor_step(method, xs, p, s, l, selected, out_dtype, layout)
    add = lambda x: x[None]
    out = jax.vmap(f)(jax.tree.map(add, xs), jax.tree.map(add, p), seed[None], layer[None])
    return out[0]


def open_checkpoints(refs: Sequence[str]):
    """(configs, checkpoints, {expected HF key: stored key} per model), architecture-checked."""
    from jaxarith.convert.hf import resolve_hf_dir
    from jaxarith.refs import RefKind, ref_kind

    for r in refs:
        if ref_kind(r) is RefKind.ORBAX:
            raise ConfigError(f"{r}: the streamed executor reads HF safetensors checkpoints; "
                              "convert it with `jaxarith convert` or use the in-memory executor")
    dirs = [resolve_hf_dir(r) for r in refs]
    cfgs = [load_config(d) for d in dirs]
    arch = {c.arch for c in cfgs}
    if len(arch) > 1:
        raise ArchitectureMismatchError(
            "models differ in architecture: " + ", ".join(f"{r}: {c.arch}"
                                                          for r, c in zip(refs, cfgs, strict=True)))
    shapes = [{key: rule.hf_shape for rule in rules_for(c)
               for key, _ in expand(rule, c.num_hidden_layers)} for c in cfgs]
    check_shapes(shapes, [os.fspath(r) for r in refs])
    ckpts = [HFCheckpoint(d) for d in dirs]
    names = [check_checkpoint(c, k) for c, k in zip(cfgs, ckpts, strict=True)]
    return cfgs, ckpts, names


def run_streamed(
    spec: MergeSpec,
    refs: Sequence[str],
    dst: str | os.PathLike,
    *,
    dtype=None,
    max_shard_size: str | int = "5GB",
    tokenizer_from: int | None = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Apply ``spec`` to HF checkpoints tensor by tensor and write an HF checkpoint at ``dst``.

    Args:
      spec: method, parameter settings, selection and seed.
      refs: HF directories or hub ids, in the method's order (for merges: base first).
      dtype: output dtype (default: the first input's per tensor; float32 for ``delta``).
      max_shard_size: split output safetensors files at this size.
      tokenizer_from: copy tokenizer files from this input (None: none).
    Returns:
      {"tensors", "files", "bytes_read", "bytes_written", "seconds"}.
    Raises:
      ArchitectureMismatchError, CheckpointError: before anything is written.
    """
    t0 = time.perf_counter()
    spec.check_inputs(len(refs))
    cfgs, ckpts, names = open_checkpoints(refs)
    cfg = cfgs[0]
    L = cfg.num_hidden_layers
    items = [(rule, key, layer) for rule in rules_for(cfg)
             for key, layer in expand(rule, L)]
    out_dtype = np.dtype(dtype) if dtype is not None else None
    specs = []
    for _, key, _ in items:
        dt = out_dtype or (np.dtype(np.float32) if spec.method.keeps_float32
                           else ckpts[0].dtype(names[0][key]))
        specs.append((key, ckpts[0].shape(names[0][key]), dt))
    stats = {"bytes_read": 0}
    bar = tqdm(total=len(items), desc=str(spec.method.kind), unit="tensor",
               disable=not progress, leave=False)
    results = _results(spec, items, specs, ckpts, names, L, stats, bar)
    tok_dir = ckpts[tokenizer_from].directory if tokenizer_from is not None else None
    info = write_hf(cfg, dst, specs, results, max_shard_size=max_shard_size,
                    tokenizer_dir=tok_dir, overwrite=overwrite, progress=False)
    bar.close()
    return {"tensors": len(items), "files": info["files"], "bytes_read": stats["bytes_read"],
            "bytes_written": info["bytes_written"], "seconds": time.perf_counter() - t0}


def _read(ckpts, names, key) -> list[np.ndarray]:
    return [ckpt.get(nm[key]) for ckpt, nm in zip(ckpts, names, strict=True)]


def _results(spec, items, specs, ckpts, names, L, stats, bar) -> Iterator[np.ndarray]:
    """The output tensors in ``items`` order; reads one tensor ahead on a worker thread."""
    n = len(ckpts)
    layouts = {t: rule_layout(rule, j) for rule, _, _ in items for j, t in enumerate(rule.targets)}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_read, ckpts, names, items[0][1]) if items else None
        for i, (rule, key, layer) in enumerate(items):
            arrays = future.result()
            if i + 1 < len(items):
                future = pool.submit(_read, ckpts, names, items[i + 1][1])
            stats["bytes_read"] += sum(a.nbytes for a in arrays)
            parts = [rule.to_canon(a) for a in arrays]  # per model: one array per target
            del arrays
            outs = []
            # a per-expert tensor: (layer, expert); its seed names the expert (see memory.py)
            layer, expert = layer if isinstance(layer, tuple) else (layer, None)
            for j, target in enumerate(rule.targets):
                xs = tuple(parts[m][j] for m in range(n))
                canon = "/".join(target)
                p, sel = spec.tensor_params((canon, key), layer, L, xs[0].size, n)
                step = _step if layer is None else _layer_step
                lay = NO_LAYER if layer is None else np.uint32(layer)
                seed = path_seed(spec.seed, canon) if expert is None else \
                    expert_seed(spec.seed, canon, expert)
                with spec.method.precision():
                    outs.append(np.asarray(step(spec.method, xs, p, seed, lay, bool(sel),
                                                specs[i][2], layouts[target])))
            del parts
            bar.update()
            yield np.asarray(rule.to_hf(*outs))

"""Streamed executor: HF safetensors checkpoints in, one HF checkpoint out, tensor by tensor.

For each HF tensor name (e.g. ``model.layers.3.mlp.up_proj.weight``) the tensor is read from
every input checkpoint, turned into its canonical per-layer form with the keymap's ``to_canon``
hook (transposes / splits, exact), run through :func:`kernel.tensor_step` (float32 math, the same
formula objects as the in-memory executor), turned back with ``to_hf``, cast, and written into the
output shard being filled. The layer index (for schedules and DARE keys) comes from
``keymap.expand``. A tensor whose canonical form is a mere transpose of the HF one is computed
in its HF layout instead (the same entries, so the same bits, without two strided copies). Inputs
are memory-mapped views of the files; a few tensors are computed ahead on worker threads while
the current one is written, so reading, computing and writing overlap. TIES finds its trim
thresholds and tie cuts on the host by one ``np.partition`` pass per model
(``ops.host_threshold``; ``ops.magnitude_mask`` bisects and scans otherwise).

Host memory stays near a few tensors of each input and output, whatever the number of layers;
the output is written by the one HF writer (``convert.export.write_hf``: shards, index, config,
atomically).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxarith.arith import ops
from jaxarith.arith.align import align_rows, aligned_configs, same_but_vocab, vocab_keys
from jaxarith.arith.check import check_shapes
from jaxarith.arith.kernel import NO_LAYER, tensor_step
from jaxarith.arith.layout import rule_layout
from jaxarith.arith.methods import Kind
from jaxarith.arith.select import MergeSpec, expert_seed, path_seed
from jaxarith.arith.vocab_merge import VocabPlan, build_plan, permute
from jaxarith.errors import ArchitectureMismatchError, ConfigError
from jaxarith.io.convert.export import write_hf
from jaxarith.io.convert.fastcopy import aligned_empty, contiguous
from jaxarith.io.convert.hf import HFCheckpoint, check_checkpoint, resolve_hf_dir
from jaxarith.io.convert.keymap import expand, rules_for
from jaxarith.io.refs import RefKind, ref_kind
from jaxarith.models.config import load_config

_step = jax.jit(tensor_step, static_argnums=(0, 5, 6, 7))
# methods whose formula stacks all inputs (``Method.__call__``): they may get them stacked
_STACKING = (Kind.LINEAR, Kind.TASK_ARITHMETIC, Kind.TIES, Kind.DARE_LINEAR, Kind.DARE_TIES)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _layer_step(method, xs, p, seed, layer, selected, out_dtype, layout):
    """One layer run as a batch of one through the same vmap as the in-memory executor, so both
    compile the same per-layer program (XLA's fusion and FMA choices then agree)."""
    f = lambda xs, p, s, l: tensor_step(method, xs, p, s, l, selected, out_dtype, layout)
    add = lambda x: x[None]
    out = jax.vmap(f)(jax.tree.map(add, xs), jax.tree.map(add, p), seed[None], layer[None])
    return out[0]


def hf_dirs(refs: Sequence[str], reader: str, hint: str = "") -> list[str]:
    """The local HF directories of ``refs`` (hub ids downloaded), refusing an Orbax checkpoint
    with one line naming it and what reads it (``reader``, e.g. "extract-lora reads")."""
    for r in refs:
        if ref_kind(r) is RefKind.ORBAX:
            raise ConfigError(f"{r}: {reader} HF safetensors checkpoints; convert it with "
                              f"`jaxarith convert`{hint}")
    return [resolve_hf_dir(r) for r in refs]


@dataclasses.dataclass
class Inputs:
    """The opened inputs of a streamed run.

    Attributes:
      cfgs: each input's config as it is read (after --align-vocab or a merged vocabulary, all
        with the output's ``vocab_size``).
      ckpts, names: the checkpoints and {expected HF key: stored key} per input.
      rows: ``rows(key, arrays) -> arrays``: the inputs' tensors of ``key`` put on the output's
        vocabulary rows (None: read as stored).
      plan: the merged vocabulary (:mod:`jaxarith.arith.vocab_merge`), if any.
    """

    cfgs: list
    ckpts: list
    names: list
    rows: Callable | None = None
    plan: Any = None


def open_inputs(refs: Sequence[str], align_to: int | None = None, vocab=None,
                base: int | None = None) -> Inputs:
    """The inputs of a streamed run, architecture-checked before anything is read.

    ``align_to``: tables that differ only in padded rows are read with ``refs[align_to]``'s
    rows (:mod:`jaxarith.arith.align`). ``vocab``: a :class:`~jaxarith.arith.vocab_merge.
    VocabSpec`: every input's vocabulary tensors are permuted to the merged vocabulary
    (``base`` indexes the base model).
    """
    dirs = hf_dirs(refs, "the streamed executor reads",
                   " or use the in-memory executor")
    cfgs = [load_config(d) for d in dirs]
    arch = {c.arch for c in cfgs}
    if len(arch) > 1:
        raise ArchitectureMismatchError(
            "models differ in architecture: " + ", ".join(f"{r}: {c.arch}"
                                                          for r, c in zip(refs, cfgs, strict=True)))
    rows, plan = None, None
    if vocab is not None:
        plan = vocab if isinstance(vocab, VocabPlan) else build_plan(
            vocab, [os.fspath(r) for r in refs], dirs, [c.vocab_size for c in cfgs], base)
        read_as = same_but_vocab(cfgs, [os.fspath(r) for r in refs], plan.size)
        keys = vocab_keys(read_as[0])
        rows = lambda key, arrays: permute(plan, arrays) if key in keys else arrays  # noqa: E731
    elif align_to is not None:
        read_as = aligned_configs(cfgs, dirs, align_to)
        rows = lambda key, arrays: [align_rows(a, arrays[align_to])  # noqa: E731
                                    for a in arrays]
    else:
        read_as = cfgs
    shapes = [{key: rule.hf_shape for rule in rules_for(c)
               for key, _ in expand(rule, c.num_hidden_layers)} for c in read_as]
    check_shapes(shapes, [os.fspath(r) for r in refs])
    ckpts = [HFCheckpoint(d) for d in dirs]
    names = [check_checkpoint(c, k) for c, k in zip(cfgs, ckpts, strict=True)]
    return Inputs(read_as, ckpts, names, rows, plan)


def open_checkpoints(refs: Sequence[str], align_to: int | None = None):
    """(configs, checkpoints, {expected HF key: stored key} per model) of :func:`open_inputs`."""
    inp = open_inputs(refs, align_to)
    return inp.cfgs, inp.ckpts, inp.names


def run_streamed(
    spec: MergeSpec,
    refs: Sequence[str],
    dst: str | os.PathLike,
    *,
    dtype=None,
    max_shard_size: str | int = "5GB",
    tokenizer_from: int | None = 0,
    tokenizer_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    align_to: int | None = None,
    vocab=None,
) -> dict:
    """Apply ``spec`` to HF checkpoints tensor by tensor and write an HF checkpoint at ``dst``.

    Args:
      spec: method, parameter settings, selection and seed.
      refs: HF directories or hub ids, in the method's order (for merges: base first).
      dtype: output dtype (default: the first input's per tensor; float32 for ``delta``).
      max_shard_size: split output safetensors files at this size.
      tokenizer_from: copy tokenizer files from this input (None: none).
      tokenizer_dir: copy tokenizer files from this directory instead (e.g. a tokenizer given
        a chat template).
      align_to: read every input with this input's embedding rows (tables that differ only in
        padded rows, one tokenizer; :mod:`jaxarith.arith.align`). None: shapes must be equal.
      vocab: a merged vocabulary (:class:`~jaxarith.arith.vocab_merge.VocabSpec`, mergekit's
        ``tokenizer_source`` / ``tokenizer:``): inputs permuted to it, its tokenizer written
        (unless ``tokenizer_dir`` is given).
    Returns:
      {"tensors", "files", "bytes_read", "bytes_written", "seconds"}.
    Raises:
      ArchitectureMismatchError, CheckpointError: before anything is written.
    """
    t0 = time.perf_counter()
    spec.check_inputs(len(refs))
    inp = open_inputs(refs, align_to, vocab, 0 if spec.method.has_base else None)
    cfgs, ckpts, names = inp.cfgs, inp.ckpts, inp.names
    cfg = cfgs[0]
    L = cfg.num_hidden_layers
    items = [(rule, key, layer) for rule in rules_for(cfg)
             for key, layer in expand(rule, L)]
    out_dtype = np.dtype(dtype) if dtype is not None else None
    shapes = {key: rule.hf_shape for rule, key, _ in items}  # the output's (vocab rows too)
    specs = []
    for _, key, _ in items:
        dt = out_dtype or (np.dtype(np.float32) if spec.method.keeps_float32
                           else ckpts[0].dtype(names[0][key]))
        specs.append((key, shapes[key], dt))
    stats = {"bytes_read": 0}
    bar = tqdm(total=len(items), desc=str(spec.method.kind), unit="tensor",
               disable=not progress, leave=False)
    results = _results(spec, items, specs, ckpts, names, L, stats, bar, inp.rows)
    with tempfile.TemporaryDirectory(prefix="jaxarith_vocab_") as tmp:
        tok_dir = tokenizer_dir or (inp.plan.save_tokenizer(tmp) if inp.plan is not None else
                                    ckpts[tokenizer_from].directory if tokenizer_from is not None
                                    else None)
        info = write_hf(cfg, dst, specs, results, max_shard_size=max_shard_size,
                        tokenizer_dir=tok_dir, overwrite=overwrite, progress=False,
                        host_only=True)  # files in, files out: other processes read nothing
    bar.close()
    return {"tensors": len(items), "files": info["files"], "bytes_read": stats["bytes_read"],
            "bytes_written": info["bytes_written"], "seconds": time.perf_counter() - t0}


def _read(ckpts, names, key, rows=None) -> list[np.ndarray]:
    """The tensor ``key`` of every input as read-only memory-mapped views (no copy); ``rows``
    (:class:`Inputs`) puts vocabulary tensors on the output's rows (a copy)."""
    arrays = [ckpt.view(nm[key]) for ckpt, nm in zip(ckpts, names, strict=True)]
    return arrays if rows is None else rows(key, arrays)


# Tensors computed ahead of the one being written (each on a worker thread: file reads, XLA and
# numpy release the GIL, so reading, computing and writing overlap). Memory: about this many
# tensors' inputs and results at once, whatever the model size.
AHEAD = 2


def _direct(method, rule, array: np.ndarray) -> bool:
    """Whether ``rule``'s tensor can be computed in its HF layout, skipping ``to_canon`` /
    ``to_hf`` (two strided copies of every matrix).

    True when the rule's one canonical target is a view of the whole HF tensor (a transpose or
    reshape: the same entries, permuted) and the result of every entry depends on that entry
    alone, or, for TIES, on per-tensor counts plus HF's row-major order (which is the layout the
    formula is then told: ``None``). Not for DARE (masks drawn in canonical positions) nor SLERP
    (float64 sums, whose order would change).
    """
    if method.uses_key or method.wants_x64 or len(rule.targets) != 1:
        return False
    canon = rule.to_canon(array)[0]
    return canon.size == array.size and np.may_share_memory(canon, array)


def _tv_bits(method, base, model):
    """``|model - base|`` as float32 bit patterns, cast exactly as :func:`tensor_step` casts
    (the same XLA subtraction, so the same bits: XLA flushes denormal results to zero)."""
    xs = (jnp.asarray(base), jnp.asarray(model))
    if method.merge_dtype is not None:
        xs = tuple(x.astype(method.merge_dtype) for x in xs)
    b, m = (x.astype(jnp.float32) for x in xs)
    return jax.lax.bitcast_convert_type(jnp.abs(m - b), jnp.uint32)


_tv_bits_jit = jax.jit(_tv_bits, static_argnums=0)


def _thresholds(method, xs, ks) -> tuple[np.ndarray, np.ndarray]:
    """TIES' per-model trim thresholds and tie cuts (``ops.host_threshold``: one selection pass
    each instead of the formula's 31 counting passes and its scan) of a tensor in HF layout."""
    thr, cut = np.zeros(len(ks), np.uint32), np.full(len(ks), -1, np.int32)
    for i, k in enumerate(ks):
        if int(k) > 0:
            bits = np.asarray(_tv_bits_jit(method, xs[0], xs[i + 1]))
            thr[i], cut[i] = ops.host_threshold(bits, int(k))
    return thr, cut


def _compute(spec, rule, key, layer, ckpts, names, L, dtype, layouts,
             rows=None) -> tuple[np.ndarray, int]:
    """(the output HF tensor, contiguous, in ``dtype``; bytes read) of one HF tensor."""
    n = len(ckpts)
    arrays = _read(ckpts, names, key, rows)
    nread = sum(a.nbytes for a in arrays)
    direct = _direct(spec.method, rule, arrays[0])
    # per model: one array per target (the HF array itself when computed in HF layout)
    parts = [(a,) if direct else rule.to_canon(a) for a in arrays]
    del arrays
    outs = []
    # a per-expert tensor: (layer, expert); its seed names the expert (see memory.py)
    layer, expert = layer if isinstance(layer, tuple) else (layer, None)
    for j, target in enumerate(rule.targets):
        # canonical views are transposes: copy them through cache-sized tiles
        xs = tuple(parts[m][j] if direct else contiguous(parts[m][j]) for m in range(n))
        if n > STACK_ABOVE and _stackable(spec.method, xs):
            xs = _stack(xs)
        canon = "/".join(target)
        p, sel = spec.tensor_params((canon, key), layer, L, xs[0].size, n)
        if sel and direct and spec.method.magnitude_trim and xs[0].size < 2**31:
            p["thr"], p["cut"] = _thresholds(spec.method, xs, p["k"])
        step = _step if layer is None else _layer_step
        lay = NO_LAYER if layer is None else np.uint32(layer)
        seed = path_seed(spec.seed, canon) if expert is None else \
            expert_seed(spec.seed, canon, expert)
        with spec.method.precision():
            outs.append(np.asarray(step(spec.method, xs, p, seed, lay, bool(sel), dtype,
                                        None if direct else layouts[target])))
    del parts, xs
    out = outs[0] if direct else contiguous(np.asarray(rule.to_hf(*outs)), dtype)
    return out, nread


# Above this many inputs a method that stacks its inputs anyway (linear, the task merges) gets
# them as one host-stacked array: one jit argument and one cast instead of one per input, so
# compile time and memory stay flat in the number of inputs (with 400 inputs, each separately,
# compiling took ~2 s per tensor shape and grew faster than the inputs).
STACK_ABOVE = 16


def _stackable(method, xs) -> bool:
    return method.kind in _STACKING and len({x.dtype for x in xs}) == 1


def _stack(xs) -> np.ndarray:
    """``np.stack(xs)`` into an aligned buffer (a CPU device aliases it instead of copying)."""
    out = aligned_empty((len(xs), *xs[0].shape), xs[0].dtype)
    for i, x in enumerate(xs):
        out[i] = x
    return out


def _results(spec, items, specs, ckpts, names, L, stats, bar,
             rows=None) -> Iterator[np.ndarray]:
    """The output tensors in ``items`` order, computed ``AHEAD`` tensors ahead on worker
    threads while the caller writes.

    The workers are daemon threads that nobody waits for once the caller stops (an error,
    Ctrl-C, SIGTERM): one tensor of a merge of thousands of models computes for many seconds,
    and the command must exit (its temporary output removed) without waiting for it.
    """
    layouts = {t: rule_layout(rule, j) for rule, _, _ in items for j, t in enumerate(rule.targets)}
    pending: collections.deque = collections.deque()
    slots = threading.BoundedSemaphore(AHEAD)  # at most AHEAD tensors computing at once
    try:
        for i in range(len(items)):
            while len(pending) <= AHEAD and i + len(pending) < len(items):
                rule, key, layer = items[i + len(pending)]
                pending.append(_submit(slots, _compute, spec, rule, key, layer, ckpts, names,
                                       L, specs[i + len(pending)][2], layouts, rows))
            out, nread = pending.popleft().result()
            stats["bytes_read"] += nread
            bar.update()
            yield out
            del out
    finally:
        for f in pending:
            f.cancel()


def _submit(slots: threading.BoundedSemaphore, fn, *args) -> concurrent.futures.Future:
    """Run ``fn(*args)`` on a new daemon thread once one of ``slots`` is free (a cancelled
    future never runs)."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        with slots:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # raised in the caller, at .result()
                fut.set_exception(e)

    threading.Thread(target=run, daemon=True, name="jaxarith-stream").start()
    return fut

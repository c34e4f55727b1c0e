"""Averaging checkpoints after the fact: uniform soups, LaWA over a run's latest checkpoints, and
greedy soups (Wortsman et al. 2022, "Model soups").

Inputs are model references (HF hub id, HF directory, jaxarith Orbax directory) or training run
directories (every train-state checkpoint of the run, by step; see :mod:`jaxarith.average.runs`).
Each becomes a :class:`Candidate` that reads one canonical tensor (one keymap rule's leaves, all
layers) at a time as host arrays.

* :func:`uniform`: the mean, streamed tensor by tensor: for each tensor the inputs are read one
  after another and summed in float32 by the in-memory arith executor (``arith.add``), then
  scaled by ``1/n`` (``arith.scale``) and handed to the HF writer (``save_hf``). Host memory is
  the running sum, one input tensor and the output tensor, whatever the number of inputs.
* :func:`greedy`: score every candidate on held-out tokens with
  :func:`jaxarith.eval.loss.eval_loss` (jitted, on the mesh), sort best first, and add each to the
  soup only if the soup's held-out loss strictly improves. The soup is kept as a float32 running
  sum on the mesh; the candidate models are loaded one at a time.

Example::

    cands = open_candidates(["runs/tiny"], last=5)      # LaWA after the fact
    uniform(cands, "out/lawa5")
    report, params = greedy(open_candidates(["a", "b", "c"]), token_ids)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith import arith, distributed
from jaxarith.arith.check import check_shapes, tree_shapes
from jaxarith.average.runs import Run, is_run_dir
from jaxarith.data.assets import bundled_tokenizer
from jaxarith.errors import CheckpointError, ConfigError
from jaxarith.eval.loss import eval_loss
from jaxarith.io.atomic import check_destination
from jaxarith.io.convert.export import save_hf
from jaxarith.io.convert.hf import (
    HFCheckpoint,
    check_checkpoint,
    get_path,
    resolve_hf_dir,
    set_path,
)
from jaxarith.io.convert.keymap import Rule, expand, rules_for
from jaxarith.io.convert.orbax import (
    hf_to_orbax,
    load_host_leaves,
    read_metadata,
    save_orbax,
    stored_arrays,
)
from jaxarith.io.refs import RefKind, ref_kind
from jaxarith.io.refs import load_tokenizer as load
from jaxarith.models.config import ModelConfig, load_config
from jaxarith.models.transformer import abstract_params, param_shardings

Path = tuple[str, ...]
Reader = Callable[[Rule], dict[Path, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One checkpoint to average.

    Attributes:
      ref: how the user named it (a reference, or ``RUN@step`` for a run's checkpoint).
      config: its model config.
      read: ``read(rule) -> {canonical path: host array}`` for the rule's leaves (all layers).
      tokenizer: a directory with tokenizer files, ``bundled``, or None.
      dtypes: {canonical path: stored dtype}.
      orbax: ``read`` is an Orbax restore (a collective in a multi-process run: every process
        must call it).
    """

    ref: str
    config: ModelConfig
    read: Reader
    tokenizer: str | None
    dtypes: dict = dataclasses.field(default_factory=dict)
    orbax: bool = False


def _hf_candidate(ref: str) -> Candidate:
    directory = resolve_hf_dir(ref)
    cfg = load_config(directory)
    ckpt = HFCheckpoint(directory)
    names = check_checkpoint(cfg, ckpt)  # every key and shape, before anything is read
    L = cfg.num_hidden_layers

    def read(rule: Rule) -> dict[Path, np.ndarray]:
        # nothing is cached between calls: host memory is one rule's leaves of one input
        layers = expand(rule, L)
        if layers[0][1] is None:
            parts = rule.to_canon(ckpt.get(names[layers[0][0]]))
            return {t: np.asarray(x) for t, x in zip(rule.targets, parts, strict=True)}
        out = {}
        for i, (key, layer) in enumerate(layers):
            for t, x in zip(rule.targets, rule.to_canon(ckpt.get(names[key])), strict=True):
                if i == 0:  # [L, ...], or [L, E, ...] for per-expert rules
                    lead = (L, rule.experts) if rule.experts else (len(layers),)
                    out[t] = np.empty((*lead, *np.shape(x)), np.asarray(x).dtype)
                out[t][layer] = x
        return out

    dtypes = {t: np.dtype(ckpt.dtype(names[expand(rule, L)[0][0]]))
              for rule in rules_for(cfg) for t in rule.targets}
    return Candidate(os.fspath(ref), cfg, read, directory, dtypes)


def _stored_dtypes(stored: dict) -> dict:
    return {tuple(name.split("/")): np.dtype(dt) for name, (_, dt) in stored.items()}


def _orbax_candidate(ref: str) -> Candidate:
    read_metadata(ref)
    cfg = load_config(ref)
    stored = stored_arrays(ref)
    _check_stored(ref, cfg, stored)
    return Candidate(os.fspath(ref), cfg,
                     lambda rule: load_host_leaves(ref, list(rule.targets), stored=stored), ref,
                     _stored_dtypes(stored), orbax=True)


def _run_candidates(path: str) -> list[Candidate]:
    run = Run.open(path)
    steps = run.steps()
    if not steps:
        raise CheckpointError(f"{path}: a training run directory without checkpoints (none in "
                              f"{run.checkpoint_dir}; set checkpoint.every / checkpoint.keep)")
    cfg = run.model_config()
    tok = run.tokenizer_source()
    out = []
    for step in steps:
        stored = run.stored(step)
        label = f"{os.fspath(path)}@{step}"
        _check_stored(label, cfg, stored)
        read = (lambda rule, s=step, st=stored: run.read_params(s, list(rule.targets), st))
        out.append(Candidate(label, cfg, read, tok, _stored_dtypes(stored), orbax=True))
    return out


def _check_stored(label: str, cfg: ModelConfig, stored: dict) -> None:
    """Stored parameter shapes must be those of the config (one error naming the tensor)."""
    want = tree_shapes(abstract_params(cfg))
    got = {k: tuple(v[0]) for k, v in stored.items()}
    check_shapes([want, got], [f"{label} (config.json)", f"{label} (stored)"])


def open_candidates(refs: Sequence[str], *, last: int | None = None) -> list[Candidate]:
    """Resolve references and run directories into candidates, keep the ``last`` K, check them.

    Args:
      refs: model references and/or training run directories (a run contributes all of its
        checkpoints, by step), in order.
      last: keep only the K latest (the end of that order).
    Returns:
      At least two candidates of one architecture.
    Raises:
      ConfigError: fewer than two checkpoints, or ``last`` larger than what exists.
      CheckpointError: a run directory without checkpoints, an unreadable checkpoint.
      ArchitectureMismatchError: naming the first differing tensor.
    """
    opened: list[Candidate] = []
    lazy = []  # open model references only if kept: list every run's steps first
    for r in refs:
        if is_run_dir(r):
            lazy.extend(("run", c) for c in _run_candidates(r))
        else:
            lazy.append(("ref", r))
    if last is not None:
        if last < 1:
            raise ConfigError(f"--last {last}: must be at least 1")
        if last > len(lazy):
            raise ConfigError(f"--last {last}: only {len(lazy)} checkpoint(s) exist ("
                              + ", ".join(c.ref if k == "run" else c for k, c in lazy) + ")")
        lazy = lazy[-last:]
    if len(lazy) < 2:
        names = ", ".join(c.ref if k == "run" else c for k, c in lazy) or "none"
        raise ConfigError(f"averaging needs at least 2 checkpoints, got {len(lazy)} ({names})")
    for kind, item in lazy:
        if kind == "run":
            opened.append(item)
        elif ref_kind(item) is RefKind.ORBAX:
            opened.append(_orbax_candidate(item))
        else:
            opened.append(_hf_candidate(item))
    check_shapes([tree_shapes(abstract_params(c.config)) for c in opened],
                 [c.ref for c in opened])
    return opened


def _tree(leaves: dict[Path, np.ndarray]) -> dict:
    tree: dict = {}
    for p, x in leaves.items():
        set_path(tree, p, x)
    return tree


def mean_source(cands: Sequence[Candidate], dtype=None):
    """A leaf source (``paths -> {path: array}``, one rule's leaves per call) of the mean.

    The inputs are read one at a time and summed in float32 (``arith.add``), then scaled by
    ``1/n`` and cast (``arith.scale``): the output dtype is ``dtype`` or the first input's.
    """
    cfg = cands[0].config
    by_targets = {tuple(r.targets): r for r in rules_for(cfg)}
    n = len(cands)

    def fetch(paths: list[Path]) -> dict[Path, np.ndarray]:
        rule = by_targets[tuple(tuple(p) for p in paths)]
        acc, first_dtypes = None, {}
        for c in cands:
            x = c.read(rule)
            if acc is None:
                first_dtypes = {p: v.dtype for p, v in x.items()}
                acc = _tree({p: jnp.asarray(v, jnp.float32) for p, v in x.items()})
            else:  # the sum reuses its own buffers (donated): no allocation per input
                acc = arith.add(acc, _tree(x), donate=True)
                # wait: with async dispatch, queued adds would each keep their input alive
                jax.block_until_ready(acc)
            del x
        out = {}
        for p in paths:  # one leaf at a time: its own output dtype
            leaf = {tuple(p): get_path(acc, p)}
            scaled = arith.scale(_tree(leaf), 1.0 / n,
                                 dtype=dtype if dtype is not None else first_dtypes[tuple(p)])
            out[tuple(p)] = np.asarray(get_path(scaled, p))
        return out

    # save_hf reads each leaf's output dtype from here before fetching anything
    fetch.dtypes = {p: np.dtype(dtype) if dtype is not None else dt
                    for p, dt in cands[0].dtypes.items()}
    # safetensors reads summed on this process's own device, no collective: in a multi-process
    # run only process 0 computes the mean (write_hf); Orbax restores need every process
    fetch.host_only = not any(c.orbax for c in cands)
    return fetch


@contextlib.contextmanager
def tokenizer_dir(cand: Candidate):
    """A directory with the candidate's tokenizer files (the bundled one saved to a temp dir)."""
    if cand.tokenizer == "bundled":
        with tempfile.TemporaryDirectory() as tmp:
            bundled_tokenizer().save_pretrained(tmp)
            yield tmp
    else:
        yield cand.tokenizer


def load_tokenizer(cand: Candidate):
    if cand.tokenizer == "bundled":
        return bundled_tokenizer()

    return load(cand.tokenizer)


def write(cfg: ModelConfig, out: str | os.PathLike, *, params=None, source=None,
          to: str = "hf", dtype=None, tokenizer: str | None = None, overwrite: bool = False,
          progress: bool = False, max_shard_size: str | int = "5GB", mesh=None) -> dict:
    """Write averaged weights (a tree, or a leaf source streamed rule by rule) as HF or Orbax.

    Orbax output from a source goes through a temporary HF checkpoint beside ``out`` (both steps
    stream; ``mesh``: the Orbax arrays' sharding, default one device); ``out`` appears only when
    complete.
    """
    if to not in ("hf", "orbax"):
        raise ConfigError(f"--to {to!r}: expected 'hf' or 'orbax'")
    dst = check_destination(out, overwrite)
    if to == "hf":
        return save_hf(cfg, params, dst, source=source, dtype=dtype, tokenizer_dir=tokenizer,
                       overwrite=overwrite, progress=progress, max_shard_size=max_shard_size)
    if params is not None:
        if dtype is not None:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        save_orbax(cfg, params, dst, tokenizer_dir=tokenizer, overwrite=overwrite)
        return {}
    # multi-process: one temporary for all (process 0 writes the HF files, all read them)
    with distributed.shared_tempdir(prefix=".average-", dir=os.path.dirname(dst)) as tmp:
        hf = os.path.join(tmp, "hf")
        save_hf(cfg, None, hf, source=source, dtype=dtype, tokenizer_dir=tokenizer,
                progress=progress)
        hf_to_orbax(hf, dst, mesh=mesh, overwrite=overwrite, progress=progress)
    return {}


def uniform(cands: Sequence[Candidate], out: str | os.PathLike, *, to: str = "hf", dtype=None,
            overwrite: bool = False, progress: bool = False,
            max_shard_size: str | int = "5GB", mesh=None) -> dict:
    """Write the uniform mean of ``cands`` to ``out``, streamed tensor by tensor (``mesh``: the
    sharding of Orbax output)."""
    cfg = cands[0].config
    with tokenizer_dir(cands[0]) as tok:
        info = write(cfg, out, source=mean_source(cands, dtype), to=to, dtype=dtype,
                     tokenizer=tok, overwrite=overwrite, progress=progress,
                     max_shard_size=max_shard_size, mesh=mesh)
    return {"method": "uniform", "inputs": [c.ref for c in cands], "out": os.fspath(out),
            "to": to, **info}


def load_params(cand: Candidate, mesh=None) -> dict:
    """The candidate's parameters as float32 arrays on ``mesh`` (one device if None), read one
    canonical tensor at a time."""
    cfg = cand.config
    shd = param_shardings(cfg, mesh) if mesh is not None else None
    params: dict = {}
    for rule in rules_for(cfg):
        for p, x in cand.read(rule).items():
            x = np.asarray(x, np.float32)
            set_path(params, p, jnp.asarray(x) if shd is None else
                     jax.device_put(x, get_path(shd, p)))
    return params


def greedy_soup(n: int, load: Callable[[int], dict],
                score: Callable[[dict], float]) -> tuple[list[float], list[int], list[int],
                                                        float, dict]:
    """The greedy-soup algorithm (Wortsman et al. 2022, Recipe 1) over ``n`` candidates.

    Score every candidate, sort by loss (ties: input order), start the soup with the best, and
    add each next candidate only if the uniform soup with it has a strictly lower loss. The soup
    is a float32 running sum (``arith.add``) scaled by ``1/size`` (``arith.scale``); a kept
    trial soup is the returned soup bit for bit.

    Args:
      n: number of candidates.
      load: ``load(i)`` -> candidate ``i``'s parameter tree (called once to score, once to try).
      score: held-out loss of a parameter tree (lower is better).
    Returns:
      (losses by input index, the order tried (best first), kept indices in the order added,
      the soup's loss, the soup's parameters).
    """
    losses = []
    for i in range(n):
        params = load(i)
        losses.append(float(score(params)))
        del params
    order = sorted(range(n), key=lambda i: (losses[i], i))
    kept = [order[0]]
    total = load(order[0])
    soup, soup_loss = total, losses[order[0]]
    for i in order[1:]:
        trial_sum = arith.add(total, load(i))
        trial = arith.scale(trial_sum, 1.0 / (len(kept) + 1))
        loss = float(score(trial))
        if loss < soup_loss:
            total, soup, soup_loss = trial_sum, trial, loss
            kept.append(i)
        del trial, trial_sum
    return losses, order, kept, soup_loss, soup


def greedy(cands: Sequence[Candidate], token_ids, *, mesh=None, seq_len: int | None = None,
           batch_size: int = 8, progress: bool = False) -> tuple[dict, dict, list[int]]:
    """Greedy soup of ``cands`` scored by :func:`jaxarith.eval.loss.eval_loss` on ``token_ids``
    (jitted, on ``mesh``), so ``jaxarith eval-loss`` reproduces every number.

    Args:
      cands: the candidates (at least two, one architecture).
      token_ids: held-out tokens.
      mesh: score (and hold the soup) on this mesh (one device if None).
      seq_len, batch_size: scoring windows (see ``eval_loss``).
    Returns:
      (report, soup params, kept indices in the order added). ``report`` is ``{"method":
      "greedy", "candidates": [{"ref", "loss", "kept"}] (in the order tried, best first),
      "soup_loss", "kept"}`` (``kept``: the refs in the order added).
    """
    cfg = cands[0].config

    def score(params) -> float:
        return eval_loss(params, cfg, token_ids, seq_len=seq_len, batch_size=batch_size,
                         mesh=mesh, progress=progress).loss

    losses, order, kept, soup_loss, soup = greedy_soup(
        len(cands), lambda i: load_params(cands[i], mesh), score)
    report = {"method": "greedy",
              "candidates": [{"ref": cands[i].ref, "loss": losses[i], "kept": i in kept}
                             for i in order],
              "soup_loss": soup_loss, "kept": [cands[i].ref for i in kept]}
    return report, soup, kept

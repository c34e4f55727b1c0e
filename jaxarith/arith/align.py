"""Arithmetic between checkpoints whose embedding tables differ only in padded rows.

Members of one family may share a tokenizer and pad their tables differently (Qwen2.5-0.5B..3B:
151936 rows, 7B and up: 152064; the tokenizer has 151665 tokens). Subtracting or merging them
is refused by default (the shapes differ); with ``--align-vocab`` every input is read with the
rows of one input (the base): rows an input lacks are the base's (so its task vector is 0
there), rows beyond the base's are dropped. Allowed only when the tokenizers are the same and
every table holds a row for each of its tokens, so that only padding rows move.

Usage (streamed and in-memory executors alike)::

    cfgs = aligned_configs(cfgs, dirs, to=1)     # delta extract TUNED BASE: BASE's rows
    x = align_rows(tensor_of_input_i, tensor_of_base)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxarith.errors import ArchitectureMismatchError, ConfigError
from jaxarith.io.convert.keymap import expand, rules_for
from jaxarith.io.refs import load_tokenizer
from jaxarith.io.vocab import shared_tokenizer, tokenizer_rows
from jaxarith.models import transformer


def aligned_configs(cfgs: Sequence, dirs: Sequence[str], to: int) -> list:
    """The configs with every ``vocab_size`` set to ``cfgs[to]``'s, after checking that the
    tables differ only in padded rows.

    Raises:
      ArchitectureMismatchError: the configs differ in more than ``vocab_size``.
      ConfigError: a model has no tokenizer, the tokenizers differ (the first differing token
        is named) or a table has fewer rows than the tokenizer has tokens.
    """
    order = [to] + [i for i in range(len(cfgs)) if i != to]  # compared with the base
    try:
        same_but_vocab([cfgs[i] for i in order], [dirs[i] for i in order], cfgs[to].vocab_size)
    except ArchitectureMismatchError as e:
        raise ArchitectureMismatchError(f"--align-vocab: {e}") from None
    aligned = [dataclasses.replace(c, vocab_size=cfgs[to].vocab_size) for c in cfgs]
    if len({c.vocab_size for c in cfgs}) == 1:
        return aligned
    toks = []
    for d in dirs:
        try:
            toks.append(load_tokenizer(d))
        except Exception as e:  # noqa: BLE001 - which model lacks it is the message
            raise ConfigError(f"--align-vocab: {d} has no tokenizer to check that its extra "
                              f"rows are padding ({type(e).__name__}); add its tokenizer "
                              f"files") from None
    tok = shared_tokenizer(list(dirs), toks)
    tokenizer_rows(tok, {d: c.vocab_size for d, c in zip(dirs, cfgs, strict=True)})
    return aligned


def align_rows(x, ref):
    """``x`` with ``ref``'s shape along the one axis where they differ: cut, or extended with
    ``ref``'s rows (cast to ``x``'s dtype). numpy or jax arrays."""
    if x.shape == ref.shape:
        return x
    axes = [i for i, (a, b) in enumerate(zip(x.shape, ref.shape, strict=True)) if a != b]
    if len(axes) != 1:
        raise ArchitectureMismatchError(f"--align-vocab: shapes {list(x.shape)} and "
                                        f"{list(ref.shape)} differ in more than one axis")
    ax, n, want = axes[0], x.shape[axes[0]], ref.shape[axes[0]]
    xp = np if isinstance(x, np.ndarray) else jnp
    if n > want:
        return xp.take(x, xp.arange(want), axis=ax)
    tail = xp.take(ref, xp.arange(n, want), axis=ax).astype(x.dtype)
    return xp.concatenate([x, tail], axis=ax)


def same_but_vocab(cfgs: Sequence, labels: Sequence[str], size: int) -> list:
    """The configs with ``vocab_size = size``, after checking they differ in nothing else
    (models merged onto one new vocabulary)."""
    out = [dataclasses.replace(c, vocab_size=size) for c in cfgs]
    for label, c in zip(labels, out, strict=True):
        if c != out[0]:
            raise ArchitectureMismatchError(f"{label} differs from {labels[0]} in more than its "
                                            "vocabulary size")
    return out


def vocab_keys(cfg) -> frozenset[str]:
    """The HF names of the tensors indexed by token (embeddings, output head): those whose
    canonical leaf has the ``vocab`` logical axis; token-major (axis 0) in the HF layout."""
    specs = transformer.param_specs(cfg)

    def axes(path):
        node = specs
        for p in path:
            node = node[p]
        return node.axes

    return frozenset(k for rule in rules_for(cfg) if "vocab" in axes(rule.targets[0])
                     for k, _ in expand(rule, cfg.num_hidden_layers))

"""Run a :class:`MergeSpec` on model references and write OUT as HF or Orbax.

Streamed (bounded memory) when every input is an HF checkpoint and OUT is HF; otherwise the
inputs are loaded (onto ``mesh`` if given), run in memory under jit, and saved.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence

import jax
import numpy as np

from jaxarith.arith import chat_templates
from jaxarith.arith.align import align_rows, aligned_configs, same_but_vocab
from jaxarith.arith.check import check_trees
from jaxarith.arith.memory import run
from jaxarith.arith.select import MergeSpec
from jaxarith.arith.stack import run_stack
from jaxarith.arith.stream import run_streamed
from jaxarith.arith.validate import check_settings, check_weights
from jaxarith.arith.vocab_merge import build_plan, permute
from jaxarith.errors import ConfigError
from jaxarith.io import paths
from jaxarith.io.atomic import check_destination
from jaxarith.io.convert.export import save_hf
from jaxarith.io.convert.hf import resolve_hf_dir
from jaxarith.io.convert.orbax import save_orbax
from jaxarith.io.refs import RefKind, load_model, ref_kind
from jaxarith.models import transformer
from jaxarith.models.config import load_config


def _check_params(spec: MergeSpec, refs: Sequence[str], kinds) -> None:
    """Settings type- and range-checked, weights resolved for every tensor of the first
    model's architecture, before any tensor is read (:mod:`jaxarith.arith.validate`)."""
    check_settings(spec)
    if "weight" not in spec.method.per_model_params:
        return
    first = refs[0] if kinds[0] is RefKind.ORBAX else resolve_hf_dir(refs[0])
    weighted = [os.fspath(r) for r in refs[len(refs) - spec.method.num_weighted(len(refs)):]]
    check_weights(spec, load_config(first), len(refs), labels=weighted)


def execute(
    spec: MergeSpec,
    refs: Sequence[str],
    out: str | os.PathLike,
    *,
    to: str = "hf",
    dtype=None,
    mesh=None,
    in_memory: bool = False,
    max_shard_size: str | int = "5GB",
    tokenizer_from: int = 0,
    chat_template: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    align_to: int | None = None,
    vocab=None,
) -> dict:
    """Apply ``spec`` to the models ``refs`` and write ``out``; returns a summary dict.

    Args:
      out: the output directory; a URL (``gs://``, any fsspec filesystem) is written locally,
        then uploaded marker last (:func:`jaxarith.io.paths.staged_output`).
      to: ``"hf"`` or ``"orbax"``.
      in_memory: load everything and run under jit even when streaming is possible.
      tokenizer_from: the input whose tokenizer files the output gets.
      chat_template: a Jinja template, or ``"auto"`` (see ``chat_templates``), set on that
        tokenizer as mergekit does (re-serialised by transformers); None: files copied as is.
      align_to: read every input with this input's embedding rows (tables that differ only in
        padded rows, one tokenizer: :mod:`jaxarith.arith.align`); None: shapes must be equal.
      vocab: the output's vocabulary as mergekit builds it (a
        :class:`~jaxarith.arith.vocab_merge.VocabSpec`: ``tokenizer_source`` / ``tokenizer:``);
        the output gets its tokenizer (with ``chat_template`` if given).
    """
    if to not in ("hf", "orbax"):
        raise ConfigError(f"--to {to!r}: expected 'hf' or 'orbax'")
    spec.check_inputs(len(refs))
    if paths.is_url(out):  # written locally, then uploaded marker last
        with paths.staged_output(out, kind=f"{spec.method.kind}", overwrite=overwrite) as local:
            info = execute(spec, refs, local, to=to, dtype=dtype, mesh=mesh,
                           in_memory=in_memory, max_shard_size=max_shard_size,
                           tokenizer_from=tokenizer_from, chat_template=chat_template,
                           progress=progress, align_to=align_to, vocab=vocab)
        return {**info, "out": os.fspath(out)}
    check_destination(out, overwrite, inputs=refs)  # never replace an input
    plan = None
    if vocab is not None:  # tokenizers only: before any tensor is read
        dirs = [r if k is RefKind.ORBAX else resolve_hf_dir(r)
                for r, k in zip(refs, (ref_kind(r) for r in refs), strict=True)]
        plan = build_plan(vocab, [os.fspath(r) for r in refs], dirs,
                          [load_config(d).vocab_size for d in dirs],
                          0 if spec.method.has_base else None)
    with tempfile.TemporaryDirectory(prefix="jaxarith_tokenizer_") as tmp:
        src = plan.save_tokenizer(os.path.join(tmp, "vocab")) if plan is not None else \
            chat_templates.ref_dir(refs[tokenizer_from]) if chat_template is not None else None
        src, template = _with_template(src, chat_template, refs, tmp)
        info = _execute(spec, refs, out, to, dtype, mesh, in_memory, max_shard_size,
                        tokenizer_from, src, overwrite, progress, align_to, plan)
    if plan is not None:
        info["vocab_size"] = plan.size
    return {**info, "chat_template": template} if template is not None else info


def _execute(spec, refs, out, to, dtype, mesh, in_memory, max_shard_size, tokenizer_from,
             tokenizer_dir, overwrite, progress, align_to=None, plan=None) -> dict:
    kinds = [ref_kind(r) for r in refs]
    _check_params(spec, refs, kinds)
    t0 = time.perf_counter()
    if to == "hf" and not in_memory and RefKind.ORBAX not in kinds:
        info = run_streamed(spec, refs, out, dtype=dtype, max_shard_size=max_shard_size,
                            tokenizer_from=tokenizer_from, tokenizer_dir=tokenizer_dir,
                            overwrite=overwrite, progress=progress, align_to=align_to,
                            vocab=plan)
        return {"executor": "streamed", "out": os.fspath(out), "to": to, **info}
    models = [load_model(r, mesh=mesh, progress=progress) for r in refs]
    trees = [m.params for m in models]
    cfg = models[0].config
    if align_to is not None:
        cfg = aligned_configs([m.config for m in models], [m.directory for m in models],
                              align_to)[0]
        trees = [jax.tree.map(align_rows, t, trees[align_to]) for t in trees]
    if plan is not None:  # every vocabulary leaf permuted onto the merged vocabulary
        cfg = same_but_vocab([m.config for m in models], [os.fspath(r) for r in refs],
                             plan.size)[0]
        trees = _permuted_trees(plan, cfg, trees)
    check_trees(trees, [os.fspath(r) for r in refs])
    tok_dir = tokenizer_dir or models[tokenizer_from].directory
    del models
    result = run(spec, cfg, trees, dtype=dtype)
    del trees
    if to == "hf":
        info = save_hf(cfg, result, out, max_shard_size=max_shard_size, tokenizer_dir=tok_dir,
                       overwrite=overwrite, progress=progress)
    else:
        save_orbax(cfg, result, out, tokenizer_dir=tok_dir, overwrite=overwrite)
        info = {}
    return {"executor": "memory", "out": os.fspath(out), "to": to,
            "seconds": time.perf_counter() - t0, **info}


def execute_stack(sc, out: str | os.PathLike, *, to: str = "hf",
                  max_shard_size: str | int = "5GB", overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Stack the layer ranges of a passthrough :class:`~jaxarith.arith.mergeconfig.StackConfig`
    into an HF checkpoint at ``out`` (a URL: staged, uploaded marker last); returns a summary."""
    if to != "hf":
        raise ConfigError("passthrough slices write HF safetensors (--to hf); convert the "
                          "output with `jaxarith convert` for Orbax")
    if paths.is_url(out):
        with paths.staged_output(out, kind="passthrough", overwrite=overwrite) as local:
            info = execute_stack(sc, local, max_shard_size=max_shard_size, progress=progress)
        return {**info, "out": os.fspath(out)}
    check_destination(out, overwrite, inputs=sc.models)
    tok_ref = sc.tokenizer_source or sc.base_model or sc.slices[0].model
    with tempfile.TemporaryDirectory(prefix="jaxarith_tokenizer_") as tmp:
        src = resolve_hf_dir(tok_ref) if sc.chat_template is None else \
            chat_templates.ref_dir(tok_ref)
        tok_dir, template = _with_template(src, sc.chat_template, [sc.slices[0].model], tmp)
        info = run_stack(sc.slices, out, base_model=sc.base_model, dtype=sc.out_dtype,
                         max_shard_size=max_shard_size, tokenizer_dir=tok_dir,
                         overwrite=overwrite, progress=progress)
    return {"executor": "streamed", "out": os.fspath(out), "to": "hf", **info,
            **({"chat_template": template} if template else {})}


def _with_template(src: str | None, chat_template: str | None, models, tmp: str
                   ) -> tuple[str | None, str | None]:
    """(tokenizer directory, template): ``src`` as it is without a ``chat_template``; else its
    tokenizer given the template (``auto``: the one most of ``models`` carry), staged in ``tmp``
    before any tensor work, so that a source without a tokenizer fails first."""
    if chat_template is None:
        return src, None
    template = chat_templates.auto(models) if chat_template == chat_templates.AUTO else \
        chat_template
    dst = os.path.join(tmp, "templated")
    chat_templates.stage_tokenizer(src, template, dst)
    return dst, template


def _permuted_trees(plan, cfg, trees):
    """The canonical trees with every leaf on the ``vocab`` logical axis permuted onto the
    merged vocabulary (on the host; placed like the first model's leaf)."""
    axes = transformer.param_axes(cfg)
    flat = [jax.tree_util.tree_flatten_with_path(t)[0] for t in trees]
    treedef = jax.tree.structure(trees[0])
    ax_leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    out = [[] for _ in trees]
    for j, ax in enumerate(ax_leaves):
        leaves = [f[j][1] for f in flat]
        if "vocab" in ax:
            new = permute(plan, [np.asarray(x) for x in leaves], axis=ax.index("vocab"))
            sharding = getattr(leaves[0], "sharding", None)
            new = [jax.device_put(x, sharding) if sharding is not None else x for x in new]
        else:
            new = leaves
        for i, x in enumerate(new):
            out[i].append(x)
    return [jax.tree.unflatten(treedef, o) for o in out]

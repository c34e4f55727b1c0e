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

from jaxarith.arith import chat_templates
from jaxarith.arith.align import align_rows, aligned_configs
from jaxarith.arith.check import check_trees
from jaxarith.arith.memory import run
from jaxarith.arith.select import MergeSpec
from jaxarith.arith.stack import run_stack
from jaxarith.arith.stream import run_streamed
from jaxarith.arith.validate import check_settings, check_weights
from jaxarith.errors import ConfigError
from jaxarith.io import paths
from jaxarith.io.atomic import check_destination
from jaxarith.io.convert.export import save_hf
from jaxarith.io.convert.hf import resolve_hf_dir
from jaxarith.io.convert.orbax import save_orbax
from jaxarith.io.refs import RefKind, load_model, ref_kind
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
    """
    if to not in ("hf", "orbax"):
        raise ConfigError(f"--to {to!r}: expected 'hf' or 'orbax'")
    spec.check_inputs(len(refs))
    if paths.is_url(out):  # written locally, then uploaded marker last
        with paths.staged_output(out, kind=f"{spec.method.kind}", overwrite=overwrite) as local:
            info = execute(spec, refs, local, to=to, dtype=dtype, mesh=mesh,
                           in_memory=in_memory, max_shard_size=max_shard_size,
                           tokenizer_from=tokenizer_from, chat_template=chat_template,
                           progress=progress, align_to=align_to)
        return {**info, "out": os.fspath(out)}
    check_destination(out, overwrite, inputs=refs)  # never replace an input
    if chat_template is None:
        return _execute(spec, refs, out, to, dtype, mesh, in_memory, max_shard_size,
                        tokenizer_from, None, overwrite, progress, align_to)
    template = chat_templates.auto(refs) if chat_template == chat_templates.AUTO else \
        chat_template
    with tempfile.TemporaryDirectory(prefix="jaxarith_tokenizer_") as tok_dir:
        # before any tensor work: a source without a tokenizer fails here
        chat_templates.stage_tokenizer(chat_templates.ref_dir(refs[tokenizer_from]), template,
                                       tok_dir)
        info = _execute(spec, refs, out, to, dtype, mesh, in_memory, max_shard_size,
                        tokenizer_from, tok_dir, overwrite, progress, align_to)
    return {**info, "chat_template": template}


def _execute(spec, refs, out, to, dtype, mesh, in_memory, max_shard_size, tokenizer_from,
             tokenizer_dir, overwrite, progress, align_to=None) -> dict:
    kinds = [ref_kind(r) for r in refs]
    _check_params(spec, refs, kinds)
    t0 = time.perf_counter()
    if to == "hf" and not in_memory and RefKind.ORBAX not in kinds:
        info = run_streamed(spec, refs, out, dtype=dtype, max_shard_size=max_shard_size,
                            tokenizer_from=tokenizer_from, tokenizer_dir=tokenizer_dir,
                            overwrite=overwrite, progress=progress, align_to=align_to)
        return {"executor": "streamed", "out": os.fspath(out), "to": to, **info}
    models = [load_model(r, mesh=mesh, progress=progress) for r in refs]
    trees = [m.params for m in models]
    cfg = models[0].config
    if align_to is not None:
        cfg = aligned_configs([m.config for m in models], [m.directory for m in models],
                              align_to)[0]
        trees = [jax.tree.map(align_rows, t, trees[align_to]) for t in trees]
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
    with tempfile.TemporaryDirectory(prefix="jaxarith_tokenizer_") as tok_dir:
        template = None
        if sc.chat_template is not None:
            template = chat_templates.auto([sc.slices[0].model]) \
                if sc.chat_template == chat_templates.AUTO else sc.chat_template
            chat_templates.stage_tokenizer(chat_templates.ref_dir(tok_ref), template, tok_dir)
        info = run_stack(sc.slices, out, base_model=sc.base_model, dtype=sc.out_dtype,
                         max_shard_size=max_shard_size,
                         tokenizer_dir=tok_dir if template else resolve_hf_dir(tok_ref),
                         overwrite=overwrite, progress=progress)
    return {"executor": "streamed", "out": os.fspath(out), "to": "hf", **info,
            **({"chat_template": template} if template else {})}

"""Run a :class:`MergeSpec` on model references and write OUT as HF or Orbax.

Streamed (bounded memory) when every input is an HF checkpoint and OUT is HF; otherwise the
inputs are loaded (onto ``mesh`` if given), run in memory under jit, and saved.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from jaxarith.arith.check import check_trees
from jaxarith.arith.memory import run
from jaxarith.arith.select import MergeSpec
from jaxarith.arith.stream import run_streamed
from jaxarith.arith.validate import check_settings, check_weights
from jaxarith.atomic import check_destination
from jaxarith.errors import ConfigError


def _check_params(spec: MergeSpec, refs: Sequence[str], kinds) -> None:
    """Settings type- and range-checked, weights resolved for every tensor of the first
    model's architecture, before any tensor is read (:mod:`jaxarith.arith.validate`)."""
    from jaxarith.convert.hf import resolve_hf_dir
    from jaxarith.models.config import load_config
    from jaxarith.refs import RefKind

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
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Apply ``spec`` to the models ``refs`` and write ``out``; returns a summary dict.

    Args:
      to: ``"hf"`` or ``"orbax"``.
      in_memory: load everything and run under jit even when streaming is possible.
    """
    from jaxarith.refs import RefKind, load_model, ref_kind

    if to not in ("hf", "orbax"):
        raise ConfigError(f"--to {to!r}: expected 'hf' or 'orbax'")
    spec.check_inputs(len(refs))
    check_destination(out, overwrite, inputs=refs)  # never replace an input
    kinds = [ref_kind(r) for r in refs]
    _check_params(spec, refs, kinds)
    t0 = time.perf_counter()
    if to == "hf" and not in_memory and RefKind.ORBAX not in kinds:
        info = run_streamed(spec, refs, out, dtype=dtype, max_shard_size=max_shard_size,
                            tokenizer_from=tokenizer_from, overwrite=overwrite,
                            progress=progress)
        return {"executor": "streamed", "out": os.fspath(out), "to": to, **info}
    models = [load_model(r, mesh=mesh, progress=progress) for r in refs]
    check_trees([m.params for m in models], [os.fspath(r) for r in refs])
    cfg = models[0].config
    tok_dir = models[tokenizer_from].directory
    trees = [m.params for m in models]
    del models
    result = run(spec, cfg, trees, dtype=dtype)
    del trees
    if to == "hf":
        from jaxarith.convert.export import save_hf

        info = save_hf(cfg, result, out, max_shard_size=max_shard_size, tokenizer_dir=tok_dir,
                       overwrite=overwrite, progress=progress)
    else:
        from jaxarith.convert.orbax import save_orbax

        save_orbax(cfg, result, out, tokenizer_dir=tok_dir, overwrite=overwrite)
        info = {}
    return {"executor": "memory", "out": os.fspath(out), "to": to,
            "seconds": time.perf_counter() - t0, **info}

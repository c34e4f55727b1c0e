"""Layer stacking (mergekit's ``passthrough`` with ``slices``): frankenmerges.

A config stacks layer ranges of one or more models into a model with the summed number of
layers, as mergekit 0.1.5 does::

    merge_method: passthrough
    slices:
      - sources:
          - model: path/to/a
            layer_range: [0, 24]        # layers 0..23 of a
      - sources:
          - model: path/to/b
            layer_range: [8, 32]        # then layers 8..31 of b
            parameters:
              scale:                    # optional, per tensor (filters) and per layer (lists)
                - filter: o_proj
                  value: 0.5
                - value: 1.0
    dtype: bfloat16

Rules (mergekit's): every slice has exactly one source (passthrough takes one model per
tensor); the embedding comes from the first slice's model, the final norm and the output head
from the last slice's; the output config is ``base_model``'s, else the first slice's model's,
with ``num_hidden_layers`` set to the total (and per-layer HF lists dropped, as for
inheritance). ``scale`` multiplies a tensor (float32, rounded once to the output dtype); its
filters match the output tensor's name and a list of numbers is interpolated over the slice's
layers (``t = i / (n - 1)``). Tensors are copied, streamed one at a time, bit for bit when no
scale and no dtype apply.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxarith.arith.check import check_shapes
from jaxarith.arith.select import resolve
from jaxarith.arith.stream import hf_dirs
from jaxarith.arith.validate import setting_numbers
from jaxarith.errors import ArchitectureMismatchError, ConfigError
from jaxarith.io.convert.export import write_hf
from jaxarith.io.convert.hf import HFCheckpoint, check_checkpoint
from jaxarith.io.convert.keymap import expand, rules_for
from jaxarith.models import registry
from jaxarith.models.config import load_config

# ``jaxarith merge --list-methods``'s entry (the shape of methods.describe)
DESCRIPTION = {
    "name": "passthrough", "summary": "layer ranges of models stacked into one model (slices "
    "with one source each: frankenmerges)", "base_model": "optional", "models": {"min": 1,
                                                                                 "max": None},
    "parameters": {}, "model_parameters": {"scale": 1.0}, "options": {}}


@dataclasses.dataclass(frozen=True)
class StackSlice:
    """Layers ``[start, end)`` of ``model``, optionally scaled (mergekit's ``scale`` setting)."""

    model: str
    start: int
    end: int
    scale: Any = None

    @property
    def num_layers(self) -> int:
        return self.end - self.start


# canonical leaves that belong before the layers (mergekit's pre-weights); every other leaf
# outside the layers is a post-weight (final norm, output head)
_PRE = frozenset({"embed", "pos_embed"})


def parse_slices(slices: Any) -> tuple[StackSlice, ...]:
    """The slices of a passthrough config, type-checked (names the slice at fault)."""
    if not isinstance(slices, list) or not slices:
        raise ConfigError("passthrough: 'slices' must be a non-empty list of {sources: [...]}")
    out = []
    for i, s in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(s, dict) or set(s) - {"sources"} or \
                not isinstance(s.get("sources"), list):
            raise ConfigError(f"{where}: expected {{sources: [{{model, layer_range}}]}}")
        if len(s["sources"]) != 1:
            raise ConfigError(f"{where}: passthrough takes exactly one source per slice, got "
                              f"{len(s['sources'])}")
        src = s["sources"][0]
        where += ".sources[0]"
        if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
            raise ConfigError(f"{where}: expected {{model: ..., layer_range: [start, end]}}")
        unknown = set(src) - {"model", "layer_range", "parameters"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        lr = src["layer_range"]
        if (not isinstance(lr, list | tuple) or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                or not 0 <= lr[0] < lr[1]):
            raise ConfigError(f"{where}: layer_range {lr!r}: expected [start, end] with "
                              "0 <= start < end")
        params = src.get("parameters") or {}
        if not isinstance(params, dict) or set(params) - {"scale"}:
            raise ConfigError(f"{where}.parameters: passthrough takes only 'scale', got "
                              f"{sorted(params) if isinstance(params, dict) else params!r}")
        scale = params.get("scale")
        if scale is not None:
            setting_numbers(scale, f"{where}.parameters.scale")
        out.append(StackSlice(str(src["model"]), int(lr[0]), int(lr[1]), scale))
    return tuple(out)


def _layer_source(slices: Sequence[StackSlice], j: int) -> tuple[StackSlice, int]:
    """(the slice holding output layer ``j``, its offset in the slice)."""
    for s in slices:
        if j < s.num_layers:
            return s, j
        j -= s.num_layers
    raise IndexError(j)


def run_stack(
    slices: Sequence[StackSlice],
    dst: str | os.PathLike,
    *,
    base_model: str | None = None,
    dtype=None,
    max_shard_size: str | int = "5GB",
    tokenizer_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Stack the layer ranges ``slices`` into an HF checkpoint at ``dst`` (see module doc).

    Returns:
      {"tensors", "files", "layers", "bytes_written", "seconds"}.
    Raises:
      ConfigError, ArchitectureMismatchError: before anything is written.
    """
    t0 = time.perf_counter()
    refs = list(dict.fromkeys([s.model for s in slices] + ([base_model] if base_model else [])))
    dirs = dict(zip(refs, hf_dirs(refs, "passthrough slices read"), strict=True))
    cfgs = {r: load_config(dirs[r]) for r in refs}
    for i, s in enumerate(slices):
        n = cfgs[s.model].num_hidden_layers
        if s.end > n:
            raise ConfigError(f"slices[{i}]: layer_range [{s.start}, {s.end}] is beyond the "
                              f"{n} layers of {s.model}")
    fams = {registry.family(c) for c in cfgs.values()}
    if len({f.arch for f in fams}) > 1:
        raise ArchitectureMismatchError("passthrough slices: models differ in architecture: "
                                        + ", ".join(f"{r}: {c.arch}" for r, c in cfgs.items()))
    fam = fams.pop()
    # one layer each: every model's tensors must have the same shapes
    one = [fam.with_depth(cfgs[r], 1) for r in refs]
    check_shapes([{k: rule.hf_shape for rule in rules_for(c) for k, _ in expand(rule, 1)}
                  for c in one], refs)
    total = sum(s.num_layers for s in slices)
    out_cfg = fam.with_depth(cfgs[base_model or slices[0].model], total)
    ckpts = {r: HFCheckpoint(dirs[r]) for r in refs}
    names = {r: check_checkpoint(cfgs[r], ckpts[r]) for r in refs}
    out_dtype = np.dtype(dtype) if dtype is not None else None

    plan = []  # (output key, source model, source key, slice, t)
    for rule in rules_for(out_cfg):
        for key, index in expand(rule, total):
            if index is None:
                s = slices[0] if rule.targets[0][0] in _PRE else slices[-1]
                plan.append((key, s.model, key, s, 0.0))
                continue
            layer, expert = index if isinstance(index, tuple) else (index, None)
            s, off = _layer_source(slices, layer)
            src = s.start + off
            plan.append((key, s.model, rule.key(src if expert is None else (src, expert)), s,
                         off / (s.num_layers - 1) if s.num_layers > 1 else 1.0))
    specs = []
    for key, model, src_key, _, _ in plan:
        ck, nm = ckpts[model], names[model][src_key]
        specs.append((key, ck.shape(nm), out_dtype or ck.dtype(nm)))

    def tensors() -> Iterator[np.ndarray]:
        bar = tqdm(total=len(plan), desc="passthrough", unit="tensor", disable=not progress,
                   leave=False)
        for (key, model, src_key, s, t), (_, _, dt) in zip(plan, specs, strict=True):
            x = ckpts[model].view(names[model][src_key])
            scale = None if s.scale is None else resolve(s.scale, [key], t, "scale")
            if scale is not None and scale != 1.0:
                x = (x.astype(np.float32) * np.float32(scale)).astype(dt)
            elif x.dtype != dt:
                x = x.astype(dt)
            yield np.ascontiguousarray(x)
            bar.update()
        bar.close()

    tok = tokenizer_dir or dirs[base_model or slices[0].model]
    info = write_hf(out_cfg, dst, specs, tensors(), max_shard_size=max_shard_size,
                    tokenizer_dir=tok, overwrite=overwrite, progress=False, host_only=True)
    return {"tensors": len(plan), "files": info["files"], "layers": total,
            "bytes_written": info["bytes_written"], "seconds": time.perf_counter() - t0}

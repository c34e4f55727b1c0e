"""Merge configurations in YAML, with mergekit's field names so existing configs run unchanged.

Example (mergekit's own format)::

    merge_method: ties            # any of methods.MERGE_METHODS (`jaxarith merge --list-methods`)
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 1.0, density: 0.5}
      - model: ./code
        parameters:
          weight: [0.2, 0.8]                    # schedule over depth
          density: [{filter: mlp, value: 0.7}, {value: 0.5}]
    parameters: {normalize: true, lambda: 1.0}
    out_dtype: bfloat16

SLERP is usually written with ``slices`` (one slice whose sources cover all layers) and
``parameters: {t: ...}``; ``t = 0`` is ``base_model``. jaxarith extensions: ``include`` /
``exclude`` (lists of tensor patterns), ``seed`` (DARE), ``consensus`` (``sum`` / ``count``).

``chat_template`` (``auto``, a built-in name or a Jinja template) is set on the output's tokenizer
as mergekit does (``chat_templates.py``). ``tokenizer_source: base | union | <model>`` and the
``tokenizer:`` section (``source``, ``tokens``, ``pad_to_multiple_of``) build the output's
vocabulary as mergekit does (``vocab_merge.py``): every model's embedding and output rows are
permuted onto it before the merge.

Dtypes, as in mergekit: every input is rounded to ``dtype`` before the arithmetic and the result
is written in ``out_dtype``, falling back to ``dtype`` (neither given: each tensor keeps the first
input's dtype). The arithmetic itself is always float32 (mergekit's TIES/DARE run in ``dtype``).
``int8_mask`` is accepted and ignored (it only saves memory in mergekit).

``merge_method: passthrough`` with several ``slices`` stacks layer ranges (frankenmerges,
:mod:`jaxarith.arith.stack`); it parses to a :class:`StackConfig`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jaxarith.arith import chat_templates
from jaxarith.arith.methods import MERGE_METHODS, Kind, method, option_names, optional_base
from jaxarith.arith.select import MergeSpec, Selection
from jaxarith.arith.stack import StackSlice, parse_slices
from jaxarith.arith.validate import check_settings
from jaxarith.arith.vocab_merge import VocabSpec, parse_vocab
from jaxarith.configfile import load_yaml, short
from jaxarith.errors import ConfigError

_IGNORED_PARAMS = {"int8_mask"}
_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype",
             "out_dtype", "tokenizer_source", "include", "exclude", "seed", "name",
             "chat_template", "tokenizer"}
_METHODS = {str(k) for k in MERGE_METHODS}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """A parsed merge config: the spec, the model references in order, output options."""

    spec: MergeSpec
    models: tuple[str, ...]
    out_dtype: str | None = None
    tokenizer_source: int = 0  # index into models
    chat_template: str | None = None  # the template text, or "auto" (chat_templates.parse)
    layer_ranges: tuple[tuple[str, tuple[int, int]], ...] = ()  # (model, range) from `slices`
    vocab: VocabSpec | None = None  # tokenizer_source / tokenizer: (vocab_merge.py)

    def check_layer_ranges(self, num_layers: int) -> None:
        """Raise unless every ``layer_range`` covers all ``num_layers`` layers of the models.

        A partial range would build a model with fewer layers (mergekit's layer stacking),
        which jaxarith does not do; merging all layers instead would be a silent wrong result.
        """
        for ref, (lo, hi) in self.layer_ranges:
            if (lo, hi) != (0, num_layers):
                raise ConfigError(f"slices: layer_range [{lo}, {hi}] of {ref} does not cover all "
                                  f"{num_layers} layers (expected [0, {num_layers}]); partial "
                                  "slices stack layers: merge_method: passthrough")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackConfig:
    """A parsed ``passthrough`` config: layer ranges stacked into one model
    (:func:`jaxarith.arith.stack.run_stack`)."""

    slices: tuple[StackSlice, ...]
    base_model: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # a model of the slices (default: base or first)
    chat_template: str | None = None

    @property
    def models(self) -> tuple[str, ...]:
        """Every model the config reads (slice order, then the base)."""
        refs = [s.model for s in self.slices] + ([self.base_model] if self.base_model else [])
        return tuple(dict.fromkeys(refs))


_STACK_KEYS = {"merge_method", "base_model", "slices", "dtype", "out_dtype", "tokenizer_source",
               "name", "chat_template"}


def _parse_passthrough(data: dict) -> StackConfig:
    unknown = set(data) - _STACK_KEYS
    if "models" in unknown:
        raise ConfigError("passthrough: give 'slices' (layer ranges to stack); a passthrough of "
                          "whole 'models' is a copy (jaxarith convert)")
    if unknown:
        raise ConfigError(f"passthrough: unsupported field(s) {short(sorted(map(str, unknown)))}"
                          f" (it takes {sorted(_STACK_KEYS)})")
    slices = parse_slices(data.get("slices"))
    base = data.get("base_model")
    base = str(base) if base is not None else None
    tok = data.get("tokenizer_source")
    refs = [s.model for s in slices] + ([base] if base else [])
    if tok is not None and tok != "base" and tok not in refs:
        raise ConfigError(f"tokenizer_source {short(tok)} is not one of the stacked models "
                          "(or 'base')")
    chat_template = data.get("chat_template")
    if chat_template is not None:
        chat_template = chat_templates.parse(chat_template)
    return StackConfig(slices=slices, base_model=base,
                       out_dtype=data.get("out_dtype") or data.get("dtype"),
                       tokenizer_source=None if tok in (None, "base") else str(tok),
                       chat_template=chat_template)


def _model_ref(entry: Any, where: str) -> tuple[str, dict]:
    if isinstance(entry, str):
        return entry, {}
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"{where}: expected {{model: ..., parameters: ...}}, got "
                          f"{short(entry)}")
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: parameters: expected a mapping, got {short(params)}")
    return str(entry["model"]), dict(params)


def _inputs(cfg: dict) -> list[tuple[str, dict]]:
    if cfg.get("models") and cfg.get("slices"):
        raise ConfigError("merge config: give either 'models' or 'slices', not both")
    if cfg.get("models"):
        return [_model_ref(m, f"models[{i}]") for i, m in enumerate(cfg["models"])]
    slices = cfg.get("slices")
    if not slices:
        raise ConfigError("merge config: no 'models' (nor 'slices') to merge")
    if len(slices) != 1:
        raise ConfigError(f"merge config: {len(slices)} slices: stacking layer ranges is "
                          "merge_method: passthrough (one source per slice); other methods take "
                          "one slice covering all layers")
    out = []
    for i, src in enumerate(slices[0].get("sources") or []):
        ref, params = _model_ref(src, f"slices[0].sources[{i}]")
        lr = src.get("layer_range")
        if lr is not None:
            if (not isinstance(lr, list | tuple) or len(lr) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
                raise ConfigError(f"slices[0].sources[{i}]: layer_range {lr!r}: expected "
                                  "[first, end] integers")
            if lr[0] != 0:
                raise ConfigError(f"slices[0].sources[{i}]: layer_range {list(lr)} must start at "
                                  "0 (all layers; stacking partial ranges is merge_method: "
                                  "passthrough)")
            params = {**params, "__layer_range": (int(lr[0]), int(lr[1]))}
        out.append((ref, params))
    return out


def parse_merge_config(data: dict) -> MergeConfig | StackConfig:
    """A :class:`MergeConfig` from the mapping of a YAML merge config (see module doc); a
    :class:`StackConfig` for ``merge_method: passthrough``."""
    if not isinstance(data, dict):
        raise ConfigError("merge config: expected a mapping at the top level")
    if data.get("merge_method") == "passthrough":
        return _parse_passthrough(data)
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"merge config: unknown field(s) {short(sorted(map(str, unknown)))}")
    name = data.get("merge_method")
    if not isinstance(name, str) or name not in _METHODS:
        raise ConfigError(f"merge_method {short(name)}: supported are {sorted(_METHODS)}")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"parameters: expected a mapping, got {short(params)}")
    params = dict(params)
    static = option_names(name)
    options = {k: params.pop(k) for k in list(params) if k in static}
    for k in _IGNORED_PARAMS:
        if not isinstance(params.pop(k, False), bool):
            raise ConfigError(f"parameters: {k}: expected true or false")
    if "consensus" in data:
        options["consensus"] = data["consensus"]
    for k in ("normalize", "rescale"):  # mergekit's types: booleans, not strings or numbers
        if k in options and not isinstance(options[k], bool):
            raise ConfigError(f"parameters: {k}: expected true or false, got {short(options[k])}")
    if "consensus" in options and not isinstance(options["consensus"], str):
        raise ConfigError("consensus: expected 'sum' or 'count', got "
                          f"{short(options['consensus'])}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: expected an integer, got {short(seed)}")
    for k in ("include", "exclude"):
        v = data.get(k) or ()
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{k}: expected a list of tensor name patterns, got {short(v)}")
    dtype = data.get("dtype")
    base = data.get("base_model")
    base = str(base) if base is not None else None
    if optional_base(name):
        options["base"] = base is not None
    m = method(name, merge_dtype=dtype, **options)
    inputs = _inputs(data)
    ranges = tuple((r, p.pop("__layer_range")) for r, p in inputs if "__layer_range" in p)
    if m.has_base or m.kind is Kind.SLERP:
        if base is None:
            raise ConfigError(f"{name}: 'base_model' is required")
        others = [(r, p) for r, p in inputs if r != base]
        if m.kind is Kind.SLERP and len(others) != 1:
            raise ConfigError(f"slerp: needs base_model and exactly one other model, got "
                              f"{[r for r, _ in others]}")
        refs = [base] + [r for r, _ in others]
        model_params = [p for _, p in others]
    else:
        refs = [r for r, _ in inputs]
        model_params = [p for _, p in inputs]
        if m.kind is Kind.KARCHER and base is not None and base not in refs:
            refs.append(base)  # mergekit adds a base_model missing from the inputs, last
            model_params.append({})
    per_names = m.per_model_params
    shared = {k: v for k, v in params.items() if k not in per_names}
    defaults = {k: v for k, v in params.items() if k in per_names}
    per_model = ()
    if per_names:
        per_model = tuple({**defaults, **{k: v for k, v in p.items() if k in per_names}}
                          for p in model_params)
        for i, p in enumerate(model_params):
            extra = set(p) - set(per_names) - _IGNORED_PARAMS
            if extra:
                raise ConfigError(f"{name}: model {refs[-len(model_params) + i]}: unknown "
                                  f"parameter(s) {sorted(extra)}")
    spec = MergeSpec(method=m, shared=shared, per_model=per_model,
                     selection=Selection(include=tuple(data.get("include") or ()),
                                         exclude=tuple(data.get("exclude") or ())),
                     seed=seed)
    spec.check_inputs(len(refs))
    chat_template = data.get("chat_template")
    if chat_template is not None:
        chat_template = chat_templates.parse(chat_template)
    check_settings(spec, labels=list(refs[len(refs) - len(model_params):]))
    vocab = parse_vocab(data)
    for where, ref in ([("tokenizer source", vocab.source)] if vocab else []) + [
            (f"tokenizer.tokens[{t!r}].source", c["source"] if isinstance(c.get("source"), str)
             else c["source"].get("model")) for t, c in (vocab.tokens if vocab else ())
            if isinstance(c.get("source"), str | dict)]:
        if ref is not None and ref not in ("base", "union") and ref not in refs:
            raise ConfigError(f"{where}: {ref!r} is not one of the merged models")
    if vocab is not None and vocab.source == "base" and base is None and not m.has_base:
        pass  # mergekit: the first model stands in for the base
    out_dtype = data.get("out_dtype") or dtype
    return MergeConfig(spec=spec, models=tuple(refs), out_dtype=out_dtype,
                       chat_template=chat_template, layer_ranges=ranges, vocab=vocab)


def load_merge_config(path: str | os.PathLike) -> MergeConfig | StackConfig:
    """Read and parse a YAML merge config file."""
    data = load_yaml(path, "merge config")
    try:
        return parse_merge_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None

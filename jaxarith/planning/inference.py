"""Plan generation and lm-eval scoring for a TPU slice: compile exactly the programs that
``jaxarith generate`` and ``jaxarith lm-eval`` jit, for abstract parameters (no weights read, no
TPU needed), and report what one chip holds.

    jaxarith plan --program generate Qwen/Qwen2.5-7B --topology v5e-8 --batch 16 \\
        --prompt-len 1024 --max-new-tokens 256 --dtype bfloat16 --json

Programs compiled:

- generation (one model, proxy tuning, EFT: every member model's parameters and KV cache in one
  program): ``prefill``, the prompts' forward passes into static-length caches and the first
  token, and ``decode``, the token loop over the caches (state donated) that produces the rest:
  the two programs ``generate`` runs when it streams (:func:`jaxarith.decode.loop.stream_chunks`;
  its one-program path holds the same two phases);
- speculative EFT: the same pair of :mod:`jaxarith.decode.speculative` (draft and target models,
  caches ``k + 1`` slots longer for the drafts);
- lm-eval: the scorer (:func:`jaxarith.eval.lmeval.scoring._score_packed`) at its largest shape,
  ``batch`` packed rows of ``max_length`` slots (at least ``scoring.MIN_ROW``), every slot scored.

Parameters are ``jax.ShapeDtypeStruct`` with the shardings the loaders give them
(:func:`jaxarith.models.transformer.abstract_params` on the mesh, in ``dtype``); prompt arrays
are sharded over the batch as :func:`jaxarith.decode.loop.place_prompts` places them. A model is
any reference ``generate`` takes (HF directory, hub id: only its ``config.json`` is fetched,
Orbax directory), a path to a ``config.json``, or a name of
:data:`jaxarith.models.presets.PRESETS` (no network), so an 8B plan needs no weights.

Per chip: ``params`` (``params_per_model`` by role), ``kv_cache`` (keys and values of every
member's cache: ``2 x layers x batch x kv_heads x cache_len x head_dim x itemsize`` divided by
their sharding), ``batch`` (prompt or scored-row arrays), and from the compiled programs'
``memory_analysis()`` their ``argument``, ``output``, ``alias``, ``temp`` and ``total``;
``per_chip_bytes.temp`` and ``total`` are those of the program that needs the most (the programs
run one after the other). Parameters and caches that alone exceed a chip's HBM are refused
before compiling (:class:`~jaxarith.planning.slices.DoesNotFitError`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxarith import sharding
from jaxarith.decode import loop, speculative
from jaxarith.decode.loop import DecodeSpec, Member
from jaxarith.errors import ConfigError
from jaxarith.io import refs
from jaxarith.models.config import ModelConfig, config_from_hf
from jaxarith.models.layers import KVCache
from jaxarith.models.presets import PRESETS, preset
from jaxarith.models.transformer import CACHE_AXES, abstract_params, init_cache
from jaxarith.planning.slices import (
    Slice,
    chip_bytes,
    collectives,
    libtpu_version,
    memory,
    refuse_if_compiler_out_of_memory,
    refuse_if_over,
    topology_devices,
)


def model_config(ref: str) -> ModelConfig:
    """The config of a model reference, a ``config.json`` path or a preset name (no weights)."""
    if ref in PRESETS:
        return preset(ref)
    if os.path.isfile(ref) and ref.endswith(".json"):
        with open(ref) as f:
            return config_from_hf(json.load(f))
    return refs.load_config(ref)


def abstract_cache(cfg: ModelConfig, batch: int, length: int, dtype, mesh) -> KVCache:
    """A member's KV cache as ``ShapeDtypeStruct`` sharded by the logical rules (as
    :func:`jaxarith.decode.loop.constrain_cache` shards it)."""
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, length, jnp.dtype(dtype)))
    return jax.tree.map(lambda a, axes: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=sharding.named_sharding(mesh, axes, a.shape, name="kv cache")),
        cache, CACHE_AXES)


def _replicated(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _rows(mesh, shape) -> jax.ShapeDtypeStruct:
    """An int32 [B, T] input sharded over the batch (:func:`jaxarith.decode.loop.place_prompts`)."""
    return jax.ShapeDtypeStruct(shape, jnp.int32,
                                sharding=sharding.named_sharding(mesh, ("batch", "seq"), shape))


def _outputs(compiled, index: int):
    """The ``index``-th output of a compiled program as sharded ``ShapeDtypeStruct``."""
    return jax.tree.map(lambda i, s: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=s),
                        compiled.out_info[index], compiled.output_shardings[index])


def _advice(part: str, mesh) -> str:
    axes = ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names if mesh.shape[a] > 1)
    if part == "params":
        return (f"--dtype bfloat16, a larger fsdp or tensor axis (--mesh now "
                f"{axes or 'one device'}; fsdp=-1 shards over every chip) or a larger slice")
    if part == "kv_cache":
        return ("a smaller --batch or shorter lengths, or more chips over the batch "
                "(data/fsdp) or kv heads (tensor)")
    return "a smaller --batch or shorter lengths"


def _mesh(sl: Slice, mesh_spec: str):
    return sharding.make_mesh(mesh_spec, devices=topology_devices(sl))


def _vocab_limit(members: Sequence[Member]) -> int | None:
    """Members whose tables are padded differently combine over the smallest table (the
    command takes the tokenizer's length, which is at most that)."""
    sizes = {m.config.vocab_size for m in members}
    return min(sizes) if len(sizes) > 1 else None


def _result(sl: Slice, mesh, members: Sequence[Member], program: str, parts: dict[str, int],
            programs: dict[str, Any], texts: Sequence[str], compile_s: float,
            **extra) -> dict[str, Any]:
    """The plan's JSON object (the train plan's keys where they apply)."""
    peak = max(programs, key=lambda k: programs[k]["total"])
    per_chip = {**parts, "temp": programs[peak]["temp"], "argument": programs[peak]["argument"],
                "output": programs[peak]["output"], "alias": programs[peak]["alias"],
                "total": programs[peak]["total"]}
    merged: dict[str, dict[str, int]] = {}
    for text in texts:
        for kind, v in collectives(text).items():
            entry = merged.setdefault(kind, {"count": 0, "bytes": 0})
            entry["count"] += v["count"]
            entry["bytes"] += v["bytes"]
    fits = per_chip["total"] <= sl.hbm_bytes
    largest = max((k for k in parts if k != "params_per_model"), key=lambda k: per_chip[k])
    largest = "temp" if per_chip["temp"] > per_chip[largest] else largest
    return {
        "program": program, "topology": sl.name, "topology_name": sl.topology,
        "slices": sl.num_slices, "chips": sl.total_chips, "hbm_bytes": sl.hbm_bytes,
        "fits": fits, "per_chip_bytes": per_chip,
        "params_per_model": {f"{i}:{m.role}": chip_bytes(p) for i, (m, p) in
                             enumerate(zip(members, extra.pop("params"), strict=True))},
        "programs": programs, "peak_program": peak, "compile_seconds": round(compile_s, 1),
        "collectives": dict(sorted(merged.items())),
        "mesh": {a: int(mesh.shape[a]) for a in mesh.axis_names},
        **extra, "model_types": [m.config.model_type for m in members],
        "jax": jax.__version__, "libtpu": libtpu_version(), "largest": largest,
        "advice": None if fits else _advice(largest, mesh),
    }


def plan_generate(members: Sequence[Member], sl: Slice, *, mesh_spec: str = "fsdp=-1",
                  batch: int, prompt_len: int, max_new_tokens: int, dtype: str = "float32",
                  speculative_k: int = 0, drafter: int = 1) -> dict[str, Any]:
    """Compile ``generate``'s prefill and decode programs for the slice (see the module doc).

    Args:
      members: the combined models (``jaxarith.decode.combine.members_for``).
      batch, prompt_len, max_new_tokens: prompts per call, their (longest) length in tokens
        (padded up to the decoder's prompt bucket, as ``generate`` pads), tokens generated.
      speculative_k, drafter: draft this many tokens per round with this member (0: plain).
    Raises:
      DoesNotFitError: the parameters and caches alone exceed a chip's HBM (before compiling).
    """
    mesh = _mesh(sl, mesh_spec)
    dec = DecodeSpec(members=tuple(members), max_new_tokens=max_new_tokens, dtype=dtype,
                     vocab_limit=_vocab_limit(members))
    extra = speculative_k + 1 if speculative_k else 0
    # the command's own checks (context length, cache) and padding, on placeholder prompts
    padded = loop.prepare_prompts(dec, np.ones((batch, prompt_len), np.int32), extra)
    cache_len = padded[0][0].shape[1] + max_new_tokens + extra
    params = tuple(abstract_params(m.config, jnp.dtype(dtype), mesh) for m in members)
    caches = [abstract_cache(m.config, batch, cache_len, dtype, mesh) for m in members]
    prompts = tuple((_rows(mesh, t.shape), _rows(mesh, t.shape)) for t, _ in padded)
    parts = {"params": chip_bytes(params), "kv_cache": chip_bytes([(c.k, c.v) for c in caches])}
    refuse_if_over(sl, parts, "the resident state (weights, KV caches)",
                   lambda part: _advice(part, mesh))
    parts["batch"] = chip_bytes(prompts)
    weights = _replicated(mesh, (len(members),), jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = _replicated(mesh, key.shape, key.dtype)
    limits = _replicated(mesh, (batch,), jnp.int32)
    if speculative_k:
        spec = speculative.SpeculativeSpec(decoder=dec, drafter=drafter, k=speculative_k)
        start, chunk = speculative._speculative_start_jit, speculative._speculative_chunk
    else:
        spec, start, chunk = dec, loop._generate_start, loop._generate_chunk
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), refuse_if_compiler_out_of_memory(sl, _advice("temp", mesh)):
        # the streaming pair, with the views stream_chunks reads (chunk_args: 4, state donated)
        prefill = loop._viewed(start, None).lower(spec, params, weights, prompts, key,
                                                  limits).compile()
        decode = loop._viewed(chunk, 4).lower(spec, params, weights, limits,
                                              _outputs(prefill, 0),
                                              _replicated(mesh, (), jnp.int32)).compile()
    compile_s = time.perf_counter() - t0
    roles = tuple(m.role for m in members)
    program = ("speculative" if speculative_k else "proxy" if "expert" in roles else
               "eft" if "tuned" in roles else "generate")
    return _result(sl, mesh, members, program, parts,
                   {"prefill": memory(prefill), "decode": memory(decode)},
                   [prefill.as_text(), decode.as_text()], compile_s, params=params,
                   batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                   cache_len=cache_len, dtype=str(dtype),
                   **({"speculative_k": speculative_k, "drafter": f"{drafter}:"
                       f"{members[drafter].role}"} if speculative_k else {}))


def plan_lm_eval(members: Sequence[Member], sl: Slice, *, mesh_spec: str = "fsdp=-1",
                 batch: int, max_length: int, dtype: str = "float32") -> dict[str, Any]:
    """Compile the lm-eval scorer at its largest program for the slice (see the module doc).

    Args:
      batch: packed rows per call (``--batch-size``; rounded up to the mesh's data-parallel
        size as the scorer rounds it).
      max_length: the window (``--max-length``; default in lm-eval: the models' context).
    Raises:
      DoesNotFitError: the parameters alone exceed a chip's HBM (before compiling).
    """
    # the lm-eval package needs lm-evaluation-harness (the eval extra): imported when used
    from jaxarith.eval.lmeval import autobatch, scoring

    mesh = _mesh(sl, mesh_spec)
    context = min(m.config.context_length for m in members)
    if max_length > context:
        raise ConfigError(f"--max-length {max_length} exceeds the context length {context} of "
                          f"the models")
    spec = DecodeSpec(members=tuple(members), max_new_tokens=1, dtype=dtype,
                      vocab_limit=_vocab_limit(members))
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = -(-batch // dp) * dp
    slots = max(max_length, scoring.MIN_ROW)
    params = tuple(abstract_params(m.config, jnp.dtype(dtype), mesh) for m in members)
    parts = {"params": chip_bytes(params)}
    refuse_if_over(sl, parts, "the weights", lambda part: _advice(part, mesh))
    parts["batch"] = chip_bytes([_rows(mesh, (rows, slots))] * 7)  # tokens ... scored
    t0 = time.perf_counter()
    with refuse_if_compiler_out_of_memory(sl, _advice("temp", mesh)):
        score = autobatch.lower_scorer(spec, params, rows, slots, mesh=mesh).compile()
    compile_s = time.perf_counter() - t0
    return _result(sl, mesh, members, "lm-eval", parts, {"score": memory(score)},
                   [score.as_text()], compile_s, params=params, batch=rows,
                   max_length=max_length, row_slots=slots, dtype=str(dtype))


__all__ = ["abstract_cache", "model_config", "plan_generate", "plan_lm_eval"]

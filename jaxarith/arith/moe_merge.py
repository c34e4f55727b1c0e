"""A Mixtral from several dense Llama/Mistral models, from mergekit-moe's YAML, gates computed
as mergekit-moe 0.1.5 computes them (``mergekit/moe/router.py``, ``scripts/moe.py``).

The output (as mergekit's ``MixtralMoE``): everything but the MLPs from ``base_model``; expert j
of every layer is ``experts[j].source_model``'s MLP (``residual_scale`` multiplies its down
projection, ``noise_scale`` adds Gaussian noise); the router of layer i has one row per expert,
the expert's *gate vector*:

- ``hidden`` / ``hidden_last``: the base model's hidden state entering layer i at the last
  position of the padded batch of the expert's positive prompts (the tokenizer pads on the left
  with BOS, each prompt is prefixed with the BOS text; positions count from the padded start as
  transformers does without ``position_ids``), averaged over prompts; ``hidden_avg`` averages
  over all positions (pads included) instead of taking the last. mergekit loads the base in
  bfloat16 and runs it in bfloat16; we load it in bfloat16 (the same rounded weights) and run
  it in float32 (on the mesh, jitted), so the gates agree to bfloat16's resolution.
- ``cheap_embed``: the sum of the prompts' token embeddings over real tokens, normalised, the
  same for every layer.
- negatives (``negative_prompts``) are subtracted, then the vector is normalised to unit length.
- ``random``: standard normal; ``uniform_random``: U(-1/sqrt(D), 1/sqrt(D)) (our PRNG, seeded:
  mergekit draws with torch, so the values differ, the distribution does not).

A layer whose gate matrix has a condition number above 5 gets mergekit's warning (the prompts
may be too similar). Refused with a clear error, before any weight is read: unknown keys,
``shared_experts``, an ``architecture`` other than Mixtral, ``experts_per_token`` outside
``[1, len(experts)]``, an unknown ``gate_mode``, missing prompts, identical prompts for every
expert, every expert the same model (unless allowed), and experts whose tensors differ in shape
from the base's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith import configfile
from jaxarith.arith.upcycle import upcycle_config
from jaxarith.errors import ConfigError, ShapeMismatchError
from jaxarith.io import refs
from jaxarith.io.refs import load_model, load_tokenizer
from jaxarith.models.family import BlockContext, Inputs
from jaxarith.models.layers import attend, attention_mask
from jaxarith.models.registry import family
from jaxarith.models.transformer import param_shardings

log = logging.getLogger(__name__)

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
DEGENERATE_COND = 5.0


@dataclasses.dataclass(frozen=True)
class Expert:
    """One ``experts[]`` entry of the YAML."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """mergekit-moe's ``MoEMergeConfig`` (the YAML, unchanged)."""

    base_model: str
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2


_TOP = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts",
        "architecture"}
_EXPERT = {"source_model", "positive_prompts", "negative_prompts", "noise_scale",
           "residual_scale"}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _model_path(value: Any, where: str) -> str:
    if isinstance(value, dict) and "model" in value:  # mergekit's long form {model: {path: ...}}
        value = value["model"]
        value = value.get("path") if isinstance(value, dict) else value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model path or hub id, got {value!r}")
    if "+" in value:
        raise ConfigError(f"{where}={value!r}: LoRA references (model+lora) are not supported")
    return value


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{where}: expected a list of strings")
    return tuple(value)


def parse_config(raw: Any, where: str = "config", *, allow_all_same: bool = False) -> MoEConfig:
    """Validate a mergekit-moe YAML mapping (see the module docstring for what is refused)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (mergekit-moe keys: "
                          f"{', '.join(sorted(_TOP))})")
    if raw.get("shared_experts"):
        raise ConfigError(f"{where}: shared_experts are not supported (the Mixtral output has "
                          "none; mergekit's Mixtral refuses them too)")
    arch = raw.get("architecture")
    if arch is not None and not "mixtral".startswith(str(arch).lower()):
        raise ConfigError(f"{where}: architecture={arch!r} is not supported (only Mixtral "
                          "output is implemented)")
    mode = raw.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise ConfigError(f"{where}: unknown gate_mode {mode!r} (expected one of "
                          f"{', '.join(GATE_MODES)})")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"{where}: dtype={dtype!r} is not supported (expected one of "
                          f"{', '.join(sorted(DTYPES))})")
    items = raw.get("experts")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: experts must be a non-empty list")
    experts = []
    for j, e in enumerate(items):
        at = f"{where}: experts[{j}]"
        if not isinstance(e, dict):
            raise ConfigError(f"{at}: expected a mapping")
        bad = sorted(set(e) - _EXPERT)
        if bad:
            raise ConfigError(f"{at}: unknown key {bad[0]!r} (keys: {', '.join(sorted(_EXPERT))})")
        if "source_model" not in e:
            raise ConfigError(f"{at}: source_model is missing")
        experts.append(Expert(
            source_model=_model_path(e["source_model"], f"{at}.source_model"),
            positive_prompts=_prompts(e.get("positive_prompts"), f"{at}.positive_prompts"),
            negative_prompts=_prompts(e.get("negative_prompts"), f"{at}.negative_prompts"),
            noise_scale=e.get("noise_scale"), residual_scale=e.get("residual_scale")))
    k = raw.get("experts_per_token", 2)
    if not isinstance(k, int) or not 1 <= k <= len(experts):
        raise ConfigError(f"{where}: experts_per_token={k!r} must be between 1 and the number "
                          f"of experts ({len(experts)})")
    if mode not in ("random", "uniform_random"):
        for j, e in enumerate(experts):
            if not e.positive_prompts:
                raise ConfigError(f"{where}: experts[{j}] has no positive_prompts (gate_mode "
                                  f"{mode} computes gates from them)")
        first = (experts[0].positive_prompts, experts[0].negative_prompts)
        if len(experts) > 1 and all((e.positive_prompts, e.negative_prompts) == first
                                    for e in experts[1:]):
            raise ConfigError(f"{where}: every expert has the same prompts; the router could "
                              "not tell them apart")
    if not allow_all_same and len(experts) > 1 and \
            all(e.source_model == experts[0].source_model for e in experts[1:]):
        raise ConfigError(f"{where}: every expert is the same model {experts[0].source_model}; "
                          "the result computes what that model computes at a higher cost "
                          "(pass --allow-all-same to build it anyway, e.g. to train it)")
    return MoEConfig(base_model=_model_path(raw.get("base_model"), f"{where}: base_model"),
                     experts=tuple(experts), gate_mode=mode, dtype=dtype, experts_per_token=k)


def load_yaml(path: str | os.PathLike, *, allow_all_same: bool = False) -> MoEConfig:
    """Read and validate a mergekit-moe YAML file."""
    path = os.fspath(path)
    raw = configfile.load_yaml(path, "MoE config")
    return parse_config(raw, path, allow_all_same=allow_all_same)


# ----------------------------------------------------------------------------- gates


def tokenize_prompts(tokenizer, prompts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """mergekit's ``tokenize_prompts``: BOS text + prompt, no special tokens, padded on the left
    with the BOS id. Returns (ids [B, T], mask [B, T])."""
    bos = tokenizer.bos_token or ""
    pad = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else \
        tokenizer.eos_token_id
    rows = [tokenizer(bos + p, add_special_tokens=False)["input_ids"] for p in prompts]
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def layer_inputs(params: dict, cfg, tokens: jax.Array, mask: jax.Array,
                 dtype=jnp.float32) -> jax.Array:
    """The hidden states entering every layer, ``[L, B, T, D]`` (transformers'
    ``hidden_states[:-1]``), with positions ``0..T-1`` from the padded start as transformers
    counts them when no ``position_ids`` are given; padded keys are masked."""
    fam = family(cfg)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = fam.embed(cfg, params, Inputs(tokens, positions)).astype(dtype)
    attn = functools.partial(attend, mask=attention_mask(jnp.arange(t), mask.astype(bool)))

    def body(x, xs):
        p, layer = xs
        y = fam.block(cfg, p, x, BlockContext(positions, layer, attn))
        return (y[0] if isinstance(y, tuple) else y), x

    _, ins = jax.lax.scan(body, x, (params["layers"], jnp.arange(cfg.num_hidden_layers)))
    return ins


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


def prompt_vectors(mode: str, prompts: tuple[str, ...], tokenizer, cfg, params) -> np.ndarray:
    """One ``[L, D]`` float32 vector per layer for a set of prompts (before negatives and the
    final normalisation), as mergekit's ``_do_it``."""
    ids, mask = tokenize_prompts(tokenizer, prompts)
    if mode == "cheap_embed":
        emb = np.asarray(jax.device_get(params["embed"]), np.float32)
        summed = (emb[ids] * mask[..., None]).sum(axis=(0, 1))
        return np.repeat(_unit(summed)[None], cfg.num_hidden_layers, axis=0)
    # the weights are bfloat16 (as mergekit loads them), the arithmetic float32: what differs
    # from mergekit is then its own bfloat16 rounding of activations
    hs = np.asarray(layer_inputs(params, cfg, jnp.asarray(ids), jnp.asarray(mask),
                                 dtype=jnp.float32), np.float32)
    per_prompt = hs.mean(axis=2) if mode == "hidden_avg" else hs[:, :, -1]  # [L, B, D]
    return per_prompt.mean(axis=1)


def gate_vectors(cfg_moe: MoEConfig, base_cfg, base_params, tokenizer, *, seed: int = 0
                 ) -> np.ndarray:
    """The router rows ``[L, E, D]`` float32 (see the module docstring)."""
    L, D, E = base_cfg.num_hidden_layers, base_cfg.hidden_size, len(cfg_moe.experts)
    rng = np.random.default_rng(seed)
    if cfg_moe.gate_mode == "random":
        return rng.standard_normal((L, E, D)).astype(np.float32)
    if cfg_moe.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / D)
        return (rng.random((L, E, D)) * 2 * scale - scale).astype(np.float32)
    out = []
    for e in cfg_moe.experts:
        v = prompt_vectors(cfg_moe.gate_mode, e.positive_prompts, tokenizer, base_cfg,
                           base_params)
        if e.negative_prompts:
            v = v - prompt_vectors(cfg_moe.gate_mode, e.negative_prompts, tokenizer, base_cfg,
                                   base_params)
        out.append(_unit(v))
    return np.stack(out, axis=1).astype(np.float32)


def degenerate_layers(gates: np.ndarray, threshold: float = DEGENERATE_COND) -> list[int]:
    """Layers whose ``[E, D]`` gate matrix has a 2-norm condition number above ``threshold``
    (mergekit's ``warn_degenerate_gates``)."""
    return [i for i in range(gates.shape[0])
            if np.linalg.cond(gates[i].astype(np.float64)) > threshold]


# ----------------------------------------------------------------------------- the model


def _check_shapes(base_cfg, cfgs: dict[str, Any]) -> None:
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    for ref, c in cfgs.items():
        if getattr(c, "arch", None) != base_cfg.arch or c.model_type not in ("llama", "mistral"):
            raise ConfigError(f"expert {ref}: a {c.model_type} model; every model must be a "
                              f"Llama/Mistral like the base ({base_cfg.model_type})")
        for n in names:
            if getattr(c, n) != getattr(base_cfg, n):
                raise ShapeMismatchError(
                    f"expert {ref}: {n}={getattr(c, n)} differs from the base model's "
                    f"{getattr(base_cfg, n)} (its layers.*.mlp tensors would not fit)")
        if c.mlp_bias:
            raise ConfigError(f"expert {ref}: has MLP biases; Mixtral experts have none")


def build(cfg_moe: MoEConfig, *, mesh=None, seed: int = 0, progress: bool = False):
    """(Mixtral config, params, info) of the merge; ``info`` has ``degenerate_layers`` and the
    output ``dtype``. Configs and shapes are checked before any weight is read."""
    config_of = refs.load_config
    base_cfg = config_of(cfg_moe.base_model)
    if base_cfg.model_type not in ("llama", "mistral"):
        raise ConfigError(f"base_model {cfg_moe.base_model}: a {base_cfg.model_type} model; "
                          "mergekit's Mixtral output needs Llama or Mistral models")
    out_cfg = upcycle_config(base_cfg, len(cfg_moe.experts), cfg_moe.experts_per_token)
    _check_shapes(base_cfg, {e.source_model: config_of(e.source_model)
                             for e in cfg_moe.experts})

    hidden = cfg_moe.gate_mode.startswith("hidden")
    base = load_model(cfg_moe.base_model, mesh=mesh, progress=progress,
                      dtype=jnp.bfloat16 if hidden else None)
    # as mergekit's select_dtype: the YAML's dtype, else the base config's
    out_dtype = jnp.dtype(DTYPES[cfg_moe.dtype] if cfg_moe.dtype else _stored_dtype(base_cfg))
    tokenizer = load_tokenizer(base.directory) if cfg_moe.gate_mode in GATE_MODES[:4] else None
    gates = gate_vectors(cfg_moe, base_cfg, base.params, tokenizer, seed=seed)
    bad = degenerate_layers(gates)
    if bad:
        log.warning("%s degenerate routing parameters - your prompts may be too similar. One "
                    "or more experts will be underutilized in your model.",
                    f"layers {bad} have" if len(bad) > 1 else f"layer {bad[0]} has")
    if hidden:  # the rest of the base at its stored precision
        base = load_model(cfg_moe.base_model, mesh=mesh, progress=progress)

    key = jax.random.PRNGKey(seed)
    mlps = {"gate": [], "up": [], "down": []}
    for j, e in enumerate(cfg_moe.experts):
        src = base if e.source_model == cfg_moe.base_model else \
            load_model(e.source_model, mesh=mesh, progress=progress)
        for i, name in enumerate(("gate", "up", "down")):
            w = src.params["layers"]["mlp"][name].astype(jnp.float32)
            if e.noise_scale:
                k = jax.random.fold_in(jax.random.fold_in(key, j), i)
                w = w + e.noise_scale * jax.random.normal(k, w.shape, jnp.float32)
            if name == "down" and e.residual_scale is not None:
                w = w * e.residual_scale
            mlps[name].append(w.astype(out_dtype))
        del src
    params = {k: v for k, v in base.params.items() if k != "layers"}
    layers = {k: v for k, v in base.params["layers"].items() if k != "mlp"}
    layers["moe"] = {name: jnp.stack(ws, axis=1) for name, ws in mlps.items()}
    layers["moe"]["router"] = jnp.asarray(np.transpose(gates, (0, 2, 1))).astype(out_dtype)
    params["layers"] = layers
    params = jax.tree.map(lambda x: x.astype(out_dtype), params)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(out_cfg, mesh))
    return out_cfg, params, {"degenerate_layers": bad, "dtype": str(out_dtype),
                             "base_dir": base.directory}


def _stored_dtype(cfg) -> str:
    """The dtype a config.json declares (float32 when it says nothing)."""
    d = cfg.hf_extra.get("dtype") or cfg.hf_extra.get("torch_dtype") or "float32"
    return DTYPES.get(str(d), "float32")

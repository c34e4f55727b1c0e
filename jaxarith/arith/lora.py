"""LoRA extraction: a PEFT adapter from the truncated SVD of ``tuned - base``, per tensor.

``jaxarith extract-lora TUNED BASE OUT --rank R`` writes ``OUT/adapter_config.json`` and
``OUT/adapter_model.safetensors`` as ``mergekit-extract-lora`` 0.1.5 does:

- every linear weight ``W`` ([out, in]): ``U S Vh = svd(W_tuned - W_base)`` in float32, rank
  ``r = min(R, min(out, in))`` (fewer with ``--sv-epsilon``: singular values at or below it are
  dropped), ``lora_A = sqrt(S_r) Vh_r`` [r, in], ``lora_B = U_r sqrt(S_r)`` [out, r], in the
  tuned tensor's dtype; its bias, if any, as ``lora_B.bias = b_tuned - b_base``;
- the embeddings, the output head and every other tensor (norms) are saved whole from TUNED
  (``modules_to_save``);
- ``r`` and ``lora_alpha`` are the largest rank used (so PEFT's scaling is 1), with
  ``rank_pattern`` / ``alpha_pattern`` for the modules of smaller rank.

Loaded with PEFT on BASE it reproduces TUNED up to the truncation (at full rank, to float32
rounding). Streamed: one tensor's SVD at a time (the factors are kept, then written with the
full-rank tensors read again from TUNED). Mixture-of-experts families (3-D expert tensors) and
GPT-2 (``Conv1D`` weights) are refused.

A ``MODEL+ADAPTER`` reference applies an adapter wherever a model is read
(:mod:`jaxarith.io.convert.lora`).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from tqdm.auto import tqdm

from jaxarith.arith.check import check_shapes
from jaxarith.arith.stream import hf_dirs
from jaxarith.errors import ConfigError
from jaxarith.io.atomic import atomic_dir
from jaxarith.io.convert.hf import HFCheckpoint, check_checkpoint
from jaxarith.io.convert.keymap import expand, rules_for
from jaxarith.io.convert.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX
from jaxarith.io.convert.safetensors_io import write_safetensors
from jaxarith.models import registry
from jaxarith.models.config import load_config

# canonical leaves saved whole (mergekit: embeddings go to modules_to_save unless embed_lora)
_EMBEDDINGS = frozenset({"embed", "pos_embed", "lm_head"})


def svd_factors(delta: np.ndarray, rank: int, sv_epsilon: float = 0.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(A [r, in], B [out, r])`` float32 with ``B @ A`` the rank-``r`` truncation of
    ``delta`` [out, in] (``sqrt(S)`` on both sides)."""
    u, s, vh = np.linalg.svd(delta.astype(np.float32), full_matrices=False)
    r = min(rank, s.shape[0])
    if sv_epsilon > 0:
        r = min(int((s > sv_epsilon).sum()), r)
    r = max(r, 1)  # PEFT needs r >= 1 (an all-zero delta: a zero factor)
    root = np.sqrt(s[:r]).astype(np.float32)
    return (root[:, None] * vh[:r]).astype(np.float32), (u[:, :r] * root[None, :]).astype(
        np.float32)


def extract_lora(tuned: str, base: str, out: str | os.PathLike, *, rank: int,
                 sv_epsilon: float = 0.0, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Write the PEFT adapter of ``tuned - base`` at ``out`` (see module doc).

    Returns:
      {"out", "rank" (the largest used), "modules" (decomposed), "saved" (whole tensors),
      "bytes", "seconds"}.
    Raises:
      ConfigError, ArchitectureMismatchError: before anything is written.
    """
    t0 = time.perf_counter()
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"--rank {rank!r}: must be a positive integer")
    if sv_epsilon < 0:
        raise ConfigError(f"--sv-epsilon {sv_epsilon}: must be >= 0")
    refs = [tuned, base]
    dirs = hf_dirs(refs, "extract-lora reads")
    cfgs = [load_config(d) for d in dirs]
    fam = registry.family(cfgs[0])
    if fam.routed or str(fam.arch) == "gpt2":
        raise ConfigError(f"extract-lora: {cfgs[0].model_type} is not supported (it decomposes "
                          "nn.Linear weights of dense models; GPT-2's are Conv1D, experts 3-D)")
    check_shapes([{k: rule.hf_shape for rule in rules_for(c)
                   for k, _ in expand(rule, c.num_hidden_layers)} for c in cfgs],
                 [os.fspath(r) for r in refs])
    ckpts = [HFCheckpoint(d) for d in dirs]
    names = [check_checkpoint(c, k) for c, k in zip(cfgs, ckpts, strict=True)]
    items = [(rule, key) for rule in rules_for(cfgs[0])
             for key, _ in expand(rule, cfgs[0].num_hidden_layers)]
    keys = {k for _, k in items}
    linear = [k for rule, k in items if rule.targets[0][0] not in _EMBEDDINGS
              and k.endswith(".weight") and len(rule.hf_shape) == 2]
    biases = {k for k in keys if k.endswith(".bias") and k[:-5] + ".weight" in linear}
    whole = [k for _, k in items if k not in linear and k not in biases]

    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k in tqdm(linear, desc="svd", unit="tensor", disable=not progress, leave=False):
        t, b = ckpts[0].view(names[0][k]), ckpts[1].view(names[1][k])
        a_, b_ = svd_factors(t.astype(np.float32) - b.astype(np.float32), rank, sv_epsilon)
        factors[k] = (a_.astype(t.dtype), b_.astype(t.dtype))
    ranks = {k[:-7]: f[0].shape[0] for k, f in factors.items()}
    top = max(ranks.values()) if ranks else rank

    specs, arrays = [], []
    for k in linear:
        a_, b_ = factors[k]
        m = k[:-7]
        specs += [(f"{PREFIX}{m}.lora_A.weight", a_.shape, a_.dtype),
                  (f"{PREFIX}{m}.lora_B.weight", b_.shape, b_.dtype)]
        arrays += [lambda a_=a_: a_, lambda b_=b_: b_]
        if m + ".bias" in biases:
            dt = ckpts[0].dtype(names[0][m + ".bias"])
            specs.append((f"{PREFIX}{m}.lora_B.bias", ckpts[0].shape(names[0][m + ".bias"]), dt))
            arrays.append(lambda m=m, dt=dt: (
                ckpts[0].view(names[0][m + ".bias"]).astype(np.float32)
                - ckpts[1].view(names[1][m + ".bias"]).astype(np.float32)).astype(dt))
    for k in whole:
        specs.append((f"{PREFIX}{k}", ckpts[0].shape(names[0][k]), ckpts[0].dtype(names[0][k])))
        arrays.append(lambda k=k: ckpts[0].view(names[0][k]))
    modules_to_save = sorted({k.rpartition(".")[0].rpartition(".")[2] for k in whole})
    smaller = {m: r for m, r in ranks.items() if r != top}
    config = {
        "base_model_name_or_path": os.fspath(base), "peft_type": "LORA", "use_rslora": False,
        "target_modules": sorted({m.rpartition(".")[2] for m in ranks}),
        "modules_to_save": modules_to_save, "task_type": "CAUSAL_LM", "r": top,
        "lora_alpha": top, "rank_pattern": smaller, "alpha_pattern": smaller,
        "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
        "lora_bias": bool(biases),
    }
    with atomic_dir(out, overwrite=overwrite, inputs=refs, kind="lora adapter",
                    info={"tuned": os.fspath(tuned), "base": os.fspath(base), "rank": top}) as tmp:
        nbytes = write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS), specs,
                                   (f() for f in arrays))
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=4)
    return {"out": os.fspath(out), "rank": top, "modules": len(ranks),
            "saved": len(whole), "bytes": nbytes, "seconds": time.perf_counter() - t0}

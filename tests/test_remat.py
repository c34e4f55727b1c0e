"""``model.remat`` policies (:mod:`jaxarith.models.remat`): same loss and gradients as no remat,
the residuals each policy keeps (on device or in host memory), the config key, and the
per-policy plan script."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jaxarith.errors import ConfigError
from jaxarith.models import config_from_hf
from jaxarith.models.remat import Remat, parse
from jaxarith.models.transformer import forward, init_params, next_token_loss
from train import plan
from train.config import load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")
B, T = 2, 16
CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64),
    "gpt2": dict(model_type="gpt2", vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                 n_positions=64),
}


def _model(arch):
    cfg = config_from_hf(CONFIGS[arch])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (B, T)), jnp.int32)
    return cfg, init_params(cfg, 0), tokens


def _loss(cfg, tokens, remat):
    def loss(p):
        nll, n = next_token_loss(p, cfg, tokens, remat=remat, fused=True)
        return nll / n
    return loss


# GPT-2 (one compile costs ~10 s here): the policies whose tags differ from Llama's blocks
# (biased q/k/v/out; offload moves every tag, its ungated MLP's included)
POLICIES = {"llama": tuple(Remat), "gpt2": (Remat.NONE, Remat.SAVE_DOT_EXCEPT_MLP, Remat.OFFLOAD)}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_policies_give_the_loss_and_gradients_of_no_remat(arch):
    """One program computes the loss and gradients under each policy (``offload`` included:
    the CPU backend runs its host-memory transfers); each equals ``none``'s."""
    cfg, params, tokens = _model(arch)

    @jax.jit
    def all_policies(p):
        return {r.value: jax.value_and_grad(_loss(cfg, tokens, r))(p) for r in POLICIES[arch]}

    got = all_policies(params)
    loss0, grad0 = got["none"]
    for name, (loss, grad) in got.items():
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6, err_msg=name)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad0), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=name)


_RESIDUAL = re.compile(r"^(\w+?)(<host>)?\[([\d,]*)\] (.*)$")
_ITEM = {"f32": 4, "bf16": 2, "i32": 4, "s32": 4, "u32": 4, "bool": 1, "pred": 1}


def _residual_bytes(f, *args) -> tuple[int, int]:
    """(device, host) bytes of what ``jax.vjp(f, *args)`` keeps for the backward pass, the
    arguments themselves excepted (from ``jax.ad_checkpoint.print_saved_residuals``)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    device = host = 0
    for line in out.getvalue().splitlines():
        m = _RESIDUAL.match(line)
        assert m, line
        if "from the argument" in m.group(4):
            continue
        n = _ITEM[m.group(1)] * math.prod(int(d) for d in m.group(3).split(",") if d)
        if m.group(2):
            host += n
        else:
            device += n
    return device, host


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_policies_keep_what_their_names_say(arch):
    """Exact residual bytes: over ``full`` (the layers' inputs only), ``save_qkv_proj`` keeps
    q, k and v of every layer, ``save_out_proj`` the attention output projection,
    ``save_dot_except_mlp`` both; ``minimal`` adds the MLP's input projections; ``offload``
    keeps on device what ``full`` keeps and moves ``minimal``'s projections to host memory."""
    cfg, params, tokens = _model(arch)
    kept = {r: _residual_bytes(_loss(cfg, tokens, r), params) for r in Remat}
    dev = {r: d for r, (d, _) in kept.items()}
    assert all(h == 0 for r, (_, h) in kept.items() if r is not Remat.OFFLOAD)
    L, D, N, K, H = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.head_dim)
    qkv, out = 4 * L * B * T * (N + 2 * K) * H, 4 * L * B * T * D
    assert dev[Remat.SAVE_QKV_PROJ] - dev[Remat.FULL] == qkv
    assert dev[Remat.SAVE_OUT_PROJ] - dev[Remat.FULL] == out
    assert dev[Remat.SAVE_DOT_EXCEPT_MLP] - dev[Remat.FULL] == qkv + out
    assert dev[Remat.SAVE_DOT_EXCEPT_MLP] < dev[Remat.MINIMAL] < dev[Remat.NONE]
    assert kept[Remat.OFFLOAD] == (dev[Remat.FULL], dev[Remat.MINIMAL] - dev[Remat.FULL])


def test_names_bools_and_bad_values():
    assert parse(True) is Remat.FULL and parse(False) is Remat.NONE
    assert parse("save_qkv_proj") is Remat.SAVE_QKV_PROJ
    for value, want in (("true", Remat.FULL), ("false", Remat.NONE), ("offload", Remat.OFFLOAD)):
        assert load_train_config(TINY, [f"model.remat={value}"]).model.remat is want
    with pytest.raises(ConfigError, match=r"model\.remat='everything': expected one of none, "
                                          r"full, minimal, save_dot_except_mlp, save_qkv_proj, "
                                          r"save_out_proj, offload"):
        load_train_config(TINY, ["model.remat=everything"])
    cfg, params, tokens = _model("llama")
    with pytest.raises(ConfigError, match="remat='some'.*expected one of: none, full"):
        forward(params, cfg, tokens, remat="some")


needs_libtpu = pytest.mark.skipif(plan.libtpu_version() is None, reason="needs libtpu")


@needs_libtpu
@pytest.mark.slow  # three TPU compiles: ~60 s quiet, ~3 min under load
def test_plan_remat_script_orders_the_tpu_memory(tmp_path):
    """``scripts/plan_remat.py --tiny`` compiles tiny_llama (batch 256 x 128, v5e-4, fsdp=4) for
    each policy by ``jaxarith plan``'s code path. What the TPU compiler reports: ``none`` holds
    far more temporaries than ``full``; ``save_qkv_proj`` keeps the same HBM temporaries as
    ``full`` (at this size XLA places the kept q/k/v in on-chip memory) but its peak is higher by
    exactly every layer's q, k and v on one chip."""
    out = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plan_remat.py"),
                           "--tiny", "--policies", "none,full,save_qkv_proj", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| `none` |" in proc.stdout and "| `save_qkv_proj` |" in proc.stdout
    res = {p["remat"]: p for p in json.loads(out.read_text())["plans"]}
    assert list(res) == ["none", "full", "save_qkv_proj"]
    assert all(p["topology"] == "v5e-4" and p["fits"] for p in res.values())
    pc = {k: p["per_chip_bytes"] for k, p in res.items()}
    assert pc["full"]["temp"] < pc["none"]["temp"]
    assert pc["full"]["peak"] < pc["save_qkv_proj"]["peak"] < pc["none"]["peak"]
    cfg = load_train_config(TINY).model.config
    L, T, N, K, H = (cfg["num_hidden_layers"], 128, cfg["num_attention_heads"],
                     cfg["num_key_value_heads"], cfg["head_dim"])
    qkv = 4 * L * (256 // 4) * T * (N + 2 * K) * H  # float32, the batch split over 4 chips
    assert pc["save_qkv_proj"]["peak"] - pc["full"]["peak"] == qkv
    assert all(c["host_temp"] == 0 for c in pc.values())


def test_plan_advice_names_a_policy():
    """A step whose temporaries do not fit is told to try ``model.remat=full``, unless it is
    already ``full``."""
    for remat, advice in (("none", "model.remat=full (now none)"),
                          ("save_qkv_proj", "model.remat=full (now save_qkv_proj)")):
        cfg = load_train_config(TINY, [f"model.remat={remat}"])
        assert plan._advice("temp", cfg, None).startswith(advice)
    full = load_train_config(TINY, ["model.remat=true"])
    assert full.model.remat is Remat.FULL and "remat" not in plan._advice("temp", full, None)
    assert type(full.model).__name__ == "ModelSection"
    assert dataclasses.replace(full.model, remat=False).remat is Remat.NONE

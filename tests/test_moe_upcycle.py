"""Sparse upcycling: the upcycled Mixtral computes the dense model's function (ours and
transformers'), noise and the router options, the train config's ``init.upcycle``, and clear
errors (GPT-2, biases, top-k) with nothing written."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxarith import cli, testing
from jaxarith.io.convert import load_hf_params
from jaxarith.io.refs import load_model
from jaxarith.models import forward


def _tokens():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, testing.TINY_VOCAB, (2, 10))
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    return tokens, mask


def _logits(cfg, params):
    tokens, mask = _tokens()
    logits, _, _ = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    return np.asarray(logits)


def _run(capsys, *argv):
    code = cli.main(list(argv) + ["--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("router", ["random", "zeros"])
def test_upcycled_hf_equals_dense_in_jaxarith_and_transformers(llama_dir, tmp_path, capsys,
                                                               router):
    src, hf_dense = llama_dir
    out = str(tmp_path / "moe")
    code, res = _run(capsys, "upcycle", src, out, "--experts", "4", "--top-k", "2",
                     "--router", router)
    assert code == 0 and res["experts"] == 4 and res["params"] > res["dense_params"]
    cfg, params = load_hf_params(out, progress=False)
    assert cfg.model_type == "mixtral" and cfg.num_local_experts == 4
    if router == "zeros":
        assert not np.asarray(params["layers"]["moe"]["router"]).any()
    dense_cfg, dense = load_hf_params(src, progress=False)
    tokens, mask = _tokens()
    real = mask.astype(bool)
    ours = _logits(cfg, params)
    np.testing.assert_allclose(ours[real], _logits(dense_cfg, dense)[real], atol=1e-5, rtol=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    theirs = testing.hf_logits(model, tokens, mask)
    np.testing.assert_allclose(theirs[real], testing.hf_logits(hf_dense, tokens, mask)[real],
                               atol=1e-5, rtol=0)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))


@pytest.mark.slow  # ~10-25 s on 2 shared cores
def test_noise_orbax_output_and_mesh(llama_dir, tmp_path, capsys):
    src, _ = llama_dir
    out = str(tmp_path / "noisy")
    code, res = _run(capsys, "upcycle", src, out, "--experts", "4", "--top-k", "1",
                     "--noise", "0.01", "--to", "orbax", "--mesh", "expert=4,fsdp=2")
    assert code == 0 and res["to"] == "orbax"
    m = load_model(out, progress=False)
    gate = np.asarray(m.params["layers"]["moe"]["gate"])
    dense = np.asarray(load_hf_params(src, progress=False)[1]["layers"]["mlp"]["gate"])
    diff = gate - dense[:, None]
    assert 0.008 < diff.std() < 0.012  # the noise std asked for
    assert not np.allclose(diff[:, 0], diff[:, 1])  # each expert its own draw


def test_bad_sources_and_options_write_nothing(llama_tied_dir, gpt2_dir, llama_dir, tmp_path,
                                               capsys):
    cases = [
        (gpt2_dir[0], ["--experts", "4", "--top-k", "2"], "only bias-free Llama / Mistral"),
        (llama_tied_dir[0], ["--experts", "4", "--top-k", "2"], "has attention biases"),
        (llama_dir[0], ["--experts", "2", "--top-k", "3"], "--top-k 3 must be between 1 and"),
        (llama_dir[0], ["--experts", "2", "--top-k", "1", "--noise", "-1"], "--noise -1.0"),
    ]
    for src, extra, message in cases:
        out = tmp_path / "never"
        code, res = _run(capsys, "upcycle", src, str(out), *extra)
        assert code == 2 and message in res["error"], res
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if "never" in p]


def test_train_config_init_upcycle(llama_dir, tmp_path):
    from train.config import load_train_config
    from train.init import start_config, start_params

    src, _ = llama_dir
    root = os.path.join(os.path.dirname(__file__), "..")
    cfg = load_train_config(os.path.join(root, "configs", "tiny_llama.yaml"),
                      [f"out={tmp_path}", "model.arch=", "model.config={}",
                       f"init.ref={src}", "init.upcycle.experts=4", "init.upcycle.top_k=2"])
    assert cfg.init.method == "upcycle"
    model_cfg, directory = start_config(cfg.init)
    assert model_cfg.num_local_experts == 4 and directory == src
    params = start_params(cfg.init, None, seed=0)
    dense_cfg, dense = load_hf_params(src, progress=False)
    np.testing.assert_allclose(_logits(model_cfg, params), _logits(dense_cfg, dense),
                               atol=1e-5, rtol=0)
    from jaxarith.errors import ConfigError

    with pytest.raises(ConfigError, match="init.upcycle.top_k=5 must be between 1 and"):
        load_train_config(os.path.join(root, "configs", "tiny_llama.yaml"),
                    [f"out={tmp_path}", "model.arch=", "model.config={}", f"init.ref={src}",
                     "init.upcycle.experts=4", "init.upcycle.top_k=5"])
    assert jax.tree.leaves(params)

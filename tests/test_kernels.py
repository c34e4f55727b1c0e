"""Attention kernels (jaxarith.models.kernels): splash attention run by the Pallas interpreter on
the CPU against transformers (Llama GQA and MQA, GPT-2), its gradient against the XLA path,
packed segments against each document alone, an 8-device mesh against one device, and the
resolution of ``auto``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxarith import testing
from jaxarith.errors import ConfigError
from jaxarith.io.convert.hf import load_hf_params
from jaxarith.models import kernels, token_logprobs
from jaxarith.models.transformer import forward, next_token_loss
from jaxarith.sharding import make_mesh

T = 128  # splash's smallest block


def _model(tmp_path, name, hf_config):
    d = tmp_path / name
    hf = testing.make_hf_model(d, hf_config, seed=3)
    cfg, params = load_hf_params(str(d), progress=False)
    return hf, cfg, params


def _tokens(batch=2, seed=0):
    return np.random.default_rng(seed).integers(3, testing.TINY_VOCAB, (batch, T))


@pytest.mark.parametrize("name,hf_config", [
    ("llama_gqa", testing.tiny_llama_config(max_position_embeddings=256)),
    ("llama_mqa", testing.tiny_llama_config(num_key_value_heads=1, max_position_embeddings=256)),
    ("gpt2", testing.tiny_gpt2_config(n_positions=256)),
])
def test_splash_logprobs_equal_transformers(tmp_path, name, hf_config):
    hf, cfg, params = _model(tmp_path, name, hf_config)
    tokens = _tokens()
    ref = testing.hf_logits(hf, tokens)
    ref_lp = ref[:, :-1] - jax.nn.logsumexp(ref[:, :-1], axis=-1, keepdims=True)
    ref_lp = np.take_along_axis(ref_lp, tokens[:, 1:, None], -1)[..., 0]
    logits = forward(params, cfg, jnp.asarray(tokens), attention="splash-interpret").logits
    got = np.asarray(token_logprobs(logits[:, :-1], jnp.asarray(tokens[:, 1:])))
    np.testing.assert_allclose(got, ref_lp, atol=1e-4)


@pytest.mark.slow  # moved out of `make test` (its ~10 min budget); CI runs it (make test-slow)
def test_splash_gradient_equals_the_xla_path(tmp_path):
    _, cfg, params = _model(tmp_path, "llama", testing.tiny_llama_config(
        max_position_embeddings=256))
    tokens = jnp.asarray(_tokens())

    def loss(p, attention):
        nll, count = next_token_loss(p, cfg, tokens, attention=attention)
        return nll / count

    g_xla = jax.grad(loss)(params, "xla")
    g_splash = jax.grad(loss)(params, "splash-interpret")
    for a, b in zip(jax.tree.leaves(g_xla), jax.tree.leaves(g_splash), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-3)


def test_packed_segments_equal_each_document_alone(tmp_path):
    _, cfg, params = _model(tmp_path, "llama", testing.tiny_llama_config(
        max_position_embeddings=256))
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, 1000, 50), rng.integers(3, 1000, T - 50)
    row = jnp.asarray(np.concatenate([a, b])[None])
    seg = jnp.asarray(np.r_[np.ones(50), 2 * np.ones(T - 50)].astype(np.int32)[None])
    pos = jnp.asarray(np.r_[np.arange(50), np.arange(T - 50)][None])
    packed = forward(params, cfg, row, positions=pos, segment_ids=seg,
                     attention="splash-interpret").logits
    for doc, sl in ((a, slice(0, 50)), (b, slice(50, T))):
        alone = forward(params, cfg, jnp.asarray(doc[None])).logits  # the XLA reference
        np.testing.assert_allclose(np.asarray(packed[:, sl]), np.asarray(alone), atol=1e-4)


def test_splash_on_an_8_device_mesh_equals_one_device(tmp_path):
    _, cfg, params = _model(tmp_path, "llama", testing.tiny_llama_config(
        max_position_embeddings=256))
    tokens = _tokens(batch=4)
    one = forward(params, cfg, jnp.asarray(tokens), attention="splash-interpret").logits
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    _, sharded = load_hf_params(str(tmp_path / "llama"), mesh=mesh, progress=False)
    rows = jax.device_put(tokens, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None)))
    with jax.set_mesh(mesh):
        many = jax.jit(lambda p, t: forward(p, cfg, t, attention="splash-interpret").logits)(
            sharded, rows)
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), atol=1e-5)


def test_auto_resolves_by_platform_and_length():
    cpu = make_mesh("fsdp=-1")
    assert kernels.resolve("auto", cpu, 2048) == "xla"
    assert kernels.resolve("splash", cpu, 2048) == "splash-interpret"
    assert kernels.resolve("xla", cpu) == "xla"
    with pytest.raises(ConfigError, match="model.attention"):
        kernels.resolve("flash", cpu)
    with pytest.raises(ConfigError, match="divisible by 128"):
        kernels._block(100)

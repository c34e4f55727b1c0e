"""Sliding-window attention in the shared driver, through Mistral (``sliding_window`` on every
layer): the window's exact extent (``q - k < W``, transformers' ``sliding_window_overlay``),
parity with transformers on sequences longer than the window (one device, an 8-device mesh, the
splash kernel), the KV cache and greedy generation past the window, and the config."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxarith import sharding, testing
from jaxarith.decode.loop import DecodeSpec, Member, generate, left_pad
from jaxarith.errors import ConfigError
from jaxarith.io.convert import load_hf_params
from jaxarith.models import (
    config_from_hf,
    family,
    forward,
    init_cache,
    init_params,
    num_params,
)
from jaxarith.models.llama import LlamaConfig

TOL = 1e-4
WINDOW = 4  # testing.tiny_mistral_config's


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistral_sw")
    hf = testing.make_hf_model(d, testing.tiny_mistral_config(), seed=5)
    cfg, params = load_hf_params(str(d), progress=False)
    return str(d), hf, cfg, params


def _batch(t=16, seed=0):
    """Four rows of ``t`` > WINDOW tokens: full, left-padded, right-padded, one pad."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, testing.TINY_VOCAB, (4, t))
    mask = np.ones((4, t), np.int64)
    mask[1, :5] = 0
    mask[2, t - 3:] = 0
    mask[3, :1] = 0
    return tokens, mask


def _max_dlogp(logits, ref, mask):
    ours = np.asarray(jax.nn.log_softmax(logits, -1))
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(ref), -1))
    return float(np.abs(ours - ref)[mask.astype(bool)].max())


def test_window_keeps_exactly_the_last_w_slots():
    """One layer, so a logit depends only on the keys it attends: the token W - 1 slots back
    changes position t's logits, the token W slots back does not (``q - k < W``)."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      sliding_window=WINDOW, model_type="mistral")
    params = init_params(cfg, jax.random.key(0))
    run = jax.jit(lambda p, x: forward(p, cfg, x).logits)
    base = np.arange(1, 13)[None]
    t = 10
    ref = np.asarray(run(params, jnp.asarray(base))[0, t])
    for back, changes in ((WINDOW - 1, True), (WINDOW, False), (WINDOW + 3, False)):
        edited = base.copy()
        edited[0, t - back] = 60
        got = np.asarray(run(params, jnp.asarray(edited))[0, t])
        assert (np.abs(got - ref).max() > 1e-4) == changes, (back, np.abs(got - ref).max())


def test_mistral_logprobs_equal_transformers_past_the_window(mistral):
    _, hf, cfg, params = mistral
    assert cfg.sliding_window == WINDOW
    tokens, mask = _batch()
    ref = testing.hf_logits(hf, tokens, mask)
    logits = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).logits
    diff = _max_dlogp(logits, ref, mask)
    assert diff < TOL, f"max |dlogp| = {diff:.2e}"
    # the test can fail: without the window the same weights give other log-probs
    unwindowed = forward(params, dataclasses.replace(cfg, sliding_window=None),
                         jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).logits
    assert _max_dlogp(unwindowed, ref, mask) > 100 * TOL


def test_mistral_on_an_8_device_mesh_equals_transformers(mistral):
    directory, hf, cfg, _ = mistral
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    _, params = load_hf_params(directory, mesh=mesh, progress=False)
    tokens, mask = _batch()
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda p, t, m: forward(p, cfg, t, attention_mask=m).logits)(
            params, jnp.asarray(tokens), jnp.asarray(mask))
    diff = _max_dlogp(logits, testing.hf_logits(hf, tokens, mask), mask)
    assert diff < TOL, f"max |dlogp| = {diff:.2e}"


def test_cache_prefill_in_chunks_equals_one_pass(mistral):
    """Two chunks through the KV cache (the window spans the boundary) equal one pass."""
    _, _, cfg, params = mistral
    tokens, mask = _batch()
    full = np.asarray(forward(params, cfg, jnp.asarray(tokens),
                              attention_mask=jnp.asarray(mask)).logits)
    cache, parts = init_cache(cfg, 4, 20), []
    for lo, hi in ((0, 6), (6, 16)):
        out, cache, _ = forward(params, cfg, jnp.asarray(tokens[:, lo:hi]),
                                attention_mask=jnp.asarray(mask[:, lo:hi]), cache=cache)
        parts.append(np.asarray(out))
    m = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(parts, 1)[m], full[m], atol=1e-5)


def test_greedy_generation_past_the_window_equals_transformers(mistral):
    _, hf, cfg, params = mistral
    prompts, new = [[5, 6, 7, 8, 9, 10], [11, 12], [20, 21, 22], [40]], 12
    ours = generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=new), [params], prompts)
    tokens, mask = left_pad(prompts)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(tokens).long(),
                          attention_mask=torch.tensor(mask).long(), max_new_tokens=new,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(ours.tokens, ref[:, tokens.shape[1]:].numpy())


def test_blocked_attention_skips_blocks_before_the_window(tmp_path):
    """T = 300: three query blocks of the XLA attention (128, 128, 44), each skipping the key
    blocks before its window of 16; a left-padded row; log-probs equal transformers'."""
    hf = testing.make_hf_model(tmp_path, testing.tiny_mistral_config(
        sliding_window=16, max_position_embeddings=512), seed=8, with_tokenizer=False)
    cfg, params = load_hf_params(str(tmp_path), progress=False)
    tokens = np.random.RandomState(7).randint(3, testing.TINY_VOCAB, (2, 300))
    mask = np.ones((2, 300), np.int64)
    mask[1, :37] = 0
    logits = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).logits
    diff = _max_dlogp(logits, testing.hf_logits(hf, tokens, mask), mask)
    assert diff < TOL, f"max |dlogp| = {diff:.2e}"


@pytest.mark.slow
def test_splash_local_mask_equals_transformers(tmp_path):
    """T = 128 (splash's smallest block) with a window of 16: the kernel's LocalMask."""
    hf = testing.make_hf_model(tmp_path, testing.tiny_mistral_config(
        sliding_window=16, max_position_embeddings=256), seed=6, with_tokenizer=False)
    cfg, params = load_hf_params(str(tmp_path), progress=False)
    tokens = np.random.default_rng(0).integers(3, testing.TINY_VOCAB, (2, 128))
    mask = np.ones_like(tokens)
    logits = forward(params, cfg, jnp.asarray(tokens), attention="splash-interpret").logits
    diff = _max_dlogp(logits, testing.hf_logits(hf, tokens), mask)
    assert diff < TOL, f"max |dlogp| = {diff:.2e}"


def test_mistral_config_reads_and_writes_the_window():
    base = {"model_type": "mistral", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "max_position_embeddings": 64}
    cfg = config_from_hf({**base, "sliding_window": 8})
    assert cfg.sliding_window == 8 and cfg.to_hf()["sliding_window"] == 8
    assert config_from_hf(cfg.to_hf()) == cfg
    for off in (None, 0):  # transformers: no window
        assert config_from_hf({**base, "sliding_window": off}).sliding_window is None
    # transformers' Llama has no window: the key is read and ignored
    llama = config_from_hf({**base, "model_type": "llama", "sliding_window": 8})
    assert llama.sliding_window is None and family(llama).attention_windows(llama) is None
    with pytest.raises(ConfigError, match="sliding_window=-3"):
        config_from_hf({**base, "sliding_window": -3})


# Mistral-7B-v0.1's config.json as published: a window of 4096 on every layer
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}


def test_mistral_7b_v01_loads_with_its_window():
    cfg = config_from_hf(MISTRAL_7B_V01)
    assert family(cfg).attention_windows(cfg) == (4096,) * 32
    assert num_params(cfg) == 7_241_732_096
    assert config_from_hf(cfg.to_hf()) == cfg

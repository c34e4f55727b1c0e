"""Parity of jaxarith's Llama and GPT-2 with transformers (PyTorch, float32)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxarith import testing
from jaxarith.convert import load_hf_params
from jaxarith.evaluate import eval_loss
from jaxarith.models import CausalLM, forward, next_token_loss, token_logprobs

TOL = 1e-4
FIXTURES = ["llama_dir", "llama_tied_dir", "gpt2_dir"]


def _batch(seed=0, b=4, t=12, vocab=testing.TINY_VOCAB):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, (b, t))
    mask = np.ones((b, t), np.int64)
    if b >= 4:
        mask[1, :4] = 0  # left padding
        mask[2, 9:] = 0  # right padding
        mask[3, :1] = 0
    elif b == 2:
        mask[1, :3] = 0
    return tokens, mask


@pytest.mark.parametrize("fixture", FIXTURES)
def test_logprobs_match_transformers_on_padded_batch(fixture, request):
    directory, hf_model = request.getfixturevalue(fixture)
    cfg, params = load_hf_params(directory, progress=False)
    tokens, mask = _batch()
    ref = jax.nn.log_softmax(testing.hf_logits(hf_model, tokens, mask), axis=-1)
    logits, _ = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    ours = jax.nn.log_softmax(logits, axis=-1)
    diff = np.abs(np.asarray(ours) - np.asarray(ref))[mask.astype(bool)]
    assert diff.max() < TOL, f"{fixture}: max |dlogp| = {diff.max():.2e}"


@pytest.mark.parametrize("fixture", FIXTURES)
def test_loss_matches_transformers(fixture, request):
    directory, hf_model = request.getfixturevalue(fixture)
    cfg, params = load_hf_params(directory, progress=False)
    tokens, _ = _batch(seed=1, b=2, t=20)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(tokens), labels=torch.tensor(tokens)).loss.item()
    nll, n = next_token_loss(params, cfg, jnp.asarray(tokens))
    assert abs(float(nll / n) - ref) < TOL


def test_eval_loss_windows(llama_dir):
    """Windows overlap by one token: every token but the first is predicted exactly once, each
    window is scored on its own, and batching/padding of windows changes nothing."""
    directory, _ = llama_dir
    cfg, params = load_hf_params(directory, progress=False)
    ids = np.random.RandomState(3).randint(3, testing.TINY_VOCAB, 61)
    windowed = eval_loss(params, cfg, ids, seq_len=16, batch_size=3)
    total, count = 0.0, 0.0
    for start in range(0, 60, 15):
        w = jnp.asarray(ids[start: start + 16])[None]
        nll, n = next_token_loss(params, cfg, w)
        total, count = total + float(nll), count + float(n)
    assert windowed.tokens == count == 60
    assert abs(windowed.loss - total / count) < 1e-5
    whole = eval_loss(params, cfg, ids)
    nll, n = next_token_loss(params, cfg, jnp.asarray(ids)[None])
    assert whole.tokens == 60 and abs(whole.loss - float(nll / n)) < 1e-5


def test_cli_eval_loss_matches_transformers(llama_dir, tmp_path):
    directory, hf_model = llama_dir
    text = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog.\n" * 2
    path = tmp_path / "text.txt"
    path.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "jaxarith", "eval-loss", directory, "--text", str(path), "--json"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout)
    ids = testing.bundled_tokenizer()(text)["input_ids"]
    with torch.no_grad():
        t = torch.tensor([ids])
        ref = hf_model(input_ids=t, labels=t).loss.item()
    assert result["tokens"] == len(ids) - 1
    assert abs(result["loss"] - ref) < TOL
    assert abs(result["ppl"] - np.exp(ref)) < 1e-3 * np.exp(ref)


def test_nnx_module_state_is_canonical_tree(llama_dir):
    directory, _ = llama_dir
    cfg, params = load_hf_params(directory, progress=False)
    model = CausalLM.from_params(cfg, params)
    tree = model.params()
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    tokens, mask = _batch(b=2)
    np.testing.assert_array_equal(
        np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))),
        np.asarray(forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0]),
    )
    from flax import nnx

    q = model.layers["attn"]["q"]
    assert isinstance(q, nnx.Param)
    assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")


def test_remat_gives_same_gradients(llama_dir):
    directory, _ = llama_dir
    cfg, params = load_hf_params(directory, progress=False)
    tokens, mask = _batch(b=2)

    def loss(p, remat):
        nll, n = next_token_loss(p, cfg, jnp.asarray(tokens), jnp.asarray(mask), remat=remat)
        return nll / n

    g0 = jax.grad(loss)(params, False)
    g1 = jax.grad(loss)(params, True)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bfloat16_compute_close_to_float32(gpt2_dir):
    directory, _ = gpt2_dir
    cfg, params = load_hf_params(directory, progress=False)
    tokens, mask = _batch(b=2)
    lp32 = token_logprobs(forward(params, cfg, jnp.asarray(tokens))[0], jnp.asarray(tokens))
    logits16, _ = forward(params, cfg, jnp.asarray(tokens), dtype=jnp.bfloat16)
    assert logits16.dtype == jnp.float32  # logits are returned in float32 whatever the compute
    lp16 = token_logprobs(logits16, jnp.asarray(tokens))
    # bf16 has 8 bits of mantissa: a real but bounded difference (not a parity claim).
    assert 0 < float(jnp.max(jnp.abs(lp16 - lp32))) < 0.1


def test_cache_prefill_equals_full_forward(llama_dir):
    """Prefill in two chunks through the KV cache equals one pass (left-padded batch)."""
    from jaxarith.models import init_cache

    directory, _ = llama_dir
    cfg, params = load_hf_params(directory, progress=False)
    tokens, mask = _batch(b=2, t=10)
    full, _ = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    cache = init_cache(cfg, 2, 16)
    a, cache = forward(params, cfg, jnp.asarray(tokens[:, :6]),
                       attention_mask=jnp.asarray(mask[:, :6]), cache=cache)
    b, cache = forward(params, cfg, jnp.asarray(tokens[:, 6:]),
                       attention_mask=jnp.asarray(mask[:, 6:]), cache=cache)
    got = np.concatenate([np.asarray(a), np.asarray(b)], axis=1)
    m = mask.astype(bool)
    np.testing.assert_allclose(got[m], np.asarray(full)[m], atol=1e-4)
    assert int(cache.index) == 10


def test_repeated_calls_do_not_recompile(gpt2_dir):
    from jaxarith.evaluate import _batch_nll

    directory, _ = gpt2_dir
    cfg, params = load_hf_params(directory, progress=False)
    ids = np.random.RandomState(5).randint(3, testing.TINY_VOCAB, 200)
    eval_loss(params, cfg, ids, seq_len=32, batch_size=4)
    n = _batch_nll._cache_size()
    eval_loss(params, cfg, ids[::-1].copy(), seq_len=32, batch_size=4)  # same shapes, new data
    eval_loss(params, cfg, ids[:150], seq_len=32, batch_size=4)  # fewer windows, same batch shape
    assert _batch_nll._cache_size() == n

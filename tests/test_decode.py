"""Generation and logit arithmetic: transformers parity, combiner identities, speculative EFT."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxarith import sharding
from jaxarith.convert import load_hf_params
from jaxarith.decode import Decoder, Member, _generate, combine, generate, left_pad
from jaxarith.errors import ConfigError
from jaxarith.logits import (
    SpeculativeDecoder,
    accept_or_resample,
    eft,
    generate_speculative,
    proxy_tuning,
)
from jaxarith.models import LlamaConfig, forward, init_params
from jaxarith.sampling import Greedy, Sample

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22]]


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_greedy_equals_transformers_generate(fixture, request):
    directory, hf_model = request.getfixturevalue(fixture)
    cfg, params = load_hf_params(directory, progress=False)
    dec = Decoder(members=(Member(cfg),), max_new_tokens=10)
    ours = generate(dec, [params], PROMPTS)
    tokens, mask = left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf_model.generate(input_ids=torch.tensor(tokens).long(),
                                attention_mask=torch.tensor(mask).long(), max_new_tokens=10,
                                do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(ours.tokens, ref[:, tokens.shape[1]:].numpy())


def test_cache_logprobs_equal_full_reforward(llama_dir):
    cfg, params = load_hf_params(llama_dir[0], progress=False)
    dec = Decoder(members=(Member(cfg),), max_new_tokens=8)
    g = generate(dec, [params], PROMPTS)
    tokens, mask = left_pad(PROMPTS)
    full = np.concatenate([tokens, g.tokens], 1)
    fmask = np.concatenate([mask, np.ones_like(g.tokens)], 1)
    logits, _ = forward(params, cfg, jnp.asarray(full), attention_mask=jnp.asarray(fmask))
    lp = jax.nn.log_softmax(logits, -1)
    p = tokens.shape[1]
    ref = np.take_along_axis(np.asarray(lp[:, p - 1:-1]), g.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(g.logprobs, ref, atol=1e-4)


def test_stop_tokens_and_lengths(gpt2_dir):
    cfg, params = load_hf_params(gpt2_dir[0], progress=False)
    free = generate(Decoder(members=(Member(cfg),), max_new_tokens=6), [params], PROMPTS)
    stop = int(free.tokens[0, 2])
    g = generate(Decoder(members=(Member(cfg),), max_new_tokens=6, stop_tokens=(stop,),
                         pad_token=0), [params], PROMPTS)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(free.tokens[row] == stop)
        n = hits[0] + 1 if len(hits) else 6
        assert g.lengths[row] == n and (g.tokens[row, n:] == 0).all()
        np.testing.assert_array_equal(g.tokens[row, :n], free.tokens[row, :n])


def test_repeated_calls_do_not_recompile(gpt2_dir):
    cfg, params = load_hf_params(gpt2_dir[0], progress=False)
    dec = Decoder(members=(Member(cfg),), max_new_tokens=4, sampler=Sample(temperature=0.8))
    generate(dec, [params], PROMPTS, seed=0)
    n = _generate._cache_size()
    generate(dec, [params], [[9, 9, 9, 9, 9], [1, 2], [3, 4, 5]], seed=1)
    generate(Decoder(members=(Member(cfg),), max_new_tokens=4,
                     sampler=Sample(temperature=0.8)), [params], PROMPTS, seed=2)
    assert _generate._cache_size() == n


def _three(request):
    (a, _), (b, _) = request.getfixturevalue("llama_dir"), request.getfixturevalue("llama_tied_dir")
    cfg_a, pa = load_hf_params(a, progress=False)
    cfg_b, pb = load_hf_params(b, progress=False)
    return cfg_a, pa, cfg_b, pb


def test_combiner_identities(request):
    cfg_a, pa, cfg_b, pb = _three(request)
    greedy = lambda members, params: generate(
        Decoder(members=members, max_new_tokens=8), params, PROMPTS).tokens
    base = greedy((Member(cfg_a),), [pa])
    expert = greedy((Member(cfg_b),), [pb])
    # alpha = 0: the base model's tokens
    np.testing.assert_array_equal(greedy(proxy_tuning(cfg_a, cfg_b, cfg_a, 0.0), [pa, pb, pa]),
                                  base)
    # base and anti-expert the same model: the expert's tokens
    np.testing.assert_array_equal(greedy(proxy_tuning(cfg_a, cfg_b, cfg_a, 1.0), [pa, pb, pa]),
                                  expert)
    # weights (1, 0): model 1
    np.testing.assert_array_equal(
        greedy((Member(cfg_a, 1.0), Member(cfg_b, 0.0)), [pa, pb]), base)


def test_proxy_tuned_logprobs_equal_numpy_reference(request):
    cfg_a, pa, cfg_b, pb = _three(request)
    pc = jax.tree.map(lambda x: x * 1.5, pa)
    alpha = 0.7
    members = proxy_tuning(cfg_a, cfg_b, cfg_a, alpha)
    dec = Decoder(members=members, max_new_tokens=5)
    g = generate(dec, [pa, pb, pc], PROMPTS)
    tokens, mask = left_pad(PROMPTS)
    full = jnp.asarray(np.concatenate([tokens, g.tokens], 1))
    fmask = jnp.asarray(np.concatenate([mask, np.ones_like(g.tokens)], 1))

    def logp(cfg, p):
        z = np.asarray(forward(p, cfg, full, attention_mask=fmask)[0], np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    s = logp(cfg_a, pa) + alpha * (logp(cfg_b, pb) - logp(cfg_a, pc))
    s = s - s.max(-1, keepdims=True)
    s = s - np.log(np.exp(s).sum(-1, keepdims=True))
    p = tokens.shape[1]
    ref = np.take_along_axis(s[:, p - 1:-1], g.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(g.logprobs, ref, atol=1e-4)
    np.testing.assert_array_equal(g.tokens, np.argmax(s[:, p - 1:-1], -1))


def test_vocab_mismatch_is_a_clear_error(llama_dir):
    cfg, _ = load_hf_params(llama_dir[0], progress=False)
    import dataclasses

    other = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 8)
    with pytest.raises(ConfigError, match="vocab sizes differ: base=1024, expert=1032"):
        Decoder(members=proxy_tuning(cfg, other, cfg, 1.0), max_new_tokens=4)


def test_prompt_too_long_and_empty_prompt(gpt2_dir):
    cfg, params = load_hf_params(gpt2_dir[0], progress=False)
    dec = Decoder(members=(Member(cfg),), max_new_tokens=8)
    with pytest.raises(ConfigError, match="exceeds the model's context of 128"):
        generate(dec, [params], [list(range(3, 200))])
    with pytest.raises(ConfigError, match="at least one token"):
        generate(dec, [params], [[5, 6], []])


def test_vocab_limit_masks_padded_rows():
    z = jnp.asarray(np.random.RandomState(0).randn(2, 10), jnp.float32)
    cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    lp = combine(Decoder(members=(Member(cfg),), max_new_tokens=1, vocab_limit=7), [z])
    assert np.all(np.isneginf(np.asarray(lp[:, 7:])))
    np.testing.assert_allclose(np.exp(np.asarray(lp)).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("spec", ["data=2,fsdp=2,tensor=2", "tensor=8"])
def test_sharded_generation_equals_single_device(spec, llama_dir):
    cfg, params = load_hf_params(llama_dir[0], progress=False)
    dec = Decoder(members=(Member(cfg),), max_new_tokens=6)
    prompts = PROMPTS + [[3, 4], [7, 8, 9, 10, 11]] * 2 + [[40]]
    ref = generate(dec, [params], prompts)
    mesh = sharding.make_mesh(spec)
    _, sharded = load_hf_params(llama_dir[0], mesh=mesh, progress=False)
    got = generate(dec, [sharded], prompts, mesh=mesh)
    np.testing.assert_array_equal(got.tokens, ref.tokens)


# ----------------------------------------------------------------------------- speculative EFT


def _eft_models(vocab=16):
    def cfg(d, layers):
        return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=d // 4, max_position_embeddings=64)

    large, small = cfg(64, 3), cfg(32, 2)
    # larger weights give peaked distributions, so the test exercises acceptance and rejection
    scale = lambda p: jax.tree.map(lambda x: 8.0 * x, p)
    params = [scale(init_params(large, jax.random.key(0))),
              scale(init_params(small, jax.random.key(1))),
              scale(init_params(small, jax.random.key(2)))]
    return eft(large, small, small, beta=1.0), params


def test_speculative_eft_greedy_equals_plain_eft():
    members, params = _eft_models()
    dec = Decoder(members=members, max_new_tokens=8)
    plain = generate(dec, params, [[1, 2, 3], [4, 5]])
    spec = generate_speculative(SpeculativeDecoder(decoder=dec, drafter=1, k=2), params,
                                [[1, 2, 3], [4, 5]])
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    assert 0 <= spec.acceptance_rate <= 1 and spec.rounds >= 1


def test_speculative_eft_sampling_distribution_matches_plain_eft():
    """Two-token sequences from 2000 rows: total variation distance between speculative and plain
    EFT samples stays below 0.06 (two independent samples of the same distribution on this
    support give ~0.02)."""
    members, params = _eft_models()
    dec = Decoder(members=members, max_new_tokens=2, sampler=Sample(temperature=1.0, top_p=0.9))
    prompts = [[1, 2, 3]] * 2000
    plain = generate(dec, params, prompts, seed=1).tokens
    spec = generate_speculative(SpeculativeDecoder(decoder=dec, drafter=1, k=2), params, prompts,
                                seed=2).tokens
    hist = lambda t: np.bincount(t[:, 0] * 16 + t[:, 1], minlength=256) / len(t)
    tv = 0.5 * np.abs(hist(plain) - hist(spec)).sum()
    assert tv < 0.06, tv


def test_accept_or_resample_gives_the_target_distribution():
    """The verification step alone: drafts from q, output distributed as p (exact in law)."""
    rng = np.random.RandomState(0)
    p = jax.nn.log_softmax(jnp.asarray(rng.randn(8) * 2, jnp.float32))
    q = jax.nn.log_softmax(jnp.asarray(rng.randn(8) * 2, jnp.float32))
    n = 200_000
    kd, kv = jax.random.split(jax.random.key(0))
    drafts = jax.random.categorical(kd, jnp.broadcast_to(q, (n, 8)), -1).astype(jnp.int32)
    acc, repl = accept_or_resample(jnp.broadcast_to(p, (n, 8)), jnp.broadcast_to(q, (n, 8)),
                                   drafts, kv, greedy=False)
    out = np.where(np.asarray(acc), np.asarray(drafts), np.asarray(repl))
    emp = np.bincount(out, minlength=8) / n
    assert 0.5 * np.abs(emp - np.exp(np.asarray(p))).sum() < 0.005


def test_cli_generate_json(gpt2_dir):
    directory, _ = gpt2_dir
    out = subprocess.run([sys.executable, "-m", "jaxarith", "generate", directory, "--prompt",
                          "def add(a, b):", "--max-new-tokens", "5", "--greedy", "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    cfg, params = load_hf_params(directory, progress=False)
    from jaxarith.refs import load_tokenizer

    ids = load_tokenizer(directory)("def add(a, b):")["input_ids"]
    ref = generate(Decoder(members=(Member(cfg),), max_new_tokens=5, sampler=Greedy()), [params],
                   [ids])
    assert result["results"][0]["token_ids"] == ref.tokens[0, :ref.lengths[0]].tolist()
    assert result["results"][0]["tokens_per_s"] > 0 and isinstance(result["results"][0]["text"],
                                                                   str)

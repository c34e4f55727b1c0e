"""Logit arithmetic: combiner identities, proxy tuning against numpy, vocabulary checks,
speculative EFT (greedy equality, sampling distribution, acceptance)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import PROMPTS, count_compiles

from jaxarith import cli
from jaxarith.decode.combine import eft, eft_down, eft_up, proxy_tuning, reward_interpolation
from jaxarith.decode.loop import DecodeSpec, Member, combine, generate, left_pad
from jaxarith.decode.sampling import Sampling
from jaxarith.decode.speculative import SpeculativeSpec, accept_or_resample, generate_speculative
from jaxarith.errors import ConfigError
from jaxarith.io.convert import load_hf_params
from jaxarith.models import LlamaConfig, forward, init_params
from jaxarith.models.transformer import jit_forward

NEW = 8


@pytest.fixture(scope="module")
def two(llama_dir, llama_tied_dir):
    """Two different Llamas sharing the tokenizer (GQA untied; MQA tied with biases)."""
    return (*load_hf_params(llama_dir[0], progress=False),
            *load_hf_params(llama_tied_dir[0], progress=False))


def _greedy(members, params):
    return generate(DecodeSpec(members=members, max_new_tokens=NEW), params, PROMPTS)


def test_combiner_identities(two):
    cfg_a, pa, cfg_b, pb = two
    base, expert = _greedy((Member(cfg_a),), [pa]), _greedy((Member(cfg_b),), [pb])
    # alpha = 0: the base model's tokens
    g0 = _greedy(proxy_tuning(cfg_a, cfg_b, cfg_a, 0.0), [pa, pb, pa])
    np.testing.assert_array_equal(g0.tokens, base.tokens)
    np.testing.assert_allclose(g0.logprobs, base.logprobs, atol=1e-5)
    # base and anti-expert the same model: the expert's tokens (alpha is traced: no recompile)
    with count_compiles() as n:
        g1 = _greedy(proxy_tuning(cfg_a, cfg_b, cfg_a, 1.0), [pa, pb, pa])
    assert n[0] == 0
    np.testing.assert_array_equal(g1.tokens, expert.tokens)
    np.testing.assert_allclose(g1.logprobs, expert.logprobs, atol=1e-4)
    # weights (1, 0, 0): model 1
    g100 = _greedy((Member(cfg_a, 1.0), Member(cfg_b, 0.0), Member(cfg_a, 0.0)), [pa, pb, pa])
    np.testing.assert_array_equal(g100.tokens, base.tokens)


def _np_logp(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_proxy_tuned_logprobs_equal_numpy_reference(two):
    """Log-probs of every generated token equal a float64 numpy product of the three models' own
    separately computed logits (full re-forward, no cache)."""
    cfg_a, pa, cfg_b, pb = two
    pc = jax.tree.map(lambda x: x * 1.5, pa)
    alpha = 0.7
    g = _greedy(proxy_tuning(cfg_a, cfg_b, cfg_a, alpha), [pa, pb, pc])
    tokens, mask = left_pad(PROMPTS)
    full = jnp.asarray(np.concatenate([tokens, g.tokens], 1))
    fmask = jnp.asarray(np.concatenate([mask, np.ones_like(g.tokens)], 1))
    lp = [_np_logp(forward(p, cfg, full, attention_mask=fmask)[0])
          for cfg, p in ((cfg_a, pa), (cfg_b, pb), (cfg_a, pc))]
    s = _np_logp(lp[0] + alpha * (lp[1] - lp[2]))[:, tokens.shape[1] - 1:-1]
    ref = np.take_along_axis(s, g.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(g.logprobs, ref, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(g.tokens, s.argmax(-1))


def test_preset_weights_follow_the_papers_formulas():
    """combine() with each preset equals the formula written out in numpy."""
    cfg = LlamaConfig(vocab_size=12, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    z = np.random.RandomState(1).randn(4, 3, 12).astype(np.float32) * 2
    lp = [_np_logp(x) for x in z]
    lam, beta, alpha = 0.3, 1.7, 0.6
    cases = [
        (reward_interpolation(cfg, cfg, cfg, cfg, lam=lam, beta=beta),
         lp[0] + beta * (lam * lp[1] + (1 - lam) * lp[2] - lp[3])),
        (eft(cfg, cfg, cfg, beta=beta), lp[0] + beta * (lp[1] - lp[2])),
        (eft_up(cfg, cfg, cfg, beta=beta), lp[0] + beta * (lp[1] - lp[2])),
        (eft_down(cfg, cfg, cfg, beta=beta), lp[0] + beta * (lp[1] - lp[2])),
        (proxy_tuning(cfg, cfg, cfg, alpha=alpha), lp[0] + alpha * (lp[1] - lp[2])),
    ]
    for members, ref in cases:
        dec = DecodeSpec(members=members, max_new_tokens=1)
        got = combine(dec, [jnp.asarray(x) for x in z[:len(members)]])
        np.testing.assert_allclose(np.asarray(got), _np_logp(ref), atol=1e-5)


def test_vocab_mismatch_needs_the_tokenizers_rows(two):
    """Tables padded differently combine over ``vocab_limit`` rows, which must then be given."""
    cfg, *_ = two
    other = __import__("dataclasses").replace(cfg, vocab_size=cfg.vocab_size + 8)
    with pytest.raises(ConfigError, match=r"vocab sizes differ \(base=1024, expert=1032, "
                                          r"anti_expert=1024\).*vocab_limit=len\(tokenizer\)"):
        DecodeSpec(members=proxy_tuning(cfg, other, cfg, 1.0), max_new_tokens=4)
    dec = DecodeSpec(members=proxy_tuning(cfg, other, cfg, 1.0), max_new_tokens=4,
                     vocab_limit=1000)
    assert dec.vocab_size == 1024


def test_tokenizer_mismatch_is_a_clear_cli_error(gpt2_dir, tmp_path, capsys):
    """Same vocab size, different token ids: refused before anything is compiled."""
    other = tmp_path / "other"
    shutil.copytree(gpt2_dir[0], other)
    with open(other / "tokenizer.json") as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(other / "tokenizer.json", "w") as f:
        json.dump(spec, f)
    assert cli.main(["generate", gpt2_dir[0], "--prompt", "x", "--expert", os.fspath(other),
                     "--anti-expert", gpt2_dir[0], "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert "tokenizer of" in err and "differs" in err
    assert f"at id 100: {a!r} vs {b!r}" in err, err  # the first token that differs


def test_padded_vocab_rows_are_masked():
    z = jnp.asarray(np.random.RandomState(0).randn(2, 10), jnp.float32)
    cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    dec = DecodeSpec(members=(Member(cfg, 1.0), Member(cfg, -0.5)), max_new_tokens=1,
                  vocab_limit=7)
    lp = np.asarray(combine(dec, [z, 2 * z]))
    assert np.all(np.isneginf(lp[:, 7:])) and not np.isnan(lp).any()
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-6)
    ref = _np_logp(_np_logp(np.asarray(z)[:, :7]) - 0.5 * _np_logp(2 * np.asarray(z)[:, :7]))
    np.testing.assert_allclose(lp[:, :7], ref, atol=1e-5)


# ----------------------------------------------------------------------------- speculative EFT


STREAMED = []


def _record(step, tokens, valid):
    STREAMED.append((tokens.copy(), valid.copy()))


def _streamed_rows():
    rows = [[] for _ in PROMPTS]
    for tokens, valid in STREAMED:
        for r in range(len(rows)):
            rows[r] += tokens[r][valid[r]].tolist()
    STREAMED.clear()
    return rows


@pytest.mark.slow  # moved out of `make test` (its ~10 min budget); CI runs it (make test-slow)
def test_speculative_eft_greedy_equals_plain_eft(two):
    """EFT model + beta (tuned - ref) with the tuned model drafting: the plain program is the
    proxy-tuning one above (same structure, weights are traced). Streamed tokens (the host
    callback) are exactly the returned ones, stop tokens and budgets included."""
    cfg_a, pa, cfg_b, pb = two
    pc = jax.tree.map(lambda x: x * 1.5, pa)
    dec = DecodeSpec(members=eft(cfg_a, cfg_b, cfg_a, beta=0.5), max_new_tokens=NEW,
                  stop_tokens=(7,))
    plain = generate(dec, [pa, pb, pc], PROMPTS)
    STREAMED.clear()
    spec = generate_speculative(SpeculativeSpec(decoder=dec, drafter=1, k=3), [pa, pb, pc],
                                PROMPTS, on_tokens=_record)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    assert _streamed_rows() == [row[:n].tolist()
                                for row, n in zip(spec.tokens, spec.lengths, strict=True)]
    np.testing.assert_array_equal(spec.lengths, plain.lengths)
    np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=1e-4)
    assert 0 < spec.acceptance_rate < 1 and spec.rounds >= 1
    # target = drafter (weights 0, 1, 0: same program) accepts every draft
    same = DecodeSpec(members=(Member(cfg_a, 0.0), Member(cfg_b, 1.0), Member(cfg_a, 0.0)),
                   max_new_tokens=NEW, stop_tokens=(7,))
    with count_compiles() as n:
        full = generate_speculative(SpeculativeSpec(decoder=same, drafter=1, k=3),
                                    [pa, pb, pc], PROMPTS, max_new_tokens=[NEW, 2, 5, NEW],
                                    on_tokens=_record)
    assert n[0] == 0 and full.acceptance_rate == 1.0
    assert (full.lengths <= [NEW, 2, 5, NEW]).all()
    assert _streamed_rows() == [row[:n].tolist()
                                for row, n in zip(full.tokens, full.lengths, strict=True)]
    assert full.rounds <= -(-(NEW - 1) // 4)  # first token from prefill, then k + 1 per round
    # a row with a budget of 0 streams nothing (not even the prefill's token), like generate
    for fn, d in ((generate_speculative, SpeculativeSpec(decoder=same, drafter=1, k=3)),
                  (generate, same)):
        STREAMED.clear()
        g = fn(d, [pa, pb, pc], PROMPTS, max_new_tokens=[0, 1, 5, NEW], on_tokens=_record)
        assert g.lengths[0] == 0 and g.lengths[1] == 1
        assert _streamed_rows() == [row[:n].tolist()
                                    for row, n in zip(g.tokens, g.lengths, strict=True)]


def _small_eft(vocab=16):
    def cfg(d, layers):
        return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=d // 4, max_position_embeddings=64)

    large, small = cfg(32, 2), cfg(16, 1)
    # larger weights give peaked distributions, so drafts are both accepted and rejected
    scale = lambda p: jax.tree.map(lambda x: 8.0 * x, p)
    params = [scale(init_params(large, jax.random.key(0))),
              scale(init_params(small, jax.random.key(1))),
              scale(init_params(small, jax.random.key(2)))]
    return large, small, params


def _exact_two_token_distribution(members, params, sampler, prompt, weights, vocab):
    """p(x1, x2 | prompt) [V * V] of plain decoding, from full re-forwards (no cache)."""
    seqs = np.array([prompt + [a] for a in range(vocab)], np.int32)  # [V, P + 1]
    ones = jnp.ones(seqs.shape, jnp.int32)
    lps = [np.asarray(jax.nn.log_softmax(jit_forward(p, m.config, jnp.asarray(seqs), ones), -1))
           for m, p in zip(members, params, strict=True)]
    mix = lambda j: sum(w * lp[:, j] for w, lp in zip(weights, lps, strict=True))
    p1 = np.exp(np.asarray(sampler.transform(jax.nn.log_softmax(jnp.asarray(mix(-2)))))[0])
    p2 = np.exp(np.asarray(sampler.transform(jax.nn.log_softmax(jnp.asarray(mix(-1))))))
    return (p1[:, None] * p2).reshape(-1)


def _chi_square_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; bins with expected count < 5 are pooled."""
    from scipy.stats import chi2

    n = len(samples)
    observed = np.bincount(samples, minlength=len(probs))
    expected = probs * n
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])
    return float(chi2.sf(stat, keep.sum() - 1))


@pytest.mark.slow  # moved out of `make test` (its ~10 min budget); CI runs it (make test-slow)
def test_speculative_eft_sampling_distribution_matches_plain_eft():
    """Two-token continuations from 3000 seeded rows of speculative EFT (temperature 1, top-p
    0.9) pass a chi-square goodness-of-fit test (p > 0.001) against the exact plain-EFT
    distribution; the drafter's own distribution would fail it by far."""
    large, small, params = _small_eft()
    beta = 1.5
    members = eft(large, small, small, beta=beta)
    sampler = Sampling(temperature=1.0, top_p=0.9)
    dec = DecodeSpec(members=members, max_new_tokens=2, sampler=sampler)
    prompt = [1, 2, 3]
    exact = _exact_two_token_distribution(members, params, sampler, prompt, (1, beta, -beta), 16)
    spec = generate_speculative(SpeculativeSpec(decoder=dec, drafter=1, k=2), params,
                                [prompt] * 3000, seed=2)
    assert (spec.lengths == 2).all()
    pvalue = _chi_square_pvalue(spec.tokens[:, 0] * 16 + spec.tokens[:, 1], exact)
    assert pvalue > 1e-3, pvalue
    assert 0.05 < spec.acceptance_rate < 0.95, spec.acceptance_rate
    drafter = _exact_two_token_distribution(members[1:2], params[1:2], sampler, prompt, (1,), 16)
    assert 0.5 * np.abs(drafter - exact).sum() > 0.2  # the drafter alone is far from the target


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
    # acceptance rate = sum_x min(p, q)
    expected = np.minimum(np.exp(np.asarray(p)), np.exp(np.asarray(q))).sum()
    assert abs(np.asarray(acc).mean() - expected) < 0.005

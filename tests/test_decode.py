"""Generation with one model: transformers parity, cache vs full re-forward, stops and limits,
samplers against numpy, no recompilation, streaming, sharding, errors, the CLI."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxarith import cli, sharding
from jaxarith.decode.loop import DecodeSpec, Member, generate, left_pad
from jaxarith.decode.sampling import Greedy, Sampling
from jaxarith.errors import ConfigError
from jaxarith.io.convert import load_hf_params
from jaxarith.io.refs import load_tokenizer
from jaxarith.models import forward
from jaxarith.testing import count_compiles

# four rows (divisible by data * fsdp = 4), left-padded to 8 slots (the default prompt bucket)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22], [40]]
NEW = 8




@pytest.fixture(scope="module")
def models(llama_dir, gpt2_dir):
    return {name: (*load_hf_params(d, progress=False), hf, d)
            for name, (d, hf) in (("llama", llama_dir), ("gpt2", gpt2_dir))}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_equals_transformers_generate(name, models):
    cfg, params, hf_model, _ = models[name]
    ours = generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=NEW), [params], PROMPTS)
    tokens, mask = left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf_model.generate(input_ids=torch.tensor(tokens).long(),
                                attention_mask=torch.tensor(mask).long(), max_new_tokens=NEW,
                                do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(ours.tokens, ref[:, tokens.shape[1]:].numpy())
    assert ours.lengths.tolist() == [NEW] * len(PROMPTS) and ours.steps == NEW


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cache_decoding_equals_full_reforward_at_every_step(name, models):
    cfg, params, _, _ = models[name]
    g = generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=NEW), [params], PROMPTS)
    tokens, mask = left_pad(PROMPTS)
    full = np.concatenate([tokens, g.tokens], 1)
    fmask = np.concatenate([mask, np.ones_like(g.tokens)], 1)
    logits, _, _ = forward(params, cfg, jnp.asarray(full), attention_mask=jnp.asarray(fmask))
    lp = np.asarray(jax.nn.log_softmax(logits, -1))[:, tokens.shape[1] - 1:-1]  # [B, NEW, V]
    ref = np.take_along_axis(lp, g.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(g.logprobs, ref, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(g.tokens, lp.argmax(-1))


def test_stop_tokens_per_row_limits_and_streaming(models):
    cfg, params, _, _ = models["gpt2"]
    free = generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=NEW), [params], PROMPTS)
    stop = int(free.tokens[0, 2])
    limits = [NEW, 3, NEW, 0]
    seen = []
    g = generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=NEW, stop_tokens=(stop,),
                         pad_token=0), [params], PROMPTS, max_new_tokens=limits,
                 on_tokens=lambda i, t, v: seen.append((int(i), t.copy(), v.copy())))
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(free.tokens[row] == stop)
        n = min(hits[0] + 1 if len(hits) else NEW, limits[row])
        assert g.lengths[row] == n
        assert (g.tokens[row, n:] == 0).all() and (g.logprobs[row, n:] == 0).all()
        np.testing.assert_array_equal(g.tokens[row, :n], free.tokens[row, :n])
        np.testing.assert_allclose(g.logprobs[row, :n], free.logprobs[row, :n], atol=1e-6)
    # the host callback saw every token, in order, in consecutive chunks as they were produced:
    # the first token alone, then chunks sized by time (decode.STREAM_SECONDS)
    starts = [s for s, _, _ in seen]
    widths = [t.shape[1] for _, t, _ in seen]
    assert starts == [0, *np.cumsum(widths)[:-1].tolist()] and sum(widths) == g.steps
    assert widths[0] == 1
    streamed = np.concatenate([t for _, t, _ in seen], 1)
    valid = np.concatenate([v for _, _, v in seen], 1)
    np.testing.assert_array_equal(valid.sum(1), g.lengths)
    np.testing.assert_array_equal(np.where(valid, streamed, 0), g.tokens[:, :g.steps])


def test_repeated_calls_do_not_recompile(models):
    cfg, params, _, _ = models["gpt2"]
    dec = DecodeSpec(members=(Member(cfg),), max_new_tokens=4, sampler=Sampling(temperature=0.8))
    generate(dec, [params], PROMPTS, seed=0)
    with count_compiles() as n:
        # other prompts of the same padded length, another seed, per-row limits, an equal decoder
        g = generate(dec, [params], [[9, 9, 9, 9, 9, 9], [1, 2], [3, 4, 5], [6]], seed=1)
        generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=4,
                         sampler=Sampling(temperature=0.8)), [params], PROMPTS, seed=2,
                 max_new_tokens=[1, 2, 3, 4])
    assert n[0] == 0 and g.compile_seconds < 1.0
    with count_compiles() as n:  # the counter does see a compilation
        jax.jit(lambda x: x + 1)(np.zeros(3))
    assert n[0] == 1


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(models):
    cfg, params, _, _ = models["gpt2"]
    dec = DecodeSpec(members=(Member(cfg),), max_new_tokens=4, sampler=Sampling(temperature=0.8))
    a, b, c = (generate(dec, [params], PROMPTS, seed=s).tokens for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def _np_sampling_reference(logp, temperature, top_k, top_p):
    x = logp.astype(np.float64) / temperature
    out = np.full_like(x, -np.inf)
    for r in range(x.shape[0]):
        order = np.argsort(-x[r], kind="stable")
        keep = np.ones(x.shape[1], bool)
        if top_k is not None:
            keep &= x[r] >= x[r, order[top_k - 1]]
        y = np.where(keep, x[r], -np.inf)
        if top_p is not None:
            p = np.exp(y - y.max())
            p /= p.sum()
            mass = np.cumsum(p[order]) - p[order]
            kept = np.zeros_like(keep)
            kept[order[mass < top_p]] = True
            keep &= kept
        y = np.where(keep, x[r], -np.inf)
        out[r] = y - np.log(np.exp(y - y.max()).sum()) - y.max()
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 5, None),
                                                     (1.3, None, 0.8), (0.5, 7, 0.6)])
def test_sampling_transform_equals_numpy(temperature, top_k, top_p):
    logp = np.asarray(jax.nn.log_softmax(jax.random.normal(jax.random.key(3), (4, 32)) * 2))
    got = np.asarray(Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
                     .transform(jnp.asarray(logp)))
    ref = _np_sampling_reference(logp, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    np.testing.assert_allclose(got[~np.isneginf(ref)], ref[~np.isneginf(ref)], atol=1e-5)


def test_sampling_draws_follow_the_transformed_distribution():
    """20k seeded draws over 12 tokens pass a chi-square test (p > 0.001) against the numpy
    reference distribution, and never pick a truncated token."""
    from scipy.stats import chi2

    logp = jax.nn.log_softmax(jax.random.normal(jax.random.key(4), (1, 12)) * 1.5)
    s = Sampling(temperature=0.9, top_k=8, top_p=0.95)
    n = 20_000
    draws = np.asarray(s.get_next_tokens(jnp.broadcast_to(logp, (n, 12)), jax.random.key(5)))
    target = np.exp(_np_sampling_reference(np.asarray(logp), 0.9, 8, 0.95)[0])
    observed = np.bincount(draws, minlength=12)
    assert observed[target == 0].sum() == 0
    keep = target > 0
    stat = np.sum((observed[keep] - n * target[keep]) ** 2 / (n * target[keep]))
    assert chi2.sf(stat, keep.sum() - 1) > 1e-3
    assert Greedy().get_next_tokens(logp, None).tolist() == [int(np.argmax(logp))]


def test_sharded_generation_equals_single_device(models):
    cfg, params, _, directory = models["llama"]
    dec = DecodeSpec(members=(Member(cfg),), max_new_tokens=NEW)
    ref = generate(dec, [params], PROMPTS)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    _, sharded = load_hf_params(directory, mesh=mesh, progress=False)
    got = generate(dec, [sharded], PROMPTS, mesh=mesh)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)


def test_bad_input_is_a_clear_error(models):
    cfg, params, _, _ = models["gpt2"]
    dec = DecodeSpec(members=(Member(cfg),), max_new_tokens=NEW)
    with pytest.raises(ConfigError, match="prompt of 197 tokens .* exceeds the model's context "
                                          "of 128"):
        generate(dec, [params], [list(range(3, 200))])
    with pytest.raises(ConfigError, match=r"at least one token; prompt\(s\) \[1\] are empty"):
        generate(dec, [params], [[5, 6], []])
    with pytest.raises(ConfigError, match="does not fit the cache of cache_len=16"):
        generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=NEW, cache_len=16), [params],
                 [list(range(3, 13))])
    with pytest.raises(ConfigError, match=r"per-row max_new_tokens \[9, 1\] must be in"):
        generate(dec, [params], [[5], [6]], max_new_tokens=[9, 1])
    with pytest.raises(ConfigError, match="vocab_limit=2000 must be in"):
        DecodeSpec(members=(Member(cfg),), max_new_tokens=1, vocab_limit=2000)
    with pytest.raises(ConfigError, match="temperature=0"):
        Sampling(temperature=0)


def test_cli_generate_json_and_streaming(models, capsys):
    cfg, params, _, directory = models["gpt2"]
    prompt = "def add(a, b):"
    assert cli.main(["generate", directory, "--prompt", prompt, "--max-new-tokens", "5",
                     "--greedy", "--json"]) == 0
    result = __import__("json").loads(capsys.readouterr().out)
    tok = load_tokenizer(directory)
    ids = tok(prompt)["input_ids"]
    ref = generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=5), [params], [ids])
    assert result["token_ids"] == ref.tokens[0, :ref.lengths[0]].tolist()
    assert result["text"] == tok.decode(result["token_ids"], skip_special_tokens=True)
    assert result["tokens_per_s"] > 0 and len(result["results"]) == 1
    # without --json the text is streamed to stdout: prompt, then the generated text
    assert cli.main(["generate", directory, "--prompt", prompt, "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out == prompt + result["text"] + "\n" and "tokens/s" in out.err
    # EFT with MODEL + beta (MODEL - MODEL) is MODEL; drafting with MODEL accepts every draft
    assert cli.main(["generate", directory, "--prompt", prompt, "--max-new-tokens", "5",
                     "--eft", directory, directory, "--beta", "0.5", "--speculative", "2",
                     "--template", "tuned={prompt}", "--json"]) == 0
    spec = __import__("json").loads(capsys.readouterr().out)
    assert spec["token_ids"] == result["token_ids"] and spec["acceptance_rate"] == 1.0
    for bad, message in ((["--prompt", ""], "are empty"),
                         (["--prompt", "x", "--speculative", "2"], "give --eft"),
                         (["--prompt", "x", "--template", "expert={prompt}"], "ROLE one of model"),
                         (["--prompt", "x", "--greedy", "--top-p", "0.5"], "--greedy excludes")):
        assert cli.main(["generate", directory, *bad, "--json"]) == 2
        assert message in __import__("json").loads(capsys.readouterr().out)["error"]

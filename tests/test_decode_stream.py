"""Streaming (``generate(..., on_tokens=)``): token-for-token identity with the one-program path
for greedy and seeded sampling, plain and combined (proxy tuning) decoders, batch > 1, a stop
token inside a chunk and per-row budgets; the callback's chunks; no compilation per chunk width."""

import jax
import numpy as np
import pytest
from test_decode import PROMPTS, count_compiles

from jaxarith.decode import loop as decode
from jaxarith.decode.combine import proxy_tuning
from jaxarith.decode.loop import DecodeSpec, Member, generate
from jaxarith.decode.sampling import Greedy, Sampling
from jaxarith.io.convert import load_hf_params

NEW = 11
WIDTH = 3  # chunks: [0], [1, 2, 3], [4, 5, 6], [7, 8, 9], [10]: the last one is cut short


@pytest.fixture(scope="module")
def llama(llama_dir):
    cfg, params = load_hf_params(llama_dir[0], progress=False)
    # expert / anti-expert for proxy tuning: the same shapes, other weights
    return cfg, [params, jax.tree.map(lambda x: x * 1.25, params),
                 jax.tree.map(lambda x: x * 0.8, params)]


@pytest.fixture
def fixed_chunks(monkeypatch):
    """Every chunk after the first token exactly WIDTH tokens, whatever the measured speed."""
    monkeypatch.setattr(decode, "FIRST_CHUNK", WIDTH)
    monkeypatch.setattr(decode, "MAX_CHUNK", WIDTH)
    monkeypatch.setattr(decode, "STREAM_SECONDS", 1e3)


@pytest.mark.parametrize("combined,sampler", [
    # plain greedy with a stop token and budgets is also tests/test_decode.py's streaming test
    pytest.param(False, Greedy(), marks=pytest.mark.slow),
    pytest.param(False, Sampling(temperature=1.5, top_k=20), marks=pytest.mark.slow),
    (True, Sampling(temperature=1.2, top_p=0.95))], ids=["plain-greedy", "plain-sampled",
                                                        "proxy-sampled"])
def test_streamed_equals_one_program(llama, fixed_chunks, combined, sampler):
    cfg, params = llama
    members = proxy_tuning(cfg, cfg, cfg, alpha=0.7) if combined else (Member(cfg),)
    params = params if combined else params[:1]

    def spec(stops=()):
        return DecodeSpec(members=members, max_new_tokens=NEW, sampler=sampler,
                          stop_tokens=stops)

    # a stop token that row 0 emits at position 5: inside the chunk [4, 5, 6]
    free = generate(spec(), params, PROMPTS, seed=3)
    stop = int(free.tokens[0, 5])
    assert stop not in free.tokens[0, :5], "pick another seed: the stop id occurs earlier"
    dec = spec((stop,))
    limits = [NEW, 2, NEW, 7]  # row 1 ends inside the first chunk, row 3 inside the third
    ref = generate(dec, params, PROMPTS, seed=3, max_new_tokens=limits)
    seen = []
    g = generate(dec, params, PROMPTS, seed=3, max_new_tokens=limits,
                 on_tokens=lambda s, t, v: seen.append((s, t.copy(), v.copy())))
    assert ref.lengths[0] == 6 and ref.lengths[1] == 2 and ref.lengths[3] <= 7
    np.testing.assert_array_equal(g.tokens, ref.tokens)
    np.testing.assert_array_equal(g.lengths, ref.lengths)
    np.testing.assert_allclose(g.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert g.steps == ref.steps
    # the callback: the first token alone, then WIDTH-wide chunks, consecutive, nothing after
    # the last row stopped; its valid tokens are exactly the returned ones
    starts = [s for s, _, _ in seen]
    widths = [t.shape[1] for _, t, _ in seen]
    assert widths[:-1] == [1] + [WIDTH] * (len(widths) - 2) and 1 <= widths[-1] <= WIDTH
    assert starts == [0, *np.cumsum(widths)[:-1].tolist()] and sum(widths) == g.steps
    tokens = np.concatenate([t for _, t, _ in seen], 1)
    valid = np.concatenate([v for _, _, v in seen], 1)
    np.testing.assert_array_equal(valid.sum(1), ref.lengths)
    np.testing.assert_array_equal(np.where(valid, tokens, dec.pad_token),
                                  ref.tokens[:, :g.steps])
    # another seed, other budgets: no new program (the last, shorter chunk included)
    with count_compiles() as n:
        generate(dec, params, PROMPTS, seed=4, max_new_tokens=[NEW, 1, 9, 4],
                 on_tokens=lambda s, t, v: None)
    assert n[0] == 0

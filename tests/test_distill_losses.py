"""Distillation losses against float64 numpy references and hand-written closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxarith.distill import losses as D
from jaxarith.errors import ConfigError

KINDS = list(D.LossKind)
B, T, VP, V = 3, 5, 13, 11  # VP: the model's (padded) vocabulary, V: the real one


# ----------------------------------------------------------------------------- numpy references


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_logsumexp_outside(logp, inside):
    out = np.where(inside, -np.inf, logp)
    m = out.max(-1, keepdims=True)
    if np.all(inside):  # nothing remains: a very negative finite log-mass, as the library uses
        return np.full(logp.shape[:-1], -1e30)
    with np.errstate(invalid="ignore"):
        return np.where(np.all(inside, -1), -1e30,
                        m[..., 0] + np.log(np.exp(out - m).sum(-1)))


def np_kl(logp, logq):
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def np_mix(logp, logq, w):
    # a plain float64 mixture of probabilities (the reference need not be log-space)
    with np.errstate(divide="ignore"):
        return np.log(w * np.exp(logp) + (1 - w) * np.exp(logq))


def np_divergence(ls, lt, kind, beta, lam):
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return np_kl(lt, ls)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return np_kl(ls, lt)
    if kind == "jsd":
        m = np_mix(lt, ls, beta)
        return beta * np_kl(lt, m) + (1 - beta) * np_kl(ls, m)
    if kind == "skew_forward_kl":
        return np_kl(lt, np_mix(lt, ls, lam))
    return np_kl(ls, np_mix(ls, lt, lam))


def np_loss(s, t, kind, *, tau=1.0, scale=True, beta=0.5, lam=0.1, vocab=V, top_k=0,
            tail=False):
    """Per-position reference: real vocabulary sliced off, top-k by numpy argsort."""
    s = np.asarray(s, np.float64)[..., :vocab]
    t = np.asarray(t, np.float64)[..., :vocab]
    if top_k:
        ls1, lt1 = np_log_softmax(s), np_log_softmax(t)
        ids = np.argsort(-lt1, axis=-1, kind="stable")[..., :top_k]
        sk = np.take_along_axis(ls1, ids, -1)
        tk = np.take_along_axis(lt1, ids, -1)
        if tail:
            inside = np.zeros(ls1.shape, bool)
            np.put_along_axis(inside, ids, True, -1)
            # the remaining masses as float64 logsumexps (exp underflows at -1e4)
            sk = np.concatenate([sk, np_logsumexp_outside(ls1, inside)[..., None]], -1)
            tk = np.concatenate([tk, np_logsumexp_outside(lt1, inside)[..., None]], -1)
        s, t = sk, tk
    ls, lt = np_log_softmax(s / tau), np_log_softmax(t / tau)
    return (tau ** 2 if scale else 1.0) * np_divergence(ls, lt, kind, beta, lam)


def random_logits(seed, extreme=True):
    rng = np.random.default_rng(seed)
    s = (3 * rng.standard_normal((B, T, VP))).astype(np.float32)
    t = (3 * rng.standard_normal((B, T, VP))).astype(np.float32)
    if extreme:  # +-1e4 logits at distinct values (no ties at the top-k boundary)
        s[0, 0, 2], s[1, 3, 7], s[2, 1, 0] = 1e4, -1e4, 9.5e3
        t[0, 1, 3], t[1, 2, 5], t[2, 4, 1], t[0, 0, 2] = -1e4, 1e4, 9.9e3, 9.7e3
    s[..., V:], t[..., V:] = 50.0, 60.0  # padded rows: large, and must not count
    return s, t


MASK = np.ones((B, T), np.float32)
MASK[1, 4] = MASK[2, 0] = 0.0


def check(got, want):
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- full vocabulary


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau,scale", [(1.0, True), (2.0, True), (0.5, False)])
def test_losses_match_float64_reference(kind, tau, scale):
    s, t = random_logits(0)
    opts = D.DistillLoss(loss=kind, temperature=tau, scale_by_temperature=scale, beta=0.3,
                         lam=0.1)
    got = D.per_token(jnp.asarray(s), jnp.asarray(t), opts, V)
    want = np_loss(s, t, kind, tau=tau, scale=scale, beta=0.3, lam=0.1)
    check(got, want)
    # the masked mean skips masked positions
    check(D.masked_mean(got, jnp.asarray(MASK)), (want * MASK).sum() / MASK.sum())
    named = getattr(D, kind.value)(jnp.asarray(s), jnp.asarray(t), jnp.asarray(MASK),
                                   temperature=tau, scale_by_temperature=scale, beta=0.3,
                                   lam=0.1, vocab_size=V)
    check(named, (want * MASK).sum() / MASK.sum())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k,tail", [(0, False), (4, False), (4, True)])
def test_gradients_finite_at_extreme_logits(kind, top_k, tail):
    s, t = random_logits(1)
    opts = D.DistillLoss(loss=kind, temperature=2.0, top_k=top_k, top_k_tail=tail)

    def f(x):
        return D.masked_mean(D.per_token(x, jnp.asarray(t), opts, V), jnp.asarray(MASK))

    value, g = jax.value_and_grad(f)(jnp.asarray(s))
    assert np.isfinite(float(value))
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    assert np.all(g[..., V:] == 0.0)  # padded vocabulary rows get no gradient
    assert np.all(g[1, 4] == 0.0) and np.all(g[2, 0] == 0.0)  # masked positions neither


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_of_a_distribution_with_itself_is_zero(kind):
    s, _ = random_logits(2)
    for top_k, tail in [(0, False), (5, True)]:
        opts = D.DistillLoss(loss=kind, temperature=1.5, top_k=top_k, top_k_tail=tail)
        got = np.asarray(D.per_token(jnp.asarray(s), jnp.asarray(s), opts, V))
        np.testing.assert_allclose(got, 0.0, atol=1e-5)


def test_padded_vocab_is_excluded():
    s, t = random_logits(3, extreme=False)
    opts = D.DistillLoss(loss="forward_kl")
    full = D.per_token(jnp.asarray(s), jnp.asarray(t), opts, V)
    sliced = D.per_token(jnp.asarray(s[..., :V]), jnp.asarray(t[..., :V]), opts)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(sliced))


# ----------------------------------------------------------------------------- closed forms


def bern_kl(a, b):
    """KL(Bern(a) || Bern(b)), written by hand."""
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def two_token_logits(p):
    return np.array([[[math.log(p), math.log(1 - p)]]], np.float32)


P_T, P_S = 0.8, 0.3


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_closed_forms(beta):
    t, s = two_token_logits(P_T), two_token_logits(P_S)
    got = float(D.jsd(jnp.asarray(s), jnp.asarray(t), beta=beta)[()])
    if beta == 0.0:
        want = bern_kl(P_T, P_S)  # forward KL (TRL GKD's beta = 0)
    elif beta == 1.0:
        want = bern_kl(P_S, P_T)  # reverse KL
    else:  # JS divergence = H(M) - (H(p) + H(q)) / 2
        h = lambda a: -a * math.log(a) - (1 - a) * math.log(1 - a)  # noqa: E731
        want = h((P_T + P_S) / 2) - (h(P_T) + h(P_S)) / 2
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
def test_skew_kl_closed_forms(lam):
    t, s = two_token_logits(P_T), two_token_logits(P_S)
    fwd = float(D.skew_forward_kl(jnp.asarray(s), jnp.asarray(t), lam=lam)[()])
    rev = float(D.skew_reverse_kl(jnp.asarray(s), jnp.asarray(t), lam=lam)[()])
    assert fwd == pytest.approx(bern_kl(P_T, lam * P_T + (1 - lam) * P_S), rel=1e-5, abs=1e-6)
    assert rev == pytest.approx(bern_kl(P_S, (1 - lam) * P_T + lam * P_S), rel=1e-5, abs=1e-6)
    if lam == 0.0:
        assert fwd == pytest.approx(bern_kl(P_T, P_S), rel=1e-6)
        assert rev == pytest.approx(bern_kl(P_S, P_T), rel=1e-6)
    if lam == 1.0:
        assert fwd == 0.0 and rev == 0.0


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_matches_reference(kind, tail, tau):
    s, t = random_logits(4)
    opts = D.DistillLoss(loss=kind, temperature=tau, top_k=4, top_k_tail=tail, beta=0.7)
    got = D.per_token(jnp.asarray(s), jnp.asarray(t), opts, V)
    check(got, np_loss(s, t, kind, tau=tau, beta=0.7, top_k=4, tail=tail))


@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_k_equal_vocab_is_the_full_loss(kind):
    s, t = random_logits(5)
    full = D.per_token(jnp.asarray(s), jnp.asarray(t), D.DistillLoss(loss=kind, temperature=2.0),
                       V)
    for tail in (False, True):
        k = D.per_token(jnp.asarray(s), jnp.asarray(t),
                        D.DistillLoss(loss=kind, temperature=2.0, top_k=V, top_k_tail=tail), V)
        np.testing.assert_allclose(np.asarray(k), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_topk_from_cached_pairs_equals_live():
    s, t = random_logits(6)
    opts = D.DistillLoss(loss="jsd", temperature=2.0, top_k=3, top_k_tail=True)
    top = D.teacher_topk(jnp.asarray(t), 3, V)
    assert top.ids.dtype == jnp.int32 and top.logp.shape == (B, T, 3) and top.rest.shape == (B, T)
    assert int(jnp.max(top.ids)) < V
    live = D.per_token(jnp.asarray(s), jnp.asarray(t), opts, V)
    host = D.TopK(*(np.asarray(x) for x in top))  # as read back from a cache
    cached = D.per_token_topk(jnp.asarray(s), host, opts, V)
    np.testing.assert_array_equal(np.asarray(live), np.asarray(cached))


# ----------------------------------------------------------------------------- total and errors


def test_total_sums_alpha_mix_and_metrics():
    s, t = random_logits(7, extreme=False)
    rng = np.random.default_rng(0)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    opts = D.DistillLoss(loss="reverse_kl", temperature=2.0, alpha=0.25)
    loss, count, m = D.total_sums(jnp.asarray(s), jnp.asarray(t),
                                  jnp.asarray(targets), jnp.asarray(MASK), opts, V)
    d = (np_loss(s, t, "reverse_kl", tau=2.0) * MASK).sum()
    ce = (-np.take_along_axis(np_log_softmax(s[..., :V]), targets[..., None], -1)[..., 0]
          * MASK).sum()
    kl1 = (np_loss(s, t, "forward_kl") * MASK).sum()
    assert float(count) == MASK.sum()
    check(m["distill_loss"], d)
    check(m["ce"], ce)
    check(m["kl_t1"], kl1)
    check(loss, 0.25 * d + 0.75 * ce)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown loss"):
        D.DistillLoss(loss="kl_both_ways")
    with pytest.raises(ConfigError, match="temperature"):
        D.DistillLoss(temperature=0.0)
    with pytest.raises(ConfigError, match="alpha"):
        D.DistillLoss(alpha=1.5)
    with pytest.raises(ConfigError, match="top_k_tail"):
        D.DistillLoss(top_k_tail=True)
    with pytest.raises(ConfigError, match="top_k=20 exceeds the vocabulary size 11"):
        D.DistillLoss(top_k=20).check_vocab(V)
    s, t = random_logits(8, extreme=False)
    with pytest.raises(ConfigError, match="top_k=12 exceeds the vocabulary size 11"):
        D.per_token(jnp.asarray(s), jnp.asarray(t), D.DistillLoss(top_k=12), V)
    with pytest.raises(ConfigError, match="student vocabulary 13 != teacher vocabulary 11"):
        D.per_token(jnp.asarray(s), jnp.asarray(t[..., :V]), D.DistillLoss())

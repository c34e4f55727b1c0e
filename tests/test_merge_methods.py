"""mergekit 0.1.5's other merge methods: the stochastic ones (DELLA) against a float64 numpy
formula with the same masks, Model Breadcrumbs' counts by a hand table, and both executors (on
1 and 8 devices) bit for bit. Parity with mergekit's own output: ``test_mergekit_parity.py``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxarith import arith, testing
from jaxarith.arith import ops
from jaxarith.arith.kernel import NO_LAYER
from jaxarith.arith.select import MergeSpec, path_seed
from jaxarith.io.convert.hf import load_hf_params
from jaxarith.sharding import make_mesh


def _uniforms(seed, path, layer, n_models, shape):
    """The executors' DELLA draws, re-derived from their documented key recipe:
    ``fold_in(fold_in(key(seed, crc32(path)), layer), model)``, then ``uniform``."""
    key = jax.random.fold_in(jax.random.wrap_key_data(path_seed(seed, path),
                                                      impl="threefry2x32"),
                             NO_LAYER if layer is None else np.uint32(layer))
    return [np.asarray(jax.random.uniform(jax.random.fold_in(key, i), shape))
            for i in range(n_models)]


def np_della(base, models, uniforms, weights, densities, epsilons, lam, consensus, normalize,
             rescale=True):
    """DELLA in float64 numpy (mergekit 0.1.5's della_magprune + generalised task arithmetic):
    per row (first axis; a vector is one row) keep probability ``d - e + 2 e rank / (C - 1)``
    by magnitude rank, the kept entries rescaled to the task vector's L1 norm."""
    base = base.astype(np.float64)
    tvs = []
    for m, u, d, e in zip(models, uniforms, densities, epsilons, strict=True):
        tv = m.astype(np.float64) - base
        rows = tv.reshape(1, -1) if tv.ndim == 1 else tv.reshape(tv.shape[0], -1)
        rank = np.argsort(np.argsort(np.abs(rows), axis=-1, kind="stable"), axis=-1)
        probs = (d - e) + rank / (rows.shape[1] - 1) * 2 * e
        kept = np.where(u.reshape(rows.shape) < probs, rows, 0.0)
        before, after = np.abs(rows).sum(), np.abs(kept).sum()
        if rescale and before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
        tvs.append(kept.reshape(tv.shape))
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * base.ndim)
    tvs = np.stack(tvs) * w
    if consensus:
        agree = np.sign(tvs) == np.where(tvs.sum(0) >= 0, 1.0, -1.0)
        mixed = np.where(agree, tvs, 0).sum(0)
        div = np.where(agree, w, 0).sum(0)
        div = np.where(div == 0, 1.0, div)
    else:
        mixed, div = tvs.sum(0), w.sum()
    return base + lam * (mixed / div if normalize else mixed)


def rand_tree(rng, layers=3):
    return {"embed": rng.normal(size=(64, 40)).astype(np.float32),
            "layers": {"mlp": {"up": rng.normal(size=(layers, 40, 48)).astype(np.float32)},
                       "norm": rng.normal(size=(layers, 40)).astype(np.float32)}}


@pytest.mark.parametrize("name,rescale", [("della", None), ("della_linear", None),
                                          ("della", False)])
def test_della_matches_numpy_with_the_same_draws(name, rescale):
    rng = np.random.default_rng(3)
    base, m1, m2 = (rand_tree(rng) for _ in range(3))
    w, d, e, lam = [1.0, 0.6], [0.5, [0.3, 0.7]], [0.15, 0.2], 0.9
    opts = {} if rescale is None else {"rescale": rescale}
    out = arith.merge(name, [base, m1, m2], shared={"lambda": lam}, seed=9,
                      per_model=({"weight": w[0], "density": d[0], "epsilon": e[0]},
                                 {"weight": w[1], "density": d[1], "epsilon": e[1]}), **opts)
    ties = name == "della"
    def leaf(tree, path, layer):
        x = tree
        for k in path.split("/"):
            x = x[k]
        return x if layer is None else x[layer]

    for path, layers in (("embed", [None]), ("layers/mlp/up", [0, 1, 2]),
                         ("layers/norm", [0, 1, 2])):
        for layer in layers:
            pick = functools.partial(leaf, path=path, layer=layer)
            dens = [d[0], d[1][0] + (d[1][1] - d[1][0]) * (layer or 0) / 2]
            u = _uniforms(9, path, layer, 2, pick(base).shape)
            want = np_della(pick(base), [pick(m1), pick(m2)], u, w, dens, e, lam, "sum" if ties
                            else None, normalize=ties, rescale=rescale is not False)
            np.testing.assert_allclose(np.asarray(pick(out)), want, rtol=2e-5, atol=2e-6,
                                       err_msg=f"{path} {layer}")
            kept = [np.abs(pick(out) - pick(base)) > 0]
            assert 0.05 < kept[0].mean() < 0.95


def test_della_keeps_the_rank_dependent_fraction():
    """Kept fraction by magnitude rank: d - e for the smallest, d + e for the largest."""
    rng = np.random.default_rng(0)
    base = {"embed": np.zeros((4000, 50), np.float32)}
    tuned = {"embed": rng.normal(size=(4000, 50)).astype(np.float32)}
    out = np.asarray(arith.merge("della_linear", [base, tuned], seed=1, rescale=False,
                                 per_model=({"density": 0.5, "epsilon": 0.3},))["embed"])
    kept = out != 0
    rank = np.argsort(np.argsort(np.abs(tuned["embed"]), axis=1), axis=1)
    low, high = kept[rank < 5].mean(), kept[rank >= 45].mean()
    assert abs(low - 0.23) < 0.02 and abs(high - 0.77) < 0.02, (low, high)
    np.testing.assert_array_equal(out[kept], tuned["embed"][kept])  # no rescale


def test_della_epsilon_outside_the_unit_interval_is_an_error():
    from jaxarith.errors import ConfigError

    rng = np.random.default_rng(0)
    t = rand_tree(rng)
    with pytest.raises(ConfigError, match=r"della: model 0: tensor embed: density 0.9 \+- "
                                          r"epsilon 0.15 must lie in \(0, 1\)"):
        arith.merge("della", [t, t], per_model=({"density": 0.9},))


def test_breadcrumbs_counts_hand_table():
    """(density, gamma, n) -> (keep the k_hi largest, but not the k_lo largest): mergekit's
    magnitude_outliers with Python floats."""
    table = [((0.7, 0.01, 30720), (21811, 307)), ((0.9, 0.01, 30720), (27955, 307)),
             ((0.5, 0.05, 1000), (550, 50)), ((0.99, 0.05, 1000), (1000, 10)),
             ((1.0, 0.05, 1000), (1000, 0)), ((0.0, 0.05, 1000), (50, 50)),
             ((0.3, 0.0, 10), (3, 0))]
    for args, want in table:
        assert ops.outlier_counts(*args) == want, args


def test_breadcrumbs_matches_numpy():
    rng = np.random.default_rng(1)
    base, m1 = rand_tree(rng), rand_tree(rng)
    out = arith.merge("breadcrumbs", [base, m1], per_model=({"density": 0.6, "gamma": 0.1},))
    for b, m, o in ((base["embed"], m1["embed"], out["embed"]),
                    (base["layers"]["mlp"]["up"][1], m1["layers"]["mlp"]["up"][1],
                     out["layers"]["mlp"]["up"][1])):
        tv = (m - b).reshape(-1)
        order = np.argsort(np.abs(tv))  # ascending, no ties in random data
        n = tv.size
        keep = np.zeros(n, bool)
        keep[order[n - int(0.6 * n) - int(0.1 * n): n - int(0.1 * n)]] = True
        np.testing.assert_allclose(np.asarray(o).reshape(-1), b.reshape(-1) + tv * keep,
                                   rtol=0, atol=1e-6)


# --------------------------------------------------------------- executors: 1 and 8 devices, files

CASES = [
    ("nearswap", [0, 1], {"t": [0.01, 0.03]}, (), {}),
    ("model_stock", [0, 1, 2, 3], {}, (), {"filter_wise": True}),
    ("breadcrumbs_ties", [0, 1, 2], {}, ({"density": 0.6, "gamma": 0.05}, {"density": 0.8}),
     {"rescale": True}),
    ("della", [0, 1, 2], {}, ({"density": 0.5}, {"density": [0.4, 0.7]}), {}),
    ("sce", [0, 1, 2, 3], {"select_topk": 0.5}, (), {}),
    ("nuslerp", [0, 1, 2], {}, ({"weight": 0.3}, {"weight": 0.6}),
     {"base": True, "nuslerp_flatten": False}),
    ("multislerp", [1, 2, 3], {}, ({"weight": 0.3}, {"weight": 0.6}, {"weight": 1.0}), {}),
    ("arcee_fusion", [0, 1], {}, (), {}),
    ("karcher", [0, 1, 2], {}, (), {"max_iter": 4}),
]


@pytest.fixture(scope="module")
def four_llamas(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods_llamas")
    dirs = []
    for s in range(4):
        p = str(d / f"m{s}")
        testing.make_hf_model(p, testing.tiny_llama_config(), seed=20 + s, max_shard_size="100KB",
                              dtype="bfloat16")
        dirs.append(p)
    return dirs


def _equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(
        lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


# the four slowest executor-equality cases (15-30 s each) run with the slow tests (CI runs them)
_SLOW = {"della", "sce", "breadcrumbs_ties", "karcher"}


@pytest.mark.parametrize("name,idx,shared,per_model,options", [
    pytest.param(*c, marks=pytest.mark.slow) if c[0] in _SLOW else c for c in CASES],
    ids=[c[0] for c in CASES])
def test_streamed_equals_memory_and_mesh(four_llamas, tmp_path, name, idx, shared, per_model,
                                         options):
    spec = MergeSpec(method=arith.method(name, **options), shared=shared, per_model=per_model,
                     seed=3)
    refs = [four_llamas[i] for i in idx]
    cfg, _ = load_hf_params(refs[0], progress=False)
    trees = [load_hf_params(r, progress=False)[1] for r in refs]
    mem = arith.run(spec, cfg, trees)
    assert not _equal(mem, trees[0])
    mesh = make_mesh("fsdp=4,tensor=2")
    sharded = arith.run(spec, cfg, [load_hf_params(r, mesh=mesh, progress=False)[1]
                                    for r in refs])
    assert _equal(mem, sharded)
    arith.run_streamed(spec, refs, tmp_path / "out", max_shard_size="100KB", progress=False)
    _, streamed = load_hf_params(tmp_path / "out", progress=False)
    assert _equal(mem, streamed)


def test_order_statistic_equals_the_sorted_entry():
    """ops.order_statistic (Arcee Fusion's quantiles without a sort) against np.sort, with
    negatives, zeros of both signs, ties and one entry."""
    from jaxarith.arith.ops import order_statistic

    f = jax.jit(order_statistic, static_argnums=1)
    rng = np.random.default_rng(0)
    for trial in range(12):
        n = int(rng.integers(1, 3000))
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
        if trial % 3 == 0:
            x[rng.integers(0, n, n // 3)] = 0.0
        if trial % 4 == 0:
            x = np.abs(x)
        if trial % 5 == 0:
            x[: n // 2] = -0.0
        s = np.sort(x)
        for k in sorted({0, n // 4, n // 2, n - 1}):
            assert float(f(jnp.asarray(x), k)) == float(s[k]), (trial, k)

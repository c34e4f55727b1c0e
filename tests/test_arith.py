"""Delta arithmetic and merging: numpy references, round trips, executor agreement, CLI, YAML."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import yaml

from jaxarith import arith, testing
from jaxarith.arith import ops
from jaxarith.arith.select import MergeSpec
from jaxarith.cli import main
from jaxarith.errors import ArchitectureMismatchError
from jaxarith.io.convert.hf import HFCheckpoint, load_hf_params
from jaxarith.sharding import make_mesh

# ----------------------------------------------------------------------------- numpy references


def np_trim(x, density):
    k = ops.keep_count(density, x.size)
    if k == 0:
        return np.zeros_like(x)
    thr = np.sort(np.abs(x).ravel())[-k]
    return np.where(np.abs(x) >= thr, x, 0)


def np_task(base, models, weights, lam, densities, trim, consensus, normalize):
    w = np.asarray(weights, np.float32).reshape((-1,) + (1,) * base.ndim)
    tvs = np.stack([np_trim(m - base, d) if trim else m - base
                    for m, d in zip(models, densities, strict=True)]) * w
    if consensus:
        elected = np.where(tvs.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(tvs) == elected
        mixed = np.where(agree, tvs, 0).sum(0)
        div = np.where(agree, w, 0).sum(0)
        div = np.where(div == 0, 1.0, div)
    else:
        mixed = tvs.sum(0)
        div = w.sum()
        div = 1.0 if abs(div) < 1e-8 else div
    return base + lam * (mixed / div if normalize else mixed)


def np_slerp(a, b, t, thr=0.9995):
    an, bn = np.linalg.norm(a.astype(np.float64)), np.linalg.norm(b.astype(np.float64))
    cos = np.clip(np.vdot(a.astype(np.float64), b.astype(np.float64)) / (an * bn), -1, 1)
    if abs(cos) > thr:
        return (1 - t) * a + t * b
    th = np.arccos(cos)
    return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


def rand_tree(rng, layers=3):
    return {"embed": rng.normal(size=(32, 8)).astype(np.float32),
            "layers": {"mlp": {"up": rng.normal(size=(layers, 8, 16)).astype(np.float32)}}}


def per_tensor(tree):
    """(name, array) per tensor, stacked leaves split per layer (the formulas' unit)."""
    yield "embed", tree["embed"]
    for i, x in enumerate(tree["layers"]["mlp"]["up"]):
        yield f"up{i}", x


def compare(out, ref_fn, trees, rtol=2e-6, atol=2e-6):
    outs = dict(per_tensor(jax.tree.map(np.asarray, out)))
    ins = [dict(per_tensor(t)) for t in trees]
    for name, got in outs.items():
        want = ref_fn(*[d[name] for d in ins])
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("density", [0.2, 0.7])
def test_ties_and_task_arithmetic_match_numpy(seed, density):
    rng = np.random.default_rng(seed)
    base, m1, m2, m3 = (rand_tree(rng) for _ in range(4))
    w = [1.0, 0.3 + seed * 0.2, 0.7]
    d = [density, 0.5, 1.0]
    out = arith.ties(base, [m1, m2, m3], weights=w, densities=d, lam=0.9)
    compare(out, lambda b, *ms: np_task(b, ms, w, 0.9, d, True, True, True), [base, m1, m2, m3])
    out = arith.task_arithmetic(base, [m1, m2, m3], weights=w, lam=0.6)
    compare(out, lambda b, *ms: np_task(b, ms, w, 0.6, d, False, False, False),
            [base, m1, m2, m3])
    out = arith.soup([m1, m2, m3])
    compare(out, lambda *ms: sum(ms) / 3, [m1, m2, m3])


def test_ties_sign_election_and_zero_divisor():
    base = {"embed": np.zeros((1, 4), np.float32)}
    # entry 0: +3 vs -1 -> + wins, mean of agreeing = 3; entry 1: -2,-2 -> -2;
    # entry 2: both zero -> no model agrees, divisor 1, result 0; entry 3: +1 vs -1 tie -> +.
    m1 = {"embed": np.array([[3.0, -2.0, 0.0, 1.0]], np.float32)}
    m2 = {"embed": np.array([[-1.0, -2.0, 0.0, -1.0]], np.float32)}
    out = np.asarray(arith.ties(base, [m1, m2], densities=[1.0, 1.0])["embed"])
    np.testing.assert_array_equal(out, [[3.0, -2.0, 0.0, 1.0]])
    # weights summing to zero: task arithmetic's normalise divides by 1 instead of 0
    out = np.asarray(arith.task_arithmetic(base, [m1, m2], weights=[1.0, -1.0],
                                           normalize=True)["embed"])
    np.testing.assert_array_equal(out, [[4.0, 0.0, 0.0, 2.0]])


def test_magnitude_mask_exact_topk():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1000,)).astype(np.float32)
    for k in (0, 1, 7, 500, 1000):
        got = np.asarray(ops.magnitude_mask(x, k))
        assert got.sum() == k
        if k:
            assert np.abs(x[got]).min() >= np.abs(x[~got]).max(initial=0)


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_dare_reproducible_and_rescaled(combine):
    rng = np.random.default_rng(0)
    base, m1, m2 = (rand_tree(rng, layers=2) for _ in range(3))
    kw = dict(weights=[1.0, 0.5], densities=[0.3, 0.6], combine=combine)
    a = arith.dare(base, [m1, m2], seed=7, **kw)
    b = arith.dare(base, [m1, m2], seed=7, **kw)
    c = arith.dare(base, [m1, m2], seed=8, **kw)
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c), strict=True):
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)
    # one model, weight 1, lambda 1: kept entries are base + tau / density, the others base
    out = np.asarray(arith.dare(base, [m1], densities=[0.25], seed=3)["embed"])
    tau = m1["embed"] - base["embed"]
    kept = ~np.isclose(out, base["embed"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(out[kept], (base["embed"] + tau / 0.25)[kept], rtol=1e-5)
    assert 0.15 < kept.mean() < 0.35


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_and_lerp_match_numpy(t):
    rng = np.random.default_rng(1)
    a, b = rand_tree(rng), rand_tree(rng)
    compare(arith.slerp(a, b, t), lambda x, y: np_slerp(x, y, t), [a, b])
    compare(arith.lerp(a, b, t), lambda x, y: (1 - t) * x + t * y, [a, b])
    if t == 0.0:  # t = 0 is exactly the first model
        for x, y in zip(jax.tree.leaves(arith.slerp(a, b, t)), jax.tree.leaves(a), strict=True):
            np.testing.assert_array_equal(x, y)
    # parallel vectors fall back to lerp (no 0/0)
    par = jax.tree.map(lambda x: 2 * x, a)
    compare(arith.slerp(a, par, t), lambda x, y: (1 - t) * x + t * y, [a, par])


def test_schedule_and_selection():
    rng = np.random.default_rng(2)
    a, b = rand_tree(rng), rand_tree(rng)
    out = arith.lerp(a, b, [0.0, 1.0], include=["layers/*"])
    np.testing.assert_array_equal(out["embed"], a["embed"])  # not selected
    ups = np.asarray(out["layers"]["mlp"]["up"])
    for i, t in enumerate([0.0, 0.5, 1.0]):  # schedule interpolated over 3 layers
        np.testing.assert_allclose(ups[i], (1 - t) * a["layers"]["mlp"]["up"][i]
                                   + t * b["layers"]["mlp"]["up"][i], rtol=1e-6)
    d = arith.delta(a, b, exclude=["embed"])
    np.testing.assert_array_equal(d["embed"], 0)


def test_round_trip_float32_and_bfloat16():
    rng = np.random.default_rng(3)
    i32, b32 = rand_tree(rng), rand_tree(rng)
    back = arith.apply_delta(b32, arith.delta(i32, b32))
    for x, y, b in zip(jax.tree.leaves(back), jax.tree.leaves(i32), jax.tree.leaves(b32),
                       strict=True):
        ulp = np.spacing(np.maximum(np.abs(y), np.abs(b)))  # ulp of the larger operand
        assert np.all(np.abs(np.asarray(x) - y) <= 2 * ulp)
    ib = jax.tree.map(lambda x: (x * 0.02).astype(ml_dtypes.bfloat16), i32)
    bb = jax.tree.map(lambda x: (x * 0.02).astype(ml_dtypes.bfloat16), b32)
    d = arith.delta(ib, bb)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(d))
    back = arith.apply_delta(bb, d)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ib), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x).view(np.uint16), y.view(np.uint16))


# ------------------------------------------------------------------- checkpoints and executors


@pytest.fixture(scope="module")
def three_llamas(tmp_path_factory):
    d = tmp_path_factory.mktemp("arith_llamas")
    cfg = testing.tiny_llama_config()
    dirs = []
    for s in range(3):
        p = str(d / f"m{s}")
        testing.make_hf_model(p, cfg, seed=10 + s, max_shard_size="100KB", dtype="bfloat16")
        dirs.append(p)
    return dirs


CASES = [
    ("delta", [1, 0], {}, ()),
    ("apply_delta", [0, 1], {"scale": 0.7}, ()),
    ("task_arithmetic", [0, 1, 2], {"lambda": 0.7}, ({"weight": 0.3}, {"weight": [0.2, 0.9]})),
    ("ties", [0, 1, 2], {"lambda": 0.8},
     ({"weight": 1.0, "density": 0.3}, {"weight": [0.2, 0.9], "density": 0.6})),
    ("dare_ties", [0, 1, 2], {}, ({"density": 0.5}, {"density": [0.4, 0.8]})),
    ("slerp", [0, 1], {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]}, ()),
    ("linear", [0, 1, 2], {}, ({"weight": 0.3}, {"weight": 0.1}, {"weight": 0.6})),
]


def _equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(
        lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.mark.parametrize("name,idx,shared,per_model", CASES, ids=[c[0] for c in CASES])
def test_streamed_equals_memory_and_mesh(three_llamas, tmp_path, name, idx, shared, per_model):
    spec = MergeSpec(method=arith.method(name), shared=shared, per_model=per_model, seed=3)
    refs = [three_llamas[i] for i in idx]
    cfg, _ = load_hf_params(refs[0], progress=False)
    trees = [load_hf_params(r, progress=False)[1] for r in refs]
    mem = arith.run(spec, cfg, trees)
    mesh = make_mesh("fsdp=4,tensor=2")
    sharded = arith.run(spec, cfg, [load_hf_params(r, mesh=mesh, progress=False)[1]
                                    for r in refs])
    assert _equal(mem, sharded)
    info = arith.run_streamed(spec, refs, tmp_path / "out", max_shard_size="100KB",
                              progress=False)
    assert len(info["files"]) > 1
    _, streamed = load_hf_params(tmp_path / "out", progress=False)
    assert _equal(mem, streamed)


def test_architecture_mismatch_writes_nothing(three_llamas, tmp_path):
    other = tmp_path / "wide"
    testing.make_hf_model(other, testing.tiny_llama_config(vocab_size=1100))
    with pytest.raises(ArchitectureMismatchError, match="vocabulary sizes") as e:
        arith.run_streamed(MergeSpec(method=arith.method("delta")), [three_llamas[0],
                           str(other)], tmp_path / "out", progress=False)
    assert "model.embed_tokens.weight" in str(e.value)
    assert not (tmp_path / "out").exists()
    rc = main(["delta", "extract", str(other), three_llamas[0], str(tmp_path / "o2"), "--json"])
    assert rc == 2 and not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------- CLI


def test_delta_norms_cli(three_llamas, capsys):
    base, other = three_llamas[0], three_llamas[1]
    for measure in ("abs", "square"):
        assert main(["delta", "norms", base, other, "--measure", measure, "--per-layer",
                     "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        cb, co = HFCheckpoint(base), HFCheckpoint(other)
        f = np.abs if measure == "abs" else np.square
        sums, n = np.zeros(3), 0
        for k in cb.keys():
            b = cb.get(k).astype(np.float64)
            o = co.get(k).astype(np.float64)
            sums += [f(b).sum(), f(o).sum(), f(o - b).sum()]
            n += b.size
        bn, on, dn = sums / n
        want = {"base_norm": bn, "other_norm": on, "diff_norm": dn, "base_over_other": bn / on,
                "diff_over_other": dn / on, "diff_over_base": dn / bn}
        for k, v in want.items():
            assert r[k] == pytest.approx(v, rel=1e-12), k
        assert r["measure"] == measure and len(r["per_layer"]) == 3


def test_cli_extract_apply_round_trip(three_llamas, tmp_path, capsys):
    tuned, base = three_llamas[1], three_llamas[0]
    assert main(["delta", "extract", tuned, base, str(tmp_path / "d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["executor"] == "streamed"
    assert main(["delta", "apply", base, str(tmp_path / "d"), str(tmp_path / "back"),
                 "--json"]) == 0
    capsys.readouterr()
    a, b = HFCheckpoint(tuned), HFCheckpoint(str(tmp_path / "back"))
    d = HFCheckpoint(str(tmp_path / "d"))
    for k in a.keys():
        assert d.dtype(k) == np.float32
        np.testing.assert_array_equal(a.get(k).view(np.uint16), b.get(k).view(np.uint16))


MERGEKIT_YAMLS = {
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {m0}
models:
  - model: {m0}
  - model: {m1}
    parameters: {{weight: 0.7}}
  - model: {m2}
    parameters: {{weight: [0.2, 0.9]}}
parameters: {{lambda: 0.8}}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {m0}
models:
  - model: {m1}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {m2}
    parameters:
      weight: 0.5
      density: [{{filter: self_attn, value: 0.3}}, {{value: 0.7}}]
parameters: {{normalize: true, int8_mask: true}}
dtype: bfloat16
""",
    "dare_ties": """
merge_method: dare_ties
base_model: {m0}
models:
  - model: {m1}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.4, density: 0.6}}
""",
    "slerp": """
slices:
  - sources:
      - model: {m0}
        layer_range: [0, 2]
      - model: {m1}
        layer_range: [0, 2]
merge_method: slerp
base_model: {m0}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - filter: mlp
      value: [1, 0]
    - value: 0.5
dtype: bfloat16
""",
}
LIBRARY_CALLS = {
    # `dtype: float32` on bfloat16 models: the output is float32 (out_dtype falls back to dtype)
    "task_arithmetic": lambda ms: arith.task_arithmetic(
        ms[0], ms[1:], CFG[0], weights=[0.7, [0.2, 0.9]], lam=0.8, dtype="float32"),
    "ties": lambda ms: arith.ties(
        ms[0], ms[1:], CFG[0], weights=[1.0, 0.5],
        densities=[0.5, [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]]),
    "dare_ties": lambda ms: arith.dare(ms[0], ms[1:], CFG[0], weights=[0.6, 0.4],
                                       densities=[0.5, 0.6], combine="ties"),
    "slerp": lambda ms: arith.slerp(ms[0], ms[1], [{"filter": "self_attn", "value": [0, 1]},
                                                   {"filter": "mlp", "value": [1, 0]},
                                                   {"value": 0.5}], CFG[0]),
}
CFG = [None]


@pytest.mark.parametrize("name", list(MERGEKIT_YAMLS))
def test_mergekit_yaml_matches_library(three_llamas, tmp_path, capsys, name):
    text = MERGEKIT_YAMLS[name].format(m0=three_llamas[0], m1=three_llamas[1],
                                       m2=three_llamas[2])
    yaml.safe_load(text)
    (tmp_path / "merge.yaml").write_text(text)
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == name
    cfg, _ = load_hf_params(three_llamas[0], progress=False)
    CFG[0] = cfg
    n = 2 if name == "slerp" else 3
    ms = [load_hf_params(three_llamas[i], progress=False)[1] for i in range(n)]
    want = LIBRARY_CALLS[name](ms)
    _, got = load_hf_params(tmp_path / "out", progress=False)
    assert _equal(want, got)
    assert os.path.exists(tmp_path / "out" / "tokenizer.json")


# ------------------------------------------------- DARE, consensus, rescale: numpy references


def _dare_masks(seed, path, layer, densities, shape):
    """The executors' DARE keep-masks, re-derived from their documented key recipe:
    ``fold_in(fold_in(key(seed, crc32(path)), layer), model)``, then ``bernoulli(density)``."""
    from jaxarith.arith.kernel import NO_LAYER
    from jaxarith.arith.select import path_seed

    key = jax.random.fold_in(jax.random.wrap_key_data(path_seed(seed, path),
                                                      impl="threefry2x32"),
                             NO_LAYER if layer is None else np.uint32(layer))
    return [np.asarray(jax.random.bernoulli(jax.random.fold_in(key, i), d, shape))
            for i, d in enumerate(densities)]


def np_dare(base, models, masks, weights, densities, lam, consensus, normalize, rescale):
    """DARE in float64 numpy with given keep-masks (sign election as in np_task)."""
    base = base.astype(np.float64)
    tvs = []
    for m, mask, w, d in zip(models, masks, weights, densities, strict=True):
        tv = np.where(mask, m.astype(np.float64) - base, 0.0)
        tvs.append((tv / d if rescale else tv) * w)
    tvs = np.stack(tvs)
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * base.ndim)
    if consensus:
        votes = tvs.sum(0) if consensus == "sum" else np.sign(tvs).sum(0)
        agree = np.sign(tvs) == np.where(votes >= 0, 1.0, -1.0)
        mixed = np.where(agree, tvs, 0).sum(0)
        div = np.where(agree, w, 0).sum(0)
        div = np.where(div == 0, 1.0, div)
    else:
        mixed, div = tvs.sum(0), w.sum()
    return base + lam * (mixed / div if normalize else mixed)


@pytest.mark.parametrize("combine,rescale,consensus", [
    ("linear", True, "sum"), ("linear", False, "sum"), ("ties", True, "sum"),
    ("ties", False, "count")])
def test_dare_matches_numpy_with_the_same_masks(combine, rescale, consensus):
    rng = np.random.default_rng(4)
    base, m1, m2 = (rand_tree(rng, layers=2) for _ in range(3))
    w, d, lam = [1.0, 0.5], [0.3, 0.6], 0.9
    normalize = combine == "ties"
    out = arith.dare(base, [m1, m2], weights=w, densities=d, lam=lam, combine=combine, seed=11,
                     rescale=rescale, consensus=consensus, normalize=normalize)
    cons = consensus if combine == "ties" else None
    masks = _dare_masks(11, "embed", None, d, base["embed"].shape)
    want = np_dare(base["embed"], [m1["embed"], m2["embed"]], masks, w, d, lam, cons, normalize,
                   rescale)
    np.testing.assert_allclose(out["embed"], want, rtol=1e-5, atol=1e-6)
    for i in range(2):
        masks = _dare_masks(11, "layers/mlp/up", i, d, base["layers"]["mlp"]["up"][i].shape)
        want = np_dare(*(t["layers"]["mlp"]["up"][i] for t in (base,)),
                       [t["layers"]["mlp"]["up"][i] for t in (m1, m2)], masks, w, d, lam, cons,
                       normalize, rescale)
        np.testing.assert_allclose(out["layers"]["mlp"]["up"][i], want, rtol=1e-5, atol=1e-6)


def test_dare_statistics():
    """Kept fraction ~ density (binomial bounds), kept entries rescaled by exactly 1/density."""
    rng = np.random.default_rng(6)
    n = 200_000
    base = {"embed": np.zeros((n // 100, 100), np.float32)}
    tuned = {"embed": rng.choice([-1.0, 1.0], (n // 100, 100)).astype(np.float32)}
    for density in (0.1, 0.5, 0.9):
        out = np.asarray(arith.dare(base, [tuned], densities=[density], seed=5)["embed"])
        kept = out != 0
        sd = np.sqrt(density * (1 - density) / n)
        assert abs(kept.mean() - density) < 5 * sd, density
        np.testing.assert_array_equal(out[kept], tuned["embed"][kept] / np.float32(density))
        out = np.asarray(arith.dare(base, [tuned], densities=[density], seed=5,
                                    rescale=False)["embed"])
        np.testing.assert_array_equal(out != 0, kept)  # same mask, no rescale
        np.testing.assert_array_equal(out[kept], tuned["embed"][kept])


def test_ties_consensus_count_matches_numpy():
    rng = np.random.default_rng(8)
    base, m1, m2, m3 = (rand_tree(rng) for _ in range(4))
    w, d = [1.0, 0.4, 0.8], [0.6, 0.5, 1.0]
    out = arith.ties(base, [m1, m2, m3], weights=w, densities=d, consensus="count")

    def ref(b, *ms):  # float64; "count" elects the sign most models hold (a tie elects +)
        tvs = np.stack([np_trim(m - b, di).astype(np.float64) * wi
                        for m, di, wi in zip(ms, d, w, strict=True)])
        agree = np.sign(tvs) == np.where(np.sign(tvs).sum(0) >= 0, 1.0, -1.0)
        wv = np.asarray(w).reshape((-1,) + (1,) * b.ndim)
        div = np.where(agree, wv, 0).sum(0)
        return b + np.where(agree, tvs, 0).sum(0) / np.where(div == 0, 1.0, div)

    compare(out, ref, [base, m1, m2, m3], rtol=1e-5, atol=1e-6)
    # and it differs from "sum" somewhere (the test would not notice a swapped rule otherwise)
    out_sum = arith.ties(base, [m1, m2, m3], weights=w, densities=d, consensus="sum")
    assert not np.array_equal(np.asarray(out["embed"]), np.asarray(out_sum["embed"]))


# ------------------------------------------- executors on float32 Llama and GPT-2 (fused c_attn)


@pytest.fixture(scope="module")
def families(tmp_path_factory, three_llamas):
    """{"llama_bf16": three_llamas, "llama_f32": 3 float32 Llamas, "gpt2": 3 float32 GPT-2s}."""
    d = tmp_path_factory.mktemp("arith_families")
    out = {"llama_bf16": three_llamas, "llama_f32": [], "gpt2": []}
    for s in range(3):
        p = str(d / f"l{s}")
        testing.make_hf_model(p, testing.tiny_llama_config(), seed=40 + s, max_shard_size="100KB")
        out["llama_f32"].append(p)
        p = str(d / f"g{s}")
        testing.make_hf_model(p, testing.tiny_gpt2_config(), seed=50 + s)
        out["gpt2"].append(p)
    return out


FAMILY_CASES = [(f, c) for f in ("llama_f32", "gpt2") for c in CASES
                if c[0] in ("ties", "slerp", "dare_ties", "task_arithmetic" if f == "llama_f32"
                            else "delta")]
# 20-35 s each: the float16 mesh/streamed cases above and gpt2-ties cover the same code paths in
# the default suite; these run in CI's slow step (`make test-slow`)
SLOW_FAMILY = {("llama_f32", "dare_ties"), ("gpt2", "dare_ties"), ("llama_f32", "ties")}


@pytest.mark.parametrize("family,case", [
    pytest.param(f, c, id=f"{f}-{c[0]}",
                 marks=[pytest.mark.slow] if (f, c[0]) in SLOW_FAMILY else [])
    for f, c in FAMILY_CASES])
def test_streamed_equals_memory_and_mesh_float32_and_gpt2(families, tmp_path, family, case):
    name, idx, shared, per_model = case
    spec = MergeSpec(method=arith.method(name), shared=shared, per_model=per_model, seed=3)
    refs = [families[family][i] for i in idx]
    cfg, _ = load_hf_params(refs[0], progress=False)
    mem = arith.run(spec, cfg, [load_hf_params(r, progress=False)[1] for r in refs])
    mesh = make_mesh("fsdp=4,tensor=2")
    sharded = arith.run(spec, cfg, [load_hf_params(r, mesh=mesh, progress=False)[1]
                                    for r in refs])
    assert _equal(mem, sharded)
    arith.run_streamed(spec, refs, tmp_path / "out", progress=False)
    _, streamed = load_hf_params(tmp_path / "out", progress=False)
    assert _equal(mem, streamed)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(streamed))
    if name == "ties":  # each canonical tensor (GPT-2: q, k, v apart) keeps exactly k entries
        trees = [load_hf_params(r, progress=False)[1] for r in refs]
        tau = np.asarray(trees[1]["layers"]["attn"]["q"][0]) - \
            np.asarray(trees[0]["layers"]["attn"]["q"][0])
        got = np.asarray(mem["layers"]["attn"]["q"][0])
        only1 = arith.ties(trees[0], [trees[1]], cfg, densities=[0.3])
        kept = np.asarray(only1["layers"]["attn"]["q"][0]) != np.asarray(
            trees[0]["layers"]["attn"]["q"][0])
        assert kept.sum() == max(1, int(0.3 * tau.size)) and got.shape == tau.shape


# ------------------------------------------------------------------ CLI routes and YAML forms


def _cli(args, capsys):
    rc = main(args + ["--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    return out


def test_cli_in_memory_orbax_out_and_orbax_inputs(three_llamas, tmp_path, capsys):
    """--in-memory and --to orbax from the CLI; Orbax models as inputs of delta and merge."""
    from jaxarith.io.convert.orbax import load_orbax

    tuned, base = three_llamas[1], three_llamas[0]
    s = _cli(["delta", "extract", tuned, base, str(tmp_path / "d_s")], capsys)
    m = _cli(["delta", "extract", tuned, base, str(tmp_path / "d_m"), "--in-memory",
              "--mesh", "fsdp=4,tensor=2"], capsys)
    assert (s["executor"], m["executor"]) == ("streamed", "memory")
    a, b = HFCheckpoint(str(tmp_path / "d_s")), HFCheckpoint(str(tmp_path / "d_m"))
    for k in a.keys():
        np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=k)
    o = _cli(["delta", "extract", tuned, base, str(tmp_path / "d_o"), "--to", "orbax"], capsys)
    assert o["executor"] == "memory" and o["to"] == "orbax"
    _, d_o = load_orbax(tmp_path / "d_o")
    _, d_s = load_hf_params(tmp_path / "d_s", progress=False)
    assert _equal(d_o, d_s)
    # Orbax inputs: base as Orbax, delta as Orbax -> back equals tuned bit for bit
    assert main(["convert", base, str(tmp_path / "base_o"), "--json"]) == 0
    capsys.readouterr()
    r = _cli(["delta", "apply", str(tmp_path / "base_o"), str(tmp_path / "d_o"),
              str(tmp_path / "back")], capsys)
    assert r["executor"] == "memory"
    x, y = HFCheckpoint(tuned), HFCheckpoint(str(tmp_path / "back"))
    for k in x.keys():
        np.testing.assert_array_equal(x.get(k).view(np.uint16), y.get(k).view(np.uint16))
    text = f"""
merge_method: linear
models:
  - model: {tmp_path / 'base_o'}
    parameters: {{weight: 0.25}}
  - model: {tuned}
    parameters: {{weight: 0.75}}
"""
    (tmp_path / "lin.yaml").write_text(text)
    r = _cli(["merge", str(tmp_path / "lin.yaml"), str(tmp_path / "lin_o"), "--to", "orbax"],
             capsys)
    assert r["executor"] == "memory"
    _, got = load_orbax(tmp_path / "lin_o")
    ms = [load_hf_params(p, progress=False)[1] for p in (base, tuned)]
    assert _equal(got, arith.soup(ms, weights=[0.25, 0.75]))


def test_partial_layer_range_is_rejected(three_llamas, tmp_path, capsys):
    m0, m1 = three_llamas[0], three_llamas[1]
    text = f"""
slices:
  - sources:
      - model: {m0}
        layer_range: [0, 1]
      - model: {m1}
        layer_range: [0, 1]
merge_method: slerp
base_model: {m0}
parameters: {{t: 0.5}}
"""
    (tmp_path / "m.yaml").write_text(text)
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert "layer_range [0, 1]" in err and "all 2 layers" in err and m0 in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "m.yaml").write_text(text.replace("[0, 1]", "[0, 2]"))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--json"]) == 0


LINEAR_YAMLS = {
    "linear": ("""
merge_method: linear
models:
  - model: {m0}
    parameters: {{weight: 0.2}}
  - model: {m1}
    parameters: {{weight: [0.3, 0.9]}}
  - model: {m2}
    parameters: {{weight: 0.5}}
parameters: {{normalize: false}}
""", lambda ms: arith.merge("linear", ms, CFG[0], normalize=False,
                           per_model=({"weight": 0.2}, {"weight": [0.3, 0.9]},
                                      {"weight": 0.5}))),
    "dare_linear": ("""
merge_method: dare_linear
base_model: {m0}
models:
  - model: {m1}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.4, density: [0.3, 0.8]}}
parameters: {{rescale: false, lambda: 0.9}}
seed: 4
dtype: float32
out_dtype: bfloat16
""", lambda ms: arith.dare(ms[0], ms[1:], CFG[0], weights=[0.6, 0.4],
                          densities=[0.5, [0.3, 0.8]], lam=0.9, rescale=False, seed=4,
                          dtype="bfloat16")),
}


@pytest.mark.parametrize("name", list(LINEAR_YAMLS))
def test_linear_and_dare_linear_yamls(three_llamas, tmp_path, capsys, name):
    text, call = LINEAR_YAMLS[name]
    (tmp_path / "m.yaml").write_text(text.format(m0=three_llamas[0], m1=three_llamas[1],
                                                 m2=three_llamas[2]))
    assert _cli(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out")],
                capsys)["method"] == name
    CFG[0], _ = load_hf_params(three_llamas[0], progress=False)
    ms = [load_hf_params(p, progress=False)[1] for p in three_llamas]
    _, got = load_hf_params(tmp_path / "out", progress=False)
    assert _equal(call(ms), got)


def test_delta_norms_cosine(three_llamas, capsys):
    base, a, b = three_llamas
    r = _cli(["delta", "norms", base, a, "--cosine", b], capsys)
    cb, ca, cc = HFCheckpoint(base), HFCheckpoint(a), HFCheckpoint(b)
    da = np.concatenate([ca.get(k).astype(np.float64).ravel() - cb.get(k).astype(np.float64)
                         .ravel() for k in cb.keys()])
    db = np.concatenate([cc.get(k).astype(np.float64).ravel() - cb.get(k).astype(np.float64)
                         .ravel() for k in cb.keys()])
    want = da @ db / np.sqrt((da @ da) * (db @ db))
    assert r["cosine"] == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("layout", [None, (1, False), (1, True), (2, True)])
def test_magnitude_mask_ties_broken_by_hf_position(layout):
    """Exactly k kept; of the entries tied at the threshold, the first in HF row-major order
    (numpy: a stable argsort of the HF view). Few magnitude levels, so ties everywhere."""
    rng = np.random.default_rng(9)
    x = (rng.integers(-3, 4, (6, 5, 4)) * 0.25).astype(np.float32)
    split, transposed = layout or (1, False)
    hf = x.reshape(int(np.prod(x.shape[:split])), -1)
    hf = hf.T if transposed else hf
    for k in (0, 1, 7, 37, 60, 119, 120):
        got = np.asarray(ops.magnitude_mask(x, k, layout))
        order = np.argsort(-np.abs(hf).reshape(-1), kind="stable")[:k]
        want_hf = np.zeros(hf.size, bool)
        want_hf[order] = True
        want_hf = want_hf.reshape(hf.shape)
        want = (want_hf.T if transposed else want_hf).reshape(x.shape)
        assert got.sum() == k
        np.testing.assert_array_equal(got, want, err_msg=f"k={k}")


def test_magnitude_mask_host_threshold_and_cut():
    """The streamed executor's route (threshold and tie cut by one np.partition on the host,
    no bisection, no scan) keeps exactly the entries of a stable argsort of the HF view."""
    rng = np.random.default_rng(11)
    x = (rng.integers(-3, 4, (9, 7)) * 0.25).astype(np.float32)  # few levels: ties everywhere
    x[0, 0] = 2.0**-140  # a denormal, below every other nonzero magnitude
    for k in (0, 1, 5, 20, 40, 62, 63):
        thr, cut = ops.host_threshold(x, k)
        got = np.asarray(ops.magnitude_mask(x, k, None, thr, cut))
        want = np.zeros(x.size, bool)
        want[np.argsort(-np.abs(x.astype(np.float64)).reshape(-1), kind="stable")[:k]] = True
        np.testing.assert_array_equal(got, want.reshape(x.shape), err_msg=f"k={k}")
        # and the same mask as the bisection + running count
        np.testing.assert_array_equal(got, np.asarray(ops.magnitude_mask(x, k)))

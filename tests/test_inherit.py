"""Layer inheritance: specs, parity with truncated transformers models, parts, shardings, CLI."""

import copy
import json
import os
import warnings

import jax
import numpy as np
import pytest

from jaxarith import sharding, testing
from jaxarith.arith import inherit as inh
from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.io.refs import load_model
from jaxarith.models import config_from_hf, transformer

# Left-padded batch: positions and masks both matter.
TOKENS = np.array([[5, 17, 300, 42, 7, 99, 3, 11], [0, 0, 0, 8, 250, 13, 77, 600]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], np.int32)


def _truncated_hf(model, n):
    """A transformers model holding the source's first ``n`` decoder layers (same tensors)."""
    m = copy.deepcopy(model)
    if hasattr(m, "transformer"):  # GPT-2
        m.transformer.h = m.transformer.h[:n]
        m.config.n_layer = n
    else:
        m.model.layers = m.model.layers[:n]
        m.config.num_hidden_layers = n
    return m


def _leaves(tree):
    return {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _deep_cfg(arch="llama", layers=6, **kw):
    if arch == "gpt2":
        d = {"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": layers,
             "n_head": 4, "n_positions": 32, **kw}
    else:
        d = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
             "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, **kw}
    return config_from_hf(d)


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize("spec,expected", [
    ("first:3", (0, 1, 2)), ("last:2", (4, 5)), ("spread:2", (0, 5)), ("spread:3", (0, 3, 5)),
    ("spread:4", (0, 2, 3, 5)), ("spread:6", (0, 1, 2, 3, 4, 5)), ("spread:1", (0,)),
    ("list:5,0,3", (5, 0, 3)), ("first:6", (0, 1, 2, 3, 4, 5)),
])
def test_spec_table(spec, expected):
    # spread by hand: round_half_up(i * 5 / (n - 1)); n=3 -> 0, 2.5 -> 3, 5
    assert inh.select_layers(spec, 6) == expected


def test_repeat_needs_allow_repeat():
    assert inh.select_layers("list:0,1,1,2", 4, allow_repeat=True) == (0, 1, 1, 2)
    with pytest.raises(inh.LayerSpecError, match="layer 1 is repeated"):
        inh.select_layers("list:0,1,1,2", 4)


@pytest.mark.parametrize("spec,match", [
    ("first:0", "N=0"), ("last:7", "N=7"), ("spread:0", "N=0"), ("list:0,6", "index 6"),
    ("list:-1", "index -1"), ("middle:2", "unknown form"), ("first", "unknown form"),
    ("first:x", "integer"), ("list:a,b", "integers"),
])
def test_bad_specs(spec, match):
    with pytest.raises(inh.LayerSpecError, match=match):
        inh.select_layers(spec, 6)


def test_bad_options():
    cfg = _deep_cfg()
    with pytest.raises(ConfigError, match="unknown part 'ffn'"):
        inh.plan(cfg, "first:2", parts=["attn", "ffn"])
    assert inh.parse_parts(None) == inh.PARTS and inh.parse_parts([]) == ()
    assert inh.parse_parts("mlp, attn") == ("mlp", "attn")
    assert not any(inh.plan(cfg, "first:2", parts=[]).inherit[p] for p in
                   inh.plan(cfg, "first:2").inherit if p[0] == "layers")
    with pytest.raises(ConfigError, match="embeddings='new'"):
        inh.plan(cfg, "first:2", embeddings="new")
    with pytest.raises(ConfigError, match="no position embeddings"):
        inh.plan(cfg, "first:2", pos_embed="fresh")
    tied = _deep_cfg(tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="ties lm_head"):
        inh.plan(tied, "first:2", head="fresh")


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("fixture", ["llama_dir", "llama_tied_dir", "gpt2_dir"])
def test_first_k_is_bit_identical(fixture, request):
    directory, _ = request.getfixturevalue(fixture)
    src = load_model(directory, progress=False)
    K = src.config.num_hidden_layers
    cfg, params = inh.inherit(src.params, src.config, f"first:{K}")
    assert cfg == src.config
    a = transformer.jit_forward(src.params, src.config, TOKENS, MASK)
    b = transformer.jit_forward(params, cfg, TOKENS, MASK)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("fixture", ["llama_dir", "llama_tied_dir", "gpt2_dir"])
def test_first_n_matches_truncated_transformers(fixture, request):
    directory, model = request.getfixturevalue(fixture)
    src = load_model(directory, progress=False)
    n = src.config.num_hidden_layers - 1
    cfg, params = inh.inherit(src.params, src.config, f"first:{n}")
    assert cfg.num_hidden_layers == n
    ours = np.asarray(transformer.jit_forward(params, cfg, TOKENS, MASK))
    ref = testing.hf_logits(_truncated_hf(model, n), TOKENS, MASK)
    real = MASK.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
    # and it differs from the full model (the test would catch a no-op)
    full = testing.hf_logits(model, TOKENS, MASK)
    assert np.abs(full[real] - ref[real]).max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("spec,idx", [("last:3", (3, 4, 5)), ("spread:4", (0, 2, 3, 5)),
                                      ("list:4,1,5", (4, 1, 5)),
                                      ("list:0,1,2,1,2,3", (0, 1, 2, 1, 2, 3))])
def test_specs_pick_exactly_the_named_layers(arch, spec, idx):
    cfg = _deep_cfg(arch)
    src = transformer.init_params(cfg, jax.random.PRNGKey(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", inh.InverseLayerIdxWarning)
        new_cfg, new = inh.inherit(src, cfg, spec, allow_repeat=True)
    assert new_cfg.num_hidden_layers == len(idx)
    s, d = _leaves(src), _leaves(new)
    assert s.keys() == d.keys()
    for name, x in d.items():
        if name.startswith("layers/"):
            for j, i in enumerate(idx):
                np.testing.assert_array_equal(np.asarray(x[j]), np.asarray(s[name][i]), name)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(s[name]), name)


def test_gpt2_inverse_layer_idx_warns_except_first():
    cfg = _deep_cfg("gpt2", scale_attn_by_inverse_layer_idx=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", inh.InverseLayerIdxWarning)
        inh.plan(cfg, "first:3")
        with pytest.raises(inh.InverseLayerIdxWarning, match="1/\\(l\\+1\\)"):
            inh.plan(cfg, "last:3")


# ----------------------------------------------------------------------------- fresh parts


def _check_fresh(cfg, new, src_leaves, names, key):
    """Fresh leaves: differ from the source, equal init_params' own draw, right statistics."""
    specs = {sharding.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        transformer.param_specs(cfg), is_leaf=lambda x: hasattr(x, "axes"))[0]}
    scratch = _leaves(transformer.init_params(cfg, key))
    for name in names:
        x, spec = np.asarray(new[name]), specs[name]
        np.testing.assert_array_equal(x, np.asarray(scratch[name]), name)
        if spec.init == "normal":
            assert not np.allclose(x, np.asarray(src_leaves[name])), name
            assert abs(x.std() - spec.std) < 0.1 * spec.std, (name, x.std())
            assert abs(x.mean()) < 0.1 * spec.std, (name, x.mean())
        else:
            np.testing.assert_array_equal(x, 1.0 if spec.init == "ones" else 0.0, name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_parts_attn_leaves_mlp_fresh(arch):
    cfg = _deep_cfg(arch, intermediate_size=64) if arch == "llama" else _deep_cfg(arch)
    src = transformer.init_params(cfg, jax.random.PRNGKey(3))
    key = jax.random.PRNGKey(11)
    new_cfg, new = inh.inherit(src, cfg, "first:4", parts=["attn"], key=key)
    s, d = _leaves(src), _leaves(new)
    for name, x in d.items():
        if name.startswith("layers/attn/") or not name.startswith("layers/"):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(s[name])[:4]
                                          if name.startswith("layers/") else np.asarray(s[name]))
    fresh = [n for n in d if n.startswith(("layers/mlp/", "layers/attn_norm", "layers/mlp_norm"))]
    assert any(n.startswith("layers/mlp/") for n in fresh)
    _check_fresh(new_cfg, d, {n: s[n][:4] for n in fresh}, fresh, key)


def test_embeddings_fresh_head_inherited():
    cfg = _deep_cfg("llama")
    src = transformer.init_params(cfg, jax.random.PRNGKey(3))
    key = jax.random.PRNGKey(5)
    new_cfg, new = inh.inherit(src, cfg, "first:2", embeddings="fresh", final_norm="fresh",
                               key=key)
    s, d = _leaves(src), _leaves(new)
    _check_fresh(new_cfg, d, s, ["embed"], key)
    np.testing.assert_array_equal(np.asarray(d["lm_head"]), np.asarray(s["lm_head"]))
    np.testing.assert_array_equal(np.asarray(d["final_norm/scale"]), 1.0)
    p = inh.plan(cfg, "first:2", embeddings="fresh", final_norm="fresh")
    assert p.params == transformer.num_params(new_cfg)
    assert p.inherited_params == p.params - 64 * 32 - 32


def test_gpt2_official_recipe_fresh_wpe_and_ln_f():
    cfg = _deep_cfg("gpt2")
    src = transformer.init_params(cfg, jax.random.PRNGKey(3))
    key = jax.random.PRNGKey(2)
    new_cfg, new = inh.inherit(src, cfg, "first:3", pos_embed="fresh", final_norm="fresh",
                               key=key)
    s, d = _leaves(src), _leaves(new)
    _check_fresh(new_cfg, d, s, ["pos_embed", "final_norm/scale", "final_norm/bias"], key)
    np.testing.assert_array_equal(np.asarray(d["embed"]), np.asarray(s["embed"]))


# ----------------------------------------------------------------------------- sharding


def test_sharded_equals_one_device(llama_dir):
    directory, _ = llama_dir
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    one = load_model(directory, progress=False)
    many = load_model(directory, mesh=mesh, progress=False)
    kw = dict(parts=["attn", "norms"], embeddings="fresh", key=jax.random.PRNGKey(4))
    cfg1, p1 = inh.inherit(one.params, one.config, "list:1,0", **kw)
    cfg8, p8 = inh.inherit(many.params, many.config, "list:1,0", **kw)
    assert cfg1 == cfg8
    want = _leaves(transformer.param_shardings(cfg8, mesh))
    got, ref = _leaves(p8), _leaves(p1)
    assert any(len(set(w.spec) - {None}) for w in want.values())  # something is sharded
    for name, x in got.items():
        assert x.sharding.is_equivalent_to(want[name], x.ndim), (name, x.sharding, want[name])
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref[name]), name)


# ----------------------------------------------------------------------------- CLI


def _cli(capsys, *argv):
    from jaxarith.cli import main

    rc = main(list(argv))
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("to", ["hf", "orbax"])
def test_cli_writes_a_complete_checkpoint(gpt2_dir, tmp_path, capsys, to):
    directory, model = gpt2_dir
    out = str(tmp_path / "student")
    rc, res = _cli(capsys, "inherit", directory, out, "--layers", "first:1", "--to", to,
                   "--json")
    assert rc == 0, res
    assert res["src_layers"] == 2 and res["layers"] == [0]
    assert res["params"] == res["inherited_params"] > 0
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["n_layer"] == 1
    if to == "hf":
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        ref = testing.hf_logits(_truncated_hf(model, 1), TOKENS, MASK)
        got = testing.hf_logits(hf, TOKENS, MASK)
        np.testing.assert_allclose(got, ref, atol=1e-5)
    else:
        m = load_model(out, progress=False)
        assert m.config.num_hidden_layers == 1
        again = str(tmp_path / "again")  # an Orbax checkpoint is a source too
        rc, res = _cli(capsys, "inherit", out, again, "--layers", "first:1", "--json")
        assert rc == 0 and res["src_layers"] == 1
        m2 = load_model(again, progress=False)
        for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(m2.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_fresh_parts_count(llama_dir, tmp_path, capsys):
    directory, _ = llama_dir
    rc, res = _cli(capsys, "inherit", directory, str(tmp_path / "o"), "--layers", "list:1",
                   "--parts", "attn", "--seed", "3", "--json")
    assert rc == 0
    cfg = inh.plan(load_model(directory, progress=False).config, "list:1", parts="attn")
    assert res["inherited_params"] == cfg.inherited_params < res["params"]


@pytest.mark.parametrize("args,match", [
    (["--layers", "first:0"], "N=0"), (["--layers", "first:3"], "N=3"),
    (["--layers", "list:0,2"], "index 2"), (["--layers", "list:0,0"], "repeated"),
    (["--layers", "first:1", "--parts", "attn,ffn"], "unknown part"),
    (["--layers", "top:1"], "unknown form"),
])
def test_cli_bad_input_writes_nothing(llama_dir, tmp_path, capsys, args, match):
    directory, _ = llama_dir
    out = tmp_path / "o"
    rc, res = _cli(capsys, "inherit", directory, str(out), *args, "--json")
    assert rc == 2 and match in res["error"], res
    assert not out.exists() and os.listdir(tmp_path) == []


def test_cli_refuses_existing_out(llama_dir, tmp_path, capsys):
    directory, _ = llama_dir
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, res = _cli(capsys, "inherit", directory, str(out), "--layers", "first:1", "--json")
    assert rc == 2 and "already exists" in res["error"]
    assert os.listdir(out) == ["keep.txt"]


def test_library_errors_are_jaxarith_errors():
    assert issubclass(inh.LayerSpecError, JaxarithError)

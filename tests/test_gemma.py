"""Gemma 2 and Gemma 3 (text) against transformers' own classes (tiny random models, float32):
log-probs on a padded batch longer than the sliding window (one device and an 8-device mesh),
the training loss (fused head + soft-capped cross-entropy) and its gradient, greedy generation
past the window, the splash kernel with alternating windows, HF -> Orbax -> HF, a task-arithmetic
merge against mergekit, the configs and the published presets (shapes only)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxarith import sharding, testing
from jaxarith.decode.loop import DecodeSpec, Member, generate, left_pad
from jaxarith.errors import ConfigError
from jaxarith.io.convert import HFCheckpoint, load_hf_params
from jaxarith.io.convert.route import convert
from jaxarith.models import (
    config_from_hf,
    family,
    forward,
    init_params,
    load_config,
    next_token_loss,
    num_params,
    param_shardings,
    token_logprobs,
)
from jaxarith.models.presets import PRESETS, preset

TOL = 1e-4
CONFIGS = {"gemma2": testing.tiny_gemma2_config, "gemma3": testing.tiny_gemma3_config}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (directory, transformers model, config, params)} for Gemma 2 and Gemma 3."""
    out = {}
    for seed, (name, make) in enumerate(CONFIGS.items()):
        d = tmp_path_factory.mktemp(name)
        hf = testing.make_hf_model(d, make(), seed=seed)
        out[name] = (str(d), hf, *load_hf_params(str(d), progress=False))
    return out


def _batch(t=16, seed=0):
    """Four rows of ``t`` tokens (> the window of 4): full, left-padded, right-padded, one pad."""
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


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logprobs_equal_transformers_on_a_padded_batch(name, models):
    _, hf, cfg, params = models[name]
    tokens, mask = _batch()
    logits = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).logits
    diff = _max_dlogp(logits, testing.hf_logits(hf, tokens, mask), mask)
    assert diff < TOL, f"{name}: max |dlogp| = {diff:.2e}"


# each feature, removed, changes the log-probs well beyond the tolerance (exact GELU for the tanh
# approximation the least, 2e-3): the parity above checks
# all of them
ABLATIONS = {
    "gemma2": {"attn_logit_softcapping": None, "final_logit_softcapping": None,
               "sliding_window": 10_000, "layer_types": ("sliding_attention",) * 4,
               "query_pre_attn_scalar": 16, "gelu_tanh": False},
    "gemma3": {"rope_local_base_freq": 10_000.0, "rope_theta": 100.0, "sliding_window": 10_000,
               "layer_types": ("full_attention",) * 3},
}


@pytest.mark.parametrize("name,field", [(n, f) for n, a in ABLATIONS.items() for f in a])
def test_every_feature_matters(name, field, models):
    _, hf, cfg, params = models[name]
    tokens, mask = _batch()
    other = dataclasses.replace(cfg, **{field: ABLATIONS[name][field]})
    logits = forward(params, other, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).logits
    assert _max_dlogp(logits, testing.hf_logits(hf, tokens, mask), mask) > 10 * TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_8_device_mesh_equals_transformers(name, models):
    directory, hf, cfg, _ = models[name]
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    _, params = load_hf_params(directory, mesh=mesh, progress=False)
    tokens, mask = _batch()
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda p, t, m: forward(p, cfg, t, attention_mask=m).logits)(
            params, jnp.asarray(tokens), jnp.asarray(mask))
    diff = _max_dlogp(logits, testing.hf_logits(hf, tokens, mask), mask)
    assert diff < TOL, f"{name} on 8 devices: max |dlogp| = {diff:.2e}"


def test_packed_branches_keep_their_own_window(models):
    """A [B, T, T] mask packs a shared prefix and two branches (lm-eval scoring): the window
    counts positions, so the second branch (slots 7-8, positions 4-5) still sees the end of the
    prefix, as transformers does on that branch's own sequence."""
    _, hf, cfg, params = models["gemma2"]
    rng = np.random.RandomState(3)
    prefix, a, b = (rng.randint(3, testing.TINY_VOCAB, n).tolist() for n in (4, 3, 2))
    tokens = prefix + a + b
    branch = np.asarray([0] * 4 + [1] * 3 + [2] * 2)
    slot = np.arange(9)
    mask = (slot[:, None] >= slot[None]) & ((branch[None] == 0) | (branch[None] == branch[:, None]))
    positions = [0, 1, 2, 3, 4, 5, 6, 4, 5]
    got = forward(params, cfg, jnp.asarray([tokens]), attention_mask=jnp.asarray(mask[None]),
                  positions=jnp.asarray([positions])).logits[0]
    # (sequence alone, its slots in the packed row, its positions there)
    for seq, slots, pos in ((prefix + a, slice(0, 7), slice(0, 7)),
                            (prefix + b, slice(7, 9), slice(4, 6))):
        ref = testing.hf_logits(hf, np.asarray([seq]))[0]
        np.testing.assert_allclose(np.asarray(got[slots]), ref[pos], atol=1e-4)


def test_loss_fused_and_not_equals_transformers_with_the_final_softcap(models):
    """Gemma 2's training loss goes through the fused head + cross-entropy, which applies the
    final soft-cap itself: equal to transformers' loss and to the logits path, gradients too."""
    _, hf, cfg, params = models["gemma2"]
    assert family(cfg).logit_softcap(cfg) == 3.0
    tokens, _ = _batch(seed=1)
    tokens = tokens[:2]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens), labels=torch.tensor(tokens)).loss.item()

    def loss(p, fused):
        nll, n = next_token_loss(p, cfg, jnp.asarray(tokens), fused=fused)
        return nll / n

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l0, g0), (l1, g1) = grad(params, False), grad(params, True)
    assert abs(float(l0) - ref) < TOL and abs(float(l1) - ref) < TOL
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_past_the_window_equals_transformers(name, models):
    _, hf, cfg, params = models[name]
    prompts, new = [[5, 6, 7, 8, 9, 10], [11, 12], [20, 21, 22], [40]], 12
    ours = generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=new), [params], prompts)
    tokens, mask = left_pad(prompts)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(tokens).long(),
                          attention_mask=torch.tensor(mask).long(), max_new_tokens=new,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(ours.tokens, ref[:, tokens.shape[1]:].numpy())


def test_sharded_generation_equals_one_device(models):
    directory, _, cfg, params = models["gemma2"]
    dec = DecodeSpec(members=(Member(cfg),), max_new_tokens=8)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [20, 21, 22], [40]]
    ref = generate(dec, [params], prompts)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    _, sharded = load_hf_params(directory, mesh=mesh, progress=False)
    got = generate(dec, [sharded], prompts, mesh=mesh)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)


def test_inherited_first_layers_equal_transformers_truncated(models):
    """Layer inheritance keeps each kept layer's type: ``first:2`` of Gemma 2 (local, global)
    equals transformers' model cut to its first two layers."""
    import copy

    from jaxarith.arith.inherit import inherit

    _, hf, cfg, params = models["gemma2"]
    new_cfg, new_params = inherit(params, cfg, "first:2")
    assert new_cfg.layer_types == ("sliding_attention", "full_attention")
    cut = copy.deepcopy(hf)
    cut.model.layers = cut.model.layers[:2]
    cut.config.num_hidden_layers, cut.config.layer_types = 2, cut.config.layer_types[:2]
    tokens, mask = _batch()
    logits = forward(new_params, new_cfg, jnp.asarray(tokens),
                     attention_mask=jnp.asarray(mask)).logits
    diff = _max_dlogp(logits, testing.hf_logits(cut, tokens, mask), mask)
    assert diff < TOL, f"max |dlogp| = {diff:.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bfloat16_compute_close_to_float32(name, models):
    _, _, cfg, params = models[name]
    tokens = jnp.asarray(_batch()[0])
    lp32 = token_logprobs(forward(params, cfg, tokens).logits, tokens)
    logits16 = forward(params, cfg, tokens, dtype=jnp.bfloat16).logits
    assert logits16.dtype == jnp.float32
    # bf16 has 8 bits of mantissa: a real but bounded difference (measured 0.01-0.03)
    assert 0 < float(jnp.max(jnp.abs(token_logprobs(logits16, tokens) - lp32))) < 0.1


def test_embeddings_are_scaled_in_the_compute_dtype(models):
    """transformers rounds sqrt(hidden_size) to the weights' dtype before the product (in
    bfloat16 sqrt(3072) = 55.4256 becomes 55.5); the compute dtype plays that role here."""
    from jaxarith.models import Inputs

    _, _, cfg, params = models["gemma2"]
    cfg = dataclasses.replace(cfg, hidden_size=3072)  # only the scale is read
    tokens = jnp.asarray([[3, 4]])
    x = family(cfg).embed(cfg, params, Inputs(tokens, tokens, jnp.dtype(jnp.bfloat16)))
    assert x.dtype == jnp.bfloat16
    want = params["embed"][tokens].astype(jnp.bfloat16) * jnp.bfloat16(55.5)
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(want, np.float32))
    assert float(jnp.asarray(3072 ** 0.5, jnp.bfloat16)) == 55.5


def test_splash_with_alternating_windows_and_softcap_equals_transformers(tmp_path):
    """T = 128 (splash's smallest block), window 16 on the local layers: one kernel per window
    (LocalMask and CausalMask), chosen per layer inside the layer scan, with soft-capping; on
    one device and inside shard_map on an 8-device mesh."""
    hf = testing.make_hf_model(tmp_path, testing.tiny_gemma2_config(
        sliding_window=16, num_hidden_layers=2, max_position_embeddings=256), seed=7,
        with_tokenizer=False)
    cfg, params = load_hf_params(str(tmp_path), progress=False)
    tokens = np.random.default_rng(0).integers(3, testing.TINY_VOCAB, (4, 128))
    logits = forward(params, cfg, jnp.asarray(tokens), attention="splash-interpret").logits
    diff = _max_dlogp(logits, testing.hf_logits(hf, tokens), np.ones_like(tokens))
    assert diff < TOL, f"max |dlogp| = {diff:.2e}"
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    _, sharded = load_hf_params(str(tmp_path), mesh=mesh, progress=False)
    rows = jax.device_put(tokens, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None)))
    with jax.set_mesh(mesh):
        many = jax.jit(lambda p, t: forward(p, cfg, t, attention="splash-interpret").logits)(
            sharded, rows)
    np.testing.assert_allclose(np.asarray(many), np.asarray(logits), atol=1e-5)


@pytest.mark.slow
def test_splash_gradient_with_windows_and_softcap_equals_the_xla_path(tmp_path):
    """Training through the kernels: the loss gradient of splash (LocalMask / CausalMask under
    lax.switch, soft-capped) equals the XLA path's (about 7 s; in the slow run to keep this
    file's default run near a minute)."""
    testing.make_hf_model(tmp_path, testing.tiny_gemma2_config(
        sliding_window=16, num_hidden_layers=2, max_position_embeddings=256), seed=7,
        with_tokenizer=False)
    cfg, params = load_hf_params(str(tmp_path), progress=False)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, testing.TINY_VOCAB, (2, 128)))

    def loss(p, attention):
        nll, count = next_token_loss(p, cfg, tokens, attention=attention)
        return nll / count

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_xla, g_splash = grad(params, "xla"), grad(params, "splash-interpret")
    for a, b in zip(jax.tree.leaves(g_xla), jax.tree.leaves(g_splash), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_hf_orbax_hf_is_bit_exact(name, models, tmp_path):
    src, hf, _, _ = models[name]
    convert(src, tmp_path / "orbax", progress=False)
    convert(str(tmp_path / "orbax"), tmp_path / "hf", progress=False)
    before, after = HFCheckpoint(src), HFCheckpoint(str(tmp_path / "hf"))
    assert set(after.keys()) == set(before.keys())
    for k in before.keys():
        a, b = after.get(k), before.get(k)
        assert a.dtype == b.dtype and np.array_equal(a, b), k
    assert load_config(str(tmp_path / "hf")) == load_config(src)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = np.random.RandomState(0).randint(3, testing.TINY_VOCAB, (2, 9))
    np.testing.assert_array_equal(testing.hf_logits(model.eval(), tokens),
                                  testing.hf_logits(hf, tokens))


def test_task_arithmetic_equals_mergekit(models, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit==0.1.5 (the `test` extra) is not installed")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from jaxarith.cli import main

    base = models["gemma2"][0]
    tuned = []
    for seed in (11, 12):
        d = tmp_path / f"m{seed}"
        testing.make_hf_model(d, testing.tiny_gemma2_config(), seed=seed)
        tuned.append(str(d))
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            f"  - model: {tuned[0]}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {tuned[1]}\n    parameters: {{weight: [0.2, 0.9]}}\n"
            f"parameters: {{lambda: 0.8}}\ndtype: float32\n")
    (tmp_path / "merge.yaml").write_text(text)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"),
              options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "jx"), "--json"]) == 0
    mk, jx = HFCheckpoint(str(tmp_path / "mk")), HFCheckpoint(str(tmp_path / "jx"))
    assert set(jx.keys()) <= set(mk.keys())
    for k in mk.keys():
        ours = jx.get("model.embed_tokens.weight" if k == "lm_head.weight" else k)
        np.testing.assert_allclose(ours, mk.get(k), atol=1e-6, rtol=0, err_msg=k)


# ----------------------------------------------------------------------------- configs


def test_configs_round_trip_and_read_both_rope_forms(models):
    for name in CONFIGS:
        cfg = models[name][2]
        assert config_from_hf(cfg.to_hf()) == cfg
    # Gemma 3 in the transformers 4.x form (as published) equals the 5.x rope_parameters form
    old = dict(PRESETS["google/gemma-3-1b-pt"])
    new = {k: v for k, v in old.items()
           if k not in ("rope_theta", "rope_scaling", "rope_local_base_freq")}
    new["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert config_from_hf(old) == config_from_hf(new)
    cfg = config_from_hf(old)
    assert cfg.layer_types.count("full_attention") == 4 and cfg.layer_types[5] == "full_attention"
    windows = family(cfg).attention_windows(cfg)
    assert windows[:6] == (512,) * 5 + (None,)


@pytest.mark.parametrize("hf_class", [transformers.Gemma2Config, transformers.Gemma3TextConfig])
def test_absent_keys_take_transformers_defaults(hf_class):
    """A config.json with only the shapes reads as transformers fills it in (windows, caps,
    RoPE bases, layer pattern, context length)."""
    shapes = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 8}
    filled = hf_class(**shapes).to_dict()
    ours = config_from_hf({"model_type": hf_class.model_type, **shapes})
    assert ours == config_from_hf(filled)


@pytest.mark.parametrize("name,change,match", [
    ("google/gemma-2-2b", {"attention_bias": True}, "attention_bias"),
    ("google/gemma-2-2b", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("google/gemma-2-2b", {"hidden_activation": "relu"}, "hidden_activation='relu'"),
    ("google/gemma-2-2b", {"layer_types": ["sliding_attention"]}, "layer_types has 1"),
    ("google/gemma-2-2b", {"layer_types": ["chunked_attention"] * 26}, "chunked_attention"),
    ("google/gemma-2-2b", {"sliding_window": None}, "sliding_window=None"),
    ("google/gemma-2-2b", {"query_pre_attn_scalr": 256}, "did you mean 'query_pre_attn_scalar'"),
    ("google/gemma-3-1b-pt", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ("google/gemma-3-1b-pt", {"rope_parameters": {"rope_theta": 1.0}}, "rope_parameters"),
])
def test_unsupported_config_values_are_named(name, change, match):
    with pytest.raises(ConfigError, match=match):
        config_from_hf({**PRESETS[name], **change})


def test_fewer_layers_keep_the_layer_pattern():
    """Layer inheritance (``Family.with_depth``): the first n layers' types, and the pattern
    extended when the model grows; moving layers is flagged as depth-sensitive."""
    cfg = preset("google/gemma-3-1b-pt")
    fam = family(cfg)
    small = fam.with_depth(cfg, 8)
    assert small.layer_types == cfg.layer_types[:8] and small.num_hidden_layers == 8
    assert fam.with_depth(cfg, 30).layer_types[29] == "full_attention"
    assert config_from_hf(small.to_hf()) == small
    assert "layer_types" in fam.depth_sensitive(cfg)


# ----------------------------------------------------------------------------- presets

PUBLISHED = {"google/gemma-2-2b": 2_614_341_888, "google/gemma-2-9b": 9_241_705_984,
             "google/gemma-3-1b-pt": 999_885_952}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_shapes_and_shardings(name):
    """Full-size shapes without memory: the parameter count of ``jax.eval_shape`` of the init
    equals the published one; the shardings on an 8-device mesh build; a forward traces."""
    cfg = preset(name)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == PUBLISHED[name]
    assert num_params(cfg) == PUBLISHED[name]
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    shardings = param_shardings(cfg, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(shapes)
    out = jax.eval_shape(lambda p, t: forward(p, cfg, t).logits, shapes,
                         jax.ShapeDtypeStruct((1, 8), jnp.int32))
    assert out.shape == (1, 8, cfg.vocab_size)


@pytest.mark.slow
def test_plan_compiles_a_gemma2_train_step_for_a_tpu_slice(capsys):
    """``jaxarith plan`` (the real TPU compiler, no TPU): attention resolves to splash, so the
    layer scan holds ``lax.switch`` over two Mosaic kernels (the local LocalMask and the global
    CausalMask, both soft-capped) inside ``shard_map``; it compiles for v5e-4."""
    import json
    import os

    from jaxarith import cli
    from train import plan

    if plan.libtpu_version() is None:
        pytest.skip("needs libtpu (pip install 'jaxarith[tpu]')")
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "tiny_llama.yaml")
    code = cli.main(["plan", tiny, "--topology", "v5e-4", "model.arch=gemma2",
                     "model.config.sliding_window=32", "batch=8", "mesh=fsdp=4", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and res["fits"] and res["attention"] == "splash"
    assert res["model_type"] == "gemma2"

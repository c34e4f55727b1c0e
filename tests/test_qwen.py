"""Qwen2 / Qwen2.5, Qwen3 and Qwen3-MoE against transformers (PyTorch, float32) and mergekit.

Per family: log-probs on a padded batch on one device and on an 8-device mesh, greedy generation
token for token, HF -> Orbax -> HF bit for bit, the config checks; task arithmetic against
mergekit 0.1.5 (Qwen2, Qwen3); Qwen3-MoE's router, load-balancing loss and both expert layouts;
the published presets' parameter counts and shardings without memory (``jax.eval_shape``).
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml
from jax.sharding import PartitionSpec as P

from jaxarith import sharding, testing
from jaxarith.cli import main
from jaxarith.decode.loop import DecodeSpec, Member, generate, left_pad
from jaxarith.errors import ConfigError
from jaxarith.io.convert import HFCheckpoint, load_hf_params
from jaxarith.io.convert.route import convert
from jaxarith.models import (
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    config_from_hf,
    forward,
    init_params,
    load_config,
    moe,
    next_token_loss,
    num_params,
    param_shardings,
    param_specs,
)
from jaxarith.models.presets import PRESETS, preset

TOL = 1e-4

# name -> (HF config factory, make_hf_model options)
MODELS = {
    "qwen2": (lambda: testing.tiny_qwen2_config(), {"seed": 1}),
    # tied, multi-query
    "qwen2_tied_mqa": (lambda: testing.tiny_qwen2_config(tie_word_embeddings=True,
                                                         num_key_value_heads=1), {"seed": 2}),
    "qwen3": (lambda: testing.tiny_qwen3_config(), {"seed": 3}),
    # tied, multi-query, attention_bias (q, k, v and o biases)
    "qwen3_tied_mqa_bias": (lambda: testing.tiny_qwen3_config(
        tie_word_embeddings=True, num_key_value_heads=1, attention_bias=True), {"seed": 4}),
    # noise 0.2 on every weight so that the router's choices vary from token to token
    "qwen3_moe": (lambda: testing.tiny_qwen3_moe_config(), {"seed": 5, "noise": 0.2}),
    "qwen3_moe_tied_mqa_unnormalized": (lambda: testing.tiny_qwen3_moe_config(
        norm_topk_prob=False, tie_word_embeddings=True, num_key_value_heads=1),
        {"seed": 6, "noise": 0.2}),
}
CLASSES = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (directory, transformers model, config, params)}, built on first use."""
    made = {}

    def get(name):
        if name not in made:
            factory, kw = MODELS[name]
            d = str(tmp_path_factory.mktemp(name))
            hf = testing.make_hf_model(d, factory(), **kw)
            made[name] = (d, hf, *load_hf_params(d, progress=False))
        return made[name]

    return get


def _padded_batch(b=4, t=12):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, testing.TINY_VOCAB, (b, t))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    mask[3, :1] = 0
    return tokens, mask


def _max_dlogp(logits, ref, mask) -> float:
    ours = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
    theirs = np.asarray(jax.nn.log_softmax(jnp.asarray(ref), -1))
    return float(np.abs(ours - theirs)[mask.astype(bool)].max())


def _mesh_spec(cfg) -> str:
    return "fsdp=2,expert=4" if isinstance(cfg, Qwen3MoeConfig) else "data=2,fsdp=2,tensor=2"


@pytest.mark.parametrize("name", list(MODELS))
def test_logprobs_match_transformers_on_one_and_eight_devices(name, models, capsys):
    directory, hf, cfg, params = models(name)
    assert type(cfg) is CLASSES[cfg.model_type]
    tokens, mask = _padded_batch()
    ref = testing.hf_logits(hf, tokens, mask)
    one = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0]
    d1 = _max_dlogp(one, ref, mask)

    mesh = sharding.make_mesh(_mesh_spec(cfg))
    _, sharded = load_hf_params(directory, mesh=mesh, progress=False)
    with jax.set_mesh(mesh):
        batch = sharding.named_sharding(mesh, ("batch", "seq"), tokens.shape)
        many = jax.jit(lambda p, t, m: forward(p, cfg, t, attention_mask=m)[0])(
            sharded, jax.device_put(jnp.asarray(tokens), batch),
            jax.device_put(jnp.asarray(mask), batch))
    d8 = _max_dlogp(many, ref, mask)
    with capsys.disabled():
        print(f"\n{name}: max |dlogp| vs transformers: 1 device {d1:.2e}, "
              f"8 devices ({_mesh_spec(cfg)}) {d8:.2e}")
    assert d1 < TOL and d8 < TOL, (d1, d8)
    if isinstance(cfg, Qwen3MoeConfig):  # the experts really are split over the expert axis
        assert sharded["layers"]["moe"]["gate"].sharding.spec[1] == "expert"


@pytest.mark.parametrize("name", ["qwen2_tied_mqa", "qwen3", "qwen3_moe"])
def test_greedy_generation_equals_transformers(name, models):
    _, hf, cfg, params = models(name)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22], [40]]
    ours = generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=6), [params], prompts)
    tokens, mask = left_pad(prompts)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(tokens).long(),
                          attention_mask=torch.tensor(mask).long(), max_new_tokens=6,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(ours.tokens, ref[:, tokens.shape[1]:].numpy())


def _tensors(directory):
    ckpt = HFCheckpoint(directory)
    return {k: ckpt.get(k) for k in ckpt.keys()}


@pytest.mark.parametrize("name, expected_key", [
    ("qwen2_tied_mqa", "model.layers.1.self_attn.v_proj.bias"),
    ("qwen3_tied_mqa_bias", "model.layers.1.self_attn.k_norm.weight"),
    ("qwen3_moe", "model.layers.1.mlp.experts.3.down_proj.weight"),
])
def test_hf_orbax_hf_round_trip_is_bit_exact(name, expected_key, models, tmp_path):
    src, hf, _, _ = models(name)
    convert(src, tmp_path / "orbax", progress=False)
    convert(str(tmp_path / "orbax"), tmp_path / "hf", progress=False)
    before, after = _tensors(src), _tensors(str(tmp_path / "hf"))
    assert set(after) == set(before) and expected_key in after
    assert "model.layers.0.self_attn.o_proj.bias" not in after or name == "qwen3_tied_mqa_bias"
    for k in before:
        assert after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]), k
    assert load_config(str(tmp_path / "hf")) == load_config(src)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == type(hf).__name__
    tokens = np.random.RandomState(0).randint(3, testing.TINY_VOCAB, (2, 9))
    np.testing.assert_array_equal(testing.hf_logits(model.eval(), tokens),
                                  testing.hf_logits(hf, tokens))


@pytest.mark.parametrize("name", list(MODELS))
def test_rules_cover_every_parameter_and_counts_equal_transformers(name, models):
    from jaxarith.io.convert.keymap import rules_for
    from jaxarith.sharding import path_str

    _, hf, cfg, _ = models(name)
    assert num_params(cfg) == sum(p.numel() for p in hf.parameters())
    specs = {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        param_specs(cfg), is_leaf=lambda x: hasattr(x, "axes"))}
    covered = []
    for rule in rules_for(cfg):
        for target, out in zip(rule.targets, rule.to_canon(np.zeros(rule.hf_shape, np.float32)),
                               strict=True):
            covered.append(path_str(target))
            want = specs[covered[-1]].shape
            assert out.shape == (want[2:] if rule.experts else want[1:] if rule.per_layer
                                 else want), covered[-1]
    assert sorted(covered) == sorted(specs)
    attn = specs.keys()
    if cfg.model_type == "qwen2":  # q, k, v biases, no o bias
        assert {"layers/attn/q_bias", "layers/attn/v_bias"} <= attn
        assert "layers/attn/o_bias" not in attn
    else:
        assert "layers/attn/q_norm" in attn and specs["layers/attn/q_norm"].shape == \
            (cfg.num_hidden_layers, cfg.head_dim)


# ----------------------------------------------------------------------------- Qwen3-MoE


def test_moe_router_and_aux_loss_equal_transformers(models):
    _, hf, cfg, params = models("qwen3_moe")
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    assert (e, k, cfg.norm_topk_prob) == (4, 2, True)
    tokens, mask = _padded_batch()
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos), output_router_logits=True)
    _, _, router = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    hf_router = np.stack([r.numpy().reshape(*tokens.shape, e) for r in ref.router_logits])
    router = np.asarray(router)
    np.testing.assert_allclose(router[:, real], hf_router[:, real], atol=1e-5, rtol=0)
    ours_k = np.sort(np.asarray(jax.lax.top_k(router, k)[1]), -1)[:, real]
    assert len(np.unique(ours_k.reshape(-1, k), axis=0)) > 2  # routing really varies
    aux = float(moe.load_balancing_loss(jnp.asarray(router), k, jnp.asarray(mask)))
    np.testing.assert_allclose(aux, ref.aux_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(aux, moe.np_load_balancing_loss(router, k, mask), rtol=1e-5)


def test_norm_topk_prob_is_followed(models):
    """Both settings match transformers (the parity test); the other setting would not."""
    tokens, mask = _padded_batch()
    for name in ("qwen3_moe", "qwen3_moe_tied_mqa_unnormalized"):
        _, hf, cfg, params = models(name)
        flipped = dataclasses.replace(cfg, norm_topk_prob=not cfg.norm_topk_prob)
        logits = forward(params, flipped, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0]
        assert _max_dlogp(logits, testing.hf_logits(hf, tokens, mask), mask) > 1e-2, name


def test_moe_fused_expert_layout_loads_to_the_same_params(models, tmp_path):
    """transformers 5's in-memory (fused) layout, ``mlp.experts.gate_up_proj`` [E, 2F, D], as
    some tools save it, reads to the same canonical tree as the per-expert layout."""
    from safetensors.torch import save_file

    src, hf, cfg, params = models("qwen3_moe")
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src, "config.json"), fused / "config.json")
    cfg_f, params_f = load_hf_params(str(fused), progress=False)
    assert cfg_f.hf_fused_experts and cfg_f == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_f), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # through Orbax (which keeps no HF layout) it comes back one tensor per expert, the
    # layout merges read: bit for bit what save_pretrained wrote
    convert(str(fused), tmp_path / "orbax", progress=False)
    convert(str(tmp_path / "orbax"), tmp_path / "hf", progress=False)
    before, after = _tensors(src), _tensors(str(tmp_path / "hf"))
    assert set(after) == set(before)
    for key in before:
        assert np.array_equal(after[key], before[key]), key


def test_moe_training_loss_adds_the_load_balancing_loss(models):
    """The training program's loss for the family (``Family.routed``): NLL plus
    router_aux_loss_coef times the load-balancing loss, with the router metrics."""
    from train.step import next_token_loss_fn

    _, _, cfg, params = models("qwen3_moe")
    tokens = jnp.asarray(np.random.default_rng(4).integers(3, 200, (2, 16)), jnp.int32)
    loss_fn = next_token_loss_fn(cfg)
    (total, count, metrics), (nll, n) = jax.jit(lambda p: (
        loss_fn(p, {}, {"tokens": tokens}), next_token_loss(p, cfg, tokens)))(params)
    assert set(metrics) == {"aux_loss", "z_loss", *(f"expert_load/{i}" for i in range(4))}
    aux = float(metrics["aux_loss"] / count)
    assert aux > 0 and float(count) == float(n)
    np.testing.assert_allclose(float(total), float(nll) + float(count) * 0.001 * aux, rtol=1e-6)


def test_layer_inheritance_takes_blocks_and_fresh_parts(models):
    """``last:1`` with the MLP part fresh: attention (with its q/k norms) and norms are the
    source's layer 1, the MLP (a mixture of experts' router and experts) is init_params'."""
    from jaxarith.arith.inherit import inherit

    _, _, cfg, params = models("qwen3_moe")
    new_cfg, new = inherit(params, cfg, "last:1", parts=["attn", "norms"], key=jax.random.key(3))
    assert new_cfg.num_hidden_layers == 1 and config_from_hf(new_cfg.to_hf()) == new_cfg
    fresh = init_params(new_cfg, jax.random.key(3))
    flat = jax.tree_util.tree_flatten_with_path(new["layers"])[0]
    for (path, leaf), src, init in zip(flat, jax.tree.leaves(params["layers"]),
                                       jax.tree.leaves(fresh["layers"]), strict=True):
        want = init if path[0].key == "moe" else src[1:]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want),
                                      err_msg=jax.tree_util.keystr(path))
    assert {p[0].key for p, _ in flat} == {"attn", "attn_norm", "moe", "mlp_norm"}
    assert "q_norm" in new["layers"]["attn"]
    logits = forward(new, new_cfg, jnp.asarray([[5, 6, 7]]))[0]
    assert np.isfinite(np.asarray(logits)).all()


# ----------------------------------------------------------------------------- merges


TASK_ARITHMETIC = """
merge_method: task_arithmetic
base_model: {B}
models:
  - model: {M1}
    parameters: {{weight: 0.7}}
  - model: {M2}
    parameters: {{weight: [0.2, 0.9]}}
parameters: {{lambda: 0.8}}
dtype: float32
"""


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_task_arithmetic_equals_mergekit(name, models, tmp_path, capsys):
    pytest.importorskip("mergekit", reason="mergekit==0.1.5 (the `test` extra) is not installed")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    base, _, _, _ = models(name)
    factory, _ = MODELS[name]
    paths = {"B": base}
    for i, m in enumerate(("M1", "M2")):
        paths[m] = str(tmp_path / m)
        testing.make_hf_model(paths[m], factory(), seed=40 + i)
    text = TASK_ARITHMETIC.format(**paths)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"),
              options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    (tmp_path / "merge.yaml").write_text(text)
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "jx"), "--json"]) == 0
    assert "error" not in json.loads(capsys.readouterr().out)
    mk, jx, b = _tensors(str(tmp_path / "mk")), _tensors(str(tmp_path / "jx")), _tensors(base)
    assert set(mk) == set(jx) == set(b)
    worst = 0.0
    for key in mk:
        diff = np.abs(jx[key].astype(np.float64) - mk[key])
        worst = max(worst, float(diff.max()))
        assert diff.max() <= 1e-6, f"{key}: max |diff| = {diff.max():.3g}"
        assert not np.array_equal(jx[key], b[key]), key  # the merge changed every tensor
    with capsys.disabled():
        print(f"\n{name} task_arithmetic: max |jaxarith - mergekit| = {worst:.3g}")


# ----------------------------------------------------------------------------- configs


def test_sliding_window_off_is_accepted_and_on_is_refused_naming_the_key():
    for factory in (testing.tiny_qwen2_config, testing.tiny_qwen3_config,
                    testing.tiny_qwen3_moe_config):
        d = factory().to_dict()
        # as released checkpoints write it: a window size with the window switched off
        cfg = config_from_hf({**d, "use_sliding_window": False, "sliding_window": 32,
                              "max_window_layers": 1})
        assert config_from_hf(cfg.to_hf()) == cfg
        with pytest.raises(ConfigError, match=r"use_sliding_window=True is not supported"):
            config_from_hf({**d, "use_sliding_window": True, "sliding_window": 32})
        with pytest.raises(ConfigError, match=r"layer_types has \['sliding_attention'\]"):
            config_from_hf({**d, "layer_types": ["full_attention", "sliding_attention"]})
    d = testing.tiny_qwen2_config().to_dict()
    with pytest.raises(ConfigError, match=r"use_mrope=True is not supported"):
        config_from_hf({**d, "use_mrope": True})
    with pytest.raises(ConfigError, match=r"unknown qwen2 config key 'attention_bias'"):
        config_from_hf({**d, "attention_bias": True})  # Qwen2's biases are fixed: q, k, v
    with pytest.raises(ConfigError, match=r"unknown qwen3 config key 'mlp_bias'"):
        config_from_hf({**testing.tiny_qwen3_config().to_dict(), "mlp_bias": True})
    with pytest.raises(ConfigError, match=r"hidden_act='gelu' is not supported for qwen3"):
        config_from_hf({**testing.tiny_qwen3_config().to_dict(), "hidden_act": "gelu"})


def test_moe_config_keys():
    d = testing.tiny_qwen3_moe_config().to_dict()
    assert "num_local_experts" in d  # transformers 5 writes num_experts under this name
    cfg = config_from_hf(d)
    assert cfg.num_experts == cfg.num_local_experts == 4 and cfg.moe_intermediate_size == 48
    assert "num_local_experts" in cfg.to_hf() and "num_experts" not in cfg.to_hf()
    published = {k: v for k, v in d.items() if k != "num_local_experts"} | {"num_experts": 4}
    assert config_from_hf(published) == cfg and cfg.to_hf() != config_from_hf(published).to_hf()
    assert config_from_hf(published).to_hf()["num_experts"] == 4
    cases = [({"decoder_sparse_step": 2}, r"decoder_sparse_step=2 is not supported"),
             ({"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\] is not supported"),
             ({"num_experts_per_tok": 5}, r"num_experts_per_tok=5 exceeds num_experts=4"),
             ({"num_experts": 6}, r"num_experts=6 and num_local_experts=4 disagree")]
    for change, match in cases:
        with pytest.raises(ConfigError, match=match):
            config_from_hf({**d, **change})
    specs = param_specs(cfg)["layers"]["moe"]
    assert specs["gate"].shape == (2, 4, 32, 48) and specs["gate"].axes[1] == "experts"
    assert "mlp" not in param_specs(cfg)["layers"]


# ----------------------------------------------------------------------------- presets


# parameter counts computed by hand from the published shapes (tied embeddings counted once):
# per layer q, k, v, o (+ biases / q-k norms), MLP or router + experts, two norms; embeddings,
# head, final norm. Published: 0.49B, 7.61B, 8.2B, 30.5B.
def _hand_count(name):
    c = PRESETS[name]
    d, n, kv, layers, v = (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
                           c["num_hidden_layers"], c["vocab_size"])
    h = c.get("head_dim", d // n)
    attn = d * n * h * 2 + d * kv * h * 2
    if c["model_type"] == "qwen2":
        attn += n * h + 2 * kv * h
    else:
        attn += 2 * h
    if c["model_type"] == "qwen3_moe":
        mlp = d * c["num_experts"] + c["num_experts"] * 3 * d * c["moe_intermediate_size"]
    else:
        mlp = 3 * d * c["intermediate_size"]
    return layers * (attn + mlp + 2 * d) + v * d * (1 if c["tie_word_embeddings"] else 2) + d


PRESET_PARAMS = {"Qwen/Qwen2.5-0.5B": 494_032_768, "Qwen/Qwen2.5-7B": 7_615_616_512,
                 "Qwen/Qwen3-8B": 8_190_735_360, "Qwen/Qwen3-30B-A3B": 30_532_122_624}


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))  # the Qwen presets (Gemma's: test_gemma)
def test_presets_shapes_counts_and_shardings_without_memory(name):
    cfg = preset(name)
    assert _hand_count(name) == PRESET_PARAMS[name] == num_params(cfg)
    assert config_from_hf(cfg.to_hf()) == cfg
    mesh = sharding.make_mesh("fsdp=2,tensor=2,expert=2")
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.bfloat16, mesh))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract)) == PRESET_PARAMS[name]
    shardings = param_shardings(cfg, mesh)
    assert shardings["layers"]["attn"]["q"].spec == P(None, "fsdp", "tensor", None)
    assert shardings["embed"].spec == P("tensor", "fsdp")
    if isinstance(cfg, Qwen3MoeConfig):
        assert shardings["layers"]["moe"]["gate"].spec == P(None, "expert", "fsdp", "tensor")
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    with jax.set_mesh(mesh):
        out = jax.eval_shape(lambda p, t: forward(p, cfg, t, dtype=jnp.bfloat16)[0],
                             abstract, tokens)
    assert out.shape == (8, 256, cfg.vocab_size) and out.dtype == jnp.float32
    with pytest.raises(ConfigError, match="no preset 'Qwen/Qwen9'"):
        preset("Qwen/Qwen9")

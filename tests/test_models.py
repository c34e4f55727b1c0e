"""Parity of jaxarith's Llama and GPT-2 with transformers (PyTorch, float32)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxarith import testing
from jaxarith.errors import ConfigError
from jaxarith.eval.loss import eval_loss
from jaxarith.io.convert import load_hf_params
from jaxarith.models import (
    CausalLM,
    check_config_keys,
    config_from_hf,
    forward,
    jit_forward,
    load_config,
    next_token_loss,
    num_params,
    token_logprobs,
)

TOL = 1e-4
FIXTURES = ["llama_dir", "llama_tied_dir", "gpt2_dir"]


def _batch(seed=0, b=4, t=12, vocab=testing.TINY_VOCAB):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, (b, t))
    mask = np.ones((b, t), np.int64)
    if b >= 4:
        mask[1, :4] = 0  # left padding
        mask[2, 9:] = 0  # right padding
        mask[3, :1] = 0
    elif b == 2:
        mask[1, :3] = 0
    return tokens, mask


@pytest.mark.parametrize("fixture", FIXTURES)
def test_logprobs_match_transformers_on_padded_batch(fixture, request):
    directory, hf_model = request.getfixturevalue(fixture)
    cfg, params = load_hf_params(directory, progress=False)
    tokens, mask = _batch()
    ref = jax.nn.log_softmax(testing.hf_logits(hf_model, tokens, mask), axis=-1)
    logits, _, _ = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    ours = jax.nn.log_softmax(logits, axis=-1)
    diff = np.abs(np.asarray(ours) - np.asarray(ref))[mask.astype(bool)]
    assert diff.max() < TOL, f"{fixture}: max |dlogp| = {diff.max():.2e}"


@pytest.mark.parametrize("fixture", FIXTURES)
def test_loss_matches_transformers(fixture, request):
    directory, hf_model = request.getfixturevalue(fixture)
    cfg, params = load_hf_params(directory, progress=False)
    tokens, _ = _batch(seed=1, b=2, t=20)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(tokens), labels=torch.tensor(tokens)).loss.item()
    nll, n = next_token_loss(params, cfg, jnp.asarray(tokens))
    assert abs(float(nll / n) - ref) < TOL


def test_eval_loss_windows(llama_dir):
    """Windows overlap by one token: every token but the first is predicted exactly once, each
    window is scored on its own, and batching/padding of windows changes nothing."""
    directory, _ = llama_dir
    cfg, params = load_hf_params(directory, progress=False)
    ids = np.random.RandomState(3).randint(3, testing.TINY_VOCAB, 61)
    windowed = eval_loss(params, cfg, ids, seq_len=16, batch_size=3)
    total, count = 0.0, 0.0
    for start in range(0, 60, 15):
        w = jnp.asarray(ids[start: start + 16])[None]
        nll, n = next_token_loss(params, cfg, w)
        total, count = total + float(nll), count + float(n)
    assert windowed.tokens == count == 60
    assert abs(windowed.loss - total / count) < 1e-5
    whole = eval_loss(params, cfg, ids)
    nll, n = next_token_loss(params, cfg, jnp.asarray(ids)[None])
    assert whole.tokens == 60 and abs(whole.loss - float(nll / n)) < 1e-5


def test_cli_eval_loss_matches_transformers(llama_dir, tmp_path):
    directory, hf_model = llama_dir
    text = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog.\n" * 2
    path = tmp_path / "text.txt"
    path.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "jaxarith", "eval-loss", directory, "--text", str(path), "--json"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout)
    ids = testing.bundled_tokenizer()(text)["input_ids"]
    with torch.no_grad():
        t = torch.tensor([ids])
        ref = hf_model(input_ids=t, labels=t).loss.item()
    assert result["tokens"] == len(ids) - 1
    assert abs(result["loss"] - ref) < TOL
    assert abs(result["ppl"] - np.exp(ref)) < 1e-3 * np.exp(ref)


def test_nnx_module_state_is_canonical_tree(llama_dir):
    directory, hf_model = llama_dir
    cfg, params = load_hf_params(directory, progress=False)
    model = CausalLM.from_params(cfg, params)
    tree = model.params()
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    tokens, mask = _batch(b=2)
    # the module's output is transformers' (an independent implementation of the same model)
    ref = jax.nn.log_softmax(testing.hf_logits(hf_model, tokens, mask), axis=-1)
    ours = jax.nn.log_softmax(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)), -1)
    diff = np.abs(np.asarray(ours) - np.asarray(ref))[mask.astype(bool)]
    assert diff.max() < TOL, f"max |dlogp| = {diff.max():.2e}"
    from flax import nnx

    q = model.layers["attn"]["q"]
    assert isinstance(q, nnx.Param)
    assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")


def test_remat_gives_same_gradients(llama_dir):
    directory, _ = llama_dir
    cfg, params = load_hf_params(directory, progress=False)
    tokens, mask = _batch(b=2)

    def loss(p, remat):
        nll, n = next_token_loss(p, cfg, jnp.asarray(tokens), jnp.asarray(mask), remat=remat)
        return nll / n

    g0 = jax.grad(loss)(params, False)
    g1 = jax.grad(loss)(params, True)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bfloat16_compute_close_to_float32(gpt2_dir):
    directory, _ = gpt2_dir
    cfg, params = load_hf_params(directory, progress=False)
    tokens, mask = _batch(b=2)
    lp32 = token_logprobs(forward(params, cfg, jnp.asarray(tokens))[0], jnp.asarray(tokens))
    logits16, _, _ = forward(params, cfg, jnp.asarray(tokens), dtype=jnp.bfloat16)
    assert logits16.dtype == jnp.float32  # logits are returned in float32 whatever the compute
    lp16 = token_logprobs(logits16, jnp.asarray(tokens))
    # bf16 has 8 bits of mantissa: a real but bounded difference (not a parity claim).
    assert 0 < float(jnp.max(jnp.abs(lp16 - lp32))) < 0.1


def test_cache_prefill_equals_full_forward(llama_dir):
    """Prefill in two chunks through the KV cache equals one pass (left-padded batch)."""
    from jaxarith.models import init_cache

    directory, _ = llama_dir
    cfg, params = load_hf_params(directory, progress=False)
    tokens, mask = _batch(b=2, t=10)
    full, _, _ = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    cache = init_cache(cfg, 2, 16)
    a, cache, _ = forward(params, cfg, jnp.asarray(tokens[:, :6]),
                       attention_mask=jnp.asarray(mask[:, :6]), cache=cache)
    b, cache, _ = forward(params, cfg, jnp.asarray(tokens[:, 6:]),
                       attention_mask=jnp.asarray(mask[:, 6:]), cache=cache)
    got = np.concatenate([np.asarray(a), np.asarray(b)], axis=1)
    m = mask.astype(bool)
    np.testing.assert_allclose(got[m], np.asarray(full)[m], atol=1e-4)
    assert int(cache.index) == 10


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_packed_rows_equal_transformers_on_each_sequence(fixture, request):
    """A [B, T, T] mask packs sequences in one row (a shared prefix, two branches that do not
    see each other, another sequence); each slot's logits equal transformers' on that
    slot's own sequence."""
    directory, model = request.getfixturevalue(fixture)
    cfg, params = load_hf_params(directory, progress=False)
    rng = np.random.RandomState(3)
    prefix, a, b, other = (rng.randint(3, testing.TINY_VOCAB, n).tolist() for n in (4, 3, 2, 5))
    seqs = [prefix, prefix + a, prefix + b, other]  # slots: prefix | a | b | other | pad
    tokens = prefix + a + b + other + [0, 0]
    unit = [1] * 9 + [2] * 5 + [0, 0]
    branch = [0] * 4 + [1] * 3 + [2] * 2 + [0] * 7
    positions = [0, 1, 2, 3, 4, 5, 6, 4, 5, 0, 1, 2, 3, 4, 0, 1]
    u, br, slot = np.asarray(unit), np.asarray(branch), np.arange(16)
    mask = ((slot[:, None] >= slot[None]) & (u[:, None] == u[None])
            & ((br[None] == 0) | (br[None] == br[:, None])))
    got, _, _ = forward(params, cfg, jnp.asarray([tokens]), attention_mask=jnp.asarray(mask[None]),
                     positions=jnp.asarray([positions]))
    got = np.asarray(got[0])
    ref = [testing.hf_logits(model, np.asarray([s]))[0] for s in seqs]
    np.testing.assert_allclose(got[:4], ref[0], atol=1e-4)
    np.testing.assert_allclose(got[4:7], ref[1][4:], atol=1e-4)
    np.testing.assert_allclose(got[7:9], ref[2][4:], atol=1e-4)
    np.testing.assert_allclose(got[9:14], ref[3], atol=1e-4)
    with pytest.raises(ConfigError, match="explicit positions"):
        forward(params, cfg, jnp.asarray([tokens]), attention_mask=jnp.asarray(mask[None]))


def test_repeated_calls_do_not_recompile(gpt2_dir):
    from jaxarith.eval.loss import _batch_nll

    directory, _ = gpt2_dir
    cfg, params = load_hf_params(directory, progress=False)
    ids = np.random.RandomState(5).randint(3, testing.TINY_VOCAB, 200)
    eval_loss(params, cfg, ids, seq_len=32, batch_size=4)
    n = _batch_nll._cache_size()
    eval_loss(params, cfg, ids[::-1].copy(), seq_len=32, batch_size=4)  # same shapes, new data
    eval_loss(params, cfg, ids[:150], seq_len=32, batch_size=4)  # fewer windows, same batch shape
    assert _batch_nll._cache_size() == n


# ----------------------------------------------------------------------------- independent checks


@pytest.mark.parametrize("fixture", FIXTURES)
def test_num_params_equals_transformers_count(fixture, request):
    """The parameter count from our ParamSpec table equals transformers' own count of the same
    model (tied weights counted once)."""
    directory, hf_model = request.getfixturevalue(fixture)
    cfg = load_config(directory)
    assert num_params(cfg) == sum(p.numel() for p in hf_model.parameters())


@pytest.fixture(scope="module")
def llama_long(tmp_path_factory):
    """A Llama with a 512-token context (GQA, llama3 RoPE) for sequences past one attention
    block (128 queries)."""
    d = tmp_path_factory.mktemp("llama_long")
    cfg = testing.tiny_llama_config(max_position_embeddings=512,
                                    rope_scaling=testing.LLAMA3_ROPE)
    hf = testing.make_hf_model(d, cfg, seed=4, with_tokenizer=False)
    return str(d), hf


def test_blocked_attention_past_128_tokens_matches_transformers(llama_long):
    """T = 300 runs the causal attention in three query blocks (128, 128, 44), with left
    padding on one row: log-probs equal transformers' at every real position."""
    directory, hf_model = llama_long
    cfg, params = load_hf_params(directory, progress=False)
    rng = np.random.RandomState(7)
    tokens = rng.randint(3, testing.TINY_VOCAB, (2, 300))
    mask = np.ones((2, 300), np.int64)
    mask[1, :37] = 0
    ref = jax.nn.log_softmax(testing.hf_logits(hf_model, tokens, mask), axis=-1)
    logits, _, _ = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    ours = jax.nn.log_softmax(logits, axis=-1)
    diff = np.abs(np.asarray(ours) - np.asarray(ref))[mask.astype(bool)]
    assert diff.max() < TOL, f"max |dlogp| = {diff.max():.2e}"


# ----------------------------------------------------------------------------- configs


# config.json of released checkpoints (as published on the hub), which must keep loading
REAL_CONFIGS = {
    "llama-1-7b": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 2048,
        "max_sequence_length": 2048, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 32, "pad_token_id": 0, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.28.0.dev0", "use_cache": True, "vocab_size": 32000},
    "llama-2-7b": {
        "_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000},
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
    "mistral-7b-v0.3": {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.42.0.dev0", "use_cache": True,
        "vocab_size": 32768},
    "gpt2": {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
        "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
        "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257},
}
# parameter counts published for these checkpoints (computed by hand from the shapes)
REAL_PARAMS = {"llama-1-7b": 6_738_415_616, "llama-2-7b": 6_738_415_616,
               "llama-3.2-1b": 1_235_814_400, "mistral-7b-v0.3": 7_248_023_552,
               "gpt2": 124_439_808}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_hf_configs_load(name):
    cfg = config_from_hf(REAL_CONFIGS[name])
    assert num_params(cfg) == REAL_PARAMS[name]
    assert config_from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("arch, typo, closest", [
    ("llama", "hiden_size", "hidden_size"),
    ("gpt2", "n_layers", "n_layer"),
])
def test_unknown_config_key_is_named_with_the_valid_ones(arch, typo, closest):
    base = {k: v for k, v in REAL_CONFIGS["llama-2-7b" if arch == "llama" else "gpt2"].items()}
    with pytest.raises(ConfigError, match=rf"unknown {arch} config key '{typo}' \(did you mean "
                                          rf"'{closest}'\?\); valid keys: .*{closest}"):
        config_from_hf({**base, typo: 32})
    with pytest.raises(ConfigError, match=rf"model.config: unknown {arch} config key '{typo}'"):
        check_config_keys(arch, {typo: 32})
    check_config_keys(arch, {closest: 32, "torch_dtype": "float32"})  # valid keys pass


def test_train_config_model_overrides_check_keys():
    from train.config import ModelSection

    with pytest.raises(ConfigError, match=r"model.config: unknown llama config key 'hiden_size'"):
        ModelSection(arch="llama", config={"hiden_size": 32, "vocab_size": 64})


# ----------------------------------------------------------------------------- token ids


def test_out_of_range_token_ids_are_a_clear_error(llama_dir):
    directory, _ = llama_dir
    cfg, params = load_hf_params(directory, progress=False)
    bad = np.array([[5, 6, cfg.vocab_size]])
    message = rf"token id {cfg.vocab_size} is outside the model's vocabulary \[0, 1024\)"
    with pytest.raises(ConfigError, match=message):
        forward(params, cfg, jnp.asarray(bad))
    with pytest.raises(ConfigError, match=message):
        jit_forward(params, cfg, bad, np.ones_like(bad))
    with pytest.raises(ConfigError, match=r"token id -1 is outside"):
        CausalLM.from_params(cfg, params)(jnp.asarray([[3, -1]]))
    with pytest.raises(ConfigError, match=message):
        eval_loss(params, cfg, bad[0])
    from jaxarith.decode.loop import DecodeSpec, Member, generate

    with pytest.raises(ConfigError, match=r"model prompt: token id 1024 is outside"):
        generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=2), [params], bad.tolist())


# ----------------------------------------------------------------------------- family interface


@pytest.mark.parametrize("fixture", FIXTURES)
def test_family_rules_cover_every_parameter_exactly_once(fixture, request):
    """Each canonical leaf of the family's ParamSpec table is the target of exactly one HF rule,
    with the shape the rule's hook produces from the HF shape."""
    from jaxarith.io.convert.keymap import rules_for
    from jaxarith.models import param_specs
    from jaxarith.sharding import path_str

    cfg = load_config(request.getfixturevalue(fixture)[0])
    specs = {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        param_specs(cfg), is_leaf=lambda x: hasattr(x, "axes"))}
    covered = []
    for rule in rules_for(cfg):
        outs = rule.to_canon(np.zeros(rule.hf_shape, np.float32))
        for target, out in zip(rule.targets, outs, strict=True):
            name = path_str(target)
            covered.append(name)
            per_layer = specs[name].shape[1:] if rule.per_layer else specs[name].shape
            assert out.shape == per_layer, name
    assert sorted(covered) == sorted(specs)


def test_a_family_registered_at_run_time_runs_everywhere(monkeypatch):
    """The docs/models.md example: a Llama with a parallel block is one registration; config
    parsing, init, conversion rules and the forward use it without any other change."""
    import dataclasses
    from typing import ClassVar

    from jaxarith.io.convert.keymap import rules_for
    from jaxarith.models import LlamaConfig, init_params, llama, register, registry

    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))
    monkeypatch.setattr(registry, "_BY_MODEL_TYPE", dict(registry._BY_MODEL_TYPE))
    # docs/models.md registers the same example for good when tests/test_docs.py ran it earlier
    # in this process
    registry.FAMILIES.pop("parallel_llama", None)
    registry._BY_MODEL_TYPE.pop("parallel_llama", None)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ParallelConfig(LlamaConfig):
        arch: ClassVar[str] = "parallel_llama"
        model_type: str = "parallel_llama"

    def parallel_block(cfg, p, x, ctx):
        return x + llama.self_attention(cfg, p, x, ctx) + llama.mlp(cfg, p, x)

    register(dataclasses.replace(llama.FAMILY, arch="parallel_llama",
                                 config_class=ParallelConfig, model_types=("parallel_llama",),
                                 block=parallel_block))
    with pytest.raises(ConfigError, match="already registered"):
        register(llama.FAMILY)
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    cfg = config_from_hf({"model_type": "parallel_llama", **kw})
    assert isinstance(cfg, ParallelConfig)
    base = LlamaConfig(**kw)
    assert [r.hf_key for r in rules_for(cfg)] == [r.hf_key for r in rules_for(base)]
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.array([[1, 5, 9, 3]])
    ours = np.asarray(forward(params, cfg, tokens)[0])
    sequential = np.asarray(forward(params, base, tokens)[0])
    assert ours.shape == (1, 4, 64) and np.isfinite(ours).all()
    assert np.abs(ours - sequential).max() > 1e-4  # the parallel block is the one that ran

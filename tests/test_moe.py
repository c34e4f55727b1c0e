"""Mixtral against transformers: log-probs on a padded batch, router choices, the load-balancing
loss (and a float64 numpy reference), experts sharded over 8 devices, HF <-> Orbax, greedy
generation, training through the train program, the capacity (dropping) rule."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from jaxarith import sharding, testing
from jaxarith.decode.loop import DecodeSpec, Member, generate, left_pad
from jaxarith.errors import ConfigError
from jaxarith.io.convert import HFCheckpoint, load_hf_params
from jaxarith.io.convert.route import convert
from jaxarith.models import config_from_hf, forward, load_config, moe, next_token_loss, param_specs

E, K = 4, 2


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """Tiny GQA Mixtral (2 layers, 4 experts, top-2) saved by transformers. Noise 0.2 on every
    weight so the router's choices differ from token to token."""
    d = str(tmp_path_factory.mktemp("mixtral"))
    hf = testing.make_hf_model(d, testing.tiny_mixtral_config(), seed=3, noise=0.2)
    cfg, params = load_hf_params(d, progress=False)
    return d, hf, cfg, params


def _padded_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, testing.TINY_VOCAB, (3, 12))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0   # left padding
    mask[2, 9:] = 0   # right padding
    return tokens, mask


def _hf_outputs(hf, tokens, mask):
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos), output_router_logits=True)
    return out


def test_logprobs_router_and_aux_loss_equal_transformers(mixtral):
    _, hf, cfg, params = mixtral
    assert cfg.num_local_experts == E and cfg.num_experts_per_tok == K
    tokens, mask = _padded_batch()
    ref = _hf_outputs(hf, tokens, mask)
    logits, _, router = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    ours = np.asarray(jax.nn.log_softmax(logits, -1))[real]
    theirs = torch.log_softmax(ref.logits, -1).numpy()[real]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # the router: logits [L, B, T, E] and the chosen experts, token by token
    hf_router = np.stack([r.numpy().reshape(*tokens.shape, E) for r in ref.router_logits])
    router = np.asarray(router)
    np.testing.assert_allclose(router[:, real], hf_router[:, real], atol=1e-5, rtol=0)
    ours_k = np.sort(np.asarray(jax.lax.top_k(router, K)[1]), -1)[:, real]
    theirs_k = np.sort(np.asarray(torch.topk(torch.tensor(hf_router), K).indices), -1)[:, real]
    np.testing.assert_array_equal(ours_k, theirs_k)
    assert len(np.unique(ours_k.reshape(-1, K), axis=0)) > 2  # routing really varies
    # load-balancing loss: transformers' function on its own router logits, and float64 numpy
    hf_aux = load_balancing_loss_func(tuple(ref.router_logits), E, K,
                                      torch.tensor(mask)).item()
    aux = float(moe.load_balancing_loss(jnp.asarray(router), K, jnp.asarray(mask)))
    np.testing.assert_allclose(aux, hf_aux, rtol=1e-5)
    np.testing.assert_allclose(aux, moe.np_load_balancing_loss(router, K, mask), rtol=1e-5)


def test_aux_and_z_loss_against_numpy_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 2, 5, 6)).astype(np.float32) * 2
    mask = rng.integers(0, 2, (2, 5))
    mask[0, 0] = 1
    for m in (None, mask):
        got = float(moe.load_balancing_loss(jnp.asarray(logits), 2,
                                            None if m is None else jnp.asarray(m)))
        np.testing.assert_allclose(got, moe.np_load_balancing_loss(logits, 2, m), rtol=1e-5)
    # z-loss: mean over layers and real tokens of logsumexp^2 (float64 numpy)
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    want = (lse**2 * mask[None]).sum() / (mask.sum() * 3)
    np.testing.assert_allclose(float(moe.router_z_loss(jnp.asarray(logits), jnp.asarray(mask))),
                               want, rtol=1e-5)


def test_capacity_drops_the_later_pairs_of_a_full_expert():
    """The documented rule, against a numpy loop: within an expert, (token, choice) pairs are
    kept in flattened order up to the cap; a dropped pair adds nothing."""
    rng = np.random.default_rng(2)
    n, d, f, e, k = 10, 4, 6, 3, 2
    x = rng.normal(size=(n, d)).astype(np.float32)
    gate, up = (rng.normal(size=(e, d, f)).astype(np.float32) for _ in range(2))
    down = rng.normal(size=(e, f, d)).astype(np.float32)
    weights, experts = moe.route(jnp.asarray(rng.normal(size=(n, e)) * 3), k)
    weights, experts = np.asarray(weights), np.asarray(experts)

    def ref(cap):
        out, taken = np.zeros((n, d)), np.zeros(e, int)
        for t in range(n):
            for c in range(k):
                j = experts[t, c]
                taken[j] += 1
                if taken[j] > cap:
                    continue
                h = x[t].astype(np.float64)
                g, u = h @ gate[j], h @ up[j]
                out[t] += weights[t, c] * ((g / (1 + np.exp(-g)) * u) @ down[j])
        return out

    for factor in (0.0, 0.5, 1.0):
        cap = moe.capacity(n, k, e, factor)
        got = moe.experts_mlp(jnp.asarray(x), jnp.asarray(weights), jnp.asarray(experts),
                              jnp.asarray(gate), jnp.asarray(up), jnp.asarray(down),
                              capacity_factor=factor)
        np.testing.assert_allclose(np.asarray(got), ref(cap), atol=1e-4, rtol=1e-5)
    assert moe.capacity(n, k, e, 0.5) == 4  # ceil(0.5 * 20 / 3): some pairs really drop


def test_experts_sharded_on_8_devices_equal_one_device(mixtral):
    d, _, cfg, params = mixtral
    mesh = sharding.make_mesh("expert=4,fsdp=2")
    _, sharded = load_hf_params(d, mesh=mesh, progress=False)
    spec = sharded["layers"]["moe"]["gate"].sharding.spec
    assert spec[1] == "expert" and spec[2] == "fsdp"
    assert len(sharded["layers"]["moe"]["down"].addressable_shards[0].data.shape) == 4
    assert sharded["layers"]["moe"]["down"].addressable_shards[0].data.shape[1] == E // 4
    tokens, mask = _padded_batch()
    tokens, mask = np.concatenate([tokens, tokens[:1]]), np.concatenate([mask, mask[:1]])
    one = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0]
    with jax.set_mesh(mesh):
        many = jax.jit(lambda p, t, m: forward(p, cfg, t, attention_mask=m)[0])(
            sharded, jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), atol=1e-5, rtol=0)


def test_hf_orbax_hf_round_trip_and_transformers_loads_it(mixtral, tmp_path):
    src, hf, _, _ = mixtral
    convert(src, tmp_path / "orbax", progress=False)
    convert(str(tmp_path / "orbax"), tmp_path / "hf", progress=False)
    before, after = HFCheckpoint(src), HFCheckpoint(str(tmp_path / "hf"))
    assert set(after.keys()) == set(before.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in after.keys()
    for k in before.keys():
        assert np.array_equal(after.get(k), before.get(k)), k
    assert load_config(str(tmp_path / "hf")) == load_config(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    tokens = np.random.RandomState(0).randint(3, testing.TINY_VOCAB, (2, 9))
    np.testing.assert_array_equal(testing.hf_logits(model, tokens), testing.hf_logits(hf, tokens))


def test_greedy_generation_equals_transformers(mixtral):
    _, hf, cfg, params = mixtral
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22], [40]]
    ours = generate(DecodeSpec(members=(Member(cfg),), max_new_tokens=6), [params], prompts)
    tokens, mask = left_pad(prompts)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(tokens).long(),
                          attention_mask=torch.tensor(mask).long(), max_new_tokens=6,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(ours.tokens, ref[:, tokens.shape[1]:].numpy())


def test_config_errors():
    base = testing.tiny_mixtral_config().to_dict()
    with pytest.raises(ConfigError, match="num_experts_per_tok=5 exceeds num_local_experts=4"):
        config_from_hf({**base, "num_experts_per_tok": 5})
    with pytest.raises(ConfigError, match="no attention or MLP biases"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ConfigError, match="sliding_window=16"):
        config_from_hf({**base, "sliding_window": 16})
    cfg = config_from_hf(base)
    specs = param_specs(cfg)["layers"]["moe"]
    assert specs["gate"].shape == (2, E, 32, 48) and specs["gate"].axes[1] == "experts"
    assert cfg.to_hf()["architectures"] == ["MixtralForCausalLM"]


ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY_MIXTRAL = ["model.arch=mixtral", "model.config.num_local_experts=4",
                "model.config.num_experts_per_tok=2", "model.config.intermediate_size=64",
                "batch=4", "mesh=fsdp=4,expert=2", "data.seq_len=32",
                "data.sources.code.max_docs=200", "data.sources.replay.max_docs=100",
                "eval.batches=1", "log.every=1",
                "log.progress=false", "checkpoint.every=0", "log.plot=false",
                "log.tensorboard=false", "average.kind=none", "eval.at_end=false",
                "schedule.peak_lr=1e-2", "schedule.warmup_steps=2", "steps=12",
                "schedule.total_steps=12", "moe.z_loss=0.001"]


@pytest.mark.slow  # moved out of `make test` (its ~10 min budget); CI runs it (make test-slow)
def test_train_loss_lowers_the_loss_and_reports_router_metrics(mixtral):
    """A few jitted Adam steps on the family's training loss (the one train/step.py uses for a
    Mixtral): the loss falls, the metrics are the router losses and loads."""
    import optax

    from train.step import next_token_loss_fn

    _, _, cfg, params = mixtral
    loss_fn = next_token_loss_fn(cfg)  # dispatches to train.losses.moe_loss_fn
    tokens = jnp.asarray(np.random.default_rng(4).integers(3, 200, (2, 16)), jnp.int32)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, opt):
        (loss, (n, m)), g = jax.value_and_grad(
            lambda p: (lambda r: (r[0], (r[1], r[2])))(loss_fn(p, {}, {"tokens": tokens})),
            has_aux=True)(p)
        updates, opt = tx.update(jax.tree.map(lambda x: x / n, g), opt, p)
        return optax.apply_updates(p, updates), opt, loss / n, jax.tree.map(lambda v: v / n, m)

    opt = tx.init(params)
    losses = []
    for _ in range(6):
        params, opt, loss, metrics = step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1.0, losses
    assert set(metrics) == {"aux_loss", "z_loss", *(f"expert_load/{i}" for i in range(E))}
    assert abs(sum(float(metrics[f"expert_load/{i}"]) for i in range(E)) - 1) < 1e-5
    # the loss is the NLL plus 0.001 x the load-balancing loss (the config's coefficient)
    (nll, count), total = jax.jit(lambda p: (next_token_loss(p, cfg, tokens),
                                             loss_fn(p, {}, {"tokens": tokens})))(params)
    aux = float(total[2]["aux_loss"] / total[1])
    np.testing.assert_allclose(float(total[0]), float(nll) + float(count) * 0.001 * aux,
                               rtol=1e-6)


@pytest.mark.slow  # ~15-40 s: compiles the program's train step
def test_train_program_lowers_the_loss_and_logs_router_metrics(tmp_path):
    from train import loop
    from train.config import load_train_config

    cfg = load_train_config(os.path.join(ROOT, "configs", "tiny_llama.yaml"),
                            [*TINY_MIXTRAL, f"out={tmp_path / 'run'}"])
    res = loop.run(cfg)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        recs = [r for r in map(json.loads, f) if "loss" in r]
    assert res["status"] == "done" and len(recs) == 12
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5, (recs[0]["loss"], recs[-1]["loss"])
    for r in recs:
        loads = [r[f"expert_load/{i}"] for i in range(4)]
        assert abs(sum(loads) - 1) < 1e-4 and all(0 <= x <= 1 for x in loads)
        assert 0 < r["aux_loss"] < 4 and r["z_loss"] > 0  # aux: E * sum f*P, k=2 when balanced


@pytest.fixture(scope="module")
def three_mixtrals(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_arith")
    dirs = []
    for s in range(3):
        dirs.append(str(d / f"m{s}"))
        testing.make_hf_model(dirs[-1], testing.tiny_mixtral_config(), seed=20 + s,
                              with_tokenizer=False)
    return dirs


@pytest.mark.slow  # ~40-55 s each on 2 loaded cores (the streamed executor, tensor by tensor)
@pytest.mark.parametrize("name,shared,per_model", [
    ("ties", {"lambda": 0.8}, ({"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6})),
    ("dare_ties", {}, ({"density": 0.5}, {"density": 0.7})),
])
def test_merges_treat_each_expert_as_its_own_tensor(three_mixtrals, tmp_path, name, shared,
                                                    per_model):
    """TIES / DARE over Mixtrals: the streaming executor (one HF tensor per expert) and the
    in-memory one (vmapped over layers and experts, on a mesh with experts sharded) agree bit
    for bit, and TIES trims each expert by its own magnitudes (equal to merging that expert's
    HF tensors as a model of their own)."""
    from jaxarith import arith
    from jaxarith.arith.select import MergeSpec

    spec = MergeSpec(method=arith.method(name), shared=shared, per_model=per_model, seed=3)
    cfg, _ = load_hf_params(three_mixtrals[0], progress=False)
    mesh = sharding.make_mesh("expert=4,fsdp=2")
    mem = arith.run(spec, cfg, [load_hf_params(r, mesh=mesh, progress=False)[1]
                                for r in three_mixtrals])
    arith.run_streamed(spec, three_mixtrals, tmp_path / "out", progress=False)
    _, streamed = load_hf_params(tmp_path / "out", progress=False)
    for a, b in zip(jax.tree.leaves(mem), jax.tree.leaves(streamed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    gate = np.asarray(mem["layers"]["moe"]["gate"])
    if name == "ties":  # expert 2 of layer 1, merged alone as a [D, F] tensor
        xs = [load_hf_params(r, progress=False)[1]["layers"]["moe"]["gate"][1, 2]
              for r in three_mixtrals]
        alone = arith.run(spec, None, [{"w": x} for x in xs])["w"]
        np.testing.assert_array_equal(gate[1, 2], np.asarray(alone))


@pytest.mark.slow  # two runs of the train program (~1 min on 2 shared cores)
def test_train_program_kill_and_resume_equals_uninterrupted(tmp_path):
    from train import loop
    from train.config import load_train_config

    base = [*TINY_MIXTRAL, "steps=4", "schedule.total_steps=4", "checkpoint.every=2"]
    config = os.path.join(ROOT, "configs", "tiny_llama.yaml")
    full = loop.run(load_train_config(config, [*base, f"out={tmp_path / 'full'}"]))
    cfg = load_train_config(config, [*base, f"out={tmp_path / 'cut'}"])

    def crash(step, _):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        loop.run(cfg, on_step=crash)
    resumed = loop.run(cfg)
    assert sorted(resumed["batches"]) == [3, 4]
    a, b = jax.device_get(resumed["state"].params), jax.device_get(full["state"].params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)

"""Sharded forward on 8 fake CPU devices equals the single-device one; shardings follow RULES."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxarith import sharding
from jaxarith.errors import ConfigError, ShardingError
from jaxarith.io.convert import load_hf_params
from jaxarith.models import LlamaConfig, abstract_params, forward, jit_forward
from jaxarith.models.config import RopeScaling

MESHES = ["fsdp=8", "data=2,fsdp=2,tensor=2", "tensor=8", "data=-1"]


def test_eight_devices_present():
    assert jax.device_count() == 8


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_sharded_forward_equals_single_device(spec, fixture, request):
    directory, _ = request.getfixturevalue(fixture)
    cfg, params = load_hf_params(directory, progress=False)
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(3, cfg.vocab_size, (8, 16)))
    mask = np.ones((8, 16), np.int32)
    mask[3, :5] = 0
    mask = jnp.asarray(mask)
    ref = jit_forward(params, cfg, tokens, mask)

    mesh = sharding.make_mesh(spec)
    _, sharded = load_hf_params(directory, mesh=mesh, progress=False)
    expected = abstract_params(cfg, mesh=mesh)
    for path, leaf in jax.tree_util.tree_leaves_with_path(sharded):
        want = expected
        for k in path:
            want = want[k.key]
        assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim), sharding.path_str(path)
    with jax.set_mesh(mesh):
        batch_shd = sharding.named_sharding(mesh, ("batch", "seq"), tokens.shape)
        got = jit_forward(sharded, cfg, jax.device_put(tokens, batch_shd),
                          jax.device_put(mask, batch_shd))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)


def test_rules_give_the_documented_specs():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    spec = lambda axes, shape: sharding.logical_to_spec(axes, shape, mesh)
    assert spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16)) == \
        P(None, "fsdp", "tensor", None)
    assert spec(("vocab", "embed"), (1024, 64)) == P("tensor", "fsdp")
    assert spec(("layers", "mlp", "embed"), (2, 128, 64)) == P(None, "tensor", "fsdp")
    assert spec(("batch", "seq"), (8, 16)) == P(("data", "fsdp"), None)
    assert spec(("layers", "norm"), (2, 64)) == P(None, None)


def test_indivisible_dimension_is_replicated_or_strict_error():
    mesh = sharding.make_mesh("tensor=8")
    # 4 kv heads on 8 tensor devices: replicated along that dimension by default...
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 4, 16),
                                    mesh) == P(None, None, None, None)
    # ...and a clear error that names the parameter in strict mode.
    with pytest.raises(ShardingError, match=r"layers/attn/k: dimension 2 \(kv_heads\) of size 4"):
        sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 4, 16),
                                 mesh, strict=True, name="layers/attn/k")


@pytest.mark.parametrize("spec, sizes", [
    ("fsdp=-1", {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}),
    ("data=2,fsdp=-1", {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}),
    ("data=2, fsdp=2, tensor=2", {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}),
    ("tensor=8", {"data": 1, "fsdp": 1, "tensor": 8, "expert": 1}),
])
def test_parse_mesh_spec(spec, sizes):
    assert sharding.parse_mesh_spec(spec, 8) == sizes


@pytest.mark.parametrize("spec, message", [
    ("model=8", "unknown axis 'model'"),
    ("data=3", "multiplies to 3 devices but there are 8"),
    ("data=2,fsdp=2", "multiplies to 4 devices but there are 8"),
    ("data=-1,fsdp=-1", "only one axis may be -1"),
    ("data=3,fsdp=-1", "not divisible"),
    ("data", "not of the form axis=size"),
    ("data=x", "not an integer"),
    ("data=2,data=4", "given twice"),
])
def test_bad_mesh_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        sharding.parse_mesh_spec(spec, 8)


LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
                    tie_word_embeddings=True,
                    rope_scaling=RopeScaling(rope_type="llama3", factor=32.0,
                                             original_max_position_embeddings=8192))
LLAMA_3_1_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, max_position_embeddings=131072, rope_theta=500000.0)


@pytest.mark.parametrize("preset, n_params", [(LLAMA_3_2_1B, 1_235_814_400),
                                              (LLAMA_3_1_8B, 8_030_261_248)])
def test_real_presets_shapes_and_shardings_without_memory(preset, n_params):
    """eval_shape of the full forward on a fake 8-device mesh: shapes, shardings, param count."""
    from jaxarith.models import num_params

    cfg = LlamaConfig(**preset)
    assert num_params(cfg) == n_params
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    abstract = abstract_params(cfg, jnp.bfloat16, mesh)
    assert abstract["layers"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert abstract["embed"].sharding.spec == P("tensor", "fsdp")
    tokens = jax.ShapeDtypeStruct((8, 4096), jnp.int32)
    with jax.set_mesh(mesh):
        out = jax.eval_shape(lambda p, t: forward(p, cfg, t, dtype=jnp.bfloat16)[0],
                             abstract, tokens)
    assert out.shape == (8, 4096, cfg.vocab_size) and out.dtype == jnp.float32


# ----------------------------------------------------------------------------- a model whose
# heads divide the tensor axis, checked against hand-written tables

# 8 query and 8 kv heads, vocab 1024 and mlp 128: every "tensor" dimension divides 8
EIGHT_HEADS = dict(num_attention_heads=8, num_key_value_heads=8, head_dim=8)

# canonical path -> expected PartitionSpec, written out by hand from RULES
TABLES = {
    "tensor=8": {
        "embed": P("tensor", None),
        "layers/attn_norm/scale": P(None, None),
        "layers/attn/q": P(None, None, "tensor", None),
        "layers/attn/k": P(None, None, "tensor", None),
        "layers/attn/v": P(None, None, "tensor", None),
        "layers/attn/o": P(None, "tensor", None, None),
        "layers/mlp_norm/scale": P(None, None),
        "layers/mlp/gate": P(None, None, "tensor"),
        "layers/mlp/up": P(None, None, "tensor"),
        "layers/mlp/down": P(None, "tensor", None),
        "final_norm/scale": P(None),
        "lm_head": P(None, "tensor"),
    },
    "data=2,fsdp=2,tensor=2": {
        "embed": P("tensor", "fsdp"),
        "layers/attn_norm/scale": P(None, None),
        "layers/attn/q": P(None, "fsdp", "tensor", None),
        "layers/attn/k": P(None, "fsdp", "tensor", None),
        "layers/attn/v": P(None, "fsdp", "tensor", None),
        "layers/attn/o": P(None, "tensor", None, "fsdp"),
        "layers/mlp_norm/scale": P(None, None),
        "layers/mlp/gate": P(None, "fsdp", "tensor"),
        "layers/mlp/up": P(None, "fsdp", "tensor"),
        "layers/mlp/down": P(None, "tensor", "fsdp"),
        "final_norm/scale": P(None),
        "lm_head": P("fsdp", "tensor"),
    },
}


@pytest.fixture(scope="module")
def eight_heads_dir(tmp_path_factory):
    from jaxarith import testing

    d = tmp_path_factory.mktemp("eight_heads")
    testing.make_hf_model(d, testing.tiny_llama_config(**EIGHT_HEADS), seed=5,
                          with_tokenizer=False)
    return str(d)


@pytest.mark.parametrize("spec", sorted(TABLES))
def test_tensor_parallel_attention_follows_hand_written_table(spec, eight_heads_dir, caplog):
    """Loaded onto the mesh, every parameter has the sharding of the table (attention really
    sharded over tensor=8: nothing is replicated, so nothing warns), and the forward equals the
    single-device one."""
    import logging

    cfg, params = load_hf_params(eight_heads_dir, progress=False)
    mesh = sharding.make_mesh(spec)
    with caplog.at_level(logging.WARNING, logger="jaxarith.sharding"):
        _, sharded = load_hf_params(eight_heads_dir, mesh=mesh, progress=False)
    assert not caplog.records
    got = {sharding.path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(sharded)}
    assert set(got) == set(TABLES[spec])
    for name, want in TABLES[spec].items():
        assert got[name].sharding.is_equivalent_to(NamedSharding(mesh, want), got[name].ndim), \
            (name, got[name].sharding.spec, want)
    rng = np.random.RandomState(1)
    tokens = jnp.asarray(rng.randint(3, cfg.vocab_size, (8, 16)))
    mask = jnp.ones((8, 16), jnp.int32)
    ref = jit_forward(params, cfg, tokens, mask)
    with jax.set_mesh(mesh):
        batch_shd = sharding.named_sharding(mesh, ("batch", "seq"), tokens.shape)
        out = jit_forward(sharded, cfg, jax.device_put(tokens, batch_shd),
                          jax.device_put(mask, batch_shd))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_replication_warns_with_parameter_and_sizes_and_strict_raises(llama_dir, caplog,
                                                                       tmp_path, capsys):
    """4 heads / 2 kv heads on tensor=8: a warning names each replicated parameter and its sizes;
    strict mode (argument, context, ``--strict-sharding``) raises naming the first."""
    import json
    import logging

    from jaxarith import cli

    cfg = load_hf_params(llama_dir[0], progress=False)[0]
    mesh = sharding.make_mesh("tensor=8")
    sharding._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="jaxarith.sharding"):
        abstract_params(cfg, mesh=mesh)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "layers/attn/k (2, 64, 2, 16): dimension 2 (kv_heads) of size 2 does not divide " \
           "mesh axes tensor of total size 8; replicated" in text
    assert "layers/attn/q (2, 64, 4, 16): dimension 2 (heads) of size 4" in text
    with pytest.raises(ShardingError, match=r"layers/attn/k: dimension 2 \(kv_heads\) of size 2"):
        abstract_params(cfg, mesh=mesh, strict=True)
    with sharding.strict_sharding(), pytest.raises(ShardingError, match="layers/attn/k"):
        abstract_params(cfg, mesh=mesh)
    assert not sharding.is_strict()
    text_file = tmp_path / "t.txt"
    text_file.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    args = ["eval-loss", llama_dir[0], "--text", str(text_file), "--mesh", "tensor=8", "--json"]
    try:
        assert cli.main(args + ["--strict-sharding"]) == 2
        err = json.loads(capsys.readouterr().out)["error"]
        assert "is not divisible by mesh axes ['tensor']" in err and "layers/attn/" in err
    finally:
        sharding.set_strict_sharding(False)


@pytest.mark.parametrize("spec", ["fsdp=8", "fsdp=4,tensor=2"])
def test_embedding_gradient_stays_in_each_devices_shard(spec):
    """The token lookup's gradient (a scatter-add) goes into each device's [V, D / fsdp] shard of
    the table: no device holds a full float32 [V, D] table (replicating the table before the
    gather made it a full-size scatter plus its all-reduce: 4.2 GB per chip for Llama-3.1-8B)."""
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      tie_word_embeddings=True)
    mesh = sharding.make_mesh(spec)
    params = abstract_params(cfg, mesh=mesh)
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32,
                                  sharding=sharding.named_sharding(mesh, ("batch", "seq"), (8, 16)))

    def loss(p, t):
        return jnp.sum(forward(p, cfg, t, hidden_only=True)[0] ** 2)

    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(loss)).lower(params, tokens).compile().as_text()
    assert "f32[1000,64]" not in hlo  # the full table, in float32, anywhere in the program
    assert "f32[1000,8]" in hlo or "f32[500,16]" in hlo  # the per-device shard it goes to

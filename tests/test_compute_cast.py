"""``layers.to_compute``: a weight's cast to the compute dtype inside a layer equals
``astype`` bit for bit (and in its gradient), and keeps the TPU compiler from hoisting a
bfloat16 copy of every layer's weights out of the layer loop (docs/scale.md)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxarith.models.layers import to_compute
from jaxarith.planning import slices


def test_equals_astype_bit_for_bit_on_hard_values():
    rng = np.random.default_rng(0)
    f = np.finfo(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, f.max, -f.max, f.tiny,
                        f.tiny / 3, -f.tiny / 7, f.smallest_subnormal, 1.0, -1.0], np.float32)
    # exact ties between two bfloat16 values (round half to even), and one ulp either side
    ties = (np.arange(1, 200, dtype=np.uint32) << 16 | 0x8000) + np.uint32(0x3F800000)
    ties = np.concatenate([ties, ties + 1, ties - 1]).view(np.float32)
    x = np.concatenate([special, ties, rng.standard_normal(10_000).astype(np.float32) * 1e3,
                        rng.integers(0, 2**32, 10_000, dtype=np.uint64).astype(np.uint32)
                        .view(np.float32)])
    got = np.asarray(jax.jit(lambda w: to_compute(w, jnp.bfloat16))(x))
    want = np.asarray(jnp.asarray(x).astype(jnp.bfloat16))
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
    assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
    # a float64 reference of round-half-to-even on the ties
    t = ties.view(np.uint32)[:199]
    odd = (t >> 16) & 1  # an exact tie rounds up only from an odd last bit
    assert np.array_equal(got[len(special):len(special) + 199].view(np.uint16),
                          ((t >> 16) + odd).astype(np.uint16))


def test_gradient_equals_astype():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4)), jnp.float32)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 8)), jnp.bfloat16)

    def loss(cast, w):
        return jnp.sum((x @ cast(w)).astype(jnp.float32) ** 2)

    g1 = jax.grad(lambda w: loss(lambda v: to_compute(v, jnp.bfloat16), w))(w)
    g2 = jax.grad(lambda w: loss(lambda v: v.astype(jnp.bfloat16), w))(w)
    assert g1.dtype == jnp.float32 and np.array_equal(np.asarray(g1), np.asarray(g2))
    assert to_compute(w, jnp.float32) is w or to_compute(w, jnp.float32).dtype == jnp.float32


def _compile_layer_stack(fn, mesh, L, D, F):

    def body(x, w):
        return (x + jax.nn.relu(x @ fn(w[0])) @ fn(w[1])).astype(jnp.bfloat16), None

    def loss(ws, x):
        b = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        return jnp.sum(jax.lax.scan(b, x.astype(jnp.bfloat16), ws)[0].astype(jnp.float32) ** 2)

    ws = (jax.ShapeDtypeStruct((L, D, F), jnp.float32,
                               sharding=NamedSharding(mesh, P(None, "fsdp", None))),
          jax.ShapeDtypeStruct((L, F, D), jnp.float32,
                               sharding=NamedSharding(mesh, P(None, None, "fsdp"))))
    x = jax.ShapeDtypeStruct((16, 256, D), jnp.float32,
                             sharding=NamedSharding(mesh, P("fsdp", None, None)))
    compiled = jax.jit(jax.grad(loss)).lower(ws, x).compile()
    text = compiled.as_text()
    entry = text[text.index("ENTRY"):]
    stacked = re.search(rf"= bf16\[{L},[0-9,]+\]\S* convert\(", entry) is not None
    return stacked, compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(slices.libtpu_version() is None, reason="needs libtpu (the tpu extra)")
def test_tpu_compiler_keeps_the_cast_in_the_layer_loop():
    """A scanned, rematerialised FSDP stack of layers compiled for v5p-8: with ``astype`` the
    compiler converts the whole [L, ...] stack to bfloat16 before the loop (shown here, so the
    test can fail); with ``to_compute`` no such copy exists and temp memory drops by about the
    copy's bytes per chip."""
    devices = slices.topology_devices(slices.parse_slice("v5p-8"))
    mesh = jax.sharding.Mesh(np.array(devices).reshape(4), ("fsdp",))
    L, D, F = 8, 1024, 4096
    hoisted, temp_astype = _compile_layer_stack(lambda w: w.astype(jnp.bfloat16), mesh, L, D, F)
    kept, temp = _compile_layer_stack(lambda w: to_compute(w, jnp.bfloat16), mesh, L, D, F)
    assert hoisted and not kept
    copy = L * 2 * (D * F // 4) * 2  # every layer's two weights, bfloat16, one chip's shard
    assert temp_astype - temp >= 0.5 * copy, (temp_astype, temp, copy)

"""The fused, chunked cross-entropy (jaxarith.models.fused_ce): its value and both gradients
against a float64 numpy formula, the training loss against the logits path's autodiff on the
three test families (padding and loss weights included), and on an 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxarith import sharding
from jaxarith.io.convert.hf import load_hf_params
from jaxarith.models import transformer
from jaxarith.models.fused_ce import chunk_length, linear_cross_entropy


def _numpy_reference(h, w, targets, weights, vocab_major, softcap=None):
    """sum(weights * nll) and its gradients in float64, written out by hand (logits
    ``c * tanh(z / c)`` with a ``softcap`` c)."""
    h, w = h.astype(np.float64), w.astype(np.float64)
    wm = w.T if vocab_major else w  # [D, V]
    z = np.einsum("btd,dv->btv", h, wm)
    logits = z if softcap is None else softcap * np.tanh(z / softcap)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    loss = np.sum(weights * (lse - picked))
    g = np.exp(logits - lse[..., None])
    g[np.arange(g.shape[0])[:, None], np.arange(g.shape[1])[None, :], targets] -= 1.0
    g *= weights[..., None]
    if softcap is not None:
        g *= 1.0 - np.tanh(z / softcap) ** 2
    dh = np.einsum("btv,dv->btd", g, wm)
    dwm = np.einsum("btd,btv->dv", h, g)
    return loss, dh, (dwm.T if vocab_major else dwm)


@pytest.mark.parametrize("vocab_major,softcap", [(False, None), (True, None), (True, 1.5)])
def test_value_and_gradients_equal_float64_formula(vocab_major, softcap):
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 8, 16, 50
    h = rng.standard_normal((b, t, d)).astype(np.float32)
    w = (0.3 * rng.standard_normal((v, d) if vocab_major else (d, v))).astype(np.float32)
    targets = rng.integers(0, v, (b, t))
    weights = rng.uniform(0, 2, (b, t)).astype(np.float32)
    weights[1, :3] = 0.0  # padding
    ref_loss, ref_dh, ref_dw = _numpy_reference(h, w, targets, weights, vocab_major, softcap)

    def f(h, w):  # chunk 2: four chunks along T
        return linear_cross_entropy(h, w, jnp.asarray(targets), jnp.asarray(weights),
                                    vocab_major=vocab_major, chunk=2, softcap=softcap)

    loss, (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-5, atol=1e-6)
    # a cotangent other than 1 scales both gradients
    _, vjp = jax.vjp(f, jnp.asarray(h), jnp.asarray(w))
    dh3, _ = vjp(jnp.float32(3.0))
    np.testing.assert_allclose(np.asarray(dh3), 3 * ref_dh, rtol=1e-5, atol=3e-6)
    # undifferentiated: the same value
    np.testing.assert_allclose(float(jax.jit(f)(h, w)), ref_loss, rtol=1e-6)


def test_chunk_length_divides_and_bounds():
    assert chunk_length(4, 256, 32000) == 128  # 4 * 128 * 32000 = 16.4M elements
    assert chunk_length(1, 7, 10) == 7
    assert chunk_length(64, 12, 1 << 20) == 1
    assert 96 % chunk_length(8, 96, 5000) == 0
    with pytest.raises(ValueError, match="does not divide"):
        linear_cross_entropy(jnp.zeros((1, 6, 4)), jnp.zeros((4, 5)), jnp.zeros((1, 6), int),
                             jnp.ones((1, 6)), vocab_major=False, chunk=4)


def _batch(cfg, b=4, t=16):
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, t)), jnp.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, :5] = 0  # left padding
    weights = rng.uniform(0, 1, (b, t)).astype(np.float32)
    return tokens, jnp.asarray(mask), jnp.asarray(weights)


def _loss_and_grads(params, cfg, tokens, mask, weights, fused):
    def f(p):
        nll, count = transformer.next_token_loss(p, cfg, tokens, mask, weights=weights,
                                                 fused=fused)
        return nll / count

    return jax.jit(jax.value_and_grad(f))(params)


@pytest.mark.parametrize("fixture", ["llama_dir", "llama_tied_dir", "gpt2_dir"])
def test_fused_loss_equals_logits_path(fixture, request):
    """Value and every parameter's gradient: the hand-written fused backward against jax's
    autodiff through the full logits (the path whose forward matches transformers)."""
    directory, _ = request.getfixturevalue(fixture)
    cfg, params = load_hf_params(directory, progress=False)
    tokens, mask, weights = _batch(cfg)
    loss_f, g_f = _loss_and_grads(params, cfg, tokens, mask, weights, fused=True)
    loss_u, g_u = _loss_and_grads(params, cfg, tokens, mask, weights, fused=False)
    np.testing.assert_allclose(float(loss_f), float(loss_u), rtol=1e-6)
    # tolerance relative to the largest gradient of the leaf, floored at 1e-3 of the largest
    # anywhere: some gradients are zero up to rounding (a key bias shifts every score alike)
    top = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g_u))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_f), jax.tree.leaves(g_u),
                            strict=True):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-3 * top)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_fused_loss_on_eight_devices_equals_one(llama_dir):
    directory, _ = llama_dir
    cfg, params = load_hf_params(directory, progress=False)
    tokens, mask, weights = _batch(cfg, b=8)
    ref_loss, ref_g = _loss_and_grads(params, cfg, tokens, mask, weights, fused=True)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    _, sharded = load_hf_params(directory, mesh=mesh, progress=False)
    shd = sharding.named_sharding(mesh, ("batch", "seq"), tokens.shape)
    with jax.set_mesh(mesh):
        loss, g = _loss_and_grads(sharded, cfg, *(jax.device_put(x, shd)
                                                  for x in (tokens, mask, weights)), fused=True)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(ref_g),
                            strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("vocab_major", [False, True])
def test_on_an_fsdp_mesh_the_head_is_never_held_whole(vocab_major):
    """On 8 fsdp devices the head is used sharded over its vocabulary: no device holds the whole
    [D, V] weight or a whole [D, V] weight gradient (the FSDP all-gather of the head and a
    per-chunk all-reduce of its gradient, 1 GB each per chip for Llama-3.1-8B); the gradients
    still equal the float64 formula."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    b, t, d, v = 8, 16, 32, 1000
    rng = np.random.default_rng(0)
    h = rng.standard_normal((b, t, d)).astype(np.float32)
    w = (rng.standard_normal((v, d) if vocab_major else (d, v)) * 0.1).astype(np.float32)
    tg = rng.integers(0, v, (b, t)).astype(np.int32)
    wt = np.ones((b, t), np.float32)
    mesh = sharding.make_mesh("fsdp=8")
    w_spec = P(None, "fsdp") if vocab_major else P("fsdp", None)  # FSDP shards the embed dim
    args = (jax.device_put(h, NamedSharding(mesh, P("fsdp"))),
            jax.device_put(w, NamedSharding(mesh, w_spec)),
            jax.device_put(tg, NamedSharding(mesh, P("fsdp"))),
            jax.device_put(wt, NamedSharding(mesh, P("fsdp"))))

    def loss(h, w, tg, wt):
        return linear_cross_entropy(h, w, tg, wt, vocab_major=vocab_major, chunk=4)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    with jax.set_mesh(mesh):
        hlo = fn.lower(*args).compile().as_text()
        val, (dh, dw) = fn(*args)
    whole = f"[{v},{d}]" if vocab_major else f"[{d},{v}]"
    assert f"f32{whole}" not in hlo and f"bf16{whole}" not in hlo
    ref, ref_dh, ref_dw = _numpy_reference(h, w, tg, wt, vocab_major)
    np.testing.assert_allclose(float(val), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=0, atol=1e-5)

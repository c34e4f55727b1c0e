"""HF <-> Orbax conversion: bit-exact round trips, restore on other meshes, atomic failures."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import transformers

from jaxarith import sharding, testing
from jaxarith.errors import CheckpointError, JaxarithError, UnsupportedArchitectureError
from jaxarith.io.atomic import OutputExistsError
from jaxarith.io.convert import HFCheckpoint, load_hf_params
from jaxarith.io.convert.orbax import hf_to_orbax, load_orbax
from jaxarith.io.convert.route import convert
from jaxarith.models import abstract_params, load_config

FIXTURES = ["llama_dir", "llama_tied_dir", "gpt2_dir"]


def _tensors(directory):
    ckpt = HFCheckpoint(directory)
    return {k: ckpt.get(k) for k in ckpt.keys()}


def _siblings(path):
    parent, name = os.path.split(str(path))
    return [p for p in os.listdir(parent) if p.startswith(f".{name}") or p == name]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_round_trip_hf_orbax_hf_is_bit_exact(fixture, request, tmp_path):
    src, hf_model = request.getfixturevalue(fixture)
    convert(src, tmp_path / "orbax", progress=False)
    info = convert(str(tmp_path / "orbax"), tmp_path / "hf", max_shard_size="150KB",
                   progress=False)
    assert info["route"] == "orbax->hf" and len(info["files"]) > 1
    before, after = _tensors(src), _tensors(str(tmp_path / "hf"))
    assert set(after) == set(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]), k
    assert load_config(str(tmp_path / "hf")) == load_config(src)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = np.random.RandomState(0).randint(3, testing.TINY_VOCAB, (2, 9))
    np.testing.assert_array_equal(testing.hf_logits(model.eval(), tokens),
                                  testing.hf_logits(hf_model, tokens))
    assert os.path.exists(tmp_path / "hf" / "tokenizer.json")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")


def test_orbax_restores_on_other_meshes_and_one_device(llama_dir, tmp_path):
    src, _ = llama_dir
    dst = tmp_path / "orbax"
    hf_to_orbax(src, dst, mesh=sharding.make_mesh("fsdp=8"), progress=False)
    _, ref = load_hf_params(src, progress=False)
    for spec in ["data=2,tensor=4", "tensor=8", None]:
        mesh = sharding.make_mesh(spec) if spec else None
        cfg, params = load_orbax(dst, mesh=mesh)
        want = abstract_params(cfg, mesh=mesh) if mesh is not None else None
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            if mesh is None:
                assert len(a.sharding.device_set) == 1
            else:
                w = want
                for k in path:
                    w = w[k.key]
                assert a.sharding.is_equivalent_to(w.sharding, a.ndim), path


@pytest.mark.slow  # moved out of `make test` (its ~10 min budget); CI runs it (make test-slow)
def test_eval_loss_on_orbax_equals_hf(llama_dir, tmp_path):
    src, _ = llama_dir
    dst = tmp_path / "orbax"
    hf_to_orbax(src, dst, mesh=sharding.make_mesh("fsdp=8"), progress=False)
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 4)

    def loss(ref, *extra):
        out = subprocess.run([sys.executable, "-m", "jaxarith", "eval-loss", ref, "--text",
                              str(text), "--json", *extra], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout)

    a, b = loss(src), loss(str(dst), "--mesh", "data=2,tensor=4")
    assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < 1e-5


def test_bfloat16_conversion_equals_a_cast(gpt2_dir, tmp_path):
    src, _ = gpt2_dir
    convert(src, tmp_path / "o16", dtype="bfloat16", progress=False)
    _, p16 = load_orbax(tmp_path / "o16")
    _, p32 = load_hf_params(src, progress=False)
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32), strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(ml_dtypes.bfloat16))
    convert(str(tmp_path / "o16"), tmp_path / "h16", progress=False)
    t = _tensors(str(tmp_path / "h16"))
    assert {v.dtype for v in t.values()} == {np.dtype(ml_dtypes.bfloat16)}
    # float32 restore of a bfloat16 checkpoint: exact widening
    _, p = load_orbax(tmp_path / "o16", dtype="float32")
    assert p["embed"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(p["embed"]), np.asarray(p16["embed"], np.float32))


def test_truncated_safetensors_leaves_no_output(gpt2_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(gpt2_dir[0], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        convert(str(bad), tmp_path / "out", progress=False)
    assert _siblings(tmp_path / "out") == []


def test_missing_shard_leaves_no_output(llama_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir[0], bad)
    os.remove(bad / sorted(p for p in os.listdir(bad) if p.endswith(".safetensors"))[0])
    with pytest.raises(CheckpointError, match="do not exist"):
        convert(str(bad), tmp_path / "out", progress=False)
    assert _siblings(tmp_path / "out") == []


def test_unsupported_architecture(gpt2_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(gpt2_dir[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "t5"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="'t5'"):
        convert(str(bad), tmp_path / "out", progress=False)
    assert _siblings(tmp_path / "out") == []


def test_existing_destination_is_refused_then_overwritten(gpt2_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert(gpt2_dir[0], dst, progress=False)
    assert (dst / "keep.txt").read_text() == "precious"
    # --overwrite replaces only what jaxarith wrote (issue 16): a user's directory is kept
    with pytest.raises(OutputExistsError, match="not written by jaxarith"):
        convert(gpt2_dir[0], dst, overwrite=True, progress=False)
    assert (dst / "keep.txt").read_text() == "precious"
    (dst / "keep.txt").unlink()
    convert(gpt2_dir[0], dst, progress=False, to="hf", overwrite=True)  # empty: replaced
    convert(gpt2_dir[0], dst, overwrite=True, progress=False)  # a jaxarith output: replaced
    assert (dst / "jaxarith.json").exists() and not (dst / "model.safetensors").exists()


def test_read_only_destination(gpt2_dir, tmp_path, monkeypatch):
    """Root bypasses permission bits, so the unwritable parent is simulated via os.access."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(ro) else real(p, m))
    with pytest.raises(JaxarithError, match=f"cannot write to {ro}: permission denied"):
        convert(gpt2_dir[0], ro / "out", progress=False)
    assert os.listdir(ro) == []


@pytest.mark.parametrize("kind", ["hf", "orbax"])
def test_inspect(kind, llama_dir, tmp_path):
    ref = llama_dir[0]
    if kind == "orbax":
        hf_to_orbax(ref, tmp_path / "o", mesh=sharding.make_mesh("fsdp=8"), progress=False)
        ref = str(tmp_path / "o")
    out = subprocess.run([sys.executable, "-m", "jaxarith", "inspect", ref, "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    # transformers' own count of the model's parameters, and the elements stored in the files
    n_hf = sum(p.numel() for p in llama_dir[1].parameters())
    assert info["num_params"] == n_hf == info["stored_elements"]
    assert info["architecture"] == "llama" and info["dtype"] == "float32"
    names = {t["name"] for t in info["tensors"]}
    if kind == "orbax":
        assert "layers/attn/q" in names
        q = next(t for t in info["tensors"] if t["name"] == "layers/attn/q")
        assert q["sharding"] == {"mesh": {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1},
                                 "spec": [None, "fsdp", None, None]}
    else:
        assert "model.layers.1.self_attn.q_proj.weight" in names


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_tiled_copy_equals_numpy(dtype):
    from jaxarith.io.convert.fastcopy import contiguous, copy_into

    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 517)).astype(np.float32).astype(dtype)  # not tile multiples
    for view in (w.T, w.T[:, 11:400], w[::2].T, w.reshape(300, 11, 47).transpose(2, 0, 1),
                 w.T.reshape(517, 3, 100)):
        for out_dtype in (dtype, np.float32):
            got = contiguous(view, out_dtype)
            assert got.flags.c_contiguous and got.dtype == np.dtype(out_dtype)
            np.testing.assert_array_equal(got, np.ascontiguousarray(view).astype(out_dtype))
    dst = np.zeros((3, 517, 300), np.float32)
    copy_into(dst[1], w.T, tile=64)
    np.testing.assert_array_equal(dst[1], w.T.astype(np.float32))
    assert not dst[0].any() and not dst[2].any()
    with pytest.raises(ValueError, match="shapes differ"):
        copy_into(dst[0], w)


def test_memory_mapped_view_equals_read(llama_dir, tmp_path):
    """The streamed readers' zero-copy view: the same array as a read, read-only; a file
    truncated after its header was read is named in the error."""
    src, _ = llama_dir
    ckpt = HFCheckpoint(src)
    for k in ckpt.keys():
        v = ckpt.view(k)
        np.testing.assert_array_equal(v.view(np.uint8), ckpt.get(k).view(np.uint8))
        assert v.dtype == ckpt.dtype(k) and not v.flags.writeable
    shutil.copytree(src, tmp_path / "m")
    st = HFCheckpoint(str(tmp_path / "m"))
    path = st.files[next(iter(st.files))].path
    os.truncate(path, 100)
    with pytest.raises(CheckpointError, match="cannot map tensor"):
        for k in st.keys():
            st.view(k)


def test_ahead_keeps_order_and_raises_at_the_failing_item():
    from jaxarith.io.convert.fastcopy import aligned_empty
    from jaxarith.io.convert.pipeline import ahead

    def items():
        yield from range(5)
        raise KeyError("item 5")

    for depth in (0, 1, 3):
        got = []
        with pytest.raises(KeyError, match="item 5"):
            for x in ahead(items(), depth):
                got.append(x)
        assert got == list(range(5))
    a = aligned_empty((3, 5), ml_dtypes.bfloat16)
    assert a.ctypes.data % 64 == 0 and a.shape == (3, 5) and a.dtype == ml_dtypes.bfloat16


def test_in_memory_save_orbax_and_save_hf(llama_tied_dir, tmp_path):
    """The APIs other modules call: sharded in-memory params -> Orbax and -> HF (bfloat16)."""
    from jaxarith.io.convert.export import save_hf
    from jaxarith.io.convert.orbax import read_metadata, save_orbax

    src, _ = llama_tied_dir
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    cfg, params = load_hf_params(src, mesh=mesh, progress=False)
    save_orbax(cfg, params, tmp_path / "o", tokenizer_dir=src, compress=True)
    meta = read_metadata(tmp_path / "o")
    assert meta["compression"] == "zstd" and meta["layer_stacking"] == "stacked"
    assert meta["architecture"] == "llama" and meta["dtype"] == "float32"
    _, back = load_orbax(tmp_path / "o", mesh=sharding.make_mesh("tensor=8"))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    info = save_hf(cfg, params, tmp_path / "h", dtype="bfloat16", tokenizer_dir=src,
                   progress=False)
    assert info["files"] == ["model.safetensors"]
    before, after = _tensors(src), _tensors(str(tmp_path / "h"))
    assert set(after) == set(before) and "lm_head.weight" not in after  # tied: not saved
    for k in before:
        np.testing.assert_array_equal(after[k], before[k].astype(ml_dtypes.bfloat16), err_msg=k)
    gen = json.loads((tmp_path / "h" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == cfg.bos_token_id and gen["eos_token_id"] == cfg.eos_token_id
    bad = dict(params, embed=params["embed"][:10])
    with pytest.raises(CheckpointError, match="embed: shape"):
        save_orbax(cfg, bad, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="missing"):
        save_orbax(cfg, {k: v for k, v in params.items() if k != "final_norm"}, tmp_path / "bad")
    assert _siblings(tmp_path / "bad") == []


def test_damaged_orbax_checkpoint_leaves_no_output(gpt2_dir, tmp_path):
    src = tmp_path / "o"
    convert(gpt2_dir[0], src, progress=False)
    state = next(p for p in (src / "params").iterdir() if p.is_dir())
    data = [p for p in state.rglob("*") if p.is_file() and p.stat().st_size > 50_000]
    assert data
    for p in data:  # the array bytes are gone
        p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot restore embed"):
        convert(str(src), tmp_path / "hf", progress=False)
    assert _siblings(tmp_path / "hf") == []
    (src / "jaxarith.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        convert(str(src), tmp_path / "hf", progress=False)
    assert _siblings(tmp_path / "hf") == []


def test_relative_paths(gpt2_dir, tmp_path, monkeypatch):
    """orbax refuses relative checkpoint paths; the CLI user should never notice."""
    monkeypatch.chdir(tmp_path)
    convert(gpt2_dir[0], "o", progress=False)
    info = convert("o", "h", progress=False)
    assert info["tensors"] == len(_tensors(gpt2_dir[0]))
    assert load_orbax("o")[1]["embed"].shape == (testing.TINY_VOCAB, 64)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_hf_to_hf_streamed_cast_and_reshard(fixture, request, tmp_path):
    src, _ = request.getfixturevalue(fixture)
    info = convert(src, tmp_path / "h", to="hf", dtype="bfloat16", max_shard_size="60KB",
                   progress=False)
    assert info["route"] == "hf->hf" and len(info["files"]) > 2
    before, after = _tensors(src), _tensors(str(tmp_path / "h"))
    assert set(after) == set(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k].astype(ml_dtypes.bfloat16), err_msg=k)
    assert load_config(str(tmp_path / "h")) == load_config(src)
    # Orbax -> Orbax: re-shard and cast through memory
    convert(src, tmp_path / "o", progress=False)
    convert(str(tmp_path / "o"), tmp_path / "o16", to="orbax", dtype="bfloat16",
            mesh=sharding.make_mesh("tensor=8"), progress=False)
    _, p16 = load_orbax(tmp_path / "o16")
    _, p32 = load_orbax(tmp_path / "o")
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(ml_dtypes.bfloat16))


@pytest.fixture(scope="module")
def mixed_dtype_llama(tmp_path_factory):
    """bfloat16 weights with float32 norms (as transformers' keep-in-fp32 modules save them)."""
    from jaxarith.io.convert.safetensors_io import write_safetensors

    d = tmp_path_factory.mktemp("mixed")
    testing.make_hf_model(d / "f32", testing.tiny_llama_config())
    t = _tensors(str(d / "f32"))
    t = {k: v if "norm" in k else v.astype(ml_dtypes.bfloat16) for k, v in t.items()}
    shutil.copytree(d / "f32", d / "mixed", ignore=shutil.ignore_patterns("*.safetensors*"))
    write_safetensors(d / "mixed" / "model.safetensors", [(k, v.shape, v.dtype)
                                                          for k, v in t.items()], t.values())
    return str(d / "mixed"), t


def test_mixed_dtypes_are_kept_per_tensor(mixed_dtype_llama, tmp_path):
    """HF -> HF and HF -> Orbax -> HF keep each tensor's dtype and bits; --dtype casts all."""
    src, want = mixed_dtype_llama
    assert {str(v.dtype) for v in want.values()} == {"bfloat16", "float32"}
    convert(src, tmp_path / "hh", to="hf", max_shard_size="60KB", progress=False)
    convert(src, tmp_path / "o", progress=False)
    convert(str(tmp_path / "o"), tmp_path / "oh", progress=False)
    for out in ("hh", "oh"):
        got = _tensors(str(tmp_path / out))
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype, (out, k)
            assert np.array_equal(got[k].view(np.uint8), want[k].view(np.uint8)), (out, k)
        # config.json names the dtype holding most bytes, as transformers does
        assert json.loads((tmp_path / out / "config.json").read_text())["dtype"] == "bfloat16"
    convert(src, tmp_path / "h32", to="hf", dtype="float32", progress=False)
    got = _tensors(str(tmp_path / "h32"))
    for k in want:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], want[k].astype(np.float32), err_msg=k)

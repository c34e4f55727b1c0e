"""Config round trips and the clear errors on bad checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxarith import testing
from jaxarith.errors import (
    CheckpointError,
    ConfigError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
)
from jaxarith.io.convert import load_hf_params
from jaxarith.io.convert.safetensors_io import SafetensorsFile, write_safetensors
from jaxarith.models import GPT2Config, LlamaConfig, config_from_hf, load_config


@pytest.mark.parametrize("fixture", ["llama_dir", "llama_tied_dir", "gpt2_dir"])
def test_config_round_trip_is_lossless(fixture, request):
    directory, _ = request.getfixturevalue(fixture)
    with open(os.path.join(directory, "config.json")) as f:
        raw = json.load(f)
    cfg = load_config(directory)
    again = config_from_hf(cfg.to_hf())
    assert again == cfg
    # transformers reads what we write and sees the same model.
    import transformers

    hf_a = transformers.AutoConfig.for_model(**raw)
    hf_b = transformers.AutoConfig.for_model(**cfg.to_hf())
    for key in ("vocab_size", "num_hidden_layers", "tie_word_embeddings", "rope_parameters",
                "num_key_value_heads", "head_dim", "n_embd", "scale_attn_by_inverse_layer_idx"):
        assert getattr(hf_a, key, None) == getattr(hf_b, key, None), key


def test_legacy_and_v5_rope_forms_agree():
    legacy = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                  num_hidden_layers=1, num_attention_heads=2, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
    v5 = dict(legacy)
    del v5["rope_theta"], v5["rope_scaling"]
    v5["rope_parameters"] = dict(legacy["rope_scaling"], rope_theta=500000.0)
    a, b = config_from_hf(legacy), config_from_hf(v5)
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling.factor == 8.0
    assert a.head_dim == 4 and a.num_key_value_heads == 2


def test_unknown_model_type():
    with pytest.raises(UnsupportedArchitectureError, match="model_type='bert' is not supported"):
        config_from_hf({"model_type": "bert"})


@pytest.mark.parametrize("field, value, message", [
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads=3"),
    ("hidden_size", 0, "hidden_size=0 must be a positive integer"),
])
def test_bad_llama_config(field, value, message):
    kw = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, head_dim=2)
    kw[field] = value
    with pytest.raises(ConfigError, match=message):
        LlamaConfig(**kw)


def test_gpt2_unsupported_activation():
    with pytest.raises(ConfigError, match="activation_function='relu'"):
        GPT2Config.from_hf({"model_type": "gpt2", "vocab_size": 8, "n_embd": 8, "n_layer": 1,
                            "n_head": 2, "activation_function": "relu"})


def _rewrite(src: str, dst, edit):
    """Copy an HF dir whose single safetensors file is rewritten by ``edit(dict) -> dict``."""
    shutil.copytree(src, dst)
    st = SafetensorsFile(os.path.join(src, "model.safetensors"))
    tensors = edit({k: st.get(k) for k in st.keys()})
    os.remove(os.path.join(dst, "model.safetensors"))
    specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_safetensors(os.path.join(dst, "model.safetensors"), specs, tensors.values())
    return str(dst)


def test_missing_tensor_is_named(gpt2_dir, tmp_path):
    key = "transformer.h.1.mlp.c_fc.weight"
    d = _rewrite(gpt2_dir[0], tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(MissingTensorError, match=r"1 tensor\(s\) missing.*h\.1\.mlp\.c_fc\.weight"):
        load_hf_params(d, progress=False)


def test_unexpected_tensor_is_named(gpt2_dir, tmp_path):
    d = _rewrite(gpt2_dir[0], tmp_path / "m",
                 lambda t: {**t, "transformer.h.0.attn.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(UnexpectedTensorError, match=r"transformer\.h\.0\.attn\.extra\.weight"):
        load_hf_params(d, progress=False)


def test_wrong_shape_names_tensor_and_shapes(llama_tied_dir, tmp_path):
    key = "model.layers.0.mlp.up_proj.weight"
    d = _rewrite(llama_tied_dir[0], tmp_path / "m", lambda t: {**t, key: t[key][:-1]})
    with pytest.raises(ShapeMismatchError,
                       match=r"model\.layers\.0\.mlp\.up_proj\.weight: expected shape "
                             r"\[128, 64\] from config.json, checkpoint has \[127, 64\]"):
        load_hf_params(d, progress=False)


def test_truncated_safetensors_file(gpt2_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(gpt2_dir[0], d)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        load_hf_params(str(d), progress=False)


def test_missing_shard_listed_in_index(llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(llama_dir[0], d)
    shard = sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))[-1]
    os.remove(d / shard)
    with pytest.raises(CheckpointError, match=f"shard files that do not exist.*{shard}"):
        load_hf_params(str(d), progress=False)


def test_cli_reports_errors_cleanly(gpt2_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(gpt2_dir[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    out = subprocess.run([sys.executable, "-m", "jaxarith", "eval-loss", str(d), "--text",
                          str(text), "--json"], capture_output=True, text=True)
    assert out.returncode == 2
    err = json.loads(out.stdout)
    assert "model_type='bert' is not supported" in err["error"]
    out = subprocess.run([sys.executable, "-m", "jaxarith", "eval-loss", str(gpt2_dir[0]),
                          "--text", str(text), "--mesh", "data=3"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "multiplies to 3 devices" in out.stderr


def test_tiny_vocab_matches_bundled_tokenizer():
    assert testing.bundled_tokenizer().vocab_size == testing.TINY_VOCAB

"""LoRA extraction (``jaxarith extract-lora``) against PEFT and mergekit-extract-lora 0.1.5, and
``MODEL+ADAPTER`` references."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxarith import testing
from jaxarith.cli import main
from jaxarith.io.convert.hf import HFCheckpoint

peft = pytest.importorskip("peft", reason="peft (the `test` extra) is not installed")

@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """MODEL+ADAPTER references are merged into a cache: a private one per test."""
    monkeypatch.setenv("JAXARITH_CACHE", str(tmp_path / "cache"))


FAMILIES = {"llama": testing.tiny_llama_config, "qwen2": testing.tiny_qwen2_config}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(base dir, tuned dir, torch base, torch tuned) of one family; qwen2 has q/k/v biases."""
    d = tmp_path_factory.mktemp(f"lora_{request.param}")
    cfg = FAMILIES[request.param]()
    base = testing.make_hf_model(d / "base", cfg, seed=1)
    tuned = testing.make_hf_model(d / "tuned", cfg, seed=2)
    return str(d / "base"), str(d / "tuned"), base, tuned


def _peft_logits(base_dir, adapter_dir, tokens):
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


def _adapter(d):
    from jaxarith.io.convert.safetensors_io import SafetensorsFile

    return SafetensorsFile(d / "adapter_model.safetensors")


TOKENS = np.random.RandomState(0).randint(3, testing.TINY_VOCAB, (2, 12))


def _extract(pair, out, rank, capsys):
    base, tuned, _, _ = pair
    assert main(["extract-lora", tuned, base, str(out), "--rank", str(rank), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_full_rank_adapter_on_the_base_reproduces_the_tuned_model(pair, tmp_path, capsys):
    base, tuned, _, tuned_model = pair
    info = _extract(pair, tmp_path / "a", 1000, capsys)
    assert info["rank"] == 64  # the largest matrix dimension kept: min(out, in)
    want = testing.hf_logits(tuned_model, TOKENS)
    got = _peft_logits(base, str(tmp_path / "a"), TOKENS)
    assert np.abs(got - want).max() < 1e-4


def test_low_rank_adapter_is_the_truncated_svd(pair, tmp_path, capsys):
    """rank 4: B @ A equals a float64 numpy truncated SVD of the task vector, and PEFT's model
    equals jaxarith's BASE+ADAPTER reference."""
    base, tuned, _, _ = pair
    info = _extract(pair, tmp_path / "a", 4, capsys)
    assert info["rank"] == 4
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert cfg["r"] == cfg["lora_alpha"] == 4 and "q_proj" in cfg["target_modules"]
    assert {"embed_tokens", "lm_head", "norm", "input_layernorm"} <= set(cfg["modules_to_save"])
    ad, cb, ct = _adapter(tmp_path / "a"), HFCheckpoint(base), HFCheckpoint(tuned)
    name = "model.layers.1.mlp.down_proj"
    a = ad.get(f"base_model.model.{name}.lora_A.weight").astype(np.float64)
    b = ad.get(f"base_model.model.{name}.lora_B.weight").astype(np.float64)
    delta = ct.get(name + ".weight").astype(np.float64) - cb.get(name + ".weight")
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    np.testing.assert_allclose(b @ a, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
    from jaxarith.io.refs import load_model
    from jaxarith.models import forward

    m = load_model(f"{base}+{tmp_path / 'a'}", progress=False)
    ours = np.asarray(forward(m.params, m.config, jnp.asarray(TOKENS))[0])
    want = _peft_logits(base, str(tmp_path / "a"), TOKENS)
    assert np.abs(ours - want).max() < 1e-4


def test_adapter_equals_mergekit_extract_lora(pair, tmp_path, capsys):
    from mergekit.scripts.extract_lora import main as mk_main

    base, tuned, _, _ = pair
    _extract(pair, tmp_path / "jx", 8, capsys)
    mk_main.main(["--model", tuned, "--base-model", base, "--out-path", str(tmp_path / "mk"),
                  "--max-rank", "8", "--quiet"], standalone_mode=False)
    ours, theirs = _adapter(tmp_path / "jx"), _adapter(tmp_path / "mk")
    assert sorted(ours.keys()) == sorted(theirs.keys())
    cj = json.load(open(tmp_path / "jx" / "adapter_config.json"))
    cm = json.load(open(tmp_path / "mk" / "adapter_config.json"))
    for k in ("r", "lora_alpha", "rank_pattern", "peft_type", "task_type"):
        assert cj[k] == cm[k], k
    assert set(cj["target_modules"]) == set(cm["target_modules"])
    assert set(cj["modules_to_save"]) == set(cm["modules_to_save"])
    for k in ours.keys():
        if ".lora_A." in k:  # SVD factors agree up to a sign per component: compare B @ A
            kb = k.replace(".lora_A.", ".lora_B.")
            np.testing.assert_allclose(ours.get(kb) @ ours.get(k), theirs.get(kb) @ theirs.get(k),
                                       atol=1e-5, err_msg=k)
        elif ".lora_B.weight" not in k:
            np.testing.assert_array_equal(ours.get(k), theirs.get(k), err_msg=k)


def test_model_plus_adapter_references_in_commands(pair, tmp_path, capsys):
    """BASE+ADAPTER is a model for delta (its task vector is B @ A) and eval-loss."""
    base, tuned, _, _ = pair
    _extract(pair, tmp_path / "a", 1000, capsys)
    ref = f"{base}+{tmp_path / 'a'}"
    assert main(["delta", "extract", ref, base, str(tmp_path / "d"), "--json"]) == 0
    capsys.readouterr()
    d, cb, ct = HFCheckpoint(str(tmp_path / "d")), HFCheckpoint(base), HFCheckpoint(tuned)
    for k in d.keys():
        np.testing.assert_allclose(d.get(k), ct.get(k) - cb.get(k), atol=2e-5, err_msg=k)


def test_bad_adapters_and_arguments_are_refused(pair, tmp_path, capsys):
    base, tuned, _, _ = pair
    assert main(["extract-lora", tuned, base, str(tmp_path / "x"), "--rank", "0",
                 "--json"]) == 2
    assert "--rank 0" in json.loads(capsys.readouterr().out)["error"]
    assert not (tmp_path / "x").exists()
    _extract(pair, tmp_path / "a", 2, capsys)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "a", bad)
    cfg = json.load(open(bad / "adapter_config.json"))
    json.dump({**cfg, "use_dora": True}, open(bad / "adapter_config.json", "w"))
    (tmp_path / "t.txt").write_text("hello world, " * 20)
    text = str(tmp_path / "t.txt")
    assert main(["eval-loss", f"{base}+{bad}", "--text", text, "--json"]) == 2
    assert "use_dora" in json.loads(capsys.readouterr().out)["error"]
    # an adapter tensor for a module the model lacks: named, nothing merged
    from jaxarith.io.convert.safetensors_io import SafetensorsFile, write_safetensors

    odd = tmp_path / "odd"
    shutil.copytree(tmp_path / "a", odd)
    st = SafetensorsFile(odd / "adapter_model.safetensors")
    t = {k: st.get(k) for k in st.keys()}
    t["base_model.model.model.layers.7.mlp.up_proj.lora_A.weight"] = t[
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    write_safetensors(odd / "adapter_model.safetensors",
                      [(k, v.shape, v.dtype) for k, v in t.items()], t.values())
    assert main(["eval-loss", f"{base}+{odd}", "--text", text, "--json"]) == 2
    assert "layers.7.mlp.up_proj.lora_A" in json.loads(capsys.readouterr().out)["error"]

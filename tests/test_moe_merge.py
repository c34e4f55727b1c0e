"""``jaxarith moe`` against mergekit-moe 0.1.5's own output on tiny Llama experts (cheap_embed
gates within 1e-5, hidden gates within bfloat16 rounding, every other tensor exact), reading
mergekit's fused-expert layout, the degenerate-gate warning, and clear errors with nothing
written."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml

from jaxarith import cli, testing
from jaxarith.io.convert import load_hf_params
from jaxarith.models import forward

PROMPTS = [
    {"positive_prompts": ["def f(x): return x", "import os"], "negative_prompts": ["the cat"]},
    {"positive_prompts": ["Once upon a time there was a"]},
    {"positive_prompts": ["1 + 2 = 3", "x * y"]},
]


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_merge")
    dirs = []
    for s in range(3):
        dirs.append(str(d / f"m{s}"))
        testing.make_hf_model(dirs[-1], testing.tiny_llama_config(), seed=30 + s, noise=0.1)
    return dirs


def _yaml(tmp_path, llamas, mode, **top):
    cfg = {"base_model": llamas[0], "gate_mode": mode, "experts_per_token": 2,
           "experts": [{"source_model": llamas[(j + 1) % 3], **PROMPTS[j]} for j in range(3)],
           **top}
    path = tmp_path / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def _mergekit(cfg, out):
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    build(MoEMergeConfig.model_validate(cfg), str(out), MergeOptions(device="cpu"), device="cpu")
    return transformers.AutoModelForCausalLM.from_pretrained(str(out)).state_dict()


def _ours(capsys, path, out, *extra):
    code = cli.main(["moe", str(path), str(out), "--json", *extra])
    res = json.loads(capsys.readouterr().out)
    assert code == 0, res
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "MixtralForCausalLM"
    return res, model.state_dict()


@pytest.mark.parametrize("mode,gate_atol", [
    ("cheap_embed", 1e-5),
    # mergekit runs the base in bfloat16 and averages in bfloat16: unit gate vectors then agree
    # to bfloat16's resolution (2^-8 relative) and no further
    ("hidden", 2.0**-8),
])
def test_equals_mergekit_moe(llamas, tmp_path, capsys, mode, gate_atol):
    path, cfg = _yaml(tmp_path, llamas, mode)
    res, ours = _ours(capsys, path, tmp_path / "ours")
    theirs = _mergekit(cfg, tmp_path / "theirs")
    assert set(ours) == set(theirs)
    assert res["experts"] == 3 and res["gate_mode"] == mode and res["dtype"] == "float32"
    for k in sorted(theirs):
        a, b = ours[k].float().numpy(), theirs[k].float().numpy()
        if k.endswith("mlp.gate.weight"):
            np.testing.assert_allclose(a, b, atol=gate_atol, rtol=0, err_msg=k)
            cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
            assert cos.min() > 1 - 1e-4, k
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)
    # jaxarith reads mergekit's fused layout too: the same canonical tree, the same logits
    cfg_t, theirs_params = load_hf_params(str(tmp_path / "theirs"), progress=False)
    cfg_o, ours_params = load_hf_params(str(tmp_path / "ours"), progress=False)
    assert cfg_t.hf_fused_experts and not cfg_o.hf_fused_experts and cfg_t == cfg_o
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours_params)[0],
                            jax.tree.leaves(theirs_params), strict=True):
        if "router" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = np.random.RandomState(1).randint(3, testing.TINY_VOCAB, (2, 9))
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "theirs"))
    np.testing.assert_allclose(
        np.asarray(forward(theirs_params, cfg_t, jnp.asarray(tokens))[0]),
        testing.hf_logits(theirs_model.eval(), tokens), atol=1e-4, rtol=0)
    gates = np.stack([ours[f"model.layers.{i}.mlp.gate.weight"].numpy() for i in range(2)])
    if mode == "hidden":  # a gate per layer, from that layer's input
        assert not np.allclose(gates[0], gates[1], atol=1e-2)
    # routing really differs between tokens with these gates
    tokens = np.random.RandomState(0).randint(3, testing.TINY_VOCAB, (2, 9))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), output_router_logits=True)
    assert len({tuple(r) for r in torch.topk(out.router_logits[0], 2).indices.tolist()}) > 1


def test_degenerate_gates_warn_like_mergekit(llamas, tmp_path, capsys):
    cfg = {"base_model": llamas[0], "gate_mode": "cheap_embed", "experts_per_token": 1,
           "experts": [{"source_model": llamas[1], "positive_prompts": ["abc abc abc"]},
                       {"source_model": llamas[2], "positive_prompts": ["abc abc abc abc"]}]}
    path = tmp_path / "degenerate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res, _ = _ours(capsys, path, tmp_path / "out")
    assert res["degenerate_layers"] == [0, 1]
    assert "degenerate routing parameters" in res["warnings"][0]


def test_bad_configs_are_refused_before_work(llamas, tmp_path, capsys):
    odd = str(tmp_path / "wide")
    testing.make_hf_model(odd, testing.tiny_llama_config(intermediate_size=96), seed=5)
    _, base = _yaml(tmp_path, llamas, "cheap_embed")
    cases = [
        ({"experts_per_token": 4}, "experts_per_token=4 must be between 1 and the number of "
                                   "experts (3)"),
        ({"gate_mode": "smart"}, "unknown gate_mode 'smart'"),
        ({"shared_experts": [{"source_model": llamas[0]}]}, "shared_experts are not supported"),
        ({"architecture": "qwen"}, "architecture='qwen' is not supported"),
        ({"experts": [dict(base["experts"][0]), {"source_model": odd, **PROMPTS[1]}]},
         "intermediate_size=96 differs from the base model's 128"),
        ({"experts": [{"source_model": llamas[1]}, {"source_model": llamas[2]}]},
         "experts[0] has no positive_prompts"),
        ({"experts": [{"source_model": llamas[1], **PROMPTS[0]},
                      {"source_model": llamas[1], **PROMPTS[1]}]},
         "every expert is the same model"),
        ({"gate_modes": "hidden"}, "unknown key 'gate_modes'"),
    ]
    for change, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, **change}))
        out = tmp_path / "never"
        code = cli.main(["moe", str(path), str(out), "--json"])
        res = json.loads(capsys.readouterr().out)
        assert code == 2 and message in res["error"], (message, res)
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if "never" in p]

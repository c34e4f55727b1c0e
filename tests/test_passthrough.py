"""Layer stacking (``merge_method: passthrough`` with ``slices``, frankenmerges) against
mergekit 0.1.5's own output, tensor by tensor, and its refusals."""

import json

import numpy as np
import pytest
import yaml

from jaxarith import testing
from jaxarith.cli import main
from jaxarith.io.convert.hf import HFCheckpoint

mergekit = pytest.importorskip("mergekit", reason="mergekit==0.1.5 (the `test` extra) is not "
                                                  "installed: no parity check against it")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two 4-layer Llamas of one architecture (untied; GQA), float32 and bfloat16."""
    d = tmp_path_factory.mktemp("stack")
    cfg = testing.tiny_llama_config(num_hidden_layers=4)
    testing.make_hf_model(d / "A", cfg, seed=1)
    testing.make_hf_model(d / "B", cfg, seed=2, dtype="bfloat16")
    return {"A": str(d / "A"), "B": str(d / "B")}


CONFIGS = {
    "two_models": """
merge_method: passthrough
slices:
  - sources:
      - model: {A}
        layer_range: [0, 3]
  - sources:
      - model: {B}
        layer_range: [1, 4]
""",
    "scaled_bf16": """
merge_method: passthrough
slices:
  - sources:
      - model: {A}
        layer_range: [0, 2]
  - sources:
      - model: {A}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - filter: down_proj
              value: [0.0, 1.0]
            - value: 1.0
  - sources:
      - model: {B}
        layer_range: [3, 4]
dtype: bfloat16
""",
}


def _tensors(directory):
    ck = HFCheckpoint(directory)
    return {k: ck.get(k) for k in ck.keys()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_passthrough_slices_equal_mergekits(two, tmp_path, name, capsys):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    text = CONFIGS[name].format(**two)
    (tmp_path / "m.yaml").write_text(text)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"),
              options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "jx"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    want, got = _tensors(str(tmp_path / "mk")), _tensors(str(tmp_path / "jx"))
    layers = sum(b - a for a, b in [s["sources"][0]["layer_range"]
                                    for s in yaml.safe_load(text)["slices"]])
    assert res["method"] == "passthrough" and res["layers"] == layers
    assert json.load(open(tmp_path / "jx" / "config.json"))["num_hidden_layers"] == layers
    assert json.load(open(tmp_path / "mk" / "config.json"))["num_hidden_layers"] == layers
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k].view(np.uint8), want[k].view(np.uint8), err_msg=k)


def test_stacked_model_runs_like_transformers(two, tmp_path, capsys):
    """The 6-layer output loads in transformers and in jaxarith with equal log-probs."""
    import jax
    import jax.numpy as jnp
    import transformers

    from jaxarith.io.convert import load_hf_params
    from jaxarith.models import forward

    (tmp_path / "m.yaml").write_text(CONFIGS["two_models"].format(**two))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "jx"), "--json"]) == 0
    capsys.readouterr()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "jx"),
                                                           dtype="float32").eval()
    cfg, params = load_hf_params(str(tmp_path / "jx"), progress=False)
    tokens = np.random.RandomState(0).randint(3, testing.TINY_VOCAB, (2, 10))
    ref = jax.nn.log_softmax(testing.hf_logits(hf, tokens), -1)
    ours = jax.nn.log_softmax(forward(params, cfg, jnp.asarray(tokens))[0], -1)
    assert cfg.num_hidden_layers == 6
    assert np.abs(np.asarray(ours) - np.asarray(ref)).max() < 1e-4


@pytest.mark.parametrize("body,match", [
    ("slices:\n  - sources:\n      - model: {A}\n        layer_range: [0, 5]\n",
     "slices[0]: layer_range [0, 5] is beyond the 4 layers of"),
    ("slices:\n  - sources:\n      - model: {A}\n        layer_range: [2, 2]\n",
     "slices[0].sources[0]: layer_range [2, 2]: expected [start, end] with 0 <= start < end"),
    ("slices:\n  - sources:\n      - model: {A}\n        layer_range: [0, 2]\n"
     "      - model: {B}\n        layer_range: [0, 2]\n",
     "slices[0]: passthrough takes exactly one source per slice, got 2"),
    ("models:\n  - model: {A}\n", "passthrough: give 'slices'"),
    ("slices:\n  - sources:\n      - model: {A}\n        layer_range: [0, 2]\n"
     "        parameters: {{weight: 1.0}}\n", "passthrough takes only 'scale'"),
    ("slices:\n  - sources:\n      - model: {A}\n        layer_range: [0, 2]\n"
     "        parameters: {{scale: abc}}\n", "slices[0].sources[0].parameters.scale"),
])
def test_bad_passthrough_configs_are_refused_before_writing(two, tmp_path, capsys, body, match):
    (tmp_path / "m.yaml").write_text("merge_method: passthrough\n" + body.format(**two))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "o"), "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert match in err, err
    assert not (tmp_path / "o").exists()


def test_several_slices_with_another_method_name_passthrough(two, tmp_path, capsys):
    text = CONFIGS["two_models"].format(**two).replace("passthrough", "linear")
    (tmp_path / "m.yaml").write_text(text)
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "o"), "--json"]) == 2
    assert "merge_method: passthrough" in json.loads(capsys.readouterr().out)["error"]


def test_passthrough_is_listed(capsys):
    assert main(["merge", "--list-methods", "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)["methods"]]
    assert "passthrough" in names

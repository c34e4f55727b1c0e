"""Merged vocabularies (``tokenizer_source: base | union | <model>``, the ``tokenizer:`` section)
against mergekit 0.1.5's own output: the same tokenizer, and every tensor within 1e-5."""

import json

import numpy as np
import pytest
import yaml

from jaxarith import testing
from jaxarith.cli import main
from jaxarith.data.assets import bundled_tokenizer
from jaxarith.io.convert.hf import HFCheckpoint

mergekit = pytest.importorskip("mergekit", reason="mergekit==0.1.5 (the `test` extra) is not "
                                                  "installed: no parity check against it")

NEW = ["<tool>", "<think>"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """B: the bundled tokenizer (1024 tokens); X, Y: the same plus two added tokens, their
    tables grown to 1026 rows. Float32, tied embeddings in none (lm_head too)."""
    d = tmp_path_factory.mktemp("vocab")
    testing.make_hf_model(d / "B", testing.tiny_llama_config(), seed=1)
    for seed, name in ((2, "X"), (3, "Y")):
        testing.make_hf_model(d / name, testing.tiny_llama_config(vocab_size=1026), seed=seed,
                              with_tokenizer=False)
        tok = bundled_tokenizer()
        tok.add_tokens(NEW)
        tok.save_pretrained(str(d / name))
    return {k: str(d / k) for k in ("B", "X", "Y")}


TA = """merge_method: task_arithmetic
base_model: {B}
models:
  - model: {X}
    parameters: {{weight: 0.7}}
"""
CONFIGS = {
    "union_one_donor": TA + "tokenizer_source: union\n",
    "union_average": TA + "  - model: {Y}\n    parameters: {{weight: 0.4}}\n"
                          "tokenizer_source: union\n",
    "base": TA.replace("task_arithmetic", "ties") .replace("weight: 0.7", "weight: 0.7, "
                                                            "density: 0.5")
    + "tokenizer_source: base\n",
    "model": TA + "tokenizer_source: {X}\n",
    "section": TA + """tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    "<tool>":
      source: {{kind: zero}}
    "<think>":
      source: {{kind: model_token, model: {B}, token_id: 5}}
      force: true
    "<new>":
      source: {X}
      force: false
""",
}


def _run_mergekit(text, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              options=MergeOptions(quiet=True, copy_tokenizer=True, write_model_card=False))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merged_vocabulary_equals_mergekits(models, tmp_path, name, capsys):
    import transformers

    text = CONFIGS[name].format(**models)
    if name == "section":  # mergekit errors on a token no model has and no source: ours too
        text = text.replace('    "<new>":\n      source: {X}\n      force: false\n'
                            .format(**models), "")
    (tmp_path / "m.yaml").write_text(text)
    _run_mergekit(text, tmp_path / "mk")
    for flags in ([], ["--in-memory"]):
        out = tmp_path / f"jx{len(flags)}"
        assert main(["merge", str(tmp_path / "m.yaml"), str(out), "--json", *flags]) == 0
        res = json.loads(capsys.readouterr().out)
        mk_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "mk"))
        jx_tok = transformers.AutoTokenizer.from_pretrained(str(out))
        assert jx_tok.get_vocab() == mk_tok.get_vocab()
        want_cfg = json.load(open(tmp_path / "mk" / "config.json"))
        got_cfg = json.load(open(out / "config.json"))
        assert got_cfg["vocab_size"] == want_cfg["vocab_size"] == res["vocab_size"]
        ours, theirs = HFCheckpoint(str(out)), HFCheckpoint(str(tmp_path / "mk"))
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for k in theirs.keys():
            np.testing.assert_allclose(ours.get(k), theirs.get(k), atol=1e-5, rtol=0,
                                       err_msg=f"{name} {flags}: {k}")
    # the fixture is what it says: the new rows differ between the models
    if name == "union_average":
        emb = [HFCheckpoint(models[m]).get("model.embed_tokens.weight") for m in "XY"]
        assert not np.allclose(emb[0][1024:], emb[1][1024:])


def test_a_token_override_naming_a_model_without_it_is_refused(models, tmp_path, capsys):
    text = CONFIGS["section"].format(**models)
    (tmp_path / "m.yaml").write_text(text)
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "o"), "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert "tokenizer.tokens['<new>'].source" in err and "has no token '<new>'" in err
    assert not (tmp_path / "o").exists()

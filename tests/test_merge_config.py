"""Merge YAML keys that jaxarith does not implement are refused by name; chat_template's forms;
``jaxarith merge --list-methods``."""

import json

import pytest

from jaxarith import testing
from jaxarith.arith.chat_templates import TEMPLATES
from jaxarith.arith.mergeconfig import parse_merge_config
from jaxarith.cli import main
from jaxarith.errors import ConfigError

BASE = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}


@pytest.mark.parametrize("extra,match", [
    ({"tokenizer": {"source": "union", "extra": 1}}, r"^tokenizer: expected \{source, tokens"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "nope"}}}}},
     r"^tokenizer.tokens\['<x>'\].source: expected a model"),
    ({"tokenizer": {"tokens": {"<x>": {"source": "c"}}}},
     r"^tokenizer.tokens\['<x>'\].source: 'c' is not one of the merged models"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, r"^tokenizer.pad_to_multiple_of: expected"),
    ({"tokenizer": {}, "tokenizer_source": "base"}, r"^give either 'tokenizer' or"),
    ({"tokenizer_source": "c"}, r"^tokenizer source: 'c' is not one of the merged models"),
    ({"tokenizer_source": 3}, r"^tokenizer_source: expected"),
    ({"chat_template": "vicuna"}, r"^chat_template 'vicuna': not 'auto', a built-in template "
                                  r"\(alpaca, chatml, exaone, llama3, mistral\)"),
    ({"chat_template": "{{ x }}"}, r"^chat_template '\{\{ x \}\}': not"),  # < 20 characters
    ({"chat_template": "a long string without any braces"}, r"^chat_template 'a long"),
    ({"chat_template": 1}, r"^chat_template: expected"),
    ({"chat_template": ""}, r"^chat_template: expected"),
])
def test_unsupported_or_bad_tokenizer_keys_are_refused(extra, match):
    with pytest.raises(ConfigError, match=match):
        parse_merge_config({**BASE, **extra})


def test_chat_template_forms():
    parse = lambda v: parse_merge_config({**BASE, "chat_template": v}).chat_template
    assert parse_merge_config(BASE).chat_template is None
    assert parse("auto") == "auto"
    for name in ("alpaca", "chatml", "exaone", "llama3", "mistral"):
        assert parse(name) == TEMPLATES[name]
    literal = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert parse(literal) == literal
    assert parse_merge_config({**BASE, "tokenizer_source": "b"}).vocab.source == "b"


def test_chat_template_without_a_tokenizer_fails_before_writing(tmp_path, capsys):
    testing.make_hf_model(tmp_path / "m", testing.tiny_llama_config(), with_tokenizer=False)
    (tmp_path / "c.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path}/m\n"
                                     "chat_template: chatml\n")
    assert main(["merge", str(tmp_path / "c.yaml"), str(tmp_path / "out"), "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert err.startswith("chat_template: the tokenizer source") and f"{tmp_path}/m" in err
    assert not (tmp_path / "out").exists()


def test_list_methods(capsys):
    from jaxarith.arith.methods import MERGE_METHODS

    assert main(["merge", "--list-methods", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # one JSON object
    methods = {m["name"]: m for m in out["methods"]}
    assert list(methods) == [str(k) for k in MERGE_METHODS] + ["passthrough"]  # + stacking
    assert {"linear", "ties", "dare_ties", "slerp", "breadcrumbs", "della", "model_stock",
            "nearswap", "sce", "nuslerp", "multislerp", "arcee_fusion"} <= set(methods)
    assert methods["ties"]["parameters"] == {"lambda": 1.0}
    assert methods["ties"]["model_parameters"] == {"weight": 1.0, "density": 1.0}
    assert methods["ties"]["options"] == {"normalize": True, "rescale": False, "consensus": "sum"}
    assert methods["dare_ties"]["options"]["normalize"] is False  # mergekit 0.1.5's default
    assert methods["breadcrumbs"]["model_parameters"]["gamma"] == 0.01
    assert methods["nearswap"]["parameters"] == {"t": None}  # required
    assert methods["nuslerp"]["base_model"] == "optional"
    assert methods["nuslerp"]["models"] == {"min": 2, "max": 2}
    assert methods["model_stock"]["models"] == {"min": 2, "max": None}
    # every listed method is accepted by a merge config, with its options
    for name, m in methods.items():
        if name == "passthrough":  # slices, not models: tests/test_passthrough.py
            continue
        data = {"merge_method": name, "base_model": "b", "parameters": dict(m["options"]),
                "models": [{"model": "b"}] + [
                    {"model": f"m{i}", "parameters": {"weight": 1.0}}
                    for i in range(max(m["models"]["min"], 1))]}
        if "t" in m["parameters"]:
            data["parameters"]["t"] = 0.5
        assert parse_merge_config(data).spec.method.kind == name
    assert main(["merge", "--list-methods"]) == 0
    text = capsys.readouterr().out
    assert "ties: task vectors trimmed" in text and "per model: weight=1.0, density=1.0" in text
    assert "nearswap" in text and "parameters: t=(required)" in text


def test_merge_without_config_is_an_error(capsys):
    assert main(["merge", "--json"]) == 2
    assert "give CONFIG and OUT" in json.loads(capsys.readouterr().out)["error"]


def test_method_parameters_and_counts_are_checked():
    with pytest.raises(ConfigError, match=r"model_stock: takes at least 2 model\(s\) besides "
                                          r"the base, got 1"):
        parse_merge_config({"merge_method": "model_stock", "base_model": "b",
                            "models": [{"model": "b"}, {"model": "m"}]})
    with pytest.raises(ConfigError, match=r"nuslerp: parameter 'weight' is required for every "
                                          r"model \(missing for model\(s\) \[1\]\)"):
        parse_merge_config({"merge_method": "nuslerp", "models": [
            {"model": "a", "parameters": {"weight": 1.0}}, {"model": "c"}]})
    with pytest.raises(ConfigError, match=r"nearswap: parameter 't' is required"):
        parse_merge_config({"merge_method": "nearswap", "base_model": "b",
                            "models": [{"model": "m"}]})
    with pytest.raises(ConfigError, match=r"ties: unknown parameter 'filter_wise'"):
        parse_merge_config({"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}],
                            "parameters": {"filter_wise": True}})
    with pytest.raises(ConfigError, match=r"model_stock: filter_wise 'yes': expected true"):
        parse_merge_config({"merge_method": "model_stock", "base_model": "b", "models": [
            {"model": "m"}, {"model": "n"}], "parameters": {"filter_wise": "yes"}})


def test_chat_template_reaches_orbax_outputs(tmp_path, capsys):
    """``--to orbax`` (in memory) writes the templated tokenizer beside the params too."""
    import transformers

    testing.make_hf_model(tmp_path / "m", testing.tiny_llama_config())
    (tmp_path / "c.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path}/m\n"
                                     "chat_template: llama3\n")
    assert main(["merge", str(tmp_path / "c.yaml"), str(tmp_path / "out"), "--to", "orbax",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["chat_template"] == TEMPLATES["llama3"]
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == TEMPLATES["llama3"]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == TEMPLATES["llama3"]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "m").chat_template is None

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
    ({"tokenizer": {"source": "union"}}, r"^tokenizer: mergekit's tokenizer section"),
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {"source": "a"}}}}, r"^tokenizer: "),
    ({"tokenizer_source": "union"}, r"^tokenizer_source: union is not supported"),
    ({"tokenizer_source": "c"}, r"^tokenizer_source 'c' is not one of the merged models"),
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
    assert parse_merge_config({**BASE, "tokenizer_source": "b"}).tokenizer_source == 1


def test_chat_template_without_a_tokenizer_fails_before_writing(tmp_path, capsys):
    testing.make_hf_model(tmp_path / "m", testing.tiny_llama_config(), with_tokenizer=False)
    (tmp_path / "c.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path}/m\n"
                                     "chat_template: chatml\n")
    assert main(["merge", str(tmp_path / "c.yaml"), str(tmp_path / "out"), "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert err.startswith("chat_template: the tokenizer source") and f"{tmp_path}/m" in err
    assert not (tmp_path / "out").exists()

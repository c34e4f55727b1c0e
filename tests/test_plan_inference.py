"""``jaxarith plan --program generate|lm-eval``: the programs of ``generate`` (one model, proxy
tuning, EFT, speculative EFT) and of the lm-eval scorer compiled by the TPU compiler for an
abstract v5e slice, from a config.json alone (no weights)."""

from __future__ import annotations

import json

import pytest

from jaxarith import cli
from jaxarith.models import config_from_hf, num_params
from jaxarith.planning import slices

needs_libtpu = pytest.mark.skipif(slices.libtpu_version() is None, reason="needs libtpu (pip "
                                  "install 'jaxarith[tpu]'; CI installs it)")

TINY = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 192,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
BATCH, PROMPT, NEW = 4, 16, 16  # the prompt a multiple of generate's bucket (8): no padding


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _plan(capsys, *args):
    code = cli.main(["plan", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)  # exactly one JSON object


def _params_per_chip(chips: int) -> int:
    """float32 weights sharded over fsdp=chips, except the RMSNorm scales (held whole)."""
    n = num_params(config_from_hf(TINY))
    norms = (2 * TINY["num_hidden_layers"] + 1) * TINY["hidden_size"]
    return (n - norms) * 4 // chips + norms * 4


def _kv_cache_per_chip(cache_len: int, chips: int) -> int:
    """2 (k, v) x layers x batch x kv_heads x cache length x head_dim x bytes / sharding (the
    batch over fsdp)."""
    return (2 * TINY["num_hidden_layers"] * BATCH * TINY["num_key_value_heads"] * cache_len
            * TINY["head_dim"] * 4 // chips)


@needs_libtpu
@pytest.mark.parametrize("program,flags,models,cache_len", [
    ("generate", [], 1, PROMPT + NEW),
    ("proxy", ["--expert", "T", "--anti-expert", "T"], 3, PROMPT + NEW),
    ("eft", ["--eft", "T", "T"], 3, PROMPT + NEW),
    ("speculative", ["--eft", "T", "T", "--speculative", "3"], 3, PROMPT + NEW + 3 + 1),
])
def test_generate_programs_compile_for_a_tpu_slice(capsys, tiny, program, flags, models,
                                                   cache_len):
    flags = [tiny if f == "T" else f for f in flags]
    code, res = _plan(capsys, "--program", "generate", tiny, "--topology", "v5e-4", "--batch",
                      str(BATCH), "--prompt-len", str(PROMPT), "--max-new-tokens", str(NEW),
                      "--mesh", "fsdp=4", *flags)
    assert code == 0 and res["fits"] and res["program"] == program, res
    assert (res["topology"], res["chips"], res["hbm_bytes"]) == ("v5e-4", 4, 16 << 30)
    pc = res["per_chip_bytes"]
    assert list(res["params_per_model"].values()) == [_params_per_chip(4)] * models
    assert pc["params"] == models * _params_per_chip(4)
    assert res["cache_len"] == cache_len
    assert pc["kv_cache"] == models * _kv_cache_per_chip(cache_len, 4)
    assert set(res["programs"]) == {"prefill", "decode"}
    for mem in res["programs"].values():
        assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
        assert mem["argument"] >= pc["params"]  # every member's weights are arguments
    # the decode loop's state (caches included) is donated
    assert res["programs"]["decode"]["alias"] >= pc["kv_cache"]
    assert pc["total"] == max(m["total"] for m in res["programs"].values())
    if program == "speculative":
        assert res["drafter"] == "1:tuned" and res["speculative_k"] == 3


@needs_libtpu
def test_lm_eval_scorer_compiles_for_a_tpu_slice(capsys, tiny):
    code, res = _plan(capsys, "--program", "lm-eval", tiny, "--topology", "v5e-4", "--batch",
                      "6", "--mesh", "fsdp=4")
    assert code == 0 and res["fits"] and res["program"] == "lm-eval"
    # the scorer's largest program: rows rounded up to the data-parallel size, rows of the
    # context length (max_position_embeddings, 256 = scoring.MIN_ROW)
    assert (res["batch"], res["max_length"], res["row_slots"]) == (8, 256, 256)
    pc = res["per_chip_bytes"]
    assert pc["params"] == _params_per_chip(4) and "kv_cache" not in pc
    assert pc["batch"] == 7 * 8 * 256 * 4 // 4  # seven int32 [rows, slots] inputs
    assert set(res["programs"]) == {"score"}


@needs_libtpu
def test_a_model_too_big_for_the_slice_exits_3_in_one_line(capsys, tmp_path):
    """Qwen3-30B-A3B's shapes (a preset: no network, no weights) in float32 on 4 chips of
    16 GiB: about 30.5B parameters x 4 bytes / 4 chips, refused before compiling."""
    code, res = _plan(capsys, "--program", "generate", "Qwen/Qwen3-30B-A3B", "--topology",
                      "v5e-4", "--batch", "8", "--prompt-len", "512")
    assert code == 3 and res["fits"] is False and res["type"] == "DoesNotFitError"
    line = res["error"]
    assert "\n" not in line and "largest: params" in line and "bfloat16" in line, line
    need = float(line.split("needs ")[1].split(" GiB")[0])
    assert 30e9 * 4 / 4 / 2**30 < need < 32e9 * 4 / 4 / 2**30


@pytest.mark.parametrize("args", [
    ["--batch", "4"],  # a generate flag on the train plan
    ["--program", "lm-eval", "--prompt-len", "8"],
    ["--program", "generate", "--max-length", "8"],
    ["--program", "generate", "batch=4"],  # train overrides on a generate plan
    ["--program", "generate", "--speculative", "2"],  # speculative needs --eft
])
def test_flags_of_another_program_are_refused(capsys, tiny, args):
    code, res = _plan(capsys, tiny, "--topology", "v5e-4", *args)
    assert code == 2 and res["error"], res

"""Bad input that used to pass (issue 32): each case fails cleanly with one line, exit 2."""

import json
import os
import re
import shutil
import time

import numpy as np
import pytest

from jaxarith.cli import main
from jaxarith.io.convert.safetensors_io import SafetensorsFile, write_safetensors
from jaxarith.io.finite import allow_nonfinite

DOWN = "model.layers.1.mlp.down_proj.weight"


def _one_line(capsys, code, match) -> str:
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err
    res = json.loads(out)  # --json: exactly one object
    assert set(res) == {"error", "type"}, res
    assert all(m in res["error"] for m in ([match] if isinstance(match, str) else match)), res
    return res["error"]


def _copy_with(src: str, dst, edit) -> str:
    """Copy an HF dir whose single safetensors file is rewritten by ``edit(dict)``."""
    shutil.copytree(src, dst)
    st = SafetensorsFile(os.path.join(src, "model.safetensors"))
    tensors = edit({k: st.get(k) for k in st.keys()})
    os.remove(os.path.join(dst, "model.safetensors"))
    write_safetensors(os.path.join(dst, "model.safetensors"),
                      [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.values())
    return str(dst)


@pytest.fixture(scope="module")
def nan_model(llama_tied_dir, tmp_path_factory):
    """The tiny tied Llama with one NaN and one Inf in layer 1's mlp.down_proj."""
    def edit(t):
        x = t[DOWN].copy()
        x[3, 5] = np.nan
        x[10, 0] = np.inf
        return {**t, DOWN: x}

    with allow_nonfinite():
        return _copy_with(llama_tied_dir[0], tmp_path_factory.mktemp("nan") / "m", edit)


NONFINITE = [DOWN, "2 non-finite value(s)", "first at index [3, 5]", "--allow-nonfinite"]


def _merge_yaml(tmp_path, base, other, **extra) -> str:
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            f"  - model: {other}\n    parameters: {{weight: {extra.get('weight', 1.0)}}}\n")
    text += "".join(f"{k}: {v}\n" for k, v in extra.items() if k != "weight")
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv", [
    ["eval-loss", "{nan}", "--text", "{text}"],
    ["generate", "{nan}", "--prompt", "def", "--max-new-tokens", "2", "--greedy"],
    ["convert", "{nan}", "{out}"],
    ["convert", "{nan}", "{out}", "--to", "hf"],
    ["delta", "extract", "{nan}", "{clean}", "{out}"],
    ["delta", "norms", "{clean}", "{nan}"],
    ["average", "{clean}", "{nan}", "{out}"],
    ["inherit", "{nan}", "{out}", "--layers", "first:2"],
    ["merge", "{yaml}", "{out}"],
], ids=lambda a: " ".join(a[:2]))
def test_nonfinite_weights_are_refused_naming_the_tensor(argv, nan_model, llama_tied_dir,
                                                         tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 4)
    fmt = dict(nan=nan_model, clean=llama_tied_dir[0], out=str(tmp_path / "out"), text=str(text),
               yaml=_merge_yaml(tmp_path, llama_tied_dir[0], nan_model))
    code = main([a.format(**fmt) for a in argv] + ["--json"])
    _one_line(capsys, code, NONFINITE)
    assert not os.path.exists(tmp_path / "out")


def test_allow_nonfinite_reads_them_and_orbax_restores_are_checked(nan_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 4)
    assert main(["eval-loss", nan_model, "--text", str(text), "--json",
                 "--allow-nonfinite"]) == 0
    out, err = capsys.readouterr()
    assert np.isnan(json.loads(out)["loss"])
    assert err.count(f"tensor {DOWN} holds 2 non-finite value(s)") == 1, err
    orbax = str(tmp_path / "o")
    assert main(["convert", nan_model, orbax, "--json", "--allow-nonfinite"]) == 0
    capsys.readouterr()
    code = main(["eval-loss", orbax, "--text", str(text), "--json"])
    err = _one_line(capsys, code, ["layers/mlp/down", "2 non-finite value(s)"])
    assert orbax in err


def test_a_merge_that_overflows_says_where(llama_tied_dir, tmp_path, capsys):
    """Finite inputs, a float16 output that cannot hold the result: refused, nothing written."""
    clean = llama_tied_dir[0]
    other = _copy_with(clean, tmp_path / "other",
                       lambda t: {k: v + np.float32(1e-3) for k, v in t.items()})
    yaml_path = _merge_yaml(tmp_path, clean, other, weight=1e9, out_dtype="float16")
    code = main(["merge", yaml_path, str(tmp_path / "out"), "--json"])
    _one_line(capsys, code, ["the result for tensor", "non-finite value(s)", "overflowed"])
    assert not os.path.exists(tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# ----------------------------------------------------------------- 2. nonsense merge parameters


def _ties(**params) -> dict:
    p = {"weight": 1.0, "density": 0.5, **params}
    return {"merge_method": "ties", "base_model": "./base",
            "models": [{"model": "./a", "parameters": p}, {"model": "./b"}]}


@pytest.mark.parametrize("data,match", [
    (_ties(density=-0.1), "./a: density -0.1 is outside (0, 1]"),
    (_ties(density=1.5), "./a: density 1.5 is outside (0, 1]"),
    (_ties(density=0), "density 0.0 is outside (0, 1]"),
    (_ties(density=[0.5, 1.2]), "density 1.2 is outside"),
    (_ties(density=[{"filter": "mlp", "value": -1}, {"value": 0.5}]), "density -1.0 is outside"),
    (_ties(weight="abc"), "./a: weight: expected a number"),
    (_ties(weight=True), "./a: weight: expected a number"),
    (_ties(weight=float("nan")), "weight: nan is not a finite number"),
    (_ties(weight=[{"filter": "mlp", "value": 1, "valeu": 2}]), "weight: expected a number"),
    ({**_ties(), "parameters": {"normalize": "yes"}}, "normalize: expected true or false"),
    ({**_ties(), "parameters": {"lambda": "x"}}, "lambda: expected a number"),
    ({**_ties(), "seed": "x"}, "seed: expected an integer"),
    ({**_ties(), "parameters": [1, 2]}, "parameters: expected a mapping"),
])
def test_nonsense_merge_parameters_are_refused(data, match):
    from jaxarith.arith.mergeconfig import parse_merge_config
    from jaxarith.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(match)):
        parse_merge_config(data)


@pytest.mark.parametrize("method,weights,extra,match", [
    ("linear", [0, 0], "", "every weight is 0"),
    ("linear", [1, -1], "", "sum to 0 for tensor"),
    ("linear", [[1, 0], [-1, 0]], "parameters: {normalize: false}\n", "every weight is 0 for "
     "tensor model.layers.1"),
    ("ties", [1, -1], "base_model: BASE\n", "sum to 0 for tensor"),
])
def test_merge_weights_that_cannot_be_used_are_refused(method, weights, extra, match,
                                                       llama_tied_dir, tmp_path, capsys):
    clean = llama_tied_dir[0]
    other = str(tmp_path / "other")
    shutil.copytree(clean, other)
    models = "".join(f"  - model: {m}\n    parameters: {{weight: {w}}}\n"
                     for m, w in zip([clean, other], weights, strict=True))
    if method == "ties":  # base, then two task models
        models = "".join(f"  - model: {m}\n    parameters: {{weight: {w}, density: 0.5}}\n"
                         for m, w in zip([other, other + "2"], weights, strict=True))
        shutil.copytree(clean, other + "2")
    path = tmp_path / "m.yaml"
    extra = extra.replace("BASE", clean)
    path.write_text(f"merge_method: {method}\n{extra}models:\n{models}")
    code = main(["merge", str(path), str(tmp_path / "out"), "--json"])
    _one_line(capsys, code, match)
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------- 3. YAML bombs


def _bomb(levels: int = 7) -> str:
    """Nested aliases: ``levels`` lines of ten aliases each stand for 10**levels floats."""
    lines = ["  - &l0 [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]"]
    for i in range(1, levels):
        lines.append(f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_in_a_merge_config_is_one_short_line(llama_tied_dir, tmp_path,
                                                                capsys):
    path = tmp_path / "bomb.yaml"
    # the last alias of the bomb as linear's weight of the first model
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {llama_tied_dir[0]}\n"
                    "    parameters:\n      weight:\n" + _bomb().replace("  - &l", "      - &l")
                    + f"  - model: {llama_tied_dir[0]}\n")
    assert len(path.read_bytes()) < 1000
    t0 = time.perf_counter()
    code = main(["merge", str(path), str(tmp_path / "out"), "--json"])
    seconds = time.perf_counter() - t0
    err = _one_line(capsys, code, ["bomb.yaml", "expands to more than"])
    assert seconds < 1 and len(err) < 400, (seconds, len(err))


@pytest.mark.parametrize("loader", ["train", "experiment", "override"])
def test_a_yaml_alias_bomb_in_train_and_experiment_configs(loader, tmp_path):
    from jaxarith.errors import ConfigError
    from train.config import load_train_config
    from train.experiments.config import read_yaml

    flow = "[" + _bomb().replace("\n  - ", ", ").strip().lstrip("- ").rstrip(",") + "]"
    text = f"out: /tmp/x\nbatch: 2\nsteps: {flow}\n"
    path = tmp_path / "c.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        if loader == "train":
            load_train_config(str(path))
        elif loader == "experiment":
            read_yaml(str(path))
        else:  # the same bomb in flow style, on the command line
            (tmp_path / "ok.yaml").write_text("out: /tmp/x\nbatch: 2\n")
            load_train_config(str(tmp_path / "ok.yaml"), [f"steps={flow}"])
    assert time.perf_counter() - t0 < 1
    assert len(str(e.value)) < 400 and "\n" not in str(e.value), str(e.value)[:1000]


def test_recursive_alias_and_long_values_are_short(tmp_path):
    from jaxarith.configfile import parse_yaml, short
    from jaxarith.errors import ConfigError

    with pytest.raises(ConfigError, match="recursive YAML alias"):
        parse_yaml("a: &a [1, *a]\n", "x.yaml")
    assert len(short(list(range(10**6)))) < 100
    assert len(short("x" * 10**6)) < 300


# ----------------------------------------------------------------- 7. smaller cases

TRAIN = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_llama.yaml")
FAST = ["batch=8", "data.seq_len=64", "data.sources.code.max_docs=600",
        "data.sources.replay.max_docs=300", "eval.batches=1", "log.every=5",
        "log.progress=false", "checkpoint.every=0", "schedule.total_steps=40",
        "schedule.warmup_steps=5", "schedule.cooldown_steps=10", "log.tensorboard=false",
        "log.plot=false"]


def _hidden(parent) -> list[str]:
    return sorted(p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p)


def test_overwrite_through_a_symlink_leaves_nothing_behind(gpt2_dir, tmp_path, capsys):
    from jaxarith.io import atomic
    from jaxarith.io.convert.route import convert

    real = tmp_path / "real"
    convert(gpt2_dir[0], real, to="hf", progress=False)
    link = tmp_path / "link"
    os.symlink(real, link)
    for _ in range(2):
        convert(gpt2_dir[0], link, to="hf", overwrite=True, progress=False)
        assert _hidden(tmp_path) == []
        assert "removed" not in capsys.readouterr().err
    assert os.path.islink(link) and atomic.is_output(link) and atomic.is_output(real)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors",
                                   "sub/../../outside.safetensors"])
def test_index_shards_outside_the_model_directory_are_refused(shard, llama_dir, tmp_path):
    from jaxarith.errors import CheckpointError
    from jaxarith.io.convert.hf import load_hf_params

    d = tmp_path / "m"
    shutil.copytree(llama_dir[0], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    target = os.path.normpath(os.path.join(d, shard))
    if not os.path.exists(target):
        shutil.copy(d / first, target)
    try:
        index["weight_map"] = {k: shard if v == first else v
                               for k, v in index["weight_map"].items()}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="outside the model directory"):
            load_hf_params(str(d), progress=False)
    finally:
        if shard.startswith("/"):
            os.remove(target)


def test_convert_without_tokenizer_files_warns_what_to_add(tmp_path, capsys):
    from jaxarith import testing

    src = tmp_path / "bare"
    testing.make_hf_model(src, testing.tiny_gpt2_config(), with_tokenizer=False)
    assert main(["convert", str(src), str(tmp_path / "o"), "--json"]) == 0
    err = capsys.readouterr().err
    assert "no tokenizer files" in err and "tokenizer.json" in err


def test_output_inside_an_input_model_directory_is_refused(gpt2_dir, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(gpt2_dir[0], d)
    before = sorted(os.listdir(d))
    code = main(["convert", str(d), str(d / "orbax"), "--json"])
    _one_line(capsys, code, "inside the input model directory")
    assert sorted(os.listdir(d)) == before


def test_checkpoint_dir_of_someone_elses_numbered_directories_is_refused(tmp_path):
    from jaxarith.errors import ConfigError
    from train import loop
    from train.config import load_train_config

    mine = tmp_path / "photos"
    for n in ("1", "2", "10"):
        (mine / n).mkdir(parents=True)
        (mine / n / "img.jpg").write_text("keep")
    with pytest.raises(ConfigError, match="checkpoint.dir=.*not checkpoints"):
        loop.run(load_train_config(TRAIN, [*FAST, "steps=2", f"out={tmp_path / 'run'}",
                                     f"checkpoint.dir={mine}"]))
    assert sorted(os.listdir(mine)) == ["1", "10", "2"]
    assert all((mine / n / "img.jpg").exists() for n in ("1", "2", "10"))
    assert not os.path.exists(tmp_path / "run")


def test_a_config_rejected_for_its_data_leaves_no_out_behind(tmp_path):
    from jaxarith.errors import JaxarithError
    from train import loop
    from train.config import load_train_config

    out = tmp_path / "run"
    with pytest.raises(JaxarithError, match="nope.txt"):
        loop.run(load_train_config(TRAIN, [*FAST, "steps=2", f"out={out}",
                                     f"data.sources.code.path={tmp_path / 'nope.txt'}"]))
    assert not os.path.exists(out)
    empty = tmp_path / "empty"  # an empty directory the user made stays, unmarked
    empty.mkdir()
    with pytest.raises(JaxarithError, match="nope.txt"):
        loop.run(load_train_config(TRAIN, [*FAST, "steps=2", f"out={empty}",
                                     f"data.sources.code.path={tmp_path / 'nope.txt'}"]))
    assert os.listdir(empty) == []


# ----------------------------------------------------------------- 6. resume with another config


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path, capsys):
    from jaxarith.errors import JaxarithError
    from train import loop
    from train.__main__ import main as train_main
    from train.config import load_train_config

    out = tmp_path / "run"
    base = [*FAST, f"out={out}"]
    assert loop.run(load_train_config(TRAIN, [*base, "steps=2"]))["status"] == "done"
    saved = (out / "config.json").read_bytes()
    # a finished run asked again with another model is refused, not "already done"
    with pytest.raises(JaxarithError, match="hidden_size"):
        loop.run(load_train_config(TRAIN, [*base, "steps=2", "model.config.hidden_size=32"]))
    with pytest.raises(JaxarithError, match=r"optimizer.weight_decay: 0.1 -> 0.2"):
        loop.run(load_train_config(TRAIN, [*base, "steps=2", "optimizer.weight_decay=0.2"]))
    # a resume with changed data, seed and weight decay: every key named, nothing overwritten
    with pytest.raises(JaxarithError) as e:
        loop.run(load_train_config(TRAIN, [*base, "steps=3", "seed=1", "optimizer.weight_decay=0.2",
                                     "data.sources.code.path=bundled:docs"]))
    msg = str(e.value)
    for key in ("data.sources.code.path: 'bundled:code' -> 'bundled:docs'", "seed: 0 -> 1",
                "optimizer.weight_decay", "--allow-config-change data.sources.code.path,"
                "optimizer.weight_decay,seed"):
        assert key in msg, msg
    assert (out / "config.json").read_bytes() == saved
    # ... unless the changes are allowed by name (the CLI flag)
    code = train_main([TRAIN, *base, "steps=3", "seed=1", "--allow-config-change", "seed",
                       "--json"])
    assert code == 0, capsys.readouterr()
    assert json.loads(capsys.readouterr().out)["step"] == 3


# ----------------------------------------------------------------- 5. corrupt latest checkpoint


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_corrupt_latest_checkpoint_resumes_from_the_previous_one(damage, tmp_path, capfd):
    from train import loop
    from train.config import load_train_config

    out = tmp_path / "run"
    args = [*FAST, f"out={out}", "checkpoint.every=2", "eval.at_end=false"]
    full = loop.run(load_train_config(TRAIN, [*args, "steps=4"]))
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]
    arrays = out / "checkpoints" / "4" / "state"
    biggest = max((os.path.join(r, f) for r, _, fs in os.walk(arrays) for f in fs),
                  key=os.path.getsize)
    if damage == "truncate":
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    else:
        os.remove(os.path.join(arrays, "_METADATA"))
    capfd.readouterr()
    res = loop.run(load_train_config(TRAIN, [*args, "steps=6"]))
    err = capfd.readouterr().err
    assert res["status"] == "done" and sorted(res["batches"]) == [3, 4, 5, 6]
    assert res["batches"][3] == full["batches"][3] and res["batches"][4] == full["batches"][4]
    said = [line for line in err.splitlines() if "checkpoints/4: cannot restore" in line]
    assert len(said) == 1 and "resumed from step 2, the newest complete checkpoint" in said[0]
    assert "Traceback" not in err and "incompatible handler" not in err, err
    assert "unreadable-4" in os.listdir(out / "checkpoints")


# ----------------------------------------------------------------- 4. many merge inputs


@pytest.fixture(scope="module")
def three_tied(llama_tied_dir, tmp_path_factory):
    """The tiny tied Llama and two more with its config and other weights."""
    from jaxarith import testing

    d = tmp_path_factory.mktemp("three")
    cfg = testing.tiny_llama_config(
        tie_word_embeddings=True, num_key_value_heads=1, head_dim=24,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True,
        mlp_bias=True)
    others = [str(d / f"m{s}") for s in (1, 2)]
    for s, p in zip((21, 22), others, strict=True):
        testing.make_hf_model(p, cfg, seed=s)
    return [llama_tied_dir[0], *others]


def _many_yaml(tmp_path, dirs, n, method, weights=None) -> str:
    """A merge of ``n`` inputs cycling through ``dirs`` (symlinks, so every input is its own
    path); ``weights[i]`` per input; TIES and task arithmetic get ``dirs[0]`` as base."""
    lines = [f"merge_method: {method}"]
    if method != "linear":
        lines += [f"base_model: {dirs[0]}", "parameters: {density: 0.5}"]
    lines.append("models:")
    for i in range(n):
        link = tmp_path / f"in{i}"
        os.symlink(dirs[i % len(dirs)], link)
        w = 1.0 if weights is None else weights[i]
        lines += [f"  - model: {link}", f"    parameters: {{weight: {w}}}"]
    (tmp_path / "many.yaml").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "many.yaml")


@pytest.mark.parametrize("method", ["linear", "ties", "task_arithmetic"])
def test_many_inputs_sum_in_a_loop_equal_in_both_executors(three_tied, tmp_path, method):
    """34 inputs: above the unrolled sum's limit (ops.UNROLL_MAX) and the streamed executor's
    host stacking (stream.STACK_ABOVE). Both executors still agree bit for bit, and the linear
    merge equals a float64 numpy weighted mean."""
    import jax

    from jaxarith import arith
    from jaxarith.arith import ops, stream
    from jaxarith.arith.mergeconfig import load_merge_config
    from jaxarith.io.convert import load_hf_params
    from jaxarith.io.convert.hf import HFCheckpoint

    n = 34
    assert n > ops.UNROLL_MAX and n > stream.STACK_ABOVE
    weights = [round(0.1 + 0.05 * (i % 7), 2) for i in range(n)]
    path = _many_yaml(tmp_path, three_tied, n, method, weights)
    mc = load_merge_config(path)
    spec, refs = mc.spec, list(mc.models)
    cfg, _ = load_hf_params(refs[0], progress=False)
    trees = [load_hf_params(r, progress=False)[1] for r in refs]
    mem = arith.run(spec, cfg, trees)
    arith.run_streamed(spec, refs, tmp_path / "out", progress=False)
    _, streamed = load_hf_params(tmp_path / "out", progress=False)
    for a, b in zip(jax.tree.leaves(mem), jax.tree.leaves(streamed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if method == "linear":
        cks = [HFCheckpoint(d) for d in three_tied]
        out = HFCheckpoint(str(tmp_path / "out"))
        w = np.asarray(weights, np.float64)
        for key in out.keys():
            xs = [cks[i % 3].get(key).astype(np.float64) for i in range(n)]
            ref = sum(wi * x for wi, x in zip(w, xs, strict=True)) / w.sum()
            np.testing.assert_allclose(out.get(key), ref, rtol=1e-5, atol=1e-6, err_msg=key)


def _peak_kb(argv) -> tuple[int, int]:
    """(exit code, peak resident KB) of a jaxarith subprocess."""
    import resource
    import subprocess
    import sys

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    code = subprocess.run([sys.executable, "-m", "jaxarith", *argv],
                          capture_output=True).returncode
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak >= before  # ru_maxrss of children is the largest child so far
    return code, peak


@pytest.mark.slow  # ~40 s: two merges of 250 and 2000 inputs
def test_2000_streamed_merge_inputs_finish_in_memory_linear_in_the_inputs(three_tied, tmp_path):
    """A linear merge of 2000 inputs (0.8 MB each) completes (it compiled for minutes before
    the sums over models became loops), and its peak memory grows no faster than the bytes
    of the inputs it adds over a 250-input merge."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    size = sum(os.path.getsize(os.path.join(three_tied[0], f))
               for f in os.listdir(three_tied[0]) if f.endswith(".safetensors"))
    code, small = _peak_kb(["merge", _many_yaml(a, three_tied, 250, "linear"), str(a / "out")])
    assert code == 0 and (a / "out" / "config.json").exists()
    code, big = _peak_kb(["merge", _many_yaml(b, three_tied, 2000, "linear"), str(b / "out")])
    assert code == 0 and (b / "out" / "config.json").exists()
    added = 1750 * size / 1024
    assert big - small < 1.5 * added, (small, big, added)



@pytest.mark.slow  # ~30 s: 2000 inputs opened and checked before the first tensor
def test_sigterm_during_a_merge_of_2000_models_is_honoured_within_5_s(llama_tied_dir, tmp_path):
    """2000 (symlinked) inputs of a streamed linear merge: SIGTERM while a tensor computes ends
    the command within 5 s (exit 143), its temporary output removed, memory bounded."""
    import signal
    import subprocess
    import sys

    n = 2000
    lines = ["merge_method: linear", "models:"]
    for i in range(n):
        os.symlink(llama_tied_dir[0], tmp_path / f"m{i}")
        lines.append(f"  - model: {tmp_path / f'm{i}'}")
    (tmp_path / "many.yaml").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "jaxarith", "merge", str(tmp_path / "many.yaml"),
                          str(out)], stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not [x for x in os.listdir(tmp_path) if x.startswith(".out.tmp-")]:
            assert p.poll() is None and time.time() - t0 < 120, p.stderr.read() if p.poll() else ""
            time.sleep(0.1)
        time.sleep(3)  # tensors are being read and computed
        assert p.poll() is None
        with open(f"/proc/{p.pid}/status") as f:
            peak_kb = next(int(x.split()[1]) for x in f if x.startswith("VmHWM"))
        t1 = time.time()
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=60)[1]
        seconds = time.time() - t1
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143 and seconds < 5, (p.returncode, seconds, err[-500:])
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    assert not out.exists() and not [x for x in os.listdir(tmp_path) if x.startswith(".out.")]
    assert peak_kb < 2.5 * 2**20, peak_kb  # 2000 models of 0.9 MB, read tensor by tensor


def test_a_truncated_orbax_model_names_what_is_wrong(llama_tied_dir, tmp_path, capsys):
    orbax = tmp_path / "o"
    assert main(["convert", llama_tied_dir[0], str(orbax), "--json"]) == 0
    capsys.readouterr()
    biggest = max((os.path.join(r, f) for r, _, fs in os.walk(orbax / "params") for f in fs),
                  key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 4)
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x\n")
    code = main(["eval-loss", str(orbax), "--text", str(text), "--json"])
    err = _one_line(capsys, code, [str(orbax), "cannot restore", "is not valid for value of size"])
    assert len(err) < 1000


@pytest.mark.parametrize("content", ["[" * 100_000, '{"a": 1}' + " " * (17 * 2**20)])
def test_a_hostile_config_json_is_one_line(content, gpt2_dir, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(gpt2_dir[0], d)
    (d / "config.json").write_text(content)
    text = tmp_path / "t.txt"
    text.write_text("x = 1\n")
    t0 = time.perf_counter()
    code = main(["eval-loss", str(d), "--text", str(text), "--json"])
    err = _one_line(capsys, code, "config.json")
    assert len(err) < 500 and time.perf_counter() - t0 < 5


def test_a_run_directory_inside_the_model_it_trains_is_refused(gpt2_dir, tmp_path):
    from jaxarith.io.atomic import UnsafeDestinationError
    from train import loop
    from train.config import load_train_config

    d = tmp_path / "m"
    shutil.copytree(gpt2_dir[0], d)
    before = sorted(os.listdir(d))
    cfg = load_train_config(os.path.join(os.path.dirname(TRAIN), "tiny_gpt2.yaml"),
                      [*FAST, "steps=2", f"out={d / 'run'}", f"model.ref={d}", "model.arch=",
                       "model.config={}", "model.tokenizer="])
    with pytest.raises(UnsafeDestinationError, match="inside the input model directory"):
        loop.run(cfg)
    assert sorted(os.listdir(d)) == before

"""Multi-process runs on this CPU: 2 JAX processes x 4 devices each, against 1 process x 8.

Every run is started by the test (jaxarith.testing.multiprocess) on a free port with explicit
``XLA_FLAGS`` (4 devices per process) and a timeout, so a hung collective fails the test. The
independent reference is always the single-process program (8 devices) or the source files.
Launches are expensive on 2 cores: the default suite has one 2-process launch; the training,
eval and failure scenarios are ``slow``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxarith import distributed
from jaxarith.errors import ConfigError
from jaxarith.testing import multiprocess as mt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240  # seconds for one launch (a hung collective fails instead of hanging CI)


def _tensors(directory: str) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def _ok(results: list[mt.Result]) -> list[mt.Result]:
    for i, r in enumerate(results):
        assert not r.timed_out, f"process {i} timed out:\n{r.stderr[-3000:]}"
        assert r.returncode == 0, f"process {i} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return results


def _one_json(r: mt.Result) -> dict:
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


# ----------------------------------------------------------------------------- flags (no JAX)


def test_cluster_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--num-processes, --process-id missing"):
        distributed.ClusterConfig(coordinator="127.0.0.1:1234")
    with pytest.raises(ConfigError, match="--process-id 2: must be in"):
        distributed.ClusterConfig(coordinator="h:1", num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        distributed.ClusterConfig(coordinator="nohost", num_processes=2, process_id=0)
    assert not distributed.ClusterConfig().enabled
    assert distributed.ClusterConfig(auto=True).enabled


def test_every_subcommand_and_train_take_the_flags(monkeypatch):
    from jaxarith.cli import build_parser
    from train.__main__ import add_arguments

    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:8476")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    def leaves(p):
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        return [q for a in nested for c in a.choices.values() for q in leaves(c)] or [p]

    for name, top in sub.choices.items():
        for p in leaves(top):
            assert "--coordinator" in p._option_string_actions, name
            assert "--distributed" in p._option_string_actions, name
    args = parser.parse_args(["inspect", "x", "--process-id", "2"])
    cfg = distributed.config_from_args(args)
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id) == ("10.0.0.1:8476", 4, 2)
    args = parser.parse_args(["delta", "extract", "a", "b", "c", "--process-id", "1"])
    assert distributed.config_from_args(args).process_id == 1
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert distributed.config_from_args(p.parse_args(["c.yaml", "--distributed"])).auto


def test_bad_process_id_is_one_line_error_before_jax(capsys):
    from jaxarith.cli import main

    code = main(["inspect", "nowhere", "--json", "--coordinator", "127.0.0.1:1",
                 "--num-processes", "2", "--process-id", "5"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and "--process-id 5: must be in [0, 2)" in out["error"]


# ----------------------------------------------------------------------------- convert (default)


def test_convert_hf_to_orbax_on_2_processes_is_bit_identical(llama_dir, tmp_path):
    """HF -> Orbax on 2 processes (each reading only its devices' slices), then Orbax -> HF on 1
    process (this one): every tensor bit-identical to the source safetensors."""
    src, _ = llama_dir
    orbax = str(tmp_path / "orbax")
    res = _ok(mt.run(["-m", "jaxarith", "convert", src, orbax, "--mesh", "data=2,fsdp=4",
                      "--json"], processes=2, devices=4, timeout=TIMEOUT, cwd=ROOT))
    assert _one_json(res[0])["route"] == "hf->orbax"
    assert res[1].stdout.strip() == ""  # stdout is process 0's
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporaries left
    from jaxarith.io.convert.route import convert

    convert(orbax, str(tmp_path / "hf"), progress=False)
    want, got = _tensors(src), _tensors(str(tmp_path / "hf"))
    assert sorted(want) == sorted(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and np.array_equal(want[k], got[k]), k


@pytest.mark.slow
def test_convert_orbax_to_hf_on_2_processes_is_bit_identical(llama_dir, tmp_path):
    """Orbax -> HF on 2 processes (process 0 reads and writes, process 1 reads nothing: the
    leaves are host arrays, no collective): every tensor bit-identical to the source."""
    from jaxarith.io.convert.route import convert

    src, _ = llama_dir
    orbax, hf = str(tmp_path / "orbax"), str(tmp_path / "hf")
    convert(src, orbax, progress=False)
    info = _mp_json(["convert", orbax, hf], tmp_path)
    assert info["route"] == "orbax->hf"
    want, got = _tensors(src), _tensors(hf)
    assert sorted(want) == sorted(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and np.array_equal(want[k], got[k]), k


# ----------------------------------------------------------------------------- training (slow)

TRAIN = ["-m", "train", "configs/tiny_llama.yaml", "steps=6", "batch=8", "data.seq_len=32",
         "log.every=1", "eval.every=0", "eval.batches=1", "checkpoint.every=3",
         "checkpoint.keep=3", "log.plot=false", "log.tensorboard=false",
         "schedule.warmup_steps=1", "schedule.total_steps=6"]


def _train(out: str, processes: int, mesh: str) -> dict:
    res = _ok(mt.run([*TRAIN, f"out={out}", f"mesh={mesh}", "--export-hf", out + "_hf",
                      "--json"],
                     processes=processes, devices=8 // processes, timeout=TIMEOUT, cwd=ROOT))
    for r in res[1:]:
        assert r.stdout.strip() == ""
    return _one_json(res[0])


def _losses(out: str) -> dict[int, float]:
    """Step -> train loss (the last record of a step: a resumed run re-logs steps)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _back_to_step_3(src: str, dst: str) -> None:
    """A copy of a finished run as it was when stopped after step 3."""
    shutil.copytree(src, dst)
    for step in ("6",):
        shutil.rmtree(os.path.join(dst, "checkpoints", step))
    os.remove(os.path.join(dst, "summary.json"))


@pytest.mark.slow
def test_train_2_processes_equals_1_and_resumes_anywhere(tmp_path):
    """6 steps on 2 processes x 4 devices (mesh data=2,fsdp=4) == 1 process x 8 devices; the
    2-process run stopped after 3 steps resumes on 2 processes, and on 1 process with another
    mesh, to the same losses and parameters; each run's HF export matches."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert _train(one, 1, "data=2,fsdp=4")["step"] == 6
    assert _train(two, 2, "data=2,fsdp=4")["step"] == 6
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["3", "6"]
    _back_to_step_3(two, str(tmp_path / "again"))
    _back_to_step_3(two, str(tmp_path / "single"))
    _train(str(tmp_path / "again"), 2, "data=2,fsdp=4")
    _train(str(tmp_path / "single"), 1, "fsdp=2,tensor=4")
    ref = _losses(one)
    params = _tensors(one + "_hf")
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    for run in ("two", "again", "single"):
        got = _losses(str(tmp_path / run))
        assert sorted(got) == sorted(ref), run
        np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=0,
                                   atol=1e-5, err_msg=run)
        other = _tensors(str(tmp_path / run) + "_hf")
        assert sorted(other) == sorted(params)
        for k in params:
            np.testing.assert_allclose(other[k], params[k], rtol=0, atol=1e-5,
                                       err_msg=f"{run}: {k}")


@pytest.mark.slow
def test_eval_loss_2_processes_equals_1(llama_dir, tmp_path):
    src, _ = llama_dir
    text = tmp_path / "text.txt"
    with open(os.path.join(ROOT, "jaxarith", "data", "assets", "corpus_docs.txt")) as f:
        text.write_text(f.read()[:20000])
    cmd = ["-m", "jaxarith", "eval-loss", src, "--text", str(text), "--seq-len", "32",
           "--mesh", "data=2,fsdp=4", "--json"]
    two = _one_json(_ok(mt.run(cmd, processes=2, devices=4, timeout=TIMEOUT, cwd=ROOT))[0])
    one = _one_json(_ok(mt.run(cmd, processes=1, devices=8, timeout=TIMEOUT, cwd=ROOT))[0])
    assert two["tokens"] == one["tokens"] > 1000
    assert abs(two["loss"] - one["loss"]) < 1e-5


@pytest.mark.slow
def test_a_dead_process_fails_the_other_and_the_checkpoint_restores(tmp_path):
    """Kill process 1 mid-run: process 0 exits non-zero within the heartbeat timeout (30 s
    here), naming the dead task; the last complete checkpoint resumes on 1 process."""
    import signal
    import time

    out = str(tmp_path / "run")
    cmd = [*TRAIN, f"out={out}", "mesh=data=2,fsdp=4", "steps=100000",
           "schedule.total_steps=100000", "checkpoint.every=2", "checkpoint.async_save=false",
           "--json"]
    procs = mt.start(cmd, processes=2, devices=4, cwd=ROOT)
    deadline = time.monotonic() + TIMEOUT
    while not os.path.isdir(os.path.join(out, "checkpoints", "4")):
        assert time.monotonic() < deadline and procs[0].poll() is None, "no checkpoint at 4"
        time.sleep(0.2)
    os.killpg(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    res = mt.wait(procs, 120)
    waited = time.monotonic() - t0
    assert not res[0].timed_out and res[0].returncode != 0
    assert waited < 90, waited
    assert "stopped sending heartbeats" in res[0].stderr or "another task died" in \
        res[0].stderr, res[0].stderr[-2000:]
    steps = sorted(int(s) for s in os.listdir(os.path.join(out, "checkpoints")) if s.isdigit())
    last = steps[-1]
    assert last >= 4
    cmd = [*TRAIN, f"out={out}", "mesh=fsdp=-1", f"steps={last + 1}",
           "schedule.total_steps=100000", "--json"]
    resumed = _one_json(_ok(mt.run(cmd, processes=1, devices=8, timeout=TIMEOUT, cwd=ROOT))[0])
    assert resumed["step"] == last + 1 and resumed["status"] == "done"


def test_launch_tpu_dry_run_prints_one_command_per_worker():
    script = os.path.join(ROOT, "scripts", "launch_tpu.sh")
    p = subprocess.run(["bash", script, "--dry-run", "--tpu", "my-pod", "--zone", "us-east5-a",
                        "--workers", "4", "--", "configs/llama3_2_1b_cpt_pod.yaml",
                        "steps=100"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("gcloud")]
    assert len(lines) == 4
    for i, line in enumerate(lines):
        assert f"--worker={i}" in line and "my-pod" in line and "us-east5-a" in line
        assert "python -m train configs/llama3_2_1b_cpt_pod.yaml steps=100" in line
        assert "--distributed" in line


@pytest.fixture(scope="module")
def llama_other(llama_dir, tmp_path_factory):
    """A second model of llama_dir's architecture (other weights), to merge or average with."""
    from jaxarith import testing

    d = str(tmp_path_factory.mktemp("llama_other"))
    testing.make_hf_model(d, testing.tiny_llama_config(rope_scaling=testing.LLAMA3_ROPE),
                          seed=7)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["memory", "streamed"])
def test_in_memory_merge_on_2_processes_equals_streamed(executor, llama_dir, llama_other,
                                                       tmp_path):
    """``merge --in-memory`` (TIES, jitted over the 2-process mesh, exported by process 0 with
    tensors gathered one at a time), and the streamed merge on 2 processes (process 0 alone
    reads and computes), write the same bytes as the streamed merge on 1 process."""
    from jaxarith.cli import main

    base, _ = llama_dir
    other = llama_other
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {other}\n"
                   "    parameters: {weight: 0.7, density: 0.5}\ndtype: float32\n")
    two = str(tmp_path / "two")
    flags = ["--in-memory", "--mesh", "data=2,fsdp=4"] if executor == "memory" else []
    res = _ok(mt.run(["-m", "jaxarith", "merge", str(cfg), two, *flags, "--json"],
                     processes=2, devices=4, timeout=TIMEOUT, cwd=ROOT))
    assert _one_json(res[0])["executor"] == executor
    assert main(["merge", str(cfg), str(tmp_path / "one"), "--json"]) == 0
    want, got = _tensors(str(tmp_path / "one")), _tensors(two)
    assert sorted(want) == sorted(got)
    for k in want:
        assert np.array_equal(want[k], got[k]), k


# ----------------------------------------------------------------------------- average, inherit,
# generate on 2 processes (slow): one 2-process launch each, against numpy / 1 process / HF


def _mp_json(cmd: list[str], tmp_path) -> dict:
    """Run ``jaxarith CMD --json`` on 2 processes x 4 devices (mesh data=2,fsdp=4 where the
    command takes one): process 0's JSON; process 1 prints nothing on stdout."""
    res = _ok(mt.run(["-m", "jaxarith", *cmd, "--json"], processes=2, devices=4,
                     timeout=TIMEOUT, cwd=ROOT))
    assert res[1].stdout.strip() == ""
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporaries left
    return _one_json(res[0])


def _in_process_json(cmd: list[str], capsys) -> dict:
    """``jaxarith CMD --json`` in this process (1 process x 8 devices)."""
    from jaxarith.cli import main

    capsys.readouterr()
    assert main([*cmd, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uniform", "uniform-orbax-input", "greedy"])
def test_average_on_2_processes_is_the_float64_mean(method, llama_dir, llama_other, tmp_path,
                                                    capsys):
    """``average`` on 2 processes: ``uniform`` of HF inputs (streamed; process 0 alone reads
    and computes; here to Orbax through a temporary HF checkpoint all processes share), of an
    HF and an Orbax input (every process joins each Orbax restore) and ``greedy`` (scored and
    held on the 2-process mesh, exported by gathering). The result is the float64 numpy mean of
    the (kept) inputs' tensors; greedy keeps and scores as on 1 process."""
    from jaxarith.io.convert.route import convert

    src = {llama_dir[0]: _tensors(llama_dir[0]), llama_other: _tensors(llama_other)}
    out = str(tmp_path / "avg")
    flags = ["--method", "uniform" if method.startswith("uniform") else method]
    if method == "uniform":
        info = _mp_json(["average", *src, out, *flags, "--to", "orbax"], tmp_path)
        convert(out, str(tmp_path / "hf"), progress=False)
        got, kept = _tensors(str(tmp_path / "hf")), list(src)
    elif method == "uniform-orbax-input":
        orbax = str(tmp_path / "other_orbax")
        convert(llama_other, orbax, progress=False)
        src[orbax] = src.pop(llama_other)
        info = _mp_json(["average", *src, out, *flags], tmp_path)
        got, kept = _tensors(out), list(src)
    else:
        held = tmp_path / "held.txt"
        with open(os.path.join(ROOT, "jaxarith", "data", "assets", "corpus_docs.txt")) as f:
            held.write_text(f.read()[:3000])
        flags += ["--eval-text", str(held), "--seq-len", "32", "--mesh", "data=2,fsdp=4"]
        info = _mp_json(["average", *src, out, *flags], tmp_path)
        one = _in_process_json(["average", *src, str(tmp_path / "one"), *flags], capsys)
        assert info["kept"] == one["kept"]
        for a, b in zip(info["candidates"], one["candidates"], strict=True):
            assert a["ref"] == b["ref"] and a["kept"] == b["kept"]
            assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert abs(info["soup_loss"] - one["soup_loss"]) < 1e-5
        got, kept = _tensors(out), info["kept"]
        assert len(kept) == 2  # both kept: the soup below is a mean of two
    assert sorted(got) == sorted(src[llama_dir[0]])
    for k, x in got.items():
        want = np.mean([src[r][k].astype(np.float64) for r in kept], axis=0)
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.slow
def test_inherit_on_2_processes_picks_the_source_layers(llama_dir, tmp_path, capsys):
    """``inherit --layers list:1,0 --parts attn,norms`` on 2 processes: each inherited tensor
    equals the source tensor numpy picks (layer i <- source layer [1, 0][i], embeddings, head,
    final norm), and the fresh MLP equals the 1-process (8-device) run's."""
    src_dir = llama_dir[0]
    out = str(tmp_path / "inh")
    cmd = ["inherit", src_dir, out, "--layers", "list:1,0", "--parts", "attn,norms",
           "--seed", "3", "--mesh", "data=2,fsdp=4"]
    info = _mp_json(cmd, tmp_path)
    assert info["layers"] == [1, 0] and info["src_layers"] == 2
    src, got = _tensors(src_dir), _tensors(out)
    assert sorted(got) == sorted(src)
    one = str(tmp_path / "one")
    _in_process_json([*cmd[:2], one, *cmd[3:]], capsys)
    fresh = _tensors(one)
    for k, x in got.items():
        if ".mlp." in k:  # freshly initialised: as on 1 process, not the source's
            assert np.array_equal(x, fresh[k]), k
            assert not np.array_equal(x, src[k]), k
            continue
        name = k
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            name = f"model.layers.{[1, 0][int(i)]}.{rest}"
        assert x.dtype == src[name].dtype and np.array_equal(x, src[name]), k


@pytest.mark.slow
def test_generate_greedy_on_2_processes_equals_1_and_transformers(llama_dir, tmp_path, capsys):
    """Greedy ``generate`` of 4 prompts (batch sharded over the 2-process mesh): the tokens of
    1 process x 8 devices, and those of transformers' greedy ``generate`` on the same model."""
    import torch

    from jaxarith.io.refs import load_tokenizer

    src_dir, hf_model = llama_dir
    prompts = ["The cat", "Once upon a time there", "x", "A model of"]
    cmd = ["generate", src_dir, *[a for p in prompts for a in ("--prompt", p)],
           "--max-new-tokens", "8", "--no-stop-at-eos", "--mesh", "data=2,fsdp=4"]
    two = _mp_json(cmd, tmp_path)
    one = _in_process_json(cmd, capsys)
    got = [r["token_ids"] for r in two["results"]]
    assert got == [r["token_ids"] for r in one["results"]]
    tok = load_tokenizer(src_dir)
    for p, ids in zip(prompts, got, strict=True):
        prompt = tok(p)["input_ids"]
        with torch.no_grad():
            ref = hf_model.generate(input_ids=torch.tensor([prompt]).long(), max_new_tokens=8,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)
        assert ids == ref[0, len(prompt):].tolist(), p


@pytest.mark.slow
def test_streamed_source_on_2_processes_resumes_bit_exact(tmp_path):
    """A streamed ``datasets`` source (local parquet through ``load_dataset(..., streaming=True)``)
    on 2 processes: each process trains on its own share of the documents; a copy of the run
    stopped after step 3 resumes on 2 processes to exactly the uninterrupted losses and weights,
    and the checkpoint records the stream's position (documents read, processes). Time-based
    checkpoints on 2 processes save on both (process 0 decides)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = os.path.join(ROOT, "jaxarith", "data", "assets", "corpus_code.txt")
    with open(corpus, encoding="utf-8") as f:
        docs = [d.strip("\n") for d in f.read().split("\n\n") if d.strip()][:400]
    files = str(tmp_path / "code.parquet")
    pq.write_table(pa.table({"body": docs}), files, row_group_size=64)
    stream = ["data.sources.code.kind=datasets", "data.sources.code.path=parquet",
              f"data.sources.code.data_files={files}", "data.sources.code.text_field=body",
              "data.sources.code.streaming=true", "data.sources.code.max_docs=300",
              "data.sources.replay.max_docs=200"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")

    def train(out):
        # time-based checkpoints too (process 0's clock decides, broadcast): due every step here
        res = _ok(mt.run([*TRAIN, *stream, f"out={out}", "mesh=data=2,fsdp=4",
                          "checkpoint.every_minutes=0.000001",
                          "--export-hf", out + "_hf", "--json"],
                         processes=2, devices=4, timeout=TIMEOUT, cwd=ROOT))
        return _one_json(res[0])

    assert train(full)["step"] == 6
    # every=3 alone would keep 3 and 6; the timed saves at every step leave the last keep=3
    assert sorted(os.listdir(os.path.join(full, "checkpoints"))) == ["4", "5", "6"]
    _back_to_step_3(full, cut)  # (here: back to step 5)
    assert train(cut)["step"] == 6
    assert _losses(cut) == _losses(full)
    a, b = _tensors(full + "_hf"), _tensors(cut + "_hf")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    from train.checkpoint import Checkpoints

    with Checkpoints(os.path.join(full, "checkpoints")) as ckpts:
        pos = ckpts.read_meta(6)["data_streams"]["code"]
    assert pos["documents"] == 300 and pos["process_count"] == 2
    assert pos["eval_documents"] == 15  # round(300 * eval_fraction 0.05), read by both

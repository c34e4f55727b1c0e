"""``jaxarith average``: uniform means against float64 numpy (HF, Orbax, mixed, a training run
directory), the greedy soup against a hand-computed table and against ``jaxarith eval-loss``,
LaWA's ``eval_avg`` metrics in a training run, and the errors (nothing written on failure)."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxarith import testing
from jaxarith.average import soups
from jaxarith.cli import main
from jaxarith.errors import ArchitectureMismatchError, CheckpointError, ConfigError
from jaxarith.io.convert.hf import HFCheckpoint, load_hf_params
from jaxarith.io.convert.orbax import hf_to_orbax

ROOT = os.path.join(os.path.dirname(__file__), "..")
LLAMA = os.path.join(ROOT, "configs", "tiny_llama.yaml")
EPS32 = np.finfo(np.float32).eps


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny float32 Llamas (HF, two of them sharded) and Orbax copies of them."""
    d = tmp_path_factory.mktemp("avg_models")
    cfg = testing.tiny_llama_config()
    hf, orbax = [], []
    for s in range(3):
        p = str(d / f"m{s}")
        testing.make_hf_model(p, cfg, seed=20 + s, noise=0.05 * (s + 1),
                              max_shard_size="100KB" if s else None)
        hf.append(p)
        orbax.append(hf_to_orbax(p, str(d / f"o{s}"), progress=False))
    return hf, orbax


def _np_mean_hf(dirs):
    """{HF name: float64 mean} straight from the safetensors files."""
    ckpts = [HFCheckpoint(p) for p in dirs]
    return {k: np.mean([c.get(k).astype(np.float64) for c in ckpts], axis=0)
            for k in ckpts[0].keys()}, ckpts


def _assert_mean(out, want_by_name, inputs_by_name):
    got = HFCheckpoint(str(out))
    assert sorted(got.keys()) == sorted(want_by_name)
    for k, want in want_by_name.items():
        g = got.get(k)
        assert g.dtype == np.float32
        # float32 rounding: n-1 additions and one scaling, each within half an ulp of the sum
        bound = len(inputs_by_name[k]) * EPS32 * np.sum(np.abs(inputs_by_name[k]), axis=0)
        err = np.abs(g.astype(np.float64) - want)
        assert np.all(err <= bound + 1e-30), (k, float(err.max()))


@pytest.mark.parametrize("kind", ["hf", "orbax", "mixed"])
def test_uniform_equals_float64_numpy_mean(models, tmp_path, capsys, kind):
    hf, orbax = models
    refs = {"hf": hf, "orbax": orbax, "mixed": [hf[0], orbax[1], hf[2]]}[kind]
    want, ckpts = _np_mean_hf(hf)
    inputs = {k: np.stack([c.get(k).astype(np.float64) for c in ckpts]) for k in want}
    out = tmp_path / "avg"
    assert main(["average", *refs, str(out), "--method", "uniform", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "uniform" and info["inputs"] == refs
    _assert_mean(out, want, inputs)
    if kind == "orbax":  # --to orbax: same numbers
        assert main(["average", *refs, str(tmp_path / "o"), "--to", "orbax", "--json"]) == 0
        capsys.readouterr()
        from jaxarith.io.refs import load_model

        got = load_model(str(tmp_path / "o"), progress=False).params
        _, ref = load_hf_params(str(out), progress=False)
        for a, b in zip(np.asarray(got["layers"]["mlp"]["up"]),
                        np.asarray(ref["layers"]["mlp"]["up"]), strict=True):
            np.testing.assert_array_equal(a, b)


def test_greedy_soup_matches_the_hand_computed_table():
    """loss(theta) = |theta|^2 on 2-vectors: tried a, b, d, c, e; c rejected, e accepted after
    it (computed by hand: soup (a+b+d+e)/4 = (-0.025, -0.1), loss 0.010625)."""
    cands = {"a": (0.3, 0.0), "b": (0.0, 0.4), "c": (0.5, 0.5), "d": (-0.6, 0.1),
             "e": (0.2, -0.9)}
    names = list(cands)
    load = lambda i: {"w": np.asarray(cands[names[i]], np.float32)}
    score = lambda p: float(np.sum(np.square(np.asarray(p["w"], np.float64))))
    losses, order, kept, soup_loss, soup = soups.greedy_soup(len(names), load, score)
    assert [names[i] for i in order] == ["a", "b", "d", "c", "e"]
    assert [names[i] for i in kept] == ["a", "b", "d", "e"]
    np.testing.assert_allclose(losses, [0.09, 0.16, 0.5, 0.37, 0.85], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(soup["w"]), [-0.025, -0.1], rtol=1e-6)
    assert soup_loss == pytest.approx(0.010625, rel=1e-5) and soup_loss <= min(losses)


def test_greedy_soup_of_the_best_alone_when_nothing_helps():
    vals = [0.1, 2.0, -3.0]
    losses, order, kept, soup_loss, soup = soups.greedy_soup(
        3, lambda i: {"w": np.float32(vals[i])}, lambda p: float(np.asarray(p["w"])) ** 2)
    assert order == [0, 1, 2] and kept == [0] and soup_loss == pytest.approx(0.01)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from jaxarith.data.assets import read_text

    p = tmp_path_factory.mktemp("text") / "held_out.txt"
    p.write_text(read_text(max_chars=3000))
    return str(p)


def test_greedy_cli_reproduced_by_eval_loss(models, held_out, tmp_path, capsys):
    hf, orbax = models
    out = tmp_path / "soup"
    refs = [hf[0], orbax[1], hf[2]]
    assert main(["average", *refs, str(out), "--method", "greedy", "--eval-text", held_out,
                 "--seq-len", "64", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["method"] == "greedy" and set(rep) >= {"candidates", "soup_loss"}
    losses = [c["loss"] for c in rep["candidates"]]
    assert losses == sorted(losses) and sorted(c["ref"] for c in rep["candidates"]) == \
        sorted(refs)
    assert rep["candidates"][0]["kept"] and rep["soup_loss"] <= losses[0]
    assert [c["ref"] for c in rep["candidates"] if c["kept"]] == rep["kept"]
    for c in rep["candidates"]:  # every number is what eval-loss says
        assert main(["eval-loss", c["ref"], "--text", held_out, "--seq-len", "64",
                     "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(c["loss"],
                                                                             rel=1e-6)
    assert main(["eval-loss", str(out), "--text", held_out, "--seq-len", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(rep["soup_loss"],
                                                                         rel=1e-6)
    # scored on an 8-device mesh: the same choices and losses
    assert main(["average", *refs, str(tmp_path / "soup8"), "--method", "greedy",
                 "--eval-text", held_out, "--seq-len", "64", "--mesh",
                 "data=2,fsdp=2,tensor=2", "--json"]) == 0
    rep8 = json.loads(capsys.readouterr().out)
    assert rep8["kept"] == rep["kept"]
    for a, b in zip(rep8["candidates"], rep["candidates"], strict=True):
        assert a["ref"] == b["ref"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- a training run

FAST = ["batch=8", "data.seq_len=64", "data.sources.code.max_docs=300",
        "data.sources.replay.max_docs=150", "eval.batches=1", "log.every=2",
        "log.progress=false", "log.tensorboard=false", "schedule.total_steps=40",
        "schedule.peak_lr=1e-2", "schedule.warmup_steps=5"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 4-step tiny Llama run with LaWA (k=2, every step), a checkpoint every step, keep 3."""
    from train import loop
    from train.config import load_train_config

    out = tmp_path_factory.mktemp("lawa_run") / "run"
    cfg = load_train_config(LLAMA, [*FAST, "steps=4", f"out={out}", "checkpoint.every=1",
                              "checkpoint.keep=3", "checkpoint.async_save=false",
                              "eval.every=2", "average.kind=lawa", "average.k=2",
                              "average.every=1"])
    summary = loop.run(cfg)
    return str(out), summary


def test_lawa_reports_eval_avg_in_metrics_and_plot(run_dir):
    out, summary = run_dir
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    evals = {r["step"]: r for r in recs if any(k.startswith("eval") for k in r)}
    assert sorted(evals) == [2, 4]
    for r in evals.values():
        assert {"eval/code/loss", "eval_avg/code/loss", "eval/replay/loss",
                "eval_avg/replay/loss"} <= set(r)
    assert set(summary["eval"]) >= {"eval_avg/code/loss", "eval_avg/replay/loss"}
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000


def _state_params(run, step):
    """The params of a step, restored whole (not by the partial per-leaf reads under test)."""
    with ocp.v1.Context():
        state = ocp.v1.load_pytree(os.path.join(run, "checkpoints", str(step)),
                                   checkpointable_name="state")
    return state["params"]


def test_run_directory_last_k_equals_numpy_mean(run_dir, tmp_path, capsys):
    import jax

    run, _ = run_dir
    out = tmp_path / "lawa"
    assert main(["average", run, str(out), "--method", "lawa", "--last", "2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"] == [f"{run}@3", f"{run}@4"]
    _, got = load_hf_params(str(out), progress=False)
    trees = [_state_params(run, s) for s in (3, 4)]
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    for (path, g), a, b in zip(flat_got, jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1]),
                               strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.abs(np.asarray(g, np.float64) - (a + b) / 2)
        assert np.all(err <= 2 * EPS32 * (np.abs(a) + np.abs(b))), jax.tree_util.keystr(path)
    # the whole run (3 checkpoints kept) as a greedy soup's candidates
    assert main(["average", run, str(tmp_path / "g"), "--method", "uniform", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == [f"{run}@{s}" for s in (2, 3, 4)]


# ----------------------------------------------------------------------------- errors


def _fails(args, capsys, match):
    out = args[-1]
    assert main(["average", *args, "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert match in err, err
    assert not os.path.exists(out)
    return err


def test_errors_name_the_fault_and_write_nothing(models, run_dir, tmp_path, capsys):
    hf, _ = models
    run, _ = run_dir
    out = str(tmp_path / "never")
    wide = tmp_path / "wide"
    testing.make_hf_model(wide, testing.tiny_llama_config(intermediate_size=96))
    err = _fails([hf[0], str(wide), out], capsys, "models differ in architecture")
    assert "layers/mlp/" in err  # the first differing tensor is named
    _fails([hf[0], out], capsys, "at least 2 checkpoints, got 1")
    _fails([run, out, "--last", "5"], capsys, "--last 5: only 3 checkpoint(s) exist")
    _fails([*hf, out, "--method", "lawa"], capsys, "give --last K")
    _fails([*hf, out, "--method", "greedy"], capsys, "--eval-text")
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with open(os.path.join(run, "config.json")) as f:
        (empty / "config.json").write_text(f.read())
    _fails([str(empty), out], capsys, "without checkpoints")
    with pytest.raises(ArchitectureMismatchError):
        soups.open_candidates([hf[0], str(wide)])
    with pytest.raises(ConfigError):
        soups.open_candidates([hf[0]])
    with pytest.raises(CheckpointError):
        soups.open_candidates([str(empty), hf[0]])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_offloaded_lawa_equals_in_step_lawa_across_a_kill(run_dir, tmp_path, where):
    """``offload: true`` (host snapshots, files beside the checkpoints) reports the same
    ``eval_avg`` as the in-step ring buffer, also when killed and resumed in between; with
    ``out`` on a non-local filesystem (memory://, standing in for gs://) too."""
    import fsspec

    from jaxarith.io import paths
    from train import loop
    from train.config import load_train_config

    run, _ = run_dir
    out = str(tmp_path / "offload") if where == "local" else "memory://bucket/offload"
    memfs = fsspec.filesystem("memory")
    cfg = load_train_config(LLAMA, [*FAST, "steps=4", f"out={out}", "checkpoint.every=1",
                              "checkpoint.keep=3", "checkpoint.async_save=false",
                              f"checkpoint.dir={tmp_path / 'ckpt'}",  # orbax: no memory://
                              "eval.every=2", "average.kind=lawa", "average.k=2",
                              "average.every=1", "average.offload=true", "log.plot=false"])

    def crash(step, _):
        if step == 3:
            raise RuntimeError("killed")

    try:
        with pytest.raises(RuntimeError, match="killed"):
            loop.run(cfg, on_step=crash)
        assert paths.listdir(paths.join(out, "lawa")) == ["1.p0.npz", "2.p0.npz"]
        summary = loop.run(cfg)
        assert summary["state"].average is None  # nothing averaged on the device
        assert paths.listdir(paths.join(out, "lawa")) == ["3.p0.npz", "4.p0.npz"]
        recs = [json.loads(line) for line in
                paths.read_text(paths.join(out, "metrics.jsonl")).splitlines()]
    finally:
        memfs.store.clear()
        memfs.pseudo_dirs.clear()
        memfs.pseudo_dirs.append("")
    assert not os.path.exists("memory:")  # nothing written under a local directory "memory:"

    def eval_avg(recs):
        return {(r["step"], k): v for r in recs for k, v in r.items()
                if k.startswith("eval_avg/")}

    with open(os.path.join(run, "metrics.jsonl")) as f:
        want = eval_avg([json.loads(line) for line in f])
    got = eval_avg(recs)
    assert set(got) == set(want) and {s for s, _ in got} == {2, 4}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5), k


def test_greedy_on_a_train_configs_held_out_split(models, tmp_path, capsys):
    import yaml

    with open(LLAMA) as f:
        raw = yaml.safe_load(f)
    raw["data"]["sources"]["code"]["max_docs"] = 80
    raw["data"]["sources"]["replay"]["max_docs"] = 40
    raw["data"]["seq_len"] = 64
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    hf, _ = models
    out = tmp_path / "soup"
    assert main(["average", hf[0], hf[1], str(out), "--method", "greedy", "--eval-config",
                 str(cfg), "--to", "orbax", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["to"] == "orbax" and os.path.exists(out / "jaxarith.json")
    assert rep["soup_loss"] <= min(c["loss"] for c in rep["candidates"])
    assert len(rep["candidates"]) == 2 and rep["candidates"][0]["kept"]

"""Training from inherited weights (the ``init:`` section) and the Inheritune grow loop."""

import json
import os

import jax
import numpy as np
import pytest
import yaml

from jaxarith import sharding
from jaxarith.arith import inherit as inh
from jaxarith.errors import ConfigError
from jaxarith.io.refs import load_model
from train import inheritune, loop
from train.config import from_dict, load_train_config
from train.extensions import discover

ROOT = os.path.join(os.path.dirname(__file__), "..")
GPT2 = os.path.join(ROOT, "configs", "tiny_gpt2.yaml")
FAST = ["batch=8", "data.seq_len=32", "data.sources.code.max_docs=200",
        "data.sources.replay.max_docs=100", "eval.batches=1", "eval.every=0", "log.every=5",
        "log.progress=false", "log.tensorboard=false", "checkpoint.every=0",
        "average.kind=none", "schedule.peak_lr=1e-2", "schedule.warmup_steps=2",
        "schedule.cooldown_steps=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 6-layer GPT-2 trained for 30 steps on the bundled text, exported as HF."""
    d = tmp_path_factory.mktemp("inheritune_ref")
    cfg = load_train_config(GPT2, [*FAST, "steps=30", f"out={d / 'run'}", "model.config.n_embd=32",
                             "model.config.n_layer=6", f"export.hf_dir={d / 'hf'}",
                             "log.plot=false"])
    loop.run(cfg)
    return str(d / "hf")


def _student_raw(reference, out, **init):
    with open(GPT2) as f:
        raw = yaml.safe_load(f)
    raw["model"] = {}
    raw["init"] = {"ref": reference, **init}
    raw["out"] = str(out)
    return raw


@pytest.mark.slow  # ~25 s; docs/inherit.md runs the same commands by default
def test_init_section_builds_the_inherited_student(reference, tmp_path):
    raw = _student_raw(reference, tmp_path / "s", layers="spread:3", parts=["attn", "norms"])
    cfg = from_dict(raw, FAST + ["steps=6"])
    exts = discover(cfg)
    assert [e.name for e in exts] == ["init"]
    model_cfg, model_dir = loop.model_config(cfg, exts)
    assert model_cfg.num_hidden_layers == 3 and model_dir == reference
    mesh = sharding.make_mesh(cfg.mesh)
    params = loop.initial_params(cfg, model_cfg, mesh, False, exts)
    ref = load_model(reference, progress=False)
    for name, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = sharding.path_str(name)
        src = ref.params
        for k in key.split("/"):
            src = src[k]
        src = np.asarray(src)[[0, 3, 5]] if key.startswith("layers/") else np.asarray(src)
        if key.startswith("layers/mlp/"):
            assert not np.allclose(np.asarray(x), src), key
        else:
            np.testing.assert_array_equal(np.asarray(x), src, key)
    # a short run from it trains and saves the student config (3 layers)
    summary = loop.run(cfg)
    assert summary["status"] == "done"
    with open(os.path.join(cfg.out, "config.json")) as f:
        assert json.load(f)["init"]["layers"] == "spread:3"


@pytest.mark.parametrize("change,match", [
    ({"model": {"arch": "gpt2"}}, "leave model.ref, model.arch"),
    ({"init": {"ref": "x", "parts": ["ffn"]}}, "unknown part"),
    ({"init": {"ref": "x", "layers": "top:2"}}, "unknown layer spec form"),
    ({"init": {"ref": "x", "head": "new"}}, "init.head"),
])
def test_init_section_errors(reference, tmp_path, change, match):
    raw = _student_raw(reference, tmp_path / "s")
    for k, v in change.items():
        raw[k] = {**raw.get(k, {}), **v}
    with pytest.raises(ConfigError, match=match):
        from_dict(raw, FAST + ["steps=6"])


def test_init_layers_checked_against_the_reference_before_training(reference, tmp_path):
    cfg = from_dict(_student_raw(reference, tmp_path / "s", layers="list:0,6"), FAST + ["steps=6"])
    with pytest.raises(inh.LayerSpecError, match="index 6 is out of range"):
        loop.run(cfg)
    assert not os.path.exists(os.path.join(cfg.out, "checkpoints"))


class _Killed(Exception):
    pass


@pytest.mark.slow  # ~25 s; docs/inherit.md runs the same commands by default
def test_grow_loop_rounds_jsonl_and_resume(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "grow"
    raw = _student_raw(reference, out)
    raw["inheritune"] = {"reference": reference, "start": 3, "step": 2}
    path = tmp_path / "grow.yaml"
    path.write_text(yaml.safe_dump(raw))
    over = FAST + ["steps=6"]

    def kill(rec):
        raise _Killed(rec["n"])  # the process dies right after round 3 is recorded

    with pytest.raises(_Killed):
        inheritune.run(str(path), over, on_round=kill)
    lines = (out / "inheritune.jsonl").read_text().splitlines()
    assert [json.loads(x)["n"] for x in lines] == [3]

    calls = []
    real_run = loop.run

    def counting(cfg, **kw):
        calls.append(cfg.out)
        return real_run(cfg, **kw)

    monkeypatch.setattr(loop, "run", counting)
    from jaxarith.cli import main

    assert main(["inheritune", str(path), *over, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recs = [json.loads(x) for x in (out / "inheritune.jsonl").read_text().splitlines()]
    ns = [r["n"] for r in recs]
    # round 3 was not redone; round 5 ran unless round 3 already matched
    assert ns in ([3], [3, 5]) and calls == [str(out / f"round_{n}") for n in ns[1:]]
    assert res["planned"] == [3, 5] and [r["n"] for r in res["rounds"]] == ns
    for r in recs:
        assert set(r) >= {"n", "steps", "tokens", "val_loss", "ref_val_loss", "matched"}
        assert r["steps"] == 6 and r["tokens"] == 6 * 8 * 32
        assert r["matched"] == (r["val_loss"] <= r["ref_val_loss"])
        assert np.isfinite(r["val_loss"]) and r["val_loss"] < np.log(1024)
        with open(out / f"round_{r['n']}" / "config.json") as f:
            assert json.load(f)["init"]["layers"] == f"first:{r['n']}"
    assert res["status"] == ("matched" if recs[-1]["matched"] else "unmatched")
    assert os.path.getsize(out / "inheritune.png") > 1000
    # the reference's held-out loss equals transformers' mean next-token NLL on the same windows,
    # each packed document run alone (data.packing: documents); the target after a document's
    # EOS (the next one's first token) is predicted from the document just ended
    import torch
    import transformers

    held = inheritune.HeldOut(from_dict(_student_raw(reference, out), over), reference)
    hf = transformers.AutoModelForCausalLM.from_pretrained(reference).eval()
    tokens, seg = held.windows["tokens"], held.windows["segment_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for row, ids in zip(seg, tokens, strict=True):
            for s in np.unique(row):
                at = np.flatnonzero(row == s)
                lp = torch.log_softmax(hf(input_ids=torch.tensor(ids[at][None])).logits[0], -1)
                targets = list(ids[at[1:]]) + ([ids[at[-1] + 1]] if at[-1] + 1 < len(ids) else [])
                total -= sum(float(lp[j, t]) for j, t in enumerate(targets))
                count += len(targets)
    assert held.n_windows == len(tokens) and count == tokens.size - len(tokens)
    assert abs(total / count - recs[0]["ref_val_loss"]) < 1e-4
    # the trained reference beats 6-step students on its own held-out data (sanity)
    assert recs[0]["ref_val_loss"] < recs[0]["val_loss"] + 1.0


def test_grow_config_errors(reference, tmp_path):
    raw = _student_raw(reference, tmp_path / "g", layers="first:2")
    raw["inheritune"] = {"reference": reference}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="init.layers is set by the grow loop"):
        inheritune.load(str(path))
    del raw["init"]["layers"]
    raw["inheritune"]["step"] = 0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="step=0"):
        inheritune.load(str(path))


def test_preempted_round_means_resume_later(reference, tmp_path, monkeypatch, capsys):
    raw = _student_raw(reference, tmp_path / "p")
    raw["inheritune"] = {"reference": reference, "start": 3}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    # what loop.run returns after SIGTERM: a checkpoint was saved, the run is not finished
    monkeypatch.setattr(loop, "run", lambda cfg, **kw: {"status": "preempted", "step": 1})
    from jaxarith.cli import main

    rc = main(["inheritune", str(path), *FAST, "steps=6", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == inheritune.EXIT_PREEMPTED != 0 and "error" not in res
    assert res["status"] == "preempted" and res["rounds"] == []
    assert not (tmp_path / "p" / "inheritune.jsonl").exists()


def test_bundled_grow_config_loads():
    raw, grow = inheritune.load(os.path.join(ROOT, "configs", "inheritune", "tiny_gpt2.yaml"))
    assert grow.start == 3 and grow.step == 2 and raw["init"]["ref"] == grow.reference
    cfg = inheritune.round_config(raw, 3)
    assert cfg.init.layers == "first:3" and cfg.out.endswith("round_3")
    assert cfg.export.hf_dir == os.path.join(cfg.out, "hf")

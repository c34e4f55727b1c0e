"""The delta-transplant pipeline end to end on a shrunken config (tiny model, a few steps)."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxarith import cli
from jaxarith.errors import ConfigError, JaxarithError
from train.experiments import config as config_lib
from train.experiments import delta_transplant
from train.experiments.common import prepare_out

# the whole experiment's smoke run (~50 s): out of `make test`'s budget, run by make test-slow
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("base", "instruct", "trained", "final", "instruct_trained")
# config.json of meta-llama/Llama-3.2-1B (the hub is not reachable from tests)
LLAMA_3_2_1B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128001,
}
SMOKE = os.path.join(ROOT, "configs", "experiments", "delta_transplant_smoke.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dt") / "run")
    lines = []
    cfg = config_lib.load(SMOKE, {"train": {"log": {"progress": False}}})
    res = delta_transplant.run(cfg, out, log=lines.append, progress=False)
    return out, res, lines, cfg


def test_writes_every_output(run_dir):
    out, res, lines, _ = run_dir
    for name in MODELS:
        d = os.path.join(out, "models", name)
        assert os.path.isfile(os.path.join(d, "config.json"))
        assert os.path.isfile(os.path.join(d, "model.safetensors"))
    for f in ("eval/new_domain.txt", "eval/old_domain.txt", "results.json", "report.md",
              "loss_curves.png", "evals.png", "norms_per_layer.png", ".jaxarith-output.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert set(saved["models"]) == set(MODELS)
    for m in saved["models"].values():
        assert set(m) >= {"new_domain_loss", "old_domain_loss", "instruct_loss",
                          "instruct_exact_match"}
        assert all(np.isfinite(v) for v in m.values())
    for measure in ("abs", "square"):
        assert set(saved["norms"][measure]) >= {"base_norm", "other_norm", "diff_norm",
                                                "base_over_other", "diff_over_other",
                                                "diff_over_base"}
    moved = saved["trained_minus_base_norms"]["abs"]["diff_norm"]
    assert saved["trained_minus_base_over_delta"] == pytest.approx(
        moved / saved["norms"]["abs"]["diff_norm"], rel=1e-12)
    # one progress line when each stage starts and ends
    assert sum(line.startswith("[") and "done in" in line for line in lines) == 7
    report = open(os.path.join(out, "report.md")).read()
    assert "| final |" in report and "loss_curves.png" in report
    # the held-out eval text is not in the training split of its source
    new = open(os.path.join(out, "eval", "new_domain.txt")).read()
    corpus = os.path.join(ROOT, "jaxarith", "data", "assets", "corpus_code.txt")
    assert new[:200] in open(corpus).read()


def test_final_is_trained_plus_delta_tensor_by_tensor(run_dir):
    out = run_dir[0]
    t = {n: load_file(os.path.join(out, "models", n, "model.safetensors"))
         for n in ("base", "instruct", "trained", "final")}
    assert set(t["final"]) == set(t["base"])
    for k in t["final"]:
        want = (t["trained"][k].astype(np.float64)
                + (t["instruct"][k].astype(np.float64) - t["base"][k].astype(np.float64)))
        np.testing.assert_allclose(t["final"][k], want, rtol=0, atol=1e-6, err_msg=k)
    # and the delta is not zero: instruction tuning moved the weights
    assert any(np.abs(t["instruct"][k] - t["base"][k]).max() > 0 for k in t["base"])


def test_eval_loss_command_reproduces_results(run_dir, capsys):
    out, res, _, _ = run_dir
    # one through a real subprocess of the CLI, the rest through the same entry point in-process
    proc = subprocess.run(
        [sys.executable, "-m", "jaxarith", "eval-loss", os.path.join(out, "models", "final"),
         "--text", os.path.join(out, "eval", "new_domain.txt"), "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT})
    got = json.loads(proc.stdout)["loss"]
    assert abs(got - res["models"]["final"]["new_domain_loss"]) < 1e-4
    for name in MODELS:
        for key in ("new_domain", "old_domain"):
            assert cli.main(["eval-loss", os.path.join(out, "models", name), "--text",
                             os.path.join(out, "eval", f"{key}.txt"), "--json"]) == 0
            got = json.loads(capsys.readouterr().out)["loss"]
            assert abs(got - res["models"][name][f"{key}_loss"]) < 1e-4, (name, key)


def test_rerun_reuses_cached_stages(run_dir):
    out, res, _, cfg = run_dir
    files = [os.path.join(out, "models", n, "model.safetensors") for n in MODELS]
    before = [os.stat(f).st_mtime_ns for f in files]
    lines = []
    again = delta_transplant.run(cfg, out, log=lines.append, progress=False)
    assert sum("cached" in line for line in lines) == 7, lines
    assert [os.stat(f).st_mtime_ns for f in files] == before
    assert again["models"] == res["models"]


def test_refuses_bad_configs_and_foreign_dirs(tmp_path):
    with pytest.raises(ConfigError, match="eval.new_domain='nope'"):
        config_lib.load(None, {"eval": {"new_domain": "nope"}})
    with pytest.raises(ConfigError, match="unknown stage stages.finetune"):
        config_lib.load(None, {"stages": {"finetune": {}}})
    with pytest.raises(ConfigError, match="'instruct' is set but 'base' is not"):
        config_lib.load(None, {"instruct": "some/model"})
    cfg = config_lib.load(None, {"stages": {"pretrain": {"steps": 5}}})
    with pytest.raises(ConfigError, match="stage base .pretrain.: schedule"):
        delta_transplant.stage_train_configs(cfg, str(tmp_path))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(JaxarithError, match="was not written by jaxarith"):
        prepare_out(str(tmp_path / "mine"), "delta-transplant")


def test_llama3_2_1b_config_parses_and_fits_the_pod_mesh(tmp_path):
    import jax
    from jax.sharding import PartitionSpec as P

    from jaxarith.models.config import config_from_hf
    from jaxarith.sharding import make_mesh
    from train.step import build_step, make_optimizer

    path = os.path.join(ROOT, "configs", "experiments", "delta_transplant_llama3_2_1b.yaml")
    cfg = config_lib.load(path)
    stages = delta_transplant.stage_train_configs(cfg, str(tmp_path))
    assert set(stages) == {"trained", "instruct_trained"}  # (a) and (b) skipped
    assert stages["trained"].model.ref == "meta-llama/Llama-3.2-1B"
    assert stages["instruct_trained"].model.ref == "meta-llama/Llama-3.2-1B-Instruct"
    tc = stages["trained"]
    assert tc.schedule.kind == "rewarm" and tc.distributed
    assert [s.weight for s in tc.data.sources] == [0.95, 0.05]
    model_cfg = config_from_hf(LLAMA_3_2_1B)
    mesh = make_mesh(tc.mesh)
    sched = tc.schedule.build()
    fns = build_step(model_cfg, mesh, tx=make_optimizer(tc.optimizer, sched), schedule=sched,
                     batch=tc.batch, seq_len=tc.data.seq_len, microbatches=tc.microbatches,
                     loss_fn=lambda p, f, b: (0.0, 1.0, {}))
    q = fns.abstract_state.params["layers"]["attn"]["q"]
    assert q.shape == (16, 2048, 32, 64) and q.sharding.spec == P(None, "fsdp", None, None)
    assert fns.abstract_batch["tokens"].shape == (2, 256, 2048)
    n = sum(x.size for x in jax.tree.leaves(fns.abstract_state.params))
    assert 1.23e9 < n < 1.24e9


@pytest.mark.parametrize("path", sorted(glob.glob(
    os.path.join(ROOT, "configs", "experiments", "delta_transplant_*.yaml"))), ids=os.path.basename)
def test_every_experiment_config_builds_its_stages(path, tmp_path):
    cfg = config_lib.load(path)
    stages = delta_transplant.stage_train_configs(cfg, str(tmp_path))
    assert {"trained", "instruct_trained"} <= set(stages)

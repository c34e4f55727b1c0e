"""The weak-to-strong pipeline on a shrunken config (tiny models, a few steps)."""

import json
import os

import numpy as np
import pytest

from train.experiments import weak_to_strong

# the whole pipeline (~1 min): CI runs it in its slow step (`make test-slow`)
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "experiments", "weak_to_strong_smoke.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("w2s") / "run")
    cfg = weak_to_strong.load_experiment_config(SMOKE, {"train": {"log": {"progress": False}},
                                             "eval": {"alphas": [0.0, 1.0], "betas": [2.0],
                                                      "speculative_k": [2]}})
    lines = []
    res = weak_to_strong.run(cfg, out, log=lines.append, progress=False)
    return out, res, lines


def test_outputs_and_gap_closed(run_dir):
    out, res, lines = run_dir
    for name in weak_to_strong.MODELS:
        assert os.path.isfile(os.path.join(out, "models", name, "model.safetensors"))
    for f in ("results.json", "report.md", "instruct_eval.png", "speed.png", "loss_curves.png",
              "timing.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert set(saved["models"]) == {"large_base", "large_tuned", "small_tuned",
                                    "proxy_alpha_0", "proxy_alpha_1", "eft_beta_2"}
    m = saved["models"]
    g = saved["gap_closed"]["proxy_alpha_1"]["instruct_loss"]
    want = (m["proxy_alpha_1"]["instruct_loss"] - m["large_base"]["instruct_loss"]) / (
        m["large_tuned"]["instruct_loss"] - m["large_base"]["instruct_loss"])
    assert g == pytest.approx(want, rel=1e-12)
    assert sum("done in" in line for line in lines) == 6


def test_proxy_tuning_alpha_0_is_the_large_base(run_dir):
    out = run_dir[0]
    ev = {n: json.load(open(os.path.join(out, "eval", f"{n}.json")))
          for n in ("large_base", "proxy_alpha_0")}
    assert abs(ev["proxy_alpha_0"]["instruct_loss"] - ev["large_base"]["instruct_loss"]) < 1e-5
    assert ev["proxy_alpha_0"]["answers"] == ev["large_base"]["answers"]
    assert run_dir[1]["gap_closed"]["proxy_alpha_0"]["instruct_loss"] == pytest.approx(0, abs=1e-4)


def test_speculative_eft_gives_plain_eft_greedy_answers(run_dir):
    t = run_dir[1]["speculative"]
    assert t["speculative_k2"]["same_answers_as_plain_eft"] is True
    assert 0.0 <= t["speculative_k2"]["acceptance_rate"] <= 1.0
    assert np.isfinite(t["plain_eft"]["tokens_per_s"])

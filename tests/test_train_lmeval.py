"""``eval.lm_eval`` in a training config: lm-eval tasks on the live parameters at the configured
steps, their metrics in metrics.jsonl, equal to lm-eval run on the final parameters."""

import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")  # the eval extra

from jaxarith.errors import ConfigError  # noqa: E402
from train import loop  # noqa: E402
from train.config import load_train_config  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
LLAMA = os.path.join(ROOT, "configs", "tiny_llama.yaml")
FAST = ["batch=8", "data.seq_len=64", "data.sources.code.max_docs=600",
        "data.sources.replay.max_docs=300", "eval.batches=1", "log.every=2",
        "log.progress=false", "checkpoint.every=0", "schedule.total_steps=40",
        "schedule.peak_lr=1e-2", "schedule.warmup_steps=5", "steps=4",
        "log.plot=false", "log.tensorboard=false"]
LM_EVAL = ["eval.lm_eval.tasks=[jaxarith_mc]", "eval.lm_eval.every=2", "eval.lm_eval.limit=3"]


def test_lm_eval_tasks_run_on_the_live_parameters(tmp_path):
    from jaxarith.data.assets import bundled_tokenizer
    from jaxarith.eval.lmeval import JaxarithLM
    from jaxarith.eval.lmeval.run import task_manager

    out = tmp_path / "run"
    cfg = load_train_config(LLAMA, [*FAST, *LM_EVAL, f"out={out}"])
    assert cfg.eval.lm_eval.tasks == ("jaxarith_mc",)
    res = loop.run(cfg)
    with open(out / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    evals = [r for r in recs if "lm_eval/jaxarith_mc/acc" in r]
    assert [r["step"] for r in evals] == [2, 4]  # every 2 steps (the last one in the end phase)
    assert res["lm_eval"] == {k: v for k, v in evals[-1].items() if k.startswith("lm_eval/")}
    # the numbers of the final parameters, evaluated apart
    model_cfg, _ = loop.model_config(cfg)
    lm = JaxarithLM.from_params(model_cfg, res["state"].params, bundled_tokenizer())
    apart = lm_eval.simple_evaluate(model=lm, tasks=["jaxarith_mc"], limit=3,
                                    task_manager=task_manager(["jaxarith_mc"]),
                                    bootstrap_iters=0)
    assert evals[-1]["lm_eval/jaxarith_mc/acc"] == apart["results"]["jaxarith_mc"]["acc,none"]
    assert evals[-1]["lm_eval/jaxarith_mc/acc_norm"] == \
        apart["results"]["jaxarith_mc"]["acc_norm,none"]


@pytest.mark.slow  # an unknown name makes lm-eval index its ~15k built-in task YAMLs (5-15 s)
def test_lm_eval_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="eval.lm_eval.every=-1 must be >= 0"):
        load_train_config(LLAMA, [*FAST, "eval.lm_eval.tasks=[jaxarith_mc]",
                                  "eval.lm_eval.every=-1", f"out={tmp_path}"])
    cfg = load_train_config(LLAMA, [*FAST, "eval.lm_eval.tasks=[jaxarith_mcc]",
                                    f"out={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match=r"unknown task\(s\): jaxarith_mcc"):
        loop.run(cfg)


@pytest.mark.slow  # ~60-90 s: a 1-process and a 2-process training run
def test_lm_eval_during_training_on_2_processes_equals_1(tmp_path):
    """``eval.lm_eval`` in a run of 2 processes x 4 devices gives the task metrics (and losses) of
    the same run on 1 process x 8 devices."""
    from jaxarith.testing import multiprocess as mt

    def metrics(out: str, processes: int) -> list[dict]:
        res = mt.run(["-m", "train", LLAMA, *FAST, *LM_EVAL, "eval.lm_eval.limit=6",
                      "mesh=data=2,fsdp=4", f"out={out}", "--json"], processes=processes,
                     devices=8 // processes, timeout=300, cwd=ROOT)
        for i, r in enumerate(res):
            assert not r.timed_out and r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    one, two = metrics(str(tmp_path / "one"), 1), metrics(str(tmp_path / "two"), 2)
    pick = lambda recs, p: {(r["step"], k): v for r in recs for k, v in r.items()  # noqa: E731
                            if k.startswith(p)}
    ev1, ev2 = pick(one, "lm_eval/"), pick(two, "lm_eval/")
    assert {s for s, _ in ev1} == {2, 4} and set(ev1) == set(ev2)
    assert ev1 == ev2
    l1, l2 = pick(one, "loss"), pick(two, "loss")
    assert set(l1) == set(l2) and all(abs(l1[k] - l2[k]) < 1e-5 for k in l1)

"""Weak-to-strong: a small tuned model steering a large base model (proxy tuning, EFT up-scaling).

Stages (cached in ``DIR`` like the delta transplant's):

1-2. ``small_base`` / ``large_base``: two sizes pre-trained on the same data (bundled docs)
3-4. ``small_tuned`` / ``large_tuned``: each instruction-tuned the same way (the large one is the
     reference: what directly tuning the large model gives)
5.   ``eval``: the instruction eval (:mod:`jaxarith.eval.instruct`) of large base, large tuned,
     small tuned, proxy tuning ``large_base + alpha (small_tuned - small_base)`` for each alpha,
     and EFT up-scaling ``large_base + beta (small_tuned - small_base)`` for each beta (the same
     product of experts: proxy tuning's alpha is EFT's beta); the share of the gap closed
     ``(combined - large base) / (large tuned - large base)`` for both metrics
6.   ``timing``: greedy decoding of the eval prompts with plain large decoding, plain EFT
     (beta 1) and speculative EFT drafted by the small tuned model (k = 2, 4, 8): acceptance
     rate, tokens/s, speed-up over plain EFT, and whether speculative EFT's answers equal plain
     EFT's

Outputs: ``models/{small_base,large_base,small_tuned,large_tuned}``, ``eval/*.json``,
``timing.json``, ``results.json``, ``report.md``, ``loss_curves.png``, ``instruct_eval.png``,
``speed.png``.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from jaxarith import data
from jaxarith.data import chat
from jaxarith.decode.combine import eft_up, proxy_tuning
from jaxarith.decode.loop import DecodeSpec, Member, generate
from jaxarith.decode.speculative import SpeculativeSpec, generate_speculative
from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.eval.instruct import evaluate_instruct
from jaxarith.io.refs import load_model
from train.config import from_dict
from train.experiments import report_w2s
from train.experiments.common import (
    Log,
    Stages,
    log_stderr,
    prepare_out,
    run_training,
    write_json,
)
from train.experiments.config import DEFAULT as DT_DEFAULT
from train.experiments.config import TINY_LLAMA, deep_merge, read_yaml

MODELS = ("small_base", "large_base", "small_tuned", "large_tuned")
SMALL = {**TINY_LLAMA, "hidden_size": 32, "intermediate_size": 96, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 16}
DEFAULT: dict[str, Any] = {
    "out": "runs/weak_to_strong",
    "train": copy.deepcopy(DT_DEFAULT["train"]),
    "small": SMALL,
    "large": {**TINY_LLAMA, "hidden_size": 96, "intermediate_size": 288,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 24},
    "stages": {"pretrain": deep_merge(DT_DEFAULT["stages"]["pretrain"], {"steps": 300}),
               "instruct": deep_merge(DT_DEFAULT["stages"]["instruct"], {"steps": 150})},
    "eval": {"instruct": "bundled:instruct_eval", "instruct_examples": 200,
             "max_new_tokens": 32, "alphas": [0.5, 1.0], "betas": [0.25, 0.5, 1.0, 1.5, 2.0],
             "speculative_k": [2, 4, 8], "timing_prompts": 32},
}
TOP_KEYS = ("out", "train", "small", "large", "stages", "eval")


def load_experiment_config(path: str | None = None, overrides: dict | None = None) -> dict:
    """The embedded default deep-merged with the YAML at ``path`` and ``overrides``."""
    cfg = deep_merge(deep_merge(DEFAULT, read_yaml(path)), overrides or {})
    for k in cfg:
        if k not in TOP_KEYS:
            raise ConfigError(f"{path or 'config'}: unknown key {k!r} (valid: "
                              f"{', '.join(TOP_KEYS)})")
    for k in cfg["stages"]:
        if k not in ("pretrain", "instruct"):
            raise ConfigError(f"unknown stage stages.{k} (valid: pretrain, instruct)")
    if cfg["small"]["vocab_size"] != cfg["large"]["vocab_size"]:
        raise ConfigError("small.vocab_size and large.vocab_size differ: logit arithmetic "
                          "needs one vocabulary")
    return cfg


def stage_train_configs(cfg: dict, out: str) -> dict:
    """The training config of each of the four training stages (built and checked now)."""
    models = os.path.join(out, "models")
    built = {}
    for size in ("small", "large"):
        for name, stage, ref in ((f"{size}_base", "pretrain", None),
                                 (f"{size}_tuned", "instruct",
                                  os.path.join(models, f"{size}_base"))):
            raw = deep_merge(cfg["train"], cfg["stages"][stage])
            tok = raw.get("model", {}).get("tokenizer", "")
            raw["model"] = {"arch": raw["model"].get("arch", "llama"), "tokenizer": tok,
                            "config": cfg[size]} if ref is None else \
                {"ref": ref, "tokenizer": tok}
            raw["out"] = os.path.join(out, "stages", name)
            raw.setdefault("export", {})["hf_dir"] = os.path.join(models, name)
            try:
                built[name] = from_dict(raw)
            except JaxarithError as e:
                raise type(e)(f"stage {name} ({stage}): {e}") from None
    return built


def combinations(cfg: dict, configs: dict) -> dict:
    """name -> members: the plain models and every proxy-tuning / EFT combination evaluated."""
    lb, st, sb = configs["large_base"], configs["small_tuned"], configs["small_base"]
    out = {"large_base": (Member(lb),), "large_tuned": (Member(configs["large_tuned"]),),
           "small_tuned": (Member(st),)}
    for a in cfg["eval"]["alphas"]:
        out[f"proxy_alpha_{a:g}"] = proxy_tuning(lb, st, sb, alpha=a)
    for b in cfg["eval"]["betas"]:
        out[f"eft_beta_{b:g}"] = eft_up(lb, st, sb, beta=b)
    return out


def combination_names(cfg: dict) -> list[str]:
    """The names :func:`combinations` gives, in its order (without loading any model)."""
    return (["large_base", "large_tuned", "small_tuned"]
            + [f"proxy_alpha_{a:g}" for a in cfg["eval"]["alphas"]]
            + [f"eft_beta_{b:g}" for b in cfg["eval"]["betas"]])


def _member_params(name: str, params: dict) -> list:
    if name.startswith(("proxy_", "eft_")):
        return [params["large_base"], params["small_tuned"], params["small_base"]]
    return [params[name]]


def evaluate_all(cfg: dict, refs: dict, out: str, log: Log) -> dict:
    """The instruction eval of every model and combination (one JSON per entry, cached)."""
    loaded = {n: load_model(refs[n], progress=False) for n in MODELS}
    configs = {n: m.config for n, m in loaded.items()}
    params = {n: m.params for n, m in loaded.items()}
    tok = loaded["small_tuned"].tokenizer()
    path = data.BUNDLED.get(cfg["eval"]["instruct"], cfg["eval"]["instruct"])
    convs = chat.read_jsonl(path)[: cfg["eval"]["instruct_examples"]]
    res = {}
    for name, members in combinations(cfg, configs).items():
        p = os.path.join(out, "eval", f"{name}.json")
        if not os.path.exists(p):
            ev = evaluate_instruct(members, _member_params(name, params), convs, tok,
                                   max_new_tokens=cfg["eval"]["max_new_tokens"])
            write_json(p, {"instruct_loss": ev.nll, "instruct_exact_match": ev.exact_match,
                           "answers": list(ev.answers)})
            log(f"    eval {name}: answer NLL {ev.nll:.4f}, exact match {ev.exact_match:.3f}")
        with open(p) as f:
            res[name] = json.load(f)
    return res


def timing(cfg: dict, refs: dict) -> dict:
    """Plain large decoding, plain EFT and speculative EFT (k from the config) on the same
    greedy prompts: tokens/s (compilation excluded), acceptance rates, speed-ups."""
    m = {n: load_model(refs[n], progress=False) for n in ("large_base", "small_tuned",
                                                          "small_base")}
    tok = m["small_tuned"].tokenizer()
    path = data.BUNDLED.get(cfg["eval"]["instruct"], cfg["eval"]["instruct"])
    convs = chat.read_jsonl(path)[: cfg["eval"]["timing_prompts"]]
    prompts = [chat.prompt_and_answer(c, tok)[0] for c in convs]
    common = dict(max_new_tokens=cfg["eval"]["max_new_tokens"],
                  stop_tokens=chat.stop_tokens(tok), pad_token=tok.pad_token_id or 0,
                  prompt_bucket=64)
    params = [m["large_base"].params, m["small_tuned"].params, m["small_base"].params]
    out: dict = {}

    def timed(fn):
        fn()  # compile (and warm up)
        return fn()

    plain = DecodeSpec(members=(Member(m["large_base"].config),), **common)
    g = timed(lambda: generate(plain, [params[0]], prompts))
    out["plain_large"] = {"tokens_per_s": g.tokens_per_s, "seconds": g.seconds}
    eft = DecodeSpec(members=eft_up(m["large_base"].config, m["small_tuned"].config,
                                 m["small_base"].config, beta=1.0), **common)
    g_eft = timed(lambda: generate(eft, params, prompts))
    out["plain_eft"] = {"tokens_per_s": g_eft.tokens_per_s, "seconds": g_eft.seconds}
    for k in cfg["eval"]["speculative_k"]:
        sd = SpeculativeSpec(decoder=eft, drafter=1, k=k)
        g = timed(lambda sd=sd: generate_speculative(sd, params, prompts))
        same = bool((g.tokens == g_eft.tokens).all() and (g.lengths == g_eft.lengths).all())
        out[f"speculative_k{k}"] = {
            "tokens_per_s": g.tokens_per_s, "seconds": g.seconds,
            "acceptance_rate": g.acceptance_rate,
            "speedup_over_plain_eft": g.tokens_per_s / max(g_eft.tokens_per_s, 1e-9),
            "same_answers_as_plain_eft": same}
    out["prompts"] = len(prompts)
    return out


def gap_closed(evals: dict) -> dict:
    """``(combined - large base) / (large tuned - large base)`` per combination and metric."""
    out = {}
    for name, ev in evals.items():
        if not name.startswith(("proxy_", "eft_")):
            continue
        out[name] = {}
        for metric in ("instruct_loss", "instruct_exact_match"):
            lo, hi = evals["large_base"][metric], evals["large_tuned"][metric]
            out[name][metric] = (ev[metric] - lo) / (hi - lo) if hi != lo else None
    return out


def run(cfg: dict, out: str | None = None, *, log: Log = log_stderr,
        progress: bool = True) -> dict:
    """Run (or resume) the experiment; returns the results written to results.json."""
    import dataclasses

    out = prepare_out(out or cfg["out"], "weak-to-strong")
    tcfgs = stage_train_configs(cfg, out)
    if not progress:
        tcfgs = {k: dataclasses.replace(v, log=dataclasses.replace(v.log, progress=False))
                 for k, v in tcfgs.items()}
    refs = {n: os.path.join(out, "models", n) for n in MODELS}
    st = Stages(6, log)
    for name in MODELS:
        st.run(name, f"{'pre-train' if name.endswith('base') else 'instruction-tune'} "
               f"{tcfgs[name].steps} steps", os.path.exists(refs[name]),
               lambda name=name: run_training(name, tcfgs[name]))
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    evals: dict = {}
    names = combination_names(cfg)
    st.run("eval", f"instruction eval of {len(names)} models and combinations",
           all(os.path.exists(os.path.join(out, "eval", f"{n}.json")) for n in names),
           lambda: evals.update(evaluate_all(cfg, refs, out, log)))
    if not evals:
        evals = {n: json.load(open(os.path.join(out, "eval", f"{n}.json"))) for n in names}
    timing_path = os.path.join(out, "timing.json")
    st.run("timing", "plain vs speculative EFT decoding", os.path.exists(timing_path),
           lambda: write_json(timing_path, timing(cfg, refs)))
    with open(timing_path) as f:
        speed = json.load(f)
    results = {
        "models": {n: {k: ev[k] for k in ("instruct_loss", "instruct_exact_match")}
                   for n, ev in evals.items()},
        "gap_closed": gap_closed(evals),
        "speculative": speed,
        "model_paths": refs,
        "seconds": st.timings(os.path.join(out, "results.json")),
    }
    results["seconds_total"] = round(sum(results["seconds"].values()), 1)
    write_json(os.path.join(out, "results.json"), results)
    report_w2s.write_all(out, results, tcfgs)
    return results

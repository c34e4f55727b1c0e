"""Delta transplant ("Doing Pre-training Research on Instruction Models"), end to end.

Stages (each cached in ``DIR``; a rerun skips finished ones and resumes a training stage from its
last checkpoint):

(a) ``pretrain``: a tiny base pre-trained on the bundled docs corpus -> ``models/base``
(b) ``instruct``: the base instruction-tuned (loss on assistant tokens) -> ``models/instruct``
(c) ``delta``: ``delta = instruct - base`` and its norms report (abs and square measures, per
    layer) -> ``delta/norms.json``
(d) ``trained``: the base continued on the new domain (bundled code) with 5% replay of the old
    one and a re-warmed schedule -> ``models/trained``
(e) ``final = trained + delta`` -> ``models/final``
(f) ``instruct_trained``: the alternative: the instruct model continued the same way
    -> ``models/instruct_trained``

then every model is scored on the new-domain text, the old-domain text (forgetting) and the
instruction eval (``eval/NAME.json``), and ``results.json``, ``report.md`` and the PNGs are
written. The domain losses are :func:`jaxarith.eval.loss.eval_loss` of the model loaded from its
directory on the text's tokens, exactly what ``jaxarith eval-loss DIR/models/NAME --text
DIR/eval/new_domain.txt`` computes.

With ``base`` and ``instruct`` set in the config (e.g. Llama-3.2-1B and -Instruct), (a) and (b)
are skipped and the references are used as they are.
"""

from __future__ import annotations

import json
import os
import time

from jaxarith import arith, data
from jaxarith import data as data_lib
from jaxarith.arith.norms import MEASURES, norms_report
from jaxarith.data import chat
from jaxarith.decode.loop import Member
from jaxarith.errors import JaxarithError
from jaxarith.eval.instruct import evaluate_instruct
from jaxarith.eval.loss import eval_loss
from jaxarith.io.convert.export import save_hf
from jaxarith.io.refs import load_model
from train.config import from_dict
from train.experiments import config as config_lib
from train.experiments import report
from train.experiments.common import (
    Log,
    Stages,
    log_stderr,
    prepare_out,
    run_training,
    write_json,
    write_text,
)

MODELS = ("base", "instruct", "trained", "final", "instruct_trained")


# ----------------------------------------------------------------------------- training stages


def stage_train_configs(cfg: dict, out: str) -> dict:
    """The ``python -m train`` config of every training stage, built (and so checked) now.

    Returns:
      {stage name: TrainConfig} for the stages this config runs (``pretrain`` and ``instruct``
      only when their model is not given; ``trained`` and ``instruct_trained`` always).
    """
    models = os.path.join(out, "models")
    tokenizer = cfg["train"].get("model", {}).get("tokenizer", "")
    base_ref = cfg["base"] or os.path.join(models, "base")
    instruct_ref = cfg["instruct"] or os.path.join(models, "instruct")
    plan = {}
    if not cfg["base"]:
        plan["base"] = ("pretrain", None)
    if not cfg["instruct"]:
        plan["instruct"] = ("instruct", base_ref)
    plan["trained"] = ("continue", base_ref)
    plan["instruct_trained"] = ("continue", instruct_ref)
    built = {}
    for name, (stage, ref) in plan.items():
        raw = config_lib.deep_merge(cfg["train"], cfg["stages"][stage])
        if ref is not None:
            raw["model"] = {"ref": ref, "tokenizer": tokenizer,
                            **{k: v for k, v in raw.get("model", {}).items()
                               if k in ("compute_dtype", "remat")}}
        raw["out"] = os.path.join(out, "stages", name)
        raw.setdefault("export", {})["hf_dir"] = os.path.join(models, name)
        try:
            built[name] = from_dict(raw)
        except JaxarithError as e:
            raise type(e)(f"stage {name} ({stage}): {e}") from None
    return built


# ----------------------------------------------------------------------------- eval texts


def write_eval_texts(cfg: dict, tcfg, out: str) -> dict:
    """DIR/eval/{new,old}_domain.txt: held-out documents of the continue stage's sources.

    The documents are the same held-out split the training program leaves out of training
    (the last ``data.eval_fraction`` of each source), capped at ``eval.max_chars``.
    """
    d = os.path.join(out, "eval")
    os.makedirs(d, exist_ok=True)
    by_name = {s.name: s for s in tcfg.data.sources}
    paths = {}
    for key in ("new_domain", "old_domain"):
        path = os.path.join(d, f"{key}.txt")
        paths[key] = path
        if os.path.exists(path):
            continue
        src = by_name[cfg["eval"][key]]
        if tcfg.data.eval_fraction <= 0:
            raise JaxarithError("stages.continue.data.eval_fraction must be > 0 to hold out "
                                f"eval text for {key}")
        _, held = data_lib.split_documents(data_lib.read_documents(src),
                                           tcfg.data.eval_fraction)
        text = "\n\n".join(held)[: cfg["eval"]["max_chars"]]
        write_text(path, text)
    return paths


# ----------------------------------------------------------------------------- (c) and (e)


def norms(base: str, other: str) -> dict:
    """The norms report of ``other - base`` for every measure (abs, square), per layer."""
    return {m: norms_report(base, other, m, per_layer=True) for m in MEASURES}


def make_final(base: str, instruct: str, trained: str, dst: str) -> None:
    """``final = trained + (instruct - base)`` in float32, written as an HF model."""
    import jax.numpy as jnp

    b, i, t = (load_model(r, dtype=jnp.float32, progress=False) for r in (base, instruct, trained))
    for name, m in (("instruct", i), ("trained", t)):
        if m.config != b.config:
            raise JaxarithError(f"{name} model {m.directory} has a different architecture "
                                f"than the base {b.directory}")
    params = arith.apply_delta(t.params, arith.delta(i.params, b.params, b.config), b.config)
    save_hf(b.config, params, dst, dtype="float32", tokenizer_dir=t.directory, progress=False)


# ----------------------------------------------------------------------------- evaluation


def evaluate_model(ref: str, texts: dict, cfg: dict) -> dict:
    """New/old-domain loss (as ``jaxarith eval-loss`` computes it) and the instruction eval."""
    model = load_model(ref, progress=False)
    tok = model.tokenizer()
    res = {}
    for key, path in texts.items():
        with open(path, encoding="utf-8") as f:
            ids = tok(f.read())["input_ids"]
        res[f"{key}_loss"] = eval_loss(model.params, model.config, ids).loss
    path = data.BUNDLED.get(cfg["eval"]["instruct"], cfg["eval"]["instruct"])
    convs = chat.read_jsonl(path)[: cfg["eval"]["instruct_examples"]]
    ev = evaluate_instruct([Member(model.config)], [model.params], convs, tok,
                           max_new_tokens=cfg["eval"]["max_new_tokens"])
    res.update(instruct_loss=ev.nll, instruct_exact_match=ev.exact_match,
               instruct_tokens=ev.tokens, instruct_examples=ev.n,
               sample_answers=[{"question": c[-2]["content"], "reference": c[-1]["content"],
                                "answer": a} for c, a in zip(convs[:5], ev.answers[:5],
                                                             strict=True)])
    return res


# ----------------------------------------------------------------------------- the pipeline


def run(cfg: dict, out: str | None = None, *, log: Log = log_stderr, progress: bool = True) -> dict:
    """Run (or resume) the experiment; returns the results dict written to results.json.

    Args:
      cfg: a config from :func:`train.experiments.config.load`.
      out: output directory (default ``cfg["out"]``).
      log: where the per-stage progress lines go (stderr by default).
      progress: show the training programs' progress bars.
    """
    out = prepare_out(out or cfg["out"], "delta-transplant")
    tcfgs = stage_train_configs(cfg, out)
    if not progress:
        import dataclasses

        tcfgs = {k: dataclasses.replace(v, log=dataclasses.replace(v.log, progress=False))
                 for k, v in tcfgs.items()}
    models = os.path.join(out, "models")
    refs = {"base": cfg["base"] or os.path.join(models, "base"),
            "instruct": cfg["instruct"] or os.path.join(models, "instruct"),
            **{n: os.path.join(models, n) for n in ("trained", "final", "instruct_trained")}}
    st = Stages(7, log)

    def train(name):
        return lambda: run_training(name, tcfgs[name])

    for i, name in enumerate(("base", "instruct"), 1):
        if name in tcfgs:
            st.run(name, f"{'pre-train' if name == 'base' else 'instruction-tune'} "
                   f"{tcfgs[name].steps} steps", os.path.exists(refs[name]), train(name), i)
        else:
            st.i = i
            log(f"[{i}/7] {name}: given ({refs[name]})")
    norms_path = os.path.join(out, "delta", "norms.json")
    moved_path = os.path.join(out, "delta", "trained_minus_base.json")
    os.makedirs(os.path.dirname(norms_path), exist_ok=True)
    st.run("delta", "instruct - base, norms report", os.path.exists(norms_path),
           lambda: write_json(norms_path, norms(refs["base"], refs["instruct"])))
    st.run("trained", f"continue pre-training the base {tcfgs['trained'].steps} steps",
           os.path.exists(refs["trained"]), train("trained"))

    def do_final():
        write_json(moved_path, norms(refs["base"], refs["trained"]))
        make_final(refs["base"], refs["instruct"], refs["trained"], refs["final"])

    st.run("final", "trained + (instruct - base)",
           os.path.exists(refs["final"]) and os.path.exists(moved_path), do_final)
    st.run("instruct_trained",
           f"continue pre-training the instruct model {tcfgs['instruct_trained'].steps} steps",
           os.path.exists(refs["instruct_trained"]), train("instruct_trained"))

    texts = write_eval_texts(cfg, tcfgs["trained"], out)
    evals = {}

    def do_eval():
        for name in MODELS:
            path = os.path.join(out, "eval", f"{name}.json")
            if not os.path.exists(path):
                t0 = time.perf_counter()
                write_json(path, evaluate_model(refs[name], texts, cfg))
                log(f"    eval {name}: {time.perf_counter() - t0:.1f} s")
            with open(path) as f:
                evals[name] = json.load(f)

    st.run("eval", "domain losses and instruction eval of 5 models",
           all(os.path.exists(os.path.join(out, "eval", f"{m}.json")) for m in MODELS), do_eval)
    if not evals:
        do_eval()  # cached: read the per-model JSON files
    with open(norms_path) as f:
        delta = json.load(f)
    with open(moved_path) as f:
        moved = json.load(f)
    results = report.results(evals, delta, moved, refs)
    results["seconds"] = st.timings(os.path.join(out, "results.json"))
    results["seconds_total"] = round(sum(results["seconds"].values()), 1)
    write_json(os.path.join(out, "results.json"), results)
    report.write_all(out, results, delta, moved, tcfgs)
    return results

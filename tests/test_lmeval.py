"""model="jaxarith" in lm-evaluation-harness: parity with lm-eval's own ``hf`` backend on tiny
random Llama and GPT-2 models (per request, metrics, greedy generations), bounded compilation,
an 8-device mesh, proxy tuning (alpha=0 and a float64 numpy reference from transformers' logits),
the simple_evaluate route equal to the CLI, the shipped tasks, and clear errors."""

import json

import jax
import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the eval extra (installed by the test extra)

from jaxarith import cli, sharding, testing  # noqa: E402
from jaxarith.errors import ConfigError, JaxarithError  # noqa: E402
from jaxarith.eval.lmeval import JaxarithLM  # noqa: E402  (registers model="jaxarith")
from jaxarith.eval.lmeval.run import task_manager  # noqa: E402
from jaxarith.eval.tasks import TASK_NAMES, TASKS_DIR  # noqa: E402
from jaxarith.testing import count_compiles  # noqa: E402

# documents per task: enough to exercise every path (ppl docs 1 and 2 are longer than the tiny
# models' 128-token context: several rolling windows each)
SAMPLES = {"jaxarith_mc": list(range(6)), "jaxarith_ppl": [1, 2, 3],
           "jaxarith_gen": list(range(4))}




@pytest.fixture(scope="module")
def tm():
    return task_manager(list(TASK_NAMES))


def _run(lm, tm, samples=SAMPLES):
    return lm_eval.simple_evaluate(model=lm, tasks=list(samples), task_manager=tm,
                                   samples=samples, log_samples=True, bootstrap_iters=0)


def _responses(results, task):
    """Per request: the backend's raw answer ((logprob, is_greedy), a float, or a string)."""
    out = []
    for s in results["samples"][task]:
        out += [r[0] for r in s["resps"]]
    return out


def _metrics(results, task):
    return {k: v for k, v in results["results"][task].items() if "," in k}


@pytest.fixture(scope="module")
def runs(llama_dir, gpt2_dir, tm):
    """Both backends over the three shipped tasks, per model; and compiles of jaxarith's run."""
    from lm_eval.models.huggingface import HFLM

    out = {}
    for name, (d, _) in (("llama", llama_dir), ("gpt2", gpt2_dir)):
        hf_lm = HFLM(pretrained=d, dtype="float32", device="cpu", batch_size=8)
        hf = _run(hf_lm, tm)
        lm = JaxarithLM(pretrained=d, batch_size=8)
        with count_compiles() as n:
            ours = _run(lm, tm)
        out[name] = hf, ours, n[0], lm, hf_lm
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_loglikelihood_and_metrics_equal_the_hf_backend(name, runs):
    hf, ours, *_ = runs[name]
    a, b = _responses(hf, "jaxarith_mc"), _responses(ours, "jaxarith_mc")
    assert len(a) == len(b) == 4 * len(SAMPLES["jaxarith_mc"])
    np.testing.assert_allclose([x[0] for x in b], [x[0] for x in a], rtol=0, atol=1e-4)
    assert [x[1] for x in b] == [x[1] for x in a]
    assert _metrics(ours, "jaxarith_mc") == _metrics(hf, "jaxarith_mc")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_rolling_loglikelihood_equals_the_hf_backend(name, runs):
    hf, ours, _, lm, hf_lm = runs[name]
    # per document: sums of up to ~640 log-probabilities, which lm-eval's hf backend adds in
    # float32 (about 1e-4 of rounding at a total of ~4000 nats); jaxarith adds in float64
    a, b = _responses(hf, "jaxarith_ppl"), _responses(ours, "jaxarith_ppl")
    np.testing.assert_allclose(b, a, rtol=1e-7, atol=1e-4)
    # per rolling window (a loglikelihood request of <= 128 tokens) against float64 sums of
    # the hf backend's own model call: within 1e-4
    texts = [s["doc"]["text"] for s in ours["samples"]["jaxarith_ppl"]]
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = [(None, *make_disjoint_window(w)) for t in texts
               for w in get_rolling_token_windows(
                   lm.tok_encode(t), lm.prefix_token_id, lm.max_length, context_len=1)]
    assert len(windows) >= 2 * len(texts)  # several windows per long document
    ref = []
    for _, ctx, cont in windows:
        inp = (ctx + cont)[-(lm.max_length + 1):][:-1]
        with torch.no_grad():
            logits = hf_lm._model_call(torch.tensor([inp])).numpy()[0]
        rows = _np_log_softmax(logits)[len(inp) - len(cont):]
        ref.append(sum(rows[i, t] for i, t in enumerate(cont)))
    mine = lm._loglikelihood_tokens(windows, disable_tqdm=True)
    np.testing.assert_allclose([x[0] for x in mine], ref, rtol=0, atol=1e-4)
    mine = _metrics(ours, "jaxarith_ppl")
    assert mine.keys() == _metrics(hf, "jaxarith_ppl").keys()
    for k, v in _metrics(hf, "jaxarith_ppl").items():
        assert mine[k] == (v if isinstance(v, str) else pytest.approx(v, rel=1e-6)), k


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_generate_until_equals_the_hf_backend(name, runs):
    hf, ours, *_ = runs[name]
    a, b = _responses(hf, "jaxarith_gen"), _responses(ours, "jaxarith_gen")
    assert b == a and len(a) == len(SAMPLES["jaxarith_gen"])
    assert all("\n" not in x for x in b)  # cut at the task's until strings
    assert _metrics(ours, "jaxarith_gen") == _metrics(hf, "jaxarith_gen")


def test_compiled_programs_are_bounded_by_the_buckets(runs, tm):
    _, ours, compiles, lm, _ = runs["llama"]
    lengths = {sum(map(len, lm._encode_pair(*args)))
               for s in ours["samples"]["jaxarith_mc"] for args in s["arguments"]}
    assert len(lengths) > len(lm.buckets)  # more distinct lengths than programs
    # scoring: one program per bucket at most; generation: one per prompt bucket
    assert lm.buckets == (16, 32, 64, 128)
    assert compiles <= 2 * len(lm.buckets)
    with count_compiles() as n:  # the same requests again compile nothing
        _run(lm, tm)
    assert n[0] == 0


def test_eight_device_mesh_equals_one_device(llama_dir, runs, tm):
    assert jax.device_count() == 8
    one = runs["llama"][1]
    samples = {"jaxarith_mc": [0, 1, 2], "jaxarith_gen": [0, 1]}
    lm = JaxarithLM(pretrained=llama_dir[0], mesh="data=2+fsdp=2+tensor=2", batch_size=4)
    assert dict(lm.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    many = _run(lm, tm, samples)
    a = _responses(one, "jaxarith_mc")[:12]
    b = _responses(many, "jaxarith_mc")
    np.testing.assert_allclose([x[0] for x in b], [x[0] for x in a], rtol=0, atol=1e-5)
    assert [x[1] for x in b] == [x[1] for x in a]
    assert _responses(many, "jaxarith_gen") == _responses(one, "jaxarith_gen")[:2]


def test_mesh_spec_accepts_plus_as_separator():
    plus = sharding.parse_mesh_spec("data=2+fsdp=2+tensor=2", 8)
    assert plus == sharding.parse_mesh_spec("data=2,fsdp=2,tensor=2", 8)
    assert sharding.parse_mesh_spec("fsdp=-1+tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2,
                                                                "expert": 1}


def _np_log_softmax(z):
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def test_proxy_tuning_scores_the_combined_distribution(llama_dir, llama_tied_dir, gpt2_dir):
    base, expert, anti = llama_dir, llama_tied_dir, gpt2_dir
    # three multiple-choice requests of the shipped task (17-32 tokens: the 32-token bucket
    # of the parity runs, so the single-model program is reused)
    with open(f"{TASKS_DIR}/jaxarith_mc.jsonl") as f:
        docs = [json.loads(line) for line in f][:3]
    pairs = [(d["context"], " " + d["choices"][0]) for d in docs]
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    plain = JaxarithLM(pretrained=base[0]).loglikelihood(reqs, disable_tqdm=True)
    args = dict(pretrained=base[0], expert=expert[0], anti_expert=anti[0])
    zero = JaxarithLM(**args, alpha=0.0).loglikelihood(reqs, disable_tqdm=True)
    np.testing.assert_allclose([x[0] for x in zero], [x[0] for x in plain], rtol=0, atol=1e-5)
    assert [x[1] for x in zero] == [x[1] for x in plain]
    eft0 = JaxarithLM(pretrained=base[0], eft_tuned=expert[0], eft_ref=anti[0], beta=0)
    assert eft0.loglikelihood(reqs, disable_tqdm=True) == zero  # the same weights: (1, 0, 0)
    # alpha = 0.7 against float64 numpy on transformers' logits of the three models
    lm = JaxarithLM(**args, alpha="0.7")  # model_args strings arrive unparsed sometimes
    ours = lm.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip(pairs, ours, strict=True):
        c, x = lm._encode_pair(ctx, cont)
        ids = np.asarray([c + x])[:, :-1]
        logp = _np_log_softmax(sum(w * _np_log_softmax(testing.hf_logits(m[1], ids)[0])
                                   for w, m in ((1.0, base), (0.7, expert), (-0.7, anti))))
        rows = logp[len(c) - 1:]
        assert lp == pytest.approx(sum(rows[i, t] for i, t in enumerate(x)), abs=1e-4)
        assert greedy == bool(np.all(rows.argmax(-1) == np.asarray(x)))


def test_shared_contexts_score_the_combined_distribution(llama_dir, llama_tied_dir, gpt2_dir):
    # every choice of two documents (plus a one-token continuation, scored from the context
    # alone) under proxy tuning, with a window that cuts some contexts on the left: requests
    # sharing a (cut) context are scored from one run of it, every member alike
    from lm_eval.api.instance import Instance

    from jaxarith.eval.lmeval import scoring

    with open(f"{TASKS_DIR}/jaxarith_mc.jsonl") as f:
        docs = [json.loads(line) for line in f][:2]
    pairs = [(d["context"], " " + c) for d in docs for c in d["choices"]]
    pairs.append((docs[0]["context"], "\n"))
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    base, expert, anti = llama_dir, llama_tied_dir, gpt2_dir
    lm = JaxarithLM(pretrained=base[0], expert=expert[0], anti_expert=anti[0], alpha=0.7,
                    max_length=24)
    enc = [lm._encode_pair(*p) for p in pairs]
    assert len(enc[-1][1]) == 1
    rows = scoring._rows(enc, lm.max_length)
    calls = list(scoring._calls(rows, lm.max_length, lm.batch_size, lm.score_buckets))
    units = [u for *_, packed in calls for row in packed for u in row]
    assert sorted(i for _, idx in units for i in idx) == list(range(len(pairs)))
    assert max(len(idx) for _, idx in units) >= 3  # shared, though some contexts are cut
    assert max(len(row) for *_, packed in calls for row in packed) >= 2  # units share rows
    assert any(len(c) + len(x) > lm.max_length + 1 for c, x in enc)  # some are cut
    ours = lm.loglikelihood(reqs, disable_tqdm=True)
    for (c, x), (lp, greedy) in zip(enc, ours, strict=True):
        whole = (c + x)[-(lm.max_length + 1):]
        ids = np.asarray([whole[:-1]])
        logp = _np_log_softmax(sum(w * _np_log_softmax(testing.hf_logits(m[1], ids)[0])
                                   for w, m in ((1.0, base), (0.7, expert), (-0.7, anti))))
        rows = logp[len(whole) - 1 - len(x):]
        assert lp == pytest.approx(sum(rows[i, t] for i, t in enumerate(x)), abs=1e-4)
        assert greedy == bool(np.all(rows.argmax(-1) == np.asarray(x)))


def test_simple_evaluate_by_name_equals_the_cli(llama_dir, capsys):
    # the mesh and batch of the 8-device test: its programs are reused
    d = llama_dir[0]
    by_name = lm_eval.simple_evaluate(
        model="jaxarith", model_args=f"pretrained={d},mesh=data=2+fsdp=2+tensor=2,dtype=float32",
        tasks=["jaxarith_mc"], limit=3, batch_size=4, task_manager=task_manager(["jaxarith_mc"]))
    assert cli.main(["lm-eval", d, "--tasks", "jaxarith_mc", "--limit", "3", "--mesh",
                     "data=2,fsdp=2,tensor=2", "--batch-size", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"] == json.loads(json.dumps(by_name["results"]))
    assert out["results"]["jaxarith_mc"]["sample_len"] == 3
    # model="hf" still resolves after jaxarith registered itself
    from lm_eval.api.registry import get_model

    assert get_model("hf").__name__ == "HFLM"


def test_cli_writes_results_atomically(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["lm-eval", gpt2_dir[0], "--tasks", "jaxarith_gen", "--limit", "2",
                     "--output-path", str(out), "--log-samples", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == printed["results"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["task"] == "jaxarith_gen"
    assert cli.main(["lm-eval", gpt2_dir[0], "--tasks", "jaxarith_gen", "--limit", "2",
                     "--output-path", str(out), "--json"]) == 2  # exists: refused
    assert "exists" in json.loads(capsys.readouterr().out)["error"]


def test_shipped_tasks_are_package_data():
    import tomllib

    with open("pyproject.toml", "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["jaxarith"]
    import fnmatch
    import os

    files = os.listdir(TASKS_DIR)
    for name in TASK_NAMES:
        for ext in ("yaml", "jsonl"):
            assert f"{name}.{ext}" in files
            assert any(fnmatch.fnmatch(f"eval/tasks/{name}.{ext}", p) for p in data)


def test_generation_kwargs_map_to_the_decoder_samplers(gpt2_dir):
    from lm_eval.models.utils import normalize_gen_kwargs

    from jaxarith.decode.sampling import Greedy, Sampling

    lm = JaxarithLM(pretrained=gpt2_dir[0])

    def sampler(**kw):
        kw = dict(normalize_gen_kwargs(kw, 16))
        kw.pop("until", None), kw.pop("max_gen_toks")
        return lm._sampler(kw)

    assert sampler(do_sample=False, temperature=0.7) == Greedy()
    assert sampler(temperature=0.0) == Greedy()
    assert sampler(do_sample=True, temperature=0.7, top_k=5, top_p=0.9) == \
        Sampling(temperature=0.7, top_k=5, top_p=0.9)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        sampler(do_sample=True, repetition_penalty=1.2)


def test_bad_inputs_are_clear_errors(llama_dir, gpt2_dir, tmp_path, capsys):
    with pytest.raises(JaxarithError, match="no such directory"):
        JaxarithLM(pretrained=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="unknown model_args.*temperture"):
        JaxarithLM(pretrained=llama_dir[0], temperture=1)
    with pytest.raises(ConfigError, match="alpha='high': expected a number"):
        JaxarithLM(pretrained=llama_dir[0], expert=gpt2_dir[0], anti_expert=gpt2_dir[0],
                   alpha="high")
    with pytest.raises(ConfigError, match="both expert= and anti_expert="):
        JaxarithLM(pretrained=llama_dir[0], expert=gpt2_dir[0])
    with pytest.raises(ConfigError, match="mesh spec"):
        JaxarithLM(pretrained=llama_dir[0], mesh="data=3")
    big = tmp_path / "big_vocab"
    testing.make_hf_model(big, testing.tiny_gpt2_config(vocab_size=2048, n_layer=1))
    # one tokenizer, tables padded differently: combined over the tokenizer's rows
    lm = JaxarithLM(pretrained=llama_dir[0], expert=str(big), anti_expert=gpt2_dir[0])
    assert lm.spec.vocab_limit == len(lm.tokenizer) == 1024
    small = tmp_path / "small_vocab"
    testing.make_hf_model(small, testing.tiny_gpt2_config(vocab_size=1000, n_layer=1))
    with pytest.raises(ConfigError, match=r"tokenizer has 1024 tokens but the embedding table "
                                          r"of .*small_vocab has 1000 rows"):
        JaxarithLM(pretrained=llama_dir[0], expert=str(small), anti_expert=gpt2_dir[0])
    with pytest.raises(ConfigError, match=r"unknown task\(s\): jaxarith_mcc \(did you mean "
                                          r"jaxarith_mc"):
        task_manager(["jaxarith_mc", "jaxarith_mcc"], builtin=False)
    with pytest.raises(ConfigError, match="include path .*: not a directory"):
        task_manager(["jaxarith_mc"], [tmp_path / "none"], builtin=False)
    # the CLI: one JSON error line, exit 2
    assert cli.main(["lm-eval", str(tmp_path / "nope"), "--tasks", "jaxarith_mc",
                     "--json"]) == 2
    assert "no such directory" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.slow  # indexes lm-eval's ~15k built-in task YAMLs (5-15 s)
def test_cli_unknown_task_searches_every_index(llama_dir, capsys):
    assert cli.main(["lm-eval", llama_dir[0], "--tasks", "jaxarith_mcc", "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert "unknown task(s): jaxarith_mcc" in err and "jaxarith_mc" in err
    assert "lm-eval's" in err


@pytest.mark.slow  # a fresh interpreter (~5 s); test_simple_evaluate_by_name checks in-process
def test_hf_backend_still_registered_first():
    # importing jaxarith.eval.lmeval before any lm-eval model lookup must not hide the built-ins
    import subprocess
    import sys

    code = ("import jaxarith.eval.lmeval, lm_eval.api.registry as r; "
            "print(r.get_model('hf').__name__, r.get_model('jaxarith').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["HFLM", "JaxarithLM"]


_ = torch  # transformers' models (fixtures) need torch


def test_units_and_rows_respect_the_window():
    # rolling windows: equal one-token contexts, long continuations -> one unit each (a unit
    # never exceeds max_length slots); four choices of one context -> one unit of 5 + 4 tokens;
    # one-token continuations add scored slots, not tokens, and are counted against the window
    from jaxarith.eval.lmeval import scoring

    pairs = ([([1], list(range(2, 60)))] * 3 + [([5, 6, 7, 8, 9], [10, 11])] * 4
             + [([3, 4], [7])] * 70)
    rows = scoring._rows(pairs, 64)
    units = scoring._units(rows, 64)
    assert [len(idx) for _, idx in units] == [1, 1, 1, 4, 64, 6]
    assert [scoring._cost(rows, *u) for u in units] == [58, 58, 58, 9, 64, 6]
    calls = list(scoring._pack(rows, units, 8, scoring.score_buckets(64)))
    # best fit decreasing into 64-slot rows: 64 | 58 + 6 (the tightest fit) | 58 | 58 | 9
    assert [(t, k, [[len(idx) for _, idx in r] for r in packed]) for t, k, packed in calls] == [
        (64, 64, [[64], [1, 6], [1], [1], [4]])]

"""lm-eval the way instruct models are evaluated: chat templates, system instructions and few-shot
examples as turns with the same prompts and numbers as lm-eval's ``hf`` backend; per-member
templates in a proxy-tuned combination against float64 numpy on transformers' logits; and
``batch_size="auto"``."""

import json
import shutil

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")  # the eval extra (installed by the test extra)

from jaxarith import cli, testing  # noqa: E402
from jaxarith.errors import ConfigError  # noqa: E402
from jaxarith.eval.lmeval import JaxarithLM, autobatch, templates  # noqa: E402
from jaxarith.eval.lmeval.run import evaluate, task_manager  # noqa: E402
from jaxarith.eval.tasks import TASK_NAMES  # noqa: E402

# ChatML with a system turn (the bundled BPE has no chat tokens: the markers are plain text)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM = "You complete sentences from the Python documentation."
SAMPLES = {"jaxarith_mc": [0, 1, 2, 3], "jaxarith_gen": [0, 1, 2]}
FEWSHOT = 2


def _with_template(src: str, dst) -> str:
    """A copy of an HF model directory whose tokenizer carries :data:`CHATML`."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = CHATML
    tok.save_pretrained(str(dst))
    return str(dst)


@pytest.fixture(scope="module")
def chat_dir(llama_dir, tmp_path_factory):
    return _with_template(llama_dir[0], tmp_path_factory.mktemp("chat") / "llama_chat")


@pytest.fixture(scope="module")
def chat_tied_dir(llama_tied_dir, tmp_path_factory):
    return _with_template(llama_tied_dir[0], tmp_path_factory.mktemp("chat") / "tied_chat")


@pytest.fixture(scope="module")
def tm():
    return task_manager(list(TASK_NAMES))


def _run(lm, tm, samples=SAMPLES, **kw):
    kw = {"apply_chat_template": True, "system_instruction": SYSTEM,
          "fewshot_as_multiturn": True, "num_fewshot": FEWSHOT, **kw}
    return lm_eval.simple_evaluate(model=lm, tasks=list(samples), task_manager=tm,
                                   samples=samples, log_samples=True, bootstrap_iters=0, **kw)


def _responses(results, task):
    return [r[0] for s in results["samples"][task] for r in s["resps"]]


def _arguments(results, task):
    return [tuple(a[:2]) for s in results["samples"][task] for a in s["arguments"]]


def _np_log_softmax(z):
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def chat_runs(chat_dir, tm):
    from lm_eval.models.huggingface import HFLM

    hf = _run(HFLM(pretrained=chat_dir, dtype="float32", device="cpu", batch_size=8), tm)
    ours = _run(JaxarithLM(pretrained=chat_dir, batch_size=8), tm)
    return hf, ours


def test_chat_prompts_equal_the_hf_backend(chat_runs):
    hf, ours = chat_runs
    for task in SAMPLES:
        assert _arguments(ours, task) == _arguments(hf, task)
    ctx = _arguments(ours, "jaxarith_mc")[0][0]
    # the system instruction, FEWSHOT examples as turns, then the question's generation prompt
    assert ctx.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert ctx.count("<|im_start|>assistant\n") == FEWSHOT + 1
    assert ctx.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # a chat template drops the target delimiter: the choices follow the prompt directly
    assert not _arguments(ours, "jaxarith_mc")[0][1].startswith(" ")


def test_chat_loglikelihoods_and_generations_equal_the_hf_backend(chat_runs):
    hf, ours = chat_runs
    a, b = _responses(hf, "jaxarith_mc"), _responses(ours, "jaxarith_mc")
    assert len(a) == len(b) == 4 * len(SAMPLES["jaxarith_mc"])
    diff = np.abs(np.array([x[0] for x in b]) - np.array([x[0] for x in a]))
    print(f"max |dlogl| vs hf with a chat template: {diff.max():.2e}")
    assert diff.max() <= 1e-4
    assert [x[1] for x in b] == [x[1] for x in a]
    assert _responses(ours, "jaxarith_gen") == _responses(hf, "jaxarith_gen")
    for task in SAMPLES:
        mine = {k: v for k, v in ours["results"][task].items() if "," in k}
        assert mine == {k: v for k, v in hf["results"][task].items() if "," in k}


def test_single_turn_fewshot_equals_the_hf_backend(chat_dir, tm):
    # fewshot_as_multiturn=False: the examples and the question in one user message
    from lm_eval.models.huggingface import HFLM

    samples = {"jaxarith_mc": [4, 5], "jaxarith_gen": [3]}
    hf = _run(HFLM(pretrained=chat_dir, dtype="float32", device="cpu", batch_size=8), tm,
              samples, fewshot_as_multiturn=False)
    ours = _run(JaxarithLM(pretrained=chat_dir, batch_size=8), tm, samples,
                fewshot_as_multiturn=False)
    ctx = _arguments(ours, "jaxarith_mc")[0][0]
    assert ctx.count("<|im_start|>user\n") == 1 and ctx.count("<|im_start|>assistant\n") == 1
    for task in samples:
        assert _arguments(ours, task) == _arguments(hf, task)
    a, b = _responses(hf, "jaxarith_mc"), _responses(ours, "jaxarith_mc")
    np.testing.assert_allclose([x[0] for x in b], [x[0] for x in a], rtol=0, atol=1e-4)
    assert [x[1] for x in b] == [x[1] for x in a]
    assert _responses(ours, "jaxarith_gen") == _responses(hf, "jaxarith_gen")


def test_plain_rendering_is_lm_evals_prompt_without_a_template(tm):
    # a member without a template reads lm-eval's own apply_chat_template=False prompt
    from lm_eval.tasks import get_task_dict

    task = get_task_dict(["jaxarith_mc"], tm)["jaxarith_mc"]
    task.set_config(key="num_fewshot", value=FEWSHOT)

    def contexts(**kw):
        task.set_fewshot_seed(1234)
        task.build_all_requests(limit=3, system_instruction=SYSTEM, **kw)
        return [i.args[0] for i in task.instances]

    plain = contexts(apply_chat_template=False)
    assert plain[0].count("\n\n") >= FEWSHOT  # few-shot examples joined as lm-eval joins them
    for multiturn in (True, False):
        rendered = contexts(apply_chat_template=True, fewshot_as_multiturn=multiturn,
                            chat_template=lambda h, add_generation_prompt=True:
                            templates.plain(h))
        assert rendered == plain


def _members_reference(members, contexts, cont, n, lm):
    """float64 numpy log p of the last ``n`` tokens of each member's ``context + cont`` (in
    the model's window) under
    sum_i w_i log_softmax(z_i) of transformers' logits, and whether they are the greedy ones;
    the scored ids must agree across members."""
    logp, scored = None, None
    for (w, model), ctx in zip(members, contexts, strict=True):
        whole = lm.tok_encode(ctx + cont)
        assert scored is None or whole[-n:] == scored
        scored = whole[-n:]
        inp = whole[-(lm.max_length + 1):][:-1]  # the window, cut on the left as lm-eval does
        rows = _np_log_softmax(testing.hf_logits(model, np.asarray([inp]))[0])[-n:]
        logp = w * rows if logp is None else logp + w * rows
    logp = _np_log_softmax(logp)
    return (sum(logp[i, t] for i, t in enumerate(scored)),
            bool(np.all(logp.argmax(-1) == np.asarray(scored))))


def test_proxy_tuning_with_a_templated_expert_equals_numpy(llama_dir, llama_tied_dir,
                                                           chat_tied_dir, gpt2_dir, tm):
    # base and anti-expert read lm-eval's plain prompt, the chat expert its chat template; the
    # continuation ids (the choice) are the same for all three
    from lm_eval.tasks import get_task_dict
    from transformers import AutoTokenizer

    alpha = 0.7
    lm = JaxarithLM(pretrained=llama_dir[0], expert=chat_tied_dir, anti_expert=gpt2_dir[0],
                    alpha=alpha, member_templates="expert=auto+base=none+anti_expert=none")
    assert lm.templates.per_member
    task = get_task_dict(["jaxarith_mc"], tm)["jaxarith_mc"]
    task.set_config(key="num_fewshot", value=1)

    def build(**kw):
        task.set_fewshot_seed(1234)
        task.build_all_requests(limit=3, system_instruction=SYSTEM, **kw)
        return list(task.instances)

    plain = [i.args[0] for i in build(apply_chat_template=False)]
    hf_tok = AutoTokenizer.from_pretrained(chat_tied_dir)
    hf_chat = [i.args for i in build(apply_chat_template=True, fewshot_as_multiturn=True,
                                     chat_template=lambda h, add_generation_prompt=True:
                                     hf_tok.apply_chat_template(
                                         h, tokenize=False,
                                         add_generation_prompt=add_generation_prompt))]
    reqs = build(apply_chat_template=True, fewshot_as_multiturn=True,
                 chat_template=lm.apply_chat_template)
    assert [r.args for r in reqs] == hf_chat  # lm-eval gets the expert's (transformers') text
    ours = lm.loglikelihood(reqs, disable_tqdm=True)

    # transformers' models (the chat expert is llama_tied's weights with a template)
    members = [(1.0, llama_dir[1]), (alpha, llama_tied_dir[1]), (-alpha, gpt2_dir[1])]
    worst = 0.0
    for (ctx, cont), base_ctx, (lp, greedy) in zip(hf_chat, plain, ours, strict=True):
        # the choice's own tokens are scored: the expert's "\n" (its generation prompt, which
        # lm-eval's hf backend would score with the continuation) stays its context
        assert ctx.endswith("assistant\n") and not base_ctx[-1].isspace()
        n = len(lm.tok_encode(base_ctx + cont)) - len(lm.tok_encode(base_ctx))
        ref, ref_greedy = _members_reference(members, [base_ctx, ctx, base_ctx], cont, n, lm)
        worst = max(worst, abs(lp - ref))
        assert greedy == ref_greedy
    print(f"max |dlogl| proxy tuning with a templated expert vs numpy: {worst:.2e}")
    assert worst <= 1e-4
    # the same requests with one shared (plain) context differ: the templates are used
    shared = JaxarithLM(pretrained=llama_dir[0], expert=chat_tied_dir, anti_expert=gpt2_dir[0],
                        alpha=alpha)
    same_ctx = shared.loglikelihood(reqs, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(same_ctx, ours, strict=True)) > 1e-2


def test_member_templates_are_checked(llama_dir, chat_tied_dir, gpt2_dir):
    from lm_eval.api.instance import Instance

    args = dict(pretrained=llama_dir[0], expert=chat_tied_dir, anti_expert=gpt2_dir[0])
    with pytest.raises(ConfigError, match="no member 'expret'; the members are base, expert, "
                                          "anti_expert"):
        JaxarithLM(**args, member_templates={"expret": True})
    with pytest.raises(ConfigError, match="member_templates base=3: expected auto, none"):
        JaxarithLM(**args, member_templates={"base": 3})
    with pytest.raises(ConfigError, match="no member 'expert'; the members are model, tuned, "
                                          "reference"):
        JaxarithLM(pretrained=llama_dir[0], eft_tuned=chat_tied_dir, eft_ref=gpt2_dir[0],
                   member_templates="expert=auto")
    # the base's tokenizer has no template: auto (the default for every member) names it
    lm = JaxarithLM(**args, member_templates={"anti_expert": "none"})
    with pytest.raises(ConfigError, match="member base: its tokenizer has no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])
    lm = JaxarithLM(**args, member_templates="expert=auto+base=none+anti_expert=none")
    with pytest.raises(ConfigError, match="member expert: chat template 'chatml' asked for, "
                                          "but its tokenizer has a single unnamed template"):
        JaxarithLM(**args, member_templates="expert=chatml+base=none+anti_expert=none"
                   ).apply_chat_template([{"role": "user", "content": "hi"}])
    # a context no template rendered: lm-eval ran without apply_chat_template
    req = Instance("loglikelihood", {}, ("The answer is", " forty"), 0)
    with pytest.raises(ConfigError, match="no chat template rendered: run lm-eval with "
                                          "apply_chat_template=True"):
        lm.loglikelihood([req], disable_tqdm=True)
    # the expert's continuation after "...assistant\n" is "\n.y" -> ["\n", ".", "y"], the
    # base's after "x." is "y" alone ("x" "..": the "." merged into its context): not aligned
    ctx = lm.apply_chat_template([{"role": "user", "content": "x."}])
    assert ctx.endswith("x.<|im_end|>\n<|im_start|>assistant\n")
    req = Instance("loglikelihood", {}, (ctx, ".y"), 0)
    with pytest.raises(ConfigError, match=r"member expert: the continuation '.y' tokenises as "
                                          r"\[201, 16, 91\] after its own context but as \[91\] "
                                          r"after member base's"):
        lm.loglikelihood([req], disable_tqdm=True)
    # aligned: the expert's "\n" stays its context, the base reads lm-eval's plain prompt
    ctx = lm.apply_chat_template([{"role": "user", "content": "The answer is"}])
    (lp, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, "forty"), 0)],
                                disable_tqdm=True)
    assert np.isfinite(lp)


def test_generation_reads_each_members_prompt(llama_dir, chat_dir, chat_tied_dir, gpt2_dir, tm):
    # alpha = 0: only the base counts, and it reads the plain prompt: the greedy answers equal
    # the base model's own run without a chat template, though lm-eval passed the chat text
    samples = {"jaxarith_gen": [0, 1, 2, 3]}
    lm = JaxarithLM(pretrained=llama_dir[0], expert=chat_tied_dir, anti_expert=gpt2_dir[0],
                    alpha=0.0, member_templates={"expert": True, "base": False,
                                                 "anti_expert": False})
    ours = _run(lm, tm, samples, num_fewshot=1)
    assert all("<|im_start|>assistant\n" in a[0] for a in _arguments(ours, "jaxarith_gen"))
    plain = _run(JaxarithLM(pretrained=llama_dir[0]), tm, samples, num_fewshot=1,
                 apply_chat_template=False, fewshot_as_multiturn=False)
    assert _responses(ours, "jaxarith_gen") == _responses(plain, "jaxarith_gen")
    # the base's weights reading the chat text instead answer differently
    chat = _run(JaxarithLM(pretrained=chat_dir), tm, samples, num_fewshot=1)
    assert _responses(chat, "jaxarith_gen") != _responses(plain, "jaxarith_gen")


def test_python_and_cli_routes_agree(llama_dir, chat_tied_dir, gpt2_dir, capsys):
    args = {"pretrained": llama_dir[0], "expert": chat_tied_dir, "anti_expert": gpt2_dir[0],
            "alpha": 0.5}
    py = evaluate(args, ["jaxarith_mc"], limit=2, num_fewshot=1, system_instruction=SYSTEM,
                  member_templates={"expert": True, "base": False, "anti_expert": False})
    assert py["config"]["member_templates"] == {"base": "none", "expert": "auto",
                                                "anti_expert": "none"}
    assert cli.main(["lm-eval", llama_dir[0], "--expert", chat_tied_dir, "--anti-expert",
                     gpt2_dir[0], "--alpha", "0.5", "--tasks", "jaxarith_mc", "--limit", "2",
                     "--num-fewshot", "1", "--system-instruction", SYSTEM,
                     "--member-chat-template", "expert=auto", "base=none", "anti_expert=none",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"] == json.loads(json.dumps(py["results"]))
    assert out["config"]["member_templates"] == py["config"]["member_templates"]
    # clear errors naming the flag, before any model loads
    for bad, msg in (
            (["--fewshot-as-multiturn"], "fewshot_as_multiturn needs a chat template"),
            (["--member-chat-template", "expert=auto"], "--member-chat-template needs a "
                                                        "combination"),
            (["--apply-chat-template", "--fewshot-as-multiturn", "maybe"],
             "--fewshot-as-multiturn maybe: expected true or false")):
        assert cli.main(["lm-eval", llama_dir[0], "--tasks", "jaxarith_mc", *bad,
                         "--json"]) == 2
        assert msg in json.loads(capsys.readouterr().out)["error"]


def test_a_named_template_is_rendered(chat_dir, tmp_path):
    from transformers import AutoTokenizer

    named = tmp_path / "named"
    shutil.copytree(chat_dir, named)
    tok = AutoTokenizer.from_pretrained(chat_dir)
    terse = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok.chat_template = {"default": CHATML, "terse": terse}
    tok.save_pretrained(str(named))
    conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    assert JaxarithLM(pretrained=str(named)).apply_chat_template(conv) == \
        tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    lm = JaxarithLM(pretrained=str(named), chat_template_name="terse")
    assert lm.apply_chat_template(conv) == f"[system] {SYSTEM}\n[user] Hi\n"
    assert lm.chat_template(True) == terse
    with pytest.raises(ConfigError, match=r"no chat template 'chatty' \(it has default, "
                                          r"terse\)"):
        JaxarithLM(pretrained=str(named), chat_template_name="chatty").apply_chat_template(conv)


def test_auto_batch_is_the_largest_that_fits(llama_dir):
    lm = JaxarithLM(pretrained=llama_dir[0])
    t = max(lm.max_length, 256)

    def need(rows):
        return autobatch.program_bytes(lm.spec, lm.params, rows, t)

    assert need(1) < need(2) < need(4)  # rows cost memory (the test can see a change)
    budget = need(3)
    a = autobatch.choose(lm.spec, lm.params, row_slots=t, budget_bytes=budget)
    assert a.size == 3 and a.program_bytes <= budget < need(a.size + 1)
    # not even one row fits the budget: one row anyway (never fails where batch 1 fits)
    a = autobatch.choose(lm.spec, lm.params, row_slots=t, budget_bytes=1)
    assert a.size == 1
    # on this CPU: the host's memory is ample, the CPU cap decides
    a = autobatch.choose(lm.spec, lm.params, row_slots=t)
    assert (a.source, a.size, a.cap) == ("host", autobatch.CPU_MAX_BATCH, autobatch.CPU_MAX_BATCH)
    assert autobatch.choose(lm.spec, lm.params, row_slots=t, max_batch_size=5).size == 5


def test_auto_batch_runs_and_reports_its_choice(llama_dir, tm, monkeypatch, capsys, caplog):
    samples = {"jaxarith_mc": [0, 1, 2], "jaxarith_gen": [0, 1]}
    kw = dict(num_fewshot=0, apply_chat_template=False, fewshot_as_multiturn=False)
    fixed = _run(JaxarithLM(pretrained=llama_dir[0], batch_size=8), tm, samples, **kw)
    # a device with room for less than one row: batch 1, and the same answers
    monkeypatch.setattr(autobatch, "budget", lambda mesh: (1, "device"))
    with caplog.at_level("INFO", logger="jaxarith.eval.lmeval.lm"):
        lm = JaxarithLM(pretrained=llama_dir[0], batch_size="auto")
    assert lm.batch_size == 1 and "batch_size=auto: 1 packed rows" in caplog.text
    tiny = _run(lm, tm, samples, **kw)
    assert tiny["config"]["batch_sizes"] == [1]
    assert tiny["config"]["auto_batch"]["size"] == 1
    np.testing.assert_allclose([x[0] for x in _responses(tiny, "jaxarith_mc")],
                               [x[0] for x in _responses(fixed, "jaxarith_mc")], atol=1e-5)
    assert _responses(tiny, "jaxarith_gen") == _responses(fixed, "jaxarith_gen")
    monkeypatch.undo()
    # the CLI: --batch-size auto with a cap, reported in the JSON and in the summary
    base = ["lm-eval", llama_dir[0], "--tasks", "jaxarith_mc", "--limit", "2",
            "--batch-size", "auto", "--max-batch-size", "4"]
    assert cli.main([*base, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["batch_sizes"] == [4] and out["config"]["auto_batch"]["cap"] == 4
    assert out["config"]["auto_batch"]["source"] == "host"
    assert cli.main(base) == 0
    assert "batch_size=auto chose 4 packed rows" in capsys.readouterr().out
    assert cli.main([*base[:-4], "--batch-size", "many", "--json"]) == 2
    assert "--batch-size many: expected a positive integer or auto" in \
        json.loads(capsys.readouterr().out)["error"]


def test_auto_batch_halves_on_out_of_memory(llama_dir, tm, monkeypatch):
    # an out-of-memory error the measurement did not foresee (generation, memory taken since)
    # halves the batch and retries, as the hf backend's auto does; the answers are unchanged
    import jax

    from jaxarith.eval.lmeval import lm as lm_module
    from jaxarith.eval.lmeval import scoring

    samples = {"jaxarith_mc": [0, 1, 2], "jaxarith_gen": [0, 1]}
    kw = dict(num_fewshot=0, apply_chat_template=False, fewshot_as_multiturn=False)
    fixed = _run(JaxarithLM(pretrained=llama_dir[0], batch_size=1), tm, samples, **kw)
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                     "allocate 1234 bytes.")
    real_score, real_generate, calls = scoring.score_requests, lm_module.generate, []

    def score(*args, batch_size, **kwargs):
        calls.append(("score", batch_size))
        if batch_size > 2:
            raise oom
        return real_score(*args, batch_size=batch_size, **kwargs)

    def generate(spec, params, prompts, **kwargs):
        calls.append(("generate", len(prompts)))
        if len(prompts) > 1:
            raise oom
        return real_generate(spec, params, prompts, **kwargs)

    monkeypatch.setattr(scoring, "score_requests", score)
    monkeypatch.setattr(lm_module, "generate", generate)
    lm = JaxarithLM(pretrained=llama_dir[0], batch_size="auto", max_batch_size=8)
    assert lm.batch_size == 8
    out = _run(lm, tm, samples, **kw)
    assert ("score", 8) in calls and ("generate", 2) in calls  # both fell back
    assert out["config"]["batch_sizes"] == [1] and out["config"]["auto_batch"]["size"] == 1
    np.testing.assert_allclose([x[0] for x in _responses(out, "jaxarith_mc")],
                               [x[0] for x in _responses(fixed, "jaxarith_mc")], atol=1e-5)
    assert _responses(out, "jaxarith_gen") == _responses(fixed, "jaxarith_gen")
    # a fixed batch_size never shrinks: the error is the caller's
    lm = JaxarithLM(pretrained=llama_dir[0], batch_size=4)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        _run(lm, tm, {"jaxarith_mc": [0]}, **kw)

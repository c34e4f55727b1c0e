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

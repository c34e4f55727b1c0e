"""``jaxarith lm-eval`` on 2 JAX processes x 4 CPU devices (process 0 drives lm-eval, process 1
follows) against 1 process x 8 devices on the same mesh, and errors on process 0 ending both.

The reference is the single-process run (itself checked against lm-eval's ``hf`` backend in
tests/test_lmeval.py). Each 2-process launch is started with jaxarith.testing.multiprocess on a
free port with a timeout, so a follower that never hears "stop" fails the test instead of
hanging it. Slow (a launch costs 15-25 s here): run by ``make test-multiprocess``.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("lm_eval")  # the eval extra (installed by the test extra)

from jaxarith import cli  # noqa: E402
from jaxarith.testing import multiprocess as mt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240  # seconds for one launch
TASKS = "jaxarith_mc,jaxarith_ppl,jaxarith_gen"


def _samples(directory) -> dict[tuple[str, int], list]:
    """(task, doc_id) -> the backend's raw answers of that document's requests."""
    out = {}
    with open(os.path.join(directory, "samples.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out[row["task"], row["doc_id"]] = [r[0] for r in row["resps"]]
    return out


@pytest.mark.slow
def test_lm_eval_on_2_processes_equals_1_process(llama_dir, tmp_path, capsys):
    """The three shipped task types (multiple choice, rolling perplexity over several windows,
    greedy generation): per-request log-likelihoods within 1e-5, is_greedy, generations and
    metrics identical; process 1 prints nothing; process 0 alone writes --output-path."""
    src = llama_dir[0]
    cmd = ["lm-eval", src, "--tasks", TASKS, "--limit", "4", "--mesh", "data=2,fsdp=4",
           "--log-samples", "--json"]
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    res = mt.run(["-m", "jaxarith", *cmd, "--output-path", str(two_dir)], processes=2,
                 devices=4, timeout=TIMEOUT, cwd=ROOT)
    for i, r in enumerate(res):
        assert not r.timed_out, f"process {i} timed out:\n{r.stderr[-3000:]}"
        assert r.returncode == 0, f"process {i} exited {r.returncode}:\n{r.stderr[-3000:]}"
    assert res[1].stdout.strip() == ""
    lines = [ln for ln in res[0].stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    two = json.loads(lines[0])

    assert cli.main([*cmd, "--output-path", str(one_dir)]) == 0  # this process: 8 devices
    one = json.loads(capsys.readouterr().out)

    assert two["config"]["model"] == one["config"]["model"] == "jaxarith"
    assert two["config"]["model_args"]["mesh"] == "data=2,fsdp=4"
    assert json.loads((two_dir / "results.json").read_text())["results"] == two["results"]
    got, want = _samples(two_dir), _samples(one_dir)
    assert sorted(got) == sorted(want)
    assert {t for t, _ in want} == set(TASKS.split(","))
    kinds = set()
    for key, answers in want.items():
        assert len(got[key]) == len(answers), key
        for a, b in zip(got[key], answers, strict=True):
            if isinstance(b, str):  # generate_until: identical greedy text
                kinds.add("gen")
                assert a == b, key
            elif isinstance(b, list):  # loglikelihood: (logprob, is_greedy)
                kinds.add("ll")
                assert abs(a[0] - b[0]) <= 1e-5 and a[1] == b[1], (key, a, b)
            else:  # loglikelihood_rolling: a sum over every token of the document
                kinds.add("rolling")
                assert abs(a - b) <= 1e-5, (key, a, b)
    assert kinds == {"gen", "ll", "rolling"}
    for task in TASKS.split(","):
        m2, m1 = two["results"][task], one["results"][task]
        assert m2.keys() == m1.keys()
        for k, v in m1.items():
            if isinstance(v, float) and ("perplexity" in k or "bits_per_byte" in k):
                assert m2[k] == pytest.approx(v, rel=1e-6), (task, k)
            else:
                assert m2[k] == v, (task, k)


@pytest.mark.slow
def test_an_error_on_process_0_stops_the_follower(llama_dir, tmp_path):
    """A task whose generation kwargs the model refuses fails on process 0 inside lm-eval,
    after the models loaded: process 1 is stopped with the error (exit 2, no hang), and no
    output directory is left. An unknown task stops both before the models load."""
    shipped = os.path.join(ROOT, "jaxarith", "eval", "tasks")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(os.path.join(shipped, "loader.py"), tasks)  # the YAML's custom_dataset
    with open(os.path.join(shipped, "jaxarith_gen.yaml")) as f:
        yaml = f.read().replace("task: jaxarith_gen", "task: bad_gen").replace(
            "tag: jaxarith_offline", "").replace(
            "do_sample: false", "do_sample: true\n  repetition_penalty: 1.2").replace(
            "data_file: jaxarith_gen.jsonl",
            "data_file: " + os.path.join(shipped, "jaxarith_gen.jsonl"))
    (tasks / "bad_gen.yaml").write_text(yaml)
    out = tmp_path / "out"
    res = mt.run(["-m", "jaxarith", "lm-eval", llama_dir[0], "--tasks", "bad_gen",
                  "--include-path", str(tasks), "--limit", "2", "--output-path", str(out),
                  "--json"], processes=2, devices=4, timeout=TIMEOUT, cwd=ROOT)
    for i, r in enumerate(res):
        assert not r.timed_out, f"process {i} timed out:\n{r.stderr[-3000:]}"
        assert r.returncode == 2, f"process {i} exited {r.returncode}:\n{r.stderr[-3000:]}"
    assert "repetition_penalty" in json.loads(res[0].stdout)["error"]
    assert "[process 1/2]" in res[1].stderr and "process 0 failed" in res[1].stderr
    assert "repetition_penalty" in res[1].stderr
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporaries
    # an unknown task: refused on process 0 before the models load, on both processes
    res = mt.run(["-m", "jaxarith", "lm-eval", llama_dir[0], "--tasks", "jaxarith_mcc",
                  "--json"], processes=2, devices=4, timeout=TIMEOUT, cwd=ROOT)
    assert [(r.timed_out, r.returncode) for r in res] == [(False, 2), (False, 2)], res
    assert "unknown task(s): jaxarith_mcc" in json.loads(res[0].stdout)["error"]
    assert "process 0 failed: unknown task(s): jaxarith_mcc" in res[1].stderr


@pytest.mark.slow
def test_member_templates_and_auto_batch_on_2_processes(llama_dir, llama_tied_dir, gpt2_dir,
                                                        tmp_path, capsys):
    """Proxy tuning with a templated expert (per-member contexts travel to the follower) and
    batch_size auto (both processes take one size) on 2 processes equals 1 process."""
    from transformers import AutoTokenizer

    expert = tmp_path / "chat_expert"
    shutil.copytree(llama_tied_dir[0], expert)
    tok = AutoTokenizer.from_pretrained(str(expert))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                         "<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(str(expert))
    cmd = ["lm-eval", llama_dir[0], "--expert", str(expert), "--anti-expert", gpt2_dir[0],
           "--alpha", "0.5", "--tasks", "jaxarith_mc,jaxarith_gen", "--limit", "3",
           "--num-fewshot", "1", "--member-chat-template", "expert=auto", "base=none",
           "anti_expert=none", "--batch-size", "auto", "--max-batch-size", "8",
           "--mesh", "data=2,fsdp=4", "--log-samples", "--json"]
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    res = mt.run(["-m", "jaxarith", *cmd, "--output-path", str(two_dir)], processes=2,
                 devices=4, timeout=TIMEOUT, cwd=ROOT)
    for i, r in enumerate(res):
        assert not r.timed_out, f"process {i} timed out:\n{r.stderr[-3000:]}"
        assert r.returncode == 0, f"process {i} exited {r.returncode}:\n{r.stderr[-3000:]}"
    two = json.loads([ln for ln in res[0].stdout.splitlines() if ln.strip()][0])
    assert cli.main([*cmd, "--output-path", str(one_dir)]) == 0
    one = json.loads(capsys.readouterr().out)
    assert two["config"]["batch_sizes"] == one["config"]["batch_sizes"] == [8]
    got, want = _samples(two_dir), _samples(one_dir)
    assert sorted(got) == sorted(want)
    for key, answers in want.items():
        for a, b in zip(got[key], answers, strict=True):
            if isinstance(b, str):
                assert a == b, key
            else:
                assert abs(a[0] - b[0]) <= 1e-5 and a[1] == b[1], (key, a, b)
    assert two["results"] == one["results"]


# ----------------------------------------------------------------------------- one process (fast)


def test_messages_survive_the_broadcast_framing(monkeypatch):
    """send -> receive through recorded broadcasts: a short message rides in the header, a long
    one follows in a body padded to a power of two (a bounded number of broadcast shapes)."""
    import numpy as np

    from jaxarith.eval.lmeval import multihost

    sent = []
    monkeypatch.setattr(multihost, "_broadcast", lambda buf: sent.append(buf.copy()) or buf)
    short = ("generate", {"prompts": [[1, 2, 3]], "seed": 7})
    long = ("score", {"pairs": [(list(range(i, i + 50)), [i]) for i in range(200)]})
    multihost.send(short)
    multihost.send(long)
    assert [b.shape for b in sent[:1]] == [(multihost.HEADER,)]
    assert len(sent) == 3 and sent[2].shape[0] & (sent[2].shape[0] - 1) == 0
    replay = iter(sent)
    monkeypatch.setattr(multihost, "_broadcast", lambda buf: next(replay))
    assert multihost.receive() == short
    assert multihost.receive() == long
    assert multihost._padded(4097) == 8192 and multihost._padded(8192) == 8192
    assert isinstance(sent[0], np.ndarray) and sent[0].dtype == np.uint8


def test_follow_and_leading_in_one_process(llama_dir):
    """With one process there is nobody to lead: follow() is a clear error, leading() and
    stop_followers() do nothing (no collective is sent)."""
    from jaxarith.errors import ConfigError
    from jaxarith.eval.lmeval import JaxarithLM

    lm = JaxarithLM(pretrained=llama_dir[0])
    with pytest.raises(ConfigError, match="processes other than 0"):
        lm.follow()
    with lm.leading():
        lm.stop_followers()

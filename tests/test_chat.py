"""Chat data: assistant-only loss weights, one conversation per window, answer-only NLL."""

import json

import numpy as np
import pytest

from jaxarith import data as data_lib
from jaxarith.data import assets, chat
from jaxarith.errors import JaxarithError

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does json.dumps do?"},
        {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
        {"role": "user", "content": "Which module defines dumps?"},
        {"role": "assistant", "content": "json"}]

# a ChatML-like template written as plain text (not special tokens) for the bundled tokenizer
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return assets.bundled_tokenizer()


def _split_by_weight(tok, ids, weights):
    """The text of each maximal run of equal weights, decoded token by token."""
    runs, cur, w0 = [], [], None
    for t, w in zip(ids.tolist(), weights.tolist(), strict=True):
        if w0 is not None and w != w0:
            runs.append((w0, "".join(tok.decode([x]) for x in cur)))
            cur = []
        cur.append(t)
        w0 = w
    runs.append((w0, "".join(tok.decode([x]) for x in cur)))
    return runs


def test_builtin_template_weights_exactly_the_assistant_tokens(tok):
    ids, w = chat.render(CONV, tok)
    assert ids.dtype == np.int32 and w.dtype == np.float32 and ids.shape == w.shape
    # token by token: the weight-1 tokens decode to the answers + end-of-turn, nothing else
    assert _split_by_weight(tok, ids, w) == [
        (0.0, "System: Be brief.\nUser: What does json.dumps do?\nAssistant:"),
        (1.0, " Serialize obj to a JSON formatted str.</s>"),
        (0.0, "User: Which module defines dumps?\nAssistant:"),
        (1.0, " json</s>"),
    ]
    # the end-of-turn token is EOS and is weighted (the model must learn to stop)
    assert ids[-1] == assets.EOS_ID and w[-1] == 1.0
    assert chat.stop_tokens(tok) == (assets.EOS_ID,)


def test_chat_template_weights_exactly_the_assistant_tokens(tok):
    tok = assets.bundled_tokenizer()
    tok.chat_template = CHATML
    ids, w = chat.render(CONV[:3], tok)
    assert _split_by_weight(tok, ids, w) == [
        (0.0, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat does json.dumps "
              "do?<|im_end|>\n<|im_start|>assistant\n"),
        (1.0, "Serialize obj to a JSON formatted str.<|im_end|>\n"),
    ]
    prompt, answer = chat.prompt_and_answer(CONV[:3], tok)
    assert prompt + answer == ids.tolist()
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_prompt_and_answer_split_the_rendering(tok):
    prompt, answer = chat.prompt_and_answer(CONV, tok)
    ids, w = chat.render(CONV, tok)
    assert prompt + answer == ids.tolist()
    assert tok.decode(answer) == " json</s>"
    with pytest.raises(JaxarithError, match="end with an assistant"):
        chat.prompt_and_answer(CONV[:2], tok)


def test_bad_messages_are_refused(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(JaxarithError, match=r"bad.jsonl:1: message 0"):
        chat.read_jsonl(p)


def _write_convs(path, convs):
    with open(path, "w") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}) + "\n")


def test_chat_source_one_conversation_per_window_no_leak(tmp_path, tok):
    convs = [[{"role": "user", "content": f"Question number {i}?"},
              {"role": "assistant", "content": "yes " * (i % 3 + 1)}] for i in range(12)]
    _write_convs(tmp_path / "c.jsonl", convs)
    src = data_lib.SourceConfig(name="chat", kind="chat", path=str(tmp_path / "c.jsonl"))
    text = data_lib.SourceConfig(name="text", kind="text", path="bundled:docs", max_docs=50)
    cfg = data_lib.DataConfig(sources=(src, text), seq_len=32, eval_fraction=0.25)
    chat_data, text_data = data_lib.load_sources(cfg, tok)
    assert chat_data.train.shape == (9, 32) and chat_data.eval.shape == (3, 32)
    for i, (row, w) in enumerate(zip(chat_data.train, chat_data.train_weights, strict=True)):
        ids, ref_w = chat.render(convs[i], tok)
        n = len(ids)
        # the window holds exactly conversation i, then padding with weight 0
        np.testing.assert_array_equal(row[:n], ids)
        np.testing.assert_array_equal(w[:n], ref_w)
        assert (row[n:] == assets.PAD_ID).all() and (w[n:] == 0).all()
    # mixed with a text source: every example carries weights, ones for text
    ds = data_lib.mixed_dataset([chat_data, text_data], seed=0)
    by_tokens = {chat_data.train[i].tobytes(): chat_data.train_weights[i]
                 for i in range(len(chat_data.train))}
    seen = set()
    for k in range(40):
        ex = ds[k]
        assert ex["weights"].shape == ex["tokens"].shape == (32,)
        if ex["source"] == 0:
            np.testing.assert_array_equal(ex["weights"], by_tokens[ex["tokens"].tobytes()])
            seen.add(0)
        else:
            assert (ex["weights"] == 1).all()
            seen.add(1)
    assert seen == {0, 1}
    batch = next(data_lib.batch_iterator(ds, 8))
    assert batch["tokens"].shape == batch["weights"].shape == (8, 32)


def test_answer_nll_matches_transformers(llama_dir, tok):
    import torch

    from jaxarith.decode.loop import Member
    from jaxarith.eval.instruct import answer_nll
    from jaxarith.io.refs import load_model

    path, hf = llama_dir
    model = load_model(path, progress=False)
    convs = chat.read_jsonl(assets.INSTRUCT_EVAL)[:5] + [CONV]
    nll, n = answer_nll([Member(model.config)], [model.params], convs, tok, batch_size=4)
    total, count = 0.0, 0
    for c in convs:
        ids, w = chat.render(c, tok)
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor(ids[None].astype(np.int64))).logits[0]
        logp = torch.log_softmax(logits.double(), -1).numpy()
        lp = logp[np.arange(len(ids) - 1), ids[1:]]
        total -= float((lp * w[1:]).sum())
        count += int(w[1:].sum())
    assert n == count
    assert abs(nll - total / count) < 1e-4

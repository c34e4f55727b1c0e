"""Conversations as token ids with per-token loss weights (instruction tuning and its eval).

A conversation is ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``. It is
rendered as a list of text *segments*, each tokenised on its own (no special tokens added) and
concatenated, so the boundary between what the model reads and what it must answer falls exactly
on a token boundary:

- **a tokenizer with a chat template** (``tokenizer.chat_template``, e.g. Llama-3-Instruct): the
  template renders ``messages[:i]`` (with the generation prompt before an assistant turn) and
  ``messages[:i + 1]``; the text between the two is turn ``i``. The generation prompt (e.g.
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``) has weight 0; the assistant's text
  through its end-of-turn token (``<|eot_id|>``) has weight 1. A template whose renderings are
  not prefixes of one another is refused.
- **no chat template** (the bundled 1024-token BPE), the built-in template::

      System: {content}\\n         (weight 0)
      User: {content}\\n           (weight 0)
      Assistant:                  (weight 0: the generation prompt)
       {content}</s>              (weight 1: a space, the answer and the end-of-turn token)

  The end-of-turn token is the tokenizer's EOS (``</s>``, id 2 in the bundled tokenizer), the same
  token that separates pre-training documents, so a base model already "knows" to stop there.

Loss weights mark each token *as a prediction target*: 1 on the assistant's tokens (answer and
end-of-turn), 0 on everything else (see ``transformer.next_token_loss(weights=)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from jaxarith.errors import JaxarithError

ROLES = ("system", "user", "assistant")
# end-of-turn tokens of common chat templates (used as decode stop tokens when in the vocabulary)
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")

Messages = Sequence[dict]


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """``(line number, parsed JSON)`` of each non-blank line of a jsonl file; invalid JSON is an
    error naming the file and line."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise JaxarithError(f"{path}:{n}: invalid JSON ({e.msg})") from None


def read_jsonl(path: str | os.PathLike) -> list[list[dict]]:
    """The conversations of a jsonl file of ``{"messages": [...]}`` lines (checked)."""
    out = []
    for n, obj in jsonl_records(path):
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        check_messages(msgs, f"{path}:{n}")
        out.append(msgs)
    return out


def check_messages(messages, where: str) -> None:
    """Refuse anything but a non-empty list of {role, content} with a known role."""
    if not isinstance(messages, list) or not messages:
        raise JaxarithError(f"{where}: expected a non-empty list under 'messages'")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or \
                not isinstance(m.get("content"), str):
            raise JaxarithError(f"{where}: message {i} must be {{'role': one of {ROLES}, "
                                f"'content': str}}, got {m!r}")


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _template(tokenizer, messages, generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=generation_prompt)


def segments(messages: Messages, tokenizer) -> list[tuple[str, float]]:
    """The conversation as (text, weight) segments (see the module docstring)."""
    check_messages(list(messages), "conversation")
    if not has_template(tokenizer):
        eos = tokenizer.eos_token
        if eos is None:
            raise JaxarithError("the tokenizer has no EOS token to end assistant turns")
        out = []
        for m in messages:
            if m["role"] == "assistant":
                out += [("Assistant:", 0.0), (" " + m["content"] + eos, 1.0)]
            else:
                out.append((f"{m['role'].capitalize()}: {m['content']}\n", 0.0))
        return out
    out, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = _template(tokenizer, messages[:i], True)
            if not head.startswith(done):
                raise JaxarithError("the chat template's rendering of a conversation prefix is "
                                    "not a prefix of the next one: cannot mark assistant tokens")
            out.append((head[len(done):], 0.0))
            done = head
        full = _template(tokenizer, messages[: i + 1], False)
        if not full.startswith(done):
            raise JaxarithError("the chat template's rendering of a conversation prefix is "
                                "not a prefix of the next one: cannot mark assistant tokens")
        out.append((full[len(done):], 1.0 if m["role"] == "assistant" else 0.0))
        done = full
    return [(t, w) for t, w in out if t]


def _ids(text: str, tokenizer) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(messages: Messages, tokenizer, *, add_bos: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n] int32 and loss weights [n] float32 of a whole conversation."""
    ids: list[int] = [tokenizer.bos_token_id] if add_bos else []
    weights: list[float] = [0.0] * len(ids)
    for text, w in segments(messages, tokenizer):
        t = _ids(text, tokenizer)
        ids += t
        weights += [w] * len(t)
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def prompt_and_answer(messages: Messages, tokenizer, *, add_bos: bool = False
                      ) -> tuple[list[int], list[int]]:
    """Split a conversation ending in an assistant turn into (prompt ids through the generation
    prompt, answer ids through the end-of-turn token): what a model reads, what it should say."""
    if not messages or messages[-1]["role"] != "assistant":
        raise JaxarithError("the conversation must end with an assistant message")
    segs = segments(messages, tokenizer)
    prompt = [tokenizer.bos_token_id] if add_bos else []
    for text, _ in segs[:-1]:
        prompt += _ids(text, tokenizer)
    return prompt, _ids(segs[-1][0], tokenizer)


def stop_tokens(tokenizer) -> tuple[int, ...]:
    """End-of-turn token ids: EOS and any common end-of-turn special token in the vocabulary."""
    out = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    vocab = tokenizer.get_vocab()
    out += [int(vocab[t]) for t in END_OF_TURN if t in vocab]
    return tuple(dict.fromkeys(out))


def pad_windows(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """One conversation per window: tokens [N, seq_len] and weights [N, seq_len].

    Each conversation starts a window and is right-padded with ``pad_id`` (weight 0), so no
    window holds two conversations: under causal attention the padding after a conversation
    cannot change what it sees, and nothing leaks between conversations. A conversation longer
    than ``seq_len`` is cut (its tail is not trained on).
    """
    tokens = np.full((len(examples), seq_len), pad_id, np.int32)
    weights = np.zeros((len(examples), seq_len), np.float32)
    for i, (ids, w) in enumerate(examples):
        n = min(len(ids), seq_len)
        tokens[i, :n], weights[i, :n] = ids[:n], w[:n]
    return tokens, weights

"""Build the offline lm-eval task data in ``jaxarith/eval/tasks/`` (deterministic, no network).

Three small tasks (tens of documents, so tests stay fast), each a jsonl next to its task YAML:

- ``jaxarith_mc.jsonl`` (multiple choice, from ``assets/corpus_docs.txt``): a paragraph's first
  words are the context; the choices are its true next words and the same span from three other
  paragraphs (a HellaSwag-style continuation task).
- ``jaxarith_ppl.jsonl`` (rolling perplexity): whole paragraphs of ``assets/corpus_code.txt``,
  a few longer than a tiny model's 128-token context so the rolling windows are exercised.
- ``jaxarith_gen.jsonl`` (generation, from ``assets/instruct_eval.jsonl``): the held-out
  "Which module defines X?" questions; the answer is the module name.

    python scripts/make_evaltasks.py
"""

from __future__ import annotations

import json
import os
import random
import re

ROOT = os.path.join(os.path.dirname(__file__), "..", "jaxarith")
ASSETS, OUT = os.path.join(ROOT, "data", "assets"), os.path.join(ROOT, "eval", "tasks")
N_MC, N_PPL, N_GEN = 24, 12, 16
CONTEXT_WORDS, CHOICE_WORDS = 8, 4


def paragraphs(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def multiple_choice(rng: random.Random) -> list[dict]:
    paras = [" ".join(p.split()) for p in paragraphs(os.path.join(ASSETS, "corpus_docs.txt"))]
    paras = [p for p in paras if len(p.split()) >= CONTEXT_WORDS + CHOICE_WORDS and p.isascii()]
    picked = rng.sample(paras, 4 * N_MC)
    docs = []
    for i in range(N_MC):
        own, *others = picked[4 * i: 4 * i + 4]
        words = own.split()
        context = " ".join(words[:CONTEXT_WORDS])
        true = " ".join(words[CONTEXT_WORDS: CONTEXT_WORDS + CHOICE_WORDS])
        wrong = [" ".join(o.split()[CONTEXT_WORDS: CONTEXT_WORDS + CHOICE_WORDS])
                 for o in others]
        label = rng.randrange(4)
        choices = wrong[:label] + [true] + wrong[label:]
        docs.append({"id": f"mc{i}", "context": context, "choices": choices, "label": label})
    return docs


def perplexity(rng: random.Random) -> list[dict]:
    paras = [p for p in paragraphs(os.path.join(ASSETS, "corpus_code.txt"))
             if 20 <= len(p) <= 1200 and p.isascii()]
    long = [p for p in paras if len(p) > 700]
    short = [p for p in paras if len(p) <= 300]
    picked = rng.sample(long, 3) + rng.sample(short, N_PPL - 3)
    return [{"id": f"ppl{i}", "text": p} for i, p in enumerate(picked)]


def generation(rng: random.Random) -> list[dict]:
    with open(os.path.join(ASSETS, "instruct_eval.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    qa = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows
          if r["id"].endswith(":module")]
    picked = rng.sample(qa, N_GEN)
    return [{"id": f"gen{i}", "question": q, "answer": a} for i, (q, a) in enumerate(picked)]


def write(name: str, docs: list[dict]) -> None:
    path = os.path.join(OUT, name)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    print(f"{path}: {len(docs)} docs")


def main() -> None:
    write("jaxarith_mc.jsonl", multiple_choice(random.Random(0)))
    write("jaxarith_ppl.jsonl", perplexity(random.Random(1)))
    write("jaxarith_gen.jsonl", generation(random.Random(2)))


if __name__ == "__main__":
    main()

"""Build the bundled instruction data set in ``jaxarith/data/assets/`` (offline, deterministic).

Question/answer pairs about the installed Python's standard library, made with ``inspect``:

- ``What does json.dumps do?`` -> the first sentence of its docstring;
- ``Which module defines dumps?`` -> ``json`` (only for names defined by one module);
- ``What is the signature of json.dumps?`` -> ``dumps(obj, *, skipkeys=False, ...)``.

Each line of ``instruct_{train,eval}.jsonl`` is ``{"id": ..., "messages": [{"role": "user",
"content": Q}, {"role": "assistant", "content": A}]}`` (the ``kind: chat`` data source's schema).
The held-out split is by *object*: every question about an object whose CRC32 of its qualified name
falls in the eval bucket goes to ``instruct_eval.jsonl``, so eval questions are about objects the
instruction-tuned model never saw a question about (their docstrings are in the pre-training
corpus ``corpus_docs.txt``). Same Python version -> same files.

    python scripts/make_instruct_data.py
"""

from __future__ import annotations

import collections
import importlib
import inspect
import json
import os
import re
import sys
import warnings
import zlib

ASSETS = os.path.join(os.path.dirname(__file__), "..", "jaxarith", "data", "assets")
sys.path.insert(0, os.path.dirname(__file__))
from make_assets import MODULES  # noqa: E402

EVAL_BUCKETS = 10  # 1 in 10 objects is held out
MAX_ANSWER = 100  # characters
MAX_TRAIN, MAX_EVAL = 2000, 200  # evenly spaced over all modules


def first_sentence(doc: str) -> str | None:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    s = m.group(1) if m else None
    if not s or len(s) > MAX_ANSWER or len(s) < 12 or not s[0].isupper():
        return None
    return s


def objects() -> list[tuple[str, str, object]]:
    """(module, name, object) of public functions and classes with docstrings, sorted."""
    out = []
    warnings.simplefilter("ignore")
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != mod_name:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            out.append((mod_name, name, obj))
    return out


def pairs() -> tuple[list[dict], list[dict]]:
    objs = objects()
    owners = collections.Counter(name for _, name, _ in objs)
    train, evals = [], []
    for mod, name, obj in objs:
        qual = f"{mod}.{name}"
        qa = []
        doc = inspect.getdoc(obj)
        sent = first_sentence(doc) if doc else None
        if sent:
            qa.append(("doc", f"What does {qual} do?", sent))
        if owners[name] == 1 and len(name) > 3:
            qa.append(("module", f"Which module defines {name}?", mod))
        if inspect.isfunction(obj):
            try:
                sig = f"{name}{inspect.signature(obj)}"
            except (TypeError, ValueError):
                sig = ""
            if sig and len(sig) <= 60 and " at 0x" not in sig:
                qa.append(("signature", f"What is the signature of {qual}?", sig))
        split = evals if zlib.crc32(qual.encode()) % EVAL_BUCKETS == 0 else train
        for kind, q, a in qa:
            split.append({"id": f"{qual}:{kind}", "messages": [
                {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return spread(train, MAX_TRAIN), spread(evals, MAX_EVAL)


def spread(rows: list, n: int) -> list:
    """At most ``n`` rows evenly spaced over ``rows`` (all modules, not the first few)."""
    if len(rows) <= n:
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def main() -> None:
    train, evals = pairs()
    for name, rows in (("instruct_train.jsonl", train), ("instruct_eval.jsonl", evals)):
        path = os.path.join(ASSETS, name)
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} examples, {os.path.getsize(path) / 1e3:.0f} kB",
              file=sys.stderr)


if __name__ == "__main__":
    main()

"""Build the bundled text and tokenizer in ``jaxarith/data/assets/`` (offline, deterministic).

Two corpora stand in for "original pre-training data" and "a new domain":
  - ``corpus_docs.txt``: docstrings of the installed Python's standard library (prose);
  - ``corpus_code.txt``: source code of the same modules (code).
Documents are separated by blank lines. A byte-level BPE (``tokenizer.json``, 1024 tokens,
specials <pad>=0, <s>=1, </s>=2) is trained on both.

    python scripts/make_assets.py
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import sys
import warnings

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ASSETS = os.path.join(os.path.dirname(__file__), "..", "jaxarith", "data", "assets")
MODULES = sorted(
    m.name for m in pkgutil.iter_modules()
    if m.module_finder.path.endswith("lib/python3.11") and not m.name.startswith("_")
    and m.name not in {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"}
)
LIMIT = 600_000  # characters per corpus


def docs_and_code() -> tuple[list[str], list[str]]:
    docs, code = [], []
    warnings.simplefilter("ignore")
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        for _, obj in sorted(vars(mod).items()):
            if getattr(obj, "__module__", None) != name:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                docs.append(doc.strip())
            try:
                src = inspect.getsource(obj)
            except (TypeError, OSError):
                continue
            if 300 < len(src) < 4000:
                code.append(src.strip())
    return docs, code


def take(texts: list[str]) -> str:
    out, n = [], 0
    for t in texts:
        if n > LIMIT:
            break
        out.append(t)
        n += len(t)
    return "\n\n".join(out) + "\n"


def main() -> None:
    os.makedirs(ASSETS, exist_ok=True)
    docs, code = docs_and_code()
    paths = []
    for name, texts in (("corpus_docs.txt", docs), ("corpus_code.txt", code)):
        path = os.path.join(ASSETS, name)
        with open(path, "w") as f:
            f.write(take(texts))
        paths.append(path)
        print(f"{name}: {os.path.getsize(path) / 1e3:.0f} kB", file=sys.stderr)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train(paths, trainer)
    tok.save(os.path.join(ASSETS, "tokenizer.json"))
    print(f"tokenizer: {tok.get_vocab_size()} tokens", file=sys.stderr)


if __name__ == "__main__":
    main()

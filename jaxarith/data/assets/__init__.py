"""Bundled text and tokenizer (built offline by ``scripts/make_assets.py``)."""

from __future__ import annotations

import os

ASSETS_DIR = os.path.dirname(__file__)
CORPUS_DOCS = os.path.join(ASSETS_DIR, "corpus_docs.txt")
CORPUS_CODE = os.path.join(ASSETS_DIR, "corpus_code.txt")
# instruction data (scripts/make_instruct_data.py): {"messages": [...]} per line
INSTRUCT_TRAIN = os.path.join(ASSETS_DIR, "instruct_train.jsonl")
INSTRUCT_EVAL = os.path.join(ASSETS_DIR, "instruct_eval.jsonl")
TOKENIZER_JSON = os.path.join(ASSETS_DIR, "tokenizer.json")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def bundled_tokenizer():
    """The bundled 1024-token byte-level BPE as a ``transformers`` fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=TOKENIZER_JSON, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def read_text(path: str = CORPUS_DOCS, max_chars: int | None = None) -> str:
    with open(path) as f:
        return f.read(max_chars) if max_chars else f.read()

"""One tokenizer, several embedding tables: the rows models combined by logit arithmetic share.

Members of one model family often share a tokenizer but pad their embedding tables to different
sizes (Qwen2.5-0.5B..3B have 151936 rows, 7B and up 152064, one tokenizer of 151665 tokens).
Logit arithmetic (proxy tuning, EFT, speculative EFT, distillation, lm-eval combinations) then
combines the members over the rows the tokenizer can produce, ``len(tokenizer)``: the padded
rows beyond it never win. Different tokenizers stay an error that names the first token that
differs.

Usage::

    tok = shared_tokenizer(["base", "expert"], [base.tokenizer(), expert.tokenizer()])
    rows = tokenizer_rows(tok, {"base": 151936, "expert": 152064})   # len(tok), checked
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jaxarith.errors import ConfigError


def first_difference(a: Mapping[str, int], b: Mapping[str, int]) -> str | None:
    """The first id (smallest) at which two ``token -> id`` vocabularies differ, described
    (``"id 5: 'a' vs 'b'"``), or None when they are equal."""
    if a == b:
        return None
    ia = {i: t for t, i in a.items()}
    ib = {i: t for t, i in b.items()}
    for i in sorted(set(ia) | set(ib)):
        if ia.get(i) != ib.get(i):
            return f"id {i}: {ia.get(i, '<none>')!r} vs {ib.get(i, '<none>')!r}"
    return "the same ids map to different tokens"  # unreachable for id-unique vocabularies


def shared_tokenizer(refs: Sequence[str], tokenizers: Sequence[Any]):
    """``tokenizers[0]`` after checking every other has the same vocabulary.

    Raises:
      ConfigError: naming the model whose tokenizer differs and the first token that differs.
    """
    vocab = tokenizers[0].get_vocab()
    for ref, tok in zip(refs[1:], tokenizers[1:], strict=True):
        diff = first_difference(vocab, tok.get_vocab())
        if diff is not None:
            raise ConfigError(
                f"tokenizer of {ref} ({len(tok)} tokens) differs from that of {refs[0]} "
                f"({len(tokenizers[0])} tokens) at {diff}: models combined by logit arithmetic "
                f"need one shared tokenizer")
    return tokenizers[0]


def tokenizer_rows(tokenizer, vocab_sizes: Mapping[str, int]) -> int:
    """``len(tokenizer)``: the rows every model's logits are combined over.

    Args:
      vocab_sizes: ``{role or reference: config.vocab_size}`` of the models combined; they may
        differ (padding), but each must hold every token the tokenizer can produce.
    Raises:
      ConfigError: a model's table has fewer rows than the tokenizer has tokens.
    """
    rows = len(tokenizer)
    small = {r: v for r, v in vocab_sizes.items() if v < rows}
    if small:
        raise ConfigError(
            f"the tokenizer has {rows} tokens but the embedding table of "
            + ", ".join(f"{r} has {v} rows" for r, v in small.items())
            + ": every model must hold a row for each token")
    return rows


def combination_limit(tokenizer, vocab_sizes: Mapping[str, int]) -> int | None:
    """The ``vocab_limit`` of a combination whose tables may be padded differently: None when
    every table has the same size (every row is kept, as transformers and lm-eval's hf backend
    keep them), else :func:`tokenizer_rows` (the combination runs over the tokenizer's rows)."""
    if len(set(vocab_sizes.values())) <= 1:
        return None
    return tokenizer_rows(tokenizer, vocab_sizes)

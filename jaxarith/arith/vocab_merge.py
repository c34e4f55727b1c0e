"""mergekit's output vocabularies: ``tokenizer_source: base | union | <model>`` and the
``tokenizer:`` section (``source``, ``tokens``, ``pad_to_multiple_of``), as mergekit 0.1.5
builds them (``mergekit/tokenizer/build.py`` and ``embed.py``; LGPL-3.0, reimplemented here).

1. The output tokenizer: the base model's (``base_model``, else the first model), ``union`` (the
   base's, plus every other model's tokens it lacks, then their added tokens, through
   transformers' ``add_tokens``), or a named model's; then every token named under ``tokens:``
   that it lacks is added. Tokens at ids ``>= vocab_size`` of their model (padding) are ignored.
2. Each model's rows are permuted to the output vocabulary (``perm[new id] = old id`` or -1 when
   the model lacks the token).
3. A token some model lacks (or ``force: true``) gets a default row, the same for every model:
   from its ``tokens:`` entry (``source: <model>``: that model's row of the token;
   ``{kind: model_token, model, token | token_id}``: a row of that model's own vocabulary;
   ``{kind: zero}``), else the row of the one model that has it, else the base's, else the mean
   of the models that have it (a token no model has: zeros).
4. With ``pad_to_multiple_of`` the table is padded to a multiple with the mean of the real rows.

Vocabulary tensors are permuted in the (promoted) dtype of the inputs before the merge method,
which then sees tables of the output's size; the output config's ``vocab_size`` is that size.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxarith.configfile import short
from jaxarith.errors import ConfigError

_TOKEN_KEYS = {"source", "force"}


@dataclasses.dataclass(frozen=True)
class VocabSpec:
    """The vocabulary settings of a merge config (mergekit's names)."""

    source: str  # "base", "union" or a model reference
    tokens: tuple[tuple[str, Any], ...] = ()  # (token, raw TokenEmbeddingConfig mapping)
    pad_to_multiple_of: int | None = None


def parse_vocab(data: Mapping) -> VocabSpec | None:
    """The :class:`VocabSpec` of a merge config's ``tokenizer`` / ``tokenizer_source`` keys
    (None: neither given; the output then keeps the inputs' vocabulary, which must be one)."""
    sec, src = data.get("tokenizer"), data.get("tokenizer_source")
    if sec is not None and src is not None:
        raise ConfigError("give either 'tokenizer' or 'tokenizer_source', not both (mergekit "
                          "reads only the tokenizer section then)")
    if sec is None:
        if src is None:
            return None
        if not isinstance(src, str):
            raise ConfigError(f"tokenizer_source: expected 'base', 'union' or a model, got "
                              f"{short(src)}")
        return VocabSpec(source=src)
    if not isinstance(sec, Mapping) or set(sec) - {"source", "tokens", "pad_to_multiple_of"}:
        raise ConfigError(f"tokenizer: expected {{source, tokens, pad_to_multiple_of}}, got "
                          f"{short(sec)}")
    source = sec.get("source", "union")
    if not isinstance(source, str):
        raise ConfigError(f"tokenizer.source: expected 'base', 'union' or a model, got "
                          f"{short(source)}")
    pad = sec.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise ConfigError(f"tokenizer.pad_to_multiple_of: expected a positive integer, got "
                          f"{short(pad)}")
    tokens = sec.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        raise ConfigError(f"tokenizer.tokens: expected a mapping token -> {{source, force}}, got "
                          f"{short(tokens)}")
    for tok, cfg in tokens.items():
        where = f"tokenizer.tokens[{tok!r}]"
        if not isinstance(cfg, Mapping) or set(cfg) - _TOKEN_KEYS:
            raise ConfigError(f"{where}: expected {{source, force}}, got {short(cfg)}")
        if not isinstance(cfg.get("force", False), bool):
            raise ConfigError(f"{where}.force: expected true or false")
        s = cfg.get("source")
        if isinstance(s, Mapping):
            kind = s.get("kind")
            if kind == "zero" and set(s) == {"kind"}:
                continue
            if kind == "model_token" and "model" in s and \
                    (("token" in s) != ("token_id" in s)) and \
                    set(s) <= {"kind", "model", "token", "token_id"}:
                continue
            raise ConfigError(f"{where}.source: expected a model, {{kind: zero}} or {{kind: "
                              f"model_token, model, token | token_id}}, got {short(s)}")
        if s is not None and not isinstance(s, str):
            raise ConfigError(f"{where}.source: expected a model reference, got {short(s)}")
    return VocabSpec(source=source, tokens=tuple((str(t), dict(c)) for t, c in tokens.items()),
                     pad_to_multiple_of=pad)


@dataclasses.dataclass
class VocabPlan:
    """The output tokenizer and how every model's vocabulary rows map to it."""

    tokenizer: Any
    size: int  # rows of the output tables (padded)
    perms: list[np.ndarray]  # per model: [len(vocab)] int64, old id or -1
    defaults: dict[int, tuple]  # new id -> ("model", i) | ("row", i, old id) | ("zero",)
    average: frozenset[int]  # new ids whose default row is the mean over the models having it
    forced: frozenset[int]  # new ids every model takes the default row for

    def save_tokenizer(self, directory: str) -> str:
        self.tokenizer.save_pretrained(directory, safe_serialization=True)
        return directory


def _load(directory: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory, use_fast=True)


def _stripped(directory: str, vocab_size: int):
    """The tokenizer of a model without the tokens at ids >= its vocab_size (mergekit's
    ``get_stripped_tokenizer``)."""
    import json

    import tokenizers

    tok = _load(directory)
    unused = [t for t, i in tok.get_vocab().items() if i >= vocab_size]
    if not unused:
        return tok
    if not tok.is_fast:
        raise ConfigError(f"{directory}: the tokenizer has tokens beyond vocab_size and no fast "
                          "tokenizer: it cannot be merged")
    d = json.loads(tok._tokenizer.to_str())
    if d["model"]["type"] != "BPE":
        raise ConfigError(f"{directory}: a {d['model']['type']} tokenizer with tokens beyond "
                          "vocab_size: only BPE ones can be merged")
    d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < vocab_size]
    for t in unused:
        d["model"]["vocab"].pop(t, None)
    drop = set(unused)
    d["model"]["merges"] = [m for m in d["model"]["merges"]
                            if not drop & set(m.split(" ") if isinstance(m, str) else m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(d))
    return tok


def _union(base_tok, toks: Sequence, sizes: Sequence[int]):
    out_vocab: dict[str, int] = {}
    added: dict[str, Any] = {}
    for tok, size in zip(toks, sizes, strict=True):
        decoder = tok.added_tokens_decoder
        names = {info.content for info in decoder.values()}
        for t, i in tok.get_vocab().items():
            if i < size and t not in names and t not in out_vocab:
                out_vocab[t] = len(out_vocab)
        for i, info in decoder.items():
            if i < size and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as p:
        base_tok.save_pretrained(p, legacy_format=False, safe_serialization=True)
        res = _load(p)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in added and t not in base_vocab:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res


def build_plan(spec: VocabSpec, refs: Sequence[str], dirs: Sequence[str],
               vocab_sizes: Sequence[int], base: int | None) -> VocabPlan:
    """The output vocabulary of a merge of ``refs`` (their local ``dirs`` and config
    ``vocab_sizes``); ``base`` indexes the base model (None: the first model stands in)."""
    b = 0 if base is None else base
    index = {os.fspath(r): i for i, r in enumerate(refs)}

    def model_index(ref: str, where: str) -> int:
        if ref not in index:
            raise ConfigError(f"{where}: {ref!r} is not one of the merged models")
        return index[ref]

    toks = []
    for i, d in enumerate(dirs):
        try:
            toks.append(_stripped(d, vocab_sizes[i]) if i == b else _load(d))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - which model lacks a tokenizer is the message
            raise ConfigError(f"{refs[i]}: no usable tokenizer to build the merged vocabulary "
                              f"from ({type(e).__name__}); add its tokenizer files") from None
    if spec.source == "base":
        out = toks[b]
    elif spec.source == "union":
        out = _union(toks[b], [toks[b]] + [t for i, t in enumerate(toks) if i != b],
                     [vocab_sizes[b]] + [v for i, v in enumerate(vocab_sizes) if i != b])
    else:
        out = _load(dirs[model_index(spec.source, "tokenizer source")])
    existing = set(out.get_vocab())
    for t, _ in spec.tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    n = len(vocab)
    size = n
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size = (size // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    old_vocabs = [t.get_vocab() for t in toks]
    perms = []
    for i, mv in enumerate(old_vocabs):
        p = np.full(n, -1, np.int64)
        for t, new in vocab.items():
            old = mv.get(t)
            if old is not None and old < vocab_sizes[i]:
                p[new] = old
        perms.append(p)
    # default rows (mergekit's assign_embedding_sources / compute_default_embedding)
    cfgs = dict(spec.tokens)
    defaults: dict[int, tuple] = {}
    average, forced = set(), set()
    for t, new in vocab.items():
        have = [i for i in range(len(refs)) if perms[i][new] >= 0]
        cfg = cfgs.get(t)
        if cfg is not None:
            if cfg.get("force"):
                forced.add(new)
            src = cfg.get("source")
            where = f"tokenizer.tokens[{t!r}].source"
            if src is None:
                _auto_default(new, have, base, defaults, average)
            elif isinstance(src, Mapping) and src["kind"] == "zero":
                defaults[new] = ("zero",)
            elif isinstance(src, Mapping):
                m = model_index(str(src["model"]), where)
                tid = src.get("token_id")
                if tid is None:
                    if src["token"] not in old_vocabs[m]:
                        raise ConfigError(f"{where}: token {src['token']!r} is not in the "
                                          f"vocabulary of {refs[m]}")
                    tid = old_vocabs[m][src["token"]]
                if not 0 <= int(tid) < vocab_sizes[m]:
                    raise ConfigError(f"{where}: token id {tid} is out of range for {refs[m]} "
                                      f"({vocab_sizes[m]} rows)")
                defaults[new] = ("row", m, int(tid))
            else:
                m = model_index(str(src), where)
                if perms[m][new] < 0:
                    raise ConfigError(f"{where}: {refs[m]} has no token {t!r}")
                defaults[new] = ("model", m)
            continue
        if len(have) < len(refs):
            _auto_default(new, have, base, defaults, average)
    return VocabPlan(tokenizer=out, size=size, perms=perms, defaults=defaults,
                     average=frozenset(average), forced=frozenset(forced))


def _auto_default(new: int, have: list[int], base: int | None, defaults: dict,
                  average: set) -> None:
    """mergekit's default row of a token: the one model having it, zeros when none has it, the
    base's when it has it, else the mean of the models having it."""
    if len(have) == 1:
        defaults[new] = ("model", have[0])
    elif not have:
        defaults[new] = ("zero",)
    elif base is not None and base in have:
        defaults[new] = ("model", base)
    else:
        average.add(new)


def permute(plan: VocabPlan, arrays: Sequence[np.ndarray], axis: int = 0) -> list[np.ndarray]:
    """Every model's vocabulary tensor (vocabulary on ``axis``) on the output vocabulary."""
    views = [np.moveaxis(np.asarray(a), axis, 0) for a in arrays]
    dtype = np.result_type(*[v.dtype for v in views])
    shape = views[0].shape[1:]
    n = len(plan.perms[0])
    default = {}
    for new, how in plan.defaults.items():
        if how[0] == "zero":
            default[new] = np.zeros(shape, dtype)
        elif how[0] == "model":
            default[new] = views[how[1]][plan.perms[how[1]][new]].astype(dtype)
        else:
            default[new] = views[how[1]][how[2]].astype(dtype)
    for new in plan.average:  # summed in order, then divided, in the promoted dtype
        acc, count = np.zeros(shape, dtype), 0
        for v, p in zip(views, plan.perms, strict=True):
            if p[new] >= 0:
                acc = (acc + v[p[new]].astype(dtype)).astype(dtype)
                count += 1
        default[new] = (acc / dtype.type(count)).astype(dtype)
    out = []
    for v, p in zip(views, plan.perms, strict=True):
        new = np.zeros((plan.size, *shape), dtype)
        have = p >= 0
        ids = np.nonzero(have)[0]
        new[ids] = v[p[ids]].astype(dtype)
        for i, row in default.items():
            if not have[i] or i in plan.forced:
                new[i] = row
        if plan.size > n:
            new[n:] = new[:n].astype(np.float32).mean(axis=0).astype(dtype)
        out.append(np.moveaxis(new, 0, axis))
    return out

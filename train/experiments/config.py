"""The delta-transplant experiment's configuration: the embedded default and YAML overrides.

An experiment config is a mapping (YAML)::

    out: runs/delta_transplant   # output directory (``--out`` overrides)
    base: ""                     # a model reference: when set, stage (a) (pre-training) is skipped
    instruct: ""                 # a model reference: when set (with ``base``), stage (b) is skipped
    train: {...}                 # fields of a ``python -m train`` config shared by every stage
    stages:                      # per-stage ``python -m train`` fields, deep-merged over ``train``
      pretrain: {...}            # (a) base from scratch (``train.model.arch/config``)
      instruct: {...}            # (b) instruction tuning of the base (a ``kind: chat`` source)
      continue: {...}            # (d) base -> trained and (f) instruct -> instruct_trained
    eval:
      new_domain: code           # the ``stages.continue.data.sources`` source whose held-out
      old_domain: replay         #   documents make DIR/eval/{new,old}_domain.txt
      max_chars: 40000           # at most this many characters of each eval text
      instruct: bundled:instruct_eval   # held-out conversations (jsonl of {"messages": [...]})
      instruct_examples: 200     # the first N of them
      max_new_tokens: 32         # greedy answers' length limit

A user YAML is deep-merged over the embedded default (so it names only what it changes); every
stage's training config is built (and so checked) before any work starts.
"""

from __future__ import annotations

import copy
from typing import Any

from jaxarith.configfile import load_yaml
from jaxarith.errors import ConfigError

TINY_LLAMA = {
    "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 256, "rms_norm_eps": 1.0e-5, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}

DEFAULT: dict[str, Any] = {
    "out": "runs/delta_transplant",
    "base": "",
    "instruct": "",
    "train": {
        "batch": 16,
        "mesh": "fsdp=-1",
        "seed": 0,
        "model": {"arch": "llama", "tokenizer": "bundled", "config": TINY_LLAMA},
        "optimizer": {"weight_decay": 0.1, "clip_norm": 1.0},
        "checkpoint": {"every": 100, "keep": 1, "async_save": False},
        "eval": {"every": 0, "batches": 2, "at_end": True},
        "log": {"every": 10, "tensorboard": False, "progress": True, "plot": False},
    },
    "stages": {
        "pretrain": {
            "steps": 400,
            # packing: stream, as when the committed results (docs/experiments) were measured
            "data": {"seq_len": 128, "eval_fraction": 0.05, "packing": "stream",
                     "sources": {"docs": {"kind": "text", "path": "bundled:docs"}}},
            "schedule": {"kind": "cosine", "peak_lr": 3.0e-3, "end_lr": 3.0e-4,
                         "warmup_steps": 30},
        },
        "instruct": {
            "steps": 200,
            "data": {"seq_len": 96, "eval_fraction": 0.0, "packing": "stream",
                     "sources": {"instruct": {"kind": "chat", "path": "bundled:instruct"}}},
            "schedule": {"kind": "cosine", "peak_lr": 1.0e-3, "end_lr": 1.0e-4,
                         "warmup_steps": 20},
        },
        "continue": {
            "steps": 300,
            "data": {"seq_len": 128, "eval_fraction": 0.05, "packing": "stream",
                     "sources": {"code": {"kind": "text", "path": "bundled:code",
                                          "weight": 0.95},
                                 "replay": {"kind": "text", "path": "bundled:docs",
                                            "weight": 0.05}}},
            # re-warmed: from the pre-training's final LR up to a new peak, then re-decayed
            "schedule": {"kind": "rewarm", "init_lr": 3.0e-4, "peak_lr": 2.0e-3,
                         "end_lr": 2.0e-4, "warmup_steps": 20},
        },
    },
    "eval": {"new_domain": "code", "old_domain": "replay", "max_chars": 40000,
             "instruct": "bundled:instruct_eval", "instruct_examples": 200,
             "max_new_tokens": 32},
}

TOP_KEYS = ("out", "base", "instruct", "train", "stages", "eval")
STAGES = ("pretrain", "instruct", "continue")
EVAL_KEYS = ("new_domain", "old_domain", "max_chars", "instruct", "instruct_examples",
             "max_new_tokens")


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base`` (mappings recursively; other values replaced)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | None) -> dict:
    """An experiment config file as a dict (``{}`` for no path); clear errors for a missing
    file, invalid YAML or a top level that is not a mapping."""
    if not path:
        return {}

    raw = load_yaml(path, "experiment config") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load(path: str | None = None, overrides: dict | None = None) -> dict:
    """The embedded default, deep-merged with the YAML at ``path`` and then ``overrides``."""
    raw = read_yaml(path)
    cfg = deep_merge(DEFAULT, raw)
    cfg = deep_merge(cfg, overrides or {})
    # a user's data sources replace the default ones (not merged name by name)
    for stage in STAGES:
        user = ((raw.get("stages") or {}).get(stage) or {}).get("data", {}).get("sources")
        if user is not None:
            cfg["stages"][stage]["data"]["sources"] = copy.deepcopy(user)
    check(cfg, path or "the experiment config")
    return cfg


def check(cfg: dict, where: str) -> None:
    """Refuse unknown keys and inconsistent choices, naming the key."""
    for k in cfg:
        if k not in TOP_KEYS:
            raise ConfigError(f"{where}: unknown key {k!r} (valid: {', '.join(TOP_KEYS)})")
    for k in cfg["stages"]:
        if k not in STAGES:
            raise ConfigError(f"{where}: unknown stage stages.{k} (valid: {', '.join(STAGES)})")
    for k in cfg["eval"]:
        if k not in EVAL_KEYS:
            raise ConfigError(f"{where}: unknown key eval.{k} (valid: {', '.join(EVAL_KEYS)})")
    if cfg["instruct"] and not cfg["base"]:
        raise ConfigError(f"{where}: 'instruct' is set but 'base' is not: the delta needs both")
    sources = cfg["stages"]["continue"]["data"].get("sources", {})
    for k in ("new_domain", "old_domain"):
        if cfg["eval"][k] not in sources:
            raise ConfigError(f"{where}: eval.{k}={cfg['eval'][k]!r} is not a source of "
                              f"stages.continue.data.sources ({', '.join(sources)})")

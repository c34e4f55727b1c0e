"""Tiny random-weight models made locally with ``transformers`` (for tests and benchmarks).

Nothing is downloaded: models are built from a config with random weights, saved with
``save_pretrained`` next to the bundled tokenizer. Needs torch (the ``test`` extra).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from jaxarith.data.assets import BOS_ID, EOS_ID, PAD_ID, bundled_tokenizer

TINY_VOCAB = 1024  # the bundled tokenizer's size

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_llama_config(**overrides: Any):
    import transformers

    kw: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def tiny_mixtral_config(**overrides: Any):
    """Tiny GQA Mixtral: 2 layers, 4 experts, top-2 (an untied Llama body with sparse MLPs)."""
    import transformers

    kw: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        num_local_experts=4, num_experts_per_tok=2, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return transformers.MixtralConfig(**kw)


def tiny_gpt2_config(**overrides: Any):
    import transformers

    kw: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return transformers.GPT2Config(**kw)


def make_hf_model(
    directory: str | os.PathLike,
    hf_config,
    *,
    seed: int = 0,
    noise: float = 0.02,
    dtype: str = "float32",
    max_shard_size: str | int | None = None,
    with_tokenizer: bool = True,
):
    """Create a random model from ``hf_config``, save it to ``directory``, return the torch model.

    ``noise`` is added to every parameter (including norms and biases, which transformers
    initialises to constants) so that a wrong mapping of any tensor shows in the outputs.
    ``max_shard_size`` (e.g. ``"50KB"``) writes several shards with an index file.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    model = model.to(getattr(torch, dtype)).eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(directory), **kwargs)
    if with_tokenizer:
        bundled_tokenizer().save_pretrained(os.fspath(directory))
    return model


def hf_logits(model, tokens, attention_mask=None):
    """Float32 numpy logits of a transformers model, positions counted from the mask."""
    import numpy as np
    import torch

    tokens = np.asarray(tokens)
    mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask)
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations in the block: ``with count_compiles() as n: ...; n[0]``
    (tests assert that cached or bucketed programs compile nothing new)."""
    import jax

    n = [0]

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            n[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield n
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)

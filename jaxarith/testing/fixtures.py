"""Tiny random-weight models made locally with ``transformers`` (for tests and benchmarks).

Nothing is downloaded: models are built from a config with random weights, saved with
``save_pretrained`` next to the bundled tokenizer. Needs torch (the ``test`` extra); without it
(the newest-versions CI step) :func:`make_hf_model` writes the same files with jaxarith's own init
and exporter and returns no model.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from jaxarith.data.assets import BOS_ID, EOS_ID, PAD_ID, bundled_tokenizer
from jaxarith.io.convert.export import save_hf
from jaxarith.models import transformer
from jaxarith.models.config import config_from_hf

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


# The Qwen configs' vocabulary, padded past the bundled tokenizer as Qwen's own (151936 rows for
# 151665 tokens): in a qwen2/qwen3 directory transformers loads the bundled tokenizer as a
# Qwen2Tokenizer, which adds "<|endoftext|>" as token 1024.
QWEN_TINY_VOCAB = TINY_VOCAB + 64


def tiny_qwen2_config(**overrides: Any):
    """Tiny GQA Qwen2 (q/k/v biases, no o bias), untied; ``use_sliding_window`` false as in the
    released checkpoints."""
    import transformers

    kw: dict[str, Any] = dict(
        vocab_size=QWEN_TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return transformers.Qwen2Config(**kw)


def tiny_qwen3_config(**overrides: Any):
    """Tiny GQA Qwen3 (per-head q/k RMSNorm) with an explicit head_dim != hidden / heads."""
    import transformers

    kw: dict[str, Any] = dict(
        vocab_size=QWEN_TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
        rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return transformers.Qwen3Config(**kw)


def tiny_qwen3_moe_config(**overrides: Any):
    """Tiny GQA Qwen3-MoE: 2 layers, 4 experts of width 48, top-2, every layer sparse."""
    import transformers

    kw: dict[str, Any] = dict(
        vocab_size=QWEN_TINY_VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=128, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, rope_theta=1000000.0, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return transformers.Qwen3MoeConfig(**kw)


def tiny_mistral_config(**overrides: Any):
    """Tiny GQA Mistral with a sliding window of 4 slots (test sequences are longer)."""
    import transformers

    kw: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        sliding_window=4, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return transformers.MistralConfig(**kw)


# Gemma fixtures are initialised with a std of 0.2 (transformers' default 0.02 leaves the
# soft-caps, the window and the attention scale almost without effect on such tiny models).
GEMMA_INIT_STD = 0.2


def tiny_gemma2_config(**overrides: Any):
    """Tiny GQA Gemma 2: 4 layers alternating local (window 4) and global, soft-caps small
    enough to bite (attention 2, final 3), ``query_pre_attn_scalar`` 12 (not ``head_dim``)."""
    import transformers

    kw: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, initializer_range=GEMMA_INIT_STD, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return transformers.Gemma2Config(**kw)


def tiny_gemma3_config(**overrides: Any):
    """Tiny multi-query Gemma 3 text model: 3 layers (local, local, global by
    ``sliding_window_pattern`` 3), window 4, local RoPE base 100, global base 10k with linear
    scaling (as Gemma-3-4B and larger), ``query_pre_attn_scalar`` 12."""
    import transformers

    kw: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
        sliding_window=4, sliding_window_pattern=3, query_pre_attn_scalar=12,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        initializer_range=GEMMA_INIT_STD, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return transformers.Gemma3TextConfig(**kw)


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
    try:
        import torch
    except ImportError:  # the newest-versions CI step has no torch: write the files without it
        return _make_hf_files(directory, hf_config, seed=seed, noise=noise, dtype=dtype,
                              max_shard_size=max_shard_size, with_tokenizer=with_tokenizer)
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


def _make_hf_files(directory, hf_config, *, seed, noise, dtype, max_shard_size,
                   with_tokenizer) -> None:
    """:func:`make_hf_model` without torch: random weights by jaxarith's own init (plus
    ``noise``) written as an HF checkpoint by its exporter. Returns None (there is no
    transformers model to compare with)."""
    import jax
    import numpy as np

    cfg = config_from_hf(hf_config.to_dict())
    rng = np.random.default_rng(seed)
    params = transformer.init_params(cfg, seed)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32)
                          + noise * rng.standard_normal(x.shape, np.float32), params)
    tmp = os.path.join(os.fspath(directory), "model")
    save_hf(cfg, params, tmp, dtype=dtype, max_shard_size=max_shard_size or "5GB",
            progress=False)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(os.fspath(directory), name))
    os.rmdir(tmp)
    if with_tokenizer:
        bundled_tokenizer().save_pretrained(os.fspath(directory))
    return None


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

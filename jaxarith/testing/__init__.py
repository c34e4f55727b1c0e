"""Test helpers, never imported by the library: tiny local models (``fixtures``), the runner that
executes the docs' commands (``docs``) and the local multi-process launcher (``multiprocess``)."""

from jaxarith.data.assets import BOS_ID, EOS_ID, PAD_ID, bundled_tokenizer
from jaxarith.testing.fixtures import (
    LLAMA3_ROPE,
    TINY_VOCAB,
    count_compiles,
    hf_logits,
    make_hf_model,
    tiny_gemma2_config,
    tiny_gemma3_config,
    tiny_gpt2_config,
    tiny_llama_config,
    tiny_mistral_config,
    tiny_mixtral_config,
    tiny_qwen2_config,
    tiny_qwen3_config,
    tiny_qwen3_moe_config,
)

__all__ = ["BOS_ID", "EOS_ID", "LLAMA3_ROPE", "PAD_ID", "TINY_VOCAB", "bundled_tokenizer",
           "count_compiles", "hf_logits", "make_hf_model", "tiny_gemma2_config",
           "tiny_gemma3_config", "tiny_gpt2_config", "tiny_llama_config", "tiny_mistral_config",
           "tiny_mixtral_config", "tiny_qwen2_config", "tiny_qwen3_config",
           "tiny_qwen3_moe_config"]

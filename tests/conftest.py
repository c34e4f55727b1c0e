"""Shared fixtures. Every test process sees 8 fake CPU devices, so sharded tests need no flags.

Tiny random models are created locally with transformers (no network) next to the bundled
tokenizer; session-scoped, so each is built once.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MODEL+ADAPTER references are merged into a cache directory: never the user's ~/.cache
os.environ.setdefault("JAXARITH_CACHE", __import__("tempfile").mkdtemp(prefix="jaxarith-cache-"))

import pytest  # noqa: E402

from jaxarith import testing  # noqa: E402
from jaxarith.testing import LLAMA3_ROPE  # noqa: E402


def _make(tmp_path_factory, name, hf_config, **kw):
    d = tmp_path_factory.mktemp(name)
    model = testing.make_hf_model(d, hf_config, **kw)
    return str(d), model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """Untied GQA Llama with llama3 RoPE scaling, saved as several shards with an index."""
    return _make(tmp_path_factory, "llama", testing.tiny_llama_config(rope_scaling=LLAMA3_ROPE),
                 max_shard_size="100KB")


@pytest.fixture(scope="session")
def llama_tied_dir(tmp_path_factory):
    """Tied-embedding multi-query Llama with linear RoPE scaling and attention/MLP biases."""
    cfg = testing.tiny_llama_config(
        tie_word_embeddings=True, num_key_value_heads=1, head_dim=24,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True, mlp_bias=True,
    )
    return _make(tmp_path_factory, "llama_tied", cfg, seed=1)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return _make(tmp_path_factory, "gpt2",
                 testing.tiny_gpt2_config(scale_attn_by_inverse_layer_idx=True), seed=2)

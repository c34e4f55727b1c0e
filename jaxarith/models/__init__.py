"""Model families (Llama, GPT-2) over one canonical parameter layout."""

from jaxarith.models.config import (
    Arch,
    GPT2Config,
    LlamaConfig,
    ModelConfig,
    RopeScaling,
    config_from_hf,
    load_config,
    save_config,
)
from jaxarith.models.layers import KVCache
from jaxarith.models.transformer import (
    CausalLM,
    abstract_params,
    forward,
    init_cache,
    init_params,
    jit_forward,
    next_token_loss,
    num_params,
    param_axes,
    param_shardings,
    param_specs,
    token_logprobs,
)

__all__ = [
    "Arch", "GPT2Config", "LlamaConfig", "ModelConfig", "RopeScaling", "config_from_hf",
    "load_config", "save_config", "KVCache", "CausalLM", "abstract_params", "forward",
    "init_cache", "init_params", "jit_forward", "next_token_loss", "num_params", "param_axes",
    "param_shardings", "param_specs", "token_logprobs",
]

"""Model families (Llama/Mistral, GPT-2, Mixtral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3) over
one canonical parameter layout.

Each family is one module (``llama.py``, ``gpt2.py``, ``mixtral.py``, ``qwen2.py``, ``qwen3.py``,
``qwen3_moe.py``, ``gemma2.py``, ``gemma3.py``) registered in ``registry.py`` through the
interface of ``family.py``; ``transformer.py`` is the driver they share (see docs/models.md).

Shape letters, used the same way in every comment, docstring and einsum of jaxarith:

======  ====================================================================
letter  meaning
======  ====================================================================
B       batch (rows of a batch)
T       query / sequence length (tokens fed in one forward)
S       key length, or the KV-cache length (slots)
P       padded prompt length
D       model width (``hidden_size``, ``n_embd``)
N       query heads (``num_attention_heads``)
K       key/value heads (``num_key_value_heads``)
G       query heads per key/value head (``N // K``)
H       head dimension (``head_dim``)
F       MLP width (``intermediate_size``)
V       vocabulary size
L       layers (the stacked leading axis of ``params["layers"]``)
M       models combined at decode time (members of a logit-arithmetic spec)
A       microbatches of one training step (gradient accumulation)
R       response: new tokens generated per row (``max_new_tokens``)
J       speculative draft length (tokens drafted per round)
E       experts of a mixture-of-experts layer (``num_local_experts``)
C       experts chosen per token (top-k, ``num_experts_per_tok``)
======  ====================================================================
"""

from jaxarith.models.config import (
    Arch,
    DType,
    ModelConfig,
    RopeScaling,
    RopeType,
    check_config_keys,
    config_from_hf,
    load_config,
    save_config,
)
from jaxarith.models.family import BlockContext, Family, Inputs, ParamSpec, Rule
from jaxarith.models.gemma2 import Gemma2Config
from jaxarith.models.gemma3 import Gemma3TextConfig
from jaxarith.models.gpt2 import GPT2Config
from jaxarith.models.layers import KVCache
from jaxarith.models.llama import LlamaConfig
from jaxarith.models.mixtral import MixtralConfig
from jaxarith.models.qwen2 import Qwen2Config
from jaxarith.models.qwen3 import Qwen3Config
from jaxarith.models.qwen3_moe import Qwen3MoeConfig
from jaxarith.models.registry import FAMILIES, family, family_for_model_type, register
from jaxarith.models.transformer import (
    CausalLM,
    abstract_params,
    check_token_ids,
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
    "Arch", "DType", "Gemma2Config", "Gemma3TextConfig", "GPT2Config", "LlamaConfig",
    "MixtralConfig", "ModelConfig", "Qwen2Config", "Qwen3Config", "Qwen3MoeConfig", "RopeScaling",
    "RopeType",
    "check_config_keys", "config_from_hf", "load_config", "save_config", "BlockContext",
    "Family", "Inputs", "ParamSpec", "Rule", "FAMILIES", "family", "family_for_model_type",
    "register",
    "KVCache", "CausalLM", "abstract_params", "check_token_ids", "forward", "init_cache",
    "init_params", "jit_forward", "next_token_loss", "num_params", "param_axes",
    "param_shardings", "param_specs", "token_logprobs",
]

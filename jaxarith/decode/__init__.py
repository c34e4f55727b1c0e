"""Decoding: jitted KV-cache generation for one model or a logit combination of several.

- ``loop``: :class:`DecodeSpec` (a frozen, hashable description: members, weights, sampler,
  lengths) and :func:`generate`, one compiled ``while_loop`` with streaming in chunks;
- ``sampling``: :class:`Greedy` and :class:`Sampling` (temperature, top-k, top-p after combining);
- ``combine``: logit arithmetic as member weights: :func:`proxy_tuning`, :func:`eft` (up/down
  scaling with beta), :func:`reward_interpolation`;
- ``speculative``: :func:`generate_speculative`, speculative decoding of a combination (EFT).

Example::

    from jaxarith import decode
    spec = decode.proxy_tuning(base, expert, anti_expert, alpha=1.0)
    out = decode.generate(spec, params_list, prompts, max_new_tokens=32)
"""

from jaxarith.decode.combine import eft, eft_down, eft_up, proxy_tuning, reward_interpolation
from jaxarith.decode.loop import DecodeSpec, Generation, Member, generate
from jaxarith.decode.sampling import Greedy, Sampling
from jaxarith.decode.speculative import SpeculativeGeneration, SpeculativeSpec, generate_speculative

# Old names, removed: using one says what replaced it.
_RENAMED = {"Decoder": "DecodeSpec", "SpeculativeDecoder": "SpeculativeSpec",
            "StepCallback": "TokenCallback (jaxarith.decode.loop)", "Sample": "Sampling"}


def __getattr__(name: str):
    if name in _RENAMED:
        raise AttributeError(f"jaxarith.decode.{name} was renamed {_RENAMED[name]}")
    raise AttributeError(f"module 'jaxarith.decode' has no attribute {name!r}")


__all__ = ["DecodeSpec", "Generation", "Greedy", "Member", "Sampling", "SpeculativeGeneration",
           "SpeculativeSpec", "eft", "eft_down", "eft_up", "generate", "generate_speculative",
           "proxy_tuning", "reward_interpolation"]

"""Models, conversion and generation without torch: the part of the newest-versions CI step
(``make test-newest``, Python 3.12 with the newest jax/flax/transformers the ranges allow, where
the registry serves no CPU torch) that the parity tests against transformers cannot cover.

Random weights by jaxarith's own init are written as an HF checkpoint (safetensors + config.json),
read back by the converter and must be equal; the forward pass of the read-back weights must equal
the original's; greedy generation with the KV cache must equal argmax decoding by full forwards.
"""

import jax
import numpy as np
import pytest

from jaxarith import decode, testing
from jaxarith.io.convert.export import save_hf
from jaxarith.io.convert.hf import load_hf_params
from jaxarith.models import transformer
from jaxarith.models.config import config_from_hf

CONFIGS = {
    "llama": lambda: testing.tiny_llama_config(rope_scaling=testing.LLAMA3_ROPE).to_dict(),
    "gpt2": lambda: testing.tiny_gpt2_config().to_dict(),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request, tmp_path_factory):
    cfg = config_from_hf(CONFIGS[request.param]())
    params = transformer.init_params(cfg, 3)
    directory = tmp_path_factory.mktemp(request.param) / "hf"
    save_hf(cfg, params, str(directory), progress=False)
    return cfg, params, str(directory)


def test_hf_round_trip_and_forward(model):
    cfg, params, directory = model
    cfg2, params2 = load_hf_params(directory)
    assert cfg2.to_hf()["model_type"] == cfg.to_hf()["model_type"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    leaves2 = dict(jax.tree_util.tree_leaves_with_path(params2))
    assert len(leaves) == len(leaves2)
    for path, x in leaves:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(leaves2[path]),
                                      err_msg=jax.tree_util.keystr(path))
    tokens = np.arange(1, 25, dtype=np.int32)[None]
    mask = np.ones_like(tokens)
    a = np.asarray(transformer.jit_forward(params, cfg, tokens, mask))
    b = np.asarray(transformer.jit_forward(params2, cfg2, tokens, mask))
    assert a.shape == (1, 24, cfg.vocab_size) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_greedy_generation_equals_argmax_of_full_forwards(model):
    cfg, params, _ = model
    prompt, new = [5, 17, 42, 7], 6
    dec = decode.DecodeSpec(members=(decode.Member(cfg),), max_new_tokens=new)
    gen = decode.generate(dec, [params], [prompt])
    seq = list(prompt)
    for _ in range(new):
        toks = np.asarray([seq], np.int32)
        logits = np.asarray(transformer.jit_forward(params, cfg, toks, np.ones_like(toks)))
        seq.append(int(np.argmax(logits[0, -1])))
    assert np.asarray(gen.tokens)[0, :new].tolist() == seq[len(prompt):]

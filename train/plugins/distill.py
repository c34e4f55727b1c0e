"""The ``distill:`` section as a training extension (see :mod:`train.distill`)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxarith.distill import cache as distill_cache
from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.io.refs import load_tokenizer
from jaxarith.io.vocab import shared_tokenizer
from jaxarith.models import transformer
from train import distill as TD
from train import loop
from train.extensions import Extension


def _tokenizer(cfg):
    model_dir = loop.model_config(cfg)[1] if cfg.model.ref else None
    return loop.tokenizer_for(cfg, model_dir)


def extension(cfg) -> Extension | None:
    """The distillation extension when ``distill.teacher`` or ``distill.cache`` is set."""
    sec = cfg.distill
    if not sec.enabled:
        return None
    tokenizer = _tokenizer(cfg)
    vocab = len(tokenizer)
    t_dtype = jnp.dtype(sec.teacher_dtype)
    if sec.cache:
        cache = distill_cache.open_cache(sec.cache)
        if sec.top_k not in (0, cache.k):
            raise ConfigError(f"distill.top_k={sec.top_k} but distill.cache {cache.path} holds "
                              f"the teacher's top {cache.k}; set top_k to {cache.k} or 0")
        opts = sec.opts(top_k=cache.k)

        def loss(model_cfg, *, dtype=jnp.float32, remat=False, attention="xla"):
            if cache.manifest["vocab_size"] > model_cfg.vocab_size:
                raise ConfigError(f"distill.cache {cache.path}: built for a vocabulary of "
                                  f"{cache.manifest['vocab_size']}, the student has "
                                  f"{model_cfg.vocab_size}")
            return TD.make_loss_fn(model_cfg, opts, cached=True, vocab_size=vocab, dtype=dtype,
                                   remat=remat, attention=attention)

        def dataset(cfg_, sources, ds):
            return distill_cache.join(ds, cache, sources, tokenizer, cfg_.data.seq_len)

        return Extension(name=TD.NAME, loss=loss, loss_key=(sec, cache.path, vocab),
                         batch_fields=TD.cache_batch_fields(cache.k), dataset=dataset)

    opts = sec.opts()
    t_cfg = TD.teacher_config(sec.teacher)
    if sec.top_k > vocab:
        raise ConfigError(f"distill.top_k={sec.top_k} exceeds the vocabulary size {vocab}")

    def frozen(cfg_, model_cfg, mesh):
        # checked before the teacher is loaded and before anything is compiled
        TD.check_vocab(model_cfg, t_cfg, sec.teacher, vocab, sec.top_k)
        try:
            teacher_tok = load_tokenizer(sec.teacher)
        except JaxarithError:  # no tokenizer files: it reads the student's tokens, unchecked
            teacher_tok = None
        if teacher_tok is not None:  # another tokenizer: refused, naming the first token
            shared_tokenizer(["the student's tokenizer", f"distill.teacher {sec.teacher}"],
                             [tokenizer, teacher_tok])
        return TD.load_teacher(sec.teacher, t_cfg, mesh, sec.teacher_dtype,
                               progress=cfg_.log.progress)

    def loss(model_cfg, *, dtype=jnp.float32, remat=False, attention="xla"):
        TD.check_vocab(model_cfg, t_cfg, sec.teacher, vocab, sec.top_k)
        return TD.make_loss_fn(model_cfg, opts, teacher_cfg=t_cfg, vocab_size=vocab, dtype=dtype,
                               teacher_dtype=t_dtype, remat=remat, attention=attention)

    def abstract_frozen(cfg_, model_cfg, mesh):
        TD.check_vocab(model_cfg, t_cfg, sec.teacher, vocab, sec.top_k)
        return transformer.abstract_params(t_cfg, dtype=t_dtype, mesh=mesh)

    return Extension(name=TD.NAME, loss=loss, loss_key=(sec, t_cfg, vocab), frozen=frozen,
                     abstract_frozen=abstract_frozen)

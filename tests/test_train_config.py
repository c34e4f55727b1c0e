"""Run configs: every YAML in configs/ loads; bad keys are named; real-scale configs' train
state and step have the right shapes and shardings under ``jax.eval_shape`` on 8 fake devices."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxarith.errors import ConfigError
from jaxarith.models.config import config_from_hf
from jaxarith.sharding import make_mesh
from train.config import load_train_config, to_dict
from train.loop import model_config
from train.step import build_step, make_optimizer, next_token_loss_fn

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")

# config.json of meta-llama/Llama-3.2-1B (the hub is not reachable from tests)
LLAMA_3_2_1B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128001,
}


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny_llama.yaml", "tiny_gpt2.yaml", "llama3_2_1b_cpt_pod.yaml",
            "gpt2_124m_scratch.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_round_trips(path):
    cfg = load_train_config(path)
    assert cfg.schedule.total_steps == cfg.steps or cfg.schedule.total_steps > 0
    from train.config import from_dict

    assert from_dict(to_dict(cfg)) == cfg


def test_overrides_and_top_level_keys(tmp_path):
    cfg = load_train_config(TINY, ["steps=60", f"out={tmp_path}", "schedule.peak_lr=1e-3",
                             "data.sources.replay.weight=0.01", "average.kind=swa"])
    assert cfg.steps == 60 and cfg.out == str(tmp_path)
    assert cfg.schedule.peak_lr == 1e-3 and cfg.schedule.total_steps == 60
    assert {s.name: s.weight for s in cfg.data.sources} == {"code": 0.95, "replay": 0.01}
    assert cfg.average.kind == "swa"


@pytest.mark.parametrize("override,match", [
    ("stepz=3", "unknown config key stepz"),
    ("optimizer.learning_rate=1", "unknown config key optimizer.learning_rate"),
    ("data.sources.code.wieght=1", "unknown config key data.sources.code.wieght"),
    ("steps=abc", "steps='abc': expected int"),
    ("model.remat=3", "model.remat=3: expected one of none, full, minimal"),
    ("schedule.kind=linearr", "schedule.kind"),
    ("on_nonfinite=ignore", "on_nonfinite"),
    ("batch=10", "batch=10 is not divisible by microbatches=4"),
    ("steps", "not of the form key=value"),
])
def test_bad_keys_and_values_are_named(override, match):
    extra = ["microbatches=4"] if override.startswith("batch") else []
    with pytest.raises(ConfigError, match=match):
        load_train_config(TINY, [*extra, override])


def _abstract_check(model_cfg, cfg, mesh):
    sched = cfg.schedule.build()
    fns = build_step(model_cfg, mesh, tx=make_optimizer(cfg.optimizer, sched), schedule=sched,
                     batch=cfg.batch, seq_len=cfg.data.seq_len, microbatches=cfg.microbatches,
                     loss_fn=next_token_loss_fn(model_cfg, dtype=jnp.dtype(
                         cfg.model.compute_dtype), remat=cfg.model.remat),
                     average=(cfg.average.kind, cfg.average.options()))
    with jax.set_mesh(mesh):
        new_state, metrics = jax.eval_shape(fns.step, fns.abstract_state, fns.abstract_batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(fns.abstract_state)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(fns.abstract_state),
                    strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert metrics["loss"].shape == ()
    return fns


def test_llama_3_2_1b_pod_config_eval_shape():
    cfg = load_train_config(os.path.join(ROOT, "configs", "llama3_2_1b_cpt_pod.yaml"))
    assert cfg.model.ref == "meta-llama/Llama-3.2-1B"
    model_cfg = config_from_hf(LLAMA_3_2_1B)
    mesh = make_mesh(cfg.mesh)  # fsdp=-1 over the 8 fake devices
    fns = _abstract_check(model_cfg, cfg, mesh)
    st = fns.abstract_state
    q = st.params["layers"]["attn"]["q"]
    assert q.shape == (16, 2048, 32, 64) and q.sharding.spec == P(None, "fsdp", None, None)
    assert st.params["embed"].shape == (128256, 2048) and "lm_head" not in st.params
    assert st.params["embed"].sharding.spec == P(None, "fsdp")
    mu = st.opt_state[1][0].mu
    assert mu["layers"]["mlp"]["down"].sharding == st.params["layers"]["mlp"]["down"].sharding
    assert st.average.params["embed"].sharding == st.params["embed"].sharding
    assert fns.abstract_batch["tokens"].shape == (2, 256, 2048)
    assert fns.batch_sharding["tokens"].spec == P(None, "fsdp", None)
    n = sum(x.size for x in jax.tree.leaves(st.params))
    assert 1.23e9 < n < 1.24e9  # Llama-3.2-1B: 1.236B parameters


def test_gpt2_124m_scratch_config_eval_shape():
    cfg = load_train_config(os.path.join(ROOT, "configs", "gpt2_124m_scratch.yaml"))
    model_cfg, _ = model_config(cfg)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    fns = _abstract_check(model_cfg, cfg, mesh)
    st = fns.abstract_state
    assert st.params["embed"].shape == (50304, 768)
    assert st.params["embed"].sharding.spec == P("tensor", "fsdp")
    assert st.params["layers"]["mlp"]["up"].sharding.spec == P(None, "fsdp", "tensor")
    n = sum(x.size for x in jax.tree.leaves(st.params))
    assert 124.0e6 < n < 124.6e6  # GPT-2 small with the vocabulary padded to 50304


def test_pod_config_refused_when_batch_does_not_fit():
    cfg = load_train_config(os.path.join(ROOT, "configs", "llama3_2_1b_cpt_pod.yaml"),
                      ["batch=12", "microbatches=1"])
    with pytest.raises(ConfigError, match="data-parallel size 8"):
        _abstract_check(config_from_hf(LLAMA_3_2_1B), cfg, make_mesh(cfg.mesh))


def _header_commands(path):
    """The ``python -m train CONFIG ...`` commands written in a config's header comment."""
    lines, cmds = open(path).read().splitlines(), []
    for i, line in enumerate(lines):
        if "python -m train" not in line or not line.startswith("#"):
            continue
        text = line.lstrip("# ").rstrip("\\ ")
        while lines[i].rstrip().endswith("\\"):
            i += 1
            text += " " + lines[i].lstrip("# ").rstrip("\\ ")
        cmds.append(text.split()[3:])  # after `python -m train CONFIG`
    return cmds


WITH_COMMANDS = [p for p in CONFIGS if _header_commands(p)]


def test_the_shipped_configs_have_header_commands():
    names = {os.path.basename(p) for p in WITH_COMMANDS}
    assert {"tiny_llama.yaml", "tiny_gpt2.yaml", "llama3_2_1b_cpt_pod.yaml",
            "gpt2_124m_scratch.yaml"} <= names


@pytest.mark.parametrize("path", WITH_COMMANDS, ids=os.path.basename)
def test_config_header_commands_load(path):
    """Each config's own header command is valid: its overrides load and its schedule fits
    (``tiny_gpt2.yaml steps=60`` failed when warmup + cooldown were 80 steps)."""
    cmds = _header_commands(path)
    for args in cmds:
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        cfg = load_train_config(path, overrides)
        cfg.schedule.build()
        assert cfg.steps == int(dict(a.split("=", 1) for a in overrides).get("steps", cfg.steps))

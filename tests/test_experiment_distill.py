"""The distill-vs-inherit experiment's plumbing on a toy size: the four arms differ exactly as
configured (start weights, teacher in the step), and the held-out KL against float64 numpy."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxarith.io.convert import load_hf_params
from jaxarith.io.refs import load_model
from jaxarith.models import forward
from train.experiments import distill_vs_inherit as dvi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "experiments", "distill_vs_inherit_smoke.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The smoke config's stage configs, with a random teacher of the smoke teacher's shape
    standing in for stage 0 at DIR/models/teacher (no training)."""
    from jaxarith.io.convert.export import save_hf
    from jaxarith.models import LlamaConfig, init_params

    out = str(tmp_path_factory.mktemp("dvi"))
    cfg = dvi.load_experiment_config(SMOKE, {"train": {"log": {"progress": False}}})
    t_cfg = LlamaConfig.from_hf({**cfg["teacher"]["config"], "model_type": "llama"})
    # well away from init scale, so the models' distributions differ measurably
    params = init_params(t_cfg, 5)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(6), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys, strict=True)])
    teacher_dir = os.path.join(out, "models", "teacher")
    save_hf(t_cfg, params, teacher_dir, progress=False)
    return cfg, dvi.stage_train_configs(cfg, out), teacher_dir


def test_arms_share_everything_but_start_weights_and_objective(setup):
    cfg, tc, teacher_dir = setup
    assert set(tc) == {"teacher", *dvi.ARMS}
    wants = {"scratch": (False, False), "inherit": (True, False), "distill": (False, True),
             "inherit_distill": (True, True)}
    for name, (inherit, distill) in wants.items():
        c = tc[name]
        assert c.init.enabled is inherit and c.distill.enabled is distill, name
        if inherit:
            assert c.init.ref == teacher_dir and c.init.layers == "first:1"
        if distill:
            assert c.distill.teacher == teacher_dir and c.distill.alpha == 0.5
        # equal steps and equal data: the same stream, batch, seed, schedule and optimizer
        for field in ("steps", "batch", "seed", "data", "schedule", "optimizer", "mesh"):
            assert getattr(c, field) == getattr(tc["scratch"], field), (name, field)
    assert tc["teacher"].steps == cfg["teacher"]["steps"] != tc["scratch"].steps
    assert tc["scratch"].model.config["num_hidden_layers"] == 1
    assert tc["teacher"].model.config["num_hidden_layers"] == 2


def test_inherited_start_is_the_teachers_first_layer(setup):
    from jaxarith.sharding import make_mesh
    from train.init import start_config, start_params

    _, tc, teacher_dir = setup
    _, teacher = load_hf_params(teacher_dir, progress=False)
    for name in ("inherit", "inherit_distill"):
        model_cfg, _ = start_config(tc[name].init)
        assert model_cfg.num_hidden_layers == 1
        p = start_params(tc[name].init, make_mesh("fsdp=-1"), tc[name].seed)
        for path, leaf in jax.tree_util.tree_leaves_with_path(p["layers"]):
            ref = teacher["layers"]
            for k in path:
                ref = ref[k.key]
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref)[:1], str(path))
        for k in ("embed", "final_norm", "lm_head"):
            for a, b in zip(jax.tree.leaves(p[k]), jax.tree.leaves(teacher[k]), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), k)


def test_distilled_step_uses_the_teacher(setup):
    from jaxarith.sharding import make_mesh
    from train.plugins import distill as plugin

    _, tc, teacher_dir = setup
    assert plugin.extension(tc["scratch"]) is None and plugin.extension(tc["inherit"]) is None
    t = load_model(teacher_dir, progress=False)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, 1000, (2, 12)), jnp.int32)
    for name in ("distill", "inherit_distill"):
        ext = plugin.extension(tc[name])
        frozen = ext.frozen(tc[name], t.config, make_mesh("fsdp=-1"))
        for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(t.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the step's loss: its kl_t1 is KL(teacher || student) from the teacher it was given
    # (float64 numpy on both models' logits), so another teacher gives another number
    import dataclasses

    s_cfg = dataclasses.replace(t.config, num_hidden_layers=1)
    s_params = dict(t.params, layers=jax.tree.map(lambda x: x[:1] * 0.5, t.params["layers"]))
    loss_fn = jax.jit(plugin.extension(tc["distill"]).loss(s_cfg))
    zs = np.asarray(forward(s_params, s_cfg, tokens)[0], np.float64)[:, :-1]
    kls = []
    for scale in (1.0, 0.3):
        tp = jax.tree.map(lambda x, s=scale: x * s, t.params)
        _, count, metrics = loss_fn(s_params, {"distill": tp}, {"tokens": tokens})
        zt = np.asarray(forward(tp, t.config, tokens)[0], np.float64)[:, :-1]
        lt, ls = _log_softmax(zt), _log_softmax(zs)
        want = np.sum(np.exp(lt) * (lt - ls), -1).mean()
        got = float(metrics["kl_t1"]) / float(count)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
        kls.append(got)
    assert abs(kls[0] - kls[1]) > 1e-3


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_heldout_kl_against_numpy(setup):
    import dataclasses

    _, _, teacher_dir = setup
    t = load_model(teacher_dir, progress=False)
    s_cfg = dataclasses.replace(t.config, num_hidden_layers=1)
    student = dataclasses.replace(
        t, config=s_cfg,
        params=dict(t.params, layers=jax.tree.map(lambda x: x[1:] * 0.7, t.params["layers"])))
    rng = np.random.default_rng(1)
    windows = rng.integers(3, 1000, (3, 10)).astype(np.int32)  # batch 2: the last one padded
    got = dvi.heldout_kl(t, student, windows, batch=2)
    zt = np.asarray(forward(t.params, t.config, jnp.asarray(windows))[0], np.float64)[:, :-1]
    zs = np.asarray(forward(student.params, s_cfg, jnp.asarray(windows))[0],
                    np.float64)[:, :-1]
    lt, ls = _log_softmax(zt), _log_softmax(zs)
    want = np.sum(np.exp(lt) * (lt - ls), -1).mean()  # pooled over 3 x 9 positions
    assert got == pytest.approx(want, rel=1e-4)
    assert want > 1e-3
    assert dvi.heldout_kl(t, t, windows, batch=2) == pytest.approx(0.0, abs=1e-6)


def test_config_errors(tmp_path):
    from jaxarith.errors import ConfigError

    with pytest.raises(ConfigError, match="student.layers=2"):
        dvi.load_experiment_config(SMOKE, {"student": {"layers": 2}})
    with pytest.raises(ConfigError, match="unknown key 'studnet'"):
        dvi.load_experiment_config(SMOKE, {"studnet": {}})
    with pytest.raises(ConfigError, match="student.lr"):
        dvi.load_experiment_config(SMOKE, {"student": {"lr": 1}})


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path):
    """Every stage and output of the smoke config (a few steps each), then a cached rerun."""
    cfg = dvi.load_experiment_config(SMOKE, {"train": {"log": {"progress": False}}})
    lines = []
    res = dvi.run(cfg, str(tmp_path / "run"), log=lines.append, progress=False)
    for f in ("results.json", "report.md", "loss_curves.png", "eval.json"):
        assert os.path.getsize(tmp_path / "run" / f) > 0, f
    m = res["models"]
    assert set(m) == set(dvi.MODELS) and m["teacher"]["heldout_kl_to_teacher"] == 0.0
    assert all(m[a]["heldout_kl_to_teacher"] > 0 and m[a]["layers"] == 1 for a in dvi.ARMS)
    # equal-init pairs diverge only through the objective
    assert m["scratch"]["heldout_loss"] != m["distill"]["heldout_loss"]
    assert sum("done in" in line for line in lines) == 6
    again = []
    dvi.run(cfg, str(tmp_path / "run"), log=again.append, progress=False)
    assert sum("cached" in line for line in again) == 6

"""``jaxarith plan``: slice names, per-chip bytes, the HLO collective count, and a real TPU
compile of a tiny config for an abstract v5e topology (libtpu, no TPU: the tpu extra)."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from jaxarith import cli
from jaxarith.errors import ConfigError
from jaxarith.models import config_from_hf, num_params
from jaxarith.planning import slices
from jaxarith.sharding import make_mesh
from train import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")
HAS_LIBTPU = plan.libtpu_version() is not None


@pytest.mark.parametrize("name,chips,topology,hbm_gib", [
    ("v5p-8", 4, "v5p:2x2x1", 95), ("v5p-128", 64, "v5p:4x4x4", 95), ("v4-8", 4, "v4:2x2x1", 32),
    ("v5e-16", 16, "v5e:4x4", 16), ("v5e-256", 256, "v5e:16x16", 16),
    ("v6e-64", 64, "v6e:8x8", 32), ("v6e-8", 8, "v6e:2x4", 32)])
def test_slice_names_as_cloud_tpu_counts_them(name, chips, topology, hbm_gib):
    sl = plan.parse_slice(name)
    assert (sl.chips, sl.topology, sl.hbm_bytes) == (chips, topology, hbm_gib << 30)
    assert plan.parse_slice(name, 2).total_chips == 2 * chips


@pytest.mark.parametrize("bad", ["v5p-7", "v5e-12", "tpu-8", "v5p", "v7-8"])
def test_bad_slice_names_are_refused(bad):
    with pytest.raises(ConfigError, match="--topology"):
        plan.parse_slice(bad)


def test_collectives_are_counted_from_hlo_text():
    hlo = """
  %all-reduce.1 = f32[1024,64]{1,0} all-reduce(f32[1024,64]{1,0} %x), replica_groups={}
  %ag = bf16[8,128]{1,0} all-gather(bf16[2,128]{1,0} %y), dimensions={0}
  %ag-start = (bf16[2,128]{1,0}, bf16[8,128]{1,0}) all-gather-start(bf16[2,128]{1,0} %z)
  %ag-done = bf16[8,128]{1,0} all-gather-done((bf16[2,128]{1,0}, bf16[8,128]{1,0}) %ag-start)
  %rs = (f32[4]{0}, f32[16]{0}) reduce-scatter(f32[16]{0} %a, f32[64]{0} %b), dimensions={0}
  %add = f32[4]{0} add(f32[4]{0} %p, f32[4]{0} %q)
"""
    got = plan.collectives(hlo)
    assert got == {"all-gather": {"count": 2, "bytes": 8 * 128 * 2 + (2 + 8) * 128 * 2},
                   "all-reduce": {"count": 1, "bytes": 1024 * 64 * 4},
                   "reduce-scatter": {"count": 1, "bytes": (4 + 16) * 4}}


def test_chip_bytes_are_the_shard_sizes():
    mesh = make_mesh("data=2,fsdp=4")
    shd = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tree = {"w": jax.ShapeDtypeStruct((64, 10), np.float32, sharding=shd),
            "b": jax.ShapeDtypeStruct((10,), np.dtype("bfloat16"), sharding=rep)}
    assert plan.chip_bytes(tree) == 16 * 10 * 4 + 10 * 2


needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install "
                                  "'jaxarith[tpu]'; CI installs it)")


def _plan(capsys, *args):
    code = cli.main(["plan", *args, "--json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@needs_libtpu
def test_tiny_config_compiles_for_a_tpu_slice(capsys):
    code, res = _plan(capsys, TINY, "--topology", "v5e-4", "batch=8", "mesh=fsdp=4")
    assert code == 0 and res["fits"] and res["chips"] == 4
    assert res["topology"] == "v5e-4" and res["libtpu"] and res["jax"] == jax.__version__
    # independent of the compiler: float32 master weights sharded over fsdp=4 (every tiny
    # dimension divides 4), except the RMSNorm scales, which every chip holds whole
    import yaml

    raw = yaml.safe_load(open(TINY))["model"]["config"]
    n = num_params(config_from_hf({"model_type": "llama", **raw}))
    norms = (2 * raw["num_hidden_layers"] + 1) * raw["hidden_size"]
    pc = res["per_chip_bytes"]
    assert pc["params"] == (n - norms) * 4 // 4 + norms * 4
    assert pc["optimizer"] >= 2 * pc["params"]
    assert pc["batch"] == 8 * 128 * 4 // 4  # int32 tokens, batch split over fsdp
    # the compiler's numbers: the arguments hold the state and batch; total adds up
    assert pc["argument"] >= pc["params"] + pc["optimizer"] + pc["batch"]
    assert pc["total"] == pc["argument"] + pc["output"] - pc["alias"] + pc["temp"]
    assert pc["temp"] > 0 and "all-gather" in res["collectives"] or \
        "all-reduce" in res["collectives"]
    assert math.isclose(res["hbm_bytes"], 16 * 2**30)


@needs_libtpu
def test_a_state_larger_than_hbm_is_refused_before_compiling(capsys):
    # a 16-layer, 8192-wide Llama (about 14B parameters): 12 bytes a parameter on 4 chips of 16 GiB
    big = ["model.config.hidden_size=8192", "model.config.intermediate_size=28672",
           "model.config.num_hidden_layers=16", "model.config.num_attention_heads=64",
           "model.config.num_key_value_heads=8", "model.config.head_dim=128",
           "model.config.vocab_size=32768", "mesh=fsdp=4", "batch=4"]
    code, res = _plan(capsys, TINY, "--topology", "v5e-4", *big)
    assert code == 3 and res["fits"] is False and res["type"] == "DoesNotFitError"
    assert "largest: optimizer" in res["error"] and "fsdp" in res["error"]
    assert "\n" not in res["error"] and len(res["error"]) < 300


@needs_libtpu
def test_a_program_the_compiler_refuses_is_one_line_exit_3(monkeypatch, capsys):
    """The TPU compiler's own out-of-HBM error (the state fits, the activations do not; e.g.
    Llama-3.2-1B at 8 x 2048 without remat on v5e-4) becomes one line and exit 3, not a
    traceback; any other compile error is left alone."""
    from train import plan as train_plan

    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (27.58G) exceeds available HBM (15.75G).\n<a long allocation dump>")

    def refused(*a, **k):
        raise jax.errors.JaxRuntimeError(msg)

    monkeypatch.setattr(train_plan, "run_step", refused)
    code, res = _plan(capsys, TINY, "--topology", "v5e-4", "batch=8", "mesh=fsdp=4",
                      "model.remat=none")
    assert code == 3 and res["fits"] is False and res["type"] == "DoesNotFitError"
    assert "27.58 GiB" in res["error"] and "15.75 GiB" in res["error"]
    assert "model.remat=full (now none)" in res["error"] and "\n" not in res["error"]

    def broken(*a, **k):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(train_plan, "run_step", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        cli.main(["plan", TINY, "--topology", "v5e-4", "batch=8", "mesh=fsdp=4"])


def test_without_libtpu_plan_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(slices, "libtpu_version", lambda: None)
    code, res = _plan(capsys, TINY, "--topology", "v5e-4")
    assert code == 2 and "pip install 'jaxarith[tpu]'" in res["error"]


def test_compile_only_needs_a_topology(capsys):
    from train.__main__ import main

    assert main([TINY, "--compile-only", "--json"]) == 2
    assert "--topology" in json.loads(capsys.readouterr().out)["error"]


@needs_libtpu
def test_a_70b_llama_on_v5e_16_is_refused_in_one_line(capsys):
    """Llama-3.1-70B's shapes (80 layers, 8192 wide, GQA 64/8, 128256 vocabulary): about 70.6B
    parameters, 12 bytes each over 16 chips of 16 GiB cannot fit, whatever the activations."""
    shape = ["model.config.hidden_size=8192", "model.config.intermediate_size=28672",
             "model.config.num_hidden_layers=80", "model.config.num_attention_heads=64",
             "model.config.num_key_value_heads=8", "model.config.head_dim=128",
             "model.config.vocab_size=128256", "model.config.max_position_embeddings=8192",
             "data.seq_len=2048", "batch=16", "mesh=fsdp=16", "model.compute_dtype=bfloat16",
             "model.remat=true"]
    code, res = _plan(capsys, TINY, "--topology", "v5e-16", *shape)
    assert code == 3 and res["fits"] is False and res["chips"] == 16
    line = res["error"]
    assert "\n" not in line and "GiB per chip" in line and "v5e chip" in line, line
    need = float(line.split("needs ")[1].split(" GiB")[0])
    assert 70e9 * 12 / 16 / 2**30 < need < 72e9 * 16 / 16 / 2**30  # + the average's copy


@needs_libtpu
def test_splash_attention_compiles_for_a_tpu_slice(capsys):
    """The Mosaic kernel compiled by the TPU compiler inside shard_map (auto picks it on TPU)."""
    code, res = _plan(capsys, TINY, "--topology", "v5e-4", "batch=8", "mesh=fsdp=2,tensor=2")
    assert code == 0 and res["attention"] == "splash" and res["fits"]
    code, xla = _plan(capsys, TINY, "--topology", "v5e-4", "batch=8", "mesh=fsdp=2,tensor=2",
                      "model.attention=xla")
    assert code == 0 and xla["attention"] == "xla"
    assert res["per_chip_bytes"]["params"] == xla["per_chip_bytes"]["params"]


@needs_libtpu
@pytest.mark.slow  # one tiny compile (~20-40 s) and one refusal
def test_plan_presets_script_table_and_smallest_slice(tmp_path):
    """scripts/plan_presets.py: the tiny model compiled on v5p-8 fits (the smallest slice that
    fits), Llama-3.1-70B on v5e-16 is refused before compiling (12 bytes a parameter over 16
    chips of 16 GiB), and the JSON holds every row."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "scripts", "plan_presets.py")
    out = tmp_path / "tiny.json"
    p = subprocess.run([sys.executable, script, "--tiny", "--slices", "v5p-8", "--seqs", "128",
                        "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "XLA_FLAGS": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["fits"] and row["batch"] == 64 * 4 and data["smallest"] == {"tiny_llama 128":
                                                                          "v5p-8"}
    assert "| tiny_llama | 128 | v5p-8 | 4 | 256 |" in p.stdout and "yes (smallest)" in p.stdout
    p = subprocess.run([sys.executable, script, "--models", "meta-llama/Llama-3.1-70B",
                        "--slices", "v5e-16", "--seqs", "2048"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "XLA_FLAGS": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| Llama-3.1-70B | 2048 | v5e-16 | 16 | 64 | - | - | no (the state alone) | - |" \
        in p.stdout


@pytest.mark.parametrize("name, n", [("meta-llama/Llama-3.2-1B", 1_235_814_400),
                                     ("meta-llama/Llama-3.1-8B", 8_030_261_248),
                                     ("meta-llama/Llama-3.1-70B", 70_553_706_496),
                                     ("mistralai/Mixtral-8x7B-v0.1", 46_702_792_704)])
def test_llama_and_mixtral_presets_have_the_published_parameter_counts(name, n):
    from jaxarith.models.presets import preset

    assert num_params(preset(name)) == n


def test_compiler_out_of_memory_guard_serves_every_plan():
    """The guard the train, generate and lm-eval plans compile under: the compiler's out-of-HBM
    refusal becomes one DoesNotFitError line with the advice; other errors pass unchanged."""
    sl = slices.parse_slice("v5e-4")
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (31.20G) exceeds available HBM (15.75G).\n<dump>")
    with pytest.raises(slices.DoesNotFitError) as e:
        with slices.refuse_if_compiler_out_of_memory(sl, "a smaller --batch"):
            raise jax.errors.JaxRuntimeError(msg)
    assert "31.20 GiB" in str(e.value) and str(e.value).endswith("try a smaller --batch")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="other"):
        with slices.refuse_if_compiler_out_of_memory(sl, "x"):
            raise ValueError("other")

"""scripts/device_check.py (the GPU device check, issue 27) runs end to end on the CPU with
--smoke: the attention backends this device has agree, and the training rows are filled."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~30-90 s: a torch and a jax training run and two attention backends
def test_device_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "dc.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "device_check.py"),
                        "--smoke", "--json", "--out", str(out)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r == json.loads(out.read_text())
    by = {a["attention"]: a for a in r["attention"]}
    assert set(by) == {"xla", "splash-interpret"}
    assert by["xla"]["max_abs_vs_xla"] == 0.0
    # bfloat16 log-probs of a random model: backends within bf16 rounding of each other and
    # of transformers' float32
    assert by["splash-interpret"]["max_abs_vs_xla"] < 2e-2
    assert max(a["max_abs_vs_transformers"] for a in by.values()) < 5e-2
    t = r["training"]
    assert t["jax_tokens_per_s"] > 0 and t["torch_tokens_per_s"] > 0
    assert t["jax_mfu"] is None and r["peak_bf16_tflops"] is None  # no bf16 peak for a CPU

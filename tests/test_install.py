"""Installing jaxarith keeps the jax stack a machine already has (a TPU VM's, a GPU image's).

pyproject.toml gives ranges; requirements/lock.txt pins today's exact set for CI. In the
newest-versions CI step (``make test-newest``) this environment holds newer jax / flax /
transformers than the lock: ``pip install -e .`` must then install jaxarith alone and change no
installed package (no downgrade to the lock's versions). In the locked environment it must
equally change nothing.
"""

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.join(os.path.dirname(__file__), "..")
LOCK = os.path.join(ROOT, "requirements", "lock.txt")
STACK = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "numpy")


def _lock() -> dict[str, Version]:
    out = {}
    with open(LOCK) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                req = Requirement(line)
                (spec,) = req.specifier
                out[req.name.lower().replace("_", "-")] = Version(spec.version)
    return out


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_runtime_dependencies_are_ranges_that_admit_the_lock():
    lock = _lock()
    for dep in _project()["dependencies"]:
        req = Requirement(dep)
        assert not any(s.operator == "==" for s in req.specifier), f"{dep}: pinned, not a range"
        name = req.name.lower().replace("_", "-")
        assert name in lock, f"{name} is missing from requirements/lock.txt"
        assert lock[name] in req.specifier, f"the lock's {name} {lock[name]} is outside {dep}"
    extras = _project()["optional-dependencies"]
    assert {"tpu", "cuda12", "eval", "wandb", "test"} <= set(extras)
    assert Requirement(extras["tpu"][0]).extras == {"tpu"}


def test_installed_stack_is_within_the_ranges():
    for dep in _project()["dependencies"]:
        req = Requirement(dep)
        installed = Version(metadata.version(req.name))
        assert installed in req.specifier, f"{req.name} {installed} is outside {dep}"


def test_pip_install_keeps_the_installed_stack(tmp_path):
    """``pip install -e .`` (dry run, with its dependencies) would install jaxarith only."""
    if not os.environ.get("JAXARITH_LOCK"):
        pytest.skip("run by `make test-newest` (pip resolves against the package index)")
    lock = _lock()
    newer = [n for n in STACK if Version(metadata.version(n)) > lock[n]]
    # the premise of the newest-versions step: a stack newer than the lock is installed
    assert "jax" in newer, f"expected a newer jax than the lock's {lock['jax']}"
    report = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
         str(report), "-e", ROOT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    changes = {i["metadata"]["name"]: i["metadata"]["version"]
               for i in json.loads(report.read_text())["install"]}
    changes.pop("jaxarith", None)
    assert not changes, f"pip would change installed packages: {changes} (newer than the " \
                        f"lock here: {newer})"


def test_tpu_extra_resolves_jax_with_its_libtpu(tmp_path):
    """``jaxarith[tpu]`` brings the libtpu that jax's own ``tpu`` extra pairs with, and a jax
    within the range (the registry may lack the newest jax's libtpu: pip then picks an older
    jax that has one)."""
    if not os.environ.get("JAXARITH_LOCK"):
        pytest.skip("run by `make test-newest` (pip resolves against the package index)")
    report = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
         str(report), "-e", f"{ROOT}[tpu]"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = {i["metadata"]["name"]: i["metadata"] for i in json.loads(report.read_text())["install"]}
    assert "libtpu" in got, sorted(got)
    jax_version = Version(got["jax"]["version"]) if "jax" in got else \
        Version(metadata.version("jax"))
    jax_req = next(Requirement(d) for d in _project()["dependencies"] if d.startswith("jax>"))
    assert jax_version in jax_req.specifier
    if "jax" in got:  # the libtpu is the one that jax release's tpu extra names
        wants = [Requirement(r) for r in got["jax"]["requires_dist"]
                 if r.startswith("libtpu") and 'extra == "tpu"' in r]
        assert wants and all(Version(got["libtpu"]["version"]) in w.specifier for w in wants)

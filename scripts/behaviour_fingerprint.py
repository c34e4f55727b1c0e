"""Fingerprint of jaxarith's observable behaviour: hashes of tokens, logits, merges and exports.

Run before and after a refactor that must not change behaviour (e.g. moving modules) and
compare the two JSON files: every entry must be equal bit for bit.

    python scripts/behaviour_fingerprint.py /tmp/before.json
    ... refactor ...
    python scripts/behaviour_fingerprint.py /tmp/after.json
    python scripts/behaviour_fingerprint.py --compare /tmp/before.json /tmp/after.json

Each entry is the sha256 of a command's output files (safetensors, configs) or of its ``--json``
stdout with timings removed. Tiny random models are made locally (needs torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

_VOLATILE = {"seconds", "elapsed", "time", "tokens_per_second", "compile_seconds", "wall",
             "load_seconds", "total_seconds", "tok_per_s", "out"}


def _scrub(obj):
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in sorted(obj.items())
                if k not in _VOLATILE and not any(w in k for w in ("second", "time", "per_s"))}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("/tmp"):
        return "<path>"
    return obj


def _hash_dir(path: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            if not (name.endswith(".safetensors") or name == "config.json"):
                continue
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _run(args: list[str], out: str | None = None) -> str:
    cmd = [sys.executable, "-m", "jaxarith", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env={
        **os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    if out is not None:
        return _hash_dir(out)
    data = json.loads(res.stdout.strip().splitlines()[-1])
    return hashlib.sha256(json.dumps(_scrub(data), sort_keys=True).encode()).hexdigest()


def fingerprint(work: str) -> dict[str, str]:
    from jaxarith.testing import (
        make_hf_model,
        tiny_gpt2_config,
        tiny_llama_config,
        tiny_mixtral_config,
    )

    j = lambda *p: os.path.join(work, *p)  # noqa: E731
    make_hf_model(j("llama"), tiny_llama_config(), seed=0)
    make_hf_model(j("llama_it"), tiny_llama_config(), seed=1)
    make_hf_model(j("llama_tr"), tiny_llama_config(), seed=2)
    make_hf_model(j("gpt2"), tiny_gpt2_config(), seed=3)
    make_hf_model(j("mixtral"), tiny_mixtral_config(), seed=4)
    with open(j("text.txt"), "w") as f:
        f.write("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 20)
    with open(j("ties.yaml"), "w") as f:
        f.write(f"merge_method: ties\nbase_model: {j('llama')}\nmodels:\n"
                f"  - model: {j('llama_it')}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                f"  - model: {j('llama_tr')}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                "parameters: {normalize: true}\n")
    out: dict[str, str] = {}
    for name in ("llama", "gpt2", "mixtral"):
        out[f"eval-loss/{name}"] = _run(["eval-loss", j(name), "--text", j("text.txt"),
                                         "--seq-len", "32", "--json"])
        out[f"generate/{name}"] = _run(["generate", j(name), "--prompt", "def fib(n):",
                                        "--max-new-tokens", "12", "--json"])
        out[f"convert-orbax/{name}"] = _run(["convert", j(name), j(f"{name}_orbax"), "--json"])
        out[f"convert-hf/{name}"] = _run(["convert", j(f"{name}_orbax"), j(f"{name}_hf"),
                                          "--json"], j(f"{name}_hf"))
    out["generate/sampled"] = _run(["generate", j("llama"), "--prompt", "x = ",
                                    "--max-new-tokens", "12", "--temperature", "0.8",
                                    "--top-p", "0.9", "--seed", "1", "--json"])
    out["generate/proxy"] = _run(["generate", j("llama"), "--prompt", "x = ", "--expert",
                                  j("llama_it"), "--anti-expert", j("llama_tr"),
                                  "--max-new-tokens", "12", "--json"])
    out["merge/ties"] = _run(["merge", j("ties.yaml"), j("ties_out")], j("ties_out"))
    out["delta/extract"] = _run(["delta", "extract", j("llama_it"), j("llama"), j("delta")],
                                j("delta"))
    out["delta/norms"] = _run(["delta", "norms", j("llama"), j("llama_it"), "--per-layer",
                               "--json"])
    out["average/uniform"] = _run(["average", j("llama"), j("llama_it"), j("llama_tr"),
                                   j("avg"), "--method", "uniform"], j("avg"))
    out["inherit/first1"] = _run(["inherit", j("llama"), j("inh"), "--layers", "first:1"],
                                 j("inh"))
    out["upcycle"] = _run(["upcycle", j("llama"), j("up"), "--experts", "2", "--top-k", "1"],
                          j("up"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--compare", action="store_true", help="compare two fingerprint files")
    args = ap.parse_args()
    if args.compare:
        a, b = (json.load(open(p)) for p in args.paths)
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        print(json.dumps({"entries": len(a), "differ": diff}))
        raise SystemExit(1 if diff else 0)
    with tempfile.TemporaryDirectory() as work:
        fp = fingerprint(work)
    with open(args.paths[0], "w") as f:
        json.dump(fp, f, indent=1, sort_keys=True)
    print(f"{len(fp)} entries -> {args.paths[0]}")


if __name__ == "__main__":
    main()

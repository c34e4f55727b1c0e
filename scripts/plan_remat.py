"""Per-chip HBM of each remat policy: compile one preset's train step for a TPU slice once per
policy (``model.remat``, :mod:`jaxarith.models.remat`), by the code path of ``jaxarith plan
--json`` (:func:`train.plan.plan_train`: libtpu's abstract topology, no TPU needed), then print
a markdown table of per-chip bytes (temp, peak, host temp, argument, total: see
:mod:`train.plan`) and write every plan as JSON.

The preset: Llama-3.2-1B's shapes (16 layers, 2048 wide, GQA 32/8, 128256 vocabulary, tied
embeddings) on ``configs/tiny_llama.yaml``'s run, batch 8 x 2048, bf16 compute, AdamW, no
averaging, pure FSDP over a v5e-4 (minutes of compile per policy on a 2-core CPU). ``--tiny``
keeps tiny_llama's own 2-layer shapes at batch 256 x 128, float32 (enough activations for the
policies to show in ``peak``; ~10-40 s per policy, for tests). Extra ``KEY=VALUE`` arguments
override either.

    python scripts/plan_remat.py --json /tmp/plan_remat.json
    python scripts/plan_remat.py --tiny --policies none,full --json /tmp/plan_remat_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxarith.models.remat import Remat, parse  # noqa: E402
from train import plan as plan_lib  # noqa: E402
from train.config import load_train_config  # noqa: E402

BASE = os.path.join(ROOT, "configs", "tiny_llama.yaml")
LLAMA_3_2_1B = [
    "model.config.vocab_size=128256", "model.config.hidden_size=2048",
    "model.config.intermediate_size=8192", "model.config.num_hidden_layers=16",
    "model.config.num_attention_heads=32", "model.config.num_key_value_heads=8",
    "model.config.head_dim=64", "model.config.max_position_embeddings=131072",
    "model.config.tie_word_embeddings=true", "model.config.bos_token_id=128000",
    "model.config.eos_token_id=128001", "model.config.pad_token_id=null",
    "data.seq_len=2048", "batch=8", "model.compute_dtype=bfloat16",
]
TINY = ["batch=256"]
COMMON = ["out=unused-plan", "mesh=fsdp=-1", "average.kind=none", "model.attention=xla"]


def plan_policies(policies: list[Remat], topology: str, overrides: list[str]) -> list[dict]:
    """One :func:`train.plan.plan_train` result per policy (a state too large for the chip is
    recorded with its one-line error instead)."""
    sl = plan_lib.parse_slice(topology)
    out = []
    for policy in policies:
        cfg = load_train_config(BASE, [*overrides, f"model.remat={policy.value}"])
        try:
            res = plan_lib.plan_train(cfg, sl)
        except plan_lib.DoesNotFitError as e:
            res = {"remat": policy.value, "fits": False, "error": str(e)}
        out.append(res)
        print(f"{policy.value}: {_row(res)}", file=sys.stderr, flush=True)
    return out


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _row(res: dict) -> str:
    if "per_chip_bytes" not in res:
        return f"| `{res['remat']}` | | | | | | no | {res['error']} |"
    pc = res["per_chip_bytes"]
    return (f"| `{res['remat']}` | {_gb(pc['temp'])} | {_gb(pc['peak'])} | "
            f"{_gb(pc['host_temp'])} | {_gb(pc['argument'])} | {_gb(pc['total'])} | "
            f"{'yes' if res['fits'] else 'no'} | {res['compile_seconds']:.0f} s |")


def table(results: list[dict]) -> str:
    """The markdown table of per-chip bytes, one row per policy."""
    lines = ["| `model.remat` | temp | peak | host temp | argument | total | fits | compile |",
             "|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [_row(r) for r in results])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides applied after the preset's")
    p.add_argument("--tiny", action="store_true",
                   help="tiny_llama's 2-layer shapes instead of Llama-3.2-1B's")
    p.add_argument("--topology", default="v5e-4", help="TPU slice (default v5e-4)")
    p.add_argument("--policies", default=",".join(r.value for r in Remat),
                   help="comma-separated model.remat policies (default: all)")
    p.add_argument("--json", metavar="PATH", help="write the plans here as JSON")
    args = p.parse_args(argv)
    policies = [parse(name.strip(), "--policies") for name in args.policies.split(",")
                if name.strip()]
    overrides = [*COMMON, *(TINY if args.tiny else LLAMA_3_2_1B), *args.overrides]
    results = plan_policies(policies, args.topology, overrides)
    print(f"{'tiny_llama' if args.tiny else 'Llama-3.2-1B shapes'} on {args.topology}, "
          f"overrides: {' '.join(overrides)}\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"topology": args.topology, "overrides": overrides, "plans": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A device check for one accelerator (a GPU; also runs on a TPU VM or, as a smoke test, a CPU).

Two parts, printed as one table and written as JSON:

1. **Attention backends against each other**: log-probabilities of one random Llama (GQA,
   head_dim 128) with every attention implementation this device has (``xla`` always; ``cudnn``
   on an NVIDIA GPU, ``splash`` on a TPU, ``splash-interpret`` on a CPU), in bfloat16, against
   ``xla`` and against transformers (PyTorch, float32, on the same device when it has CUDA).
2. **The 1B training step in bfloat16**: tokens/s and MFU of jaxarith's jitted train step
   (Llama-3.2-1B shapes, AdamW, global-norm clipping, float32 master weights) next to
   PyTorch + transformers with autocast on the same device. MFU uses the device's dense
   bfloat16 peak from ``PEAK_BF16`` (the vendor's figure; ``--peak-tflops`` overrides it) and
   the FLOPs per token of ``train/metrics.py``.

Never run by CI (no accelerator there): ``scripts/device_check.sh`` makes a venv with the GPU's
own jax (0.11 or later) and CUDA torch, then runs this. Budget: under 8 minutes on one H100.

    scripts/device_check.sh                              # on the GPU machine
    python scripts/device_check.py --smoke               # tiny shapes on any device (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

# dense bfloat16 peak per chip, TFLOP/s (vendor figures, without sparsity)
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L4": 121.0,
             "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0, "TPU v4": 275.0,
             "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, tie_word_embeddings=True, rope_theta=500000.0)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
ATTN_MODEL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=128)


def peak_tflops(kind: str, override: float | None) -> float | None:
    if override:
        return override
    for name, tf in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return tf
    return None


def backends(platform: str) -> list[str]:
    extra = {"gpu": ["cudnn"], "cuda": ["cudnn"], "tpu": ["splash"]}.get(platform,
                                                                          ["splash-interpret"])
    return ["xla", *extra]


def torch_device() -> str:
    try:
        import torch
    except ImportError:
        return "none"
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_attention(over: dict, batch: int, seq_len: int) -> list[dict]:
    """Log-probs of one random model per attention backend, against xla and transformers."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from jaxarith.io.convert import load_hf_params
    from jaxarith.models import forward
    from jaxarith.testing import tiny_llama_config

    platform = jax.default_backend()
    hf = tiny_llama_config(max_position_embeddings=max(seq_len, 128), **over)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf).float().eval()
    tokens = np.random.default_rng(0).integers(0, hf.vocab_size, (batch, seq_len), np.int32)
    device = torch_device()
    with torch.no_grad():
        ref = torch.log_softmax(model.to(device)(
            input_ids=torch.as_tensor(tokens, dtype=torch.long).to(device)).logits.float(), -1)
    ref = ref.cpu().numpy()
    with tempfile.TemporaryDirectory() as d:
        model.cpu().save_pretrained(d)
        cfg, params = load_hf_params(d, progress=False)
    rows, xla = [], None
    for impl in backends(platform):
        fn = jax.jit(lambda p, t, impl=impl: jax.nn.log_softmax(
            forward(p, cfg, t, dtype=jnp.bfloat16, attention=impl)[0], axis=-1))
        try:
            lp = np.asarray(fn(params, jnp.asarray(tokens)))
        except Exception as e:  # a backend this device lacks: say so in the table
            rows.append({"attention": impl, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        xla = lp if impl == "xla" else xla
        rows.append({"attention": impl, "max_abs_vs_xla": float(np.max(np.abs(lp - xla))),
                     "max_abs_vs_transformers": float(np.max(np.abs(lp - ref))),
                     "torch_device": device})
    return rows


def check_training(over: dict, batch: int, seq_len: int, steps: int, peak: float | None) -> dict:
    import bench_train
    import jax

    from jaxarith.models import kernels, num_params
    from jaxarith.models.config import config_from_hf
    from train.metrics import flops_per_token

    hf = bench_train.hf_config(over, seq_len)
    cfg = config_from_hf(hf.to_dict())
    attention = kernels.resolve("auto", seq_len=seq_len)
    j = bench_train.bench_jax(hf, batch, seq_len, steps, 2, compute="bfloat16",
                              attention=attention)
    device = torch_device()
    t = bench_train.bench_torch(hf, batch, seq_len, steps, 2, compute="bfloat16",
                                device=device) if device != "none" else {"tokens_per_s": None}
    fpt = flops_per_token(cfg, seq_len)

    def mfu(tps):
        return None if tps is None or not peak else tps * fpt / (peak * 1e12)

    return {"params": num_params(cfg),
            "batch": batch, "seq_len": seq_len, "steps": steps, "attention": attention,
            "flops_per_token": fpt, "jax_tokens_per_s": j["tokens_per_s"],
            "torch_tokens_per_s": t["tokens_per_s"], "torch_device": device,
            "jax_mfu": mfu(j["tokens_per_s"]), "torch_mfu": mfu(t["tokens_per_s"]),
            "jax_compile_s": j["compile_s"], "jax_device": str(jax.devices()[0].device_kind)}


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps (any device)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 8; smoke 2)")
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (smoke 128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak (default: from its name)")
    p.add_argument("--out", default="bench_results/device_check.json")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)

    import jax

    kind = jax.devices()[0].device_kind
    peak = peak_tflops(kind, args.peak_tflops)
    seq = args.seq_len or (128 if args.smoke else 2048)
    t0 = time.perf_counter()
    attn = check_attention(TINY if args.smoke else ATTN_MODEL, 2, 128 if args.smoke else 1024)
    train = check_training(TINY if args.smoke else LLAMA_1B, args.batch or (2 if args.smoke
                                                                            else 8),
                           seq, args.steps or (2 if args.smoke else 10), peak)
    result = {"device": kind, "platform": jax.default_backend(), "jax": jax.__version__,
              "peak_bf16_tflops": peak, "smoke": args.smoke, "attention": attn,
              "training": train, "seconds": round(time.perf_counter() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"device: {kind} ({jax.default_backend()}, jax {jax.__version__}); bf16 peak "
          f"{_f(peak, '.0f')} TFLOP/s; {result['seconds']:.0f} s")
    print(f"{'check':<34} {'jaxarith':>14} {'reference':>14} {'ratio / diff':>14}")
    print("-" * 79)
    for r in attn:
        if "error" in r:
            print(f"{'attention ' + r['attention']:<34} {'unavailable':>14}  {r['error']}")
            continue
        print(f"{'attention ' + r['attention'] + ': max |dlog p|':<34} "
              f"{r['max_abs_vs_xla']:>10.1e} vs xla {r['max_abs_vs_transformers']:>10.1e} vs "
              f"transformers (float32, {r['torch_device']})")
    jt, tt = train["jax_tokens_per_s"], train["torch_tokens_per_s"]
    print(f"{'train step tokens/s (bf16)':<34} {jt:>14.0f} {_f(tt, '>14.0f')} "
          f"{_f(jt / tt if tt else None, '>13.2f')}x")
    print(f"{'train step MFU':<34} {_f(train['jax_mfu'], '>14.1%')} "
          f"{_f(train['torch_mfu'], '>14.1%')}   (jaxarith, PyTorch)")
    print(f"(batch {train['batch']} x {train['seq_len']}, attention {train['attention']}, "
          f"torch on {train['torch_device']}; wrote {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a person watching a run sees: progress bar, JSONL metrics, TensorBoard, a loss plot, MFU.

``OUT/metrics.jsonl`` has one JSON object per logged step (``step``, ``loss``, ``lr``,
``tokens_per_s``, ``grad_norm``, ...) and one per evaluation (``eval/<source>/loss``); a resumed
run first drops lines past the step it resumes from, so the file reads as one run.

FLOPs per trained token (the PaLM appendix-B convention, causal attention counted at half)::

    6 * N  +  6 * L * T * (heads * head_dim)

where ``N`` counts the matmul parameters: every parameter except the input embedding lookup
(``embed``, and GPT-2's ``pos_embed``), plus ``vocab * hidden`` for the output projection when it
is tied to the embedding. ``6 N`` is forward (2) + backward (4) per weight; attention scores and
the weighted sum are ``2 * 2 * T * d`` per layer forward, times 3 for forward + backward, halved
because a causal mask leaves half of the ``T x T`` scores. MFU = achieved FLOP/s / the peak of
the devices: TPUs from a table of their bf16 peaks; other devices (CPU, GPU) by a float32 matmul
timed once per machine and cached in ``~/.cache/jaxarith/peak.json`` (``$XDG_CACHE_HOME``), keyed
by device kind and CPU model (delete the file to measure again, e.g. after measuring on a busy
machine). Fake CPU devices (``--xla_force_host_platform_device_count``) share the host's cores,
so on CPU the machine's peak is the total, whatever the number of devices.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import sys
import time
import uuid

import jax
import numpy as np

from jaxarith.models import transformer
from jaxarith.models.config import ModelConfig

# Dense bf16 peak FLOP/s per chip of TPUs (vendor numbers); other devices are measured.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12}
MATMUL_N = 2048  # the timed float32 matmul is [N, N] x [N, N] (2 N^3 FLOPs)


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls (see the module docstring)."""
    specs = transformer.param_specs(cfg)
    n = transformer.num_params(cfg)
    for name in ("embed", "pos_embed"):
        if name in specs:
            n -= int(np.prod(specs[name].shape))
    if "lm_head" not in specs:  # tied: the embedding is also the output projection
        n += cfg.vocab_size * cfg.hidden_size
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 6 L T d_attn`` (causal attention at half)."""
    d_attn = cfg.num_attention_heads * cfg.head_dim
    return 6.0 * matmul_params(cfg) + 6.0 * cfg.num_hidden_layers * seq_len * d_attn


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def peak_cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxarith", "peak.json")


def peak_key(device=None) -> str:
    """What the measured peak depends on: device platform and kind, and the host CPU."""
    d = device or jax.devices()[0]
    return f"{d.platform}|{d.device_kind}|{cpu_model()}"


def time_matmul(n: int = MATMUL_N, repeats: int = 5, device=None) -> float:
    """FLOP/s of a jitted float32 ``[n, n] @ [n, n]`` on one device (best of ``repeats``)."""
    d = device or jax.devices()[0]
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), d)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


@functools.cache
def measured_peak_flops(key: str | None = None) -> float:
    """This machine's float32 matmul FLOP/s for one device: read from the cache file, or timed
    (:func:`time_matmul`) and written there, unless the machine was busy (load average above
    half its cores, at least 1): then the timing serves this process only."""
    key = key or peak_key()
    path = peak_cache_path()
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, json.JSONDecodeError):
        cached = {}
    entry = cached.get(key)
    if isinstance(entry, dict) and entry.get("flops", 0) > 0:
        return float(entry["flops"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    flops = time_matmul()
    if load > max(1.0, 0.5 * (os.cpu_count() or 1)):
        # other work shares the cores: the timing is low; use it for this process only
        return flops
    cached[key] = {"flops": flops, "matmul": f"float32 {MATMUL_N}^3",
                   "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "load_average": load}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cached, f, indent=2)
        os.replace(tmp, path)
    except OSError:  # a read-only home: measure again next time
        pass
    return flops


def device_peak_flops(override: float = 0.0) -> float:
    """The peak FLOP/s of one device: ``override`` if set, a TPU's from the table, else this
    machine's measured float32 matmul peak (:func:`measured_peak_flops`)."""
    if override:
        return override
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if kind.lower().startswith(name.lower()):
            return peak
    return measured_peak_flops()


def total_peak_flops(devices: int, override: float = 0.0) -> float:
    """The peak of ``devices`` devices; on CPU the host's (fake devices share its cores)."""
    peak = device_peak_flops(override)
    return peak if jax.devices()[0].platform == "cpu" else peak * devices


def peak_description(devices: int) -> str:
    """One line for the startup message: the peak MFU is quoted against and where it is from."""
    kind = jax.devices()[0].device_kind
    table = any(kind.lower().startswith(k.lower()) for k in PEAK_FLOPS)
    peak = total_peak_flops(devices)  # measures (and caches) first if needed
    if table:
        source = "bf16 table"
    else:
        try:
            with open(peak_cache_path()) as f:
                cached = peak_key() in json.load(f)
        except (OSError, json.JSONDecodeError):
            cached = False
        source = f"float32 matmul, cached in {peak_cache_path()}" if cached else \
            "float32 matmul timed now on a busy machine: not cached"
    return f"MFU against {peak / 1e9:,.0f} GFLOP/s ({kind}: {source})"


class MetricsWriter:
    """JSONL + TensorBoard + tqdm progress bar for one process (only process 0 writes).

    Args:
      out: the run directory.
      total_steps, start_step: for the progress bar and ETA.
      tensorboard, progress: enable those outputs.
      wandb, run_config: the ``log.wandb`` section and the config to log with the W&B run.
      sync: called after each record (a :class:`jaxarith.io.paths.Mirror`'s ``push``).
    """

    def __init__(self, out: str, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, wandb=None,
                 run_config: dict | None = None, sync=None):
        self.enabled = jax.process_index() == 0
        self._sync = sync  # called after each record (e.g. to upload a staged directory)
        self.path = os.path.join(out, "metrics.jsonl")
        self._tb = None
        self._bar = None
        self._wandb = None
        if not self.enabled:
            return
        os.makedirs(out, exist_ok=True)
        _truncate_after(self.path, start_step)
        self._f = open(self.path, "a")
        if wandb is not None:
            self._wandb = start_wandb(wandb, out, run_config or {})
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True)
            # log records (and warnings, see train.__main__) are printed above the bar
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def write(self, record: dict) -> None:
        """Append one record (must hold ``step``); scalars also go to TensorBoard."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, clean["step"])
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if k != "step"},
                            step=int(clean["step"]))
        if self._sync is not None:
            self._sync()

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self._bar.refresh()

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:  # stderr: stdout is reserved for the --json summary
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._redirect.__exit__(None, None, None)
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._f.close()


WANDB_ID_FILE = "wandb_run_id"


def start_wandb(cfg, out: str, run_config: dict):
    """Start (or, for a resumed run, continue) the W&B run of ``out``: ``cfg`` is the
    ``log.wandb`` section; the run id is kept in ``OUT/wandb_run_id``; W&B's files go to
    ``OUT/wandb/``."""
    import wandb

    id_path = os.path.join(out, WANDB_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]  # W&B run ids: lowercase letters and digits
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
    return wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or None,
                      tags=list(cfg.tags) or None, config=run_config, dir=out, id=run_id,
                      resume="allow")


class Throughput:
    """Tokens/s and MFU over the steps since the last reading.

    Args:
      peak: the total peak FLOP/s of the ``devices`` (see :func:`total_peak_flops`).
      start_step: the step the run starts (or resumes) from.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float,
                 devices: int, start_step: int = 0):
        self.tokens_per_step, self.fpt = tokens_per_step, flops_per_token
        self.peak, self.devices = peak, devices
        self._t, self._step = time.perf_counter(), start_step

    def read(self, step: int) -> dict:
        """Throughput of the steps after the last reading up to ``step``."""
        now = time.perf_counter()
        dt, n = now - self._t, step - self._step
        self._t, self._step = now, step
        tps = self.tokens_per_step * n / dt if dt > 0 and n else 0.0
        mfu = tps * self.fpt / self.peak if self.peak else float("nan")
        return {"tokens_per_s": tps, "tokens_per_s_per_device": tps / self.devices, "mfu": mfu}


def _plain(v):
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "item"):
        v = np.asarray(v).item()
    return v


def _truncate_after(path: str, step: int) -> None:
    """Keep only records with ``step <= step`` (a resumed run rewrites what follows)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
    with open(path, "w") as f:
        f.writelines(keep)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str, png: str) -> str | None:
    """A loss-curve PNG: train loss and every ``eval/<source>/loss`` against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train", lw=1)
    keys = sorted({k for r in recs for k in r if k.startswith("eval") and k.endswith("/loss")})
    for k in keys:
        pts = [(r["step"], r[k]) for r in recs if k in r]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
    return png

"""The training run's configuration: a tree of frozen dataclasses loaded from YAML.

``load_train_config("configs/tiny_llama.yaml", ["steps=60", "out=/tmp/run"])`` reads the YAML,
applies dotted ``key=value`` overrides (values parsed as YAML: ``schedule.peak_lr=1e-3``,
``data.sources.replay.weight=0.05``), and builds :class:`TrainConfig`. Unknown or mistyped keys
are :class:`~jaxarith.errors.ConfigError` naming the dotted key; values are type-checked against
the dataclass annotations. ``to_dict`` writes a config back (it is saved with each checkpoint).

Data sources are written as a mapping ``name -> fields`` so overrides can address them by name.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import types
import typing
from typing import Any

from jaxarith.average import AverageConfig, NoAverage
from jaxarith.configfile import load_yaml, parse_yaml, short
from jaxarith.data import DataConfig, SourceConfig
from jaxarith.errors import ConfigError
from jaxarith.models import check_config_keys
from jaxarith.models.family import parse_enum
from jaxarith.models.kernels import IMPLEMENTATIONS
from jaxarith.models.registry import FAMILIES
from jaxarith.models.remat import Remat
from jaxarith.schedules import ScheduleConfig
from train.distill import DistillSection
from train.init import InitConfig
from train.losses import MoESection

log = logging.getLogger(__name__)


class OnNonFinite(enum.StrEnum):
    STOP = "stop"  # stop with the step number; the last good checkpoint stays on disk
    SKIP = "skip"  # drop that step's update (params and optimizer state unchanged)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """What to train.

    Attributes:
      ref: a model reference to start from (HF hub id, HF directory, jaxarith Orbax directory).
      arch: for training from scratch (``ref`` empty): a registered family (``llama``, ``gpt2``,
        ``mixtral``).
        Both stay empty when the ``init:`` section gives the start weights (train/init.py).
      config: for scratch: HF ``config.json`` fields (``hidden_size``, ``n_layer``, ...).
      tokenizer: ``bundled`` (the bundled 1024-token BPE) or a directory; default: ``ref``'s.
      compute_dtype: float32 | bfloat16 (master weights stay float32).
      remat: what each block keeps for the backward pass, by MaxText's policy names: none |
        full | minimal | save_dot_except_mlp | save_qkv_proj | save_out_proj | offload
        (:mod:`jaxarith.models.remat`); ``true`` is ``full``, ``false`` ``none``.
      attention: auto | xla | splash | cudnn (:mod:`jaxarith.models.kernels`): ``auto`` is
        splash on a TPU (when seq_len is a multiple of 128), cuDNN on a GPU, XLA elsewhere.
    """

    ref: str = ""
    arch: str = ""
    config: dict = dataclasses.field(default_factory=dict)
    tokenizer: str = ""
    compute_dtype: str = "float32"
    remat: Remat = Remat.NONE
    attention: str = "auto"

    def __post_init__(self):
        # a bool (the earlier form) or a name, also when built in Python rather than from YAML
        object.__setattr__(self, "remat", parse_enum(Remat, self.remat, "model.remat"))
        if self.ref and self.arch:  # neither: checked with `init` in TrainConfig
            raise ConfigError("model: give exactly one of model.ref (start from a checkpoint) "
                              "and model.arch (train from scratch)")
        if self.arch:
            if self.arch not in FAMILIES:
                raise ConfigError(f"model.arch={self.arch!r}: expected one of "
                                  f"{', '.join(sorted(FAMILIES))}")
        if self.arch:  # typos in model.config are errors naming the key, before any work

            check_config_keys(self.arch, self.config, "model.config")
        if self.attention not in IMPLEMENTATIONS:
            raise ConfigError(f"model.attention={self.attention!r}: expected one of "
                              f"{', '.join(IMPLEMENTATIONS)}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.compute_dtype={self.compute_dtype!r}: expected float32 "
                              "or bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW (optax) with global-norm clipping; no weight decay on norms and biases."""

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ConfigError(f"optimizer: b1={self.b1}, b2={self.b2} must be in [0, 1)")
        if self.weight_decay < 0 or self.clip_norm < 0:
            raise ConfigError("optimizer.weight_decay and optimizer.clip_norm must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints of the whole train state, data iterator state and this config.

    Attributes:
      every: save every N steps (0: only at the end and on preemption).
      every_minutes: also save when this many minutes have passed since the last such save
        (or the start), checked after every step; process 0's clock decides for all (0: off).
        Bounds the work lost to a crash that gives no SIGTERM when steps take long or vary.
      keep: keep the last k checkpoints.
      async_save: write in the background while training continues.
      dir: default ``OUT/checkpoints``.
    """

    every: int = 0
    every_minutes: float = 0.0
    keep: int = 2
    async_save: bool = True
    dir: str = ""

    def __post_init__(self):
        if self.every < 0:
            raise ConfigError(f"checkpoint.every={self.every} must be >= 0 (0: end only)")
        if self.every_minutes < 0:
            raise ConfigError(f"checkpoint.every_minutes={self.every_minutes} must be >= 0 "
                              "(0: off)")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep={self.keep} must be at least 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LmEvalConfig:
    """lm-eval tasks on the live parameters (``eval.lm_eval``; see train/hooks.py).

    Attributes:
      tasks: task or group names (lm-eval's, jaxarith's shipped ones, e.g. ``jaxarith_mc``);
        empty: off.
      every: run every N steps (0: only at the end, when ``eval.at_end``).
      limit: documents per task (below 1: a share); num_fewshot: as lm-eval's.
      batch_size: packed rows per scoring call (``auto`` too).
      include_path: more task YAML directories.
    """

    tasks: tuple = ()
    every: int = 0
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int | str = 8
    include_path: tuple = ()

    def __post_init__(self):
        for name in ("tasks", "include_path"):
            v = getattr(self, name)
            v = [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v
            if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v):
                raise ConfigError(f"eval.lm_eval.{name}: expected a list of names, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        if self.every < 0:
            raise ConfigError(f"eval.lm_eval.every={self.every} must be >= 0 (0: at the end)")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"eval.lm_eval.limit={self.limit} must be positive")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"eval.lm_eval.num_fewshot={self.num_fewshot} must be >= 0")
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int)
                                          or self.batch_size < 1):
            raise ConfigError(f"eval.lm_eval.batch_size={self.batch_size!r}: expected a "
                              f"positive integer or auto")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out loss per source every N steps (0: only at the end), over ``batches`` batches;
    ``lm_eval``: lm-eval tasks on the live parameters."""

    every: int = 0
    batches: int = 2
    at_end: bool = True
    lm_eval: LmEvalConfig = LmEvalConfig()


@dataclasses.dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """Weights & Biases logging (the ``wandb`` extra): process 0 logs the run config and every
    record of metrics.jsonl to this run. A resumed run continues the same W&B run (its id is
    kept in ``OUT/wandb_run_id``). ``WANDB_MODE=offline`` writes it under ``OUT/wandb/`` only.

    Attributes:
      project: the W&B project (required).
      entity: team or user (default: W&B's default entity).
      name: the run's display name (default: W&B's).
      tags: the run's tags.
    """

    project: str
    entity: str = ""
    name: str = ""
    tags: tuple = ()

    def __post_init__(self):
        if not self.project.strip():
            raise ConfigError("log.wandb.project is empty: give the W&B project")
        tags = [self.tags] if isinstance(self.tags, str) else self.tags
        if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
            raise ConfigError(f"log.wandb.tags={self.tags!r}: expected a list of strings")
        object.__setattr__(self, "tags", tuple(tags))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogConfig:
    """Metrics every ``every`` steps to metrics.jsonl, and optionally TensorBoard, a progress
    bar, a loss plot at the end and Weights & Biases (``wandb``, see :class:`WandbConfig`)."""

    every: int = 10
    tensorboard: bool = True
    progress: bool = True
    plot: bool = True
    wandb: WandbConfig | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """At the end, write the final (or averaged) weights as an HF model.

    Attributes:
      hf_dir: destination (empty: no HF export). ``--export-hf DIR`` sets it.
      use_average: export the averaged (EMA/SWA) weights instead of the final ones.
      delta_tuned, delta_base: model references; when both are set, ``tuned - base`` is added to
        the exported weights (``final = trained + delta``: the instruct-transplant recipe).
      dtype: output dtype (empty: float32).
      overwrite: replace an existing ``hf_dir``.
    """

    hf_dir: str = ""
    use_average: bool = False
    delta_tuned: str = ""
    delta_base: str = ""
    dtype: str = ""
    overwrite: bool = False

    def __post_init__(self):
        if bool(self.delta_tuned) != bool(self.delta_base):
            raise ConfigError("export: set both delta_tuned and delta_base, or neither")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run.

    Attributes:
      out: output directory (checkpoints, metrics.jsonl, TensorBoard events, loss.png).
      steps: optimizer steps.
      batch: global batch in sequences (over all devices and microbatches).
      microbatches: gradient accumulation: the batch is split into this many microbatches.
      mesh: device mesh spec (``fsdp=-1``, ``data=2,fsdp=2,tensor=2``).
      mesh_strict: a parameter dimension that does not divide its mesh axes is an error (default:
        replicated along it, with a warning).
      seed: parameter init (scratch) seed.
      on_nonfinite: stop | skip.
      distributed: join the cluster ``jax.distributed.initialize()`` detects (multi-host pods;
        the same as ``--distributed``; explicit: ``--coordinator``: jaxarith.distributed).
      init: start from another model's transformed weights (layer inheritance; train/init.py).
      moe: router loss coefficients of mixture-of-experts models (train/plugins/moe.py).
    """

    out: str
    steps: int
    batch: int
    model: ModelSection
    data: DataConfig
    microbatches: int = 1
    mesh: str = "fsdp=-1"
    mesh_strict: bool = False
    seed: int = 0
    on_nonfinite: OnNonFinite = OnNonFinite.STOP
    distributed: bool = False
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    average: AverageConfig = NoAverage()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    export: ExportConfig = ExportConfig()
    distill: DistillSection = DistillSection()  # see train/distill.py
    init: InitConfig = InitConfig()
    moe: MoESection = MoESection()  # router loss coefficients (train/losses.py)

    def __post_init__(self):
        if self.init.ref and (self.model.ref or self.model.arch or self.model.config):
            raise ConfigError("init.ref gives the model: leave model.ref, model.arch and "
                              "model.config empty")
        if not self.init.ref and not (self.model.ref or self.model.arch):
            raise ConfigError("model: give exactly one of model.ref (start from a checkpoint) "
                              "and model.arch (train from scratch), or an init section")
        try:
            object.__setattr__(self, "on_nonfinite", OnNonFinite(self.on_nonfinite))
        except ValueError:
            raise ConfigError(f"on_nonfinite={self.on_nonfinite!r}: expected stop or skip") \
                from None
        if self.steps < 1 or self.batch < 1 or self.microbatches < 1:
            raise ConfigError(f"steps={self.steps}, batch={self.batch}, "
                              f"microbatches={self.microbatches} must be positive")
        if self.batch % self.microbatches:
            raise ConfigError(f"batch={self.batch} is not divisible by "
                              f"microbatches={self.microbatches}")
        if not self.out:
            raise ConfigError("out is empty: give an output directory (out=DIR)")
        object.__setattr__(self, "schedule", self.schedule.with_total(self.steps)
                           .with_swa_start(getattr(self.average, "start", None)))


# ----------------------------------------------------------------------------- YAML <-> tree


def _parse_value(text: str) -> Any:
    if not text.strip():
        return ""  # `key=` clears a string
    try:
        return parse_yaml(text, "override")
    except ConfigError as e:
        if "invalid YAML" in str(e):
            return text
        raise


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set dotted ``key=value`` overrides in a raw config dict (values parsed as YAML)."""
    raw = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parts = key.strip().split(".")
        node = raw
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _deep_copy(d):
    return {k: _deep_copy(v) for k, v in d.items()} if isinstance(d, dict) else d


def build(cls, raw: Any, prefix: str = ""):
    """Build dataclass ``cls`` from a raw mapping, naming any unknown or mistyped key."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (valid keys under "
                          f"{where}: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _convert(hints[name], value, f"{prefix}{name}")
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing config key {prefix}{missing[0]}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _convert(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tagged = _tagged(args)
        if tagged and isinstance(value, dict):
            return _by_kind(tagged, value, key)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {short(value)}")
    if origin is tuple and typing.get_args(tp)[:1] == (SourceConfig,):
        return _sources(value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{key}={short(value)}: expected one of "
                              f"{', '.join(str(m.value) for m in tp)}") from None
    else:
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}={short(value)}: expected {name}, got {type(value).__name__}")


def _tagged(args) -> dict:
    """{kind: class} when a union's members are dataclasses told apart by a ``kind`` default
    (e.g. the ``average:`` section: one config class per method)."""
    kinds = {getattr(a, "kind", None): a for a in args if dataclasses.is_dataclass(a)}
    return kinds if kinds and all(isinstance(k, str) for k in kinds) else {}


def _by_kind(tagged: dict, value: dict, key: str):
    """Build the member named by ``value["kind"]`` (default: the first member).

    Keys that belong to another member only (left over after ``average.kind=...`` switched the
    method on the command line) are dropped with a warning; any other unknown key is an error.
    """
    kind = value.get("kind", next(iter(tagged)))
    if kind not in tagged:
        raise ConfigError(f"{key}.kind={short(kind)}: expected one of {', '.join(tagged)}")
    cls = tagged[kind]
    own = {f.name for f in dataclasses.fields(cls)}
    others = {f.name for c in tagged.values() for f in dataclasses.fields(c)} - own
    dropped = sorted(k for k in value if k in others)
    if dropped:
        log.warning("%s: %s ignored for kind %s", key, ", ".join(dropped), kind)
    return build(cls, {k: v for k, v in value.items() if k not in dropped}, key + ".")


def _sources(value, key: str) -> tuple[SourceConfig, ...]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of source name -> fields")
    out = []
    for name, fields in value.items():
        fields = dict(fields or {})
        if "name" in fields and fields["name"] != name:
            raise ConfigError(f"{key}.{name}.name={fields['name']!r} differs from its key")
        fields["name"] = name
        out.append(build(SourceConfig, fields, f"{key}.{name}."))
    return tuple(out)


def from_dict(raw: dict, overrides: list[str] | None = None) -> TrainConfig:
    return build(TrainConfig, apply_overrides(raw, list(overrides or [])))


def load_train_config(path: str, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config and apply ``key=value`` overrides."""
    raw = load_yaml(path) or {}
    return from_dict(raw, overrides)


def to_dict(cfg) -> dict:
    """A config tree as plain YAML/JSON-able data (sources as a name -> fields mapping)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple) and v and isinstance(v[0], SourceConfig):
            v = {s.name: {k: x for k, x in to_dict(s).items() if k != "name"} for s in v}
        elif isinstance(v, enum.Enum):
            v = v.value
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out

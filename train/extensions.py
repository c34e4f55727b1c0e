"""How features plug into the training loop without editing it: hooks and extensions.

The loop (:func:`train.loop.run`) is: build what the config asks for, then for each step run the
compiled step and after it every :class:`Hook` whose ``every`` divides the step. Eval, metrics
logging, checkpointing and the loss plot are hooks themselves (:func:`train.loop.default_hooks`).
A feature (distillation, LaWA, instruction tuning, layer inheritance, ...) contributes an
:class:`Extension`; every field is optional:

* ``loss(model_cfg, dtype=, remat=[, attention=]) -> loss_fn`` (``attention`` is passed only
  when ``model.attention`` picks a kernel, see :mod:`jaxarith.models.kernels`) with
  ``loss_fn(params, frozen, batch) -> (loss_sum, count, metrics)`` (see :mod:`train.step`)
  replaces the default next-token loss;
  ``loss_key`` (hashable, e.g. the feature's frozen config) names what shapes it, and is part of
  the compiled-step cache key. At most one extension may give a loss.
* ``batch_fields``: extra per-token fields the loss reads (``name -> (trailing shape, dtype)``).
  The data example's own per-token fields (e.g. ``weights`` from a chat source) are passed
  automatically; declaring one here makes its absence an error instead of a silent default.
* ``frozen(cfg, model_cfg, mesh) -> tree``: non-trainable arrays (e.g. a distillation teacher,
  already sharded). The step sees them as ``frozen[extension.name]``. They are never written to a
  checkpoint: each run (and each resume) loads them again.
* ``model(cfg) -> (ModelConfig, model_dir | None)``: resolve the trained model's config (e.g. a
  student with inherited layers). ``init_params(cfg, model_cfg, mesh) -> params``: the initial
  weights when no checkpoint exists. At most one extension may give each.
* ``dataset(cfg, sources, ds) -> ds``: transform the training examples' ``grain.MapDataset``
  before batching (e.g. join each example with its cached teacher outputs); its new per-token
  fields become batch fields.
* ``hooks``: more :class:`Hook` s, run after the built-in ones (e.g. eval of an averaged model,
  LaWA snapshots). A hook returns a dict of metrics (written as given, with the step, to
  ``metrics.jsonl`` and TensorBoard) or None.

Extensions come from :func:`discover` (every module of the package :mod:`train.plugins` with a
function ``extension(cfg) -> Extension | None``, typically reading its own config section), or are
passed to ``run(cfg, extensions=[...])`` directly.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import train.plugins as pkg
from jaxarith.errors import ConfigError

if TYPE_CHECKING:
    from jaxarith.models.config import ModelConfig
    from train.checkpoint import Checkpoints
    from train.config import TrainConfig
    from train.metrics import MetricsWriter


@dataclasses.dataclass
class RunContext:
    """What a hook sees: the run as it is after the current step (mutable; owned by the loop).

    Attributes:
      cfg, model_cfg, mesh: the run's config, model config and device mesh.
      out: the absolute output directory.
      step: optimizer steps taken so far (host int).
      state: the current :class:`train.step.TrainState` (on device; do not keep references
        across steps: the next step donates it).
      last: the host metrics of the last step (``loss``, ``lr``, ``grad_norm``, ``tokens``,
        ``finite`` and the loss function's own metrics).
      final: True while the end-of-run hooks run (the run reached ``cfg.steps``).
      evaluate: ``evaluate(params, examples) -> mean NLL`` with ``examples`` a dict of
        ``[n, T]`` arrays (``tokens``, optional ``weights``) or a ``[n, T]`` token array.
      eval_sets: ``source name -> examples`` of the held-out data.
      writer: the metrics writer (``writer.log(msg)`` prints without breaking the progress bar).
      checkpoints: the run's :class:`train.checkpoint.Checkpoints`.
      summary: the dict ``run`` returns (hooks may add keys; JSON-able values only).
      save: ``save()`` checkpoints the current state now (no-op if this step is saved).
      tokenizer: the run's tokenizer (lm-eval tasks on the live parameters need it).
    """

    cfg: TrainConfig
    model_cfg: ModelConfig
    mesh: Any
    out: str
    step: int
    state: Any
    evaluate: Callable[[Any, Any], float]
    eval_sets: dict
    writer: MetricsWriter
    checkpoints: Checkpoints
    summary: dict
    save: Callable[[], None]
    last: dict = dataclasses.field(default_factory=dict)
    final: bool = False
    tokenizer: Any = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hook:
    """An action run by the loop after some steps.

    Attributes:
      name: for messages (and to find a built-in hook in tests).
      every: run after each step that is a multiple of ``every`` (0: never periodically).
      fn: ``fn(ctx: RunContext) -> dict | None``; a returned dict is written to the metrics
        (``metrics.jsonl``, TensorBoard) with ``step`` added.
      at_end: also run once when the run completes, after its last step, with ``ctx.final``
        True (and then not also periodically at that last step). Not run when the run is
        preempted.
    """

    name: str
    every: int
    fn: Callable[[RunContext], dict | None]
    at_end: bool = False

    def due(self, step: int, last_step: int) -> bool:
        """Whether to run after ``step`` inside the loop."""
        if self.at_end and step == last_step:
            return False  # runs in the end phase instead
        return self.every > 0 and step % self.every == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Extension:
    """What one feature adds to a run (see the module docstring). Every field is optional."""

    name: str
    loss: Callable[..., Callable] | None = None
    loss_key: Hashable = None
    batch_fields: Mapping[str, tuple[tuple[int, ...], str]] = dataclasses.field(
        default_factory=dict)
    frozen: Callable[[TrainConfig, ModelConfig, Any], Any] | None = None
    # the same tree as ShapeDtypeStructs with shardings, read from configs only (jaxarith plan)
    abstract_frozen: Callable[[TrainConfig, ModelConfig, Any], Any] | None = None
    model: Callable[[TrainConfig], tuple[ModelConfig, str | None]] | None = None
    init_params: Callable[[TrainConfig, ModelConfig, Any], Any] | None = None
    dataset: Callable[[TrainConfig, Any, Any], Any] | None = None
    hooks: Sequence[Hook] = ()


@dataclasses.dataclass(frozen=True)
class Keyed:
    """A value compared and hashed by ``key`` only (compiled-step cache arguments that hold
    functions or trees: equal keys promise the same compiled program)."""

    key: Hashable
    value: Any = dataclasses.field(compare=False, hash=False)


def only_one(extensions: Sequence[Extension], attr: str) -> Extension | None:
    """The one extension that sets ``attr``, or None; two are a :class:`ConfigError`."""
    given = [e for e in extensions if getattr(e, attr) is not None]
    if len(given) > 1:
        raise ConfigError(f"both {given[0].name} and {given[1].name} set the run's {attr}; "
                          "enable only one of them")
    return given[0] if given else None


def discover(cfg: TrainConfig) -> list[Extension]:
    """The extensions ``cfg`` enables: ``extension(cfg)`` of every module in :mod:`train.plugins`
    that returns one (modules in name order)."""
    out = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        make = getattr(module, "extension", None)
        ext = make(cfg) if make is not None else None
        if ext is not None:
            out.append(ext)
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"two training extensions share a name: {names}")
    return out

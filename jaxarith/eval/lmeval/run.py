"""Run lm-eval tasks on ``model="jaxarith"``: task lookup (the shipped tasks always included) and
one call of ``lm_eval.simple_evaluate``; the CLI ``jaxarith lm-eval`` is a thin layer over this.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.eval.tasks import TASKS_DIR


def task_manager(tasks: Sequence[str], include_path: Sequence[str | os.PathLike] = (), *,
                 builtin: bool = True):
    """An lm-eval ``TaskManager`` that knows every name in ``tasks``.

    jaxarith's own tasks and ``include_path`` are indexed first; lm-eval's built-in tasks (an
    index of thousands of YAMLs, 5-15 s) only when a requested name is not among them and
    ``builtin`` is true.

    Raises:
      ConfigError: a task name that no index knows (with the closest names).
    """
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR, *[os.fspath(p) for p in include_path]]
    for p in paths:
        if not os.path.isdir(p):
            raise ConfigError(f"include path {p}: not a directory")
    tm = TaskManager(include_path=paths, include_defaults=False)
    if builtin and set(tm.match_tasks(list(tasks))) != set(tasks):
        tm = TaskManager(include_path=paths, include_defaults=True)
    unknown = [t for t in tasks if t not in tm.match_tasks([t])]
    if unknown:
        where = ("lm-eval's, " if builtin else "") + f"jaxarith's ({TASKS_DIR})"
        hints = {t: difflib.get_close_matches(t, tm.all_tasks, n=3) for t in unknown}
        raise ConfigError("unknown task(s): " + "; ".join(
            f"{t}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
            + f". Tasks are {where} and those in --include-path")
    return tm


def evaluate(model_args: dict[str, Any], tasks: Sequence[str], *,
             include_path: Sequence[str | os.PathLike] = (), num_fewshot: int | None = None,
             limit: float | None = None, batch_size: int | str = 8,
             max_batch_size: int | None = None, log_samples: bool = False,
             seed: int | None = None, apply_chat_template: bool | str = False,
             system_instruction: str | None = None, fewshot_as_multiturn: bool | None = None,
             member_templates: Mapping[str, bool | str | None] | None = None) -> dict | None:
    """``lm_eval.simple_evaluate(model="jaxarith", ...)``; returns lm-eval's results dict.

    In a multi-process JAX run (``jax.process_count() > 1``) every process calls this with the
    same arguments: all of them load the models (sharded over every process's devices), process
    0 runs lm-eval and returns the results, the others follow it
    (:meth:`~jaxarith.eval.lmeval.JaxarithLM.follow`) and return None. An error on process 0 (an
    unknown task, a failing request) is raised on every process.

    Args:
      model_args: keyword arguments of :class:`jaxarith.eval.lmeval.JaxarithLM` (``pretrained``...).
      tasks: task or group names (lm-eval's, the shipped ones, or under ``include_path``).
      limit: documents per task (below 1: a share of each task).
      seed: lm-eval's random / numpy / torch / fewshot seeds (default: lm-eval's defaults; the
        model's sampling ``seed`` is in ``model_args``).
      batch_size: packed rows per scoring call, or ``"auto"`` (the largest that fits the
        device memory, at most ``max_batch_size``; see jaxarith.eval.lmeval.autobatch).
      apply_chat_template: prompts as chat conversations rendered by the model's chat template
        (True) or by its tokenizer's template of this name, as lm-eval's ``hf`` backend does.
      system_instruction: a system message (lm-eval's ``system_instruction``).
      fewshot_as_multiturn: few-shot examples as user/assistant turns (default: True with a
        chat template, as lm-eval's CLI); needs ``apply_chat_template``.
      member_templates: per-member templates of a combination, ``{role: choice}`` with choice
        True / ``"auto"`` (the member's own template), False / None / ``"none"`` (lm-eval's
        plain prompt) or a template name; unlisted members follow ``apply_chat_template``.
        Turns ``apply_chat_template`` on (lm-eval must build conversations).
    Raises:
      ConfigError: ``fewshot_as_multiturn`` without a chat template; a bad member role.
    """
    model_args = dict(model_args)
    if member_templates is not None:
        model_args["member_templates"] = dict(member_templates)
        apply_chat_template = apply_chat_template or True
    if isinstance(apply_chat_template, str):
        model_args["chat_template_name"] = apply_chat_template
    if fewshot_as_multiturn is None:
        fewshot_as_multiturn = bool(apply_chat_template)
    elif fewshot_as_multiturn and not apply_chat_template:
        raise ConfigError("fewshot_as_multiturn needs a chat template (apply_chat_template / "
                          "--apply-chat-template)")
    import jax
    import lm_eval

    # not at module level: the package needs lm-eval, and importing it registers the model
    import jaxarith.eval.lmeval  # noqa: F401  (registers model="jaxarith")

    limit = None if limit is None else (int(limit) if limit >= 1 else float(limit))
    seeds = {} if seed is None else {k: seed for k in (
        "random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")}
    kwargs = dict(tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                  batch_size=batch_size, max_batch_size=max_batch_size, log_samples=log_samples,
                  apply_chat_template=apply_chat_template, system_instruction=system_instruction,
                  fewshot_as_multiturn=fewshot_as_multiturn, **seeds)
    if jax.process_count() == 1:
        tm = task_manager(tasks, include_path)
        return lm_eval.simple_evaluate(model="jaxarith", model_args=dict(model_args),
                                       task_manager=tm, **kwargs)
    return _evaluate_multiprocess(model_args, include_path, kwargs)


def _evaluate_multiprocess(model_args: dict[str, Any], include_path, kwargs: dict) -> dict | None:
    """:func:`evaluate` in a multi-process run: process 0 drives lm-eval, the others follow."""
    import jax
    import lm_eval

    # not at module level: the package needs lm-eval, and importing it registers the model
    from jaxarith.eval.lmeval import JaxarithLM, multihost

    primary = jax.process_index() == 0
    tm, error = None, None
    if primary:  # the tasks are checked before the models load, and only where lm-eval runs
        try:
            tm = task_manager(kwargs["tasks"], include_path)
        except JaxarithError as e:
            error = e
    verdict = multihost.share(None if error is None else str(error), primary=primary)
    if error is not None:
        raise error
    if verdict is not None:
        raise JaxarithError(f"process 0 failed: {verdict}")
    # every process builds the model as lm-eval's evaluator would (its loading is collective)
    lm = JaxarithLM.create_from_arg_obj(dict(model_args), {
        "batch_size": kwargs["batch_size"], "max_batch_size": kwargs["max_batch_size"],
        "device": None})
    if not primary:
        lm.follow()
        return None
    with lm.leading():
        results = lm_eval.simple_evaluate(model=lm, task_manager=tm, **kwargs)
    # as recorded for model="jaxarith" (lm-eval names a model instance by its class)
    results["config"].update(model="jaxarith", model_args=dict(model_args))
    return results


def jsonable(obj: Any) -> Any:
    """lm-eval's results as plain JSON types (numpy scalars, functions in task configs...)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))

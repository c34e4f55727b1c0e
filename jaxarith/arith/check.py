"""Architecture checks before any arithmetic: same tensor names, same shapes, or one clear error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax

from jaxarith.errors import ArchitectureMismatchError
from jaxarith.io.convert.keymap import rules_for
from jaxarith.models.config import ModelConfig

Path = tuple[str, ...]
MAX_LISTED = 5


def leaf_names(cfg: ModelConfig) -> dict[Path, str]:
    """{canonical path: HF name template (``{i}`` = layer)} from the architecture's keymap."""
    return {target: rule.hf_key for rule in rules_for(cfg) for target in rule.targets}


def tree_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"layers/attn/q": shape} of a canonical tree."""
    return {"/".join(str(k.key) for k in kp): tuple(x.shape)
            for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_shapes(shapes: Sequence[Mapping[str, tuple[int, ...]]], labels: Sequence[str],
                 embed_names: Sequence[str] = ("embed", "model.embed_tokens.weight",
                                               "transformer.wte.weight")) -> None:
    """Raise one :class:`ArchitectureMismatchError` if the name -> shape maps differ.

    The message lists the first differing tensors (missing on one side or of another shape) and,
    when an embedding differs, the vocabulary sizes of every model.
    """
    ref, ref_label = shapes[0], labels[0]
    for other, label in zip(shapes[1:], labels[1:], strict=True):
        diffs = []
        for name in list(ref) + [n for n in other if n not in ref]:
            a, b = ref.get(name), other.get(name)
            if a != b:
                fa = "absent" if a is None else str(list(a))
                fb = "absent" if b is None else str(list(b))
                diffs.append((name, f"{name}: {fa} in {ref_label} vs {fb} in {label}"))
        if not diffs:
            continue
        lines = [d for _, d in diffs[:MAX_LISTED]]
        more = f" (and {len(diffs) - MAX_LISTED} more)" if len(diffs) > MAX_LISTED else ""
        msg = (f"models differ in architecture: {len(diffs)} tensor(s) differ between "
               f"{ref_label} and {label}{more}:\n  " + "\n  ".join(lines))
        if any(n in embed_names for n, _ in diffs):
            vocab = []
            for s, lab in zip(shapes, labels, strict=True):
                e = next((s[n] for n in embed_names if n in s), None)
                vocab.append(f"{lab}: {e[0] if e else '?'}")
            msg += ("\n  vocabulary sizes: " + ", ".join(vocab) + "\n  (tables that differ only "
                    "in padded rows, one tokenizer: --align-vocab reads them with the base's "
                    "rows)")
        raise ArchitectureMismatchError(msg)


def check_trees(trees: Sequence, labels: Sequence[str] | None = None) -> None:
    """Check that canonical trees have the same leaves and shapes (see :func:`check_shapes`)."""
    labels = list(labels) if labels is not None else [f"input {i}" for i in range(len(trees))]
    check_shapes([tree_shapes(t) for t in trees], labels)

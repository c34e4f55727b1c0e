"""PEFT LoRA adapters: read one, apply it to an HF checkpoint, and ``MODEL+ADAPTER`` references.

A reference ``path/to/model+path/to/adapter`` (mergekit's syntax; either part a local directory
or a hub id) names the model with the adapter merged into its weights. It is materialised once,
streamed tensor by tensor, into a cache directory (``$JAXARITH_CACHE`` or
``~/.cache/jaxarith``, ``lora/<hash>``), keyed by both parts' absolute paths and their files'
sizes and modification times; every command then reads it like any HF directory (merge inputs,
delta, generate, eval, convert). mergekit materialises such references the same way.

Merging, as PEFT's ``merge_and_unload`` does, in float32 and rounded once to the weight's dtype:

- ``lora_A`` [r, in], ``lora_B`` [out, r]: ``W += scaling * B @ A`` (``fan_in_fan_out``: the
  transpose), ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``; per-module
  ``rank_pattern`` / ``alpha_pattern`` as PEFT matches them);
- ``lora_B.bias`` (``lora_bias``): ``b += scaling * lora_B.bias``;
- ``lora_embedding_A`` [r, V], ``lora_embedding_B`` [D, r]: ``E += scaling * (B @ A).T``;
- ``modules_to_save`` tensors (``base_model.model.NAME``) replace ``NAME``.

DoRA and other PEFT types are refused with an error naming the setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np

from jaxarith.errors import CheckpointError, ConfigError, JaxarithError
from jaxarith.io.atomic import MARKER, atomic_dir
from jaxarith.io.convert.hf import HFCheckpoint, resolve_hf_dir
from jaxarith.io.convert.safetensors_io import SafetensorsFile, write_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def split_ref(ref: str) -> tuple[str, str] | None:
    """``(model, adapter)`` of a ``MODEL+ADAPTER`` reference, None for any other reference (an
    existing path containing ``+`` is a plain reference)."""
    ref = os.fspath(ref)
    if "+" not in ref or os.path.exists(ref):
        return None
    model, adapter = ref.rsplit("+", 1)
    if not model or not adapter:
        raise ConfigError(f"{ref}: a model with an adapter is written MODEL+ADAPTER")
    return model, adapter


def _local(ref: str, what: str) -> str:
    if os.path.isdir(ref):
        return ref
    try:  # a hub id: the adapter's files (config + weights) or the model's
        return resolve_hf_dir(ref, patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except JaxarithError as e:
        raise JaxarithError(f"{what} {ref!r}: {e}") from None


class Adapter:
    """A PEFT LoRA adapter directory: its config and tensors, by base tensor name."""

    def __init__(self, directory: str):
        self.directory = directory
        cfg_path = os.path.join(directory, ADAPTER_CONFIG)
        weights = os.path.join(directory, ADAPTER_WEIGHTS)
        if not os.path.exists(cfg_path) or not os.path.exists(weights):
            raise CheckpointError(f"{directory}: not a PEFT adapter (needs {ADAPTER_CONFIG} and "
                                  f"{ADAPTER_WEIGHTS})")
        with open(cfg_path) as f:
            self.config = json.load(f)
        c = self.config
        if c.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"{cfg_path}: peft_type={c.get('peft_type')!r}: only LoRA "
                              "adapters are supported")
        if c.get("use_dora"):
            raise ConfigError(f"{cfg_path}: use_dora=true: DoRA adapters are not supported")
        self.file = SafetensorsFile(weights)
        self.tensors = {}
        for key in self.file.keys():
            if not key.startswith(PREFIX):
                raise CheckpointError(f"{weights}: tensor {key!r} does not start with {PREFIX!r}")
            self.tensors[key[len(PREFIX):]] = key

    def _pattern(self, pattern: dict, module: str, default):
        # PEFT: the first key (in order) that matches the module's name, as a regex at its end
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    def scaling(self, module: str) -> float:
        r = self._pattern(self.config.get("rank_pattern"), module, self.config.get("r", 8))
        alpha = self._pattern(self.config.get("alpha_pattern"), module,
                              self.config.get("lora_alpha", 8))
        return alpha / (r ** 0.5 if self.config.get("use_rslora") else r)

    def get(self, name: str) -> np.ndarray:
        return self.file.get(self.tensors[name])

    def uses(self, name: str) -> tuple[str, list[str]]:
        """How the adapter changes the base tensor ``name``: (kind, adapter tensors), kind one
        of "replace" (modules_to_save), "linear", "embedding", "bias" or "" (unchanged)."""
        if name in self.tensors:
            return "replace", [name]
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and f"{module}.lora_A.weight" in self.tensors:
            return "linear", [f"{module}.lora_A.weight", f"{module}.lora_B.weight"]
        if leaf == "weight" and f"{module}.lora_embedding_A" in self.tensors:
            return "embedding", [f"{module}.lora_embedding_A", f"{module}.lora_embedding_B"]
        if leaf == "bias" and f"{module}.lora_B.bias" in self.tensors:
            return "bias", [f"{module}.lora_B.bias"]
        return "", []

    def apply(self, name: str, w: np.ndarray) -> np.ndarray:
        """``w`` (the base tensor ``name``) with the adapter merged in."""
        kind, used = self.uses(name)
        if not kind:
            return w
        if kind == "replace":
            delta = None
            x = self.get(name)
        else:
            if kind == "bias":
                delta = self.get(used[0]).astype(np.float32)
            else:
                a, b = (self.get(u).astype(np.float32) for u in used)
                delta = b @ a
                if kind == "embedding" or self.config.get("fan_in_fan_out"):
                    delta = delta.T
            x = delta
        if x.shape != w.shape:
            raise CheckpointError(f"{self.directory}: the adapter's {used[0]} gives shape "
                                  f"{list(x.shape)} for {name}, the model's is {list(w.shape)}")
        if delta is None:
            return x.astype(w.dtype)
        s = np.float32(self.scaling(name.rpartition(".")[0]))
        return (w.astype(np.float32) + s * delta).astype(w.dtype)


def merge_adapter(model_dir: str, adapter_dir: str, out: str) -> str:
    """Write ``model_dir`` with the adapter merged (an HF directory at ``out``, atomically).

    Raises:
      CheckpointError: before anything is written, when an adapter tensor matches no weight of
        the model (naming it) or a shape differs.
    """
    adapter = Adapter(adapter_dir)
    ckpt = HFCheckpoint(model_dir)
    used = {u for k in ckpt.keys() for u in adapter.uses(k)[1]}
    left = sorted(set(adapter.tensors) - used)
    if left:  # never silently: an adapter tensor that would change nothing is an error
        raise CheckpointError(f"{adapter_dir}: adapter tensor(s) match no weight of "
                              f"{model_dir}: {', '.join(PREFIX + x for x in left[:5])}")
    with atomic_dir(out, overwrite=True, kind="model+lora",
                    info={"model": os.path.abspath(model_dir),
                          "adapter": os.path.abspath(adapter_dir)}) as tmp:
        for name in os.listdir(model_dir):
            src = os.path.join(model_dir, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and name != MARKER:
                shutil.copy2(src, os.path.join(tmp, name))  # config, tokenizer, index
        for fname, st in ckpt.files.items():
            names = st.keys()
            specs = [(k, ckpt.shape(k), ckpt.dtype(k)) for k in names]
            write_safetensors(os.path.join(tmp, fname), specs,
                              (adapter.apply(k, ckpt.view(k)) for k in names))
    return out


def _fingerprint(directory: str) -> list:
    return sorted((n, os.path.getsize(os.path.join(directory, n)),
                   int(os.path.getmtime(os.path.join(directory, n))))
                  for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n)))


def cache_root() -> str:
    return os.environ.get("JAXARITH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "jaxarith")


def materialize(ref: str) -> str:
    """The local HF directory of a ``MODEL+ADAPTER`` reference (merged once, then cached)."""
    model, adapter = split_ref(ref)
    model_dir, adapter_dir = _local(model, "model"), _local(adapter, "adapter")
    key = json.dumps([os.path.abspath(model_dir), _fingerprint(model_dir),
                      os.path.abspath(adapter_dir), _fingerprint(adapter_dir)])
    out = os.path.join(cache_root(), "lora", hashlib.sha256(key.encode()).hexdigest()[:24])
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return merge_adapter(model_dir, adapter_dir, out)

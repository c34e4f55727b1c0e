"""Getting models in and out: references, conversion and safe outputs.

- ``refs``: the one resolver of a model reference (hub id, local HF directory, Orbax directory);
- ``convert``: HF safetensors <-> canonical parameters <-> Orbax, streamed, on any mesh;
- ``atomic``: the safe-output rules (marker file, temporary sibling renamed into place, no
  ``--overwrite`` of what jaxarith did not write).
"""

from jaxarith.io.refs import LoadedModel, RefKind, load_model, load_tokenizer, ref_kind

__all__ = ["LoadedModel", "RefKind", "load_model", "load_tokenizer", "ref_kind"]

"""Meshes and the one table that maps logical axis names to mesh axes.

Model code names *logical* axes only (``vocab``, ``embed``, ``heads``, ...). ``RULES`` maps each to
zero or more of the mesh axes ``data``, ``fsdp``, ``tensor``, ``expert``; nothing else in jaxarith
names a mesh axis. A mesh is described by a string such as ``"data=2,fsdp=2,tensor=2"`` or
``"fsdp=-1"`` (-1 fills with the remaining devices); axes not named get size 1, so every mesh has
all four axes. ``expert`` holds the experts of mixture-of-experts layers (logical axis
``experts``); batches are not split over it (each expert group sees the whole batch and computes
only its own experts' share).

Divisibility: a parameter dimension that does not divide the size of its mesh axes is replicated
along that dimension with a warning naming the parameter and the sizes (once per parameter and
mesh), or raises :class:`ShardingError` naming the parameter when strict. Strictness is an
argument, or the process-wide default set by :func:`set_strict_sharding` /
:func:`strict_sharding` (the CLI's ``--strict-sharding``, the training config's
``mesh_strict: true``). Activations (:func:`constrain`) are never strict.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxarith.errors import ConfigError, ShardingError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor", "expert")

LogicalAxes = tuple[str | None, ...]

# logical axis -> mesh axes. Parameters are sharded over fsdp (their embed dimension) and tensor
# (heads / mlp / vocab); activations' batch over data and fsdp.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "layers": (),
    "norm": (),
    "positions": (),
    "seq": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_vocab": ("tensor",),
    "cache_seq": (),
    "experts": ("expert",),
}


# Process-wide (not a context variable: loader threads must see the setting of the command).
_STRICT = [False]
_WARNED: set[tuple] = set()


def set_strict_sharding(strict: bool) -> None:
    """Make strict divisibility the default for parameter shardings (process-wide)."""
    _STRICT[0] = bool(strict)


@contextlib.contextmanager
def strict_sharding(strict: bool = True) -> Iterator[None]:
    """Within the block, parameter shardings default to ``strict``."""
    before = _STRICT[0]
    _STRICT[0] = bool(strict)
    try:
        yield
    finally:
        _STRICT[0] = before


def is_strict() -> bool:
    """The current default strictness (see :func:`set_strict_sharding`)."""
    return _STRICT[0]


def parse_mesh_spec(spec: str, num_devices: int | None = None) -> dict[str, int]:
    """Parse ``"data=2,fsdp=-1"`` into axis sizes for all mesh axes (:data:`MESH_AXES`).

    Axes are separated by ``,`` or ``+`` (``"data=2+fsdp=-1"``: the form that survives
    comma-separated argument strings such as lm-eval's ``model_args``).

    Raises:
        ConfigError: unknown axis, bad size, more than one ``-1``, or a product that is not the
            device count.
    """
    n = jax.device_count() if num_devices is None else num_devices
    sizes: dict[str, int] = {}
    for part in [p.strip() for p in spec.replace("+", ",").split(",") if p.strip()]:
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(f"mesh spec {spec!r}: {part!r} is not of the form axis=size")
        if name not in MESH_AXES:
            raise ConfigError(
                f"mesh spec {spec!r}: unknown axis {name!r} (axes are {', '.join(MESH_AXES)})"
            )
        if name in sizes:
            raise ConfigError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ConfigError(f"mesh spec {spec!r}: size of {name!r} is not an integer") from None
        if size == 0 or size < -1:
            raise ConfigError(f"mesh spec {spec!r}: size of {name!r} must be positive or -1")
        sizes[name] = size
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh spec {spec!r}: only one axis may be -1, got {fill}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if n % known:
            raise ConfigError(
                f"mesh spec {spec!r}: {n} devices are not divisible by the fixed axes' {known}"
            )
        sizes[fill[0]] = n // known
    total = math.prod(sizes.values())
    if total != n:
        raise ConfigError(
            f"mesh spec {spec!r} multiplies to {total} devices but there are {n} "
            f"(use -1 on one axis to fill)"
        )
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: str = "fsdp=-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes :data:`MESH_AXES` from a spec string (Auto axis types)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    arr = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    # jax.sharding.Mesh gives Auto axes: XLA chooses intermediate shardings (see ENVIRONMENT.md).
    return Mesh(arr, MESH_AXES)


def mesh_spec_string(mesh: Mesh) -> str:
    return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


def logical_to_spec(
    axes: LogicalAxes,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    *,
    rules: dict[str, tuple[str, ...]] = RULES,
    strict: bool | None = None,
    name: str = "array",
    activation: bool | None = None,
) -> PartitionSpec:
    """The PartitionSpec for a tensor with logical ``axes``.

    A mesh axis is used at most once (first dimension wins). With ``shape`` and ``mesh`` given,
    mesh axes of size 1 are dropped and a dimension not divisible by its mesh axes is replicated
    with a warning naming ``name`` and the sizes (or raises :class:`ShardingError` when
    ``strict``; None: :func:`is_strict`). ``activation``: an activation or data array (never
    strict, logged at debug level: batch sizes vary from call to call); default: True when
    ``axes`` has a ``batch`` axis, which parameters never have.
    """
    if activation is None:
        activation = "batch" in axes
    strict = False if activation else is_strict() if strict is None else strict
    if shape is not None and len(shape) != len(axes):
        raise ShardingError(f"{name}: shape {tuple(shape)} has {len(shape)} dims but logical "
                            f"axes {axes} name {len(axes)}")
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for dim, logical in enumerate(axes):
        if logical is None:
            out.append(None)
            continue
        if logical not in rules:
            raise ShardingError(f"{name}: logical axis {logical!r} has no sharding rule")
        mesh_axes = [a for a in rules[logical] if a not in used]
        if mesh is not None:
            mesh_axes = [a for a in mesh_axes if mesh.shape[a] > 1]
        if mesh is not None and shape is not None and mesh_axes:
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape[dim] % size:
                if strict:
                    raise ShardingError(
                        f"{name}: dimension {dim} ({logical}) of size {shape[dim]} is not "
                        f"divisible by mesh axes {mesh_axes} of total size {size}"
                    )
                _warn_replicated(name, dim, logical, shape, mesh_axes, size, activation)
                mesh_axes = []
        used.update(mesh_axes)
        out.append(None if not mesh_axes else
                   mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*out)


def _warn_replicated(name, dim, logical, shape, mesh_axes, size, activation) -> None:
    if activation:
        log.debug("%s: dim %d (%s, size %d) not divisible by %s=%d; replicated",
                  name, dim, logical, shape[dim], mesh_axes, size)
        return
    key = (name, dim, tuple(shape), tuple(mesh_axes), size)
    if key in _WARNED:
        return
    _WARNED.add(key)
    log.warning("%s %s: dimension %d (%s) of size %d does not divide mesh axes %s of total "
                "size %d; replicated along it (--strict-sharding / mesh_strict: true makes "
                "this an error)", name, tuple(shape), dim, logical, shape[dim],
                "x".join(mesh_axes), size)


def named_sharding(mesh: Mesh, axes: LogicalAxes, shape: Sequence[int], *, name: str = "array",
                   strict: bool | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, strict=strict, name=name))


def tree_shardings(mesh: Mesh, axes_tree, shapes_tree, *, strict: bool | None = None):
    """Shardings for a tree, given matching trees of logical axes and shapes (or arrays)."""
    def one(path, axes, shaped):
        shape = getattr(shaped, "shape", shaped)
        return named_sharding(mesh, axes, shape, name=path_str(path), strict=strict)

    return jax.tree.map_with_path(one, axes_tree, shapes_tree, is_leaf=_is_axes)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Constrain an activation's sharding by logical axes when a mesh is set (else a no-op).

    Uses the mesh of ``jax.set_mesh`` / ``with mesh:``; outside one this does nothing, so model
    code runs unchanged on a single device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and \
            not isinstance(x.sharding, jax.sharding.NamedSharding):
        return x  # eager, on one device (e.g. token ids made by numpy): nothing to guide
    spec = logical_to_spec(axes, x.shape, mesh, activation=True)
    return jax.lax.with_sharding_constraint(x, spec)


def path_str(path) -> str:
    """``layers/attn/q`` for a jax key path."""
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(key))
    return "/".join(parts)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)

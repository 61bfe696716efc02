"""The one place that knows mesh axes.

Models name their parameter and activation dimensions logically ('embed', 'heads', ...);
a table of rules maps those names to the mesh axes `data`, `fsdp` and `tensor`.
Data parallel shards the batch over `data` (and `fsdp`); FSDP additionally shards
parameters and optimizer state over `fsdp`; tensor parallel splits heads, mlp and vocab
over `tensor` (Megatron style).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# (logical name, mesh axis or tuple of axes or None), in order of precedence: a dimension
# takes the first rule whose mesh axes are not already used by another dimension.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('embed', 'fsdp'),
    ('embed_out', None),
    ('length', None),
    ('kv', None),
    ('position', None),
    ('type', None),
    ('norm', None),
    ('classes', None),
    ('prompt', None),
    ('lora_rank', None),
    ('adapter', None),
)

_ACTIVE_RULES: list[tuple[tuple[str, Any], ...] | None] = [None]


def rules_from_config(overrides: Iterable | None = None):
  """DEFAULT_RULES with `overrides` ((name, axes) pairs) taking precedence."""
  overrides = tuple(tuple(r) for r in (overrides or ()))
  for name, axes in overrides:
    for ax in (axes if isinstance(axes, (tuple, list)) else (axes,)):
      if ax is not None and ax not in MESH_AXES:
        raise ValueError(f'mesh.rules: {name!r} -> {ax!r}: mesh axes are {MESH_AXES}')
  return overrides + DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """The `mesh` config section: devices per axis (-1: the remaining devices) and
  ((logical name, mesh axes), ...) rules that take precedence over DEFAULT_RULES."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: tuple = ()

  def __post_init__(self):
    for axis in MESH_AXES:
      v = getattr(self, axis)
      if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
        raise ValueError(f'mesh.{axis}={v!r}: a positive int, or -1 for the remaining devices')
    object.__setattr__(self, 'rules', tuple(tuple(r) for r in self.rules or ()))
    rules_from_config(self.rules)

  def build(self, devices: Sequence | None = None):
    """(mesh, rules) on `devices` (all of them by default)."""
    return make_mesh(self, devices), rules_from_config(self.rules)


def mesh_shape(settings: MeshSettings, num_devices: int) -> tuple[int, int, int]:
  """Resolve (data, fsdp, tensor) with at most one -1 standing for the remaining devices."""
  dims = [int(getattr(settings, a)) for a in MESH_AXES]
  if dims.count(-1) > 1:
    raise ValueError(f'mesh: at most one of {MESH_AXES} may be -1, got {dict(zip(MESH_AXES, dims))}')
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if num_devices % known:
      raise ValueError(f'mesh: {dict(zip(MESH_AXES, dims))} does not divide {num_devices} devices')
    dims[dims.index(-1)] = num_devices // known
  if math.prod(dims) != num_devices:
    raise ValueError(
        f'mesh: data*fsdp*tensor = {"*".join(map(str, dims))} = {math.prod(dims)} but there are '
        f'{num_devices} devices; set the axes so their product is {num_devices} (use -1 for one '
        f'axis to take the rest)')
  return tuple(dims)


def make_mesh(settings: MeshSettings, devices: Sequence | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(settings, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # GSPMD propagation, not Explicit mode
  try:
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
  except Exception:  # noqa: BLE001  (device lists that make_mesh cannot lay out)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_mesh(names: Sequence[str | None], rules) -> P:
  used: set[str] = set()
  out = []
  for name in names:
    choice = None
    if name is not None:
      for rule_name, axes in rules:
        if rule_name != name:
          continue
        cand = axes if isinstance(axes, (tuple, list)) else (axes,)
        cand = tuple(a for a in cand if a is not None)
        if not cand:
          break
        if not used.intersection(cand):
          choice = cand if len(cand) > 1 else cand[0]
          used.update(cand)
          break
    out.append(choice)
  return P(*out)


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Drop mesh axes from dims they do not divide (e.g. vocab 30522 over tensor=4)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    out.append(axes if dim % size == 0 else None)
  return P(*out)


def sharding_for(names, shape, mesh: Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, _fit(logical_to_mesh(names, rules), shape, mesh))


def tree_shardings(abstract_tree, names_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of arrays given a same-structured tree of logical names."""
  return jax.tree.map(lambda x, n: sharding_for(n, x.shape, mesh, rules), abstract_tree,
                      names_tree, is_leaf=lambda n: isinstance(n, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh(('batch',) + (None,) * (ndim - 1), rules))


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  return data_parallel_size_of(tuple(mesh.shape[a] for a in MESH_AXES), rules)


def data_parallel_size_of(dims: Sequence[int], rules=DEFAULT_RULES) -> int:
  """Devices the batch is split over, for mesh axis sizes `dims` (data, fsdp, tensor)."""
  spec = logical_to_mesh(('batch',), rules)[0]
  if spec is None:
    return 1
  sizes = dict(zip(MESH_AXES, dims))
  return math.prod(sizes[a] for a in (spec if isinstance(spec, tuple) else (spec,)))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules):
  """Trace and run under `mesh`, with `rules` for activation constraints."""
  prev = _ACTIVE_RULES[0]
  _ACTIVE_RULES[0] = tuple(rules)
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE_RULES[0] = prev


def constrain(x, names: Sequence[str | None]):
  """Logical sharding constraint on an activation; a no-op outside `use_mesh`."""
  rules = _ACTIVE_RULES[0]
  if rules is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, _fit(logical_to_mesh(names, rules), x.shape, mesh))


def param_names(tree) -> Any:
  """Logical names of every nnx.Variable in an nnx.State / module, as a pure nested dict."""
  state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
  return nnx.to_pure_dict(jax.tree.map(
      lambda v: tuple(v.get_metadata().get('logical_axes') or (None,) * v[...].ndim), state,
      is_leaf=lambda v: isinstance(v, nnx.Variable)))

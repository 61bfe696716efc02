"""Parameter trees by name: the dotted path of a leaf ('bert.layers.0.attn.query.kernel') is
how checkpoints, the HF tables, PEFT, freezing masks and reports all refer to a parameter."""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def path_keys(path) -> tuple[str, ...]:
  """A jax key path as strings: dict keys, sequence indices and attribute names alike."""
  return tuple(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def dotted(path) -> str:
  return '.'.join(path_keys(path))


def map_named(fn: Callable[[str, Any], Any], tree):
  """tree_map with each leaf's dotted name: fn(name, leaf)."""
  return jax.tree_util.tree_map_with_path(lambda path, x: fn(dotted(path), x), tree)


def flat_params(tree) -> dict[str, Any]:
  """{'a.b.c': leaf} for an NNX module, nnx.State or nested dict."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
  return {dotted(path): leaf for path, leaf in leaves}


def unflatten_like(template, flat: dict[str, Any]):
  """The nested tree of `template` with each leaf taken from `flat` by its dotted name."""
  return map_named(lambda name, _: flat[name], template)

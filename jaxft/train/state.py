"""The train state: a plain pytree, sharded by logical names, created directly on devices.

state = {'step': int32[], 'params': nested dict, 'opt_state': optax state,
         'rng': uint32[2], 'skipped': int32[]}
Parameters are a pure nested dict (not nnx.State) so optax, Orbax and the HF mapping all
see the same tree; `ModelDef.merge(params)` rebuilds the NNX module inside jitted code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxft import partitioning
from jaxft.trees import path_keys


@dataclasses.dataclass
class ModelDef:
  """Static description of a model: graphdef, abstract state, logical names."""
  graphdef: Any
  abstract_state: Any       # nnx.State of ShapeDtypeStruct leaves (template for merge)
  abstract_params: Any      # pure dict of ShapeDtypeStruct
  names: Any                # pure dict of logical-name tuples
  build: Callable[[], nnx.Module]

  @classmethod
  def create(cls, build: Callable[[], nnx.Module]) -> 'ModelDef':
    abs_model = nnx.eval_shape(build)
    graphdef, abs_state = nnx.split(abs_model)
    return cls(graphdef, abs_state, nnx.to_pure_dict(abs_state),
               partitioning.param_names(abs_state), build)

  def merge(self, params) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self.abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def param_shardings(self, mesh: Mesh, rules):
    return partitioning.tree_shardings(self.abstract_params, self.names, mesh, rules)

  def init_params(self, mesh: Mesh, rules):
    """Initialise parameters directly into their shards (no full copy on one device)."""
    shardings = self.param_shardings(mesh, rules)
    with partitioning.use_mesh(mesh, rules):
      return jax.jit(lambda: nnx.to_pure_dict(nnx.state(self.build())),
                     out_shardings=shardings)()


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
  """Optimizer moments take the sharding of the parameter they mirror (matched by the
  trailing tree path and shape); everything else (counts, scalars) is replicated."""
  by_path = {}
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                          jax.tree.leaves(param_shardings)):
    by_path[path_keys(path)] = (x.shape, s)
  repl = partitioning.replicated(mesh)

  def pick(path, x):
    key = path_keys(path)
    for i in range(len(key)):
      hit = by_path.get(key[i:])
      if hit is not None and hit[0] == x.shape:
        return hit[1]
    return repl

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def create_train_state(model_def: ModelDef, tx, mesh: Mesh, rules, seed: int,
                       params=None):
  """(state, state_shardings). `params`: host arrays to start from (else fresh init)."""
  p_sh = model_def.param_shardings(mesh, rules)
  if params is None:
    params = model_def.init_params(mesh, rules)
  else:
    params = jax.device_put(params, p_sh)
  abs_opt = jax.eval_shape(tx.init, model_def.abstract_params)
  o_sh = opt_state_shardings(abs_opt, model_def.abstract_params, p_sh, mesh)
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
  repl = partitioning.replicated(mesh)
  state = {
      'step': jax.device_put(jnp.zeros((), jnp.int32), repl),
      'params': params,
      'opt_state': opt_state,
      'rng': jax.device_put(jax.random.PRNGKey(seed), repl),
      'skipped': jax.device_put(jnp.zeros((), jnp.int32), repl),
  }
  shardings = {'step': repl, 'params': p_sh, 'opt_state': o_sh, 'rng': repl, 'skipped': repl}
  return state, shardings


def abstract_state(state_shardings, state):
  """ShapeDtypeStructs with shardings: the restore target for Orbax."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                      state_shardings)


def to_host(tree):
  """Fully replicated numpy copy of a (possibly multi-host sharded) tree."""
  from jax.experimental import multihost_utils
  if jax.process_count() > 1:
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  return jax.tree.map(np.asarray, jax.device_get(tree))


def state_bytes_per_device(tree) -> int:
  """Bytes of `tree` held by one device (the max over devices)."""
  per: dict = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
  return max(per.values()) if per else 0


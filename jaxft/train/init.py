"""Starting weights for a stage: a jaxft workdir (best or latest checkpoint) or an HF directory.

Parameters are matched by their dotted path and shape, so a pretraining workdir (MLM head)
initialises a classifier: the encoder is taken, the MLM head is reported as unused and the
new task head as freshly initialised.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxft import checkpointing
from jaxft.models import flat_params


def is_jaxft_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, 'checkpoints')) and os.path.exists(
      os.path.join(path, 'config.json'))


def is_hf_dir(path: str) -> bool:
  cfg = os.path.join(path, 'config.json')
  if not os.path.exists(cfg) or is_jaxft_workdir(path):
    return False
  with open(cfg) as f:
    return 'model_type' in json.load(f)


def workdir_config(path: str) -> dict:
  with open(os.path.join(path, 'config.json')) as f:
    return json.load(f)


def _checkpoint_step_dir(workdir: str, which: str = 'best') -> str:
  """Directory of the best checkpoint if any (and asked), else the latest."""
  order = ['best', 'checkpoints'] if which == 'best' else ['checkpoints']
  for sub in order:
    d = os.path.join(workdir, sub)
    if not os.path.isdir(d):
      continue
    steps = sorted(int(s) for s in os.listdir(d) if s.isdigit())
    if not steps:
      continue
    if sub == 'best':
      step = _best_step(d, steps)
    else:
      step = steps[-1]
    return os.path.join(d, str(step))
  raise FileNotFoundError(f'no checkpoint found under {workdir} (looked in {order})')


def _best_step(d: str, steps: list[int]) -> int:
  mngr = ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return mngr.best_step() or steps[-1]
  except Exception:  # noqa: BLE001
    return steps[-1]
  finally:
    mngr.close()


def read_workdir_params(workdir: str, which: str = 'best') -> dict[str, np.ndarray]:
  """Flat {dotted path: array} of a workdir's checkpointed parameters."""
  step_dir = _checkpoint_step_dir(os.path.abspath(workdir), which)  # Orbax: absolute paths only
  ckptr = ocp.StandardCheckpointer()
  try:
    meta = ckptr.metadata(os.path.join(step_dir, 'state'))
    tree = getattr(meta, 'item_metadata', meta)
    tree = getattr(tree, 'tree', tree)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                           sharding=_cpu_sharding()), tree)
    state = ckptr.restore(os.path.join(step_dir, 'state'), abstract)
  finally:
    ckptr.close()
  verify_params(step_dir, state)
  logging.info('initialising from %s', step_dir)
  return {k: np.asarray(v) for k, v in flat_params(state['params']).items()}


def verify_params(step_dir: str, state) -> None:
  """Compare the restored params with the fingerprints saved beside them (meta item), as a
  resume does: a flipped bit restores without error into wrong numbers."""
  meta_file = os.path.join(step_dir, 'meta', 'metadata')
  if not os.path.isfile(meta_file):
    return  # a checkpoint written before checksums were recorded
  with open(meta_file) as f:
    saved = (json.load(f) or {}).get('checksums')
  try:
    checkpointing.verify_checksums({'params': state['params']}, saved, partial=True)
  except checkpointing.CorruptCheckpoint as e:
    raise checkpointing.CorruptCheckpoint(f'{step_dir}: {e}: the checkpoint is damaged') from e


def _cpu_sharding():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def match_params(abstract_params, source: dict[str, np.ndarray], where: str):
  """(params, report): fill `abstract_params` from `source` by path; others keep None."""
  target = flat_params(abstract_params)
  used, missing = set(), []
  values = {}
  for name, x in target.items():
    if name in source:
      src = source[name]
      if tuple(src.shape) != tuple(x.shape):
        raise ValueError(f'{where}: parameter {name} has shape {tuple(src.shape)} but the model '
                         f'expects {tuple(x.shape)}')
      values[name] = np.asarray(src, dtype=x.dtype)
      used.add(name)
    else:
      missing.append(name)
  unused = sorted(set(source) - used)
  report = {'loaded': len(used), 'missing': missing, 'unused': unused}
  return values, report


def load_init(path: str, model_def, rng_seed: int = 0, which: str = 'best'):
  """Host params for `model_def` from `path`, fresh init for what the source lacks."""
  if is_jaxft_workdir(path):
    source = read_workdir_params(path, which)
    values, report = match_params(model_def.abstract_params, source, path)
  elif is_hf_dir(path):
    from jaxft.models import hf
    params, rep = hf.load_hf_into(model_def.abstract_params, path)
    report = {'loaded': len(rep.loaded), 'missing': list(rep.missing), 'unused': list(rep.unused)}
    missing = set(report['missing'])
    values = {k: np.asarray(v) for k, v in flat_params(params).items() if k not in missing}
  else:
    raise FileNotFoundError(f'init_from={path!r} is neither a jaxft workdir (config.json + '
                            'checkpoints/) nor a Hugging Face checkpoint directory (config.json '
                            'with model_type)')
  names = list(flat_params(model_def.abstract_params))
  todo = [k for k in names if k not in values]
  fresh = {}
  if todo:  # initialise only what the source lacks, in one jit (eager init of a whole model
    # compiles every initializer op by op: seconds of CPU even for a tiny model)
    fresh = jax.device_get(jax.jit(lambda: {
        k: v for k, v in flat_params(nnx_state_pure(model_def.build())).items()
        if k in todo})())
  full = {k: values[k] if k in values else np.asarray(fresh[k]) for k in names}
  if report.get('missing'):
    logging.info('init_from %s: new (freshly initialised) parameters: %s', path,
                 report['missing'])
  if report.get('unused'):
    logging.info('init_from %s: unused tensors (dropped): %s', path, report['unused'])
  return unflatten_like(model_def.abstract_params, full), report


def nnx_state_pure(model):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def unflatten_like(template, flat: dict):
  def pick(path, _):
    name = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    return np.asarray(flat[name])
  return jax.tree_util.tree_map_with_path(pick, template)

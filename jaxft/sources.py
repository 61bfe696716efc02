"""What does this path hold: the tokenizer, model config, labels and parameters of a jaxft
workdir or a Hugging Face directory, the one place every stage asks.

A jaxft workdir is `config.json` + `checkpoints/` (+ `best/`, `tokenizer/`, and for a
fine-tune `labels.json`: what was trained and the model actually built). Parameters are
matched by dotted path and shape, so a pretraining workdir (MLM head) initialises a
classifier: the encoder is taken, the MLM head reported unused, the new head fresh.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from jaxft import checkpointing, files
from jaxft.data import tokenizer as data_tokenizer
from jaxft.data.tokenizer import load_tokenizer
from jaxft.models import hf
from jaxft.models.config import ModelConfig
from jaxft.peft import PeftConfig, load_trained
from jaxft.trees import flat_params, unflatten_like

LABELS = 'labels.json'
# A continual fine-tune's checkpoint also holds the earlier task's head under this name
# (jaxft.continual); it is no part of the model of the workdir's own task.
PREVIOUS_HEAD = 'previous_head'
_TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'vocab.json')


# ----------------------------------------------------------------------------- kinds

def is_jaxft_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, 'checkpoints')) and os.path.exists(
      os.path.join(path, 'config.json'))


def is_hf_dir(path: str) -> bool:
  cfg = os.path.join(path, 'config.json')
  if not os.path.exists(cfg) or is_jaxft_workdir(path):
    return False
  with open(cfg) as f:
    return 'model_type' in json.load(f)


def _neither(path: str, key: str = 'init_from') -> FileNotFoundError:
  return FileNotFoundError(f'{key}={path!r} is neither a jaxft workdir (config.json + '
                           'checkpoints/) nor a Hugging Face checkpoint directory (config.json '
                           'with model_type)')


def workdir_config(path: str) -> dict:
  with open(os.path.join(path, 'config.json')) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_dir(path: str) -> str | None:
  """The directory of the tokenizer saved with `path` (a jaxft workdir's tokenizer/, or an
  HF directory itself), or None."""
  for cand in (os.path.join(path, 'tokenizer'), path) if path else ():
    if any(os.path.exists(os.path.join(cand, f)) for f in _TOKENIZER_FILES):
      return cand
  return None


def tokenizer_of(path: str, fallback: str = ''):
  """The tokenizer saved with `path` (an HF dir or a jaxft workdir's tokenizer/), since its
  weights were trained with it; else the one at `fallback` (data.tokenizer)."""
  own = tokenizer_dir(path)
  if own:
    return load_tokenizer(own)
  if not fallback:
    where = f'{path} has no tokenizer' if path else 'no tokenizer'
    raise ValueError(f'{where}: set data.tokenizer, or init_from a directory that has one')
  return load_tokenizer(fallback)


def save_tokenizer(tokenizer, workdir: str, max_length: int | None = None) -> None:
  """workdir/tokenizer: a run's outputs carry the tokenizer its weights were trained with,
  recording the model's real input limit (`max_length`: its position count)."""
  if jax.process_index() == 0:
    with files.AtomicDir(os.path.join(workdir, 'tokenizer'), 'the tokenizer') as tmp:
      data_tokenizer.save_tokenizer(tokenizer, tmp, max_length)


# ----------------------------------------------------------------------------- model, labels

def labels_of(path: str) -> dict | None:
  """A fine-tuned workdir's labels.json: kind, label names / values, metrics, model."""
  fn = os.path.join(path, LABELS)
  if not os.path.exists(fn):
    return None
  with open(fn) as f:
    return json.load(f)


def save_labels(workdir: str, kind: str, info: dict, mcfg: ModelConfig) -> None:
  """labels.json: what a fine-tune trained (classes, metrics) and the model it built."""
  if jax.process_index() != 0:
    return
  files.atomic_write(os.path.join(workdir, LABELS), json.dumps(
      {'kind': kind, 'label_names': info['label_names'],
       'label_values': info.get('label_values', info['label_names']),
       'is_regression': info.get('is_regression', False),
       'metric_names': info['metric_names'], 'main_metric': info['main_metric'],
       'model': mcfg.to_dict()}, indent=2), 'labels')


def model_config_of(path: str, vocab_size: int | None = None) -> ModelConfig:
  """The architecture stored at `path`: a jaxft workdir's built model (labels.json, else
  config.json; vocab 0 = its tokenizer's size, or `vocab_size`) or an HF config.json."""
  if is_jaxft_workdir(path):
    labels = labels_of(path)
    d = dict(labels['model'] if labels and 'model' in labels else workdir_config(path)['model'])
    if 'type' in d:
      d['model_type'] = d.pop('type')
    if not d.get('vocab_size'):
      d['vocab_size'] = vocab_size or len(load_tokenizer(os.path.join(path, 'tokenizer')))
    return ModelConfig.from_config_dict(d)
  if is_hf_dir(path):
    return hf.load_hf_config(path)
  raise _neither(path)


# ----------------------------------------------------------------------------- parameters

def checkpoint_step_dir(workdir: str, which: str = 'best') -> str:
  """Directory of the best checkpoint if any (and asked), else the latest."""
  order = ['best', 'checkpoints'] if which == 'best' else ['checkpoints']
  for sub in order:
    d = os.path.join(workdir, sub)
    if not os.path.isdir(d):
      continue
    steps = sorted(int(s) for s in os.listdir(d) if s.isdigit())
    if not steps:
      continue
    step = _best_step(d, steps) if sub == 'best' else steps[-1]
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
  """Flat {dotted path: array} of a workdir's checkpointed parameters, verified against
  the checksums saved beside them."""
  step_dir = checkpoint_step_dir(os.path.abspath(workdir), which)  # Orbax: absolute paths only
  ckptr = ocp.StandardCheckpointer()
  try:
    meta = ckptr.metadata(os.path.join(step_dir, 'state'))
    tree = getattr(meta, 'item_metadata', meta)
    tree = getattr(tree, 'tree', tree)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)
    state = ckptr.restore(os.path.join(step_dir, 'state'), abstract)
  finally:
    ckptr.close()
  _verify_params(step_dir, state)
  logging.info('initialising from %s', step_dir)
  return {k: np.asarray(v) for k, v in flat_params(state['params']).items()}


def _verify_params(step_dir: str, state) -> None:
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


def match_params(abstract_params, source: dict[str, np.ndarray], where: str):
  """(values, report): the leaves of `abstract_params` found in `source` by path and shape."""
  target = flat_params(abstract_params)
  used, missing, values = set(), [], {}
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
  report = {'loaded': len(used), 'missing': missing, 'unused': sorted(set(source) - used)}
  return values, report


def read_params(path: str, model_def, which: str = 'best'):
  """(values, report): the parameters of `model_def` that `path` holds, by dotted name."""
  if is_jaxft_workdir(path):
    return match_params(model_def.abstract_params, read_workdir_params(path, which), path)
  if is_hf_dir(path):
    params, rep = hf.load_hf_into(model_def.abstract_params, path)
    report = {'loaded': len(rep.loaded), 'missing': list(rep.missing), 'unused': list(rep.unused)}
    missing = set(report['missing'])
    return {k: np.asarray(v) for k, v in flat_params(params).items() if k not in missing}, report
  raise _neither(path)


def fresh_params(model_def, names) -> dict[str, np.ndarray]:
  """Freshly initialised values of the named parameters, in one jit (eager init of a whole
  model compiles every initializer op by op: seconds of CPU even for a tiny model)."""
  names = set(names)
  if not names:
    return {}
  pure = lambda: nnx.to_pure_dict(nnx.state(model_def.build(), nnx.Param))
  fresh = jax.jit(lambda: {k: v for k, v in flat_params(pure()).items() if k in names})()
  return {k: np.asarray(v) for k, v in jax.device_get(fresh).items()}


def complete(model_def, values: dict[str, np.ndarray]):
  """Host params of `model_def`: `values` by dotted name, fresh init for what they lack."""
  names = list(flat_params(model_def.abstract_params))
  fresh = fresh_params(model_def, [k for k in names if k not in values])
  return unflatten_like(model_def.abstract_params,
                        {k: values[k] if k in values else fresh[k] for k in names})


def load_init(path: str, model_def, which: str = 'best'):
  """(host params for `model_def` from `path`, report); fresh init for what it lacks."""
  values, report = read_params(path, model_def, which)
  full = complete(model_def, values)
  if report.get('missing'):
    logging.info('init_from %s: new (freshly initialised) parameters: %s', path,
                 report['missing'])
  if report.get('unused'):
    logging.info('init_from %s: unused tensors (dropped): %s', path, report['unused'])
  return full, report


def record_model(workdir: str, mcfg: ModelConfig) -> None:
  """config.json's `model` section set to the model actually built (its architecture may
  come from init_from or a teacher rather than from the config), so the workdir describes
  itself as an init_from, teacher or predict source."""
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  saved = workdir_config(workdir)
  d = mcfg.to_dict()
  saved['model'] = {**saved.get('model', {}), 'type': d.pop('model_type'), **d}
  files.atomic_write(path, json.dumps(saved, indent=2), 'config.json')


def peft_of(path: str) -> PeftConfig:
  """The PEFT settings a jaxft workdir trained with (none for a plain run or an HF dir)."""
  if not is_jaxft_workdir(path):
    return PeftConfig()
  saved = workdir_config(path)
  return PeftConfig.from_section(saved.get('peft') or {}, seed=int(saved.get('seed', 0) or 0))


def trained_model(path: str, base_def, which: str = 'best'):
  """(model_def, host params): the model a fine-tuned workdir evaluated, exactly: the base
  definition after the run's PEFT changes with every checkpointed tensor (LoRA, adapters,
  prompts included); nothing dropped, nothing freshly initialised."""
  params = read_workdir_params(path, which)
  if not any(k.startswith(PREVIOUS_HEAD + '.') for k in flat_params(base_def.abstract_params)):
    params = {k: v for k, v in params.items() if not k.startswith(PREVIOUS_HEAD + '.')}
  return load_trained(peft_of(path), base_def, params, where=path)

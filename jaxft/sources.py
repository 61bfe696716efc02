"""What does this path hold: the tokenizer, model config, labels and parameters of a jaxft
workdir or a Hugging Face directory, the one place every stage asks. A stage resolves a path
once (`resolve`) into a `Source` and passes that value on; nothing re-reads the directory.

A jaxft workdir is `config.json` + `checkpoints/` (+ `best/`, `tokenizer/`, and for a
fine-tune `labels.json`: what was trained and the model actually built). Parameters are
matched by dotted path and shape, so a pretraining workdir (MLM head) initialises a
classifier: the encoder is taken, the MLM head reported unused, the new head fresh.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

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


# ----------------------------------------------------------------------------- what a path holds

def is_jaxft_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, 'checkpoints')) and os.path.exists(
      os.path.join(path, 'config.json'))


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _neither(path: str, key: str) -> FileNotFoundError:
  return FileNotFoundError(f'{key}={path!r} is neither a jaxft workdir (config.json + '
                           'checkpoints/) nor a Hugging Face checkpoint directory (config.json '
                           'with model_type)')


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """A fine-tuned workdir's labels.json: what it trained (kind, classes, metrics) and the
  model it actually built."""
  kind: str
  label_names: tuple
  label_values: tuple
  is_regression: bool
  metric_names: tuple
  main_metric: str
  model: dict  # ModelConfig.to_dict()

  @property
  def num_labels(self) -> int:
    """The width of the head: one output for a regression."""
    return 1 if self.is_regression else len(self.label_names)

  @property
  def model_type(self) -> str:
    return self.model.get('model_type', self.model.get('type', ''))

  @classmethod
  def from_json(cls, d: dict) -> 'TaskInfo':
    names = tuple(d.get('label_names') or ())
    return cls(kind=d['kind'], label_names=names,
               label_values=tuple(d.get('label_values') or names),
               is_regression=bool(d.get('is_regression', False)),
               metric_names=tuple(d.get('metric_names') or ()),
               main_metric=d.get('main_metric', ''), model=dict(d.get('model') or {}))

  @classmethod
  def of_data(cls, kind: str, info: dict, mcfg: ModelConfig) -> 'TaskInfo':
    """From a split's info (the data loaders') and the model built for it."""
    return cls.from_json({**info, 'kind': kind, 'model': mcfg.to_dict()})

  def to_json(self) -> dict:
    return {'kind': self.kind, 'label_names': list(self.label_names),
            'label_values': list(self.label_values), 'is_regression': self.is_regression,
            'metric_names': list(self.metric_names), 'main_metric': self.main_metric,
            'model': self.model}


@dataclasses.dataclass(frozen=True)
class Source:
  """A path resolved once: a jaxft workdir (its run config, labels, tokenizer, PEFT
  settings, checkpoints) or a Hugging Face model directory (its config.json)."""
  path: str
  is_workdir: bool
  config: dict[str, Any]        # config.json: the run's config, or the HF model config
  task: TaskInfo | None         # labels.json of a fine-tuned workdir
  tokenizer_dir: str | None     # the tokenizer its weights were trained with, if saved
  peft: PeftConfig              # the PEFT settings a workdir trained with (none for HF)

  @property
  def stage(self) -> str:
    return self.config.get('stage', '') if self.is_workdir else ''

  @property
  def config_file(self) -> str:
    return os.path.join(self.path, 'config.json')

  @property
  def trained_data(self) -> dict:
    """The `data` section a workdir was trained with ({} for an HF directory)."""
    return dict(self.config.get('data') or {}) if self.is_workdir else {}

  def tokenizer(self, fallback: str = ''):
    """The tokenizer saved with the weights (they were trained with it), else the one at
    `fallback` (data.tokenizer)."""
    if self.tokenizer_dir:
      return load_tokenizer(self.tokenizer_dir)
    if not fallback:
      raise ValueError(f'{self.path} has no tokenizer: set data.tokenizer, or init_from a '
                       'directory that has one')
    return load_tokenizer(fallback)

  def model_config(self, vocab_size: int | None = None) -> ModelConfig:
    """The architecture stored here: a workdir's built model (labels.json, else config.json;
    vocab 0 = its tokenizer's size, or `vocab_size`) or the HF config."""
    if not self.is_workdir:
      return hf.load_hf_config(self.path)
    d = dict(self.task.model if self.task and self.task.model else self.config['model'])
    if 'type' in d:
      d['model_type'] = d.pop('type')
    if not d.get('vocab_size'):
      d['vocab_size'] = vocab_size or len(load_tokenizer(os.path.join(self.path, 'tokenizer')))
    return ModelConfig.from_config_dict(d)

  def read_params(self, model_def, which: str = 'best'):
    """(values, report): the parameters of `model_def` held here, by dotted name."""
    if self.is_workdir:
      return match_params(model_def.abstract_params, read_workdir_params(self.path, which),
                          self.path)
    params, rep = hf.load_hf_into(model_def.abstract_params, self.path)
    report = {'loaded': len(rep.loaded), 'missing': list(rep.missing), 'unused': list(rep.unused)}
    missing = set(report['missing'])
    return {k: np.asarray(v) for k, v in flat_params(params).items() if k not in missing}, report

  def load_init(self, model_def, which: str = 'best'):
    """(host params for `model_def`, report); fresh init for what this source lacks."""
    values, report = self.read_params(model_def, which)
    full = complete(model_def, values)
    if report.get('missing'):
      logging.info('init_from %s: new (freshly initialised) parameters: %s', self.path,
                   report['missing'])
    if report.get('unused'):
      logging.info('init_from %s: unused tensors (dropped): %s', self.path, report['unused'])
    return full, report

  def trained_model(self, base_def, which: str = 'best'):
    """(model_def, host params): the model a fine-tuned workdir evaluated, exactly: the base
    definition after the run's PEFT changes with every checkpointed tensor (LoRA, adapters,
    prompts included); nothing dropped, nothing freshly initialised."""
    params = read_workdir_params(self.path, which)
    if not any(k.startswith(PREVIOUS_HEAD + '.') for k in flat_params(base_def.abstract_params)):
      params = {k: v for k, v in params.items() if not k.startswith(PREVIOUS_HEAD + '.')}
    return load_trained(self.peft, base_def, params, where=self.path)


def resolve(path: str, key: str = 'init_from') -> Source:
  """What `path` holds, read once; FileNotFoundError naming `key` when it is neither a jaxft
  workdir nor an HF model directory."""
  cfg_file = os.path.join(path, 'config.json')
  if is_jaxft_workdir(path):
    config = _read_json(cfg_file)
    labels = os.path.join(path, LABELS)
    task = TaskInfo.from_json(_read_json(labels)) if os.path.exists(labels) else None
    peft = PeftConfig.from_section(config.get('peft') or {},
                                   seed=int(config.get('seed', 0) or 0))
    return Source(path, True, config, task, tokenizer_dir(path), peft)
  config = _read_json(cfg_file) if os.path.exists(cfg_file) else {}
  if 'model_type' not in config:
    raise _neither(path, key)
  return Source(path, False, config, None, tokenizer_dir(path), PeftConfig())


def resolve_optional(path: str, key: str = 'init_from') -> Source | None:
  """`resolve`, or None for an unset path ('')."""
  return resolve(path, key) if path else None


def tokenizer_dir(path: str) -> str | None:
  """The directory of the tokenizer saved with `path` (a jaxft workdir's tokenizer/, or an
  HF directory itself), or None."""
  for cand in (os.path.join(path, 'tokenizer'), path) if path else ():
    if any(os.path.exists(os.path.join(cand, f)) for f in _TOKENIZER_FILES):
      return cand
  return None


def tokenizer_for(source: Source | None, fallback_tokenizer: str):
  """The source's tokenizer when there is a source, else data.tokenizer's."""
  if source is not None:
    return source.tokenizer(fallback_tokenizer)
  if not fallback_tokenizer:
    raise ValueError('no tokenizer: set data.tokenizer, or init_from a directory that has one')
  return load_tokenizer(fallback_tokenizer)


def tokenizer_and_config(source: Source | None, fallback_tokenizer: str, model: ModelConfig):
  """(tokenizer, ModelConfig): the source's when there is one (with `model`'s runtime
  fields), else data.tokenizer and the config's model (vocab 0 = the tokenizer's size)."""
  tokenizer = tokenizer_for(source, fallback_tokenizer)
  mine = model if model.vocab_size else model.replace(vocab_size=len(tokenizer))
  return tokenizer, (source.model_config().with_runtime_of(mine) if source else mine)


def save_tokenizer(tokenizer, workdir: str, max_length: int | None = None) -> None:
  """workdir/tokenizer: a run's outputs carry the tokenizer its weights were trained with,
  recording the model's real input limit (`max_length`: its position count)."""
  if jax.process_index() == 0:
    with files.AtomicDir(os.path.join(workdir, 'tokenizer'), 'the tokenizer') as tmp:
      data_tokenizer.save_tokenizer(tokenizer, tmp, max_length)


def save_labels(workdir: str, task: TaskInfo) -> None:
  """labels.json: what a fine-tune trained (classes, metrics) and the model it built."""
  if jax.process_index() != 0:
    return
  files.atomic_write(os.path.join(workdir, LABELS), json.dumps(task.to_json(), indent=2),
                     'labels')


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


def record_model(workdir: str, mcfg: ModelConfig) -> None:
  """config.json's `model` section set to the model actually built (its architecture may
  come from init_from or a teacher rather than from the config), so the workdir describes
  itself as an init_from, teacher or predict source."""
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  saved = _read_json(path)
  d = mcfg.to_dict()
  saved['model'] = {**saved.get('model', {}), 'type': d.pop('model_type'), **d}
  files.atomic_write(path, json.dumps(saved, indent=2), 'config.json')

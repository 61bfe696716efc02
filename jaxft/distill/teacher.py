"""The teacher: loaded from a jaxft workdir or a Hugging Face directory, checked against the
task (head, labels), placed on the mesh with its own shardings; plus the teacher-logits cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxft import sources
from jaxft.models import build_model, count_params, flat_params, hf
from jaxft.models.config import ModelConfig, to_dtype
from jaxft.train.state import ModelDef
from jaxft.trees import unflatten_like


@dataclasses.dataclass
class Teacher:
  path: str
  mcfg: ModelConfig
  head: str
  num_labels: int | None
  model_def: ModelDef
  params: Any               # host pure dict, in the teacher's param dtype
  label_values: list | None
  fingerprint: str          # hash of architecture + weights: keys the logits cache

  @property
  def num_params(self) -> int:
    return count_params(self.params)


def _check_labels(source: sources.Source, num_labels: int | None, label_values: list | None,
                  label_names: list | None) -> list | None:
  """The teacher's class order must be the task's: a permuted head would teach wrong labels."""
  if num_labels is None:
    return None
  path, task = source.path, source.task
  if task is not None:
    theirs = [str(x) for x in task.label_values or task.label_names]
    n = 1 if task.is_regression else len(theirs)
    if n != num_labels:
      raise ValueError(f'teacher {path}: {n} labels {theirs} but the task has {num_labels}')
    if label_values is not None and theirs and theirs != [str(x) for x in label_values]:
      raise ValueError(f'teacher {path}/labels.json: label order {theirs} differs from the '
                       f'task\'s {list(label_values)}')
    return theirs
  if not source.is_workdir:
    id2label = hf.load_hf_labels(path) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    if names and len(names) != num_labels:
      raise ValueError(f'teacher {path}/config.json: id2label has {len(names)} labels but '
                       f'the task has {num_labels}')
    generic = all(n.upper() == f'LABEL_{i}' for i, n in enumerate(names))
    task_names = [str(x) for x in (label_names or [])]
    if names and not generic and sorted(names) == sorted(task_names) and names != task_names:
      raise ValueError(f'teacher {path}/config.json: id2label order {names} differs from the '
                       f'task\'s {task_names}')
    if names and not generic and names not in (task_names, [str(x) for x in label_values or []]):
      logging.warning('teacher %s: id2label %s does not name the task\'s labels %s; taking '
                      'class i to be the task\'s class i', path, names, task_names)
    return names or None
  return None


def fingerprint(mcfg: ModelConfig, head: str, params) -> str:
  h = hashlib.blake2b(digest_size=16)
  h.update(json.dumps({'model': mcfg.to_dict(), 'head': head}, sort_keys=True).encode())
  for name, x in sorted(flat_params(params).items()):
    x = np.ascontiguousarray(x)
    h.update(f'{name}:{x.shape}:{x.dtype}'.encode())
    h.update(x.tobytes())
  return h.hexdigest()


def read_params(source: sources.Source, model_def: ModelDef, head: str):
  """Every parameter from the checkpoint, cast to the model's param dtype. Unlike
  `Source.load_init` nothing is freshly initialised, so no throwaway copy is built."""
  values, report = source.read_params(model_def)
  missing = report['missing']
  if missing:
    raise ValueError(f'teacher {source.path} lacks {len(missing)} parameter(s) of a '
                     f'{head!r} model, e.g. {missing[:4]}: a teacher needs a '
                     f'trained head')
  params = unflatten_like(model_def.abstract_params, values)
  return jax.tree.map(lambda x, a: np.asarray(x, a.dtype), params, model_def.abstract_params)


def load_teacher(source: sources.Source, head: str, *, vocab_size: int,
                 num_labels: int | None = None, label_values: list | None = None,
                 label_names: list | None = None, dtype: str = '', seed: int = 0) -> Teacher:
  """The teacher's host params; every parameter must come from the checkpoint."""
  path = source.path
  mcfg = source.model_config(vocab_size)
  # Forward only and deterministic: no dropout; `dtype` (e.g. bf16) for matmuls and storage.
  over = dict(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0, remat=False)
  if dtype:
    over.update(dtype=to_dtype(dtype), param_dtype=to_dtype(dtype))
  mcfg = mcfg.replace(**over)
  theirs = _check_labels(source, num_labels, label_values, label_names)
  model_def = ModelDef.create(lambda: build_model(mcfg, head, num_labels=num_labels, seed=seed))
  params = read_params(source, model_def, head)
  logging.info('teacher %s: %s %s, %d layers, hidden %d, %s params', path, mcfg.model_type, head,
               mcfg.num_layers, mcfg.hidden_size, f'{count_params(params):,}')
  return Teacher(path, mcfg, head, num_labels, model_def, params, theirs,
                 fingerprint(mcfg, head, params))


# ------------------------------------------------------------------------- logits cache

def data_fingerprint(arrays) -> str:
  h = hashlib.blake2b(digest_size=16)
  for k in ('input_ids', 'attention_mask', 'token_type_ids'):
    if k in arrays:
      x = np.ascontiguousarray(arrays[k])
      h.update(f'{k}:{x.shape}:{x.dtype}'.encode())
      h.update(x.tobytes())
  return h.hexdigest()


def cache_path(workdir: str, teacher: Teacher, arrays) -> str:
  key = hashlib.blake2b((teacher.fingerprint + data_fingerprint(arrays)).encode(),
                        digest_size=8).hexdigest()
  return os.path.join(workdir, 'cache', f'teacher_logits-{key}.npy')


def cached_logits(path: str, n: int, compute) -> tuple[np.ndarray, bool]:
  """(logits [n, C] float32, hit): read `path`, else `compute()` and store it there."""
  if os.path.exists(path):
    logits = np.load(path)
    if logits.shape[0] == n:
      logging.info('teacher logits from cache %s', path)
      return logits, True
    logging.warning('%s has %d rows, the data %d: recomputing', path, logits.shape[0], n)
  logits = np.asarray(compute(), np.float32)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp.npy'
    np.save(tmp, logits)
    os.replace(tmp, path)
    logging.info('teacher logits cached in %s', path)
  return logits, False

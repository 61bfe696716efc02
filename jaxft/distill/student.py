"""The student: its model (with a projection to the teacher's width when feature terms need
one), its initialisation (every k-th teacher layer as DistilBERT, a checkpoint, or random),
and the inference speed that distillation is for."""
from __future__ import annotations

import re
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from jaxft import sources
from jaxft.data import loader as loader_lib
from jaxft.models import build_model, flat_params
from jaxft.models.config import ModelConfig
from jaxft.models.layers import Dense
from jaxft.objectives.distill import PROJ
from jaxft.train.state import ModelDef
from jaxft.train.step import global_batch
from jaxft.trees import unflatten_like

MODES = ('auto', 'teacher_every_k', 'init_from', 'random')
_SAME_WIDTH = ('model_type', 'vocab_size', 'hidden_size', 'num_heads', 'intermediate_size',
               'max_position_embeddings', 'type_vocab_size')
_LAYER = re.compile(r'\.layers\.(\d+)\.')


def width_mismatch(student_cfg, teacher_cfg) -> list[str]:
  """Architecture fields (other than depth) in which student and teacher differ."""
  return [f'{k}: student {getattr(student_cfg, k)} vs teacher {getattr(teacher_cfg, k)}'
          for k in _SAME_WIDTH if getattr(student_cfg, k) != getattr(teacher_cfg, k)]


def teacher_layers(n_teacher: int, n_student: int, explicit: str = '') -> list[int]:
  """Teacher layer (0-based) copied into each student layer: every k-th, k = L_t // L_s
  (0, 2, 4 for 6 -> 3), or the comma-separated `explicit` list."""
  if explicit:
    ids = [int(x) for x in str(explicit).replace(' ', '').split(',') if x]
    if len(ids) != n_student:
      raise ValueError(f'distill.student_layers={explicit!r} names {len(ids)} layers but the '
                       f'student has {n_student}')
  else:
    if n_student > n_teacher:
      raise ValueError(f'student_init=teacher_every_k: the student has {n_student} layers, '
                       f'more than the teacher\'s {n_teacher}')
    k = n_teacher // n_student
    ids = [i * k for i in range(n_student)]
  bad = [i for i in ids if not 0 <= i < n_teacher]
  if bad:
    raise ValueError(f'distill.student_layers: {bad} out of range for a {n_teacher}-layer teacher')
  return ids


def _rename(name: str, ids: list[int]) -> str:
  return _LAYER.sub(lambda m: f'.layers.{ids[int(m.group(1))]}.', name, count=1)


def from_teacher(teacher_params, student_def, layer_ids: list[int]):
  """(host params, report): student layer i <- teacher layer layer_ids[i]; embeddings and
  heads by name; what the teacher lacks (a new head, the projection) is freshly initialised."""
  source = {k: np.asarray(v) for k, v in flat_params(teacher_params).items()}
  target = flat_params(student_def.abstract_params)
  out, copied, missing, used = {}, {}, [], set()
  for name, x in target.items():
    src = _rename(name, layer_ids)
    if src in source:
      if tuple(source[src].shape) != tuple(x.shape):
        raise ValueError(f'student_init=teacher_every_k: {name} has shape {tuple(x.shape)} but '
                         f'teacher {src} has {tuple(source[src].shape)}')
      out[name] = np.asarray(source[src], x.dtype)
      copied[name] = src
      used.add(src)
    else:
      missing.append(name)
  fresh = sources.fresh_params(student_def, missing)
  out.update({k: np.asarray(fresh[k], target[k].dtype) for k in missing})
  unused = sorted(set(source) - used)
  report = {'mode': 'teacher_every_k', 'teacher_layers': layer_ids, 'loaded': len(copied),
            'missing': missing,
            'unused_teacher_layers': sorted({int(m.group(1)) for m in map(_LAYER.search, unused)
                                             if m}),
            'unused': [n for n in unused if not _LAYER.search(n)]}
  logging.info('student from teacher layers %s; fresh: %s', layer_ids, missing)
  return unflatten_like(student_def.abstract_params, out), report


def student_def(mcfg, head, num_labels, seed: int, project_to: int | None) -> ModelDef:
  """The student; with `project_to`, a `distill_proj` Dense (student width -> teacher width,
  logical axes embed/embed_out) beside its own params, so the student's paths are unchanged."""
  def build():
    m = build_model(mcfg, head, num_labels=num_labels, seed=seed)
    if project_to:
      setattr(m, PROJ, Dense((mcfg.hidden_size,), (project_to,), ('embed', 'embed_out'),
                             init_std=mcfg.initializer_range, dtype=mcfg.dtype,
                             param_dtype=mcfg.param_dtype, rngs=nnx.Rngs(params=seed + 7)))
    return m
  return ModelDef.create(build)


def without_projection(params):
  return {k: v for k, v in params.items() if k != PROJ}


def examples_per_sec(eval_step, params, arrays, batch_size: int, mesh, rules,
                     max_batches: int = 0) -> float:
  """Inference throughput of a jitted forward over device-resident batches (after a warm-up):
  the data pipeline is not timed, only the model."""
  padded = loader_lib.indexed({k: v for k, v in arrays.items() if k in
                               ('input_ids', 'attention_mask', 'token_type_ids')}, batch_size)
  local = list(loader_lib.make_loader(padded, global_batch_size=batch_size, seed=0,
                                      shuffle=False, num_epochs=1, drop_remainder=True))
  if max_batches:
    local = local[:max_batches]
  batches = [global_batch(b, mesh, rules) for b in local]
  jax.block_until_ready(eval_step(params, batches[0]))
  t0 = time.perf_counter()
  outs = [eval_step(params, b) for b in batches]
  jax.block_until_ready(outs)
  return len(batches) * batch_size / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the student's start

def student_config(dc, init_from: sources.Source | None, runtime: ModelConfig,
                   teacher: ModelConfig, tokenizer, mode: str) -> ModelConfig:
  """Architecture from init_from (a pretrained student, resolved) or the teacher's with
  distill.student.* overrides (`dc`: the distill settings); the runtime fields (dropout,
  dtypes) from `runtime`, the run's model section."""
  if mode == 'init_from':
    base = init_from.model_config()
  else:
    shape = dc.student
    base = teacher.replace(
        num_layers=shape.num_layers or max(teacher.num_layers // 2, 1),
        hidden_size=shape.hidden_size or teacher.hidden_size,
        num_heads=shape.num_heads or teacher.num_heads,
        intermediate_size=shape.intermediate_size or teacher.intermediate_size)
  mine = runtime if runtime.vocab_size else runtime.replace(vocab_size=len(tokenizer))
  return base.with_runtime_of(mine)


def resolve_mode(dc, init_from: sources.Source | None, runtime: ModelConfig,
                 teacher: ModelConfig, tokenizer) -> str:
  """distill.student_init, with 'auto' decided: init_from when given, else every k-th
  teacher layer when the widths allow, else random."""
  mode = dc.student_init
  if mode == 'auto':
    if init_from is not None:
      return 'init_from'
    diff = width_mismatch(student_config(dc, init_from, runtime, teacher, tokenizer,
                                         'teacher_every_k'), teacher)
    mode = 'random' if diff else 'teacher_every_k'
    logging.info('distill.student_init=auto -> %s%s', mode, f' ({diff})' if diff else '')
  return mode


def initial_params(dc, init_from: sources.Source | None, mode: str, teacher, sdef, smcfg):
  """(host params or None, report) of the student's starting point."""
  if mode == 'teacher_every_k':
    diff = width_mismatch(smcfg, teacher.mcfg)
    if diff:
      raise ValueError(f'distill.student_init=teacher_every_k needs the teacher\'s widths: {diff}')
    layer_ids = teacher_layers(teacher.mcfg.num_layers, smcfg.num_layers, dc.student_layers)
    return from_teacher(teacher.params, sdef, layer_ids)
  if mode == 'init_from':
    params, report = init_from.load_init(sdef)
    return params, dict(report, mode='init_from', path=init_from.path)
  return None, {'mode': 'random'}

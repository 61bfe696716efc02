"""Stage `distill`: train a student on a teacher's soft targets (and optionally its internals).

  python -m jaxft.main --config configs/distill.py:sst2 --config.teacher=DIR --workdir w

The teacher (a jaxft workdir or an HF directory) runs forward only: its params are a
constant input of the jitted step, sharded on the same mesh by its own logical axes, and
never enter the train state. With `distill.cache_teacher` (classification) its train-split
logits are computed once, stored under workdir/cache keyed by a hash of teacher and data,
and read from the batch. The student is the loop's model: data, eval, checkpoints and early
stopping are those of fine-tuning (or MLM pretraining). results.json records teacher and
student size, dev metrics and inference examples/s.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxft import config as config_lib
from jaxft import sources
from jaxft.data import classification
from jaxft.data import qa as qa_data
from jaxft.data import loader as loader_lib
from jaxft.data import pretrain as lm_data
from jaxft.data.masking import MaskingSettings
from jaxft.distill import kinds as distill_kinds
from jaxft.distill import report
from jaxft.distill import student as student_lib
from jaxft.distill import teacher as teacher_lib
from jaxft.distill.settings import DistillSettings, make_spec
from jaxft.export import ExportSettings, export_hf
from jaxft.models import count_params
from jaxft.models.config import ModelConfig
from jaxft.objectives.outputs import outputs
from jaxft.train import loop
from jaxft.train.metrics import write_results

@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(loop.RunSettings):
  """distill (kind cls): the config's keys."""
  teacher: str = ''
  init_from: str = ''
  distill: DistillSettings
  model: ModelConfig  # the student's runtime fields (dropout, dtypes, remat)
  data: classification.ClsData
  mlm: MaskingSettings  # kind mlm: the masking
  export: ExportSettings

  def __post_init__(self):
    if self.distill.student_init == 'init_from' and not self.init_from:
      raise config_lib.ConfigError('distill.student_init=init_from needs init_from (a student '
                                   'checkpoint)')


@dataclasses.dataclass(frozen=True, kw_only=True)
class MlmSettings(Settings):
  """distill (kind mlm, DistilBERT pretraining): the config's keys."""
  data: lm_data.LmDataSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class QaSettings(Settings):
  """distill (kind qa, extractive question answering): the config's keys."""
  data: qa_data.QaData


def settings_class(cfg) -> type[Settings]:
  """The kind decides what `data` holds: a GLUE-style task, pretraining text or QA."""
  kind = (cfg.get('distill') or {}).get('kind', 'cls')
  return {'mlm': MlmSettings, 'qa': QaSettings}.get(kind, Settings)


# ----------------------------------------------------------------------------- the stage

@dataclasses.dataclass
class Distilled:
  """What a distillation run ends with: its results, and on device the student's train
  state and the teacher's params (None when the logits were cached)."""
  results: dict
  state: Any
  teacher_params: Any


def run(s: Settings, workdir: str) -> dict:
  return distill(s, workdir).results


def distill(s: Settings, workdir: str) -> Distilled:
  dc, what = s.distill, distill_kinds.KINDS[s.distill.kind]
  if not s.teacher:
    raise ValueError('teacher is not set: --config.teacher=A_JAXFT_WORKDIR_OR_HF_DIR')
  teacher_source = sources.resolve(s.teacher, 'teacher')
  init_source = sources.resolve_optional(s.init_from)
  tokenizer = teacher_source.tokenizer(s.data.tokenizer)
  data = what.load(s.data, tokenizer, workdir, s.train)
  labels = what.teacher_labels(data)
  teacher = teacher_lib.load_teacher(teacher_source, what.head, vocab_size=len(tokenizer),
                                     dtype=dc.teacher_dtype, seed=s.seed, **labels)
  if s.data.max_len > teacher.mcfg.max_position_embeddings:
    raise ValueError(f'data.max_len={s.data.max_len} exceeds the teacher\'s '
                     f'max_position_embeddings={teacher.mcfg.max_position_embeddings}')
  mode = student_lib.resolve_mode(dc, init_source, s.model, teacher.mcfg, tokenizer)
  smcfg = student_lib.student_config(dc, init_source, s.model, teacher.mcfg, tokenizer, mode)
  if smcfg.vocab_size != teacher.mcfg.vocab_size:
    raise ValueError(f'student vocabulary {smcfg.vocab_size} != teacher {teacher.mcfg.vocab_size}:'
                     ' both read the same token ids (the teacher\'s tokenizer)')
  spec = make_spec(dc, smcfg, teacher.mcfg)
  if dc.cache_teacher and spec.features:
    raise ValueError('distill.cache_teacher stores logits only: cosine / hidden / attention '
                     'terms need the live teacher')
  needs_proj = (spec.cosine_weight or spec.hidden_weight) and \
      smcfg.hidden_size != teacher.mcfg.hidden_size
  sdef = student_lib.student_def(smcfg, what.head, labels['num_labels'], s.seed,
                                 teacher.mcfg.hidden_size if needs_proj else None)
  init_params, init_report = student_lib.initial_params(dc, init_source, mode, teacher, sdef,
                                                        smcfg)
  sources.save_tokenizer(tokenizer, workdir, smcfg.max_position_embeddings)
  what.record(data, workdir, smcfg)
  sources.record_model(workdir, smcfg)
  student = _Student(sdef, smcfg, init_params, init_report, mode)
  return _train(s, what, workdir, data, teacher, student, spec, tokenizer)


@dataclasses.dataclass
class _Student:
  model_def: Any
  mcfg: ModelConfig
  init_params: Any
  init_report: dict
  mode: str  # how it started (distill.student_init, 'auto' decided)


def _teacher_side(s: Settings, what, workdir: str, data, teacher, tokenizer):
  """(teacher results, the training rows (with its logits when cached), its params on the
  loop's mesh (None when cached), the cache record, the eval parts)."""
  dc, bs = s.distill, s.train.batch_size
  placed = loop.place(s.mesh, teacher.model_def, teacher.params)  # on the loop's mesh
  t_params = placed.params
  parts = what.eval_parts(data, tokenizer, s.mlm, bs, s.seed)
  eval_objective, eval_batches, summarize, output = parts
  t_results = {'path': s.teacher, 'params': teacher.num_params,
               'layers': teacher.mcfg.num_layers, 'hidden_size': teacher.mcfg.hidden_size,
               'dtype': np.dtype(teacher.mcfg.param_dtype).name}
  if eval_batches is not None:
    t_results['dev'] = placed.evaluate(eval_objective, eval_batches(), summarize)
    logging.info('teacher dev: %s', t_results['dev'])
  t_fwd = placed.eval_step(outputs(output))
  if dc.measure_speed and data.dev is not None:
    t_results['examples_per_sec'] = student_lib.examples_per_sec(
        t_fwd, t_params, data.dev, bs, placed.mesh, placed.rules, dc.speed_batches)
  train_arrays, cache_info = data.train, None
  if dc.cache_teacher:
    path = teacher_lib.cache_path(workdir, teacher, train_arrays)
    logits, hit = teacher_lib.cached_logits(
        path, len(train_arrays['input_ids']),
        lambda: loop.evaluate(t_fwd, t_params, loader_lib.eval_batches(train_arrays, bs)(),
                              placed.mesh, placed.rules,
                              lambda sums, per: loader_lib.ordered(per)['logits']))
    data.train = dict(train_arrays, teacher_logits=logits.astype(np.float32))
    cache_info = {'path': path, 'hit': hit}
    jax.tree.map(lambda x: x.delete(), t_params)  # the step never sees the teacher
    t_params = None
  return t_results, t_params, cache_info, parts


def _train(s: Settings, what, workdir, data, teacher, student: _Student, spec,
           tokenizer) -> Distilled:
  bs = s.train.batch_size
  t_results, t_params, cache_info, parts = _teacher_side(s, what, workdir, data, teacher,
                                                         tokenizer)
  _, eval_batches, summarize, output = parts
  objective = what.objective(data, tokenizer, s.mlm, spec, teacher.model_def,
                             s.distill.cache_teacher)
  loop_data = loop.Data(
      train_iter=loader_lib.make_loader(data.train_source(), global_batch_size=bs, seed=s.seed),
      eval_batches=eval_batches, summarize=summarize, steps_per_epoch=data.steps_per_epoch)
  speed = s.distill.measure_speed and data.dev is not None
  hooks = [loop.Hook('student', _student_hook(s, data, student, eval_batches, summarize, output,
                                              speed))] + what.hooks(data, bs)
  out = loop.train(dataclasses.replace(s.loop, train=data.train_settings), workdir,
                   loop.Start(student.model_def, student.init_params), objective, loop_data,
                   constants=t_params, hooks=hooks)
  results = {**out.results, 'steps_per_epoch': data.steps_per_epoch, 'teacher': t_results,
             'distill': report.record(s.distill, spec, student.mode, cache_info),
             **what.results(data)}
  if loop.is_main() and results.get('student'):
    print(report.format_table(results))
  if s.export.hf and not results['preempted']:
    export_hf(student_lib.without_projection(out.params), student.mcfg, what.head, workdir,
              tokenizer, id2label=what.id2label(data))
  write_results(workdir, results)
  return Distilled(results, out.state, t_params)


def _student_hook(s, data, student_: _Student, eval_batches, summarize, output, speed):
  sdef, smcfg, init_report = student_.model_def, student_.mcfg, student_.init_report

  def student(trained: loop.Trained) -> dict:
    params = trained.params
    core = student_lib.without_projection(params)
    out = {'params': count_params(core), 'projection_params': count_params(params) -
           count_params(core), 'layers': smcfg.num_layers, 'hidden_size': smcfg.hidden_size,
           'init': init_report}
    if eval_batches is not None:
      out['dev'] = trained.evaluate(eval_batches(), summarize)
    if speed:
      fwd = trained.placed(sdef).eval_step(outputs(output))
      out['examples_per_sec'] = student_lib.examples_per_sec(
          fwd, params, data.dev, s.loop.train.batch_size, trained.mesh, trained.rules,
          s.distill.speed_batches)
    return out
  return student

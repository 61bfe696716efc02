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
from jaxft import finetuning, kinds, sources
from jaxft.data import classification
from jaxft.data import loader as loader_lib
from jaxft.data import pretrain as lm_data
from jaxft.data.masking import MaskingSettings
from jaxft.distill import student as student_lib
from jaxft.distill import teacher as teacher_lib
from jaxft.distill.settings import DistillSettings, make_spec
from jaxft.export import ExportSettings, export_hf
from jaxft.models import count_params
from jaxft.models.config import ModelConfig
from jaxft.objectives import classification as cls_objectives
from jaxft.objectives import distill as distill_objectives
from jaxft.objectives import lm
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


def settings_class(cfg) -> type[Settings]:
  """The kind decides what `data` holds: a GLUE-style task or pretraining text."""
  kind = (cfg.get('distill') or {}).get('kind', 'cls')
  return MlmSettings if kind == 'mlm' else Settings


# ----------------------------------------------------------------------------- the student

def student_config(s: Settings, teacher: ModelConfig, tokenizer, mode: str) -> ModelConfig:
  """Architecture from init_from (a pretrained student) or the teacher's with
  distill.student.* overrides; the runtime fields from this config."""
  if mode == 'init_from':
    base = sources.model_config_of(s.init_from)
  else:
    shape = s.distill.student
    base = teacher.replace(
        num_layers=shape.num_layers or max(teacher.num_layers // 2, 1),
        hidden_size=shape.hidden_size or teacher.hidden_size,
        num_heads=shape.num_heads or teacher.num_heads,
        intermediate_size=shape.intermediate_size or teacher.intermediate_size)
  mine = s.model if s.model.vocab_size else s.model.replace(vocab_size=len(tokenizer))
  return base.with_runtime_of(mine)


def resolve_mode(s: Settings, teacher: ModelConfig, tokenizer) -> str:
  mode = s.distill.student_init
  if mode == 'auto':
    if s.init_from:
      return 'init_from'
    diff = student_lib.width_mismatch(student_config(s, teacher, tokenizer, 'teacher_every_k'),
                                      teacher)
    mode = 'random' if diff else 'teacher_every_k'
    logging.info('distill.student_init=auto -> %s%s', mode, f' ({diff})' if diff else '')
  return mode


def student_init(s: Settings, mode: str, teacher, sdef, smcfg):
  """(host params or None, report) of the student's starting point."""
  if mode == 'teacher_every_k':
    diff = student_lib.width_mismatch(smcfg, teacher.mcfg)
    if diff:
      raise ValueError(f'distill.student_init=teacher_every_k needs the teacher\'s widths: {diff}')
    layer_ids = student_lib.teacher_layers(teacher.mcfg.num_layers, smcfg.num_layers,
                                           s.distill.student_layers)
    return student_lib.from_teacher(teacher.params, sdef, layer_ids)
  if mode == 'init_from':
    params, report = sources.load_init(s.init_from, sdef)
    return params, dict(report, mode='init_from', path=s.init_from)
  return None, {'mode': 'random'}


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class _Data:
  train: Any             # cls: arrays; mlm: a PackedRows source over the token store
  dev: dict | None
  test: dict | None
  info: dict | None      # classification: labels and metrics of the task
  dev_info: dict | None
  test_info: dict | None
  stats: dict | None     # mlm: the corpus statistics
  steps_per_epoch: int = 0


def load_data(s: Settings, tokenizer, workdir: str) -> tuple[_Data, loop.TrainSettings]:
  """The fine-tuning splits (cls) or the pretraining rows (mlm); num_steps resolved."""
  if s.distill.kind == 'cls':
    train, info = finetuning.load_split(s.data, tokenizer, 'train')
    dev, dev_info = finetuning.load_split(s.data, tokenizer, 'dev')
    test, test_info = finetuning.load_split(s.data, tokenizer, 'test')
    settings, per_epoch = finetuning.resolve_steps(s.loop.train, len(train['input_ids']))
    return _Data(train, dev, test, info, dev_info, test_info, None, per_epoch), settings
  train, dev, stats = lm_data.build_lm_data(s.data, tokenizer, workdir, 'bert')
  return _Data(train, dev, None, None, None, None,
               {k: v for k, v in stats.items() if 'path' not in k}), s.loop.train


def eval_parts(s: Settings, data: _Data, smcfg, tokenizer):
  """(objective, eval batches, summarize, per-example output) of the student's eval."""
  bs = s.loop.train.batch_size
  if s.distill.kind == 'cls':
    return (cls_objectives.cls(data.info['num_labels'], data.info['is_regression']),
            loader_lib.eval_batches(data.dev, bs),
            cls_objectives.cls_summary(data.dev_info) if data.dev is not None else None, 'logits')
  return (lm.mlm(tokenizer, s.mlm), loader_lib.lm_eval_batches(data.dev, bs, s.loop.seed),
          lm.summarize, 'last_hidden_state')


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
  dc = s.distill
  tokenizer = sources.tokenizer_of(s.teacher, s.data.tokenizer)
  data, train_settings = load_data(s, tokenizer, workdir)
  info = data.info
  num_labels, head = (info['num_labels'], 'cls') if info else (None, 'mlm')
  labelled = info is not None and not info['is_regression']
  teacher = teacher_lib.load_teacher(
      s.teacher, head, vocab_size=len(tokenizer), num_labels=num_labels,
      label_values=info['label_values'] if labelled else None,
      label_names=info['label_names'] if labelled else None,
      dtype=dc.teacher_dtype, seed=s.loop.seed)
  if s.data.max_len > teacher.mcfg.max_position_embeddings:
    raise ValueError(f'data.max_len={s.data.max_len} exceeds the teacher\'s '
                     f'max_position_embeddings={teacher.mcfg.max_position_embeddings}')
  mode = resolve_mode(s, teacher.mcfg, tokenizer)
  smcfg = student_config(s, teacher.mcfg, tokenizer, mode)
  if smcfg.vocab_size != teacher.mcfg.vocab_size:
    raise ValueError(f'student vocabulary {smcfg.vocab_size} != teacher {teacher.mcfg.vocab_size}:'
                     ' both read the same token ids (the teacher\'s tokenizer)')
  spec = make_spec(dc, smcfg, teacher.mcfg)
  if dc.cache_teacher and spec.features:
    raise ValueError('distill.cache_teacher stores logits only: cosine / hidden / attention '
                     'terms need the live teacher')
  needs_proj = (spec.cosine_weight or spec.hidden_weight) and \
      smcfg.hidden_size != teacher.mcfg.hidden_size
  sdef = student_lib.student_def(smcfg, head, num_labels, s.loop.seed,
                                 teacher.mcfg.hidden_size if needs_proj else None)
  init_params, init_report = student_init(s, mode, teacher, sdef, smcfg)
  sources.save_tokenizer(tokenizer, workdir, smcfg.max_position_embeddings)
  if info:
    sources.save_labels(workdir, 'cls', info, smcfg)
  sources.record_model(workdir, smcfg)
  return _train(s, workdir, data, train_settings, teacher, sdef, smcfg, spec, tokenizer,
                init_params, init_report, mode)


def _train(s, workdir, data, train_settings, teacher, sdef, smcfg, spec, tokenizer, init_params,
           init_report, mode) -> Distilled:
  dc, bs, info = s.distill, s.loop.train.batch_size, data.info
  placed = loop.place(s.mesh, teacher.model_def, teacher.params)  # on the loop's mesh
  t_params = placed.params
  eval_objective, eval_batches, summarize, output = eval_parts(s, data, smcfg, tokenizer)
  speed = dc.measure_speed and data.dev is not None
  t_results = {'path': s.teacher, 'params': teacher.num_params,
               'layers': teacher.mcfg.num_layers, 'hidden_size': teacher.mcfg.hidden_size,
               'dtype': np.dtype(teacher.mcfg.param_dtype).name}
  if eval_batches is not None:
    t_results['dev'] = placed.evaluate(eval_objective, eval_batches(), summarize)
    logging.info('teacher dev: %s', t_results['dev'])
  t_fwd = placed.eval_step(outputs(output))
  if speed:
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
    train_arrays = dict(train_arrays, teacher_logits=logits.astype(np.float32))
    cache_info = {'path': path, 'hit': hit}
    jax.tree.map(lambda x: x.delete(), t_params)  # the step never sees the teacher
    t_params = None
  if info:
    objective = distill_objectives.cls(info['num_labels'], info['is_regression'], spec,
                                       teacher.model_def, cached=dc.cache_teacher)
    train_settings = finetuning.with_default_metric(
        train_settings, info if data.dev is not None else None)
  else:
    objective = distill_objectives.mlm(tokenizer, s.mlm, spec, teacher.model_def)
  loop_data = loop.Data(
      train_iter=loader_lib.make_loader(_train_source(train_arrays), global_batch_size=bs,
                                        seed=s.loop.seed),
      eval_batches=eval_batches, summarize=summarize, steps_per_epoch=data.steps_per_epoch)
  hooks = [loop.Hook('student', _student_hook(s, data, sdef, smcfg, init_report, eval_batches,
                                              summarize, output, speed))]
  if info:
    hooks += finetuning.test_hook(kinds.CLS, data.test, data.test_info, bs)
  out = loop.train(dataclasses.replace(s.loop, train=train_settings), workdir, sdef, objective,
                   loop_data, init_params=init_params, constants=t_params, hooks=hooks)
  results = {**out.results, 'steps_per_epoch': data.steps_per_epoch, 'teacher': t_results,
             'distill': _distill_record(dc, spec, mode, cache_info)}
  if info:
    results['labels'] = info['label_names']
  else:
    results['data'] = data.stats
  if loop.is_main() and results.get('student'):
    print(format_table(results))
  if s.export.hf and not results['preempted']:
    export_hf(student_lib.without_projection(out.params), smcfg, 'cls' if info else 'mlm',
              workdir, tokenizer,
              id2label=dict(enumerate(info['label_names'])) if info and info['label_names']
              else None)
  write_results(workdir, results)
  return Distilled(results, out.state, t_params)


def _train_source(train):
  """What the loader reads: the arrays without word_ids (cls), or the packed rows (mlm)."""
  if isinstance(train, dict):
    return {k: v for k, v in train.items() if k != 'word_ids'}
  return train


def _student_hook(s, data, sdef, smcfg, init_report, eval_batches, summarize, output, speed):
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


def _distill_record(dc: DistillSettings, spec, mode: str, cache_info) -> dict:
  return {'kind': dc.kind, 'alpha': spec.alpha, 'temperature': spec.temperature,
          'cosine_weight': spec.cosine_weight, 'hidden_weight': spec.hidden_weight,
          'attention_weight': spec.attention_weight,
          'layer_map': [list(p) for p in spec.layer_map] if (spec.hidden_states or
                                                             spec.attentions) else None,
          'student_init': mode, 'cache': cache_info}


def _main_metric(d: dict | None) -> tuple[str, float]:
  if not d:
    return '-', float('nan')
  for k in ('accuracy', 'matthews', 'pearson', 'f1'):
    if k in d:
      return k, float(d[k])
  k = sorted(d)[0]
  return k, float(d[k])


def format_table(results: dict) -> str:
  rows = [('teacher', results['teacher']), ('student', results['student'])]
  name = _main_metric(results['teacher'].get('dev'))[0]
  lines = [f'| model | layers | params | dev {name} | examples/s |', '|---|---|---|---|---|']
  for label, r in rows:
    eps = r.get('examples_per_sec')
    metric = _main_metric(r.get('dev'))[1]
    lines.append(f"| {label} | {r['layers']} | {r['params']:,} | {metric:.4f} | "
                 f"{f'{eps:.1f}' if eps else '-'} |")
  return '\n'.join(lines)

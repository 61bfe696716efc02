"""Stage `distill`: train a student on a teacher's soft targets (and optionally its internals).

  python -m jaxft.main --config configs/distill.py:sst2 --config.teacher=DIR --workdir w

The teacher (a jaxft workdir or an HF directory) runs forward only: its params are a
separate, non-donated input of the jitted step, sharded on the same mesh by its own logical
axes, and never enter the train state (no grads, no optimizer state, not checkpointed).
With `distill.cache_teacher` (classification) its train-split logits are computed once,
stored under workdir/cache keyed by a hash of teacher and data, and read from the batch.
The student is the loop's model: data, eval, checkpoints and early stopping are the
fine-tuning (or MLM pretraining) ones. results.json records teacher and student size,
dev metrics and inference examples/s.
"""
from __future__ import annotations

import json
import os
import time
import types

import jax
import numpy as np
from absl import logging

from jaxft import config as config_lib
from jaxft import partitioning
from jaxft.data import loader as loader_lib
from jaxft.data import pretrain as lm_data
from jaxft.data.tokenizer import save_tokenizer
from jaxft.distill import init as init_distill
from jaxft.distill import task as task_lib
from jaxft.distill import teacher as teacher_lib
from jaxft.models import build_model, count_params
from jaxft.models.layers import Dense
from jaxft.train import finetune, loop
from jaxft.train import init as init_lib
from jaxft.train import pretrain
from jaxft.train.state import ModelDef
from jaxft.train.step import Task, make_eval_step

KINDS = ('cls', 'mlm')


# ---------------------------------------------------------------------------- config

def parse_layer_map(text: str, n_student: int, n_teacher: int) -> tuple[tuple[int, int], ...]:
  """'0:0,1:2,2:4,3:6' -> ((0, 0), ...); '' -> uniform: student i -> teacher i*L_t/L_s."""
  if text:
    try:
      pairs = tuple(tuple(int(v) for v in p.split(':')) for p in
                    str(text).replace(' ', '').split(',') if p)
    except ValueError:
      pairs = ((),)
    if any(len(p) != 2 for p in pairs):
      raise ValueError(f"distill.layer_map={text!r}: write 'student:teacher' pairs, e.g. "
                       "'0:0,1:2,2:4,3:6' (0 = embeddings, i = layer i)")
  else:
    pairs = tuple((i, round(i * n_teacher / n_student)) for i in range(n_student + 1))
  for s, t in pairs:
    if not (0 <= s <= n_student and 0 <= t <= n_teacher):
      raise ValueError(f'distill.layer_map pair {s}:{t} is out of range (student 0..{n_student}, '
                       f'teacher 0..{n_teacher}; 0 = embeddings)')
  return pairs


def make_spec(dc, student, teacher) -> task_lib.Spec:
  alpha, temp = float(dc.alpha), float(dc.temperature)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'distill.alpha={alpha} must be in [0, 1]')
  if temp <= 0:
    raise ValueError(f'distill.temperature={temp} must be > 0')
  weights = {k: float(dc.get(k, 0.0) or 0.0) for k in
             ('cosine_weight', 'hidden_weight', 'attention_weight')}
  for k, v in weights.items():
    if v < 0:
      raise ValueError(f'distill.{k}={v} must be >= 0')
  if weights['attention_weight'] and student.num_heads != teacher.num_heads:
    raise ValueError(f'distill.attention_weight needs equal head counts (student '
                     f'{student.num_heads}, teacher {teacher.num_heads})')
  layer_map = parse_layer_map(dc.get('layer_map', ''), student.num_layers, teacher.num_layers)
  return task_lib.Spec(alpha=alpha, temperature=temp, layer_map=layer_map, **weights)


def student_config(cfg, teacher_mcfg, tokenizer, mode: str):
  """Architecture from init_from (a pretrained student) or the teacher's with
  distill.student.* overrides (0 = the teacher's; num_layers 0 = half the teacher's)."""
  if mode == 'init_from':
    base = finetune.resolve_model_config(
        types.SimpleNamespace(init_from=cfg.init_from, model=cfg.model), tokenizer)
  else:
    s = cfg.distill.student
    base = teacher_mcfg.replace(
        num_layers=int(s.num_layers) or max(teacher_mcfg.num_layers // 2, 1),
        hidden_size=int(s.hidden_size) or teacher_mcfg.hidden_size,
        num_heads=int(s.num_heads) or teacher_mcfg.num_heads,
        intermediate_size=int(s.intermediate_size) or teacher_mcfg.intermediate_size)
  mine = config_lib.model_config(cfg, vocab_size=len(tokenizer))
  return base.replace(**{k: getattr(mine, k) for k in (
      'hidden_dropout', 'attention_dropout', 'classifier_dropout', 'dtype', 'param_dtype',
      'remat')})


def resolve_mode(cfg, student_mcfg_fn, teacher_mcfg) -> str:
  mode = cfg.distill.get('student_init', 'auto') or 'auto'
  if mode not in init_distill.MODES:
    raise ValueError(f'distill.student_init={mode!r}; allowed: {init_distill.MODES}')
  if mode == 'init_from' and not cfg.init_from:
    raise ValueError('distill.student_init=init_from needs init_from (a student checkpoint)')
  if mode == 'auto':
    if cfg.init_from:
      return 'init_from'
    diff = init_distill.width_mismatch(student_mcfg_fn('teacher_every_k'), teacher_mcfg)
    mode = 'random' if diff else 'teacher_every_k'
    logging.info('distill.student_init=auto -> %s%s', mode, f' ({diff})' if diff else '')
  return mode


def record_student(cfg, mcfg, workdir: str):
  """config.json describes the student, so the workdir is a valid init_from / teacher."""
  for k, v in mcfg.to_dict().items():
    key = 'type' if k == 'model_type' else k
    if key in cfg.model:
      setattr(cfg.model, key, v)
  if jax.process_index() == 0:
    config_lib.save_config(cfg, workdir)


def student_def(mcfg, head, num_labels, seed: int, project_to: int | None) -> ModelDef:
  """The student; with `project_to`, a `distill_proj` Dense (student width -> teacher width,
  logical axes embed/embed_out) beside its own params, so the student's paths are unchanged."""
  def build():
    m = build_model(mcfg, head, num_labels=num_labels, seed=seed)
    if project_to:
      from flax import nnx
      setattr(m, task_lib.PROJ, Dense((mcfg.hidden_size,), (project_to,), ('embed', 'embed_out'),
                                      init_std=mcfg.initializer_range, dtype=mcfg.dtype,
                                      param_dtype=mcfg.param_dtype,
                                      rngs=nnx.Rngs(params=seed + 7)))
    return m
  return ModelDef.create(build)


def without_projection(params):
  return {k: v for k, v in params.items() if k != task_lib.PROJ}


# ------------------------------------------------------------------------ forward passes

def _inputs(arrays):
  return {k: v for k, v in arrays.items() if k in ('input_ids', 'attention_mask', 'token_type_ids')}


def forward_step(model_def, mesh, rules, shardings, output: str = 'logits'):
  """Jitted deterministic forward -> per-example `output` (for inference timing / logits)."""
  def evaluate(model, batch):
    out = model(batch['input_ids'], batch['attention_mask'], batch.get('token_type_ids'))
    return {'per_example': {output: out[output], 'index': batch['index'],
                            'valid': batch['valid']}}
  return make_eval_step(model_def, Task(head='', loss=None, evaluate=evaluate), mesh, rules,
                        shardings)


def predict_logits(fwd, params, arrays, batch_size: int, mesh, rules) -> np.ndarray:
  """Logits for every row of `arrays`, in order (the teacher-logits cache)."""
  batches = finetune.eval_fn(_inputs(arrays), batch_size)()
  return loop.evaluate(fwd, params, batches, mesh, rules,
                       lambda sums, per: finetune.ordered(per)['logits'])


def examples_per_sec(fwd, params, arrays, batch_size: int, mesh, rules, max_batches: int = 0):
  """Inference throughput of a jitted forward over device-resident batches (after a warm-up)."""
  from jaxft.train.step import global_batch
  padded = finetune.with_index(_inputs(arrays), batch_size)
  local = list(loader_lib.make_loader(padded, global_batch_size=batch_size, seed=0,
                                      shuffle=False, num_epochs=1, drop_remainder=True))
  if max_batches:
    local = local[:max_batches]
  batches = [global_batch(b, mesh, rules) for b in local]
  jax.block_until_ready(fwd(params, batches[0]))
  t0 = time.perf_counter()
  outs = [fwd(params, b) for b in batches]
  jax.block_until_ready(outs)
  return len(batches) * batch_size / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------- stage

def run(cfg, workdir: str) -> dict:
  dc = cfg.distill
  kind = dc.get('kind', 'cls')
  if kind not in KINDS:
    raise ValueError(f'distill.kind={kind!r}; allowed: {KINDS}')
  cache = bool(dc.get('cache_teacher', False))
  if cache and kind != 'cls':
    raise ValueError('distill.cache_teacher is for classification: MLM masks are drawn per '
                     'step, so there is no fixed input to precompute teacher logits for')
  tokenizer = teacher_lib.tokenizer_of(cfg.teacher, cfg.data.get('tokenizer', '') or '')
  max_len = int(cfg.data.get('max_len', 128))
  bs = int(cfg.train.batch_size)
  seed = int(cfg.seed)

  # Data (reused from fine-tuning / MLM pretraining).
  if kind == 'cls':
    train_arrays, info = finetune.load_split('cls', cfg.data, tokenizer, 'train')
    dev_arrays, dev_info = finetune.load_split('cls', cfg.data, tokenizer, 'dev')
    test_arrays, test_info = finetune.load_split('cls', cfg.data, tokenizer, 'test')
    num_labels, head = info['num_labels'], 'cls'
    n_train = len(train_arrays['input_ids'])
    if n_train < bs:
      raise ValueError(f'{n_train} training examples < train.batch_size={bs}')
    steps_per_epoch = max(n_train // bs, 1)
    if int(cfg.train.get('num_epochs', 0) or 0):
      cfg.train.num_steps = int(cfg.train.num_epochs) * steps_per_epoch
  else:
    train_arrays, dev_arrays, stats = lm_data.build_lm_data(cfg.data, tokenizer, workdir, 'bert')
    info, num_labels, head, steps_per_epoch = None, None, 'mlm', 0
    test_arrays = None

  teacher = teacher_lib.load_teacher(
      cfg.teacher, head, vocab_size=len(tokenizer), num_labels=num_labels,
      label_values=info['label_values'] if info and not info['is_regression'] else None,
      label_names=info['label_names'] if info and not info['is_regression'] else None,
      dtype=dc.get('teacher_dtype', '') or '', seed=seed)
  if max_len > teacher.mcfg.max_position_embeddings:
    raise ValueError(f'data.max_len={max_len} exceeds the teacher\'s max_position_embeddings='
                     f'{teacher.mcfg.max_position_embeddings}')
  mode = resolve_mode(cfg, lambda m: student_config(cfg, teacher.mcfg, tokenizer, m), teacher.mcfg)
  smcfg = student_config(cfg, teacher.mcfg, tokenizer, mode)
  if smcfg.vocab_size != teacher.mcfg.vocab_size:
    raise ValueError(f'student vocabulary {smcfg.vocab_size} != teacher {teacher.mcfg.vocab_size}:'
                     ' both read the same token ids (the teacher\'s tokenizer)')
  if mode == 'teacher_every_k':
    diff = init_distill.width_mismatch(smcfg, teacher.mcfg)
    if diff:
      raise ValueError(f'distill.student_init=teacher_every_k needs the teacher\'s widths: {diff}')
  spec = make_spec(dc, smcfg, teacher.mcfg)
  if cache and spec.features:
    raise ValueError('distill.cache_teacher stores logits only: cosine / hidden / attention '
                     'terms need the live teacher')
  needs_proj = ((spec.cosine_weight or spec.hidden_weight) and
                smcfg.hidden_size != teacher.mcfg.hidden_size)
  sdef = student_def(smcfg, head, num_labels, seed,
                     teacher.mcfg.hidden_size if needs_proj else None)

  if mode == 'teacher_every_k':
    layer_ids = init_distill.teacher_layers(teacher.mcfg.num_layers, smcfg.num_layers,
                                            dc.get('student_layers', '') or '')
    init_params, init_report = init_distill.from_teacher(teacher.params, sdef, layer_ids)
  elif mode == 'init_from':
    init_params, init_report = init_lib.load_init(cfg.init_from, sdef)
    init_report = dict(init_report, mode='init_from', path=cfg.init_from)
  else:
    init_params, init_report = None, {'mode': 'random'}

  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    save_tokenizer(tokenizer, os.path.join(workdir, 'tokenizer'), smcfg.max_position_embeddings)
    if kind == 'cls':
      with open(os.path.join(workdir, 'labels.json'), 'w') as f:
        json.dump({'kind': 'cls', 'label_names': info['label_names'],
                   'label_values': info.get('label_values', info['label_names']),
                   'is_regression': info['is_regression'], 'metric_names': info['metric_names'],
                   'main_metric': info['main_metric'], 'model': smcfg.to_dict()}, f, indent=2)
  record_student(cfg, smcfg, workdir)

  # The teacher on the loop's mesh (same config -> same mesh), by its own logical axes.
  mesh = partitioning.make_mesh(cfg.mesh)
  rules = partitioning.rules_from_config(cfg.mesh.get('rules', None))
  t_sh = teacher.model_def.param_shardings(mesh, rules)
  t_params = jax.device_put(teacher.params, t_sh)

  if kind == 'cls':
    eval_task = finetune.cls_task(num_labels, info['is_regression'])
    summarize = finetune.cls_summarizer(dev_info) if dev_arrays is not None else None
    eval_batches = finetune.eval_fn(dev_arrays, bs)
    output = 'logits'
  else:
    eval_task = pretrain.mlm_task(smcfg, tokenizer, cfg.mlm)
    summarize = pretrain.summarize_lm
    eval_batches = pretrain.eval_batches_fn(dev_arrays, bs, seed)
    output = 'last_hidden_state'
  speed = bool(dc.get('measure_speed', True)) and dev_arrays is not None
  speed_batches = int(dc.get('speed_batches', 0) or 0)

  t_results = {'path': cfg.teacher, 'params': teacher.num_params,
               'layers': teacher.mcfg.num_layers, 'hidden_size': teacher.mcfg.hidden_size,
               'dtype': np.dtype(teacher.mcfg.param_dtype).name}
  if eval_batches is not None:
    t_eval = make_eval_step(teacher.model_def, eval_task, mesh, rules, t_sh)
    t_results['dev'] = loop.evaluate(t_eval, t_params, eval_batches(), mesh, rules, summarize)
    logging.info('teacher dev: %s', t_results['dev'])
  t_fwd = forward_step(teacher.model_def, mesh, rules, t_sh, output)
  if speed:
    t_results['examples_per_sec'] = examples_per_sec(t_fwd, t_params, dev_arrays, bs, mesh, rules,
                                                     speed_batches)

  cache_info = None
  if cache:
    path = teacher_lib.cache_path(workdir, teacher, train_arrays)
    logits, hit = teacher_lib.cached_logits(
        path, len(train_arrays['input_ids']),
        lambda: predict_logits(t_fwd, t_params, train_arrays, bs, mesh, rules))
    train_arrays = dict(train_arrays, teacher_logits=logits.astype(np.float32))
    cache_info = {'path': path, 'hit': hit}
    jax.tree.map(lambda x: x.delete(), t_params)  # the step never sees the teacher
    t_params = None

  if kind == 'cls':
    task = task_lib.cls_task(num_labels, info['is_regression'], spec, teacher.model_def,
                             cached=cache)
    es = cfg.train.early_stopping
    if not es.metric and dev_arrays is not None:
      es.metric = info['main_metric']
      es.mode = 'min' if info['main_metric'] == 'loss' else 'max'
  else:
    task = task_lib.mlm_task(smcfg, tokenizer, cfg.mlm, spec, teacher.model_def)
  train_fields = {k: v for k, v in train_arrays.items() if k != 'word_ids'}
  data = loop.Data(train_iter=loader_lib.make_loader(train_fields, global_batch_size=bs, seed=seed),
                   eval_batches=eval_batches, summarize=summarize,
                   steps_per_epoch=steps_per_epoch)

  def on_end(state, eval_step, mesh_, rules_):
    params = state['params']
    s_results = {'params': count_params(without_projection(params)),
                 'projection_params': count_params(params) - count_params(
                     without_projection(params)),
                 'layers': smcfg.num_layers, 'hidden_size': smcfg.hidden_size,
                 'init': init_report}
    if eval_batches is not None:
      s_results['dev'] = loop.evaluate(eval_step, params, eval_batches(), mesh_, rules_,
                                       summarize)
    if speed:
      fwd = forward_step(sdef, mesh_, rules_, jax.tree.map(lambda x: x.sharding, params), output)
      s_results['examples_per_sec'] = examples_per_sec(fwd, params, dev_arrays, bs, mesh_,
                                                       rules_, speed_batches)
    out = {'student': s_results, 'steps_per_epoch': steps_per_epoch}
    if kind == 'cls':
      out['labels'] = info['label_names']
      if test_arrays is not None and test_info.get('has_labels'):
        out['test'] = loop.evaluate(eval_step, params, finetune.eval_fn(test_arrays, bs)(),
                                    mesh_, rules_, finetune.cls_summarizer(test_info))
    return out

  extra_results = {'teacher': t_results, 'distill': {
      'kind': kind, 'alpha': spec.alpha, 'temperature': spec.temperature,
      'cosine_weight': spec.cosine_weight, 'hidden_weight': spec.hidden_weight,
      'attention_weight': spec.attention_weight,
      'layer_map': [list(p) for p in spec.layer_map] if (spec.hidden_states or spec.attentions)
      else None,
      'student_init': mode, 'cache': cache_info}}
  if kind == 'mlm':
    extra_results['data'] = {k: v for k, v in stats.items() if 'path' not in k}
  results = loop.train(cfg, workdir, sdef, task, data, init_params=init_params,
                       extra_results=extra_results, on_end=on_end, extra=t_params)
  if jax.process_index() == 0 and 'student' in results:
    print(format_table(results))
  if cfg.export.hf and not results['preempted']:
    pretrain.export_hf(without_projection(results['state']['params']), smcfg, head, workdir,
                       tokenizer, id2label=dict(enumerate(info['label_names']))
                       if kind == 'cls' and info['label_names'] else None)
  results['teacher_state'] = t_params  # device params (None when cached); not in results.json
  return results


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
    lines.append(f"| {label} | {r['layers']} | {r['params']:,} | "
                 f"{_main_metric(r.get('dev'))[1]:.4f} | {eps:.1f} |" if eps else
                 f"| {label} | {r['layers']} | {r['params']:,} | "
                 f"{_main_metric(r.get('dev'))[1]:.4f} | - |")
  return '\n'.join(lines)

"""Stages `finetune_cls` (GLUE-style sequence classification / regression) and `finetune_ner`.

Init from a jaxft workdir (its best, else latest checkpoint) or a Hugging Face directory:
architecture comes from there, training-time settings (dropout, dtypes) from this config.
The loop validates every `train.eval_every` steps and at each epoch end, keeps the best
checkpoints by the task's main metric, stops early with patience, and at the end scores
the best parameters on the test split when it has labels.
"""
from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxft import config as config_lib
from jaxft import peft
from jaxft.data import loader as loader_lib
from jaxft.data import classification
from jaxft.data import ner
from jaxft.data import splits
from jaxft.data.tokenizer import load_tokenizer, save_tokenizer
from jaxft.models import build_model
from jaxft.models.config import ModelConfig
from jaxft.train import init as init_lib
from jaxft.train import loop
from jaxft.train import metrics as metrics_lib
from jaxft.train.state import ModelDef
from jaxft.train.step import Task, cross_entropy_sums

ARCH_FIELDS = ('model_type', 'vocab_size', 'hidden_size', 'num_layers', 'num_heads',
               'intermediate_size', 'max_position_embeddings', 'type_vocab_size',
               'layer_norm_eps', 'hidden_act', 'pad_token_id', 'initializer_range')


# ------------------------------------------------------------------------ model & tokenizer

def resolve_tokenizer(cfg):
  """The tokenizer saved with init_from (HF dir or jaxft workdir) if it has one, since the
  weights were trained with it; else data.tokenizer."""
  if cfg.init_from:
    for cand in (os.path.join(cfg.init_from, 'tokenizer'), cfg.init_from):
      if any(os.path.exists(os.path.join(cand, f)) for f in
             ('tokenizer.json', 'vocab.txt', 'vocab.json')):
        return load_tokenizer(cand)
  path = cfg.data.get('tokenizer', '') or ''
  if not path:
    raise ValueError('no tokenizer: set data.tokenizer, or init_from a directory that has one')
  return load_tokenizer(path)


def resolve_model_config(cfg, tokenizer) -> ModelConfig:
  """Architecture from init_from when given; dropout/dtype/remat from cfg.model."""
  mine = config_lib.model_config(cfg, vocab_size=len(tokenizer))
  src = cfg.init_from
  if not src:
    return mine
  if init_lib.is_jaxft_workdir(src):
    theirs = dict(init_lib.workdir_config(src)['model'])
    vocab = theirs.get('vocab_size') or len(load_tokenizer(os.path.join(src, 'tokenizer')))
    theirs['vocab_size'] = vocab
    base = ModelConfig.from_config_dict(theirs)
  elif init_lib.is_hf_dir(src):
    from jaxft.models import hf
    base = hf.load_hf_config(src)
  else:
    raise FileNotFoundError(f'init_from={src!r} is neither a jaxft workdir nor an HF directory')
  return base.replace(**{k: getattr(mine, k) for k in (
      'hidden_dropout', 'attention_dropout', 'classifier_dropout', 'dtype', 'param_dtype',
      'remat')})


def layer_index(name: str) -> int | None:
  m = re.search(r'\.layers\.(\d+)\.', name + '.')
  return int(m.group(1)) if m else None


def is_embedding(name: str) -> bool:
  return name.startswith(('bert.embeddings.', 'transformer.wte.', 'transformer.wpe.'))


def trainable_mask(cfg, abstract_params):
  """Bool tree: frozen embeddings / lowest N layers / path patterns (finetune.*)."""
  ft = cfg.get('finetune', {})
  freeze_emb = bool(ft.get('freeze_embeddings', False))
  freeze_n = int(ft.get('freeze_layers', 0) or 0)
  patterns = [re.compile(p) for p in (ft.get('freeze_patterns', ()) or ())]
  if not (freeze_emb or freeze_n or patterns):
    return None

  def f(path, _):
    name = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    if freeze_emb and is_embedding(name):
      return False
    li = layer_index(name)
    if li is not None and li < freeze_n:
      return False
    return not any(p.search(name) for p in patterns)

  return jax.tree_util.tree_map_with_path(f, abstract_params)


def layerwise_lr_scale(cfg, abstract_params, num_layers: int):
  """ELECTRA-style layer-wise LR decay: layer i gets decay**(L - i), embeddings decay**(L+1)."""
  decay = float(cfg.get('finetune', {}).get('layerwise_lr_decay', 1.0) or 1.0)
  if decay == 1.0:
    return None

  def f(path, _):
    name = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    if is_embedding(name):
      return decay ** (num_layers + 1)
    li = layer_index(name)
    return decay ** (num_layers - li) if li is not None else 1.0

  return jax.tree_util.tree_map_with_path(f, abstract_params)


# ------------------------------------------------------------------------------- tasks

def _rngs(rng, deterministic):
  return None if deterministic else nnx.Rngs(dropout=rng)


def _inputs(batch):
  return batch['input_ids'], batch['attention_mask'], batch.get('token_type_ids')


def cls_task(num_labels: int, is_regression: bool, *, label_smoothing: float = 0.0) -> Task:
  def loss(model, batch, rng, deterministic):
    logits = model(*_inputs(batch), deterministic=deterministic,
                   rngs=_rngs(rng, deterministic))['logits']
    w = batch.get('weights', jnp.ones(logits.shape[:1], jnp.float32)).astype(jnp.float32)
    if is_regression:
      err = jnp.square(logits[:, 0] - batch['labels'].astype(jnp.float32))
      return (err * w).sum(), {'weight': w.sum()}
    loss_sum, wsum, correct = cross_entropy_sums(logits, batch['labels'], w, label_smoothing)
    return loss_sum, {'weight': wsum, 'accuracy_sum': correct}

  def evaluate(model, batch):
    logits = model(*_inputs(batch))['logits']
    valid = batch['valid'].astype(jnp.float32)
    if is_regression:
      loss_sum = (jnp.square(logits[:, 0] - batch['labels'].astype(jnp.float32)) * valid).sum()
    else:
      loss_sum, _, _ = cross_entropy_sums(logits, batch['labels'], valid)
    return {'loss_sum': loss_sum, 'weight': valid.sum(),
            'per_example': {'logits': logits, 'labels': batch['labels'],
                            'index': batch['index'], 'valid': batch['valid']}}

  return Task(head='cls', loss=loss, evaluate=evaluate, num_labels=num_labels)


def ner_task(num_labels: int, *, label_smoothing: float = 0.0) -> Task:
  def loss(model, batch, rng, deterministic):
    logits = model(*_inputs(batch), deterministic=deterministic,
                   rngs=_rngs(rng, deterministic))['logits']
    w = (batch['labels'] != splits.IGNORE_INDEX).astype(jnp.float32)
    if 'weights' in batch:
      w = w * batch['weights'].astype(jnp.float32)
    loss_sum, wsum, correct = cross_entropy_sums(logits, batch['labels'], w, label_smoothing)
    return loss_sum, {'weight': wsum, 'accuracy_sum': correct}

  def evaluate(model, batch):
    logits = model(*_inputs(batch))['logits']
    w = ((batch['labels'] != splits.IGNORE_INDEX) & (batch['valid'][:, None] > 0))
    loss_sum, wsum, _ = cross_entropy_sums(logits, batch['labels'], w.astype(jnp.float32))
    return {'loss_sum': loss_sum, 'weight': wsum,
            'per_example': {'pred': jnp.argmax(logits, -1).astype(jnp.int32),
                            'index': batch['index'], 'valid': batch['valid']}}

  return Task(head='token_cls', loss=loss, evaluate=evaluate, num_labels=num_labels)


# -------------------------------------------------------------------------- data plumbing

def with_index(arrays, batch_size: int):
  """Pad to a multiple of batch_size with `valid`=0 rows and number rows by `index`, so eval
  covers every example exactly once whatever the batch and process layout."""
  n = len(arrays['input_ids'])
  total = max(batch_size, math.ceil(n / batch_size) * batch_size)
  out = {}
  for k, v in arrays.items():
    pad = np.zeros((total - n,) + v.shape[1:], v.dtype)
    if k == 'labels' and v.ndim == 2:
      pad[:] = splits.IGNORE_INDEX
    out[k] = np.concatenate([v, pad])
  out['valid'] = np.concatenate([np.ones(n, np.int32), np.zeros(total - n, np.int32)])
  out['index'] = np.arange(total, dtype=np.int32)
  return out


def ordered(per_example: dict) -> dict:
  """Per-example outputs sorted back into dataset order, padding rows dropped."""
  order = np.argsort(per_example['index'], kind='stable')
  keep = per_example['valid'][order] > 0
  return {k: v[order][keep] for k, v in per_example.items()}


def eval_fn(arrays, batch_size: int):
  if arrays is None:
    return None
  padded = with_index({k: v for k, v in arrays.items() if k != 'word_ids' and k != 'weights'},
                      batch_size)
  return lambda: loader_lib.make_loader(padded, global_batch_size=batch_size, seed=0,
                                        shuffle=False, num_epochs=1, drop_remainder=True)


def cls_summarizer(info):
  def summarize(sums, per):
    per = ordered(per)
    out = {'loss': sums['loss_sum'] / max(sums['weight'], 1e-9)}
    logits = per['logits']
    preds = logits[:, 0] if info['is_regression'] else logits
    out.update(metrics_lib.glue_metrics(info['metric_names'], preds, per['labels']))
    return out
  return summarize


def ner_summarizer(info, word_ids):
  def summarize(sums, per):
    per = ordered(per)
    tags = ner.predictions_to_tags(per['pred'], word_ids, info['label_names'],
                                         info['num_words'])
    out = {'loss': sums['loss_sum'] / max(sums['weight'], 1e-9)}
    m = metrics_lib.ner_metrics(tags, info['tags'])
    out.update({k: v for k, v in m.items() if '/' not in k or k.split('/')[0] not in
                ('micro', 'macro', 'weighted')})
    return out
  return summarize


def load_split(kind, data_cfg, tokenizer, split):
  """(arrays, info) of one split, or (None, None) when an eval/test file is absent."""
  loader = classification.load_cls_split if kind == 'cls' else ner.load_ner_split
  # ConfigDict fields are typed, so "unset" is '' in configs; the readers expect None.
  data_cfg = {k: (None if isinstance(v, str) and not v else v) for k, v in data_cfg.items()}
  try:
    return loader(data_cfg, tokenizer, split)
  except FileNotFoundError:
    if split == 'train':
      raise
    return None, None


# ---------------------------------------------------------------------------------- stage

def run(cfg, workdir: str) -> dict:
  kind = 'cls' if cfg.stage == 'finetune_cls' else 'ner'
  tokenizer = resolve_tokenizer(cfg)
  mcfg = resolve_model_config(cfg, tokenizer)
  max_len = int(cfg.data.get('max_len', 128))
  if max_len > mcfg.max_position_embeddings:
    raise ValueError(f'data.max_len={max_len} exceeds the model\'s max_position_embeddings='
                     f'{mcfg.max_position_embeddings}')
  if len(tokenizer) > mcfg.vocab_size:
    raise ValueError(f'the tokenizer has {len(tokenizer)} tokens but the model vocabulary has '
                     f'{mcfg.vocab_size}: use the tokenizer the model was trained with')
  if kind == 'ner' and mcfg.model_type != 'bert':
    raise ValueError('finetune_ner supports model.type=bert')

  train_arrays, info = load_split(kind, cfg.data, tokenizer, 'train')
  dev_arrays, dev_info = load_split(kind, cfg.data, tokenizer, 'dev')
  test_arrays, test_info = load_split(kind, cfg.data, tokenizer, 'test')
  num_labels = info['num_labels']
  label_names = info['label_names']
  n_train = len(train_arrays['input_ids'])
  bs = int(cfg.train.batch_size)
  if n_train < bs:
    raise ValueError(f'{n_train} training examples < train.batch_size={bs}')
  steps_per_epoch = max(n_train // bs, 1)
  if int(cfg.train.get('num_epochs', 0) or 0):
    cfg.train.num_steps = int(cfg.train.num_epochs) * steps_per_epoch
    logging.info('train.num_epochs=%d x %d steps per epoch -> %d steps (config.json keeps the '
                 'requested config)', int(cfg.train.num_epochs), steps_per_epoch,
                 cfg.train.num_steps)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    save_tokenizer(tokenizer, os.path.join(workdir, 'tokenizer'), mcfg.max_position_embeddings)
    with open(os.path.join(workdir, 'labels.json'), 'w') as f:
      json.dump({'kind': kind, 'label_names': label_names, 'label_values': info.get(
          'label_values', label_names), 'is_regression': info.get('is_regression', False),
                 'metric_names': info['metric_names'], 'main_metric': info['main_metric'],
                 'model': mcfg.to_dict()}, f, indent=2)

  head = 'cls' if kind == 'cls' else 'token_cls'
  model_def = ModelDef.create(lambda: build_model(mcfg, head, num_labels=num_labels,
                                                  seed=int(cfg.seed)))
  init_params, report = None, None
  if cfg.init_from:
    init_params, report = init_lib.load_init(cfg.init_from, model_def)
    logging.info('init_from %s: %d tensors loaded; new task head/params: %s; dropped: %s',
                 cfg.init_from, report['loaded'], report['missing'], report['unused'])

  # Imbalanced labels: data.class_balance='weights' adds per-example `weights` (used by the
  # losses), 'resample' rebalances the train split itself.
  ls = float(cfg.get('finetune', {}).get('label_smoothing', 0.0) or 0.0)
  task = (cls_task(num_labels, info['is_regression'], label_smoothing=ls)
          if kind == 'cls' else ner_task(num_labels, label_smoothing=ls))

  trainable = trainable_mask(cfg, model_def.abstract_params)
  peft_parts = peft.setup(cfg, model_def, init_params, trainable,
                          fresh=report['missing'] if report else ())
  if peft_parts is not None:
    model_def, init_params, trainable = peft_parts
  lr_scale = layerwise_lr_scale(cfg, model_def.abstract_params, mcfg.num_layers)

  es = cfg.train.early_stopping
  if not es.metric and dev_arrays is not None:
    es.metric = info['main_metric']
    es.mode = 'min' if info['main_metric'] == 'loss' else 'max'

  train_fields = {k: v for k, v in train_arrays.items() if k != 'word_ids'}
  data = loop.Data(
      train_iter=loader_lib.make_loader(train_fields, global_batch_size=bs, seed=int(cfg.seed)),
      eval_batches=eval_fn(dev_arrays, bs),
      summarize=(cls_summarizer(dev_info) if kind == 'cls' else
                 ner_summarizer(dev_info, dev_arrays['word_ids'])) if dev_arrays is not None
      else None,
      steps_per_epoch=steps_per_epoch)

  def on_end(state, eval_step, mesh, rules):
    out = {'labels': label_names, 'init_report': report,
           'steps_per_epoch': steps_per_epoch}
    if test_arrays is not None and test_info.get('has_labels'):
      summarize = (cls_summarizer(test_info) if kind == 'cls' else
                   ner_summarizer(test_info, test_arrays['word_ids']))
      out['test'] = loop.evaluate(eval_step, state['params'], eval_fn(test_arrays, bs)(), mesh,
                                  rules, summarize)
      logging.info('test: %s', out['test'])
    return out

  results = loop.train(cfg, workdir, model_def, task, data, init_params=init_params,
                       trainable=trainable, lr_scale=lr_scale, on_end=on_end)
  final = results.get('final', {})
  main = f"eval/{info['main_metric']}"
  if main in final and jax.process_index() == 0:
    best = results.get('best', {})
    print(f"{cfg.stage}: dev {info['main_metric']} = {final[main]:.4f} (last), "
          f"{best.get('value', float('nan')):.4f} (best, step {best.get('step')})")
  params = results['state']['params']
  if peft_parts is not None and not results['preempted']:
    out = peft.save_checkpoint(cfg, params, trainable, workdir,
                               extra={'init_from': cfg.init_from, 'head': head,
                                      'model': mcfg.to_dict(), 'labels': label_names})
    logging.info('saved the PEFT weights to %s', out)
  if cfg.export.hf and not results['preempted']:
    from jaxft.train.pretrain import export_hf
    if peft_parts is not None and not peft.exportable(cfg):
      logging.warning('peft.method=%s cannot be merged into a plain Hugging Face model: no '
                      'export/ (the PEFT weights are in %s)', cfg.peft.method,
                      peft.checkpoint_dir(workdir, peft.config(cfg)))
    else:
      if peft_parts is not None:
        params = peft.merged_params(cfg, params)
      export_hf(params, mcfg, head, workdir, tokenizer,
                id2label=dict(enumerate(label_names)) if label_names else None)
  return results

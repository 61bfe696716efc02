"""Prompt-based classification with the MLM head (PET-style cloze).

An example becomes a cloze sentence through a template, e.g. "{text} It was [MASK].", and
each label owns one or more verbalizer words (sst2: negative -> terrible, bad; positive ->
great, good). The label score is the log-sum-exp of the MLM logits of its words at the
mask position, so a pretrained MLM classifies with no new parameters (zero-shot), and
few-shot training is cross-entropy over those label scores (PET), full or with LoRA
(`peft.method=lora`): the MLM head is reused instead of a fresh classifier, which is why
this works with a handful of examples.

  python -m jaxft.peft.cloze --config configs/peft_cloze.py:sst2 --config.init_from=MLM_DIR \\
      --workdir /tmp/cloze [--config.cloze.num_shots=16] [--config.peft.method=lora]

`init_from` must carry a pretrained MLM head (a jaxft pretrain_mlm workdir or an HF
BertForMaskedLM directory): a missing head would make the zero-shot scores random.
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxft.train.step import Task, cross_entropy_sums

MLM_HEAD = ('mlm_dense.', 'mlm_ln.', 'mlm_bias')


# ------------------------------------------------------------------------------ verbalizer

def parse_verbalizer(spec, label_names: Sequence[str], label_values: Sequence[str] = ()
                     ) -> list[list[str]]:
  """Words per class index from 'negative:terrible,bad;positive:great,good' (or a dict).

  Keys may be label names or raw label values; every label needs at least one word."""
  if isinstance(spec, str):
    pairs = [p.split(':', 1) for p in spec.split(';') if p.strip()]
    if any(len(p) != 2 for p in pairs):
      raise ValueError(f"cloze.verbalizer={spec!r}: expected 'label:word,word;label:word'")
    mapping = {k.strip(): [w.strip() for w in v.split(',') if w.strip()] for k, v in pairs}
  else:
    mapping = {str(k): ([v] if isinstance(v, str) else list(v)) for k, v in dict(spec).items()}
  out = []
  values = list(label_values) or list(label_names)
  for name, value in zip(label_names, values):
    words = mapping.get(name, mapping.get(str(value)))
    if not words:
      raise ValueError(f'cloze.verbalizer has no word for label {name!r} (value {value!r}); '
                       f'labels: {list(label_names)}')
    out.append(words)
  unknown = set(mapping) - set(label_names) - {str(v) for v in values}
  if unknown:
    raise ValueError(f'cloze.verbalizer names unknown labels {sorted(unknown)}; labels: '
                     f'{list(label_names)}')
  return out


def verbalizer_ids(words: Sequence[Sequence[str]], tokenizer) -> np.ndarray:
  """[C, W] token ids (-1 = padding); each word must be a single token of the vocabulary."""
  ids = []
  unk = tokenizer.unk_token_id
  for ws in words:
    row = []
    for w in ws:
      tid = tokenizer.convert_tokens_to_ids(w)
      if tid is None or tid == unk:
        enc = tokenizer(w, add_special_tokens=False)['input_ids']
        tid = enc[0] if len(enc) == 1 else None
      if tid is None or tid == unk:
        raise ValueError(f'verbalizer word {w!r} is not a single token of the vocabulary '
                         f'(it tokenizes to {tokenizer.tokenize(w)}); pick another word')
      row.append(int(tid))
    ids.append(row)
  width = max(len(r) for r in ids)
  return np.asarray([r + [-1] * (width - len(r)) for r in ids], np.int32)


def label_scores(logits, ids):
  """logits [..., V], ids [C, W] -> [..., C]: log-sum-exp of each label's word logits."""
  ids = jnp.asarray(ids)
  g = jnp.take(logits.astype(jnp.float32), jnp.maximum(ids, 0), axis=-1)  # [..., C, W]
  g = jnp.where(ids >= 0, g, -jnp.inf)
  return jax.nn.logsumexp(g, axis=-1)


# ------------------------------------------------------------------------------- encoding

def encode(texts: Sequence[str], template: str, tokenizer, max_len: int,
           pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Cloze inputs [N, max_len] plus `mask_pos` [N]. The template's literal parts are kept
  whole; only {text} (and {pair}) are truncated to fit, so the mask is never cut off."""
  mask = tokenizer.mask_token
  if mask is None:
    raise ValueError('cloze needs a tokenizer with a mask token ([MASK])')
  template = template.replace('{mask}', mask).replace('[MASK]', mask)
  if '{text}' not in template or template.count(mask) != 1:
    raise ValueError(f'cloze.template={template!r} needs {{text}} and exactly one mask '
                     f'({mask!r} or {{mask}})')
  if '{pair}' in template and pairs is None:
    raise ValueError('cloze.template uses {pair} but the task has no second text column')
  parts = re.split(r'(\{text\}|\{pair\})', template)
  lit = lambda s: tokenizer(s, add_special_tokens=False)['input_ids'] if s.strip() else []
  literal = [lit(p) if p not in ('{text}', '{pair}') else None for p in parts]
  # The tokenizer's own special tokens around a single sequence ([CLS] ... [SEP] for BERT).
  framed = tokenizer(mask, add_special_tokens=True)['input_ids']
  at = framed.index(tokenizer.mask_token_id)
  prefix, suffix = framed[:at], framed[at + 1:]
  fixed = sum(len(x) for x in literal if x is not None) + len(prefix) + len(suffix)
  budget = max_len - fixed
  if budget < 1:
    raise ValueError(f'data.max_len={max_len} leaves no room for text after the template '
                     f'({fixed} tokens)')
  enc = lambda xs: tokenizer(list(xs), add_special_tokens=False)['input_ids']
  text_ids = enc(texts)
  pair_ids = enc(pairs) if '{pair}' in template else None
  n = len(texts)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  out = {'input_ids': np.full((n, max_len), pad, np.int32),
         'attention_mask': np.zeros((n, max_len), np.int32),
         'token_type_ids': np.zeros((n, max_len), np.int32),
         'mask_pos': np.zeros((n,), np.int32)}
  mask_id = tokenizer.mask_token_id
  for i in range(n):
    a, b = list(text_ids[i]), list(pair_ids[i]) if pair_ids is not None else []
    while len(a) + len(b) > budget:  # longest first, like HF 'longest_first'
      (a if len(a) >= len(b) else b).pop()
    body = []
    for p, x in zip(parts, literal):
      body += x if x is not None else (a if p == '{text}' else b)
    ids = prefix + body + suffix
    out['input_ids'][i, :len(ids)] = ids
    out['attention_mask'][i, :len(ids)] = 1
    out['mask_pos'][i] = ids.index(mask_id)
  return out


# ----------------------------------------------------------------------------------- task

def cloze_task(ids: np.ndarray) -> Task:
  """Head 'mlm'; loss = CE over the label scores at the mask position."""
  def scores(model, batch, deterministic, rng):
    out = model(batch['input_ids'], batch['attention_mask'], batch.get('token_type_ids'),
                deterministic=deterministic,
                rngs=None if deterministic else nnx.Rngs(dropout=rng),
                masked_positions=batch['mask_pos'][:, None])
    return label_scores(out['logits'][:, 0], ids)

  def loss(model, batch, rng, deterministic):
    s = scores(model, batch, deterministic, rng)
    w = batch.get('weights', jnp.ones(s.shape[:1], jnp.float32)).astype(jnp.float32)
    loss_sum, wsum, correct = cross_entropy_sums(s, batch['labels'], w)
    return loss_sum, {'weight': wsum, 'accuracy_sum': correct}

  def evaluate(model, batch):
    s = scores(model, batch, True, None)
    valid = batch['valid'].astype(jnp.float32)
    loss_sum, _, _ = cross_entropy_sums(s, batch['labels'], valid)
    return {'loss_sum': loss_sum, 'weight': valid.sum(),
            'per_example': {'logits': s, 'labels': batch['labels'], 'index': batch['index'],
                            'valid': batch['valid']}}

  return Task(head='mlm', loss=loss, evaluate=evaluate, num_labels=int(ids.shape[0]))


def predict(model, arrays: dict, ids: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Label scores [N, C] of an MLM `model` (an nnx module) on `encode`d arrays."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, batch):
    m = nnx.merge(graphdef, state)
    out = m(batch['input_ids'], batch['attention_mask'], batch.get('token_type_ids'),
            masked_positions=batch['mask_pos'][:, None])
    return label_scores(out['logits'][:, 0], ids)

  n = len(arrays['input_ids'])
  outs = []
  for s in range(0, n, batch_size):
    batch = {k: v[s:s + batch_size] for k, v in arrays.items() if k != 'labels'}
    outs.append(np.asarray(run(state, batch)))
  return np.concatenate(outs) if outs else np.zeros((0, ids.shape[0]), np.float32)


# ----------------------------------------------------------------------------------- data

def read_split(data_cfg, split: str):
  """(texts, pairs or None, labels [N] int, label_names, label_values) of one split."""
  from jaxft.data import classification
  from jaxft.data import splits
  data_cfg = {k: (None if isinstance(v, str) and not v else v) for k, v in data_cfg.items()}
  s = classification.cls_settings(data_cfg)
  if s['is_regression']:
    raise ValueError('cloze classification needs class labels, not a regression task')
  labels, hf_names = s['labels'], None
  if labels is None:
    train_ex, _, hf_names = classification.read_cls_split(data_cfg, s, 'train', None, True)
    labels = hf_names or classification.sort_labels(train_ex.labels)
  ex, _, names = classification.read_cls_split(data_cfg, s, splits.normalize_split(split),
                                           labels, require_labels=True)
  values = list(names or labels)
  task = s['task']
  label_names = (list(task.label_names) if task and values == list(task.label_values)
                 else values)
  return ex.texts, ex.pairs, np.asarray(ex.labels, np.int32), label_names, values


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """`shots` examples per class, drawn without replacement with `seed` (sorted)."""
  rng = np.random.RandomState(seed)
  out = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if len(idx) < shots:
      raise ValueError(f'class {c} has {len(idx)} training examples < cloze.num_shots={shots}')
    out.append(rng.choice(idx, shots, replace=False))
  return np.sort(np.concatenate(out))


# ---------------------------------------------------------------------------------- stage

def _summarizer(metric_names, with_predictions: bool):
  from jaxft.train import finetune
  from jaxft.train import metrics as metrics_lib

  def summarize(sums, per):
    per = finetune.ordered(per)
    out = {'loss': sums['loss_sum'] / max(sums['weight'], 1e-9)}
    out.update(metrics_lib.glue_metrics(metric_names, per['logits'], per['labels']))
    if with_predictions:
      out['predictions'] = per['logits'].argmax(-1).astype(int).tolist()
    return out
  return summarize


def run(cfg, workdir: str) -> dict:
  """Zero-shot cloze evaluation of init_from, then (cloze.num_shots > 0) few-shot PET
  training of it, full or PEFT (cfg.peft), evaluated the same way. Writes
  workdir/results.json ({'zero_shot', 'few_shot'}) and returns it."""
  from jaxft import partitioning, peft
  from jaxft.data import loader as loader_lib
  from jaxft.models import build_model
  from jaxft.train import finetune, loop
  from jaxft.train import init as init_lib
  from jaxft.train import step as step_lib
  from jaxft.train.state import ModelDef

  cc = cfg.cloze
  if not cfg.init_from:
    raise ValueError('cloze needs init_from: a pretrained MLM (jaxft workdir or HF directory)')
  tokenizer = finetune.resolve_tokenizer(cfg)
  mcfg = finetune.resolve_model_config(cfg, tokenizer)
  if mcfg.model_type != 'bert':
    raise ValueError(f'cloze needs a BERT masked LM, got model type {mcfg.model_type!r}')
  max_len = int(cfg.data.max_len)
  texts, pairs, labels, names, values = read_split(cfg.data, cc.eval_split)
  ids = verbalizer_ids(parse_verbalizer(cc.verbalizer, names, values), tokenizer)
  if int(cc.get('max_eval', 0) or 0):
    texts, labels = texts[:cc.max_eval], labels[:cc.max_eval]
    pairs = pairs[:cc.max_eval] if pairs is not None else None
  dev = encode(texts, cc.template, tokenizer, max_len, pairs)
  dev['labels'] = labels
  metric_names = ['accuracy', 'f1'] if len(names) == 2 else ['accuracy', 'f1_macro']

  model_def = ModelDef.create(lambda: build_model(mcfg, 'mlm', seed=int(cfg.seed)))
  init_params, report = init_lib.load_init(cfg.init_from, model_def)
  head_missing = [n for n in report['missing'] if n.startswith(MLM_HEAD)]
  if head_missing:
    raise ValueError(f'init_from={cfg.init_from!r} has no pretrained MLM head (missing '
                     f'{head_missing}): cloze scoring would be random. Use a pretrain_mlm '
                     'workdir or a BertForMaskedLM checkpoint')
  task = cloze_task(ids)
  bs = int(cfg.train.batch_size)
  results = {'template': cc.template, 'verbalizer': dict(zip(names, map(list, parse_verbalizer(
      cc.verbalizer, names, values)))), 'labels': names, 'n_eval': len(texts)}

  mesh = partitioning.make_mesh(cfg.mesh)
  rules = partitioning.rules_from_config(cfg.mesh.get('rules', None))
  p_sh = model_def.param_shardings(mesh, rules)
  params = jax.device_put(init_params, p_sh)
  eval_step = step_lib.make_eval_step(model_def, task, mesh, rules, p_sh)
  zs = loop.evaluate(eval_step, params, finetune.eval_fn(dev, bs)(), mesh, rules,
                     _summarizer(metric_names, True))
  results['zero_shot'] = zs
  logging.info('cloze zero-shot on %s: %s', cc.eval_split,
               {k: v for k, v in zs.items() if k != 'predictions'})
  del params

  shots = int(cc.get('num_shots', 0) or 0)
  if shots:
    tr_texts, tr_pairs, tr_labels, _, _ = read_split(cfg.data, 'train')
    idx = few_shot_indices(tr_labels, shots, int(cfg.seed))
    train = encode([tr_texts[i] for i in idx], cc.template, tokenizer, max_len,
                   [tr_pairs[i] for i in idx] if tr_pairs is not None else None)
    train['labels'] = tr_labels[idx]
    if len(idx) < bs:
      raise ValueError(f'{len(idx)} few-shot examples < train.batch_size={bs}')
    parts = peft.setup(cfg, model_def, init_params, None, fresh=report['missing'])
    fdef, finit, trainable = parts if parts else (model_def, init_params, None)
    data = loop.Data(train_iter=loader_lib.make_loader(train, global_batch_size=bs,
                                                       seed=int(cfg.seed)),
                     eval_batches=finetune.eval_fn(dev, bs),
                     summarize=_summarizer(metric_names, False))
    fs = loop.train(cfg, os.path.join(workdir, 'few_shot'), fdef, task, data,
                    init_params=finit, trainable=trainable)
    results['few_shot'] = {'shots_per_class': shots, 'n_train': int(len(idx)),
                           'peft': cfg.peft.method, 'trainable_params': fs['trainable_params'],
                           'trainable_percent': fs['trainable_percent'],
                           **{k.removeprefix('eval/'): v for k, v in fs['final'].items()}}
    if parts is not None:
      peft.save_checkpoint(cfg, fs['state']['params'], trainable,
                           os.path.join(workdir, 'few_shot'))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2, default=float)
  return results


def main():
  """CLI: python -m jaxft.peft.cloze --config configs/peft_cloze.py --workdir DIR."""
  from absl import app, flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file('config', None, 'configs/peft_cloze.py[:task]',
                                           lock_config=True)
  wd = flags.DEFINE_string('workdir', None, 'output directory')

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if config.value is None or not wd.value:
      raise app.UsageError('--config and --workdir are required')
    from jaxft import config as config_lib
    from jaxft import peft
    check = config.value.copy_and_resolve_references()
    check.stage = 'finetune_cls'  # cloze shares the fine-tuning keys and their checks
    config_lib.validate(check)
    peft.config(config.value)  # fail early on a bad peft section
    res = run(config.value, os.path.abspath(wd.value))
    for k in ('zero_shot', 'few_shot'):
      if k in res:
        print(f"cloze {k}: " + ', '.join(f'{m}={v:.4f}' for m, v in res[k].items()
                                         if isinstance(v, float)))

  app.run(_main)


if __name__ == '__main__':
  main()

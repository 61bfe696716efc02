"""PET-style cloze classification with the MLM head.

An example becomes a cloze sentence through a template, e.g. "{text} It was [MASK].", and
each label owns one or more verbalizer words (sst2: negative -> terrible, bad; positive ->
great, good). The label score is the log-sum-exp of the MLM logits of its words at the
mask position, so a pretrained MLM classifies with no new parameters (zero-shot), and
few-shot training is cross-entropy over those label scores (PET), full or with LoRA: the
MLM head is reused instead of a fresh classifier, which is why this works with a handful
of examples. The stage is `jaxft.stages.cloze`.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.data import classification, splits
from jaxft.data.classification import ClsData
from jaxft.data.loader import indexed, ordered
from jaxft.train.step import Objective, cross_entropy_sums

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

def cloze(ids: np.ndarray) -> Objective:
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

  return Objective(loss=loss, evaluate=evaluate)


def predict(model, arrays: dict, ids: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Label scores [N, C] of an MLM `model` (an nnx module) on `encode`d arrays, computed by
  the cloze objective's own evaluate."""
  graphdef, state = nnx.split(model)
  objective = cloze(ids)
  run = jax.jit(lambda state, batch: objective.evaluate(nnx.merge(graphdef, state), batch))
  padded = indexed({k: v for k, v in arrays.items() if k != 'labels'}, batch_size)
  padded['labels'] = np.zeros(len(padded['input_ids']), np.int32)
  per = {}
  for s in range(0, len(padded['input_ids']), batch_size):
    out = run(state, {k: v[s:s + batch_size] for k, v in padded.items()})['per_example']
    for k, v in out.items():
      per.setdefault(k, []).append(np.asarray(v))
  return ordered({k: np.concatenate(v) for k, v in per.items()})['logits']


# ----------------------------------------------------------------------------------- data

def read_split(data: ClsData, split: str):
  """(texts, pairs or None, labels [N] int, label_names, label_values) of one split."""
  s = classification.cls_settings(data)
  if s['is_regression']:
    raise ValueError('cloze classification needs class labels, not a regression task')
  labels, hf_names = s['labels'], None
  if labels is None:
    train_ex, _, hf_names = classification.read_cls_split(data, s, 'train', None, True)
    labels = hf_names or classification.sort_labels(train_ex.labels)
  ex, _, names = classification.read_cls_split(data, s, splits.normalize_split(split),
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

"""Fine-tuning objectives: sequence classification / regression and token classification
(NER), and the host-side summaries that turn eval outputs into GLUE / seqeval metrics."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxft.data import ner as ner_data
from jaxft.data.loader import ordered
from jaxft.data.splits import IGNORE_INDEX
from jaxft.train import metrics as metrics_lib
from jaxft.train.step import Objective, cross_entropy_sums


def inputs(batch):
  return batch['input_ids'], batch['attention_mask'], batch.get('token_type_ids')


def _rngs(rng, deterministic):
  return None if deterministic else nnx.Rngs(dropout=rng)


def example_weights(batch, logits):
  return batch.get('weights', jnp.ones(logits.shape[:1], jnp.float32)).astype(jnp.float32)


def hard_loss(logits, labels, w, is_regression: bool, label_smoothing: float = 0.0):
  """(loss_sum, sums) of the labels: squared error (regression) or cross-entropy."""
  if is_regression:
    err = jnp.square(logits[:, 0] - labels.astype(jnp.float32))
    return (err * w).sum(), {'weight': w.sum()}
  loss_sum, wsum, correct = cross_entropy_sums(logits, labels, w, label_smoothing)
  return loss_sum, {'weight': wsum, 'accuracy_sum': correct}


def cls(num_labels: int, is_regression: bool, *, label_smoothing: float = 0.0) -> Objective:
  def loss(model, batch, rng, deterministic):
    logits = model(*inputs(batch), deterministic=deterministic,
                   rngs=_rngs(rng, deterministic))['logits']
    return hard_loss(logits, batch['labels'], example_weights(batch, logits), is_regression,
                     label_smoothing)

  def evaluate(model, batch):
    logits = model(*inputs(batch))['logits']
    valid = batch['valid'].astype(jnp.float32)
    if is_regression:
      loss_sum = (jnp.square(logits[:, 0] - batch['labels'].astype(jnp.float32)) * valid).sum()
    else:
      loss_sum, _, _ = cross_entropy_sums(logits, batch['labels'], valid)
    return {'loss_sum': loss_sum, 'weight': valid.sum(),
            'per_example': {'logits': logits, 'labels': batch['labels'],
                            'index': batch['index'], 'valid': batch['valid']}}

  return Objective(loss=loss, evaluate=evaluate)


def ner(num_labels: int, *, label_smoothing: float = 0.0) -> Objective:
  def loss(model, batch, rng, deterministic):
    logits = model(*inputs(batch), deterministic=deterministic,
                   rngs=_rngs(rng, deterministic))['logits']
    w = (batch['labels'] != IGNORE_INDEX).astype(jnp.float32)
    if 'weights' in batch:
      w = w * batch['weights'].astype(jnp.float32)
    loss_sum, wsum, correct = cross_entropy_sums(logits, batch['labels'], w, label_smoothing)
    return loss_sum, {'weight': wsum, 'accuracy_sum': correct}

  def evaluate(model, batch):
    logits = model(*inputs(batch))['logits']
    w = ((batch['labels'] != IGNORE_INDEX) & (batch['valid'][:, None] > 0))
    loss_sum, wsum, _ = cross_entropy_sums(logits, batch['labels'], w.astype(jnp.float32))
    return {'loss_sum': loss_sum, 'weight': wsum,
            'per_example': {'pred': jnp.argmax(logits, -1).astype(jnp.int32),
                            'index': batch['index'], 'valid': batch['valid']}}

  return Objective(loss=loss, evaluate=evaluate)


def cls_summary(info: dict):
  """(sums, per_example) -> loss and the task's GLUE metrics."""
  def summarize(sums, per):
    per = ordered(per)
    out = {'loss': sums['loss_sum'] / max(sums['weight'], 1e-9)}
    preds = per['logits'][:, 0] if info['is_regression'] else per['logits']
    out.update(metrics_lib.glue_metrics(info['metric_names'], preds, per['labels']))
    return out
  return summarize


def ner_summary(info: dict, word_ids):
  """(sums, per_example) -> loss and entity-level precision / recall / F1 (seqeval)."""
  def summarize(sums, per):
    per = ordered(per)
    tags = ner_data.predictions_to_tags(per['pred'], word_ids, info['label_names'],
                                        info['num_words'])
    out = {'loss': sums['loss_sum'] / max(sums['weight'], 1e-9)}
    m = metrics_lib.ner_metrics(tags, info['tags'])
    out.update({k: v for k, v in m.items() if '/' not in k or k.split('/')[0] not in
                ('micro', 'macro', 'weighted')})
    return out
  return summarize

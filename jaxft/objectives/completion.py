"""The LM fine-tuning objective: next-token loss on completion tokens, and decoding as an eval.

Rows come from `jaxft.data.completion`: `labels` [B, L] already shifted (-100 = no loss),
optional `segment_ids` / `position_ids` for packed rows. Only the scored positions go
through the vocabulary projection (`max_targets` of them per row, gathered by position):
with GPT-2's 50k vocabulary that projection is most of a small model's FLOPs, and the
prompt half of each row needs none of it. The loss equals the one over every position.

Eval batches are of two kinds, told apart by their keys: loss rows (as in training) give
loss sums; prompt rows (`prompt_ids`, `prompt_mask`, `index`, `valid`) are decoded inside
the jitted eval step (`jaxft.models.decoding.decode`) and give generated token ids, which
the stage turns into text and scores (BLEU, chrF, ROUGE-L) on the host.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.data.splits import IGNORE_INDEX
from jaxft.models import decoding
from jaxft.train.step import Objective, cross_entropy_sums


def target_positions(labels, count: int):
  """[B, count] positions of the scored labels in ascending order (then unscored ones)."""
  length = labels.shape[1]
  pos = jnp.arange(length, dtype=jnp.int32)
  key = jnp.where(labels != IGNORE_INDEX, pos, pos + length)
  if count > length:
    key = jnp.pad(key, ((0, 0), (0, count - length)), constant_values=3 * length)
  return jnp.argsort(key, axis=-1)[:, :count].astype(jnp.int32) % length


def _model_inputs(batch):
  return {k: batch[k] for k in ('position_ids', 'segment_ids') if k in batch}


def lm_logits(model, batch, rng, deterministic: bool, max_targets: int | None):
  """(logits, labels, weights) of the scored positions (all positions if max_targets None)."""
  labels = batch['labels']
  weights = (labels != IGNORE_INDEX).astype(jnp.float32)
  kw = _model_inputs(batch)
  if max_targets:
    positions = target_positions(labels, max_targets)
    kw['logits_positions'] = positions
    labels = jnp.take_along_axis(labels, positions, axis=1)
    counts = weights.sum(1, keepdims=True)
    # a position counted twice (rows with fewer targets than max_targets) has weight 0; a row
    # with more targets than max_targets would lose some: NaN weights, never a quietly
    # smaller loss (the stage sizes max_targets from the data, so this cannot happen there)
    weights = jnp.take_along_axis(weights, positions, axis=1) * (
        jnp.arange(max_targets)[None] < counts)
    weights = jnp.where(counts.max() > max_targets, jnp.nan, weights)
  if 'weights' in batch:
    weights = weights * batch['weights'].astype(jnp.float32)[:, None]
  rngs = None if deterministic else nnx.Rngs(dropout=rng)
  logits = model(batch['input_ids'], batch['attention_mask'], deterministic=deterministic,
                 rngs=rngs, **kw)['logits']
  return logits, labels, weights


def completion_objective(*, max_targets: int | None = None,
                         decode_settings: decoding.DecodeSettings | None = None,
                         label_smoothing: float = 0.0) -> Objective:
  """The Objective for causal-LM fine-tuning on (prompt, completion) rows.

  loss: summed token cross-entropy over completion tokens, normalised by their count.
  evaluate: loss sums on loss rows; decoded tokens (`per_example`: tokens, length, index,
  valid) on prompt rows when `decode_settings` is given."""

  def loss(model, batch, rng, deterministic):
    logits, labels, weights = lm_logits(model, batch, rng, deterministic, max_targets)
    loss_sum, w, correct = cross_entropy_sums(logits, labels, weights, label_smoothing)
    return loss_sum, {'weight': w, 'accuracy_sum': correct}

  def evaluate(model, batch):
    if 'prompt_ids' in batch:
      if decode_settings is None:
        raise ValueError('prompt rows in an eval batch but no decode settings')
      out = decoding.decode(model, batch['prompt_ids'], batch['prompt_mask'], decode_settings,
                            jax.random.key(0))
      # beam search's n-best list rides along for a reranker (generate.rerank)
      extra = {k: out[k] for k in decoding.CANDIDATE_KEYS if k in out}
      return {'per_example': {'tokens': out['tokens'], 'length': out['length'],
                              'index': batch['index'], 'valid': batch['valid'], **extra}}
    logits, labels, weights = lm_logits(model, batch, None, True, max_targets)
    loss_sum, w, correct = cross_entropy_sums(logits, labels, weights)
    return {'loss_sum': loss_sum, 'weight': w, 'correct': correct}

  return Objective(loss=loss, evaluate=evaluate)

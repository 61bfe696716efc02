"""Language-model objectives: masked LM (BERT, RoBERTa-style dynamic masking drawn inside
the step, no NSP) and causal LM (GPT-2, optionally no loss across document boundaries)."""
from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from jaxft.data import masking
from jaxft.data.masking import MaskingSettings
from jaxft.train.step import Objective, cross_entropy_sums

EVAL_MASK_SEED = 1234  # eval masks are fixed so eval losses are comparable across steps


def _rngs(rng, deterministic):
  return None if deterministic else nnx.Rngs(dropout=rng)


def mlm(tokenizer, settings: MaskingSettings) -> Objective:
  """Masked LM: `prepare` masks the global batch (so accumulation sees one big batch's
  masks); with max_predictions only the masked positions go through the vocabulary."""
  mask_id = tokenizer.mask_token_id
  if mask_id is None:
    raise ValueError('the tokenizer has no mask token; MLM pretraining needs one ([MASK])')
  max_pred = int(settings.max_predictions or 0) or None
  kw = dict(vocab_size=len(tokenizer), mask_token_id=mask_id, mask_prob=settings.mask_prob,
            mask_token_frac=settings.mask_token_frac,
            random_token_frac=settings.random_token_frac, max_predictions=max_pred)

  def prepare(batch, rng):
    masked = masking.mlm_mask(rng, batch['input_ids'], batch['special_tokens_mask'],
                              attention_mask=batch['attention_mask'], **kw)
    return {**batch, **masked}

  def forward(model, batch, rng, deterministic):
    rngs = _rngs(rng, deterministic)
    if max_pred:
      out = model(batch['input_ids'], batch['attention_mask'], deterministic=deterministic,
                  rngs=rngs, masked_positions=batch['masked_positions'])
      return out['logits'], batch['masked_labels'], batch['masked_weights']
    out = model(batch['input_ids'], batch['attention_mask'], deterministic=deterministic,
                rngs=rngs)
    return out['logits'], batch['labels'], batch['weights']

  def loss(model, batch, rng, deterministic):
    logits, labels, weights = forward(model, batch, rng, deterministic)
    loss_sum, w, correct = cross_entropy_sums(logits, labels, weights)
    return loss_sum, {'weight': w, 'accuracy_sum': correct}

  def evaluate(model, batch):
    batch = prepare(batch, jax.random.PRNGKey(EVAL_MASK_SEED))
    logits, labels, weights = forward(model, batch, None, True)
    loss_sum, w, correct = cross_entropy_sums(logits, labels, weights)
    return {'loss_sum': loss_sum, 'weight': w, 'correct': correct}

  return Objective(loss=loss, evaluate=evaluate, prepare=prepare)


def clm(mask_boundaries: bool) -> Objective:
  """Causal LM on packed rows; `mask_boundaries`: no loss predicting across documents."""
  def prepare(batch, rng):
    del rng
    return {**batch, **masking.clm_labels(batch['input_ids'], batch['attention_mask'],
                                          batch.get('segment_ids'), mask_boundaries)}

  def forward(model, batch, rng, deterministic):
    return model(batch['input_ids'], batch['attention_mask'], deterministic=deterministic,
                 rngs=_rngs(rng, deterministic))['logits']

  def loss(model, batch, rng, deterministic):
    loss_sum, w, correct = cross_entropy_sums(forward(model, batch, rng, deterministic),
                                              batch['labels'], batch['weights'])
    return loss_sum, {'weight': w, 'accuracy_sum': correct}

  def evaluate(model, batch):
    batch = prepare(batch, None)
    loss_sum, w, correct = cross_entropy_sums(forward(model, batch, None, True),
                                              batch['labels'], batch['weights'])
    return {'loss_sum': loss_sum, 'weight': w, 'correct': correct}

  return Objective(loss=loss, evaluate=evaluate, prepare=prepare)


class Style:
  """Masked (BERT) or causal (GPT-2) language modelling: what differs between pretrain_mlm
  and pretrain_clm, chosen once from the stage name."""
  name: str        # the model head, and the rows the data packs: mlm | clm
  model_type: str  # the architecture it trains

  def objective(self, tokenizer, masking_settings: MaskingSettings,
                mask_boundaries: bool) -> Objective:
    raise NotImplementedError


class Masked(Style):
  name, model_type = 'mlm', 'bert'

  def objective(self, tokenizer, masking_settings, mask_boundaries):
    return mlm(tokenizer, masking_settings)


class Causal(Style):
  name, model_type = 'clm', 'gpt2'

  def objective(self, tokenizer, masking_settings, mask_boundaries):
    return clm(mask_boundaries)


STYLES = {'pretrain_mlm': Masked(), 'pretrain_clm': Causal()}


def summarize(sums, per_example):
  """Eval metrics of either LM: token loss, accuracy, perplexity, tokens scored."""
  del per_example
  w = max(sums.get('weight', 0.0), 1e-9)
  loss = sums['loss_sum'] / w
  return {'loss': loss, 'accuracy': sums['correct'] / w, 'perplexity': math.exp(min(loss, 50.0)),
          'tokens': sums['weight']}


def unigram_baseline(arrays, tokenizer) -> dict:
  """What a model that learned only token frequencies scores on these rows: accuracy of
  always answering the most frequent token, and the loss of predicting the unigram
  distribution (its entropy, nats). The bar pretraining has to clear to show it learned
  context; positions are the ones masking can choose (attended, not special)."""
  ids = np.asarray(arrays['input_ids'])
  keep = np.asarray(arrays['attention_mask']) > 0
  if 'special_tokens_mask' in arrays:
    keep &= np.asarray(arrays['special_tokens_mask']) == 0
  counts = np.bincount(ids[keep].ravel(), minlength=1).astype(np.float64)
  if not counts.sum():
    return {}
  p = counts[counts > 0] / counts.sum()
  top = int(counts.argmax())
  return {'token': tokenizer.convert_ids_to_tokens(top), 'token_id': top,
          'accuracy': float(counts[top] / counts.sum()), 'loss': float(-(p * np.log(p)).sum())}

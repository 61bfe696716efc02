"""Extractive question answering: the span loss (cross-entropy of the answer's first and last
token over the window's positions, as BERT's SQuAD head is trained) and the host-side
summary (n-best post-processing over every window of a question, then SQuAD EM / F1)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxft.data import qa as qa_data
from jaxft.data.loader import ordered
from jaxft.objectives.classification import example_weights, inputs
from jaxft.train.step import Objective, cross_entropy_sums

# A padding position is never an answer: its logit is pushed out of the softmax. (The model's
# own logits, exported and compared with Hugging Face's, are not masked.)
_NOT_A_POSITION = -1e9


def without_padding(logits, attention_mask):
  """[B, S, 2] float32 start / end logits with padding positions masked out."""
  real = attention_mask[..., None] > 0
  return jnp.where(real, logits.astype(jnp.float32), _NOT_A_POSITION)


def span_logits(model, batch, rng=None, deterministic: bool = True):
  out = model(*inputs(batch), deterministic=deterministic,
              rngs=None if deterministic else nnx.Rngs(dropout=rng))['logits']
  return without_padding(out, batch['attention_mask'])


def span_sums(logits, batch, w):
  """(loss sum, weight sum, hits): the mean of the start and end cross-entropies per window,
  summed with weights `w`; hits = the share of start and end positions predicted."""
  s_sum, wsum, s_hit = cross_entropy_sums(logits[..., 0], batch['start_positions'], w)
  e_sum, _, e_hit = cross_entropy_sums(logits[..., 1], batch['end_positions'], w)
  return 0.5 * (s_sum + e_sum), wsum, 0.5 * (s_hit + e_hit)


def span() -> Objective:
  """Loss = mean of the start and end cross-entropies; accuracy = the share of start and end
  positions predicted exactly (a training signal; EM / F1 come from the summary)."""
  def loss(model, batch, rng, deterministic):
    logits = span_logits(model, batch, rng, deterministic)
    loss_sum, wsum, hits = span_sums(logits, batch, example_weights(batch, logits))
    return loss_sum, {'weight': wsum, 'accuracy_sum': hits}

  def evaluate(model, batch):
    logits = span_logits(model, batch)
    valid = batch['valid'].astype(jnp.float32)
    out = {'per_example': {'start_logits': logits[..., 0], 'end_logits': logits[..., 1],
                           'index': batch['index'], 'valid': batch['valid']}}
    if 'start_positions' in batch:
      out['loss_sum'], out['weight'], _ = span_sums(logits, batch, valid)
    return out

  return Objective(loss=loss, evaluate=evaluate)


def answers(start_logits, end_logits, windows: dict, examples, data: qa_data.QaData
            ) -> list[dict]:
  """The best valid answer of every question (`qa_data.best_answers` with the data's
  n-best, length and null-score settings)."""
  return qa_data.best_answers(
      start_logits, end_logits, windows['offsets'], windows['example_index'], examples,
      n_best=data.n_best, max_answer_len=data.max_answer_len,
      version_2_with_negative=data.version_2_with_negative,
      null_score_diff_threshold=data.null_score_diff_threshold)


def scores(found: list[dict], examples) -> dict:
  """SQuAD EM / F1 of `found` answers against the examples' references."""
  return qa_data.squad_metrics({a['id']: a['answer'] for a in found}, examples.references())


def summary(info: dict):
  """(sums, per-window outputs) -> loss and SQuAD exact_match / f1 over the split's
  questions (every window of a question considered together)."""
  def summarize(sums, per):
    per = ordered(per)
    found = answers(per['start_logits'], per['end_logits'], info['windows'], info['examples'],
                    info['settings'])
    out = {'loss': sums['loss_sum'] / max(sums['weight'], 1e-9)} if 'loss_sum' in sums else {}
    out.update(scores(found, info['examples']))
    return out
  return summarize

"""Knowledge distillation as an objective on the one train loop: classification and MLM.

The student is the model the loop trains. The teacher reaches the loss as the step's
`constants` input (its params, sharded on the same mesh, never differentiated or donated)
and runs forward only, deterministically; with cached logits it does not run at all and
`batch['teacher_logits']` is read instead. Every term is a per-row loss in fp32, summed
with the same weights as fine-tuning / pretraining, so `sums['weight']` normalises all of
them: alpha=0 (no feature terms) is exactly the plain objective's loss, and gradient
accumulation equals one big batch.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.data.masking import MaskingSettings
from jaxft.objectives import classification, lm, qa
from jaxft.train.step import Objective, cross_entropy_sums


# ----------------------------------------------------------------------------- losses

def kl_soft_targets(student_logits, teacher_logits, temperature: float):
  """T^2 * KL(softmax(t/T) || softmax(s/T)) over the last axis (Hinton et al.); the T^2
  keeps soft-target gradients on the scale of the hard-label ones."""
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_pt = jax.nn.log_softmax(t, axis=-1)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  kl = (jnp.exp(log_pt) * (log_pt - log_ps)).sum(-1)
  return (temperature ** 2) * kl


def squared_error(student, teacher):
  """Soft-target loss for regression heads: (s - t)^2 on the single output."""
  return jnp.square(student.astype(jnp.float32)[..., 0] -
                    jax.lax.stop_gradient(teacher).astype(jnp.float32)[..., 0])


def _token_mean(per_token, mask):
  """[B, L] -> [B]: mean over the example's real tokens."""
  m = mask.astype(jnp.float32)
  return (per_token * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)


def cosine_per_example(student_h, teacher_h, mask):
  """Mean over real tokens of 1 - cos(h_s, h_t) (DistilBERT's cosine embedding loss)."""
  s = student_h.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_h).astype(jnp.float32)
  cos = (s * t).sum(-1) * jax.lax.rsqrt(
      jnp.maximum((s * s).sum(-1) * (t * t).sum(-1), 1e-24))
  return _token_mean(1.0 - cos, mask)


def hidden_mse_per_example(student_h, teacher_h, mask):
  """Mean over real tokens and features of (h_s - h_t)^2 (TinyBERT hidden-state loss;
  the student side is already projected to the teacher's width)."""
  d = student_h.astype(jnp.float32) - jax.lax.stop_gradient(teacher_h).astype(jnp.float32)
  return _token_mean(jnp.square(d).mean(-1), mask)


def attention_mse_per_example(student_a, teacher_a, mask):
  """Mean over heads and real (query, key) pairs of (a_s - a_t)^2, a = [B, H, L, L]
  attention probabilities (TinyBERT attention loss; padding rows and columns excluded)."""
  m = mask.astype(jnp.float32)
  pair = m[:, None, :, None] * m[:, None, None, :]
  d = jnp.square(student_a.astype(jnp.float32) -
                 jax.lax.stop_gradient(teacher_a).astype(jnp.float32))
  n = jnp.maximum(m.sum(-1), 1.0)
  return (d * pair).sum((1, 2, 3)) / (student_a.shape[1] * n * n)


# ----------------------------------------------------------------------------- objectives

PROJ = 'distill_proj'  # the student-side projection to the teacher's width (a param group)


@dataclasses.dataclass(frozen=True)
class Spec:
  """What to distil. `layer_map`: (student, teacher) hidden-state indices, 0 = embeddings
  output, i = layer i (1-based); attention maps use the pairs with both indices >= 1."""
  alpha: float = 0.5
  temperature: float = 2.0
  cosine_weight: float = 0.0
  hidden_weight: float = 0.0
  attention_weight: float = 0.0
  layer_map: tuple[tuple[int, int], ...] = ()

  @property
  def hidden_states(self) -> bool:
    return self.hidden_weight > 0

  @property
  def attentions(self) -> bool:
    return self.attention_weight > 0

  @property
  def features(self) -> bool:
    """Whether the loss needs teacher internals (so cached logits cannot serve)."""
    return self.cosine_weight > 0 or self.hidden_states or self.attentions


def _rngs(rng, deterministic):
  return None if deterministic else nnx.Rngs(dropout=rng)


def _project(model, h):
  proj = getattr(model, PROJ, None)
  return h if proj is None else proj(h)


def feature_terms(model, s_out, t_out, mask, example_weights, spec: Spec):
  """(loss_sum, sums) of the cosine / hidden-MSE / attention-MSE terms: each a per-example
  mean over real tokens, weighted by the example's weight in the main loss."""
  total = jnp.zeros((), jnp.float32)
  sums = {}
  ew = example_weights.astype(jnp.float32)
  if spec.cosine_weight > 0:
    per = cosine_per_example(_project(model, s_out['last_hidden_state']),
                                    t_out['last_hidden_state'], mask)
    sums['cosine_sum'] = (per * ew).sum()
    total = total + spec.cosine_weight * sums['cosine_sum']
  if spec.hidden_states:
    per = sum(hidden_mse_per_example(_project(model, s_out['hidden_states'][i]),
                                            t_out['hidden_states'][j], mask)
              for i, j in spec.layer_map)
    sums['hidden_mse_sum'] = (per * ew).sum()
    total = total + spec.hidden_weight * sums['hidden_mse_sum']
  if spec.attentions:
    per = sum(attention_mse_per_example(s_out['attentions'][i - 1],
                                               t_out['attentions'][j - 1], mask)
              for i, j in spec.layer_map if i >= 1 and j >= 1)
    sums['attention_mse_sum'] = (per * ew).sum()
    total = total + spec.attention_weight * sums['attention_mse_sum']
  return total, sums


def _teacher_out(teacher_def, teacher_params, args, spec: Spec, **head_kw):
  teacher = teacher_def.merge(jax.lax.stop_gradient(teacher_params))
  return teacher(*args, deterministic=True, output_hidden_states=spec.hidden_states,
                 output_attentions=spec.attentions, **head_kw)


def cls(num_labels: int, is_regression: bool, spec: Spec, teacher_def=None, *,
        cached: bool = False) -> Objective:
  """alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE (MSE for regression),
  + feature terms. Evaluation is classification's (student dev metrics)."""
  if not cached and teacher_def is None:
    raise ValueError('a live teacher needs its ModelDef')
  base = classification.cls(num_labels, is_regression)

  def loss(model, batch, rng, deterministic, constants=None):
    args = classification.inputs(batch)
    s_out = model(*args, deterministic=deterministic, rngs=_rngs(rng, deterministic),
                  output_hidden_states=spec.hidden_states, output_attentions=spec.attentions)
    logits = s_out['logits']
    w = classification.example_weights(batch, logits)
    hard_sum, sums = classification.hard_loss(logits, batch['labels'], w, is_regression)
    if cached:
      t_out, t_logits = None, batch['teacher_logits']
    else:
      t_out = _teacher_out(teacher_def, constants, args, spec)
      t_logits = t_out['logits']
    soft = (squared_error(logits, t_logits) if is_regression else
            kl_soft_targets(logits, t_logits, spec.temperature))
    soft_sum = (soft * w).sum()
    loss_sum = spec.alpha * soft_sum + (1.0 - spec.alpha) * hard_sum
    sums.update(kd_sum=soft_sum, ce_sum=hard_sum)
    if spec.features:
      extra_sum, extra_sums = feature_terms(model, s_out, t_out, batch['attention_mask'], w, spec)
      loss_sum = loss_sum + extra_sum
      sums.update(extra_sums)
    return loss_sum, sums

  return Objective(loss=loss, evaluate=base.evaluate)


def span(spec: Spec, teacher_def) -> Objective:
  """Extractive QA: alpha * T^2 * KL(teacher || student) of the start and of the end
  distribution over a window's positions (padding masked on both sides; the two averaged) +
  (1 - alpha) * the span cross-entropy, + feature terms. Evaluation is QA's (EM / F1)."""
  base = qa.span()

  def loss(model, batch, rng, deterministic, constants=None):
    args = classification.inputs(batch)
    s_out = model(*args, deterministic=deterministic, rngs=_rngs(rng, deterministic),
                  output_hidden_states=spec.hidden_states, output_attentions=spec.attentions)
    logits = qa.without_padding(s_out['logits'], batch['attention_mask'])
    w = classification.example_weights(batch, logits)
    hard_sum, wsum, hits = qa.span_sums(logits, batch, w)
    t_out = _teacher_out(teacher_def, constants, args, spec)
    t_logits = qa.without_padding(t_out['logits'], batch['attention_mask'])
    soft = 0.5 * sum(kl_soft_targets(logits[..., i], t_logits[..., i], spec.temperature)
                     for i in (0, 1))
    soft_sum = (soft * w).sum()
    loss_sum = spec.alpha * soft_sum + (1.0 - spec.alpha) * hard_sum
    sums = {'weight': wsum, 'accuracy_sum': hits, 'kd_sum': soft_sum, 'ce_sum': hard_sum}
    if spec.features:
      extra_sum, extra_sums = feature_terms(model, s_out, t_out, batch['attention_mask'], w, spec)
      loss_sum = loss_sum + extra_sum
      sums.update(extra_sums)
    return loss_sum, sums

  return Objective(loss=loss, evaluate=base.evaluate)


def mlm(tokenizer, masking: MaskingSettings, spec: Spec, teacher_def) -> Objective:
  """DistilBERT: soft targets over the masked positions (one masking, shared by teacher and
  student, drawn in `prepare`), + (1 - alpha) * MLM CE, + feature terms (cosine over real
  tokens). Evaluation is the MLM's (masked-token loss / accuracy)."""
  base = lm.mlm(tokenizer, masking)
  max_pred = int(masking.max_predictions or 0)

  def loss(model, batch, rng, deterministic, constants=None):
    args = (batch['input_ids'], batch['attention_mask'])
    head_kw = {'masked_positions': batch['masked_positions']} if max_pred else {}
    s_out = model(*args, deterministic=deterministic, rngs=_rngs(rng, deterministic),
                  output_hidden_states=spec.hidden_states, output_attentions=spec.attentions,
                  **head_kw)
    if max_pred:
      labels, weights = batch['masked_labels'], batch['masked_weights']
    else:
      labels, weights = batch['labels'], batch['weights']
    hard_sum, wsum, correct = cross_entropy_sums(s_out['logits'], labels, weights)
    t_out = _teacher_out(teacher_def, constants, args, spec, **head_kw)
    soft = kl_soft_targets(s_out['logits'], t_out['logits'], spec.temperature)
    soft_sum = (soft * weights.astype(jnp.float32)).sum()
    loss_sum = spec.alpha * soft_sum + (1.0 - spec.alpha) * hard_sum
    sums = {'weight': wsum, 'accuracy_sum': correct, 'kd_sum': soft_sum, 'ce_sum': hard_sum}
    if spec.features:
      # An example counts as many times as it has scored positions.
      extra_sum, extra_sums = feature_terms(model, s_out, t_out, batch['attention_mask'],
                                            weights.astype(jnp.float32).sum(-1), spec)
      loss_sum = loss_sum + extra_sum
      sums.update(extra_sums)
    return loss_sum, sums

  return Objective(loss=loss, evaluate=base.evaluate, prepare=base.prepare)

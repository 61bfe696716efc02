"""Distillation Tasks for the one train loop: classification and MLM.

The student is the model the loop trains. The teacher reaches the loss as the step's
constant `extra` input (its params, sharded on the same mesh, never differentiated or
donated) and runs forward only, deterministically; with cached logits it does not run at
all and `batch['teacher_logits']` is read instead. Every term is a per-row loss summed
with the same weights as fine-tuning / pretraining, so `sums['weight']` normalises all of
them and alpha=0 (no feature terms) is exactly the plain task's loss.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.distill import losses
from jaxft.train import finetune
from jaxft.train import pretrain
from jaxft.train.step import Task, cross_entropy_sums

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
    per = losses.cosine_per_example(_project(model, s_out['last_hidden_state']),
                                    t_out['last_hidden_state'], mask)
    sums['cosine_sum'] = (per * ew).sum()
    total = total + spec.cosine_weight * sums['cosine_sum']
  if spec.hidden_states:
    per = sum(losses.hidden_mse_per_example(_project(model, s_out['hidden_states'][i]),
                                            t_out['hidden_states'][j], mask)
              for i, j in spec.layer_map)
    sums['hidden_mse_sum'] = (per * ew).sum()
    total = total + spec.hidden_weight * sums['hidden_mse_sum']
  if spec.attentions:
    per = sum(losses.attention_mse_per_example(s_out['attentions'][i - 1],
                                               t_out['attentions'][j - 1], mask)
              for i, j in spec.layer_map if i >= 1 and j >= 1)
    sums['attention_mse_sum'] = (per * ew).sum()
    total = total + spec.attention_weight * sums['attention_mse_sum']
  return total, sums


def _teacher_out(teacher_def, teacher_params, args, spec: Spec, **head_kw):
  teacher = teacher_def.merge(jax.lax.stop_gradient(teacher_params))
  return teacher(*args, deterministic=True, output_hidden_states=spec.hidden_states,
                 output_attentions=spec.attentions, **head_kw)


def cls_task(num_labels: int, is_regression: bool, spec: Spec, teacher_def=None, *,
             cached: bool = False) -> Task:
  """alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE (MSE for regression),
  + feature terms. Evaluation is finetune's (student dev metrics)."""
  if not cached and teacher_def is None:
    raise ValueError('a live teacher needs its ModelDef')
  base = finetune.cls_task(num_labels, is_regression)

  def loss(model, batch, rng, deterministic, extra=None):
    args = (batch['input_ids'], batch['attention_mask'], batch.get('token_type_ids'))
    s_out = model(*args, deterministic=deterministic, rngs=_rngs(rng, deterministic),
                  output_hidden_states=spec.hidden_states, output_attentions=spec.attentions)
    logits = s_out['logits']
    w = batch.get('weights', jnp.ones(logits.shape[:1], jnp.float32)).astype(jnp.float32)
    if is_regression:
      hard_sum = (jnp.square(logits[:, 0] - batch['labels'].astype(jnp.float32)) * w).sum()
      sums = {'weight': w.sum()}
    else:
      hard_sum, wsum, correct = cross_entropy_sums(logits, batch['labels'], w)
      sums = {'weight': wsum, 'accuracy_sum': correct}
    if cached:
      t_out, t_logits = None, batch['teacher_logits']
    else:
      t_out = _teacher_out(teacher_def, extra, args, spec)
      t_logits = t_out['logits']
    soft = (losses.squared_error(logits, t_logits) if is_regression else
            losses.kl_soft_targets(logits, t_logits, spec.temperature))
    soft_sum = (soft * w).sum()
    loss_sum = spec.alpha * soft_sum + (1.0 - spec.alpha) * hard_sum
    sums.update(kd_sum=soft_sum, ce_sum=hard_sum)
    if spec.features:
      extra_sum, extra_sums = feature_terms(model, s_out, t_out, batch['attention_mask'], w, spec)
      loss_sum = loss_sum + extra_sum
      sums.update(extra_sums)
    return loss_sum, sums

  return Task(head='cls', loss=loss, evaluate=base.evaluate, num_labels=num_labels)


def mlm_task(mcfg, tokenizer, mlm_cfg, spec: Spec, teacher_def) -> Task:
  """DistilBERT: soft targets over the masked positions (one masking, shared by teacher and
  student, drawn in `prepare`), + (1 - alpha) * MLM CE, + feature terms (cosine over real
  tokens). Evaluation is pretraining's (masked-token loss / accuracy)."""
  base = pretrain.mlm_task(mcfg, tokenizer, mlm_cfg)
  max_pred = int(mlm_cfg.get('max_predictions', 0) or 0)

  def loss(model, batch, rng, deterministic, extra=None):
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
    t_out = _teacher_out(teacher_def, extra, args, spec, **head_kw)
    soft = losses.kl_soft_targets(s_out['logits'], t_out['logits'], spec.temperature)
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

  return Task(head='mlm', loss=loss, evaluate=base.evaluate, prepare=base.prepare)

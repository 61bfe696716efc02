"""Distillation losses as per-row / per-example terms, in fp32.

Every term is returned per row (a classified example, or a scored MLM position) or per
example, so the task can weight and *sum* them exactly like the plain fine-tuning loss
and let the step normalise by `sums['weight']`: alpha=0 then equals fine-tuning, and
gradient accumulation equals one big batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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

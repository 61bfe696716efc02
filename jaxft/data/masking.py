"""Dynamic MLM masking and next-token labels, in pure JAX (called inside the jitted step).

Masking inside the step (RoBERTa-style dynamic masking) means every epoch sees fresh
masks from the step's rng, and a resumed run reproduces them exactly because the rng
is `fold_in(seed, step)`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MaskingSettings:
  """The `mlm` config section: dynamic masking rates. `max_predictions` > 0 projects only
  that many positions per row through the vocabulary (fixed shapes); 0 projects every one."""
  mask_prob: float = 0.15
  mask_token_frac: float = 0.8
  random_token_frac: float = 0.1
  max_predictions: int = 20

  def __post_init__(self):
    for k in ('mask_prob', 'mask_token_frac', 'random_token_frac'):
      if not 0.0 <= getattr(self, k) <= 1.0:
        raise ValueError(f'mlm.{k}={getattr(self, k)} must be in [0, 1]')
    if self.mask_token_frac + self.random_token_frac > 1.0:
      raise ValueError(f'mlm.mask_token_frac + mlm.random_token_frac = '
                       f'{self.mask_token_frac + self.random_token_frac} exceeds 1')
    if self.max_predictions < 0:
      raise ValueError(f'mlm.max_predictions={self.max_predictions} must be >= 0')


def mlm_mask(rng, input_ids, special_tokens_mask, *, vocab_size: int, mask_token_id: int,
             mask_prob: float = 0.15, mask_token_frac: float = 0.8,
             random_token_frac: float = 0.1, max_predictions: int | None = None,
             attention_mask=None):
  """BERT masking: choose ~mask_prob of the maskable tokens of each row, then corrupt
  80% to [MASK], 10% to a random token, keep 10%.

  Maskable = special_tokens_mask == 0 (and attention_mask == 1 when given), so CLS/SEP/
  PAD are never chosen. Each row selects floor(mask_prob * n + u) tokens, u ~ U[0, 1):
  exactly mask_prob * n in expectation, with far less spread than per-token coin flips.
  With `max_predictions=P` the count is also capped at P.

  Returns a dict of [B, L] arrays: `input_ids` (corrupted, int32), `labels` (the
  original ids everywhere, int32) and `weights` (float32, 1 where a prediction is
  scored). With max_predictions also `masked_positions` [B, P] int32 (selected positions
  in ascending order, unused slots 0), `masked_labels` [B, P] int32 and
  `masked_weights` [B, P] float32: a loss over the gathered positions equals the
  full-length loss over `weights`. `vocab_size` should be the tokenizer's size, so that
  random replacements are real tokens.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  maskable = jnp.asarray(special_tokens_mask) == 0
  if attention_mask is not None:
    maskable &= jnp.asarray(attention_mask) > 0
  b, length = input_ids.shape
  k_score, k_count, k_action, k_token = jax.random.split(rng, 4)

  n_maskable = maskable.sum(axis=-1)
  u = jax.random.uniform(k_count, (b,))
  n_select = jnp.floor(mask_prob * n_maskable.astype(jnp.float32) + u).astype(jnp.int32)
  n_select = jnp.minimum(n_select, n_maskable)
  if max_predictions is not None:
    n_select = jnp.minimum(n_select, max_predictions)

  # Random rank of each maskable position (non-maskable ones rank last): the first
  # n_select ranks are chosen, a uniform random subset of the maskable positions.
  scores = jnp.where(maskable, jax.random.uniform(k_score, (b, length)), 2.0)
  order = jnp.argsort(scores, axis=-1)
  ranks = jnp.argsort(order, axis=-1)
  selected = (ranks < n_select[:, None]) & maskable

  action = jax.random.uniform(k_action, (b, length))
  to_mask = selected & (action < mask_token_frac)
  to_random = selected & (action >= mask_token_frac) & (
      action < mask_token_frac + random_token_frac)
  random_ids = jax.random.randint(k_token, (b, length), 0, vocab_size, jnp.int32)
  corrupted = jnp.where(to_mask, jnp.int32(mask_token_id), input_ids)
  corrupted = jnp.where(to_random, random_ids, corrupted)

  out = {'input_ids': corrupted, 'labels': input_ids,
         'weights': selected.astype(jnp.float32)}
  if max_predictions is not None:
    p = int(max_predictions)
    # Selected positions first, in ascending position order; then everything else.
    pos = jnp.arange(length, dtype=jnp.int32)
    key = jnp.where(selected, pos, pos + length)
    if p > length:
      key = jnp.pad(key, ((0, 0), (0, p - length)), constant_values=3 * length)
    positions = jnp.argsort(key, axis=-1)[:, :p].astype(jnp.int32)
    slot_used = jnp.arange(p)[None, :] < n_select[:, None]
    positions = jnp.where(slot_used, positions, 0)
    out['masked_positions'] = positions
    out['masked_labels'] = jnp.where(
        slot_used, jnp.take_along_axis(input_ids, positions, axis=-1), 0)
    out['masked_weights'] = slot_used.astype(jnp.float32)
  return out


def clm_labels(input_ids, attention_mask, segment_ids=None, mask_boundaries: bool = False):
  """Next-token targets already shifted: logits[:, t] is scored against labels[:, t].

  labels[:, t] = input_ids[:, t + 1] (0 at the last position). weights are 0 where
  either token is padding, at the last position, and with `mask_boundaries` (needs
  segment_ids) where t and t + 1 lie in different documents, so the first token of a
  document is never predicted from the previous one.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  attn = jnp.asarray(attention_mask) > 0
  labels = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
  next_attn = jnp.concatenate([attn[:, 1:], jnp.zeros_like(attn[:, :1])], axis=1)
  valid = attn & next_attn
  if mask_boundaries:
    if segment_ids is None:
      raise ValueError('clm_labels(mask_boundaries=True) needs segment_ids')
    seg = jnp.asarray(segment_ids)
    same = jnp.concatenate([seg[:, 1:] == seg[:, :-1], jnp.zeros_like(attn[:, :1])], axis=1)
    valid &= same
  return {'labels': labels, 'weights': valid.astype(jnp.float32)}

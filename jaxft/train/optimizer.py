"""Optax AdamW with warmup + decay schedules, clipping, weight-decay and trainable masks, and
the masks a fine-tune builds for it (frozen parameters, layer-wise learning rates)."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import optax
from absl import logging

from jaxft.models import is_embedding, layer_index
from jaxft.trees import map_named, path_keys

SCHEDULES = ('linear', 'cosine', 'constant')


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """The `optimizer` config section."""
  lr: float = 1e-4             # peak learning rate
  schedule: str = 'linear'     # linear | cosine | constant (after warmup)
  warmup_steps: int = 0        # > 0 wins over warmup_ratio
  warmup_ratio: float = 0.0    # warmup as a share of the steps
  end_lr_ratio: float = 0.0    # the decay's floor, as a share of lr
  weight_decay: float = 0.01   # AdamW, on matrices only (no biases, LayerNorm)
  b1: float = 0.9              # Adam
  b2: float = 0.999            # Adam
  eps: float = 1e-8            # Adam
  clip_norm: float = 1.0       # global-norm clipping; 0 = off

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f'optimizer.schedule={self.schedule!r}; allowed: {SCHEDULES}')
    if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio <= 1.0:
      raise ValueError(f'optimizer.warmup_steps={self.warmup_steps} must be >= 0 and '
                       f'optimizer.warmup_ratio={self.warmup_ratio} in [0, 1]')


@dataclasses.dataclass(frozen=True)
class FreezeSettings:
  """The `finetune` config section: what a fine-tune trains, and how fast."""
  freeze_embeddings: bool = False
  freeze_layers: int = 0                 # the lowest N transformer layers
  freeze_patterns: tuple[str, ...] = ()  # regexes over dotted parameter names
  layerwise_lr_decay: float = 1.0        # ELECTRA-style; 1.0 = off
  label_smoothing: float = 0.0

  def __post_init__(self):
    for pattern in self.freeze_patterns:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f'finetune.freeze_patterns: {pattern!r} is not a valid regex: '
                         f'{e}') from None


def trainable_mask(settings: FreezeSettings, abstract_params):
  """Bool tree: False for frozen embeddings / lowest N layers / matching names; None when
  nothing is frozen."""
  patterns = [re.compile(p) for p in settings.freeze_patterns]
  if not (settings.freeze_embeddings or settings.freeze_layers or patterns):
    return None

  def trainable(name, _):
    if settings.freeze_embeddings and is_embedding(name):
      return False
    layer = layer_index(name)
    if layer is not None and layer < settings.freeze_layers:
      return False
    return not any(p.search(name) for p in patterns)

  return map_named(trainable, abstract_params)


def layerwise_lr_scale(settings: FreezeSettings, abstract_params, num_layers: int):
  """ELECTRA-style layer-wise LR decay: layer i gets decay**(L - i), embeddings decay**(L+1);
  None when off."""
  decay = float(settings.layerwise_lr_decay or 1.0)
  if decay == 1.0:
    return None

  def scale(name, _):
    if is_embedding(name):
      return decay ** (num_layers + 1)
    layer = layer_index(name)
    return decay ** (num_layers - layer) if layer is not None else 1.0

  return map_named(scale, abstract_params)


def warmup_steps(settings: OptimizerSettings, num_steps: int) -> int:
  """warmup_steps when set (an explicit value wins over a preset's ratio), else the ratio."""
  if settings.warmup_steps and settings.warmup_ratio:
    logging.info('optimizer.warmup_steps=%d is set: optimizer.warmup_ratio=%g is ignored',
                 settings.warmup_steps, settings.warmup_ratio)
  return settings.warmup_steps or int(round(settings.warmup_ratio * num_steps))


def make_schedule(settings: OptimizerSettings, num_steps: int) -> optax.Schedule:
  """lr(step): linear warmup from 0 to `lr`, then linear decay to `end_lr_ratio*lr`,
  cosine decay to the same floor, or constant."""
  lr = float(settings.lr)
  kind = settings.schedule
  warm = warmup_steps(settings, num_steps)
  end = lr * float(settings.end_lr_ratio)
  decay_steps = max(num_steps - warm, 1)
  if kind == 'linear':
    after = optax.linear_schedule(lr, end, decay_steps)
  elif kind == 'cosine':
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  else:
    after = optax.constant_schedule(lr)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def decay_mask(params) -> Any:
  """Weight decay on matrices only: biases, LayerNorm and other vectors are not decayed.

  A bias is never decayed, whatever its rank: attention q/k/v biases are [heads, kv].
  """
  def f(path, x):
    last = path_keys(path)[-1] if path else ''
    return x.ndim >= 2 and not last.endswith('bias')

  return jax.tree_util.tree_map_with_path(f, params)


def make_optimizer(settings: OptimizerSettings, num_steps: int, params, trainable=None,
                   lr_scale=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ global-norm clipping). `trainable`: bool tree; frozen leaves get no state.

  `lr_scale`: optional tree of per-leaf learning-rate multipliers (layer-wise decay).
  """
  schedule = make_schedule(settings, num_steps)
  chain = []
  clip = float(settings.clip_norm or 0.0)
  if clip > 0:
    chain.append(optax.clip_by_global_norm(clip))
  chain.append(optax.scale_by_adam(b1=float(settings.b1), b2=float(settings.b2),
                                   eps=float(settings.eps)))
  wd = float(settings.weight_decay)
  if wd:
    chain.append(optax.add_decayed_weights(wd, mask=decay_mask(params)))
  if lr_scale is not None:
    chain.append(_scale_by_tree(lr_scale))
  chain.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*chain)
  if trainable is not None:
    labels = jax.tree.map(lambda t: 'train' if t else 'freeze', trainable)
    tx = optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)
  return tx, schedule


def _scale_by_tree(scales) -> optax.GradientTransformation:
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    # Inside optax.multi_transform (frozen params) masked-out leaves arrive as MaskedNode.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    return jax.tree.map(lambda u, s: u if masked(u) else u * s, updates, scales,
                        is_leaf=masked), state

  return optax.GradientTransformation(init, update)

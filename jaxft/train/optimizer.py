"""Optax AdamW with warmup + decay schedules, clipping, weight-decay and trainable masks."""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax

SCHEDULES = ('linear', 'cosine', 'constant')


def warmup_steps(opt_cfg, num_steps: int) -> int:
  ws = int(opt_cfg.get('warmup_steps', 0) or 0)
  ratio = float(opt_cfg.get('warmup_ratio', 0.0) or 0.0)
  if ws and ratio:
    raise ValueError('optimizer.warmup_steps and optimizer.warmup_ratio are both set; use one')
  return ws if ws else int(round(ratio * num_steps))


def make_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
  """lr(step): linear warmup from 0 to `lr`, then linear decay to `end_lr_ratio*lr`,
  cosine decay to the same floor, or constant."""
  lr = float(opt_cfg.lr)
  kind = opt_cfg.get('schedule', 'linear')
  if kind not in SCHEDULES:
    raise ValueError(f'optimizer.schedule={kind!r}; allowed: {SCHEDULES}')
  warm = warmup_steps(opt_cfg, num_steps)
  end = lr * float(opt_cfg.get('end_lr_ratio', 0.0))
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
    last = str(getattr(path[-1], 'key', getattr(path[-1], 'name', path[-1]))) if path else ''
    return x.ndim >= 2 and not last.endswith('bias')

  return jax.tree_util.tree_map_with_path(f, params)


def path_mask(params, patterns: list[str] | tuple[str, ...]) -> Any:
  """True for leaves whose dotted path matches any regex in `patterns`."""
  compiled = [re.compile(p) for p in patterns]

  def f(path, _):
    name = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    return any(c.search(name) for c in compiled)

  return jax.tree_util.tree_map_with_path(f, params)


def make_optimizer(opt_cfg, num_steps: int, params, trainable=None,
                   lr_scale: Callable | None = None) -> tuple[optax.GradientTransformation,
                                                            optax.Schedule]:
  """AdamW (+ global-norm clipping). `trainable`: bool tree; frozen leaves get no state.

  `lr_scale`: optional tree of per-leaf learning-rate multipliers (layer-wise decay).
  """
  schedule = make_schedule(opt_cfg, num_steps)
  chain = []
  clip = float(opt_cfg.get('clip_norm', 1.0) or 0.0)
  if clip > 0:
    chain.append(optax.clip_by_global_norm(clip))
  chain.append(optax.scale_by_adam(b1=float(opt_cfg.get('b1', 0.9)),
                                   b2=float(opt_cfg.get('b2', 0.999)),
                                   eps=float(opt_cfg.get('eps', 1e-8))))
  wd = float(opt_cfg.get('weight_decay', 0.01))
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

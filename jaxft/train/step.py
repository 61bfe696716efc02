"""Pure, jitted train and eval steps over a sharded train state.

An objective supplies three pure functions (see `Objective`); the step owns gradients, gradient
accumulation, the optimizer update, the non-finite policy and the RNG discipline:
rng(step) = fold_in(state.rng, state.step), so a resumed run redraws the same masks and
dropout as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxft import measured, partitioning
from jaxft.models import layers

Batch = dict[str, Any]


@dataclasses.dataclass
class Objective:
  """What a stage plugs into the one loop: how a batch becomes a loss and eval outputs.

  prepare(batch, rng) -> batch: on the whole global batch inside the step (e.g. MLM masking),
    so gradient accumulation sees exactly what one big batch would.
  loss(model, batch, rng, deterministic) -> (loss_sum, sums): `sums['weight']` is the
    normaliser; loss = loss_sum / weight. Other entries of `sums` are summed metrics.
  evaluate(model, batch) -> dict: `sums` to add over the eval set and/or per-example
    arrays under 'per_example' for host-side metrics (F1, ...).
  """
  loss: Callable
  evaluate: Callable
  prepare: Callable = lambda batch, rng: batch


def cross_entropy_sums(logits, labels, weights, label_smoothing: float = 0.0,
                       class_weights=None):
  """(sum of weighted token losses, sum of weights, sum of correct*weights), in fp32.

  Written for a 50k vocabulary: two passes over the logits (max, then log-sum-exp with the
  label's logit picked by an iota compare that fuses into it), no [.., V] log-probabilities,
  no argmax (a slow variadic reduce on CPU), and a backward that is one fused
  softmax-minus-one-hot instead of a scatter into a zeroed [.., V] buffer."""
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  safe = jnp.where(weights > 0, labels, 0)
  m = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
  shifted = logits - m
  lse = jnp.log(jnp.exp(shifted).sum(-1))
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  label_shifted = jnp.where(vocab == safe[..., None], shifted, 0.0).sum(-1)
  nll = lse - label_shifted
  if label_smoothing:
    nll = (1 - label_smoothing) * nll - label_smoothing * (shifted.mean(-1) - lse)
  w = weights.astype(jnp.float32)
  if class_weights is not None:
    w = w * jnp.asarray(class_weights, jnp.float32)[safe]
  # argmax == label, ties to the first index as jnp.argmax: the label's logit is the max and
  # no smaller index reaches it
  earlier_max = ((vocab < safe[..., None]) & (shifted == 0)).any(-1)
  correct = ((label_shifted == 0) & ~earlier_max & (weights > 0)).astype(jnp.float32)
  return (nll * w).sum(), w.sum(), correct.sum()


def _microbatches(batch: Batch, k: int) -> Batch:
  """[k*b, ...] -> [k, b, ...] taking rows i::k, so each device's rows split evenly."""
  def split(x):
    b = x.shape[0] // k
    return x.reshape((b, k) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def _accumulate(grad_fn, params, batch, rng, constants, k: int):
  """Summed (loss_sum, sums, grads) over k micro-batches of `batch`, one at a time (scan):
  the sums of one big batch, so dividing by the summed weight gives the same step."""
  micro = _microbatches(batch, k)

  def body(carry, xs):
    i, mb = xs
    (ls, s), g = grad_fn(params, mb, jax.random.fold_in(jax.random.fold_in(rng, 2), i),
                         constants)
    acc_l, acc_s, acc_g = carry
    return (acc_l + ls, jax.tree.map(jnp.add, acc_s, s), jax.tree.map(jnp.add, acc_g, g)), None

  zeros_s = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng, constants)[0][1]))
  init = (jnp.zeros((), jnp.float32), zeros_s, jax.tree.map(jnp.zeros_like, params))
  (loss_sum, sums, grads), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
  return loss_sum, sums, grads


def make_train_step(model_def, objective: Objective, tx, state_shardings, mesh, rules, *,
                    grad_accum: int = 1, trainable=None, nonfinite: str = 'skip',
                    schedule=None, constants_shardings=None):
  """Returns step(state, batch) -> (state, metrics): one jax.jit with in/out shardings.

  `constants_shardings`: shardings of a constant input (e.g. a frozen teacher's params); the
  step is then step(state, batch, constants) and the objective's loss gets
  `constants=constants`. They stay outside the train state: not differentiated, updated,
  donated or checkpointed.
  """
  if nonfinite not in ('skip', 'halt', 'rollback'):
    raise ValueError(f"train.nonfinite={nonfinite!r}; allowed: 'skip', 'halt', 'rollback'")

  def loss_of(params, batch, key, constants):
    if trainable is not None:
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    model = model_def.merge(params)
    kw = {} if constants_shardings is None else {'constants': constants}
    loss_sum, sums = objective.loss(model, batch, key, False, **kw)
    return loss_sum, sums

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def step(state, batch, constants=None):
    rng = jax.random.fold_in(state['rng'], state['step'])
    batch = objective.prepare(batch, jax.random.fold_in(rng, 1))
    params = state['params']
    if grad_accum == 1:
      (loss_sum, sums), grads = grad_fn(params, batch, jax.random.fold_in(rng, 2), constants)
    else:
      loss_sum, sums, grads = _accumulate(grad_fn, params, batch, rng, constants, grad_accum)
    denom = jnp.maximum(sums['weight'], 1e-9)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
      updates, new_opt = tx.update(grads, opt_state, params)
      # The state keeps its dtypes: with bf16 params the fp32 loss scale promotes the Adam
      # moments to fp32, which would change the state's types (a retrace, and a cond error).
      new_opt = jax.tree.map(lambda new, old: new.astype(old.dtype), new_opt, opt_state)
      return optax.apply_updates(params, updates), new_opt

    # A non-finite step leaves params and optimizer state untouched. As a cond rather than
    # a select over every leaf: the select kept the old state alive beside the new one
    # (copies and a second pass over ~3x the params), 10% of a bert-base step on CPU.
    new_params, new_opt = jax.lax.cond(finite, update, lambda p, o: (p, o), params,
                                       state['opt_state'])
    new_state = {
        'step': state['step'] + 1,
        'params': new_params,
        'opt_state': new_opt,
        'rng': state['rng'],
        'skipped': state['skipped'] + (~finite).astype(jnp.int32),
    }
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
               **{k: v for k, v in sums.items()}}
    if schedule is not None:
      metrics['lr'] = schedule(state['step'])
    return new_state, metrics

  # Batches arrive already sharded (global_batch), so their in_sharding is taken as is.
  repl = partitioning.replicated(mesh)
  in_shardings = (state_shardings, None) + (
      () if constants_shardings is None else (constants_shardings,))
  variants = _BarrierVariants(step, dict(
      in_shardings=in_shardings, out_shardings=(state_shardings, repl), donate_argnums=(0,)))
  chosen = []

  def run(state, batch, *constants):
    with partitioning.use_mesh(mesh, rules):
      if not chosen:  # the first call decides the hardware choice for these shapes
        chosen.append(variants[variants.choose(state, batch, constants)])
      return chosen[0](state, batch, *constants)

  run.jitted = variants['on']  # the built-in rule, for callers that lower it themselves
  # the first call's choice, for callers that time or lower the chosen program themselves
  run.choose, run.variant = lambda s, b, *c: variants.choose(s, b, c), variants.__getitem__
  return run


class _BarrierVariants:
  """The step jitted per candidate of `layers.COTANGENT_BARRIER` (the fp32 backward's
  cotangent barrier on CPU), and the measured choice between them (jaxft/measured.py)."""

  def __init__(self, step, jit_kw):
    self.step, self.jit_kw, self.jitted, self.sites = step, jit_kw, {}, {}

  def __getitem__(self, candidate: str):
    if candidate not in self.jitted:
      def stepped(state, batch, constants=None):
        with layers.cotangent_barrier(candidate == 'on') as record:
          out = self.step(state, batch, constants)
        self.sites[candidate] = record.sites
        return out
      self.jitted[candidate] = jax.jit(stepped, **self.jit_kw)
    return self.jitted[candidate]

  def choose(self, state, batch, constants):
    """The candidate to run: the built-in rule off CPU (the barrier is CPU-only), else the
    measured (or stored, or set) one."""
    choice = layers.COTANGENT_BARRIER
    if jax.default_backend() != 'cpu':
      return choice.default
    return measured.decide(choice, measured.shapes_key(state, batch, constants),
                           lambda: self._timing_runs(state, batch, constants))

  def _timing_runs(self, state, batch, constants):
    """One blocking step per candidate on a copy of the state (the run's own state is
    donated by nothing here), or None when no fp32 backward asked for the barrier."""
    self['on'].lower(state, batch, *constants)  # traced once; the run's call reuses it
    if not self.sites.get('on'):
      return None
    holder = [jax.tree.map(lambda x: x.copy(), state)]

    def run(candidate):
      def one_step():
        holder[0], metrics = self[candidate](holder[0], batch, *constants)
        jax.block_until_ready((holder[0], metrics))
      return one_step

    return {c: run(c) for c in layers.COTANGENT_BARRIER.candidates}


def make_eval_step(model_def, objective: Objective, mesh, rules, param_shardings):
  def step(params, batch):
    return objective.evaluate(model_def.merge(params), batch)

  jitted = jax.jit(step, in_shardings=(param_shardings, None))

  def run(params, batch):
    with partitioning.use_mesh(mesh, rules):
      return jitted(params, batch)

  return run


def global_batch(local: Batch, mesh, rules) -> Batch:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(
      partitioning.batch_sharding(mesh, v.ndim, rules), v) for k, v in local.items()}

"""The one train loop: every stage hands it a model, a task and data.

It owns the mesh, the sharded train state, resume, periodic eval, early stopping,
checkpoints (last K + best K), preemption, logging (tqdm, metrics.jsonl, TensorBoard)
and results.json. It knows no task: losses and metrics come from the `Task`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxft import checkpointing, partitioning
from jaxft.train import optimizer as optim
from jaxft.train import state as state_lib
from jaxft.train import step as step_lib
from jaxft.train.metrics import MetricsWriter


@dataclasses.dataclass
class Data:
  train_iter: Any                                   # checkpointable iterator of local batches
  eval_batches: Callable[[], Iterable[dict]] | None = None  # fresh pass over eval data
  summarize: Callable[[dict, dict], dict] | None = None     # (sums, per_example) -> metrics
  steps_per_epoch: int = 0  # > 0: also evaluate at every epoch end


@dataclasses.dataclass
class EarlyStopping:
  metric: str | None
  mode: str = 'max'
  patience: int = 0  # evals without improvement before stopping (0 = never stop)
  best: float | None = None
  best_step: int | None = None
  bad_evals: int = 0

  def update(self, value: float, step: int) -> bool:
    """Record an eval; True when training should stop."""
    # A NaN/inf metric (e.g. a correlation of constant predictions) is never an improvement:
    # taken as the first best, nothing could ever compare better than NaN afterwards.
    better = math.isfinite(value) and (
        self.best is None or (value > self.best if self.mode == 'max' else value < self.best))
    if better:
      self.best, self.best_step, self.bad_evals = float(value), int(step), 0
    else:
      self.bad_evals += 1
    return bool(self.patience) and self.bad_evals >= self.patience

  def to_json(self):
    return {'best': self.best, 'best_step': self.best_step, 'bad_evals': self.bad_evals}

  def load(self, d):
    self.best, self.best_step, self.bad_evals = d.get('best'), d.get('best_step'), d.get('bad_evals', 0)


def is_main() -> bool:
  return jax.process_index() == 0


def evaluate(eval_step, params, batches: Iterable[dict], mesh, rules, summarize=None) -> dict:
  """Run `eval_step` over all batches; add up sums, concatenate per-example outputs."""
  sums: dict[str, float] = {}
  per_example: dict[str, list] = {}
  for local in batches:
    out = eval_step(params, step_lib.global_batch(local, mesh, rules))
    out = state_lib.to_host(out)
    for k, v in out.items():
      if k == 'per_example':
        for kk, vv in v.items():
          per_example.setdefault(kk, []).append(np.asarray(vv))
      else:
        sums[k] = sums.get(k, 0.0) + float(v)
  per = {k: np.concatenate(v) for k, v in per_example.items()}
  if summarize is not None:
    return summarize(sums, per)
  w = max(sums.get('weight', 1.0), 1e-9)
  return {k: v / w for k, v in sums.items() if k != 'weight'}


def train(cfg, workdir: str, model_def: state_lib.ModelDef, task: step_lib.Task, data: Data, *,
          init_params=None, trainable=None, lr_scale=None, extra_results: dict | None = None,
          on_end: Callable | None = None, extra=None) -> dict:
  """Train until `train.num_steps` (or early stop / preemption); returns the results dict.

  `extra`: a constant pytree of jax.Arrays sharded on this config's mesh (e.g. a frozen
  teacher's params), handed to every step and to the task's loss as `extra=`; it is not
  part of the train state, so it is never trained, donated or checkpointed.
  """
  t_start = time.time()
  tc, cc = cfg.train, cfg.checkpoint
  mesh = partitioning.make_mesh(cfg.mesh)
  rules = partitioning.rules_from_config(cfg.mesh.get('rules', None))
  num_steps = int(tc.num_steps)
  grad_accum = int(tc.get('grad_accum', 1))
  dp = partitioning.data_parallel_size(mesh, rules)
  if tc.batch_size % (dp * grad_accum):
    raise ValueError(f'train.batch_size={tc.batch_size} must be divisible by data-parallel size '
                     f'({dp}) x train.grad_accum ({grad_accum})')
  tx, schedule = optim.make_optimizer(cfg.optimizer, num_steps, model_def.abstract_params,
                                      trainable=trainable, lr_scale=lr_scale)
  state, shardings = state_lib.create_train_state(model_def, tx, mesh, rules, int(cfg.seed),
                                                  params=init_params)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['params']))
  n_train = n_params if trainable is None else sum(
      int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(state['params']),
                                            jax.tree.leaves(trainable)) if t)
  if is_main():
    logging.info('params: %s total, %s trainable (%.2f%%); mesh %s', f'{n_params:,}',
                 f'{n_train:,}', 100.0 * n_train / max(n_params, 1), dict(mesh.shape))

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=cc.get('keep', 2),
                                    async_save=cc.get('async_save', True))
  es_cfg = tc.get('early_stopping', None)
  stopper = EarlyStopping(metric=es_cfg.get('metric') if es_cfg else None,
                          mode=es_cfg.get('mode', 'max') if es_cfg else 'max',
                          patience=int(es_cfg.get('patience', 0)) if es_cfg else 0)
  best_ckpt = None
  if stopper.metric and cc.get('keep_best', 1):
    best_ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, 'best'), keep=cc.get('keep_best', 1), async_save=False,
        best_metric=stopper.metric, best_mode=stopper.mode)

  start_step = 0
  abstract = state_lib.abstract_state(shardings, state)
  try:
    restored = ckpt.restore(abstract)
  except checkpointing.NoIntactCheckpoint:
    if not cc.get('allow_fresh_start', False):
      raise
    logging.warning('no intact checkpoint; starting from scratch (checkpoint.allow_fresh_start)')
    restored = None
  if restored is not None:
    start_step, state, data_state, meta = restored
    if data_state.get('train') and hasattr(data.train_iter, 'set_state'):
      data.train_iter.set_state(data_state['train'])
    stopper.load(meta.get('early_stopping', {}))
    logging.info('resumed from %s at step %d', ckpt.directory, start_step)

  train_step = step_lib.make_train_step(
      model_def, task, tx, shardings, mesh, rules, grad_accum=grad_accum, trainable=trainable,
      nonfinite=tc.get('nonfinite', 'skip'), schedule=schedule,
      extra_shardings=None if extra is None else jax.tree.map(lambda x: x.sharding, extra))
  extra_args = () if extra is None else (extra,)
  eval_step = step_lib.make_eval_step(model_def, task, mesh, rules, shardings['params'])
  writer = MetricsWriter(workdir, enabled=is_main())
  log_every = max(int(tc.get('log_every', 50)), 1)
  eval_every = int(tc.get('eval_every', 0) or 0)
  ckpt_every = int(cc.get('every', 0) or 0)
  nonfinite = tc.get('nonfinite', 'skip')

  def data_position():
    get = getattr(data.train_iter, 'get_state', None)
    return {'train': checkpointing.data_state_to_json(get())} if get else {}

  def meta():
    return {'early_stopping': stopper.to_json(), 'num_steps': num_steps}

  def save(step, force=True):
    ckpt.save(step, state, data_position(), meta(), force=force)

  last_eval: dict = {}
  history = []
  pending: list = []
  tokens_since, t_since = 0, time.time()
  step = start_step
  stopped_early = preempted = False
  pbar = tqdm(total=num_steps, initial=start_step, disable=not is_main(), dynamic_ncols=True,
              desc=cfg.get('stage', 'train'))

  def run_eval(step):
    nonlocal last_eval
    if data.eval_batches is None:
      return False
    metrics = evaluate(eval_step, state['params'], data.eval_batches(), mesh, rules,
                       data.summarize)
    last_eval = {f'eval/{k}': v for k, v in metrics.items()}
    writer.write(step, last_eval)
    history.append({'step': step, **last_eval})
    pbar.write(f'step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in last_eval.items()
                                             if isinstance(v, (int, float))))
    stop = False
    if stopper.metric:
      key = stopper.metric if stopper.metric in metrics else stopper.metric.removeprefix('eval/')
      if key not in metrics:
        raise KeyError(f'train.early_stopping.metric={stopper.metric!r} is not an eval metric; '
                       f'available: {sorted(metrics)}')
      stop = stopper.update(float(metrics[key]), step)
      # Save only strict improvements: on a tie Orbax would rank the later step best and
      # (keep_best=1) delete the earlier one the stopper reports; so best/ always holds the
      # stopper's best step as its newest step (which is what init_from/predict load).
      if best_ckpt is not None and stopper.best_step == step:
        best_ckpt.save(step, state, data_position(), meta(),
                       metrics={stopper.metric: float(metrics[key])})
    return stop

  with checkpointing.PreemptionGuard() as guard:
    while step < num_steps:
      local = next(data.train_iter)
      tokens_since += int(np.asarray(local.get('attention_mask', local['input_ids'])).sum()) * \
          jax.process_count()
      state, metrics = train_step(state, step_lib.global_batch(local, mesh, rules), *extra_args)
      step += 1
      pending.append(metrics)
      if nonfinite != 'skip' and not bool(metrics['finite']):
        if nonfinite == 'halt':
          ckpt.wait()  # an async save in flight is the last good state: let it finish
          raise FloatingPointError(
              f'non-finite loss or gradient at step {step} (train.nonfinite=halt); data position '
              f'{data_position()}; last good checkpoint: {ckpt.latest_step()}')
        # rollback: reload the newest checkpoint and carry on past the bad batch
        ckpt.wait()
        restored = ckpt.restore(abstract)
        if restored is None:
          raise FloatingPointError(f'non-finite loss at step {step} and no checkpoint to roll back to')
        bad_pos = data_position()
        skipped = state['skipped']  # the step already counted this one: keep the count
        _, state, _, _ = restored
        state = {**state, 'skipped': skipped}
        logging.warning('non-finite loss at step %d: rolled back to step %d, skipping the bad '
                        'batch (data continues from %s)', step, int(state['step']), bad_pos)
        step = int(state['step'])
        pending.clear()
        continue
      if step % log_every == 0 or step == num_steps:
        host = jax.device_get(pending)
        dt = max(time.time() - t_since, 1e-9)
        logs = {'train/loss': float(np.mean([m['loss'] for m in host])),
                'train/grad_norm': float(np.mean([m['grad_norm'] for m in host])),
                'train/lr': float(host[-1].get('lr', 0.0)),
                'train/tokens_per_sec': tokens_since / dt,
                'train/skipped_steps': int(jax.device_get(state['skipped']))}
        for k in host[-1]:
          if k.endswith('_sum') and 'weight' in host[-1]:
            logs['train/' + k[:-4]] = float(sum(m[k] for m in host) / max(sum(m['weight'] for m in host), 1e-9))
        writer.write(step, logs)
        pbar.set_postfix(loss=f"{logs['train/loss']:.4f}", tok_s=f'{logs["train/tokens_per_sec"]:.0f}')
        pending.clear()
        tokens_since, t_since = 0, time.time()
      pbar.update(1)
      epoch_end = data.steps_per_epoch and step % data.steps_per_epoch == 0
      if ((eval_every and step % eval_every == 0) or epoch_end) and step < num_steps:
        if run_eval(step):
          stopped_early = True
          logging.info('early stopping at step %d: %s did not improve for %d evals (best %.4g at '
                       'step %s)', step, stopper.metric, stopper.patience, stopper.best,
                       stopper.best_step)
          break
      if ckpt_every and step % ckpt_every == 0:
        save(step)
      if guard.should_stop():
        save(step)
        preempted = True
        logging.warning('preempted: saved step %d, exiting cleanly', step)
        break
  pbar.close()
  if not preempted:
    if not stopped_early and data.eval_batches is not None and (
        not history or history[-1]['step'] != step):
      run_eval(step)
    save(step)
  ckpt.wait()

  results = {'stage': cfg.get('stage'), 'step': step, 'preempted': preempted,
             'stopped_early': stopped_early, 'wall_time_sec': time.time() - t_start,
             'params': n_params, 'trainable_params': n_train,
             'trainable_percent': 100.0 * n_train / max(n_params, 1),
             'skipped_steps': int(jax.device_get(state['skipped'])),
             'final': last_eval, 'history': history}
  if stopper.metric:
    results['best'] = {'metric': stopper.metric, 'value': stopper.best, 'step': stopper.best_step}
  if best_ckpt is not None and not preempted and best_ckpt.best_step() is not None:
    # Continue with the best parameters (for the test split, export and predict).
    bs = best_ckpt.best_step()
    _, best_state, _, _ = best_ckpt.restore(abstract, step=bs)
    state = best_state
    results['best']['restored_step'] = bs
  if on_end is not None and not preempted:
    extra = on_end(state, eval_step, mesh, rules)
    if extra:
      results.update(extra)
  if extra_results:
    results.update(extra_results)
  ckpt.close()
  if best_ckpt is not None:
    best_ckpt.close()
  if is_main():
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2, default=_json_default)
  writer.close()
  results['state'] = state
  return results


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)

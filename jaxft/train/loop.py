"""The one train loop: every stage hands it a model, an objective and data.

It owns the mesh, the sharded train state, resume, periodic eval, early stopping,
checkpoints (last K + best K), preemption, logging (tqdm, metrics.jsonl, TensorBoard)
and the results (stages write results.json last, after their exports). It knows no objective: losses and metrics come from the `Objective`, and
what a stage adds (a test-split eval, a speed measurement) comes as `Hook`s.

  train(settings, workdir, model_def, objective, data) -> Outcome
    setup    mesh, optimizer, sharded state, checkpointers, early stopping, compiled steps
    restore  the newest intact checkpoint: state, data position, early-stopping record
    steps    step, log, eval (best checkpoint, early stop), periodic hooks, checkpoint,
             preemption, the non-finite policy
    finish   final eval and save, the best parameters back, hooks at the end
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxft import checkpointing, distributed, partitioning
from jaxft.partitioning import MeshSettings
from jaxft.train import optimizer as optim
from jaxft.train import state as state_lib
from jaxft.train import step as step_lib
from jaxft.train.metrics import MetricsWriter
from jaxft.train.optimizer import OptimizerSettings
from jaxft.trees import dotted

NONFINITE_POLICIES = ('skip', 'halt', 'rollback')


# ----------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class EarlyStoppingSettings:
  """`train.early_stopping`: stop after `patience` evals without improvement (0 = never)."""
  metric: str = ''  # '' = the stage's default (its data's main metric)
  mode: str = 'max'  # max | min
  patience: int = 0  # evals without improvement before stopping; 0 = never

  def __post_init__(self):
    if self.mode not in ('max', 'min'):
      raise ValueError(f"train.early_stopping.mode={self.mode!r}; allowed: 'max', 'min'")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """The `train` config section."""
  num_steps: int = 1000  # optimizer steps; > 0 wins over num_epochs
  num_epochs: int = 0    # fine-tuning with num_steps = 0: num_epochs x steps per epoch
  batch_size: int = 32   # global, over all processes and micro-batches
  grad_accum: int = 1    # micro-batches per step (the same update as one big batch)
  eval_every: int = 200  # steps between evals (also at epoch ends and the last step)
  log_every: int = 50    # steps between train metric lines
  nonfinite: str = 'skip'  # skip | halt | rollback
  max_rollbacks: int = 3   # rollback: consecutive ones without getting past the bad step
  early_stopping: EarlyStoppingSettings = dataclasses.field(
      default_factory=EarlyStoppingSettings)

  def __post_init__(self):
    if self.batch_size <= 0 or self.num_steps < 0:
      raise ValueError('train.batch_size must be > 0 and train.num_steps >= 0')
    if self.grad_accum < 1:
      raise ValueError(f'train.grad_accum={self.grad_accum} must be >= 1')
    if self.batch_size % self.grad_accum:
      raise ValueError(f'train.batch_size={self.batch_size} is not divisible by '
                       f'train.grad_accum={self.grad_accum}')
    if self.max_rollbacks < 1:
      raise ValueError(f'train.max_rollbacks={self.max_rollbacks} must be >= 1')
    if self.nonfinite not in NONFINITE_POLICIES:
      raise ValueError(f'train.nonfinite={self.nonfinite!r}; allowed: '
                       + ', '.join(repr(p) for p in NONFINITE_POLICIES))


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  """The `checkpoint` config section."""
  every: int = 500             # steps between saves; 0 = only at the end / on preemption
  keep: int = 2                # newest checkpoints kept
  keep_best: int = 1           # best checkpoints kept (by the early-stopping metric)
  async_save: bool = True
  allow_fresh_start: bool = False  # start over when every checkpoint is damaged
  reset_optimizer: bool = False  # resume the params of a run whose optimizer setup changed


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """Everything the loop reads, parsed once by the stage."""
  train: TrainSettings
  checkpoint: CheckpointSettings
  optimizer: OptimizerSettings
  mesh: MeshSettings
  seed: int = 0
  name: str = 'train'  # the stage, for the progress bar and results.json


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings:
  """The config keys of every training stage: a stage's settings class extends this one and
  adds its own sections (its fields are the config's keys: jaxft.config.parse_settings)."""
  stage: str = 'train'
  seed: int = 0
  train: TrainSettings
  checkpoint: CheckpointSettings
  optimizer: OptimizerSettings
  mesh: MeshSettings

  @property
  def loop(self) -> LoopSettings:
    return LoopSettings(train=self.train, checkpoint=self.checkpoint, optimizer=self.optimizer,
                        mesh=self.mesh, seed=self.seed, name=self.stage)


# ----------------------------------------------------------------------------- interface

@dataclasses.dataclass
class Data:
  train_iter: Any                                   # checkpointable iterator of local batches
  eval_batches: Callable[[], Iterable[dict]] | None = None  # fresh pass over eval data
  summarize: Callable[[dict, dict], dict] | None = None     # (sums, per_example) -> metrics
  steps_per_epoch: int = 0  # > 0: also evaluate at every epoch end


@dataclasses.dataclass(frozen=True)
class Start:
  """Where a run starts: the model, its initial params (host arrays; None = fresh init from
  the seed), which leaves train (a bool tree; None = all) and their learning-rate multipliers
  (None = 1)."""
  model_def: state_lib.ModelDef
  params: Any = None
  trainable: Any = None
  lr_scale: Any = None


@dataclasses.dataclass
class Trained:
  """What a hook sees: the parameters after `step` and the loop's mesh to run them on."""
  step: int
  params: Any
  mesh: Any
  rules: Any
  eval_step: Callable  # the objective's jitted evaluate(params, batch)

  def evaluate(self, batches: Iterable[dict], summarize=None) -> dict:
    return evaluate(self.eval_step, self.params, batches, self.mesh, self.rules, summarize)

  def placed(self, model_def: state_lib.ModelDef) -> 'Placed':
    """These parameters as `model_def` (to run them with another objective)."""
    return Placed(model_def, self.params, self.mesh, self.rules)


@dataclasses.dataclass(frozen=True)
class Hook:
  """What a stage adds to the loop: `fn(trained)` -> a dict of host values (or None).

  Runs every `every` steps (0: never during training; its values go to metrics.jsonl as
  `<name>/<key>`) and, with `at_end`, once after training on the parameters the run ends
  with (the best ones when best/ holds some); that last output is results[name]."""
  name: str
  fn: Callable[[Trained], dict | None]
  every: int = 0
  at_end: bool = True


@dataclasses.dataclass
class Outcome:
  results: dict  # host values only (what the stage writes to results.json)
  state: Any     # the train state the run ends with, on device (best/ restored if any)

  @property
  def params(self):
    return self.state['params']


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


@dataclasses.dataclass
class Placed:
  """A model's parameters on a mesh, and its jitted eval steps: how a model runs outside
  the train loop (a teacher, a model to predict with, a previous task's model). The loop
  owns meshes: a stage calls `place` with its mesh settings and never builds one."""
  model_def: state_lib.ModelDef
  params: Any
  mesh: Any
  rules: Any

  @property
  def data_parallel_size(self) -> int:
    return partitioning.data_parallel_size(self.mesh, self.rules)

  def eval_step(self, objective: step_lib.Objective) -> Callable:
    return step_lib.make_eval_step(self.model_def, objective, self.mesh, self.rules,
                                   jax.tree.map(lambda x: x.sharding, self.params))

  def evaluate(self, objective: step_lib.Objective, batches: Iterable[dict],
               summarize=None) -> dict:
    return evaluate(self.eval_step(objective), self.params, batches, self.mesh, self.rules,
                    summarize)


def place(mesh_settings: MeshSettings, model_def: state_lib.ModelDef, params) -> Placed:
  """`params` (host arrays) sharded by their logical axes on the mesh `mesh_settings` builds
  (the same settings build the same mesh as the loop's)."""
  mesh, rules = mesh_settings.build()
  return Placed(model_def, jax.device_put(params, model_def.param_shardings(mesh, rules)),
                mesh, rules)


def check_layout(mesh_settings: MeshSettings, train: TrainSettings | None,
                 num_devices: int) -> None:
  """ValueError unless the mesh fits `num_devices` and each global batch splits into whole
  rows per data-parallel shard (and per process), checked before anything is built."""
  dims = partitioning.mesh_shape(mesh_settings, num_devices)
  if train is None:
    return
  rules = partitioning.rules_from_config(mesh_settings.rules)
  dp = partitioning.data_parallel_size_of(dims, rules)
  if train.batch_size % (dp * train.grad_accum):
    raise ValueError(f'train.batch_size={train.batch_size} is not divisible by the '
                     f'data-parallel size {dp} (mesh.data*mesh.fsdp) x train.grad_accum='
                     f'{train.grad_accum}')
  if jax.process_count() > 1:  # every process must hold whole rows of each global batch
    distributed.check_batch_layout(partitioning.make_mesh(mesh_settings), rules,
                                   train.batch_size, jax.process_count())


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class _Run:
  """What the sections of one `train` call share."""
  settings: LoopSettings
  workdir: str
  data: Data
  mesh: Any
  rules: Any
  state: Any
  abstract: Any
  train_step: Callable
  eval_step: Callable
  constants: tuple
  ckpt: checkpointing.Checkpointer
  best_ckpt: checkpointing.Checkpointer | None
  stopper: EarlyStopping
  writer: MetricsWriter
  n_params: int
  n_train: int
  step: int = 0
  history: list = dataclasses.field(default_factory=list)
  last_eval: dict = dataclasses.field(default_factory=dict)
  stopped_early: bool = False
  preempted: bool = False
  finished: bool = False      # restored from a run that had already ended: train no more
  wall_before: float = 0.0    # training time of earlier sessions of this run
  wall_final: float | None = None  # fixed when training ends (saved, and in the results)
  t_start: float = dataclasses.field(default_factory=time.time)
  rollbacks: int = 0          # consecutive rollbacks without getting past the bad step
  bad_step: int = 0

  def data_position(self) -> dict:
    get = getattr(self.data.train_iter, 'get_state', None)
    return {'train': checkpointing.data_state_to_json(get())} if get else {}

  def wall_time(self) -> float:
    if self.wall_final is not None:
      return self.wall_final
    return self.wall_before + (0.0 if self.finished else time.time() - self.t_start)

  def meta(self) -> dict:
    """What a resume needs beside the state and data position: the early-stopping record and
    the eval history, so a restarted run ends with the same results."""
    return {'early_stopping': self.stopper.to_json(), 'num_steps': self.settings.train.num_steps,
            'history': self.history, 'stopped_early': self.stopped_early,
            'wall_time_sec': self.wall_time()}

  def save(self, step: int):
    self.ckpt.save(step, self.state, self.data_position(), self.meta(), force=True)

  def trained(self) -> Trained:
    return Trained(self.step, self.state['params'], self.mesh, self.rules, self.eval_step)


def train(settings: LoopSettings, workdir: str, start: Start, objective: step_lib.Objective,
          data: Data, *, constants=None, hooks: Iterable[Hook] = ()) -> Outcome:
  """Train `start` until `train.num_steps` (or early stop / preemption).

  `constants`: a pytree of
  jax.Arrays sharded on this run's mesh (e.g. a frozen teacher's params), handed to every
  step and to the objective's loss as `constants=`; never trained, donated or checkpointed.
  """
  hooks = tuple(hooks)
  run = _setup(settings, workdir, start, objective, data, constants)
  _restore(run)
  if not run.finished:
    _steps(run, hooks)
  return _finish(run, hooks)


def _setup(settings, workdir, start: Start, objective, data, constants) -> _Run:
  tc, cc = settings.train, settings.checkpoint
  model_def, trainable = start.model_def, start.trainable
  mesh, rules = settings.mesh.build()
  dp = partitioning.data_parallel_size(mesh, rules)
  if tc.batch_size % (dp * tc.grad_accum):
    raise ValueError(f'train.batch_size={tc.batch_size} must be divisible by data-parallel size '
                     f'({dp}) x train.grad_accum ({tc.grad_accum})')
  tx, schedule = optim.make_optimizer(settings.optimizer, tc.num_steps,
                                      model_def.abstract_params, trainable=trainable,
                                      lr_scale=start.lr_scale)
  state, shardings = state_lib.create_train_state(model_def, tx, mesh, rules, settings.seed,
                                                  params=start.params)
  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(state['params'])]
  n_params = sum(sizes)
  n_train = n_params if trainable is None else sum(
      n for n, t in zip(sizes, jax.tree.leaves(trainable)) if t)
  if is_main():
    logging.info('params: %s total, %s trainable (%.2f%%); mesh %s', f'{n_params:,}',
                 f'{n_train:,}', 100.0 * n_train / max(n_params, 1), dict(mesh.shape))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=cc.keep,
                                    async_save=cc.async_save)
  es = tc.early_stopping
  stopper = EarlyStopping(metric=es.metric or None, mode=es.mode, patience=es.patience)
  best_ckpt = None
  if stopper.metric and cc.keep_best:
    best_ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, 'best'), keep=cc.keep_best, async_save=False,
        best_metric=stopper.metric, best_mode=stopper.mode)
  train_step = step_lib.make_train_step(
      model_def, objective, tx, shardings, mesh, rules, grad_accum=tc.grad_accum,
      trainable=trainable, nonfinite=tc.nonfinite, schedule=schedule,
      constants_shardings=None if constants is None else jax.tree.map(lambda x: x.sharding,
                                                                     constants))
  eval_step = step_lib.make_eval_step(model_def, objective, mesh, rules, shardings['params'])
  return _Run(settings, workdir, data, mesh, rules, state,
              state_lib.abstract_state(shardings, state), train_step, eval_step,
              () if constants is None else (constants,), ckpt, best_ckpt, stopper,
              MetricsWriter(workdir, enabled=is_main()), n_params, n_train)


def _restore(run: _Run):
  latest = run.ckpt.latest_step()
  saved = run.ckpt.saved_structure(latest) if latest is not None else {}
  changed = _structure_change(saved, run.abstract) if saved else {}
  if changed:
    return _restore_params_only(run, latest, changed)
  try:
    restored = run.ckpt.restore(run.abstract)
  except checkpointing.NoIntactCheckpoint:
    if not run.settings.checkpoint.allow_fresh_start:
      raise
    logging.warning('no intact checkpoint; starting from scratch (checkpoint.allow_fresh_start)')
    restored = None
  if restored is None:
    return
  run.step, run.state, data_state, meta = restored
  if data_state.get('train') and hasattr(run.data.train_iter, 'set_state'):
    run.data.train_iter.set_state(data_state['train'])
  run.stopper.load(meta.get('early_stopping', {}))
  run.history = list(meta.get('history', []))
  run.last_eval = {k: v for k, v in run.history[-1].items() if k != 'step'} if run.history else {}
  run.wall_before = float(meta.get('wall_time_sec', 0.0))
  run.stopped_early = bool(meta.get('stopped_early', False))
  run.finished = run.stopped_early or run.step >= run.settings.train.num_steps
  logging.info('resumed from %s at step %d%s', run.ckpt.directory, run.step,
               ' (the run had ended: only its outputs are finished)' if run.finished else '')


def _structure_change(saved: dict, abstract) -> dict[str, str]:
  """{path: 'saved ..., built ...'} of what differs between a checkpoint's state and the one
  this run builds (checked before a restore: a changed setup is not damage)."""
  built = {dotted(p): (tuple(x.shape), str(x.dtype))
           for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  return {k: f'saved {saved.get(k, "absent")}, built {built.get(k, "absent")}'
          for k in sorted(set(saved) | set(built)) if saved.get(k) != built.get(k)}


def _restore_params_only(run: _Run, step: int, changed: dict[str, str]):
  """checkpoint.reset_optimizer: the params (and step, rng) of `step` with a fresh optimizer
  state; otherwise a StateMismatch saying what changed and what the options are."""
  where = f'{run.ckpt.directory}/{step}'
  params_differ = any(k.startswith('params.') for k in changed)
  what = f'{len(changed)} entries differ, e.g. ' + '; '.join(
      f'{k}: {v}' for k, v in list(changed.items())[:3])
  if params_differ or not run.settings.checkpoint.reset_optimizer:
    raise checkpointing.StateMismatch(
        f'{where} holds a train state of another structure than this config builds ({what}). '
        'A changed optimizer.clip_norm / weight_decay, peft.*, finetune.freeze_* or '
        'model.param_dtype does this. Rerun with the settings the run started with'
        + ('' if params_differ else ', or set checkpoint.reset_optimizer=True to continue from '
           'its parameters with a fresh optimizer state (the Adam moments start over)')
        + ', or use a new --workdir (init_from the old one to start from its weights)')
  keep = ('params', 'step', 'rng', 'skipped')
  subset, data_state, meta = run.ckpt.restore_subset({k: run.abstract[k] for k in keep}, step)
  run.state = {**run.state, **subset}
  run.step = step
  if data_state.get('train') and hasattr(run.data.train_iter, 'set_state'):
    run.data.train_iter.set_state(data_state['train'])
  run.stopper.load(meta.get('early_stopping', {}))
  run.history = list(meta.get('history', []))
  logging.warning('resumed the parameters of %s with a fresh optimizer state '
                  '(checkpoint.reset_optimizer): %s', where, what)


def _steps(run: _Run, hooks: tuple[Hook, ...]):
  tc, num_steps = run.settings.train, run.settings.train.num_steps
  log_every, eval_every = max(tc.log_every, 1), tc.eval_every or 0
  ckpt_every = run.settings.checkpoint.every or 0
  periodic = [h for h in hooks if h.every]
  logger = _TrainLog(run)
  pbar = _Progress(num_steps, run.step, run.settings.name)
  with checkpointing.PreemptionGuard() as guard:
    while run.step < num_steps:
      local = next(run.data.train_iter)
      logger.count_tokens(local)
      run.state, metrics = run.train_step(
          run.state, step_lib.global_batch(local, run.mesh, run.rules), *run.constants)
      run.step += 1
      logger.pending.append(metrics)
      if tc.nonfinite != 'skip' and not bool(metrics['finite']):
        _nonfinite(run, logger)
        pbar.reset_to(run.step)
        continue
      if run.step > run.bad_step:
        run.rollbacks = 0
      pbar.dispatched(run.step, metrics['loss'])
      if run.step % log_every == 0 or run.step == num_steps:
        logger.write(pbar)
      epoch_end = run.data.steps_per_epoch and run.step % run.data.steps_per_epoch == 0
      if ((eval_every and run.step % eval_every == 0) or epoch_end) and run.step < num_steps:
        if _eval(run, pbar):
          run.stopped_early = True
          s = run.stopper
          logging.info('early stopping at step %d: %s did not improve for %d evals (best %.4g '
                       'at step %s)', run.step, s.metric, s.patience, s.best, s.best_step)
          break
      for hook in periodic:
        if run.step % hook.every == 0:
          run.writer.write(run.step, {f'{hook.name}/{k}': v
                                      for k, v in (hook.fn(run.trained()) or {}).items()})
      if ckpt_every and run.step % ckpt_every == 0:
        run.save(run.step)
      if guard.should_stop():
        run.save(run.step)
        run.preempted = True
        logging.warning('preempted: saved step %d, exiting cleanly', run.step)
        break
  pbar.close()


class _Progress:
  """A progress bar of finished steps: a step counts once its loss is computed (steps are
  dispatched ahead of the device, so counting dispatches would run ahead, then stall)."""

  def __init__(self, total: int, initial: int, desc: str):
    self.bar = tqdm(total=total, initial=initial, disable=not is_main(), dynamic_ncols=True,
                    desc=desc)
    self.pending: list = []  # (step, loss) dispatched, not yet counted

  def dispatched(self, step: int, loss):
    self.pending.append((step, loss))
    self._count(wait=False)

  def _count(self, wait: bool):
    while self.pending and (wait or self.pending[0][1].is_ready()):
      step, _ = self.pending.pop(0)
      self.bar.update(step - self.bar.n)

  def reset_to(self, step: int):
    self.pending.clear()
    self.bar.n = step
    self.bar.refresh()

  def set_postfix(self, **kw):
    self._count(wait=True)  # the caller has the step's metrics: every step before is done
    self.bar.set_postfix(**kw)

  def write(self, line: str):
    self.bar.write(line)

  def close(self):
    self._count(wait=True)
    self.bar.close()


class _TrainLog:
  """Train metrics of the steps since the last log line, averaged when written."""

  def __init__(self, run: _Run):
    self.run = run
    self.pending: list = []
    self.tokens, self.since = 0, time.time()

  def count_tokens(self, local: dict):
    self.tokens += int(np.asarray(local.get('attention_mask', local['input_ids'])).sum()) * \
        jax.process_count()

  def write(self, pbar):
    host = jax.device_get(self.pending)
    dt = max(time.time() - self.since, 1e-9)
    logs = {'train/loss': float(np.mean([m['loss'] for m in host])),
            'train/grad_norm': float(np.mean([m['grad_norm'] for m in host])),
            'train/lr': float(host[-1].get('lr', 0.0)),
            'train/tokens_per_sec': self.tokens / dt,
            'train/skipped_steps': int(jax.device_get(self.run.state['skipped']))}
    for k in host[-1]:
      if k.endswith('_sum') and 'weight' in host[-1]:
        logs['train/' + k[:-4]] = float(sum(m[k] for m in host) /
                                        max(sum(m['weight'] for m in host), 1e-9))
    self.run.writer.write(self.run.step, logs)
    pbar.set_postfix(loss=f"{logs['train/loss']:.4f}", tok_s=f'{logs["train/tokens_per_sec"]:.0f}')
    self.pending.clear()
    self.tokens, self.since = 0, time.time()


def _nonfinite(run: _Run, logger: _TrainLog):
  """train.nonfinite=halt: stop with the last good checkpoint named; rollback: reload the
  newest checkpoint and carry on past the bad batch."""
  run.ckpt.wait()  # an async save in flight is the last good state: let it finish
  if run.settings.train.nonfinite == 'halt':
    raise FloatingPointError(
        f'non-finite loss or gradient at step {run.step} (train.nonfinite=halt); data position '
        f'{run.data_position()}; last good checkpoint: {run.ckpt.latest_step()}')
  restored = run.ckpt.restore(run.abstract)
  if restored is None:
    raise FloatingPointError(f'non-finite loss at step {run.step} and no checkpoint to roll '
                             'back to')
  run.rollbacks += 1
  run.bad_step = max(run.bad_step, run.step)
  limit = run.settings.train.max_rollbacks
  if run.rollbacks > limit:
    raise FloatingPointError(
        f'non-finite loss at step {run.step} again: {limit} rollbacks in a row to step '
        f'{restored[0]} did not get past step {run.bad_step}, so the cause is not one bad batch '
        '(a learning rate too high? broken data?); halting. The checkpoints are intact: fix the '
        'cause and rerun, or raise train.max_rollbacks')
  bad_pos = run.data_position()
  skipped = run.state['skipped']  # the step already counted this one: keep the count
  _, state, _, _ = restored
  run.state = {**state, 'skipped': skipped}
  logging.warning('non-finite loss at step %d: rolled back to step %d, skipping the bad batch '
                  '(data continues from %s)', run.step, int(run.state['step']), bad_pos)
  run.step = int(run.state['step'])
  logger.pending.clear()


def _eval(run: _Run, pbar=None) -> bool:
  """Evaluate, log, keep the best checkpoint; True when early stopping says stop."""
  if run.data.eval_batches is None:
    return False
  metrics = evaluate(run.eval_step, run.state['params'], run.data.eval_batches(), run.mesh,
                     run.rules, run.data.summarize)
  run.last_eval = {f'eval/{k}': v for k, v in metrics.items()}
  run.writer.write(run.step, run.last_eval)
  run.history.append({'step': run.step, **run.last_eval})
  line = f'step {run.step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in run.last_eval.items()
                                          if isinstance(v, (int, float)))
  if is_main():  # one eval line per run, not one per process
    (pbar.write if pbar is not None else tqdm.write)(line)
  stopper = run.stopper
  if not stopper.metric:
    return False
  key = stopper.metric if stopper.metric in metrics else stopper.metric.removeprefix('eval/')
  if key not in metrics:
    raise KeyError(f'train.early_stopping.metric={stopper.metric!r} is not an eval metric; '
                   f'available: {sorted(metrics)}')
  stop = stopper.update(float(metrics[key]), run.step)
  # Save only strict improvements: on a tie Orbax would rank the later step best and
  # (keep_best=1) delete the earlier one the stopper reports; so best/ always holds the
  # stopper's best step as its newest step (which is what init_from/predict load).
  if run.best_ckpt is not None and stopper.best_step == run.step:
    run.best_ckpt.save(run.step, run.state, run.data_position(), run.meta(),
                       metrics={stopper.metric: float(metrics[key])})
  return stop


def _finish(run: _Run, hooks: tuple[Hook, ...]) -> Outcome:
  if not run.preempted:
    if not run.stopped_early and run.data.eval_batches is not None and (
        not run.history or run.history[-1]['step'] != run.step):
      _eval(run)
    run.wall_final = run.wall_time()
    run.save(run.step)  # a no-op for a finished run restarted: that step is saved
  run.ckpt.wait()
  results = {'stage': run.settings.name, 'step': run.step, 'preempted': run.preempted,
             'stopped_early': run.stopped_early, 'wall_time_sec': run.wall_time(),
             'params': run.n_params, 'trainable_params': run.n_train,
             'trainable_percent': 100.0 * run.n_train / max(run.n_params, 1),
             'skipped_steps': int(jax.device_get(run.state['skipped'])),
             'final': run.last_eval, 'history': run.history}
  if run.stopper.metric:
    results['best'] = {'metric': run.stopper.metric, 'value': run.stopper.best,
                       'step': run.stopper.best_step}
  if run.best_ckpt is not None and not run.preempted and run.best_ckpt.best_step() is not None:
    # Continue with the best parameters (for the test split, export and predict).
    best = run.best_ckpt.best_step()
    _, run.state, _, _ = run.best_ckpt.restore(run.abstract, step=best)
    results['best']['restored_step'] = best
  if not run.preempted:
    for hook in hooks:
      if hook.at_end:
        results[hook.name] = hook.fn(run.trained())
  run.ckpt.close()
  if run.best_ckpt is not None:
    run.best_ckpt.close()
  run.writer.close()
  return Outcome(results, run.state)

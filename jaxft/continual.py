"""Continual learning: fine-tune a `finetune_cls` model on a new task without forgetting the
earlier one (the `continual` section of stage finetune_cls).

The new model starts from the previous workdir's encoder with a fresh head for the new task
and carries the previous task's head beside it (`previous_head`, a parameter group of the
train state), so the earlier task stays scoreable with the new encoder: at the end its dev
metrics go to results.json and workdir/previous_task/ is a finetune_cls workdir of the
earlier task (the new encoder under the previous head) that `predict`, `init_from` and a
later `continual.previous` read like any other.

  none    plain fine-tuning from the previous model: the baseline (previous head frozen)
  replay  a fixed share of every batch is previous-task training data, trained through the
          previous head on its own labels
  l2sp    + l2sp_weight * ||theta - theta_prev||^2 over the shared encoder (Li et al., 2018)
  lwf     + lwf_weight * T^2 KL(previous model || previous head on the new encoder) on the
          new data (Learning without Forgetting, Li & Hoiem, 2016; distill.py's KL)

Every extra term is a per-example sum with the fine-tuning weights (replay, LwF) or the
penalty times the batch's weight (L2-SP), so `sums['weight']` normalises all of them and
gradient accumulation equals one big batch.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import checkpointing, finetuning, kinds, sources
from jaxft.data import classification as cls_data
from jaxft.data import loader as loader_lib
from jaxft.data.tokenizer import load_tokenizer
from jaxft.distill import teacher as teacher_lib
from jaxft.models import build_model
from jaxft.models.bert import classifier_head
from jaxft.models.config import ModelConfig
from jaxft.objectives import classification, distill
from jaxft.sources import PREVIOUS_HEAD
from jaxft.train import loop
from jaxft.train import optimizer as optim
from jaxft.train.state import ModelDef
from jaxft.train.step import Objective
from jaxft.trees import flat_params, map_named

HEAD = 'classifier'  # BERT's task head: everything else is the shared encoder
PREVIOUS_TASK = 'previous_task'  # workdir/previous_task: the earlier task, new encoder


@dataclasses.dataclass(frozen=True)
class Method:
  """What a continual method changes in the fine-tune: the rows it trains on, the term its
  loss adds on the new rows, and what the step reads."""
  name: str
  replays: bool = False          # batches mix earlier-task rows, each through its own head
  anchored: bool = False         # the step reads the previous model's params (constants)
  trains_previous_head: bool = False  # a loss reaches the previous head (else it is frozen)
  term: Callable | None = None   # (c, previous, model, out, args, w, sums, constants,
  #                                deterministic, rngs) -> the added loss (its sum in sums)


def _l2sp_term(c, previous, model, out, args, w, sums, constants, deterministic, rngs):
  sums['l2sp_sum'] = l2sp_penalty(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                  constants) * sums['weight']
  return c.l2sp_weight * sums['l2sp_sum']


def _lwf_term(c, previous, model, out, args, w, sums, constants, deterministic, rngs):
  mine = previous_logits(model, out, deterministic, rngs)
  theirs = previous.model_def.merge(jax.lax.stop_gradient(constants))(*args)['logits']
  soft = (distill.squared_error(mine, theirs) if previous.is_regression else
          distill.kl_soft_targets(mine, theirs, c.lwf_temperature))
  sums['lwf_sum'] = (soft * w).sum()
  return c.lwf_weight * sums['lwf_sum']


METHODS = {m.name: m for m in (
    Method('none'),
    Method('replay', replays=True, trains_previous_head=True),
    Method('l2sp', anchored=True, term=_l2sp_term),
    Method('lwf', anchored=True, trains_previous_head=True, term=_lwf_term),
)}


@dataclasses.dataclass(frozen=True)
class ContinualSettings:
  """The `continual` config section (stage finetune_cls)."""
  previous: str = ''            # finetune_cls workdir of the earlier task; '' = off
  method: str = ''              # none | replay | l2sp | lwf (required with previous)
  replay_fraction: float = 0.2  # replay: share of every batch drawn from the earlier task
  l2sp_weight: float = 0.01     # l2sp: weight of ||theta - theta_prev||^2 (shared encoder)
  lwf_weight: float = 1.0       # lwf: weight of the distillation term on the new data
  lwf_temperature: float = 2.0  # lwf: softmax temperature of that term

  def __post_init__(self):
    if self.method and self.method not in METHODS:
      raise ValueError(f'continual.method={self.method!r}; allowed: {", ".join(METHODS)}')
    if self.previous and not self.method:
      raise ValueError(f'continual.previous is set: choose continual.method, one of '
                       f'{", ".join(METHODS)} (none = plain fine-tuning, the baseline)')
    if self.method and not self.previous:
      raise ValueError(f'continual.method={self.method!r} needs continual.previous (the '
                       'finetune_cls workdir of the earlier task)')
    if not 0.0 < self.replay_fraction < 1.0:
      raise ValueError(f'continual.replay_fraction={self.replay_fraction} must be in (0, 1)')
    for key in ('l2sp_weight', 'lwf_weight'):
      if getattr(self, key) < 0:
        raise ValueError(f'continual.{key}={getattr(self, key)} must be >= 0')
    if self.lwf_temperature <= 0:
      raise ValueError(f'continual.lwf_temperature={self.lwf_temperature} must be > 0')

  @property
  def enabled(self) -> bool:
    return bool(self.previous)

  @property
  def method_spec(self) -> Method:
    return METHODS[self.method or 'none']


# ----------------------------------------------------------------------------- checks

def check_previous(c: ContinualSettings, init_from: str, data_tokenizer: str
                   ) -> sources.Source:
  """The previous workdir, resolved, after every check that needs no data or devices; a
  ValueError naming the key otherwise."""
  path = c.previous
  where = f'continual.previous={path!r}'
  if not sources.is_jaxft_workdir(path):
    raise ValueError(f'{where} is not a jaxft workdir (config.json + checkpoints/): give the '
                     'finetune_cls workdir of the earlier task')
  previous = sources.resolve(path, 'continual.previous')
  task = previous.task
  if task is None or task.kind != 'cls' or previous.stage != 'finetune_cls':
    raise ValueError(f'{where} is not a finetune_cls workdir (stage {previous.stage!r}, '
                     f'labels.json {"kind " + repr(task.kind) if task else "absent"})')
  if previous.peft.enabled:
    raise ValueError(f'{where} was trained with peft.*: continual learning needs a fully '
                     'fine-tuned previous model')
  if task.model_type != 'bert':
    raise ValueError(f'{where} is a {task.model_type} model: continual.* supports BERT')
  if init_from and os.path.abspath(init_from) != os.path.abspath(path):
    raise ValueError(f'init_from={init_from!r} and {where} differ: a continual fine-tune '
                     'starts from the previous model; leave init_from unset')
  if data_tokenizer:
    mine, theirs = load_tokenizer(data_tokenizer), previous.tokenizer()
    if mine.get_vocab() != theirs.get_vocab():
      raise ValueError(f'data.tokenizer={data_tokenizer!r} is a different tokenizer from '
                       f'{where}/tokenizer: the new task, the replayed data and the previous '
                       'model must read the same token ids (set data.tokenizer to '
                       f'{os.path.join(path, "tokenizer")!r} or \'\')')
  return previous


# ----------------------------------------------------------------------------- the earlier task

@dataclasses.dataclass
class Previous:
  """The earlier task: its workdir, labels, data section (at this run's max_len), and its
  model (architecture, definition, host params: encoder + head)."""
  path: str
  task: sources.TaskInfo
  data: cls_data.ClsData
  mcfg: ModelConfig
  model_def: ModelDef
  params: dict

  @property
  def is_regression(self) -> bool:
    return self.task.is_regression

  @property
  def num_labels(self) -> int:
    return self.task.num_labels


def load_previous(c: ContinualSettings, mcfg: ModelConfig, max_len: int,
                  seed: int = 0) -> Previous:
  """The previous workdir's model (forward only: no dropout) and its data section."""
  source = check_previous(c, '', '')
  data = dataclasses.replace(kinds.CLS.trained_data(source), max_len=max_len,
                             class_balance='none')
  pmcfg = source.model_config(mcfg.vocab_size).with_runtime_of(mcfg).replace(
      hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0, remat=False)
  n = source.task.num_labels
  model_def = ModelDef.create(lambda: build_model(pmcfg, 'cls', num_labels=n, seed=seed))
  params = teacher_lib.read_params(source, model_def, 'cls')
  return Previous(c.previous, source.task, data, pmcfg, model_def, params)


def model_def(mcfg: ModelConfig, num_labels: int, previous: Previous, seed: int) -> ModelDef:
  """The new task's classifier with the previous task's head beside it (`previous_head`)."""
  def build():
    model = build_model(mcfg, 'cls', num_labels=num_labels, seed=seed)
    model.previous_head = classifier_head(mcfg, previous.num_labels, nnx.Rngs(params=seed + 1))
    return model
  return ModelDef.create(build)


def init_params(previous: Previous, mdef: ModelDef):
  """(host params, report): the encoder and the previous head from the previous model, the
  new task's head fresh (whatever its shape: a new task gets a new head)."""
  source = {}
  for name, x in flat_params(previous.params).items():
    if name.startswith(HEAD + '.'):
      source[PREVIOUS_HEAD + name[len(HEAD):]] = x
    else:
      source[name] = x
  values, report = sources.match_params(mdef.abstract_params, source, previous.path)
  return sources.complete(mdef, values), report


def trainable(method: Method, mask, mdef: ModelDef):
  """The trainable mask with the previous head frozen unless a loss reaches it (replay,
  lwf): AdamW's weight decay would otherwise shrink it without any gradient."""
  if method.trains_previous_head:
    return mask
  base = mask if mask is not None else jax.tree.map(lambda _: True, mdef.abstract_params)
  return map_named(lambda name, t: bool(t) and not name.startswith(PREVIOUS_HEAD + '.'), base)


def without_previous_head(params):
  """The new task's model alone (what export/ holds)."""
  return {k: v for k, v in params.items() if k != PREVIOUS_HEAD}


def constants(previous: Previous, method: Method, mesh_settings):
  """The previous model's params on the run's mesh (L2-SP's anchor, LwF's teacher), or
  None."""
  if not method.anchored:
    return None
  return loop.place(mesh_settings, previous.model_def, previous.params).params


# ----------------------------------------------------------------------------- objectives

def _rngs(rng, deterministic):
  return None if deterministic else nnx.Rngs(dropout=rng)


def previous_logits(model, out, deterministic: bool, rngs):
  """The previous head on this model's encoder output (`out`), as the model's own head."""
  x = model.dropout(out[model.feature], deterministic=deterministic, rngs=rngs)
  return getattr(model, PREVIOUS_HEAD)(x).astype(jnp.float32)


class PreviousHeadView:
  """The model seen through its previous head: calls return the previous task's logits, so
  classification's evaluate (and metrics) serve the earlier task unchanged."""

  def __init__(self, model):
    self.model = model

  def __call__(self, *args, deterministic=True, rngs=None, **kw):
    out = self.model(*args, deterministic=deterministic, rngs=rngs, **kw)
    return {**out, 'logits': previous_logits(self.model, out, deterministic, rngs)}


def l2sp_penalty(params, previous_params):
  """sum ||theta - theta_prev||^2 in fp32 over the encoder tensors both models hold (every
  tensor of the previous model but its head)."""
  mine, theirs = flat_params(params), flat_params(previous_params)
  names = sorted(k for k in theirs if not k.startswith(HEAD + '.') and k in mine)
  return sum(jnp.sum(jnp.square(mine[k].astype(jnp.float32) -
                                jax.lax.stop_gradient(theirs[k]).astype(jnp.float32)))
             for k in names)


def objective(c: ContinualSettings, previous: Previous, num_labels: int, is_regression: bool,
              label_smoothing: float = 0.0) -> Objective:
  """The new task's classification loss plus the method's term; evaluation is the new
  task's."""
  base = classification.cls(num_labels, is_regression, label_smoothing=label_smoothing)
  how = c.method_spec
  if not (how.replays or how.term):
    return base

  def loss(model, batch, rng, deterministic, constants=None):
    rngs = _rngs(rng, deterministic)
    args = classification.inputs(batch)
    out = model(*args, deterministic=deterministic, rngs=rngs)
    w = classification.example_weights(batch, out['logits'])
    if how.replays:
      return _replay_sums(model, out, batch, w, deterministic, rngs, is_regression,
                          previous.is_regression, label_smoothing)
    loss_sum, sums = classification.hard_loss(out['logits'], batch['labels'], w, is_regression,
                                              label_smoothing)
    return loss_sum + how.term(c, previous, model, out, args, w, sums, constants,
                               deterministic, rngs), sums

  return Objective(loss=loss, evaluate=base.evaluate)


def _replay_sums(model, out, batch, w, deterministic, rngs, is_regression, prev_regression,
                 label_smoothing):
  """Each row's loss through its own task's head: `task` 0 = new (labels), 1 = previous
  (previous_labels, previous head)."""
  old = batch['task'].astype(jnp.float32)
  new_sum, new = classification.hard_loss(out['logits'], batch['labels'], w * (1.0 - old),
                                          is_regression, label_smoothing)
  old_sum, prev = classification.hard_loss(previous_logits(model, out, deterministic, rngs),
                                           batch['previous_labels'], w * old, prev_regression,
                                           label_smoothing)
  sums = {'weight': new['weight'] + prev['weight'], 'replay_loss_sum': old_sum,
          'replay_weight': prev['weight']}
  return new_sum + old_sum, sums


# ----------------------------------------------------------------------------- replay data

def replay_rows(batch_size: int, fraction: float) -> tuple[int, int]:
  """(new, previous) rows of every batch: round(fraction * batch) of the earlier task."""
  n_old = int(round(fraction * batch_size))
  if not 0 < n_old < batch_size:
    raise ValueError(f'continual.replay_fraction={fraction} of train.batch_size={batch_size} '
                     f'gives {n_old} replayed rows per batch: it must give 1 to '
                     f'{batch_size - 1}')
  return batch_size - n_old, n_old


def _tagged(arrays: dict, task: int, other: dict, mine_key: str, other_key: str) -> dict:
  """`arrays` with the keys of both tasks: `task`, its labels under `mine_key`, zeros (never
  read: weight 0) under `other_key`, and weights 1 where only the other split has them."""
  out = {k: v for k, v in arrays.items() if k not in ('word_ids', 'labels')}
  n = len(arrays['input_ids'])
  out[mine_key] = arrays['labels']
  out[other_key] = np.zeros((n,), other['labels'].dtype)
  out['task'] = np.full((n,), task, np.int32)
  if 'weights' in other and 'weights' not in out:
    out['weights'] = np.ones((n,), np.float32)
  return out


class ReplayStream:
  """Global batches of `n_new` new-task rows then `n_old` earlier-task rows (two loaders,
  each shuffled and repeated on its own): every batch holds exactly the configured share.
  Checkpointable like the loader it replaces (both positions)."""

  def __init__(self, new_arrays: dict, old_arrays: dict, batch_size: int, fraction: float,
               seed: int):
    self.n_new, self.n_old = replay_rows(batch_size, fraction)
    new = _tagged(new_arrays, 0, old_arrays, 'labels', 'previous_labels')
    old = _tagged(old_arrays, 1, new_arrays, 'previous_labels', 'labels')
    if set(new) != set(old):
      raise ValueError(f'replayed rows have the keys {sorted(old)}, the new task {sorted(new)}')
    self.new = loader_lib.make_loader(new, global_batch_size=self.n_new, seed=seed)
    self.old = loader_lib.make_loader(old, global_batch_size=self.n_old, seed=seed + 1)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    a, b = next(self.new), next(self.old)
    return {k: np.concatenate([a[k], b[k]]) for k in a}

  def get_state(self) -> dict:
    return {'new': self.new.get_state(), 'old': self.old.get_state()}

  def set_state(self, state: dict):
    self.new.set_state(state['new'])
    self.old.set_state(state['old'])


def train_stream(c: ContinualSettings, previous: Previous, tokenizer, train_arrays: dict,
                 batch_size: int, seed: int):
  """The training iterator: the plain loader, or for replay the mixed stream over this
  task's and the earlier task's training split (read from its saved data section)."""
  rows = {k: v for k, v in train_arrays.items() if k != 'word_ids'}
  if not c.method_spec.replays:
    return loader_lib.make_loader(rows, global_batch_size=batch_size, seed=seed)
  old, _ = finetuning.load_split(kinds.CLS, previous.data, tokenizer, 'train')
  return ReplayStream(rows, old, batch_size, c.replay_fraction, seed)


def resolve_steps(c: ContinualSettings, train: loop.TrainSettings, n_train: int):
  """finetuning.resolve_steps with an epoch = one pass over the new task's rows (replay:
  `n_new` of them per batch)."""
  if not c.method_spec.replays:
    return finetuning.resolve_steps(train, n_train)
  n_new, _ = replay_rows(train.batch_size, c.replay_fraction)
  steps, per_epoch = finetuning.resolve_steps(dataclasses.replace(train, batch_size=n_new),
                                              n_train)
  return dataclasses.replace(steps, batch_size=train.batch_size), per_epoch


# ----------------------------------------------------------------------------- the earlier task, after

def previous_task_hook(previous: Previous, mdef: ModelDef, tokenizer,
                       batch_size: int) -> list[loop.Hook]:
  """At the end: the earlier task's dev metrics with the final encoder and previous head."""
  dev, info = finetuning.load_split(kinds.CLS, previous.data, tokenizer, 'dev')
  if dev is None:
    return []
  base = classification.cls(previous.num_labels, previous.is_regression)
  view = Objective(loss=base.loss,
                   evaluate=lambda model, batch: base.evaluate(PreviousHeadView(model), batch))

  def fn(trained: loop.Trained) -> dict:
    return trained.placed(mdef).evaluate(view, loader_lib.eval_batches(dev, batch_size)(),
                                         classification.cls_summary(info))

  return [loop.Hook(PREVIOUS_TASK, fn)]


def save_previous_task(params, previous: Previous, workdir: str, tokenizer, step: int) -> str:
  """workdir/previous_task: a finetune_cls workdir of the earlier task (its config, labels
  and tokenizer; one checkpoint: this run's encoder under the previous head)."""
  out = os.path.join(workdir, PREVIOUS_TASK)
  swapped = {**without_previous_head(params), HEAD: params[PREVIOUS_HEAD]}
  if jax.process_index() == 0:
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.makedirs(out)
    for name in ('config.json', sources.LABELS):
      shutil.copy(os.path.join(previous.path, name), os.path.join(out, name))
  sources.save_tokenizer(tokenizer, out, previous.mcfg.max_position_embeddings)
  ckpt = checkpointing.Checkpointer(os.path.join(out, 'checkpoints'), keep=1, async_save=False)
  ckpt.save(step, {'params': swapped})
  ckpt.wait()
  ckpt.close()
  return out



# ----------------------------------------------------------------------------- the run's plan

class FirstTask:
  """A fine-tune with no earlier task (continual.previous unset): each step done the plain
  way. `Sequel` does the same steps for a continual run; a stage calls one of them."""

  def __init__(self, kind):
    self.kind = kind

  def resolve_steps(self, train: loop.TrainSettings, n_train: int):
    return finetuning.resolve_steps(train, n_train)

  def model_def(self, mcfg: ModelConfig, num_labels: int, seed: int) -> ModelDef:
    return ModelDef.create(lambda: build_model(mcfg, self.kind.head, num_labels=num_labels,
                                               seed=seed))

  def start(self, model_def: ModelDef, source, freeze, pcfg, *, max_len: int,
            num_layers: int):
    """(the loop's Start, the init report) from `source` (init_from resolved, or None)."""
    return finetuning.init_trainable(model_def, source, freeze, pcfg, max_len=max_len,
                                     num_layers=num_layers)

  def objective(self, num_labels: int, is_regression: bool, label_smoothing: float):
    return self.kind.objective(num_labels, is_regression, label_smoothing)

  def train_iter(self, tokenizer, train_arrays: dict, batch_size: int, seed: int):
    rows = {k: v for k, v in train_arrays.items() if k != 'word_ids'}
    return loader_lib.make_loader(rows, global_batch_size=batch_size, seed=seed)

  def hooks(self, model_def: ModelDef, tokenizer, batch_size: int) -> list[loop.Hook]:
    return []

  def constants(self, mesh_settings):
    return None

  def finish(self, results: dict, params, workdir: str, tokenizer):
    """The parameters to export, after recording what the plan adds to results."""
    return params

  def export_def(self, model_def: ModelDef, mcfg: ModelConfig, num_labels: int) -> ModelDef:
    return model_def

  def export_trainable(self, trainable):
    return trainable


class Sequel(FirstTask):
  """A fine-tune on a new task after `previous` (continual.previous): its encoder and head
  beside the new one, the method's rows, loss term and constants."""

  def __init__(self, kind, c: ContinualSettings, previous: Previous):
    super().__init__(kind)
    self.c, self.previous = c, previous

  def resolve_steps(self, train, n_train):
    return resolve_steps(self.c, train, n_train)

  def model_def(self, mcfg, num_labels, seed):
    return model_def(mcfg, num_labels, self.previous, seed)

  def start(self, mdef, source, freeze, pcfg, *, max_len, num_layers):
    del source, pcfg, max_len  # the previous model's weights; no PEFT (checked at parse)
    params, report = init_params(self.previous, mdef)
    mask = trainable(self.c.method_spec, optim.trainable_mask(freeze, mdef.abstract_params),
                     mdef)
    return loop.Start(mdef, params, mask, optim.layerwise_lr_scale(
        freeze, mdef.abstract_params, num_layers)), report

  def objective(self, num_labels, is_regression, label_smoothing):
    return objective(self.c, self.previous, num_labels, is_regression, label_smoothing)

  def train_iter(self, tokenizer, train_arrays, batch_size, seed):
    return train_stream(self.c, self.previous, tokenizer, train_arrays, batch_size, seed)

  def hooks(self, model_def, tokenizer, batch_size):
    return previous_task_hook(self.previous, model_def, tokenizer, batch_size)

  def constants(self, mesh_settings):
    return constants(self.previous, self.c.method_spec, mesh_settings)

  def finish(self, results, params, workdir, tokenizer):
    results['continual'] = {**dataclasses.asdict(self.c),
                            'previous_task_dev': results.pop(PREVIOUS_TASK, None)}
    if not results['preempted']:
      results['continual']['previous_task_workdir'] = save_previous_task(
          params, self.previous, workdir, tokenizer, results['step'])
    return without_previous_head(params)

  def export_def(self, mdef, mcfg, num_labels):
    # the export holds the new task's classifier alone (no previous_head)
    return ModelDef.create(lambda: build_model(mcfg, self.kind.head, num_labels=num_labels))

  def export_trainable(self, mask):
    return mask and without_previous_head(mask)


def plan(c: ContinualSettings, kind, mcfg: ModelConfig, max_len: int,
         seed: int) -> FirstTask:
  """The run's plan: `Sequel` when continual.previous names an earlier task."""
  if not c.enabled:
    return FirstTask(kind)
  return Sequel(kind, c, load_previous(c, mcfg, max_len, seed))

"""A tiny in-process training job for reliability tests: BERT MLM (hidden 16, 1 layer,
vocab 64, length 16) on synthetic rows through the real `jaxft.train.loop.train`.

`poison` rows: a batch whose rows carry poison=1 gives a NaN loss (poison=2: NaN
gradients with a finite loss), so the non-finite policies can be exercised at a chosen
step. The loader is the real checkpointable grain loader (unshuffled, so batch k holds rows
[k*B, (k+1)*B)).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxft import config as config_lib
from jaxft import stages
from jaxft.data import loader as loader_lib
from jaxft.data.masking import MaskingSettings
from jaxft.data.pretrain import default_data_config
from jaxft.models import ModelConfig, build_model
from jaxft.objectives.lm import mlm
from jaxft.train import loop
from jaxft.train.state import ModelDef, to_host
from jaxft.train.step import Objective

VOCAB, LEN, BATCH = 64, 16, 8
PAD, CLS, SEP, MASK = 0, 2, 3, 4
MCFG = ModelConfig(model_type='bert', vocab_size=VOCAB, hidden_size=16, num_layers=1,
                   num_heads=2, intermediate_size=32, max_position_embeddings=LEN,
                   hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)


class _Tokenizer:
  mask_token_id = MASK

  def __len__(self):
    return VOCAB


def config(num_steps: int = 8, **train) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.stage = 'pretrain_mlm'
  c.model.update(type='bert', vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
                 intermediate_size=32, max_position_embeddings=LEN, hidden_dropout=0.0,
                 attention_dropout=0.0)
  c.data = default_data_config()  # the loop is fed synthetic rows; the section is checked
  c.data.max_len = LEN
  c.optimizer.update(lr=1e-2, schedule='constant', warmup_steps=0)
  c.train.update(num_steps=num_steps, batch_size=BATCH, eval_every=0, log_every=1)
  c.train.update(**train)
  c.checkpoint.update(every=2, keep=3, async_save=True)
  return c


@functools.cache
def model_def():
  return ModelDef.create(lambda: build_model(MCFG, 'mlm', seed=0))


def _poisoned(base: Objective) -> Objective:
  @jax.custom_vjp
  def nan_grad(x, p):
    return x

  def fwd(x, p):
    return x, p

  def bwd(p, g):
    return (g + jnp.where(p > 0, jnp.nan, 0.0), jnp.zeros_like(p))

  nan_grad.defvjp(fwd, bwd)

  def loss(model, batch, rng, deterministic):
    loss_sum, sums = base.loss(model, batch, rng, deterministic)
    p = batch['poison'].max()
    loss_sum = loss_sum + jnp.where(p == 1, jnp.nan, 0.0)
    return nan_grad(loss_sum, (p == 2).astype(jnp.float32)), sums

  return Objective(loss=loss, evaluate=base.evaluate, prepare=base.prepare)


@functools.cache
def task():
  return _poisoned(mlm(_Tokenizer(), MaskingSettings(max_predictions=4)))


def rows(n_batches: int, poison: dict[int, int] | None = None, seed: int = 0) -> dict:
  """Synthetic packed MLM rows; `poison` {batch index (0-based): 1 NaN loss | 2 NaN grads}."""
  rng = np.random.default_rng(seed)
  n = n_batches * BATCH
  ids = rng.integers(5, VOCAB, size=(n, LEN)).astype(np.int32)
  ids[:, 0], ids[:, -1] = CLS, SEP
  special = np.zeros((n, LEN), np.int32)
  special[:, 0] = special[:, -1] = 1
  p = np.zeros((n,), np.int32)
  for b, kind in (poison or {}).items():
    p[b * BATCH:(b + 1) * BATCH] = kind
  return {'input_ids': ids, 'attention_mask': np.ones((n, LEN), np.int32),
          'special_tokens_mask': special, 'poison': p}


class _Hooked:
  """The loader, calling hook(batch index) before each batch (fault injection)."""

  def __init__(self, it, hook):
    self.it, self.hook, self.k = it, hook, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.hook(self.k)
    self.k += 1
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)
    self.k = int(state.get('next_index', self.k))


def train(workdir: str, cfg=None, poison=None, n_batches: int = 64, hook=None,
          rows: dict | None = None) -> dict:
  """Run the real loop (the ConfigDict parsed as a stage would); returns its results dict with
  'state' (the state it ends with) as host numpy arrays."""
  cfg = cfg or config()
  data = rows if rows is not None else globals()['rows'](n_batches, poison)
  it = loader_lib.make_loader(data, global_batch_size=BATCH, seed=0, shuffle=False)
  if hook is not None:
    it = _Hooked(it, hook)
  out = loop.train(stages.validate(cfg).loop, workdir, loop.Start(model_def()), task(),
                   loop.Data(train_iter=it))
  return {**out.results, 'state': to_host(out.state)}


def same_tree(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y, equal_nan=True)
      for x, y in zip(la, lb))


def logged(workdir: str, key: str = 'train/loss') -> dict[int, float]:
  """{step: value} from metrics.jsonl; the last line for a step wins (a resumed run relogs)."""
  import json
  import os
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill
      if key in rec:
        out[rec['step']] = rec[key]
  return out


@functools.cache
def reference(num_steps: int = 8) -> dict:
  """An uninterrupted run (shared, never modified): {'workdir', 'state', 'losses'}."""
  import atexit
  import shutil
  import tempfile
  root = tempfile.mkdtemp(prefix='jaxft-reliability-ref-')
  atexit.register(shutil.rmtree, root, True)
  wd = f'{root}/ref'
  res = train(wd, config(num_steps))
  return {'workdir': wd, 'state': res['state'], 'losses': logged(wd), 'results': res}


def copy_workdir(src: str, dst: str) -> str:
  import shutil
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns('.jaxft.lock'))
  return dst

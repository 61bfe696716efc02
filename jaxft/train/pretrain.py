"""Stages `pretrain_mlm` (BERT, RoBERTa-style: dynamic masking, no NSP) and `pretrain_clm`."""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxft import config as config_lib
from jaxft.data import loader as loader_lib
from jaxft.data import masking
from jaxft.data import pretrain as lm_data
from jaxft.data.tokenizer import load_tokenizer, save_tokenizer
from jaxft.models import build_model
from jaxft.train import init as init_lib
from jaxft.train import loop
from jaxft.train.state import ModelDef
from jaxft.train.step import Task, cross_entropy_sums

EVAL_MASK_SEED = 1234  # eval masks are fixed so eval losses are comparable across steps


def mlm_task(mcfg, tokenizer, mlm_cfg) -> Task:
  vocab = len(tokenizer)
  mask_id = tokenizer.mask_token_id
  if mask_id is None:
    raise ValueError('the tokenizer has no mask token; MLM pretraining needs one ([MASK])')
  max_pred = int(mlm_cfg.get('max_predictions', 0) or 0) or None
  kw = dict(vocab_size=vocab, mask_token_id=mask_id, mask_prob=float(mlm_cfg.mask_prob),
            mask_token_frac=float(mlm_cfg.mask_token_frac),
            random_token_frac=float(mlm_cfg.random_token_frac), max_predictions=max_pred)

  def prepare(batch, rng):
    masked = masking.mlm_mask(rng, batch['input_ids'], batch['special_tokens_mask'],
                              attention_mask=batch['attention_mask'], **kw)
    return {**batch, **masked}

  def forward(model, batch, rng, deterministic):
    rngs = None if deterministic else nnx.Rngs(dropout=rng)
    if max_pred:
      out = model(batch['input_ids'], batch['attention_mask'], deterministic=deterministic,
                  rngs=rngs, masked_positions=batch['masked_positions'])
      return out['logits'], batch['masked_labels'], batch['masked_weights']
    out = model(batch['input_ids'], batch['attention_mask'], deterministic=deterministic,
                rngs=rngs)
    return out['logits'], batch['labels'], batch['weights']

  def loss(model, batch, rng, deterministic):
    logits, labels, weights = forward(model, batch, rng, deterministic)
    loss_sum, w, correct = cross_entropy_sums(logits, labels, weights)
    return loss_sum, {'weight': w, 'accuracy_sum': correct}

  def evaluate(model, batch):
    batch = prepare(batch, jax.random.PRNGKey(EVAL_MASK_SEED))
    logits, labels, weights = forward(model, batch, None, True)
    loss_sum, w, correct = cross_entropy_sums(logits, labels, weights)
    return {'loss_sum': loss_sum, 'weight': w, 'correct': correct}

  return Task(head='mlm', loss=loss, evaluate=evaluate, prepare=prepare)


def clm_task(mask_boundaries: bool) -> Task:
  def prepare(batch, rng):
    del rng
    return {**batch, **masking.clm_labels(batch['input_ids'], batch['attention_mask'],
                                          batch.get('segment_ids'), mask_boundaries)}

  def forward(model, batch, rng, deterministic):
    rngs = None if deterministic else nnx.Rngs(dropout=rng)
    return model(batch['input_ids'], batch['attention_mask'], deterministic=deterministic,
                 rngs=rngs)['logits']

  def loss(model, batch, rng, deterministic):
    loss_sum, w, correct = cross_entropy_sums(forward(model, batch, rng, deterministic),
                                              batch['labels'], batch['weights'])
    return loss_sum, {'weight': w, 'accuracy_sum': correct}

  def evaluate(model, batch):
    batch = prepare(batch, None)
    loss_sum, w, correct = cross_entropy_sums(forward(model, batch, None, True),
                                              batch['labels'], batch['weights'])
    return {'loss_sum': loss_sum, 'weight': w, 'correct': correct}

  return Task(head='clm', loss=loss, evaluate=evaluate, prepare=prepare)


def summarize_lm(sums, per_example):
  del per_example
  w = max(sums.get('weight', 0.0), 1e-9)
  loss = sums['loss_sum'] / w
  return {'loss': loss, 'accuracy': sums['correct'] / w, 'perplexity': math.exp(min(loss, 50.0)),
          'tokens': sums['weight']}


def eval_batches_fn(arrays, batch_size: int, seed: int):
  if arrays is None or len(arrays['input_ids']) < batch_size:
    if arrays is not None:
      logging.warning('eval set has %d rows < train.batch_size=%d: eval disabled',
                      len(arrays['input_ids']), batch_size)
    return None
  return lambda: loader_lib.make_loader(arrays, global_batch_size=batch_size, seed=seed,
                                        shuffle=False, num_epochs=1, drop_remainder=True)


def run(cfg, workdir: str) -> dict:
  """Pretrain with MLM (`pretrain_mlm`) or causal LM (`pretrain_clm`)."""
  kind = 'mlm' if cfg.stage == 'pretrain_mlm' else 'clm'
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  mcfg = config_lib.model_config(cfg, vocab_size=len(tokenizer))
  if kind == 'mlm' and mcfg.model_type != 'bert':
    raise ValueError(f'pretrain_mlm needs model.type=bert, got {mcfg.model_type!r}')
  if kind == 'clm' and mcfg.model_type != 'gpt2':
    raise ValueError(f'pretrain_clm needs model.type=gpt2, got {mcfg.model_type!r}')
  if len(tokenizer) > mcfg.vocab_size:
    raise ValueError(f'the tokenizer has {len(tokenizer)} tokens but model.vocab_size='
                     f'{mcfg.vocab_size}')
  train_arrays, eval_arrays, stats = lm_data.build_lm_data(cfg.data, tokenizer, workdir,
                                                           mcfg.model_type)
  logging.info('data: %s', {k: v for k, v in stats.items() if 'path' not in k})
  if len(train_arrays['input_ids']) < cfg.train.batch_size:
    raise ValueError(f'only {len(train_arrays["input_ids"])} packed training rows for '
                     f'train.batch_size={cfg.train.batch_size}: add data or lower the batch size')
  tok_dir = os.path.join(workdir, 'tokenizer')
  if jax.process_index() == 0:
    save_tokenizer(tokenizer, tok_dir, mcfg.max_position_embeddings)

  head = 'mlm' if kind == 'mlm' else 'clm'
  model_def = ModelDef.create(lambda: build_model(mcfg, head, seed=int(cfg.seed)))
  init_params = None
  if cfg.init_from:
    init_params, _ = init_lib.load_init(cfg.init_from, model_def)

  task = mlm_task(mcfg, tokenizer, cfg.mlm) if kind == 'mlm' else clm_task(
      bool(cfg.data.get('clm_mask_boundaries', False)))
  train_iter = loader_lib.make_loader(train_arrays, global_batch_size=cfg.train.batch_size,
                                      seed=int(cfg.seed))
  data = loop.Data(train_iter=train_iter,
                   eval_batches=eval_batches_fn(eval_arrays, cfg.train.batch_size, int(cfg.seed)),
                   summarize=summarize_lm)
  results = loop.train(cfg, workdir, model_def, task, data, init_params=init_params,
                       extra_results={'data': {k: v for k, v in stats.items() if 'path' not in k}})
  if cfg.export.hf and not results['preempted']:
    export_hf(results['state']['params'], mcfg, head, workdir, tokenizer)
  return results


def export_hf(params, mcfg, head, workdir, tokenizer, id2label=None):
  """Write workdir/export as a Hugging Face directory (process 0 only)."""
  from jaxft.models import hf
  from jaxft.train.state import to_host
  host = to_host(params)
  if jax.process_index() == 0:
    out = os.path.join(workdir, 'export')
    hf.save_hf(host, mcfg, out, head, tokenizer=tokenizer, id2label=id2label)
    logging.info('exported a Hugging Face checkpoint to %s', out)

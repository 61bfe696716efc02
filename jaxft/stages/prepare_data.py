"""Stage `prepare_data`: make what a pretraining config reads, ahead of training.

  python -m jaxft.main --config configs/bert_mlm.py:mini --config.stage=prepare_data \
      --config.data.files=/data/text --config.data.store_dir=/shared/tokens --workdir w/prep

Tokenizes the corpus into the token store (all cores; on a multi-host run every host takes
its share of the shards), writes the BERT row index and picks the eval split, exactly as the
training stage with the same `data.*` and `model.type` would; that run then opens the store
in seconds. Writes results.json with the data stats (store path, documents, tokens, rows).
"""
from __future__ import annotations

import json
import os

import jax
from absl import logging

from jaxft.data import pretrain as lm_data
from jaxft.data.tokenizer import load_tokenizer


def run(cfg, workdir: str) -> dict:
  settings = lm_data.LmDataSettings.from_config(cfg.data)
  tokenizer = load_tokenizer(settings.tokenizer)
  stats = lm_data.prepare(settings, tokenizer, workdir, cfg.model.type)
  root = os.path.dirname(stats['store_path'])
  logging.info('data prepared: %s; train with --config.data.store_dir=%s', stats, root)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump({'data': stats, 'store_dir': root}, f, indent=2)
  return stats

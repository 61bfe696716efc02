"""Stage `prepare_data`: make what a pretraining config reads, ahead of training.

  python -m jaxft.main --config configs/bert_mlm.py:mini --config.stage=prepare_data \
      --config.data.files=/data/text --config.data.store_dir=/shared/tokens --workdir w/prep

Tokenizes the corpus into the token store (all cores; on a multi-host run every host takes
its share of the shards), writes the BERT row index and picks the eval split, exactly as the
training stage with the same `data.*` and `model.type` would (a `distill:mlm` config: the
teacher's tokenizer and BERT rows, as distillation reads them); that run then opens the store
in seconds. Writes results.json with the data stats (store path, documents, tokens, rows).
"""
from __future__ import annotations

import dataclasses
import os

from absl import logging

from jaxft import config as config_lib
from jaxft import sources
from jaxft.data import pretrain as lm_data
from jaxft.stages import distill, pretrain
from jaxft.train.metrics import write_results

# Any pretraining (or MLM distillation) config runs with --config.stage=prepare_data; only
# `data`, `model.type` (and a distillation's `teacher`) are read.
SECTIONS = tuple(dict.fromkeys(pretrain.SECTIONS + distill.SECTIONS))


@dataclasses.dataclass(frozen=True)
class Settings:
  data: lm_data.LmDataSettings
  model_type: str   # the rows the training stage packs: bert (MLM) | gpt2 (CLM)
  teacher: str = ''  # distillation: the teacher's tokenizer is the one its run reads


def parse(cfg) -> Settings:
  config_lib.check_sections(cfg, SECTIONS)
  model_type = config_lib.model_section(cfg).model_type
  if 'distill' in cfg:
    dc = config_lib.section(distill.DistillSettings, cfg.get('distill'), 'distill')
    if dc.kind != 'mlm':
      raise config_lib.ConfigError(f'prepare_data reads pretraining text; distill.kind='
                                   f'{dc.kind!r} reads task files (nothing to prepare)')
    model_type = 'bert'  # MLM distillation packs BERT rows
  lm_data.lm_style(model_type)
  data = config_lib.section(lm_data.LmDataSettings, cfg.get('data'), 'data')
  return Settings(data=data, model_type=model_type,
                  teacher=config_lib.scalar(cfg, 'teacher', ''))


def run(s: Settings, workdir: str) -> dict:
  tokenizer = sources.tokenizer_of(s.teacher, s.data.tokenizer)
  stats = lm_data.prepare(s.data, tokenizer, workdir, s.model_type)
  root = os.path.dirname(stats['store_path'])
  logging.info('data prepared: %s; train with --config.data.store_dir=%s', stats, root)
  results = {'data': stats, 'store_dir': root}
  write_results(workdir, results)
  return results

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
from jaxft.distill import settings as distill_settings
from jaxft.models.config import ModelConfig
from jaxft.train.metrics import write_results

@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """prepare_data: what it reads of a pretraining config (`data`, `model.type`)."""
  stage: str = 'prepare_data'
  data: lm_data.LmDataSettings
  model: ModelConfig

  # Any pretraining config runs with --config.stage=prepare_data: its other sections are
  # the training run's, accepted and not read.
  accepted_keys = ('seed', 'init_from', 'mesh', 'optimizer', 'train', 'checkpoint', 'export',
                   'mlm')

  def __post_init__(self):
    lm_data.lm_style(self.model_type)

  @property
  def model_type(self) -> str:  # the rows the training stage packs: bert (MLM) | gpt2 (CLM)
    return self.model.model_type

  @property
  def tokenizer_source(self) -> str:  # the directory whose tokenizer the rows are read with
    return ''


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillSettings(Settings):
  """prepare_data on an MLM distillation config: the teacher's tokenizer, BERT rows."""
  teacher: str = ''
  distill: distill_settings.DistillSettings

  @property
  def model_type(self) -> str:
    return 'bert'  # MLM distillation packs BERT rows

  @property
  def tokenizer_source(self) -> str:
    return self.teacher


def settings_class(cfg) -> type[Settings]:
  if 'distill' not in cfg:
    return Settings
  kind = (cfg.distill or {}).get('kind', 'cls')
  if kind != 'mlm':
    raise config_lib.ConfigError(f'prepare_data reads pretraining text; distill.kind={kind!r} '
                                 'reads task files (nothing to prepare)')
  return DistillSettings


def run(s: Settings, workdir: str) -> dict:
  tokenizer = sources.tokenizer_for(sources.resolve_optional(s.tokenizer_source, 'teacher'),
                                    s.data.tokenizer)
  stats = lm_data.prepare(s.data, tokenizer, workdir, s.model_type)
  root = os.path.dirname(stats['store_path'])
  logging.info('data prepared: %s; train with --config.data.store_dir=%s', stats, root)
  results = {'data': stats, 'store_dir': root}
  write_results(workdir, results)
  return results

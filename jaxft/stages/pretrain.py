"""Stages `pretrain_mlm` (BERT, RoBERTa-style: dynamic masking, no NSP) and `pretrain_clm`
(GPT-2): settings, data, model, train, export."""
from __future__ import annotations

import dataclasses

from absl import logging

from jaxft import config as config_lib
from jaxft import sources
from jaxft.data import loader as loader_lib
from jaxft.data import pretrain as lm_data
from jaxft.data.masking import MaskingSettings
from jaxft.data.tokenizer import load_tokenizer
from jaxft.export import ExportSettings, export_hf
from jaxft.models import build_model
from jaxft.models.config import ModelConfig
from jaxft.objectives import lm
from jaxft.train import loop
from jaxft.train.metrics import write_results
from jaxft.train.state import ModelDef


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(loop.RunSettings):
  """pretrain_mlm / pretrain_clm: the config's keys."""
  init_from: str = ''
  model: ModelConfig       # vocab_size 0: the tokenizer's
  data: lm_data.LmDataSettings  # the pretraining `data` section
  mlm: MaskingSettings     # the masking of pretrain_mlm
  export: ExportSettings

  @property
  def style(self) -> lm.Style:
    return lm.STYLES[self.stage]

  def __post_init__(self):
    want = self.style.model_type
    if self.model.model_type != want:
      raise config_lib.ConfigError(f'{self.stage} needs model.type={want}, got '
                                   f'{self.model.model_type!r}')
    if not self.train.num_steps:
      raise config_lib.ConfigError(f'{self.stage} needs train.num_steps > 0 (the corpus '
                                   'repeats; train.num_epochs is for fine-tuning)')
    if not self.init_from and self.data.max_len > self.model.max_position_embeddings:
      raise config_lib.ConfigError(f'data.max_len={self.data.max_len} exceeds model.'
                                   f'max_position_embeddings={self.model.max_position_embeddings}')


def run(s: Settings, workdir: str) -> dict:
  tokenizer = load_tokenizer(s.data.tokenizer)
  mcfg = s.model if s.model.vocab_size else s.model.replace(vocab_size=len(tokenizer))
  if len(tokenizer) > mcfg.vocab_size:
    raise ValueError(f'the tokenizer has {len(tokenizer)} tokens but model.vocab_size='
                     f'{mcfg.vocab_size}')
  train_rows, eval_arrays, stats = lm_data.build_lm_data(s.data, tokenizer, workdir,
                                                         mcfg.model_type)
  stats = {k: v for k, v in stats.items() if 'path' not in k}
  logging.info('data: %s', stats)
  bs = s.loop.train.batch_size
  if len(train_rows) < bs:
    raise ValueError(f'only {len(train_rows)} packed training rows for '
                     f'train.batch_size={bs}: add data or lower the batch size')
  sources.save_tokenizer(tokenizer, workdir, mcfg.max_position_embeddings)

  head = s.style.name
  model_def = ModelDef.create(lambda: build_model(mcfg, head, seed=s.loop.seed))
  init_params = sources.resolve(s.init_from).load_init(model_def)[0] if s.init_from else None
  objective = s.style.objective(tokenizer, s.mlm, s.data.clm_mask_boundaries)
  data = loop.Data(
      train_iter=loader_lib.make_loader(train_rows, global_batch_size=bs, seed=s.loop.seed),
      eval_batches=loader_lib.lm_eval_batches(eval_arrays, bs, s.loop.seed),
      summarize=lm.summarize)
  out = loop.train(s.loop, workdir, loop.Start(model_def, init_params), objective, data)
  results = {**out.results, 'data': stats}
  if eval_arrays is not None and len(eval_arrays['input_ids']):
    # the bar the eval accuracy and loss must clear to show more than token frequencies
    results['baseline'] = lm.unigram_baseline(eval_arrays, tokenizer)
  if s.export.hf and not results['preempted']:
    export_hf(out.params, mcfg, head, workdir, tokenizer)
  write_results(workdir, results)
  return results

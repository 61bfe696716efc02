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

SECTIONS = ('stage', 'seed', 'init_from', 'overwrite', 'model', 'data', 'mesh', 'optimizer',
            'train', 'checkpoint', 'export', 'peft', 'mlm')


@dataclasses.dataclass(frozen=True)
class Settings:
  kind: str                # 'mlm' | 'clm'
  loop: loop.LoopSettings
  model: ModelConfig       # vocab_size 0: the tokenizer's
  data: dict               # the pretraining `data` section (jaxft.data.pretrain reads it)
  masking: MaskingSettings
  export: ExportSettings
  init_from: str = ''


def parse(cfg) -> Settings:
  config_lib.check_sections(cfg, SECTIONS)
  kind = 'mlm' if cfg.stage == 'pretrain_mlm' else 'clm'
  model = config_lib.model_section(cfg)
  want = 'bert' if kind == 'mlm' else 'gpt2'
  if model.model_type != want:
    raise config_lib.ConfigError(f'{cfg.stage} needs model.type={want}, got '
                                 f'{model.model_type!r}')
  data = dict(cfg.data.to_dict()) if 'data' in cfg else {}
  loop_settings = config_lib.loop_settings(cfg)
  if not loop_settings.train.num_steps:
    raise config_lib.ConfigError(f'{cfg.stage} needs train.num_steps > 0 (the corpus repeats; '
                                 'train.num_epochs is for fine-tuning)')
  max_len = int(data.get('max_len') or 0)
  init_from = config_lib.scalar(cfg, 'init_from', '')
  if max_len and not init_from and max_len > model.max_position_embeddings:
    raise config_lib.ConfigError(f'data.max_len={max_len} exceeds model.max_position_embeddings='
                                 f'{model.max_position_embeddings}')
  return Settings(kind=kind, loop=loop_settings, model=model, data=data,
                  masking=config_lib.section(MaskingSettings, cfg.get('mlm'), 'mlm'),
                  export=config_lib.section(ExportSettings, cfg.get('export'), 'export'),
                  init_from=init_from)


def run(s: Settings, workdir: str) -> dict:
  tokenizer = load_tokenizer(s.data.get('tokenizer', ''))
  mcfg = s.model if s.model.vocab_size else s.model.replace(vocab_size=len(tokenizer))
  if len(tokenizer) > mcfg.vocab_size:
    raise ValueError(f'the tokenizer has {len(tokenizer)} tokens but model.vocab_size='
                     f'{mcfg.vocab_size}')
  train_arrays, eval_arrays, stats = lm_data.build_lm_data(s.data, tokenizer, workdir,
                                                           mcfg.model_type)
  stats = {k: v for k, v in stats.items() if 'path' not in k}
  logging.info('data: %s', stats)
  bs = s.loop.train.batch_size
  if len(train_arrays['input_ids']) < bs:
    raise ValueError(f'only {len(train_arrays["input_ids"])} packed training rows for '
                     f'train.batch_size={bs}: add data or lower the batch size')
  sources.save_tokenizer(tokenizer, workdir, mcfg.max_position_embeddings)

  head = s.kind
  model_def = ModelDef.create(lambda: build_model(mcfg, head, seed=s.loop.seed))
  init_params = sources.load_init(s.init_from, model_def)[0] if s.init_from else None
  objective = (lm.mlm(tokenizer, s.masking) if s.kind == 'mlm' else
               lm.clm(bool(s.data.get('clm_mask_boundaries', False))))
  data = loop.Data(
      train_iter=loader_lib.make_loader(train_arrays, global_batch_size=bs, seed=s.loop.seed),
      eval_batches=loader_lib.lm_eval_batches(eval_arrays, bs, s.loop.seed),
      summarize=lm.summarize)
  out = loop.train(s.loop, workdir, model_def, objective, data, init_params=init_params)
  results = {**out.results, 'data': stats}
  if s.export.hf and not results['preempted']:
    export_hf(out.params, mcfg, head, workdir, tokenizer)
  write_results(workdir, results)
  return results

"""Stage `model_info`: build the configured model and print its parameters per module."""
from __future__ import annotations

import dataclasses

from jaxft import config as config_lib
from jaxft.data.tokenizer import load_tokenizer
from jaxft.models import abstract_model, count_params, params_by_module
from jaxft.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Settings:
  model: ModelConfig  # vocab_size 0: the tokenizer's
  tokenizer: str = ''
  head: str = ''      # '' = the pretraining head (mlm / clm)
  num_labels: int = 0


def parse(cfg) -> Settings:
  """Any config: only the model (and data.tokenizer, head, num_labels) is read."""
  data = cfg.get('data', None)
  return Settings(model=config_lib.section(ModelConfig, cfg.get('model'), 'model'),
                  tokenizer=(data.get('tokenizer', '') if data is not None else '') or '',
                  head=cfg.get('head', '') or '', num_labels=int(cfg.get('num_labels', 0) or 0))


def run(s: Settings, workdir: str) -> dict:
  del workdir
  mcfg = s.model
  if not mcfg.vocab_size:
    if not s.tokenizer:
      raise ValueError('model.vocab_size=0 needs a tokenizer to size the vocabulary')
    mcfg = mcfg.replace(vocab_size=len(load_tokenizer(s.tokenizer)))
  head = s.head or {'bert': 'mlm', 'gpt2': 'clm'}[mcfg.model_type]
  num_labels = s.num_labels or (2 if head in ('cls', 'token_cls') else None)
  model = abstract_model(mcfg, head, num_labels=num_labels)
  by_module = params_by_module(model, depth=3)
  total = count_params(model)
  width = max(len(k) for k in by_module)
  print(f'{mcfg.model_type} / head {head}: {total:,} parameters')
  for name, n in by_module.items():
    print(f'  {name:<{width}}  {n:>14,}  {100.0 * n / total:5.1f}%')
  return {'params': total, 'by_module': by_module}

"""Stage `model_info`: build the configured model and print its parameters per module."""
from __future__ import annotations

from jaxft import config as config_lib
from jaxft.models import abstract_model, count_params, params_by_module


def run(cfg, workdir: str) -> dict:
  del workdir
  vocab = None
  if not cfg.model.vocab_size and cfg.get('data') and cfg.data.get('tokenizer'):
    from jaxft.data.tokenizer import load_tokenizer
    vocab = len(load_tokenizer(cfg.data.tokenizer))
  mcfg = config_lib.model_config(cfg, vocab_size=vocab)
  head = cfg.get('head', None) or {'bert': 'mlm', 'gpt2': 'clm'}[mcfg.model_type]
  num_labels = cfg.get('num_labels', None) or (2 if head in ('cls', 'token_cls') else None)
  model = abstract_model(mcfg, head, num_labels=num_labels)
  by_module = params_by_module(model, depth=3)
  total = count_params(model)
  width = max(len(k) for k in by_module)
  print(f'{mcfg.model_type} / head {head}: {total:,} parameters')
  for name, n in by_module.items():
    print(f'  {name:<{width}}  {n:>14,}  {100.0 * n / total:5.1f}%')
  return {'params': total, 'by_module': by_module}

"""Pretraining learns: a tiny GPT-2 (configs/gpt2_clm.py:tiny, fewer steps, an end-to-end
`python -m jaxft.main` run on the bundled corpus) reaches a lower eval perplexity than a
unigram model of the same corpus: train-split token counts with add-one smoothing, scored
on exactly the eval tokens the run scores."""
import json
import math

import numpy as np
import pytest
from lm_runs import REPO, load_config, run_main

from jaxft import config as config_lib
from jaxft.data.pretrain import LmDataSettings, build_lm_data
from jaxft.data.tokenizer import load_tokenizer

# Fewer, shorter rows than the tiny config (the 50k-vocabulary projection dominates the cost).
GPT2 = {'train.num_steps': 150, 'train.batch_size': 8, 'data.max_len': 64}


@pytest.mark.slow
def test_tiny_gpt2_beats_unigram_perplexity(tmp_path):
  args = [f'--config={REPO / "configs" / "gpt2_clm.py"}:tiny', '--config.train.eval_every=0',
          '--config.train.log_every=50', '--config.checkpoint.every=0',
          '--config.export.hf=False'] + [f'--config.{k}={v}' for k, v in GPT2.items()]
  run_main(args, tmp_path)
  results = json.loads((tmp_path / 'results.json').read_text())
  model_ppl = results['final']['eval/perplexity']

  # The run's own train/eval split (same config, same token store).
  cfg = load_config('gpt2_clm').get_config('tiny')
  cfg.train.batch_size, cfg.data.max_len = GPT2['train.batch_size'], GPT2['data.max_len']
  tok = load_tokenizer(cfg.data.tokenizer)
  train, evals, _ = build_lm_data(config_lib.section(LmDataSettings, cfg.data, 'data'), tok, str(tmp_path),
                                  'gpt2', process_index=0, process_count=1)
  train = train.rows()
  vocab = len(tok)
  counts = np.bincount(train['input_ids'][train['attention_mask'] > 0], minlength=vocab)
  logp = np.log((counts + 1.0) / (counts.sum() + vocab))
  # eval scores full batches only (drop_remainder), next-token targets inside the padding
  n = len(evals['input_ids']) // cfg.train.batch_size * cfg.train.batch_size
  ids, attn = evals['input_ids'][:n], evals['attention_mask'][:n] > 0
  targets = ids[:, 1:][attn[:, :-1] & attn[:, 1:]]
  assert len(targets) == pytest.approx(results['final']['eval/tokens'])
  unigram_ppl = math.exp(-logp[targets].mean())
  # lower, and clearly so (not by a rounding error)
  assert math.log(model_ppl) < math.log(unigram_ppl) - 0.05, (
      f'tiny GPT-2 eval perplexity {model_ppl:.1f} after {GPT2["train.num_steps"]} steps vs '
      f'unigram {unigram_ppl:.1f}')
  # ... but not absurdly: 150 tiny steps do not make a 10x better model unless the targets
  # leak (attention not causal, labels not shifted)
  assert model_ppl > unigram_ppl / 10, f'perplexity {model_ppl:.1f}: implausibly low'

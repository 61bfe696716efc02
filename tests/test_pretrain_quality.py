"""Pretraining learns: the quickstart's MLM pretraining (its own settings, pretraining part
only, an end-to-end `python -m jaxft.main` run on the bundled corpus) learns more than token
frequencies: its final eval accuracy is twice the most-frequent-token baseline's and its eval
loss is below the unigram entropy (both printed with the results).

The training is the quickstart's, step for step; only what it does between steps is thinned:
an eval every 200 steps instead of 50 and no checkpoint before the final one (neither changes
the parameters, the data order or the masks: the same final eval to the last bit; 152 -> 143
CPU-s measured side by side, Intel Xeon, shared machine)."""
import json

import pytest
from lm_runs import REPO, eval_losses, load_config, run_main


@pytest.mark.slow
def test_quickstart_mlm_learns_more_than_token_frequencies(tmp_path):
  qs = load_config('quickstart')  # a pipeline: its pretraining part, in tmp_path/pretrain
  args = [f'--config={REPO / "configs" / "quickstart.py"}:pretrain',
          '--config.pretrain.export.hf=False', '--config.pretrain.train.eval_every=200',
          '--config.pretrain.checkpoint.every=0']
  run_main(args, tmp_path)
  run_dir = tmp_path / 'pretrain'
  evals = eval_losses(run_dir)
  cfg = qs.pretrain_config()
  assert len(evals) >= 2 and evals[-1][0] == cfg.train.num_steps, evals
  (first_step, first), (_, last) = evals[0], evals[-1]
  assert first_step < cfg.train.num_steps // 2
  assert last < first, evals
  # ... but a 2-layer model after minutes of CPU cannot get near a real BERT's ~2: far
  # below that, the masked tokens leak into the input
  assert last > 3.0, f'eval MLM loss {last:.3f}: implausibly low, check the masking'
  results = json.loads((run_dir / 'results.json').read_text())
  assert results['final']['eval/loss'] == pytest.approx(last)
  assert results['skipped_steps'] == 0
  # More than token frequencies: twice the accuracy of answering the eval rows' most frequent
  # token everywhere, and a loss below the unigram distribution's entropy.
  base = results['baseline']
  assert 0.02 < base['accuracy'] < 0.2 and base['token'] in {',', '.', 'the'}, base
  assert results['final']['eval/accuracy'] >= 2 * base['accuracy'], (results['final'], base)
  assert last < base['loss'] - 0.2, (last, base)

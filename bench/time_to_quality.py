"""Time to quality: BERT-mini masked-LM pretraining, jaxft against Hugging Face Trainer.

  python bench/time_to_quality.py                          # 300 steps each (see bench/README)
  python bench/time_to_quality.py --steps 20 --eval-rows 32 --out /tmp/ttq-smoke   # smoke

Both sides pretrain the same shape (configs/bert_mlm.py:mini, L4 H256 A4 I1024, random init,
dropout 0.1) on the same text (--train: the Gutenberg books and Tiny Shakespeare of
--shared/lm_corpus), with the same recipe (AdamW lr --lr, betas 0.9 / 0.999, eps 1e-8, weight
decay 0.01 on matrices, linear warmup over 6% of the steps then linear decay to 0, global-norm
clip 1.0, batch --batch x --seq tokens, 15% dynamic masking 80/10/10, no NSP) for --steps steps:

  jaxft  `python -m jaxft.main --config configs/bert_mlm.py:mini`, its defaults (model.dtype
         'auto': bf16 compute where the CPU has bf16 units, fp32 elsewhere; MLM head at the
         masked positions only; FULL-SENTENCES packing), a cold compilation cache;
  HF     `transformers.Trainer` + `DataCollatorForLanguageModeling` on `BertForMaskedLM`, the
         texts tokenized and grouped into --seq blocks as `run_mlm.py` does, in its best mode
         on this CPU (--hf-precision auto: bf16 autocast with avx512_bf16 / AMX, else fp32).

Each side runs as its own process; its wall time runs from process start to the saved model
(imports, tokenizing, compiling and training included). Steady tokens/s leaves out the first
steps (compilation, warm-up): jaxft's is the median `train/tokens_per_sec` of its log lines
after the first, HF's the tokens of the steps after the 5th over their time. Then both exported models are scored by the same
PyTorch code on the same masked evaluation set: --eval-rows blocks of WikiText-2 valid
(--shared/lm_corpus/wikitext-2-tokens, never trained on), masked once with a fixed seed; the
loss is the mean cross-entropy over the masked tokens. Target (issue 21): equal loss within
noise in at most 2/3 of HF's wall time.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, 'bench')
sys.path.insert(0, REPO)
from bench.machine import cpu_name

# bench/ on the path (python puts a script's folder first) would let bench/peft.py shadow the
# peft package that transformers' Trainer imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != BENCH]

from jaxft.data.tokenizer import load_tokenizer
from jaxft.models.config import bf16_hardware

SHAPE = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--shared', default=os.path.join(os.path.dirname(REPO), 'shared', 'data'))
  p.add_argument('--train', default='lm_corpus/gutenberg,lm_corpus/tinyshakespeare',
                 help='comma list of files / directories under --shared')
  p.add_argument('--eval', default='lm_corpus/wikitext-2-tokens/wiki.valid.tokens')
  p.add_argument('--tokenizer', default=os.path.join(REPO, 'data/tokenizers/bert-base-uncased'))
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--lr', type=float, default=5e-4)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--eval-rows', type=int, default=256)
  p.add_argument('--hf-precision', default='auto', choices=('auto', 'fp32', 'bf16'))
  p.add_argument('--only', default='jaxft,hf', help='which sides to run (comma list)')
  p.add_argument('--out', default='/tmp/jaxft-time-to-quality')
  p.add_argument('--json', default='')
  p.add_argument('--hf-worker', action='store_true', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def train_files(a) -> list[str]:
  out = []
  for part in a.train.split(','):
    path = os.path.join(a.shared, part)
    out += sorted(glob.glob(os.path.join(path, '*.txt'))) if os.path.isdir(path) else [path]
  missing = [f for f in out if not os.path.exists(f)]
  if not out or missing:
    raise SystemExit(f'--train: no such files under --shared={a.shared}: {missing or a.train}')
  return out


def warmup_steps(a) -> int:
  return int(round(0.06 * a.steps))


# ----------------------------------------------------------------------------- jaxft

def run_jaxft(a, workdir: str) -> dict:
  overrides = {
      'data.files': ','.join(train_files(a)), 'data.tokenizer': a.tokenizer,
      'data.max_len': a.seq, 'data.eval_fraction': 0.0, 'train.num_steps': a.steps,
      'train.batch_size': a.batch, 'train.eval_every': 0, 'train.log_every': 50,
      'checkpoint.every': 0, 'optimizer.lr': a.lr, 'optimizer.warmup_steps': warmup_steps(a),
      'optimizer.schedule': 'linear', 'optimizer.end_lr_ratio': 0.0, 'seed': a.seed,
      'compilation_cache_dir': os.path.join(workdir + '-jax-cache'),  # fresh: a cold compile
  }
  cmd = [sys.executable, '-m', 'jaxft.main', f'--config={REPO}/configs/bert_mlm.py:mini',
         f'--workdir={workdir}', '--config.overwrite=True'] + [
             f'--config.{k}={v}' for k, v in overrides.items()]
  wall = timed(cmd, workdir + '.log')
  rates = [json.loads(line).get('train/tokens_per_sec') for line in
           open(os.path.join(workdir, 'metrics.jsonl'))]
  rates = [r for r in rates if r][1:] or [r for r in rates if r]
  return dict(impl='jaxft', mode=f"defaults (model.dtype=auto -> {dtype_of(workdir)})",
              wall_s=wall, tokens_per_s=statistics.median(rates),
              export=os.path.join(workdir, 'export'))


def dtype_of(workdir: str) -> str:
  log = open(workdir + '.log', errors='replace').read()
  for name in ('bfloat16', 'float32'):
    if f'model.dtype=auto -> {name}' in log:
      return name
  return 'unknown'


def timed(cmd: list[str], log_path: str) -> float:
  env = dict(os.environ, TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)
  t0 = time.perf_counter()
  with open(log_path, 'w') as log:
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(f'{" ".join(cmd[:4])} ... failed (exit {proc.returncode}); see {log_path}')
  return wall


# ----------------------------------------------------------------------------- HF Trainer

def hf_precision(a) -> str:
  if a.hf_precision != 'auto':
    return a.hf_precision
  return 'bf16' if bf16_hardware('cpu')[0] else 'fp32'  # what model.dtype='auto' reads


def grouped_blocks(tokenizer, lines: list[str], seq: int):
  """run_mlm.py's grouping: each line tokenized with [CLS] ... [SEP], all concatenated and
  cut into blocks of `seq` tokens (the tail dropped)."""
  ids = []
  for start in range(0, len(lines), 1000):
    for row in tokenizer(lines[start:start + 1000])['input_ids']:
      ids.extend(row)
  n = len(ids) // seq * seq
  return [ids[i:i + seq] for i in range(0, n, seq)]


class StepClock:
  """A Trainer callback: the time at the end of every step from the 5th on."""

  def __init__(self):
    self.times = []

  def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
    if name.startswith('on_'):
      return lambda *args, **kwargs: None
    raise AttributeError(name)

  def on_step_end(self, args, state, control, **kwargs):
    if state.global_step >= 5:
      self.times.append(time.perf_counter())


def hf_worker(a) -> None:
  """Runs in its own process (the wall clock of the parent measures it)."""
  import torch
  import transformers
  from datasets import Dataset
  torch.manual_seed(a.seed)
  tok = load_tokenizer(a.tokenizer)
  lines = [ln for f in train_files(a) for ln in open(f, encoding='utf-8').read().splitlines()
           if ln.strip()]
  blocks = grouped_blocks(tok, lines, a.seq)
  data = Dataset.from_dict({'input_ids': blocks})
  config = transformers.BertConfig(vocab_size=len(tok), max_position_embeddings=512, **SHAPE)
  model = transformers.BertForMaskedLM(config)
  precision = hf_precision(a)
  args = transformers.TrainingArguments(
      output_dir=a.out + '/hf-trainer', max_steps=a.steps, per_device_train_batch_size=a.batch,
      learning_rate=a.lr, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
      adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type='linear',
      warmup_steps=warmup_steps(a), logging_steps=50, save_strategy='no', report_to=[],
      use_cpu=True, bf16=(precision == 'bf16'), seed=a.seed, data_seed=a.seed,
      dataloader_num_workers=0, disable_tqdm=True)
  collator = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
  clock = StepClock()
  trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                 data_collator=collator, callbacks=[clock])
  trainer.train()
  model.save_pretrained(os.path.join(a.out, 'hf', 'export'))
  tok.save_pretrained(os.path.join(a.out, 'hf', 'export'))
  steady = (len(clock.times) - 1) * a.batch * a.seq / (clock.times[-1] - clock.times[0])
  json.dump({'tokens_per_s': steady, 'precision': precision, 'blocks': len(blocks)},
            open(os.path.join(a.out, 'hf', 'run.json'), 'w'))


def run_hf(a) -> dict:
  os.makedirs(os.path.join(a.out, 'hf'), exist_ok=True)
  cmd = [sys.executable, os.path.abspath(__file__), '--hf-worker'] + [
      arg for arg in sys.argv[1:] if arg != '--hf-worker']
  if not any(arg.startswith('--out') for arg in cmd):
    cmd.append(f'--out={a.out}')
  wall = timed(cmd, os.path.join(a.out, 'hf.log'))
  run = json.load(open(os.path.join(a.out, 'hf', 'run.json')))
  mode = 'bf16 autocast' if run['precision'] == 'bf16' else 'fp32'
  return dict(impl='HF Trainer', mode=mode, wall_s=wall, tokens_per_s=run['tokens_per_s'],
              export=os.path.join(a.out, 'hf', 'export'))


# ----------------------------------------------------------------------------- the same eval

def masked_eval_set(a):
  """(input_ids, labels) of --eval-rows WikiText-2 blocks, masked once with a fixed seed:
  15% of the non-special tokens, 80% [MASK] / 10% random / 10% kept (labels -100 elsewhere)."""
  import numpy as np
  tok = load_tokenizer(a.tokenizer)
  path = os.path.join(a.shared, a.eval)
  lines = [ln for ln in open(path, encoding='utf-8').read().splitlines() if ln.strip()]
  blocks = np.array(grouped_blocks(tok, lines, a.seq)[:a.eval_rows], dtype=np.int64)
  rng = np.random.default_rng(1234)
  special = np.isin(blocks, tok.all_special_ids)
  chosen = (rng.random(blocks.shape) < 0.15) & ~special
  labels = np.where(chosen, blocks, -100)
  roll = rng.random(blocks.shape)
  ids = np.where(chosen & (roll < 0.8), tok.mask_token_id, blocks)
  ids = np.where(chosen & (roll >= 0.8) & (roll < 0.9), rng.integers(0, len(tok), blocks.shape),
                 ids)
  return ids, labels


def eval_loss(export_dir: str, ids, labels, batch: int = 32) -> float:
  import torch
  import transformers
  model = transformers.BertForMaskedLM.from_pretrained(export_dir).eval()
  total, count = 0.0, 0
  with torch.no_grad():
    for i in range(0, len(ids), batch):
      logits = model(input_ids=torch.from_numpy(ids[i:i + batch])).logits.float()
      y = torch.from_numpy(labels[i:i + batch])
      total += torch.nn.functional.cross_entropy(
          logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
          reduction='sum').item()
      count += int((y != -100).sum())
  return total / count


# ----------------------------------------------------------------------------- the table

def table(a, rows: list[dict], masked: int) -> str:
  hf = next((r for r in rows if r['impl'] == 'HF Trainer'), None)
  lines = [f'BERT-mini MLM, {a.steps} steps x {a.batch} x {a.seq} tokens, lr {a.lr}; '
           f'eval: {a.eval_rows} WikiText-2 valid blocks, {masked:,} masked tokens',
           f'CPU: {cpu_name()}', '',
           '| impl | mode | wall s | steady tokens/s | eval MLM loss | eval ppl | '
           'wall / HF wall |', '|---|---|---|---|---|---|---|']
  for r in rows:
    ratio = f"{r['wall_s'] / hf['wall_s']:.2f}" if hf else '-'
    lines.append(f"| {r['impl']} | {r['mode']} | {r['wall_s']:.0f} | "
                 f"{r['tokens_per_s']:,.0f} | {r['loss']:.3f} | {math.exp(r['loss']):.1f} | "
                 f"{ratio} |")
  return '\n'.join(lines)


def main(argv=None):
  a = parse_args(argv)
  if a.hf_worker:
    return hf_worker(a)
  os.makedirs(a.out, exist_ok=True)
  rows = []
  sides = a.only.split(',')
  if 'jaxft' in sides:
    rows.append(run_jaxft(a, os.path.join(a.out, 'jaxft')))
  if 'hf' in sides:
    rows.append(run_hf(a))
  ids, labels = masked_eval_set(a)
  for r in rows:
    r['loss'] = eval_loss(r['export'], ids, labels)
  print(table(a, rows, int((labels != -100).sum())))
  if a.json:
    json.dump({'args': vars(a), 'cpu': cpu_name(), 'rows': rows}, open(a.json, 'w'), indent=1)


if __name__ == '__main__':
  main()

"""Pretraining data at corpus scale: store build and training start-up, 10 MB to 1 GB.

  python bench/data_scale.py                           # 10, 100, 1000 MB (hours on 2 cores)
  python bench/data_scale.py --sizes 10,100 --out /tmp/jaxft-data-scale

For each size a corpus is written under --out/corpus-<MB>MB/ by repeating the source text
(--source: /work/shared/data/lm_corpus when present, else the bundled data/corpus) with a
distinct id in front of every document copy, in files of 16 MB. Then, through the real
`python -m jaxft.main` (configs/bert_mlm.py:tiny, bert-base-uncased WordPiece):

  build    `--config.stage=prepare_data` (store_shard_mb=--shard_mb, 8: 10 MB is 2 shards)
           into a fresh store with tokenize_num_proc = 1 and 2
           (--procs; above --compare_max_mb only the last): seconds (the store's own open_or_build time), tokens/s, bytes on
           disk per token (shards + row index), the preparing process's peak RSS
  train    3 steps of pretrain_mlm on the built store, twice: compilation cache off (cold
           compile) and on (warmed by one run before the table): peak RSS of the training
           process (wait4 ru_maxrss) and seconds from its start to its first train step
           (the first `train/loss` line in metrics.jsonl, log_every=1)

Prints a markdown table (and --json). Targets (issue 17): training peak RSS within 10% from
10 MB to 1 GB, first step within 30 s of start with a built store.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = '/work/shared/data/lm_corpus'
CONFIG = os.path.join(REPO, 'configs/bert_mlm.py') + ':tiny'
FILE_BYTES = 16 << 20
sys.path.insert(0, REPO)
from bench.machine import cpu_name


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='10,100,1000', help='corpus sizes in MB')
  p.add_argument('--procs', default='1,2', help='tokenize_num_proc values to build with')
  p.add_argument('--compare_max_mb', type=int, default=100,
                 help='larger corpora are built with the last --procs value only')
  p.add_argument('--source', default='', help='text to repeat (default: shared, else bundled)')
  p.add_argument('--out', default='/tmp/jaxft-data-scale')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--shard_mb', type=int, default=8,
                 help='data.store_shard_mb: small enough that 10 MB makes 2 shards')
  p.add_argument('--json', default='')
  p.add_argument('--reuse', action='store_true',
                 help='keep stores (and their build numbers) from an earlier run of --out')
  return p.parse_args(argv)


def source_documents(source: str) -> list[str]:
  """Blank-line-separated documents of every .txt file under `source`."""
  sys.path.insert(0, REPO)
  from jaxft.data import text
  paths = sorted(glob.glob(os.path.join(source, '**', '*.txt'), recursive=True))
  return text.load_documents(text.Source(paths=tuple(paths)))


def make_corpus(out: str, megabytes: int, docs: list[str]) -> str:
  """--out/corpus-<MB>MB/part-*.txt: the documents repeated, each copy with its own id."""
  folder = os.path.join(out, f'corpus-{megabytes}MB')
  done = os.path.join(folder, '.complete')
  if os.path.exists(done):
    return folder
  shutil.rmtree(folder, ignore_errors=True)
  os.makedirs(folder)
  target, written, part, copy = megabytes << 20, 0, 0, 0
  f = None
  while written < target:
    for i, doc in enumerate(docs):
      if f is None or f.tell() >= FILE_BYTES:
        if f:
          f.close()
        f = open(os.path.join(folder, f'part-{part:04d}.txt'), 'w', encoding='utf-8')
        part += 1
      block = f'[doc {copy}-{i}] {doc}\n\n'
      f.write(block)
      written += len(block.encode('utf-8'))
      if written >= target:
        break
    copy += 1
  f.close()
  open(done, 'w').close()
  return folder


def env():
  e = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}
  e.update(JAX_PLATFORMS='cpu', TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1',
           PYTHONPATH=REPO)
  return e


def run_main(args: list[str], workdir: str, until_step: bool = False) -> dict:
  """Runs python -m jaxft.main; returns exit code, seconds, peak RSS (MiB) and, with
  until_step, seconds from start to the first train step."""
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  log = open(os.path.join(workdir, '..', os.path.basename(workdir) + '.log'), 'w')
  t0 = time.time()
  proc = subprocess.Popen([sys.executable, '-m', 'jaxft.main', f'--workdir={workdir}', *args],
                          cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
  first_step = None
  metrics = os.path.join(workdir, 'metrics.jsonl')
  while True:
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
      break
    if until_step and first_step is None and os.path.exists(metrics):
      with open(metrics) as m:
        if any('train/loss' in line for line in m):
          first_step = time.time() - t0
    time.sleep(0.05)
  log.close()
  code = os.waitstatus_to_exitcode(status)
  if code != 0:
    raise RuntimeError(f'jaxft.main {args} exited {code}; see {log.name}')
  return {'seconds': time.time() - t0, 'peak_rss_mib': usage.ru_maxrss / 1024,
          'first_step_s': first_step}


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def bench_size(a, megabytes: int, docs: list[str], cache_dir: str) -> dict:
  corpus = make_corpus(a.out, megabytes, docs)
  row = {'MB': megabytes, 'corpus_bytes': dir_bytes(corpus)}
  common = [f'--config={CONFIG}', f'--config.data.files={corpus}',
            f'--config.data.store_shard_mb={a.shard_mb}']
  procs = [int(x) for x in a.procs.split(',') if x]
  for n in procs if megabytes <= a.compare_max_mb else procs[-1:]:
    store = os.path.join(a.out, f'store-{megabytes}MB-p{n}')
    prep = os.path.join(a.out, f'prep-{megabytes}MB-p{n}')
    args = common + ['--config.stage=prepare_data', f'--config.data.store_dir={store}',
                     f'--config.data.tokenize_num_proc={n}']
    if a.reuse and os.path.exists(os.path.join(prep, 'results.json')):
      run_main(args, prep + '-again')  # the store is reused; the split and index are redone
    else:
      shutil.rmtree(store, ignore_errors=True)
      r = run_main(args, prep)
      with open(os.path.join(prep, 'rss.json'), 'w') as f:
        json.dump(r, f)
    with open(os.path.join(prep, 'rss.json')) as f:
      r = json.load(f)
    with open(os.path.join(prep, 'results.json')) as f:
      stats = json.load(f)['data']
    row[f'build_s_p{n}'] = stats['store_seconds']
    row[f'tok_per_s_p{n}'] = stats['n_tokens'] / stats['store_seconds']
    row[f'prep_rss_mib_p{n}'] = r['peak_rss_mib']
    row.update(tokens=stats['n_tokens'], docs=stats['n_docs'],
               disk_bytes_per_token=dir_bytes(store) / stats['n_tokens'], store=store)
  train = common + [f'--config.data.store_dir={row["store"]}', '--config.stage=pretrain_mlm',
                    f'--config.train.num_steps={a.steps}', '--config.train.log_every=1',
                    '--config.train.eval_every=0', '--config.checkpoint.every=0',
                    '--config.export.hf=False']
  for name, cache in (('cold', ''), ('warm', cache_dir)):
    r = run_main(train + [f'--config.compilation_cache_dir={cache}'],
                 os.path.join(a.out, f'train-{megabytes}MB-{name}'), until_step=True)
    row[f'train_rss_mib_{name}'] = r['peak_rss_mib']
    row[f'first_step_s_{name}'] = r['first_step_s']
  return row


def table(rows: list[dict], procs: list[int]) -> str:
  head = ['corpus', 'tokens', *[f'build s ({p} proc)' for p in procs],
          *[f'tok/s ({p} proc)' for p in procs], 'disk B/token', 'train peak RSS MiB',
          'first step s (cold compile)', 'first step s (cache)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [f"{r['MB']} MB", f"{r['tokens'] / 1e6:.1f} M",
             *[f"{r[f'build_s_p{p}']:.0f}" if f'build_s_p{p}' in r else '-' for p in procs],
             *[f"{r[f'tok_per_s_p{p}'] / 1e3:.0f} k" if f'tok_per_s_p{p}' in r else '-'
               for p in procs],
             f"{r['disk_bytes_per_token']:.2f}",
             f"{r['train_rss_mib_cold']:.0f} / {r['train_rss_mib_warm']:.0f}",
             f"{r['first_step_s_cold']:.1f}", f"{r['first_step_s_warm']:.1f}"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  a = parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  source = a.source or (SHARED if os.path.isdir(SHARED) else os.path.join(REPO, 'data/corpus'))
  docs = source_documents(source)
  cache_dir = os.path.join(a.out, 'jax_cache')
  if not a.reuse:
    shutil.rmtree(cache_dir, ignore_errors=True)
  sizes = [int(s) for s in a.sizes.split(',') if s]
  procs = [int(x) for x in a.procs.split(',') if x]
  rows = []
  for i, mb in enumerate(sizes):
    if i == 0 and not a.reuse:  # warm the compilation cache once: every size compiles the same programs
      corpus = make_corpus(a.out, mb, docs)
      run_main([f'--config={CONFIG}', f'--config.data.files={corpus}',
                f'--config.data.store_shard_mb={a.shard_mb}',
                f'--config.data.store_dir={os.path.join(a.out, "store-warmup")}',
                f'--config.train.num_steps={a.steps}', '--config.train.eval_every=0',
                '--config.checkpoint.every=0', '--config.export.hf=False',
                f'--config.compilation_cache_dir={cache_dir}'], os.path.join(a.out, 'warmup'))
    rows.append(bench_size(a, mb, docs, cache_dir))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  print(f'source: {source} ({len(docs)} documents); CPU: {cpu_name()}')
  print(table(rows, procs))
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == '__main__':
  main()

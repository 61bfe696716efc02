"""Crash-anywhere harness: a tiny `python -m jaxft.main` pretraining job, SIGKILLed at
chosen moments and restarted until it finishes, compared with an uninterrupted run.

Kill moments (`Kill.kind`):
  startup   a random delay after the start (imports, tokenizing, compiling, restoring)
  mid-save  the moment a `checkpoints/<step>.orbax-checkpoint-tmp*` folder appears: an async
            checkpoint is being written (`cut` records whether it was still unfinished)
  step      once the job has logged a randomly chosen step (plus a random few ms)
mid-save and step kills wait until the start has finished a checkpoint of its own (the
first async save of a process is slow: it compiles Orbax's transfers), so the run always
moves forward; a mid-save kill cuts the start's second or later save.
Every start of the job appends to metrics.jsonl (after cutting a line torn by a kill); the
lines written by the last start are found by the file's size when it began. Compilation is cached on disk
(JAX_COMPILATION_CACHE_DIR), so a restart costs imports and restore, not compiles.

  python tests/reliability/harness.py [--kills 6] [--seed 0] [--steps 60]  # prints a table
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TMP_MARK = '.orbax-checkpoint-tmp'


def job_args(workdir: str, num_steps: int, every: int = 3) -> list[str]:
  p = '--config.pretrain.'
  return [sys.executable, '-m', 'jaxft.main',
          '--config', os.path.join(REPO, 'configs/quickstart.py:pretrain'), '--workdir', workdir,
          f'{p}model.hidden_size=16', f'{p}model.num_layers=1', f'{p}model.num_heads=2',
          f'{p}model.intermediate_size=32', f'{p}model.max_position_embeddings=32',
          f'{p}data.max_len=32', f'{p}data.max_docs=200', f'{p}data.eval_fraction=0.0',
          f'{p}train.batch_size=4', f'{p}train.num_steps={num_steps}', f'{p}train.log_every=1',
          f'{p}train.eval_every=0', f'{p}optimizer.warmup_steps=5',
          f'{p}checkpoint.every={every}', f'{p}checkpoint.keep=2',
          f'{p}checkpoint.async_save=True', f'{p}export.hf=False']


def job_env(cache_dir: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  env.update(JAX_PLATFORMS='cpu', TOKENIZERS_PARALLELISM='false', PYTHONUNBUFFERED='1',
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


@dataclasses.dataclass
class Start:
  kind: str                   # startup | mid-save | step | (none: ran to the end)
  resumed_from: int | None    # step restored at start (None: fresh)
  reached: int                # last step this start logged (0: none)
  killed: bool
  cut: bool = False           # mid-save: the tmp folder was still there after the kill
  save_step: int | None = None
  returncode: int | None = None
  log: str = ''
  cpu_s: float = 0.0


def _metrics_after(path: str, offset: int) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, 'rb') as f:
    f.seek(offset)
    data = f.read().decode('utf-8', 'replace')
  out = []
  for line in data.splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      continue  # a line cut by a kill
  return out


def _size(path: str) -> int:
  """Where the next start's lines begin: the size once the job's writer has cut a line torn
  by the previous kill (done here first, as the job would)."""
  from jaxft.train.metrics import repair_torn_tail
  repair_torn_tail(path)
  return os.path.getsize(path) if os.path.exists(path) else 0


def _tmp_dirs(ckpt_dir: str) -> list[str]:
  try:
    return [n for n in os.listdir(ckpt_dir) if TMP_MARK in n]
  except FileNotFoundError:
    return []


def _saved_steps(ckpt_dir: str) -> list[int]:
  try:
    return [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()]
  except FileNotFoundError:
    return []


def _child_cpu(before) -> float:
  now = os.times()
  return (now.children_user - before.children_user) + (now.children_system - before.children_system)


def run_once(workdir: str, num_steps: int, cache_dir: str, log_path: str, kind: str | None = None,
             rng: random.Random | None = None, timeout: float = 900) -> Start:
  """One start of the job; SIGKILL it at a `kind` moment (None: let it finish)."""
  sub = os.path.join(workdir, 'pretrain')
  metrics, ckpts = os.path.join(sub, 'metrics.jsonl'), os.path.join(sub, 'checkpoints')
  offset = _size(metrics)
  rng = rng or random.Random(0)
  cpu0 = os.times()
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(job_args(workdir, num_steps), stdout=log, stderr=subprocess.STDOUT,
                            env=job_env(cache_dir), cwd=REPO)
  t0 = time.time()
  delay = rng.uniform(0.5, 4.0)
  target, extra = None, rng.uniform(0.0, 0.05)
  killed, cut, save_step = False, False, None
  before = max(_saved_steps(ckpts), default=0)
  while proc.poll() is None:
    if time.time() - t0 > timeout:
      proc.kill()
      proc.wait()
      raise TimeoutError(f'job start did not finish in {timeout}s; log {log_path}')
    if kind == 'startup':
      killed = time.time() - t0 >= delay
    elif kind in ('mid-save', 'step'):
      # Only after this start has finished a checkpoint of its own: every start but the
      # startup kills moves the run forward.
      new = [x for x in _saved_steps(ckpts) if x > before]
      if kind == 'mid-save' and new:
        tmp = [t for t in _tmp_dirs(ckpts) if int(re.match(r'\d+', t).group(0)) > max(new)]
        if tmp:
          os.kill(proc.pid, signal.SIGKILL)
          killed = True
          save_step = int(re.match(r'\d+', tmp[0]).group(0))
          proc.wait()
          cut = bool([t for t in _tmp_dirs(ckpts) if t == tmp[0]])
          break
      elif kind == 'step' and new:
        seen = max([r['step'] for r in _metrics_after(metrics, offset)], default=0)
        if target is None:
          target = min(seen + rng.randint(0, 4), num_steps - 1)
        if seen >= target:
          time.sleep(extra)
          killed = True
    if killed:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
      break
    time.sleep(0.002 if kind == 'mid-save' else 0.02)
  rc = proc.wait()
  text = open(log_path, encoding='utf-8', errors='replace').read()
  m = re.findall(r'resumed from \S+ at step (\d+)', text)
  recs = _metrics_after(metrics, offset)
  return Start(kind=kind or 'none', resumed_from=int(m[-1]) if m else None,
               reached=max([r['step'] for r in recs if 'train/loss' in r], default=0),
               killed=killed, cut=cut, save_step=save_step, returncode=rc, log=text[-4000:],
               cpu_s=_child_cpu(cpu0))


def final_state(workdir: str) -> tuple[int, dict]:
  """(step, flat {path: array}) of the newest checkpoint's full train state."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  d = os.path.join(workdir, 'pretrain', 'checkpoints')
  step = max(int(s) for s in os.listdir(d) if s.isdigit())
  path = os.path.join(d, str(step), 'state')
  ck = ocp.StandardCheckpointer()
  try:
    meta = ck.metadata(path)
    tree = getattr(meta, 'item_metadata', meta)
    tree = getattr(tree, 'tree', tree)
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh), tree)
    state = ck.restore(path, abstract)
  finally:
    ck.close()
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def logged(workdir: str, offset: int = 0) -> dict[int, dict]:
  """{step: train record} (last occurrence wins), from byte `offset` of metrics.jsonl."""
  out = {}
  for r in _metrics_after(os.path.join(workdir, 'pretrain', 'metrics.jsonl'), offset):
    if 'train/loss' in r:
      out[r['step']] = {k: v for k, v in r.items() if k != 'train/tokens_per_sec'}
  return out


@dataclasses.dataclass
class Outcome:
  starts: list[Start]
  ref_starts: list[Start]
  final_log: dict[int, dict]      # records written by the last start
  all_log: dict[int, dict]        # last record of every step over all starts
  ref_log: dict[int, dict]
  state_equal: bool
  differing: list[str]
  final_step: int
  seed: int


def crash_run(root: str, num_steps: int = 60, kills=('startup', 'mid-save', 'step', 'mid-save',
                                                     'step', 'step'), seed: int = 0,
              min_cut: int = 1, max_extra: int = 4, cache_dir: str | None = None,
              reference: str | None = None) -> Outcome:
  """The uninterrupted reference, then the killed-and-restarted job; compare both."""
  rng = random.Random(seed)
  cache_dir = cache_dir or os.path.join(root, 'jax-cache')
  os.makedirs(root, exist_ok=True)
  ref_starts = []
  if reference is None:
    reference = os.path.join(root, 'reference')
    ref_starts.append(run_once(reference, num_steps, cache_dir, os.path.join(root, 'ref.log')))
    if ref_starts[-1].returncode != 0:
      raise RuntimeError(f'reference run failed:\n{ref_starts[-1].log}')
  wd = os.path.join(root, 'crashed')
  plan = list(kills)
  starts: list[Start] = []
  extra = 0
  while plan:
    kind = plan.pop(0)
    s = run_once(wd, num_steps, cache_dir, os.path.join(root, f'start{len(starts)}.log'), kind,
                 rng)
    starts.append(s)
    if not s.killed:
      if s.returncode != 0:
        raise RuntimeError(f'start {len(starts) - 1} ({kind}) failed:\n{s.log}')
      raise RuntimeError(f'the job finished before kill {len(starts)} ({kind}); use more steps')
    if not plan and sum(x.cut for x in starts) < min_cut and extra < max_extra:
      plan.append('mid-save')  # no kill landed inside a save yet: try again
      extra += 1
  offset = _size(os.path.join(wd, 'pretrain', 'metrics.jsonl'))
  last = run_once(wd, num_steps, cache_dir, os.path.join(root, f'start{len(starts)}.log'))
  starts.append(last)
  if last.returncode != 0:
    raise RuntimeError(f'the final start failed:\n{last.log}')
  step_a, a = final_state(reference)
  step_b, b = final_state(wd)
  differing = [k for k in sorted(set(a) | set(b)) if k not in a or k not in b or
               a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or
               a[k].tobytes() != b[k].tobytes()]
  return Outcome(starts=starts, ref_starts=ref_starts, final_log=logged(wd, offset),
                 all_log=logged(wd), ref_log=logged(reference),
                 state_equal=step_a == step_b == num_steps and not differing,
                 differing=differing, final_step=step_b, seed=seed)


def table(o: Outcome) -> str:
  rows = ['| start | kill | resumed from | reached step | async save cut | cpu s |',
          '|---|---|---|---|---|---|']
  for i, s in enumerate(o.starts):
    cut = '' if s.kind != 'mid-save' else (f'step {s.save_step}: ' +
                                          ('yes' if s.cut else 'no (finished first)'))
    rows.append(f'| {i} | {s.kind} | {s.resumed_from if s.resumed_from is not None else "-"} | '
                f'{s.reached} | {cut} | {s.cpu_s:.1f} |')
  return '\n'.join(rows)


def main():
  import argparse
  import tempfile
  ap = argparse.ArgumentParser()
  ap.add_argument('--kills', type=int, default=6)
  ap.add_argument('--steps', type=int, default=60)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--root', default='')
  a = ap.parse_args()
  base = ['startup', 'mid-save', 'step', 'mid-save', 'step', 'step']
  kills = (base * (a.kills // len(base) + 1))[:a.kills]
  root = a.root or tempfile.mkdtemp(prefix='jaxft-crash-')
  o = crash_run(root, a.steps, kills, a.seed)
  print(table(o))
  kills_n = sum(s.killed for s in o.starts)
  same_final = all(o.final_log[s] == o.ref_log[s] for s in o.final_log)
  same_all = all(o.all_log.get(s) == o.ref_log[s] for s in o.ref_log)
  print(f'\nkills: {kills_n} (async saves cut: {sum(s.cut for s in o.starts)}); final state '
        f'identical: {o.state_equal}; logged losses after the last kill identical: {same_final} '
        f'({len(o.final_log)} steps); every step identical: {same_all}; root {root}')


if __name__ == '__main__':
  main()

"""Soak: a long tiny pretraining run through the real stage; resident memory must not grow
after warm-up and step times must stay flat.

  python bench/soak.py                    # 2,000 steps, tiny BERT MLM on the bundled corpus
  python bench/soak.py --steps 500 --sample_every 25 --workdir /tmp/soak

The run is the real `pretrain_mlm` stage (`jaxft.main.run_stage`): packed data through the
grain loader, async checkpoints every --ckpt_every steps, eval every --eval_every steps,
metrics.jsonl + TensorBoard. The train iterator is wrapped to sample, every
--sample_every steps, the process's RSS (psutil), open file descriptors and threads, and to
time every step. Step times are taken over windows of --log_every steps (the loop syncs
with the device when it logs, so shorter windows only measure dispatch).

Prints a table and exits 1 when RSS grows by more than --max_growth (5%) from the end of
warm-up (by default: past the first eval and checkpoint, at least 10% of the run) to the end.

Measured cause of the growth that remains: each async checkpoint's host buffers are
allocated by Orbax's writer threads, and glibc's per-thread malloc arenas keep the freed
memory fragmented (about 1-2 MiB per save here); with --malloc_arena_max 2 RSS is flat
after warm-up. Python-level growth (tracemalloc) is ~40 KiB per save, inside
Orbax/TensorStore's metrics.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


class Probe:
  """Wraps the train iterator: one timestamp per batch, resources every `every` batches."""

  def __init__(self, it, every: int):
    import psutil
    self.it, self.every, self.proc = it, every, psutil.Process()
    self.k = 0
    self.times: list[float] = []
    self.samples: list[tuple[int, int, int, int]] = []  # (step, rss, fds, threads)

  def __iter__(self):
    return self

  def __next__(self):
    if self.k % self.every == 0:
      self.samples.append((self.k, self.proc.memory_info().rss, self.proc.num_fds(),
                           self.proc.num_threads()))
    self.times.append(time.perf_counter())
    self.k += 1
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def _config(a):
  import importlib.util
  spec = importlib.util.spec_from_file_location('qs', os.path.join(REPO, 'configs/quickstart.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.pretrain_config()
  c.model.update(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                 max_position_embeddings=64)
  c.data.update(max_len=64, eval_fraction=0.02, eval_max_rows=64)
  c.train.update(num_steps=a.steps, batch_size=a.batch_size, log_every=a.log_every,
                 eval_every=a.eval_every)
  c.checkpoint.update(every=a.ckpt_every, keep=2, async_save=True)
  c.export.hf = False
  return c


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--steps', type=int, default=2000)
  ap.add_argument('--batch_size', type=int, default=16)
  ap.add_argument('--sample_every', type=int, default=50)
  ap.add_argument('--log_every', type=int, default=50)
  ap.add_argument('--eval_every', type=int, default=250)
  ap.add_argument('--ckpt_every', type=int, default=100)
  ap.add_argument('--warmup', type=int, default=0,
                  help='steps (default: past the first eval and checkpoint, >= 10%% of --steps)')
  ap.add_argument('--max_growth', type=float, default=0.05)
  ap.add_argument('--workdir', default='')
  ap.add_argument('--malloc_arena_max', type=int, default=0,
                  help='re-run with MALLOC_ARENA_MAX=N (glibc; 0: as the environment says)')
  a = ap.parse_args()
  if a.malloc_arena_max and os.environ.get('MALLOC_ARENA_MAX') != str(a.malloc_arena_max):
    env = dict(os.environ, MALLOC_ARENA_MAX=str(a.malloc_arena_max))
    os.execve(sys.executable, [sys.executable] + sys.argv, env)  # glibc reads it at start
  # warm-up: until everything ran once (first save, first eval: their compiles and buffers)
  warmup = a.warmup or max(a.steps // 10, a.eval_every, a.ckpt_every) + a.sample_every

  from jaxft import main as main_lib
  from jaxft.data import loader as loader_lib
  probes: list[Probe] = []
  make_loader = loader_lib.make_loader

  def probed(*args, **kw):
    it = make_loader(*args, **kw)
    if kw.get('num_epochs') is None and not probes:  # the (endless) train stream
      probes.append(Probe(it, a.sample_every))
      return probes[0]
    return it

  loader_lib.make_loader = probed
  wd = a.workdir or tempfile.mkdtemp(prefix='jaxft-soak-')
  t0 = time.time()
  try:
    main_lib.run_stage(_config(a), wd)
  finally:
    loader_lib.make_loader = make_loader
    if not a.workdir:
      shutil.rmtree(wd, ignore_errors=True)
  wall = time.time() - t0
  p = probes[0]

  # resources after warm-up
  after = [s for s in p.samples if s[0] >= warmup]
  base, end = after[0], after[-1]
  peak = max(s[1] for s in after)
  growth = end[1] / base[1] - 1
  peak_growth = peak / base[1] - 1
  n = len(after)
  xs = [s[0] for s in after]
  ys = [s[1] / 2**20 for s in after]
  mx, my = sum(xs) / n, sum(ys) / n
  slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys)) /
           max(sum((x - mx) ** 2 for x in xs), 1e-9)) * 1000  # MiB per 1000 steps

  # step times per log window (the loop syncs with the device when it logs)
  w = a.log_every
  windows = []
  for i in range(w, len(p.times), w):
    windows.append((i, (p.times[i] - p.times[i - w]) / w * 1000))
  post = [ms for i, ms in windows if i > warmup]
  med = statistics.median(post)
  q = statistics.quantiles(post, n=20)
  first, last = statistics.median(post[:4]), statistics.median(post[-4:])
  cv = statistics.pstdev(post) / statistics.mean(post)

  print(f'soak: {a.steps} steps, batch {a.batch_size}, wall {wall:.0f}s, warm-up {warmup} steps, '
        f'RSS every {a.sample_every} steps, step time per {w}-step window, MALLOC_ARENA_MAX='
        f'{os.environ.get("MALLOC_ARENA_MAX", "unset")}')
  print('| metric | value |')
  print('|---|---|')
  print(f'| RSS after warm-up (step {base[0]}) | {base[1] / 2**20:.1f} MiB |')
  print(f'| RSS at the end (step {end[0]}) | {end[1] / 2**20:.1f} MiB |')
  print(f'| RSS growth after warm-up (end / peak) | {growth * 100:+.2f}% / {peak_growth * 100:+.2f}% |')
  print(f'| RSS trend (least squares) | {slope:+.2f} MiB per 1000 steps |')
  print(f'| open fds (warm-up -> end) | {base[2]} -> {end[2]} |')
  print(f'| threads (warm-up -> end) | {base[3]} -> {end[3]} |')
  print(f'| step time median / p5 / p95 | {med:.1f} / {q[0]:.1f} / {q[-1]:.1f} ms |')
  print(f'| step time first vs last 4 windows (median) | {first:.1f} -> {last:.1f} ms '
        f'({(last / first - 1) * 100:+.1f}%) |')
  print(f'| step time coefficient of variation (windows) | {cv * 100:.1f}% |')
  series = ' '.join(f'{st}:{rss / 2**20:.0f}' for st, rss, _, _ in p.samples[::max(1, 100 // a.sample_every)])
  print(f'\nRSS (MiB) by step: {series}')
  ok = growth < a.max_growth
  print(f'\nRSS growth {growth * 100:+.2f}% {"<" if ok else ">="} {a.max_growth * 100:.0f}%: '
        f'{"PASS" if ok else "FAIL"}')
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()

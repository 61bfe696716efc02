"""The same command gives the same numbers whether or not an optional package is installed.

torch is the optional package that matters: the `test` / `deploy` extras install it, the
README's first command does not, and in a venv that has it, transformers imports it while
jaxft loads a tokenizer, bringing torch's OpenMP, MKL and oneDNN libraries and its thread
pool into every training process. The quickstart pipeline (MLM pretraining, then SST-2
fine-tuning with dropout), made a few steps long, runs in two processes that differ only in
that: one imports torch (and runs a matmul, which starts its OpenMP threads) before jax is
imported, the other cannot find torch at all (transformers' check sees no torch, as in a venv
without it). Every logged number and every exported parameter must be bit-identical: the same
program on the same CPU with the same thread count and the same data, so exact by
construction; a difference means a code path or a native library that depends on torch.
(What does change the numbers in the last bits: the CPU kind and the number of cores the
process may use, since XLA:CPU splits work by its thread count; README, "The two commands".)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = ('torch', 'torchgen', 'functorch')

# Runs jaxft.main in this process after hiding the optional packages (as if not installed:
# no module spec, no distribution metadata) or importing them first; records at exit which
# of them were imported.
_CHILD = r'''
import atexit, importlib.machinery, json, runpy, sys
mode, report, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
OPTIONAL = {optional!r}
PathFinder = importlib.machinery.PathFinder

class Hidden:
  """sys.meta_path's PathFinder without the optional packages."""
  @staticmethod
  def find_spec(name, path=None, target=None):
    return None if name.partition('.')[0] in OPTIONAL else PathFinder.find_spec(name, path, target)
  @staticmethod
  def find_distributions(*args, **kwargs):
    return (d for d in PathFinder.find_distributions(*args, **kwargs)
            if (d.metadata['Name'] or '').lower() not in OPTIONAL)
  @staticmethod
  def invalidate_caches():
    PathFinder.invalidate_caches()

if mode == 'hidden':
  sys.meta_path[:] = [Hidden if f is PathFinder else f for f in sys.meta_path]
else:
  import torch
  torch.ones(64, 64) @ torch.ones(64, 64)  # its OpenMP pool started before jax is imported

def record():
  with open(report, 'w') as f:
    json.dump(sorted(m for m in OPTIONAL if sys.modules.get(m) is not None), f)
atexit.register(record)
sys.argv = ['jaxft.main'] + argv
runpy.run_module('jaxft.main', run_name='__main__', alter_sys=True)
'''.format(optional=set(OPTIONAL))

# The quickstart pipeline, a few steps of each part on its own data. Every part runs: packing,
# dynamic masking, eval, export, the pretrained encoder loaded by the fine-tune, its
# classifier head initialised, dropout, SST-2 eval.
_ARGS = [f'--config={REPO / "configs" / "quickstart.py"}:smoke',
         '--config.pretrain.train.num_steps=6', '--config.pretrain.train.eval_every=3',
         '--config.pretrain.train.log_every=1', '--config.pretrain.checkpoint.every=0',
         '--config.finetune.train.num_steps=6', '--config.finetune.train.eval_every=3',
         '--config.finetune.train.log_every=1']
_TIMING = ('train/tokens_per_sec',)


def _start(mode: str, workdir: Path):
  env = dict(os.environ)
  # One device and 'auto' dtype as a user's run gets them (bf16 on a CPU with bf16 units);
  # LLVM at -O0 as the suite compiles (both runs alike). No persistent compilation cache:
  # both processes compile, so a cached executable cannot stand in for either.
  env.update(XLA_FLAGS='--xla_backend_optimization_level=0', JAX_PLATFORMS='cpu',
             JAX_ENABLE_COMPILATION_CACHE='false', TOKENIZERS_PARALLELISM='false',
             HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO) + os.pathsep + env.get('PYTHONPATH', ''))
  for key in ('JAXFT_AUTO_DTYPE', 'JAX_COMPILATION_CACHE_DIR'):
    env.pop(key, None)
  report = workdir.parent / f'{workdir.name}-imported.json'
  cmd = [sys.executable, '-c', _CHILD, mode, str(report), f'--workdir={workdir}'] + _ARGS
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True), report


def _imported(mode: str, started) -> list[str]:
  """The optional packages the run imported (after it succeeded)."""
  proc, report = started
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, f'{mode}:\n{output[-5000:]}'
  return json.loads(report.read_text())


def _metrics(run_dir: Path) -> list[dict]:
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  return [{k: v for k, v in row.items() if k not in _TIMING} for row in rows]


def _params(run_dir: Path) -> dict:
  from safetensors.numpy import load_file
  return load_file(run_dir / 'export' / 'model.safetensors')


def test_quickstart_numbers_do_not_depend_on_torch(tmp_path):
  pytest.importorskip('torch')
  # At the same time: each process still sees every core (XLA's thread count is the CPUs
  # the process may use, not how busy they are), and the test takes half the wall time.
  runs = [_start('imported', tmp_path / 'with'), _start('hidden', tmp_path / 'without')]
  try:
    assert 'torch' in _imported('imported', runs[0])
    assert _imported('hidden', runs[1]) == []
  finally:
    for proc, _ in runs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for part in ('pretrain', 'finetune'):
    with_torch, without = tmp_path / 'with' / part, tmp_path / 'without' / part
    rows, rows_without = _metrics(with_torch), _metrics(without)
    assert any('eval/loss' in r for r in rows) and len(rows) >= 6, rows
    for row, row_without in zip(rows, rows_without, strict=True):
      assert row == row_without, f'{part}: torch importable {row}, not {row_without}'
    params, params_without = _params(with_torch), _params(without)
    assert sorted(params) == sorted(params_without)
    for name, value in params.items():
      assert value.dtype == params_without[name].dtype and np.array_equal(
          value, params_without[name]), f'{part}: {name} differs with torch importable'
    finals = [json.loads((d / 'results.json').read_text())['final'] for d in (with_torch, without)]
    assert finals[0] == finals[1], (part, finals)

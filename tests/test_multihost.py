"""Multi-host correctness: 2 local processes x 4 CPU devices train exactly like 1 x 8.

The slow tests start real `python -m jaxft.main` processes joined through
jax.distributed (gloo CPU collectives) on a free local port. The fast tests cover the
pieces: loader striding, the start-up agreement check and the batch-layout check.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft import distributed, partitioning
from jaxft.data.loader import make_loader

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fast

@pytest.mark.parametrize('num_epochs', [None, 1, 3])
@pytest.mark.parametrize('global_batch,processes', [(8, 2), (12, 4), (16, 8)])
def test_loader_processes_assemble_the_single_process_batches(num_epochs, global_batch,
                                                               processes):
  arrays = {'x': np.arange(101), 'y': np.arange(101) * 10}
  single = list(itertools.islice(make_loader(arrays, global_batch_size=global_batch, seed=5,
                                             num_epochs=num_epochs, process_index=0,
                                             process_count=1), 40))
  iters = [make_loader(arrays, global_batch_size=global_batch, seed=5, num_epochs=num_epochs,
                       process_index=p, process_count=processes) for p in range(processes)]
  multi = []
  for _ in range(40):
    parts = [next(it, None) for it in iters]
    if all(p is None for p in parts):
      break
    assert all(p is not None for p in parts), 'processes ran out of batches at different steps'
    multi.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  assert len(multi) == len(single)
  for a, b in zip(single, multi):
    np.testing.assert_array_equal(a['x'], b['x'])
    np.testing.assert_array_equal(a['y'], b['y'])


def test_loader_state_is_the_same_on_every_process():
  arrays = {'x': np.arange(64)}
  its = [make_loader(arrays, global_batch_size=8, seed=0, process_index=p, process_count=2)
         for p in range(2)]
  for it in its:
    for _ in range(3):
      next(it)
  # Orbax saves process 0's data position only; it must be right for every process.
  assert its[0].get_state() == its[1].get_state()
  resumed = make_loader(arrays, global_batch_size=8, seed=0, process_index=1, process_count=2)
  resumed.set_state(its[0].get_state())
  np.testing.assert_array_equal(next(resumed)['x'], next(its[1])['x'])


def _facts(**over):
  from ml_collections import ConfigDict
  cfg = ConfigDict({'seed': 0, 'train': {'num_steps': 10, 'batch_size': 16}})
  cfg.update(over.pop('cfg', {}))
  f = {'config_sha256': distributed.config_fingerprint(cfg),
       'config': distributed.config_json(cfg), 'local_device_count': 4, 'device_count': 8,
       'platform': 'cpu', 'device_kind': 'cpu', 'jax_version': jax.__version__}
  f.update(over)
  return f


def test_compare_processes_names_processes_and_keys():
  from ml_collections import ConfigDict
  assert distributed.compare_processes([_facts(), _facts(), _facts()]) == []
  odd = ConfigDict({'seed': 0, 'train': {'num_steps': 12, 'batch_size': 16}})
  problems = distributed.compare_processes(
      [_facts(), _facts(cfg={'train': odd.train}, local_device_count=2), _facts()])
  text = '\n'.join(problems)
  assert 'local_device_count differs: processes [0, 2] have 4; processes [1] have 2' in text
  assert 'train.num_steps: process 0 has 10, processes [1] have 12' in text
  assert 'seed' not in text.split('train.num_steps')[1]


def test_config_fingerprint_ignores_key_order():
  from ml_collections import ConfigDict
  a = ConfigDict({'a': 1, 'b': {'c': 2, 'd': 3}})
  b = ConfigDict({'b': {'d': 3, 'c': 2}, 'a': 1})
  assert distributed.config_fingerprint(a) == distributed.config_fingerprint(b)
  assert distributed.config_diff(distributed.config_json(a),
                                 distributed.config_json(ConfigDict({'a': 1}))) == [
                                     ('b.c', 2, '<missing>'), ('b.d', 3, '<missing>')]


def test_batch_layout_check():
  rules = partitioning.rules_from_config(())
  mesh = partitioning.make_mesh(partitioning.MeshSettings(data=2, fsdp=2, tensor=2))
  assert distributed.process_batch_rows(mesh, rules, 16) == {0: [(0, 16)]}
  distributed.check_batch_layout(mesh, rules, 16, process_count=1)
  # As if this one process were one of two: it would hold all rows, not its block of 8.
  with pytest.raises(ValueError, match=r'process 0: rows \[\(0, 16\)\].*mesh.tensor within '
                                       r'one host'):
    distributed.check_batch_layout(mesh, rules, 16, process_count=2)
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    distributed.check_batch_layout(mesh, rules, 16, process_count=3)


def test_detected_cluster():
  assert distributed.detected_cluster({}) is None
  assert distributed.detected_cluster({'SLURM_NTASKS': '4'}) is None  # batch script, no srun
  assert distributed.detected_cluster({'SLURM_NTASKS': '4',
                                       'SLURM_STEP_NODELIST': 'n[1-4]'}) == 'slurm'
  assert distributed.detected_cluster({'SLURM_NTASKS': '1',
                                       'SLURM_STEP_NODELIST': 'n1'}) is None
  assert distributed.detected_cluster({'TPU_WORKER_HOSTNAMES': 'a,b'}) == 'tpu'
  assert distributed.detected_cluster({'TPU_WORKER_HOSTNAMES': 'localhost'}) is None
  assert distributed.detected_cluster({'JAXFT_DISTRIBUTED': '1'}) == 'env'


def test_initialize_arguments(monkeypatch):
  for k in ('JAXFT_COORDINATOR', 'JAXFT_NUM_PROCESSES', 'JAXFT_PROCESS_ID', 'JAXFT_DISTRIBUTED',
            'SLURM_STEP_NODELIST', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize() is False  # nothing asked for: single process
  assert distributed.initialize(num_processes=1) is False
  with pytest.raises(ValueError, match='needs --coordinator host:port and --process_id'):
    distributed.initialize(num_processes=2, process_id=0)
  monkeypatch.setenv('JAXFT_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAXFT_COORDINATOR', '127.0.0.1:1')
  with pytest.raises(ValueError, match='needs --coordinator'):
    distributed.initialize()  # JAXFT_PROCESS_ID missing
  with pytest.raises(ValueError, match=r'--process_id=5 is outside 0..1'):
    distributed.initialize(process_id=5)


# ----------------------------------------------------------------------------- slow

_CONFIG = '''
"""Tiny quickstart-derived MLM pretraining for the multi-host tests."""
import importlib.util

_spec = importlib.util.spec_from_file_location('_quickstart', {quickstart!r})
qs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qs)


def get_config(variant=''):
  c = qs.pretrain_config() if hasattr(qs, 'pretrain_config') else qs.get_config()
  c.model.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                 max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
  c.data.files = qs.REPO + '/data/corpus/blake-poems.txt'
  c.data.max_len = 64
  c.data.eval_fraction = 0.0
  c.optimizer.update(schedule='constant', warmup_steps=0)  # the same lr whatever num_steps
  c.train.update(num_steps=10, batch_size=16, eval_every=0, log_every=1)
  c.checkpoint.update(every=10, keep=3)
  c.export.hf = False
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Cluster:
  """Starts N local `python -m jaxft.main` processes that form one jax.distributed run."""

  def __init__(self, tmp: Path, config: Path):
    self.tmp, self.config = tmp, config
    self.runs = 0

  def launch(self, workdir: Path, *overrides: str, devices=(4, 4), timeout: float = 300,
             per_process: dict | None = None):
    self.runs += 1
    port = _free_port()
    procs, logs = [], []
    for pid, n in enumerate(devices):
      # No persistent compilation cache: restarted CPU processes that load cached
      # executables failed to set up their gloo contexts (timeouts) in this setup.
      env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n} '
                 '--xla_backend_optimization_level=0',  # compiles dominate, see conftest
                 JAX_PLATFORMS='cpu', TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1',
                 PYTHONPATH=str(REPO))
      env.pop('JAX_COMPILATION_CACHE_DIR', None)
      log = self.tmp / f'run{self.runs}.p{pid}.log'
      cmd = [sys.executable, '-m', 'jaxft.main', f'--config={self.config}',
             f'--workdir={workdir}', f'--coordinator=127.0.0.1:{port}',
             f'--num_processes={len(devices)}', f'--process_id={pid}', *overrides,
             *((per_process or {}).get(pid, ()))]
      with open(log, 'w') as f:
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                                      stderr=subprocess.STDOUT))
      logs.append(log)
    return _Running(procs, logs, timeout)


class _Running:
  def __init__(self, procs, logs, timeout):
    self.procs, self.logs, self.deadline = procs, logs, time.time() + timeout

  def wait(self) -> list[str]:
    """Exit codes must be collected for all processes; returns their logs."""
    try:
      for p in self.procs:
        p.wait(timeout=max(self.deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      for p in self.procs:
        if p.poll() is None:
          p.kill()
          p.wait()
      pytest.fail('multi-process run timed out:\n' + self._tails())
    return [log.read_text() for log in self.logs]

  def codes(self):
    return [p.returncode for p in self.procs]

  def _tails(self):
    return '\n'.join(f'--- {log.name}\n' + log.read_text()[-3000:] for log in self.logs)

  def check(self) -> list[str]:
    out = self.wait()
    assert self.codes() == [0] * len(self.procs), self._tails()
    return out


def _losses(workdir: Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [r['step'] for r in rows if 'train/loss' in r]
  assert len(steps) == len(set(steps)), f'duplicate metric lines (written by >1 process?): {steps}'
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multihost')
  config = tmp / 'tiny_mlm.py'
  config.write_text(textwrap.dedent(_CONFIG.format(quickstart=str(REPO / 'configs/quickstart.py'))))
  return tmp, config, Cluster(tmp, config)


def _load_config(path: Path, **train):
  spec = importlib.util.spec_from_file_location('_tiny_mlm', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.train.update(**train)
  return cfg


@pytest.mark.slow
def test_two_processes_train_resume_like_one(setup):
  tmp, config, cluster = setup
  multi, single = tmp / 'multi', tmp / 'single'
  t0 = time.time()
  first = cluster.launch(multi)  # 2 x 4 devices, 10 steps, checkpoint at 10
  # Meanwhile the reference: this pytest process, 1 x 8 devices, 14 steps straight through.
  assert jax.process_count() == 1 and jax.device_count() == 8
  from jaxft.main import run_stage
  run_stage(_load_config(config, num_steps=14), str(single))
  logs = first.check()
  t1 = time.time()

  ref = _losses(single)
  assert sorted(ref) == list(range(1, 15))
  got = _losses(multi)
  assert sorted(got) == list(range(1, 11))
  np.testing.assert_allclose([got[s] for s in range(1, 11)], [ref[s] for s in range(1, 11)],
                             rtol=1e-5)
  assert sorted(int(p.name) for p in (multi / 'checkpoints').iterdir()
                if p.name.isdigit()) == [10]
  # Only process 0 logs, writes metrics / TensorBoard / results; both agreed at start-up.
  assert 'params:' in logs[0] and 'params:' not in logs[1]
  assert '2 processes agree' in logs[0]
  assert (multi / 'tb').is_dir() and json.loads((multi / 'results.json').read_text())['step'] == 10

  logs = cluster.launch(multi, '--config.train.num_steps=14').check()  # both processes restart
  t2 = time.time()
  assert 'resumed from' in logs[0] and 'at step 10' in logs[0]
  got = _losses(multi)
  assert sorted(got) == list(range(1, 15))
  np.testing.assert_allclose([got[s] for s in range(11, 15)], [ref[s] for s in range(11, 15)],
                             rtol=1e-5)
  assert json.loads((multi / 'results.json').read_text())['step'] == 14
  assert sorted(int(p.name) for p in (multi / 'checkpoints').iterdir()
                if p.name.isdigit()) == [10, 14]
  print(f'\n2x4 run + 1x8 reference: {t1 - t0:.0f}s; 2x4 restart: {t2 - t1:.0f}s')


@pytest.mark.slow
def test_processes_that_disagree_fail_naming_them(setup):
  tmp, _, cluster = setup
  run = cluster.launch(tmp / 'mismatch', devices=(4, 2), timeout=180,
                       per_process={1: ['--config.train.num_steps=12']})
  logs = run.wait()
  assert run.codes()[0] != 0 and run.codes()[1] != 0
  for log in logs:
    assert 'ProcessMismatchError' in log, log[-3000:]
    assert 'local_device_count differs: processes [0] have 4; processes [1] have 2' in log
    assert 'train.num_steps: process 0 has 10, processes [1] have 12' in log
  assert not (tmp / 'mismatch' / 'checkpoints').exists()  # nothing was compiled or written

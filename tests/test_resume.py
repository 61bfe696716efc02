"""Resume after preemption (SIGTERM) of a real `python -m jaxft.main` run on a device mesh.

One tiny MLM pretraining config (the quickstart's, made smaller: hidden 32, 1 layer,
length 64, batch 16, dropout kept on) on a (data, fsdp, tensor) = (1, 2, 2) mesh of 4 CPU
devices, 60 steps, a checkpoint every 30, a metrics line every step. Two runs start
together:
  A  uninterrupted, 60 steps;
  C  SIGTERMed at step >= 45 (paused with SIGSTOP while the signal is sent, so the step it
     was sent at is known exactly), which must save that step and exit 0; then restarted.
C must end at step 60 with a train state bit-identical to A's (sharded params, Adam state,
rng), and log the same losses for every step after its resume point (same data position,
masks and dropout). SIGKILL at any moment (startup, mid-save, after a step) and the restart
after it are tests/reliability/test_crash_resume.py's: together they cover what a third run
here, SIGKILLed after its first checkpoint, showed.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY, TERM_AT = 60, 30, 45
DEVICES = 4
TIMEOUT = 600


# configs/quickstart.py (pretrain -> finetune) run as its pretraining part only
VARIANT, PREFIX, SUBDIR = 'pretrain', 'pretrain.', 'pretrain'
OVERRIDES = {
    'train.num_steps': STEPS, 'checkpoint.every': EVERY, 'checkpoint.async_save': False,
    'train.eval_every': 0, 'train.log_every': 1, 'data.eval_fraction': 0.0,
    'export.hf': False, 'train.batch_size': 16, 'data.max_len': 64,
    'model.hidden_size': 32, 'model.num_layers': 1, 'model.num_heads': 2,
    'model.intermediate_size': 64, 'model.max_position_embeddings': 64,
    'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.tensor': 2,
}


def _command(workdir):
  cfg = str(REPO / 'configs' / 'quickstart.py') + (f':{VARIANT}' if VARIANT else '')
  return [sys.executable, '-m', 'jaxft.main', f'--config={cfg}', f'--workdir={workdir}'] + [
      f'--config.{PREFIX}{k}={v}' for k, v in OVERRIDES.items()]


def _env():
  env = dict(os.environ)
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES} '
                       '--xla_backend_optimization_level=0',  # compiles dominate, see conftest
             JAX_PLATFORMS='cpu', TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1',
             PYTHONPATH=str(REPO) + os.pathsep + env.get('PYTHONPATH', ''))
  return env


class Run:
  def __init__(self, workdir: Path, name: str):
    self.workdir = workdir
    self.dir = workdir / SUBDIR if SUBDIR else workdir
    self.name = name
    self.proc = None
    self.logs = []

  def start(self):
    log = self.workdir.parent / f'{self.workdir.name}-{len(self.logs)}.log'
    self.logs.append(log)
    self._log_file = open(log, 'w')
    self.proc = subprocess.Popen(_command(self.workdir), cwd=REPO, env=_env(),
                                 stdout=self._log_file, stderr=subprocess.STDOUT)
    return self

  def tail(self, n=40):
    text = self.logs[-1].read_text(errors='replace') if self.logs else ''
    return f'--- {self.name} log ({self.logs[-1] if self.logs else None}):\n' + \
        '\n'.join(text.splitlines()[-n:])

  def check_alive(self):
    rc = self.proc.poll()
    assert rc is None, f'{self.name} exited early with {rc}\n{self.tail()}'

  def wait(self, timeout=TIMEOUT):
    try:
      rc = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise AssertionError(f'{self.name} did not finish in {timeout}s\n{self.tail()}')
    finally:
      self._log_file.close()
    return rc

  def records(self):
    path = self.dir / 'metrics.jsonl'
    if not path.exists():
      return []
    out = []
    for line in path.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except ValueError:
        pass  # a line being written
    return [r for r in out if 'train/loss' in r]

  def last_step(self):
    recs = self.records()
    return recs[-1]['step'] if recs else 0

  def results(self):
    return json.loads((self.dir / 'results.json').read_text())

  def ckpt_steps(self):
    d = self.dir / 'checkpoints'
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _read_state(run: Run, step: int):
  """{path: array} of the whole train state saved at `step` (params, Adam, rng, step)."""
  import orbax.checkpoint as ocp
  path = run.dir / 'checkpoints' / str(step) / 'state'
  ckptr = ocp.StandardCheckpointer()
  try:
    meta = ckptr.metadata(path)
    tree = getattr(meta, 'item_metadata', meta)
    tree = getattr(tree, 'tree', tree)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)
    state = ckptr.restore(path, abstract)
  finally:
    ckptr.close()
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _by_step(records):
  """Last record of each step (a restart re-logs the steps after its checkpoint)."""
  return {r['step']: r for r in records}


KEYS = ('train/loss', 'train/grad_norm', 'train/lr', 'train/accuracy')


def _assert_same_logs(got: dict, ref: dict, steps, who):
  for s in steps:
    assert s in got, f'{who}: no metrics line for step {s}'
    for k in KEYS:
      if k in ref[s]:
        assert got[s][k] == ref[s][k], f'{who} step {s} {k}: {got[s][k]!r} != {ref[s][k]!r}'


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('resume')
  a, c = (Run(root / n, n) for n in ('A', 'C'))
  for r in (a, c):
    r.start()
  info = {}
  try:
    deadline = time.time() + TIMEOUT
    while True:
      assert time.time() < deadline, 'timed out waiting for C\n' + c.tail()
      c.check_alive()
      if c.last_step() >= TERM_AT:
        c.proc.send_signal(signal.SIGSTOP)  # pin the step the signal arrives at
        time.sleep(0.2)
        info['term_step'] = c.last_step()
        c.proc.send_signal(signal.SIGTERM)
        c.proc.send_signal(signal.SIGCONT)
        break
      time.sleep(0.02)
    info['c_rc'] = c.wait()
    info['c_results'] = c.results()
    info['c_ckpts'] = c.ckpt_steps()
    info['c_lines'] = len(c.records())
    c.start()
    info['a_rc'] = a.wait()
    info['c2_rc'] = c.wait()
  finally:
    for r in (a, c):
      if r.proc is not None and r.proc.poll() is None:
        r.proc.kill()
  return a, c, info


@pytest.mark.slow
def test_uninterrupted_reference(runs):
  a, _, info = runs
  assert info['a_rc'] == 0, a.tail()
  res = a.results()
  assert res['step'] == STEPS and not res['preempted']
  assert a.ckpt_steps() == [EVERY, STEPS]
  assert sorted(_by_step(a.records())) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_zero(runs):
  a, c, info = runs
  assert info['c_rc'] == 0, c.tail()
  res, term = info['c_results'], info['term_step']
  stopped = res['step']
  assert res['preempted'] is True, res
  assert TERM_AT <= term <= stopped < STEPS, (term, stopped)
  assert info['c_ckpts'] == [EVERY, stopped], info
  assert info['c_lines'] == stopped  # nothing ran past the saved step
  # the restart continues from the preemption checkpoint to the end, bit-identically
  assert info['c2_rc'] == 0, c.tail()
  assert c.results()['step'] == STEPS and not c.results()['preempted']
  after = c.records()[info['c_lines']:]
  assert [r['step'] for r in after] == list(range(stopped + 1, STEPS + 1))
  _assert_same_logs(_by_step(after), _by_step(a.records()), range(stopped + 1, STEPS + 1),
                    'C restart')
  ref, got = _read_state(a, STEPS), _read_state(c, STEPS)
  assert sorted(got) == sorted(ref)
  assert any('params' in k for k in ref) and any('opt_state' in k for k in ref)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_pipeline_stops_after_a_preempted_stage(tmp_path, monkeypatch):
  """SIGTERM during the quickstart's pretraining saves and returns preempted: the pipeline
  must stop there, not fine-tune from the unfinished pretraining (a rerun resumes it)."""
  from jaxft import main as main_lib
  spec = importlib.util.spec_from_file_location('_qs2', REPO / 'configs' / 'quickstart.py')
  qs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(qs)
  cfg = qs.get_config('smoke')
  from jaxft.stages import finetune, pretrain
  calls = []

  def stub(preempt_first: bool):
    def fake_run(settings, workdir):
      calls.append((settings.stage, settings.init_from))
      return {'step': 7, 'preempted': preempt_first and len(calls) == 1}
    for mod in (pretrain, finetune):
      monkeypatch.setattr(mod, 'run', fake_run)

  stub(preempt_first=True)
  main_lib.run_stage(cfg, str(tmp_path))
  assert [s for s, _ in calls] == [cfg[cfg.pipeline[0]].stage]
  # not preempted: every step runs, each from the previous one's workdir
  calls.clear()
  stub(preempt_first=False)
  main_lib.run_stage(qs.get_config('smoke'), str(tmp_path / 'again'))
  assert [s for s, _ in calls] == [cfg[n].stage for n in cfg.pipeline]
  assert calls[1][1] == str(tmp_path / 'again' / cfg.pipeline[0])

"""Workdir safety: a second process on a workdir is stopped by the lock (naming the holder's
pid), and a workdir holding a different run is refused before anything is written."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxft import main as main_lib
from jaxft import workdir as workdir_lib
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def stub_stages(monkeypatch):
  """The stage runners replaced by a recorder: these tests stop before any training."""
  from jaxft.stages import finetune, predict, pretrain
  calls = []

  def fake(settings, workdir):
    name = settings.stage
    calls.append((name, workdir))
    return {'stage': name}

  for mod in (pretrain, finetune, predict):
    monkeypatch.setattr(mod, 'run', fake)
  return calls


def _cfg(**model):
  c = tiny.config(8)
  c.model.update(**model)
  return c


def _hold_lock(wd):
  """Another process holding the workdir lock: (Popen, pid)."""
  code = ('import sys, time; from jaxft.workdir import WorkdirLock; '
          'WorkdirLock(sys.argv[1]).acquire(); print("locked", flush=True); time.sleep(600)')
  p = subprocess.Popen([sys.executable, '-c', code, wd], stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == 'locked'
  return p


def test_second_process_fails_fast_naming_the_holder(tmp_path, stub_stages):
  wd = str(tmp_path / 'w')
  holder = _hold_lock(wd)
  try:
    t = time.time()
    with pytest.raises(workdir_lib.WorkdirError) as e:
      main_lib.run_stage(_cfg(), wd)
    assert time.time() - t < 30
    msg = str(e.value)
    assert f'{wd} is in use by another jaxft run (pid {holder.pid} on ' in msg, msg
    assert not stub_stages and not os.path.exists(f'{wd}/config.json')
  finally:
    holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock, none is stale
    holder.wait()
  main_lib.run_stage(_cfg(), wd)
  assert stub_stages == [('pretrain_mlm', wd)]
  workdir_lib.WorkdirLock(wd).acquire().release()  # released when the run ended


def test_second_process_via_the_cli_gets_one_line(tmp_path):
  wd = str(tmp_path / 'w')
  holder = _hold_lock(wd)
  try:
    r = subprocess.run(
        [sys.executable, '-m', 'jaxft.main', '--config', f'{REPO}/configs/bert_mlm.py:tiny',
         '--workdir', wd], capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  finally:
    holder.kill()
    holder.wait()
  assert r.returncode == 1, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {wd} is in use by another jaxft run (pid '
                         f'{holder.pid} on '), r.stderr[-2000:]
  assert 'Traceback' not in r.stderr


def test_a_deleted_lock_file_does_not_let_a_second_run_in(tmp_path, stub_stages):
  """The lock is on the workdir directory itself: deleting .jaxft.lock (a cleanup script,
  rm -rf of dot files) while a run holds it does not let a second run in."""
  wd = str(tmp_path / 'w')
  holder = _hold_lock(wd)
  try:
    os.remove(os.path.join(wd, workdir_lib.LOCK_NAME))
    with pytest.raises(workdir_lib.WorkdirError, match=f'{wd} is in use by another jaxft run'):
      main_lib.run_stage(_cfg(), wd)
    assert not stub_stages and not os.path.exists(f'{wd}/config.json')
  finally:
    holder.kill()
    holder.wait()
  main_lib.run_stage(_cfg(), wd)
  assert stub_stages == [('pretrain_mlm', wd)]


def test_read_only_workdir_is_one_line_naming_the_path(read_only_dir, stub_stages):
  root, make_read_only = read_only_dir
  fresh, existing = os.path.join(root, 'fresh'), os.path.join(root, 'run')
  main_lib.run_stage(_cfg(), existing)  # a finished run, then the disk turns read-only
  make_read_only()
  for wd in (fresh, existing):
    with pytest.raises(workdir_lib.WorkdirError) as e:
      main_lib.run_stage(_cfg(), wd)
    msg = str(e.value)
    assert msg.startswith(f'cannot write to the workdir {wd}: '), msg
    assert ('Read-only file system' in msg or 'Permission denied' in msg), msg
    assert 'use a writable --workdir' in msg and '\n' not in msg, msg
  assert stub_stages == [('pretrain_mlm', existing)]


def test_different_run_is_refused_before_anything_is_written(tmp_path, stub_stages):
  wd = str(tmp_path / 'w')
  main_lib.run_stage(_cfg(), wd)
  os.makedirs(f'{wd}/checkpoints/4')
  before = open(f'{wd}/config.json').read()

  with pytest.raises(workdir_lib.WorkdirError) as e:
    main_lib.run_stage(_cfg(hidden_size=32, num_layers=2), wd)
  msg = str(e.value)
  assert f'{wd} holds a different run (pretrain_mlm): ' in msg, msg
  assert 'model.hidden_size: 16 -> 32; model.num_layers: 1 -> 2' in msg, msg
  assert 'overwrite=True' in msg and f'init_from={wd}' in msg

  c = _cfg()
  c.stage = 'pretrain_clm'
  c.model.type = 'gpt2'
  with pytest.raises(workdir_lib.WorkdirError, match=r"stage: 'pretrain_mlm' -> 'pretrain_clm'; "
                                                     r"model\.type: 'bert' -> 'gpt2'"):
    main_lib.run_stage(c, wd)
  assert open(f'{wd}/config.json').read() == before
  assert stub_stages == [('pretrain_mlm', wd)]  # only the first run

  # the same run with other training settings resumes (steps, lr, dropout, batch, remat)
  c = _cfg(hidden_dropout=0.1, remat=True)
  c.train.update(num_steps=100, batch_size=16)
  c.optimizer.lr = 1e-3
  main_lib.run_stage(c, wd)
  assert len(stub_stages) == 2


def test_overwrite_moves_the_old_run_aside(tmp_path, stub_stages):
  wd = str(tmp_path / 'w')
  main_lib.run_stage(_cfg(), wd)
  os.makedirs(f'{wd}/checkpoints/4')
  with open(f'{wd}/metrics.jsonl', 'w') as f:
    f.write('{"step": 4}\n')
  c = _cfg(hidden_size=32)
  c.overwrite = True
  main_lib.run_stage(c, wd)
  assert len(stub_stages) == 2
  (old,) = glob.glob(f'{wd}/overwritten-*')
  assert sorted(os.listdir(old)) == ['checkpoints', 'config.json', 'metrics.jsonl']
  assert json.load(open(f'{old}/config.json'))['model']['hidden_size'] == 16
  assert json.load(open(f'{wd}/config.json'))['model']['hidden_size'] == 32
  assert not os.path.exists(f'{wd}/checkpoints')


def test_a_stage_reading_the_workdir_runs_in_a_subfolder_and_keeps_its_files(tmp_path,
                                                                             stub_stages):
  """A stage given its source as --workdir runs in WORKDIR/<stage>/ (init_from = WORKDIR):
  the source run's config.json and results are never replaced."""
  wd = str(tmp_path / 'w')
  main_lib.run_stage(_cfg(), wd)
  before = open(f'{wd}/config.json').read()
  c = _cfg(hidden_size=32)
  c.init_from = wd  # reads the run in wd as its starting weights
  main_lib.run_stage(c, wd)
  spec = __import__('importlib.util').util.spec_from_file_location('p', f'{REPO}/configs/predict.py')
  mod = __import__('importlib.util').util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  p = mod.get_config()
  main_lib.run_stage(p, wd)  # predict without init_from reads the workdir it runs in
  main_lib.run_stage(p, wd)  # and again: the subfolder holds the same run
  assert stub_stages == [('pretrain_mlm', wd), ('pretrain_mlm', f'{wd}/pretrain_mlm'),
                         ('predict', f'{wd}/predict'), ('predict', f'{wd}/predict')]
  assert open(f'{wd}/config.json').read() == before
  for sub, stage in (('pretrain_mlm', 'pretrain_mlm'), ('predict', 'predict')):
    saved = json.load(open(f'{wd}/{sub}/config.json'))
    assert saved['stage'] == stage and saved['init_from'] == wd
  c = _cfg(hidden_size=64)
  c.overwrite = True  # the readers' outputs belong to the old run: moved aside with it
  main_lib.run_stage(c, wd)
  (old,) = glob.glob(f'{wd}/overwritten-*')
  assert sorted(os.listdir(old)) == ['config.json', 'predict', 'pretrain_mlm']


def test_pipeline_locks_its_root_and_each_sub_workdir(tmp_path, stub_stages, monkeypatch):
  import importlib.util
  spec = importlib.util.spec_from_file_location('q', f'{REPO}/configs/quickstart.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  root = str(tmp_path / 'w')
  held = []

  from jaxft.stages import pretrain

  def check_locks(settings, workdir):
    for d in (root, workdir):
      with pytest.raises(workdir_lib.WorkdirError, match=f'pid {os.getpid()}'):
        workdir_lib.WorkdirLock(d).acquire()
      held.append(d)
    return {}

  monkeypatch.setattr(pretrain, 'run', check_locks)
  main_lib.run_stage(mod.get_config('pretrain'), root)
  assert held == [root, f'{root}/pretrain']
  for d in held:
    workdir_lib.WorkdirLock(d).acquire().release()

  c = mod.get_config('pretrain')
  c.pretrain.model.hidden_size = 256
  c.pretrain.model.num_heads = 4
  with pytest.raises(workdir_lib.WorkdirError, match=r'w/pretrain holds a different run '
                                                     r'.*model\.hidden_size: 128 -> 256'):
    main_lib.run_stage(c, root)

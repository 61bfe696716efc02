"""Disk full while saving: a clear error naming the step, the earlier checkpoints intact,
and the run resumable (bit for bit) once space returns.

The workdir lives on a small tmpfs (mounted by the test: needs root and CAP_SYS_ADMIN).
Elsewhere (or with JAXFT_TEST_DISK_LIMIT=rlimit) it falls back to RLIMIT_FSIZE: a write past
the limit fails with EFBIG, 'File too large', as a full disk fails with ENOSPC; it skips
when neither is possible.
"""
import contextlib
import os
import resource
import signal
import subprocess
import time

import pytest

from jaxft import checkpointing
import tiny

SLACK = 16 << 10  # bytes left free: metrics lines fit, a checkpoint (~150 KB) does not


def _mount_tmpfs(where):
  os.makedirs(where, exist_ok=True)
  r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', where],
                     capture_output=True, text=True)
  if r.returncode:
    raise OSError(r.stderr.strip() or 'mount failed')


class _TmpfsFull:
  name = 'tmpfs'

  def __init__(self, root):
    self.filler = os.path.join(root, 'filler')

  def fill(self):
    st = os.statvfs(os.path.dirname(self.filler))
    n = st.f_bavail * st.f_frsize - SLACK
    with open(self.filler, 'wb') as f:
      for _ in range(n // (1 << 20)):
        f.write(b'\0' * (1 << 20))
      f.write(b'\0' * (n % (1 << 20)))

  def free(self):
    if os.path.exists(self.filler):
      os.remove(self.filler)


class _FileSizeLimit:
  """RLIMIT_FSIZE: writes past `limit` bytes of one file fail (SIGXFSZ ignored)."""
  name = 'RLIMIT_FSIZE'

  def __init__(self, limit=30 << 10):
    self.limit = limit
    self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
    self.handler = None

  def fill(self):
    self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))

  def free(self):
    resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)
    if self.handler is not None:
      signal.signal(signal.SIGXFSZ, self.handler)
      self.handler = None


@contextlib.contextmanager
def _limited_workdir(tmp_path):
  mnt = str(tmp_path / 'mnt')
  reason = 'JAXFT_TEST_DISK_LIMIT=rlimit'
  if os.environ.get('JAXFT_TEST_DISK_LIMIT', 'tmpfs') == 'tmpfs':
    try:
      _mount_tmpfs(mnt)
    except OSError as e:
      reason = f'cannot mount a tmpfs ({e})'
    else:
      try:
        yield mnt, _TmpfsFull(mnt)
      finally:
        subprocess.run(['umount', '-l', mnt], capture_output=True)
      return
  try:
    limit = _FileSizeLimit()
    resource.setrlimit(resource.RLIMIT_FSIZE, limit.saved)  # is the call allowed at all?
  except (ValueError, OSError) as e:
    pytest.skip(f'no way to limit disk space here: {reason}; RLIMIT_FSIZE: {e}')
  os.makedirs(mnt, exist_ok=True)
  try:
    yield mnt, limit
  finally:
    limit.free()


def _wait_saved(ckpt_dir, step, timeout=120):
  """Until step's async save is finished (its folder renamed from the tmp name)."""
  t = time.time()
  while time.time() - t < timeout:
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if str(step) in names and not any(n.startswith(f'{step}.orbax-checkpoint-tmp')
                                      for n in names):
      return
    time.sleep(0.05)
  raise TimeoutError(f'checkpoint {step} not finished after {timeout}s')


def test_disk_full_while_saving_is_clear_and_resumable(tmp_path, caplog):
  ref = tiny.reference()
  with _limited_workdir(tmp_path) as (root, disk):
    wd = os.path.join(root, 'w')

    def fill_before_step_6(k):  # batch k feeds step k+1; steps 2 and 4 are saved by now
      if k == 5:
        _wait_saved(os.path.join(wd, 'checkpoints'), 4)
        disk.fill()

    try:
      with pytest.raises(checkpointing.CheckpointWriteError) as e:
        tiny.train(wd, tiny.config(6), hook=fill_before_step_6)
    finally:
      disk.free()
    msg = str(e.value)
    assert f'could not write checkpoint step 6 to {wd}/checkpoints: ' in msg, msg
    assert ('No space left on device' if disk.name == 'tmpfs' else 'File too large') in msg, msg
    assert 'The earlier checkpoints are intact (steps [2, 4])' in msg, msg
    assert 'rerun the same command to resume from step 4' in msg, msg
    ck = checkpointing.Checkpointer(f'{wd}/checkpoints')
    assert ck.steps() == [2, 4]
    ck.close()

    # space is back: the same command resumes at step 4 and ends where the reference ends
    import logging as py_logging
    with caplog.at_level(py_logging.INFO):
      res = tiny.train(wd, tiny.config(8))
    text = '\n'.join(r.getMessage() for r in caplog.records)
    assert f'resumed from {wd}/checkpoints at step 4' in text
    assert tiny.same_tree(res['state'], ref['state'])
    losses = tiny.logged(wd)
    assert {s: losses[s] for s in range(1, 9)} == {s: ref['losses'][s] for s in range(1, 9)}
    assert sorted(os.listdir(f'{wd}/checkpoints')) == ['4', '6', '8']  # partial step 6 gone


def _export_model():
  """A BERT classifier whose model.safetensors (~70 KB) does not fit in SLACK / the limit."""
  from jaxft.models import ModelConfig, build_model
  cfg = ModelConfig(vocab_size=1024, hidden_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, max_position_embeddings=32)
  return build_model(cfg, 'cls', num_labels=2), cfg


def _files(d):
  return {n: open(os.path.join(d, n), 'rb').read() for n in sorted(os.listdir(d))}


def test_export_on_a_full_disk_is_one_line_and_keeps_the_previous(tmp_path):
  from jaxft import files
  from jaxft import main as main_lib
  from jaxft.models import hf
  model, cfg = _export_model()
  with _limited_workdir(tmp_path) as (root, disk):
    out = os.path.join(root, 'w', 'export')
    hf.save_hf(model, cfg, out, 'cls')
    before = _files(out)
    disk.fill()
    try:
      with pytest.raises(files.OutputWriteError) as e:
        hf.save_hf(model, cfg, out, 'cls')
    finally:
      disk.free()
    msg = str(e.value)
    reason = 'No space left on device' if disk.name == 'tmpfs' else 'File too large'
    assert msg == (f'could not write the Hugging Face export to {out}: {reason} (the previous '
                   'one, if any, is unchanged); free space (or raise the quota) and rerun the '
                   'same command'), msg
    assert main_lib._user_error(e.value) == 1  # the CLI prints it as one line
    assert _files(out) == before
    assert sorted(os.listdir(os.path.dirname(out))) == ['export']  # partial copy removed


def test_config_json_on_a_full_disk_is_one_line_and_keeps_the_old(tmp_path):
  from jaxft import config as config_lib
  from jaxft import files
  with _limited_workdir(tmp_path) as (root, disk):
    wd = os.path.join(root, 'w')
    config_lib.save_config(tiny.config(8), wd)
    before = _files(wd)
    big = tiny.config(8)
    big.note = 'x' * (64 << 10)  # bigger than SLACK / the file size limit
    disk.fill()
    try:
      with pytest.raises(files.OutputWriteError, match=f'could not write config.json to '
                                                       f'{wd}/config.json: '):
        config_lib.save_config(big, wd)
    finally:
      disk.free()
    assert _files(wd) == before  # the old config.json, no temporary file


def test_export_to_a_read_only_disk_is_one_line(read_only_dir):
  from jaxft import files
  from jaxft.models import hf
  root, make_read_only = read_only_dir
  model, cfg = _export_model()
  make_read_only()
  out = os.path.join(root, 'export')
  with pytest.raises(files.OutputWriteError) as e:
    hf.save_hf(model, cfg, out, 'cls')
  msg = str(e.value)
  assert msg.startswith(f'could not write the Hugging Face export to {out}: '), msg
  assert 'Read-only file system' in msg or 'Permission denied' in msg, msg
  assert 'make it writable, or use another --workdir' in msg, msg

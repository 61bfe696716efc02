"""Reliability tests: fault injection (crashes, damaged checkpoints, disk full, NaN, bad
configs, shared workdirs, unsafe checkpoints). Helpers live in tiny.py / harness.py."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def read_only_dir(tmp_path):
  """(dir, make_read_only): a writable directory that `make_read_only()` turns into one on
  a read-only filesystem (a tmpfs remounted read-only; as non-root, modes 0555)."""
  where = str(tmp_path / 'ro')
  os.makedirs(where)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', where],
                           capture_output=True).returncode == 0
  if not mounted and os.geteuid() == 0:
    pytest.skip('cannot mount a tmpfs here (root ignores file modes)')

  def make_read_only():
    if mounted:
      subprocess.run(['mount', '-o', 'remount,ro', where], check=True)
    else:
      for d, _, _ in os.walk(where):
        os.chmod(d, 0o555)

  yield where, make_read_only
  if mounted:
    subprocess.run(['umount', '-l', where], capture_output=True)
  else:
    for d, _, _ in os.walk(where):
      os.chmod(d, 0o755)

"""Damaged checkpoints: every kind of damage to the newest step is detected at restore, the
newest intact step is used, and the log says which step was skipped and why.

Orbax alone raises for missing or truncated files, but a flipped bit in an array's stored
bytes restores without error into wrong numbers (zstd chunks carry no checksum): the
per-array fingerprints recorded in `meta` at save time catch it.
"""
import glob
import logging as py_logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import checkpointing
import tiny


def _state(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {
      'step': jnp.int32(step),
      'params': {'emb': jnp.asarray(rng.normal(size=(256, 64)), jnp.float32),
                 'ln': {'scale': jnp.asarray(rng.normal(size=(64,)), jnp.float32)},
                 'half': jnp.asarray(rng.normal(size=(32, 16)), jnp.bfloat16)},
      'opt_state': {'mu': jnp.asarray(rng.normal(size=(256, 64)), jnp.float32),
                    'count': jnp.int32(step)},
      'rng': jax.random.PRNGKey(0),
      'skipped': jnp.int32(0),
  }


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _save_steps(d, steps=(2, 4, 6)):
  ck = checkpointing.Checkpointer(d, keep=5, async_save=False)
  for s in steps:
    ck.save(s, _state(s), {'train': {'next_index': s}}, {'num_steps': 10})
  ck.close()


def _data_files(step_dir):
  """The OCDBT data files of the state (per-process and merged: damage them all, since
  which copy a restore reads is Orbax's business)."""
  files = [f for f in glob.glob(f'{step_dir}/state/**/d/*', recursive=True) if os.path.isfile(f)]
  assert files, step_dir
  return files


def _largest(step_dir):
  """The data file holding the arrays' bytes (ties: the merged database under state/d/)."""
  return max(_data_files(step_dir), key=lambda f: (os.path.getsize(f), '/state/d/' in f))


def _each(fn):
  return lambda d: [fn(f) for f in _data_files(d)]


def _truncate(path, keep):
  with open(path, 'r+b') as f:
    f.truncate(keep)


def _zero_tail(path):  # a half-written file: full size, second half never reached the disk
  n = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(n // 2)
    f.write(b'\0' * (n - n // 2))


def _flip(path):
  """Bit rot in the middle of the file's largest zstd frame (the biggest stored value).

  A blind offset can land in bytes a restore never reads (a superseded b-tree node, JSON
  whitespace), which is no damage at all; inside the largest frame every bit counts."""
  with open(path, 'rb') as f:
    data = f.read()
  starts, i = [], data.find(_ZSTD_MAGIC)
  while i >= 0:
    starts.append(i)
    i = data.find(_ZSTD_MAGIC, i + 1)
  if not starts:
    starts = [0]
  bounds = list(zip(starts, starts[1:] + [len(data)]))
  start, end = max(bounds, key=lambda b: b[1] - b[0])
  at = (start + end) // 2
  with open(path, 'r+b') as f:
    f.seek(at)
    f.write(bytes([data[at] ^ 0x04]))


_ZSTD_MAGIC = bytes([0x28, 0xB5, 0x2F, 0xFD])

# A training workdir's small arrays are inlined into OCDBT b-tree nodes, and the merged
# database and the per-process one can be the same size, so which file a restore reads is
# not knowable from outside: rot them all (what is read is then damaged, by CRC or checksum).
_flip_every_data_file = _each(_flip)


def _flip_json_value(path, key):
  """One flipped bit in the number after `"key": ` of a JSON item (the file stays valid
  JSON: the dangerous case, read back without error as another number)."""
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  at = data.index(f'"{key}": '.encode()) + len(key) + 4
  while chr(data[at + 1]).isdigit():
    at += 1  # the last digit: a leading '1' -> '0' would not be JSON
  assert chr(data[at]).isdigit(), data
  data[at] ^= 0x01  # '6' -> '7', '0' -> '1'
  with open(path, 'wb') as f:
    f.write(bytes(data))


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


DAMAGE = {
    'truncated data file': _each(lambda f: _truncate(f, os.path.getsize(f) // 2)),
    'data file missing its last 4 KiB': _each(
        lambda f: _truncate(f, max(os.path.getsize(f) - 4096, 0))),
    'missing data file': _each(os.remove),
    'missing OCDBT manifest': lambda d: os.remove(f'{d}/state/manifest.ocdbt'),
    'half-written data file (zeroed tail)': _each(_zero_tail),
    'flipped bit in array data': lambda d: _flip(_largest(d)),
    'missing item (meta)': lambda d: shutil.rmtree(f'{d}/meta'),
    'truncated data-iterator position': lambda d: _truncate(f'{d}/data/metadata', 5),
    'flipped bit in data-iterator position': lambda d: _flip_json_value(f'{d}/data/metadata',
                                                                        'next_index'),
    'flipped bit in meta': lambda d: _flip_json_value(f'{d}/meta/metadata', 'num_steps'),
    'flipped bit in a saved fingerprint': lambda d: _flip_json_value(f'{d}/meta/metadata',
                                                                     'params.emb'),
    'empty step directory': _empty,
}


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('ckpts') / 'checkpoints')
  _save_steps(d)
  return d


@pytest.mark.parametrize('kind', list(DAMAGE))
def test_damaged_newest_step_falls_back_and_says_why(kind, saved, tmp_path, caplog):
  d = str(tmp_path / 'checkpoints')
  shutil.copytree(saved, d)
  DAMAGE[kind](f'{d}/6')
  ck = checkpointing.Checkpointer(d, keep=5, async_save=False)
  with caplog.at_level(py_logging.WARNING):
    step, state, data, meta = ck.restore(_abstract(_state(6)))
  assert step == 4, f'{kind}: restored step {step}'
  assert tiny.same_tree(jax.device_get(state), jax.device_get(_state(4)))
  assert data == {'train': {'next_index': 4}} and meta == {'num_steps': 10}
  text = '\n'.join(r.getMessage() for r in caplog.records)
  assert f'checkpoint step 6 in {d} is damaged, skipping it: ' in text, text
  assert 'resumed from step 4 after skipping damaged step(s) [6]' in text, text
  if kind == 'flipped bit in array data':
    assert 'checksum mismatch' in text, text  # Orbax itself restores it without error
  if kind == 'flipped bit in data-iterator position':
    assert 'data item (data-iterator position) does not match its digest' in text, text
  if kind == 'flipped bit in meta':
    assert 'meta item does not match its digest' in text, text

  # the damaged step is moved aside (kept for inspection), so the resumed run can save
  # step 6 again instead of finding it "already saved" and keeping the damaged copy
  assert ck.steps() == [2, 4]
  assert len(glob.glob(f'{d}.damaged/6-*')) == 1
  assert ck.save(6, _state(6), {'train': {'next_index': 6}}, {'num_steps': 10})
  ck.wait()
  step, state, _, _ = ck.restore(_abstract(_state(6)))
  assert step == 6 and tiny.same_tree(jax.device_get(state), jax.device_get(_state(6)))
  ck.close()


def test_no_intact_step_is_refused_with_each_reason(saved, tmp_path):
  d = str(tmp_path / 'checkpoints')
  shutil.copytree(saved, d)
  DAMAGE['flipped bit in array data'](f'{d}/6')
  DAMAGE['missing data file'](f'{d}/4')
  DAMAGE['missing item (meta)'](f'{d}/2')
  ck = checkpointing.Checkpointer(d, keep=5, async_save=False)
  with pytest.raises(checkpointing.NoIntactCheckpoint) as e:
    ck.restore(_abstract(_state(6)))
  msg = str(e.value)
  assert f'no intact checkpoint in {d}' in msg
  for s in (6, 4, 2):
    assert f'step {s}: ' in msg
  assert 'checksum mismatch' in msg
  assert 'checkpoint.allow_fresh_start=True' in msg
  ck.close()


def test_train_resumes_from_newest_intact_step_and_matches_uninterrupted(tmp_path, caplog):
  """The loop, end to end: steps 8 and 6 damaged -> resume at 4, recompute 5..8; the result
  equals the uninterrupted run bit for bit (nothing lost but recomputation)."""
  ref = tiny.reference()
  wd = tiny.copy_workdir(ref['workdir'], str(tmp_path / 'w'))
  _flip_every_data_file(f'{wd}/checkpoints/8')
  DAMAGE['truncated data file'](f'{wd}/checkpoints/6')
  with caplog.at_level(py_logging.INFO):
    res = tiny.train(wd, tiny.config(8))
  text = '\n'.join(r.getMessage() for r in caplog.records)
  assert 'resumed from step 4 after skipping damaged step(s) [8, 6]' in text, text
  assert tiny.same_tree(res['state'], ref['state'])
  losses = tiny.logged(wd)
  assert {s: losses[s] for s in range(5, 9)} == {s: ref['losses'][s] for s in range(5, 9)}


def test_train_refuses_fresh_start_unless_allowed(tmp_path, caplog):
  ref = tiny.reference()
  wd = tiny.copy_workdir(ref['workdir'], str(tmp_path / 'w'))
  for d in glob.glob(f'{wd}/checkpoints/[0-9]*'):
    _flip_every_data_file(d)
  with pytest.raises(checkpointing.NoIntactCheckpoint, match='allow_fresh_start=True'):
    tiny.train(wd, tiny.config(8))
  cfg = tiny.config(8)
  cfg.checkpoint.allow_fresh_start = True
  with caplog.at_level(py_logging.WARNING):
    res = tiny.train(wd, cfg)
  text = '\n'.join(r.getMessage() for r in caplog.records)
  assert 'no intact checkpoint; starting from scratch' in text
  assert tiny.same_tree(res['state'], ref['state'])  # from scratch == the reference run


def test_init_from_a_workdir_verifies_param_checksums(tmp_path):
  """init_from reads another run's checkpoint outside the resume path: a parameter that
  no longer matches its saved fingerprint is refused, not silently loaded."""
  import json
  from jaxft import sources as init_lib
  ref = tiny.reference()
  wd = tiny.copy_workdir(ref['workdir'], str(tmp_path / 'w'))
  params = init_lib.read_workdir_params(wd, 'latest')  # intact: loads
  assert params and all(np.isfinite(v).all() for v in params.values())
  meta_file = f'{wd}/checkpoints/8/meta/metadata'
  with open(meta_file) as f:
    meta = json.load(f)
  key = sorted(k for k in meta['checksums']['state'] if k.startswith('params.'))[0]
  meta['checksums']['state'][key] ^= 1  # the stored bytes no longer match the fingerprint
  with open(meta_file, 'w') as f:
    json.dump(meta, f)
  with pytest.raises(checkpointing.CorruptCheckpoint, match=f'checksum mismatch.*{key}'):
    init_lib.read_workdir_params(wd, 'latest')


def test_train_never_resumes_at_a_damaged_data_position(tmp_path, caplog):
  """A flipped bit in the data-iterator position of the newest step: without a digest the
  run resumed at the wrong batch (every later loss differed); now the step is skipped and
  the run equals the uninterrupted one."""
  ref = tiny.reference()
  wd = tiny.copy_workdir(ref['workdir'], str(tmp_path / 'w'))
  _flip_json_value(f'{wd}/checkpoints/8/data/metadata', 'next_index')
  with caplog.at_level(py_logging.INFO):
    res = tiny.train(wd, tiny.config(8))
  text = '\n'.join(r.getMessage() for r in caplog.records)
  assert 'resumed from step 6 after skipping damaged step(s) [8]' in text, text
  assert tiny.same_tree(res['state'], ref['state'])
  losses = tiny.logged(wd)
  assert {s: losses[s] for s in (7, 8)} == {s: ref['losses'][s] for s in (7, 8)}


def test_a_changed_optimizer_setup_is_named_not_called_damage(tmp_path):
  """optimizer.clip_norm 1.0 -> 0.0 changes the optimizer-state tree: the restart says what
  changed and what the options are (it was reported as damage on every step, then
  NoIntactCheckpoint suggesting a fresh start); checkpoint.reset_optimizer=True continues
  from the saved parameters with fresh Adam moments."""
  from jaxft import checkpointing
  wd = str(tmp_path / 'w')
  tiny.train(wd, tiny.config(8))
  cfg = tiny.config(12)
  cfg.optimizer.clip_norm = 0.0
  with pytest.raises(checkpointing.StateMismatch) as e:
    tiny.train(wd, cfg)
  msg = str(e.value)
  assert 'holds a train state of another structure than this config builds' in msg, msg
  assert 'opt_state.' in msg and 'checkpoint.reset_optimizer=True' in msg, msg
  assert sorted(os.listdir(f'{wd}/checkpoints')) == ['4', '6', '8']  # nothing quarantined
  cfg.checkpoint.reset_optimizer = True
  res = tiny.train(wd, cfg)
  assert res['step'] == 12
  assert tiny.logged(wd)[9] != tiny.logged(wd)[8]  # trained on from step 8

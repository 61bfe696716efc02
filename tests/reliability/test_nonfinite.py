"""Non-finite loss or gradients: `train.nonfinite` = skip | halt | rollback, through the real
loop with an injected bad batch (batch index 4 feeds step 5; checkpoints every 2 steps)."""
import logging as py_logging

import numpy as np
import pytest

import tiny

BAD = 4  # batch index -> step 5


def _finite(tree):
  return all(np.isfinite(np.asarray(x, np.float32)).all() for x in
             __import__('jax').tree.leaves(tree))


def test_skip_counts_and_logs_skipped_steps(tmp_path):
  wd = str(tmp_path / 'w')
  res = tiny.train(wd, tiny.config(8, nonfinite='skip'), poison={BAD: 2})  # NaN gradients
  assert res['step'] == 8 and res['skipped_steps'] == 1
  assert int(res['state']['skipped']) == 1 and _finite(res['state']['params'])
  skipped = tiny.logged(wd, 'train/skipped_steps')
  assert [skipped[s] for s in range(1, 9)] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_halt_raises_with_step_and_batch_position(tmp_path):
  wd = str(tmp_path / 'w')
  with pytest.raises(FloatingPointError) as e:
    tiny.train(wd, tiny.config(8, nonfinite='halt'), poison={BAD: 1})  # NaN loss
  msg = str(e.value)
  assert 'non-finite loss or gradient at step 5 (train.nonfinite=halt)' in msg, msg
  assert "data position {'train': {'next_index': 5}}" in msg, msg  # the bad batch is the 5th
  assert 'last good checkpoint: 4' in msg, msg


def test_rollback_reloads_last_checkpoint_and_skips_the_bad_batch(tmp_path, caplog):
  """Rolled back to step 4, the run continues on the batches after the bad one: so it ends
  bit for bit where a run on the same data without the bad batch ends."""
  wd = str(tmp_path / 'w')
  with caplog.at_level(py_logging.WARNING):
    res = tiny.train(wd, tiny.config(8, nonfinite='rollback'), poison={BAD: 1})
  text = '\n'.join(r.getMessage() for r in caplog.records)
  assert ("non-finite loss at step 5: rolled back to step 4, skipping the bad batch (data "
          "continues from {'train': {'next_index': 5}})") in text, text
  assert res['step'] == 8 and res['skipped_steps'] == 1 and _finite(res['state']['params'])
  assert tiny.logged(wd, 'train/skipped_steps')[8] == 1

  rows = tiny.rows(64, {BAD: 1})
  keep = np.ones(len(rows['input_ids']), bool)
  keep[BAD * tiny.BATCH:(BAD + 1) * tiny.BATCH] = False
  clean = tiny.train(str(tmp_path / 'clean'), tiny.config(8), rows={k: v[keep] for k, v in
                                                                   rows.items()})
  assert tiny.same_tree(res['state']['params'], clean['state']['params'])
  assert tiny.same_tree(res['state']['opt_state'], clean['state']['opt_state'])


def test_rollback_with_a_persistent_cause_halts_after_max_rollbacks(tmp_path):
  """Every batch from the 5th on is bad (as with lr=1e10): after train.max_rollbacks
  rollbacks in a row that never get past step 5 the run halts, naming the cause, instead of
  rolling back forever."""
  wd = str(tmp_path / 'w')
  poison = {b: 1 for b in range(BAD, 64)}
  with pytest.raises(FloatingPointError) as e:
    tiny.train(wd, tiny.config(8, nonfinite='rollback', max_rollbacks=3), poison=poison)
  msg = str(e.value)
  assert 'non-finite loss at step 5 again: 3 rollbacks in a row to step 4 did not get past ' \
         'step 5' in msg, msg
  assert 'raise train.max_rollbacks' in msg

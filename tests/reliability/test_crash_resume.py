"""Crash anywhere: SIGKILL a real `python -m jaxft.main` pretraining job at random moments
(during startup, while an async checkpoint is being written, after random steps), restart it
each time, and compare with an uninterrupted run: the final train state and the losses
logged after the last kill are identical bit for bit. See harness.py.

JAXFT_CRASH_SEED=<n> replays a kill schedule (the timing of each moment still varies)."""
import os
import random

import pytest

import harness

STEPS = 60
KILLS = ('startup', 'mid-save', 'step', 'step')


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
  seed = int(os.environ.get('JAXFT_CRASH_SEED', random.randrange(10**6)))
  # one kill of each kind and a second after a step (the harness's default plan has six)
  o = harness.crash_run(str(tmp_path), num_steps=STEPS, seed=seed, kills=KILLS)
  about = f'seed {seed}\n{harness.table(o)}'
  print(about)
  killed = [s for s in o.starts if s.killed]
  assert len(killed) >= len(KILLS), about
  assert {s.kind for s in killed} >= set(KILLS), about
  assert any(s.cut for s in o.starts), f'no kill landed inside an async save\n{about}'
  assert sum(s.resumed_from is not None for s in o.starts) >= 3, about
  last = o.starts[-1]
  assert not last.killed and last.returncode == 0 and last.resumed_from, about

  assert o.state_equal, f'final states differ in {o.differing[:5]}\n{about}'
  # the last start logged every step after the one it resumed from, each equal to the
  # uninterrupted run's record (loss, grad norm, lr, accuracy, skipped steps)
  assert sorted(o.final_log) == list(range(last.resumed_from + 1, STEPS + 1)), about
  bad = [s for s in o.final_log if o.final_log[s] != o.ref_log[s]]
  assert not bad, f'steps {bad[:5]} differ: {o.final_log[bad[0]]} vs {o.ref_log[bad[0]]}\n{about}'
  assert o.all_log == o.ref_log, about  # and so did every step's last record

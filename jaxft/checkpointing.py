"""Orbax checkpoints: train state + data-iterator position + metadata, resumed exactly.

Layout under the workdir:
  checkpoints/<step>/{state, data, meta}   the last `checkpoint.keep` steps (async saves)
  best/<step>/{state, data, meta}          the best `checkpoint.keep_best` by a metric
Orbax writes each step to a temporary folder and renames it when complete, so a crash
mid-save never leaves a half-written step that looks finished. Restore walks back from the
newest step to the newest one that restores cleanly and says what it skipped and why.
SIGTERM (preemption of a TPU VM / spot GPU) is turned into a save at the next step
boundary followed by a clean exit.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class NoIntactCheckpoint(RuntimeError):
  pass


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for the jaxft train state."""

  def __init__(self, directory: str, *, keep: int = 3, every: int = 0, async_save: bool = True,
               best_metric: str | None = None, best_mode: str = 'max'):
    self.directory = os.path.abspath(directory)
    self.every = every
    self.best_metric = best_metric
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    if best_metric:
      if best_mode not in ('max', 'min'):
        raise ValueError(f"checkpoint mode {best_mode!r}; allowed: 'max', 'min'")
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep if keep and keep > 0 else None,
          enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
          best_fn=lambda m: float(m[best_metric]), best_mode=best_mode,
          keep_checkpoints_without_metrics=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data', 'meta'))

  def save(self, step: int, state, data_state: dict | None = None, meta: dict | None = None,
           metrics: dict | None = None, force: bool = True) -> bool:
    if step in self.manager.all_steps():
      return False  # already saved (a periodic save and the final/preemption save coincide)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta or {}))
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def restore(self, abstract_state, step: int | None = None):
    """(step, state, data_state, meta) of `step`, or of the newest intact step.

    Returns None when there is no checkpoint at all; raises NoIntactCheckpoint when there
    are checkpoints but none restores.
    """
    steps = [step] if step is not None else list(reversed(self.steps()))
    if not steps:
      return None
    errors = []
    for s in steps:
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001  (any damage: missing/truncated files)
        msg = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
        logging.warning('checkpoint step %d in %s is damaged, skipping it: %s', s,
                        self.directory, msg)
        errors.append((s, msg))
        continue
      if errors:
        logging.warning('resumed from step %d after skipping damaged step(s) %s', s,
                        [e[0] for e in errors])
      return s, restored['state'], dict(restored['data'] or {}), dict(restored['meta'] or {})
    raise NoIntactCheckpoint(
        f'no intact checkpoint in {self.directory}: ' +
        '; '.join(f'step {s}: {m}' for s, m in errors) +
        ' (set checkpoint.allow_fresh_start=True to start from scratch anyway)')

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionGuard:
  """Turns SIGTERM into a flag the loop polls at step boundaries (then save + exit 0)."""

  def __init__(self):
    self.requested = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step boundary')
    self.requested.set()

  def should_stop(self) -> bool:
    """True on every process once any process was signalled (multi-host agreement)."""
    flag = self.requested.is_set()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      import numpy as np
      flag = bool(np.max(multihost_utils.process_allgather(np.array([int(flag)]))))
    return flag

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def data_state_to_json(state: Any) -> dict:
  """Grain iterator states are small dicts of ints; make them JSON-safe."""
  if state is None:
    return {}
  if isinstance(state, dict):
    return {k: data_state_to_json(v) if isinstance(v, dict) else
            (int(v) if hasattr(v, '__int__') and not isinstance(v, (str, bool)) else v)
            for k, v in state.items()}
  return state

"""Orbax checkpoints: train state + data-iterator position + metadata, resumed exactly.

Layout under the workdir:
  checkpoints/<step>/{state, data, meta}   the last `checkpoint.keep` steps (async saves)
  best/<step>/{state, data, meta}          the best `checkpoint.keep_best` by a metric
Orbax writes each step to a temporary folder and renames it when complete, so a crash
mid-save never leaves a half-written step that looks finished. Restore walks back from the
newest step to the newest one that restores cleanly and says what it skipped and why.
Orbax itself does not notice a flipped bit inside an array's stored bytes (zstd chunks carry
no checksum), so every save also records a fingerprint of each state array in `meta` and a
restore recomputes and compares it. The two JSON items are covered too: `meta` records a
digest of the data-iterator position and a digest of itself (a flipped digit in either
parses fine and would resume at the wrong batch or with the wrong settings). A step that
fails any check is moved to `<dir>.damaged/` so that it no longer shadows the intact ones. A save that fails for lack of space raises
`CheckpointWriteError` naming the step and the intact steps to resume from.
SIGTERM (preemption of a TPU VM / spot GPU) is turned into a save at the next step
boundary followed by a clean exit.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from jaxft import files
from jaxft.trees import dotted


class NoIntactCheckpoint(RuntimeError):
  pass


class CorruptCheckpoint(RuntimeError):
  """A step restored without error but its arrays do not match the saved fingerprints."""


class StateMismatch(RuntimeError):
  """The checkpoints hold a train state of another structure than this run builds (a changed
  optimizer, PEFT or freezing setup): not damage, a different configuration."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (disk full, quota, file size limit)."""


CHECKSUM_ALGO = 'u32-weighted-sum-v1'


def _leaf_checksum(x):
  """uint32 sum of (bits of element i) * odd(i), wrapping: any single changed element
  changes it, and integer addition makes it independent of sharding and reduction order."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  size = x.dtype.itemsize
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  idx = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(bits.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[d]
  mult = (idx * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
  return jnp.sum(bits * mult, dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def state_checksums(state) -> dict[str, int]:
  """{array path: fingerprint} of a (sharded) state, computed on the devices."""
  sums = jax.device_get(_checksums_jit(state))
  return {dotted(p): int(v) for p, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def verify_checksums(state, saved: dict | None, partial: bool = False) -> None:
  """Raise CorruptCheckpoint if `state` does not match the fingerprints `saved` with it.

  `partial`: `state` holds only some of the saved arrays (e.g. just the params); compare
  those. No `saved` means a checkpoint written before checksums were recorded."""
  if not saved:
    return
  if saved.get('algo') != CHECKSUM_ALGO:
    raise CorruptCheckpoint(f'unknown checksum algorithm {saved.get("algo")!r}')
  now = state_checksums(state)
  keys = set(now) if partial else set(saved['state']) | set(now)
  bad = sorted(k for k in keys if saved['state'].get(k) != now.get(k))
  if bad:
    raise CorruptCheckpoint(f'checksum mismatch in {len(bad)} of {len(now)} arrays: '
                            f'{", ".join(bad[:3])}{" ..." if len(bad) > 3 else ""}')


def json_digest(item) -> str:
  """sha256 of a JSON item in a canonical form (sorted keys, as it reads back from disk)."""
  canonical = json.dumps(json.loads(json.dumps(item)), sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(canonical.encode()).hexdigest()


def with_digests(meta: dict, data_state: dict) -> dict:
  """`meta` with the digest of `data_state` (in checksums) and of itself ('digest')."""
  meta = dict(meta)
  meta['checksums'] = dict(meta.get('checksums') or {}, data=json_digest(data_state))
  meta.pop('digest', None)
  meta['digest'] = json_digest(meta)
  return meta


def verify_items(meta: dict, data_state: dict) -> None:
  """Raise CorruptCheckpoint if the restored meta or data item differs from what was saved.

  Checkpoints written before digests were recorded have none: nothing to compare."""
  if 'digest' in meta:
    rest = {k: v for k, v in meta.items() if k != 'digest'}
    if json_digest(rest) != meta['digest']:
      raise CorruptCheckpoint('meta item does not match its digest')
  saved = (meta.get('checksums') or {}).get('data')
  if saved is not None and json_digest(data_state) != saved:
    raise CorruptCheckpoint('data item (data-iterator position) does not match its digest')



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
    self._writing: int | None = None  # step of the save that may still be in flight

  def save(self, step: int, state, data_state: dict | None = None, meta: dict | None = None,
           metrics: dict | None = None, force: bool = True) -> bool:
    if step in self.manager.all_steps():
      return False  # already saved (a periodic save and the final/preemption save coincide)
    data_state = data_state or {}
    meta = dict(meta or {})
    meta['checksums'] = {'algo': CHECKSUM_ALGO, 'state': state_checksums(state)}
    meta = with_digests(meta, data_state)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta))
    previous = self._writing
    try:
      self._writing = step
      return self.manager.save(step, args=args, metrics=metrics, force=force)
    except Exception as e:  # noqa: BLE001
      # An async save reports its failure at the next save: blame the step it was writing.
      failed = previous if previous is not None and previous not in self.manager.all_steps() \
          else step
      self._raise_write_error(e, failed)

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
        meta = dict(restored['meta'] or {})
        data_state = dict(restored['data'] or {})
        verify_items(meta, data_state)
        verify_checksums(restored['state'], meta.get('checksums'))
      except Exception as e:  # noqa: BLE001  (any damage: missing/truncated/altered files)
        msg = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
        logging.warning('checkpoint step %d in %s is damaged, skipping it: %s', s,
                        self.directory, msg)
        errors.append((s, msg))
        continue
      if errors:
        logging.warning('resumed from step %d after skipping damaged step(s) %s', s,
                        [e[0] for e in errors])
        if step is None:
          self._quarantine([e[0] for e in errors])
      meta.pop('checksums', None)
      meta.pop('digest', None)
      return s, restored['state'], data_state, meta
    raise NoIntactCheckpoint(
        f'no intact checkpoint in {self.directory}: ' +
        '; '.join(f'step {s}: {m}' for s, m in errors) +
        ' (set checkpoint.allow_fresh_start=True to start from scratch anyway)')

  def saved_structure(self, step: int) -> dict[str, tuple]:
    """{dotted path: (shape, dtype)} of the state `step` holds, from its metadata (no array
    is read); {} when the metadata cannot be read (damage: restore() deals with it)."""
    ckptr = ocp.StandardCheckpointer()
    try:
      meta = ckptr.metadata(os.path.join(self.directory, str(step), 'state'))
      tree = getattr(meta, 'item_metadata', meta)
      tree = getattr(tree, 'tree', tree)
      return {dotted(p): (tuple(m.shape), str(m.dtype))
              for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
    except Exception:  # noqa: BLE001  (missing / damaged metadata)
      return {}
    finally:
      ckptr.close()

  def restore_subset(self, abstract_subset, step: int):
    """(state subset, data_state, meta) of `step`: only the leaves of `abstract_subset` (e.g.
    the params of a state whose optimizer part changed), checked against their checksums."""
    item = os.path.join(self.directory, str(step), 'state')
    state = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
        item=abstract_subset, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subset)))
    rest = self.manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    meta, data_state = dict(rest['meta'] or {}), dict(rest['data'] or {})
    verify_items(meta, data_state)
    verify_checksums(state, meta.get('checksums'), partial=True)
    meta.pop('checksums', None)
    meta.pop('digest', None)
    return state, data_state, meta

  def _quarantine(self, steps: list[int]):
    """Move damaged steps to `<dir>.damaged/` (kept for inspection) so that a resumed run
    can save those steps again and the damaged copies never shadow intact ones."""
    multi = jax.process_count() > 1
    if multi:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('jaxft_quarantine_start')
    if jax.process_index() == 0:
      dest = self.directory + '.damaged'
      os.makedirs(dest, exist_ok=True)
      for s in steps:
        src = os.path.join(self.directory, str(s))
        if os.path.isdir(src):
          target = os.path.join(dest, f'{s}-{time.strftime("%Y%m%d-%H%M%S")}')
          os.replace(src, target)
          logging.warning('moved damaged checkpoint step %d to %s', s, target)
    if multi:
      multihost_utils.sync_global_devices('jaxft_quarantine_done')
    self.manager.reload()

  def _raise_write_error(self, e: BaseException, step: int):
    if not files.is_no_space(e):
      raise e
    self._writing = None
    # The partial `<step>.orbax-checkpoint-tmp*` folder is left alone (Orbax threads may still
    # touch it); the next start removes it (cleanup_tmp_directories).
    try:
      self.manager.reload()
    except Exception:  # noqa: BLE001
      pass
    intact = [s for s in self.steps() if s != step]
    reason = files.write_problem(e)
    resume = (f'rerun the same command to resume from step {intact[-1]}' if intact
              else 'rerun the same command (no earlier checkpoint: it starts over)')
    raise CheckpointWriteError(
        f'could not write checkpoint step {step} to {self.directory}: {reason}. The earlier '
        f'checkpoints are intact (steps {intact}); free space (or lower checkpoint.keep) and '
        f'{resume} (the partial step is removed then)') from e

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._raise_write_error(e, self._writing if self._writing is not None else -1)

  def close(self):
    self.wait()
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

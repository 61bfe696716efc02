"""Deterministic, checkpointable batch loaders over in-memory example arrays.

Grain's `MapDataset` gives random access, per-epoch reshuffling from one seed, and an
iterator whose position (`get_state()`/`set_state()`) is a small dict that Orbax saves
beside the train state, so a resumed run continues the same data stream.
Each process reads only its own shard; the global batch is assembled from the
per-process pieces by the train loop (`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

import math
from typing import Mapping

import grain
import jax
import numpy as np
from absl import logging


class _Rows:
  """A sequence view of a dict of equal-length arrays: row i -> dict of row slices."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f'arrays have different lengths: {lengths}')
    self.arrays = dict(arrays)
    self.n = next(iter(lengths.values()))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}


def make_loader(arrays: Mapping[str, np.ndarray], *, global_batch_size: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None,
                drop_remainder: bool = True, process_index: int | None = None,
                process_count: int | None = None):
  """Returns a checkpointable iterator of per-process batches (dicts of numpy arrays).

  num_epochs=None repeats forever (pretraining); an int gives that many passes.
  Each process gets `global_batch_size // process_count` rows per batch: process p's part
  of global batch b is the contiguous block p of it, so P processes together see exactly
  the batches of one process. With several processes a final partial global batch is
  dropped (every process must run the same number of steps).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'train.batch_size={global_batch_size} is not divisible by the '
                     f'{process_count} processes')
  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.source(_Rows(arrays)).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)  # after shuffle: each epoch gets its own permutation
  # Batch first, then stride over batches: local batch k is rows [k*L, (k+1)*L), and process
  # p takes k = p, p+P, ... So global batch b is rows [b*G, (b+1)*G) in process order, which
  # is how make_array_from_process_local_data lays it out: the same global batch, row for
  # row, as one process would see (striding rows first would interleave them).
  ds = ds.batch(local_batch, drop_remainder=drop_remainder or process_count > 1,
                batch_fn=_stack)
  if process_count > 1 and num_epochs is not None:
    ds = ds[:len(ds) // process_count * process_count]  # equal batch counts: steps stay in sync
  ds = ds[process_index::process_count]
  return iter(ds)


def _stack(rows):
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def indexed(arrays: Mapping[str, np.ndarray], batch_size: int, ignore_index: int = -100):
  """Pad to a multiple of batch_size with `valid`=0 rows and number rows by `index`, so an
  eval covers every example exactly once whatever the batch and process layout (token
  labels of padding rows are `ignore_index`)."""
  n = len(next(iter(arrays.values())))
  total = max(batch_size, math.ceil(n / batch_size) * batch_size)
  out = {}
  for k, v in arrays.items():
    pad = np.zeros((total - n,) + v.shape[1:], v.dtype)
    if k == 'labels' and v.ndim == 2:
      pad[:] = ignore_index
    out[k] = np.concatenate([v, pad])
  out['valid'] = np.concatenate([np.ones(n, np.int32), np.zeros(total - n, np.int32)])
  out['index'] = np.arange(total, dtype=np.int32)
  return out


def ordered(per_example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-example eval outputs sorted back into dataset order, padding rows dropped."""
  order = np.argsort(per_example['index'], kind='stable')
  keep = per_example['valid'][order] > 0
  return {k: v[order][keep] for k, v in per_example.items()}


def eval_batches(arrays: Mapping[str, np.ndarray] | None, batch_size: int,
                 exclude: tuple[str, ...] = ('word_ids', 'weights')):
  """A callable giving a fresh pass over every example of `arrays` (`indexed`, so nothing
  is dropped or repeated), or None without arrays."""
  if arrays is None:
    return None
  padded = indexed({k: v for k, v in arrays.items() if k not in exclude}, batch_size)
  return lambda: make_loader(padded, global_batch_size=batch_size, seed=0, shuffle=False,
                             num_epochs=1, drop_remainder=True)


def lm_eval_batches(arrays: Mapping[str, np.ndarray] | None, batch_size: int, seed: int):
  """Packed LM eval rows in whole batches (every row is full text: a partial last batch is
  dropped); None without arrays or with fewer rows than one batch."""
  if arrays is None or len(arrays['input_ids']) < batch_size:
    if arrays is not None:
      logging.warning('eval set has %d rows < train.batch_size=%d: eval disabled',
                      len(arrays['input_ids']), batch_size)
    return None
  return lambda: make_loader(arrays, global_batch_size=batch_size, seed=seed, shuffle=False,
                             num_epochs=1, drop_remainder=True)

"""Deterministic, checkpointable batch loaders over example arrays or a row data source.

Grain's `MapDataset` gives random access, per-epoch reshuffling from one seed, and an
iterator whose position (`get_state()`/`set_state()`) is a small dict that Orbax saves
beside the train state, so a resumed run continues the same data stream.
Each process reads only its own shard; the global batch is assembled from the
per-process pieces by the train loop (`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

from typing import Mapping

import grain
import jax
import numpy as np


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


def make_loader(arrays, *, global_batch_size: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None,
                drop_remainder: bool = True, process_index: int | None = None,
                process_count: int | None = None):
  """Returns a checkpointable iterator of per-process batches (dicts of numpy arrays).

  `arrays`: a dict of equal-length arrays, or a random-access data source (len() and
  row i -> dict of arrays, e.g. jaxft.data.packing.PackedRows): the same rows give the
  same batches either way.
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
  rows = _Rows(arrays) if isinstance(arrays, Mapping) else arrays
  ds = grain.MapDataset.source(rows).seed(seed)
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


def num_batches(n_examples: int, global_batch_size: int, drop_remainder: bool = True) -> int:
  if drop_remainder:
    return n_examples // global_batch_size
  return -(-n_examples // global_batch_size)

"""A run's exports: workdir/export as a Hugging Face directory (`transformers` opens it)."""
from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging

from jaxft.models import hf
from jaxft.train.state import to_host


@dataclasses.dataclass(frozen=True)
class ExportSettings:
  """The `export` config section."""
  hf: bool = True  # write workdir/export at the end of a training stage


def export_hf(params, mcfg, head: str, workdir: str, tokenizer, id2label=None) -> str:
  """Write workdir/export as a Hugging Face directory (process 0 writes; every process
  takes part in gathering sharded params)."""
  host = to_host(params)
  out = os.path.join(workdir, 'export')
  if jax.process_index() == 0:
    hf.save_hf(host, mcfg, out, head, tokenizer=tokenizer, id2label=id2label)
    logging.info('exported a Hugging Face checkpoint to %s', out)
  return out

"""LM pretraining data: the `data` settings, the token store, packed rows, the eval split.

The corpus is tokenized once into a token store on disk (jaxft.data.token_store: sharded,
parallel over cores and hosts, resumable, memory-mapped) keyed by the text and the
tokenizer, so changing `data.max_len` or the eval split reuses it, and so does every run
that names the same `data.store_dir`. Rows are packed from it lazily
(jaxft.data.packing): training reads row i from the store, nothing of the size of the
corpus is ever held in memory. The eval split is held out by documents (or rows) and
capped (`data.eval_max_rows`), so its cost does not grow with the corpus.

`LmDataSettings` lists every key of the pretraining `data` section with its default;
`default_data_config()` is that as a ConfigDict for config files. The stages read the
section with `config.section(LmDataSettings, cfg.data, 'data')` (a ConfigError naming the
key).
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from jaxft.data import text as text_lib
from jaxft.data import token_store
from jaxft.data.packing import DocSequence, PackedRows, PackSpec, packed_rows
from jaxft.files import InputError

_CLM_TYPES = ('gpt2', 'gpt', 'clm', 'causal')
_MLM_TYPES = ('bert', 'roberta', 'mlm', 'distilbert', 'electra')
CHOICES = {
    'source': ('', 'files', 'hf', 'tfds'),
    'file_format': ('', 'txt', 'jsonl', 'csv', 'tsv', 'parquet'),
    'doc_split': ('blank_line', 'line'),
    'eval_split_by': ('docs', 'tail', 'rows'),
    'store_key': ('content', 'stat'),
    'store_verify': ('checksum', 'size'),
}
_PATH_KEYS = ('files', 'eval_files', 'hf_data_files')


class DataSettingsError(ValueError):
  """A `data.*` key that does not exist or has a bad value (named in the message)."""


@dataclasses.dataclass(frozen=True)
class LmDataSettings:
  """The pretraining `data` section: every key with its default (docs/data.md)."""
  tokenizer: str = ''            # a tokenizer directory / HF name (read by the stage)
  # -- the text (jaxft.data.text)
  source: str = ''               # 'files' | 'hf' | 'tfds'; '' infers: hf_name -> hf,
                                 # tfds_name -> tfds, else files
  files: str | tuple = ''        # a path, glob, directory or 'a,b' list of them (or a
                                 # tuple, in code) (.txt .text .jsonl .ndjson .json .csv .tsv
                                 # .parquet)
  file_format: str = ''          # '' (by extension) | txt | jsonl | csv | tsv | parquet
  doc_split: str = 'blank_line'  # .txt: blank-line-separated blocks | 'line' (one per line)
  text_column: str = 'text'      # jsonl / csv / tsv / parquet / HF / TFDS text field
  hf_name: str = ''              # datasets.load_dataset(hf_name, hf_config, split=hf_split,
  hf_config: str = ''            #   data_files=hf_data_files, streaming=hf_streaming)
  hf_split: str = 'train'
  hf_data_files: str | tuple = ''
  hf_streaming: bool = False
  tfds_name: str = ''            # tfds.data_source(tfds_name, split=tfds_split,
  tfds_split: str = 'train'      #   data_dir=tfds_data_dir)
  tfds_data_dir: str = ''
  eval_files: str | tuple = ''   # an explicit eval source (else held out from the train one)
  hf_eval_split: str = ''
  tfds_eval_split: str = ''
  max_docs: int = 0              # only the first N documents (0 = all): quick runs
  # -- rows and the eval split
  max_len: int = 128             # row length in tokens
  eval_fraction: float = 0.02    # held out from the train source: at most this share ...
  eval_max_rows: int = 1024      # ... and at most this many rows (0 = no cap)
  eval_split_by: str = 'docs'    # 'docs' (seeded random documents) | 'tail' (the last
                                 # documents) | 'rows' (the last packed rows)
  split_seed: int = 0            # seed of the 'docs' selection
  clm_mask_boundaries: bool = False  # read by the CLM stage: no loss across documents
  # -- the token store (jaxft.data.token_store)
  store_dir: str = ''            # where stores live ('' = <workdir>/cache/tokens); share it
                                 # between runs (and hosts) over the same corpus
  store_shard_mb: int = 32       # input megabytes per shard: the unit of parallel work
  store_key: str = 'content'     # 'content' (hash the input bytes) | 'stat' (path, size, mtime)
  store_verify: str = 'checksum'  # at open: 'checksum' (sha256 of every shard) | 'size'
  tokenize_num_proc: int = 0     # tokenizer processes per host (0 = every core)
  tokenize_batch_size: int = 1000  # documents per tokenizer call

  def __post_init__(self):
    for key in _PATH_KEYS:  # programmatic lists of paths (and path objects) are fine too
      value = getattr(self, key)
      if isinstance(value, (list, tuple)):
        object.__setattr__(self, key, tuple(os.fspath(v) for v in value))
      elif isinstance(value, os.PathLike):
        object.__setattr__(self, key, os.fspath(value))
    for key, allowed in CHOICES.items():
      if getattr(self, key) not in allowed:
        raise DataSettingsError(f'data.{key}={getattr(self, key)!r}; allowed: {allowed}')

  def text_source(self, split: str = 'train') -> text_lib.Source | None:
    """The raw text of 'train' or 'eval' (None: no separate eval source is named)."""
    if split not in ('train', 'eval'):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    train = split == 'train'
    kind = self.source or ('hf' if self.hf_name else 'tfds' if self.tfds_name else 'files')
    common = dict(kind=kind, text_column=self.text_column, max_docs=self.max_docs)
    if kind == 'files':
      key = 'files' if train else 'eval_files'
      paths = tuple(text_lib.as_list(getattr(self, key)))
      if not paths:
        if train:
          raise DataSettingsError('data.files is empty: name text files (or set data.hf_name '
                                  '/ data.tfds_name)')
        return None
      return text_lib.Source(paths=paths, key=f'data.{key}', file_format=self.file_format,
                             doc_split=self.doc_split, **common)
    if kind == 'hf':
      split_name = self.hf_split if train else self.hf_eval_split
      if not split_name:
        return None
      return text_lib.Source(hf_name=self.hf_name, hf_config=self.hf_config,
                             hf_split=split_name, hf_streaming=self.hf_streaming,
                             hf_data_files=tuple(text_lib.as_list(self.hf_data_files)),
                             key='data.hf_name', **common)
    split_name = self.tfds_split if train else self.tfds_eval_split
    if not split_name:
      return None
    return text_lib.Source(tfds_name=self.tfds_name, tfds_split=split_name,
                           tfds_data_dir=self.tfds_data_dir, key='data.tfds_name', **common)


def default_data_config():
  """The pretraining `data` section as a ConfigDict: every LmDataSettings key at its
  default. Path keys hold strings, so --config.data.files=/data/text overrides them."""
  import ml_collections
  return ml_collections.ConfigDict(
      {f.name: f.default for f in dataclasses.fields(LmDataSettings)})


# ----------------------------------------------------------------------------- rows

def lm_style(model_type: str) -> str:
  t = (model_type or '').lower()
  if t in _CLM_TYPES:
    return 'clm'
  if t in _MLM_TYPES:
    return 'mlm'
  raise ValueError(f"model.type {model_type!r}: expected one of {_MLM_TYPES + _CLM_TYPES}")


def pack_spec(tokenizer, style: str, max_len: int) -> PackSpec:
  """The special token ids of `tokenizer` that packing writes."""
  name = getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__
  if style == 'mlm':
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    if None in (cls_id, sep_id, pad_id):
      raise ValueError(f'tokenizer {name!r} lacks [CLS]/[SEP]/[PAD] needed for MLM packing '
                       f'(cls={cls_id}, sep={sep_id}, pad={pad_id})')
    return PackSpec('mlm', max_len, sep_id=sep_id, pad_id=pad_id, cls_id=cls_id)
  eos_id = tokenizer.eos_token_id
  if eos_id is None:
    raise ValueError(f'tokenizer {name!r} has no eos token (<|endoftext|>) for CLM packing')
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
  return PackSpec('clm', max_len, sep_id=eos_id, pad_id=pad_id)


def choose_eval_docs(store: token_store.TokenStore, fraction: float, mode: str, seed: int,
                     cap_items: int = 0) -> np.ndarray:
  """Held-out documents (sorted ids): at most `fraction` of them, and with cap_items > 0
  only as many as hold cap_items stream items. 'docs': distinct seeded random ones; 'tail':
  the last ones. Candidates are drawn 1024 at a time until there are enough, so time and
  memory grow with the number held out, not with the corpus."""
  n = store.n_docs
  k = min(n - 1, max(1, round(fraction * n)))
  if mode == 'tail':
    batches = (np.arange(hi - 1, max(hi - 1024, 0) - 1, -1, dtype=np.int64)
               for hi in range(n, 0, -1024))
  elif mode == 'docs':
    batches = _distinct_random(n, seed)
  else:
    raise ValueError(f"unknown document split {mode!r}")
  chosen, items = [], 0
  for batch in batches:
    batch = batch[:k - len(chosen)]
    if cap_items > 0:
      filled = items + np.cumsum(store.stream_lengths(batch))
      stop = int(np.searchsorted(filled, cap_items))
      if stop < len(batch):  # this one fills the cap
        chosen.append(batch[:stop + 1])
        break
      items = int(filled[-1]) if len(filled) else items
    chosen.append(batch)
    if sum(map(len, chosen)) >= k:
      break
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _distinct_random(n: int, seed: int, size: int = 1024):
  """Batches of distinct document ids in a seeded random order (without an O(n) permutation)."""
  rng, seen = np.random.default_rng(seed), set()
  while len(seen) < n:
    batch = []
    for d in rng.integers(0, n, size).tolist():
      if d not in seen:
        seen.add(d)
        batch.append(d)
    yield np.asarray(batch, np.int64)


# ----------------------------------------------------------------------------- entry point

def store_root(settings: LmDataSettings, workdir: str | None) -> str:
  """data.store_dir, else <workdir>/cache/tokens, else a temporary folder (removed at exit)."""
  if settings.store_dir:
    return os.path.expanduser(settings.store_dir)
  if workdir:
    return os.path.join(os.fspath(workdir), 'cache', 'tokens')
  tmp = tempfile.mkdtemp(prefix='jaxft-tokens-')
  atexit.register(shutil.rmtree, tmp, True)
  return tmp


def build_options(settings: LmDataSettings, desc: str, process_index: int | None = None,
                  process_count: int | None = None) -> token_store.BuildOptions:
  if process_index is None or process_count is None:
    import jax  # the data layer reads which host it is on, like loader.make_loader
    process_index, process_count = jax.process_index(), jax.process_count()
  return token_store.BuildOptions(
      num_proc=settings.tokenize_num_proc, batch_size=settings.tokenize_batch_size,
      verify=settings.store_verify, key_mode=settings.store_key,
      shard_bytes=settings.store_shard_mb << 20, process_index=process_index,
      process_count=process_count, show_progress=process_index == 0, desc=desc)


def open_store(settings: LmDataSettings, tokenizer, workdir: str | None, split: str = 'train',
               process_index: int | None = None,
               process_count: int | None = None) -> token_store.TokenStore | None:
  """The token store of the train (or separate eval) source, built first if missing;
  processes (default: jax's) share the tokenizing."""
  source = settings.text_source(split)
  if source is None:
    return None
  options = build_options(settings, f'tokenize {split}', process_index, process_count)
  store = token_store.open_or_build(source, tokenizer, store_root(settings, workdir), options)
  if store.n_docs == 0:
    raise InputError(f'the {split} source of data ({source.describe()}) has no non-empty '
                     'documents: no text to train on')
  logging.info('token store %s: %s documents, %s tokens, %.2f bytes/token (%s in %.1fs)',
               store.path, f'{store.n_docs:,}', f'{store.n_tokens:,}',
               store.nbytes / max(store.n_tokens, 1),
               'built' if store.info.get('built') else 'opened', store.info.get('seconds', 0))
  return store


def build_lm_data(settings: LmDataSettings, tokenizer, workdir: str | None, model_type: str, *,
                  process_index: int | None = None, process_count: int | None = None,
                  ) -> tuple[PackedRows, dict[str, np.ndarray] | None, dict[str, Any]]:
  """(train rows, eval arrays or None, stats) for MLM ('bert') or CLM ('gpt2').

  Train rows are a `PackedRows` data source over the token store (len(), row i -> dict of
  int32 [max_len] arrays: `input_ids`, `attention_mask`, `special_tokens_mask` (1 on
  CLS/SEP/EOS/PAD), and for CLM `segment_ids`); make_loader batches it. The eval rows
  (capped by data.eval_max_rows) are arrays [N, max_len] of the same keys. Eval comes
  from `data.eval_files` / `hf_eval_split` / `tfds_eval_split` when set, else is held out
  of the train source (`data.eval_split_by`); None when data.eval_fraction is 0.
  process_index / process_count (default: jax's) share the tokenizing between hosts.
  """
  style = lm_style(model_type)
  spec = pack_spec(tokenizer, style, settings.max_len)
  process = (process_index, process_count)
  store = open_store(settings, tokenizer, workdir, 'train', *process)
  stats: dict[str, Any] = {
      'style': style, 'max_len': spec.max_len, 'n_docs': store.n_docs,
      'n_tokens': store.n_tokens, 'store_path': store.path,
      'store_built': bool(store.info.get('built')), 'store_seconds': store.info['seconds'],
      'store_bytes': store.nbytes, 'eval_max_rows': settings.eval_max_rows}
  train, evals = _split(settings, spec, store, tokenizer, workdir, stats, process)
  eval_arrays = evals.rows() if evals is not None else None
  stats.update(
      n_train_rows=len(train), n_eval_rows=0 if evals is None else len(evals),
      pad_fraction=train.pad_fraction(),
      eval_pad_fraction=0.0 if evals is None else evals.pad_fraction(),
      train_tokens=train.attended_tokens())
  if evals is not None:
    logging.info('eval: %d rows (%s; cap data.eval_max_rows=%s), %s held-out documents',
                 len(evals), stats['eval_source'], settings.eval_max_rows or 'none',
                 stats.get('n_eval_docs'))
  return train, eval_arrays, stats


def _split(settings, spec, store, tokenizer, workdir, stats, process):
  """(train PackedRows, eval PackedRows or None); records the split in `stats`."""
  cap = settings.eval_max_rows
  everything = DocSequence(store, [[0, store.n_docs]])
  eval_store = open_store(settings, tokenizer, workdir, 'eval', *process)
  if eval_store is not None:
    stats.update(eval_source='separate', n_train_docs=store.n_docs,
                 n_eval_docs=eval_store.n_docs, eval_store_path=eval_store.path)
    evals = packed_rows(DocSequence(eval_store, [[0, eval_store.n_docs]]), spec, cap)
    return packed_rows(everything, spec), evals
  if settings.eval_fraction <= 0:
    stats.update(eval_source='none', n_train_docs=store.n_docs, n_eval_docs=0)
    return packed_rows(everything, spec), None
  mode = settings.eval_split_by
  if mode in ('docs', 'tail') and store.n_docs < 10:
    logging.warning('only %d documents: splitting eval by rows instead of %r', store.n_docs,
                    mode)
    mode = 'rows'
  stats['eval_source'] = f'split:{mode}'
  if mode == 'rows':
    full = packed_rows(everything, spec)
    n_rows = len(full)
    if n_rows < 2:
      raise ValueError(f'only {n_rows} packed row(s): too little text to hold out eval rows; '
                       'add text, lower data.max_len, or set data.eval_fraction=0')
    n_eval = min(n_rows - 1, max(1, math.ceil(settings.eval_fraction * n_rows)),
                 cap if cap > 0 else n_rows)
    stats.update(n_train_docs=store.n_docs, n_eval_docs=None)
    return full.view(0, n_rows - n_eval), full.view(n_rows - n_eval, n_rows)
  held = choose_eval_docs(store, settings.eval_fraction, mode, settings.split_seed,
                          cap * spec.max_len if cap > 0 else 0)
  stats.update(n_train_docs=store.n_docs - len(held), n_eval_docs=len(held))
  return (packed_rows(DocSequence.complement(store, held), spec),
          packed_rows(DocSequence.of(store, held), spec, cap))


def prepare(settings: LmDataSettings, tokenizer, workdir: str | None, model_type: str, *,
            process_index: int | None = None, process_count: int | None = None) -> dict[str, Any]:
  """Everything a training run over these settings reads, made ahead: the token store(s),
  the row index and the eval split (a pod prepares once; every run then starts in
  seconds). Returns the stats of build_lm_data."""
  _, _, stats = build_lm_data(settings, tokenizer, workdir, model_type,
                              process_index=process_index, process_count=process_count)
  return stats

"""LM pretraining data: tokenize once (cached), pack FULL-SENTENCES rows, split train/eval.

Tokenizing is the slow part and depends only on the document text and the tokenizer,
so its result (per-document token ids, no special tokens) is cached under
`workdir/cache/<sha256>.npz`; packing is cheap and redone each run, so changing
`data.max_len` or the eval split reuses the cache.

Packing follows RoBERTa FULL-SENTENCES: rows are filled with contiguous text that may
cross document boundaries, never NSP pairs.
  BERT  (mlm): [CLS] doc1 ... [SEP] doc2 ... [SEP]   every row starts with [CLS] and
               ends with [SEP]; a document cut at a row end continues after the next [CLS].
  GPT-2 (clm): doc1 <|endoftext|> doc2 <|endoftext|> ...   cut into rows of max_len, plus
               `segment_ids` (1, 2, ... per document within a row, 0 on padding) so the
               loss/attention can stop at document boundaries. A document's trailing
               <|endoftext|> belongs to that document's segment.
Only the very last row of a split can be padded.

Config keys (`data.*`, defaults in `DEFAULTS`; source keys are in `jaxft.data.text`):
  max_len             row length in tokens (128)
  eval_fraction       share held out for eval when no eval source is given (0.02; 0 = none)
  eval_split_by       'docs' (a seeded random subset of documents) | 'tail' (the last
                      documents) | 'rows' (the last packed rows) ('docs')
  split_seed          seed of the 'docs' selection (0)
  eval_max_rows       cap on eval rows (0 = all)
  tokenize_batch_size documents per tokenizer call (1000)
  tokenize_cache      use workdir/cache (True)
  clm_mask_boundaries read by the CLM stage: no loss across document boundaries (False)
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from jaxft.data import text as text_lib

CACHE_VERSION = 1

DEFAULTS = dict(
    max_len=128,
    eval_fraction=0.02,
    eval_split_by='docs',
    split_seed=0,
    eval_max_rows=0,
    tokenize_batch_size=1000,
    tokenize_cache=True,
    clm_mask_boundaries=False,
)

_CLM_TYPES = ('gpt2', 'gpt', 'clm', 'causal')
_MLM_TYPES = ('bert', 'roberta', 'mlm', 'distilbert', 'electra')


def default_data_config():
  """A ConfigDict with every pretraining `data.*` key at its default (plus `tokenizer`).

  Path-list keys (files, eval_files, hf_data_files) are None so that either a string
  or a list may be assigned (ConfigDict fixes a field's type at its first value).
  """
  import ml_collections
  cfg = ml_collections.ConfigDict()
  cfg.tokenizer = ''
  for k, v in {**text_lib.DEFAULTS, **DEFAULTS}.items():
    setattr(cfg, k, None if isinstance(v, tuple) else v)
  return cfg


def _get(cfg, key):
  return text_lib.cfg_get(cfg, key, DEFAULTS[key] if key in DEFAULTS else None)


# ----------------------------------------------------------------------------- tokenize

def tokenizer_fingerprint(tokenizer) -> str:
  """Hash of everything that decides token ids: the backend JSON and special tokens."""
  h = hashlib.sha256()
  h.update(type(tokenizer).__name__.encode())
  backend = getattr(tokenizer, 'backend_tokenizer', None)
  if backend is not None:
    h.update(backend.to_str().encode())
  else:  # a slow tokenizer: its vocabulary is the best we have
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  h.update(json.dumps(getattr(tokenizer, 'special_tokens_map', {}), sort_keys=True,
                      default=str).encode())
  return h.hexdigest()


def documents_fingerprint(docs: Sequence[str]) -> str:
  h = hashlib.sha256()
  for d in docs:
    b = d.encode('utf-8')
    h.update(len(b).to_bytes(8, 'little'))
    h.update(b)
  return h.hexdigest()


def cache_key(docs: Sequence[str], tokenizer) -> str:
  settings = dict(version=CACHE_VERSION, add_special_tokens=False, split_special_tokens=True)
  payload = json.dumps(dict(docs=documents_fingerprint(docs),
                            tokenizer=tokenizer_fingerprint(tokenizer), **settings),
                       sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:32]


def tokenize_documents(docs: Sequence[str], tokenizer, cache_dir: str | None = None, *,
                       batch_size: int = 1000, show_progress: bool | None = None,
                       desc: str = 'tokenize') -> tuple[np.ndarray, np.ndarray, dict]:
  """Token ids of every document, concatenated: (tokens int32 [T], offsets int64 [D+1], info).

  Document i is tokens[offsets[i]:offsets[i+1]]. No special tokens are added, and
  special-token spellings inside the text (a literal "[SEP]") stay plain text.
  With `cache_dir`, the result is read from / written to `<cache_dir>/<key>.npz`.
  """
  info = {'cache_path': None, 'cache_hit': False}
  path = None
  if cache_dir:
    path = os.path.join(cache_dir, cache_key(docs, tokenizer) + '.npz')
    info['cache_path'] = path
    if os.path.exists(path):
      loaded = _load_cache(path, len(docs))
      if loaded is not None:
        info['cache_hit'] = True
        return loaded[0], loaded[1], info

  if show_progress is None:
    show_progress = _is_main_process()
  from tqdm.auto import tqdm
  lengths = np.zeros(len(docs), np.int64)
  chunks = []
  with tqdm(total=len(docs), desc=desc, unit='doc', disable=not show_progress,
            mininterval=1.0) as bar:
    for start in range(0, len(docs), batch_size):
      batch = list(docs[start:start + batch_size])
      ids = tokenizer(batch, add_special_tokens=False, split_special_tokens=True,
                      return_attention_mask=False, return_token_type_ids=False,
                      verbose=False)['input_ids']
      n = [len(seq) for seq in ids]
      lengths[start:start + len(ids)] = n
      chunks.append(np.fromiter(itertools.chain.from_iterable(ids), np.int32, sum(n)))
      bar.update(len(batch))
  tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  if path:
    _save_cache(path, tokens, offsets)
  return tokens, offsets, info


def _save_cache(path: str, tokens: np.ndarray, offsets: np.ndarray):
  """Temp file in the same directory, then os.replace: readers never see half a file."""
  d = os.path.dirname(path)
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp-', suffix='.npz')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, tokens=tokens, offsets=offsets, version=np.int64(CACHE_VERSION))
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users of a shared workdir read it too
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _load_cache(path: str, n_docs: int):
  try:
    with np.load(path) as z:
      tokens, offsets = z['tokens'], z['offsets']
      version = int(z['version'])
  except Exception as e:  # corrupt or foreign file: recompute and overwrite
    logging.warning('tokenize cache %s unreadable (%s); recomputing', path, e)
    return None
  if (version != CACHE_VERSION or len(offsets) != n_docs + 1 or offsets[0] != 0
      or offsets[-1] != len(tokens)):
    logging.warning('tokenize cache %s does not match the documents; recomputing', path)
    return None
  return tokens.astype(np.int32, copy=False), offsets.astype(np.int64, copy=False)


def _is_main_process() -> bool:
  try:
    import jax
    return jax.process_index() == 0
  except Exception:
    return True


def select_documents(tokens: np.ndarray, offsets: np.ndarray, idx: np.ndarray):
  """The documents `idx` (in that order) as a new (tokens, offsets) pair."""
  idx = np.asarray(idx, np.int64)
  lengths = offsets[idx + 1] - offsets[idx]
  new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  if len(idx) == 0:
    return np.zeros(0, np.int32), new_offsets
  # One gather: position j of document k is offsets[idx[k]] + j.
  starts = np.repeat(offsets[idx] - new_offsets[:-1], lengths)
  gather = np.arange(new_offsets[-1], dtype=np.int64) + starts
  return tokens[gather], new_offsets


# ----------------------------------------------------------------------------- packing

def _drop_empty(tokens, offsets):
  lengths = np.diff(offsets)
  if (lengths > 0).all():
    return tokens, offsets
  return select_documents(tokens, offsets, np.flatnonzero(lengths > 0))


def _stream_with_separators(tokens, offsets, sep_id):
  """Documents with `sep_id` after each one; also each token's document index."""
  tokens, offsets = _drop_empty(tokens, offsets)
  n_docs = len(offsets) - 1
  lengths = np.diff(offsets)
  stream = np.insert(tokens, offsets[1:], sep_id).astype(np.int32)
  is_sep = np.zeros(len(stream), bool)
  is_sep[offsets[1:] + np.arange(n_docs)] = True
  doc_of = np.repeat(np.arange(n_docs, dtype=np.int64), lengths + 1)
  return stream, is_sep, doc_of


def pack_mlm(tokens: np.ndarray, offsets: np.ndarray, max_len: int, *, cls_id: int,
             sep_id: int, pad_id: int) -> dict[str, np.ndarray]:
  """BERT rows `[CLS] ... [SEP] ... [SEP]`, full except possibly the last one."""
  if max_len < 3:
    raise ValueError(f'data.max_len={max_len} is too short for [CLS] x [SEP]')
  stream, is_sep, _ = _stream_with_separators(tokens, offsets, sep_id)
  body = max_len - 1  # tokens after [CLS], the last of which must be [SEP]
  n = len(stream)
  starts, takes, closes = [], [], []
  i = 0
  while i < n:
    if n - i <= body:
      take, close = n - i, False  # the tail, which ends with its document's [SEP]
    elif is_sep[i + body - 1]:
      take, close = body, False  # a document ends at the row end: its [SEP] closes the row
    else:
      # Cut here; the row gets a closing [SEP] (after a document [SEP] in the rare case
      # that one ends just before the cut, like RoBERTa's </s></s>).
      take, close = body - 1, True
    starts.append(i)
    takes.append(take)
    closes.append(close)
    i += take
  rows = len(starts)
  ids = np.full((rows, max_len), pad_id, np.int32)
  attn = np.zeros((rows, max_len), np.int32)
  special = np.ones((rows, max_len), np.int32)
  for r, (s, t, close) in enumerate(zip(starts, takes, closes)):
    ids[r, 0] = cls_id
    ids[r, 1:1 + t] = stream[s:s + t]
    special[r, 1:1 + t] = is_sep[s:s + t]
    end = 1 + t
    if close:
      ids[r, end] = sep_id
      end += 1
    attn[r, :end] = 1
  return {'input_ids': ids, 'attention_mask': attn, 'special_tokens_mask': special}


def pack_clm(tokens: np.ndarray, offsets: np.ndarray, max_len: int, *, eos_id: int,
             pad_id: int) -> dict[str, np.ndarray]:
  """GPT-2 rows: documents joined by <|endoftext|>, cut every max_len tokens."""
  if max_len < 2:
    raise ValueError(f'data.max_len={max_len} is too short for next-token prediction')
  stream, is_sep, doc_of = _stream_with_separators(tokens, offsets, eos_id)
  n = len(stream)
  rows = -(-n // max_len)
  size = rows * max_len
  ids = np.full(size, pad_id, np.int32)
  ids[:n] = stream
  attn = np.zeros(size, np.int32)
  attn[:n] = 1
  special = np.ones(size, np.int32)
  special[:n] = is_sep
  doc = np.full(size, -1, np.int64)
  doc[:n] = doc_of
  doc = doc.reshape(rows, max_len)
  segment = np.where(attn.reshape(rows, max_len) > 0, doc - doc[:, :1] + 1, 0)
  return {'input_ids': ids.reshape(rows, max_len),
          'attention_mask': attn.reshape(rows, max_len),
          'special_tokens_mask': special.reshape(rows, max_len),
          'segment_ids': segment.astype(np.int32)}


def pad_fraction(arrays: Mapping[str, np.ndarray] | None) -> float:
  if arrays is None or arrays['attention_mask'].size == 0:
    return 0.0
  return float(1.0 - arrays['attention_mask'].mean())


def pad_rows(arrays: Mapping[str, np.ndarray], multiple: int, pad_id: int):
  """Appends all-padding rows so len is a multiple of `multiple` (fixed-shape eval batches).

  Padding rows have attention_mask 0 and special_tokens_mask 1, so neither MLM masking
  nor `clm_labels` ever gives them weight.
  """
  n = len(arrays['input_ids'])
  extra = (-n) % multiple
  if not extra:
    return dict(arrays)
  out = {}
  for k, v in arrays.items():
    fill = pad_id if k == 'input_ids' else 1 if k == 'special_tokens_mask' else 0
    out[k] = np.concatenate([v, np.full((extra,) + v.shape[1:], fill, v.dtype)])
  return out


def _take_rows(arrays, sl):
  return {k: v[sl] for k, v in arrays.items()}


# ----------------------------------------------------------------------------- entry point

def lm_style(model_type: str) -> str:
  t = (model_type or '').lower()
  if t in _CLM_TYPES:
    return 'clm'
  if t in _MLM_TYPES:
    return 'mlm'
  raise ValueError(f"model.type {model_type!r}: expected one of {_MLM_TYPES + _CLM_TYPES}")


def _packer(tokenizer, style: str, max_len: int):
  name = getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__
  if style == 'mlm':
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    if None in (cls_id, sep_id, pad_id):
      raise ValueError(f'tokenizer {name!r} lacks [CLS]/[SEP]/[PAD] needed for MLM packing '
                       f'(cls={cls_id}, sep={sep_id}, pad={pad_id})')
    return lambda t, o: pack_mlm(t, o, max_len, cls_id=cls_id, sep_id=sep_id, pad_id=pad_id)
  eos_id = tokenizer.eos_token_id
  if eos_id is None:
    raise ValueError(f'tokenizer {name!r} has no eos token (<|endoftext|>) for CLM packing')
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
  return lambda t, o: pack_clm(t, o, max_len, eos_id=eos_id, pad_id=pad_id)


def split_documents(n_docs: int, eval_fraction: float, mode: str, seed: int = 0):
  """Deterministic (train_idx, eval_idx) over documents, each sorted ascending."""
  n_eval = min(n_docs - 1, max(1, round(eval_fraction * n_docs)))
  if mode == 'tail':
    eval_idx = np.arange(n_docs - n_eval, n_docs)
  elif mode == 'docs':
    eval_idx = np.sort(np.random.default_rng(seed).permutation(n_docs)[:n_eval])
  else:
    raise ValueError(f"unknown document split {mode!r}")
  keep = np.ones(n_docs, bool)
  keep[eval_idx] = False
  return np.flatnonzero(keep), eval_idx


def build_lm_data(data_cfg, tokenizer, workdir: str | None, model_type: str):
  """Returns (train_arrays, eval_arrays or None, stats) for MLM ('bert') or CLM ('gpt2').

  Arrays are numpy int32 [N, max_len]: `input_ids`, `attention_mask`,
  `special_tokens_mask` (1 on CLS/SEP/EOS/PAD), and for CLM `segment_ids`.
  Eval comes from `data.eval_files`/`hf_eval_split`/`tfds_eval_split` when set, else
  `data.eval_fraction` of the train source (`data.eval_split_by`); None if that is 0.
  """
  style = lm_style(model_type)
  max_len = int(_get(data_cfg, 'max_len'))
  pack = _packer(tokenizer, style, max_len)
  cache_dir = None
  if workdir and _get(data_cfg, 'tokenize_cache'):
    cache_dir = os.path.join(os.fspath(workdir), 'cache')
  batch_size = int(_get(data_cfg, 'tokenize_batch_size'))

  docs = text_lib.load_documents(data_cfg, 'train')
  tokens, offsets, info = tokenize_documents(docs, tokenizer, cache_dir,
                                             batch_size=batch_size, desc='tokenize train')
  stats: dict[str, Any] = {
      'style': style, 'max_len': max_len, 'n_docs': len(docs), 'n_tokens': int(len(tokens)),
      'cache_path': info['cache_path'], 'cache_hit': info['cache_hit']}
  del docs

  eval_docs = text_lib.load_documents(data_cfg, 'eval')
  eval_fraction = float(_get(data_cfg, 'eval_fraction'))
  mode = _get(data_cfg, 'eval_split_by')
  if mode not in ('docs', 'tail', 'rows'):
    raise ValueError(f"data.eval_split_by must be 'docs', 'tail' or 'rows', got {mode!r}")
  n_docs = len(offsets) - 1
  if eval_docs is not None:
    et, eo, einfo = tokenize_documents(eval_docs, tokenizer, cache_dir,
                                       batch_size=batch_size, desc='tokenize eval')
    stats['eval_cache_path'] = einfo['cache_path']
    stats['cache_hit'] = stats['cache_hit'] and einfo['cache_hit']
    stats['eval_source'] = 'separate'
    train, evals = pack(tokens, offsets), pack(et, eo)
    stats.update(n_train_docs=n_docs, n_eval_docs=len(eval_docs))
  elif eval_fraction <= 0:
    stats['eval_source'] = 'none'
    train, evals = pack(tokens, offsets), None
    stats.update(n_train_docs=n_docs, n_eval_docs=0)
  else:
    if mode in ('docs', 'tail') and n_docs < 10:
      logging.warning('only %d documents: splitting eval by rows instead of %r', n_docs, mode)
      mode = 'rows'
    stats['eval_source'] = f'split:{mode}'
    if mode == 'rows':
      packed = pack(tokens, offsets)
      n_rows = len(packed['input_ids'])
      if n_rows < 2:
        raise ValueError(f'only {n_rows} packed row(s): too little text to hold out eval '
                         'rows; add text, lower data.max_len, or set data.eval_fraction=0')
      n_eval = min(n_rows - 1, max(1, math.ceil(eval_fraction * n_rows)))
      train = _take_rows(packed, slice(0, n_rows - n_eval))
      evals = _take_rows(packed, slice(n_rows - n_eval, n_rows))
      stats.update(n_train_docs=n_docs, n_eval_docs=None)
    else:
      train_idx, eval_idx = split_documents(n_docs, eval_fraction, mode,
                                            int(_get(data_cfg, 'split_seed')))
      train = pack(*select_documents(tokens, offsets, train_idx))
      evals = pack(*select_documents(tokens, offsets, eval_idx))
      stats.update(n_train_docs=len(train_idx), n_eval_docs=len(eval_idx))

  eval_max_rows = int(_get(data_cfg, 'eval_max_rows'))
  if evals is not None and eval_max_rows > 0:
    evals = _take_rows(evals, slice(0, eval_max_rows))
  stats.update(
      n_train_rows=len(train['input_ids']),
      n_eval_rows=0 if evals is None else len(evals['input_ids']),
      pad_fraction=pad_fraction(train), eval_pad_fraction=pad_fraction(evals),
      train_tokens=int(train['attention_mask'].sum()))
  return train, evals, stats

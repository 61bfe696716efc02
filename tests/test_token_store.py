"""The token store: packing from it equals in-memory packing; builds resume after a kill,
share work between processes, detect damaged shards; the files are plain Arrow.

Kept cheap for CI: one store of three books (12 shards) built once per module, and at most
one child process per test (a child costs seconds: it imports transformers and torch).
Training resumed mid-epoch from the store is covered by tests/test_resume.py (the quickstart
pretraining reads its corpus through the store)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from jaxft.data import packing, text, token_store
from jaxft.data.pretrain import pack_spec
from jaxft.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / 'data' / 'corpus'
TOKENIZERS = REPO / 'data' / 'tokenizers'
# A few shards of a part of the corpus, for the build tests.
PART = (str(CORPUS / 'austen-persuasion.txt'), str(CORPUS / 'blake-poems.txt'),
        str(CORPUS / 'shakespeare-hamlet.txt'))
SHARD_BYTES = 60_000


def _options(**kw):
  return token_store.BuildOptions(**{'num_proc': 1, 'shard_bytes': SHARD_BYTES,
                                     'show_progress': False, 'poll_seconds': 0.2, **kw})


@pytest.fixture(scope='module')
def bert_tok():
  return load_tokenizer(TOKENIZERS / 'quickstart-wordpiece')


@pytest.fixture(scope='module')
def reference(bert_tok, tmp_path_factory):
  """The store of PART built in one go, in this process."""
  root = tmp_path_factory.mktemp('reference')
  store = token_store.open_or_build(text.Source(paths=PART), bert_tok, str(root), _options())
  assert store.info['built'] and store.n_shards == 12
  return store


def _checksums(store_path):
  with open(os.path.join(store_path, 'manifest.json')) as f:
    return [s['sha256'] for s in json.load(f)['shards']]


# ----------------------------------------------------------------------------- packing

def _in_memory(tokenizer, docs):
  ids = tokenizer(docs, add_special_tokens=False, split_special_tokens=True)['input_ids']
  offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
  tokens = np.concatenate([np.asarray(x, np.int32) for x in ids])
  return tokens, offsets


def _subset(tokens, offsets, docs):
  parts = [tokens[offsets[d]:offsets[d + 1]] for d in docs]
  return np.concatenate(parts), np.concatenate([[0], np.cumsum([len(p) for p in parts])])


def test_rows_from_the_store_equal_in_memory_packing_on_the_corpus(reference, bert_tok):
  """Three books of the bundled corpus in 12 shards: the same rows and masks as pack_mlm and
  pack_clm (packing reads token ids only: one tokenizer serves both), for every document and
  for a held-out split of them."""
  store = reference
  tokens, offsets = _in_memory(bert_tok, text.load_documents(text.Source(paths=PART)))
  assert store.n_docs == 2266 and store.n_tokens == len(tokens) == 155365
  held = np.sort(np.random.default_rng(0).choice(store.n_docs, 100, replace=False))
  kept = np.setdiff1d(np.arange(store.n_docs), held)
  cases = [(packing.DocSequence(store, [[0, store.n_docs]]), (tokens, offsets), 128),
           (packing.DocSequence.complement(store, held), _subset(tokens, offsets, kept), 128),
           (packing.DocSequence.of(store, held), _subset(tokens, offsets, held), 16)]
  mlm = pack_spec(bert_tok, 'mlm', 128)  # the special ids
  for style in ('mlm', 'clm'):
    for seq, (t, o), max_len in cases:
      spec = packing.PackSpec(style, max_len, sep_id=mlm.sep_id, pad_id=mlm.pad_id,
                              cls_id=mlm.cls_id)
      if style == 'mlm':
        want = packing.pack_mlm(t, o, max_len, cls_id=mlm.cls_id, sep_id=mlm.sep_id,
                                pad_id=mlm.pad_id)
      else:
        want = packing.pack_clm(t, o, max_len, eos_id=mlm.sep_id, pad_id=mlm.pad_id)
      rows = packing.packed_rows(seq, spec)
      got = rows.rows()
      assert len(rows) == len(want['input_ids']) and set(got) == set(want)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f'{style} {max_len} {k}')
      assert rows.attended_tokens() == want['attention_mask'].sum()
      # A capped prefix (the eval rows) is the same rows too.
      first = packing.packed_rows(seq, spec, max_rows=5)
      assert all((first.rows()[k] == want[k][:5]).all() for k in want)
      assert first.attended_tokens() == want['attention_mask'][:5].sum()
      middle = rows.view(3, len(rows) - 2)  # and any rows [lo, hi) of it
      assert middle.attended_tokens() == want['attention_mask'][3:-2].sum()
      assert rows.view(len(rows) - 4, len(rows)).attended_tokens() == (
          want['attention_mask'][-4:].sum())


def test_mlm_row_index_is_written_once_and_memory_mapped(reference, bert_tok):
  spec = pack_spec(bert_tok, 'mlm', 64)
  seq = packing.DocSequence(reference, [[0, reference.n_docs]])
  rows = packing.packed_rows(seq, spec)
  assert isinstance(rows.starts, np.memmap) and rows.starts.dtype == np.int64
  index = [f for f in os.listdir(os.path.join(reference.path, 'packed'))
           if f.startswith('mlm-L64-') and f.endswith('.npy')]
  assert index == [f'mlm-L64-{seq.key()}.npy']
  assert os.path.getsize(os.path.join(reference.path, 'packed', index[0])) == 128 + 8 * len(rows)


# ----------------------------------------------------------------------------- building

_CHILD = '''
import json, os, sys, time
from jaxft.data import text, token_store
from jaxft.data.tokenizer import load_tokenizer

def main():
  root, index, count, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
  tokenizer = load_tokenizer({tokenizer!r})
  if len(sys.argv) > 5:  # a start barrier: ready once imported, build when told to
    open(sys.argv[5] + '.ready', 'w').close()
    while not os.path.exists(sys.argv[5] + '.go'):
      time.sleep(0.05)
  write = token_store._write_shard
  def slow_write(*args):  # slow shards: room to kill the build or to share it
    out = write(*args)
    time.sleep(pause)
    return out
  token_store._write_shard = slow_write
  store = token_store.open_or_build(
      text.Source(paths={paths!r}), tokenizer, root,
      token_store.BuildOptions(num_proc=1, shard_bytes={shard_bytes}, show_progress=False,
                               process_index=index, process_count=count, poll_seconds=0.2))
  print('INFO ' + json.dumps(store.info), flush=True)

if __name__ == '__main__':
  main()
'''


def _child(tmp_path, root, index=0, count=1, pause=0.0, barrier=None):
  script = tmp_path / 'build_store.py'
  script.write_text(textwrap.dedent(_CHILD.format(
      paths=PART, tokenizer=str(TOKENIZERS / 'quickstart-wordpiece'), shard_bytes=SHARD_BYTES)))
  env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM='false')
  args = [str(root), str(index), str(count), str(pause)] + ([str(barrier)] if barrier else [])
  return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _info(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(next(line for line in out.splitlines() if line.startswith('INFO '))[5:])


def test_killed_build_resumes_with_its_finished_shards(reference, bert_tok, tmp_path):
  root = tmp_path / 'store'
  proc = _child(tmp_path, root, pause=0.5)
  shards = root / reference.manifest['key'] / 'shards'
  deadline = time.time() + 240
  while len(list(shards.glob('*.json'))) < 3:
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = sorted(shards.glob('*.json'))
  assert 3 <= len(done) < 12 and not (root / reference.manifest['key'] / 'manifest.json').exists()
  before = {p.name: os.stat(p.with_suffix('.arrow')).st_ino for p in done}

  store = token_store.open_or_build(text.Source(paths=PART), bert_tok, str(root), _options())
  assert store.path == os.path.join(root, reference.manifest['key'])
  assert store.info['built'] and store.info['shards_built'] == 12 - len(done)
  assert {p.name: os.stat(p.with_suffix('.arrow')).st_ino for p in done} == before  # kept
  assert _checksums(store.path) == _checksums(reference.path)
  assert not [f for f in os.listdir(shards) if f.endswith('.tmp')]


def test_two_processes_build_one_store_like_one_process(reference, bert_tok, tmp_path,
                                                         monkeypatch):
  """This process is process 0 of 2, a child process 1; both start building together."""
  root, barrier = tmp_path / 'store', tmp_path / 'barrier'
  proc = _child(tmp_path, root, index=1, count=2, pause=0.1, barrier=barrier)
  deadline = time.time() + 240
  while not barrier.with_suffix('.ready').exists():
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  write = token_store._write_shard

  def slow_write(*args):  # as slow as the child's: room for both to take a share
    out = write(*args)
    time.sleep(0.1)
    return out

  monkeypatch.setattr(token_store, '_write_shard', slow_write)
  barrier.with_suffix('.go').touch()
  mine = token_store.open_or_build(text.Source(paths=PART), bert_tok, str(root),
                                   _options(process_index=0, process_count=2)).info
  infos = [mine, _info(proc)]
  assert [i['shards_built'] > 0 for i in infos] == [True, True]  # both took a share ...
  assert sum(i['shards_built'] for i in infos) == 12  # ... and no shard was built twice
  assert _checksums(root / reference.manifest['key']) == _checksums(reference.path)


def test_damaged_shard_is_detected_and_rebuilt(reference, bert_tok, tmp_path, caplog,
                                               monkeypatch):
  root = tmp_path / 'store'
  shutil.copytree(os.path.dirname(reference.path), root)
  path = root / reference.manifest['key']
  shard = path / 'shards' / '00002.arrow'
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF  # same size: only the checksum sees it
  shard.write_bytes(bytes(data))
  store = token_store.open_or_build(text.Source(paths=PART), bert_tok, str(root), _options())
  assert store.info['built'] and store.info['shards_built'] == 1
  assert 'shard 2 damaged' in caplog.text
  assert _checksums(path) == _checksums(reference.path)
  assert shard.read_bytes() != bytes(data) and store.doc_tokens(2000).size
  # Hashes of unchanged files are remembered (root/sha256.json): opening again reads no file.
  calls = []
  monkeypatch.setattr(text, 'file_sha256', lambda p, *a: calls.append(p))
  assert not token_store.open_or_build(text.Source(paths=PART), bert_tok, str(root),
                                       _options()).info['built']
  assert calls == []
  monkeypatch.undo()
  # A truncated shard fails even the cheap size check.
  shard.write_bytes(bytes(data[:100]))
  store = token_store.open_or_build(text.Source(paths=PART), bert_tok, str(root),
                                    _options(verify='size'))
  assert store.info['shards_built'] == 1 and _checksums(path) == _checksums(reference.path)


def test_store_reads_documents_and_is_plain_arrow(reference, bert_tok):
  import datasets
  docs = text.load_documents(text.Source(paths=PART))
  assert reference.n_docs == len(docs)
  for d in (0, 1, 1031, len(docs) - 1):
    want = bert_tok(docs[d], add_special_tokens=False, split_special_tokens=True)['input_ids']
    assert reference.doc_tokens(d).tolist() == want
  shard = datasets.Dataset.from_file(token_store.shard_path(reference.path, 0))
  assert shard.column_names == ['input_ids', 'stream_start']
  assert shard[3]['input_ids'] == reference.doc_tokens(3).tolist()

"""Text sources, data settings, shard plans, FULL-SENTENCES packing, eval split, loader."""
import functools
import json
import os
import random
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from jaxft import config as config_lib
from jaxft.config import ConfigError
from jaxft.data import text
from jaxft.data.loader import make_loader
from jaxft.data.packing import pack_clm, pack_mlm
from jaxft.data.pretrain import (DataSettingsError, LmDataSettings, build_lm_data,
                                 default_data_config)
from jaxft.data.tokenizer import load_tokenizer

DATA = Path(__file__).resolve().parents[1] / 'data'
CORPUS = DATA / 'corpus'


@pytest.fixture(scope='module')
def bert_tok():
  return load_tokenizer(DATA / 'tokenizers' / 'quickstart-wordpiece')


@pytest.fixture(scope='module')
def gpt2_tok():
  return load_tokenizer(DATA / 'tokenizers' / 'gpt2')


def _cfg(**kw):
  """Settings through the ConfigDict a config file holds (so its types are checked too)."""
  cfg = default_data_config()
  for k, v in kw.items():
    if isinstance(v, list):  # programmatic lists of paths: a ConfigDict holds strings
      del cfg[k]
    setattr(cfg, k, v)
  return config_lib.section(LmDataSettings, cfg, 'data')


def _docs(split='train', **kw):
  source = _cfg(**kw).text_source(split)
  return None if source is None else text.load_documents(source)


def _build(cfg, tok, workdir, model_type):
  return build_lm_data(cfg, tok, workdir, model_type, process_index=0, process_count=1)


# ----------------------------------------------------------------------------- sources

def test_txt_blank_line_and_line_split(tmp_path):
  p = tmp_path / 'a.txt'
  p.write_text('first para\nstill first\n\n  \nsecond para\n\n\n\nthird\r\n', encoding='utf-8')
  assert text.read_txt(str(p)) == ['first para\nstill first', 'second para', 'third']
  assert text.read_txt(str(p), 'line') == ['first para', 'still first', 'second para', 'third']
  assert _docs(files=str(p), doc_split='line') == [
      'first para', 'still first', 'second para', 'third']
  with pytest.raises(ValueError, match='doc_split'):
    text.read_txt(str(p), 'sentence')


def test_jsonl_csv_tsv_with_text_column(tmp_path):
  (tmp_path / 'a.jsonl').write_text(
      '{"id": 1, "body": "alpha"}\n\n{"id": 2, "body": "beta"}\n{"id": 3, "body": ""}\n')
  (tmp_path / 'b.csv').write_text('id,body\n1,"gamma, with comma"\n2,"multi\nline"\n')
  (tmp_path / 'c.tsv').write_text('body\tlabel\ndelta "quoted"\t0\nepsilon\t1\n')
  (tmp_path / 'd.json').write_text(json.dumps([{'body': 'zeta'}, {'body': 'eta'}]))
  assert _docs(files=str(tmp_path / '*'), text_column='body') == [
      'alpha', 'beta', 'gamma, with comma', 'multi\nline', 'delta "quoted"', 'epsilon', 'zeta',
      'eta']
  # A list of paths keeps its order; a directory expands to its supported files.
  assert _docs(files=[str(tmp_path / 'c.tsv'), str(tmp_path / 'a.jsonl')],
               text_column='body') == ['delta "quoted"', 'epsilon', 'alpha', 'beta']
  assert _docs(files=f'{tmp_path / "c.tsv"},{tmp_path / "a.jsonl"}',
               text_column='body') == ['delta "quoted"', 'epsilon', 'alpha', 'beta']
  assert len(_docs(files=str(tmp_path), text_column='body')) == 8
  assert _docs(files=str(tmp_path / '*'), text_column='body',
               max_docs=3) == ['alpha', 'beta', 'gamma, with comma']


def test_errors_name_file_line_and_columns(tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"text": "ok"}\n{"text": "ok2"}\n{"text": oops}\n')
  with pytest.raises(ValueError, match=r'bad\.jsonl:3: bad JSON'):
    text.read_files([str(bad)])
  nocol = tmp_path / 'nocol.jsonl'
  nocol.write_text('{"text": "ok"}\n{"content": "x", "id": 2}\n')
  with pytest.raises(KeyError, match=r"nocol\.jsonl:2: no column 'text'.*\['content', 'id'\]"):
    text.read_files([str(nocol)])
  csvf = tmp_path / 'x.csv'
  csvf.write_text('sentence,label\nhi,1\n')
  with pytest.raises(KeyError, match=r"x\.csv:1: no column 'text'.*\['sentence', 'label'\]"):
    text.read_files([str(csvf)])
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    text.read_files([str(tmp_path / 'missing.txt')])
  with pytest.raises(FileNotFoundError, match=r'\*\.nothing'):
    text.read_files([str(tmp_path / '*.nothing')])
  odd = tmp_path / 'x.xls'
  odd.write_bytes(b'PK')
  with pytest.raises(ValueError, match=r'x\.xls: unknown file type'):
    text.read_files([str(odd)])
  latin = tmp_path / 'latin.txt'
  latin.write_bytes(b'line one\nline two caf\xe9\n')
  with pytest.raises(ValueError, match=r'latin\.txt:2: not valid UTF-8'):
    text.read_files([str(latin)])
  with pytest.raises(DataSettingsError, match='data.files is empty'):
    _docs()


def test_hf_datasets_with_local_files(tmp_path):
  t = tmp_path / 'train.txt'
  t.write_text('line one\nline two\n\nline three\n')
  j = tmp_path / 'train.jsonl'
  j.write_text('{"body": "json one"}\n{"body": "json two"}\n')
  assert _docs(hf_name='text', hf_data_files=[str(t)]) == ['line one', 'line two', 'line three']
  docs = _docs(hf_name='json', hf_data_files=str(j), text_column='body')
  assert docs == ['json one', 'json two']
  # Streamed (an IterableDataset read by its own shards): the same documents.
  assert _docs(hf_name='json', hf_data_files=str(j), text_column='body',
               hf_streaming=True) == docs
  assert _docs('eval', hf_name='json', hf_data_files=str(j)) is None
  with pytest.raises(KeyError, match=r"no column 'text'.*\['body'\]"):
    _docs(hf_name='json', hf_data_files=str(j))


def test_tfds_source_mocked_and_missing(monkeypatch):
  calls = {}

  def data_source(name, split, data_dir=None):
    calls.update(name=name, split=split, data_dir=data_dir)
    return [{'text': b'tfds one', 'id': 0}, {'text': b'  ', 'id': 1},
            {'text': np.bytes_(b'tfds two'), 'id': 2}]

  monkeypatch.setitem(sys.modules, 'tensorflow_datasets',
                      types.SimpleNamespace(data_source=data_source))
  text.tfds_source.cache_clear()
  kw = dict(tfds_name='lm1b', tfds_split='train[:3]', tfds_data_dir='/d')
  assert _docs(**kw) == ['tfds one', 'tfds two']
  assert calls == {'name': 'lm1b', 'split': 'train[:3]', 'data_dir': '/d'}
  with pytest.raises(KeyError, match=r"no feature 'body'.*\['id', 'text'\]"):
    _docs(tfds_name='lm1b', text_column='body')
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # import now fails
  text.tfds_source.cache_clear()
  with pytest.raises(ImportError, match=r"jaxft\[tfds\]"):
    _docs(**kw)
  text.tfds_source.cache_clear()


# ----------------------------------------------------------------------------- packing

def _random_docs(rng, n, max_doc):
  lengths = rng.integers(0, max_doc, n)
  lengths[:4] = [13, 14, 15, 60]  # around body = max_len - 1 = 15, and longer than a row
  tokens = rng.integers(10, 1000, lengths.sum()).astype(np.int32)
  return tokens, np.concatenate([[0], np.cumsum(lengths)])


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_pack_mlm_rows_are_full_and_lose_nothing(seed):
  rng = np.random.default_rng(seed)
  tokens, offsets = _random_docs(rng, 300, 40)
  CLS, SEP, PAD, L = 2, 3, 0, 16
  out = pack_mlm(tokens, offsets, L, cls_id=CLS, sep_id=SEP, pad_id=PAD)
  ids, attn, special = out['input_ids'], out['attention_mask'], out['special_tokens_mask']
  assert ids.dtype == attn.dtype == special.dtype == np.int32 and ids.shape[1] == L
  assert (attn[:-1] == 1).all()  # only the last row may be padded
  assert (ids[:, 0] == CLS).all() and (ids[:, 1:] != CLS).all()
  n = attn.sum(1)
  assert (ids[np.arange(len(ids)), n - 1] == SEP).all()
  assert (ids[attn == 0] == PAD).all()
  assert (special == np.isin(ids, [CLS, SEP, PAD])).all()
  # Walk the rows against the ideal stream doc1 SEP doc2 SEP ...: every token in order,
  # every document followed by SEP; the only extra tokens are row-closing SEPs.
  lengths = np.diff(offsets)
  ideal = []
  for d in range(len(lengths)):
    if lengths[d]:
      ideal += list(tokens[offsets[d]:offsets[d + 1]]) + [SEP]
  i = 0
  for r in range(len(ids)):
    for j in range(1, n[r]):
      if i < len(ideal) and ids[r, j] == ideal[i]:
        i += 1
      else:
        assert ids[r, j] == SEP and j == n[r] - 1, (r, j)
  assert i == len(ideal)
  # Rows are as many as the tokens need (one closing SEP each, at most).
  assert len(ids) <= -(-len(ideal) // (L - 2)) + 1


def test_pack_clm_joins_documents_with_eos():
  rng = np.random.default_rng(0)
  tokens, offsets = _random_docs(rng, 200, 30)
  EOS, L = 50256, 16
  out = pack_clm(tokens, offsets, L, eos_id=EOS, pad_id=EOS)
  ids, attn, seg = out['input_ids'], out['attention_mask'], out['segment_ids']
  assert (attn[:-1] == 1).all()
  ideal = []
  for d in range(len(offsets) - 1):
    if offsets[d + 1] > offsets[d]:
      ideal += list(tokens[offsets[d]:offsets[d + 1]]) + [EOS]
  assert ids[attn == 1].tolist() == ideal
  assert (seg[attn == 0] == 0).all() and (seg[:, 0] == 1).all()
  # A new segment starts right after each EOS (the EOS stays with its document).
  for r in range(len(ids)):
    for j in range(1, attn[r].sum()):
      assert seg[r, j] == seg[r, j - 1] + (ids[r, j - 1] == EOS)
  assert (out['special_tokens_mask'] == ((ids == EOS) | (attn == 0))).all()


# ----------------------------------------------------------------------------- more sources

def test_parquet_files_by_row_groups(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  texts = [f'parquet document {i}' for i in range(10)] + ['  ', None]
  pq.write_table(pa.table({'id': list(range(12)), 'body': texts}), tmp_path / 'a.parquet',
                 row_group_size=4)
  source = _cfg(files=str(tmp_path), text_column='body').text_source()
  assert text.load_documents(source) == texts[:10]
  # Row groups are the pieces a big file is cut into: 3 groups of ~300 bytes, 500 per shard.
  shards = text.plan_shards(source, 500)
  assert [[(p.fmt, p.start, p.end) for p in s] for s in shards] == [
      [('parquet', 0, 2)], [('parquet', 2, 3)]]
  assert [d for s in shards for d in text.iter_shard(source, s)] == texts[:10]
  with pytest.raises(KeyError, match=r"a\.parquet: no column 'text'.*\['id', 'body'\]"):
    text.load_documents(_cfg(files=str(tmp_path)).text_source())


def _read_whole(path, mode):  # what the reader did before shards: the whole file at once
  with open(path, encoding='utf-8', newline=None) as f:
    t = f.read()
  parts = t.split('\n') if mode == 'line' else re.split(r'\n[ \t\r\f\v]*\n\s*', t)
  return [p.strip() for p in parts if p.strip()]


def test_shards_read_the_same_documents_as_the_whole_source(tmp_path):
  source = _cfg(files=str(CORPUS)).text_source()
  whole = sum((_read_whole(p, 'blank_line') for p in sorted(CORPUS.glob('*.txt'))), [])
  assert len(whole) == 5888
  for shard_bytes in (3000, 100_000, 1 << 30):
    shards = text.plan_shards(source, shard_bytes)
    assert [d for s in shards for d in text.iter_shard(source, s)] == whole
  assert len(text.plan_shards(source, 100_000)) == 26
  # Cuts inside files land on document boundaries whatever the whitespace and newlines.
  rng = random.Random(0)
  alphabet = ['a', 'b', ' ', '\t', '\n', '\n', '\r', '\r\n', 'é', '\n\n', ' \n', '\f', '\v']
  p = tmp_path / 'x.txt'
  for trial in range(80):
    p.write_bytes(''.join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))).encode())
    for mode in ('blank_line', 'line'):
      source = _cfg(files=str(p), doc_split=mode).text_source()
      for shard_bytes in (1, 3, 17):
        got = [d for s in text.plan_shards(source, shard_bytes) for d in text.iter_shard(source, s)]
        assert got == _read_whole(p, mode), (trial, mode, shard_bytes, p.read_bytes())


def test_settings_reject_unknown_keys_and_bad_values():
  cfg = default_data_config()
  assert set(cfg.keys()) == {f for f in LmDataSettings.__dataclass_fields__}
  parse = functools.partial(config_lib.section, LmDataSettings, key='data')
  assert parse(cfg) == LmDataSettings()
  cfg.max_lenn = 64
  with pytest.raises(ConfigError, match=r"unknown config key data\.max_lenn \(did you mean "
                                        r"'max_len'\?\)"):
    parse(cfg)
  with pytest.raises(ConfigError, match=r"data\.eval_split_by='random'; allowed"):
    parse({'eval_split_by': 'random'})
  with pytest.raises(ConfigError, match=r"data\.max_len='64' has the wrong type: it must be an "
                                        r"int"):
    parse({'max_len': '64'})
  assert parse({'eval_fraction': 0}).eval_fraction == 0.0


def test_path_keys_override_from_the_command_line(tmp_path):
  """--config.data.files takes a directory, a glob or a comma list (the config holds a str)."""
  from absl import flags
  from ml_collections import config_flags
  for name in ('a.txt', 'b.txt', 'c.jsonl'):
    (tmp_path / name).write_text('{"text": "x"}\n' if name.endswith('jsonl') else 'x\n')
  cases = {str(tmp_path): ['a.txt', 'b.txt', 'c.jsonl'],
           str(tmp_path / '*.txt'): ['a.txt', 'b.txt'],
           f'{tmp_path / "c.jsonl"},{tmp_path / "a.txt"}': ['c.jsonl', 'a.txt']}
  repo = DATA.parent
  for value, expected in cases.items():
    argv = ['prog', f'--config={repo / "configs/bert_mlm.py"}:mini',
            f'--config.data.files={value}', f'--config.data.eval_files={value}',
            f'--config.data.hf_data_files={value}']
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, flag_values=fv, lock_config=True,
                                    sys_argv=argv)  # as jaxft.main defines it
    fv(argv)
    settings = config_lib.section(LmDataSettings, fv.config.data, 'data')
    for split in ('train', 'eval'):
      paths = text.expand_paths(settings.text_source(split).paths)
      assert [os.path.basename(p) for p in paths] == expected
    assert settings.hf_data_files == value


# ----------------------------------------------------------------------------- build_lm_data

def test_build_lm_data_bert_on_corpus(bert_tok, tmp_path):
  cfg = _cfg(files=str(CORPUS / 'blake-poems.txt'), max_len=64, eval_fraction=0.1)
  train, evals, stats = _build(cfg, bert_tok, str(tmp_path), 'bert')
  rows = train.rows()
  assert set(rows) == set(evals) == {'input_ids', 'attention_mask', 'special_tokens_mask'}
  assert len(train) == stats['n_train_rows'] and len(evals['input_ids']) == stats['n_eval_rows']
  for arrays in (rows, evals):
    assert arrays['input_ids'].shape[1] == 64 and arrays['input_ids'].dtype == np.int32
    assert (arrays['input_ids'][:, 0] == bert_tok.cls_token_id).all()
    assert (arrays['attention_mask'][:-1] == 1).all()
  assert stats['pad_fraction'] < 0.01
  assert stats['train_tokens'] == rows['attention_mask'].sum()
  assert stats['n_train_docs'] + stats['n_eval_docs'] == stats['n_docs'] == 284
  n_eval_tokens = (evals['special_tokens_mask'] == 0).sum()
  assert (rows['special_tokens_mask'] == 0).sum() + n_eval_tokens == stats['n_tokens']
  # Deterministic: a second build gives the same split.
  train2, evals2, _ = _build(cfg, bert_tok, str(tmp_path), 'bert')
  rows2 = train2.rows()
  assert all((rows[k] == rows2[k]).all() and (evals[k] == evals2[k]).all() for k in rows)


def test_eval_split_modes_and_separate_eval_source(gpt2_tok, tmp_path):
  src = str(CORPUS / 'blake-poems.txt')
  train, evals, stats = _build(
      _cfg(files=src, max_len=32, eval_fraction=0.05, eval_split_by='rows'), gpt2_tok,
      str(tmp_path), 'gpt2')
  full, _, _ = _build(_cfg(files=src, max_len=32, eval_fraction=0.0), gpt2_tok, str(tmp_path),
                      'gpt2')
  full = full.rows()
  n = len(full['input_ids'])
  assert stats['n_eval_rows'] == -(-n * 5 // 100) and stats['n_train_rows'] + stats[
      'n_eval_rows'] == n
  assert (evals['input_ids'] == full['input_ids'][-stats['n_eval_rows']:]).all()
  assert (train.rows()['input_ids'] == full['input_ids'][:stats['n_train_rows']]).all()
  assert set(evals) == {'input_ids', 'attention_mask', 'special_tokens_mask', 'segment_ids'}
  _, tail, st = _build(_cfg(files=src, max_len=32, eval_split_by='tail'), gpt2_tok,
                       str(tmp_path), 'gpt2')
  assert st['eval_source'] == 'split:tail' and st['n_eval_docs'] == round(0.02 * 284)
  assert gpt2_tok.decode(tail['input_ids'][tail['attention_mask'] == 1]).rstrip(
      '<|endoftext|>').endswith('Fled back unhinderd till she came into the vales of Har')
  ev = tmp_path / 'eval.txt'
  ev.write_text('held out one\n\nheld out two\n')
  _, evals, st = _build(_cfg(files=src, eval_files=str(ev), max_len=32), gpt2_tok,
                        str(tmp_path), 'gpt2')
  assert st['eval_source'] == 'separate' and st['n_eval_rows'] == 1
  assert gpt2_tok.decode(evals['input_ids'][0][evals['attention_mask'][0] == 1]) == (
      'held out one<|endoftext|>held out two<|endoftext|>')
  with pytest.raises(ValueError, match='model.type'):
    _build(_cfg(files=src), gpt2_tok, None, 't5')


@pytest.fixture(scope='module')
def corpus_store(tmp_path_factory):
  """One store of the whole corpus for the cases that read it (tokenized once)."""
  return str(tmp_path_factory.mktemp('corpus-tokens'))


@pytest.mark.parametrize('mode', ['docs', 'tail', 'rows'])
def test_eval_split_is_capped_not_a_share_of_the_corpus(bert_tok, corpus_store, mode):
  """Half the corpus 'held out', but only eval_max_rows rows' worth of it is taken."""
  cfg = _cfg(files=str(CORPUS), max_len=64, eval_fraction=0.5, eval_max_rows=8,
             eval_split_by=mode, store_dir=corpus_store)
  train, evals, stats = _build(cfg, bert_tok, None, 'bert')
  assert stats['n_eval_rows'] == len(evals['input_ids']) == 8
  if mode != 'rows':  # 8 rows of 63 tokens: a handful of documents, not 2944
    assert 1 <= stats['n_eval_docs'] <= 8 * 64 // 2 + 1 and stats['n_eval_docs'] < 100
  assert stats['n_train_rows'] > 8000  # the rest trains
  assert stats['train_tokens'] == train.rows()['attention_mask'].sum()
  assert (evals['attention_mask'][:-1] == 1).all()  # 'rows': the last row is the corpus's


def test_token_store_is_reused_across_packings(bert_tok, tmp_path, monkeypatch):
  corpus = tmp_path / 'c.txt'
  corpus.write_text((CORPUS / 'blake-poems.txt').read_text(encoding='utf-8'))
  cfg = _cfg(files=str(corpus), max_len=64)
  workdir = tmp_path / 'work'
  _, _, stats = _build(cfg, bert_tok, str(workdir), 'bert')
  assert stats['store_built']
  stores = lambda: sorted(set(os.listdir(workdir / 'cache' / 'tokens')) - {'sha256.json'})
  assert stores() == [os.path.basename(stats['store_path'])]

  calls = []
  cls = type(bert_tok)
  original = cls.__call__

  def counting_call(self, *a, **kw):
    calls.append(1)
    return original(self, *a, **kw)

  monkeypatch.setattr(cls, '__call__', counting_call)
  cfg = _cfg(files=str(corpus), max_len=32)  # packing settings do not touch the store
  train2, _, stats2 = _build(cfg, bert_tok, str(workdir), 'bert')
  assert not stats2['store_built'] and stats2['store_path'] == stats['store_path'] and not calls
  assert stats2['n_tokens'] == stats['n_tokens'] and train2[0]['input_ids'].shape == (32,)
  # Changed text -> a new key, tokenized again; no temp files are left behind.
  corpus.write_text(corpus.read_text() + '\n\nA brand new closing paragraph.\n')
  _, _, stats3 = _build(cfg, bert_tok, str(workdir), 'bert')
  assert stats3['store_built'] and calls and stats3['store_path'] != stats['store_path']
  assert stores() == sorted(os.path.basename(s['store_path']) for s in (stats, stats3))
  assert not [f for _, _, fs in os.walk(workdir) for f in fs if f.endswith('.tmp')]


# ----------------------------------------------------------------------------- loader

def test_loader_determinism_and_resume(bert_tok, tmp_path):
  cfg = _cfg(files=str(CORPUS / 'blake-poems.txt'), max_len=32, eval_fraction=0.0)
  train, _, _ = _build(cfg, bert_tok, str(tmp_path), 'bert')
  arrays = train.rows()

  def loader(seed, rows=train):
    return make_loader(rows, global_batch_size=8, seed=seed, process_index=0,
                       process_count=1)

  def take(it, n):
    return [next(it)['input_ids'] for _ in range(n)]

  a, b, c = take(loader(0), 5), take(loader(0), 5), take(loader(1), 5)
  assert all((x == y).all() for x, y in zip(a, b))
  assert not all((x == y).all() for x, y in zip(a, c))
  # The store-backed source gives exactly the batches of the same rows held as arrays.
  assert all((x == y).all() for x, y in zip(a, take(loader(0, arrays), 5)))
  batch = next(loader(0))
  assert set(batch) == set(arrays) and batch['input_ids'].shape == (8, 32)

  it = loader(0)
  take(it, 3)
  state = it.get_state()
  json.dumps(state)  # small and serialisable: it goes into the checkpoint
  expected = take(it, 4)
  resumed = loader(0)
  resumed.set_state(state)
  assert all((x == y).all() for x, y in zip(expected, take(resumed, 4)))


def test_loader_processes_over_the_store_assemble_the_single_process_batches(gpt2_tok,
                                                                             tmp_path):
  cfg = _cfg(files=str(CORPUS / 'blake-poems.txt'), max_len=16, eval_fraction=0.0)
  train, _, _ = _build(cfg, gpt2_tok, str(tmp_path), 'gpt2')
  single = make_loader(train, global_batch_size=8, seed=3, process_index=0, process_count=1)
  parts = [make_loader(train, global_batch_size=8, seed=3, process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(5):
    want = next(single)
    got = [next(it) for it in parts]
    for k in want:
      np.testing.assert_array_equal(want[k], np.concatenate([g[k] for g in got]))


def test_prepare_data_stage_from_the_command_line(tmp_path):
  """The one-command recipe of docs/data.md, on a directory given on the command line."""
  import subprocess
  corpus = tmp_path / 'text'
  corpus.mkdir()
  for name in ('blake-poems.txt', 'shakespeare-hamlet.txt'):
    (corpus / name).write_bytes((CORPUS / name).read_bytes())
  repo = DATA.parent
  env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  cmd = [sys.executable, '-m', 'jaxft.main', f'--config={repo / "configs/bert_mlm.py"}:tiny',
         '--config.stage=prepare_data', f'--config.data.files={corpus}',
         f'--config.data.store_dir={tmp_path / "tokens"}', f'--workdir={tmp_path / "prep"}']
  proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / 'prep' / 'results.json').read_text())
  assert results['data']['n_docs'] == 284 + 950 and results['data']['store_built']
  assert results['store_dir'] == str(tmp_path / 'tokens')
  assert (Path(results['data']['store_path']) / 'manifest.json').exists()
  assert os.listdir(Path(results['data']['store_path']) / 'packed')  # the BERT row index
  assert 'cap data.eval_max_rows=1024' in proc.stderr
  # A bad data value is refused naming the key before anything runs: tests/test_config_cli.py
  # (every data key, through this stage) and tests/reliability/test_config_errors.py (the
  # one-line CLI report).

"""Text sources, tokenize cache, FULL-SENTENCES packing, train/eval split, loader."""
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from jaxft.data import pretrain, text
from jaxft.data.loader import make_loader
from jaxft.data.pretrain import build_lm_data, default_data_config, pack_clm, pack_mlm
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
  cfg = default_data_config()
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


# ----------------------------------------------------------------------------- sources

def test_txt_blank_line_and_line_split(tmp_path):
  p = tmp_path / 'a.txt'
  p.write_text('first para\nstill first\n\n  \nsecond para\n\n\n\nthird\r\n', encoding='utf-8')
  assert text.read_txt(str(p)) == ['first para\nstill first', 'second para', 'third']
  assert text.read_txt(str(p), 'line') == ['first para', 'still first', 'second para', 'third']
  assert text.load_documents(_cfg(files=str(p), doc_split='line')) == [
      'first para', 'still first', 'second para', 'third']
  with pytest.raises(ValueError, match='doc_split'):
    text.read_txt(str(p), 'sentence')


def test_jsonl_csv_tsv_with_text_column(tmp_path):
  (tmp_path / 'a.jsonl').write_text(
      '{"id": 1, "body": "alpha"}\n\n{"id": 2, "body": "beta"}\n{"id": 3, "body": ""}\n')
  (tmp_path / 'b.csv').write_text('id,body\n1,"gamma, with comma"\n2,"multi\nline"\n')
  (tmp_path / 'c.tsv').write_text('body\tlabel\ndelta "quoted"\t0\nepsilon\t1\n')
  (tmp_path / 'd.json').write_text(json.dumps([{'body': 'zeta'}, {'body': 'eta'}]))
  cfg = _cfg(files=str(tmp_path / '*'), text_column='body')
  assert text.load_documents(cfg) == ['alpha', 'beta', 'gamma, with comma', 'multi\nline',
                                      'delta "quoted"', 'epsilon', 'zeta', 'eta']
  # A list of paths keeps its order; a directory expands to its supported files.
  cfg = _cfg(files=[str(tmp_path / 'c.tsv'), str(tmp_path / 'a.jsonl')], text_column='body')
  assert text.load_documents(cfg) == ['delta "quoted"', 'epsilon', 'alpha', 'beta']
  cfg = _cfg(files=f'{tmp_path / "c.tsv"},{tmp_path / "a.jsonl"}', text_column='body')
  assert text.load_documents(cfg) == ['delta "quoted"', 'epsilon', 'alpha', 'beta']
  assert len(text.load_documents(_cfg(files=str(tmp_path), text_column='body'))) == 8
  assert text.load_documents(_cfg(files=str(tmp_path / '*'), text_column='body',
                                  max_docs=3)) == ['alpha', 'beta', 'gamma, with comma']


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
  odd = tmp_path / 'x.parquet'
  odd.write_bytes(b'PAR1')
  with pytest.raises(ValueError, match=r'x\.parquet: unknown file type'):
    text.read_files([str(odd)])
  latin = tmp_path / 'latin.txt'
  latin.write_bytes(b'line one\nline two caf\xe9\n')
  with pytest.raises(ValueError, match=r'latin\.txt:2: not valid UTF-8'):
    text.read_files([str(latin)])
  with pytest.raises(ValueError, match='data.files is empty'):
    text.load_documents(_cfg())


def test_hf_datasets_with_local_files(tmp_path):
  t = tmp_path / 'train.txt'
  t.write_text('line one\nline two\n\nline three\n')
  j = tmp_path / 'train.jsonl'
  j.write_text('{"body": "json one"}\n{"body": "json two"}\n')
  docs = text.load_documents(_cfg(hf_name='text', hf_data_files=[str(t)]))
  assert docs == ['line one', 'line two', 'line three']
  docs = text.load_documents(_cfg(hf_name='json', hf_data_files=str(j), text_column='body'))
  assert docs == ['json one', 'json two']
  assert text.load_documents(_cfg(hf_name='json', hf_data_files=str(j)), 'eval') is None
  with pytest.raises(KeyError, match=r"no column 'text'.*\['body'\]"):
    text.load_documents(_cfg(hf_name='json', hf_data_files=str(j)))


def test_tfds_source_mocked_and_missing(monkeypatch):
  calls = {}

  def data_source(name, split, data_dir=None):
    calls.update(name=name, split=split, data_dir=data_dir)
    return [{'text': b'tfds one', 'id': 0}, {'text': b'  ', 'id': 1},
            {'text': np.bytes_(b'tfds two'), 'id': 2}]

  monkeypatch.setitem(sys.modules, 'tensorflow_datasets',
                      types.SimpleNamespace(data_source=data_source))
  cfg = _cfg(tfds_name='lm1b', tfds_split='train[:3]', tfds_data_dir='/d')
  assert text.load_documents(cfg) == ['tfds one', 'tfds two']
  assert calls == {'name': 'lm1b', 'split': 'train[:3]', 'data_dir': '/d'}
  with pytest.raises(KeyError, match=r"no feature 'body'.*\['id', 'text'\]"):
    text.load_documents(_cfg(tfds_name='lm1b', text_column='body'))
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # import now fails
  with pytest.raises(ImportError, match=r"jaxft\[tfds\]"):
    text.load_documents(cfg)


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


def test_build_lm_data_bert_on_corpus(bert_tok, tmp_path):
  cfg = _cfg(files=str(CORPUS / 'blake-poems.txt'), max_len=64, eval_fraction=0.1)
  train, evals, stats = build_lm_data(cfg, bert_tok, str(tmp_path), 'bert')
  assert set(train) == {'input_ids', 'attention_mask', 'special_tokens_mask'}
  for arrays in (train, evals):
    assert arrays['input_ids'].shape[1] == 64 and arrays['input_ids'].dtype == np.int32
    assert (arrays['input_ids'][:, 0] == bert_tok.cls_token_id).all()
    assert (arrays['attention_mask'][:-1] == 1).all()
  assert stats['pad_fraction'] < 0.01
  assert stats['n_train_docs'] + stats['n_eval_docs'] == stats['n_docs']
  n_eval_tokens = (evals['special_tokens_mask'] == 0).sum()
  assert (train['special_tokens_mask'] == 0).sum() + n_eval_tokens == stats['n_tokens']
  # Deterministic: a second build gives the same split.
  train2, evals2, _ = build_lm_data(cfg, bert_tok, str(tmp_path), 'bert')
  assert all((train[k] == train2[k]).all() and (evals[k] == evals2[k]).all() for k in train)


def test_eval_split_modes_and_separate_eval_source(gpt2_tok, tmp_path):
  src = str(CORPUS / 'blake-poems.txt')
  train, evals, stats = build_lm_data(
      _cfg(files=src, max_len=32, eval_fraction=0.05, eval_split_by='rows'), gpt2_tok,
      str(tmp_path), 'gpt2')
  full, _, _ = build_lm_data(_cfg(files=src, max_len=32, eval_fraction=0.0), gpt2_tok,
                             str(tmp_path), 'gpt2')
  n = len(full['input_ids'])
  assert stats['n_eval_rows'] == -(-n * 5 // 100) and stats['n_train_rows'] + stats[
      'n_eval_rows'] == n
  assert (evals['input_ids'] == full['input_ids'][-stats['n_eval_rows']:]).all()
  assert set(train) == {'input_ids', 'attention_mask', 'special_tokens_mask', 'segment_ids'}
  _, tail, st = build_lm_data(_cfg(files=src, max_len=32, eval_split_by='tail'), gpt2_tok,
                              str(tmp_path), 'gpt2')
  assert st['eval_source'] == 'split:tail' and st['n_eval_docs'] >= 1
  assert gpt2_tok.decode(tail['input_ids'][tail['attention_mask'] == 1]).rstrip(
      '<|endoftext|>').endswith('Fled back unhinderd till she came into the vales of Har')
  ev = tmp_path / 'eval.txt'
  ev.write_text('held out one\n\nheld out two\n')
  _, evals, st = build_lm_data(_cfg(files=src, eval_files=str(ev), max_len=32), gpt2_tok,
                               str(tmp_path), 'gpt2')
  assert st['eval_source'] == 'separate' and st['n_eval_rows'] == 1
  assert gpt2_tok.decode(evals['input_ids'][0][evals['attention_mask'][0] == 1]) == (
      'held out one<|endoftext|>held out two<|endoftext|>')
  with pytest.raises(ValueError, match='eval_split_by'):
    build_lm_data(_cfg(files=src, eval_split_by='random'), gpt2_tok, None, 'gpt2')
  with pytest.raises(ValueError, match='model.type'):
    build_lm_data(_cfg(files=src), gpt2_tok, None, 't5')


def test_tokenize_cache_is_reused(bert_tok, tmp_path, monkeypatch):
  corpus = tmp_path / 'c.txt'
  corpus.write_text((CORPUS / 'blake-poems.txt').read_text(encoding='utf-8'))
  cfg = _cfg(files=str(corpus), max_len=64)
  workdir = tmp_path / 'work'
  train, evals, stats = build_lm_data(cfg, bert_tok, str(workdir), 'bert')
  assert not stats['cache_hit']
  assert os.listdir(workdir / 'cache') == [os.path.basename(stats['cache_path'])]

  calls = []
  cls = type(bert_tok)
  original = cls.__call__

  def counting_call(self, *a, **kw):
    calls.append(1)
    return original(self, *a, **kw)

  monkeypatch.setattr(cls, '__call__', counting_call)
  cfg.max_len = 32  # packing settings do not touch the token cache
  train2, _, stats2 = build_lm_data(cfg, bert_tok, str(workdir), 'bert')
  assert stats2['cache_hit'] and stats2['cache_path'] == stats['cache_path'] and not calls
  assert stats2['n_tokens'] == stats['n_tokens'] and train2['input_ids'].shape[1] == 32
  # Changed text -> a new key, tokenized again; no temp files are left behind.
  corpus.write_text(corpus.read_text() + '\n\nA brand new closing paragraph.\n')
  _, _, stats3 = build_lm_data(cfg, bert_tok, str(workdir), 'bert')
  assert not stats3['cache_hit'] and calls and stats3['cache_path'] != stats['cache_path']
  assert sorted(os.listdir(workdir / 'cache')) == sorted(
      os.path.basename(s['cache_path']) for s in (stats, stats3))
  # A corrupt cache file is recomputed, not trusted.
  Path(stats3['cache_path']).write_bytes(b'garbage')
  _, _, stats4 = build_lm_data(cfg, bert_tok, str(workdir), 'bert')
  assert not stats4['cache_hit'] and stats4['n_tokens'] == stats3['n_tokens']


def test_pad_rows_gives_zero_weight_rows():
  arrays = {'input_ids': np.ones((5, 4), np.int32), 'attention_mask': np.ones((5, 4), np.int32),
            'special_tokens_mask': np.zeros((5, 4), np.int32)}
  out = pretrain.pad_rows(arrays, 4, pad_id=0)
  assert len(out['input_ids']) == 8
  assert (out['attention_mask'][5:] == 0).all() and (out['special_tokens_mask'][5:] == 1).all()


# ----------------------------------------------------------------------------- loader

def test_loader_determinism_and_resume(bert_tok, tmp_path):
  cfg = _cfg(files=str(CORPUS / 'blake-poems.txt'), max_len=32, eval_fraction=0.0)
  train, _, _ = build_lm_data(cfg, bert_tok, str(tmp_path), 'bert')

  def loader(seed):
    return make_loader(train, global_batch_size=8, seed=seed, process_index=0,
                       process_count=1)

  def take(it, n):
    return [next(it)['input_ids'] for _ in range(n)]

  a, b, c = take(loader(0), 5), take(loader(0), 5), take(loader(1), 5)
  assert all((x == y).all() for x, y in zip(a, b))
  assert not all((x == y).all() for x, y in zip(a, c))
  batch = next(loader(0))
  assert set(batch) == set(train) and batch['input_ids'].shape == (8, 32)

  it = loader(0)
  take(it, 3)
  state = it.get_state()
  json.dumps(state)  # small and serialisable: it goes into the checkpoint
  expected = take(it, 4)
  resumed = loader(0)
  resumed.set_state(state)
  assert all((x == y).all() for x, y in zip(expected, take(resumed, 4)))

"""Downstream-task data: GLUE/CoNLL readers, bad-input policy, sub-token alignment."""
import json
from pathlib import Path

import numpy as np
import pytest

from jaxft.data import classification
from jaxft.data import ner
from jaxft.data import splits

REPO = Path(__file__).resolve().parents[1]
SHARED = Path('/work/shared/data')
SST2 = REPO / 'data/glue/sst2'
CONLL_TINY = REPO / 'tests/fixtures/conll_tiny.txt'
NER_LABELS = ['O', 'B-LOC', 'B-MISC', 'B-ORG', 'B-PER', 'I-LOC', 'I-MISC', 'I-ORG', 'I-PER']


def _first_existing(*paths):
  for p in paths:
    if p.exists():
      return p
  pytest.skip(f'none of {paths} exists')



def load_cls(data, tokenizer, split):
  """load_cls_split on a `data` section given as a dict of its keys (or a ClsData)."""
  if not isinstance(data, classification.ClsData):
    data = classification.ClsData(**data)
  return classification.load_cls_split(data, tokenizer, split)


def load_ner(data, tokenizer, split):
  if not isinstance(data, ner.NerData):
    data = ner.NerData(**data)
  return ner.load_ner_split(data, tokenizer, split)

@pytest.fixture(scope='module')
def bert_tok():
  from transformers import BertTokenizerFast
  vocab = _first_existing(REPO / 'data/tokenizers/bert-base-uncased/vocab.txt',
                          SHARED / 'tokenizers/bert-base-uncased/vocab.txt')
  return BertTokenizerFast(str(vocab), do_lower_case=True)  # transformers 5: `vocab`, positional


@pytest.fixture(scope='module')
def gpt2_tok():
  from transformers import GPT2TokenizerFast
  d = _first_existing(REPO / 'data/tokenizers/gpt2/vocab.json',
                      SHARED / 'tokenizers/gpt2/vocab.json').parent
  return GPT2TokenizerFast(str(d / 'vocab.json'), str(d / 'merges.txt'),
                           add_prefix_space=True)


def _write(path, text):
  path.write_text(text, encoding='utf-8')
  return path


# ------------------------------------------------------------------------ presets

def test_glue_presets_table():
  assert set(classification.GLUE_TASKS) == {'cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'mnli', 'qnli',
                                   'rte', 'wnli'}
  expect = {'cola': ('matthews',), 'sst2': ('accuracy',), 'qnli': ('accuracy',),
            'rte': ('accuracy',), 'wnli': ('accuracy',), 'mnli': ('accuracy',),
            'mrpc': ('accuracy', 'f1'), 'qqp': ('accuracy', 'f1'),
            'stsb': ('pearson', 'spearman')}
  for name, metrics in expect.items():
    t = classification.GLUE_TASKS[name]
    assert t.metrics == metrics
    assert t.main_metric in t.metrics
    assert (t.text_pair_column is None) == (name in ('cola', 'sst2'))
  assert classification.GLUE_TASKS['stsb'].is_regression
  assert classification.GLUE_TASKS['mnli'].files['dev'] == 'dev_matched.tsv'
  assert classification.GLUE_TASKS['mnli'].label_values == ('entailment', 'neutral', 'contradiction')
  assert classification.get_glue_task('SST-2').name == 'sst2'
  with pytest.raises(ValueError, match='not a GLUE task'):
    classification.get_glue_task('squad')


def test_bundled_sst2_slice(bert_tok):
  arrays, info = load_cls({'task': 'sst2', 'path': str(SST2), 'max_len': 64},
                                     bert_tok, 'train')
  assert arrays['input_ids'].shape == (8000, 64)
  assert arrays['labels'].dtype == np.int32
  assert info['stats']['label_counts'] == [3591, 4409]
  assert info['label_names'] == ['negative', 'positive']
  assert info['metric_names'] == ['accuracy'] and info['main_metric'] == 'accuracy'
  dev, dinfo = load_cls({'task': 'sst2', 'path': str(SST2)}, bert_tok,
                                   'validation')
  assert dev['input_ids'].shape == (872, 128)
  assert dinfo['stats']['label_counts'] == [428, 444]
  # Right padding with [PAD]=0, [CLS] first, [SEP] last real token.
  ids, mask = dev['input_ids'][0], dev['attention_mask'][0]
  n = mask.sum()
  assert mask[:n].all() and not mask[n:].any()
  assert ids[0] == bert_tok.cls_token_id and ids[n - 1] == bert_tok.sep_token_id
  assert (ids[n:] == bert_tok.pad_token_id).all()
  assert bert_tok.convert_ids_to_tokens(ids[1:n - 1]) == [
      'it', "'", 's', 'a', 'charming', 'and', 'often', 'affecting', 'journey', '.']
  assert dinfo['sources'][0].endswith('dev.tsv:2')


def test_bundled_sst2_is_a_subset_of_glue():
  src = SHARED / 'glue/SST-2/train.tsv'
  if not src.exists():
    pytest.skip('shared GLUE copy not available')
  full = src.read_text(encoding='utf-8').split('\n')[1:-1]
  idx = np.sort(np.random.default_rng(0).permutation(len(full))[:8000])
  ours = (SST2 / 'train.tsv').read_text(encoding='utf-8').split('\n')[1:-1]
  assert ours == [full[i] for i in idx]


def test_cola_headerless_and_unlabeled_test(tmp_path, bert_tok):
  _write(tmp_path / 'train.tsv', 'gj04\t1\t\tOur friends won\'t buy this analysis.\n'
         'gj04\t0\t*\tThey drank the pub.\n')
  _write(tmp_path / 'test.tsv', 'index\tsentence\n0\tBill whistled past the house.\n')
  cfg = {'task': 'cola', 'path': str(tmp_path)}
  arrays, info = load_cls(cfg, bert_tok, 'train')
  assert arrays['labels'].tolist() == [1, 0]
  assert info['sources'] == [f'{tmp_path}/train.tsv:1', f'{tmp_path}/train.tsv:2']
  test, tinfo = load_cls(cfg, bert_tok, 'test')
  assert 'labels' not in test and not tinfo['has_labels']
  assert test['input_ids'].shape == (1, 128)


def test_pair_tsv_keeps_quotes_and_token_types(tmp_path, bert_tok):
  _write(tmp_path / 'train.tsv',
         'index\tsentence1\tsentence2\tlabel\n'
         '0\tHe said "hi there\tno one spoke .\tnot_entailment\n'
         '1\tA "quoted" word .\tA word .\tentailment\n')
  arrays, info = load_cls({'task': 'rte', 'path': str(tmp_path)}, bert_tok,
                                     'train')
  assert arrays['labels'].tolist() == [1, 0]
  assert info['label_names'] == ['entailment', 'not_entailment']
  toks = bert_tok.convert_ids_to_tokens(arrays['input_ids'][0][arrays['attention_mask'][0]
                                                               == 1])
  assert toks == ['[CLS]', 'he', 'said', '"', 'hi', 'there', '[SEP]', 'no', 'one', 'spoke',
                  '.', '[SEP]']
  tt = arrays['token_type_ids'][0][:len(toks)].tolist()
  assert tt == [0] * 7 + [1] * 5


# ---------------------------------------------------------------- bad input policy

_BAD_TSV = ('sentence\tlabel\n'
            'good one\t1\n'          # line 2
            '\t0\n'                  # line 3: empty text
            'fine movie\t2\n'        # line 4: label outside {0, 1}
            'too\tmany\t1\n'         # line 5: wrong column count
            'bad film\t0\n')         # line 6


@pytest.mark.parametrize('line,pattern', [(3, 'empty text'), (4, "label '2'"),
                                          (5, 'expected 2 columns, got 3')])
def test_bad_tsv_rows_raise_with_file_and_line(tmp_path, bert_tok, line, pattern):
  lines = _BAD_TSV.splitlines(keepends=True)
  keep = [lines[0], lines[1], lines[line - 1], lines[5]]  # the bad row stays at line 3
  path = _write(tmp_path / 'train.tsv', ''.join(keep))
  with pytest.raises(ValueError, match=rf'train\.tsv:3: .*{pattern}'):
    load_cls({'task': 'sst2', 'path': str(tmp_path)}, bert_tok, 'train')
  # The same row in its original position names its original line.
  _write(path, _BAD_TSV)
  with pytest.raises(ValueError, match=r'train\.tsv:3: .*empty text'):
    load_cls({'task': 'sst2', 'path': str(tmp_path)}, bert_tok, 'train')


def test_bad_tsv_rows_skipped_and_counted(tmp_path, bert_tok):
  _write(tmp_path / 'train.tsv', _BAD_TSV)
  arrays, info = load_cls(
      {'task': 'sst2', 'path': str(tmp_path), 'on_bad_row': 'skip'}, bert_tok, 'train')
  assert arrays['labels'].tolist() == [1, 0]
  st = info['stats']
  assert st['n_rows'] == 5 and st['n_examples'] == 2 and st['n_skipped'] == 3
  assert st['skipped'] == {'empty_text': 1, 'bad_label': 1, 'bad_columns': 1}
  assert [s.rsplit(':', 1)[1] for s in info['sources']] == ['2', '6']


def test_missing_column_and_bad_config(tmp_path, bert_tok):
  _write(tmp_path / 'train.tsv', 'text\tlabel\nhello\t1\n')
  with pytest.raises(ValueError, match=r"train\.tsv:1: data.text_column='sentence'"):
    load_cls({'task': 'sst2', 'path': str(tmp_path)}, bert_tok, 'train')
  with pytest.raises(ValueError, match='on_bad_row'):
    load_cls({'task': 'sst2', 'path': str(tmp_path), 'text_column': 'text',
                         'on_bad_row': 'ignore'}, bert_tok, 'train')
  _write(tmp_path / 'dev.tsv', 'text\nhello\n')  # only test splits may lack labels
  with pytest.raises(ValueError, match=r"dev\.tsv:1: data.label_column='label'"):
    load_cls({'task': 'sst2', 'path': str(tmp_path), 'text_column': 'text'},
                        bert_tok, 'dev')
  _write(tmp_path / 'test.tsv', 'text\nhello\n')
  arrays, info = load_cls({'task': 'sst2', 'path': str(tmp_path),
                                      'text_column': 'text'}, bert_tok, 'test')
  assert 'labels' not in arrays and not info['has_labels']


def test_regression_labels(tmp_path, bert_tok):
  _write(tmp_path / 'train.tsv',
         'index\tgenre\tsentence1\tsentence2\tscore\n'
         '0\tx\tA plane is taking off.\tAn air plane is taking off.\t5.000\n'
         '1\tx\tA man is playing a flute.\tA man is eating.\t0.8\n')
  arrays, info = load_cls({'task': 'stsb', 'path': str(tmp_path)}, bert_tok,
                                     'train')
  assert arrays['labels'].dtype == np.float32
  np.testing.assert_allclose(arrays['labels'], [5.0, 0.8])
  assert info['is_regression'] and info['num_labels'] == 1
  assert info['main_metric'] == 'spearman'
  _write(tmp_path / 'train.tsv', 'sentence1\tsentence2\tscore\na\tb\tfive\n')
  with pytest.raises(ValueError, match=r"train\.tsv:2: regression label 'five'"):
    load_cls({'task': 'stsb', 'path': str(tmp_path)}, bert_tok, 'train')


# --------------------------------------------------------------------- truncation

def test_truncation_modes(tmp_path, bert_tok):
  _write(tmp_path / 'train.tsv', 'sentence\tlabel\nshort one\t0\n'
         + 'a very long sentence that goes on and on and on\t1\n')
  cfg = {'task': 'sst2', 'path': str(tmp_path), 'max_len': 6}
  arrays, info = load_cls(cfg, bert_tok, 'train')
  assert info['stats']['n_truncated'] == 1 and arrays['input_ids'].shape == (2, 6)
  assert arrays['attention_mask'][1].all()
  assert arrays['input_ids'][1, -1] == bert_tok.sep_token_id
  arrays, info = load_cls({**cfg, 'truncation': 'skip'}, bert_tok, 'train')
  assert info['stats']['n_too_long_skipped'] == 1 and arrays['labels'].tolist() == [0]
  with pytest.raises(ValueError, match=r'train\.tsv:3: 13 tokens > data.max_len=6'):
    load_cls({**cfg, 'truncation': 'error'}, bert_tok, 'train')


# ------------------------------------------------------- csv / jsonl / derived labels

def test_csv_and_jsonl_with_config_columns(tmp_path, bert_tok):
  _write(tmp_path / 'train.csv', 'review,stars\n"good, really good",pos\nawful,neg\n'
         'meh,neutral\n')
  _write(tmp_path / 'dev.csv', 'review,stars\n"so ""so""",neutral\n')
  cfg = {'path': str(tmp_path), 'train_file': 'train.csv', 'dev_file': 'dev.csv',
         'text_column': 'review', 'label_column': 'stars'}
  arrays, info = load_cls(cfg, bert_tok, 'train')
  assert info['label_names'] == ['neg', 'neutral', 'pos']  # sorted, from train
  assert arrays['labels'].tolist() == [2, 0, 1]
  assert 'token_type_ids' in arrays
  assert info['metric_names'] == ['accuracy', 'f1_macro']
  dev, dinfo = load_cls(cfg, bert_tok, 'dev')
  assert dinfo['label_names'] == ['neg', 'neutral', 'pos'] and dev['labels'].tolist() == [1]

  rows = [{'q': 'is it?', 'a': 'yes it is', 'y': 1}, {'q': 'and this', 'a': 'no', 'y': 0}]
  _write(tmp_path / 'train.jsonl', '\n'.join(json.dumps(r) for r in rows)
         + '\n\n{"q": "x", "y": 1}\n')
  cfg = {'path': str(tmp_path), 'train_file': 'train.jsonl', 'text_column': 'q',
         'text_pair_column': 'a', 'label_column': 'y', 'labels': [0, 1]}
  with pytest.raises(ValueError, match=r"train\.jsonl:4: missing key\(s\) \['a'\]"):
    load_cls(cfg, bert_tok, 'train')
  arrays, info = load_cls({**cfg, 'on_bad_row': 'skip'}, bert_tok, 'train')
  assert arrays['labels'].tolist() == [1, 0] and info['stats']['skipped'] == {'bad_row': 1}
  assert info['stats']['n_blank_lines'] == 1


@pytest.mark.parametrize('name,content', [
    ('train.tsv', b'sentence\tlabel\ngood film\t1\ncaf\xe9 noir\t0\nbad film\t0\n'),
    ('train.csv', b'sentence,label\ngood film,1\n"caf\xe9 noir",0\nbad film,0\n'),
    ('train.jsonl', b'{"sentence": "good film", "label": 1}\n{"sentence": "caf\xe9 noir", '
                    b'"label": 0}\n\n{"sentence": "bad film", "label": 0}\n'),
])
def test_non_utf8_bytes_name_file_line_and_byte(tmp_path, bert_tok, name, content):
  """A Latin-1 byte in a UTF-8 file: one error naming file, line and byte (no bare
  UnicodeDecodeError); on_bad_row='skip' skips that row and counts it."""
  (tmp_path / name).write_bytes(content)
  line = 2 if name.endswith('.jsonl') else 3
  cfg = {'path': str(tmp_path), 'train_file': name, 'text_column': 'sentence',
         'label_column': 'label', 'labels': ['0', '1']}
  with pytest.raises(ValueError, match=rf'{tmp_path}/{name}:{line}: invalid UTF-8 byte 0xe9 '):
    load_cls(cfg, bert_tok, 'train')
  arrays, info = load_cls({**cfg, 'on_bad_row': 'skip'}, bert_tok,
                                               'train')
  assert arrays['labels'].tolist() == [1, 0]
  assert info['stats']['skipped'] == {'bad_encoding': 1}
  assert info['texts'] == ['good film', 'bad film']


def test_non_utf8_header_is_an_error_even_when_skipping(tmp_path, bert_tok):
  (tmp_path / 'train.tsv').write_bytes(b'sent\xe9nce\tlabel\ngood\t1\n')
  with pytest.raises(ValueError, match=r'train\.tsv:1: invalid UTF-8 byte 0xe9 '):
    load_cls({'task': 'sst2', 'path': str(tmp_path),
                                   'on_bad_row': 'skip'}, bert_tok, 'train')


def test_parquet_task_files(tmp_path, bert_tok):
  """Parquet train/dev/test files: the same column and label checks as TSV, rows named
  'file[row i]' in errors, and the same arrays as the TSV they were made from."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({'sentence': ['good film', 'awful', None, 'fine'],
                           'label': [1, 0, 1, 7]}), tmp_path / 'train.parquet')
  pq.write_table(pa.table({'sentence': ['great'], 'label': [1]}), tmp_path / 'dev.parquet')
  pq.write_table(pa.table({'idx': [0], 'sentence': ['unlabelled']}), tmp_path / 'test.parquet')
  cfg = {'task': 'sst2', 'path': str(tmp_path), 'train_file': 'train.parquet',
         'dev_file': 'dev.parquet', 'test_file': 'test.parquet'}
  train = tmp_path / 'train.parquet'
  with pytest.raises(ValueError, match=rf'{train}\[row 2\]: empty text in column .sentence.'):
    load_cls(cfg, bert_tok, 'train')
  arrays, info = load_cls({**cfg, 'on_bad_row': 'skip'}, bert_tok,
                                               'train')
  assert arrays['labels'].tolist() == [1, 0]
  assert info['sources'] == [f'{train}[row 0]', f'{train}[row 1]']
  assert info['stats']['skipped'] == {'empty_text': 1, 'bad_label': 1}
  dev, _ = load_cls(cfg, bert_tok, 'dev')
  assert dev['labels'].tolist() == [1]
  test, tinfo = load_cls(cfg, bert_tok, 'test')
  assert 'labels' not in test and not tinfo['has_labels'] and len(test['input_ids']) == 1
  with pytest.raises(ValueError, match=rf"{train}: data.text_column='text' is not a column; "
                                       r"columns are \['sentence', 'label'\]"):
    load_cls({**cfg, 'text_column': 'text'}, bert_tok, 'train')
  with pytest.raises(ValueError, match=rf'{tmp_path / "bad.parquet"}: not a readable Parquet'):
    _write(tmp_path / 'bad.parquet', 'sentence\tlabel\n')
    load_cls({**cfg, 'train_file': 'bad.parquet'}, bert_tok, 'train')

  # The bundled SST-2 slice as Parquet (a custom task: labels derived from train) gives
  # exactly the arrays of the TSV it was made from.
  import csv
  rows = list(csv.reader(open(SST2 / 'train.tsv', encoding='utf-8'), delimiter='\t',
                         quoting=csv.QUOTE_NONE))[:65]
  _write(tmp_path / 'sst.tsv', ''.join('\t'.join(r) + '\n' for r in rows))
  pq.write_table(pa.table({'sentence': [r[0] for r in rows[1:]],
                           'label': [int(r[1]) for r in rows[1:]]}), tmp_path / 'sst.parquet')
  custom = {'path': str(tmp_path), 'text_column': 'sentence', 'label_column': 'label'}
  a_tsv, i_tsv = load_cls({**custom, 'train_file': 'sst.tsv'}, bert_tok,
                                               'train')
  a_pq, i_pq = load_cls({**custom, 'train_file': 'sst.parquet'}, bert_tok,
                                             'train')
  assert i_pq['label_names'] == i_tsv['label_names'] == ['0', '1']
  assert a_pq.keys() == a_tsv.keys() and len(a_pq['labels']) == 64
  for k in a_tsv:
    assert np.array_equal(a_pq[k], a_tsv[k]), k


# ------------------------------------------------------------------ HF datasets path

def test_hf_path_with_local_files(tmp_path, bert_tok):
  rows = [{'sentence1': 'A man sleeps.', 'sentence2': 'A person rests.',
           'label': 'entailment'},
          {'sentence1': 'A dog runs.', 'sentence2': 'A cat sits.', 'label': 'not_entailment'}]
  _write(tmp_path / 'rte.jsonl', '\n'.join(json.dumps(r) for r in rows) + '\n')
  cfg = {'task': 'rte', 'source': 'hf', 'hf_path': 'json',
         'hf_data_files': {'train': str(tmp_path / 'rte.jsonl')},
         'hf_cache_dir': str(tmp_path / 'hf_cache')}
  arrays, info = load_cls(cfg, bert_tok, 'train')
  assert arrays['labels'].tolist() == [0, 1]
  assert info['label_names'] == ['entailment', 'not_entailment']
  assert arrays['token_type_ids'][0].max() == 1
  with pytest.raises(splits.MissingSplitError, match='no split .validation.'):
    load_cls(cfg, bert_tok, 'dev')
  # The bundled SST-2 dev set through load_dataset('csv') gives the same arrays.
  cfg = {'task': 'sst2', 'source': 'hf', 'hf_path': 'csv',
         'hf_data_files': {'validation': str(SST2 / 'dev.tsv')},
         'hf_kwargs': {'sep': '\t', 'quoting': 3},
         'hf_cache_dir': str(tmp_path / 'hf_cache'), 'labels': ['0', '1']}
  hf, info = load_cls(cfg, bert_tok, 'dev')
  assert info['stats']['label_counts'] == [428, 444]
  assert info['sources'][0] == 'csv[validation][row 0]'
  files, _ = load_cls({'task': 'sst2', 'path': str(SST2)}, bert_tok, 'dev')
  assert set(hf) == set(files)
  for k in files:
    np.testing.assert_array_equal(files[k], hf[k])
  # Without a label list, an HF split that is not ClassLabel derives it from train.
  cfg = {**cfg, 'labels': None, 'hf_data_files': {'train': str(SST2 / 'dev.tsv'),
                                                  'validation': str(SST2 / 'dev.tsv')}}
  hf, info = load_cls(cfg, bert_tok, 'dev')
  assert info['label_values'] == ['0', '1'] and info['label_names'] == ['negative',
                                                                       'positive']
  np.testing.assert_array_equal(files['labels'], hf['labels'])


def test_hf_classlabel_dataset(tmp_path, bert_tok):
  import datasets
  feats = datasets.Features({'sentence': datasets.Value('string'),
                             'label': datasets.ClassLabel(names=['negative', 'positive'])})
  dd = datasets.DatasetDict({
      'train': datasets.Dataset.from_dict({'sentence': ['great', 'bad', 'fine'],
                                           'label': [1, 0, 1]}, features=feats),
      'test': datasets.Dataset.from_dict({'sentence': ['what', 'ever'],
                                          'label': [-1, -1]}, features=feats)})
  dd.save_to_disk(str(tmp_path / 'sst2_hf'))
  cfg = {'task': 'sst2', 'source': 'hf', 'hf_path': str(tmp_path / 'sst2_hf')}
  arrays, info = load_cls(cfg, bert_tok, 'train')
  assert arrays['labels'].tolist() == [1, 0, 1]
  assert info['label_names'] == ['negative', 'positive']
  test, tinfo = load_cls(cfg, bert_tok, 'test')
  assert 'labels' not in test and not tinfo['has_labels']
  bad = datasets.Dataset.from_dict({'sentence': ['ok', ''], 'label': [1, 0]},
                                   features=feats)
  with pytest.raises(ValueError, match=r'\[row 1\]: empty text'):
    classification.read_cls_hf(bad, text_column='sentence', name='mem')


# ---------------------------------------------------------------------- GPT-2 padding

def test_gpt2_pads_with_eos(gpt2_tok):
  ex = classification.ClsExamples(['hello world', 'a much longer input sentence here'], None, [0, 1],
                         ['x:1', 'x:2'])
  arrays, _ = classification.encode_cls(ex, gpt2_tok, max_len=8)
  assert set(arrays) == {'input_ids', 'attention_mask', 'labels'}
  n = arrays['attention_mask'][0].sum()
  assert n == 2 and (arrays['input_ids'][0, n:] == gpt2_tok.eos_token_id).all()
  assert arrays['input_ids'][0, :n].tolist() == gpt2_tok('hello world')['input_ids']
  sent = ner.NerExamples([["Peter", "Blackburn"]], [["B-PER", "I-PER"]], ["x:1"])
  arrays, _ = ner.encode_ner(sent, gpt2_tok, NER_LABELS, max_len=8)
  first = arrays['labels'][0] != splits.IGNORE_INDEX
  assert arrays['labels'][0][first].tolist() == [4, 8]


# ----------------------------------------------------------------------------- CoNLL

def test_read_conll_fixture():
  ex, stats = ner.read_conll(CONLL_TINY)
  assert len(ex) == 5 and stats['n_docstart'] == 1 and stats['n_tokens'] == 74
  assert ex.words[1] == ['Peter', 'Blackburn'] and ex.tags[1] == ['B-PER', 'I-PER']
  assert ex.sources[0].endswith('conll_tiny.txt:3')
  assert ner.derive_tag_labels(ex.tags) == NER_LABELS


def test_iob1_to_iob2():
  iob1 = ['I-PER', 'I-PER', 'O', 'I-LOC', 'B-LOC', 'I-ORG', 'I-LOC', 'I-LOC']
  assert ner.iob1_to_iob2(iob1) == ['B-PER', 'I-PER', 'O', 'B-LOC', 'B-LOC', 'B-ORG',
                                      'B-LOC', 'I-LOC']
  assert ner.tag_error(iob1, 'iob1') is None
  assert ner.tag_error(iob1, 'iob2') == (0, 'I-PER after O is invalid IOB2 (an entity '
                                           'must start with B-)')
  assert ner.tag_error(['O', 'B-PER'], 'iob1')[0] == 1
  assert ner.tag_error(['O', 'PER'], 'iob2')[0] == 1


def test_read_conll_iob1_file(tmp_path):
  path = _write(tmp_path / 'iob1.txt',
                '-DOCSTART- -X- -X- O\n\n'
                'U.N. NNP I-NP I-ORG\nofficial NN I-NP O\nEkeus NNP I-NP I-PER\n\n'
                'Germany NNP I-NP I-LOC\nFrance NNP I-NP B-LOC\n')
  ex, stats = ner.read_conll(path, tag_scheme='iob1')
  assert ex.tags == [['B-ORG', 'O', 'B-PER'], ['B-LOC', 'B-LOC']]
  assert stats['n_tags_converted'] == 3
  # The same file declared IOB2 is rejected at its first I- entity start.
  with pytest.raises(ValueError, match=r'iob1\.txt:3: I-ORG after O is invalid IOB2'):
    ner.read_conll(path, tag_scheme='iob2')
  # The IOB2 fixture declared IOB1 is rejected too (B- after O).
  with pytest.raises(ValueError, match=r'conll_tiny\.txt:3: B-ORG after O is invalid IOB1'):
    ner.read_conll(CONLL_TINY, tag_scheme='iob1')


def test_conll_bad_sentences(tmp_path):
  path = _write(tmp_path / 'bad.txt',
                'Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n'   # lines 1-2: good
                'in IN B-PP O\nParis NNP B-NP I-LOC\n\n'              # line 5: I- after O
                'odd NN B-NP\n\n'                                      # line 7: 3 columns
                'Bonn NNP B-NP B-GPE\n\n'                              # line 9: unknown tag
                'Rome NNP B-NP B-LOC\n')                               # line 11: good
  with pytest.raises(ValueError, match=r'bad\.txt:5: I-LOC after O is invalid IOB2'):
    ner.read_conll(path)
  ex, stats = ner.read_conll(path, on_bad_row='skip', labels=NER_LABELS)
  assert ex.words == [['Peter', 'Blackburn'], ['Rome']]
  assert stats['skipped'] == {'bad_tags': 1, 'bad_columns': 1, 'bad_label': 1}
  assert stats['n_sentences'] == 5 and stats['n_examples'] == 2
  with pytest.raises(ValueError, match=r'b2\.txt:9: tag .B-GPE. is not in the label set'):
    ner.read_conll(_write(tmp_path / 'b2.txt', open(path).read().replace(
        'Paris NNP B-NP I-LOC', 'Paris NNP B-NP B-LOC').replace('odd NN B-NP', 'odd NN B-NP O')),
        labels=NER_LABELS)
  with pytest.raises(ValueError, match=r'b3\.txt:2: expected 4 columns, got 3'):
    ner.read_conll(_write(tmp_path / 'b3.txt', 'a B C O\nb C O\n'))


def test_conll_non_utf8_bytes_name_file_line_and_byte(tmp_path):
  path = tmp_path / 'train.txt'
  path.write_bytes(b'Peter NNP B-NP B-PER\n\nM\xfcnchen NNP B-NP B-LOC\nis VBZ B-VP O\n\n'
                   b'Rome NNP B-NP B-LOC\n')
  with pytest.raises(ValueError, match=rf'{path}:3: invalid UTF-8 byte 0xfc at character 2'):
    ner.read_conll(path)
  ex, stats = ner.read_conll(path, on_bad_row='skip')
  assert ex.words == [['Peter'], ['Rome']] and stats['skipped'] == {'bad_encoding': 1}


def test_subtoken_alignment_hand_checked(bert_tok):
  sents = ner.NerExamples([['Werner', 'Zwingmann', 'said'], ['BRUSSELS', '1996-08-22']],
                          [['B-PER', 'I-PER', 'O'], ['B-LOC', 'O']], ['x:1', 'x:5'])
  arrays, stats = ner.encode_ner(sents, bert_tok, NER_LABELS, max_len=10)
  toks = bert_tok.convert_ids_to_tokens(arrays['input_ids'][0][:7])
  assert toks == ['[CLS]', 'werner', 'z', '##wing', '##mann', 'said', '[SEP]']
  i = NER_LABELS.index
  assert arrays['labels'][0].tolist() == [-100, i('B-PER'), i('I-PER'), -100, -100, i('O'),
                                          -100, -100, -100, -100]
  assert arrays['word_ids'][0].tolist() == [-1, 0, 1, 1, 1, 2, -1, -1, -1, -1]
  assert arrays['attention_mask'][0].tolist() == [1] * 7 + [0] * 3
  toks = bert_tok.convert_ids_to_tokens(arrays['input_ids'][1][:8])
  assert toks == ['[CLS]', 'brussels', '1996', '-', '08', '-', '22', '[SEP]']
  assert arrays['labels'][1].tolist() == [-100, i('B-LOC'), i('O')] + [-100] * 7
  assert arrays['word_ids'][1].tolist() == [-1, 0, 1, 1, 1, 1, 1, -1, -1, -1]
  assert arrays['token_type_ids'].shape == (2, 10) and stats['n_truncated'] == 0
  # Predictions at first sub-tokens map back to words.
  back = ner.predictions_to_tags(arrays['labels'].clip(0), arrays['word_ids'],
                                   NER_LABELS, [3, 2])
  assert back == sents.tags


def test_ner_truncation(bert_tok):
  sents = ner.NerExamples([['Werner', 'Zwingmann', 'said'], ['Rome']],
                          [['B-PER', 'I-PER', 'O'], ['B-LOC']], ['f.txt:1', 'f.txt:5'])
  arrays, stats = ner.encode_ner(sents, bert_tok, NER_LABELS, max_len=4)
  # [CLS] werner z [SEP]: 'Zwingmann' keeps its first sub-token, 'said' is cut.
  assert stats['n_truncated'] == 1 and stats['n_words_truncated'] == 1
  assert arrays['word_ids'][0].tolist() == [-1, 0, 1, -1]
  back = ner.predictions_to_tags(np.zeros((2, 4), int) + 4, arrays['word_ids'],
                                   NER_LABELS, [3, 1])
  assert back == [['B-PER', 'B-PER', 'O'], ['B-PER']]  # truncated words default to O
  arrays, stats = ner.encode_ner(sents, bert_tok, NER_LABELS, max_len=4, truncation='skip')
  assert stats['n_too_long_skipped'] == 1 and stats['keep'].tolist() == [1]
  with pytest.raises(ValueError, match=r'f\.txt:1: sentence has 7 sub-tokens'):
    ner.encode_ner(sents, bert_tok, NER_LABELS, max_len=4, truncation='error')


def test_load_ner_task_from_files(tmp_path, bert_tok):
  cfg = {'path': str(CONLL_TINY.parent), 'train_file': CONLL_TINY.name,
         'dev_file': CONLL_TINY.name, 'max_len': 32}
  arrays, info = load_ner(cfg, bert_tok, 'train')
  assert info['label_names'] == NER_LABELS
  assert set(arrays) == {'input_ids', 'attention_mask', 'token_type_ids', 'labels',
                         'word_ids'}
  assert arrays['labels'].shape == (5, 32)
  assert info['num_words'] == [9, 2, 2, 30, 31]
  assert info['stats']['n_truncated'] == 2
  # Labelled positions == words kept after truncation; they carry the gold tags.
  back = ner.predictions_to_tags(arrays['labels'].clip(0), arrays['word_ids'],
                                   info['label_names'], info['num_words'])
  for b, gold, wid in zip(back, info['tags'], arrays['word_ids']):
    kept = wid.max() + 1
    assert b[:kept] == gold[:kept]
  assert (arrays['labels'] != -100).sum() == sum(
      len(set(w[w >= 0].tolist())) for w in arrays['word_ids'])
  # An explicit label list in another order is honoured.
  arrays2, info2 = load_ner({**cfg, 'labels': NER_LABELS[::-1]}, bert_tok, 'dev')
  assert info2['label_names'] == NER_LABELS[::-1]
  m = arrays['labels'] >= 0
  np.testing.assert_array_equal(len(NER_LABELS) - 1 - arrays['labels'][m],
                                arrays2['labels'][m])


def test_load_ner_task_hf(tmp_path, bert_tok):
  import datasets
  names = ['O', 'B-PER', 'I-PER', 'B-ORG', 'I-ORG', 'B-LOC', 'I-LOC', 'B-MISC', 'I-MISC']
  feats = datasets.Features({'tokens': datasets.Sequence(datasets.Value('string')),
                             'ner_tags': datasets.Sequence(datasets.ClassLabel(names=names))})
  ex, _ = ner.read_conll(CONLL_TINY)
  data = {'tokens': ex.words, 'ner_tags': [[names.index(t) for t in s] for s in ex.tags]}
  dd = datasets.DatasetDict({'train': datasets.Dataset.from_dict(data, features=feats),
                             'validation': datasets.Dataset.from_dict(data, features=feats)})
  dd.save_to_disk(str(tmp_path / 'conll_hf'))
  cfg = {'source': 'hf', 'hf_path': str(tmp_path / 'conll_hf'), 'max_len': 64}
  arrays, info = load_ner(cfg, bert_tok, 'validation')
  assert info['label_names'] == names and info['tags'] == ex.tags
  files, finfo = load_ner({'path': str(CONLL_TINY.parent), 'max_len': 64,
                                      'train_file': CONLL_TINY.name, 'labels': names},
                                     bert_tok, 'train')
  np.testing.assert_array_equal(arrays['labels'], files['labels'])
  np.testing.assert_array_equal(arrays['input_ids'], files['input_ids'])
  # Invalid IOB2 inside an HF dataset names the row.
  bad = datasets.Dataset.from_dict({'tokens': [['a', 'b']], 'ner_tags': [[0, 2]]},
                                   features=feats)
  with pytest.raises(ValueError, match=r'mem\[row 0\]: token 1: I-PER after O'):
    ner.read_ner_hf(bad, name='mem')


# ------------------------------------------------------------------- class balance

def test_class_weights_match_sklearn():
  from sklearn.utils.class_weight import compute_class_weight
  y = np.array([0, 0, 0, 0, 1, 2, 2, 0, 1, 0])
  ref = compute_class_weight('balanced', classes=np.unique(y), y=y)
  np.testing.assert_allclose(splits.class_weights(y, 3), ref, rtol=1e-6)
  w = splits.class_weights(np.array([0, 0, 2, -100]), 4)  # absent classes: 0
  np.testing.assert_allclose(w, [0.75, 0, 1.5, 0])


def test_balanced_resample_and_config(tmp_path, bert_tok):
  y = np.array([0] * 90 + [1] * 10)
  idx = splits.balanced_resample_indices(y, seed=3)
  assert len(idx) == 100 and np.bincount(y[idx]).tolist() == [50, 50]
  np.testing.assert_array_equal(idx, splits.balanced_resample_indices(y, seed=3))
  assert not np.array_equal(idx, splits.balanced_resample_indices(y, seed=4))
  cfg = {'task': 'sst2', 'path': str(SST2), 'max_len': 16}
  arrays, info = load_cls({**cfg, 'class_balance': 'weights'}, bert_tok, 'train')
  cw = np.array(info['stats']['class_weights'])
  np.testing.assert_allclose(cw, 8000 / (2 * np.array([3591, 4409])), rtol=1e-6)
  np.testing.assert_allclose(arrays['weights'], cw[arrays['labels']])
  arrays, info = load_cls({**cfg, 'class_balance': 'resample'}, bert_tok, 'train')
  assert info['stats']['label_counts'] == [4000, 4000]
  dev, _ = load_cls({**cfg, 'class_balance': 'resample'}, bert_tok, 'dev')
  assert len(dev['labels']) == 872 and 'weights' not in dev  # eval splits untouched


def test_config_dict_and_defaults(bert_tok):
  from jaxft import config as config_lib
  section = config_lib.as_section(classification.ClsData())
  section.update(task='sst2', max_len=16)
  section.path = 'data/glue/sst2'  # relative: cwd first, then the repository root
  cfg = config_lib.section(classification.ClsData, section, 'data')
  arrays, info = load_cls(cfg, bert_tok, 'dev')
  assert arrays['input_ids'].shape == (872, 16) and info['stats']['n_truncated'] > 0
  ner_cfg = ner.NerData(path=str(CONLL_TINY.parent), train_file=CONLL_TINY.name)
  arrays, info = load_ner(ner_cfg, bert_tok, 'train')
  assert info['label_names'] == NER_LABELS
  with pytest.raises(splits.MissingSplitError, match='valid.txt does not exist'):
    load_ner(ner_cfg, bert_tok, 'dev')


def test_arrays_feed_the_grain_loader(bert_tok):
  from jaxft.data.loader import make_loader
  arrays, _ = load_cls({'task': 'sst2', 'path': str(SST2), 'max_len': 32},
                                  bert_tok, 'dev')
  batch = next(make_loader(arrays, global_batch_size=8, seed=0, num_epochs=1,
                           process_index=0, process_count=1))
  assert batch['input_ids'].shape == (8, 32) and batch['labels'].shape == (8,)

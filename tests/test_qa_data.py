"""Extractive QA data: readers and bad rows, windows and their labels (hand computed), n-best
post-processing, the official SQuAD EM / F1 on hand-made cases, the by-article dev split."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from jaxft.data import qa
from jaxft.data import splits
from jaxft.data.tokenizer import load_tokenizer
from jaxft.files import InputError

REPO = Path(__file__).resolve().parents[1]
SLICE = REPO / 'data/squad/squad-v1.1-dev-slice.json'
WORDS = 'zero one two three four five six seven eight nine'  # one BERT token each


@pytest.fixture(scope='module')
def tok():
  return load_tokenizer(REPO / 'data/tokenizers/bert-base-uncased')


def _char(word: str) -> int:
  return WORDS.index(word)


def _examples(answers, question='who sat ?', context=WORDS):
  """One question per answer text (found in `context`); [] = unanswerable."""
  texts = [[a] if a else [] for a in answers]
  starts = [[context.index(a)] if a else [] for a in answers]
  n = len(answers)
  return qa.QaExamples([f'q{i}' for i in range(n)], ['t'] * n, [question] * n, [context] * n,
                       texts, starts, [f'here q{i}' for i in range(n)])


# ------------------------------------------------------------------------------ windows

def test_windows_labels_equal_a_hand_computation(tok):
  # [CLS] who sat ? [SEP] <6 context tokens> [SEP]: max_len 12, 2 tokens shared, so window 0
  # holds context tokens 0-5 and window 1 tokens 4-9, both at positions 5..10.
  ex = _examples(['two three', 'five six', 'four five', 'three four five six'])
  arrays, stats = qa.encode_qa(ex, tok, max_len=12, doc_stride=2, max_query_len=8)
  np.testing.assert_array_equal(arrays['example_index'], [0, 0, 1, 1, 2, 2, 3, 3])
  # inside window 0 only | cut by window 0's edge, whole in window 1 | in the overlap: both |
  # longer than the overlap and cut by every window's edge: [CLS] everywhere.
  np.testing.assert_array_equal(arrays['start_positions'], [7, 0, 0, 6, 9, 5, 0, 0])
  np.testing.assert_array_equal(arrays['end_positions'], [8, 0, 0, 7, 10, 6, 0, 0])
  assert stats['n_answers_in_no_window'] == 1 and stats['n_windows_with_answer'] == 4
  assert stats['windows_per_example_max'] == 2
  ids = arrays['input_ids'][0]
  assert tok.convert_ids_to_tokens(ids.tolist()) == (
      ['[CLS]', 'who', 'sat', '?', '[SEP]', 'zero', 'one', 'two', 'three', 'four', 'five',
       '[SEP]'])
  np.testing.assert_array_equal(arrays['token_type_ids'][0], [0] * 5 + [1] * 7)
  # offsets: (-1, -1) off the context; characters of each context token in the context.
  off = arrays['offsets']
  assert off.dtype == np.int32 and off.shape == (8, 12, 2)
  np.testing.assert_array_equal(off[0, :5], -1)
  np.testing.assert_array_equal(off[0, 11], -1)
  np.testing.assert_array_equal(off[1, 5], [_char('four'), _char('four') + 4])
  np.testing.assert_array_equal(off[1, 10], [_char('nine'), _char('nine') + 4])
  for key in ('input_ids', 'attention_mask', 'start_positions', 'end_positions',
              'example_index'):
    assert arrays[key].dtype == np.int32, key


def test_windows_padding_question_cut_and_unanswerable(tok):
  ex = _examples(['one', ''], question='who sat there today ?', context='zero one two')
  arrays, stats = qa.encode_qa(ex, tok, max_len=12, doc_stride=2, max_query_len=2)
  # The question is cut to 2 tokens: [CLS] who sat [SEP] zero one two [SEP] + 4 pads.
  assert stats['n_questions_truncated'] == 2
  np.testing.assert_array_equal(arrays['attention_mask'][0], [1] * 8 + [0] * 4)
  np.testing.assert_array_equal(arrays['offsets'][0, 8:], -1)
  np.testing.assert_array_equal(arrays['start_positions'], [5, 0])  # v2 question: [CLS]
  np.testing.assert_array_equal(arrays['end_positions'], [5, 0])
  unlabeled = qa.QaExamples(ex.ids, ex.titles, ex.questions, ex.contexts, None, None,
                            ex.sources)
  arrays, _ = qa.encode_qa(unlabeled, tok, max_len=12, doc_stride=2)
  assert 'start_positions' not in arrays and len(arrays['example_index']) == 2


# ---------------------------------------------------------------------- post-processing

def _offsets(n_windows, first_char):
  """[W, 8, 2]: positions 0-2 question/special, 3-6 context tokens (4 characters each from
  first_char[w]), 7 pad."""
  off = np.full((n_windows, 8, 2), -1, np.int32)
  for w, c in enumerate(first_char):
    for j in range(4):
      off[w, 3 + j] = [c + 4 * j, c + 4 * j + 3]
  return off


CONTEXT = 'Aaa Bbb Ccc Ddd Eee Fff'  # token j at characters 4j..4j+3


def _one_example():
  return qa.QaExamples(['x'], ['t'], ['q'], [CONTEXT], [['Bbb']], [[4]], ['here'])


def test_best_span_skips_question_reversed_and_too_long_spans():
  off = _offsets(1, [0])  # positions 3..6 = Aaa Bbb Ccc Ddd
  ex = _one_example()
  start = np.zeros((1, 8), np.float32)
  end = np.zeros((1, 8), np.float32)
  start[0, 1], end[0, 2] = 50, 50   # in the question: never a span
  start[0, 7], end[0, 7] = 99, 99   # pad
  start[0, 6], end[0, 3] = 9, 9     # the top start and end: end before start
  start[0, 3], end[0, 6] = 2, 1     # so Aaa (2 + 9) beats Ddd (9 + 1)
  preds = qa.best_answers(start, end, off, np.array([0]), ex, n_best=8)
  assert preds == [{'id': 'x', 'answer': 'Aaa', 'score': 11.0, 'start': 0, 'end': 3}]
  # n_best=1 per window: start 6 and end 3 only, an invalid pair: no answer at all.
  preds = qa.best_answers(start, end, off, np.array([0]), ex, n_best=1)
  assert preds[0] == {'id': 'x', 'answer': '', 'score': None, 'start': -1, 'end': -1}
  # Too long: Aaa..Ddd (8 + 8) is 4 tokens; with max_answer_len=3, Aaa..Ccc (8 + 3) wins.
  start[:], end[:] = 0, 0
  start[0, 3], end[0, 6], end[0, 5] = 8, 8, 3
  preds = qa.best_answers(start, end, off, np.array([0]), ex, max_answer_len=3)
  assert preds[0] == {'id': 'x', 'answer': 'Aaa Bbb Ccc', 'score': 11.0, 'start': 0,
                      'end': 11}
  preds = qa.best_answers(start, end, {'offsets': off}, np.array([0]), ex, max_answer_len=4)
  assert (preds[0]['answer'], preds[0]['score']) == ('Aaa Bbb Ccc Ddd', 16.0)


def test_best_span_ties_and_windows():
  # Two windows of one example: window 1 starts at token 2 (Ccc Ddd Eee Fff).
  off = _offsets(2, [0, 8])
  start = np.zeros((2, 8), np.float32)
  end = np.zeros((2, 8), np.float32)
  # All valid spans tie at 0: earliest window, earliest start, shortest -> Aaa.
  preds = qa.best_answers(start, end, off, np.array([0, 0]), _one_example())
  assert preds[0]['answer'] == 'Aaa' and preds[0]['start'] == 0
  # Window 1 scores higher: its best span wins, offsets in the original context.
  start[1, 4], end[1, 5] = 3, 2     # Ddd Eee
  start[0, 3], end[0, 3] = 2, 2     # Aaa: 4 < 5
  preds = qa.best_answers(start, end, off, np.array([0, 0]), _one_example())
  assert preds[0] == {'id': 'x', 'answer': 'Ddd Eee', 'score': 5.0, 'start': 12, 'end': 19}
  # A tie across windows goes to the earlier window; inside one, to the shorter span.
  start[0, 4], end[0, 4], end[0, 6] = 3, 2, 2   # Bbb (5) and Bbb Ccc Ddd (5) in window 0
  preds = qa.best_answers(start, end, off, np.array([0, 0]), _one_example())
  assert (preds[0]['answer'], preds[0]['score']) == ('Bbb', 5.0)


def test_best_answers_version_2_null_score():
  off = _offsets(2, [0, 8])
  start = np.zeros((2, 8), np.float32)
  end = np.zeros((2, 8), np.float32)
  start[:, 0], end[:, 0] = [[3, 1], [3, 1]]  # [CLS]: 6 and 2; the null score is the min, 2
  start[0, 4], end[0, 4] = 1, 0.5            # best span: Bbb, 1.5
  kw = dict(version_2_with_negative=True)
  ex = _one_example()
  preds = qa.best_answers(start, end, off, np.array([0, 0]), ex, **kw)
  assert (preds[0]['answer'], preds[0]['score'], preds[0]['start']) == ('', 2.0, -1)
  preds = qa.best_answers(start, end, off, np.array([0, 0]), ex,
                          null_score_diff_threshold=0.5, **kw)  # 2 - 1.5 = 0.5, not > 0.5
  assert (preds[0]['answer'], preds[0]['score']) == ('Bbb', 1.5)
  preds = qa.best_answers(start, end, off, np.array([0, 0]), ex)  # v1: never ''
  assert preds[0]['answer'] == 'Bbb'


def test_best_answers_round_trip_on_labels(tok):
  """Logits peaked at the labels give back the reference answers (several windows)."""
  ex, _ = qa.read_qa_file(SLICE)
  arrays, stats = qa.encode_qa(ex, tok, max_len=96, doc_stride=32, max_query_len=32)
  assert stats['windows_per_example_max'] >= 3
  n, s = arrays['input_ids'].shape
  start = np.random.default_rng(0).normal(size=(n, s))
  end = np.random.default_rng(1).normal(size=(n, s))
  start[np.arange(n), arrays['start_positions']] += 30
  end[np.arange(n), arrays['end_positions']] += 30
  preds = qa.best_answers(start, end, arrays, arrays['example_index'], ex)
  assert [p['id'] for p in preds] == ex.ids
  m = qa.squad_metrics({p['id']: p['answer'] for p in preds}, ex.references())
  assert m['exact_match'] > 97 and m['f1'] > 98  # word pieces can extend past an answer
  for p, context in zip(preds, ex.contexts):
    assert context[p['start']:p['end']] == p['answer']


# ------------------------------------------------------------------------------ metrics

def test_squad_metrics_hand_cases():
  refs = {'a': ['cat', 'The dog'], 'b': ['the black cat', 'dog'], 'c': ['cat'],
          'd': ['cat'], 'e': ['U.S. Army']}
  preds = {'a': 'The  Cat!', 'b': 'black cat sat', 'c': 'a an the', 'e': 'us army cat cat'}
  m = qa.squad_metrics(preds, refs)
  # a: EM 1, F1 1 | b: P 2/3 R 1 -> 0.8 | c: normalises to '' -> 0 | d: no prediction -> 0 |
  # e: [us, army, cat, cat] vs [us, army]: P 2/4, R 1 -> 2/3.
  assert m['exact_match'] == pytest.approx(100 * 1 / 5)
  assert m['f1'] == pytest.approx(100 * (1 + 0.8 + 0 + 0 + 2 / 3) / 5)
  assert qa.normalize_answer(' The U.S.  an Army ') == 'us army'
  # v1.1 on an answered question: '' equals the reference 'the' (EM) but F1 counts no token.
  assert qa.squad_metrics({'f': ''}, {'f': ['the', 'cat']}) == {'exact_match': 100.0, 'f1': 0.0}
  # v2: no references (or only ones that normalise to nothing): right iff the answer is ''.
  m = qa.squad_metrics({'x': '', 'y': 'cat', 'z': 'the'}, {'x': [], 'y': [], 'z': ['', 'a']})
  assert m == {'exact_match': pytest.approx(200 / 3), 'f1': pytest.approx(200 / 3)}


# -------------------------------------------------------------------- reading, bad rows

def _flat_rows(path=SLICE):
  doc = json.loads(Path(path).read_text(encoding='utf-8'))
  return [{'id': q['id'], 'title': a['title'], 'context': p['context'], 'question': q['question'],
           'answers': {'text': [x['text'] for x in q['answers']],
                       'answer_start': [x['answer_start'] for x in q['answers']]}}
          for a in doc['data'] for p in a['paragraphs'] for q in p['qas']]


def _squad(path, qas, context='zero one two'):
  doc = {'version': '1.1', 'data': [{'title': 'T', 'paragraphs': [
      {'context': context, 'qas': qas}]}]}
  path.write_text(json.dumps(doc), encoding='utf-8')
  return path


def _q(qid, text='one', start=5, question='which?'):
  return {'id': qid, 'question': question,
          'answers': [] if text is None else [{'text': text, 'answer_start': start}]}


def test_jsonl_csv_and_hf_read_the_same_examples(tmp_path):
  want, stats = qa.read_qa_file(SLICE)
  assert (stats['n_examples'], stats['n_articles'], stats['format']) == (104, 3, 'squad')
  rows = _flat_rows()
  jl = tmp_path / 'slice.jsonl'
  jl.write_text(''.join(json.dumps(r) + '\n' for r in rows), encoding='utf-8')
  lines = tmp_path / 'lines.json'  # JSON lines named .json
  lines.write_text(jl.read_text(encoding='utf-8'), encoding='utf-8')
  cs = tmp_path / 'slice.csv'
  with open(cs, 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(['id', 'title', 'question', 'context', 'answers'])
    for r in rows:
      w.writerow([r['id'], r['title'], r['question'], r['context'], json.dumps(r['answers'])])
  for path in (jl, lines, cs):
    got, _ = qa.read_qa_file(path)
    assert (got.ids, got.titles, got.questions, got.contexts, got.answer_texts,
            got.answer_starts) == (want.ids, want.titles, want.questions, want.contexts,
                                   want.answer_texts, want.answer_starts), path
  data = qa.QaData(source='hf', hf_path='json', hf_data_files={'train': str(jl)},
                   hf_cache_dir=str(tmp_path / 'hf'))
  got, _ = qa.read_qa_split(data, 'train', require_answers=True)
  assert (got.ids, got.contexts, got.answer_texts, got.answer_starts) == (
      want.ids, want.contexts, want.answer_texts, want.answer_starts)


def test_bad_rows_named_by_file_and_id_or_skipped(tmp_path):
  path = _squad(tmp_path / 'bad.json', [
      _q('ok'), _q('moved', start=4), _q('ok'), _q('blank', question='  '), _q('none', None)])
  with pytest.raises(InputError, match=r"bad\.json \(question id 'moved'\): answer 'one' is "
                     r"not at answer_start=4.*the text is at 5"):
    qa.read_qa_file(path)
  ex, stats = qa.read_qa_file(path, on_bad_row='skip')
  assert ex.ids == ['ok']
  assert stats['skipped'] == {'answer_mismatch': 1, 'duplicate_id': 1, 'empty_text': 1,
                              'unanswerable': 1}
  path = _squad(tmp_path / 'v2.json', [_q('ok'), _q('none', None)])
  with pytest.raises(InputError, match=r"'none'.*data\.version_2_with_negative=True"):
    qa.read_qa_file(path)
  ex, stats = qa.read_qa_file(path, version_2_with_negative=True)
  assert ex.answer_texts == [['one'], []] and stats['n_unanswerable'] == 1
  latin = tmp_path / 'latin.jsonl'
  latin.write_bytes(json.dumps({'id': 'a', 'question': 'q', 'context': 'zero one',
                                'answers': {'text': ['one'], 'answer_start': [5]}}).encode()
                    + b'\n' + b'{"id": "b", "question": "caf\xe9", "context": "zero one", '
                    b'"answers": {"text": ["one"], "answer_start": [5]}}\n')
  with pytest.raises(InputError, match=r"latin\.jsonl:2 \(question id 'b'\): invalid UTF-8 "
                     r'byte 0xe9'):
    qa.read_qa_file(latin)
  assert qa.read_qa_file(latin, on_bad_row='skip')[1]['skipped'] == {'bad_encoding': 1}
  squad = _squad(tmp_path / 'latin.json', [_q('a'), _q('b', question='caf@')])
  squad.write_bytes(squad.read_bytes().replace(b'@', b'\xe9'))  # latin-1 'é' in a JSON file
  with pytest.raises(InputError, match=r"latin\.json \(question id 'b'\): invalid UTF-8 byte"):
    qa.read_qa_file(squad)


# ---------------------------------------------------------------------------- the splits

def test_dev_split_holds_out_whole_articles(tok):
  train = qa.QaData(train_file=str(SLICE), dev_holdout_articles=1, max_len=128,
                    doc_stride=32, max_query_len=32)
  t_arrays, t_info = qa.load_qa_split(train, tok, 'train')
  d_arrays, d_info = qa.load_qa_split(train, tok, 'validation')
  t_ex, d_ex = t_info['examples'], d_info['examples']
  assert set(t_ex.titles).isdisjoint(d_ex.titles)
  assert len(set(t_ex.titles)) == 2 and len(set(d_ex.titles)) == 1
  assert sorted(t_ex.ids + d_ex.ids) == sorted(qa.read_qa_file(SLICE)[0].ids)
  assert d_info['stats']['held_out_articles'] == sorted(set(d_ex.titles))
  assert (d_info['main_metric'], d_info['metric_names']) == ('f1', ['exact_match', 'f1'])
  assert t_info['n_windows'] == len(t_arrays['input_ids']) > t_info['n_examples']
  assert d_arrays['offsets'].shape == (d_info['n_windows'], 128, 2)
  # Another seed, a fraction: still whole articles, and the same draw every time.
  other = qa.QaData(train_file=str(SLICE), dev_holdout_articles=0.5, seed=3)
  a = qa.read_qa_split(other, 'dev', True)[0]
  assert a.ids == qa.read_qa_split(other, 'dev', True)[0].ids
  assert set(a.titles).isdisjoint(qa.read_qa_split(other, 'train', True)[0].titles)
  with pytest.raises(splits.MissingSplitError):
    qa.load_qa_split(qa.QaData(train_file=str(SLICE)), tok, 'dev')
  with pytest.raises(splits.MissingSplitError):
    qa.load_qa_split(train, tok, 'test')
  with pytest.raises(InputError, match='leaving none to train on'):
    qa.read_qa_split(qa.QaData(train_file=str(SLICE), dev_holdout_articles=3), 'dev', True)


def test_settings_refused():
  with pytest.raises(ValueError, match='dev_holdout_articles and data.dev_file'):
    qa.QaData(dev_file='x.json', dev_holdout_articles=1)
  with pytest.raises(ValueError, match='dev_holdout_articles must be'):
    qa.QaData(dev_holdout_articles=1.5)
  with pytest.raises(ValueError, match='leave no new context tokens'):
    qa.QaData(max_len=128, doc_stride=64, max_query_len=64)
  with pytest.raises(ValueError, match='finite'):
    qa.QaData(null_score_diff_threshold=float('nan'))

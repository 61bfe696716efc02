"""Stage `predict`: predictions.jsonl round-trips through the label map.

The fine-tuned workdirs come from tests/test_finetune.py's cached helpers (one tiny SST-2
and one tiny CoNLL fine-tune per session). Expected outputs are computed independently:
the tokenizer called directly, the fine-tune's in-memory best params run through the
model, softmax/argmax and first-sub-token tags by hand, entities by seqeval.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from seqeval.metrics import f1_score
from seqeval.metrics.sequence_labeling import get_entities

from jaxft import kinds, sources
from jaxft.config import ConfigError
from jaxft.data.classification import GLUE_TASKS
from jaxft.data.tokenizer import load_tokenizer
from jaxft.main import run_stage
from jaxft.models import ModelConfig, build_model
from jaxft.train.state import ModelDef

from test_finetune import (CONLL_TINY, SST2, load_config_module, ner_workdir, read_tsv,
                           sst2_workdir)


def predict(init_from: str, spec: str, out_dir: Path, **keys) -> tuple[dict, list[dict]]:
  c = load_config_module('predict').get_config()
  c.init_from = init_from
  c.predict.input = spec
  c.predict.update(**keys)
  r = run_stage(c, str(out_dir))
  with open(r['output']) as f:
    return r, [json.loads(line) for line in f]


def direct_logits(workdir: str, params, head: str, enc: dict) -> np.ndarray:
  labels = json.load(open(os.path.join(workdir, 'labels.json')))
  mcfg = ModelConfig.from_config_dict(labels['model'])
  md = ModelDef.create(lambda: build_model(mcfg, head, num_labels=len(labels['label_names'])))
  f = jax.jit(lambda p, ids, mask, tt: md.merge(p)(ids, mask, tt)['logits'])
  return np.asarray(f(jax.device_get(params), enc['input_ids'], enc['attention_mask'],
                      enc.get('token_type_ids')), np.float64)


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def read_conll(path: Path):
  sents, cur = [], []
  for line in path.read_text(encoding='utf-8').splitlines():
    parts = line.split()
    if not parts or parts[0] == '-DOCSTART-':
      if cur:
        sents.append(cur)
      cur = []
      continue
    cur.append((parts[0], parts[-1]))
  if cur:
    sents.append(cur)
  return [[w for w, _ in s] for s in sents], [[t for _, t in s] for s in sents]


# --------------------------------------------------------------------- classification

def test_cls_dev_predictions_match_direct_logits_and_gold(tmp_path):
  wd, fine = sst2_workdir()
  r, recs = predict(wd, 'dev', tmp_path / 'p')
  rows = read_tsv(SST2 / 'dev.tsv')
  names = list(GLUE_TASKS['sst2'].label_names)  # ['negative', 'positive'] for '0', '1'
  assert r['n'] == len(recs) == len(rows) == 872
  tok = load_tokenizer(os.path.join(wd, 'tokenizer'))
  enc = tok([t for t, _ in rows], truncation=True, max_length=64, padding='max_length',
            return_tensors='np')
  probs = softmax(direct_logits(wd, fine['state']['params'], 'cls', enc))
  got = np.array([[rec['probs'][n] for n in names] for rec in recs])
  np.testing.assert_allclose(got, probs, atol=2e-5)
  margin = np.abs(probs[:, 1] - probs[:, 0])
  for i, (rec, (text, y)) in enumerate(zip(recs, rows)):
    assert rec['source'].endswith(f'dev.tsv:{i + 2}')  # header is line 1
    assert rec['text'] == text.strip()  # the reader strips cell whitespace
    assert rec['gold'] == names[int(y)]
    if margin[i] > 1e-4:
      assert rec['label'] == names[int(np.argmax(probs[i]))], (i, rec)
    assert rec['label'] == max(rec['probs'], key=rec['probs'].get)
  acc = np.mean([rec['label'] == rec['gold'] for rec in recs])
  assert r['accuracy'] == pytest.approx(acc)
  # predict loads the best checkpoint: its accuracy is the fine-tune's best dev accuracy
  assert r['accuracy'] == pytest.approx(fine['best']['value'], abs=1.5 / 872)


def test_cls_txt_input_keeps_text_and_line(tmp_path):
  wd, fine = sst2_workdir()
  lines = ['a gorgeous , witty , seductive movie .', '', 'the plot is nothing but boilerplate .',
           'an utterly incompetent conclusion']
  (tmp_path / 'in.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  r, recs = predict(wd, str(tmp_path / 'in.txt'), tmp_path / 'p')
  texts = [t for t in lines if t]
  assert r['n'] == 3 and 'accuracy' not in r
  assert [rec['text'] for rec in recs] == texts
  assert [rec['source'].rsplit(':', 1)[1] for rec in recs] == ['1', '3', '4']
  tok = load_tokenizer(os.path.join(wd, 'tokenizer'))
  enc = tok(texts, truncation=True, max_length=64, padding='max_length', return_tensors='np')
  probs = softmax(direct_logits(wd, fine['state']['params'], 'cls', enc))
  for rec, p in zip(recs, probs):
    assert 'gold' not in rec
    assert rec['probs'] == pytest.approx({'negative': p[0], 'positive': p[1]}, abs=2e-5)
    assert rec['label'] == ('positive' if p[1] > p[0] else 'negative')


# -------------------------------------------------------------------------------- NER

def _first_subtoken_tags(tok, words, logits, names):
  enc = tok(words, is_split_into_words=True, truncation=True, max_length=64)
  out = []
  for i, ws in enumerate(words):
    tags, seen = ['O'] * len(ws), set()
    for j, w in enumerate(enc.word_ids(i)):
      if w is not None and w not in seen:
        seen.add(w)
        tags[w] = names[int(np.argmax(logits[i, j]))]
    out.append(tags)
  return out


def test_ner_txt_tags_and_entities(tmp_path):
  wd, fine = ner_workdir()
  words, _ = read_conll(CONLL_TINY)
  words = words[:3] + [['Peter', 'Blackburn', 'visited', 'the', 'European', 'Commission']]
  (tmp_path / 'in.txt').write_text('\n'.join(' '.join(w) for w in words) + '\n',
                                   encoding='utf-8')
  r, recs = predict(wd, str(tmp_path / 'in.txt'), tmp_path / 'p')
  names = json.load(open(os.path.join(wd, 'labels.json')))['label_names']
  tok = load_tokenizer(os.path.join(wd, 'tokenizer'))
  enc = tok(words, is_split_into_words=True, truncation=True, max_length=64,
            padding='max_length', return_tensors='np')
  logits = direct_logits(wd, fine['state']['params'], 'token_cls', enc)
  want = _first_subtoken_tags(tok, words, logits, names)
  assert r['n'] == len(recs) == len(words)
  for rec, ws, tags in zip(recs, words, want):
    assert rec['tokens'] == ws and rec['tags'] == tags
    assert 'gold' not in rec
    spans = [(e['type'], e['start'], e['end'] - 1) for e in rec['entities']]
    assert spans == [tuple(x) for x in get_entities(tags)]
    for e in rec['entities']:
      assert e['text'] == ' '.join(ws[e['start']:e['end']])


def test_ner_dev_gold_and_f1_match_the_finetune_eval(tmp_path):
  wd, fine = ner_workdir()  # its dev split (a file outside data/) given as the file itself
  r, recs = predict(wd, str(CONLL_TINY), tmp_path / 'p')
  words, tags = read_conll(CONLL_TINY)
  assert [rec['tokens'] for rec in recs] == words
  assert [rec['gold'] for rec in recs] == tags
  f1 = f1_score(tags, [rec['tags'] for rec in recs])
  assert f1 == pytest.approx(fine['best']['value'], abs=1e-9)


def test_split_input_ignores_train_class_balance(tmp_path):
  """A run trained with data.class_balance='resample' predicts every row once, in file
  order, each under its own source (no compile: the input side of predict only)."""
  from jaxft.data.classification import ClsData
  from jaxft.stages import predict as predict_lib
  rows = [('good', '1'), ('great', '1'), ('fine', '1'), ('nice', '1'), ('bad', '0')]
  (tmp_path / 'train.tsv').write_text(
      'sentence\tlabel\n' + ''.join(f'{t}\t{y}\n' for t, y in rows), encoding='utf-8')
  tok = load_tokenizer(Path(__file__).resolve().parents[1] / 'data/tokenizers/bert-base-uncased')
  labels = sources.TaskInfo.from_json({'kind': 'cls', 'label_values': ['0', '1'],
                                       'label_names': ['negative', 'positive']})
  data_cfg = ClsData(task='sst2', path=str(tmp_path), max_len=16, class_balance='resample')
  arrays, ex = predict_lib.load_inputs('train', kinds.CLS, data_cfg, tok, labels)
  assert arrays['labels'].tolist() == [int(y) for _, y in rows]
  assert [s.rsplit(':', 1)[1] for s in ex['sources']] == ['2', '3', '4', '5', '6']
  ids = tok([t for t, _ in rows], max_length=16, padding='max_length')['input_ids']
  assert arrays['input_ids'].tolist() == ids


# ------------------------------------------------------------------ eval-only, inputs

def test_labelled_input_is_an_eval_only_run_with_the_tasks_metrics(tmp_path):
  """predict on a labelled split writes the task's metrics to results.json (accuracy for
  SST-2, entity precision / recall / F1 for NER), equal to the fine-tune's own eval."""
  wd, fine = sst2_workdir()
  r, _ = predict(wd, 'dev', tmp_path / 'cls')
  saved = json.loads((tmp_path / 'cls' / 'results.json').read_text())
  assert saved['accuracy'] == r['accuracy'] == pytest.approx(fine['final']['eval/accuracy'],
                                                             abs=1.5 / 872)
  wd, fine = ner_workdir()
  r, _ = predict(wd, str(CONLL_TINY), tmp_path / 'ner')
  assert {'precision', 'recall', 'f1', 'accuracy'} <= set(r)
  assert r['f1'] == pytest.approx(fine['best']['value'], abs=1e-9)


def test_conll_input_named_txt_is_read_as_conll(tmp_path):
  """A CoNLL file called *.txt (CoNLL-2003's own names) is read by its content: sentences
  of words with gold tags, not 4-word lines of 'WORD POS CHUNK TAG'."""
  wd, _ = ner_workdir()
  words, tags = read_conll(CONLL_TINY)
  (tmp_path / 'test.txt').write_text(CONLL_TINY.read_text(encoding='utf-8'), encoding='utf-8')
  r, recs = predict(wd, str(tmp_path / 'test.txt'), tmp_path / 'p')
  assert [rec['tokens'] for rec in recs] == words
  assert [rec['gold'] for rec in recs] == tags and 'f1' in r


def test_missing_split_is_a_one_line_error_naming_what_to_set(tmp_path):
  wd, _ = sst2_workdir()
  with pytest.raises(ValueError, match=r"predict.input='test': .* Set predict.input to a split "
                                       r'the training data has'):
    predict(wd, 'test', tmp_path / 'p')


@pytest.mark.parametrize('name, text', [('empty.txt', ''), ('blank.txt', '\n  \n'),
                                        ('header_only.tsv', 'sentence\tlabel\n')])
def test_an_input_without_rows_is_refused_naming_the_file(tmp_path, name, text):
  """A file with no rows is a mistake (a wrong path, an export that failed): one line
  naming it, nothing written (it used to give an empty predictions.jsonl and results.json,
  exit 0)."""
  wd, _ = sst2_workdir()
  path = tmp_path / name
  path.write_text(text, encoding='utf-8')
  with pytest.raises(ConfigError, match=re.escape(f'predict.input={str(path)!r}: {path} has '
                                                  'no rows')):
    predict(wd, str(path), tmp_path / 'p')
  assert not (tmp_path / 'p' / 'predictions.jsonl').exists()
  assert not (tmp_path / 'p' / 'results.json').exists()


def test_inference_runs_in_fp32_unless_asked(tmp_path):
  """predict.dtype: float32 by default whatever the fine-tune trained in, bfloat16 on request
  (probabilities within bf16 rounding of the fp32 ones)."""
  wd, _ = sst2_workdir()
  _, fp32 = predict(wd, 'dev', tmp_path / 'a')
  _, bf16 = predict(wd, 'dev', tmp_path / 'b', dtype='bfloat16')
  p32 = np.array([list(r['probs'].values()) for r in fp32])
  p16 = np.array([list(r['probs'].values()) for r in bf16])
  assert not np.array_equal(p32, p16) and np.abs(p32 - p16).max() < 0.05


# ------------------------------------------------------------- outputs of a training workdir

def _copy_of(wd: str, tmp_path: Path) -> Path:
  dst = tmp_path / 'run'
  shutil.copytree(wd, dst, ignore=shutil.ignore_patterns('.jaxft.lock'))
  return dst


def test_predict_in_a_training_workdir_keeps_its_records(tmp_path):
  """predict without init_from in a fine-tune's workdir (a documented use) writes under
  WORKDIR/predict/: the fine-tune's results.json (history, best) and config.json stay."""
  wd = _copy_of(ner_workdir()[0], tmp_path)
  kept = {n: (wd / n).read_bytes() for n in ('results.json', 'config.json')}
  c = load_config_module('predict').get_config()
  c.predict.input = 'dev'
  r = run_stage(c, str(wd))
  assert {n: (wd / n).read_bytes() for n in kept} == kept
  assert not (wd / 'predictions.jsonl').exists()
  assert r['output'] == str(wd / 'predict' / 'predictions.jsonl') and 'f1' in r
  assert json.loads((wd / 'predict' / 'results.json').read_text())['f1'] == r['f1']


def test_predictions_replace_a_symlink_and_a_failed_write_keeps_the_old_file(tmp_path,
                                                                             monkeypatch):
  """predictions.jsonl is written through a temporary file renamed into place: a symlink
  there is replaced, not followed; an error mid-write leaves the previous file whole."""
  wd, _ = ner_workdir()
  (tmp_path / 'in.txt').write_text('Peter Blackburn\nEU rejects German call\n')
  out = tmp_path / 'p'
  out.mkdir()
  victim = tmp_path / 'victim.txt'
  victim.write_text('not yours\n')
  (out / 'predictions.jsonl').symlink_to(victim)
  _, recs = predict(wd, str(tmp_path / 'in.txt'), out)
  assert victim.read_text() == 'not yours\n' and len(recs) == 2
  assert not (out / 'predictions.jsonl').is_symlink()
  before = (out / 'predictions.jsonl').read_bytes()

  records = kinds.NER.records

  def fail_after_one(*args):
    yield records(*args)[0]
    raise OSError('killed mid-write')
  monkeypatch.setattr(kinds.NER, 'records', fail_after_one)
  with pytest.raises(OSError, match='killed mid-write'):
    predict(wd, str(tmp_path / 'in.txt'), out)
  assert (out / 'predictions.jsonl').read_bytes() == before
  assert not [p.name for p in out.iterdir() if '.tmp' in p.name]

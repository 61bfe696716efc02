"""GLUE / seqeval metrics against the reference libraries, and the metrics writer."""
import json
import math
import os
import struct

import jax
import numpy as np
import pytest
from scipy import stats as sps
from seqeval import metrics as sqm
from seqeval.scheme import IOB2
from sklearn import metrics as skm

from jaxft.train import metrics

RNG = np.random.default_rng(0)
Y = RNG.integers(0, 2, 50)
LOGITS = RNG.normal(size=(50, 2)) + 0.8 * np.eye(2)[Y]
P = LOGITS.argmax(-1)


def test_glue_classification_metrics_match_sklearn():
  assert P.tolist() != Y.tolist()  # a non-trivial case
  out = metrics.glue_metrics('mrpc', LOGITS, Y)
  assert list(out) == ['accuracy', 'f1']
  assert out['accuracy'] == pytest.approx(skm.accuracy_score(Y, P))
  assert out['f1'] == pytest.approx(skm.f1_score(Y, P))
  assert metrics.glue_metrics('qqp', P, Y) == out  # ids or logits alike
  cola = metrics.glue_metrics('cola', P, Y)
  assert cola == {'matthews': pytest.approx(skm.matthews_corrcoef(Y, P))}
  assert metrics.glue_metrics('sst2', P, Y) == {'accuracy': out['accuracy']}
  # Hand-checked: 3 of 4 right; TP=1, FP=1, FN=0 -> F1 2/3.
  assert metrics.glue_metrics(['acc', 'f1'], [1, 0, 0, 1], [1, 0, 0, 0]) == {
      'accuracy': 0.75, 'f1': pytest.approx(2 / 3)}


def test_glue_multiclass_and_regression():
  y3 = RNG.integers(0, 3, 40)
  p3 = np.where(RNG.random(40) < 0.6, y3, RNG.integers(0, 3, 40))
  out = metrics.glue_metrics(['accuracy', 'f1_macro', 'f1', 'mcc'], p3, y3)
  assert out['accuracy'] == pytest.approx(skm.accuracy_score(y3, p3))
  assert out['f1_macro'] == pytest.approx(skm.f1_score(y3, p3, average='macro'))
  assert out['f1'] == out['f1_macro']
  assert out['matthews'] == pytest.approx(skm.matthews_corrcoef(y3, p3))
  assert metrics.glue_metrics('mnli', p3, y3) == {'accuracy': out['accuracy']}

  t = RNG.uniform(0, 5, 30)
  p = t + RNG.normal(0, 1.5, 30)
  out = metrics.glue_metrics('stsb', p[:, None], t)
  assert out['pearson'] == pytest.approx(sps.pearsonr(p, t)[0])
  assert out['spearman'] == pytest.approx(sps.spearmanr(p, t)[0])
  assert out['pearson'] != pytest.approx(out['spearman'])
  assert math.isnan(metrics.glue_metrics('stsb', np.ones(5), t[:5])['pearson'])
  with pytest.raises(ValueError, match='unknown metric'):
    metrics.glue_metrics(['bleu'], p, t)
  with pytest.raises(ValueError, match='predictions'):
    metrics.glue_metrics('sst2', [0, 1], [0, 1, 1])


TRUE = [['B-PER', 'I-PER', 'O', 'B-LOC', 'I-LOC', 'O'], ['B-ORG', 'O', 'B-PER', 'O']]
PRED = [['B-PER', 'I-PER', 'O', 'O', 'O', 'O'], ['B-ORG', 'O', 'B-PER', 'I-PER']]


def test_ner_metrics_match_seqeval_and_hand_counts():
  out = metrics.ner_metrics(PRED, TRUE)
  # Gold: PER x2, LOC, ORG; predicted: PER x2 (one with a wrong span), ORG.
  assert out['precision'] == pytest.approx(2 / 3)
  assert out['recall'] == pytest.approx(1 / 2)
  assert out['f1'] == pytest.approx(4 / 7)
  assert out['f1'] == pytest.approx(sqm.f1_score(TRUE, PRED))
  assert out['accuracy'] == pytest.approx(sqm.accuracy_score(TRUE, PRED))
  assert (out['PER/precision'], out['PER/recall'], out['PER/f1']) == (0.5, 0.5, 0.5)
  assert (out['LOC/precision'], out['LOC/recall'], out['LOC/f1']) == (0, 0, 0)
  assert (out['ORG/precision'], out['ORG/recall'], out['ORG/f1']) == (1, 1, 1)
  assert (out['PER/support'], out['LOC/support'], out['ORG/support']) == (2, 1, 1)
  assert out['micro/f1'] == pytest.approx(4 / 7)
  assert out['macro/f1'] == pytest.approx(0.5)
  report = sqm.classification_report(TRUE, PRED, output_dict=True, zero_division=0)
  for typ in ('PER', 'LOC', 'ORG'):
    assert out[f'{typ}/f1'] == pytest.approx(report[typ]['f1-score'])


def test_ner_default_mode_is_lenient_strict_on_request():
  true, pred = [['B-PER', 'I-PER', 'O']], [['I-PER', 'I-PER', 'O']]
  assert metrics.ner_metrics(pred, true)['f1'] == 1.0  # conlleval: I- starts a chunk
  strict = metrics.ner_metrics(pred, true, mode='strict', scheme='IOB2')
  assert strict['f1'] == sqm.f1_score(true, pred, mode='strict', scheme=IOB2) == 0.0
  with pytest.raises(ValueError, match='sequence 0'):
    metrics.ner_metrics([['O']], [['O', 'O']])


def _tb_scalars(path):
  """(tag, step, value) from a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  out = []
  with open(path, 'rb') as f:
    while header := f.read(12):
      (length,) = struct.unpack('<Q', header[:8])
      data = f.read(length)
      f.read(4)
      ev = event_pb2.Event.FromString(data)
      for v in ev.summary.value:
        out.append((v.tag, ev.step, v.simple_value))
  return out


def test_metrics_writer(tmp_path):
  import jax.numpy as jnp
  with metrics.MetricsWriter(tmp_path) as w:
    w.write(1, {'train/loss': np.float32(2.5), 'train/lr': 1e-4})
    w.write(2, {'train/loss': jnp.asarray(2.0), 'eval/f1': float('nan'), 'note': 'x'})
    # Flushed per write: readable before close.
    assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 2
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  recs = [json.loads(line) for line in lines]
  assert recs == [{'step': 1, 'train/loss': 2.5, 'train/lr': 1e-4},
                  {'step': 2, 'train/loss': 2.0, 'eval/f1': None, 'note': 'x'}]
  assert metrics.read_metrics(tmp_path) == recs
  events = list((tmp_path / 'tb').glob('events.out.tfevents.*'))
  assert len(events) == 1
  scalars = _tb_scalars(events[0])
  assert ('train/loss', 1, 2.5) in scalars and ('train/loss', 2, 2.0) in scalars
  assert not [s for s in scalars if s[0] == 'eval/f1']
  # Appends on reopen (resume), and a disabled writer writes nothing.
  with metrics.MetricsWriter(tmp_path) as w:
    w.write(3, {'train/loss': 1.0})
  assert len(metrics.read_metrics(tmp_path)) == 3
  off = tmp_path / 'off'
  w = metrics.MetricsWriter(off, enabled=False)
  w.write(1, {'train/loss': 1.0})
  w.close()
  assert not off.exists()


def test_torn_last_line_is_repaired_and_skipped(tmp_path, caplog):
  """A crash mid-write leaves a torn last line: reading skips it (with a warning), a resumed
  writer cuts it off instead of appending onto it; a bad line elsewhere names file:line."""
  import logging as py_logging
  path = tmp_path / 'metrics.jsonl'
  good = '{"step": 1, "train/loss": 2.5}\n{"step": 2, "train/loss": 2.0}\n'
  path.write_text(good + '{"step": 3, "train/lo')
  with caplog.at_level(py_logging.WARNING):
    assert metrics.read_metrics(tmp_path) == [{'step': 1, 'train/loss': 2.5},
                                              {'step': 2, 'train/loss': 2.0}]
  assert f'{path}:3: skipping a torn last line' in caplog.text, caplog.text
  caplog.clear()
  with caplog.at_level(py_logging.WARNING):
    with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
      w.write(3, {'train/loss': 1.5})
  assert f'{path}:3: cut a torn last line (21 bytes' in caplog.text, caplog.text
  assert path.read_text() == good + '{"step": 3, "train/loss": 1.5}\n'
  # A last record that lacks only its newline is kept, not cut.
  path.write_text(good.rstrip('\n'))
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(3, {'train/loss': 1.5})
  assert [r['step'] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3]
  path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
  with pytest.raises(ValueError, match=f'{path}:2: not a JSON record'):
    metrics.read_metrics(tmp_path)


def test_results_json_is_strict_json(tmp_path):
  """Non-finite numbers (a NaN score, an infinite perplexity) are written as null at any
  depth, numpy ones too: json.dumps would write bare NaN / Infinity, which strict parsers
  (JavaScript, jq) reject."""
  import jax.numpy as jnp
  results = {'loss': float('nan'), 'ppl': float('inf'), 'ok': 1.5, 'n': np.int64(3),
             'scores': {'bleu': np.float32('nan'), 'per': [1.0, -np.inf, np.float64(2)]},
             'arr': np.array([0.5, np.nan]), 'jax': jnp.asarray(float('nan')), 'name': 'x'}
  path = metrics.write_results(tmp_path, results)

  def refuse(constant):
    raise AssertionError(f'{constant} in results.json')
  got = json.loads(open(path).read(), parse_constant=refuse)
  assert got.pop('environment')['cpus'] >= 1
  assert got == {'loss': None, 'ppl': None, 'ok': 1.5, 'n': 3,
                 'scores': {'bleu': None, 'per': [1.0, None, 2.0]}, 'arr': [0.5, None],
                 'jax': None, 'name': 'x'}
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:  # non-scalars: null inside
    w.write(1, {'eval/per_class': [0.5, float('nan')], 'eval/loss': float('inf')})
  assert metrics.read_metrics(tmp_path) == [{'step': 1, 'eval/per_class': [0.5, None],
                                             'eval/loss': None}]


def test_results_json_records_the_environment_the_numbers_came_from(tmp_path, monkeypatch):
  """results.json says what besides config and data decides a run's numbers (README, "Which
  numbers to expect"): the cores this process may use, XLA_FLAGS, the devices, the CPU and
  the library versions."""
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', '') + ' --xla_dump_to=/x')
  if hasattr(os, 'sched_getaffinity'):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 3, 5})
  got = json.loads(open(metrics.write_results(tmp_path, {'step': 3})).read())
  env = got.pop('environment')
  assert got == {'step': 3}
  assert env['cpus'] == (3 if hasattr(os, 'sched_getaffinity') else os.cpu_count())
  assert env['xla_flags'].endswith(' --xla_dump_to=/x')
  assert env['devices'] == f'{jax.device_count()} x cpu ({jax.devices()[0].device_kind})'
  assert env['processes'] == 1 and env['versions']['jax'] == jax.__version__
  assert env['versions']['numpy'] == np.__version__
  if os.path.exists('/proc/cpuinfo') and 'model name' in open('/proc/cpuinfo').read():
    assert env['cpu']

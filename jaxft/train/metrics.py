"""Task metrics (GLUE via scikit-learn/scipy, NER via seqeval, generation via sacrebleu and
rouge-score) and metric writers.

Metrics are computed on host numpy arrays after an eval pass, using the reference
libraries so the numbers match what papers and HF scripts report.
"""
from __future__ import annotations

import json
import math
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from jaxft import files
from jaxft.data.classification import GLUE_TASKS

_ALIASES = {'mcc': 'matthews', 'matthews_corrcoef': 'matthews', 'acc': 'accuracy',
            'pearsonr': 'pearson', 'spearmanr': 'spearman'}
_CLS_METRICS = ('accuracy', 'f1', 'f1_macro', 'f1_micro', 'matthews')
_REG_METRICS = ('pearson', 'spearman')


def _metric_names(task_or_metric_names: str | Sequence[str]) -> list[str]:
  if isinstance(task_or_metric_names, str):
    key = task_or_metric_names.lower().replace('-', '')
    if key in GLUE_TASKS:
      return list(GLUE_TASKS[key].metrics)
    names = [task_or_metric_names]
  else:
    names = list(task_or_metric_names)
  out = []
  for n in names:
    n = _ALIASES.get(n, n)
    if n not in _CLS_METRICS + _REG_METRICS:
      raise ValueError(f'unknown metric or GLUE task {n!r}; metrics: '
                       f'{_CLS_METRICS + _REG_METRICS}')
    out.append(n)
  return out


def glue_metrics(task_or_metric_names: str | Sequence[str], predictions: Any,
                 labels: Any) -> dict[str, float]:
  """GLUE metrics for a task name ('cola', 'mrpc', ...) or a list of metric names.

  Classification predictions are class ids [N] or logits [N, C] (argmax taken);
  regression predictions are floats [N] (or [N, 1]). 'f1' is binary F1 of class 1
  for two classes (as GLUE reports for MRPC/QQP) and macro F1 otherwise.
  Returns {name: float}; correlations of a constant input are NaN.
  """
  from sklearn import metrics as skm
  names = _metric_names(task_or_metric_names)
  preds = np.asarray(predictions)
  y = np.asarray(labels)
  if preds.shape[0] != y.shape[0]:
    raise ValueError(f'{preds.shape[0]} predictions for {y.shape[0]} labels')
  out: dict[str, float] = {}
  if any(n in _REG_METRICS for n in names):
    p = preds.reshape(len(preds), -1)
    if p.shape[1] != 1:
      raise ValueError(f'regression metrics need one prediction per example, got {p.shape}')
    p, t = p[:, 0].astype(np.float64), y.reshape(-1).astype(np.float64)
    for n in names:
      if n in _REG_METRICS:
        out[n] = _correlation(n, p, t)
  if any(n in _CLS_METRICS for n in names):
    p = preds.argmax(-1) if preds.ndim == 2 else preds.reshape(-1)
    p, t = p.astype(np.int64), y.reshape(-1).astype(np.int64)
    binary = set(np.unique(np.concatenate([p, t])).tolist()) <= {0, 1}
    for n in names:
      if n == 'accuracy':
        out[n] = float(skm.accuracy_score(t, p))
      elif n == 'f1':
        out[n] = float(skm.f1_score(t, p, average='binary' if binary else 'macro',
                                    zero_division=0))
      elif n == 'f1_macro':
        out[n] = float(skm.f1_score(t, p, average='macro', zero_division=0))
      elif n == 'f1_micro':
        out[n] = float(skm.f1_score(t, p, average='micro', zero_division=0))
      elif n == 'matthews':
        out[n] = float(skm.matthews_corrcoef(t, p))
  return {n: out[n] for n in names}


def _correlation(name: str, p: np.ndarray, t: np.ndarray) -> float:
  from scipy import stats
  if len(p) < 2 or np.all(p == p[0]) or np.all(t == t[0]):
    return float('nan')  # undefined; scipy would warn and return nan too
  if name == 'pearson':
    return float(stats.pearsonr(p, t)[0])
  return float(stats.spearmanr(p, t)[0])


def ner_metrics(pred_tag_seqs: Sequence[Sequence[str]],
                true_tag_seqs: Sequence[Sequence[str]], *, mode: str | None = None,
                scheme: str | None = None) -> dict[str, float]:
  """Entity-level NER scores with seqeval (default mode: conlleval-compatible).

  Returns a flat dict: 'precision', 'recall', 'f1' (micro over all entities, the
  CoNLL headline), 'accuracy' (token level), 'micro/…', 'macro/…', 'weighted/…' and
  '<TYPE>/precision|recall|f1|support' per entity type. mode='strict' with
  scheme='IOB2' gives seqeval's strict evaluation.
  """
  from seqeval import metrics as sqm
  from seqeval import scheme as sqs
  pred = [list(s) for s in pred_tag_seqs]
  true = [list(s) for s in true_tag_seqs]
  if len(pred) != len(true):
    raise ValueError(f'{len(pred)} predicted sequences for {len(true)} gold sequences')
  for i, (p, t) in enumerate(zip(pred, true)):
    if len(p) != len(t):
      raise ValueError(f'sequence {i}: {len(p)} predicted tags for {len(t)} gold tags')
  kw: dict[str, Any] = {}
  if mode is not None:
    kw['mode'] = mode
    kw['scheme'] = getattr(sqs, scheme) if isinstance(scheme, str) else (scheme or sqs.IOB2)
  report = sqm.classification_report(true, pred, output_dict=True, zero_division=0, **kw)
  out = {
      'precision': float(sqm.precision_score(true, pred, zero_division=0, **kw)),
      'recall': float(sqm.recall_score(true, pred, zero_division=0, **kw)),
      'f1': float(sqm.f1_score(true, pred, zero_division=0, **kw)),
      'accuracy': float(sqm.accuracy_score(true, pred)),
  }
  for key, vals in report.items():
    name = key.replace(' avg', '')  # 'micro avg' -> 'micro'
    for m in ('precision', 'recall', 'f1-score', 'support'):
      if m in vals:
        out[f'{name}/{m.replace("-score", "")}'] = float(vals[m])
  return out


GENERATION_METRICS = ('bleu', 'chrf', 'rouge_l')


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]
                       ) -> dict[str, float]:
  """Corpus BLEU and chrF (sacrebleu, every reference of a hypothesis at once, 0-100) and
  ROUGE-L F1 (rouge-score, the best reference per hypothesis, averaged, x100).

  `references[i]` holds all references of hypothesis i; their number may vary (sacrebleu
  takes missing ones as None). The E2E challenge scores BLEU this way (one output per MR,
  all its references); its ROUGE-L (pycocoevalcap, F with beta=1.2) differs slightly from
  rouge-score's F1."""
  import sacrebleu
  from rouge_score import rouge_scorer
  hyps = [str(h) for h in hypotheses]
  refs = [list(r) for r in references]
  if len(hyps) != len(refs):
    raise ValueError(f'{len(hyps)} hypotheses for {len(refs)} reference sets')
  if not hyps:
    return {name: float('nan') for name in GENERATION_METRICS}
  empty = [i for i, r in enumerate(refs) if not r]
  if empty:
    raise ValueError(f'hypothesis {empty[0]} has no reference ({len(empty)} such)')
  n = max(len(r) for r in refs)
  streams = [[r[j] if j < len(r) else None for r in refs] for j in range(n)]
  scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=False)
  rouge = [scorer.score_multi(r, h)['rougeL'].fmeasure for h, r in zip(hyps, refs)]
  return {'bleu': float(sacrebleu.corpus_bleu(hyps, streams).score),
          'chrf': float(sacrebleu.corpus_chrf(hyps, streams).score),
          'rouge_l': 100.0 * float(np.mean(rouge))}


def _scalar(v) -> float | None:
  """A python float for a numeric scalar (numpy/jax too), else None."""
  if isinstance(v, bool):
    return float(v)
  try:
    a = np.asarray(v)
  except Exception:  # pylint: disable=broad-except
    return None
  if a.size != 1 or not np.issubdtype(a.dtype, np.number):
    return None
  return float(a.reshape(()))


class MetricsWriter:
  """Appends `{"step": s, name: value, ...}` lines to workdir/metrics.jsonl and writes
  TensorBoard scalars to workdir/tb; a no-op unless enabled (process 0 only).

  Non-finite values are written as JSON null (strict JSON parsers reject NaN), also inside
  lists, and skipped in TensorBoard; non-scalar values are kept in JSON only when
  serialisable.
  A last line torn by a crash mid-write is cut off (with a warning) before appending, so a
  resumed run never writes onto it.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    self.workdir = Path(workdir)
    self.path = self.workdir / 'metrics.jsonl'
    self._file = None
    self._tb = None
    if enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      repair_torn_tail(self.path)
      self._file = open(self.path, 'a', encoding='utf-8')
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.workdir / 'tb'))

  def write(self, step: int, metrics: Mapping[str, Any]):
    """Writes one JSON line (flushed) and the scalar values to TensorBoard."""
    if not self.enabled:
      return
    step = int(step)
    record: dict[str, Any] = {'step': step}
    for k, v in metrics.items():
      x = _scalar(v)
      if x is not None:
        record[k] = x if math.isfinite(x) else None
        if self._tb is not None and math.isfinite(x):
          self._tb.add_scalar(k, x, step)
      else:
        try:
          safe = files.json_safe(v)
          json.dumps(safe, allow_nan=False)  # kept only when serialisable
          record[k] = safe
        except (TypeError, ValueError):
          pass
    self._file.write(json.dumps(record, allow_nan=False) + '\n')
    self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _torn_tail(path: Path) -> tuple[int, bytes]:
  """(offset, bytes) of the text after the last newline of `path` ((size, b'') if none)."""
  with open(path, 'rb') as f:
    end = f.seek(0, os.SEEK_END)
    pos, tail = end, b''
    while pos > 0:
      step = min(pos, 1 << 16)
      pos -= step
      f.seek(pos)
      tail = f.read(step) + tail
      cut = tail.rfind(b'\n')
      if cut >= 0:
        return pos + cut + 1, tail[cut + 1:]
    return 0, tail


def _is_record(text: bytes) -> bool:
  try:
    return isinstance(json.loads(text.decode('utf-8')), dict)
  except ValueError:
    return False


def repair_torn_tail(path: str | os.PathLike) -> None:
  """Make `path` end at a line boundary: a complete last record only lacking its newline
  gets one; a torn last line (a crash mid-write) is cut off, with a warning."""
  path = Path(path)
  if not path.exists():
    return
  offset, tail = _torn_tail(path)
  if not tail:
    return
  with open(path, 'r+b') as f:
    if _is_record(tail):
      f.seek(0, os.SEEK_END)
      f.write(b'\n')
      return
    f.truncate(offset)
  with open(path, 'rb') as f:
    line = f.read(offset).count(b'\n') + 1
  logging.warning('%s:%d: cut a torn last line (%d bytes, a crash mid-write?): %r', path, line,
                  len(tail), tail[:80])


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All records of workdir/metrics.jsonl (for tests, scripts and reports).

  A torn last line (a crash mid-write) is skipped with a warning; any other line that is
  not a JSON record raises ValueError naming file and line."""
  path = Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  with open(path, 'rb') as f:
    data = f.read()
  lines = data.split(b'\n')
  out = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line.decode('utf-8'))
    except ValueError as e:
      if lineno == len(lines):  # no newline after it: torn by a crash mid-write
        logging.warning('%s:%d: skipping a torn last line (a crash mid-write?): %r', path,
                        lineno, line[:80])
        continue
      raise ValueError(f'{path}:{lineno}: not a JSON record ({e})') from None
    out.append(rec)
  return out


def write_results(workdir: str | os.PathLike, results: Mapping[str, Any]) -> str:
  """workdir/results.json, written atomically by process 0: a stage's last output, so its
  presence says the stage finished (host values; numpy scalars and arrays converted, a
  non-finite number written as null: strict JSON), with the `environment` the numbers came
  from (`run_environment`)."""
  path = os.path.join(workdir, 'results.json')
  if jax.process_index() == 0:
    results = {**results, 'environment': run_environment()}
    files.atomic_write(path, files.json_text(results, indent=2), what='results')
  return path


def run_environment() -> dict:
  """What a run's numbers depend on besides its config and data, so two runs can be
  compared: the CPU kind (its matmul kernels) and the cores this process may use (XLA:CPU
  splits work by its thread count: a different count changes results in the last bits), the
  devices, XLA_FLAGS, and the versions of the numerical libraries. Installed optional
  packages (torch) do not change them (tests/test_same_numbers.py)."""
  cpu = ''
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f
                  if line.startswith('model name')), '')
  except OSError:
    pass
  devices = jax.devices()
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'numpy'):
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return {'cpu': cpu, 'cpus': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
          else os.cpu_count(),
          'devices': f'{len(devices)} x {devices[0].platform} ({devices[0].device_kind})',
          'processes': jax.process_count(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'versions': versions}

"""Stage `predict`: run a fine-tuned workdir on a file of texts (or a split) -> JSONL.

  python -m jaxft.main --config configs/predict.py --config.init_from=FINETUNE_WORKDIR \
      --config.predict.input=texts.txt --workdir out

Inputs: a split name of the trained config's data ('dev', 'test', 'train'), a .txt file
(one text per line; for NER one whitespace-tokenized sentence per line), or a file in the
trained task's format (TSV/CSV/JSONL with the same columns; CoNLL for NER, recognised by
its content whatever the file's name). Each output line holds the input, the predicted
label with class probabilities (classification) or tagged tokens and entities (NER), and the
gold label when the input has one; with gold labels the task's metrics (accuracy / F1 / MCC
/ correlations, entity F1) go to results.json: an eval-only run of any workdir. Inference
runs in predict.dtype (float32 by default, whatever the training used);
predict.quantize=int8 runs it with int8 dense kernels (jaxft.models.quantize). With
predict.explain each line also holds one attribution per input token (integrated gradients
or attention rollout, jaxft/objectives/explain.py), and predict.explain_html writes them as
a page of highlighted tokens (docs/explain.md). Without init_from the stage reads the
fine-tune in --workdir and runs in WORKDIR/predict/ (stages.run): the fine-tune's
results.json and config.json stay as they are.
"""
from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxft import config as config_lib
from jaxft import files, kinds, sources
from jaxft.data import loader as loader_lib
from jaxft.data.splits import DATA_DIR, MissingSplitError, normalize_split
from jaxft.export import int8_model
from jaxft.files import InputError, MissingInput, check_writable
from jaxft.models import build_model
from jaxft.models.config import ModelConfig
from jaxft.models.quantize import param_bytes
from jaxft.objectives import explain
from jaxft.objectives.outputs import outputs
from jaxft.partitioning import MeshSettings
from jaxft.train import loop
from jaxft.train.metrics import write_results
from jaxft.train.state import ModelDef

@dataclasses.dataclass(frozen=True)
class PredictSettings:
  """The `predict` config section."""
  input: str = 'dev'        # a split name of the trained data, or a file
  output: str = ''          # default WORKDIR/predictions.jsonl
  batch_size: int = 64
  checkpoint: str = 'best'  # best | latest
  dtype: str = 'float32'    # inference precision, whatever the training used (bfloat16: faster)
  explain: str = ''         # '' | integrated_gradients | attention_rollout (docs/explain.md)
  ig_steps: int = 64        # integrated gradients: points of the path (forward+backward each)
  ig_baseline: str = 'pad'  # pad (the pad-token embedding) | zeros, at non-special tokens
  explain_html: str = ''    # with explain: also write this HTML page of highlighted tokens
  quantize: str = ''        # 'int8': per-channel int8 dense kernels (docs/deploy.md)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """predict: the config's keys."""
  stage: str = 'predict'
  init_from: str = ''  # the fine-tuned workdir ('' = the one in --workdir)
  predict: PredictSettings
  mesh: MeshSettings

  def __post_init__(self):
    p = self.predict
    if p.checkpoint not in ('best', 'latest'):
      raise config_lib.ConfigError(f"predict.checkpoint={p.checkpoint!r}; allowed: 'best', "
                                   "'latest'")
    if p.dtype not in ('float32', 'bfloat16'):
      raise config_lib.ConfigError(f"predict.dtype={p.dtype!r}; allowed: 'float32', "
                                   "'bfloat16'")
    _check_explain(p)
    if p.quantize not in ('', 'int8'):
      raise config_lib.ConfigError(f"predict.quantize={p.quantize!r}; allowed: '', 'int8'")
    if p.quantize and p.dtype != 'float32':
      raise config_lib.ConfigError('predict.quantize=int8 runs with predict.dtype=float32 '
                                   f'(int8 dots, fp32 scales), not {p.dtype}')


def _check_explain(p: PredictSettings) -> None:
  if p.explain not in ('',) + explain.METHODS:
    raise config_lib.ConfigError(f'predict.explain={p.explain!r}; allowed: \'\', '
                                 + ', '.join(repr(m) for m in explain.METHODS))
  if p.ig_steps < 2:
    raise config_lib.ConfigError(f'predict.ig_steps={p.ig_steps} must be >= 2')
  if p.ig_baseline not in explain.BASELINES:
    raise config_lib.ConfigError(f'predict.ig_baseline={p.ig_baseline!r}; allowed: '
                                 + ', '.join(repr(b) for b in explain.BASELINES))
  if p.explain and p.quantize:  # rounding has no gradient: IG would explain nothing
    raise config_lib.ConfigError(f'predict.explain={p.explain!r} with predict.quantize='
                                 f'{p.quantize!r}: explain the float32 model (quantize=\'\')')
  if p.explain_html and not p.explain:
    raise config_lib.ConfigError('predict.explain_html is set but predict.explain is empty: '
                                 'set predict.explain=integrated_gradients|attention_rollout')


def _trained(path: str) -> sources.Source:
  src = sources.resolve(path)
  if src.task is None:
    raise FileNotFoundError(f'{path} is not a fine-tuned jaxft workdir (no labels.json); '
                            'set init_from to a finetune_cls / finetune_ner / finetune_qa '
                            'workdir')
  return src


def load_inputs(spec: str, kind: kinds.Kind, data, tokenizer, task: sources.TaskInfo,
                settings_from: str = ''):
  """(arrays, examples-info) for a split name or a file. A split name reads the file the
  data settings name for it; from `settings_from` (a stored config.json) only a data file
  under its data.path (`_check_split_file`)."""
  data = kind.prediction_data(data, task)
  is_file = os.path.isfile(spec)
  if is_file and kind.reads_lines(spec):
    arrays, info = kind.line_inputs(spec, data, tokenizer, task)
  else:
    arrays, info = _file_or_split_inputs(spec, is_file, kind, data, tokenizer, settings_from)
  if not len(arrays['input_ids']):  # a wrong path or a failed export, not an empty answer
    what = spec if is_file else f'the split {spec!r} of the trained data'
    raise config_lib.ConfigError(f'predict.input={spec!r}: {what} has no rows to predict')
  return arrays, info


def _file_or_split_inputs(spec: str, is_file: bool, kind: kinds.Kind, data, tokenizer,
                          settings_from: str):
  split = spec
  if is_file:  # a file in the trained format (CoNLL for NER, whatever its name)
    data, split = dataclasses.replace(data, test_file=os.path.abspath(spec)), 'test'
  elif not re.fullmatch(r'\w+', spec):  # a path, not a split name
    raise MissingInput(f'predict.input={spec!r}: no such file')
  try:
    if not is_file and data.source == 'files':
      _check_split_file(spec, kind, data, settings_from)
    return kind.inputs(data, tokenizer, split)
  except MissingSplitError as e:
    raise MissingInput(f'predict.input={spec!r}: neither a file nor a split the training '
                       f'data has ({e}). Set predict.input to a split the training data has '
                       '(dev, train, ...) or to a file') from None


def _check_split_file(split: str, kind: kinds.Kind, data, settings_from: str) -> None:
  """Log the file `split` resolves to. A split name from a stored config.json (not this
  command's) must name a data file, under that config's `data.path` when it has one (or
  jaxft's bundled data/): an edited config.json must not make predict copy another file
  (`data.path=/etc`, `test_file=passwd`) into predictions.jsonl. Any file named on the
  command line is read."""
  path = kind.split_path(data, normalize_split(split))
  logging.info('predict.input=%r: the %s split of %s is %s', split, split,
               settings_from or 'the data settings', path)
  if not settings_from:
    return
  real = os.path.realpath(path)
  inside = not data.path or any(  # split files named whole (no data.path) are checked by kind
      real.startswith(os.path.realpath(os.path.expanduser(str(r))) + os.sep)
      for r in (data.path, DATA_DIR))
  if not (inside and kind.is_data_file(real)):
    why = (f'outside data.path={data.path!r}' if not inside else
           f'not a data file ({kind.split_files})')
    raise InputError(f'predict.input={split!r} resolves to {path} (data.path / '
                     f'data.{normalize_split(split)}_file in {settings_from}), {why}: a '
                     f'workdir\'s config.json is not trusted to name any file to read. To read '
                     f'it, give the file itself: --config.predict.input={path}')


def run(s: Settings, workdir: str) -> dict:
  src = _trained(s.init_from or workdir)
  task = src.task
  kind = kinds.of(task.kind)
  tokenizer = src.tokenizer()
  # The input and the output are checked before the model is loaded and anything runs.
  arrays, ex = load_inputs(s.predict.input, kind, kind.trained_data(src), tokenizer, task,
                           settings_from=src.config_file)
  out_path = s.predict.output or os.path.join(workdir, 'predictions.jsonl')
  check_writable(out_path, 'predict.output')
  if s.predict.explain_html:
    check_writable(s.predict.explain_html, 'predict.explain_html')
  dtype = s.predict.dtype  # inference precision: fp32 unless asked, whatever trained
  mcfg = ModelConfig.from_config_dict(task.model).replace(dtype=dtype, param_dtype=dtype)
  base_def = ModelDef.create(lambda: build_model(mcfg, kind.head,
                                                     num_labels=kind.num_labels(task)))
  model_def, params = src.trained_model(base_def, which=s.predict.checkpoint)
  if s.predict.quantize == 'int8':
    model_def, params = int8_model(model_def, params)
  scores = _scores(model_def, params, arrays, kind.probabilities(task), s)
  attributions = (_explain(model_def, params, kind.explained_rows(arrays, ex, scores), kind,
                           mcfg.model_type, tokenizer, s) if s.predict.explain else None)
  if loop.is_main():
    records = kind.records(ex, scores, arrays, task)
    for rec, attr in zip(records, attributions or ()):
      rec['attributions'] = attr
    with files.atomic_open(out_path, 'predictions') as f:  # replaced whole, never in place
      for rec in records:
        f.write(files.json_text(rec) + '\n')
    logging.info('wrote %d predictions to %s', len(records), out_path)
    if s.predict.explain_html:
      files.atomic_write(s.predict.explain_html,
                         explain.html_page(records, f'{s.predict.explain}: {src.path}'),
                         'explain_html')
      logging.info('wrote %s', s.predict.explain_html)
  has_gold = ex.get('gold') is not None and len(scores)
  metrics = kind.metrics(scores, arrays, ex, task) if has_gold else {}
  result = {'n': len(arrays['input_ids']), 'output': out_path, 'input': s.predict.input,
            'quantize': s.predict.quantize, 'param_bytes': param_bytes(params), **metrics}
  if loop.is_main() and metrics:
    print(f'predict on {s.predict.input}: ' + ', '.join(f'{k}={v:.4f}' for k, v in
                                                         metrics.items()))
  write_results(workdir, result)
  return result


def _scores(model_def, params, arrays, softmax: bool, s: Settings) -> np.ndarray:
  """Per-example class probabilities (scores for regression / NER logits), in order."""
  transform = (lambda x: jax.nn.softmax(x.astype(jnp.float32), -1)) if softmax else None
  inputs = {k: v for k, v in arrays.items() if k in ('input_ids', 'attention_mask',
                                                      'token_type_ids')}
  return _evaluate(model_def, params, inputs, outputs('logits', transform), 1, s)['logits']


def _evaluate(model_def, params, arrays, objective, rows_per_example: int, s: Settings,
              desc: str = '') -> dict:
  """An eval objective's per-example outputs in input order; a batch holds about
  predict.batch_size model rows (`rows_per_example` each), a multiple of the data-parallel
  size. With `desc`, a progress bar (rate, ETA)."""
  model = loop.place(s.mesh, model_def, params)
  dp = model.data_parallel_size
  bs = max(s.predict.batch_size // rows_per_example // dp, 1) * dp
  batches = loader_lib.eval_batches(arrays, bs)()
  if desc:
    batches = tqdm(batches, desc=desc, unit='batch', total=-(-len(arrays['input_ids']) // bs),
                   disable=not loop.is_main(), dynamic_ncols=True)
  return model.evaluate(objective, batches, lambda sums, per: loader_lib.ordered(per))


def _explain(model_def, params, arrays, kind, model_type, tokenizer, s: Settings):
  """Per example, [{'token', 'score'}] by predict.explain (jaxft/objectives/explain.py)."""
  p = s.predict
  objective = explain.explainer(p.explain, kind=kind.name,
                                query=explain.query_for(kind.name, model_type),
                                steps=p.ig_steps, baseline=p.ig_baseline,
                                pad_id=tokenizer.pad_token_id)
  ig = p.explain == 'integrated_gradients'
  batch_arrays = explain.explain_arrays(arrays, explain.special_ids(tokenizer))
  out = _evaluate(model_def, params, batch_arrays, objective, p.ig_steps if ig else 1, s,
                  desc=p.explain)
  if ig and loop.is_main():
    explain.log_completeness(out, p.ig_steps)
  tokens = [tokenizer.convert_ids_to_tokens(row) for row in arrays['input_ids'].tolist()]
  return explain.token_attributions(tokens, arrays['attention_mask'], out['attributions'])

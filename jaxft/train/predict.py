"""Stage `predict`: run a fine-tuned workdir on a file of texts (or a split) -> JSONL.

  python -m jaxft.main --config configs/predict.py --config.init_from=FINETUNE_WORKDIR \
      --config.predict.input=texts.txt --workdir out

Inputs: a split name of the trained config's data ('dev', 'test', 'train'), a .txt file
(one text per line; for NER one whitespace-tokenized sentence per line), or a file in the
trained task's format (TSV/CSV/JSONL with the same columns; CoNLL for NER). Each output
line holds the input, the predicted label with class probabilities (classification) or
tagged tokens and entities (NER), and the gold label when the input has one.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxft import partitioning, peft
from jaxft.data import classification
from jaxft.data import ner
from jaxft.data.tokenizer import load_tokenizer
from jaxft.models import build_model
from jaxft.models.config import ModelConfig
from jaxft.train import finetune
from jaxft.train import init as init_lib
from jaxft.data import loader as loader_lib
from jaxft.train.state import ModelDef, to_host
from jaxft.train.step import global_batch


def _trained(src: str):
  path = os.path.join(src, 'labels.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{src} is not a fine-tuned jaxft workdir (no labels.json); '
                            'set init_from to a finetune_cls / finetune_ner workdir')
  with open(path) as f:
    return json.load(f)


def _read_txt(path: str):
  with open(path, encoding='utf-8') as f:
    lines = [(i + 1, ln.rstrip('\n')) for i, ln in enumerate(f)]
  return [(f'{path}:{i}', t) for i, t in lines if t.strip()]


def load_inputs(spec: str, kind: str, data_cfg: dict, tokenizer, labels: dict):
  """(arrays, examples-info) for a split name or a file."""
  data_cfg = dict(data_cfg)
  data_cfg['class_balance'] = 'none'  # every row once, in file order (resampling would
  # reorder the rows under their sources)
  max_len = int(data_cfg.get('max_len') or 128)
  label_key = 'label_values' if kind == 'cls' else 'label_names'
  data_cfg['labels'] = None if labels.get('is_regression') else labels[label_key]
  if spec.endswith('.txt') and os.path.isfile(spec):
    rows = _read_txt(spec)
    if kind == 'cls':
      ex = classification.ClsExamples([t for _, t in rows], None, None, [s for s, _ in rows])
      arrays, st = classification.encode_cls(ex, tokenizer, max_len=max_len,
                                        truncation=data_cfg.get('truncation') or 'truncate',
                                        is_regression=bool(labels.get('is_regression')))
      keep = st['keep']
      return arrays, {'texts': [ex.texts[i] for i in keep], 'pairs': None, 'gold': None,
                      'sources': [ex.sources[i] for i in keep]}
    ex = ner.NerExamples([t.split() for _, t in rows], None, [s for s, _ in rows])
    arrays, st = ner.encode_ner(ex, tokenizer, labels['label_names'], max_len=max_len,
                                      truncation=data_cfg.get('truncation') or 'truncate')
    keep = st['keep']
    words = [ex.words[i] for i in keep]
    return arrays, {'words': words, 'num_words': [len(w) for w in words], 'gold': None,
                    'sources': [ex.sources[i] for i in keep]}
  if os.path.isfile(spec):
    data_cfg['test_file'] = os.path.abspath(spec)
    split = 'test'
  else:
    split = spec
  loader = classification.load_cls_split if kind == 'cls' else ner.load_ner_split
  arrays, info = loader(data_cfg, tokenizer, split)
  if kind == 'cls':
    return arrays, {'texts': info['texts'], 'pairs': info['pairs'], 'gold': arrays.get('labels'),
                    'sources': info['sources']}
  return arrays, {'words': info['words'], 'num_words': info['num_words'], 'gold': info['tags'],
                  'sources': info['sources']}


def entities(words, tags):
  """[(type, start, end_exclusive, text)] spans of IOB2 tags."""
  out, cur = [], None
  for i, t in enumerate(list(tags) + ['O']):
    if cur is not None and (t == 'O' or t.startswith('B-') or t[2:] != cur[0]):
      out.append({'type': cur[0], 'start': cur[1], 'end': i,
                  'text': ' '.join(words[cur[1]:i])})
      cur = None
    if t.startswith('B-') or (t.startswith('I-') and cur is None):
      cur = (t[2:], i)
  return out


def run(cfg, workdir: str) -> dict:
  src = cfg.init_from or workdir
  labels = _trained(src)
  kind = labels['kind']
  trained_cfg = init_lib.workdir_config(src)
  tokenizer = load_tokenizer(os.path.join(src, 'tokenizer'))
  mcfg = ModelConfig.from_config_dict(labels['model'])
  head = 'cls' if kind == 'cls' else 'token_cls'
  num_labels = 1 if labels.get('is_regression') else len(labels['label_names'])
  model_def = ModelDef.create(lambda: build_model(mcfg, head, num_labels=num_labels))
  model_def, params = peft.load_trained(trained_cfg, model_def, init_lib.read_workdir_params(
      src, cfg.predict.get('checkpoint', 'best')), where=src)
  data_cfg = {k: (None if isinstance(v, str) and not v else v)
              for k, v in trained_cfg.get('data', {}).items()}
  arrays, ex = load_inputs(cfg.predict.input, kind, data_cfg, tokenizer, labels)
  n = len(arrays['input_ids'])
  bs = int(cfg.predict.get('batch_size', 64))
  mesh = partitioning.make_mesh(cfg.mesh)
  rules = partitioning.rules_from_config(cfg.mesh.get('rules', None))
  bs = max(bs // partitioning.data_parallel_size(mesh, rules), 1) * \
      partitioning.data_parallel_size(mesh, rules)
  params = jax.device_put(params, model_def.param_shardings(mesh, rules))
  padded = finetune.with_index({k: v for k, v in arrays.items()
                                if k in ('input_ids', 'attention_mask', 'token_type_ids')}, bs)

  @jax.jit
  def forward(params, batch):
    model = model_def.merge(params)
    logits = model(batch['input_ids'], batch['attention_mask'],
                   batch.get('token_type_ids'))['logits']
    if kind == 'cls' and num_labels > 1:
      logits = jax.nn.softmax(logits.astype(jnp.float32), -1)
    return {'scores': logits, 'index': batch['index'], 'valid': batch['valid']}

  per: dict[str, list] = {}
  main = jax.process_index() == 0
  for local in tqdm(loader_lib.make_loader(padded, global_batch_size=bs, seed=0, shuffle=False,
                                           num_epochs=1, drop_remainder=True),
                    total=len(padded['input_ids']) // bs, desc='predict', disable=not main):
    with partitioning.use_mesh(mesh, rules):
      out = to_host(forward(params, global_batch(local, mesh, rules)))
    for k, v in out.items():
      per.setdefault(k, []).append(v)
  scores = finetune.ordered({k: np.concatenate(v) for k, v in per.items()})['scores']
  out_path = cfg.predict.get('output', '') or os.path.join(workdir, 'predictions.jsonl')
  names = labels['label_names']
  n_correct = 0
  if main:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, 'w') as f:
      if kind == 'cls':
        for i in range(n):
          rec = {'source': ex['sources'][i]}
          if ex.get('texts'):
            rec['text'] = ex['texts'][i]
          if ex.get('pairs'):
            rec['text_pair'] = ex['pairs'][i]
          if labels.get('is_regression'):
            rec['score'] = float(scores[i][0])
          else:
            k = int(np.argmax(scores[i]))
            rec['label'] = names[k]
            rec['probs'] = {names[j]: float(scores[i][j]) for j in range(num_labels)}
            if ex['gold'] is not None:
              rec['gold'] = names[int(ex['gold'][i])]
              n_correct += rec['gold'] == rec['label']
          f.write(json.dumps(rec) + '\n')
      else:
        tags = ner.predictions_to_tags(scores.argmax(-1), arrays['word_ids'], names,
                                             ex['num_words'])
        for i in range(n):
          rec = {'source': ex['sources'][i], 'tokens': ex['words'][i], 'tags': tags[i],
                 'entities': entities(ex['words'][i], tags[i])}
          if ex['gold'] is not None:
            rec['gold'] = ex['gold'][i]
          f.write(json.dumps(rec) + '\n')
    logging.info('wrote %d predictions to %s', n, out_path)
  result = {'n': n, 'output': out_path}
  if kind == 'cls' and ex.get('gold') is not None and not labels.get('is_regression') and n:
    result['accuracy'] = n_correct / n
  return result

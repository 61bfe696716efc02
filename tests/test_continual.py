"""Continual learning (`continual.*` of finetune_cls): one tiny SST-2 fine-tune is the
earlier task (module fixture); the new task is a 3-class custom task on other SST-2 rows."""
import csv
import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import config as config_lib
from jaxft import continual, kinds, sources, stages
from jaxft.finetuning import load_split
from jaxft.main import run_stage
from jaxft.stages import finetune
from jaxft.stages.predict import PredictSettings
from jaxft.trees import flat_params

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / 'data/glue/sst2'
TINY = dict(type='bert', hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
            max_position_embeddings=32)
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)


def _rows(split: str, start: int, n: int):
  with open(SST2 / f'{split}.tsv', encoding='utf-8', newline='') as f:
    return list(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE))[1:][start:start + n]


def _write(path: Path, rows) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    f.write('sentence\tlabel\n' + ''.join(f'{t}\t{y}\n' for t, y in rows))
  return str(path)


def _length_class(text: str) -> str:
  n = len(text.split())
  return 'short' if n < 8 else 'mid' if n < 16 else 'long'


def _config(tmp: Path, task: str, **train):
  c = _load_cls_config()
  c.model.update(**TINY, **NO_DROPOUT)
  c.data.update(max_len=32, tokenizer=str(REPO / 'data/tokenizers/bert-base-uncased'))
  if task == 'sst2':
    c.data.update(path='', train_file=_write(tmp / 'sst2_train.tsv', _rows('train', 0, 64)),
                  dev_file=_write(tmp / 'sst2_dev.tsv', _rows('dev', 0, 32)),
                  test_file='none.tsv')
  else:  # the new task: sentence length in 3 classes, on other rows
    c.data.update(task='', path='', text_column='sentence', label_column='label',
                  train_file=_write(tmp / 'len_train.tsv', [
                      (t, _length_class(t)) for t, _ in _rows('train', 64, 64)]),
                  dev_file=_write(tmp / 'len_dev.tsv', [
                      (t, _length_class(t)) for t, _ in _rows('dev', 32, 32)]),
                  test_file='none.tsv')
  c.optimizer.update(lr=3e-3, warmup_ratio=0.0, schedule='constant', weight_decay=0.0)
  c.train.update(**{'num_epochs': 0, 'num_steps': 8, 'batch_size': 8, 'eval_every': 0,
                    'log_every': 1, **train})
  c.checkpoint.update(async_save=False)
  c.export.hf = False
  return c


def _load_cls_config():
  spec = importlib.util.spec_from_file_location('_cfg_finetune_cls',
                                                REPO / 'configs/finetune_cls.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config('sst2')


@pytest.fixture(scope='module')
def tmp(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp('continual')


@pytest.fixture(scope='module')
def previous(tmp) -> str:
  """The earlier task: 12 steps of SST-2 from a random tiny BERT."""
  wd = str(tmp / 'sst2')
  run_stage(_config(tmp, 'sst2', num_steps=12), wd)
  return wd


def _second(tmp, previous, name: str, method: str, **over):
  c = _config(tmp, 'len')
  c.data.tokenizer = ''
  c.continual.update(previous=previous, method=method, **over)
  wd = str(tmp / name)
  settings = stages.validate(c)
  config_lib.save_config(c, wd)
  return wd, finetune.finetune(settings, wd)


def _encoder(params) -> dict:
  return {k: np.asarray(jax.device_get(v), np.float64) for k, v in flat_params(params).items()
          if k.startswith('bert.')}


def _distance(a: dict, b: dict) -> float:
  return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in b)))


def test_l2sp_keeps_the_encoder_near_the_previous_weights(tmp, previous):
  prev = _encoder(sources.read_workdir_params(previous))
  _, plain = _second(tmp, previous, 'plain', 'none')
  _, l2sp = _second(tmp, previous, 'l2sp', 'l2sp', l2sp_weight=1e4)
  moved = _distance(_encoder(plain.state['params']), prev)
  kept = _distance(_encoder(l2sp.state['params']), prev)
  # plain: 8 Adam steps of lr 3e-3 move the encoder by 1.70 (measured); the anchor holds it
  # within about one Adam step's size of the previous weights (0.19 measured)
  assert moved > 0.3, moved
  assert kept < 0.25 * moved, (kept, moved)
  # the new head is fresh (3 classes), the previous head is the previous classifier, frozen
  prev_head = sources.read_workdir_params(previous)['classifier.kernel']
  np.testing.assert_array_equal(np.asarray(plain.state['params']['previous_head']['kernel']),
                                prev_head)
  assert plain.state['params']['classifier']['kernel'].shape == (32, 3)
  # its earlier-task dev metrics are recorded
  assert 0.0 <= plain.results['continual']['previous_task_dev']['accuracy'] <= 1.0


def test_l2sp_penalty_is_the_hand_computed_sum(tmp, previous):
  rng = np.random.default_rng(0)
  prev_params = sources.read_workdir_params(previous)
  mine = {k: v + rng.normal(0, 0.01, v.shape).astype(v.dtype) for k, v in prev_params.items()}
  mine['classifier.kernel'] = np.zeros((32, 3), np.float32)  # a new head: not penalised
  mine['previous_head.kernel'] = mine['classifier.bias'] = np.ones((3,), np.float32)
  want = sum(np.sum((mine[k].astype(np.float64) - prev_params[k]) ** 2)
             for k in prev_params if not k.startswith('classifier.'))
  got = float(continual.l2sp_penalty(_nest(mine), _nest(prev_params)))
  # fp32 sums of ~1e6 squares of ~1e-4: relative rounding well under 1e-5
  assert got == pytest.approx(want, rel=1e-5), (got, want)
  assert want > 0


def _nest(flat: dict) -> dict:
  out: dict = {}
  for k, v in flat.items():
    d = out
    *parents, leaf = k.split('.')
    for p in parents:
      d = d.setdefault(p, {})
    d[leaf] = jnp.asarray(v)
  return out


def test_lwf_weight_zero_is_plain_fine_tuning(tmp, previous):
  """Loss and gradients of LwF with weight 0 are plain fine-tuning's on the same params,
  batch and dropout key; weight 1 adds the distillation term (the check can fail)."""
  cfg = _config(tmp, 'len')
  cfg.data.tokenizer = ''
  cfg.model.update(hidden_dropout=0.1, classifier_dropout=0.1)
  cfg.continual.update(previous=previous, method='lwf')
  s = stages.validate(cfg)
  tok = sources.resolve(previous).tokenizer()
  mcfg = sources.resolve(previous).model_config().with_runtime_of(s.model)
  prev = continual.load_previous(s.continual, mcfg, 32)
  mdef = continual.model_def(mcfg, 3, prev, 0)
  params, _ = continual.init_params(prev, mdef)
  arrays, _ = load_split(kinds.CLS, s.data, tok, 'train')
  batch = {k: jnp.asarray(v[:8]) for k, v in arrays.items() if k != 'word_ids'}
  key = jax.random.PRNGKey(3)

  def value_and_grad(c, **kw):
    obj = continual.objective(c, prev, 3, False)
    def f(p):
      return obj.loss(mdef.merge(p), batch, key, False, **kw)[0]
    return jax.jit(jax.value_and_grad(f))(params)

  plain = value_and_grad(continual.ContinualSettings(previous=previous, method='none'))
  zero = value_and_grad(continual.ContinualSettings(previous=previous, method='lwf',
                                                    lwf_weight=0.0), constants=prev.params)
  one = value_and_grad(continual.ContinualSettings(previous=previous, method='lwf',
                                                   lwf_weight=1.0), constants=prev.params)
  # Same forward ops: the loss is bit-equal; gradients add exact zeros on the previous-head
  # path, compared relative to each tensor's largest element with fp32 rounding headroom
  assert float(zero[0]) == float(plain[0])
  # weight 1: the KL of the previous head (with dropout) to the previous model adds a
  # positive term and trains the previous head; weight 0 leaves that head's gradient zero
  assert float(one[0]) > float(plain[0])
  assert float(jnp.abs(one[1]['previous_head']['kernel']).max()) > 0
  assert float(jnp.abs(zero[1]['previous_head']['kernel']).max()) == 0
  for name, g in flat_params(plain[1]).items():
    z = flat_params(zero[1])[name]
    scale = float(jnp.max(jnp.abs(g))) + 1e-30
    assert float(jnp.max(jnp.abs(z - g))) <= 64 * np.finfo(np.float32).eps * scale, name


def test_replay_batches_hold_the_configured_share():
  new = {'input_ids': np.arange(40, dtype=np.int32)[:, None] + 1000,
         'attention_mask': np.ones((40, 1), np.int32), 'labels': np.arange(40) % 3}
  old = {'input_ids': np.arange(30, dtype=np.int32)[:, None],
         'attention_mask': np.ones((30, 1), np.int32), 'labels': np.arange(30) % 2}
  stream = continual.ReplayStream(new, old, batch_size=10, fraction=0.3, seed=0)
  seen_old = set()
  for _ in range(12):
    b = next(stream)
    assert b['input_ids'].shape == (10, 1)
    is_old = b['task'] == 1
    assert is_old.sum() == 3
    ids = b['input_ids'][:, 0]
    assert (ids[is_old] < 1000).all() and (ids[~is_old] >= 1000).all()
    # each row carries its own task's label; the other task's is a dummy at weight 0
    np.testing.assert_array_equal(b['previous_labels'][is_old], ids[is_old] % 2)
    np.testing.assert_array_equal(b['labels'][~is_old], (ids[~is_old] - 1000) % 3)
    seen_old.update(ids[is_old].tolist())
  assert len(seen_old) == 30  # 36 draws over 30 rows: a shuffled pass, then the next


def test_replay_run_and_the_previous_task_workdir(tmp, previous):
  wd, out = _second(tmp, previous, 'replay', 'replay', replay_fraction=0.25)
  rec = out.results['continual']
  assert rec['method'] == 'replay'
  lines = [l for l in open(os.path.join(wd, 'metrics.jsonl')) if 'train/replay_loss' in l]
  assert len(lines) == 8
  # predict scores the earlier task from workdir/previous_task: the same dev metrics
  pt = rec['previous_task_workdir']
  c = config_lib.run_config('predict')
  c.init_from = pt
  c.predict = config_lib.as_section(PredictSettings(input='dev'))
  got = run_stage(c, str(tmp / 'predict_previous'))
  assert got['accuracy'] == pytest.approx(rec['previous_task_dev']['accuracy'], abs=1e-9)
  # and the workdir itself (whose checkpoint also holds previous_head) predicts its own task
  c.init_from = wd
  mine = run_stage(c, str(tmp / 'predict_new'))
  assert mine['accuracy'] == pytest.approx(out.results['final']['eval/accuracy'], abs=1e-9)


@pytest.mark.parametrize('over,key', [
    (dict(method='rehearsal'), 'continual.method'),
    (dict(method=''), 'continual.method'),
    (dict(replay_fraction=1.5), 'continual.replay_fraction'),
])
def test_bad_settings_name_the_key(tmp, previous, over, key):
  c = _config(tmp, 'len')
  c.continual.update(previous=previous, method='replay')
  c.continual.update(**over)
  with pytest.raises(config_lib.ConfigError, match=key.replace('.', r'\.')):
    stages.validate(c)


def test_previous_must_be_a_finetune_cls_workdir_with_its_tokenizer(tmp, previous):
  c = _config(tmp, 'len')
  c.continual.update(previous=str(tmp), method='l2sp')
  with pytest.raises(config_lib.ConfigError, match=r'continual\.previous=.*not a jaxft workdir'):
    stages.validate(c)
  fake = tmp / 'pretrain'
  (fake / 'checkpoints').mkdir(parents=True)
  (fake / 'config.json').write_text('{"stage": "pretrain_mlm"}')
  c.continual.previous = str(fake)
  with pytest.raises(config_lib.ConfigError,
                     match=r'continual\.previous=.*not a finetune_cls workdir'):
    stages.validate(c)
  c.continual.previous = previous
  c.data.tokenizer = str(REPO / 'data/tokenizers/gpt2')
  with pytest.raises(config_lib.ConfigError, match=r'data\.tokenizer=.*different tokenizer'):
    stages.validate(c)
  c.data.tokenizer = ''
  c.init_from = str(tmp)
  with pytest.raises(config_lib.ConfigError, match=r'init_from=.*differ'):
    stages.validate(c)

"""Fine-tuning stages (finetune_cls / finetune_ner) end to end, in process.

One tiny MLM-pretrained workdir (hidden 32, 2 layers, quickstart WordPiece vocabulary,
4 steps) is made once and every fine-tune starts from it through `init_from`, so the
stages run exactly as from the command line (`jaxft.main.run_stage` with configs from
`configs/*.get_config` plus overrides). Runs that do not need training stub out
`loop.train` and so never compile. The cached helpers (`pretrained_workdir`,
`sst2_workdir`, `ner_workdir`) are shared with tests/test_predict.py.
"""
from __future__ import annotations

import atexit
import csv
import functools
import importlib.util
import json
import logging as py_logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxft import config as config_lib
from jaxft import sources as init_lib
from jaxft import stages
from jaxft.main import run_stage
from jaxft.models import ModelConfig, build_model, flat_params
from jaxft.objectives import classification as objectives
from jaxft.stages import finetune
from jaxft.train import loop
from jaxft.train import optimizer as optim
from jaxft.train import step as step_lib
from jaxft.train.optimizer import FreezeSettings, OptimizerSettings
from jaxft.train.state import ModelDef

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / 'data/glue/sst2'
CONLL_TINY = REPO / 'tests/fixtures/conll_tiny.txt'
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
            max_position_embeddings=64)
MAJORITY = 444 / 872  # SST-2 dev: 444 positive of 872


# ------------------------------------------------------------------------------ helpers

def load_config_module(name: str):
  spec = importlib.util.spec_from_file_location(f'_jaxft_configs_{name}',
                                                REPO / 'configs' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@functools.cache
def tmp_root() -> str:
  """One temporary folder for the cached workdirs, removed at exit."""
  d = tempfile.mkdtemp(prefix='jaxft-test-finetune-')
  atexit.register(shutil.rmtree, d, True)
  return d


@functools.cache
def pretrained_workdir() -> str:
  """A tiny BERT after 4 MLM steps (its checkpoint, config and tokenizer are what matter)."""
  c = load_config_module('quickstart').pretrain_config(smoke=True)
  c.model.update(**TINY)
  c.data.update(max_len=64, eval_max_rows=32)
  c.data.files = str(REPO / 'data/corpus/blake-poems.txt')
  c.train.update(num_steps=4, eval_every=0, log_every=2, batch_size=16)
  c.checkpoint.update(every=0, async_save=False)
  c.export.hf = False
  wd = os.path.join(tmp_root(), 'pretrain')
  run_stage(c, wd)
  assert init_lib.is_jaxft_workdir(wd), wd
  return wd


def cls_config(**train) -> ml_collections.ConfigDict:
  """configs/finetune_cls.py:sst2 from the tiny pretrained workdir, seq 64, batch 16."""
  c = load_config_module('finetune_cls').get_config('sst2')
  c.init_from = pretrained_workdir()
  c.data.max_len = 64
  c.train.update(**{'num_epochs': 0, 'batch_size': 16, 'log_every': 10, **train})
  c.checkpoint.async_save = False
  c.export.hf = False
  return c


def ner_config(train_file: str, dev_file: str, **train) -> ml_collections.ConfigDict:
  c = load_config_module('finetune_ner').get_config()
  c.init_from = pretrained_workdir()
  c.data.update(path='', train_file=train_file, dev_file=dev_file, test_file='missing.txt',
                max_len=64)
  c.train.update(**{'num_epochs': 0, 'batch_size': 8, 'log_every': 10, **train})
  c.checkpoint.async_save = False
  c.export.hf = False
  return c


def write_tsv(path: Path, rows, header=('sentence', 'label')) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\t'.join(header) + '\n')
    for r in rows:
      f.write('\t'.join(r) + '\n')
  return path


def read_tsv(path: Path):
  with open(path, encoding='utf-8', newline='') as f:
    return list(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE))[1:]


def small_dev(n: int = 32) -> str:
  """The first n rows of the SST-2 dev slice (cheap evals where the metric is scripted)."""
  path = Path(tmp_root()) / f'sst2_dev_{n}.tsv'
  if not path.exists():
    write_tsv(path, read_tsv(SST2 / 'dev.tsv')[:n])
  return str(path)


@functools.cache
def sst2_workdir():
  """(workdir, results + the final 'state') of a real fine-tune on the bundled SST-2 slice:
  200 steps of batch 32 at lr 2e-3 (no dropout) from the tiny pretrained model, seq 64; dev
  eval at the end."""
  c = cls_config(num_steps=200, eval_every=0, batch_size=32, log_every=50)
  c.optimizer.update(lr=2e-3, warmup_ratio=0.1)
  c.model.update(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
  wd = os.path.join(tmp_root(), 'sst2')
  out = finetune_outcome(c, wd)
  return wd, {**out.results, 'state': out.state}


def conll_repeated(times: int = 16) -> str:
  """tests/fixtures/conll_tiny.txt repeated: 5 * 16 = 80 sentences, i.e. 10 steps of a
  global batch of 8 (one row per simulated device) per epoch, and an eval at each epoch end."""
  path = Path(tmp_root()) / f'conll_tiny_x{times}.txt'
  if not path.exists():
    text = CONLL_TINY.read_text(encoding='utf-8').rstrip('\n') + '\n\n'
    path.write_text(text * times, encoding='utf-8')
  return str(path)


@functools.cache
def ner_workdir():
  """(workdir, results + the final 'state'): the fixture's 5 sentences as train (repeated)
  and as dev."""
  c = ner_config(conll_repeated(), str(CONLL_TINY), num_steps=30, eval_every=10)
  c.optimizer.update(lr=5e-3, warmup_ratio=0.0)
  c.model.update(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
  wd = os.path.join(tmp_root(), 'ner')
  out = finetune_outcome(c, wd)
  return wd, {**out.results, 'state': out.state}


def host_flat(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(jax.device_get(v)) for k, v in flat_params(params).items()}


def finetune_outcome(cfg, workdir: str) -> loop.Outcome:
  """run_stage's fine-tune, keeping the train state it ends with (results hold host values)."""
  settings = stages.validate(cfg)
  config_lib.save_config(cfg, workdir)
  return finetune.finetune(settings, workdir)


def stub_train(monkeypatch, calls: list):
  """Replace the loop (and the step builder) so a stage stops before compiling anything."""
  pretrained_workdir()  # made (for real) first

  def fake_train(settings, workdir, start, objective, data, **kw):
    calls.append({'settings': settings, 'data': data, 'start': start, **kw})
    return loop.Outcome({'final': {}, 'preempted': False, 'best': {}, 'history': []},
                        {'params': None})

  def no_compile(*a, **k):
    raise AssertionError('a train step was built')

  monkeypatch.setattr(loop, 'train', fake_train)
  monkeypatch.setattr(step_lib, 'make_train_step', no_compile)


# -------------------------------------------------------------------- early stopping

def test_early_stopping_scripted_max():
  es = loop.EarlyStopping(metric='accuracy', mode='max', patience=2)
  seq = [(10, 0.5), (20, 0.6), (30, 0.6), (40, 0.55), (50, 0.9)]
  stop_at = next(s for s, v in seq if es.update(v, s))
  # the tie at step 30 is no improvement: bad evals at 30 and 40 -> stop at 40
  assert stop_at == 40 and es.bad_evals == 2
  assert (es.best, es.best_step) == (0.6, 20)


def test_early_stopping_scripted_min_nan_and_resume():
  es = loop.EarlyStopping(metric='loss', mode='min', patience=3)
  assert not es.update(float('nan'), 1)  # NaN first: not a best (nothing beats NaN)
  assert es.best is None and es.bad_evals == 1
  assert not es.update(2.0, 2) and not es.update(1.0, 3)
  assert not es.update(float('inf'), 4) and not es.update(1.5, 5)
  saved = json.loads(json.dumps(es.to_json()))
  again = loop.EarlyStopping(metric='loss', mode='min', patience=3)
  again.load(saved)
  assert again.update(1.0, 6)  # third eval without improvement after the resume
  assert (again.best, again.best_step) == (1.0, 3)


def test_early_stopping_patience_zero_never_stops():
  es = loop.EarlyStopping(metric='accuracy', mode='max', patience=0)
  assert not any(es.update(v, i) for i, v in enumerate([0.9, 0.1, 0.1, 0.1, 0.1]))
  assert es.best_step == 0


def test_early_stopping_integration_restores_best(monkeypatch):
  """Scripted dev accuracies: 0.50 0.70 0.70(tie) 0.60 0.65 at steps 2..10, patience 3:
  stop at step 10, best/ holds step 4 (the first 0.70), the returned params are step 4's."""
  script = iter([0.50, 0.70, 0.70, 0.60, 0.65])
  seen = []

  def scripted(info):
    def summarize(sums, per):
      v = next(script, 0.0)
      seen.append(v)
      return {'loss': 1.0 - v, 'accuracy': v}
    return summarize

  monkeypatch.setattr(objectives, 'cls_summary', scripted)
  c = cls_config(num_steps=40, eval_every=2)
  c.data.dev_file = small_dev()
  c.train.early_stopping.patience = 3
  wd = os.path.join(tmp_root(), 'early_stop')
  out = finetune_outcome(c, wd)
  r = {**out.results, 'state': out.state}
  assert r['stopped_early'] and r['step'] == 10
  assert [h['step'] for h in r['history']] == [2, 4, 6, 8, 10]
  assert seen == [0.50, 0.70, 0.70, 0.60, 0.65]
  assert r['best'] == {'metric': 'accuracy', 'value': 0.70, 'step': 4, 'restored_step': 4}
  assert os.listdir(os.path.join(wd, 'best')) == ['4']
  saved = json.load(open(os.path.join(wd, 'results.json')))
  assert saved['best']['restored_step'] == 4
  final = host_flat(r['state']['params'])
  best = init_lib.read_workdir_params(wd, 'best')
  assert int(jax.device_get(r['state']['step'])) == 4
  assert final.keys() == best.keys()
  for k in best:
    np.testing.assert_array_equal(final[k], best[k], err_msg=k)  # bit for bit
  last = init_lib.read_workdir_params(wd, 'latest')  # checkpoints/10: training went on
  assert any(not np.array_equal(last[k], best[k]) for k in best)


def test_finished_run_restarted_only_finishes_its_outputs(monkeypatch, tmp_path):
  """An early-stopped run restarted (plainly, or after a kill during its export) trains no
  more: no new checkpoint, no new metrics line, the same results.json, the export redone."""
  script = iter([0.50, 0.70, 0.60, 0.55])

  def scripted(info):
    def summarize(sums, per):
      v = next(script, 0.0)  # a run that evaluated again would see 0.0
      return {'loss': 1.0 - v, 'accuracy': v}
    return summarize

  monkeypatch.setattr(objectives, 'cls_summary', scripted)
  c = cls_config(num_steps=40, eval_every=2)
  c.data.dev_file = small_dev()
  c.train.early_stopping.patience = 2
  c.export.hf = True
  wd = tmp_path / 'w'
  first = run_stage(c, str(wd))
  assert first['stopped_early'] and first['step'] == 8

  def snapshot():
    return (sorted(os.listdir(wd / 'checkpoints')), sorted(os.listdir(wd / 'best')),
            (wd / 'metrics.jsonl').read_text(), json.loads((wd / 'results.json').read_text()))

  before = snapshot()
  assert run_stage(c, str(wd)) == first
  assert snapshot() == before
  shutil.rmtree(wd / 'export')  # killed during the export: results.json is not written yet
  (wd / 'results.json').unlink()
  assert run_stage(c, str(wd)) == first
  assert snapshot() == before and (wd / 'export' / 'config.json').exists()


def test_explicit_num_steps_wins_over_the_presets_epochs(tmp_path, monkeypatch, caplog, capsys):
  """--config.train.num_steps=N on a preset that trains by epochs runs N steps (it used to
  run num_epochs x steps per epoch), and the log says why. The end of the stage prints
  where its outputs are."""
  calls = []
  stub_train(monkeypatch, calls)
  c = cls_config()
  c.train.update(num_steps=60, num_epochs=3)
  c.data.dev_file = small_dev()
  with caplog.at_level(py_logging.INFO):
    run_stage(c, str(tmp_path / 'w'))
  assert calls[0]['settings'].train.num_steps == 60
  out = capsys.readouterr().out
  assert f"finetune_cls done: {tmp_path / 'w'}" in out
  assert f"results              {tmp_path / 'w' / 'results.json'}" in out
  assert 'train.num_steps=60 is set: 60 steps (train.num_epochs=3 is ignored' in caplog.text
  c.train.update(num_steps=0, num_epochs=1)
  run_stage(c, str(tmp_path / 'w2'))
  assert calls[1]['settings'].train.num_steps == calls[1]['data'].steps_per_epoch


# -------------------------------------------------------------------------- freezing

def test_freezing_keeps_frozen_params_and_their_optimizer_state_empty():
  c = cls_config(num_steps=6, eval_every=0)
  c.data.dev_file = small_dev()
  c.finetune.update(freeze_embeddings=True, freeze_layers=1, layerwise_lr_decay=0.8)
  c.optimizer.update(lr=1e-2, warmup_ratio=0.0)
  wd = os.path.join(tmp_root(), 'frozen')
  out = finetune_outcome(c, wd)
  r = {**out.results, 'state': out.state}
  before = init_lib.read_workdir_params(pretrained_workdir(), 'latest')
  after = host_flat(r['state']['params'])
  frozen = [k for k in after if k.startswith(('bert.embeddings.', 'bert.layers.0.'))]
  trained = [k for k in after if k not in frozen]
  assert len(frozen) == 5 + 16 and 'classifier.kernel' in trained
  for k in frozen:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  for k in trained:
    if k in before:  # the classifier is new: nothing to compare with
      assert not np.array_equal(after[k], before[k]), f'{k} did not change'
  n_frozen = sum(after[k].size for k in frozen)
  assert r['trainable_params'] == r['params'] - n_frozen

  # Adam moments exist for trainable params only (frozen ones hold no optimizer state).
  moments: dict[str, set] = {'mu': set(), 'nu': set()}
  for path, _ in jax.tree_util.tree_flatten_with_path(r['state']['opt_state'])[0]:
    keys = [str(getattr(p, 'name', getattr(p, 'key', getattr(p, 'idx', p)))) for p in path]
    for m in moments:
      if m in keys:
        moments[m].add('.'.join(keys[keys.index(m) + 1:]))
  assert moments['mu'] == moments['nu'] == set(trained)


def test_trainable_mask_names():
  cfg = FreezeSettings(freeze_embeddings=True, freeze_layers=1, freeze_patterns=(r'pooler',))
  md = ModelDef.create(lambda: build_model(_mcfg(), 'cls', num_labels=2))
  mask = flat_params(optim.trainable_mask(cfg, md.abstract_params))
  assert {k for k, t in mask.items() if t} == {
      k for k in mask if k.startswith(('bert.layers.1.', 'bert.layers.2.', 'classifier.'))}
  assert optim.trainable_mask(FreezeSettings(), md.abstract_params) is None


# ------------------------------------------------------ layer-wise LR decay, smoothing

def _mcfg(**kw):
  d = dict(model_type='bert', vocab_size=50, hidden_size=16, num_layers=3, num_heads=2,
           intermediate_size=32, max_position_embeddings=32, hidden_dropout=0.0,
           attention_dropout=0.0, classifier_dropout=0.0)
  d.update(kw)
  return ModelConfig(**d)


def _opt_cfg(**kw):
  d = dict(lr=1e-3, schedule='constant', warmup_steps=0, warmup_ratio=0.0, end_lr_ratio=0.0,
           weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-12, clip_norm=0.0)
  d.update(kw)
  return OptimizerSettings(**d)


def _expected_scale(name: str, decay: float, layers: int) -> float:
  if name.startswith('bert.embeddings.'):
    return decay ** (layers + 1)
  for i in range(layers):
    if name.startswith(f'bert.layers.{i}.'):
      return decay ** (layers - i)
  return 1.0  # pooler and task head


@pytest.mark.parametrize('freeze', [False, True])
def test_layerwise_lr_decay_scales(freeze):
  decay, layers, lr = 0.5, 3, 1e-3
  md = ModelDef.create(lambda: build_model(_mcfg(num_layers=layers), 'cls', num_labels=2))
  cfg = FreezeSettings(freeze_embeddings=freeze, layerwise_lr_decay=decay)
  scales = flat_params(optim.layerwise_lr_scale(cfg, md.abstract_params, layers))
  want = {k: _expected_scale(k, decay, layers) for k in scales}
  assert scales == want
  assert want['bert.embeddings.word.embedding'] == 1 / 16
  assert want['bert.layers.0.attn.query.kernel'] == 1 / 8
  assert want['bert.layers.2.mlp_out.bias'] == 1 / 2
  assert want['classifier.kernel'] == want['bert.pooler.kernel'] == 1.0

  # One AdamW step with unit gradients moves each parameter by -lr * scale (frozen: 0).
  trainable = optim.trainable_mask(cfg, md.abstract_params)
  tx, _ = optim.make_optimizer(_opt_cfg(lr=lr), 10, md.abstract_params, trainable=trainable,
                               lr_scale=optim.layerwise_lr_scale(cfg, md.abstract_params,
                                                                 layers))
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), md.abstract_params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  for k, u in flat_params(updates).items():
    frozen = freeze and k.startswith('bert.embeddings.')
    np.testing.assert_allclose(np.asarray(u), 0.0 if frozen else -lr * want[k], rtol=1e-5,
                               err_msg=k)


def test_layerwise_lr_decay_off_is_none():
  md = ModelDef.create(lambda: build_model(_mcfg(), 'cls', num_labels=2))
  assert optim.layerwise_lr_scale(FreezeSettings(layerwise_lr_decay=1.0), md.abstract_params,
                                  3) is None


def _smoothed_ce(logits, labels, eps):
  """Closed form: (1 - eps) * NLL(y) + eps * mean_k(-log p_k), i.e. cross entropy against
  (1 - eps) * onehot + eps / K."""
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  nll = -np.take_along_axis(np.asarray(logp), labels[..., None], -1)[..., 0]
  return (1 - eps) * nll + eps * (-np.asarray(logp).mean(-1))


def _random_params(md, seed):
  """Host params of the model's shapes (no random-init compile: that is the slow part)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0.0, 0.3, x.shape).astype(x.dtype),
                      md.abstract_params)


def _logits_and_losses(md, params, tasks, batch):
  """(logits, [task.loss(...) for task in tasks]) in one jit."""
  @jax.jit
  def f(params, batch):
    m = md.merge(params)
    logits = m(batch['input_ids'], batch['attention_mask'])['logits']
    return logits, [t.loss(m, batch, None, True) for t in tasks]

  logits, out = f(params, batch)
  return np.asarray(logits), out


def test_label_smoothing_closed_form_cls():
  md = ModelDef.create(lambda: build_model(_mcfg(num_layers=1), 'cls', num_labels=3))
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 50, (6, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[:2, 7:] = 0
  labels = np.array([0, 1, 2, 2, 1, 0], np.int32)
  batch = {'input_ids': ids, 'attention_mask': mask, 'labels': labels}
  eps_list = (0.0, 0.1, 0.3)
  logits, outs = _logits_and_losses(
      md, _random_params(md, 1), [objectives.cls(3, False, label_smoothing=e)
                                  for e in eps_list], batch)
  onehot = jax.nn.one_hot(labels, 3)
  nll = _smoothed_ce(logits, labels, 0.0)
  for eps, (loss_sum, sums) in zip(eps_list, outs):
    np.testing.assert_allclose(float(loss_sum), _smoothed_ce(logits, labels, eps).sum(),
                               rtol=1e-5)
    ref = optax.softmax_cross_entropy(logits, optax.smooth_labels(onehot, eps)).sum()
    np.testing.assert_allclose(float(loss_sum), float(ref), rtol=1e-5)
    assert float(sums['weight']) == 6
    # smoothing moves the loss by eps * (mean_k(-log p_k) - NLL(y)) per example
    delta = eps * (_smoothed_ce(logits, labels, 1.0) - nll)
    np.testing.assert_allclose(float(loss_sum) - float(outs[0][0]), delta.sum(), rtol=1e-4,
                               atol=1e-6)
  assert float(outs[1][0]) != float(outs[0][0])


def test_label_smoothing_closed_form_ner_ignores_minus_100():
  eps = 0.2
  md = ModelDef.create(lambda: build_model(_mcfg(num_layers=1), 'token_cls', num_labels=5))
  rng = np.random.default_rng(1)
  ids = rng.integers(5, 50, (3, 8)).astype(np.int32)
  labels = rng.integers(0, 5, (3, 8)).astype(np.int32)
  labels[:, 0] = labels[:, -1] = labels[0, 3] = -100
  batch = {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'labels': labels}
  logits, [(loss_sum, sums)] = _logits_and_losses(
      md, _random_params(md, 2), [objectives.ner(5, label_smoothing=eps)], batch)
  keep = labels != -100
  want = _smoothed_ce(logits, np.where(keep, labels, 0), eps)[keep].sum()
  np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
  assert float(sums['weight']) == keep.sum()


# -------------------------------------------------------------- bad inputs, stage level

def test_label_outside_label_set_names_file_and_line(tmp_path, monkeypatch):
  calls = []
  stub_train(monkeypatch, calls)
  train = read_tsv(SST2 / 'train.tsv')[:40]
  rows = train[:3] + [('a fine film', '2')] + train[3:]  # header = line 1 -> line 5
  c = cls_config(num_steps=1)
  c.data.update(path=str(tmp_path / 'd'), dev_file=small_dev())
  write_tsv(tmp_path / 'd/train.tsv', rows)
  with pytest.raises(ValueError, match=r"train\.tsv:5: label '2' is not in the label set"):
    run_stage(c, str(tmp_path / 'w'))

  # custom task: the label set comes from train; a dev label outside it is an error too
  c = cls_config(num_steps=1)
  c.data.update(task='', path=str(tmp_path / 'c'), train_file='train.tsv',
                dev_file='dev.tsv', text_column='sentence', label_column='label')
  write_tsv(tmp_path / 'c/train.tsv', [(t, {'0': 'neg', '1': 'pos'}[y]) for t, y in train])
  write_tsv(tmp_path / 'c/dev.tsv', [('good', 'pos'), ('bad', 'neg'), ('meh', 'neutral')])
  with pytest.raises(ValueError, match=r"dev\.tsv:4: label 'neutral' is not in the label "
                                       r"set \['neg', 'pos'\]"):
    run_stage(c, str(tmp_path / 'w2'))
  assert not calls


def test_on_bad_row_skip_skips_and_logs_count(tmp_path, monkeypatch, caplog):
  calls = []
  stub_train(monkeypatch, calls)
  train = read_tsv(SST2 / 'train.tsv')[:40]
  rows = train[:10] + [('odd label', 'yes'), ('three\tcolumns', '1')] + train[10:] + [('', '1')]
  write_tsv(tmp_path / 'd/train.tsv', rows)
  c = cls_config(num_steps=1)
  c.data.update(path=str(tmp_path / 'd'), dev_file=small_dev(), on_bad_row='skip')
  with caplog.at_level(py_logging.WARNING):
    run_stage(c, str(tmp_path / 'w'))
  (call,) = calls
  assert call['data'].steps_per_epoch == 40 // 16  # the 40 good rows are kept
  text = '\n'.join(r.getMessage() for r in caplog.records)
  assert f'{tmp_path}/d/train.tsv: skipped 3 bad rows' in text, text
  assert "'bad_label': 1" in text and "'bad_columns': 1" in text and "'empty_text': 1" in text


def test_max_len_beyond_position_table_is_refused_before_compile(tmp_path, monkeypatch):
  calls = []
  stub_train(monkeypatch, calls)
  c = cls_config(num_steps=1)
  c.data.max_len = 128  # the pretrained model has 64 positions (config says 512)
  with pytest.raises(ValueError, match=r"data\.max_len=128 exceeds the model's "
                                       r"max_position_embeddings=64"):
    run_stage(c, str(tmp_path / 'w'))
  c = cls_config(num_steps=1)
  c.init_from = ''
  c.model.update(**TINY)
  c.data.max_len = 65
  with pytest.raises(ValueError, match=r'data\.max_len=65 exceeds model\.max_position_'):
    run_stage(c, str(tmp_path / 'w2'))
  assert not calls


# ----------------------------------------------------------------- real training runs

def test_sst2_tiny_model_beats_majority():
  wd, r = sst2_workdir()
  acc = r['final']['eval/accuracy']
  assert acc > MAJORITY + 0.08, f'dev accuracy {acc:.4f} vs majority {MAJORITY:.4f}'
  assert r['best']['step'] == 200 and r['best']['restored_step'] == 200
  # encoder from the MLM workdir; new pooler + classifier; the MLM head dropped
  assert r['init_report']['loaded'] == 37
  assert r['init_report']['missing'] == ['bert.pooler.bias', 'bert.pooler.kernel',
                                         'classifier.bias', 'classifier.kernel']
  assert r['init_report']['unused'] and all(k.startswith('mlm_')
                                            for k in r['init_report']['unused'])
  labels = json.load(open(os.path.join(wd, 'labels.json')))
  assert labels['label_names'] == ['negative', 'positive']
  assert labels['label_values'] == ['0', '1'] and labels['main_metric'] == 'accuracy'


def test_config_json_records_the_model_built_from_init_from():
  """The architecture came from init_from (hidden 32, 2 layers), not from the config's
  model.* (hidden 128): config.json says what was built, so the workdir is a correct
  init_from / teacher / predict source; and a restart still passes the workdir check."""
  wd, _ = sst2_workdir()
  saved = json.load(open(os.path.join(wd, 'config.json')))
  assert cls_config().model.hidden_size == 128
  assert (saved['model']['hidden_size'], saved['model']['num_layers']) == (32, 2)
  assert saved['model']['max_position_embeddings'] == 64
  from jaxft import workdir as workdir_lib
  assert workdir_lib.differences(saved, cls_config(num_steps=200)) == []


def test_ner_tiny_conll_trains_and_reports_f1():
  wd, r = ner_workdir()
  hist = r['history']
  assert [h['step'] for h in hist] == [10, 20, 30]
  for k in ('eval/loss', 'eval/f1', 'eval/precision', 'eval/recall', 'eval/accuracy'):
    assert all(k in h and math.isfinite(h[k]) for h in hist), k
  assert 0.0 <= hist[-1]['eval/f1'] <= 1.0
  assert not any(k.startswith(('eval/micro', 'eval/macro', 'eval/weighted')) for k in hist[-1])
  assert hist[-1]['eval/loss'] < 0.5 * hist[0]['eval/loss'], hist
  train_losses = [m['train/loss'] for m in _read_jsonl(os.path.join(wd, 'metrics.jsonl'))
                  if 'train/loss' in m]
  assert train_losses[-1] < train_losses[0]
  assert r['best']['metric'] == 'f1'
  labels = json.load(open(os.path.join(wd, 'labels.json')))
  assert labels['kind'] == 'ner'
  assert labels['label_names'] == ['O'] + sorted(f'{p}-{t}' for p in 'BI'
                                                for t in ('LOC', 'MISC', 'ORG', 'PER'))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]

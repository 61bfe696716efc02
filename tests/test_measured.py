"""jaxft/measured.py: choices timed on first use, stored beside the compilation cache, set by
JAXFT_CHOICES; and its one user, the fp32 cotangent barrier of layers.matmul, chosen by the
train step. Timings are mocked (measured.time_once): no timed tests."""
import json
import logging

import jax
import numpy as np
import pytest

from jaxft import measured, partitioning, stages
from jaxft.models import ModelConfig, build_model, layers
from jaxft.objectives.lm import clm
from jaxft.partitioning import MeshSettings
from jaxft.train.optimizer import OptimizerSettings, make_optimizer
from jaxft.train.state import ModelDef, create_train_state
from jaxft.train.step import global_batch, make_train_step

CHOICE = measured.Choice('demo', ('a', 'b'), 'a')


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  """A compilation cache directory of the test's own, the setting at 'measure', no memo."""
  monkeypatch.setattr(measured, 'cache_dir', lambda: str(tmp_path))
  monkeypatch.setenv(measured.ENV, '')
  monkeypatch.setattr(measured, '_memo', {})
  measured.configure({})
  yield tmp_path
  measured.configure({})


def fake_clock(monkeypatch, seconds: dict):
  """measured.time_once returns `seconds[candidate]` (after the call); counts the calls."""
  calls = []

  def time_once(candidate, run):
    run()
    calls.append(candidate)
    return seconds[candidate]
  monkeypatch.setattr(measured, 'time_once', time_once)
  return calls


def runs_counting(counter):
  def build():
    counter.append('built')
    return {c: (lambda c=c: counter.append(c)) for c in CHOICE.candidates}
  return build


def test_measures_once_then_reads_the_store(cache_dir, monkeypatch, caplog):
  timed = fake_clock(monkeypatch, {'a': 2.0, 'b': 1.0})
  called = []
  with caplog.at_level(logging.INFO):
    assert measured.decide(CHOICE, 'shapes-1', runs_counting(called)) == 'b'
  # WARMUP untimed + ROUNDS timed calls per candidate, interleaved
  assert called.count('a') == called.count('b') == measured.WARMUP + measured.ROUNDS
  assert sorted(timed) == ['a'] * measured.ROUNDS + ['b'] * measured.ROUNDS
  lines = [r.getMessage() for r in caplog.records if 'measured choice demo' in r.getMessage()]
  assert len(lines) == 1 and 'a 2000.0 ms, b 1000.0 ms -> b' in lines[0]
  store = json.loads((cache_dir / measured.STORE_NAME).read_text())
  (key, entry), = store.items()
  assert key == f'demo | {measured.device_name()} | jax {jax.__version__} | shapes-1'
  assert measured.device_name().startswith(jax.devices()[0].device_kind)
  assert entry['winner'] == 'b' and entry['timings_s'] == {'a': [2.0, 2.0], 'b': [1.0, 1.0]}
  # a new process (no memo) reads the stored winner: nothing built, nothing timed
  monkeypatch.setattr(measured, '_memo', {})
  called.clear()
  assert measured.decide(CHOICE, 'shapes-1', runs_counting(called)) == 'b'
  assert called == []
  # other shapes are measured on their own
  fake_clock(monkeypatch, {'a': 1.0, 'b': 3.0})
  assert measured.decide(CHOICE, 'shapes-2', runs_counting(called)) == 'a'
  assert len(json.loads((cache_dir / measured.STORE_NAME).read_text())) == 2


def test_the_default_stays_unless_another_is_clearly_faster(cache_dir, monkeypatch, caplog):
  fake_clock(monkeypatch, {'a': 1.0, 'b': 0.97})  # 3% faster: noise, not evidence
  with caplog.at_level(logging.INFO):
    assert measured.decide(CHOICE, 's', runs_counting([])) == 'a'
  assert 'b 970.0 ms -> a (the default: b is not 5% faster)' in caplog.text
  fake_clock(monkeypatch, {'a': 1.0, 'b': 0.9})
  assert measured.decide(CHOICE, 's2', runs_counting([])) == 'b'


def test_setting_overrides_without_timing(cache_dir, monkeypatch):
  fake_clock(monkeypatch, {'a': 2.0, 'b': 1.0})
  called = []
  monkeypatch.setenv(measured.ENV, 'demo=a')
  assert measured.decide(CHOICE, 's', runs_counting(called)) == 'a'
  monkeypatch.setenv(measured.ENV, 'other=x, *=default')
  assert measured.decide(CHOICE, 's', runs_counting(called)) == 'a'
  monkeypatch.setenv(measured.ENV, '')
  measured.configure({'demo': 'b'})
  assert measured.decide(CHOICE, 's', runs_counting(called)) == 'b'
  assert called == [] and not (cache_dir / measured.STORE_NAME).exists()
  monkeypatch.setenv(measured.ENV, 'demo=c')
  with pytest.raises(ValueError, match=r"JAXFT_CHOICES.*demo='c'; allowed: a, b, default, measure"):
    measured.decide(CHOICE, 's', runs_counting(called))


def test_no_cache_dir_remembers_in_process_and_a_damaged_store_is_remeasured(
    cache_dir, monkeypatch):
  fake_clock(monkeypatch, {'a': 2.0, 'b': 1.0})
  called = []
  monkeypatch.setattr(measured, 'cache_dir', lambda: None)
  assert measured.decide(CHOICE, 's', runs_counting(called)) == 'b'
  called.clear()
  assert measured.decide(CHOICE, 's', runs_counting(called)) == 'b' and called == []
  monkeypatch.setattr(measured, 'cache_dir', lambda: str(cache_dir))
  monkeypatch.setattr(measured, '_memo', {})
  (cache_dir / measured.STORE_NAME).write_text('{not json')
  assert measured.decide(CHOICE, 's', runs_counting(called)) == 'b' and 'built' in called
  assert json.loads((cache_dir / measured.STORE_NAME).read_text())  # rewritten whole


# ----------------------------------------------------------------------------- the barrier

CFG = ModelConfig(model_type='gpt2', vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                  intermediate_size=64, max_position_embeddings=16, type_vocab_size=0,
                  hidden_act='gelu_new', hidden_dropout=0.0, attention_dropout=0.0,
                  layer_norm_eps=1e-5)


def _train_step(cfg):
  mesh, rules = MeshSettings().build(devices=jax.devices()[:1])
  model_def = ModelDef.create(lambda: build_model(cfg, 'clm', seed=0))
  tx, _ = make_optimizer(OptimizerSettings(), 100, model_def.abstract_params)
  state, shardings = create_train_state(model_def, tx, mesh, rules, seed=0)
  step = make_train_step(model_def, clm(mask_boundaries=False), tx, shardings, mesh, rules)
  ids = np.random.RandomState(0).randint(0, 64, (2, 16)).astype(np.int32)
  batch = global_batch({'input_ids': ids, 'attention_mask': np.ones_like(ids)}, mesh, rules)
  return step, state, batch, mesh, rules


def _barriers(jitted, state, batch, mesh, rules) -> int:
  with partitioning.use_mesh(mesh, rules):
    return jitted.lower(state, batch).as_text().count('optimization_barrier')


@pytest.mark.parametrize('fastest', ['off', 'on'])
def test_train_step_runs_the_measured_barrier_choice(cache_dir, monkeypatch, fastest):
  timed = fake_clock(monkeypatch, {'on': 2.0, 'off': 1.0} if fastest == 'off' else
                     {'on': 1.0, 'off': 2.0})
  step, state, batch, mesh, rules = _train_step(CFG)
  before = jax.tree.map(np.asarray, state)
  with partitioning.use_mesh(mesh, rules):
    assert step.choose(state, batch) == fastest
  chosen = step.variant(fastest)
  assert sorted(set(timed)) == ['off', 'on']
  (entry,) = json.loads((cache_dir / measured.STORE_NAME).read_text()).values()
  assert entry['winner'] == fastest
  # the chosen program is the candidate's: the barriers are there or not
  assert (_barriers(chosen, state, batch, mesh, rules) > 0) == (fastest == 'on')
  assert _barriers(step.jitted, state, batch, mesh, rules) > 0  # the built-in rule: on
  # timing ran on a copy: the run's own state is intact, and it trains from there
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, np.asarray(b))
  new_state, metrics = step(state, batch)
  assert int(new_state['step']) == 1 and np.isfinite(float(metrics['loss']))


def test_the_choice_does_not_apply_to_a_bf16_model(cache_dir, monkeypatch):
  timed = fake_clock(monkeypatch, {'on': 2.0, 'off': 1.0})
  step, state, batch, mesh, rules = _train_step(CFG.replace(dtype='bfloat16'))
  with partitioning.use_mesh(mesh, rules):
    assert step.choose(state, batch) == 'on'
  assert timed == [] and not (cache_dir / measured.STORE_NAME).exists()


def test_barrier_setting_reaches_the_program(cache_dir, monkeypatch):
  step, state, batch, mesh, rules = _train_step(CFG)
  monkeypatch.setenv(measured.ENV, 'fp32_cotangent_barrier=off')
  with partitioning.use_mesh(mesh, rules):
    assert step.choose(state, batch) == 'off'
  assert _barriers(step.variant('off'), state, batch, mesh, rules) == 0
  assert not (cache_dir / measured.STORE_NAME).exists()


def test_the_choices_config_key_sets_them_and_is_checked_at_parse():
  """`--config.choices=name=value,...` reaches configure() (the environment still wins), and
  a malformed value is a config error before anything runs."""
  import ml_collections
  from jaxft import config as config_lib
  from jaxft.config import ConfigError
  assert measured.configured(ml_collections.ConfigDict({'choices': 'demo=b, *=default'})) == {
      'demo': 'b', '*': 'default'}
  pipeline = ml_collections.ConfigDict({'stage': 'pipeline', 'pipeline': ('a',),
                                        'a': {'choices': 'demo=a'}})
  assert measured.configured(pipeline) == {'demo': 'a'}
  cfg = config_lib.base_config()
  cfg.choices = 'demo'
  with pytest.raises(ConfigError, match=r"choices='demo': 'demo' is not name=value"):
    stages.parse(cfg)

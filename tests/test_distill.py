"""Knowledge distillation: the KD loss, alpha=0 == fine-tuning, every-other-layer init, the
teacher-logits cache, and the whole stage on a (2, 2, 2) mesh with a frozen teacher.

Tiny BERTs (hidden 32, 4 heads; teacher 4 layers, student 2) on synthetic rows for the
step-level checks; the stage test uses a tiny random teacher saved as a Hugging Face
directory, the bundled 8k WordPiece tokenizer and a 64-row slice of the SST-2 sample.
"""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import partitioning
from jaxft.data import loader as loader_lib
from jaxft.data.masking import MaskingSettings
from jaxft.distill import student as init_distill
from jaxft.distill import teacher as teacher_lib
from jaxft.models import ModelConfig, build_model, flat_params
from jaxft.objectives import classification as cls_objectives
from jaxft.objectives import distill as task_lib
from jaxft.objectives import lm
from jaxft.objectives.outputs import outputs
from jaxft.partitioning import MeshSettings
from jaxft.distill import settings as distill_settings
from jaxft.stages import distill as stage
from jaxft.train import loop
from jaxft.train.state import ModelDef, create_train_state, to_host
from jaxft.train.step import global_batch, make_eval_step, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, LEN, BATCH, LABELS = 128, 16, 16, 3
RULES = partitioning.rules_from_config(())
ARCH = dict(model_type='bert', vocab_size=VOCAB, hidden_size=32, num_heads=4,
            intermediate_size=64, max_position_embeddings=LEN)
TEACHER = ModelConfig(num_layers=4, hidden_dropout=0.0, attention_dropout=0.0,
                      classifier_dropout=0.0, **ARCH)
# Dropout on: alpha=0 must also draw exactly fine-tuning's dropout masks.
STUDENT = ModelConfig(num_layers=2, hidden_dropout=0.1, attention_dropout=0.1,
                      classifier_dropout=0.1, **ARCH)


def _mesh(shape=(1, 1, 1)):
  return partitioning.make_mesh(MeshSettings(*shape), jax.devices()[:math.prod(shape)])


def _sgd():
  """The step's optimizer for the parity checks: SGD keeps the parameters linear in the
  gradient, so fp32 rounding of differently fused programs (the distillation step also
  runs the teacher) stays at lr x rounding on any CPU; Adam's g / (|g| + eps) would amplify
  the rounding of near-zero gradients by up to lr / eps."""
  return optax.sgd(1e-3)


def _random_params(md, seed):
  """Host params drawn in NumPy from the abstract shapes: no init compile."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype),
                      md.abstract_params)


@functools.cache
def _teacher():
  md = ModelDef.create(lambda: build_model(TEACHER, 'cls', num_labels=LABELS, seed=1))
  return md, _random_params(md, 1)


@functools.cache
def _student():
  md = init_distill.student_def(STUDENT, 'cls', LABELS, 0, None)
  params, report = init_distill.from_teacher(_teacher()[1], md, [0, 2])
  return md, params, report


def _batch(seed=0, n=BATCH):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, VOCAB, (n, LEN)).astype(np.int32)
  lengths = rng.integers(4, LEN + 1, n)
  mask = (np.arange(LEN)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, ids, 0).astype(np.int32)
  return {'input_ids': ids, 'attention_mask': mask,
          'token_type_ids': np.zeros_like(ids),
          'labels': (ids[:, 1] % LABELS).astype(np.int32)}


def _one_step(task, batch, extra=None, mesh=None):
  """(loss, params after one step) of `task` from the student's every-other-layer init;
  `extra`: the teacher's params (the step's constants)."""
  mesh = mesh or _mesh()
  md, params, _ = _student()
  tx = _sgd()
  state, sh = create_train_state(md, tx, mesh, RULES, 0, params=params)
  extra_sh = None if extra is None else jax.tree.map(lambda x: x.sharding, extra)
  step = make_train_step(md, task, tx, sh, mesh, RULES, constants_shardings=extra_sh)
  args = () if extra is None else (extra,)
  state, metrics = step(state, global_batch(batch, mesh, RULES), *args)
  return float(metrics['loss']), to_host(state['params']), metrics


def _teacher_on(mesh):
  md, params = _teacher()
  return jax.device_put(params, md.param_shardings(mesh, RULES))


# ----------------------------------------------------------------------------- losses

def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kd_loss_matches_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 5, 7)) * 3, rng.normal(size=(2, 5, 7)) * 3
  temp = 2.5
  lpt, lps = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
  want = temp ** 2 * (np.exp(lpt) * (lpt - lps)).sum(-1)
  got = task_lib.kl_soft_targets(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temp)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(task_lib.kl_soft_targets(jnp.asarray(t), jnp.asarray(t), temp)).max()) < 1e-6

  # The assembled classification loss: alpha*T^2*KL + (1-alpha)*CE, weighted sums.
  md, params, _ = _student()
  batch = {k: jnp.asarray(v) for k, v in _batch(1, 8).items()}
  t_logits = rng.normal(size=(8, LABELS)).astype(np.float32)
  w = rng.uniform(0.5, 2.0, 8).astype(np.float32)
  batch.update(teacher_logits=jnp.asarray(t_logits), weights=jnp.asarray(w))
  spec = task_lib.Spec(alpha=0.3, temperature=temp)
  task = task_lib.cls(LABELS, False, spec, cached=True)

  @jax.jit
  def run(params, batch):
    model = md.merge(params)
    logits = model(batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])['logits']
    return task.loss(model, batch, None, True), logits

  (loss_sum, sums), logits = run(params, batch)
  logits = np.asarray(logits, np.float64)
  lpt, lps = _np_log_softmax(t_logits / temp), _np_log_softmax(logits / temp)
  kd = temp ** 2 * (np.exp(lpt) * (lpt - lps)).sum(-1)
  ce = -_np_log_softmax(logits)[np.arange(8), np.asarray(batch['labels'])]
  np.testing.assert_allclose(float(loss_sum), (w * (0.3 * kd + 0.7 * ce)).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(sums['weight']), w.sum(), rtol=1e-6)


def test_feature_losses_match_numpy():
  rng = np.random.default_rng(2)
  hs, ht = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 6))
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  a_s = rng.dirichlet(np.ones(4), size=(2, 3, 4))
  a_t = rng.dirichlet(np.ones(4), size=(2, 3, 4))
  cos = (hs * ht).sum(-1) / np.linalg.norm(hs, axis=-1) / np.linalg.norm(ht, axis=-1)
  mse = ((hs - ht) ** 2).mean(-1)
  pair = mask[:, None, :, None] * mask[:, None, None, :]
  n = mask.sum(-1)
  want = {'cos': ((1 - cos) * mask).sum(-1) / n, 'mse': (mse * mask).sum(-1) / n,
          'att': (((a_s - a_t) ** 2) * pair).sum((1, 2, 3)) / (3 * n * n)}
  got = {'cos': task_lib.cosine_per_example(hs, ht, mask),
         'mse': task_lib.hidden_mse_per_example(hs, ht, mask),
         'att': task_lib.attention_mse_per_example(a_s, a_t, mask)}
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)


# --------------------------------------------------------------------- init and parity

def test_every_other_layer_init_copies_chosen_teacher_layers():
  assert init_distill.teacher_layers(4, 2) == [0, 2]
  assert init_distill.teacher_layers(6, 3) == [0, 2, 4]
  assert init_distill.teacher_layers(12, 6, '0,2,4,7,9,11') == [0, 2, 4, 7, 9, 11]
  with pytest.raises(ValueError, match='names 2 layers'):
    init_distill.teacher_layers(6, 3, '0,2')
  _, t_params = _teacher()
  _, s_params, report = _student()
  t, s = flat_params(t_params), flat_params(s_params)
  assert report['missing'] == [] and report['teacher_layers'] == [0, 2]
  for name, x in s.items():
    src = name.replace('layers.1.', 'layers.2.')  # layer 0 <- 0, layer 1 <- 2
    np.testing.assert_array_equal(x, t[src], err_msg=name)
  assert any('layers.1.' in n for n in s)
  assert not np.array_equal(s['bert.layers.1.mlp_in.kernel'], t['bert.layers.1.mlp_in.kernel'])


def test_alpha0_equals_finetuning():
  """Same first-step loss and params as the fine-tuning objective (dropout on, same rng)."""
  mesh = _mesh()
  batch = _batch(3)
  spec = task_lib.Spec(alpha=0.0, temperature=2.0)
  kd = _one_step(task_lib.cls(LABELS, False, spec, _teacher()[0]), batch,
                 extra=_teacher_on(mesh), mesh=mesh)
  ft = _one_step(cls_objectives.cls(LABELS, False), batch, mesh=mesh)
  assert abs(kd[0] - ft[0]) <= 1e-6, (kd[0], ft[0])
  assert float(kd[2]['kd_sum']) > 0  # the teacher did run: its term is just weighted 0
  for a, b in zip(jax.tree.leaves(kd[1]), jax.tree.leaves(ft[1])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_cached_teacher_logits_give_the_live_first_step_loss(tmp_path):
  mesh = _mesh()
  md, _ = _teacher()
  t_params = _teacher_on(mesh)
  arrays = _batch(4, n=40)  # not a multiple of the batch: the cache pass pads and reorders
  teacher = teacher_lib.Teacher('t', TEACHER, 'cls', LABELS, md, _teacher()[1], None,
                                teacher_lib.fingerprint(TEACHER, 'cls', _teacher()[1]))
  fwd = make_eval_step(md, outputs('logits'), mesh, RULES, md.param_shardings(mesh, RULES))
  assert init_distill.examples_per_sec(fwd, t_params, arrays, BATCH, mesh, RULES) > 0
  path = teacher_lib.cache_path(str(tmp_path), teacher, arrays)
  compute = lambda: loop.evaluate(fwd, t_params, loader_lib.eval_batches(arrays, BATCH)(), mesh,
                                  RULES, lambda sums, per: loader_lib.ordered(per)['logits'])
  logits, hit = teacher_lib.cached_logits(path, 40, compute)
  assert not hit and os.path.exists(path) and logits.shape == (40, LABELS)
  again, hit = teacher_lib.cached_logits(path, 40, lambda: pytest.fail('recomputed'))
  assert hit and np.array_equal(again, logits)

  batch = {k: v[:BATCH] for k, v in arrays.items()}
  spec = task_lib.Spec(alpha=0.7, temperature=3.0)
  live = _one_step(task_lib.cls(LABELS, False, spec, md), batch, extra=t_params, mesh=mesh)
  cached = _one_step(task_lib.cls(LABELS, False, spec, cached=True),
                     dict(batch, teacher_logits=logits[:BATCH]), mesh=mesh)
  assert abs(live[0] - cached[0]) <= 1e-5 * max(1.0, abs(live[0])), (live[0], cached[0])
  assert float(live[2]['kd_sum']) > 0


# ---------------------------------------------------------------------------- the stage

def _write_data(d):
  os.makedirs(d, exist_ok=True)
  src = os.path.join(REPO, 'data/glue/sst2')
  for split, n in (('train', 64), ('dev', 32)):
    with open(os.path.join(src, f'{split}.tsv')) as f:
      lines = f.readlines()[:n + 1]
    with open(os.path.join(d, f'{split}.tsv'), 'w') as f:
      f.writelines(lines)


def _write_teacher(d):
  """A tiny random BERT classifier as an HF directory (what `teacher=` accepts)."""
  from jaxft.data.tokenizer import load_tokenizer
  from jaxft.models import hf
  tok = load_tokenizer(os.path.join(REPO, 'data/tokenizers/quickstart-wordpiece'))
  mcfg = TEACHER.replace(vocab_size=len(tok), max_position_embeddings=64)
  params = _random_params(ModelDef.create(lambda: build_model(mcfg, 'cls', num_labels=2)), 3)
  hf.save_hf(params, mcfg, d, 'cls', tokenizer=tok, id2label={0: 'negative', 1: 'positive'})
  return params


def _config_module():
  import importlib.util
  spec = importlib.util.spec_from_file_location('_distill_cfg',
                                                os.path.join(REPO, 'configs/distill.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _stage_cfg(teacher_dir, data_dir):
  c = _config_module().get_config('sst2')
  c.teacher = teacher_dir
  c.data.path = data_dir
  c.data.max_len = 32
  c.mesh.update(data=2, fsdp=2, tensor=2)
  # Timing is checked elsewhere (two more compiles here).
  c.distill.update(alpha=0.5, cosine_weight=0.5, hidden_weight=1.0, attention_weight=1.0,
                   measure_speed=False)
  c.train.update(num_steps=2, num_epochs=0, batch_size=16, eval_every=0, log_every=1)
  c.checkpoint.update(async_save=False, keep_best=0)
  c.export.hf = False
  return c


def test_stage_on_2x2x2_mesh_keeps_teacher_frozen(tmp_path):
  from jaxft import config as config_lib
  from jaxft import stages
  teacher_dir, data_dir, workdir = (str(tmp_path / n) for n in ('teacher', 'data', 'work'))
  t_host = _write_teacher(teacher_dir)
  _write_data(data_dir)
  cfg = _stage_cfg(teacher_dir, data_dir)
  settings = stages.validate(cfg)
  config_lib.save_config(cfg, workdir)  # as stages.run does, before the stage
  distilled = stage.distill(settings, workdir)
  results = distilled.results

  # The teacher: bit-identical after training, on the mesh by its own logical axes.
  t_dev = distilled.teacher_params
  for name, x in flat_params(t_dev).items():
    np.testing.assert_array_equal(np.asarray(x), flat_params(t_host)[name], err_msg=name)
  emb = t_dev['bert']['embeddings']['word']['embedding']
  assert dict(emb.sharding.mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 2, emb.shape[1] // 2)

  # The train state is the student's alone: Adam moments mirror its params exactly.
  state = distilled.state
  assert results['step'] == 2 and int(state['skipped']) == 0
  s_struct = jax.tree.structure(state['params'])
  adam = [s for s in jax.tree.leaves(state['opt_state'], is_leaf=lambda s: hasattr(s, 'mu'))
          if hasattr(s, 'mu')]
  assert len(adam) == 1
  assert jax.tree.structure(adam[0].mu) == s_struct == jax.tree.structure(adam[0].nu)
  n_student = sum(x.size for x in jax.tree.leaves(state['params']))
  big = [x for x in jax.tree.leaves(state['opt_state']) if x.ndim > 0]
  assert sum(x.size for x in big) == 2 * n_student
  assert len(state['params']['bert']['layers']) == 2

  with open(os.path.join(workdir, 'results.json')) as f:
    saved = json.load(f)
  t, s = saved['teacher'], saved['student']
  assert t['params'] == sum(x.size for x in jax.tree.leaves(t_host)) > s['params']
  assert s['init']['mode'] == 'teacher_every_k' and s['init']['teacher_layers'] == [0, 2]
  assert 0.0 <= t['dev']['accuracy'] <= 1.0 and 0.0 <= s['dev']['accuracy'] <= 1.0
  assert saved['distill']['layer_map'] == [[0, 0], [1, 2], [2, 4]]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    first = json.loads(f.readline())
  assert all(np.isfinite(first[k]) for k in ('train/loss', 'train/kd', 'train/hidden_mse',
                                              'train/attention_mse', 'train/cosine'))
  # config.json / labels.json describe the student (usable as init_from / predict / teacher)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['num_layers'] == 2


def test_configs_load_and_bad_settings_are_named():
  mod = _config_module()
  from jaxft import stages
  for v in ('sst2', 'mnli', 'stsb', 'mlm'):
    c = mod.get_config(v)
    stages.validate(c)
    assert c.stage == 'distill' and c.distill.kind == ('mlm' if v == 'mlm' else 'cls')
  with pytest.raises(ValueError, match='out of range'):
    distill_settings.parse_layer_map('0:0,3:9', 2, 4)
  assert distill_settings.parse_layer_map('', 3, 6) == ((0, 0), (1, 2), (2, 4), (3, 6))
  c = mod.get_config('sst2')
  c.distill.attention_weight = 1.0
  with pytest.raises(ValueError, match='equal head counts'):
    distill_settings.make_spec(stages.validate(c).distill, STUDENT.replace(num_heads=2), TEACHER)


class _Tokenizer:
  """What the MLM objective reads from a tokenizer."""
  mask_token_id = 4

  def __len__(self):
    return VOCAB


@pytest.mark.slow
def test_mlm_alpha0_equals_pretraining_and_soft_targets_use_the_shared_mask():
  mesh = _mesh()
  mlm_cfg = MaskingSettings(mask_prob=0.15, mask_token_frac=0.8, random_token_frac=0.1,
                            max_predictions=4)
  t_md = ModelDef.create(lambda: build_model(TEACHER, 'mlm'))
  t_params = jax.device_put(_random_params(t_md, 5), t_md.param_shardings(mesh, RULES))
  s_md = init_distill.student_def(STUDENT, 'mlm', None, 0, None)
  s_params, _ = init_distill.from_teacher(_random_params(t_md, 5), s_md, [0, 2])
  batch = {k: v for k, v in _batch(6).items() if k in ('input_ids', 'attention_mask')}
  batch['special_tokens_mask'] = 1 - batch['attention_mask']
  batch['special_tokens_mask'][:, 0] = 1

  def one_step(task, extra=None):
    tx = _sgd()
    state, sh = create_train_state(s_md, tx, mesh, RULES, 0, params=s_params)
    step = make_train_step(s_md, task, tx, sh, mesh, RULES,
                           constants_shardings=None if extra is None
                           else jax.tree.map(lambda x: x.sharding, extra))
    state, m = step(state, global_batch(batch, mesh, RULES), *(() if extra is None else (extra,)))
    return float(m['loss']), to_host(state['params']), m

  spec = task_lib.Spec(alpha=0.0, temperature=2.0, cosine_weight=0.0)
  kd = one_step(task_lib.mlm(_Tokenizer(), mlm_cfg, spec, t_md), t_params)
  ref = one_step(lm.mlm(_Tokenizer(), mlm_cfg))
  assert abs(kd[0] - ref[0]) <= 1e-6, (kd[0], ref[0])
  assert float(kd[2]['weight']) == float(ref[2]['weight']) > 0  # the same masked positions
  assert float(kd[2]['kd_sum']) > 0
  for a, b in zip(jax.tree.leaves(kd[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

  # A teacher identical to a dropout-free student gives KL = 0 only if both see the same
  # corrupted inputs at the same masked positions.
  same = STUDENT.replace(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
  md = ModelDef.create(lambda: build_model(same, 'mlm'))
  task = task_lib.mlm(_Tokenizer(), mlm_cfg, task_lib.Spec(alpha=1.0), md)

  @jax.jit
  def soft(params, batch):
    b = task.prepare(batch, jax.random.PRNGKey(0))
    return task.loss(md.merge(params), b, jax.random.PRNGKey(1), False, constants=params)[1]

  sums = soft(s_params, batch)
  assert float(sums['weight']) > 0 and abs(float(sums['kd_sum'])) < 1e-5, sums

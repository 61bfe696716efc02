"""Explanations (jaxft/objectives/explain.py; `predict.explain`).

Integrated gradients on a tiny random BERT (weights drawn with std 0.3, so the model is
far from linear along the path and the quadrature matters): the completeness axiom against
f(x) and f(baseline) computed here independently, exact zeros where the input equals the
baseline. Attention rollout against a loop-by-loop numpy reference. Then the predict stage
end to end on a workdir written with the library's own writers (labels.json, tokenizer/,
an Orbax checkpoint of random weights: predict compiles nothing else): attributions on
every line and an escaped HTML page. One compile per model function, reused.
"""
from __future__ import annotations

import copy
import functools
import html.parser
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import checkpointing, sources, stages
from jaxft import config as config_lib
from jaxft.data.classification import ClsData
from jaxft.data.tokenizer import load_tokenizer
from jaxft.main import run_stage
from jaxft.models import ModelConfig, build_model
from jaxft.objectives import explain
from jaxft.config import ConfigError
from jaxft.train.state import ModelDef
from jaxft.trees import map_named

from test_finetune import load_config_module

REPO = Path(__file__).resolve().parents[1]
VOCAB, LEN, PAD, CLS, SEP = 64, 12, 0, 2, 3
MCFG = ModelConfig(model_type='bert', vocab_size=VOCAB, hidden_size=16, num_layers=1,
                   num_heads=2, intermediate_size=32, max_position_embeddings=LEN,
                   hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)


def random_params(md: ModelDef, seed: int = 0) -> dict:
  """Drawn on the host (nothing to compile): LayerNorms as built, weights with std 0.3
  (BERT's 0.02 would leave the model nearly linear)."""
  rng = np.random.default_rng(seed)

  def draw(name, a):
    if '.ln.' in name or name.split('.')[-2].endswith('_ln'):
      return np.ones(a.shape, a.dtype) if name.endswith('scale') else np.zeros(a.shape, a.dtype)
    return rng.normal(0, 0.3, a.shape).astype(a.dtype)

  return map_named(draw, md.abstract_params)


@functools.cache
def model(kind: str):
  head = 'cls' if kind == 'cls' else 'token_cls'
  md = ModelDef.create(lambda: build_model(MCFG, head, num_labels=3))
  return md, random_params(md)


def batch(seed: int = 3) -> dict:
  """4 rows: [CLS] text [SEP] pad...; row 1 padded after 8; row 2 has the pad id inside
  its text (attended); word_ids as an NER encoding has them (words 1 and 2 in two pieces)."""
  ids = np.random.default_rng(seed).integers(5, VOCAB, (4, LEN)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 8:], ids[1, 8:] = 0, PAD
  ids[:, 0], ids[[0, 2, 3], -1], ids[1, 7] = CLS, SEP, SEP
  ids[2, 4] = PAD
  word_ids = np.where(mask > 0, np.arange(LEN)[None] - 1, -1)
  word_ids[:, 0] = -1
  word_ids[ids == SEP] = -1
  word_ids[:, 3] = word_ids[:, 2]
  word_ids[:, 6] = word_ids[:, 5]
  arrays = {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': np.zeros_like(ids),
            'word_ids': word_ids}
  # the pad id is not special here: the one in row 2 is text whose embedding is the baseline
  return explain.explain_arrays(arrays, [CLS, SEP])


@functools.cache
def ig(kind: str):
  md = model(kind)[0]
  return jax.jit(lambda p, b, x, x0: explain.path_integral(md.merge(p), b, x, x0, kind=kind,
                                                           steps=64))


@functools.cache
def logits_of_embeds(kind: str):
  md = model(kind)[0]
  return jax.jit(lambda p, e, m: md.merge(p)(None, m, inputs_embeds=e)['logits'])


def f_value(kind, params, embeds, b, target):
  """The explained scalar, written out: log p(predicted class), or the sum over first
  sub-tokens of log p(predicted tag)."""
  logits = np.asarray(logits_of_embeds(kind)(params, embeds, b['attention_mask']), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, target[..., None], -1)[..., 0]
  return picked if kind == 'cls' else (picked * b['target_mask']).sum(-1)


def embeddings_and_baseline(params, b, baseline: str):
  """x (looked up) and x' (built here: pad row or zeros at non-special real positions); the
  library's `baseline_embeddings` must give the same x'."""
  table = np.asarray(params['bert']['embeddings']['word']['embedding'])
  x = table[b['input_ids']]
  keep = (b['special_tokens_mask'] > 0) | (b['attention_mask'] == 0)
  x0 = np.where(keep[..., None], x, table[PAD] if baseline == 'pad' else 0.0)
  lib = explain.baseline_embeddings(jnp.asarray(x), b['attention_mask'],
                                    b['special_tokens_mask'], baseline, table[PAD])
  np.testing.assert_array_equal(np.asarray(lib), x0)
  return x, x0


def test_the_target_mask_is_the_first_sub_token_of_each_word():
  b = batch()
  expected = np.zeros((4, LEN), np.int32)
  expected[:, [1, 2, 4, 5, 7, 8, 9, 10]] = 1
  expected[1, 7:] = 0
  np.testing.assert_array_equal(b['target_mask'], expected)
  np.testing.assert_array_equal(b['special_tokens_mask'],
                                np.isin(b['input_ids'], [CLS, SEP]).astype(np.int32))


@pytest.mark.parametrize('kind', ['cls', 'ner'])
def test_integrated_gradients_completeness(kind):
  """sum_t attribution_t = f(x) - f(x') within 1% at 64 steps, with x' the pad embedding at
  every non-special real position."""
  _, params = model(kind)
  b = batch()
  x, x0 = embeddings_and_baseline(params, b, 'pad')
  out = jax.device_get(ig(kind)(params, b, x, x0))
  target = np.asarray(logits_of_embeds(kind)(params, x, b['attention_mask'])).argmax(-1)
  np.testing.assert_array_equal(out['target'], target)
  delta = f_value(kind, params, x, b, target) - f_value(kind, params, x0, b, target)
  assert np.all(np.abs(delta) > 0.03), delta  # a real difference to explain
  np.testing.assert_allclose(out['attributions'].sum(-1), delta, rtol=0.01)
  np.testing.assert_allclose(out['delta'], delta, rtol=1e-4)


def test_a_token_equal_to_its_baseline_gets_exactly_zero():
  """pad baseline: the pad id inside a text, special tokens and padding get 0.0 exactly;
  zeros baseline: a token whose embedding row is zeroed gets 0.0 exactly. Every other
  token gets a nonzero attribution."""
  _, params = model('cls')
  b = batch()
  attr = np.asarray(ig('cls')(params, b, *embeddings_and_baseline(params, b, 'pad'))[
      'attributions'])
  zero = (b['special_tokens_mask'] > 0) | (b['attention_mask'] == 0) | (b['input_ids'] == PAD)
  assert zero[2, 4] and not b['special_tokens_mask'][2, 4]  # the pad id in row 2's text
  assert np.all(attr[zero] == 0.0)
  assert np.all(attr[~zero] != 0.0)

  zeroed_id = int(b['input_ids'][0, 5])
  table = np.array(params['bert']['embeddings']['word']['embedding'])
  table[zeroed_id] = 0.0
  zparams = {**params, 'bert': {**params['bert'], 'embeddings': {
      **params['bert']['embeddings'], 'word': {'embedding': table}}}}
  attr = np.asarray(ig('cls')(zparams, b, *embeddings_and_baseline(zparams, b, 'zeros'))[
      'attributions'])
  zero = ((b['special_tokens_mask'] > 0) | (b['attention_mask'] == 0)
          | (b['input_ids'] == zeroed_id))
  assert zero.sum() > (b['special_tokens_mask'] + 1 - b['attention_mask']).sum()
  assert np.all(attr[zero] == 0.0)
  assert np.all(attr[~zero] != 0.0)


def rollout_reference(attentions: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Abnar & Zuidema, one example and one layer at a time."""
  out = []
  for b in range(attentions.shape[1]):
    r = None
    for layer in attentions[:, b]:
      a = layer.mean(0) + np.eye(layer.shape[-1])
      a = a / a.sum(-1, keepdims=True)
      r = a if r is None else a @ r
    out.append(r * mask[b][:, None])
  return np.stack(out)


def test_rollout_matches_reference_and_rows_sum_to_one():
  b = batch()
  mask = b['attention_mask']
  logits = np.random.default_rng(1).normal(size=(3, 4, 2, LEN, LEN)) * 2  # layers, B, H
  logits = np.where(mask[None, :, None, None, :] > 0, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  r = np.asarray(explain.rollout([jnp.asarray(p, jnp.float32) for p in probs], mask))
  assert r.shape == (4, LEN, LEN)
  np.testing.assert_allclose(r, rollout_reference(probs, mask), atol=1e-6)
  real = mask > 0
  np.testing.assert_allclose(r.sum(-1)[real], 1.0, atol=1e-6)
  assert np.all(r[1][:, ~real[1]] == 0.0)  # nothing flows to padding
  first = np.asarray(explain.rollout_scores(jnp.asarray(r), mask, 'first'))
  np.testing.assert_array_equal(first, r[:, 0])
  last = np.asarray(explain.rollout_scores(jnp.asarray(r), mask, 'last'))
  np.testing.assert_array_equal(last, r[np.arange(4), real.sum(-1) - 1])
  targets = np.asarray(explain.rollout_scores(jnp.asarray(r), mask, 'targets',
                                              b['target_mask']))
  w = b['target_mask']
  np.testing.assert_allclose(targets, np.einsum('bi,bij->bj', w, r) / w.sum(-1)[:, None],
                             atol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)


def test_html_escapes_everything():
  rec = {'source': 'in.txt:1', 'text': '<script>alert(1)</script> & "q"', 'label': '<b>',
         'probs': {'<b>': 0.75}, 'attributions': [{'token': '<script>', 'score': 1.0},
                                                   {'token': '##&', 'score': -0.5}]}
  page = explain.html_page([rec], 'x<y')
  assert '<script' not in page and '<b>' not in page
  assert '&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;q&quot;' in page
  assert 'predicted &lt;b&gt; (p=0.750)' in page
  assert 'rgba(220,38,38,1.000)' in page and 'rgba(37,99,235,0.500)' in page


# -------------------------------------------------------------------- the predict stage

class _Tags(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.tags = set()

  def handle_starttag(self, tag, attrs):
    self.tags.add(tag)


@pytest.fixture(scope='module')
def cls_workdir(tmp_path_factory) -> str:
  """What a finetune_cls SST-2 run leaves for predict, written by the same writers, with
  random weights (explanations need no trained model)."""
  wd = str(tmp_path_factory.mktemp('explain') / 'sst2')
  tok = load_tokenizer(REPO / 'data/tokenizers/quickstart-wordpiece')
  mcfg = MCFG.replace(vocab_size=len(tok), max_position_embeddings=32, num_layers=1)
  md = ModelDef.create(lambda: build_model(mcfg, 'cls', num_labels=2))
  c = load_config_module('finetune_cls').get_config('sst2')
  c.data = config_lib.as_section(ClsData(task='sst2', max_len=32))
  config_lib.save_config(c, wd)
  sources.save_tokenizer(tok, wd, 32)
  sources.save_labels(wd, sources.TaskInfo.of_data(
      'cls', {'label_names': ['negative', 'positive'], 'label_values': ['0', '1'],
              'metric_names': ['accuracy'], 'main_metric': 'accuracy'}, mcfg))
  ckpt = checkpointing.Checkpointer(os.path.join(wd, 'checkpoints'), async_save=False)
  ckpt.save(1, {'params': random_params(md)})
  ckpt.close()
  return wd


def test_predict_writes_attributions_and_an_escaped_html_page(cls_workdir, tmp_path):
  texts = ['a gorgeous , witty movie .', '<script>alert(1)</script> boring']
  (tmp_path / 'in.txt').write_text('\n'.join(texts) + '\n', encoding='utf-8')
  tok = load_tokenizer(os.path.join(cls_workdir, 'tokenizer'))
  for method in explain.METHODS:
    c = load_config_module('predict').get_config()
    c.init_from = cls_workdir
    c.predict.update(input=str(tmp_path / 'in.txt'), explain=method, ig_steps=8,
                     explain_html=str(tmp_path / f'{method}.html'),
                     output=str(tmp_path / f'{method}.jsonl'), checkpoint='latest')
    run_stage(c, str(tmp_path / method))
    recs = [json.loads(line) for line in open(tmp_path / f'{method}.jsonl')]
    assert [r['text'] for r in recs] == texts
    for r in recs:
      ids = tok(r['text'], truncation=True, max_length=32)['input_ids']
      assert [a['token'] for a in r['attributions']] == tok.convert_ids_to_tokens(ids)
      scores = np.array([a['score'] for a in r['attributions']])
      assert np.all(np.isfinite(scores))
      if method == 'integrated_gradients':  # [CLS], [SEP]: 0; text tokens: not
        assert scores[0] == scores[-1] == 0.0 and np.all(scores[1:-1] != 0.0)
      else:
        assert scores.sum() == pytest.approx(1.0, abs=1e-5)
    page = (tmp_path / f'{method}.html').read_text(encoding='utf-8')
    assert '<script' not in page and '&lt;script&gt;alert(1)&lt;/script&gt; boring' in page
    assert page.count('<div class="ex">') == 2
    assert f"predicted {recs[1]['label']} (p={recs[1]['probs'][recs[1]['label']]:.3f})" in page
    parser = _Tags()
    parser.feed(page)
    assert parser.tags == {'html', 'head', 'meta', 'title', 'style', 'body', 'h1', 'p', 'div',
                           'span'}


def test_explain_settings_errors_name_the_keys():
  """Bad explain settings fail at parse time naming the key: IG through int8 rounding (no
  gradient) would give all-zero attributions, so explain and quantize are exclusive."""
  c = load_config_module('predict').get_config()
  c.init_from = '/nowhere'
  for update, match in (({'explain': 'shap'}, "predict.explain='shap'"),
                        ({'explain': 'integrated_gradients', 'quantize': 'int8'},
                         'predict.quantize=.int8.: explain the float32 model'),
                        ({'explain_html': 'x.html'}, 'predict.explain_html is set'),
                        ({'explain': 'integrated_gradients', 'ig_steps': 1},
                         'predict.ig_steps=1')):
    c2 = copy.deepcopy(c)
    c2.predict.update(update)
    with pytest.raises(ConfigError, match=match):
      stages.parse(c2)

"""Dynamic MLM masking statistics and invariants; CLM label shift and boundaries."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.data.masking import clm_labels, mlm_mask
from jaxft.data.packing import pack_clm
from jaxft.objectives.lm import unigram_baseline

VOCAB, CLS, SEP, PAD, MASK = 1000, 2, 3, 0, 4
B, L, P = 32, 128, 24


def _batch(seed):
  """Packed-looking rows: CLS, text with a few SEPs, final SEP, padding tails."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, VOCAB, (B, L)).astype(np.int32)
  n = rng.integers(8, L + 1, B)
  n[: B // 2] = L  # half the rows full, as packing makes them
  ids[:, 0] = CLS
  for r in range(B):
    ids[r, rng.integers(1, n[r] - 1, 3)] = SEP
    ids[r, n[r] - 1] = SEP
    ids[r, n[r]:] = PAD
  special = np.isin(ids, [CLS, SEP, PAD]).astype(np.int32)
  return ids, special


@functools.partial(jax.jit, static_argnames=('max_predictions',))
def _mask(rng, ids, special, max_predictions=P):
  return mlm_mask(rng, ids, special, vocab_size=VOCAB, mask_token_id=MASK,
                  max_predictions=max_predictions)


@pytest.fixture(scope='module')
def runs():
  out = []
  for i in range(100):
    ids, special = _batch(i % 10)
    res = jax.device_get(_mask(jax.random.key(i), ids, special))
    out.append((ids, special, res))
  return out


def test_selection_rate_and_80_10_10(runs):
  selected = maskable = to_mask = to_random = kept = 0
  for ids, special, res in runs:
    w = res['weights'] > 0
    selected += w.sum()
    maskable += (special == 0).sum()
    new = res['input_ids']
    to_mask += (w & (new == MASK)).sum()
    to_random += (w & (new != MASK) & (new != ids)).sum()
    kept += (w & (new == ids)).sum()
  assert selected > 30000
  assert abs(selected / maskable - 0.15) < 0.005
  # A random replacement equal to the original (1/VOCAB) or to MASK is rare: 1 point slack.
  assert abs(to_mask / selected - 0.8) < 0.01
  assert abs(to_random / selected - 0.1) < 0.01
  assert abs(kept / selected - 0.1) < 0.01


def test_per_row_counts_and_special_tokens_never_selected(runs):
  for ids, special, res in runs:
    w = res['weights'] > 0
    assert not (w & (special == 1)).any()
    n = (special == 0).sum(1)
    count = w.sum(1)
    assert ((count >= np.floor(0.15 * n)) & (count <= np.ceil(0.15 * n))).all()
    # Unselected tokens (special ones included) are untouched; labels are the originals.
    assert (res['input_ids'][~w] == ids[~w]).all()
    assert (res['labels'] == ids).all()
    assert res['input_ids'].dtype == np.int32 and res['weights'].dtype == np.float32


def test_rng_controls_the_mask():
  ids, special = _batch(0)
  a = _mask(jax.random.key(1), ids, special)
  b = _mask(jax.random.key(1), ids, special)
  c = _mask(jax.random.key(2), ids, special)
  assert all((np.asarray(a[k]) == np.asarray(b[k])).all() for k in a)
  assert not (np.asarray(a['weights']) == np.asarray(c['weights'])).all()
  assert not (np.asarray(a['input_ids']) == np.asarray(c['input_ids'])).all()


def _loss(logits, labels, weights):
  """Weighted cross-entropy sum (numpy: eager jax on [B, L, V] is slow on CPU)."""
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]
  return (nll * np.asarray(weights)).sum()


@pytest.mark.parametrize('max_predictions', [P, 5])
def test_max_predictions_consistent_with_full_outputs(max_predictions):
  ids, special = _batch(3)
  res = _mask(jax.random.key(7), ids, special, max_predictions=max_predictions)
  w, pos = np.asarray(res['weights']), np.asarray(res['masked_positions'])
  mw = np.asarray(res['masked_weights'])
  assert pos.shape == (B, max_predictions) and pos.dtype == np.int32
  assert (w.sum(1) == mw.sum(1)).all() and (w.sum(1) <= max_predictions).all()
  if max_predictions == 5:  # the cap binds where 15% of the maskable tokens exceed 5
    long_rows = (special == 0).sum(1) >= 40
    assert long_rows.sum() > B // 2 and (w.sum(1)[long_rows] == 5).all()
  for r in range(B):
    used = pos[r][mw[r] > 0]
    assert (np.diff(used) > 0).all()  # ascending, no repeats
    assert (w[r, used] == 1).all() and w[r].sum() == len(used)
  assert (np.asarray(res['masked_labels']) == np.take_along_axis(ids, pos, 1) * (mw > 0)).all()
  logits = np.random.default_rng(0).normal(size=(B, L, VOCAB)).astype(np.float32)
  full = _loss(logits, res['labels'], res['weights'])
  gathered = np.take_along_axis(logits, pos[..., None], 1)
  part = _loss(gathered, res['masked_labels'], res['masked_weights'])
  np.testing.assert_allclose(full, part, rtol=1e-5)


def test_max_predictions_longer_than_sequence():
  ids, special = _batch(4)
  res = _mask(jax.random.key(0), ids[:, :16], special[:, :16], max_predictions=20)
  assert res['masked_positions'].shape == (B, 20)
  assert (np.asarray(res['masked_weights']).sum(1) == np.asarray(res['weights']).sum(1)).all()


def test_clm_labels_shift_and_padding():
  ids = jnp.array([[5, 6, 7, 8, 0, 0]], jnp.int32)
  attn = jnp.array([[1, 1, 1, 1, 0, 0]])
  out = clm_labels(ids, attn)
  assert out['labels'].tolist() == [[6, 7, 8, 0, 0, 0]]
  assert out['weights'].tolist() == [[1, 1, 1, 0, 0, 0]]
  assert out['weights'].dtype == jnp.float32


def test_clm_boundary_masking_with_packed_segments():
  EOS = 99
  tokens = np.array([10, 11, 12, 20, 21, 30, 31, 32, 33], np.int32)
  offsets = np.array([0, 3, 5, 9])
  rows = pack_clm(tokens, offsets, 8, eos_id=EOS, pad_id=EOS)
  # doc0 EOS doc1 EOS | doc2 EOS pad...
  assert rows['input_ids'].tolist() == [[10, 11, 12, 99, 20, 21, 99, 30],
                                        [31, 32, 33, 99, 99, 99, 99, 99]]
  plain = jax.jit(clm_labels, static_argnames='mask_boundaries')(
      rows['input_ids'], rows['attention_mask'], rows['segment_ids'])
  assert plain['weights'].tolist() == [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
  masked = clm_labels(rows['input_ids'], rows['attention_mask'], rows['segment_ids'],
                      mask_boundaries=True)
  # Predicting EOS from a document's last token is kept; predicting the next document's
  # first token from EOS is not.
  assert masked['weights'].tolist() == [[1, 1, 1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
  assert masked['labels'].tolist()[0] == [11, 12, 99, 20, 21, 99, 30, 0]
  with pytest.raises(ValueError, match='segment_ids'):
    clm_labels(rows['input_ids'], rows['attention_mask'], mask_boundaries=True)


def test_unigram_baseline_counts_only_maskable_positions():
  """The pretraining bar: most frequent maskable token and the unigram entropy, with CLS /
  SEP / PAD (special or unattended) left out, exactly as masking chooses positions."""
  class Tok:
    def convert_ids_to_tokens(self, i):
      return f'tok{i}'

  ids = np.array([[CLS, 7, 7, 8, SEP, PAD], [CLS, 7, 9, SEP, PAD, PAD]])
  special = np.isin(ids, [CLS, SEP, PAD]).astype(np.int32)
  arrays = {'input_ids': ids, 'special_tokens_mask': special,
            'attention_mask': (ids != PAD).astype(np.int32)}
  base = unigram_baseline(arrays, Tok())
  p = np.array([3, 1, 1]) / 5
  assert base['token_id'] == 7 and base['token'] == 'tok7'
  np.testing.assert_allclose(base['accuracy'], 3 / 5)
  np.testing.assert_allclose(base['loss'], -(p * np.log(p)).sum())

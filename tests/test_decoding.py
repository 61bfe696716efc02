"""Decoding (jaxft.models.decoding): greedy and beam search give `transformers`' token ids on the
exported model, the KV cache gives the no-cache tokens, a left-padded batch gives what each
prompt gives alone, and the sampling warpers keep HF's token sets.

One tiny random GPT-2 (HF-built, weights set so that it does not just repeat a token and its
logits are far from ties), prompts of
different lengths, and an EOS id picked from the model's own greedy output so that rows stop
at different steps.

Compiles are what these tests cost: the settings below are shared so that each decoding
program (method, widths, cache or not, batch shape) compiles once for the whole module.
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402

from jaxft.data.completion import left_pad  # noqa: E402
from jaxft.models import decoding, hf  # noqa: E402
from jaxft.models.decoding import DecodeSettings  # noqa: E402

VOCAB, PAD, NEW = 96, 0, 12
PROMPTS = [[5, 17, 33, 41, 8, 9, 60], [71, 3], [12, 44, 90, 7], [30]]
GREEDY = dict(method='greedy')
BEAM = dict(method='beam', num_beams=3)  # length_penalty 1.0, early_stopping False
SAMPLE = dict(method='sample', temperature=1.3, top_k=20, top_p=0.9)

transformers.logging.set_verbosity_error()


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  conf = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                 pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
  torch.manual_seed(0)
  ref = transformers.GPT2LMHeadModel(conf)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # strong blocks and positions: a tied random GPT-2 otherwise repeats
    for name, p in ref.named_parameters():  # its input token forever
      p.add_(torch.randn(p.shape, generator=g) * (1.0 if 'c_' in name else 0.1))
    ref.transformer.wpe.weight.normal_(0, 0.5, generator=g)
    ref.transformer.ln_f.weight.mul_(4.0)  # logits std ~2: no near-ties for fp32 to flip
  ref.eval()
  d = str(tmp_path_factory.mktemp('gpt2'))
  ref.save_pretrained(d)
  ours, report = hf.from_pretrained(d, 'clm')
  assert not report.missing
  return ref, ours


def _hf(ref, prompts, **kw):
  """HF generate on a left-padded batch -> each row's new tokens up to its EOS (inclusive)."""
  ids, mask = left_pad(prompts, PAD)
  with torch.no_grad():
    out = ref.generate(torch.from_numpy(ids.astype(np.int64)),
                       attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       pad_token_id=PAD, max_new_tokens=NEW, **kw).numpy()
  return [_until_eos(row[ids.shape[1]:].tolist(), kw.get('eos_token_id')) for row in out]


def _until_eos(row, eos):
  return row[:row.index(eos) + 1] if eos is not None and eos in row else row


def _keys(seed: int, n: int = len(PROMPTS)):
  return jax.random.split(jax.random.key(seed), n)


def _ours(model, prompts, rng=None, **kw):
  """Decoded new tokens per prompt. `rng`: one key per prompt (the default too), so that
  calls differing only in key values share one compiled program."""
  ids, mask = left_pad(prompts, PAD)
  s = DecodeSettings(max_new_tokens=NEW, pad_token_id=PAD, **kw)
  out = decoding._decode_jit(*_split(model), ids, mask, s,
                             _keys(3, len(prompts)) if rng is None else rng)
  return decoding.strip(out['tokens'], out['length'])


def _split(model):
  from flax import nnx
  return nnx.split(model)


@pytest.fixture(scope='module')
def eos(models):
  """A token the greedy output reaches at different steps in different rows."""
  ref, _ = models
  rows = _hf(ref, PROMPTS, do_sample=False, eos_token_id=None)
  for tok in sorted({t for r in rows for t in r[2:8]}):
    firsts = [r.index(tok) if tok in r else NEW for r in rows]
    if len(set(firsts)) >= 3 and max(firsts) == NEW:
      return tok
  pytest.fail(f'no usable EOS token in {rows}')


def test_greedy_matches_transformers(models, eos):
  ref, ours = models
  want = _hf(ref, PROMPTS, do_sample=False, eos_token_id=eos)
  got = _ours(ours, PROMPTS, method='greedy', eos_token_id=eos)
  assert got == want
  assert {len(r) for r in got} != {NEW}  # some rows stopped at EOS, some ran to the limit


@pytest.mark.parametrize('beams,lp,early', [(3, 1.0, False), (4, 0.6, True), (2, 2.0, 'never')])
def test_beam_matches_transformers(models, eos, beams, lp, early):
  ref, ours = models
  want = _hf(ref, PROMPTS, do_sample=False, num_beams=beams, length_penalty=lp,
             early_stopping=early, eos_token_id=eos)
  got = _ours(ours, PROMPTS, method='beam', num_beams=beams, length_penalty=lp,
              early_stopping=early, eos_token_id=eos)
  assert got == want


def test_beam_n_best_list_is_transformers_num_return_sequences(models, eos):
  """The finished hypotheses a reranker chooses from (generate.rerank) are HF's
  num_return_sequences=num_beams, best first, with its sequence scores."""
  ref, ours = models
  ids, mask = left_pad(PROMPTS, PAD)
  with torch.no_grad():
    hf_out = ref.generate(torch.from_numpy(ids.astype(np.int64)),
                          attention_mask=torch.from_numpy(mask.astype(np.int64)), pad_token_id=PAD,
                          max_new_tokens=NEW, do_sample=False, num_beams=3, eos_token_id=eos,
                          num_return_sequences=3, return_dict_in_generate=True,
                          output_scores=True)
  want = [_until_eos(r[ids.shape[1]:].tolist(), eos) for r in hf_out.sequences.numpy()]
  s = DecodeSettings(max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=eos, **BEAM)
  out = decoding._decode_jit(*_split(ours), ids, mask, s, _keys(3))
  b, k = len(PROMPTS), 3
  got = decoding.strip(np.asarray(out['candidates']).reshape(b * k, NEW),
                       np.asarray(out['candidate_length']).reshape(-1))
  assert got == want
  assert len({tuple(r) for r in got}) == b * k  # distinct hypotheses, not copies of the best
  np.testing.assert_allclose(np.asarray(out['candidate_score']).reshape(-1),
                             hf_out.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)
  assert decoding.strip(out['tokens'], out['length']) == got[::k]  # candidate 0 is the output


@pytest.mark.parametrize('kw', [GREEDY, BEAM, SAMPLE])
def test_cache_equals_no_cache(models, eos, kw):
  _, ours = models
  cached = _ours(ours, PROMPTS, eos_token_id=eos, **kw)
  plain = _ours(ours, PROMPTS, eos_token_id=eos, use_cache=False, **kw)
  assert cached == plain


@pytest.mark.parametrize('kw', [BEAM, SAMPLE])
def test_batch_equals_one_at_a_time(models, eos, kw):
  """The prompt with the most left padding in the batch, alone (greedy: the HF comparison
  above is already on a left-padded batch)."""
  _, ours = models
  keys = _keys(7)  # one key per prompt
  batch = _ours(ours, PROMPTS, eos_token_id=eos, rng=keys, **kw)
  assert batch[3] == _ours(ours, [PROMPTS[3]], eos_token_id=eos, rng=keys[3:], **kw)[0]


def test_sampling_is_seeded_and_top_k_1_is_greedy(models, eos):
  _, ours = models
  a, b, c = (_ours(ours, PROMPTS, eos_token_id=eos, rng=_keys(k), **SAMPLE) for k in (1, 1, 2))
  assert a == b and a != c
  assert _ours(ours, PROMPTS, eos_token_id=eos, **{**SAMPLE, 'top_k': 1}) == \
      _ours(ours, PROMPTS, eos_token_id=eos, **GREEDY)


@pytest.mark.parametrize('temperature,top_k,top_p', [(0.7, 10, 1.0), (1.0, 0, 0.8),
                                                     (1.5, 30, 0.5), (1.0, 0, 0.01)])
def test_warpers_keep_the_tokens_transformers_keeps(temperature, top_k, top_p):
  from transformers.generation import logits_process as lp
  logits = np.random.RandomState(0).randn(4, VOCAB).astype(np.float32) * 3
  procs = [lp.TemperatureLogitsWarper(temperature)]
  if top_k:
    procs.append(lp.TopKLogitsWarper(top_k))
  if top_p < 1:
    procs.append(lp.TopPLogitsWarper(top_p))
  want = torch.from_numpy(logits)
  for p in procs:
    want = p(None, want)
  got = np.asarray(decoding.warp_logits(logits, temperature, top_k, top_p))
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want.numpy()))
  kept = np.isfinite(got)
  np.testing.assert_allclose(got[kept], want.numpy()[kept], rtol=1e-6)


def test_generate_keeps_the_prompt_and_checks_lengths(models):
  _, ours = models
  out = decoding.generate(ours, np.array([[5, 6, 7]]), 4)
  assert out.shape == (1, 7) and out[0, :3].tolist() == [5, 6, 7]
  with pytest.raises(ValueError, match='max_position_embeddings=64'):
    decoding.generate(ours, np.zeros((1, 60), np.int32), 8)
  with pytest.raises(ValueError, match="early_stopping='sometimes'"):
    DecodeSettings(early_stopping='sometimes')


def test_soft_prompt_decodes_the_same_with_and_without_cache(models, eos):
  """Prompt tuning: the cache starts with the soft prompt's keys/values (PeftModel.init_cache);
  without the cache the prompt is prepended to the whole sequence each step. Beam search:
  the cache rows, soft prompt included, are tiled per beam and reordered every step."""
  import copy

  from jaxft.peft.config import PeftConfig
  from jaxft.peft.modules import inject
  _, ours = models
  prompted = inject(copy.deepcopy(ours), PeftConfig(methods=('prompt',), prompt_length=3))
  prompted.prompt.value = np.random.RandomState(5).randn(*prompted.prompt.shape).astype(
      np.float32) * 2.0
  kw = dict(eos_token_id=eos, **BEAM)
  cached = _ours(prompted, PROMPTS, **kw)
  assert cached == _ours(prompted, PROMPTS, use_cache=False, **kw)
  assert cached != _ours(ours, PROMPTS, **kw)  # the prompt changes the output

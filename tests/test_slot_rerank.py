"""The slot matcher accepts the paraphrases the E2E cleaning conventions accept (and still
counts real errors), and slot-aware reranking of beam search's n-best list picks the
candidate with the fewest slot errors (hand-made candidates, no training)."""
import os

import numpy as np
import pytest

from jaxft.data.tokenizer import load_tokenizer
from jaxft.generation import DecodingSection, output_texts
from jaxft.train import slot_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (prompt, an E2E development-set reference, the errors a person counts); each of the first
# eight was counted as an error before the matcher followed the E2E cleaning conventions
# (Dusek et al. 2019, tuetschek/e2e-cleaning slot_error.py): number words, 'rates',
# 'starred', 'standard' / 'satisfaction', 'highly priced', 'kid unfriendly', 'all ages'.
HAND_COUNTED = [
    ('name[Wildwood], customer rating[average]',
     'Wildwood has a customer rating of three out of five.', set()),
    ('name[Wildwood], customer rating[1 out of 5]',
     'Wildwood has been rated by customers as being a one out of a possible five.', set()),
    ('name[Aromi], customer rating[average], area[riverside], familyFriendly[no]',
     'Aromi is located in the riverside area. Rated average. kid unfriendly', set()),
    ('name[Aromi], customer rating[average], area[riverside]',
     'Aromi, family friendly, rates average in the riverside area.',
     {'added familyFriendly[yes]'}),
    ('name[Wildwood], priceRange[high], customer rating[5 out of 5]',
     'Wildwood is a five-starred, highly priced coffee shop.', {'added eatType[coffee shop]'}),
    ('name[Wildwood], priceRange[high]', 'The Wildwood is a high- price venue.', set()),
    ('name[Aromi], customer rating[high], familyFriendly[yes]',
     'Aromi is of high standard and opened to all age groups.', set()),
    ('name[Travellers Rest Beefeater], customer rating[high]',
     'Customer satisfaction is high at Travellers Rest Beefeater.', set()),
    # real errors stay errors
    ('name[Wildwood], customer rating[1 out of 5]', 'Wildwood, near Ranch. Good ratings.',
     {'wrong customer rating[1 out of 5]'}),
    ('name[Aromi], familyFriendly[yes], area[riverside]',
     'Aromi is in the Riverside area, it is not child friendly.', {'wrong familyFriendly[yes]'}),
    ('name[Aromi], area[riverside]', 'Aromi is located north of the City center.',
     {'wrong area[riverside]'}),
    ('name[Wildwood], priceRange[cheap]', 'Wildwood is a medium-priced coffee shop.',
     {'wrong priceRange[cheap]', 'added eatType[coffee shop]'}),
    ('name[Aromi], customer rating[average]', 'Aromi is an average coffee shop.',
     {'missing customer rating[average]', 'added eatType[coffee shop]'}),  # average what?
]


def test_paraphrases_are_matched_and_real_errors_counted_as_by_hand():
  prompts, texts, expected = zip(*HAND_COUNTED)
  scores, failing = slot_errors.slot_error_rate(prompts, texts)
  got = {i: {f'{e.kind} {e.slot}[{e.value}]' for e in errors} for i, errors in failing}
  assert got == {i: e for i, e in enumerate(expected) if e}
  # 32 slot values; 1 missing + 4 wrong + 4 added, counted by hand above
  assert scores == {'slot_error_rate': 100 * 9 / 32, 'slots': 32.0, 'slot_missing': 1.0,
                    'slot_wrong': 4.0, 'slot_added': 4.0}


def test_fewest_errors_picks_the_first_candidate_with_the_fewest():
  prompt = 'name[Aromi], eatType[pub], area[riverside], familyFriendly[yes]'
  candidates = ['Aromi is a pub.',                                    # 2 missing
                'Aromi is a pub by the river.',                       # 1 missing
                'Aromi is a kid friendly pub by the river.',          # 0
                'Aromi is a family friendly pub in the riverside.']   # 0, a lower beam score
  assert slot_errors.fewest_errors(prompt, candidates) == 2
  assert slot_errors.fewest_errors(prompt, candidates[:2]) == 1
  assert slot_errors.fewest_errors(prompt, candidates[3:] + candidates[:3]) == 0  # ties: first
  assert slot_errors.fewest_errors('Write about a pub.', candidates) == 0  # free text: the best


@pytest.fixture(scope='module')
def tok():
  return load_tokenizer(os.path.join(REPO, 'data', 'tokenizers', 'gpt2'))


def _n_best(tok, rows, width=16):
  """Beam-search-shaped arrays from candidate texts: rows of (text, score) per prompt,
  each text ending in EOS; score -inf = a slot no hypothesis filled."""
  b, k = len(rows), len(rows[0])
  cands = np.zeros((b, k, width), np.int32)
  lens = np.zeros((b, k), np.int32)
  scores = np.full((b, k), -np.inf, np.float32)
  for i, row in enumerate(rows):
    for j, (text, score) in enumerate(row):
      ids = tok.encode(' ' + text) + [tok.eos_token_id]
      cands[i, j, :len(ids)], lens[i, j], scores[i, j] = ids, len(ids), score
  return {'tokens': cands[:, 0], 'length': lens[:, 0], 'candidates': cands,
          'candidate_length': lens, 'candidate_score': scores}


def test_rerank_chooses_among_the_finished_hypotheses_with_values_put_back(tok):
  prompts = ['name[Zizzi], eatType[pub], familyFriendly[no], near[The Bakers]',
             'name[Cotto], area[city centre]',
             'Write about a pub.']
  out = _n_best(tok, [
      [('X-name is a pub.', -1.0), ('X-name is a pub near X-near. No kids.', -2.0),
       ('X-name is a pub near X-near.', -3.0)],
      [('X-name is in the city centre.', -0.5), ('X-name is by the river.', -0.7),
       ('X-name is in the city centre. Adults only.', -np.inf)],  # never filled: skipped
      [('A pub.', -0.1), ('The Eagle is a pub.', -0.2), ('Pubs.', -0.3)]])
  delex = ('name', 'near')
  assert output_texts(tok, out, prompts, delex) == [
      'Zizzi is a pub.', 'Cotto is in the city centre.', 'A pub.']  # no rerank: the best
  assert output_texts(tok, out, prompts, delex, 'slot_errors') == [
      'Zizzi is a pub near The Bakers. No kids.', 'Cotto is in the city centre.', 'A pub.']
  greedy = {k: out[k] for k in ('tokens', 'length')}  # no n-best list: nothing to choose
  assert output_texts(tok, greedy, prompts, delex, 'slot_errors')[0] == 'Zizzi is a pub.'


def test_rerank_is_a_beam_search_setting():
  assert DecodingSection(method='beam', rerank='slot_errors').decode_settings().method == 'beam'
  with pytest.raises(ValueError, match="generate.method='beam'"):
    DecodingSection(method='greedy', rerank='slot_errors')
  with pytest.raises(ValueError, match='generate.rerank'):
    DecodingSection(method='beam', rerank='bleu')

"""(prompt, completion) data and the LM fine-tuning objective: readers name file/line/column,
the validation split is by prompt, labels score the completion only, the loss equals a
hand-computed one, packed rows give the loss of unpacked rows, and generation metrics are
sacrebleu's / rouge-score's multi-reference numbers.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.data import completion as lm
from jaxft.data.splits import IGNORE_INDEX
from jaxft.data.tokenizer import load_tokenizer
from jaxft.models import build_model, gpt2_defaults
from jaxft.objectives.completion import completion_objective, target_positions
from jaxft.train import slot_errors
from jaxft.train.metrics import generation_metrics
from jaxft.train.state import ModelDef

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = os.path.join(REPO, 'data', 'e2e', 'devset-slice.csv')


@pytest.fixture(scope='module')
def tok():
  return load_tokenizer(os.path.join(REPO, 'data', 'tokenizers', 'gpt2'))


# ------------------------------------------------------------------------------- readers

def test_reads_the_bundled_e2e_slice():
  pairs = lm.read_pairs_file(SLICE, prompt_column='mr', completion_column='ref')
  prompts, refs, sources = lm.group_by_prompt(pairs)
  assert len(pairs) == 413 and len(prompts) == 46
  assert sum(len(r) for r in refs) == 413
  assert prompts[0].startswith('name[Alimentum]') and sources[0] == f'{SLICE}:2'


@pytest.mark.parametrize('fmt', ['csv', 'tsv', 'jsonl'])
def test_formats_agree_and_prompts_only_files_read(tmp_path, fmt):
  rows = [('a[1], b[2]', 'One two.'), ('c[3]', 'Three.')]
  path = tmp_path / f'x.{fmt}'
  if fmt == 'jsonl':
    path.write_text(''.join(json.dumps({'p': p, 'c': c}) + '\n' for p, c in rows))
  else:
    sep = ',' if fmt == 'csv' else '\t'
    quote = (lambda s: f'"{s}"') if fmt == 'csv' else (lambda s: s)
    path.write_text(f'p{sep}c\n' + ''.join(f'{quote(p)}{sep}{c}\n' for p, c in rows))
  pairs = lm.read_pairs_file(path, prompt_column='p', completion_column='c')
  assert list(zip(pairs.prompts, pairs.completions)) == rows
  only = lm.read_pairs_file(path, prompt_column='p', completion_column='zzz',
                            require_completion=False) if fmt != 'jsonl' else None
  assert only is None or (only.prompts == [p for p, _ in rows] and only.completions is None)
  txt = tmp_path / 'x.txt'
  txt.write_text('first prompt\n\nsecond prompt\n')
  got = lm.read_pairs_file(txt, require_completion=False)
  assert got.prompts == ['first prompt', 'second prompt'] and got.sources[1].endswith(':3')


def test_hf_datasets_source(tmp_path):
  import datasets
  rows = {'mr': ['a[1]', 'a[1]', 'b[2]', ''], 'ref': ['One.', 'Uno.', 'Two.', 'x']}
  datasets.DatasetDict({'train': datasets.Dataset.from_dict(rows),
                        'validation': datasets.Dataset.from_dict({'mr': ['c[3]'], 'ref': ['Three.']})}
                       ).save_to_disk(str(tmp_path / 'ds'))
  cfg = lm.CompletionData(source='hf', hf_path=str(tmp_path / 'ds'), prompt_column='mr',
                          completion_column='ref', on_bad_row='skip')
  train, dev, info = lm.load_splits(cfg)
  assert train.prompts == ['a[1]', 'a[1]', 'b[2]'] and train.completions[1] == 'Uno.'
  assert dev.prompts == ['c[3]'] and info['n_train_prompts'] == 2
  assert train.sources[2].endswith('[train][row 2]')
  cfg = dataclasses.replace(cfg, on_bad_row='error')
  with pytest.raises(ValueError, match=r"\[train\]\[row 3\]: empty prompt in column 'mr'"):
    lm.load_splits(cfg)


def test_bad_rows_name_file_line_and_column(tmp_path):
  path = tmp_path / 'bad.csv'
  path.write_text('mr,ref\n"a[1]",fine\n"b[2]",\n')
  with pytest.raises(ValueError, match=r"bad.csv:3: empty completion in column 'ref'"):
    lm.read_pairs_file(path, prompt_column='mr', completion_column='ref')
  assert len(lm.read_pairs_file(path, prompt_column='mr', completion_column='ref',
                                on_bad_row='skip')) == 1
  with pytest.raises(ValueError, match=r"bad.csv:1: data.prompt_column='prompt' is not a column"):
    lm.read_pairs_file(path)
  js = tmp_path / 'bad.jsonl'
  js.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": "x"\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:2: invalid JSON'):
    lm.read_pairs_file(js)


def test_generate_input_with_references_on_some_rows_only_is_refused(tmp_path):
  """generate's input: references on every row (scored) or on none (prompts only). A jsonl
  whose first row has no completion and later rows do is refused naming that row, as the
  reverse order is, never read as prompts only (which dropped every reference)."""
  from jaxft.files import InputError  # the command line's one-line error, exit 2
  from jaxft.stages import generate
  ts = generate.text_settings(generate.GenerateData(prompt_column='p', completion_column='c'),
                              {})
  mixed = tmp_path / 'mixed.jsonl'
  mixed.write_text('{"p": "a[1]"}\n{"p": "b[2]", "c": "Two."}\n{"p": "c[3]", "c": "Three."}\n')
  with pytest.raises(InputError, match=r"mixed.jsonl:1: no 'c' \(a reference\) on this row, "
                                       r'but 2 of the 3 rows have one'):
    generate.read_inputs(str(mixed), ts)
  mixed.write_text('{"p": "b[2]", "c": "Two."}\n{"p": "a[1]"}\n')
  with pytest.raises(InputError, match=r"mixed.jsonl:2: no 'c' .* but 1 of the 2 rows"):
    generate.read_inputs(str(mixed), ts)
  only = tmp_path / 'only.jsonl'
  only.write_text('{"p": "a[1]"}\n{"p": "b[2]"}\n')
  assert generate.read_inputs(str(only), ts)[:2] == (['a[1]', 'b[2]'], None)
  full = tmp_path / 'full.jsonl'
  full.write_text('{"p": "a[1]", "c": "One."}\n{"p": "a[1]", "c": "Uno."}\n')
  assert generate.read_inputs(str(full), ts)[:2] == (['a[1]'], [['One.', 'Uno.']])


@pytest.mark.parametrize('suffix', ['.csv', '.jsonl', '.txt'])
def test_bytes_that_are_not_utf8_are_named_not_a_traceback(tmp_path, suffix):
  """A Latin-1 'é' (0xe9) in row 2 is a bad row named by file, line and byte; skip counts it."""
  rows = {'.csv': [b'prompt,completion', b'a,b', b'caf\xe9,c', b'd,e'],
          '.jsonl': [b'{"prompt": "a", "completion": "b"}',
                     b'{"prompt": "caf\xe9", "completion": "c"}',
                     b'{"prompt": "d", "completion": "e"}'],
          '.txt': [b'a', b'caf\xe9', b'd']}[suffix]
  path = tmp_path / f'latin1{suffix}'
  path.write_bytes(b'\n'.join(rows) + b'\n')
  line = 3 if suffix == '.csv' else 2
  with pytest.raises(ValueError, match=rf'latin1{suffix}:{line}: invalid UTF-8 byte 0xe9'):
    lm.read_pairs_file(path, require_completion=suffix != '.txt')
  pairs = lm.read_pairs_file(path, on_bad_row='skip', require_completion=suffix != '.txt')
  assert pairs.prompts == ['a', 'd']


def test_dev_split_is_by_prompt_never_by_row():
  pairs = lm.read_pairs_file(SLICE, prompt_column='mr', completion_column='ref')
  train, dev = lm.split_by_prompt(pairs, 0.2, seed=0)
  assert not set(train.prompts) & set(dev.prompts)
  assert len(train) + len(dev) == len(pairs)
  assert len(set(dev.prompts)) == round(0.2 * 46)
  for p in set(dev.prompts):  # every row of a dev prompt is in dev
    assert dev.prompts.count(p) == pairs.prompts.count(p)
  again = lm.split_by_prompt(pairs, 0.2, seed=0)[1]
  assert again.prompts == dev.prompts


def test_hold_out_by_a_field_never_puts_a_value_on_both_sides():
  pairs = lm.read_pairs_file(SLICE, prompt_column='mr', completion_column='ref')
  names = {lm.slot_value(p, 'name') for p in pairs.prompts}
  for seed in range(5):
    train, dev = lm.split_by_field(pairs, 'name', 0.2, seed)
    train_names = {lm.slot_value(p, 'name') for p in train.prompts}
    dev_names = {lm.slot_value(p, 'name') for p in dev.prompts}
    assert dev_names and train_names and not train_names & dev_names
    assert train_names | dev_names == names and len(train) + len(dev) == len(pairs)
    assert len(set(dev.prompts)) >= round(0.2 * 46)  # whole names until the share is reached
    for p in set(dev.prompts):  # every row of a held-out prompt is held out
      assert dev.prompts.count(p) == pairs.prompts.count(p)
  assert lm.split_by_field(pairs, 'name', 0.2, 4)[1].prompts == dev.prompts  # seeded
  # a prompt without the field is a group of its own; a field no prompt has is an error
  mixed = lm.Pairs(['name[A], x[1]', 'name[A], x[2]', 'name[B], x[1]', 'free text', 'x[3]'],
                   list('abcde'), [f'f:{i}' for i in range(5)])
  for seed in range(6):
    train, dev = lm.split_by_field(mixed, 'name', 0.4, seed)
    assert not {lm.slot_value(p, 'name') for p in train.prompts} & \
        {lm.slot_value(p, 'name') for p in dev.prompts} - {None}
  with pytest.raises(lm.InputError, match=r"f:0: data.dev_holdout_field='nmae': no prompt"):
    lm.split_by_field(mixed, 'nmae', 0.4, 0)
  data = lm.CompletionData(path=os.path.dirname(SLICE), train_file='devset-slice.csv',
                           prompt_column='mr', completion_column='ref', dev_fraction=0.2,
                           dev_holdout_field='name')
  train, dev, info = lm.load_splits(data)
  assert not {lm.slot_value(p, 'name') for p in train.prompts} & \
      {lm.slot_value(p, 'name') for p in dev.prompts}


def test_slot_prompts_parse_and_free_text_does_not():
  assert lm.parse_slots('name[The Eagle], customer rating[5 out of 5]') == [
      ('name', 'The Eagle'), ('customer rating', '5 out of 5')]
  assert lm.parse_slots('Summarize: a text [1] with brackets') is None
  assert lm.parse_slots('name[A] and more') is None


# Values with regex, format and template characters, a backslash group reference, a value
# that holds another, and one equal to another slot's value.
TRICKY = ['C++ & $1 (.*) [x]', r'A\1 {prompt} {0} %s', 'The Eagle', 'Eagle', '^$|?', 'X_name']


@pytest.mark.parametrize('name,near', [(TRICKY[0], TRICKY[1]), (TRICKY[2], TRICKY[3]),
                                       (TRICKY[3], TRICKY[2]), (TRICKY[4], TRICKY[4]),
                                       (TRICKY[5], 'Burger King')])
def test_delexicalisation_round_trips_every_value(name, near):
  # ']' cannot be in a value of a `slot[value]` prompt: it ends the value
  name, near = name.replace('[x]', '(x)'), near.replace('[x]', '(x)')
  delex = lm.Delexicalizer(('name', 'near'))
  prompt = f'name[{name}], food[French], near[{near}]'
  text = f'{name} serves French food near {near}; {name}, again. Not {name[:2]}.'
  dp, values = delex.prompt(prompt)
  assert dp == 'name[X-name], food[French], near[X-near]' or name == near
  assert name not in dp.replace('X-name', '').replace('X-near', '') or name in 'French'
  dt = delex.completion(text, values)
  assert 'X-name' in dt and name not in dt.replace('X-name', '').replace('X-near', '')
  assert delex.put_back(dt, values) == text
  assert delex.put_back(dp, values) == prompt
  assert lm.format_prompt(dp, '{prompt} ||') == dp + ' ||'
  # the pairs the model trains on, and the prompts it decodes, are delexicalised alike
  pairs = lm.delexicalize_pairs(lm.Pairs([prompt], [text], ['f:2']), ('name', 'near'))
  assert pairs.prompts == [dp] and pairs.completions == [dt]


def test_delexicalisation_refuses_text_holding_a_placeholder_and_leaves_free_text():
  delex = lm.Delexicalizer(('name',))
  with pytest.raises(lm.InputError, match=r"f:7: the text holds 'X-name'"):
    lm.delexicalize_pairs(lm.Pairs(['name[A]'], ['X-name is A.'], ['f:7']), ('name',))
  assert delex.prompt('free text about name[A') == ('free text about name[A', {})
  assert delex.prompt('name[A], near[B]') == ('name[X-name], near[B]', {'X-name': 'A'})
  assert delex.put_back('X-near is X-name.', {'X-name': 'A'}) == 'X-near is A.'
  assert lm.Delexicalizer(('customer rating',)).prompt('customer rating[high]')[0] == \
      'customer rating[X-customer_rating]'
  with pytest.raises(ValueError, match='data.delexicalize'):
    lm.CompletionData(delexicalize=('name[',))


HAND_COUNTED = [  # (prompt, output, errors counted by hand)
    ('name[Blue Spice], eatType[coffee shop], area[city centre]',
     'The Mill is a coffee shop located near the city centre near The Portland Arms. Its '
     'customer rating is low.',
     {'wrong name[Blue Spice]', 'added near[the portland arms]', 'added customer rating[low]'}),
    ('name[The Eagle], eatType[pub], food[French], priceRange[cheap], customer rating[5 out of '
     '5], familyFriendly[no], near[Burger King]',
     'The Eagle is a cheap restaurant near Burger King serving French food. It is not '
     'family-friendly and has a customer rating of 5 out of 5.', {'missing eatType[pub]'}),
    ('name[Alimentum], area[city centre], familyFriendly[no]',
     "Alimentum is a family-friendly Italian restaurant in the city centre.",
     {'wrong familyFriendly[no]', 'added food[italian]'}),
    ('name[Cotto], priceRange[less than £20], customer rating[average], area[riverside]',
     'Cotto is a low-priced venue by the river with an average customer rating.', set()),
    ('name[Zizzi], eatType[coffee shop], priceRange[more than £30]',
     "Zizzi is a coffee shop that isn't expensive. Kids are not welcome.",
     {'missing priceRange[more than £30]', 'added familyFriendly[no]'}),
    ('Write about a cafe.', 'Zizzi is a pub.', set()),  # free text: not scored
]


def test_slot_error_rate_equals_a_hand_count():
  prompts, texts, expected = zip(*HAND_COUNTED)
  known = slot_errors.known_values(prompts + ('name[The Mill], near[The Portland Arms]',))
  scores, failing = slot_errors.slot_error_rate(prompts, texts, known)
  got = {i: {f'{e.kind} {e.slot}[{e.value}]' for e in errors} for i, errors in failing}
  assert got == {i: e for i, e in enumerate(expected) if e}
  # 20 slot values in the five structured prompts; 2 missing + 2 wrong + 4 added
  assert scores == {'slot_error_rate': 100 * 8 / 20, 'slots': 20.0, 'slot_missing': 2.0,
                    'slot_wrong': 2.0, 'slot_added': 4.0}
  report = slot_errors.report_text(prompts, texts, failing, scores)
  assert report.startswith('slot error rate 40.00% = (2 missing + 2 wrong + 4 added) / 20')
  assert "- wrong name[Blue Spice] (the text says 'the mill')" in report
  assert slot_errors.slot_error_rate(['free text'], ['x']) == ({}, [])


def test_each_scale_value_is_matched_by_its_class_and_negation_flips_family():
  cases = [('priceRange[£20-25]', 'It is moderately priced.', 0),
           ('priceRange[moderate]', 'Prices are between £20-25.', 0),
           ('priceRange[cheap]', 'It is expensive.', 1),
           ('customer rating[1 out of 5]', 'It has a low customer rating.', 0),
           ('customer rating[high]', 'Customers rate it 5 out of 5.', 0),
           ('customer rating[high]', 'It is rated low but has high prices.', 2),  # + price
           ('familyFriendly[yes]', 'It is child friendly.', 0),
           ('familyFriendly[no]', 'It does not allow children.', 0),
           ('familyFriendly[no]', 'It is a non family-friendly pub.', 1),  # pub added
           ('eatType[restaurant]', 'It is a pub.', 1),
           ('name[Café Sicilia]', 'Café Sicilia serves coffee.', 0),  # a name is no café
           ('food[Thai]', 'It serves thai dishes.', 0)]  # no pattern: matched literally
  for prompt, text, n in cases:
    assert len(slot_errors.slot_errors(prompt, text)[1]) == n, (prompt, text)


# ----------------------------------------------------------------------------------- rows

def test_labels_score_the_completion_and_eos_only(tok):
  pairs = lm.Pairs(['name[X]'], ['Hello there.'], ['t:1'])
  (ex,), _ = lm.encode_pairs(pairs, tok, template='{prompt} ||', max_len=32)
  p, c = ex
  assert p == tok('name[X] ||')['input_ids'] and c == tok(' Hello there.')['input_ids'] + [50256]
  rows = lm.build_rows([ex], max_len=32, pad_id=50256)
  ids, labels = rows['input_ids'][0], rows['labels'][0]
  n = len(p) + len(c)
  # position t predicts t + 1: the last prompt position predicts the first completion token
  want = [IGNORE_INDEX] * (len(p) - 1) + c + [IGNORE_INDEX] * (32 - n + 1)
  assert labels.tolist() == want
  assert rows['attention_mask'][0].sum() == n and (ids[n:] == 50256).all()
  with_prompt = lm.build_rows([ex], max_len=32, pad_id=50256, loss_on_prompt=True)['labels'][0]
  assert with_prompt[:n - 1].tolist() == (p + c)[1:]


def test_truncation_modes(tok):
  pairs = lm.Pairs(['a'], [' '.join(['word'] * 40)], ['f.csv:7'])
  (ex,), stats = lm.encode_pairs(pairs, tok, max_len=16)
  assert len(ex[0]) + len(ex[1]) == 16 and stats['n_truncated'] == 1
  assert lm.encode_pairs(pairs, tok, max_len=16, truncation='skip')[0] == []
  with pytest.raises(ValueError, match=r'f.csv:7: 1 prompt \+ 41 completion tokens > data.max_len=16'):
    lm.encode_pairs(pairs, tok, max_len=16, truncation='error')


def test_packing_layout():
  exs = [([1, 2], [3, 4]), ([5], [6, 7, 8]), ([9, 10, 11], [12])]
  rows = lm.build_rows(exs, max_len=8, pad_id=0, packing=True)
  assert rows['input_ids'].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0, 0, 0]]
  assert rows['segment_ids'].tolist() == [[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]]
  assert rows['position_ids'].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 0, 0, 0, 0]]
  x = IGNORE_INDEX  # no target crosses from one example into the next
  assert rows['labels'].tolist() == [[x, 3, 4, x, 6, 7, 8, x], [x, x, 12, x, x, x, x, x]]


# ------------------------------------------------------------------------------ objective

@pytest.fixture(scope='module')
def model():
  """One layer with seeded normal weights set from numpy: no initializer is compiled (eager
  init compiles every initializer op by op, a jitted one is a large program)."""
  cfg = gpt2_defaults(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                      intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
  model_def = ModelDef.create(lambda: build_model(cfg, 'clm', seed=3))
  rng = np.random.RandomState(3)
  return model_def.merge(jax.tree.map(
      lambda x: (rng.standard_normal(x.shape) * 0.3).astype(x.dtype),
      model_def.abstract_params))


EXAMPLES = [([5, 6, 7], [8, 9, 2]), ([10, 11], [12, 13, 14, 2]), ([15], [16, 2]),
            ([17, 18, 19, 20], [21, 2])]


def _loss(model, rows, **kw):
  obj = completion_objective(**kw)
  graphdef, state = nnx.split(model)
  loss_sum, sums = jax.jit(lambda s, b: obj.loss(nnx.merge(graphdef, s), b, None, True))(
      state, {k: jnp.asarray(v) for k, v in rows.items()})
  return float(loss_sum), float(sums['weight'])


def test_masked_prompt_loss_equals_hand_computed(model):
  rows = lm.build_rows(EXAMPLES[:2], max_len=10, pad_id=0)
  graphdef, state = nnx.split(model)
  logits = np.asarray(jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m)['logits'])(
      state, rows['input_ids'], rows['attention_mask']), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  # row 0 = 5 6 7 | 8 9 2: positions 2, 3, 4 predict 8, 9, 2
  # row 1 = 10 11 | 12 13 14 2: positions 1..4 predict 12, 13, 14, 2
  hand = -(logp[0, 2, 8] + logp[0, 3, 9] + logp[0, 4, 2]
           + logp[1, 1, 12] + logp[1, 2, 13] + logp[1, 3, 14] + logp[1, 4, 2])
  for max_targets in (None, 8):  # all positions, or the scored ones gathered
    loss_sum, weight = _loss(model, rows, max_targets=max_targets)
    assert weight == 7
    np.testing.assert_allclose(loss_sum, hand, rtol=2e-6)


def test_packing_gives_the_loss_of_unpacked_rows(model):
  plain = lm.build_rows(EXAMPLES, max_len=8, pad_id=0)
  packed = lm.build_rows(EXAMPLES, max_len=16, pad_id=0, packing=True)
  assert len(packed['input_ids']) == 2 and packed['segment_ids'].max() == 3
  a, wa = _loss(model, plain)
  b, wb = _loss(model, packed, max_targets=lm.max_targets(packed))
  assert wa == wb == 11
  # fp32 sums of the same 12 terms computed in differently shaped programs
  np.testing.assert_allclose(b, a, rtol=1e-5)
  # without the segment mask and restarted positions it would not be the same loss
  leaky = {k: v for k, v in packed.items() if k not in ('segment_ids', 'position_ids')}
  assert abs(_loss(model, leaky)[0] - a) > 1e-3 * a


def test_target_positions_gather_the_scored_labels_in_order(model):
  labels = jnp.array([[-100, 4, 5, -100, 6], [-100, -100, -100, 7, -100]])
  assert target_positions(labels, 3).tolist() == [[1, 2, 4], [3, 0, 1]]
  rows = lm.build_rows(EXAMPLES[:2], max_len=10, pad_id=0)  # 3 and 4 targets
  assert lm.max_targets(rows, multiple=1) == 4
  assert np.isnan(_loss(model, rows, max_targets=3)[0])  # never a quietly smaller loss


# --------------------------------------------------------------------------------- metrics

def test_generation_metrics_multi_reference():
  import sacrebleu
  hyps = ['the eagle is a cheap pub', 'cotto serves french food']
  refs = [['The Eagle is a cheap pub.', 'the eagle is a pub'], ['Cotto serves French food.']]
  m = generation_metrics(hyps, refs)
  want = sacrebleu.corpus_bleu(hyps, [['The Eagle is a cheap pub.', 'Cotto serves French food.'],
                                      ['the eagle is a pub', None]]).score
  assert m['bleu'] == pytest.approx(want)
  assert m['rouge_l'] == pytest.approx(100.0)  # the best reference of each, lowercased: exact
  assert 0 < m['chrf'] < 100
  assert generation_metrics(['a b c'], [['x y z']])['bleu'] == 0.0
  with pytest.raises(ValueError, match='hypothesis 0 has no reference'):
    generation_metrics(['a'], [[]])

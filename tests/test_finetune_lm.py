"""Stages `finetune_lm` and `generate` on the bundled E2E slice, run as from the command line
(`jaxft.main.run_stage` with configs/finetune_lm.py:tiny, shrunk further): validation decodes
every dev MR inside the eval step and scores it; generate writes one line per distinct MR
from the workdir and from its HF export, with the same text; a workdir and its export hold
the same parameters; a run from the HF export (bf16, gradient accumulation, packing,
dropout) preempted mid-way resumes to bit-identical parameters and losses; a PEFT run (LoRA
and a soft prompt, decoded through the KV cache) trains and generates.

Compiles are what these tests cost: the module shares one trained workdir, and an on-disk
XLA cache (module-scoped) lets reruns of the same program (a resumed run, its reference
run) load their executables instead of compiling them again.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxft import checkpointing, sources
from jaxft.data import completion as lm
from jaxft.main import run_stage
from jaxft.models import build_model
from jaxft.train import slot_errors
from jaxft.train.state import ModelDef
from stage_runs import REPO, config, lines, stop_after

SLICE = str(REPO / 'data' / 'e2e' / 'devset-slice.csv')




def lm_config(**train):
  """The tiny recipe, shrunk: packed rows, dropout, greedy validation of 8 new tokens;
  checkpoints only when the best changes, on preemption and at the end (saves are slow)."""
  c = config('finetune_lm', 'tiny')
  c.data.update(max_len=96, packing=True)
  c.model.hidden_dropout = 0.1  # a resumed run must redraw the same dropout masks
  c.generate.max_new_tokens = 8
  c.train.update(**{'num_steps': 6, 'batch_size': 8, 'eval_every': 3, 'log_every': 1, **train})
  c.checkpoint.update(every=0, async_save=False)
  return c


def gen_config(init_from, **gen):
  c = config('generate')
  c.init_from = str(init_from)
  c.generate.update(**{'input': SLICE, 'max_new_tokens': 8, 'batch_size': 8, **gen})
  return c






@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The module's workdir, trained with packing and dropout the way a preempted run is: 6
  steps, preempted after step 4 (the loop saves and returns), rerun to the end (it resumes
  at 4). Returns (workdir, its results, the results of the preempted half)."""
  wd = tmp_path_factory.mktemp('lm') / 'run'
  with pytest.MonkeyPatch.context() as m:
    m.setattr(checkpointing.PreemptionGuard, 'should_stop', stop_after(4))
    first = run_stage(lm_config(), str(wd))
  return wd, run_stage(lm_config(), str(wd)), first


def test_validation_decodes_every_dev_mr_and_scores_it(trained):
  wd, r, _ = trained
  assert [h['step'] for h in r['history']] == [3, 6]
  for h in r['history']:
    assert {'eval/loss', 'eval/bleu', 'eval/chrf', 'eval/rouge_l', 'eval/slot_error_rate',
            'eval/slot_missing', 'eval/slot_wrong', 'eval/slot_added'} <= set(h)
    assert 0 < h['eval/gen_length'] <= 8
  assert r['best']['metric'] == 'bleu' and r['best']['restored_step'] in (3, 6)
  gens = lines(wd / 'generations.jsonl')
  assert len(gens) == r['data']['n_dev_prompts'] == 11  # one line per distinct dev MR
  assert all(set(g) == {'input', 'text'} and g['input'].startswith('name[') for g in gens)
  # held out by restaurant name (the recipe's data.dev_holdout_field): no name on both sides
  train = lm.read_pairs_file(SLICE, prompt_column='mr', completion_column='ref').prompts
  dev_names = {lm.slot_value(g['input'], 'name') for g in gens}
  assert not dev_names & {lm.slot_value(p, 'name') for p in train if p not in
                          {g['input'] for g in gens}}
  # delexicalised: the model writes X-name / X-near, the texts hold the MR's values instead
  assert not any('X-name' in g['text'] or 'X-near' in g['text'] for g in gens)
  report = (wd / 'slot_errors.txt').read_text()
  assert report.startswith(f"slot error rate {r['dev_generation']['slot_error_rate']:.2f}% ")
  best = next(h for h in r['history'] if h['step'] == r['best']['restored_step'])
  assert r['dev_generation']['bleu'] == best['eval/bleu']  # the kept params, decoded again
  assert (wd / 'export' / 'model.safetensors').exists()
  assert json.loads((wd / 'results.json').read_text())['dev_generation'] == r['dev_generation']


def test_generate_from_the_workdir_and_from_its_export_agree(trained, tmp_path, monkeypatch):
  wd, _, _ = trained
  a = run_stage(gen_config(wd), str(tmp_path / 'a'))
  ga = lines(tmp_path / 'a' / 'generations.jsonl')
  assert len(ga) == 46 == a['n_inputs']  # the slice's distinct MRs, in file order
  assert [g['input'] for g in ga] == lm.group_by_prompt(
      lm.read_pairs_file(SLICE, prompt_column='mr', completion_column='ref'))[0]
  assert a['scores'].keys() == {'bleu', 'chrf', 'rouge_l', 'slot_error_rate', 'slots',
                                'slot_missing', 'slot_wrong', 'slot_added'}
  assert (tmp_path / 'a' / 'slot_errors.txt').exists()
  # export/ holds the best parameters; an HF dir has no data config: give the template
  c = gen_config(wd / 'export')
  c.data.update(template='{prompt} ||', prompt_column='mr', completion_column='ref',
                delexicalize=('name', 'near'))
  run_stage(c, str(tmp_path / 'b'))
  assert lines(tmp_path / 'b' / 'generations.jsonl') == ga
  monkeypatch.chdir(wd.parent)  # a relative init_from (Orbax wants absolute paths); the
  d = run_stage(gen_config(wd.name), str(tmp_path / 'd'))  # program of `a`: no compile
  assert d['n_inputs'] == 46 and d['decoding']['method'] == 'greedy'
  assert lines(tmp_path / 'd' / 'generations.jsonl') == ga  # beam: tests/test_decoding.py


def test_generate_reranks_the_beam_by_slot_errors(trained, tmp_path):
  """generate.rerank='slot_errors': per MR never more slot errors than the best-scored
  hypothesis, the same text where that one has none."""
  wd, _, _ = trained
  plain = run_stage(gen_config(wd, method='beam', num_beams=3), str(tmp_path / 'p'))
  ranked = run_stage(gen_config(wd, method='beam', num_beams=3, rerank='slot_errors'),
                     str(tmp_path / 'r'))
  assert (plain['rerank'], ranked['rerank']) == ('', 'slot_errors')
  texts = {k: [g['text'] for g in lines(tmp_path / k / 'generations.jsonl')] for k in 'pr'}
  prompts = [g['input'] for g in lines(tmp_path / 'p' / 'generations.jsonl')]
  known = slot_errors.known_values(prompts)
  for p, a, b in zip(prompts, texts['p'], texts['r']):
    na, nb = (len(slot_errors.slot_errors(p, t, known)[1]) for t in (a, b))
    assert nb <= na and (b == a or nb < na), (p, a, b)
  assert ranked['scores']['slot_error_rate'] <= plain['scores']['slot_error_rate']


def test_generate_into_its_source_workdir_keeps_the_training_records(trained):
  """--workdir equal to init_from (a documented use): the outputs go to WORKDIR/generate/,
  the training run's results.json, generations.jsonl and config.json stay as they were."""
  wd, _, _ = trained
  kept = {n: (wd / n).read_bytes() for n in ('results.json', 'generations.jsonl', 'config.json')}
  r = run_stage(gen_config(wd), str(wd))  # the program of the test above: no compile
  assert {n: (wd / n).read_bytes() for n in kept} == kept
  out = wd / 'generate'
  assert r['output'] == str(out / 'generations.jsonl') and r['n_inputs'] == 46
  assert len(lines(out / 'generations.jsonl')) == 46
  assert json.loads((out / 'results.json').read_text())['scores'] == r['scores']
  assert json.loads((out / 'config.json').read_text())['init_from'] == str(wd)


def test_a_workdir_and_its_export_hold_the_same_parameters(trained):
  """init_from either one gives the same model: every tensor of a GPT-2 LM, none fresh."""
  wd, _, _ = trained
  mcfg = sources.resolve(str(wd)).model_config()
  model_def = ModelDef.create(lambda: build_model(mcfg, 'clm'))
  a, ra = sources.resolve(str(wd)).read_params(model_def)
  b, rb = sources.resolve(str(wd / 'export')).read_params(model_def)
  assert ra['missing'] == rb['missing'] == [] and a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_resumed_run_is_bit_identical_to_a_straight_one(trained, tmp_path):
  """The same config run straight through: the preempted-and-resumed workdir logged the same
  losses and ends with the same parameters (packing, dropout, validation by decoding)."""
  wd, b, first = trained
  assert first['preempted'] and first['step'] == 4 and not b['preempted'] and b['step'] == 6
  c = lm_config()
  c.export.hf = False  # the same training; only the end differs
  a = run_stage(c, str(tmp_path / 'a'))
  losses = lambda d: {m['step']: m['train/loss'] for m in lines(d / 'metrics.jsonl')
                      if 'train/loss' in m}
  la, lb = losses(tmp_path / 'a'), losses(wd)
  assert [la[s] for s in range(1, 7)] == [lb[s] for s in range(1, 7)]
  assert a['history'] == b['history'] and a['dev_generation'] == b['dev_generation']
  pa = sources.read_workdir_params(str(tmp_path / 'a'), 'latest')
  pb = sources.read_workdir_params(str(wd), 'latest')
  assert pa.keys() == pb.keys() and pa
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_peft_from_the_hf_export_trains_and_generates(trained, tmp_path):
  """LoRA and a soft prompt on the HF export (every tensor loaded: the first loss is the
  trained model's, below a random init's ln(50257) = 10.82), with bf16 compute and gradient
  accumulation; few trainable tensors; `generate` rebuilds the PEFT model from the workdir
  exactly as trained and decodes with the soft prompt in the KV cache."""
  wd, _, _ = trained
  c = lm_config(num_steps=2, eval_every=0, grad_accum=2, batch_size=16)
  c.init_from = str(wd / 'export')
  c.model.dtype = 'bfloat16'
  c.data.update(packing=False, dev_fraction=0.0)  # a soft prompt is per row; no validation
  c.generate.method = ''
  c.train.early_stopping.metric = ''
  c.peft.method = 'lora+prompt'
  c.peft.prompt.length = 4
  r = run_stage(c, str(tmp_path / 'run'))
  assert r['init_report']['missing'] == [] and r['init_report']['loaded'] > 0
  assert r['trainable_params'] < r['params'] / 10
  losses = [m['train/loss'] for m in lines(tmp_path / 'run' / 'metrics.jsonl')
            if 'train/loss' in m]
  assert np.isfinite(losses).all() and losses[0] < np.log(50257) - 0.15
  assert (tmp_path / 'run' / 'export' / 'export.json').exists()
  g = run_stage(gen_config(tmp_path / 'run'), str(tmp_path / 'gen'))
  assert len(lines(tmp_path / 'gen' / 'generations.jsonl')) == g['n_inputs'] == 46


def test_config_errors_come_before_anything_loads():
  from jaxft import stages
  from jaxft.config import ConfigError
  c = lm_config()
  c.data.packing, c.peft.method = True, 'prompt'
  with pytest.raises(ConfigError, match='packing=True cannot be combined with peft.method'):
    stages.validate(c)
  c = lm_config()
  c.generate.method = ''
  with pytest.raises(ConfigError, match="early_stopping.metric='bleu' is a generation metric"):
    stages.validate(c)
  c = gen_config('')
  with pytest.raises(ConfigError, match='generate needs init_from'):
    stages.validate(c)


def test_generate_refuses_a_tokenizer_that_is_not_the_models(tmp_path):
  """data.tokenizer is for an init_from without a tokenizer: beside one (the tokenizer the
  weights were trained with) it was silently ignored. Now a different one is refused in one
  line, and naming the same directory is accepted (the run goes on to the model)."""
  from jaxft.config import ConfigError
  own = REPO / 'data' / 'tokenizers' / 'gpt2'  # a directory with a tokenizer and no model
  c = gen_config(own)
  c.data.tokenizer = str(tmp_path / 'other')
  with pytest.raises(ConfigError, match=rf"data.tokenizer='{tmp_path}/other': init_from="
                                        rf"'{own}' has its own tokenizer \({own}\)"):
    run_stage(c, str(tmp_path / 'gen'))
  c.data.tokenizer = f'{own}/'
  c.data.update(prompt_column='mr', completion_column='ref')  # an HF directory has none
  with pytest.raises(Exception) as e:  # the same tokenizer: what fails now is the model
    run_stage(c, str(tmp_path / 'gen'))
  assert 'is neither a jaxft workdir' in str(e.value), e.value

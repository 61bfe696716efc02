"""Stages `finetune_lm` and `generate` on the bundled E2E slice, run as from the command line
(`jaxft.main.run_stage` with configs/finetune_lm.py:tiny, shrunk further): validation decodes
every dev MR inside the eval step and scores it; generate writes one line per distinct MR
from the workdir and from its HF export, with the same text; PEFT runs train and generate
(LoRA merged into the export; a soft prompt decoded through the KV cache); a run preempted
mid-way resumes to bit-identical parameters and losses.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft import checkpointing
from jaxft.data import completion as lm
from jaxft.main import run_stage
from jaxft.models import flat_params
from jaxft.train import init as init_lib

REPO = Path(__file__).resolve().parents[1]
SLICE = str(REPO / 'data' / 'e2e' / 'devset-slice.csv')


def _config(name: str, variant: str = ''):
  spec = importlib.util.spec_from_file_location(f'_cfg_{name}', REPO / 'configs' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def lm_config(**train):
  c = _config('finetune_lm', 'tiny')
  c.data.max_len = 96
  c.generate.max_new_tokens = 8
  c.train.update(**{'num_steps': 6, 'batch_size': 8, 'eval_every': 3, 'log_every': 1, **train})
  c.checkpoint.update(every=3, async_save=False)
  return c


def gen_config(init_from, **gen):
  c = _config('generate')
  c.init_from = str(init_from)
  c.generate.update(**{'input': SLICE, 'max_new_tokens': 8, 'batch_size': 8, **gen})
  return c


def _lines(path):
  with open(path) as f:
    return [json.loads(x) for x in f]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  wd = tmp_path_factory.mktemp('lm') / 'run'
  return wd, run_stage(lm_config(), str(wd))


def test_validation_decodes_every_dev_mr_and_scores_it(trained):
  wd, r = trained
  assert [h['step'] for h in r['history']] == [3, 6]
  for h in r['history']:
    assert {'eval/loss', 'eval/bleu', 'eval/chrf', 'eval/rouge_l'} <= set(h)
    assert 0 < h['eval/gen_length'] <= 8
  assert r['best']['metric'] == 'bleu' and r['best']['restored_step'] in (3, 6)
  gens = _lines(wd / 'generations.jsonl')
  assert len(gens) == r['data']['n_dev_prompts'] == 9  # one line per distinct dev MR
  assert all(set(g) == {'input', 'text'} and g['input'].startswith('name[') for g in gens)
  best = next(h for h in r['history'] if h['step'] == r['best']['restored_step'])
  assert r['dev_generation']['bleu'] == best['eval/bleu']  # the kept params, decoded again
  assert (wd / 'export' / 'model.safetensors').exists()


def test_generate_from_the_workdir_and_from_its_export_agree(trained, tmp_path, monkeypatch):
  wd, _ = trained
  a = run_stage(gen_config(wd), str(tmp_path / 'a'))
  ga = _lines(tmp_path / 'a' / 'generations.jsonl')
  assert len(ga) == 46 == a['n_inputs']  # the slice's distinct MRs, in file order
  assert [g['input'] for g in ga] == lm.group_by_prompt(
      lm.read_pairs_file(SLICE, prompt_column='mr', completion_column='ref'))[0]
  assert a['scores'].keys() == {'bleu', 'chrf', 'rouge_l'}
  # export/ holds the best parameters; an HF dir has no data config: give the template
  c = gen_config(wd / 'export')
  c.data.update(template='{prompt} ||', prompt_column='mr', completion_column='ref')
  run_stage(c, str(tmp_path / 'b'))
  assert _lines(tmp_path / 'b' / 'generations.jsonl') == ga
  monkeypatch.chdir(wd.parent)  # a relative init_from (Orbax wants absolute paths)
  d = run_stage(gen_config(wd.name, method='beam', num_beams=3), str(tmp_path / 'd'))
  assert d['n_inputs'] == 46 and d['decoding']['method'] == 'beam'


def test_init_from_the_hf_export_and_the_workdir(trained, tmp_path):
  """A finetune_lm run continues from an HF GPT-2 directory (all tensors loaded, so its
  first loss is the trained model's, below a random init's ln(50257) = 10.82) and from a
  jaxft workdir; with bf16 compute and gradient accumulation (the loop's own options)."""
  wd, _ = trained
  for src in (wd / 'export', wd):
    c = lm_config(num_steps=2, eval_every=0, grad_accum=2, batch_size=16)
    c.init_from = str(src)
    c.model.dtype = 'bfloat16'
    c.generate.method = ''
    c.train.early_stopping.update(metric='loss', mode='min')
    r = run_stage(c, str(tmp_path / src.name))
    assert r['init_report']['missing'] == [] and r['init_report']['loaded'] > 0
    losses = [m['train/loss'] for m in _lines(tmp_path / src.name / 'metrics.jsonl')
              if 'train/loss' in m]
    assert np.isfinite(losses).all() and losses[0] < np.log(50257) - 0.15


@pytest.mark.slow
@pytest.mark.parametrize('method', ['lora', 'prompt'])
def test_peft_methods_train_and_generate(tmp_path, method):
  c = lm_config(num_steps=4, eval_every=2)
  c.peft.method = method
  c.peft.prompt.length = 4
  r = run_stage(c, str(tmp_path / 'run'))
  assert r['trainable_params'] < r['params'] / 10
  assert len(r['history']) == 2 and np.isfinite(r['history'][-1]['eval/bleu'])
  g = run_stage(gen_config(tmp_path / 'run'), str(tmp_path / 'gen'))
  gens = _lines(tmp_path / 'gen' / 'generations.jsonl')
  assert len(gens) == g['n_inputs'] == 46
  if method == 'lora':  # merged into a plain GPT-2 export
    assert (tmp_path / 'run' / 'export' / 'model.safetensors').exists()


@pytest.mark.slow
def test_resume_mid_run_is_bit_identical(tmp_path, monkeypatch):
  """A: 8 steps straight. B: preempted after step 4 (the loop saves and returns), then
  rerun: it resumes at 4 and must log the same losses and end with the same parameters."""
  c = lm_config(num_steps=8, eval_every=0)
  c.data.packing = True
  c.model.hidden_dropout = 0.1  # the resumed run must redraw the same dropout masks
  c.checkpoint.every = 0
  c.export.hf = False
  c.generate.method = ''  # validation by loss only: this is about the train state
  c.train.early_stopping.update(metric='loss', mode='min')
  a = run_stage(c, str(tmp_path / 'a'))

  calls = {'n': 0}

  def stop_after_4(self):
    calls['n'] += 1
    return calls['n'] == 4

  with monkeypatch.context() as m:
    m.setattr(checkpointing.PreemptionGuard, 'should_stop', stop_after_4)
    b1 = run_stage(c, str(tmp_path / 'b'))
  assert b1['preempted'] and b1['step'] == 4
  b = run_stage(c, str(tmp_path / 'b'))
  assert b['step'] == 8 and not b['preempted']
  losses = lambda wd: {m['step']: m['train/loss'] for m in _lines(wd / 'metrics.jsonl')
                       if 'train/loss' in m}
  la, lb = losses(tmp_path / 'a'), losses(tmp_path / 'b')
  assert [la[s] for s in range(1, 9)] == [lb[s] for s in range(1, 9)]
  pa = flat_params(jax.device_get(a['state']['params']))
  pb = flat_params(jax.device_get(b['state']['params']))
  for k in pa:
    np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg=k)
  assert init_lib.read_workdir_params(str(tmp_path / 'b'), 'latest').keys() == pa.keys()

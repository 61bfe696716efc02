"""The finetune_qa stage end to end, in process, on the bundled SQuAD slice (configs/
finetune_qa.py:tiny): one training run (preempted after step 4 and resumed, with dropout)
shared by every test that only reads its workdir; predict on it (answers, EM / F1, explain);
the export opened by transformers' AutoModelForQuestionAnswering and its QA pipeline.
The window labelling, post-processing and metric are tests/test_qa_data.py; the head's
parity with Hugging Face is tests/test_qa_model.py."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import checkpointing, sources
from jaxft.data import qa as qa_data
from jaxft.main import run_stage
from jaxft.models import build_model
from jaxft.models.config import ModelConfig
from jaxft.objectives import distill as distill_objectives
from jaxft.train.state import ModelDef
from stage_runs import REPO, config, lines, stop_after

SLICE = REPO / 'data' / 'squad' / 'squad-v1.1-dev-slice.json'




def qa_config(**train):
  """The tiny recipe with dropout (a resumed run must redraw the same masks), in float32 like
  predict's default (so predict reproduces the validation's numbers on any CPU); checkpoints
  on preemption, when the best changes and at the end."""
  c = config('finetune_qa', 'tiny')
  c.model.update(hidden_dropout=0.1, dtype='float32')
  c.train.update(**{'num_steps': 8, 'eval_every': 4, 'log_every': 1, **train})
  c.checkpoint.update(every=0, async_save=False)
  return c


def predict_config(init_from, **predict):
  c = config('predict')
  c.init_from = str(init_from)
  c.predict.update(**predict)
  return c






@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir, results, results of the preempted half): 8 steps, preempted after step 4
  (the loop saves and returns), rerun to the end (it resumes at 4)."""
  wd = tmp_path_factory.mktemp('qa') / 'run'
  with pytest.MonkeyPatch.context() as m:
    m.setattr(checkpointing.PreemptionGuard, 'should_stop', stop_after(4))
    first = run_stage(qa_config(), str(wd))
  return wd, run_stage(qa_config(), str(wd)), first


def test_validation_scores_squad_em_and_f1_on_held_out_articles(trained):
  wd, r, first = trained
  assert first['preempted'] and first['step'] == 4 and not r['preempted'] and r['step'] == 8
  assert [h['step'] for h in r['history']] == [4, 8]
  for h in r['history']:
    assert {'eval/loss', 'eval/exact_match', 'eval/f1'} <= set(h)
    assert 0.0 <= h['eval/exact_match'] <= h['eval/f1'] <= 100.0
  assert r['best']['metric'] == 'f1'
  task = sources.resolve(str(wd)).task
  assert task.kind == 'qa' and task.main_metric == 'f1'
  # the dev split is whole held-out articles: no title on both sides
  data = sources.resolve(str(wd)).trained_data
  qd = qa_data.QaData(**{k: v for k, v in data.items() if k in qa_data.QaData.__dataclass_fields__})
  dev, _ = qa_data.read_qa_split(qd, 'dev', require_answers=True)
  train, _ = qa_data.read_qa_split(qd, 'train', require_answers=True)
  assert set(dev.titles) and not set(dev.titles) & set(train.titles)


def test_a_resumed_run_is_bit_identical_to_a_straight_one(trained, tmp_path):
  wd, b, _ = trained
  c = qa_config()
  c.export.hf = False  # the same training; only the end differs
  a = run_stage(c, str(tmp_path / 'a'))
  losses = lambda d: {m['step']: m['train/loss'] for m in lines(d / 'metrics.jsonl')
                      if 'train/loss' in m}
  la, lb = losses(tmp_path / 'a'), losses(wd)
  assert [la[s] for s in range(1, 9)] == [lb[s] for s in range(1, 9)]
  assert a['history'] == b['history']
  pa = sources.read_workdir_params(str(tmp_path / 'a'), 'latest')
  pb = sources.read_workdir_params(str(wd), 'latest')
  assert pa.keys() == pb.keys() and pa
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_predict_answers_every_question_with_offsets_into_its_context(trained, tmp_path):
  wd, r, _ = trained
  out = run_stage(predict_config(wd, input='dev'), str(tmp_path / 'p'))
  recs = lines(tmp_path / 'p' / 'predictions.jsonl')
  assert len(recs) == 32 and {'id', 'answer', 'score', 'start', 'end', 'gold'} <= set(recs[0])
  ex, _ = qa_data.read_qa_file(SLICE)
  context = dict(zip(ex.ids, ex.contexts))
  for rec in recs:
    assert context[rec['id']][rec['start']:rec['end']] == rec['answer']
  # the workdir's best parameters on its own dev split: the validation's F1, and answers
  assert out['f1'] == pytest.approx(r['best']['value'], abs=1e-6)
  assert [x['answer'] for x in recs if x['answer']] and out['f1'] > 0


def test_predict_on_a_jsonl_file_without_answers_and_explain(trained, tmp_path):
  wd, _, _ = trained
  ex, _ = qa_data.read_qa_file(SLICE)
  rows = [{'id': ex.ids[i], 'question': ex.questions[i], 'context': ex.contexts[i]}
          for i in (0, 40, 80)]
  path = tmp_path / 'q.jsonl'
  path.write_text(''.join(json.dumps(x) + '\n' for x in rows))
  out = run_stage(predict_config(wd, input=str(path), explain='integrated_gradients',
                                 ig_steps=4), str(tmp_path / 'p'))
  assert 'f1' not in out  # no answers in the file: no metric
  recs = lines(tmp_path / 'p' / 'predictions.jsonl')
  assert [x['id'] for x in recs] == [x['id'] for x in rows]
  for rec, row in zip(recs, rows):
    assert rec['start'] == -1 or row['context'][rec['start']:rec['end']] == rec['answer']
    tokens = [a['token'] for a in rec['attributions']]
    assert tokens[0] == '[CLS]' and all(np.isfinite(a['score']) for a in rec['attributions'])


def test_the_export_is_a_transformers_qa_model_with_jaxft_logits(trained):
  """AutoModelForQuestionAnswering on workdir/export gives jaxft's start / end logits, and
  transformers' question-answering pipeline finds the answers jaxft's predict finds."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  wd, _, _ = trained
  src = sources.resolve(str(wd))
  tok = src.tokenizer()
  hf = transformers.AutoModelForQuestionAnswering.from_pretrained(str(wd / 'export'))
  hf.eval()
  ex, _ = qa_data.read_qa_file(SLICE)
  enc = tok(ex.questions[:4], ex.contexts[:4], truncation='only_second', max_length=128,
            padding='max_length', return_tensors='np')
  with torch.no_grad():
    out = hf(**{k: torch.as_tensor(v) for k, v in enc.items()})
  mcfg = ModelConfig.from_config_dict(src.task.model)
  mdef, params = src.trained_model(ModelDef.create(lambda: build_model(mcfg, 'qa')))
  logits = np.asarray(mdef.merge(params)(enc['input_ids'], enc['attention_mask'],
                                         enc['token_type_ids'])['logits'])
  np.testing.assert_allclose(out.start_logits.numpy(), logits[..., 0], atol=2e-4, rtol=1e-3)
  np.testing.assert_allclose(out.end_logits.numpy(), logits[..., 1], atol=2e-4, rtol=1e-3)


class _Fixed:
  """A model (or teacher definition) whose forward returns fixed [B, S, 2] logits."""

  def __init__(self, logits):
    self.logits = jnp.asarray(logits, jnp.float32)

  def __call__(self, *args, **kw):
    return {'logits': self.logits}

  def merge(self, params):
    return self


def test_qa_distillation_loss_equals_the_hand_computed_soft_and_hard_terms():
  """alpha * T^2 * mean over start / end of KL(teacher || student) over the window's real
  positions (padding takes no probability) + (1 - alpha) * the span cross-entropy."""
  rng = np.random.default_rng(0)
  s_logits, t_logits = rng.normal(size=(2, 5, 2)), rng.normal(size=(2, 5, 2))
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.int32)
  batch = {'input_ids': np.ones((2, 5), np.int32), 'attention_mask': mask,
           'start_positions': np.array([1, 0], np.int32),
           'end_positions': np.array([3, 2], np.int32)}
  spec = distill_objectives.Spec(alpha=0.3, temperature=2.0)
  loss, sums = distill_objectives.span(spec, _Fixed(t_logits)).loss(
      _Fixed(s_logits), batch, None, True, constants={})

  def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())
  kd = ce = 0.0
  for b in range(2):
    n = mask[b].sum()
    for i, gold in ((0, batch['start_positions'][b]), (1, batch['end_positions'][b])):
      ls = log_softmax(s_logits[b, :n, i] / 2.0)
      lt = log_softmax(t_logits[b, :n, i] / 2.0)
      kd += 0.5 * 4.0 * (np.exp(lt) * (lt - ls)).sum()
      ce += 0.5 * -log_softmax(s_logits[b, :n, i])[gold]
  assert float(sums['kd_sum']) == pytest.approx(kd, rel=1e-5)
  assert float(sums['ce_sum']) == pytest.approx(ce, rel=1e-5)
  assert float(loss) == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-5)

"""Knowledge distillation: a student trained on a teacher's soft targets.

  python -m jaxft.main --config configs/distill.py:sst2 --config.teacher=TEACHER --workdir w
  python -m jaxft.main --config configs/distill.py:mlm --config.teacher=MLM_TEACHER --workdir w
  python -m jaxft.main --config configs/distill.py:squad --config.teacher=QA_TEACHER --workdir w

`teacher`: a jaxft workdir (finetune_cls for a GLUE variant, pretrain_mlm for `mlm`,
finetune_qa for `squad`: its data settings, SQuAD windows and EM / F1) or a
Hugging Face directory with the matching head; its tokenizer is used. The student is the
teacher's architecture with half the layers (distill.student.* override), initialised from
every other teacher layer when widths match (distill.student_init). See docs/distill.md.
"""
import importlib.util
import os

import ml_collections

from jaxft.config import as_section, base_config, mlm_config
from jaxft.data.pretrain import default_data_config
from jaxft.data.classification import GLUE_TASKS
from jaxft.distill.settings import DistillSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_module(name: str):
  spec = importlib.util.spec_from_file_location(
      f'_jaxft_configs_{name}', os.path.join(os.path.dirname(__file__), f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def distill_config(kind: str) -> ml_collections.ConfigDict:
  """The `distill` section (jaxft.distill.settings.DistillSettings) for a kind."""
  return as_section(DistillSettings(kind=kind))


def get_config(variant: str = 'sst2'):
  variant = variant or 'sst2'
  c = base_config()
  c.stage = 'distill'
  c.teacher = ''
  if variant == 'mlm':
    c.distill = distill_config('mlm')
    # DistilBERT's 5:2:1 of soft targets, MLM and cosine terms, scaled to sum to 1.
    c.distill.update(alpha=5 / 7, temperature=2.0, cosine_weight=1 / 7)
    c.data = default_data_config()
    c.data.files = os.path.join(REPO, 'data/corpus')  # a str: overridable on the command line
    c.data.max_len = 128
    c.mlm = mlm_config()
    c.optimizer.update(lr=5e-4, warmup_ratio=0.05, schedule='linear', weight_decay=0.01)
    c.train.update(num_steps=10000, batch_size=32, eval_every=1000, log_every=50)
    c.checkpoint.update(every=1000, keep=2)
    return c
  if variant == 'squad':
    c.distill = distill_config('qa')
    c.data = _config_module('finetune_qa').get_config('squad').data
    c.data.tokenizer = ''  # the teacher's
    c.optimizer.update(lr=1e-4, warmup_ratio=0.1, schedule='linear', weight_decay=0.01)
    c.train.update(num_steps=0, num_epochs=1, batch_size=32, eval_every=126, log_every=20)
    c.train.early_stopping.update(metric='f1', mode='max', patience=0)
    c.checkpoint.update(every=126, keep=1, keep_best=1)
    return c
  if variant not in GLUE_TASKS:
    raise ValueError(f'configs/distill.py variant {variant!r}; choose mlm, squad or a GLUE '
                     f'task {sorted(GLUE_TASKS)}')
  c.distill = distill_config('cls')
  c.data = _config_module('finetune_cls').data_config(variant)
  c.data.tokenizer = ''  # the teacher's
  c.optimizer.update(lr=1e-4, warmup_ratio=0.1, schedule='linear', weight_decay=0.01)
  c.train.update(num_steps=0, num_epochs=3, batch_size=32, eval_every=200, log_every=20)
  c.train.early_stopping.update(metric='', mode='max', patience=0)  # '' -> the task's metric
  c.checkpoint.update(every=0, keep=1, keep_best=1)
  if variant in ('cola', 'rte', 'mrpc', 'stsb', 'wnli'):
    c.train.num_epochs = 5
  return c

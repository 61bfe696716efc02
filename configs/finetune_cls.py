"""Sequence classification / regression fine-tuning, with a variant per GLUE task.

  python -m jaxft.main --config configs/finetune_cls.py:sst2 --config.init_from=DIR --workdir w

`init_from` is a jaxft workdir (pretraining or fine-tuning) or a Hugging Face checkpoint
directory; the architecture and tokenizer come from it. SST-2 defaults to the bundled
slice (data/glue/sst2); other tasks read GLUE TSVs from `data.path`
(default ../shared/data/glue/<TASK> when present) or, with data.source='hf', from the hub.
"""
import os

import ml_collections

from jaxft.config import as_section, base_config, finetune_config, peft_config
from jaxft.continual import ContinualSettings
from jaxft.data.classification import GLUE_TASKS, ClsData

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(task: str) -> ml_collections.ConfigDict:
  """The `data` section (every key of jaxft.data.classification.ClsData) for a GLUE task."""
  preset = GLUE_TASKS.get(task)
  if task == 'sst2':
    path = os.path.join(REPO, 'data/glue/sst2')
  elif preset is not None:
    path = os.path.join(REPO, '..', 'shared', 'data', 'glue', preset.dir_name)
    path = os.path.normpath(path) if os.path.isdir(path) else ''
  else:
    path = ''
  return as_section(ClsData(task=task, path=path))


def get_config(variant: str = 'sst2'):
  task = variant or 'sst2'
  if task not in GLUE_TASKS and task != 'custom':
    raise ValueError(f'configs/finetune_cls.py variant {task!r}; choose a GLUE task '
                     f'{sorted(GLUE_TASKS)} or custom')
  c = base_config()
  c.peft = peft_config()
  c.stage = 'finetune_cls'
  c.model.update(type='bert', hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
                 max_position_embeddings=512)
  c.data = data_config('' if task == 'custom' else task)
  c.data.tokenizer = os.path.join(REPO, 'data/tokenizers/bert-base-uncased')
  c.finetune = finetune_config()
  c.continual = as_section(ContinualSettings())  # learn this task after continual.previous's
  c.optimizer.update(lr=5e-5, warmup_ratio=0.1, schedule='linear', weight_decay=0.01)
  c.train.update(num_steps=0, num_epochs=3, batch_size=32, eval_every=200, log_every=20)
  c.train.early_stopping.update(metric='', mode='max', patience=0)  # '' -> the task's metric
  c.checkpoint.update(every=0, keep=1, keep_best=1)
  if task in ('cola', 'rte', 'mrpc', 'stsb', 'wnli'):  # small data sets: more epochs
    c.train.num_epochs = 5
  return c

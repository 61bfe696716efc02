"""PET-style cloze classification with a pretrained MLM: zero-shot, then optional few-shot.

  python -m jaxft.main --config configs/peft_cloze.py:sst2 \\
      --config.init_from=/tmp/jaxft-quickstart/pretrain --workdir /tmp/cloze
  # few-shot (16 per class), full fine-tuning of the MLM or LoRA:
  ... --config.cloze.num_shots=16 [--config.peft.method=lora --config.optimizer.lr=1e-3]

`init_from` needs a pretrained MLM head (jaxft pretrain_mlm workdir or HF BertForMaskedLM).
Verbalizer words must be single tokens of the model's vocabulary.
"""
import importlib.util
import os

from jaxft.config import as_section, base_config, peft_config
from jaxft.stages.cloze import ClozeSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(task: str):
  """The data section of configs/finetune_cls.py (loaded by path: configs/ is no package)."""
  spec = importlib.util.spec_from_file_location(
      '_finetune_cls', os.path.join(REPO, 'configs', 'finetune_cls.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.data_config(task)

# task -> (template, verbalizer); '{text}' / '{pair}' are the example's texts.
PRESETS = {
    'sst2': ('{text} It was [MASK].', 'negative:terrible,bad;positive:great,good'),
}


def get_config(variant: str = 'sst2'):
  task = variant or 'sst2'
  template, verbalizer = PRESETS.get(task, ('{text} It was [MASK].', ''))
  c = base_config()
  c.peft = peft_config()
  del c.export  # cloze scores and trains; it exports nothing
  c.stage = 'cloze'
  c.model.update(type='bert', hidden_dropout=0.1, attention_dropout=0.1)
  c.data = data_config(task)
  c.data.tokenizer = os.path.join(REPO, 'data/tokenizers/bert-base-uncased')
  c.data.max_len = 64
  c.cloze = as_section(ClozeSettings(template=template, verbalizer=verbalizer))
  c.optimizer.update(lr=1e-5, warmup_ratio=0.0, schedule='constant', weight_decay=0.01)
  c.train.update(num_steps=100, batch_size=8, eval_every=50, log_every=10)
  c.checkpoint.update(every=0, keep=1, keep_best=0)
  return c

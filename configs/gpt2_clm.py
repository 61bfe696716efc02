"""GPT-2 causal-LM pretraining from random init (no GPT-2 weights are needed).

Variants: tiny (L2 H128), small (124M, the GPT-2 base shape; default), medium (355M).
  python -m jaxft.main --config configs/gpt2_clm.py:tiny --workdir w
"""
import os

from jaxft.config import base_config
from jaxft.data.pretrain import default_data_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # layers, hidden, heads, positions
    'tiny': (2, 128, 2, 256),
    'small': (12, 768, 12, 1024),
    'medium': (24, 1024, 16, 1024),
}


def get_config(variant: str = 'small'):
  variant = {'124m': 'small', '': 'small'}.get(variant, variant)
  if variant not in SHAPES:
    raise ValueError(f'configs/gpt2_clm.py variant {variant!r}; choose from {sorted(SHAPES)}')
  layers, hidden, heads, positions = SHAPES[variant]
  c = base_config()
  c.stage = 'pretrain_clm'
  c.model.update(type='gpt2', num_layers=layers, hidden_size=hidden, num_heads=heads,
                 intermediate_size=4 * hidden, max_position_embeddings=positions,
                 type_vocab_size=0, layer_norm_eps=1e-5, hidden_act='gelu_new',
                 pad_token_id=50256, attention_dropout=0.0)
  c.data = default_data_config()
  c.data.tokenizer = os.path.join(REPO, 'data/tokenizers/gpt2')
  c.data.files = os.path.join(REPO, 'data/corpus')  # a str: --config.data.files=DIR overrides it
  c.data.max_len = min(positions, 1024)
  c.data.clm_mask_boundaries = False
  c.optimizer.update(lr=6e-4, warmup_ratio=0.05, schedule='cosine', end_lr_ratio=0.1,
                     weight_decay=0.1)
  c.train.update(num_steps=10000, batch_size=16, eval_every=1000, log_every=50)
  c.checkpoint.update(every=1000, keep=2)
  if variant == 'tiny':
    c.data.max_len = 128
    c.optimizer.lr = 2e-3
    c.train.update(num_steps=300, batch_size=16, eval_every=100, log_every=20)
  return c

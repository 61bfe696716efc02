"""Causal-LM fine-tuning of GPT-2 on (prompt, completion) pairs (stage `finetune_lm`).

  python -m jaxft.main --config configs/finetune_lm.py:e2e --workdir w/e2e
  python -m jaxft.main --config configs/finetune_lm.py:custom --config.init_from=HF_GPT2_DIR \
      --config.data.train_file=train.jsonl --config.data.dev_file=dev.jsonl --workdir w/x

Variants:
  e2e     E2E NLG (restaurant meaning representation -> description): a small GPT-2 from
          random init with the GPT-2 BPE. Reads ../shared/data/e2e/devset.csv when it is
          there, else the bundled slice data/e2e/devset-slice.csv; 10% of the MRs are held
          out by restaurant (data.dev_holdout_field='name': no validation restaurant is
          trained on, as in the official test set); name and near values are placeholders
          (data.delexicalize), put back after decoding; 1,200 steps; validation = beam
          search (10 beams, length penalty 0.9) of each held-out MR, of its finished
          hypotheses the one with the fewest slot errors (generate.rerank), scored against
          all its references (BLEU, chrF, ROUGE-L) and by the slot error rate; the best
          BLEU is kept.
  tiny    the bundled slice and a tiny model (the same split and placeholders, greedy
          validation): seconds, for tests and smoke runs.
  custom  your files: data.train_file (+ dev_file), data.prompt_column, completion_column,
          data.template; set init_from (a jaxft workdir or an HF GPT-2 directory).
Decoding for validation is `generate.*` (docs/generation.md); generate.method='' validates
by loss alone.
"""
import os

from jaxft.config import as_section, base_config, finetune_config, peft_config
from jaxft.data.completion import CompletionData
from jaxft.generation import DecodingSection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E2E_SHARED = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'e2e'))
VARIANTS = ('e2e', 'tiny', 'custom')


def e2e_data():
  full = os.path.isfile(os.path.join(E2E_SHARED, 'devset.csv'))
  return as_section(CompletionData(
      path=E2E_SHARED if full else os.path.join(REPO, 'data', 'e2e'),
      train_file='devset.csv' if full else 'devset-slice.csv',
      prompt_column='mr', completion_column='ref', template='{prompt} ||',
      completion_prefix=' ', max_len=128, dev_fraction=0.1, split_seed=0,
      dev_holdout_field='name', delexicalize=('name', 'near'),
      tokenizer=os.path.join(REPO, 'data', 'tokenizers', 'gpt2')))


def get_config(variant: str = 'e2e'):
  variant = variant or 'e2e'
  if variant not in VARIANTS:
    raise ValueError(f'configs/finetune_lm.py variant {variant!r}; choose from {VARIANTS}')
  c = base_config()
  c.peft = peft_config()
  c.stage = 'finetune_lm'
  # A small GPT-2 shape: on CPU the 50k-token output projection is most of the FLOPs, and
  # its cost grows with hidden_size (docs/generation.md).
  c.model.update(type='gpt2', num_layers=4, hidden_size=128, num_heads=4, intermediate_size=512,
                 max_position_embeddings=256, type_vocab_size=0, layer_norm_eps=1e-5,
                 hidden_act='gelu_new', pad_token_id=50256, hidden_dropout=0.1,
                 attention_dropout=0.0, classifier_dropout=0.0)
  c.data = e2e_data()
  c.data.packing = True
  c.finetune = finetune_config()
  # Beam 10 with length penalty 0.9 (as the LoRA paper decodes E2E), its 10 finished
  # hypotheses reranked by slot errors against the MR (as TGen does): docs/generation.md
  c.generate = as_section(DecodingSection(method='beam', num_beams=10, length_penalty=0.9,
                                          rerank='slot_errors'))
  c.optimizer.update(lr=2e-3, schedule='linear', warmup_ratio=0.05, weight_decay=0.01)
  c.train.update(num_steps=1200, batch_size=16, eval_every=400, log_every=25)
  c.train.early_stopping.update(metric='bleu', mode='max', patience=0)
  c.checkpoint.update(every=400, keep=1, keep_best=1)
  if variant == 'tiny':
    c.data.path = os.path.join(REPO, 'data', 'e2e')
    c.data.train_file = 'devset-slice.csv'
    c.data.dev_fraction = 0.2
    c.data.packing = False
    c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                   max_position_embeddings=128)
    c.generate.update(method='greedy', rerank='', max_new_tokens=24)  # one cheap compile
    c.optimizer.lr = 3e-3
    c.train.update(num_steps=20, batch_size=8, eval_every=10, log_every=5)
    c.checkpoint.update(every=10)
  elif variant == 'custom':
    c.data = as_section(CompletionData(tokenizer=os.path.join(REPO, 'data', 'tokenizers', 'gpt2')))
    c.generate = as_section(DecodingSection())  # greedy: any prompts
    c.optimizer.update(lr=1e-4, warmup_ratio=0.05)
    c.train.update(num_steps=2000, batch_size=16, eval_every=500)
    c.train.early_stopping.update(metric='', mode='max')  # '' -> bleu with generate.method, else loss
  return c

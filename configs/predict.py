"""Predict with a fine-tuned workdir: classification labels + probabilities, or NER tags.

  python -m jaxft.main --config configs/predict.py --config.init_from=FINETUNE_WORKDIR \
      --config.predict.input=dev --workdir out     # or a .txt/.tsv/.jsonl/CoNLL file
Writes out/predictions.jsonl (or predict.output).
"""
import ml_collections

from jaxft.config import base_config


def get_config(variant: str = ''):
  del variant
  c = base_config()
  c.stage = 'predict'
  c.predict = ml_collections.ConfigDict(dict(input='dev', output='', batch_size=64,
                                             checkpoint='best'))
  return c

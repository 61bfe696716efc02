"""Predict with a fine-tuned workdir: classification labels + probabilities, or NER tags.

  python -m jaxft.main --config configs/predict.py --config.init_from=FINETUNE_WORKDIR \
      --config.predict.input=dev --workdir out     # or a .txt/.tsv/.jsonl/CoNLL file
Writes out/predictions.jsonl (or predict.output). Without init_from it reads the fine-tune in
--workdir and writes to WORKDIR/predict/ (the fine-tune's results.json is never replaced). Token attributions per line:
--config.predict.explain=integrated_gradients|attention_rollout, and an HTML page of them:
--config.predict.explain_html=out/explain.html (docs/explain.md).
"""
from jaxft.config import as_section, run_config
from jaxft.partitioning import MeshSettings
from jaxft.stages.predict import PredictSettings


def get_config(variant: str = ''):
  del variant
  c = run_config('predict')
  c.init_from = ''  # the fine-tuned workdir ('' = the one in --workdir)
  c.mesh = as_section(MeshSettings())
  c.predict = as_section(PredictSettings())
  return c

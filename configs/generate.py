"""Generate with a fine-tuned GPT-2 (stage `generate`).

  python -m jaxft.main --config configs/generate.py --config.init_from=FINETUNE_LM_WORKDIR \
      --config.generate.input=data/e2e/devset-slice.csv --workdir out

init_from: a `finetune_lm` workdir (its best checkpoint, else the latest; generate.checkpoint
='latest' takes the latest) or an HF GPT-2 directory. generate.input: a csv / tsv / jsonl
file like the training data (the prompt column, template and completion prefix come from the
workdir's config; `data.*` overrides them) or a txt file with one prompt per line.
Writes out/generations.jsonl (or generate.output): {"input", "text"} per distinct prompt,
and out/results.json with BLEU / chrF / ROUGE-L when the input has references. With
--workdir equal to init_from the outputs go to WORKDIR/generate/ (the fine-tune's own
generations.jsonl and results.json are never replaced).
"""
import ml_collections

from jaxft.config import as_section, run_config
from jaxft.models.config import ModelConfig
from jaxft.stages.generate import GenerateData, GenerateSection


def get_config(variant: str = ''):
  del variant
  c = run_config('generate')
  c.seed = 0
  c.init_from = ''  # a finetune_lm workdir or an HF GPT-2 directory
  c.model = ml_collections.ConfigDict(ModelConfig.section_defaults())  # runtime fields
  c.model.type = 'gpt2'
  c.data = as_section(GenerateData())  # '' = as the trained workdir (or the defaults)
  c.generate = as_section(GenerateSection())
  return c

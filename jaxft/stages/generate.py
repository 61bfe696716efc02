"""Stage `generate`: a fine-tuned GPT-2 (a `finetune_lm` workdir or an HF directory) completes
every distinct prompt of a file -> WORKDIR/generations.jsonl, scored when it has references.

  python -m jaxft.main --config configs/generate.py --config.init_from=FINETUNE_LM_WORKDIR \
      --config.generate.input=data/e2e/devset-slice.csv --workdir out

The input is a csv / tsv / jsonl file of the kind the model was trained on, or a txt file
with one prompt per line. The prompt column, completion column, template and completion
prefix come from the workdir's config (`data.*` here overrides them; for an HF directory
they are taken from `data.*`). Rows sharing a prompt give one output, scored against all
their completions (BLEU, chrF, ROUGE-L in results.json). Decoding: `generate.*`
(docs/generation.md), batched and jitted with a KV cache; prompts are left-padded to the
longest one, so a single compile serves the file and each output is what that prompt gives
alone (sampling draws from a key per input, fold_in(seed, index)). A workdir is loaded
exactly as trained (its PEFT modules included, nothing freshly initialised). With --workdir
equal to init_from the stage runs in WORKDIR/generate/ (stages.run): the fine-tune's own
generations.jsonl and results.json stay. A jsonl input has references on every row or on
none (some but not all is refused naming the first row without one).
"""
from __future__ import annotations

import dataclasses
import os
import time

from jaxft import config as config_lib
from jaxft import generation, sources
from jaxft.data import completion as lm_data
from jaxft.data.splits import pad_id as pad_id_of
from jaxft.files import InputError, MissingInput, check_writable
from jaxft.generation import DecodingSection
from jaxft.models import build_model
from jaxft.models.config import ModelConfig
from jaxft.train import loop
from jaxft.train.metrics import write_results
from jaxft.train.state import ModelDef

@dataclasses.dataclass(frozen=True)
class GenerateSection(DecodingSection):
  """The `generate` config section of the generate stage: decoding, input and output."""
  input: str = ''             # a csv / tsv / jsonl file like the training data, or a txt file
  output: str = ''            # default WORKDIR/generations.jsonl
  batch_size: int = 32        # prompts per decoding call (one compile for the file)
  checkpoint: str = 'best'    # best | latest (a jaxft workdir)


@dataclasses.dataclass(frozen=True)
class GenerateData:
  """The `data` section of the generate stage: '' = as the trained workdir (or the defaults)."""
  tokenizer: str = ''          # only when init_from brings none (else refused: its own wins)
  prompt_column: str = ''
  completion_column: str = ''  # references to score against, when the input has them
  template: str = ''           # must contain {prompt}
  completion_prefix: str = ''
  format: str = ''             # auto | csv | tsv | jsonl | txt
  delexicalize: tuple = ()     # slots the model saw as placeholders (X-name), put back


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """generate: the config's keys."""
  stage: str = 'generate'
  seed: int = 0
  init_from: str = ''  # a finetune_lm workdir or an HF GPT-2 directory
  generate: GenerateSection
  data: GenerateData
  model: ModelConfig  # runtime fields (dtype) only: the architecture is init_from's

  def __post_init__(self):
    g = self.generate
    if not g.method:
      raise config_lib.ConfigError("generate.method is empty; choose 'greedy', 'beam' or "
                                   "'sample'")
    if g.checkpoint not in ('best', 'latest'):
      raise config_lib.ConfigError(f"generate.checkpoint={g.checkpoint!r}; allowed: 'best', "
                                   "'latest'")
    if g.batch_size < 1:
      raise config_lib.ConfigError(f'generate.batch_size={g.batch_size} must be >= 1')
    if not g.input:
      raise config_lib.ConfigError('set generate.input: a csv / tsv / jsonl / txt file of '
                                   'prompts')
    if not self.init_from:
      raise config_lib.ConfigError('generate needs init_from: a finetune_lm workdir or an HF '
                                   'GPT-2 directory')


def load_lm(s: Settings, src: sources.Source):
  """(model_def, host params, mcfg, tokenizer): a workdir exactly as trained (PEFT modules
  included); an HF directory must hold every tensor of a GPT-2 LM (generating from freshly
  initialised weights would be a silent wrong result)."""
  tokenizer = src.tokenizer(s.data.tokenizer)
  mcfg = src.model_config(len(tokenizer)).with_runtime_of(s.model)
  if mcfg.model_type != 'gpt2':
    raise ValueError(f'generate needs a GPT-2 model; {src.path} holds {mcfg.model_type!r}')
  base_def = ModelDef.create(lambda: build_model(mcfg, 'clm'))
  if src.is_workdir:
    model_def, params = src.trained_model(base_def, which=s.generate.checkpoint)
    return model_def, params, mcfg, tokenizer
  params, report = src.load_init(base_def)
  if report['missing']:
    raise ValueError(f'{src.path} lacks {len(report["missing"])} tensors of a GPT-2 LM (e.g. '
                     f'{report["missing"][:3]}): not a causal-LM checkpoint')
  return base_def, params, mcfg, tokenizer


def _check_tokenizer(src: str, asked: str) -> None:
  """data.tokenizer beside an init_from that has a tokenizer: the weights were trained with
  that one, and token ids of another would decode to a silently wrong text. Naming the
  same directory is fine."""
  own = sources.tokenizer_dir(src)
  if own and asked and os.path.realpath(asked) != os.path.realpath(own):
    raise config_lib.ConfigError(
        f'data.tokenizer={asked!r}: init_from={src!r} has its own tokenizer ({own}), the one '
        'its weights were trained with; unset data.tokenizer (it is for an init_from without '
        'a tokenizer)')


def trained_data(src: sources.Source) -> tuple[dict, str]:
  """(the data section a finetune_lm workdir was trained with, where it comes from); ({}, '')
  for an HF directory."""
  if not src.is_workdir:
    return {}, ''
  return src.trained_data, src.config_file


def text_settings(data: GenerateData, trained: dict, trained_from: str = '') -> dict:
  """data.* here when set, else the trained run's (read from `trained_from`), else
  CompletionData's defaults; InputError for a template without {prompt}, naming its origin."""
  defaults = lm_data.CompletionData()
  ts = {k: getattr(data, k) or trained.get(k) or getattr(defaults, k)
        for k in ('prompt_column', 'completion_column', 'template', 'completion_prefix',
                  'format')}
  if '{prompt}' not in ts['template']:
    origin = 'data.template' if data.template else f'{trained_from}: data.template'
    raise InputError(f'{origin}={ts["template"]!r} must contain {{prompt}} (where each prompt '
                     'goes); set --config.data.template')
  return ts


def read_inputs(path: str, ts: dict):
  """(distinct prompts, their references or None, first source of each); InputError naming
  the file when it is missing, holds no prompt, or has a bad row (generate skips none)."""
  if not os.path.isfile(path):
    raise MissingInput(f'generate.input={path!r}: no such file')
  pairs = lm_data.read_pairs_file(path, prompt_column=ts['prompt_column'],
                                  completion_column=ts['completion_column'] or None,
                                  fmt=ts['format'], require_completion=False,
                                  bad_row_hint='fix or remove the row: generate reads every row')
  if not len(pairs):
    raise InputError(f'{path}: no rows, no prompt to generate for (the file holds a header at '
                     'most)')
  prompts, refs, where = lm_data.group_by_prompt(pairs)
  return prompts, (refs if pairs.completions is not None else None), where


def run(s: Settings, workdir: str) -> dict:
  t0 = time.time()
  g = s.generate
  # The settings, the input and the output are checked before the model is loaded and
  # anything decodes.
  _check_tokenizer(s.init_from, s.data.tokenizer)
  src = sources.resolve(s.init_from)
  trained = trained_data(src)
  ts = text_settings(s.data, *trained)
  delex = tuple(s.data.delexicalize or trained[0].get('delexicalize') or ())
  prompts, refs, where = read_inputs(g.input, ts)
  out = g.output or os.path.join(workdir, generation.GENERATIONS)
  check_writable(out, 'generate.output')
  model_def, params, mcfg, tokenizer = load_lm(s, src)
  decode = generation.decode_settings(g, tokenizer)
  prompt_ids = lm_data.encode_prompts(prompts, tokenizer, ts['template'], delex)
  generation.check_room(prompt_ids, decode, mcfg.max_position_embeddings, where)
  t1 = time.time()
  decoded = generation.generate_ids(model_def, params, prompt_ids, decode,
                                    batch_size=g.batch_size, pad_id=pad_id_of(tokenizer),
                                    seed=s.seed)
  dt = time.time() - t1
  lengths = decoded['length']
  texts = generation.output_texts(tokenizer, decoded, prompts, delex, g.rerank)
  results = {'stage': 'generate', 'init_from': s.init_from, 'input': g.input,
             'n_inputs': len(prompts), 'decoding': dataclasses.asdict(decode),
             'rerank': g.rerank,
             'new_tokens': int(lengths.sum()), 'decode_sec': dt,
             'tokens_per_sec': float(lengths.sum() / max(dt, 1e-9)),
             'wall_time_sec': time.time() - t0}
  scores, failing = generation.score(texts, refs, prompts)
  if scores:
    results['scores'] = scores
    generation.write_slot_errors(workdir, prompts, texts, failing, scores)
  results['output'] = out
  generation.write_generations(out, prompts, texts, results.get('scores'))
  if loop.is_main():
    sc = results.get('scores')
    print(f'generate: {len(prompts)} inputs -> {out}'
          + (f"; BLEU {sc['bleu']:.2f}, chrF {sc['chrf']:.2f}, ROUGE-L {sc['rouge_l']:.2f}"
             if sc and 'bleu' in sc else '') + generation.ser_text(sc or {}))
  write_results(workdir, results)
  return results

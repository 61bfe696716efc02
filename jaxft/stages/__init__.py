"""Stages: thin jobs on top of the library, and the one registry that the entry point and
config validation both read.

A stage module has `Settings` (a frozen dataclass whose fields are its config's keys: the
one schema of its config, parsed by jaxft.config.parse_settings and checked in its
__post_init__; ConfigError for anything wrong, before anything is loaded; `settings_class(cfg)`
where the stage or a key picks between two) and `run(settings, workdir) -> dict` (build,
train, export; results.json last). `run(cfg,
workdir)` here is how every stage runs: validate, lock the workdir, check it holds no other
run, record the config, dispatch; a stage whose source is the workdir itself runs in
WORKDIR/<stage>/. A pipeline runs several stages that way, in sub-workdirs.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from absl import logging

from jaxft import config as config_lib
from jaxft import workdir as workdir_lib
from jaxft.config import ConfigError
from jaxft.models.config import ModelConfig
from jaxft.train import loop
from jaxft.stages import (cloze, distill, finetune, finetune_lm, generate, info, predict,
                          prepare_data, pretrain)


@dataclasses.dataclass(frozen=True)
class Stage:
  """A stage: its module's settings class (the schema of its config: parsed by
  jaxft.config.parse_settings, checked in its __post_init__) and run(settings, workdir)."""
  name: str
  module: Any
  doc: str

  def settings_class(self, cfg) -> type:
    pick = getattr(self.module, 'settings_class', None)
    return pick(cfg) if pick is not None else self.module.Settings

  def parse(self, cfg):
    if self.module is None:
      return parse_pipeline(cfg)
    if hasattr(self.module, 'parse'):  # model_info reads the model section of any config
      return self.module.parse(cfg)
    return config_lib.parse_settings(self.settings_class(cfg), cfg)

  def run(self, settings, workdir: str) -> dict:
    return self.module.run(settings, workdir)


def parse_pipeline(cfg) -> dict:
  """{step name: the step's settings}; every step validated before the first runs."""
  if 'pipeline' not in cfg or not cfg.pipeline:
    raise ConfigError('a pipeline config needs `pipeline`: the names of its steps, in order')
  out = {}
  for name in cfg.pipeline:
    if name not in cfg:
      raise ConfigError(f'pipeline step {name!r} has no config section config.{name}'
                        f'{config_lib.closest(name, cfg.keys())}')
    try:
      out[name] = parse(cfg[name])
    except ConfigError as e:
      raise ConfigError(f'config.{name}: {e}') from e
  return out


REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage('pretrain_mlm', pretrain,
          'BERT masked-LM, RoBERTa style: FULL-SENTENCES packing, no NSP, dynamic masking'),
    Stage('pretrain_clm', pretrain, 'GPT-2 causal LM'),
    Stage('finetune_cls', finetune, 'sequence classification / regression, GLUE metrics'),
    Stage('finetune_ner', finetune, 'token classification on CoNLL files, entity-level F1'),
    Stage('finetune_qa', finetune, 'extractive question answering (SQuAD), EM / F1'),
    Stage('predict', predict, 'a fine-tuned workdir on a split or a file -> predictions.jsonl'),
    Stage('finetune_lm', finetune_lm,
          'GPT-2 causal-LM fine-tuning on (prompt, completion) pairs, validated by decoding'),
    Stage('generate', generate,
          'a finetune_lm workdir or an HF GPT-2 on a file of prompts -> generations.jsonl'),
    Stage('distill', distill, 'teacher -> student knowledge distillation'),
    Stage('cloze', cloze, 'PET cloze classification with the MLM head'),
    Stage('model_info', info, 'parameters per module of the configured model'),
    Stage('prepare_data', prepare_data, 'a pretraining config\'s token store, row index and '
          'eval split, made ahead of training'),
    Stage('pipeline', None, 'several stages in sub-workdirs, each starting from the previous'),
)}


ONNX_STAGES = ('finetune_cls', 'finetune_ner', 'finetune_qa')  # the stages whose export reads export.onnx


def section_types(cfg) -> dict[str, type]:
  """{dotted section name: the settings dataclass that holds its defaults and meanings}."""
  stage = REGISTRY.get(cfg.get('stage'))
  if stage is None or stage.module is None:
    return {}
  if hasattr(stage.module, 'parse'):
    return {'model': ModelConfig}
  try:
    return config_lib.section_types(stage.settings_class(cfg))
  except ConfigError:  # --show_config lists the keys first; validate() then says what is wrong
    return {}


def describe(cfg) -> str:
  """Every key of `cfg` with its value and meaning (--show_config)."""
  if cfg.get('stage') == 'pipeline':
    return '\n\n'.join(f'# config.{name} (stage {cfg[name].stage})\n' + '\n'.join(
        config_lib.describe(cfg[name], section_types(cfg[name]), f'{name}.'))
        for name in cfg.pipeline)
  return '\n'.join(config_lib.describe(cfg, section_types(cfg)))


def parse(cfg):
  """The stage's typed settings of `cfg`; ConfigError naming the key otherwise."""
  if 'stage' not in cfg:
    raise ConfigError(f'the config has no `stage`; stages: {sorted(REGISTRY)}')
  stage = REGISTRY.get(cfg.stage)
  if stage is None:
    raise ConfigError(f'stage={cfg.stage!r} does not exist'
                      f'{config_lib.closest(cfg.stage, REGISTRY)}; stages: {sorted(REGISTRY)}')
  if cfg.get('export', {}).get('onnx') and cfg.stage not in ONNX_STAGES:
    raise ConfigError(f'export.onnx=True: stage {cfg.stage} has no ONNX export (stages: '
                      f'{", ".join(ONNX_STAGES)})')
  try:
    return stage.parse(cfg)
  except ConfigError:
    raise
  except (ValueError, TypeError, ArithmeticError) as e:
    raise ConfigError(str(e)) from e


def validate(cfg, num_devices: int | None = None):
  """parse(cfg), and with `num_devices` the mesh and global batch against the devices."""
  settings = parse(cfg)
  if num_devices is None:
    return settings
  if cfg.stage != 'pipeline':
    _check_mesh(settings, num_devices)
  for name, step in (settings.items() if cfg.stage == 'pipeline' else ()):
    try:
      _check_mesh(step, num_devices)
    except ConfigError as e:
      raise ConfigError(f'config.{name}: {e}') from e
  return settings


def _check_mesh(settings, num_devices: int) -> None:
  mesh = getattr(settings, 'mesh', None)
  if mesh is None:
    return
  try:
    loop.check_layout(mesh, getattr(settings, 'train', None), num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def run(cfg, workdir: str) -> dict:
  """Validate `cfg` and run its stage in `workdir`; returns the stage's results."""
  settings = validate(cfg, jax.device_count())
  # Before anything is written: one run per workdir (lock), never a different run's files.
  lock, write_config = workdir_lib.guard(cfg, workdir)
  try:
    if cfg.stage == 'pipeline':
      return run_pipeline(cfg, workdir)
    if workdir_lib.reads_workdir(cfg, workdir):
      # The workdir is this stage's source: run in a subfolder (the source stays locked), so
      # its config.json, results.json and other outputs are never replaced.
      sub_cfg, sub_dir = workdir_lib.reader_run(cfg, workdir)
      logging.info('%s reads %s: its outputs go to %s', cfg.stage, workdir, sub_dir)
      return run(sub_cfg, sub_dir)
    if write_config and jax.process_index() == 0:
      config_lib.save_config(cfg, workdir)
    results = REGISTRY[cfg.stage].run(settings, workdir)
    if jax.process_index() == 0:
      print(outputs_report(cfg.stage, workdir, results))
    return results
  finally:
    if lock is not None:
      lock.release()


def outputs_report(stage: str, workdir: str, results: dict) -> str:
  """Where a finished stage's outputs are and its final metrics, for the console."""
  lines = [f'{stage} {"preempted (rerun to resume)" if results.get("preempted") else "done"}:'
           f' {workdir}']
  for name, what in (('results.json', 'results'), ('export', 'Hugging Face export'),
                     ('predictions.jsonl', 'predictions'), ('generations.jsonl', 'generations'),
                     ('metrics.jsonl', 'metrics')):
    if os.path.exists(os.path.join(workdir, name)):
      lines.append(f'  {what:<20} {os.path.join(workdir, name)}')
  final = {k: v for k, v in (results.get('final') or {}).items() if isinstance(v, float)}
  if final:
    lines.append('  final ' + ', '.join(f'{k}={v:.4f}' for k, v in final.items()))
  base = results.get('baseline') or {}
  if base:
    lines.append(f"  baseline: accuracy={base['accuracy']:.4f} answering {base['token']!r} "
                 f"everywhere, loss={base['loss']:.4f} from token frequencies alone")
  best = results.get('best') or {}
  if best.get('value') is not None:
    lines.append(f"  best {best['metric']}={best['value']:.4f} at step {best.get('step')}")
  return '\n'.join(lines)


def run_pipeline(cfg, workdir: str) -> dict:
  """Run the steps named in cfg.pipeline in order, each in workdir/<name>; a step with an
  empty init_from starts from the previous step's workdir (pretrain -> fine-tune)."""
  results, previous = {}, None
  steps = list(cfg.pipeline)
  for i, name in enumerate(steps):
    sub = cfg[name]
    if previous is not None and 'init_from' in sub and not sub.init_from:
      sub.init_from = previous
    sub_dir = os.path.join(workdir, name)
    logging.info('pipeline step %r (stage %s) in %s', name, sub.stage, sub_dir)
    results[name] = run(sub, sub_dir)
    if results[name].get('preempted'):
      # Stop here: a rerun resumes this step; the next must not start from an unfinished one.
      logging.warning('pipeline step %r was preempted; not starting %s', name, steps[i + 1:])
      break
    previous = sub_dir
  return results

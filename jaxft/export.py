"""A run's exports: workdir/export as a Hugging Face directory (`transformers` opens it),
export/model.onnx beside it (checked with onnxruntime), and int8 inference weights."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxft.models import hf, quantize
from jaxft.models.config import ModelConfig
from jaxft.train.state import ModelDef, to_host

ONNX_OPSET = 17  # LayerNormalization is one op from 17 on; onnxruntime >= 1.12 runs it
ONNX_INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')
DEPLOY_EXTRA = "pip install 'jaxft[deploy]' (torch, onnx, onnxruntime)"
# head -> (transformers Auto class, ONNX output names, their dynamic axes). The QA file has
# the two outputs transformers' and optimum's question-answering models name, each [B, L];
# jaxft's `logits` [B, L, 2] is them stacked on the last axis (start, end).
ONNX_HEADS = {
    'cls': ('AutoModelForSequenceClassification', ('logits',), {0: 'batch'}),
    'token_cls': ('AutoModelForTokenClassification', ('logits',), {0: 'batch', 1: 'sequence'}),
    'qa': ('AutoModelForQuestionAnswering', ('start_logits', 'end_logits'),
           {0: 'batch', 1: 'sequence'}),
}


@dataclasses.dataclass(frozen=True)
class ExportSettings:
  """The `export` config section."""
  hf: bool = True  # write workdir/export at the end of a training stage
  onnx: bool = False  # also export/model.onnx (needs hf; finetune_cls / _ner / _qa)


def export_hf(params, mcfg, head: str, workdir: str, tokenizer, id2label=None) -> str:
  """Write workdir/export as a Hugging Face directory (process 0 writes; every process
  takes part in gathering sharded params)."""
  host = to_host(params)
  out = os.path.join(workdir, 'export')
  if jax.process_index() == 0:
    hf.save_hf(host, mcfg, out, head, tokenizer=tokenizer, id2label=id2label)
    logging.info('exported a Hugging Face checkpoint to %s', out)
  return out


def check_onnx(settings: ExportSettings) -> None:
  """Fail at parse time, not after training, when export.onnx cannot run."""
  if not settings.onnx:
    return
  if not settings.hf:
    raise ValueError('export.onnx=True needs export.hf=True: the ONNX model is exported from '
                     'the Hugging Face export')
  missing = []
  for module in ('torch', 'onnx', 'onnxruntime'):
    try:
      __import__(module)
    except ImportError:
      missing.append(module)
  if missing:
    raise ValueError(f"export.onnx=True needs {', '.join(missing)}, not installed: "
                     f"{DEPLOY_EXTRA}")


class OnnxMismatch(ValueError):
  """export/model.onnx does not compute what jaxft computes; `check` is the record for
  results.json (the file was kept as model.onnx.rejected, never as model.onnx)."""

  def __init__(self, message: str, check: dict):
    super().__init__(message)
    self.check = check


def jax_logits(model_def: ModelDef, params) -> Callable[[dict], np.ndarray]:
  """batch (numpy int arrays) -> the jaxft model's logits as numpy, computed in fp32 from
  the parameters as fp32, whatever model.dtype the run computed in: the exported file is an
  fp32 model, and a bf16 forward is ~1e-3 of the largest logit away from any fp32 one."""
  host = jax.tree.map(
      lambda x: x.astype(np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      to_host(params))

  def forward(p, batch):
    model = model_def.merge(p)
    compute_in_fp32(model)
    return model(**batch)['logits']

  forward = jax.jit(forward)
  return lambda batch: np.asarray(forward(host, {k: np.asarray(v, np.int32)
                                                 for k, v in batch.items()}))


def compute_in_fp32(model: nnx.Module) -> None:
  """Set every submodule's compute dtype (`dtype`, and the `cfg` some of them read it from)
  to float32: the same model and weights, run as an fp32 model (a fresh merge each call)."""
  for _, module in nnx.iter_modules(model):
    if getattr(module, 'dtype', None) is not None:
      module.dtype = jnp.float32
    cfg = getattr(module, 'cfg', None)
    if isinstance(cfg, ModelConfig):
      module.cfg = cfg.replace(dtype=jnp.float32)


def sample_inputs(vocab_size: int, max_len: int, seed: int = 0) -> list[dict]:
  """Two batches of different shapes (so the dynamic axes are exercised), with padding."""
  rng = np.random.default_rng(seed)
  out = []
  for batch, length in ((2, min(8, max_len)), (3, max_len)):
    ids = rng.integers(1, vocab_size, (batch, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, length // 2:] = 0  # a padded row
    out.append({'input_ids': ids, 'attention_mask': mask, 'token_type_ids': np.zeros_like(ids)})
  return out


def export_onnx(hf_dir: str, head: str, reference: Callable[[dict], np.ndarray], *,
                max_len: int, rtol: float = 1e-4) -> dict:
  """hf_dir/model.onnx from the Hugging Face export (torch.onnx, dynamic batch and
  sequence axes), then checked with onnxruntime against `reference` (the jaxft logits) on
  `sample_inputs`: max |onnx - jaxft| must be <= rtol * max(1, max |jaxft|). Outputs: those
  of `ONNX_HEADS[head]` (`logits`; for 'qa' `start_logits` and `end_logits`, compared
  stacked as jaxft's [B, L, 2] `logits`). Both are fp32
  forwards of the same weights in different op orders (`reference`: jax_logits); their gap
  is a few fp32 roundings per layer (~1e-6 relative to the largest logit), so 1e-4 catches
  any real mismatch (a wrong weight, mask or axis) and never a CPU's rounding. The file is
  written as model.onnx.rejected and renamed model.onnx once it passes. Returns {path,
  max_abs_diff, tol}; a mismatch raises OnnxMismatch naming the difference (and holding
  that record, `passed`: False, for results.json)."""
  check_onnx(ExportSettings(onnx=True))
  import onnxruntime as ort  # optional dependencies: the `deploy` extra
  import torch
  import transformers
  if not os.path.isfile(os.path.join(hf_dir, 'config.json')):
    raise FileNotFoundError(f'export.onnx: {hf_dir} holds no Hugging Face model (config.json); '
                            'a PEFT method that cannot be merged has no single model to export')
  if head not in ONNX_HEADS:
    raise ValueError(f'export.onnx: no ONNX export for head {head!r}; heads with one: '
                     f'{sorted(ONNX_HEADS)}')
  auto, outputs, out_axes = ONNX_HEADS[head]
  model = getattr(transformers, auto).from_pretrained(hf_dir, attn_implementation='eager').eval()
  inputs = sample_inputs(model.config.vocab_size, max_len)
  path = os.path.join(hf_dir, 'model.onnx')
  unchecked = path + '.rejected'  # its name until the check passes
  for stale in (path, unchecked):
    if os.path.exists(stale):
      os.remove(stale)
  axes = {name: {0: 'batch', 1: 'sequence'} for name in ONNX_INPUTS}
  axes.update({name: out_axes for name in outputs})
  with torch.no_grad():
    # The TorchScript exporter: 5x faster than dynamo=True here (3.6 s against 19 s for a
    # tiny BERT) and it needs no onnxscript.
    torch.onnx.export(model, (), unchecked, kwargs={k: torch.from_numpy(v) for k, v in
                                               inputs[0].items()},
                      input_names=list(ONNX_INPUTS), output_names=list(outputs),
                      dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
  session = ort.InferenceSession(unchecked, providers=['CPUExecutionProvider'])
  diff, scale = 0.0, 1.0
  for batch in inputs:
    got = session.run(list(outputs), batch)
    got = got[0] if len(got) == 1 else np.stack(got, axis=-1)  # qa: jaxft's [B, L, 2]
    want = reference(batch)
    if got.shape != want.shape:  # never broadcast one against the other
      raise OnnxMismatch(f'export.onnx: {unchecked} gives outputs of shape {got.shape} but '
                         f'jaxft\'s logits have {want.shape}; not kept as model.onnx',
                         {'path': unchecked, 'max_abs_diff': None, 'tol': None,
                          'passed': False})
    diff = max(diff, float(np.max(np.abs(got - want))))
    scale = max(scale, float(np.max(np.abs(want))))
  tol = rtol * scale
  if not diff <= tol:
    raise OnnxMismatch(f'export.onnx: {unchecked} gives logits {diff:.3g} away from jaxft\'s '
                       f'(max abs difference; allowed {tol:.3g}); not kept as model.onnx',
                       {'path': unchecked, 'max_abs_diff': diff, 'tol': tol, 'passed': False})
  os.replace(unchecked, path)
  logging.info('exported %s (onnxruntime logits within %.3g of jaxft)', path, diff)
  return {'path': path, 'max_abs_diff': diff, 'tol': tol}


def int8_model(model_def: ModelDef, params) -> tuple[ModelDef, dict]:
  """(model definition, params) for int8 inference (jaxft.models.quantize): every dense
  kernel per-channel absmax int8, the rest fp32."""
  qdef = ModelDef.create(lambda: quantize.int8(model_def.build()))
  qparams = jax.jit(lambda p: nnx.to_pure_dict(nnx.state(quantize.int8(model_def.merge(p)))))(
      params)
  return qdef, qparams

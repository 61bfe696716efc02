"""The `distill` config section and what it becomes: the loss spec of the objective."""
from __future__ import annotations

import dataclasses

from jaxft.distill import student as student_lib
from jaxft.models.config import ModelConfig
from jaxft.objectives import distill as distill_objectives

KINDS = ('cls', 'mlm', 'qa')
SECTIONS = ('stage', 'seed', 'init_from', 'overwrite', 'teacher', 'model', 'data', 'mesh',
            'optimizer', 'train', 'checkpoint', 'export', 'peft', 'distill', 'mlm')


@dataclasses.dataclass(frozen=True)
class StudentShape:
  """`distill.student`: the student's widths; 0 = the teacher's (num_layers: half of it)."""
  num_layers: int = 0
  hidden_size: int = 0
  num_heads: int = 0
  intermediate_size: int = 0


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """The `distill` config section: loss = alpha*T^2*KL(teacher||student) + (1-alpha)*hard
  loss + weighted feature terms."""
  kind: str = 'cls'              # cls (GLUE-style) | mlm (DistilBERT pretraining) | qa (SQuAD)
  alpha: float = 0.5
  temperature: float = 2.0
  cosine_weight: float = 0.0     # 1 - cos(last hidden states), via projection if widths differ
  hidden_weight: float = 0.0     # TinyBERT hidden-state MSE over layer_map (projected)
  attention_weight: float = 0.0  # TinyBERT attention-probability MSE (equal head counts)
  layer_map: str = ''            # 'student:teacher,...' hidden indices (0 = embeddings); '' uniform
  student_init: str = 'auto'     # auto | teacher_every_k | init_from | random
  student_layers: str = ''       # teacher layers (0-based) for teacher_every_k; '' = every k-th
  student: StudentShape = dataclasses.field(default_factory=StudentShape)
  teacher_dtype: str = ''        # '' = as stored; 'bfloat16' halves its memory and time
  cache_teacher: bool = False    # cls: precompute train-split teacher logits once (workdir/cache)
  measure_speed: bool = True     # inference examples/s of teacher and student on dev
  speed_batches: int = 0         # 0 = the whole dev set

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'distill.kind={self.kind!r}; allowed: {KINDS}')
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f'distill.alpha={self.alpha} must be in [0, 1]')
    if self.temperature <= 0:
      raise ValueError(f'distill.temperature={self.temperature} must be > 0')
    for k in ('cosine_weight', 'hidden_weight', 'attention_weight'):
      if getattr(self, k) < 0:
        raise ValueError(f'distill.{k}={getattr(self, k)} must be >= 0')
    if self.student_init not in student_lib.MODES:
      raise ValueError(f'distill.student_init={self.student_init!r}; allowed: '
                       f'{student_lib.MODES}')
    if self.cache_teacher and self.kind != 'cls':
      raise ValueError('distill.cache_teacher is for classification: MLM masks are drawn per '
                       'step, so there is no fixed input to precompute teacher logits for')


def parse_layer_map(text: str, n_student: int, n_teacher: int) -> tuple[tuple[int, int], ...]:
  """'0:0,1:2,2:4,3:6' -> ((0, 0), ...); '' -> uniform: student i -> teacher i*L_t/L_s."""
  if text:
    try:
      pairs = tuple(tuple(int(v) for v in p.split(':')) for p in
                    str(text).replace(' ', '').split(',') if p)
    except ValueError:
      pairs = ((),)
    if any(len(p) != 2 for p in pairs):
      raise ValueError(f"distill.layer_map={text!r}: write 'student:teacher' pairs, e.g. "
                       "'0:0,1:2,2:4,3:6' (0 = embeddings, i = layer i)")
  else:
    pairs = tuple((i, round(i * n_teacher / n_student)) for i in range(n_student + 1))
  for s, t in pairs:
    if not (0 <= s <= n_student and 0 <= t <= n_teacher):
      raise ValueError(f'distill.layer_map pair {s}:{t} is out of range (student 0..{n_student}, '
                       f'teacher 0..{n_teacher}; 0 = embeddings)')
  return pairs


def make_spec(dc: DistillSettings, student: ModelConfig,
              teacher: ModelConfig) -> distill_objectives.Spec:
  if dc.attention_weight and student.num_heads != teacher.num_heads:
    raise ValueError(f'distill.attention_weight needs equal head counts (student '
                     f'{student.num_heads}, teacher {teacher.num_heads})')
  layer_map = parse_layer_map(dc.layer_map, student.num_layers, teacher.num_layers)
  return distill_objectives.Spec(alpha=dc.alpha, temperature=dc.temperature,
                                 cosine_weight=dc.cosine_weight, hidden_weight=dc.hidden_weight,
                                 attention_weight=dc.attention_weight, layer_map=layer_map)

"""What a distillation run reports: results['distill'] and the teacher / student table."""
from __future__ import annotations


def record(dc, spec, mode: str, cache_info) -> dict:
  """results['distill']: the loss spec as run, the student's init, the logits cache."""
  return {'kind': dc.kind, 'alpha': spec.alpha, 'temperature': spec.temperature,
          'cosine_weight': spec.cosine_weight, 'hidden_weight': spec.hidden_weight,
          'attention_weight': spec.attention_weight,
          'layer_map': [list(p) for p in spec.layer_map] if (spec.hidden_states or
                                                             spec.attentions) else None,
          'student_init': mode, 'cache': cache_info}


def _main_metric(d: dict | None) -> tuple[str, float]:
  if not d:
    return '-', float('nan')
  for k in ('accuracy', 'matthews', 'pearson', 'f1'):
    if k in d:
      return k, float(d[k])
  k = sorted(d)[0]
  return k, float(d[k])


def format_table(results: dict) -> str:
  rows = [('teacher', results['teacher']), ('student', results['student'])]
  name = _main_metric(results['teacher'].get('dev'))[0]
  lines = [f'| model | layers | params | dev {name} | examples/s |', '|---|---|---|---|---|']
  for label, r in rows:
    eps = r.get('examples_per_sec')
    metric = _main_metric(r.get('dev'))[1]
    lines.append(f"| {label} | {r['layers']} | {r['params']:,} | {metric:.4f} | "
                 f"{f'{eps:.1f}' if eps else '-'} |")
  return '\n'.join(lines)
